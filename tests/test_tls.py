"""TLS over real sockets on 127.0.0.1:0, with certificates from trustme.

Each test talks to a server started with ``ssl_*`` settings through a TLS client that trusts
only the test's CA, so a handshake that succeeds proves the server presented that certificate.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import ssl
import threading
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import trustme
from cryptography.hazmat.primitives import serialization

import asyncwsgi
from asyncwsgi import Config, ConfigError, Server
from asyncwsgi.tls import create_ssl_context

from . import apps
from .helpers import TIMEOUT, decode_replies


@dataclass
class PKI:
    """A CA, a server certificate for 127.0.0.1, and a client certificate, written to files."""

    ca: trustme.CA
    certfile: str  # server certificate chain
    keyfile: str  # server key, unencrypted
    combined: str  # key and chain in one file
    encrypted_keyfile: str  # server key encrypted with PASSWORD
    ca_file: str
    client: trustme.LeafCert


PASSWORD = "correct horse"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    directory = tmp_path_factory.mktemp("pki")
    ca = trustme.CA()
    server = ca.issue_cert("127.0.0.1", "localhost")
    certfile = directory / "server.pem"
    keyfile = directory / "server.key"
    combined = directory / "combined.pem"
    encrypted = directory / "encrypted.key"
    ca_file = directory / "ca.pem"
    server.cert_chain_pems[0].write_to_path(str(certfile))
    for pem in server.cert_chain_pems[1:]:
        pem.write_to_path(str(certfile), append=True)
    server.private_key_pem.write_to_path(str(keyfile))
    server.private_key_and_cert_chain_pem.write_to_path(str(combined))
    ca.cert_pem.write_to_path(str(ca_file))
    key = serialization.load_pem_private_key(server.private_key_pem.bytes(), password=None)
    encrypted.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(PASSWORD.encode()),
        )
    )
    return PKI(
        ca,
        str(certfile),
        str(keyfile),
        str(combined),
        str(encrypted),
        str(ca_file),
        ca.issue_cert("client@example.org"),
    )


def client_context(pki: PKI, *, with_cert: bool = False) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    pki.ca.configure_trust(context)
    if with_cert:
        pki.client.configure_cert(context)
    return context


@contextlib.asynccontextmanager
async def tls_server(app: Callable[..., Any], pki: PKI, **options: Any) -> AsyncIterator[int]:
    options.setdefault("ssl_certfile", pki.certfile)
    options.setdefault("ssl_keyfile", pki.keyfile)
    server = Server(app, Config(host="127.0.0.1", port=0, **options))
    await server.start()
    try:
        yield server.addresses[0][1]
    finally:
        await asyncio.wait_for(server.shutdown(5.0), 30)


async def tls_exchange(port: int, context: ssl.SSLContext, data: bytes) -> bytes:
    """Send ``data`` over TLS and return everything received until the server closes."""
    reader, writer = await asyncio.wait_for(
        asyncio.open_connection("127.0.0.1", port, ssl=context, server_hostname="127.0.0.1"),
        TIMEOUT,
    )
    try:
        writer.write(data)
        await writer.drain()
        return await asyncio.wait_for(reader.read(-1), TIMEOUT)
    finally:
        writer.close()
        with contextlib.suppress(OSError, ssl.SSLError):
            await writer.wait_closed()


def close_request(target: str = "/", method: str = "GET", body: bytes = b"") -> bytes:
    head = f"{method} {target} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n"
    if body or method == "POST":
        head += f"Content-Length: {len(body)}\r\n"
    return head.encode() + b"\r\n" + body


# -- handshake and requests ------------------------------------------------------------------------


async def test_get_over_tls_has_https_scheme(pki: PKI) -> None:
    async with tls_server(apps.environ_app, pki) as port:
        raw = await tls_exchange(port, client_context(pki), close_request("/secure?x=1"))
    (reply,) = decode_replies(raw)
    assert reply.status == 200
    environ = json.loads(reply.body)
    assert environ["wsgi.url_scheme"] == "https"
    assert environ["PATH_INFO"] == "/secure"
    assert environ["QUERY_STRING"] == "x=1"
    assert environ["SERVER_PORT"] == str(port)


async def test_handshake_presents_the_configured_certificate(pki: PKI) -> None:
    """The client verifies the chain against the test CA and the name 127.0.0.1."""
    async with tls_server(apps.hello, pki) as port:
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", port, ssl=client_context(pki), server_hostname="127.0.0.1"
        )
        ssl_object = writer.get_extra_info("ssl_object")
        assert ssl_object is not None
        peer = ssl_object.getpeercert()
        assert ("IP Address", "127.0.0.1") in peer["subjectAltName"]
        writer.write(close_request())
        assert (await asyncio.wait_for(reader.read(-1), TIMEOUT)).endswith(b"Hello, world!")
        writer.close()
        with contextlib.suppress(OSError, ssl.SSLError):
            await writer.wait_closed()


async def test_client_that_does_not_trust_the_ca_fails_the_handshake(pki: PKI) -> None:
    other = trustme.CA()
    context = ssl.create_default_context()
    other.configure_trust(context)
    async with tls_server(apps.hello, pki) as port:
        with pytest.raises(ssl.SSLCertVerificationError):
            await tls_exchange(port, context, close_request())


async def test_plain_http_to_a_tls_port_gets_no_http_response(pki: PKI) -> None:
    async with tls_server(apps.hello, pki) as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(close_request())
        try:
            data = await asyncio.wait_for(reader.read(-1), TIMEOUT)
        except ConnectionResetError:
            data = b""
        writer.close()
    assert b"Hello, world!" not in data
    assert not data.startswith(b"HTTP/1.1 200")


async def test_post_over_tls(pki: PKI) -> None:
    body = os.urandom(300_000)
    async with tls_server(apps.echo, pki) as port:
        raw = await tls_exchange(port, client_context(pki), close_request("/", "POST", body))
    (reply,) = decode_replies(raw)
    assert reply.status == 200
    assert reply.body == body


async def test_keep_alive_over_tls(pki: PKI) -> None:
    async with tls_server(apps.hello, pki) as port:
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", port, ssl=client_context(pki), server_hostname="127.0.0.1"
        )
        for _ in range(3):
            writer.write(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), TIMEOUT)
            assert head.startswith(b"HTTP/1.1 200 OK")
            assert await reader.readexactly(13) == b"Hello, world!"
        writer.close()
        with contextlib.suppress(OSError, ssl.SSLError):
            await writer.wait_closed()


async def test_certfile_holding_the_key_and_encrypted_key(pki: PKI) -> None:
    for options in (
        {"ssl_certfile": pki.combined, "ssl_keyfile": None},
        {"ssl_keyfile": pki.encrypted_keyfile, "ssl_keyfile_password": PASSWORD},
    ):
        async with tls_server(apps.hello, pki, **options) as port:
            raw = await tls_exchange(port, client_context(pki), close_request())
        assert decode_replies(raw)[0].body == b"Hello, world!", options


# -- file responses: no sendfile over TLS ----------------------------------------------------------


def _file_app(path: Path) -> Callable[..., Iterable[bytes]]:
    def app(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        f = open(path, "rb")  # noqa: SIM115 - closed through the wrapper
        start_response(
            "200 OK",
            [
                ("Content-Type", "application/octet-stream"),
                ("Content-Length", str(path.stat().st_size)),
            ],
        )
        return environ["wsgi.file_wrapper"](f, 65536)  # type: ignore[no-any-return]

    return app


@pytest.mark.parametrize("loop_name", ["uvloop", "asyncio"])
async def test_file_download_over_tls_is_exact_and_skips_sendfile(
    pki: PKI, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, loop_name: str
) -> None:
    """A multi-megabyte wsgi.file_wrapper body arrives intact over TLS, twice on one
    connection, and never through sendfile(2), which would bypass the TLS layer."""
    path = tmp_path / "big.bin"
    path.write_bytes(os.urandom(5 * 1024 * 1024 + 123))
    calls: list[int] = []
    real = os.sendfile

    def counting(out_fd: int, in_fd: int, offset: int | None, count: int) -> int:
        calls.append(count)
        return real(out_fd, in_fd, offset, count)

    monkeypatch.setattr(os, "sendfile", counting)
    context = client_context(pki)

    async def scenario() -> bytes:
        async with tls_server(_file_app(path), pki) as port:
            return await tls_exchange(
                port, context, b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n" + close_request()
            )

    raw = await _in_loop(loop_name, scenario)
    replies = decode_replies(raw)
    expected = hashlib.sha256(path.read_bytes()).hexdigest()
    assert [hashlib.sha256(r.body).hexdigest() for r in replies] == [expected, expected]
    assert calls == []


@pytest.mark.parametrize("loop_name", ["uvloop", "asyncio"])
async def test_channel_knows_tls_connections_cannot_sendfile(pki: PKI, loop_name: str) -> None:
    """The transport of a TLS connection reports its sslcontext, so can_sendfile is off."""
    seen: list[bool] = []

    async def scenario() -> None:
        entered = threading.Event()

        def app(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
            entered.set()
            start_response("200 OK", [("Content-Length", "2")])
            return [b"ok"]

        server = Server(
            app,
            Config(host="127.0.0.1", port=0, ssl_certfile=pki.certfile, ssl_keyfile=pki.keyfile),
        )
        await server.start()
        try:
            port = server.addresses[0][1]
            reader, writer = await asyncio.open_connection(
                "127.0.0.1", port, ssl=client_context(pki), server_hostname="127.0.0.1"
            )
            writer.write(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
            await reader.readuntil(b"ok")
            seen.extend(channel.can_sendfile for channel in server.state.channels)
            writer.close()
            with contextlib.suppress(OSError, ssl.SSLError):
                await writer.wait_closed()
        finally:
            await server.shutdown(5.0)

    await _in_loop(loop_name, scenario)
    assert seen == [False]


async def _in_loop(loop_name: str, scenario: Callable[[], Any]) -> Any:
    """Run ``scenario`` in a fresh loop of the given kind, in a thread (the test loop is busy)."""

    def target() -> Any:
        loop = asyncwsgi.server.new_event_loop(loop_name)
        try:
            return loop.run_until_complete(scenario())
        finally:
            loop.close()

    return await asyncio.to_thread(target)


# -- client certificates ---------------------------------------------------------------------------


def recording_app(seen: list[str]) -> Callable[..., Iterable[bytes]]:
    def app(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        seen.append(environ["PATH_INFO"])
        start_response("200 OK", [("Content-Length", "2")])
        return [b"ok"]

    return app


async def test_required_client_certificate(pki: PKI) -> None:
    seen: list[str] = []
    options = {"ssl_ca_certs": pki.ca_file, "ssl_cert_reqs": 2}
    async with tls_server(recording_app(seen), pki, **options) as port:
        raw = await tls_exchange(port, client_context(pki, with_cert=True), close_request("/in"))
        assert decode_replies(raw)[0].body == b"ok"
        # Without a certificate: TLS 1.3 lets the client finish its side of the handshake
        # first, so the refusal shows up as an alert, a reset or an EOF; never as a response.
        try:
            raw = await tls_exchange(port, client_context(pki), close_request("/out"))
        except (ssl.SSLError, ConnectionResetError, BrokenPipeError):
            raw = b""
        assert raw == b""
        # A certificate from another CA is refused too.
        stranger = trustme.CA().issue_cert("mallory@example.org")
        context = client_context(pki)
        stranger.configure_cert(context)
        try:
            raw = await tls_exchange(port, context, close_request("/stranger"))
        except (ssl.SSLError, ConnectionResetError, BrokenPipeError):
            raw = b""
        assert raw == b""
    assert seen == ["/in"]


async def test_optional_client_certificate(pki: PKI) -> None:
    seen: list[str] = []
    options = {"ssl_ca_certs": pki.ca_file, "ssl_cert_reqs": 1}
    async with tls_server(recording_app(seen), pki, **options) as port:
        for with_cert, path in ((True, "/with"), (False, "/without")):
            context = client_context(pki, with_cert=with_cert)
            raw = await tls_exchange(port, context, close_request(path))
            assert decode_replies(raw)[0].body == b"ok"
    assert seen == ["/with", "/without"]


# -- ciphers and settings --------------------------------------------------------------------------


async def test_ssl_ciphers_limit_tls12_suites(pki: PKI) -> None:
    suite = "ECDHE-ECDSA-AES256-GCM-SHA384"
    context = client_context(pki)
    context.maximum_version = ssl.TLSVersion.TLSv1_2
    async with tls_server(apps.hello, pki, ssl_ciphers=suite) as port:
        _, writer = await asyncio.open_connection(
            "127.0.0.1", port, ssl=context, server_hostname="127.0.0.1"
        )
        cipher = writer.get_extra_info("cipher")
        writer.close()
        with contextlib.suppress(OSError, ssl.SSLError):
            await writer.wait_closed()
    assert cipher[0] == suite


def test_default_context_is_uvicorns(pki: PKI) -> None:
    context = create_ssl_context(Config(ssl_certfile=pki.certfile, ssl_keyfile=pki.keyfile))
    assert context is not None
    assert context.verify_mode == ssl.CERT_NONE
    assert context.protocol == ssl.PROTOCOL_TLS_SERVER
    assert Config().ssl_ciphers == "TLSv1"
    assert create_ssl_context(Config()) is None


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"ssl_cert_reqs": 3, "ssl_certfile": "x"}, "ssl_cert_reqs must be 0, 1 or 2"),
        ({"ssl_keyfile": "k.pem"}, "ssl_keyfile needs ssl_certfile"),
        ({"ssl_ca_certs": "ca.pem"}, "ssl_ca_certs needs ssl_certfile"),
        ({"ssl_cert_reqs": 2}, "ssl_cert_reqs needs ssl_certfile"),
    ],
)
def test_bad_settings_are_config_errors(options: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        Config(**options)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"ssl_certfile": "/nonexistent/cert.pem"}, "cannot load the TLS certificate"),
        ({"ssl_keyfile_password": "wrong"}, "cannot load the TLS certificate"),
        ({"ssl_ca_certs": "/nonexistent/ca.pem"}, "cannot load ssl_ca_certs"),
        ({"ssl_ciphers": "NO-SUCH-CIPHER"}, "bad ssl_ciphers"),
    ],
)
async def test_unloadable_files_fail_start_with_config_error(
    pki: PKI, options: dict[str, Any], message: str
) -> None:
    keyfile = pki.encrypted_keyfile if "ssl_keyfile_password" in options else pki.keyfile
    options = {"ssl_certfile": pki.certfile, "ssl_keyfile": keyfile, **options}
    server = Server(apps.hello, Config(host="127.0.0.1", port=0, **options))
    with pytest.raises(ConfigError, match=message):
        await server.start()
    assert server.addresses == []


# -- the command line ------------------------------------------------------------------------------


def test_cli_serves_https(pki: PKI) -> None:
    from .test_cli import CLIServer

    args = ("--port", "0", "--ssl-certfile", pki.certfile, "--ssl-keyfile", pki.keyfile)
    with CLIServer("tests.apps:environ_app", *args) as server:
        url = server.url()
        assert url.startswith("https://127.0.0.1:")
        with httpx.Client(verify=client_context(pki), trust_env=False, timeout=TIMEOUT) as client:
            environ = client.get(url + "/cli").json()
        assert environ["wsgi.url_scheme"] == "https"
        assert environ["PATH_INFO"] == "/cli"
        assert server.stop() == 0


def test_cli_unreadable_certificate_is_one_error_line(tmp_path: Path) -> None:
    from .test_cli import assert_one_error_line, run_cli

    missing = str(tmp_path / "missing.pem")
    result = run_cli("serve", "tests.apps:hello", "--port", "0", "--ssl-certfile", missing)
    assert result.returncode == 1
    assert_one_error_line(result.stderr, "cannot load the TLS certificate", "missing.pem")
    assert "Listening at" not in result.stderr
