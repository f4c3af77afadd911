"""Drive an :class:`~asyncwsgi.channel.HTTPChannel` without sockets, pool threads or real time.

A fake transport records what the channel writes and how it pauses, half-closes, closes or
aborts; a fake loop queues what the worker side asks of the loop (``call_soon_threadsafe``) until
the test runs it; a fake pool keeps each submitted application call until the test runs it, on
the test's own thread or in a thread of its own; a fake clock stands in for ``loop.time()`` and
``time.perf_counter()``. Timeouts are enforced by the server's sweep calling
``HTTPChannel.check_timeouts(now, perf_now)``: :meth:`ChannelHandle.tick` advances the clock and
runs that sweep, so a 30-second timeout takes no time at all.

Everything that knows how a channel is built, and which of its callbacks stand for which event
on the wire, lives in this module. The tests use :class:`ChannelHandle` only.
"""

from __future__ import annotations

import asyncio
import threading
import time
import typing
from collections import deque
from collections.abc import Callable
from typing import Any

import pytest

import asyncwsgi.channel
import asyncwsgi.response
import asyncwsgi.wsgi
from asyncwsgi import Config
from asyncwsgi.channel import HTTPChannel
from asyncwsgi.state import Pool, ServerState

from .helpers import Reply, decode_replies

__all__ = ["ChannelFactory", "ChannelHandle", "FakeClock", "FakeLoop", "FakePool", "FakeTransport"]

#: Seconds a test waits for an application thread, as a bound on a hang; never reached when
#: the behaviour under test works.
THREAD_TIMEOUT = 5.0

App = Callable[..., Any]


class FakeClock:
    """The one clock of a test: ``loop.time()`` and ``time.perf_counter()``, in seconds."""

    def __init__(self) -> None:
        self.now = 1000.0


class _ClockedTime:
    """The ``time`` module as a module under test sees it: ``perf_counter`` reads the fake
    clock; every other function is the real one (``time.time`` for the Date header)."""

    def __init__(self, clock: FakeClock) -> None:
        self._clock = clock

    def perf_counter(self) -> float:
        return self._clock.now

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)


class FakeLoop:
    """The loop as the channel and its worker side use it: ``time()`` reads the fake clock, and
    ``call_soon_threadsafe`` queues the callback (from any thread) until :meth:`run_ready`."""

    def __init__(self, clock: FakeClock) -> None:
        self._clock = clock
        self._ready: deque[tuple[Callable[..., Any], tuple[Any, ...]]] = deque()
        #: Set whenever a callback is queued: a test waits on it for an application thread.
        self.callback_queued = threading.Event()

    def time(self) -> float:
        return self._clock.now

    def call_soon_threadsafe(self, callback: Callable[..., Any], *args: Any) -> None:
        self._ready.append((callback, args))
        self.callback_queued.set()

    call_soon = call_soon_threadsafe

    def run_ready(self) -> int:
        """Run the queued callbacks, and those they queue, in order; return how many ran."""
        count = 0
        self.callback_queued.clear()
        while self._ready:
            callback, args = self._ready.popleft()
            callback(*args)
            count += 1
        return count


class FakePool:
    """Keeps each ``submit(fn, *args)`` until the test runs it (see :class:`ChannelHandle`)."""

    def __init__(self) -> None:
        self.calls: deque[tuple[Callable[..., object], tuple[Any, ...]]] = deque()

    def submit(self, fn: Callable[..., object], *args: Any) -> None:
        self.calls.append((fn, args))

    #: Threads counted stuck: none, the fake pool has no threads.
    stuck = 0

    def mark_stuck(self, ident: int) -> str | None:
        return None


class FakeTransport:
    """The ``asyncio.Transport`` methods the channel uses, recording what it does.

    Every byte written stays in the send buffer (``get_write_buffer_size()``) while the client
    is not reading (:meth:`stop_reading`); the protocol's ``pause_writing()`` is called when
    the buffer goes over the high-water mark the channel set, and ``resume_writing()`` when
    :meth:`drain` empties it, as asyncio's transports do. A reading client's buffer is empty.
    """

    def __init__(self, protocol: asyncio.Protocol, peer: tuple[str, int] | str) -> None:
        self._protocol = protocol
        self._peer = peer
        self.data = bytearray()
        self.calls: list[str] = []
        self.closed = False
        self.aborted = False
        self.eof_written = False
        self.reading_paused = False
        self.writing_paused = False
        self.buffered = 0
        self.high_water = 64 * 1024
        self.client_reading = True
        #: Bytes written after close(), abort() or write_eof(): never expected.
        self.late_writes = 0
        #: Bytes the client sent while reading was paused: they wait in the socket.
        self.unread: list[bytes] = []

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name == "peername":
            return self._peer
        if name == "sockname":
            return ("127.0.0.1", 8000) if isinstance(self._peer, tuple) else "/tmp/asyncwsgi.sock"
        return default  # no "socket" (so no sendfile), no "sslcontext"

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self.calls.append("set_write_buffer_limits")
        if high is not None:
            self.high_water = high

    def get_write_buffer_size(self) -> int:
        return self.buffered

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self.closed or self.eof_written:
            self.late_writes += len(data)
        self.data += data
        if not self.client_reading:
            self.buffered += len(data)
            if self.buffered > self.high_water and not self.writing_paused:
                self.writing_paused = True
                self._protocol.pause_writing()

    def writelines(self, pieces: typing.Iterable[bytes | bytearray | memoryview]) -> None:
        self.write(b"".join(pieces))

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        self.calls.append("write_eof")
        self.eof_written = True

    def pause_reading(self) -> None:
        self.calls.append("pause_reading")
        self.reading_paused = True

    def resume_reading(self) -> None:
        self.calls.append("resume_reading")
        self.reading_paused = False

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.calls.append("close")
        self.closed = True

    def abort(self) -> None:
        self.calls.append("abort")
        self.closed = self.aborted = True

    # -- the client's side -------------------------------------------------------------------

    def stop_reading(self) -> None:
        self.client_reading = False

    def drain(self, nbytes: int | None = None) -> None:
        """The client reads ``nbytes`` (all when None) of the buffered output."""
        self.buffered = 0 if nbytes is None else max(0, self.buffered - nbytes)
        if nbytes is None:
            self.client_reading = True
        if self.writing_paused and self.buffered <= self.high_water // 4:
            self.writing_paused = False
            self._protocol.resume_writing()


class ChannelHandle:
    """One connection, seen from the wire, with the hands that drive the server around it.

    Nothing runs by itself: the application runs only in :meth:`run_pending_app_calls` (or
    :meth:`start_app_call_in_thread`), what it hands back reaches the connection only when the
    loop's callbacks run (both do that), and time passes only in :meth:`tick`.
    """

    def __init__(
        self, factory: ChannelFactory, state: ServerState, peer: tuple[str, int] | str
    ) -> None:
        self._factory = factory
        self._state = state
        self.clock = factory.clock
        self.loop = factory.loop
        self.pool = factory.pool
        channel = HTTPChannel(state, "http")
        channel.loop = typing.cast(asyncio.AbstractEventLoop, self.loop)
        self.channel = channel
        self.transport = FakeTransport(channel, peer)
        self.lost = False
        channel.connection_made(typing.cast(asyncio.Transport, self.transport))
        factory.handles.append(self)

    # -- the client ---------------------------------------------------------------------------

    def feed(self, data: bytes) -> None:
        """The client sent ``data``: the channel receives it now, unless reading is paused
        (then it waits in the socket until reading resumes) or the transport is closed."""
        assert data, "an empty read is end of file: use eof()"
        self.transport.unread.append(data)
        self._deliver_unread()

    def _deliver_unread(self) -> None:
        transport = self.transport
        while transport.unread and not transport.reading_paused and not transport.closed:
            self.channel.data_received(transport.unread.pop(0))

    def eof(self) -> None:
        """The client half-closed its side (sent FIN); the transport closes when told to."""
        keep_open = self.channel.eof_received()
        if not keep_open:
            self.transport.close()

    def lose(self, exc: Exception | None = None) -> None:
        """The connection is gone (a reset, or the close completed)."""
        self.lost = True
        self.transport.closed = True
        self.channel.connection_lost(exc)

    def stop_reading(self) -> None:
        """The client stops reading: what the server writes stays in the transport's buffer."""
        self.transport.stop_reading()

    def read(self, nbytes: int | None = None) -> None:
        """The client reads ``nbytes`` of the buffered output (all, and reads on, when None)."""
        self.transport.drain(nbytes)
        self.run_loop()

    # -- the server around the connection -----------------------------------------------------

    def tick(self, seconds: float) -> None:
        """``seconds`` pass; then the server's timeout sweep looks at the connection."""
        self.clock.now += seconds
        if not self.lost:
            self.channel.check_timeouts(self.clock.now, self.clock.now)

    def begin_shutdown(self) -> None:
        """A graceful shutdown begins (SIGTERM): no new keep-alive cycles."""
        self._state.shutting_down = True

    def pause_writing(self) -> None:
        """The transport's buffer went over its high-water mark (asyncio's pause_writing)."""
        self.transport.writing_paused = True
        self.channel.pause_writing()

    def resume_writing(self) -> None:
        """The transport's buffer drained (asyncio's resume_writing)."""
        self.transport.writing_paused = False
        self.channel.resume_writing()
        self.run_loop()

    def another_connection(
        self, peer: tuple[str, int] | str = ("127.0.0.1", 50001)
    ) -> ChannelHandle:
        """A second connection to the same server (shared limits and counters)."""
        return ChannelHandle(self._factory, self._state, peer)

    @property
    def pending_app_calls(self) -> int:
        """Requests handed to the pool and not yet taken by a thread."""
        return len(self.pool.calls)

    @property
    def requests_active(self) -> int:
        """The server's count of requests in progress (``--limit-concurrency``)."""
        return self._state.requests_active

    def run_loop(self) -> None:
        """Run what the worker side asked of the loop; let a resumed transport read again."""
        self.loop.run_ready()
        self._deliver_unread()

    def run_pending_app_calls(self, limit: int | None = None) -> int:
        """Take the pool's calls in order, each on this thread, then run the loop; calls that
        those start (the next pipelined request) run too, up to ``limit`` calls. Returns how
        many ran."""
        count = 0
        while self.pool.calls and (limit is None or count < limit):
            fn, args = self.pool.calls.popleft()
            fn(*args)
            count += 1
            self.run_loop()
        return count

    def start_app_call_in_thread(self) -> AppThread:
        """Take the pool's next call and run it in a thread of its own (the app may block)."""
        fn, args = self.pool.calls.popleft()
        return AppThread(self, fn, args)

    # -- what the client received -------------------------------------------------------------

    @property
    def written(self) -> bytes:
        """Every byte the server wrote to the connection."""
        return bytes(self.transport.data)

    @property
    def replies(self) -> list[Reply]:
        """The complete responses written so far, decoded by an h11 client (1xx left out)."""
        return decode_replies(self.written)

    @property
    def closed(self) -> bool:
        """The server closed (or aborted) the connection."""
        return self.transport.closed

    @property
    def aborted(self) -> bool:
        """The server cut the connection, dropping unsent output (RST)."""
        return self.transport.aborted

    @property
    def half_closed(self) -> bool:
        """The server ended its side (FIN after the output) but still reads: a lingering close."""
        return self.transport.eof_written and not self.transport.closed

    @property
    def reading_paused(self) -> bool:
        """The server stopped reading the socket."""
        return self.transport.reading_paused

    @property
    def late_writes(self) -> int:
        """Bytes written after the server closed or half-closed its side."""
        return self.transport.late_writes


class AppThread:
    """One application call running in a thread of its own; the loop stays the test's."""

    def __init__(
        self, handle: ChannelHandle, fn: Callable[..., object], args: tuple[Any, ...]
    ) -> None:
        self._handle = handle
        self._thread = threading.Thread(target=fn, args=args, name="channel-test-app")
        self._thread.start()
        handle._factory.threads.append(self._thread)

    def wait_for_loop_callback(self) -> None:
        """Wait until the application asks something of the loop; then run it on this thread."""
        queued = self._handle.loop.callback_queued.wait(THREAD_TIMEOUT)
        assert queued, "the application asked nothing of the loop"
        self._handle.run_loop()

    def join(self) -> None:
        """Wait for the call to return; then run what it left for the loop."""
        self._thread.join(THREAD_TIMEOUT)
        assert not self._thread.is_alive(), "the application call did not return"
        self._handle.run_loop()


class ChannelFactory:
    """Makes connections to one fake server. ``make_channel(config=..., app=...)``.

    The fake clock replaces ``time.perf_counter()`` in the modules that time requests (request
    start, ``--timeout-queue``) for the test's duration, through ``monkeypatch``.
    """

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.clock = FakeClock()
        self.loop = FakeLoop(self.clock)
        self.pool = FakePool()
        self.handles: list[ChannelHandle] = []
        self.threads: list[threading.Thread] = []
        clocked = _ClockedTime(self.clock)
        monkeypatch.setattr(asyncwsgi.channel, "time", clocked)
        monkeypatch.setattr(asyncwsgi.response, "time", clocked)
        monkeypatch.setattr(asyncwsgi.wsgi, "time", clocked)

    def __call__(
        self,
        app: App,
        config: Config | None = None,
        peer: tuple[str, int] | str = ("127.0.0.1", 50000),
    ) -> ChannelHandle:
        """A new connection from ``peer`` to a server running ``app`` with ``config``.

        Must be called with an event loop running (an ``async def`` test): the channel takes
        the running loop, which the fake one then replaces.
        """
        state = ServerState(
            config or Config(), app, typing.cast(Pool, self.pool), clock=lambda: self.clock.now
        )
        return ChannelHandle(self, state, peer)

    def close(self) -> None:
        """After the test: drop every connection, so that an application thread a failed
        test left waiting (for body data, or for the client to read) ends, and wait for it."""
        for handle in self.handles:
            if not handle.lost:
                handle.lose()
        for thread in self.threads:
            thread.join(THREAD_TIMEOUT)
