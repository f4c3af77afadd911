"""asyncwsgi behind a real nginx, over a UNIX socket, as the README's nginx section sets it up.

nginx (``daemon off``, one worker) runs as a subprocess with a generated configuration in the
test's temporary directory: an ``upstream`` with ``keepalive`` pointing at asyncwsgi's UNIX
socket, and a ``server`` on 127.0.0.1 that proxies everything with HTTP/1.1 and the usual
``X-Forwarded-*`` headers. nginx inherits its listening socket from the test (nginx's ``NGINX``
environment variable, as in its binary upgrade), so the port is known before it starts and no
other process can take it. asyncwsgi runs in the test's event loop on the UNIX socket and on
127.0.0.1:0 for direct (untrusted) clients.

Tests wait for nginx's "start worker process" line and for responses, never for a clock. Without
nginx these tests are skipped, except under ``CI=true``, where they fail (``.ci/run`` installs it).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import random
import re
import shutil
import signal
import socket
import tempfile
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

import asyncwsgi.server
from asyncwsgi.channel import HTTPChannel

from .helpers import TIMEOUT, nginx_preamble, require_program, running

MiB = 1024 * 1024
UPLOAD_SIZE = 20 * MiB + 4321
DOWNLOAD_SIZE = 30 * MiB + 1234
#: The test client is on 127.0.0.1 itself, so asyncwsgi trusts another address: only the UNIX
#: socket peer (nginx) is trusted with proxy headers.
TRUSTED_ELSEWHERE = "192.0.2.1"
FORGED = "203.0.113.9"


def nginx_config(directory: Path, port: int, upstream_socket: str) -> str:
    """The configuration of the README's nginx section, with every path in ``directory``."""
    return f"""{nginx_preamble(directory, 64)}

    upstream app {{
        server unix:{upstream_socket};
        keepalive 8;
        keepalive_timeout 4s;
    }}
    server {{
        listen 127.0.0.1:{port};
        client_max_body_size 64m;
        location / {{
            proxy_pass http://app;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $host;
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
            proxy_set_header X-Forwarded-Proto $scheme;
        }}
    }}
}}
"""


# -- the application ------------------------------------------------------------------------


def app(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
    """``/environ``: the request's addressing keys; ``/upload``: size and SHA-256 of the body;
    ``/download``: the file named by ``asyncwsgi.test_file`` through ``wsgi.file_wrapper``."""
    path = environ["PATH_INFO"]
    if path == "/upload":
        digest = hashlib.sha256()
        size = 0
        stream = environ["wsgi.input"]
        while chunk := stream.read(256 * 1024):
            digest.update(chunk)
            size += len(chunk)
        body = f"{size} {digest.hexdigest()}".encode()
    elif path == "/download":
        file = open(DOWNLOAD_PATHS[0], "rb")  # noqa: SIM115 - the file wrapper closes it
        start_response(
            "200 OK",
            [
                ("Content-Type", "application/octet-stream"),
                ("Content-Length", str(os.fstat(file.fileno()).st_size)),
            ],
        )
        return environ["wsgi.file_wrapper"](file, 256 * 1024)  # type: ignore[no-any-return]
    else:
        keys = ("REMOTE_ADDR", "REMOTE_PORT", "wsgi.url_scheme", "HTTP_HOST", "SERVER_NAME")
        body = "\n".join(f"{key}={environ.get(key, '')}" for key in keys).encode()
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]


#: The file ``/download`` sends (set by the fixture; the app runs in worker threads).
DOWNLOAD_PATHS: list[Path] = []


def parse_environ(text: str) -> dict[str, str]:
    return dict(line.split("=", 1) for line in text.splitlines())


# -- nginx in front of asyncwsgi --------------------------------------------------------------


@dataclass
class Proxied:
    """nginx on :attr:`url`, asyncwsgi on :attr:`socket_path` and directly on :attr:`direct_url`."""

    url: str
    direct_url: str
    socket_path: str
    #: The local address (``sockname``) of every connection asyncwsgi accepted, in order.
    accepted: list[Any]
    nginx_log: list[str] = field(default_factory=list)

    def unix_connections(self) -> int:
        return sum(isinstance(sockname, str) for sockname in self.accepted)


async def collect_lines(stream: asyncio.StreamReader, into: list[str]) -> None:
    while line := await stream.readline():
        into.append(line.decode("utf-8", "replace").rstrip("\n"))


@pytest.fixture
def download_file(tmp_path: Path) -> Iterable[tuple[Path, str]]:
    data = random.Random(2024).randbytes(DOWNLOAD_SIZE)
    path = tmp_path / "download.bin"
    path.write_bytes(data)
    DOWNLOAD_PATHS[:] = [path]
    yield path, hashlib.sha256(data).hexdigest()
    DOWNLOAD_PATHS.clear()


@pytest.fixture
async def proxied(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Proxied]:
    """asyncwsgi on a UNIX socket (and 127.0.0.1:0), nginx in front of it; both stopped after.

    Fails when nginx logs an error, or does not exit cleanly on SIGQUIT (graceful stop).
    """
    nginx = require_program("nginx")
    accepted: list[Any] = []

    class CountingChannel(HTTPChannel):
        """Records each accepted connection's local address (a path for the UNIX socket)."""

        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            accepted.append(transport.get_extra_info("sockname"))
            super().connection_made(transport)

    monkeypatch.setattr(asyncwsgi.server, "HTTPChannel", CountingChannel)
    # A short directory: a UNIX socket path is limited to about 107 bytes.
    socket_dir = tempfile.mkdtemp(prefix="asyncwsgi-nginx-", dir="/tmp")
    socket_path = f"{socket_dir}/asyncwsgi.sock"
    nginx_dir = tmp_path / "nginx"
    nginx_dir.mkdir()
    listener = socket.socket()
    try:
        listener.bind(("127.0.0.1", 0))
        listener.listen(64)
        port = listener.getsockname()[1]
        (nginx_dir / "nginx.conf").write_text(nginx_config(nginx_dir, port, socket_path))
        async with running(
            app,
            bind=("127.0.0.1:0",),
            uds=socket_path,
            forwarded_allow_ips=TRUSTED_ELSEWHERE,
            access_log=False,
        ) as server:
            proc = await asyncio.create_subprocess_exec(
                nginx,
                *("-p", str(nginx_dir), "-c", str(nginx_dir / "nginx.conf"), "-e", "stderr"),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.PIPE,
                env={**os.environ, "NGINX": f"{listener.fileno()};"},
                pass_fds=(listener.fileno(),),
            )
            assert proc.stderr is not None
            proxied = Proxied(
                f"http://127.0.0.1:{port}", server.url, socket_path, accepted, nginx_log=[]
            )
            reader = asyncio.ensure_future(collect_lines(proc.stderr, proxied.nginx_log))
            try:
                await wait_for_line(proxied.nginx_log, reader, "start worker process ")
                yield proxied
            finally:
                if proc.returncode is None:
                    proc.send_signal(signal.SIGQUIT)  # graceful: finish requests, then exit
                try:
                    status = await asyncio.wait_for(proc.wait(), TIMEOUT)
                except asyncio.TimeoutError:
                    proc.kill()
                    await proc.wait()
                    raise
                finally:
                    await asyncio.wait_for(reader, TIMEOUT)
            log = "\n".join(proxied.nginx_log)
            assert status == 0, log
            assert not re.search(r"\[(error|crit|alert|emerg)\]", log), log
    finally:
        listener.close()
        shutil.rmtree(socket_dir, ignore_errors=True)


async def wait_for_line(lines: list[str], reader: asyncio.Future[None], fragment: str) -> None:
    """Wait until ``lines`` holds a line containing ``fragment``; fail if nginx exits first."""

    async def seen() -> None:
        while not any(fragment in line for line in lines):
            if reader.done():
                raise AssertionError(
                    f"nginx exited before logging {fragment!r}:\n" + "\n".join(lines)
                )
            await asyncio.wait({reader}, timeout=0.05)

    try:
        await asyncio.wait_for(seen(), TIMEOUT)
    except asyncio.TimeoutError:
        raise AssertionError(f"nginx did not log {fragment!r}:\n" + "\n".join(lines)) from None


@contextlib.asynccontextmanager
async def client(url: str) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=url, trust_env=False, timeout=TIMEOUT) as http:
        yield http


# -- the tests -------------------------------------------------------------------------------


async def test_nginx_reuses_one_keep_alive_connection_upstream(proxied: Proxied) -> None:
    async with client(proxied.url) as http:
        for _ in range(12):
            response = await http.get("/environ")
            assert response.status_code == 200
            assert response.headers["server"].startswith("nginx")  # through the proxy
    assert proxied.unix_connections() == 1, proxied.accepted


async def test_nginx_client_address_is_trusted_from_the_unix_socket_only(
    proxied: Proxied,
) -> None:
    async with client(proxied.url) as http:
        plain = parse_environ((await http.get("/environ")).text)
        forged = parse_environ(
            (await http.get("/environ", headers={"X-Forwarded-For": FORGED})).text
        )
    # nginx's X-Forwarded-For names the client; REMOTE_ADDR of a UNIX socket peer is otherwise
    # empty.
    assert plain["REMOTE_ADDR"] == "127.0.0.1", plain
    assert plain["REMOTE_PORT"] == "0"
    assert plain["wsgi.url_scheme"] == "http"
    assert plain["HTTP_HOST"] == "127.0.0.1"
    # "203.0.113.9, 127.0.0.1": the hop nginx added is the client, whatever it claimed before.
    assert forged["REMOTE_ADDR"] == "127.0.0.1", forged

    async with client(proxied.direct_url) as http:  # the same header, straight over TCP
        direct = await http.get(
            "/environ", headers={"X-Forwarded-For": FORGED, "X-Forwarded-Proto": "https"}
        )
    seen = parse_environ(direct.text)
    assert seen["REMOTE_ADDR"] == "127.0.0.1", seen
    assert seen["REMOTE_PORT"] not in ("", "0")
    assert seen["wsgi.url_scheme"] == "http"


async def test_nginx_large_upload_arrives_byte_exact(proxied: Proxied) -> None:
    data = random.Random(7).randbytes(UPLOAD_SIZE)

    async def pieces() -> AsyncIterator[bytes]:  # chunked to nginx; nginx sends a length
        for start in range(0, len(data), MiB):
            yield data[start : start + MiB]

    async with client(proxied.url) as http:
        sized = await http.post("/upload", content=data)
        chunked = await http.post("/upload", content=pieces())
    expected = f"{len(data)} {hashlib.sha256(data).hexdigest()}"
    assert (sized.status_code, sized.text) == (200, expected)
    assert (chunked.status_code, chunked.text) == (200, expected)
    assert proxied.unix_connections() == 1


async def test_nginx_large_file_download_arrives_byte_exact(
    proxied: Proxied, download_file: tuple[Path, str]
) -> None:
    _, sha256 = download_file
    digest = hashlib.sha256()
    size = 0
    async with client(proxied.url) as http:
        async with http.stream("GET", "/download") as response:
            assert response.status_code == 200
            assert response.headers["content-length"] == str(DOWNLOAD_SIZE)
            async for chunk in response.aiter_raw():
                digest.update(chunk)
                size += len(chunk)
        after = await http.get("/environ")  # the upstream connection is still good
    assert (size, digest.hexdigest()) == (DOWNLOAD_SIZE, sha256)
    assert after.status_code == 200
    assert proxied.unix_connections() == 1
