"""Test helpers: a server on 127.0.0.1:0 in the test loop, raw-socket clients, h11 decoding."""

from __future__ import annotations

import asyncio
import contextlib
import os
import select
import shutil
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h11
import pytest

from asyncwsgi import Config, Server

TIMEOUT = 10.0

#: Where Debian puts daemons (nginx, haproxy): not on an unprivileged user's PATH.
_SBIN = ("/usr/local/sbin", "/usr/sbin", "/sbin")


def require_program(name: str) -> str:
    """Return the path of the external program ``name`` (nginx, wrk, ab, haproxy).

    Searched on ``PATH``, then in the sbin directories. When it is missing the calling test is
    skipped with the reason, on a developer's machine; under ``CI=true`` it fails instead, so
    that CI never skips a test silently (``.ci/run`` installs every program the tests use).

    Raises:
        pytest.skip.Exception: the program is missing and ``CI`` is not ``true``.
        pytest.fail.Exception: the program is missing and ``CI`` is ``true``.
    """
    found = shutil.which(name) or shutil.which(name, path=os.pathsep.join(_SBIN))
    if found is not None:
        return found
    reason = f"{name} is not installed (apt-get install the Debian package; .ci/run does)"
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason}, and CI=true does not allow skipping")
    pytest.skip(reason)


class ProcessOutput:
    """What a subprocess writes to one pipe, read as it arrives, without blocking the test
    longer than a deadline. Subclasses start the process and call ``__init__`` with the pipe.

    Args:
        fd: the read end of the subprocess's stderr (or merged stdout and stderr).
    """

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._data = b""
        self._scanned = 0
        self._eof = False

    @property
    def output(self) -> str:
        """Everything the process wrote so far."""
        return self._data.decode("utf-8", "replace")

    @property
    def raw_output(self) -> bytes:
        return self._data

    def _read(self, deadline: float) -> bool:
        """Read what the pipe has, waiting until ``deadline``; False at EOF or timeout."""
        if self._eof:
            return False
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return False
        ready, _, _ = select.select([self._fd], [], [], remaining)
        if not ready:
            return False
        chunk = os.read(self._fd, 65536)
        if not chunk:
            self._eof = True
            return False
        self._data += chunk
        return True


@dataclass
class Running:
    """A started server: its object, port and base URL."""

    server: Server
    port: int
    url: str


@contextlib.asynccontextmanager
async def running(app: Callable[..., Any], **options: Any) -> AsyncIterator[Running]:
    """Start ``app`` on 127.0.0.1:0 in the running loop; shut it down (gracefully) on exit."""
    options.setdefault("host", "127.0.0.1")
    options.setdefault("port", 0)
    options.setdefault("access_log", True)
    server = Server(app, Config(**options))
    await server.start()
    port = server.addresses[0][1]
    try:
        yield Running(server, port, f"http://127.0.0.1:{port}")
    finally:
        await asyncio.wait_for(server.shutdown(options.get("timeout_graceful_shutdown", 5.0)), 30)


async def exchange(port: int, data: bytes, *, until_close: bool = True) -> bytes:
    """Send raw ``data`` and return everything received until the server closes."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        if until_close:
            return await asyncio.wait_for(reader.read(-1), TIMEOUT)
        return await asyncio.wait_for(reader.read(65536), TIMEOUT)
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


@dataclass
class Reply:
    """One decoded response."""

    status: int
    headers: dict[str, str]
    body: bytes
    raw_headers: list[tuple[bytes, bytes]] = field(default_factory=list)


def decode_replies(data: bytes, method: bytes = b"GET", count: int = 64) -> list[Reply]:
    """Decode up to ``count`` responses from ``data`` with an h11 client (strict framing)."""
    replies: list[Reply] = []
    client = h11.Connection(h11.CLIENT)
    client.receive_data(data)
    client.receive_data(b"")
    for _ in range(count):
        if client.our_state is not h11.IDLE or not client.trailing_data[0]:
            break
        client.send(h11.Request(method=method, target=b"/", headers=[(b"host", b"x")]))
        client.send(h11.EndOfMessage())
        reply: Reply | None = None
        while True:
            event = client.next_event()
            if isinstance(event, h11.InformationalResponse):
                continue
            if isinstance(event, h11.Response):
                reply = Reply(
                    event.status_code,
                    {k.decode(): v.decode("latin-1") for k, v in event.headers},
                    b"",
                    list(event.headers),
                )
            elif isinstance(event, h11.Data):
                assert reply is not None
                reply.body += bytes(event.data)
            elif isinstance(event, h11.EndOfMessage):
                assert reply is not None
                replies.append(reply)
                break
            elif event is h11.NEED_DATA or isinstance(event, h11.ConnectionClosed):
                return replies
        if h11.MUST_CLOSE in (client.their_state, client.our_state):
            break
        try:
            client.start_next_cycle()
        except h11.LocalProtocolError:
            break
    return replies


def nginx_preamble(directory: Path, worker_connections: int) -> str:
    """The start of an nginx configuration that runs in the foreground with every file it
    writes in ``directory``, up to and including the ``http {`` line: a test's own ``upstream``
    and ``server`` blocks and the closing brace follow."""
    user = "user root;\n" if os.geteuid() == 0 else ""  # workers must reach the sockets' dirs
    return f"""daemon off;
{user}worker_processes 1;
pid {directory}/nginx.pid;
error_log stderr notice;
events {{ worker_connections {worker_connections}; }}
http {{
    access_log off;
    client_body_temp_path {directory}/client_body;
    proxy_temp_path {directory}/proxy;
    fastcgi_temp_path {directory}/fastcgi;
    uwsgi_temp_path {directory}/uwsgi;
    scgi_temp_path {directory}/scgi;"""
