"""HTTPChannel: one connection, on the event loop.

The channel is the sole owner of its transport: it reads, writes and closes. It feeds received
bytes to a sans-IO :class:`~asyncwsgi.http11.ServerConnection`, hands each complete request head
to the thread pool (:func:`~asyncwsgi.wsgi.run_wsgi`), and writes what the worker hands back
through the :class:`~asyncwsgi.bridge.ResponseSink`. One request is in flight at a time; pipelined
requests wait in h11's buffer (reading pauses) until the response before them is complete.

Every method here runs on the loop thread. A connection without a request in flight holds no
thread: it is only this object and its transport.
"""

from __future__ import annotations

import asyncio
import io
import logging
import os
import time
import typing
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import h11

from .accesslog import AccessEntry, AccessFormat
from .bridge import EMPTY_BODY, Head, RequestBody, ResponseSink, WorkerPool
from .config import Config
from .environ import build_environ, connection_environ
from .errors import RequestRejected
from .filewrapper import FileWrapper
from .http11 import PAUSED, ServerConnection, reason_phrase
from .logs import access_logger, error_logger, escape
from .proxy import ProxyHeaders, ProxyProtocolError, ProxyProtocolReader, ProxySupport
from .wsgi import RETRY_AFTER, LogThrottle, run_wsgi

if TYPE_CHECKING:
    from ._types import WSGIApplication

__all__ = ["HTTPChannel", "ServerState"]

# Responses up to this many body bytes are joined into one write.
_JOIN_BELOW = 16 * 1024
# Body blocks handed over together, up to this many bytes, are framed and written as one.
_MERGE_BELOW = 512 * 1024

# Bytes sendfile(2) sends per writable event before the loop runs its other callbacks (nginx's
# sendfile_max_chunk): a fast reader of a large file must not keep other connections waiting.
_SENDFILE_MAX_CHUNK = 1024 * 1024

# Reasons reading is paused; reading resumes when none is left.
_PAUSE_PIPELINE = 1
_PAUSE_BODY = 2
# The transport's buffer is over write_high_water: the next request waits (see pause_writing).
_PAUSE_WRITE = 4


def _half_high_water(config: Config) -> int:
    """Bytes of ``write_high_water`` for each of the two places unsent output waits.

    Output waits in the transport's buffer, and in the :class:`ResponseSink` between the worker
    and the loop. Each gets half of the mark: the worker stops handing over above its half, the
    transport pauses the worker (and the next request) above its own, so a connection holds at
    most ``write_high_water`` bytes plus the block handed over last.
    """
    return max(1, config.write_high_water // 2)


class ServerState:
    """What every connection of one server shares. Loop thread only.

    Attributes:
        config: the server's configuration.
        app: the WSGI application.
        pool: the worker threads that run the application.
        channels: the open connections.
        date_header: the current ``(b"date", ...)`` pair, refreshed every second by the server,
            or None when ``config.date_header`` is off.
        server_header: the ``(b"Server", b"asyncwsgi")`` pair, or None.
        shutting_down: set when a graceful shutdown has begun (no new keep-alive cycles).
        multiprocess: ``wsgi.multiprocess``.
        requests_active: requests handed to the pool whose response has not ended (running or
            waiting for a thread), for ``--limit-concurrency``.
        on_connections_full: called when ``--limit-max-connections`` connections are open
            (the server stops accepting); ``on_connections_room`` when one of them closed.
        overload_log: throttles the warnings about overload.
    """

    def __init__(
        self, config: Config, app: WSGIApplication, pool: WorkerPool, multiprocess: bool = False
    ) -> None:
        self.config = config
        self.app = app
        self.pool = pool
        self.channels: set[HTTPChannel] = set()
        self.date_header: tuple[bytes, bytes] | None = None
        self.server_header: tuple[bytes, bytes] | None = (
            (b"Server", b"asyncwsgi") if config.server_header else None
        )
        self.shutting_down = False
        self.multiprocess = multiprocess
        #: The environ keys shared by every connection of a listener, by (address, scheme).
        self.base_environs: dict[tuple[tuple[str, int], str], dict[str, Any]] = {}
        self.requests_active = 0
        self.on_connections_full: Callable[[], None] | None = None
        self.on_connections_room: Callable[[], None] | None = None
        self.overload_log = LogThrottle()
        #: Responses completed, for ``--max-requests``.
        self.requests_done = 0
        #: ``--max-requests`` for this process (0: none), and what to call when it is reached.
        self.max_requests = 0
        self.on_max_requests: Callable[[], None] | None = None
        self.idle_changed: asyncio.Event | None = None
        #: Forwarded headers and the PROXY protocol (asyncwsgi.proxy).
        self.proxy = ProxySupport(config)
        #: The compiled --access-logformat / --access-log-json, or None for the built-in line.
        self.access_format = (
            AccessFormat(config.access_logformat, json=config.access_log_json)
            if config.access_logformat is not None or config.access_log_json
            else None
        )
        self.refresh_date()

    def count_request(self) -> None:
        """A request was accepted; the one that reaches ``max_requests`` (counting those done
        and those in flight) is the last: every response from now on carries
        ``Connection: close``, and ``on_max_requests`` stops the server from accepting."""
        limit = self.max_requests
        if limit and not self.shutting_down and self.requests_done + self.requests_active >= limit:
            self.shutting_down = True
            if self.on_max_requests is not None:
                self.on_max_requests()

    def refresh_date(self) -> None:
        """Recompute the Date header (RFC 9110 section 5.6.7 IMF-fixdate), at most once a second."""
        if self.config.date_header:
            now = time.time()
            self.date_header = (
                b"Date",
                time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(now)).encode("ascii"),
            )


class _Cycle:
    """One request/response exchange on a connection. Loop thread only."""

    __slots__ = (
        "body",
        "body_complete",
        "chunks",
        "environ",
        "file_sender",
        "request",
        "response_headers",
        "sink",
        "started",
        "status",
    )

    def __init__(self, request: h11.Request, started: float) -> None:
        self.request = request
        self.chunks: list[bytes | bytearray] = []
        self.body: RequestBody | None = None
        self.body_complete = False
        self.sink: ResponseSink | None = None
        self.started = started
        self.status = 0
        self.file_sender: _FileSender | None = None
        self.environ: dict[str, Any] | None = None
        self.response_headers: list[tuple[bytes, bytes]] | None = None


class HTTPChannel(asyncio.Protocol):
    """The asyncio protocol of one HTTP/1.1 connection. Loop thread only.

    Args:
        state: shared server state.
        url_scheme: ``http`` or ``https`` for this listener.
    """

    # No per-connection __dict__: an idle keep-alive connection should cost a few KiB at most.
    __slots__ = (
        "_head_since",
        "_linger_since",
        "_paused",
        "_peer_eof",
        "_proxy_reader",
        "_stall_drained",
        "_stall_since",
        "_stall_size",
        "_write_paused",
        "_written",
        "base_environ",
        "can_sendfile",
        "client",
        "closing",
        "config",
        "conn",
        "cycle",
        "idle_since",
        "lingering",
        "loop",
        "proxy_headers",
        "remote",
        "served",
        "state",
        "transport",
        "url_scheme",
    )

    def __init__(self, state: ServerState, url_scheme: str = "http") -> None:
        self.state = state
        self.config = state.config
        self.url_scheme = url_scheme
        self.loop = asyncio.get_running_loop()
        self.conn = ServerConnection(state.config, state.server_header)
        self.transport: asyncio.Transport | None = None
        self.cycle: _Cycle | None = None
        self.client = "-"
        self.base_environ: dict[str, Any] = {}
        self.remote: tuple[str, str] | None = None  # (REMOTE_ADDR, REMOTE_PORT)
        self.can_sendfile = False
        self.proxy_headers: ProxyHeaders | None = None
        self._proxy_reader: ProxyProtocolReader | None = None
        self.closing = False
        #: Loop time since which the connection waits for a request with no byte of it yet.
        self.idle_since: float | None = None
        #: Whether a response has been completed on this connection (keep-alive).
        self.served = False
        #: Closing, but reading and discarding what the client still sends (see _linger).
        self.lingering = False
        self._linger_since = 0.0
        self._peer_eof = False
        # Sweep-observed: since when a request head has been incomplete; the unsent output and
        # the bytes drained at the last sweep, and since when none has drained.
        self._head_since: float | None = None
        self._stall_size = 0
        self._stall_drained = 0
        self._stall_since = 0.0
        #: Bytes handed to the transport, and sent by sendfile, over the connection's life.
        self._written = 0
        self._paused = 0
        #: Between the transport's pause_writing() and resume_writing().
        self._write_paused = False

    # -- asyncio.Protocol callbacks --------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Record addresses, build the connection's base environ, start the idle clock."""
        # uvloop's transports implement asyncio.Transport without subclassing it.
        transport = typing.cast(asyncio.Transport, transport)
        self.transport = transport
        config = self.config
        peer = transport.get_extra_info("peername")
        sockname = transport.get_extra_info("sockname")
        if isinstance(peer, tuple):
            peer_pair: tuple[str, int] | None = (str(peer[0]), int(peer[1]))
            self.client = f"{peer[0]}:{peer[1]}"
        else:
            peer_pair = None
            self.client = "unix"
        server = (
            (str(sockname[0]), int(sockname[1]))
            if isinstance(sockname, tuple)
            else (str(sockname or ""), 0)
        )
        # The keys every connection of this listener shares live in one dict; the client's
        # address is added per request (``remote``), which saves a dict per idle connection.
        key = (server, self.url_scheme)
        base = self.state.base_environs.get(key)
        if base is None:
            base = connection_environ(
                server=server,
                peer=None,
                url_scheme=self.url_scheme,
                root_path=config.root_path,
                multiprocess=self.state.multiprocess,
            )
            if config.expose_tracebacks:
                base["asyncwsgi.expose_tracebacks"] = True
            self.state.base_environs[key] = base
        self.base_environ = base
        if peer_pair is not None:
            self.remote = (peer_pair[0], str(peer_pair[1]))
        self.proxy_headers, self._proxy_reader = self.state.proxy.for_peer(
            peer_pair[0] if peer_pair is not None else None
        )
        self.can_sendfile = (
            transport.get_extra_info("sslcontext") is None
            and transport.get_extra_info("socket") is not None
        )
        transport.set_write_buffer_limits(high=_half_high_water(config))
        self.idle_since = self.loop.time()
        channels = self.state.channels
        channels.add(self)
        limit = config.limit_max_connections
        if limit and len(channels) >= limit:
            if len(channels) > limit:
                # Accepted in the same burst as the one that reached the limit.
                self.abort()
            elif self.state.on_connections_full is not None:
                self.state.on_connections_full()

    def data_received(self, data: bytes) -> None:
        """Parse what arrived; start, feed or reject requests."""
        if self.lingering:
            return  # discarded: the response has gone out, the connection is closing
        self.idle_since = None
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
            self.proxy_headers = self.state.proxy.headers_for(source[0])
        return rest

    def eof_received(self) -> bool:
        """The client half-closed: finish the request in flight, if any, then close.

        Over TLS there is no half-close (the TLS transport closes itself after this returns,
        and warns if it returned True).
        """
        if self.lingering:
            return False  # the client has read the response and closed: close too
        self._peer_eof = True
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

    def connection_lost(self, exc: Exception | None) -> None:
        """Release everything: wake the worker (its next hand-off raises), stop any sendfile."""
        self.closing = True
        state = self.state
        channels = state.channels
        channels.discard(self)
        cycle = self.cycle
        if cycle is not None:
            if cycle.sink is not None:
                state.requests_active -= 1
                # The sink first: a worker woken by the body's error finds it disconnected.
                cycle.sink.disconnect()
            if cycle.body is not None:
                cycle.body.disconnect()
            if cycle.file_sender is not None:
                cycle.file_sender.cancel()
        limit = self.config.limit_max_connections
        if limit and len(channels) < limit and state.on_connections_room is not None:
            state.on_connections_room()
        self._notify_idle()

    def pause_writing(self) -> None:
        """The transport's buffer is over ``write_high_water``: make the worker wait.

        asyncio and uvloop call this once, when the buffer crosses the mark, not once per
        request: the channel keeps the state, so that a sink made later starts paused and the
        next pipelined request is not started until :meth:`resume_writing`.
        """
        self._write_paused = True
        cycle = self.cycle
        if cycle is not None and cycle.sink is not None:
            cycle.sink.pause()

    def resume_writing(self) -> None:
        """The transport's buffer drained: let the worker go on, or start the next request."""
        self._write_paused = False
        cycle = self.cycle
        if cycle is not None and cycle.sink is not None:
            cycle.sink.resume()
        if self._paused & _PAUSE_WRITE and cycle is None and not self.closing:
            self._resume_reading(_PAUSE_WRITE)
            self._next_request()

    # -- requests --------------------------------------------------------------------------

    def handle_events(self, events: list[Any]) -> None:
        """Act on parsed events; hand a new request to the pool once its head is complete."""
        for event in events:
            kind = type(event)
            if kind is h11.Data:
                self._on_body_data(event.data)  # h11 hands over a new bytearray: no copy
            elif kind is h11.Request:
                self.cycle = _Cycle(event, time.perf_counter())
            elif kind is h11.EndOfMessage:
                cycle = self.cycle
                assert cycle is not None
                cycle.body_complete = True
                if cycle.body is not None:
                    cycle.body.feed_eof()
            elif event is PAUSED:
                self._pause_reading(_PAUSE_PIPELINE)
            elif kind is h11.ConnectionClosed:
                self._on_peer_closed()
        cycle = self.cycle
        if cycle is not None and cycle.sink is None and not self.closing:
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

    def _dispatch(self, cycle: _Cycle) -> None:
        """Build the environ and submit the request to the thread pool (one crossing).

        Over ``--limit-concurrency`` the request is answered 503 here instead.
        """
        config = self.config
        state = self.state
        limit = config.limit_concurrency
        if limit and state.requests_active >= limit:
            self._overloaded(cycle)
            return
        state.requests_active += 1
        state.count_request()
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
            call, self, _half_high_water(config), config.timeout_write, self.can_sendfile
        )
        if self._write_paused:
            sink.pause()
        environ["asyncwsgi.client_disconnected"] = sink.client_disconnected
        state.pool.submit(run_wsgi, state.app, environ, sink, cycle.started, config.timeout_queue)

    # -- BodyTarget: asked by the worker through call_soon_threadsafe ------------------------------

    def send_continue(self) -> None:
        """Send ``100 Continue`` if the client still waits for it (the app began reading)."""
        if not self.closing and self.conn.they_are_waiting_for_100_continue:
            assert self.transport is not None
            data = self.conn.send_continue()
            self._written += len(data)
            self.transport.write(data)

    def resume_body(self) -> None:
        """The app consumed buffered body bytes: read the socket again."""
        self._resume_reading(_PAUSE_BODY)

    # -- ResponseTarget: handed over by the worker through call_soon_threadsafe -----------------

    def on_response_data(
        self, sink: ResponseSink, head: Head | None, chunks: list[bytes], end: bool
    ) -> None:
        """Write the head and body chunks from the worker; finish the cycle at the end."""
        cycle = self.cycle
        if self.closing or cycle is None or cycle.sink is not sink:
            return
        conn = self.conn
        out: list[Any] = []
        nbytes = 0
        for chunk in chunks:
            nbytes += len(chunk)
        try:
            if head is not None:
                status, reason, headers = head
                cycle.status = status
                cycle.response_headers = headers
                out.append(
                    conn.send_response(
                        status,
                        reason,
                        headers,
                        self.state.date_header,
                        nbytes if end else None,
                        close=self.state.shutting_down,
                    )
                )
            if len(chunks) > 1 and nbytes <= _MERGE_BELOW:
                # Blocks the app yielded since the last hand-off go out as one HTTP chunk (or
                # one piece of a Content-Length body): one copy costs less than h11 framing
                # each block. PEP 3333 asks that no block be held back, not that each keep its
                # own chunk.
                out.extend(conn.send_data(b"".join(chunks)))
            else:
                for chunk in chunks:
                    out.extend(conn.send_data(chunk))
            tail = conn.send_end() if end else b""
        except h11.LocalProtocolError as exc:
            error_logger.error("Invalid response to %s: %s", self._request_line(cycle), exc)
            self.abort()
            return
        if tail:
            out.append(tail)
        transport = self.transport
        assert transport is not None
        self._written += sum(map(len, out))
        if len(out) == 1:
            transport.write(out[0])
        elif nbytes <= _JOIN_BELOW:
            transport.write(b"".join(out))  # one small copy beats a vectored write here
        elif out:
            transport.writelines(out)
        sink.written(nbytes)
        if end:
            self._end_response(cycle, tail)

    def on_response_file(
        self, sink: ResponseSink, head: Head, wrapper: FileWrapper, offset: int, count: int
    ) -> None:
        """Write the head, then send the file by sendfile(2) from the loop."""
        cycle = self.cycle
        if self.closing or cycle is None or cycle.sink is not sink:
            self._close_in_worker(wrapper)
            return
        conn = self.conn
        status, reason, headers = head
        cycle.status = status
        cycle.response_headers = headers
        try:
            transport = self.transport
            assert transport is not None
            data = conn.send_response(
                status,
                reason,
                headers,
                self.state.date_header,
                count,
                close=self.state.shutting_down,
            )
            self._written += len(data)
            transport.write(data)
            left = conn.bytes_left
            count = min(count, left if left is not None else count)
            if count:
                pieces = conn.send_file_placeholder(count)
                assert not pieces  # Content-Length framing: nothing around the file bytes
        except h11.LocalProtocolError as exc:
            error_logger.error("Invalid response to %s: %s", self._request_line(cycle), exc)
            self._close_in_worker(wrapper)
            self.abort()
            return
        if not count:
            self._close_in_worker(wrapper)
            self._end_file_response(cycle)
            return
        sender = cycle.file_sender = _FileSender(self, wrapper, offset, count)
        sender.start()

    def on_file_sent(self, sender: _FileSender, error: OSError | None) -> None:
        """The sendfile of ``sender`` finished (``error`` is None) or failed."""
        cycle = self.cycle
        self._close_in_worker(sender.wrapper)
        if cycle is None or cycle.file_sender is not sender or self.closing:
            return
        cycle.file_sender = None
        if error is not None:
            if isinstance(error, ConnectionError):  # the client went away: not a server error
                error_logger.debug("client disconnected during %s", self._request_line(cycle))
            else:
                error_logger.error("sendfile failed for %s: %s", self._request_line(cycle), error)
            self.abort()
            return
        if sender.left:
            # The file shrank after its size was taken: sendfile(2) found its end early. The
            # Content-Length promised more, so the connection must close after what was sent.
            self._end_response(cycle, None)
            return
        self._end_file_response(cycle)

    def _end_file_response(self, cycle: _Cycle) -> None:
        tail = self.conn.send_end()
        if tail:
            assert self.transport is not None
            self._written += len(tail)
            self.transport.write(tail)
        self._end_response(cycle, tail)

    def _end_response(self, cycle: _Cycle, tail: bytes | None) -> None:
        """Finish the cycle; ``tail`` None means the body fell short of its Content-Length."""
        if tail is None:
            error_logger.error(
                "Response to %s is shorter than its Content-Length; closing the connection",
                self._request_line(cycle),
            )
            self._finish_cycle(cycle, keep_alive=False)
        else:
            self._finish_cycle(cycle, keep_alive=True)

    def on_response_abort(self, sink: ResponseSink) -> None:
        """The app failed after its head went out: cut the connection (RFC 9112 section 9.6)."""
        cycle = self.cycle
        if cycle is not None and cycle.sink is sink:
            self.abort()

    def _close_in_worker(self, wrapper: FileWrapper) -> None:
        """Run ``wrapper.close()`` in the pool: it may be app code (Django's response.close)."""
        self.state.pool.submit(_close_quietly, wrapper)

    # -- end of a cycle ----------------------------------------------------------------------

    def _finish_cycle(self, cycle: _Cycle, keep_alive: bool) -> None:
        """Log the access line, then start the next keep-alive cycle or close."""
        self.state.requests_done += 1
        if access_logger.isEnabledFor(logging.INFO):
            self._log_access(cycle)
        self.cycle = None
        if cycle.sink is not None:
            self.state.requests_active -= 1
        self._head_since = None
        conn = self.conn
        if conn.bytes_discarded:
            error_logger.error(
                "Response to %s is longer than its Content-Length; %d bytes were not sent",
                self._request_line(cycle),
                conn.bytes_discarded,
            )
            conn.bytes_discarded = 0
        if not keep_alive or not conn.keep_alive or self.state.shutting_down:
            self._close_after_response()
            return
        conn.start_next_cycle()
        self.served = True
        if self._write_paused:
            # The client has not read what it was sent: its next request (pipelined, or still
            # in the socket) waits until the buffer drains, or the memory of one connection
            # would grow with every request it pipelines.
            self._pause_reading(_PAUSE_WRITE)
            self._resume_reading(_PAUSE_PIPELINE | _PAUSE_BODY)
            return
        self._resume_reading(_PAUSE_PIPELINE | _PAUSE_BODY)
        self._next_request()

    def _next_request(self) -> None:
        """Wait for the next request on a keep-alive connection; start one already received."""
        conn = self.conn
        self.idle_since = self.loop.time()
        self._notify_idle()
        if not conn.has_unparsed_data and not self._peer_eof:
            return  # the usual case: nothing of a next request yet, h11 has nothing to say
        try:
            events = conn.next_events()
        except RequestRejected as exc:
            self.reject(exc)
            return
        if events:
            self.idle_since = None
            self.handle_events(events)

    def _log_access(self, cycle: _Cycle) -> None:
        request = cycle.request
        access_format = self.state.access_format
        if access_format is not None:
            access_logger.info(
                "%s",
                access_format.render(
                    AccessEntry(
                        self.client,
                        cycle.environ,
                        request.method,
                        request.target,
                        request.http_version,
                        request.headers,
                        cycle.status,
                        cycle.response_headers,
                        self.conn.body_bytes_sent,
                        time.perf_counter() - cycle.started,
                    )
                ),
            )
            return
        access_logger.info(
            '%s - "%s %s HTTP/%s" %d %d %.3fms',
            self.client,
            escape(request.method.decode("latin-1")),
            escape(request.target.decode("latin-1")),
            request.http_version.decode("latin-1"),
            cycle.status,
            self.conn.body_bytes_sent,
            (time.perf_counter() - cycle.started) * 1000.0,
        )

    def _request_line(self, cycle: _Cycle) -> str:
        request = cycle.request
        return escape(f"{request.method.decode('latin-1')} {request.target.decode('latin-1')}")

    def _notify_idle(self) -> None:
        event = self.state.idle_changed
        if event is not None:
            event.set()

    # -- errors, pausing and closing ---------------------------------------------------------

    def reject(self, exc: RequestRejected) -> None:
        """Answer a malformed or oversized request with its 4xx/5xx status and close."""
        error_logger.warning(
            "Invalid HTTP request from %s: %d %s", self.client, exc.status, escape(exc.reason)
        )
        cycle = self.cycle
        if cycle is not None:
            if cycle.sink is not None:
                cycle.sink.disconnect()
            if cycle.body is not None:
                cycle.body.disconnect("invalid request body")
        data = self.conn.send_rejection(exc.status, exc.reason, self.state.date_header)
        if data and self.transport is not None and not self.closing:
            self._written += len(data)
            self.transport.write(data)
        self._close_after_response()

    def _answer(self, cycle: _Cycle, status: int, *extra: tuple[bytes, bytes]) -> None:
        """Answer the request in flight with a short plain-text ``status``; then close."""
        reason = reason_phrase(status)
        body = b"%d %s\n" % (status, reason)
        headers = [(b"Content-Type", b"text/plain; charset=utf-8"), *extra]
        conn = self.conn
        try:
            out = [
                conn.send_response(
                    status, reason, headers, self.state.date_header, len(body), close=True
                )
            ]
            out.extend(conn.send_data(body))
            out.append(conn.send_end() or b"")
        except h11.LocalProtocolError:
            self.abort()  # a response had already begun: only cutting is left
            return
        cycle.status = status
        assert self.transport is not None
        data = b"".join(out)
        self._written += len(data)
        self.transport.write(data)
        self._finish_cycle(cycle, keep_alive=False)

    def _overloaded(self, cycle: _Cycle) -> None:
        """Answer 503 at once: ``--limit-concurrency`` requests are in progress."""
        state = self.state
        count = state.overload_log.ready()
        if count:
            error_logger.warning(
                "%d requests in progress (--limit-concurrency): answered 503 to %s "
                "(%d such request(s) since the last report)",
                state.requests_active,
                self._request_line(cycle),
                count,
            )
        self._answer(cycle, 503, (b"Retry-After", RETRY_AFTER))

    def _head_timeout(self) -> None:
        """Answer 408 to a request head not complete within ``timeout_request_header``."""
        if error_logger.isEnabledFor(logging.INFO):
            error_logger.info(
                "No complete request head from %s in %g s (--timeout-request-header): 408",
                self.client,
                self.config.timeout_request_header,
            )
        data = self.conn.send_rejection(
            408, "request head not complete in time", self.state.date_header
        )
        if data and self.transport is not None:
            self._written += len(data)
            self.transport.write(data)
        self._linger()  # the client may be sending the rest of its head

    def _request_timeout(self, cycle: _Cycle, sink: ResponseSink) -> None:
        """Answer 504: the app has not started its response within ``timeout_request``.

        The worker is not stopped (Python cannot): its next hand-off raises, so its output is
        discarded and its ``close()`` runs; a read of the body raises at once.
        """
        error_logger.error(
            "%s did not start its response in %g s (--timeout-request): answered 504; "
            "its output will be discarded",
            self._request_line(cycle),
            self.config.timeout_request,
        )
        sink.disconnect()
        if cycle.body is not None:
            cycle.body.disconnect("the request timed out")
        self._answer(cycle, 504)

    def _close_after_response(self) -> None:
        """Close; linger first when the client may still be sending.

        Closing a socket with unread input makes the kernel send a reset, which can destroy
        the response before the client has read it (RFC 9112 section 9.6).
        """
        if self.closing:
            return
        their_state = self.conn.h11_connection.their_state
        if self._peer_eof or (
            not self._paused and (their_state is h11.DONE or their_state is h11.MUST_CLOSE)
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
        self.closing = self.lingering = True
        self._linger_since = self.loop.time()
        if transport.can_write_eof():
            transport.write_eof()  # after the buffered output, as shutdown(SHUT_WR)
        if self._paused:
            self._paused = 0
            transport.resume_reading()
        self._notify_idle()

    def _pause_reading(self, reason: int) -> None:
        if not self._paused and self.transport is not None and not self.closing:
            self.transport.pause_reading()
        self._paused |= reason

    def _resume_reading(self, reasons: int) -> None:
        if self._paused:
            self._paused &= ~reasons
            if not self._paused and self.transport is not None and not self.closing:
                self.transport.resume_reading()

    def close(self) -> None:
        """Close after the buffered output is written."""
        if not self.closing:
            self.closing = True
            if self.transport is not None:
                self.transport.close()

    def abort(self) -> None:
        """Close at once, dropping buffered output."""
        self.closing = True
        if self.transport is not None:
            self.transport.abort()

    def check_timeouts(self, now: float, perf_now: float) -> None:
        """Enforce the connection's timeouts. Loop thread; the server's sweep calls it.

        The sweep runs about once a second (more often for short timeouts) and compares
        timestamps the connection keeps, so no request arms a timer. It closes a connection
        idle past ``timeout_keep_alive``, answers 408 to a head incomplete past
        ``timeout_request_header`` and 504 to a request without a response head past
        ``timeout_request``, cuts a connection with unsent output of which no byte has been
        sent for ``timeout_write`` however its buffer changed (a response, a sendfile or a
        closing connection's last bytes), and
        ends a lingering close after ``timeout_linger``.

        Args:
            now: ``loop.time()``, in seconds.
            perf_now: ``time.perf_counter()``, the clock of request start times.
        """
        transport = self.transport
        if transport is None:
            return
        config = self.config
        cycle = self.cycle
        pending = transport.get_write_buffer_size()
        # Progress is bytes leaving the buffer (or sent by sendfile), not a buffer that changes:
        # one that only grows, an app trickling output to a client that reads nothing, is stalled.
        drained = self._written - pending
        if cycle is not None and cycle.file_sender is not None:
            pending += cycle.file_sender.left
        if drained != self._stall_drained or not self._stall_size:
            self._stall_since = now  # progress, or nothing was waiting at the last sweep
        self._stall_drained = drained
        self._stall_size = pending
        if pending and config.timeout_write and now - self._stall_since >= config.timeout_write:
            if error_logger.isEnabledFor(logging.INFO):
                error_logger.info(
                    "Client %s read nothing for %g s (--timeout-write); closing the connection",
                    self.client,
                    config.timeout_write,
                )
            self.abort()
            return
        if self.lingering:
            if pending:
                self._linger_since = now
            elif now - self._linger_since >= config.timeout_linger:
                self.abort()
            return
        if self.closing or self._paused & _PAUSE_WRITE:
            return  # waiting for the client to read: the stall check above applies
        if cycle is None:
            header_timeout = config.timeout_request_header
            idle_since = self.idle_since
            if idle_since is not None:
                idle = now - idle_since
                if idle < config.timeout_keep_alive and (
                    not header_timeout or idle < header_timeout
                ):
                    if idle >= 1.0:  # idle a while: likely to stay so; free its h11 state
                        self.conn.release_if_idle()
                    return
                if header_timeout and self.conn.has_unparsed_data:
                    # Pipelined bytes of a next head wait: its clock started when the previous
                    # response ended.
                    self.idle_since = None
                    self._head_since = idle_since
                    if idle >= header_timeout:
                        self._head_timeout()
                elif idle >= config.timeout_keep_alive:
                    self.close()
            elif header_timeout:
                head_since = self._head_since
                if head_since is None:
                    self._head_since = now
                elif now - head_since >= header_timeout:
                    self._head_timeout()
            return
        sink = cycle.sink
        timeout = config.timeout_request
        if (
            timeout
            and sink is not None
            and not sink.head_sent
            and not cycle.status
            and perf_now - cycle.started >= timeout
        ):
            self._request_timeout(cycle, sink)

    @property
    def in_flight(self) -> bool:
        """Whether a request is being served on this connection (and it is not closing)."""
        return self.cycle is not None and not self.closing

    @property
    def idle_after_response(self) -> bool:
        """Whether the connection waits for its next request after serving one, with no byte of
        it received: closing it loses nothing a client does not retry (RFC 9112 section 9.3.1).
        A new connection that has sent nothing yet is not: its request is usually in flight."""
        return self.served and self.idle_since is not None and not self.closing


class _FileSender:
    """Send ``count`` bytes of a file from ``offset`` with ``os.sendfile`` on the loop thread.

    uvloop has no ``loop.sendfile()`` (MagicStack/uvloop#228), and the transport owns its file
    descriptor's polling. So the socket is duplicated (``os.dup``) and the duplicate watched for
    writability with ``loop.add_writer``; each time it is writable and the transport's own buffer
    is empty, ``os.sendfile`` copies file pages to the socket without passing through Python, up
    to ``_SENDFILE_MAX_CHUNK`` bytes per event, so that the loop serves its other connections in
    between. This works the same under uvloop and asyncio.
    """

    __slots__ = ("_dup", "_in_fd", "_out_fd", "channel", "done", "left", "offset", "wrapper")

    def __init__(self, channel: HTTPChannel, wrapper: FileWrapper, offset: int, count: int) -> None:
        self.channel = channel
        self.wrapper = wrapper
        self.offset = offset
        self.left = count
        self._dup = -1
        self._in_fd = -1
        self._out_fd = -1
        self.done = False

    def start(self) -> None:
        transport = self.channel.transport
        assert transport is not None
        try:
            self._in_fd = self.wrapper.filelike.fileno()
            self._out_fd = transport.get_extra_info("socket").fileno()
            self._dup = os.dup(self._out_fd)
            self.channel.loop.add_writer(self._dup, self._on_writable)
        except OSError as exc:
            self._finish(exc)
            return
        self._on_writable()

    def _on_writable(self) -> None:
        if self.done:
            return
        transport = self.channel.transport
        if transport is None or transport.get_write_buffer_size():
            return  # the head is still buffered in the transport; wait until it has gone out
        sendfile: Callable[[int, int, int, int], int] = os.sendfile
        budget = _SENDFILE_MAX_CHUNK
        try:
            while self.left > 0:
                sent = sendfile(self._out_fd, self._in_fd, self.offset, min(self.left, budget))
                if sent == 0:  # the file is shorter than it was: ``left`` stays non-zero
                    break
                self.offset += sent
                self.left -= sent
                self.channel._written += sent
                budget -= sent
                if budget <= 0 and self.left:
                    return  # the rest on the next writable event, after the other callbacks
        except BlockingIOError:
            return
        except OSError as exc:
            self._finish(exc)
            return
        self._finish(None)

    def _finish(self, error: OSError | None) -> None:
        self._stop()
        self.channel.on_file_sent(self, error)

    def _stop(self) -> None:
        if not self.done:
            self.done = True
            if self._dup >= 0:
                self.channel.loop.remove_writer(self._dup)
                os.close(self._dup)
                self._dup = -1

    def cancel(self) -> None:
        """The connection is gone: stop, and have the file closed."""
        if not self.done:
            self._stop()
            self.channel.on_file_sent(self, None)


def _close_quietly(wrapper: FileWrapper) -> None:
    """Worker thread: close a file body, logging (not raising) an error."""
    try:
        wrapper.close()
    except BaseException:  # app code: SystemExit and the like are logged too, never propagated
        error_logger.exception("Error closing a file response")
