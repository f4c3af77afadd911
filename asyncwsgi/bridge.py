"""The only seam between the event loop and the worker threads.

Two objects cross it, one per direction, both created on the loop for one request:

- :class:`ResponseSink` carries the response from the worker thread to the loop. The worker hands
  over the head and body chunks without waiting while the connection's unsent output is below
  ``write_high_water`` bytes, and blocks only above it, until the client has read enough. So a
  small response costs one crossing each way, and a slow client pauses the app's iteration, never
  the loop (waitress's ``write_soon`` does the same with a condition variable).
- :class:`RequestBody` is ``wsgi.input`` for a body still arriving: the loop feeds it, the worker
  reads it, and the loop stops reading the socket while ``read_high_water`` bytes wait unread.

Every method says which thread may call it. Worker threads never touch the socket or h11; they
only ask the loop, through ``loop.call_soon_threadsafe``, to act.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, Protocol

from .errors import ClientDisconnected
from .logs import LogThrottle

if TYPE_CHECKING:
    from .filewrapper import FileWrapper

__all__ = [
    "Head",
    "WorkerPool",
    "ResponseSink",
    "ResponseTarget",
    "RequestBody",
    "BodyTarget",
    "EMPTY_BODY",
]

logger = logging.getLogger("asyncwsgi.error")

#: A validated response head: (status code, reason phrase, [(name, value), ...]), latin-1 bytes.
Head = tuple[int, bytes, list[tuple[bytes, bytes]]]


class WorkerPool:
    """The threads that run the application: loop → thread, one deque append per request.

    A thread that finds work takes the next call itself, without sleeping in between, so a burst
    of calls is run by as few threads as keep up with it, and waking a thread costs one hand-off
    per burst, not one per call. On a core shared with the loop every wake-up is a context switch
    and a handover of the GIL; ``ThreadPoolExecutor`` (one waiting thread woken per call) pays
    about six switches per small request, this pool well under one.

    - :meth:`submit` (loop thread) appends the call to a deque. Once per loop iteration, after
      the iteration's I/O callbacks, the pool wakes one parked thread if no thread is awake.
    - A thread runs calls until the deque is empty, then parks on a lock of its own.
    - While calls wait, the loop checks every ``stall`` seconds whether any call finished since
      the last check. If none did, the awake threads are blocked (a database call, a slow
      client, a sleep), and one more thread is woken, or started while the pool is below
      ``max_threads``. So a call waits at most about ``stall`` seconds behind a blocked one
      while a thread is free.

    Threads are daemon threads, started on demand: a request stuck in application code past the
    graceful-shutdown timeout cannot keep the process from exiting.

    Robustness: a thread never ends because of what a call raises; any ``BaseException``
    (``SystemExit`` from ``sys.exit()`` in application code, say) is logged and the thread takes
    the next call. A thread that fails to start is not counted, and is started again at the next
    check. Should a thread end anyway, it is no longer counted, and the next check starts another.

    Thread safety, with or without the GIL (free-threaded CPython): ``_lock`` guards the thread
    list, the parked list and the closing flag, and every decision to park, wake, start or end a
    thread is taken under it. A thread checks the deque for calls and parks in one critical
    section, and the loop checks for parked threads after appending a call, so a wake-up is
    never lost and a parked thread is popped (and its lock released) exactly once. The deque
    itself is outside the lock (``append`` and ``popleft`` are atomic on every build), so a call
    costs no lock: the lock is taken once per park and once per wake-up. ``_progress`` is only a
    hint for the stall check: a stale read wakes one thread too many or one check late.

    Args:
        loop: the event loop whose thread calls :meth:`submit`.
        max_threads: the most threads, and so the most concurrent application calls.
        name: thread name prefix (``asyncwsgi_0``, ``asyncwsgi_1``...).
        stall: seconds without a finished call, while calls wait, before another thread is woken.
    """

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        max_threads: int,
        name: str = "asyncwsgi",
        stall: float = 0.002,
    ) -> None:
        self._loop = loop
        self._calls: deque[tuple[Callable[..., object], tuple[Any, ...]]] = deque()
        self._max = max_threads
        self._name = name
        self._stall = stall
        self._lock = threading.Lock()
        # Guarded by _lock: the live threads, the wake-up lock of each parked thread (the same
        # list object for the pool's life: threads keep a reference), and the closing flag.
        self._threads: list[threading.Thread] = []
        self._parked: list[threading.Lock] = []
        self._closing = False
        self._started = 0  # threads started so far, for their names
        self._wake_scheduled = False
        self._watch: asyncio.TimerHandle | None = None
        #: Set by a worker after each call, cleared by the loop's stall check.
        self._progress = False
        self._start_errors = LogThrottle()

    def submit(self, fn: Callable[..., object], *args: Any) -> None:
        """Run ``fn(*args)`` in a worker thread. Loop thread only; never blocks.

        ``fn`` should not raise; if it does (even ``SystemExit``), the error is logged and the
        thread carries on. A call submitted during or after :meth:`shutdown` still runs, in a
        thread that ends once no call is left.
        """
        self._calls.append((fn, args))
        if not self._wake_scheduled:
            self._wake_scheduled = True
            self._loop.call_soon(self._wake)

    @property
    def threads(self) -> int:
        """Threads running: started and not ended."""
        return len(self._threads)

    @property
    def busy(self) -> int:
        """Threads not parked: running a call, or about to take one (approximate)."""
        return len(self._threads) - len(self._parked)

    @property
    def queued(self) -> int:
        """Calls waiting for a thread (approximate)."""
        return len(self._calls)

    @property
    def max_threads(self) -> int:
        """The most threads the pool starts."""
        return self._max

    def _wake(self) -> None:
        """After the loop iteration's callbacks: make sure a thread is awake. Loop thread."""
        self._wake_scheduled = False
        if not self._calls:
            return
        self._wake_one(only_if_none_awake=True)
        if self._watch is None:
            self._progress = False
            self._watch = self._loop.call_later(self._stall, self._check)

    def _check(self) -> None:
        """Every ``stall`` seconds while calls wait: wake a thread if none finished. Loop thread."""
        self._watch = None
        if not self._calls:
            return
        self._wake_one(only_if_none_awake=self._progress)
        self._progress = False
        self._watch = self._loop.call_later(self._stall, self._check)

    def _wake_one(self, only_if_none_awake: bool) -> None:
        """Unpark a thread, else start one below ``max_threads``. Loop thread; never raises.

        With ``only_if_none_awake``, do nothing while a thread is awake: it takes the waiting
        calls itself before it parks.
        """
        wake_up: threading.Lock | None = None
        error: Exception | None = None
        with self._lock:
            if only_if_none_awake and len(self._parked) < len(self._threads):
                return
            if self._parked:
                wake_up = self._parked.pop()
            elif len(self._threads) < self._max:
                # Started under the lock, so every listed thread has started (shutdown joins).
                thread = threading.Thread(
                    target=self._work, name=f"{self._name}_{self._started}", daemon=True
                )
                try:
                    thread.start()
                except Exception as exc:  # "can't start new thread": out of memory, a ulimit
                    error = exc
                else:
                    self._started += 1
                    self._threads.append(thread)
            else:
                return
            running = len(self._threads)
        if wake_up is not None:
            wake_up.release()
        if error is None:
            return
        count = self._start_errors.ready()
        if count:
            logger.error(
                "Cannot start a worker thread (%d of %d running): %s "
                "(%d failure(s) since the last report); retrying",
                running,
                self._max,
                error,
                count,
            )

    def _work(self) -> None:
        """A worker thread: run calls until none is left, then park; end once closing."""
        me = threading.current_thread()
        wake_up = threading.Lock()
        wake_up.acquire()
        calls = self._calls
        lock = self._lock
        parked = self._parked
        try:
            while True:
                try:
                    fn, args = calls.popleft()
                except IndexError:
                    with lock:
                        if calls:  # appended since: take it (the loop saw this thread awake)
                            continue
                        if self._closing:
                            self._threads.remove(me)
                            return
                        parked.append(wake_up)
                    wake_up.acquire()  # released by the loop's _wake_one or by shutdown
                    continue
                try:
                    fn(*args)
                except BaseException:  # SystemExit from app code too: the thread must not end
                    with contextlib.suppress(BaseException):  # nor if a log handler fails
                        logger.exception("Unhandled error in a worker thread")
                del fn, args
                self._progress = True
        except BaseException:  # the pool's own code failed: do not leave this thread counted
            with lock:
                if me in self._threads:
                    self._threads.remove(me)
                if wake_up in parked:
                    parked.remove(wake_up)
            with contextlib.suppress(BaseException):
                logger.critical("Worker thread %s failed; it is replaced", me.name, exc_info=True)

    def shutdown(self, timeout: float) -> int:
        """Let the threads run the queued calls and end; wait up to ``timeout`` seconds.

        Blocks: call it in a thread other than the loop's. Parked threads are woken and end;
        busy ones end after their call once nothing is queued. Calls still queued when time ran
        out (every thread stuck, or none started) run in the calling thread; a call submitted
        later still runs, in a thread started for it. Whatever a call raises is logged.

        Returns:
            The number of threads still running a call when time ran out (daemon threads,
            abandoned).
        """
        with self._lock:
            self._closing = True
            wake_ups = self._parked[:]
            self._parked.clear()
        for wake_up in wake_ups:
            wake_up.release()
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:  # threads started meanwhile (for late calls) are waited for too
                running = self._threads[:]
            remaining = deadline - time.monotonic()
            if not running or remaining <= 0:
                break
            running[0].join(remaining)
        calls = self._calls
        while True:
            try:
                fn, args = calls.popleft()
            except IndexError:
                break
            try:
                fn(*args)
            except BaseException:
                logger.exception("Unhandled error in a worker thread")
            del fn, args
        return len(self._threads)


class ResponseTarget(Protocol):
    """What a :class:`ResponseSink` asks of its connection. Loop thread only."""

    def on_response_data(
        self, sink: ResponseSink, head: Head | None, chunks: list[bytes], end: bool
    ) -> None: ...

    def on_response_file(
        self, sink: ResponseSink, head: Head, wrapper: FileWrapper, offset: int, count: int
    ) -> None: ...

    def on_response_abort(self, sink: ResponseSink) -> None: ...


class ResponseSink:
    """Hands one response from the worker thread to the loop, with backpressure.

    The worker calls :meth:`send`, :meth:`send_file` and :meth:`abort`; the loop calls
    :meth:`written`, :meth:`pause`, :meth:`resume` and :meth:`disconnect`.

    Flow control uses two counters, each written by one thread only (so no lock is needed):
    ``handed`` (bytes the worker has handed over) and ``done`` (bytes the loop has passed to the
    transport). The worker waits while ``handed - done`` exceeds the high-water mark or the
    transport has paused writing, and is woken by the loop through a :class:`threading.Event`.

    Args:
        call_soon_threadsafe: the loop's ``call_soon_threadsafe``.
        target: the connection that writes the response (loop thread).
        high_water: bytes of unsent output above which the worker waits.
        timeout: seconds the worker waits for a client that reads nothing before giving up with
            :class:`ClientDisconnected`.
        can_sendfile: whether the connection is plain TCP, so file bodies may go by sendfile(2).
    """

    __slots__ = (
        "_call",
        "_high_water",
        "_pending",
        "_ready",
        "_scheduled",
        "_target",
        "_timeout",
        "_waiting",
        "can_sendfile",
        "disconnected",
        "done",
        "handed",
        "head_sent",
        "paused",
        "peer_closed",
    )

    def __init__(
        self,
        call_soon_threadsafe: Callable[..., Any],
        target: ResponseTarget,
        high_water: int,
        timeout: float,
        can_sendfile: bool,
    ) -> None:
        self._call = call_soon_threadsafe
        self._target = target
        self._high_water = high_water
        self._timeout = timeout
        self._ready: threading.Event | None = None  # made when a worker first has to wait
        self._waiting = False
        self._pending: deque[tuple[Head | None, list[bytes], bool]] = deque()
        self._scheduled = False
        self.handed = 0
        self.done = 0
        self.paused = False
        self.disconnected = False
        self.can_sendfile = can_sendfile
        self.head_sent = False
        #: Set by the loop when the client half-closed (sent EOF) during the request.
        self.peer_closed = False

    # -- worker thread ------------------------------------------------------------------------

    def send(self, head: Head | None, chunks: list[bytes], nbytes: int, end: bool) -> None:
        """Hand over the head (first call only), body chunks, and whether the body ends here.

        Worker thread only. Returns at once while output is below the high-water mark; above it,
        waits until the client has read enough. With ``end=True`` it never waits: the rest is
        written by the loop while the thread goes back to the pool.

        Args:
            head: the response head, on the first call only; None afterwards.
            chunks: body chunks (non-empty bytes); the list is handed over, not copied.
            nbytes: ``sum(map(len, chunks))``.
            end: True when this is the last part of the body.

        Raises:
            ClientDisconnected: the client has gone away, or read nothing for ``timeout`` seconds.
        """
        if self.disconnected:
            raise ClientDisconnected("client disconnected")
        if head is not None:
            self.head_sent = True
        self.handed += nbytes
        # Hand the block over now (PEP 3333: never hold a block back), but wake the loop only
        # if it has not been woken for an earlier one yet: it takes all of them in one go.
        self._pending.append((head, chunks, end))
        if not self._scheduled:
            self._scheduled = True
            self._call(self._deliver)
        if not end and (self.paused or self.handed - self.done > self._high_water):
            self._wait_writable()

    def _deliver(self) -> None:
        """Pass everything handed over since the last delivery to the target. Loop thread only.

        The flag is cleared before the queue is drained, so a block appended after the drain
        always schedules another delivery (deque appends and pops are atomic).
        """
        self._scheduled = False
        pending = self._pending
        if not pending:
            return
        head, chunks, end = pending.popleft()
        if not pending:
            self._target.on_response_data(self, head, chunks, end)
            return
        chunks = list(chunks)
        while pending:
            more_head, more, more_end = pending.popleft()
            if more_head is not None:
                head = more_head
            chunks.extend(more)
            end = end or more_end
        if head is not None and end:
            # Several hand-offs: the app streamed, so keep its framing (chunked, or its own
            # Content-Length); a computed length is only for a body handed over whole.
            self._target.on_response_data(self, head, chunks, False)
            self._target.on_response_data(self, None, [], True)
        else:
            self._target.on_response_data(self, head, chunks, end)

    def send_file(self, head: Head, wrapper: FileWrapper, offset: int, count: int) -> None:
        """Hand a file body to the loop, which sends ``count`` bytes from ``offset`` by sendfile.

        Worker thread only. Returns at once; the loop owns ``wrapper`` from here on, and has its
        ``close()`` called in a worker thread when the file has been sent or the send failed.

        Raises:
            ClientDisconnected: the client has already gone away (``wrapper`` stays the caller's).
        """
        if self.disconnected:
            raise ClientDisconnected("client disconnected")
        self.head_sent = True
        self._call(self._target.on_response_file, self, head, wrapper, offset, count)

    def abort(self) -> None:
        """Ask the loop to cut the connection: the response cannot be completed. Worker thread."""
        self._call(self._target.on_response_abort, self)

    def client_disconnected(self) -> bool:
        """Return whether the client has gone: closed, reset, or half-closed its side. Any thread.

        The environ's ``asyncwsgi.client_disconnected``: a long-running application may call it
        now and then and give up early. It reads two flags the loop sets and never blocks.
        A client that only half-closed (sent EOF but still reads) is reported gone too: the
        server cannot tell it from one that closed without writing to it.
        """
        return self.disconnected or self.peer_closed

    def _wait_writable(self) -> None:
        ready = self._ready
        if ready is None:
            ready = self._ready = threading.Event()
        while not self.disconnected and (self.paused or self.handed - self.done > self._high_water):
            self._waiting = True
            ready.clear()
            if (
                not self.disconnected
                and (self.paused or self.handed - self.done > self._high_water)
                and not ready.wait(self._timeout)
            ):
                self._waiting = False
                raise ClientDisconnected(f"client read nothing for {self._timeout:g} s")
            self._waiting = False
        if self.disconnected:
            raise ClientDisconnected("client disconnected")

    # -- loop thread ----------------------------------------------------------------------------

    def written(self, nbytes: int) -> None:
        """Record that ``nbytes`` handed-over bytes reached the transport. Loop thread only."""
        self.done += nbytes
        if self._waiting and not self.paused and self._ready is not None:
            self._ready.set()

    def pause(self) -> None:
        """The transport's buffer went over its high-water mark. Loop thread only."""
        self.paused = True

    def resume(self) -> None:
        """The transport's buffer drained below its low-water mark. Loop thread only."""
        self.paused = False
        if self._ready is not None:
            self._ready.set()

    def disconnect(self) -> None:
        """The connection is gone: the next hand-off raises in the worker. Loop thread only."""
        self.disconnected = True
        if self._ready is not None:
            self._ready.set()


class BodyTarget(Protocol):
    """What a :class:`RequestBody` asks of its connection. Loop thread only."""

    def send_continue(self) -> None: ...

    def resume_body(self) -> None: ...


class RequestBody:
    """``wsgi.input`` for a body still arriving (PEP 3333 "Input and Error Streams").

    The loop calls :meth:`feed`, :meth:`feed_eof` and :meth:`disconnect`; the worker calls
    ``read``, ``readline``, ``readlines`` and iterates. Reads block until enough data has arrived
    or the body ends; past the end they return ``b""``. The first read of a request that carries
    ``Expect: 100-continue`` asks the loop to send ``100 Continue``, so a client whose request the
    app answers without reading never sends the body (RFC 9110 section 10.1.1).

    Args:
        call_soon_threadsafe: the loop's ``call_soon_threadsafe``.
        target: the connection, asked to send 100 Continue and to resume reading.
        high_water: bytes buffered unread above which :meth:`feed` tells the loop to stop reading.
        expect_continue: whether the client waits for ``100 Continue``.
        timeout: seconds a read waits for more data before raising :class:`ClientDisconnected`
            (``Config.timeout_read``).
    """

    __slots__ = (
        "_call",
        "_chunks",
        "_cond",
        "_continue",
        "_eof",
        "_error",
        "_high_water",
        "_offset",
        "_size",
        "_target",
        "_timeout",
        "reading_paused",
    )

    def __init__(
        self,
        call_soon_threadsafe: Callable[..., Any],
        target: BodyTarget,
        high_water: int,
        expect_continue: bool,
        timeout: float,
    ) -> None:
        self._call = call_soon_threadsafe
        self._target = target
        self._high_water = high_water
        self._continue = expect_continue
        self._timeout = timeout
        self._cond = threading.Condition(threading.Lock())
        # The unread body: the chunks as fed (never copied on the way in), the bytes of the
        # first one already read, and the bytes buffered unread in all.
        self._chunks: deque[bytes | bytearray] = deque()
        self._offset = 0
        self._size = 0
        self._eof = False
        self._error: str | None = None
        #: Set by the loop when it stopped reading the socket because the buffer is full.
        self.reading_paused = False

    # -- loop thread ----------------------------------------------------------------------------

    def feed(self, data: bytes | bytearray) -> bool:
        """Append body bytes; ``data`` is kept, not copied, and must not change. Loop thread.

        Returns:
            True when the buffer is now at or over the high-water mark: stop reading the socket
            (and set :attr:`reading_paused`) until the worker asks to resume.
        """
        with self._cond:
            self._chunks.append(data)
            self._size += len(data)
            self._cond.notify_all()
            if self._size >= self._high_water:
                self.reading_paused = True
                return True
            return False

    def feed_eof(self) -> None:
        """Mark the end of the body. Loop thread only."""
        with self._cond:
            self._eof = True
            self._continue = False
            self._cond.notify_all()

    def disconnect(self, reason: str = "client disconnected") -> None:
        """Fail pending and future reads: the body will never be complete. Loop thread only."""
        with self._cond:
            if not self._eof:
                self._error = reason
            self._cond.notify_all()

    # -- worker thread ------------------------------------------------------------------------

    def _line_end(self, limit: int) -> int:
        """Bytes up to and including the first buffered ``\\n``, or -1; looks at no more than
        ``limit`` bytes when ``limit`` >= 0. Lock held."""
        seen = 0
        start = self._offset
        for chunk in self._chunks:
            end = chunk.find(b"\n", start)
            if end >= 0:
                return seen + end - start + 1
            seen += len(chunk) - start
            if 0 <= limit <= seen:
                return -1
            start = 0
        return -1

    def _fill(self, want: int, line: bool) -> None:
        """Wait until ``want`` bytes (or a line) are buffered, or the body ended. Lock held."""
        while not self._eof:
            if self._error is not None:
                raise ClientDisconnected(self._error)
            if (want >= 0 and self._size >= want) or (line and self._line_end(want) >= 0):
                return
            if self._continue:
                self._continue = False
                self._call(self._target.send_continue)
            if self.reading_paused:
                self.reading_paused = False
                self._call(self._target.resume_body)
            if not self._cond.wait(self._timeout):
                raise ClientDisconnected(f"no request body data for {self._timeout:g} s")

    def _take(self, size: int) -> bytes:
        """Remove and return up to ``size`` bytes (all when negative), copied once. Lock held."""
        if size < 0 or size > self._size:
            size = self._size
        if not size:
            return b""
        chunks = self._chunks
        offset = self._offset
        first = chunks[0]
        if not offset and len(first) == size and type(first) is bytes:
            chunks.popleft()
            data = first
        else:
            pieces: list[bytes | bytearray | memoryview] = []
            need = size
            while need:
                chunk = chunks[0]
                left = len(chunk) - offset
                if left <= need:
                    pieces.append(memoryview(chunk)[offset:] if offset else chunk)
                    chunks.popleft()
                    offset = 0
                    need -= left
                else:
                    pieces.append(memoryview(chunk)[offset : offset + need])
                    offset += need
                    need = 0
            data = b"".join(pieces)
        self._offset = offset if chunks else 0
        self._size -= size
        if self.reading_paused and self._size < self._high_water // 2:
            self.reading_paused = False
            self._call(self._target.resume_body)
        return data

    def read(self, size: int | None = -1) -> bytes:
        """Read up to ``size`` bytes (all that remain when negative or None). Worker thread only.

        Blocks until ``size`` bytes have arrived or the body ended.

        Raises:
            ClientDisconnected: the client went away before the body was complete, or sent
                nothing for ``timeout`` seconds.
        """
        want = -1 if size is None or size < 0 else size
        with self._cond:
            self._fill(want if want >= 0 else 1 << 62, line=False)
            return self._take(want)

    def readline(self, size: int | None = -1) -> bytes:
        """Read one line, up to and including ``b"\\n"``, at most ``size`` bytes. Worker thread.

        Raises:
            ClientDisconnected: as for :meth:`read`.
        """
        limit = -1 if size is None or size < 0 else size
        with self._cond:
            self._fill(limit, line=True)
            end = self._line_end(limit)
            take = self._size if end < 0 else end
            if limit >= 0:
                take = min(take, limit)
            return self._take(take)

    def readlines(self, hint: int = -1) -> list[bytes]:
        """Read lines until the body ends, or until ``hint`` bytes have been read. Worker thread.

        Raises:
            ClientDisconnected: as for :meth:`read`.
        """
        lines: list[bytes] = []
        total = 0
        while line := self.readline():
            lines.append(line)
            total += len(line)
            if 0 < hint <= total:
                break
        return lines

    def __iter__(self) -> Iterator[bytes]:
        while line := self.readline():
            yield line


class _EmptyBody:
    """``wsgi.input`` of a request without a body: every read returns ``b""``. Stateless."""

    __slots__ = ()

    def read(self, size: int | None = -1) -> bytes:
        return b""

    def readline(self, size: int | None = -1) -> bytes:
        return b""

    def readlines(self, hint: int = -1) -> list[bytes]:
        return []

    def __iter__(self) -> Iterator[bytes]:
        return iter(())


#: The shared ``wsgi.input`` of requests without a body.
EMPTY_BODY = _EmptyBody()
