"""Health and drain: --health-path answered by the event loop, --shutdown-delay, the listen
backlog served at shutdown, and the queue time in the environ and the access log."""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import socket
from typing import Any

import pytest

import asyncwsgi
from asyncwsgi.accesslog import AccessFormat, AccessRecord
from asyncwsgi.channel import HTTPChannel

from . import apps
from .helpers import TIMEOUT, decode_replies, exchange, running
from .test_cli import CLIServer, http_client
from .test_stuck_threads import BlockingApp, _get, _hang, releasing

APP = "tests.test_stuck_threads:app"


def _access_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "asyncwsgi.access"]


async def test_health_path_is_answered_by_the_loop_while_every_thread_is_busy(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The one thread hangs and --limit-concurrency is reached: an application request gets
    503, the health check 200 ok, from the loop, without an access line."""
    caplog.set_level(logging.INFO, logger="asyncwsgi.access")
    with releasing(BlockingApp()) as blocking:
        options: dict[str, Any] = {"threads": 1, "limit_concurrency": 1}
        async with running(blocking, health_path="/healthz", **options) as server:
            hang = await _hang(server.port, blocking)
            [busy] = decode_replies(await exchange(server.port, _get("/")))
            [health] = decode_replies(await exchange(server.port, _get("/healthz")))
            [head] = decode_replies(
                await exchange(server.port, b"HEAD /healthz HTTP/1.1\r\nHost: x\r\n\r\n"),
                method=b"HEAD",
            )
            blocking.release.set()
            assert await hang == 200
    assert busy.status == 503
    assert (health.status, health.body) == (200, b"ok")
    assert health.headers["content-type"].startswith("text/plain")
    assert (head.status, head.body) == (200, b"")
    assert blocking.paths == ["/hang"]
    assert not [line for line in _access_lines(caplog) if "healthz" in line]


async def test_without_health_path_the_path_reaches_the_application() -> None:
    async with running(apps.environ_app) as server:
        [reply] = decode_replies(await exchange(server.port, _get("/healthz")))
    assert reply.status == 200
    assert json.loads(reply.body)["PATH_INFO"] == "/healthz"


async def test_health_path_answers_503_once_shutdown_has_begun(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A connection accepted before the shutdown asks for the health check: 503."""
    began, accepted = asyncio.Event(), asyncio.Event()
    idle_after_response = HTTPChannel.idle_after_response
    connection_made = HTTPChannel.connection_made

    def watched(self: HTTPChannel) -> bool:
        began.set()  # the shutdown looks at each connection once it has begun
        return idle_after_response.fget(self)  # type: ignore[attr-defined,no-any-return]

    def made(self: HTTPChannel, transport: Any) -> None:
        connection_made(self, transport)
        accepted.set()

    monkeypatch.setattr(HTTPChannel, "idle_after_response", property(watched))
    monkeypatch.setattr(HTTPChannel, "connection_made", made)
    config = asyncwsgi.Config(host="127.0.0.1", port=0, health_path="/healthz")
    server = asyncwsgi.Server(apps.hello, config)
    await server.start()
    reader, writer = await asyncio.open_connection("127.0.0.1", server.addresses[0][1])
    await asyncio.wait_for(accepted.wait(), TIMEOUT)
    shutdown = asyncio.ensure_future(server.shutdown(TIMEOUT))
    await asyncio.wait_for(began.wait(), TIMEOUT)
    writer.write(_get("/healthz"))
    data = await asyncio.wait_for(reader.read(-1), TIMEOUT)
    writer.close()
    await asyncio.wait_for(shutdown, TIMEOUT * 2)
    [reply] = decode_replies(data)
    assert reply.status == 503


async def test_connections_in_the_listen_backlog_at_shutdown_are_served() -> None:
    """Clients connect and send their request while the loop is busy (the kernel completes
    their handshakes; nothing accepts them), then the shutdown begins: each gets its response
    instead of a connection reset."""
    config = asyncwsgi.Config(host="127.0.0.1", port=0, access_log=False)
    server = asyncwsgi.Server(apps.hello, config)
    await server.start()
    port = server.addresses[0][1]
    # The loop runs nothing else until the shutdown has closed the listening socket: the
    # clients below wait in the backlog (blocking calls, on purpose, in the loop's thread).
    clients = [socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) for _ in range(5)]
    for client in clients:
        client.sendall(_get("/"))
    shutdown = asyncio.ensure_future(server.shutdown(TIMEOUT))
    try:
        await asyncio.wait_for(shutdown, TIMEOUT * 2)
        answers = await asyncio.gather(*(asyncio.to_thread(_read_all, c) for c in clients))
    finally:
        for client in clients:
            client.close()
    assert [[r.status for r in decode_replies(data)] for data in answers] == [[200]] * 5


def _read_all(sock: socket.socket) -> bytes:
    chunks = []
    try:
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    except ConnectionResetError:
        chunks.append(b"<reset>")
    return b"".join(chunks)


async def test_queue_time_is_in_the_access_log(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="asyncwsgi.access")
    fmt = '"%(r)s" %(s)s queue=%(Q)s'
    async with running(apps.hello, access_logformat=fmt) as server:
        await exchange(server.port, _get("/"))
    [line] = _access_lines(caplog)
    assert line.startswith('"GET / HTTP/1.1" 200 queue=')
    assert float(line.rsplit("=", 1)[1]) >= 0
    record = AccessRecord(
        "-", {"asyncwsgi.queue_time": 0.0123}, b"GET", b"/", b"1.1", [], 200, [], 0, 0.1
    )
    assert AccessFormat("%(Q)s").render(record) == "12.300"
    assert json.loads(AccessFormat("%(Q)s", json=True).render(record)) == {"queue_ms": 12.3}
    assert AccessFormat("%(Q)s").render(record._replace(environ=None)) == "-"


def test_shutdown_delay_keeps_serving_while_the_health_check_fails() -> None:
    """SIGTERM with --shutdown-delay: requests are still served (new connections too) while
    the health check answers 503; a second SIGTERM changes nothing; SIGQUIT stops now."""
    args = ("--port", "0", "--health-path", "/hz", "--shutdown-delay", "60", "--no-access-log")
    with CLIServer(APP, *args, env={"WEB_CONCURRENCY": ""}) as server:
        url = server.url()
        with http_client() as client:
            assert client.get(f"{url}/hz").text == "ok"
            server.proc.send_signal(signal.SIGTERM)
            server.wait_for(r"Received SIGTERM; serving 60 s more while the health check")
            assert client.get(f"{url}/hz").status_code == 503
            assert int(client.get(url).text) == server.proc.pid
            server.proc.send_signal(signal.SIGTERM)
            server.wait_for("Received SIGTERM; already shutting down")
            assert client.get(f"{url}/hz").status_code == 503
            assert client.get(url).status_code == 200
        assert server.stop(signal.SIGQUIT) == 0
