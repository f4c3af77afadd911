"""HTTPChannel: one connection, on the event loop.

The channel is the sole owner of its transport: it reads, writes and closes. It feeds received
bytes to the sans-IO :class:`~asyncwsgi.http11.ServerConnection`, submits each complete request
head to the thread pool (:func:`~asyncwsgi.wsgi.run_wsgi`), and writes what the pool thread
passes back through the :class:`~asyncwsgi.bridge.ResponseSink`. One request is in flight at a
time; pipelined requests wait in the sans-IO layer's buffer (reading pauses) until the response
before them is complete. Its state is one :class:`~asyncwsgi.connstate.ConnState`, changed by
:meth:`HTTPChannel.set_state` only; each state's timeout is in
:class:`~asyncwsgi.connstate.TimeoutPolicy`.

The class reads in the order of a request: connection, bytes in, dispatch, response out, end of
the exchange, then errors, flow control and closing. Every method runs on the loop thread. A
connection without a request in flight holds no thread: it is only this object and its transport.
"""

from __future__ import annotations

import asyncio
import io
import logging
import time
import typing
from typing import Any

from . import response
from .bridge import EMPTY_BODY, RequestBody, ResponseSink
from .connstate import (
    CLOSED,
    CLOSING,
    ENDING,
    IDLE,
    IN_FLIGHT,
    LINGERING,
    QUIESCENT,
    READING_HEAD,
    TRANSITIONS,
    WRITE_PAUSED,
    ConnState,
    RequestCycle,
)
from .environ import build_environ, connection_environ
from .errors import RequestRejected
from .events import PAUSED, ConnectionClosed, Data, EndOfMessage, PeerState, Request
from .http11 import ServerConnection
from .logs import access_logger, error_logger
from .proxy import ProxyHeaders, ProxyProtocolError, ProxyProtocolReader
from .sendfile import FileSender
from .state import ServerState
from .wsgi import run_wsgi

__all__ = ["HTTPChannel", "RequestCycle"]

# Why reading is paused; reading resumes when no reason is left.
_PAUSE_PIPELINE = 1  # a pipelined request waits for the response before it
_PAUSE_BODY = 2  # the request body buffer is full
_PAUSE_WRITE = 4  # WRITE_PAUSED: the client must read before its next request

_REQUEST_RECEIVED = (PeerState.DONE, PeerState.MUST_CLOSE)


class HTTPChannel(asyncio.Protocol):
    """The asyncio protocol of one HTTP/1.1 connection. Loop thread only.

    Args:
        server: shared server state.
        url_scheme: ``http`` or ``https`` for this listener.
    """

    # No per-connection __dict__: an idle keep-alive connection should cost a few KiB at most.
    __slots__ = (
        "_proxy_reader",
        "_reading_paused_by",
        "base_environ",
        "bytes_written",
        "can_sendfile",
        "client",
        "config",
        "conn",
        "cycle",
        "file_sender",
        "loop",
        "peer_eof",
        "proxy_headers",
        "remote",
        "served",
        "server",
        "sink_high_water",
        "stall_drained",
        "stall_since",
        "stall_size",
        "state",
        "state_since",
        "transport",
        "url_scheme",
        "write_paused",
    )

    def __init__(self, server: ServerState, url_scheme: str = "http") -> None:
        self.server = server
        self.config = server.config
        self.url_scheme = url_scheme
        self.loop = asyncio.get_running_loop()
        self.conn = ServerConnection(server.limits, server.server_header)
        self.transport: asyncio.Transport | None = None
        #: The connection's state, and since when (``server.clock``; None until the timeout
        #: sweep first sees a READING_HEAD connection).
        self.state = IDLE
        self.state_since: float | None = None
        #: The request being served (IN_FLIGHT, SENDING_FILE, or closing after it).
        self.cycle: RequestCycle | None = None
        self.file_sender: FileSender | None = None
        self.client = "-"
        self.base_environ: dict[str, Any] = {}
        self.remote: tuple[str, str] | None = None  # (REMOTE_ADDR, REMOTE_PORT)
        self.can_sendfile = False
        self.proxy_headers: ProxyHeaders | None = None
        self._proxy_reader: ProxyProtocolReader | None = None
        #: The client half-closed (sent EOF).
        self.peer_eof = False
        #: A response has been completed on this connection (keep-alive).
        self.served = False
        #: Between the transport's pause_writing() and resume_writing().
        self.write_paused = False
        self._reading_paused_by = 0
        #: Bytes passed to the transport or sent by sendfile, over the connection's life.
        self.bytes_written = 0
        # Seen by the timeout sweep: the unsent output and the bytes drained at the last check,
        # and since when none has drained.
        self.stall_size = 0
        self.stall_drained = 0
        self.stall_since = 0.0

    def set_state(self, state: ConnState, since: float | None = None) -> None:
        """Move to ``state``, entered at ``since`` (``server.clock()``), if that move is allowed.

        Raises:
            RuntimeError: the move is not in :data:`~asyncwsgi.connstate.TRANSITIONS` (a bug).
        """
        if state not in TRANSITIONS[self.state]:
            raise RuntimeError(f"connection cannot go from {self.state.name} to {state.name}")
        self.state = state
        self.state_since = since
        if state in QUIESCENT and self.server.idle_changed is not None:
            self.server.idle_changed.set()

    @property
    def closing(self) -> bool:
        """Whether the connection is going away (LINGERING, CLOSING or CLOSED)."""
        return self.state in ENDING

    @property
    def lingering(self) -> bool:
        """Whether the connection is in a lingering close."""
        return self.state is LINGERING

    @property
    def in_flight(self) -> bool:
        """Whether a request is being served on this connection (and it is not closing)."""
        return self.cycle is not None and self.state not in ENDING

    @property
    def idle_after_response(self) -> bool:
        """Whether the connection waits for its next request after serving one, with no byte of
        it received: closing it loses nothing a client does not retry (RFC 9112 section 9.3.1).
        A new connection that has sent nothing yet is not: its request is usually in flight."""
        return self.served and self.state is IDLE

    # -- a connection arrives ----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Record addresses, build the listener's base environ, start the idle clock."""
        # uvloop's transports implement asyncio.Transport without subclassing it.
        transport = typing.cast(asyncio.Transport, transport)
        self.transport = transport
        config = self.config
        server = self.server
        peer = transport.get_extra_info("peername")
        sockname = transport.get_extra_info("sockname")
        if isinstance(peer, tuple):
            peer_host: str | None = str(peer[0])
            self.remote = (str(peer[0]), str(int(peer[1])))
            self.client = f"{peer[0]}:{peer[1]}"
        else:
            peer_host = None
            self.client = "unix"
        address = (
            (str(sockname[0]), int(sockname[1]))
            if isinstance(sockname, tuple)
            else (str(sockname or ""), 0)
        )
        # The keys every connection of this listener shares live in one dict; the client's
        # address is added per request (``remote``), which saves a dict per idle connection.
        key = (address, self.url_scheme)
        base = server.base_environs.get(key)
        if base is None:
            base = connection_environ(
                server=address,
                url_scheme=self.url_scheme,
                root_path=config.root_path,
                multiprocess=server.multiprocess,
            )
            if config.expose_tracebacks:
                base["asyncwsgi.expose_tracebacks"] = True
            server.base_environs[key] = base
        self.base_environ = base
        self.proxy_headers, self._proxy_reader = server.proxy.for_peer(peer_host)
        self.can_sendfile = (
            transport.get_extra_info("sslcontext") is None
            and transport.get_extra_info("socket") is not None
        )
        self.sink_high_water = server.sink_high_water
        transport.set_write_buffer_limits(high=server.transport_high_water)
        self.state_since = server.clock()
        channels = server.channels
        channels.add(self)
        limit = config.limit_max_connections
        if limit and len(channels) >= limit:
            if len(channels) > limit:
                # Accepted in the same burst as the one that reached the limit.
                self.abort()
            elif server.on_connections_full is not None:
                server.on_connections_full()

    # -- bytes in ------------------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        """Parse what arrived; start, feed or reject requests."""
        state = self.state
        if state is LINGERING:
            return  # discarded: the response has gone out, the connection is closing
        if state is IDLE or state is WRITE_PAUSED:
            self.set_state(READING_HEAD)
        if self._proxy_reader is not None:
            rest = self._read_proxy_header(data)
            if not rest:
                return
            data = rest
        try:
            events = self.conn.receive_data(data)
        except RequestRejected as exc:
            self.reject(exc)
            return
        self.handle_events(events)

    def _read_proxy_header(self, data: bytes) -> bytes | None:
        """Collect the PROXY protocol header; return the bytes after it once it is complete."""
        reader = self._proxy_reader
        assert reader is not None
        try:
            rest = reader.feed(data)
        except ProxyProtocolError as exc:
            self._proxy_reader = None
            self.reject(RequestRejected(400, f"invalid PROXY protocol header: {exc}"))
            return None
        if rest is None:
            return None
        self._proxy_reader = None
        source = reader.info.source if reader.info is not None else None
        if source is not None:
            self.remote = (source[0], str(source[1]))
            self.client = f"{source[0]}:{source[1]}"
            # The HTTP sender is now the client, trusted with headers only if listed itself.
            self.proxy_headers = self.server.proxy.headers_for(source[0])
        return rest

    def eof_received(self) -> bool:
        """The client half-closed: finish the request in flight, if any, then close.

        Over TLS there is no half-close (the TLS transport closes itself after this returns,
        and warns if it returned True).
        """
        if self.state is LINGERING:
            return False  # the client has read the response and closed: close too
        self.peer_eof = True
        cycle = self.cycle
        if cycle is not None and cycle.sink is not None:
            cycle.sink.peer_closed = True
        keep_open = self.url_scheme != "https"
        try:
            events = self.conn.receive_data(b"")
        except RequestRejected as exc:
            self.reject(exc)
            return keep_open
        self.handle_events(events)
        return keep_open

    def handle_events(self, events: list[Any]) -> None:
        """Act on parsed events; submit a new request to the pool once its head is complete."""
        for event in events:
            kind = type(event)
            if kind is Data:
                self._on_body_data(event.data)
            elif kind is Request:
                self.cycle = RequestCycle(event, time.perf_counter())
            elif kind is EndOfMessage:
                cycle = self.cycle
                assert cycle is not None
                cycle.body_complete = True
                if cycle.body is not None:
                    cycle.body.feed_eof()
            elif event is PAUSED:
                self._pause_reading(_PAUSE_PIPELINE)
            elif kind is ConnectionClosed:
                self._on_peer_closed()
        cycle = self.cycle
        if cycle is not None and cycle.sink is None and self.state not in ENDING:
            self._dispatch(cycle)

    def _on_body_data(self, data: bytes | bytearray) -> None:
        cycle = self.cycle
        assert cycle is not None
        if cycle.body is None:
            cycle.chunks.append(data)
        elif cycle.body.feed(data):
            self._pause_reading(_PAUSE_BODY)

    def _on_peer_closed(self) -> None:
        cycle = self.cycle
        if cycle is None:
            self.close()
        elif not cycle.body_complete and cycle.body is not None:
            cycle.body.disconnect("client closed the connection before the body was complete")

    # -- dispatch --------------------------------------------------------------------------------

    def _dispatch(self, cycle: RequestCycle) -> None:
        """Build the environ and submit the request to the thread pool.

        Over ``--limit-concurrency`` the request is answered 503 here instead; the
        ``--health-path`` is answered here, before that limit.
        """
        config = self.config
        server = self.server
        self.set_state(IN_FLIGHT)
        if server.health_target is not None and cycle.request.target == server.health_target:
            self._answer_health(cycle)
            return
        limit = config.limit_concurrency
        if limit and server.requests_active >= limit:
            self._overloaded(cycle)
            return
        server.requests_active += 1
        if server.max_requests:
            server.count_request()
        call = self.loop.call_soon_threadsafe
        if cycle.body_complete:
            chunks = cycle.chunks
            body: Any = (
                EMPTY_BODY
                if not chunks
                else io.BytesIO(chunks[0] if len(chunks) == 1 else b"".join(chunks))
            )
        else:
            body = cycle.body = RequestBody(
                call,
                self,
                config.read_high_water,
                self.conn.they_are_waiting_for_100_continue,
                config.timeout_read,
            )
            for chunk in cycle.chunks:
                if body.feed(chunk):
                    self._pause_reading(_PAUSE_BODY)
        cycle.chunks = []
        environ = cycle.environ = build_environ(self.base_environ, cycle.request, body)
        remote = self.remote
        if remote is not None:
            environ["REMOTE_ADDR"], environ["REMOTE_PORT"] = remote
        if self.proxy_headers is not None:
            self.proxy_headers.apply(environ)
        sink = cycle.sink = ResponseSink(
            call,
            self,
            self.sink_high_water,
            config.timeout_write,
            self.can_sendfile,
        )
        if self.write_paused:
            sink.pause()
        environ["asyncwsgi.client_disconnected"] = sink.client_disconnected
        server.pool.submit(
            run_wsgi,
            server.app,
            environ,
            sink,
            cycle.started,
            config.timeout_queue,
            config.timeout_request,
        )

    # -- BodyTarget: asked by the pool thread through call_soon_threadsafe ----------------------

    def send_continue(self) -> None:
        """Send ``100 Continue`` if the client still waits for it (the app began reading)."""
        if self.state not in ENDING and self.conn.they_are_waiting_for_100_continue:
            self._write(self.conn.send_continue())

    def resume_body(self) -> None:
        """The app consumed buffered body bytes: read the socket again."""
        self._resume_reading(_PAUSE_BODY)

    # -- the response side (asyncwsgi.response), bound here as methods ------------------------

    # ResponseTarget: the response, from the pool thread through call_soon_threadsafe.
    on_response_data = response.on_response_data
    on_response_file = response.on_response_file
    on_file_sent = response.on_file_sent
    on_response_abort = response.on_response_abort
    _end_file_response = response.end_file_response
    _close_in_pool = response.close_in_pool
    _write = response.write
    _log_access = response.log_access
    _request_line = response.request_line
    # The error responses the server makes itself.
    reject = response.reject
    _answer = response.answer
    _overloaded = response.overloaded
    _answer_health = response.answer_health
    head_timeout = response.head_timeout
    request_timeout = response.request_timeout

    # -- end of the exchange ------------------------------------------------------------------

    def _end_response(self, cycle: RequestCycle, tail: bytes | None) -> None:
        """Finish the cycle; ``tail`` None means the body fell short of its Content-Length."""
        if tail is None:
            error_logger.error(
                "Response to %s is shorter than its Content-Length; closing the connection",
                self._request_line(cycle),
            )
        self._finish_cycle(cycle, keep_alive=tail is not None)

    def _finish_cycle(self, cycle: RequestCycle, keep_alive: bool) -> None:
        """Log the access line, then start the next keep-alive cycle or close."""
        server = self.server
        server.requests_done += 1
        if server.metrics is not None:
            server.metrics.request_done(cycle)
        if access_logger.isEnabledFor(logging.INFO):
            self._log_access(cycle)
        self.cycle = None
        if cycle.sink is not None:
            server.requests_active -= 1
        conn = self.conn
        if conn.bytes_discarded:
            error_logger.error(
                "Response to %s is longer than its Content-Length; %d bytes were not sent",
                self._request_line(cycle),
                conn.bytes_discarded,
            )
            conn.bytes_discarded = 0
        if not keep_alive or not conn.keep_alive or server.shutting_down:
            self._close_after_response(cycle.request.asks_to_close())
            return
        conn.start_next_cycle()
        self.served = True
        if self.write_paused:
            # The client has not read what it was sent: its next request (pipelined, or still
            # in the socket) waits until the buffer drains, or the memory of one connection
            # would grow with every request it pipelines.
            self.set_state(WRITE_PAUSED)
            self._pause_reading(_PAUSE_WRITE)
            self._resume_reading(_PAUSE_PIPELINE | _PAUSE_BODY)
            return
        self._resume_reading(_PAUSE_PIPELINE | _PAUSE_BODY)
        self._next_request()

    def _next_request(self) -> None:
        """Wait for the next request on a keep-alive connection; start one already received."""
        conn = self.conn
        self.set_state(IDLE, self.server.clock())
        if not conn.has_unparsed_data and not self.peer_eof:
            return  # the usual case: nothing of a next request yet, nothing to parse
        try:
            events = conn.next_events()
        except RequestRejected as exc:
            self.reject(exc)
            return
        if events:
            self.set_state(READING_HEAD)
            self.handle_events(events)

    # -- flow control ---------------------------------------------------------------------------

    def pause_writing(self) -> None:
        """The transport's buffer is over ``write_high_water``: make the pool thread wait.

        asyncio and uvloop call this once, when the buffer crosses the mark, not once per
        request: the channel keeps the fact, so that a sink made later starts paused and the
        next pipelined request is not started until :meth:`resume_writing`.
        """
        self.write_paused = True
        cycle = self.cycle
        if cycle is not None and cycle.sink is not None:
            cycle.sink.pause()

    def resume_writing(self) -> None:
        """The transport's buffer drained: let the pool thread go on, or start the next request."""
        self.write_paused = False
        cycle = self.cycle
        if cycle is not None and cycle.sink is not None:
            cycle.sink.resume()
        if self._reading_paused_by & _PAUSE_WRITE:
            self._resume_reading(_PAUSE_WRITE)
        if self.state is WRITE_PAUSED:
            self._next_request()

    def _pause_reading(self, reason: int) -> None:
        if not self._reading_paused_by and self.transport is not None and not self.closing:
            self.transport.pause_reading()
        self._reading_paused_by |= reason

    def _resume_reading(self, reasons: int) -> None:
        if self._reading_paused_by:
            self._reading_paused_by &= ~reasons
            if not self._reading_paused_by and self.transport is not None and not self.closing:
                self.transport.resume_reading()

    # -- closing ----------------------------------------------------------------------------------

    def _close_after_response(self, client_closes: bool = True) -> None:
        """Close; linger first when the client may still be sending.

        Closing a socket with unread input makes the kernel send a reset, which can destroy
        the response before the client has read it (RFC 9112 section 9.6). ``client_closes``
        False: the server, not the request, ends a keep-alive connection (a graceful shutdown,
        ``--max-requests``, an error), so the client may send its next request before it reads
        ``Connection: close``: linger.
        """
        if self.state in ENDING:
            return
        if self.peer_eof or (
            client_closes
            and not self._reading_paused_by
            and self.conn.their_state in _REQUEST_RECEIVED
        ):
            self.close()
        else:
            self._linger()

    def _linger(self) -> None:
        """Half-close, then read and discard input until the client closes or for
        ``timeout_linger`` seconds after the output has drained (nginx's lingering close)."""
        transport = self.transport
        if transport is None or self.config.timeout_linger <= 0:
            self.close()
            return
        self.set_state(LINGERING, self.server.clock())
        if transport.can_write_eof():
            transport.write_eof()  # after the buffered output, as shutdown(SHUT_WR)
        if self._reading_paused_by:
            self._reading_paused_by = 0
            transport.resume_reading()

    def close(self) -> None:
        """Close after the buffered output is written (a lingering close goes on lingering)."""
        if self.state not in ENDING:
            self.set_state(CLOSING)
            if self.transport is not None:
                self.transport.close()

    def abort(self) -> None:
        """Close at once, dropping buffered output."""
        if self.state is not CLOSED:
            self.set_state(CLOSING)
        if self.transport is not None:
            self.transport.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        """Release everything: wake the pool thread (its next send raises), stop any sendfile."""
        server = self.server
        channels = server.channels
        channels.discard(self)
        cycle = self.cycle
        sender = self.file_sender
        self.set_state(CLOSED)
        if cycle is not None:
            if cycle.sink is not None:
                server.requests_active -= 1
                # The sink first: a pool thread woken by the body's error finds it disconnected.
                cycle.sink.disconnect()
            if cycle.body is not None:
                cycle.body.disconnect()
        if sender is not None:
            sender.cancel()
        limit = self.config.limit_max_connections
        if limit and len(channels) < limit and server.on_connections_room is not None:
            server.on_connections_room()

    def check_timeouts(self, now: float, perf_now: float) -> None:
        """Enforce the timeout of the connection's state (the server's sweep calls it).

        Args:
            now: ``server.clock()``, in seconds.
            perf_now: ``time.perf_counter()``, the clock of request start times.
        """
        self.server.timeouts.check(self, now, perf_now)
