"""Faults of one connection over real sockets on 127.0.0.1:0: clients that stop reading while
they pipeline, graceful shutdown with responses still on their way, files that change while
sendfile(2) sends them, and queued requests whose client is gone.

The server runs in the test's process, so the tests look at its connections directly (the
transport's write buffer, the requests handed to the pool) and synchronise on events: bytes on
the wire, log lines, threading events set by the application.
"""

from __future__ import annotations

import asyncio
import logging
import os
import select
import socket
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest

from asyncwsgi import Config, Server
from asyncwsgi.state import ServerState
from asyncwsgi.wsgi import run_wsgi

from . import apps
from .helpers import TIMEOUT, decode_replies, exchange, running
from .logwatch import watch_errors
from .test_limits import read_to_end
from .test_server import _in_loop

Environ = dict[str, Any]
KiB = 1024
MiB = 1024 * KiB


def small_window_socket(port: int) -> socket.socket:
    """A client socket connected to ``port`` with a 4 KiB receive buffer, set before connect
    so that the window it advertises stays small: a client that reads slowly, or not at all."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 * KiB)
    sock.connect(("127.0.0.1", port))
    return sock


async def count_to_end(reader: asyncio.StreamReader) -> tuple[int, bool]:
    """Read until the server closes; return the byte count and whether it ended in a reset."""
    received = 0
    try:
        while chunk := await asyncio.wait_for(reader.read(MiB), TIMEOUT):
            received += len(chunk)
    except ConnectionResetError:
        return received, True
    return received, False


def request(path: str, close: bool = False) -> bytes:
    extra = "Connection: close\r\n" if close else ""
    return f"GET {path} HTTP/1.1\r\nHost: t\r\n{extra}\r\n".encode()


class Pipeline:
    """An app with an in-memory body (``/big``) and a streamed one (``/stream``), which records
    the connection's unsent output (the transport's write buffer, on the loop) before each
    block it yields, and the paths it was called for.

    Args:
        big: bytes of the ``/big`` list body, handed over as one block.
        stream: bytes of the ``/stream`` body, yielded in ``block``-byte blocks.
    """

    def __init__(self, big: int, stream: int, block: int) -> None:
        self.big = big
        self.stream = stream
        self.block = block
        self.calls: list[str] = []
        self.buffered: list[int] = []  # transport buffer sizes, sampled on the loop
        self.state: ServerState | None = None
        self.loop: asyncio.AbstractEventLoop | None = None

    def sample(self) -> None:
        """Loop thread: record the unsent output of each open connection, in the transport's
        buffer and handed over by the worker but not yet written."""
        assert self.state is not None
        for channel in self.state.channels:
            if channel.transport is not None:
                unsent = channel.transport.get_write_buffer_size()
                if channel.cycle is not None and channel.cycle.sink is not None:
                    unsent += channel.cycle.sink.handed - channel.cycle.sink.bytes_written
                self.buffered.append(unsent)

    def __call__(self, environ: Environ, start_response: Any) -> Iterable[bytes]:
        path = environ["PATH_INFO"]
        self.calls.append(path)
        if path == "/big":
            start_response("200 OK", [("Content-Length", str(self.big))])
            return [b"b" * self.big]
        start_response("200 OK", [("Content-Type", "application/octet-stream")])
        return self._blocks()

    def _blocks(self) -> Iterator[bytes]:
        assert self.loop is not None
        for _ in range(self.stream // self.block):
            self.loop.call_soon_threadsafe(self.sample)
            yield b"s" * self.block


def watch_dispatch(state: ServerState, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Record the connection's write buffer each time a request is handed to the pool."""
    at_dispatch: list[int] = []
    submit = state.pool.submit

    def recording(fn: Any, *args: Any) -> None:
        if fn is run_wsgi:
            for channel in state.channels:
                assert channel.transport is not None
                at_dispatch.append(channel.transport.get_write_buffer_size())
        submit(fn, *args)

    monkeypatch.setattr(state.pool, "submit", recording)
    return at_dispatch


# -- a pipelining client that does not read ---------------------------------------------------


@pytest.mark.parametrize("loop_name", ["uvloop", "asyncio"])
async def test_next_pipelined_request_waits_until_the_client_has_read(
    monkeypatch: pytest.MonkeyPatch, loop_name: str
) -> None:
    """asyncio and uvloop call pause_writing() once, when the buffer first crosses the mark:
    the request after a large response must not start (and its response must not pile up)
    until the client has read the buffer down; then everything arrives, in order."""
    high = 64 * KiB
    app = Pipeline(big=4 * MiB, stream=4 * MiB, block=64 * KiB)

    async def scenario() -> tuple[list[Any], list[int]]:
        async with running(app, write_high_water=high) as srv:
            app.state = srv.server.state
            app.loop = asyncio.get_running_loop()
            at_dispatch = watch_dispatch(srv.server.state, monkeypatch)
            sock = small_window_socket(srv.port)
            reader, writer = await asyncio.open_connection(sock=sock)
            writer.write(
                request("/big") + request("/stream") + request("/big") + request("/big", True)
            )
            data = await asyncio.wait_for(reader.read(-1), 6 * TIMEOUT)
            writer.close()
        return decode_replies(data), at_dispatch

    replies, at_dispatch = await _in_loop(loop_name, scenario)
    assert [len(r.body) for r in replies] == [4 * MiB] * 4
    assert app.calls == ["/big", "/stream", "/big", "/big"]
    # Each request started with the buffer below the high-water mark...
    assert len(at_dispatch) == 4
    assert max(at_dispatch) <= high, at_dispatch
    # ...and while streaming, the buffer held at most the mark plus one block (and framing).
    assert app.buffered
    assert max(app.buffered) <= high + app.block + KiB, max(app.buffered)


@pytest.mark.parametrize("loop_name", ["uvloop", "asyncio"])
async def test_client_that_pipelines_and_never_reads_is_cut_after_one_response(
    loop_name: str,
) -> None:
    """The connection's memory stays at one response: the pipelined requests behind it are
    never run, and --timeout-write cuts the connection once its output stops moving."""
    app = Pipeline(big=4 * MiB, stream=16 * MiB, block=64 * KiB)

    async def scenario() -> list[str]:
        with watch_errors() as log:
            async with running(app, write_high_water=64 * KiB, timeout_write=0.3) as srv:
                app.state = srv.server.state
                app.loop = asyncio.get_running_loop()
                sock = small_window_socket(srv.port)
                sock.sendall(b"".join(request(p) for p in ["/big", "/stream", "/big", "/big"]))
                await log.wait_for("(--timeout-write); closing the connection")
                sock.close()
        return app.calls

    assert await _in_loop(loop_name, scenario) == ["/big"]


# -- graceful shutdown --------------------------------------------------------------------------


@pytest.mark.parametrize("loop_name", ["uvloop", "asyncio"])
async def test_graceful_shutdown_delivers_a_response_still_being_sent(loop_name: str) -> None:
    """The app is done and the connection is back to keep-alive, but most of the response is
    still in the server's buffer (more than the sockets hold): the shutdown waits until the
    client has read it all."""
    size = 48 * MiB

    def app(environ: Environ, start_response: Any) -> Iterable[bytes]:
        start_response("200 OK", [("Content-Length", str(size))])
        return [b"r" * size]

    async def scenario() -> tuple[int, bool]:
        # A mark above the body: the connection is idle, not waiting for the client to read.
        server = Server(app, Config(host="127.0.0.1", port=0, write_high_water=4 * size))
        await server.start()
        reader, writer = await asyncio.open_connection("127.0.0.1", server.addresses[0][1])
        writer.write(request("/"))
        # The whole list body went to the transport in the same write as the head.
        await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), TIMEOUT)
        shutdown = asyncio.ensure_future(server.shutdown(3 * TIMEOUT))
        received, reset = await count_to_end(reader)
        await asyncio.wait_for(shutdown, TIMEOUT)
        writer.close()
        return received, reset

    assert await _in_loop(loop_name, scenario) == (size, False)


async def test_graceful_shutdown_lets_a_lingering_connection_finish() -> None:
    """After a 413 the server half-closes and reads what the client still sends, so that the
    413 is not lost to a reset: a shutdown lets it go on until the client has finished."""
    server = Server(
        apps.echo, Config(host="127.0.0.1", port=0, limit_request_body=1000, timeout_linger=30)
    )
    await server.start()
    reader, writer = await asyncio.open_connection("127.0.0.1", server.addresses[0][1])
    writer.write(b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 8000000\r\n\r\n")
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), TIMEOUT)
    assert head.startswith(b"HTTP/1.1 413 ")
    with watch_errors() as log:
        shutdown = asyncio.ensure_future(server.shutdown(3 * TIMEOUT))
        waiting = asyncio.ensure_future(log.wait_for("Waiting for 1 connection(s) to finish"))
        # Either the shutdown waits for the connection, or it has already returned.
        await asyncio.wait({shutdown, waiting}, return_when=asyncio.FIRST_COMPLETED)
        waiting.cancel()
    assert not shutdown.done()
    for _ in range(32):  # 2 MiB more: the server reads it and throws it away
        writer.write(b"\0" * 65536)
        await asyncio.wait_for(writer.drain(), TIMEOUT)
    writer.write_eof()
    rest, reset = await read_to_end(reader)
    assert rest.endswith(b"request body too large\n")
    assert not reset
    await asyncio.wait_for(shutdown, TIMEOUT)
    writer.close()


@pytest.mark.parametrize("loop_name", ["uvloop", "asyncio"])
async def test_next_request_sent_as_the_shutdown_closes_does_not_reset_the_response(
    loop_name: str,
) -> None:
    """A keep-alive client may send its next request before it reads the ``Connection:
    close`` of a response the shutdown ends its connection with. Unread, that request makes the
    kernel answer the close with a reset, which destroys the tail of the response still on its
    way (RFC 9112 section 9.6): the server half-closes and lingers instead."""
    size = 4 * MiB
    arrived, release = threading.Event(), threading.Event()

    def app(environ: Environ, start_response: Any) -> Iterable[bytes]:
        arrived.set()
        release.wait(TIMEOUT)
        start_response("200 OK", [("Content-Length", str(size))])
        return [b"r" * size]

    async def scenario() -> tuple[bytes, bool]:
        server = Server(app, Config(host="127.0.0.1", port=0, write_high_water=4 * size))
        await server.start()
        sock = small_window_socket(server.addresses[0][1])
        reader, writer = await asyncio.open_connection(sock=sock)
        writer.write(request("/"))
        assert await asyncio.to_thread(arrived.wait, TIMEOUT)
        shutdown = asyncio.ensure_future(server.shutdown(3 * TIMEOUT))
        await asyncio.sleep(0)  # one loop turn: the shutdown task runs up to its first wait
        assert server.state.shutting_down
        release.set()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), TIMEOUT)
        assert b"connection: close" in head.lower()
        # The whole list body went to the transport with the head, and the server decided.
        assert all(channel.closing for channel in server.state.channels)
        writer.write(request("/next"))
        body, reset = await read_to_end(reader)
        writer.close()  # the server lingers until the client closes
        await asyncio.wait_for(shutdown, TIMEOUT)
        return body, reset

    body, reset = await _in_loop(loop_name, scenario)
    assert (len(body), reset) == (size, False)


# -- a file that changes while sendfile(2) sends it --------------------------------------------


class ChangingFile:
    """A file for ``wsgi.file_wrapper`` that changes size once the server has measured it:
    ``sendfile_range()`` calls ``fstat`` and then ``tell``, and ``tell`` truncates or extends
    the file, so the response promises the old size and sendfile finds the new one.

    Args:
        path: the file, ``size`` bytes long.
        new_size: its size from the first ``tell()`` on.
    """

    def __init__(self, path: Path, new_size: int) -> None:
        self.path = path
        self.new_size = new_size
        self.f = path.open("rb")
        self.closed = threading.Event()

    def read(self, size: int = -1) -> bytes:
        return self.f.read(size)

    def fileno(self) -> int:
        return self.f.fileno()

    def tell(self) -> int:
        with self.path.open("r+b") as f:
            if self.new_size > f.seek(0, 2):
                f.write(b"+" * (self.new_size - f.tell()))
            else:
                f.truncate(self.new_size)
        return self.f.tell()

    def close(self) -> None:
        self.f.close()
        self.closed.set()


def file_app(path: Path, new_size: int) -> tuple[Any, list[ChangingFile]]:
    """``/file`` sends ``path`` by sendfile, resized to ``new_size`` meanwhile; else hello."""
    opened: list[ChangingFile] = []

    def app(environ: Environ, start_response: Any) -> Any:
        if environ["PATH_INFO"] != "/file":
            return apps.hello(environ, start_response)
        size = path.stat().st_size
        start_response("200 OK", [("Content-Length", str(size))])
        opened.append(ChangingFile(path, new_size))
        return environ["wsgi.file_wrapper"](opened[-1])

    return app, opened


@pytest.mark.parametrize("loop_name", ["uvloop", "asyncio"])
async def test_file_that_shrinks_during_sendfile_closes_the_connection(
    tmp_path: Path, loop_name: str
) -> None:
    """The body falls short of its Content-Length: the connection closes after it, and the
    response pipelined behind it is not sent (the client would read it as the rest of the
    body)."""
    path = tmp_path / "shrinks.bin"
    content = os.urandom(64 * KiB) * 64  # 4 MiB
    path.write_bytes(content)
    app, opened = file_app(path, MiB)

    async def scenario() -> tuple[bytes, list[str]]:
        with watch_errors() as log:
            async with running(app) as srv:
                data = await exchange(srv.port, request("/file") + request("/hello", True))
        return data, log.messages(logging.ERROR)

    data, errors = await _in_loop(loop_name, scenario)
    head, _, body = data.partition(b"\r\n\r\n")
    assert f"content-length: {len(content)}".encode() in head.lower()
    assert body == content[:MiB]
    assert errors == [
        "Response to GET /file is shorter than its Content-Length; closing the connection"
    ]
    assert opened[0].closed.is_set()


async def test_file_that_grows_during_sendfile_sends_only_its_content_length(
    tmp_path: Path,
) -> None:
    path = tmp_path / "grows.bin"
    content = os.urandom(64 * KiB) * 16  # 1 MiB
    path.write_bytes(content)
    app, opened = file_app(path, 2 * MiB)
    async with running(app) as srv:
        data = await exchange(srv.port, request("/file") + request("/hello", True))
    first, second = decode_replies(data)
    assert first.body == content
    assert second.body == b"Hello, world!"
    assert opened[0].closed.is_set()


# -- queued requests whose client is gone -------------------------------------------------------


async def test_shutdown_never_runs_the_app_for_a_connection_it_has_cut(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """One thread, busy past the shutdown timeout, and two requests queued behind it: the
    shutdown cuts all three connections, and the queued requests, taken afterwards (by the
    shutdown itself, the thread being busy), never reach the application."""
    calls: list[str] = []
    entered = threading.Event()
    release = threading.Event()
    closed = threading.Event()

    class Body(list[bytes]):
        def close(self) -> None:
            closed.set()

    def app(environ: Environ, start_response: Any) -> Iterable[bytes]:
        calls.append(environ["PATH_INFO"])
        if environ["PATH_INFO"] == "/block":
            entered.set()
            release.wait(TIMEOUT)
        start_response("200 OK", [("Content-Length", "2")])
        return Body([b"ok"])

    server = Server(app, Config(host="127.0.0.1", port=0, threads=1, timeout_queue=0))
    await server.start()
    queued = asyncio.Event()
    submitted: list[Any] = []
    submit = server.state.pool.submit

    def counting(fn: Any, *args: Any) -> None:
        submit(fn, *args)
        if fn is run_wsgi:
            submitted.append(fn)
            if len(submitted) == 3:
                queued.set()

    monkeypatch.setattr(server.state.pool, "submit", counting)
    port = server.addresses[0][1]
    clients = [await asyncio.open_connection("127.0.0.1", port) for _ in range(3)]
    clients[0][1].write(request("/block"))
    assert await asyncio.to_thread(entered.wait, TIMEOUT)
    clients[1][1].write(request("/queued-1"))
    clients[2][1].write(request("/queued-2"))
    await asyncio.wait_for(queued.wait(), TIMEOUT)
    await asyncio.wait_for(server.shutdown(0.2), TIMEOUT)
    for reader, _ in clients:
        assert await read_to_end(reader) in ((b"", False), (b"", True))  # cut, unanswered
    release.set()  # the busy thread finishes; the queued calls were taken meanwhile
    assert await asyncio.to_thread(closed.wait, TIMEOUT)
    for _, writer in clients:
        writer.close()
    assert calls == ["/block"]


# -- sendfile shares the loop -------------------------------------------------------------------


@pytest.mark.parametrize("loop_name", ["uvloop", "asyncio"])
async def test_other_connections_are_served_while_a_large_file_goes_to_a_fast_reader(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, loop_name: str
) -> None:
    """sendfile(2) must give the loop back now and then, not send until the socket is full:
    with a reader that keeps up (here: a sendfile that waits for the socket instead of
    failing with EAGAIN, so the socket never looks full), another connection's request
    is answered before the last byte of the large file has been sent."""
    size = 256 * MiB
    path = tmp_path / "large.bin"
    with path.open("wb") as f:
        f.truncate(size)  # sparse: no disk space, and the page cache fills it with zeros
    real = os.sendfile
    started = threading.Event()
    finished: list[str] = []

    def sendfile_for_a_fast_reader(out_fd: int, in_fd: int, offset: int, count: int) -> int:
        started.set()
        done = 0
        while done < count:
            try:
                sent = real(out_fd, in_fd, offset + done, count - done)
            except BlockingIOError:
                select.select([], [out_fd], [], TIMEOUT)
                continue
            if not sent:
                break
            done += sent
        if offset + done == size:
            finished.append("file")  # on the loop: its last byte is in the socket
        return done

    monkeypatch.setattr(os, "sendfile", sendfile_for_a_fast_reader)
    app, _ = file_app(path, size)

    def download(port: int) -> None:
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.sendall(request("/file", True))
            buffer = bytearray(MiB)
            while sock.recv_into(buffer):
                pass

    def hello(port: int) -> None:
        assert started.wait(TIMEOUT)
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.sendall(request("/hello", True))
            data = b""
            while chunk := sock.recv(65536):
                data += chunk
        assert data.endswith(b"Hello, world!")
        finished.append("hello")  # the whole response has arrived

    async def scenario() -> None:
        async with running(app) as srv:
            await asyncio.gather(
                asyncio.to_thread(download, srv.port), asyncio.to_thread(hello, srv.port)
            )

    await _in_loop(loop_name, scenario)
    assert finished == ["hello", "file"]


# -- --timeout-write measures progress -----------------------------------------------------------


async def test_write_timeout_cuts_a_client_that_reads_nothing_while_the_app_trickles() -> None:
    """A buffer that only grows is no progress: an app that writes a byte now and then to a
    client that reads nothing (a heartbeat to a vanished client) is stopped by
    --timeout-write, not kept forever because the buffer keeps changing."""
    stopped = threading.Event()

    def app(environ: Environ, start_response: Any) -> Iterable[bytes]:
        start_response("200 OK", [("Content-Type", "text/event-stream")])
        yield b"x" * (8 * MiB)  # more than the sockets hold: the rest waits in the server
        try:
            while True:
                yield b":\n"
                stopped.wait(0.01)  # the app's pace, not a synchronisation
        finally:
            stopped.set()

    with watch_errors() as log:
        async with running(app, write_high_water=64 * MiB, timeout_write=0.3) as srv:
            sock = small_window_socket(srv.port)
            sock.sendall(request("/"))
            await log.wait_for("(--timeout-write); closing the connection")
            assert await asyncio.to_thread(stopped.wait, TIMEOUT)
            sock.close()
