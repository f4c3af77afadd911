"""The connection tier of the fault matrix: each phase of a connection x each event, in process.

A :class:`~tests.faults.app.FaultApp` holds the connection exactly in its phase (the app waits at
a gate, the client stops reading, the server is observed on its own loop), the event is applied,
and every invariant of :mod:`tests.faults.invariants` is checked after the cell. A graceful
shutdown of the server (``Server.shutdown``, what SIGTERM does in one process) is one of the
events; the signals themselves, to real processes, are the process tier
(``test_process_matrix.py``).

Cells that cannot happen (an application exception while no application code runs, a file
changing when no file is sent...) are skipped with the reason.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from asyncwsgi import Config, Server
from asyncwsgi.channel import HTTPChannel
from asyncwsgi.connstate import ConnState

from . import invariants as inv
from .app import BLOCK, FILE_SIZE, GATED_BODY, FaultApp, file_content, gated_body, ok_body
from .app import stream_body as streamed

pytestmark = pytest.mark.slow

PHASES = {
    "head": "reading the head",
    "queued": "waiting for a thread",
    "app": "app running",
    "streaming": "streaming a response",
    "sendfile": "sendfile in progress",
    "pipelined": "pipelined requests queued",
    "idle": "idle keep-alive",
    "lingering": "lingering",
}
EVENTS = {
    "reset": "client reset",
    "stop_reading": "client stops reading",
    "half_close": "client half-closes",
    "Exception": "app raises Exception",
    "SystemExit": "app raises SystemExit",
    "KeyboardInterrupt": "app raises KeyboardInterrupt",
    "file_shrink": "the file shrinks during the send",
    "file_grow": "the file grows during the send",
    "shutdown": "graceful shutdown (SIGTERM to one process)",
}
APP_EXCEPTIONS = ("Exception", "SystemExit", "KeyboardInterrupt")
# Phases in which application code is held at the gate and can raise when released.
GATED = ("queued", "app", "streaming", "pipelined")
# Phases with more output than the socket buffers hold: a client that stops reading matters.
LARGE_OUTPUT = ("app", "streaming", "sendfile", "pipelined")

HIGH_WATER = 256 * 1024
TIMEOUT_WRITE = 2.0
GRACEFUL = 10.0
SHORT_GRACEFUL = 0.5
READ_DEADLINE = 5.0
STREAM_BLOCKS = 32
PIPELINED_STREAM_BLOCKS = 64
# Unsent output one connection may hold: the high-water mark, plus the largest single block the
# application hands over at once (its 1 MiB list body), plus one streamed block, plus framing.
MEMORY_BOUND = HIGH_WATER + GATED_BODY + BLOCK + 64 * 1024


def not_applicable(phase: str, event: str) -> str | None:
    """Why the cell (phase, event) cannot happen, or None when it can."""
    if event in APP_EXCEPTIONS and phase not in GATED:
        return f"no application code runs while {PHASES[phase]}"
    if event in ("file_shrink", "file_grow") and phase != "sendfile":
        return f"no file is being sent while {PHASES[phase]}"
    if event == "stop_reading" and phase not in LARGE_OUTPUT:
        return f"the output while {PHASES[phase]} fits in the socket buffers"
    return None


def _cells() -> Iterator[object]:
    for phase in PHASES:
        for event in EVENTS:
            yield pytest.param(phase, event, id=f"{phase}-{event}")


def _append(path: Path, data: bytes) -> None:
    """Grow the file in place, as a log file being written does."""
    with open(path, "ab") as f:
        f.write(data)


class Client:
    """A raw client socket driven through the test's loop (``sock_*`` calls)."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.sock = socket.socket()
        # A small receive window, so that what the client does not read stays in the server.
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8192)
        self.sock.setblocking(False)
        self.loop = asyncio.get_running_loop()

    async def connect(self) -> Client:
        await self.loop.sock_connect(self.sock, ("127.0.0.1", self.port))
        return self

    async def send(self, data: bytes) -> None:
        await self.loop.sock_sendall(self.sock, data)

    async def get(self, target: str) -> None:
        await self.send(f"GET {target} HTTP/1.1\r\nHost: x\r\n\r\n".encode())

    async def read(self, reader: inv.ResponseReader, deadline: float = READ_DEADLINE) -> None:
        """Read until ``reader`` is done (all responses, EOF, or bad framing) or the deadline."""
        end = time.monotonic() + deadline
        while not reader.done:
            remaining = end - time.monotonic()
            if remaining <= 0:
                return
            try:
                data = await asyncio.wait_for(self.loop.sock_recv(self.sock, 65536), remaining)
            except asyncio.TimeoutError:
                return
            except OSError:
                data = b""
            reader.feed(data)

    def reset(self) -> None:
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.sock.close()

    def half_close(self) -> None:
        self.sock.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        self.sock.close()


class Cell:
    """One cell: the server, the app, the clients, and what was observed."""

    def __init__(self, phase: str, event: str, tmp_path: Path) -> None:
        self.phase = phase
        self.event = event
        self.name = f"{phase} x {event}"
        self.file = tmp_path / "body.bin"
        self.file.write_bytes(file_content())
        self.app = FaultApp(self.file)
        self.server = Server(
            self.app,
            Config(
                host="127.0.0.1",
                port=0,
                threads=1,
                access_log=False,
                write_high_water=HIGH_WATER,
                timeout_write=TIMEOUT_WRITE,
                timeout_keep_alive=30.0,
                timeout_linger=5.0,
                limit_request_body=1024,
                timeout_graceful_shutdown=GRACEFUL,
            ),
        )
        self.clients: list[Client] = []
        self.deaths: list[str] = []
        self.shutdown_elapsed: float | None = None
        self.shutdown_timeout = GRACEFUL

    @property
    def channels(self) -> list[HTTPChannel]:
        return list(self.server.state.channels)

    def sample(self) -> None:
        """Loop thread: record the largest unsent output of any connection."""
        if self.server._state is None:
            return
        for channel in self.channels:
            if channel.transport is not None:
                size = channel.transport.get_write_buffer_size()
                self.app.peak = max(self.app.peak, size)

    async def until(self, predicate: Callable[[], bool], what: str, deadline: float = 10) -> None:
        """Poll loop-side state once per loop turn, sampling memory, until ``predicate``."""
        end = time.monotonic() + deadline
        while not predicate():
            self.sample()
            if time.monotonic() > end:
                raise AssertionError(f"[{self.name}] not reached in {deadline:g} s: {what}")
            await asyncio.sleep(0.005)  # polling the server's state, bounded by the deadline
        self.sample()

    async def wait_event(self, event: threading.Event, what: str) -> None:
        if not await asyncio.to_thread(event.wait, 10):
            raise AssertionError(f"[{self.name}] not reached in 10 s: {what}")

    async def client(self) -> Client:
        """Connect; the server's side of the connection gets a small send buffer, so that what
        the client does not read stays in the server's memory, where it is measured."""
        known = set(self.channels)
        client = await Client(self.server.addresses[0][1]).connect()
        self.clients.append(client)
        await self.until(lambda: bool(set(self.channels) - known), "connection accepted")
        for channel in set(self.channels) - known:
            assert channel.transport is not None
            sock = channel.transport.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16384)
        return client

    def drained(self) -> bool:
        """The server holds nothing more for any connection: each is gone, or idle with its
        output written."""
        return all(
            ch.cycle is None
            and ch.transport is not None
            and not ch.transport.get_write_buffer_size()
            and not ch.conn.has_unparsed_data
            for ch in self.channels
        )

    async def shutdown(self, timeout: float) -> None:
        started = time.monotonic()
        await asyncio.wait_for(self.server.shutdown(timeout), timeout + 30)
        self.shutdown_elapsed = time.monotonic() - started


@pytest.fixture
def thread_deaths() -> Iterator[list[str]]:
    """Record threads that end with an exception (a pool thread killed by the app)."""
    deaths: list[str] = []
    previous = threading.excepthook

    def hook(args: threading.ExceptHookArgs) -> None:
        name = args.thread.name if args.thread is not None else "?"
        deaths.append(f"{name}: {args.exc_type.__name__}")

    threading.excepthook = hook
    yield deaths
    threading.excepthook = previous


@pytest.mark.parametrize(("phase", "event"), list(_cells()))
async def test_cell(phase: str, event: str, tmp_path: Path, thread_deaths: list[str]) -> None:
    reason = not_applicable(phase, event)
    if reason is not None:
        pytest.skip(f"not applicable: {reason}")
    fds = inv.open_fds()
    threads = {t.ident for t in threading.enumerate() if t.ident is not None}
    cell = Cell(phase, event, tmp_path)
    cell.deaths = thread_deaths
    app = cell.app
    await cell.server.start()
    app.watch_memory(asyncio.get_running_loop(), cell.sample)
    try:
        await _run(cell)
    finally:
        app.gate.set()
        for client in cell.clients:
            client.close()
        if cell.shutdown_elapsed is None:
            await asyncio.wait_for(cell.server.shutdown(5.0), 30)
    name = cell.name
    if cell.shutdown_elapsed is not None and event == "shutdown":
        inv.check_within(name, "shutdown", cell.shutdown_elapsed, cell.shutdown_timeout)
        inv.check_no_call_for_gone(name, app.calls)
    inv.check_threads_survive(name, thread_deaths)
    await asyncio.to_thread(inv.check_close_once, name, app.results)
    inv.check_memory_bounded(name, app.peak, MEMORY_BOUND)
    await asyncio.to_thread(inv.check_no_thread_leak, name, threads)
    inv.check_no_child_leak(name, inv.children(os.getpid()))
    inv.check_no_fd_leak(name, fds)


async def _run(cell: Cell) -> None:
    """Put the connection in its phase, apply the event, read and check what came back."""
    phase, event, app, name = cell.phase, cell.event, cell.app, cell.name
    client = await cell.client()
    expected: list[inv.Expect] = []
    other: tuple[Client, inv.ResponseReader] | None = None
    rest = b""  # what completes the request of the "head" phase
    # -- the phase -------------------------------------------------------------------------
    if phase == "head":
        await client.send(b"GET /ok?id=1 HTTP/1.1\r\nHost: x\r\n")
        await cell.until(
            lambda: any(ch.state is ConnState.READING_HEAD for ch in cell.channels),
            "head bytes received",
        )
        rest = b"\r\n"
    elif phase == "queued":
        occupier = await cell.client()
        await occupier.get("/gate?id=0")
        await cell.wait_event(app.reached, "the only thread runs the app")
        other = (occupier, inv.ResponseReader(name, [inv.Expect("/gate id=0", gated_body(0))]))
        await client.get("/ok?id=1")
        await cell.until(lambda: cell.server.state.pool.queued >= 1, "request queued")
        expected.append(inv.Expect("/ok id=1", ok_body(1)))
    elif phase == "app":
        await client.get("/gate?id=1")
        await cell.wait_event(app.reached, "app running")
        expected.append(inv.Expect("/gate id=1", gated_body(1)))
    elif phase == "streaming":
        await client.get(f"/stream?id=1&blocks={STREAM_BLOCKS}&gate=1")
        await cell.wait_event(app.reached, "first block streamed")
        expected.append(inv.Expect("/stream id=1", streamed(1, STREAM_BLOCKS)))
    elif phase == "sendfile":
        await client.get("/file?id=1")
        await cell.until(
            lambda: any(ch.state is ConnState.SENDING_FILE for ch in cell.channels),
            "sendfile in progress",
        )
        expected.append(inv.Expect("/file id=1", file_content()))
    elif phase == "pipelined":
        await client.send(
            b"GET /gate?id=1 HTTP/1.1\r\nHost: x\r\n\r\n"
            b"GET /stream?id=2&blocks=%d HTTP/1.1\r\nHost: x\r\n\r\n" % PIPELINED_STREAM_BLOCKS
        )
        await cell.wait_event(app.reached, "first request running, second queued behind it")
        expected.append(inv.Expect("/gate id=1", gated_body(1)))
        expected.append(inv.Expect("/stream id=2", streamed(2, PIPELINED_STREAM_BLOCKS)))
    elif phase == "idle":
        await client.get("/ok?id=1")
        first = inv.ResponseReader(name, [inv.Expect("/ok id=1", ok_body(1))])
        await client.read(first)
        inv.check_no_desync(name, first)
        await cell.until(
            lambda: any(ch.idle_after_response for ch in cell.channels), "idle keep-alive"
        )
    elif phase == "lingering":
        await client.send(
            b"POST /ok?id=1 HTTP/1.1\r\nHost: x\r\nContent-Length: 1048576\r\n\r\n" + b"u" * 65536
        )
        await cell.until(lambda: any(ch.lingering for ch in cell.channels), "lingering")
        expected.append(inv.Expect("413", None))
    reader = inv.ResponseReader(name, expected)
    graceful = False
    follow_up = True
    # -- the event -------------------------------------------------------------------------
    if event == "reset":
        client.reset()
        cell.clients.remove(client)
        app.gate.set()
        follow_up = False
    elif event == "stop_reading":
        app.gate.set()
        # The server must bound what it holds, and cut the connection (--timeout-write).
        await cell.until(
            cell.drained, "output written, or the connection cut (--timeout-write)", 20
        )
        follow_up = False
    elif event == "half_close":
        if phase == "head":
            reader.expect(inv.Expect("/ok id=1 (incomplete head)", None))
        client.half_close()
        app.gate.set()
        graceful = True
        follow_up = False
    elif event in APP_EXCEPTIONS:
        app.action = event
        app.gate.set()
    elif event in ("file_shrink", "file_grow"):
        if event == "file_shrink":
            os.truncate(cell.file, FILE_SIZE // 8)
        else:
            await asyncio.to_thread(_append, cell.file, b"\xff" * (FILE_SIZE // 8))
    elif event == "shutdown":
        graceful = True
        if phase == "queued":
            # The running request outlives the shutdown timeout: the queued one is cut.
            cell.shutdown_timeout = SHORT_GRACEFUL
        task = asyncio.ensure_future(cell.shutdown(cell.shutdown_timeout))
        await cell.until(lambda: cell.server.state.shutting_down, "shutdown begun")
        if rest:
            await client.send(rest)
            reader.expect(inv.Expect("/ok id=1", ok_body(1)))
        if phase != "queued":
            app.gate.set()
    if follow_up:
        # A next request on the same connection: its own response, or the connection closed.
        with contextlib.suppress(OSError):
            await client.get("/ok?id=9")
            reader.expect(inv.Expect("/ok id=9", ok_body(9)))
    # -- what the client gets --------------------------------------------------------------
    if event not in ("reset", "stop_reading"):
        await client.read(reader)
        inv.check_no_desync(name, reader)
        if graceful:
            inv.check_started_complete(name, reader)
        if reader.closed:
            client.close()  # as a client does at EOF: a lingering close then ends at once
    if other is not None:
        occupier, other_reader = other
        if event == "shutdown":
            await task
            app.gate.set()
        await occupier.read(other_reader)
        inv.check_no_desync(name, other_reader)
        if other_reader.closed:
            occupier.close()
    if event == "shutdown":
        await task
        return
    # -- the server keeps serving everyone else ---------------------------------------------
    inv.check_threads_survive(name, cell.deaths)
    fresh = await cell.client()
    await fresh.get("/ok?id=7")
    fresh_reader = inv.ResponseReader(name, [inv.Expect("/ok id=7", ok_body(7))])
    await fresh.read(fresh_reader)
    inv.check_answered(name, fresh_reader, ["/ok id=7"])
