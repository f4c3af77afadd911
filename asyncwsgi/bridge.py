"""The only seam between the event loop and the pool threads: bytes and signals, nothing more.

Two objects cross it, one per direction, both created on the loop for one request:

- :class:`ResponseSink` carries the response from the pool thread to the loop. The pool thread
  passes the head and body chunks on without waiting while the connection's unsent output is
  below ``write_high_water`` bytes, and blocks only above it, until the client has read enough.
  So a small response wakes the loop once, and a slow client pauses the app's iteration, never
  the loop (waitress's ``write_soon`` does the same with a condition variable).
- :class:`RequestBody` is ``wsgi.input`` for a body still arriving: the loop feeds it, the pool
  thread reads it, and the loop stops reading the socket while ``read_high_water`` bytes wait
  unread.

The bridge knows nothing of HTTP framing: it carries the head, the body bytes in order, whether
the body has ended, and whether the whole body came with its head (its length is then known);
:mod:`asyncwsgi.http11` decides the framing from that. Every method says which thread may call
it. Pool threads never touch the socket or h11; they only ask the loop, through
``loop.call_soon_threadsafe``, to act.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, Protocol

from .errors import ClientDisconnected
from .events import ResponseHead
from .pool import wait_for_client

if TYPE_CHECKING:
    from .filewrapper import FileWrapper

__all__ = [
    "split_high_water",
    "ResponseSink",
    "ResponseTarget",
    "RequestBody",
    "BodyTarget",
    "EMPTY_BODY",
]


def split_high_water(high_water: int) -> tuple[int, int]:
    """Split ``write_high_water`` (bytes) between the two places unsent output waits; return
    ``(transport, sink)``.

    Output waits in the transport's buffer, and in the :class:`ResponseSink` between the pool
    thread and the loop. The sink gets three quarters: the blocks the app yields while the loop
    is busy gather there and go out framed together, and the fewer times the pool thread waits
    on it, the less a streamed response costs. The transport gets the rest. The pool thread
    stops passing data on above the sink's share, the transport pauses the pool thread (and the
    next request) above its own, so a connection holds at most ``write_high_water`` bytes plus
    the block passed on last.
    """
    sink = max(1, high_water * 3 // 4)
    return max(1, high_water - sink), sink


class ResponseTarget(Protocol):
    """What a :class:`ResponseSink` asks of its connection. Loop thread only."""

    def on_response_data(
        self,
        sink: ResponseSink,
        head: ResponseHead | None,
        chunks: list[bytes],
        end: bool,
        body_length: int | None,
    ) -> None: ...

    def on_response_file(
        self, sink: ResponseSink, head: ResponseHead, wrapper: FileWrapper, offset: int, count: int
    ) -> None: ...

    def on_response_abort(self, sink: ResponseSink) -> None: ...


class ResponseSink:
    """Hands one response from the pool thread to the loop, with backpressure.

    The pool thread calls :meth:`send`, :meth:`send_file` and :meth:`abort`; the loop calls
    :meth:`written`, :meth:`pause`, :meth:`resume` and :meth:`disconnect`.

    Flow control uses two counters, each written by one thread only (so no lock is needed):
    ``handed`` (bytes the pool thread has passed on) and ``bytes_written`` (bytes the loop has
    passed to the transport). The pool thread waits while ``handed - bytes_written`` exceeds the
    high-water mark or the transport has paused writing, and is woken by the loop through a
    :class:`threading.Event`.

    Args:
        call_soon_threadsafe: the loop's ``call_soon_threadsafe``.
        target: the connection that writes the response (loop thread).
        high_water: bytes of unsent output above which the pool thread waits.
        timeout: seconds the pool thread waits for a client that reads nothing before giving up with
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
        "bytes_written",
        "can_sendfile",
        "disconnected",
        "handed",
        "head_handed_over",
        "paused",
        "peer_closed",
        "thread",
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
        self._ready: threading.Event | None = None  # made when a pool thread first has to wait
        self._waiting = False
        self._pending: deque[tuple[ResponseHead | None, list[bytes], bool, int | None]] = deque()
        self._scheduled = False
        self.handed = 0
        self.bytes_written = 0
        self.paused = False
        self.disconnected = False
        self.can_sendfile = can_sendfile
        #: Whether the head has been passed on (the loop may not have written it yet).
        self.head_handed_over = False
        #: Set by the loop when the client half-closed (sent EOF) during the request.
        self.peer_closed = False
        #: The ident of the pool thread that called the application (0 before): the thread
        #: to count stuck when the request is past ``--timeout-request``.
        self.thread = 0

    # -- pool thread --------------------------------------------------------------------------

    def send(self, head: ResponseHead | None, chunks: list[bytes], nbytes: int, end: bool) -> None:
        """Hand over the head (first call only), body chunks, and whether the body ends here.

        Pool thread only. Returns at once while output is below the high-water mark; above it,
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
        body_length: int | None = None
        if head is not None:
            self.head_handed_over = True
            if end:
                body_length = nbytes  # the whole body came with its head
        self.handed += nbytes
        # Pass the block on now (PEP 3333: never hold a block back), but wake the loop only
        # if it has not been woken for an earlier one yet: it takes all of them in one go.
        self._pending.append((head, chunks, end, body_length))
        if not self._scheduled:
            self._scheduled = True
            self._call(self._deliver)
        if not end and (self.paused or self.handed - self.bytes_written > self._high_water):
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
        head, chunks, end, body_length = pending.popleft()
        if pending:
            chunks = list(chunks)
            while pending:
                more_head, more, more_end, more_length = pending.popleft()
                if more_head is not None:
                    head, body_length = more_head, more_length
                chunks.extend(more)
                end = end or more_end
        self._target.on_response_data(self, head, chunks, end, body_length)

    def send_file(self, head: ResponseHead, wrapper: FileWrapper, offset: int, count: int) -> None:
        """Hand a file body to the loop, which sends ``count`` bytes from ``offset`` by sendfile.

        Pool thread only. Returns at once; the loop owns ``wrapper`` from here on, and has its
        ``close()`` called in a pool thread when the file has been sent or the send failed.

        Raises:
            ClientDisconnected: the client has already gone away (``wrapper`` stays the caller's).
        """
        if self.disconnected:
            raise ClientDisconnected("client disconnected")
        self.head_handed_over = True
        self._call(self._target.on_response_file, self, head, wrapper, offset, count)

    def abort(self) -> None:
        """Ask the loop to cut the connection: the response cannot be completed. Pool thread."""
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
        while not self.disconnected and (
            self.paused or self.handed - self.bytes_written > self._high_water
        ):
            self._waiting = True
            ready.clear()
            if (
                not self.disconnected
                and (self.paused or self.handed - self.bytes_written > self._high_water)
                and not wait_for_client(ready.wait, self._timeout)
            ):
                self._waiting = False
                raise ClientDisconnected(f"client read nothing for {self._timeout:g} s")
            self._waiting = False
        if self.disconnected:
            raise ClientDisconnected("client disconnected")

    # -- loop thread ----------------------------------------------------------------------------

    def written(self, nbytes: int) -> None:
        """Record that ``nbytes`` handed-over bytes reached the transport. Loop thread only."""
        self.bytes_written += nbytes
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
        """The connection is gone: the pool thread's next send raises. Loop thread only."""
        self.disconnected = True
        if self._ready is not None:
            self._ready.set()


class BodyTarget(Protocol):
    """What a :class:`RequestBody` asks of its connection. Loop thread only."""

    def send_continue(self) -> None: ...

    def resume_body(self) -> None: ...


class RequestBody:
    """``wsgi.input`` for a body still arriving (PEP 3333 "Input and Error Streams").

    The loop calls :meth:`feed`, :meth:`feed_eof` and :meth:`disconnect`; the pool thread calls
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
            (and set :attr:`reading_paused`) until the pool thread asks to resume.
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

    # -- pool thread --------------------------------------------------------------------------

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
            if not wait_for_client(self._cond.wait, self._timeout):
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
        end = offset + size
        if end <= len(first):  # the first chunk has it all: one copy at most, no join
            if type(first) is bytes:
                data = first[offset:end]  # the chunk itself when it is the whole of it
            else:
                data = bytes(memoryview(first)[offset:end])
            if end == len(first):
                chunks.popleft()
                offset = 0
            else:
                offset = end
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
        """Read up to ``size`` bytes (all that remain when negative or None). Pool thread only.

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
        """Read one line, up to and including ``b"\\n"``, at most ``size`` bytes. Pool thread.

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
        """Read lines until the body ends, or until ``hint`` bytes have been read. Pool thread.

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
