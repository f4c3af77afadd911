"""Timeouts, overload limits and client faults, over real sockets on 127.0.0.1:0.

One test (at least) per timeout and limit of ``Config``: each drives the server into the state
the setting governs, synchronising on events (threading events the apps set, log lines, bytes
on the wire), and asserts what the client sees and that no thread or close() is left behind.
Timeouts are set to fractions of a second so that the tests are quick; nothing here asserts a
duration.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
import types
import typing
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest

import asyncwsgi
from asyncwsgi import wsgi as wsgi_module
from asyncwsgi.errors import ClientDisconnected

from . import apps
from .helpers import TIMEOUT, decode_replies, exchange, running
from .logwatch import watch_errors

GET = b"GET / HTTP/1.1\r\nHost: t\r\n\r\n"
HELLO = b"GET /hello HTTP/1.1\r\nHost: t\r\n\r\n"
Environ = dict[str, Any]


async def read_to_end(reader: asyncio.StreamReader) -> tuple[bytes, bool]:
    """Read until the server closes; return the bytes and whether it ended in a reset."""
    data = b""
    try:
        while chunk := await asyncio.wait_for(reader.read(65536), TIMEOUT):
            data += chunk
    except ConnectionResetError:
        return data, True
    return data, False


def transport(writer: asyncio.StreamWriter) -> asyncio.Transport:
    """The writer's transport, as the read-write transport it is."""
    return typing.cast(asyncio.Transport, writer.transport)


async def wait_thread(event: threading.Event) -> None:
    """Wait for a threading event set by the application, without blocking the loop."""
    assert await asyncio.to_thread(event.wait, TIMEOUT), "the application did not get there"


class Gate:
    """An app whose ``/block`` requests wait until released; ``/hello`` answers at once.

    Counts calls, entries and close() calls of the blocked requests' results.
    """

    def __init__(self) -> None:
        self.release = threading.Event()
        self.entered = threading.Semaphore(0)
        self.calls: list[str] = []
        self.closes = 0
        self.closed = threading.Event()
        self.lock = threading.Lock()

    def __call__(self, environ: Environ, start_response: Any) -> Iterable[bytes]:
        path = environ["PATH_INFO"]
        with self.lock:
            self.calls.append(path)
        if path == "/block":
            self.entered.release()
            self.release.wait(TIMEOUT)
            start_response("200 OK", [("Content-Length", "7")])
            return _Closing(self, [b"blocked"])
        start_response("200 OK", [("Content-Length", "5")])
        return [b"hello"]

    async def wait_entered(self, count: int = 1) -> None:
        for _ in range(count):
            assert await asyncio.to_thread(self.entered.acquire, True, TIMEOUT)


class _Closing:
    def __init__(self, gate: Gate, chunks: list[bytes]) -> None:
        self.gate = gate
        self.chunks = chunks

    def __iter__(self) -> Iterator[bytes]:
        return iter(self.chunks)

    def close(self) -> None:
        with self.gate.lock:
            self.gate.closes += 1
        self.gate.closed.set()


async def hello_served(port: int) -> None:
    """One request on a new connection is answered 200 (the server and a thread are free)."""
    raw = await exchange(port, b"GET /hello HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
    (reply,) = decode_replies(raw)
    assert reply.status == 200


# -- timeout_keep_alive ----------------------------------------------------------------------


async def test_keep_alive_timeout_closes_idle_connections_without_a_response() -> None:
    """No byte of a next request: closed silently after timeout_keep_alive, even when the
    header timeout is shorter (it runs only once a head has begun)."""
    gate = Gate()
    async with running(gate, timeout_keep_alive=0.3, timeout_request_header=0.05) as srv:
        reader, writer = await asyncio.open_connection("127.0.0.1", srv.port)
        writer.write(HELLO)
        assert (await asyncio.wait_for(reader.readuntil(b"hello"), TIMEOUT)).startswith(
            b"HTTP/1.1 200"
        )
        assert await read_to_end(reader) == (b"", False)
        fresh_reader, fresh_writer = await asyncio.open_connection("127.0.0.1", srv.port)
        assert await read_to_end(fresh_reader) == (b"", False)
        writer.close()
        fresh_writer.close()


# -- timeout_request_header --------------------------------------------------------------------


async def test_incomplete_head_gets_408_and_close_without_holding_up_others() -> None:
    gate = Gate()
    with watch_errors() as log:
        async with running(
            gate, threads=1, timeout_request_header=0.3, timeout_keep_alive=30
        ) as srv:
            slow = [await asyncio.open_connection("127.0.0.1", srv.port) for _ in range(20)]
            for _, writer in slow:
                writer.write(b"GET / HTTP/1.1\r\nHost: t\r\nX-Slow: ")  # and nothing more
            await hello_served(srv.port)  # the loop and the only thread serve others meanwhile
            for reader, writer in slow:
                data, reset = await read_to_end(reader)
                assert data.startswith(b"HTTP/1.1 408 "), data
                assert b"\r\nconnection: close\r\n" in data.lower()
                assert not reset
                writer.close()
            # The clock restarts after each response: a keep-alive connection whose next head
            # stalls gets 408 too, once its first request was answered.
            reader, writer = await asyncio.open_connection("127.0.0.1", srv.port)
            writer.write(HELLO + b"GET /hello HTTP/1.1\r\n")
            data, _ = await read_to_end(reader)
            assert data.startswith(b"HTTP/1.1 200 ")
            assert b"HTTP/1.1 408 " in data
            writer.close()
    assert any("No complete request head from 127.0.0.1:" in m for m in log.messages())
    assert gate.calls == ["/hello", "/hello"]


# -- timeout_read ------------------------------------------------------------------------------


async def test_body_read_timeout_raises_in_the_app_and_answers_408() -> None:
    raised: list[BaseException] = []
    done = threading.Event()

    def app(environ: Environ, start_response: Any) -> Iterable[bytes]:
        try:
            environ["wsgi.input"].read()
        except ClientDisconnected as exc:
            raised.append(exc)
            raise
        finally:
            done.set()
        start_response("200 OK", [])
        return [b"unreachable"]

    with watch_errors() as log:
        # timeout_write stays long: the body read has its own timeout.
        async with running(app, threads=1, timeout_read=0.3, timeout_write=60) as srv:
            reader, writer = await asyncio.open_connection("127.0.0.1", srv.port)
            writer.write(b"POST /upload HTTP/1.1\r\nHost: t\r\nContent-Length: 100\r\n\r\n0123")
            data, reset = await read_to_end(reader)
            await wait_thread(done)
            writer.close()
            assert srv.server.state.requests_active == 0
    (reply,) = decode_replies(data)
    assert reply.status == 408
    assert not reset
    assert isinstance(raised[0], ClientDisconnected)
    assert "no request body data for 0.3 s" in str(raised[0])
    assert any("POST /upload: no request body data" in m for m in log.messages())
    assert not log.errors()


# -- timeout_write -----------------------------------------------------------------------------


async def test_write_timeout_stops_iteration_calls_close_and_frees_the_thread() -> None:
    app = apps.CloseRecorder("ok", chunks=1_000_000, chunk_size=16 * 1024)

    def router(environ: Environ, start_response: Any) -> Iterable[bytes]:
        if environ["PATH_INFO"] == "/hello":
            return apps.hello(environ, start_response)
        return app(environ, start_response)

    async with running(router, threads=1, timeout_write=0.3, write_high_water=16 * 1024) as srv:
        reader, writer = await asyncio.open_connection("127.0.0.1", srv.port)
        transport(writer).pause_reading()  # a client that reads nothing
        writer.write(GET)
        await wait_thread(app.closed)
        assert app.closes == 1
        assert app.produced < 1_000_000 * 16 * 1024  # the iteration was stopped
        transport(writer).resume_reading()
        data, _ = await read_to_end(reader)  # the server cut the connection
        assert data.startswith(b"HTTP/1.1 200 ")
        await hello_served(srv.port)  # the only thread is back in the pool
        writer.close()


async def test_write_timeout_cuts_a_stalled_sendfile_and_closes_the_file(tmp_path: Path) -> None:
    """Output the loop sends on its own (sendfile) is watched too: no thread waits there."""
    path = tmp_path / "big.bin"
    path.write_bytes(b"\xab" * (16 * 1024 * 1024))
    closed = threading.Event()

    class File:
        def __init__(self) -> None:
            self.f = open(path, "rb")  # noqa: SIM115 - closed through the wrapper

        def read(self, size: int = -1) -> bytes:
            return self.f.read(size)

        def fileno(self) -> int:
            return self.f.fileno()

        def tell(self) -> int:
            return self.f.tell()

        def seek(self, *args: int) -> int:
            return self.f.seek(*args)

        def close(self) -> None:
            self.f.close()
            closed.set()

    def app(environ: Environ, start_response: Any) -> Any:
        start_response("200 OK", [("Content-Length", str(path.stat().st_size))])
        return environ["wsgi.file_wrapper"](File())

    async with running(app, timeout_write=0.3) as srv:
        reader, writer = await asyncio.open_connection("127.0.0.1", srv.port)
        transport(writer).pause_reading()
        writer.write(GET)
        await wait_thread(closed)
        transport(writer).resume_reading()
        data, _ = await read_to_end(reader)
        assert data.startswith(b"HTTP/1.1 200 ")
        assert len(data) < 16 * 1024 * 1024  # cut, not completed
        writer.close()


# -- timeout_request ---------------------------------------------------------------------------


async def test_request_deadline_answers_504_discards_output_and_still_closes() -> None:
    gate = Gate()
    with watch_errors() as log:
        async with running(gate, threads=1, timeout_request=0.3) as srv:
            reader, writer = await asyncio.open_connection("127.0.0.1", srv.port)
            writer.write(b"GET /block?q=1 HTTP/1.1\r\nHost: t\r\n\r\n")
            await gate.wait_entered()
            data, reset = await read_to_end(reader)
            (reply,) = decode_replies(data)
            assert reply.status == 504
            assert not reset
            assert reply.headers["connection"] == "close"
            assert b"blocked" not in data
            gate.release.set()  # the app finishes late: its output goes nowhere
            await wait_thread(gate.closed)
            await hello_served(srv.port)  # and its thread is back
            writer.close()
    assert gate.closes == 1
    # Its one thread was stuck: no thread was left (the replacement aside), which is critical.
    (error, critical) = log.errors()
    assert "GET /block?q=1 did not start its response in 0.3 s" in error.getMessage()
    assert "All 1 threads are stuck" in critical.getMessage()


# -- timeout_queue -----------------------------------------------------------------------------


async def test_request_that_waited_too_long_for_a_thread_gets_503(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    gate = Gate()
    # The warning is throttled process-wide: another test's 503 must not silence this one's.
    monkeypatch.setattr(wsgi_module, "_queue_throttle", wsgi_module.LogThrottle())
    with watch_errors() as log:
        async with running(gate, threads=1, timeout_queue=5.0, timeout_keep_alive=0.2) as srv:
            first = asyncio.ensure_future(
                exchange(srv.port, b"GET /block HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
            )
            await gate.wait_entered()
            second = asyncio.ensure_future(
                exchange(srv.port, b"GET /hello HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
            )
            await log.wait_for("task queue depth is 1")  # the second request waits for a thread
            # Let its wait look longer than timeout_queue, then free the thread.
            later = time.perf_counter() + 10.0
            monkeypatch.setattr(
                wsgi_module,
                "time",
                types.SimpleNamespace(perf_counter=lambda: later, monotonic=time.monotonic),
            )
            gate.release.set()
            (late,) = decode_replies(await asyncio.wait_for(second, TIMEOUT))
            monkeypatch.undo()
            (done,) = decode_replies(await asyncio.wait_for(first, TIMEOUT))
            await hello_served(srv.port)
    assert done.status == 200
    assert late.status == 503
    assert late.headers["retry-after"] == "1"
    assert gate.calls == ["/block", "/hello"]  # the late request never reached the app
    assert any("GET /hello waited" in m and "--timeout-queue" in m for m in log.messages())


# -- timeout_linger ----------------------------------------------------------------------------


async def _send_until_refused(writer: asyncio.StreamWriter) -> None:
    block = b"\0" * 65536
    with contextlib.suppress(ConnectionError):
        while True:
            writer.write(block)
            await writer.drain()


async def test_413_is_read_by_a_client_still_sending_its_body() -> None:
    """Lingering close: the server half-closes and drains, so the client can keep sending and
    then read the whole 413, which a reset would have destroyed."""
    async with running(apps.echo, limit_request_body=1000) as srv:
        reader, writer = await asyncio.open_connection("127.0.0.1", srv.port)
        writer.write(b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 8000000\r\n\r\n")
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), TIMEOUT)
        assert head.startswith(b"HTTP/1.1 413 ")
        block = b"\0" * 65536
        for _ in range(32):  # 2 MiB more: the server reads it and throws it away
            writer.write(block)
            await asyncio.wait_for(writer.drain(), TIMEOUT)
        writer.write_eof()
        rest, reset = await read_to_end(reader)
        assert rest.endswith(b"request body too large\n")
        assert not reset
        writer.close()


async def test_response_to_an_unread_body_is_not_reset_away() -> None:
    """The app answers without reading the body: the connection closes after lingering."""
    async with running(apps.hello) as srv:
        reader, writer = await asyncio.open_connection("127.0.0.1", srv.port)
        writer.write(b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 8000000\r\n\r\n" + b"x" * 1000)
        reply = await asyncio.wait_for(reader.readuntil(b"Hello, world!"), TIMEOUT)
        assert reply.startswith(b"HTTP/1.1 200 ")
        for _ in range(32):
            writer.write(b"\0" * 65536)
            await asyncio.wait_for(writer.drain(), TIMEOUT)
        writer.write_eof()
        assert await read_to_end(reader) == (b"", False)
        writer.close()
        assert not srv.server.state.channels or all(c.lingering for c in srv.server.state.channels)


async def test_lingering_is_bounded_by_timeout_linger() -> None:
    async with running(apps.echo, limit_request_body=10, timeout_linger=0.3) as srv:
        reader, writer = await asyncio.open_connection("127.0.0.1", srv.port)
        writer.write(b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 100000000000\r\n\r\n")
        assert (await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), TIMEOUT)).startswith(
            b"HTTP/1.1 413 "
        )
        # A client that never stops sending is cut once the linger time is over.
        await asyncio.wait_for(_send_until_refused(writer), TIMEOUT)
        writer.close()


# -- limit_concurrency -------------------------------------------------------------------------


async def test_limit_concurrency_answers_503_at_once_and_idle_connections_do_not_count() -> None:
    gate = Gate()
    with watch_errors() as log:
        async with running(gate, threads=4, limit_concurrency=2) as srv:
            idle = []
            for _ in range(3):  # keep-alive connections left idle after a response
                reader, writer = await asyncio.open_connection("127.0.0.1", srv.port)
                writer.write(HELLO)
                await asyncio.wait_for(reader.readuntil(b"hello"), TIMEOUT)
                idle.append(writer)
            blocked = [
                asyncio.ensure_future(
                    exchange(
                        srv.port, b"GET /block HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"
                    )
                )
                for _ in range(2)
            ]
            await gate.wait_entered(2)
            assert srv.server.state.requests_active == 2
            # Over the limit, with two threads still free: 503 at once, and the app is not called.
            raw = await exchange(
                srv.port, b"POST /hello HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\n\r\nabcde"
            )
            (reply,) = decode_replies(raw)
            assert reply.status == 503
            assert reply.headers["retry-after"] == "1"
            assert reply.headers["connection"] == "close"
            assert gate.calls.count("/hello") == 3
            gate.release.set()
            for future in blocked:
                assert decode_replies(await asyncio.wait_for(future, TIMEOUT))[0].status == 200
            await hello_served(srv.port)  # under the limit again
            for writer in idle:
                writer.close()
    assert any("(--limit-concurrency): answered 503 to POST /hello" in m for m in log.messages())


async def test_the_loop_answers_while_every_thread_is_busy() -> None:
    """All threads blocked in the app: the loop still accepts, parses and answers what needs
    no thread (a malformed request, an incomplete head), and queues the rest."""
    gate = Gate()
    async with running(gate, threads=2, timeout_request_header=0.3) as srv:
        blocked = [
            asyncio.ensure_future(
                exchange(srv.port, b"GET /block HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
            )
            for _ in range(2)
        ]
        await gate.wait_entered(2)
        queued = asyncio.ensure_future(
            exchange(srv.port, b"GET /hello HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        )
        bad = await exchange(srv.port, b"GET / HTTP/1.1\r\nHost: t\r\nBad Name: x\r\n\r\n")
        assert bad.startswith(b"HTTP/1.1 400 ")
        slow = await exchange(srv.port, b"GET / HTTP/1.1\r\n")
        assert slow.startswith(b"HTTP/1.1 408 ")
        assert not queued.done()
        gate.release.set()
        assert decode_replies(await asyncio.wait_for(queued, TIMEOUT))[0].body == b"hello"
        for future in blocked:
            assert decode_replies(await asyncio.wait_for(future, TIMEOUT))[0].body == b"blocked"


async def test_saturated_pool_is_logged_with_queue_depth() -> None:
    gate = Gate()
    with watch_errors() as log:
        async with running(gate, threads=1, timeout_keep_alive=0.2) as srv:
            requests = [
                asyncio.ensure_future(
                    exchange(
                        srv.port, b"GET /block HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"
                    )
                )
                for _ in range(3)
            ]
            await gate.wait_entered()
            await log.wait_for("All 1 threads busy; task queue depth is 2")
            gate.release.set()
            for future in requests:
                await asyncio.wait_for(future, TIMEOUT)
    saturation = [m for m in log.messages() if "task queue depth" in m]
    assert len(saturation) == 1  # throttled: one line per interval, not one per sweep


# -- limit_max_connections ---------------------------------------------------------------------


async def test_limit_max_connections_pauses_accepting_until_one_closes() -> None:
    gate = Gate()
    with watch_errors() as log:
        async with running(gate, limit_max_connections=2) as srv:
            state = srv.server.state
            open_ = []
            for _ in range(2):
                reader, writer = await asyncio.open_connection("127.0.0.1", srv.port)
                writer.write(HELLO)
                await asyncio.wait_for(reader.readuntil(b"hello"), TIMEOUT)
                open_.append((reader, writer))
            await log.wait_for("(--limit-max-connections): not accepting")
            # The kernel completes the handshake (listen backlog), but the server does not
            # accept: the request waits.
            third_reader, third_writer = await asyncio.open_connection("127.0.0.1", srv.port)
            third_writer.write(HELLO)
            reader, writer = open_[0]
            writer.write(HELLO)  # a round trip on an accepted connection meanwhile
            await asyncio.wait_for(reader.readuntil(b"hello"), TIMEOUT)
            assert len(state.channels) == 2
            writer.close()  # room for one: accepting resumes, and the third is served
            reply = await asyncio.wait_for(third_reader.readuntil(b"hello"), TIMEOUT)
            assert reply.startswith(b"HTTP/1.1 200 ")
            third_writer.close()
            open_[1][1].close()


# -- timeout_graceful_shutdown -----------------------------------------------------------------


async def test_graceful_timeout_cuts_a_stuck_request_and_close_still_runs() -> None:
    gate = Gate()
    server = asyncwsgi.Server(gate, asyncwsgi.Config(host="127.0.0.1", port=0, threads=1))
    await server.start()
    port = server.addresses[0][1]
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /block HTTP/1.1\r\nHost: t\r\n\r\n")
    await gate.wait_entered()
    await asyncio.wait_for(server.shutdown(0.2), TIMEOUT)
    data, _ = await read_to_end(reader)
    assert data == b""  # cut: the app had not answered
    gate.release.set()
    await wait_thread(gate.closed)  # the overrunning app still finishes and is closed
    assert gate.closes == 1
    writer.close()


# -- client faults -----------------------------------------------------------------------------


async def test_disconnect_during_write_callable_raises_in_the_app_and_frees_the_thread() -> None:
    raised: list[BaseException] = []
    done = threading.Event()
    sent = threading.Event()

    def app(environ: Environ, start_response: Any) -> Iterable[bytes]:
        if environ["PATH_INFO"] == "/hello":
            return apps.hello(environ, start_response)
        write = start_response("200 OK", [("Content-Type", "application/octet-stream")])
        try:
            for _ in range(1_000_000):
                write(b"w" * 65536)
                sent.set()
        except OSError as exc:
            raised.append(exc)
        finally:
            done.set()
        return []

    async with running(app, threads=1, write_high_water=64 * 1024) as srv:
        reader, writer = await asyncio.open_connection("127.0.0.1", srv.port)
        writer.write(GET)
        await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), TIMEOUT)
        await wait_thread(sent)
        writer.transport.abort()
        await wait_thread(done)
        await hello_served(srv.port)
    assert isinstance(raised[0], ClientDisconnected)


@pytest.mark.parametrize("how", ["abort", "half-close"])
async def test_client_disconnected_callable_tells_the_app_the_client_left(how: str) -> None:
    answers: list[bool] = []
    gone = threading.Event()
    entered = threading.Event()

    def app(environ: Environ, start_response: Any) -> Iterable[bytes]:
        client_disconnected = environ["asyncwsgi.client_disconnected"]
        answers.append(client_disconnected())
        entered.set()
        # Long work, checking now and then whether anybody still waits for the answer.
        for _ in range(int(TIMEOUT * 100)):
            if client_disconnected():
                answers.append(True)
                gone.set()
                break
            gone.wait(0.01)
        start_response("200 OK", [("Content-Length", "4")])
        return [b"done"]

    async with running(app) as srv:
        _reader, writer = await asyncio.open_connection("127.0.0.1", srv.port)
        writer.write(GET)
        await wait_thread(entered)
        if how == "abort":
            writer.transport.abort()
        else:
            writer.write_eof()
        await wait_thread(gone)
        writer.close()
    assert answers == [False, True]


# -- logs --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"GET /a\x1b[2Jb HTTP/1.1\r\nHost: t\r\n\r\n",  # raw control character in the target
        b"GET / HTTP/1.1\r\nHost: t\r\nX-Evil: a\x1b[2J\x7fb\r\n\r\n",  # in a header value
        b"GET / HTTP/1.1\r\nHost: t\r\nX-Evil: a\rInjected: 1\r\n\r\n",  # bare CR
        b"GET / HTTP/1.1\r\nHost: t\r\nX\x00Evil: 1\r\n\r\n",  # NUL in a name
    ],
)
async def test_rejected_request_bytes_are_logged_escaped(request_bytes: bytes) -> None:
    with watch_errors() as log:
        async with running(apps.hello) as srv:
            raw = await exchange(srv.port, request_bytes)
    assert raw.startswith(b"HTTP/1.1 400 ")
    (line,) = [m for m in log.messages() if "Invalid HTTP request" in m]
    assert line.isprintable(), line


async def test_decoded_path_is_logged_escaped() -> None:
    """PATH_INFO is percent-decoded: %0D%0A becomes CR LF, which must not reach the log line."""

    def app(environ: Environ, start_response: Any) -> Iterable[bytes]:
        raise RuntimeError("boom")

    with watch_errors() as log:
        async with running(app) as srv:
            raw = await exchange(
                srv.port,
                b"GET /a%0D%0AFAKE%20LINE%1b HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
            )
    assert decode_replies(raw)[0].status == 500
    (record,) = log.errors()
    assert record.getMessage() == "Error handling request GET /a\\x0d\\x0aFAKE LINE\\x1b"
