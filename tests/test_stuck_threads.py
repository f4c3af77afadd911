"""Stuck threads: a request past --timeout-request whose application call still runs.

Its thread counts as stuck: the log names it with its stack, the pool runs a replacement so
that --threads threads stay free, and a stuck thread that finishes rejoins the pool, which
shrinks back. When --threads threads are stuck, a supervised worker recycles itself; an
unsupervised process says so (CRITICAL) and its health check answers 503. A request answered
504 or 503 while it waited for a thread, or whose client reset the connection, never reaches
the application. In-process servers (``blocking_app``, released by a threading.Event) and real
processes (``app`` below, served with ``--app-dir`` at the repository root).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import socket
import struct
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from asyncwsgi.channel import HTTPChannel
from asyncwsgi.wsgi import run_wsgi

from .helpers import TIMEOUT, decode_replies, exchange, running
from .logwatch import watch_errors
from .test_cli import CLIServer, http_client, port_of

APP = "tests.test_stuck_threads:app"

# -- the application served by the subprocess --------------------------------------------------

_NEVER = threading.Event()


def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
    """``/hang``: waits for ever (the thread ends with the process). Else: the pid."""
    if environ["PATH_INFO"] == "/hang":
        _NEVER.wait()
    body = str(os.getpid()).encode()
    start_response("200 OK", [("Content-Length", str(len(body)))])
    return [body]


# -- in-process: an application whose /hang waits for the test --------------------------------


class BlockingApp:
    """``/hang`` waits until :attr:`release` is set; every call's path is recorded."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.paths: list[str] = []
        self.hanging = threading.Semaphore(0)

    def __call__(self, environ: dict[str, Any], start_response: Any) -> list[bytes]:
        return blocking_app(self, environ, start_response)


def blocking_app(owner: BlockingApp, environ: dict[str, Any], start_response: Any) -> list[bytes]:
    path = environ["PATH_INFO"]
    owner.paths.append(path)
    if path == "/hang":
        owner.hanging.release()
        owner.release.wait(TIMEOUT * 3)
    start_response("200 OK", [("Content-Length", "2")])
    return [b"ok"]


@contextlib.contextmanager
def releasing(blocking: BlockingApp) -> Iterator[BlockingApp]:
    try:
        yield blocking
    finally:
        blocking.release.set()


def _get(path: str) -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode()


async def _status(port: int, path: str) -> int:
    """The status of ``GET path`` on a new connection."""
    replies = decode_replies(await exchange(port, _get(path)))
    assert len(replies) == 1, replies
    return replies[0].status


async def _hang(port: int, blocking: BlockingApp) -> asyncio.Task[int]:
    """Send ``GET /hang``; return once the application runs it (the task gives its status)."""
    task = asyncio.ensure_future(_status(port, "/hang"))
    await asyncio.to_thread(blocking.hanging.acquire, True, TIMEOUT)
    return task


async def test_a_stuck_thread_is_logged_with_its_stack_and_replaced() -> None:
    """--threads 1: /hang is answered 504 and its thread logged as stuck, with the request
    line and the application's frame; a normal request is then served at once, by the
    replacement, not queued behind the stuck thread until it too times out."""
    with watch_errors() as watch, releasing(BlockingApp()) as blocking:
        async with running(blocking, threads=1, timeout_request=0.5) as server:
            hang = await _hang(server.port, blocking)
            assert await hang == 504
            await watch.wait_for("is stuck in it")
            assert await _status(server.port, "/") == 200
            assert server.server.state.pool.stuck == 1
    [record] = [m for m in watch.messages() if "is stuck in it" in m]
    assert record.startswith("GET /hang did not start its response in 0.5 s")
    assert re.search(r'File "[^"]*test_stuck_threads\.py", line \d+, in blocking_app', record)
    assert "owner.release.wait(" in record
    assert blocking.paths == ["/hang", "/"]


async def test_a_stuck_thread_that_finishes_rejoins_and_the_pool_shrinks() -> None:
    with watch_errors() as watch, releasing(BlockingApp()) as blocking:
        async with running(blocking, threads=1, timeout_request=0.5) as server:
            pool = server.server.state.pool
            hang = await _hang(server.port, blocking)
            assert await hang == 504
            await watch.wait_for("is stuck in it")
            assert await _status(server.port, "/") == 200  # the replacement runs
            assert pool.threads == 2
            [name] = re.findall(r"worker thread (\S+) is stuck", "\n".join(watch.messages()))
            stuck = next(t for t in threading.enumerate() if t.name == name)
            blocking.release.set()
            await watch.wait_for(f"Worker thread {name}, stuck for")
            await asyncio.to_thread(stuck.join, TIMEOUT)  # one too many now: it ends
            assert not stuck.is_alive()
            assert pool.stuck == 0
            assert pool.threads == 1
            assert await _status(server.port, "/") == 200


async def test_at_most_threads_replacements_then_requests_wait() -> None:
    """--threads 1: two stuck threads use up the one replacement allowed; a third request
    waits, is answered 504, and is not run once the threads are free again."""
    with watch_errors() as watch, releasing(BlockingApp()) as blocking:
        async with running(blocking, threads=1, timeout_request=0.5) as server:
            for count in (1, 2):
                hang = await _hang(server.port, blocking)
                assert await hang == 504
                await watch.wait_for("is stuck in it", count)
            assert server.server.state.pool.threads == 2
            assert await _status(server.port, "/late") == 504
            await watch.wait_for("GET /late did not start its response")
            blocking.release.set()
            await watch.wait_for("GET /late waited")
    [line] = [m for m in watch.messages() if m.startswith("GET /late waited")]
    assert line.endswith("the application is not called")
    assert "/late" not in blocking.paths


class _Sink:
    can_sendfile = False
    disconnected = False
    thread = 0

    def __init__(self) -> None:
        self.sent: list[Any] = []

    def send(self, head: Any, chunks: list[bytes], nbytes: int, end: bool) -> None:
        self.sent.append(head)

    def send_file(self, *args: Any) -> None:
        raise AssertionError("no file")

    def abort(self) -> None:
        raise AssertionError("no abort")


def test_a_request_past_its_request_timeout_is_not_run_by_the_thread_that_takes_it() -> None:
    """The loop answers it 504 at its next sweep (or already did): the thread that takes it
    first, a replacement just started say, neither calls the application nor answers."""
    calls: list[str] = []

    def recording(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        calls.append(environ["PATH_INFO"])
        start_response("200 OK", [])
        return []

    sink = _Sink()
    environ = {"REQUEST_METHOD": "GET", "PATH_INFO": "/late"}
    run_wsgi(recording, environ, sink, time.perf_counter() - 2.0, 30.0, 1.0)
    assert calls == []
    assert sink.sent == []
    run_wsgi(recording, environ, sink, time.perf_counter(), 30.0, 1.0)
    assert calls == ["/late"]
    assert sink.thread == threading.get_ident()
    assert 0 <= environ["asyncwsgi.queue_time"] < 1.0


@pytest.fixture
def seen_by_server(monkeypatch: pytest.MonkeyPatch) -> dict[str, asyncio.Event]:
    """Events set when a connection's loss or EOF has reached the server."""
    events = {"lost": asyncio.Event(), "eof": asyncio.Event()}
    lost, eof = HTTPChannel.connection_lost, HTTPChannel.eof_received

    def connection_lost(self: HTTPChannel, exc: Exception | None) -> None:
        lost(self, exc)
        events["lost"].set()

    def eof_received(self: HTTPChannel) -> bool:
        keep = eof(self)
        events["eof"].set()
        return keep

    monkeypatch.setattr(HTTPChannel, "connection_lost", connection_lost)
    monkeypatch.setattr(HTTPChannel, "eof_received", eof_received)
    return events


async def test_a_request_whose_client_reset_while_it_waited_is_not_run(
    seen_by_server: dict[str, asyncio.Event],
) -> None:
    with watch_errors() as watch, releasing(BlockingApp()) as blocking:
        async with running(blocking, threads=1) as server:
            hang = await _hang(server.port, blocking)
            with socket.create_connection(("127.0.0.1", server.port)) as client:
                client.sendall(_get("/reset"))
                client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            await asyncio.wait_for(seen_by_server["lost"].wait(), TIMEOUT)
            blocking.release.set()
            assert await hang == 200
            await watch.wait_for("GET /reset waited")
    assert "/reset" not in blocking.paths


async def test_a_client_that_half_closed_after_its_request_is_served(
    seen_by_server: dict[str, asyncio.Event],
) -> None:
    with releasing(BlockingApp()) as blocking:
        async with running(blocking, threads=1) as server:
            hang = await _hang(server.port, blocking)
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
            writer.write(_get("/half"))
            writer.write_eof()
            await asyncio.wait_for(seen_by_server["eof"].wait(), TIMEOUT)
            blocking.release.set()
            assert await hang == 200
            data = await asyncio.wait_for(reader.read(-1), TIMEOUT)
            writer.close()
    assert [r.status for r in decode_replies(data)] == [200]
    assert blocking.paths == ["/hang", "/half"]


# -- real processes ------------------------------------------------------------------------------


def _hang_twice(port: int) -> None:
    """Two /hang requests at once; each is answered 504."""
    statuses: list[int] = []

    def one() -> None:
        with http_client() as client:
            statuses.append(client.get(f"http://127.0.0.1:{port}/hang").status_code)

    clients = [threading.Thread(target=one) for _ in range(2)]
    for client in clients:
        client.start()
    for client in clients:
        client.join(TIMEOUT * 2)
    assert statuses == [504, 504]


def test_a_supervised_worker_with_every_thread_stuck_is_recycled() -> None:
    """The issue's scenario: --workers 1 --threads 2 --timeout-request 1. After two /hang
    requests the worker recycles itself: its replacement serves, with no manual step, within
    --timeout-request + --timeout-graceful-shutdown + 5 s, and the stuck worker exits."""
    args = ("--port", "0", "--workers", "1", "--threads", "2", "--timeout-request", "1")
    with CLIServer(APP, *args, "--timeout-graceful-shutdown", "2", "--no-access-log") as server:
        port = port_of(server.url())
        with http_client() as client:
            stuck_pid = int(client.get(server.url()).text)
        _hang_twice(port)
        deadline = time.monotonic() + 1 + 2 + 5
        served_by = stuck_pid
        while served_by == stuck_pid:
            assert time.monotonic() < deadline, server.output
            with http_client() as client:
                response = client.get(server.url())
            if response.status_code == 200:
                served_by = int(response.text)
        server.wait_for(
            rf"Worker \(pid: {stuck_pid}\) has all its threads stuck \(--timeout-request\); "
            "starting a new one"
        )
        server.wait_for(rf"\[{stuck_pid}\] \[INFO\] Shutdown complete")
        assert server.stop() == 0
    assert server.output.count("is stuck in it") == 2


def test_an_unsupervised_process_with_every_thread_stuck_reports_it() -> None:
    """Without --workers: a CRITICAL line, the health check answers 503, and the replacement
    threads still serve."""
    args = ("--port", "0", "--threads", "2", "--timeout-request", "1", "--health-path", "/hz")
    with CLIServer(APP, *args, "--no-access-log", env={"WEB_CONCURRENCY": ""}) as server:
        port = port_of(server.url())
        with http_client() as client:
            assert client.get(f"{server.url()}/hz").status_code == 200
        _hang_twice(port)
        server.wait_for(r"\[CRITICAL\] All 2 threads are stuck in the application")
        with http_client() as client:
            health = client.get(f"{server.url()}/hz")
            assert int(client.get(server.url()).text) == server.proc.pid
        assert health.status_code == 503
        assert server.stop() == 0
