"""The states of one connection, the transitions between them, and the timeout of each state;
and the facts of the request in flight (:class:`RequestCycle`).

:class:`~asyncwsgi.channel.HTTPChannel` moves between the states of :class:`ConnState`, only
through :meth:`~asyncwsgi.channel.HTTPChannel.set_state`, which checks each move against
:data:`TRANSITIONS` (h11's ``_state.py`` keeps the same discipline for HTTP messages). A
connection's other fields are facts, not states: the request in flight (``cycle``), whether the
client half-closed, whether a response was served, what was written, and why reading is paused.

Every timeout belongs to a state (:class:`TimeoutPolicy` enforces them, from the server's sweep
about once a second, so that no request arms a timer):

==================  =======================================================================
state               timeout
==================  =======================================================================
IDLE                ``--timeout-keep-alive``: close. Pipelined bytes of a next head wait
                    meanwhile: ``--timeout-request-header`` from the end of the response: 408.
READING_HEAD        ``--timeout-request-header``: 408, then lingering close.
IN_FLIGHT           ``--timeout-request`` until the response starts: 504. ``--timeout-queue``
                    while it waits for a pool thread: 503, checked by the pool thread that
                    takes it (:func:`asyncwsgi.wsgi.run_wsgi`).
SENDING_FILE        ``--timeout-write``, as for any state with unsent output.
WRITE_PAUSED        ``--timeout-write``: the client must read before its next request starts.
LINGERING           ``--timeout-linger`` after the output has drained: close.
CLOSING             ``--timeout-write`` for the last buffered bytes.
==================  =======================================================================

``--timeout-write`` applies in every state: a connection whose unsent output has not shrunk
for that long is cut. Everything here runs on the loop thread.
"""

from __future__ import annotations

import asyncio
import enum
import logging
from typing import TYPE_CHECKING, Any, Final, Protocol

from .logs import error_logger

if TYPE_CHECKING:
    from .bridge import RequestBody, ResponseSink
    from .config import Config
    from .events import Request
    from .http11 import ServerConnection
    from .sendfile import FileSender

__all__ = [
    "ConnState",
    "QUIESCENT",
    "TRANSITIONS",
    "RequestCycle",
    "TimeoutPolicy",
    "TimedConnection",
]


class ConnState(enum.IntEnum):
    """Where one connection is. Loop thread.

    An ``IntEnum`` so that the set lookups of :meth:`HTTPChannel.set_state` hash in C.
    """

    #: Waiting for a request, no byte of it received: a new connection, or keep-alive.
    IDLE = 0
    #: Bytes of a request head have arrived; the head is not complete.
    READING_HEAD = 1
    #: A request is being served: waiting for a pool thread, running, or its response being
    #: written; its body may still be arriving.
    IN_FLIGHT = 2
    #: The response body goes out by sendfile(2) from the loop.
    SENDING_FILE = 3
    #: The response is complete and the connection kept, but the client has not read enough of
    #: it (the transport paused writing): the next request waits until it does.
    WRITE_PAUSED = 4
    #: The output is half-closed; input is read and discarded until the client closes.
    LINGERING = 5
    #: The transport is closing (its buffered output is written first) or was aborted.
    CLOSING = 6
    #: The transport is gone (``connection_lost``).
    CLOSED = 7


IDLE: Final = ConnState.IDLE
READING_HEAD: Final = ConnState.READING_HEAD
IN_FLIGHT: Final = ConnState.IN_FLIGHT
SENDING_FILE: Final = ConnState.SENDING_FILE
WRITE_PAUSED: Final = ConnState.WRITE_PAUSED
LINGERING: Final = ConnState.LINGERING
CLOSING: Final = ConnState.CLOSING
CLOSED: Final = ConnState.CLOSED

_ENDING: Final = frozenset({LINGERING, CLOSING, CLOSED})

#: The states each state may move to. Every state may end (LINGERING, CLOSING, CLOSED).
TRANSITIONS: Final[dict[ConnState, frozenset[ConnState]]] = {
    IDLE: frozenset({READING_HEAD, IN_FLIGHT}) | _ENDING,
    READING_HEAD: frozenset({IN_FLIGHT}) | _ENDING,
    IN_FLIGHT: frozenset({SENDING_FILE, IDLE, WRITE_PAUSED}) | _ENDING,
    SENDING_FILE: frozenset({IDLE, WRITE_PAUSED}) | _ENDING,
    WRITE_PAUSED: frozenset({IDLE, READING_HEAD, IN_FLIGHT}) | _ENDING,
    LINGERING: frozenset({CLOSING, CLOSED}),
    CLOSING: frozenset({CLOSING, CLOSED}),
    CLOSED: frozenset({CLOSED}),
}

#: States in which the connection is going away (the channel's ``closing``).
ENDING: Final = _ENDING

#: States whose entry may let a graceful shutdown end (``ServerState.idle_changed``).
QUIESCENT: Final = frozenset({IDLE, LINGERING, CLOSED})


class RequestCycle:
    """One request/response exchange on a connection. Loop thread only."""

    __slots__ = (
        "body",
        "body_complete",
        "chunks",
        "environ",
        "request",
        "response_headers",
        "sink",
        "started",
        "status",
    )

    def __init__(self, request: Request, started: float) -> None:
        self.request = request
        #: Body bytes received before the request was dispatched.
        self.chunks: list[bytes | bytearray] = []
        self.body: RequestBody | None = None
        self.body_complete = False
        self.sink: ResponseSink | None = None
        #: ``time.perf_counter()`` when the head was complete.
        self.started = started
        #: The response status once its head was written; 0 before.
        self.status = 0
        self.environ: dict[str, Any] | None = None
        self.response_headers: list[tuple[bytes, bytes]] | None = None


class TimedConnection(Protocol):
    """What :class:`TimeoutPolicy` reads and calls of a connection (implemented by
    :class:`~asyncwsgi.channel.HTTPChannel`), so that this module does not import the channel.
    Loop thread only."""

    conn: ServerConnection
    transport: asyncio.Transport | None
    state: ConnState
    state_since: float | None
    cycle: RequestCycle | None
    file_sender: FileSender | None
    client: str
    bytes_written: int
    stall_size: int
    stall_drained: int
    stall_since: float

    def set_state(self, state: ConnState, since: float | None = None) -> None: ...
    def close(self) -> None: ...
    def abort(self) -> None: ...
    def head_timeout(self) -> None: ...
    def request_timeout(self, cycle: RequestCycle, sink: ResponseSink) -> None: ...


class TimeoutPolicy:
    """The timeouts of each state, from the ``--timeout-*`` settings. Loop thread only.

    Args:
        config: ``timeout_keep_alive``, ``timeout_request_header``, ``timeout_request``,
            ``timeout_write`` and ``timeout_linger``, in seconds; 0 disables each but the first.
    """

    __slots__ = ("header", "keep_alive", "linger", "request", "write")

    def __init__(self, config: Config) -> None:
        self.keep_alive = config.timeout_keep_alive
        self.header = config.timeout_request_header
        self.request = config.timeout_request
        self.write = config.timeout_write
        self.linger = config.timeout_linger

    @property
    def sweep_interval(self) -> float:
        """Seconds between two checks of a connection: 1, or a quarter of the shortest timeout."""
        enabled = [t for t in (self.header, self.write, self.request, self.linger) if t > 0]
        return min(1.0, max(0.01, min([self.keep_alive, *enabled]) / 4))

    def check(self, channel: TimedConnection, now: float, perf_now: float) -> None:
        """Enforce the timeout of ``channel``'s state, and the write timeout of any state.

        Args:
            channel: the connection.
            now: the server's clock (``ServerState.clock``), in seconds.
            perf_now: ``time.perf_counter()``, the clock of request start times.
        """
        transport = channel.transport
        if transport is None:
            return
        state = channel.state
        pending = transport.get_write_buffer_size()
        # Progress is bytes leaving the buffer (or sent by sendfile), not a buffer that changes:
        # one that only grows, an app trickling output to a client that reads nothing, is stalled.
        drained = channel.bytes_written - pending
        sender = channel.file_sender
        if sender is not None:
            drained += sender.sent
            pending += sender.left
        if drained != channel.stall_drained or not channel.stall_size:
            channel.stall_since = now  # progress, or nothing was waiting at the last check
        channel.stall_drained = drained
        channel.stall_size = pending
        if pending and self.write and now - channel.stall_since >= self.write:
            if error_logger.isEnabledFor(logging.INFO):
                error_logger.info(
                    "Client %s read nothing for %g s (--timeout-write); closing the connection",
                    channel.client,
                    self.write,
                )
            channel.abort()
            return
        since = channel.state_since
        if state is IDLE:
            assert since is not None
            idle = now - since
            header = self.header
            if idle < self.keep_alive and (not header or idle < header):
                if idle >= 1.0:  # idle a while: likely to stay so; free its h11 state
                    channel.conn.release_if_idle()
                return
            if header and channel.conn.has_unparsed_data:
                # Pipelined bytes of a next head wait: its clock started when the previous
                # response ended.
                channel.set_state(READING_HEAD, since)
                if idle >= header:
                    channel.head_timeout()
            elif idle >= self.keep_alive:
                channel.close()
        elif state is READING_HEAD:
            if self.header:
                if since is None:
                    channel.state_since = now
                elif now - since >= self.header:
                    channel.head_timeout()
        elif state is IN_FLIGHT:
            cycle = channel.cycle
            if (
                self.request
                and cycle is not None
                and cycle.sink is not None
                and not cycle.sink.head_handed_over
                and not cycle.status
                and perf_now - cycle.started >= self.request
            ):
                channel.request_timeout(cycle, cycle.sink)
        elif state is LINGERING:
            assert since is not None
            if pending:
                channel.state_since = now
            elif now - since >= self.linger:
                channel.abort()
