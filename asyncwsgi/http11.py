"""ServerConnection: the sans-IO HTTP/1.1 server side, over ``h11.Connection(h11.SERVER)``.

This is the sans-IO boundary: no module but this one and :mod:`asyncwsgi._h11` (its h11
translations and internals) imports h11. Bytes go in through :meth:`~ServerConnection.receive_data`,
which returns our own events (:mod:`asyncwsgi.events`) or raises
:class:`~asyncwsgi.errors.RequestRejected` with the status to answer; response parts go in
through the ``send_*`` methods, which return bytes to write or raise
:class:`~asyncwsgi.errors.InvalidResponse`. No socket, thread or asyncio: every behaviour is
testable by feeding bytes (``tests/test_http11.py``). It alone decides a response's framing and
``Connection`` field, from the status, the request's method, HTTP version and keep-alive wish
(parsed here), the body length and whether the server closes (arguments of
:meth:`~ServerConnection.send_response`); every error response has the head
:func:`~asyncwsgi.events.error_response` builds.

h11 parses and frames (RFC 9112). On top of it, this module adds: strictness checks where h11
0.16 is lenient (:mod:`asyncwsgi.strict`), run on the raw bytes h11 holds (every head, pipelined
ones included, each chunk-size line, the trailer section) before h11 parses them; valid requests
h11 refuses given to it in a form it takes, with the same meaning (empty lines before a request
line skipped; a rewritten head given to a new h11 connection between requests; a chunk-size line
rewritten in place, at the same length, in h11's buffer); nothing parsed after a rejection (every
later call raises it again); bytes after a request that ends the connection ignored, not
refused; HTTP/1.0 keep-alive, which h11 lacks (``Connection: keep-alive`` on a response of known
length, the next request given to a new h11 connection); gunicorn's request limits (414, 431,
413) as plain values, 0 meaning none; ``Date`` and ``Server``; the body of HEAD, 204 and 304
responses dropped (h11 frames them as ``Content-Length: 0``); a body cut at its declared
``Content-Length`` (the excess counted, not sent). Request body payload bypasses h11's buffer
where the framing allows it (:func:`asyncwsgi._h11.take_piece`): a read's bytes object becomes
the :class:`~asyncwsgi.events.Data` event itself, not a copy.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final

import h11

from . import _h11, strict
from ._h11 import PEER_STATES, asks_keep_alive, to_request
from .errors import InvalidResponse, RequestRejected
from .events import (
    CONNECTION_CLOSED,
    END_OF_MESSAGE,
    PAUSED,
    Data,
    EndOfMessage,
    Event,
    PeerState,
    error_response,
    reason_phrase,
)
from .strict import UNLIMITED, RequestLimits

__all__ = [
    "PAUSED",
    "ServerConnection",
    "RequestLimits",
    "error_response",
    "reason_phrase",
    "to_request",
]

_NO_BODY_STATUS = frozenset({204, 304})

# h11 events are immutable: one EndOfMessage without trailers serves every response.
_END_OF_MESSAGE: Final = h11.EndOfMessage()

# Stands in for the h11 state of an idle connection that released it (never used itself).
_RELEASED: Final = h11.Connection(h11.SERVER)

_CLOSE_END: Final = b"\r\nConnection: close\r\n\r\n"
_KEEP_ALIVE_END: Final = b"\r\nConnection: keep-alive\r\n\r\n"
_CLOSE: Final = (b"Connection", b"close")


class ServerConnection:
    """One HTTP/1.1 connection, server side, without I/O.

    Loop thread only (it is not thread-safe; the channel that owns it runs on the event loop).

    Args:
        limits: the request limits (414, 431, 413).
        server_header: the ``(b"server", b"asyncwsgi")`` pair to add to every response, or None.
    """

    __slots__ = (
        "_awaiting_head",
        "_body_allowed",
        "_body_bytes",
        "_bytes_left",
        "_chunk_line_due",
        "_conn",
        "_eof",
        "_footer_left",
        "_framing",
        "_http10_keep_alive",
        "_limits",
        "_max_body",
        "_rejected",
        "_request_body_bytes",
        "_reuse",
        "_server_header",
        "_trailers_due",
        "bytes_discarded",
    )

    def __init__(
        self, limits: RequestLimits, server_header: tuple[bytes, bytes] | None = None
    ) -> None:
        self._limits = limits
        self._conn = self._new_h11()
        # What the checks expect next among the unparsed bytes: a request head, a chunk-size
        # line (after ``_footer_left`` bytes of a chunk's CRLF), or the trailer section.
        self._awaiting_head = True
        self._framing: int | None = None
        self._chunk_line_due = False
        self._footer_left = 0
        self._trailers_due = False
        self._rejected: RequestRejected | None = None
        #: The peer's EOF was received (``receive_data(b"")``).
        self._eof = False
        self._server_header = server_header
        self._body_allowed = True
        self._bytes_left: int | None = None
        self._body_bytes = 0
        self._max_body = 0 if limits.body == UNLIMITED else limits.body
        self._request_body_bytes = 0
        # An HTTP/1.0 keep-alive request, and whether its response keeps the connection (the
        # next request then goes to a new h11 connection: see start_next_cycle).
        self._http10_keep_alive = False
        self._reuse = False
        #: Response body bytes dropped because they went past the declared Content-Length.
        self.bytes_discarded = 0

    # -- receiving ------------------------------------------------------------------------

    def receive_data(self, data: bytes) -> list[Event]:
        """Feed bytes from the socket (``b""`` means EOF) and return the events now complete.

        The list ends with :data:`PAUSED` when a complete request is followed by pipelined data
        that must wait for the response.

        Raises:
            RequestRejected: the request is malformed or over a limit; answer with
                :meth:`send_rejection` and close the connection. The application must not see it.
                Once raised, every later call raises it again.
        """
        if self._rejected is not None:
            raise self._rejected
        if self._conn is _RELEASED:
            self._conn = self._new_h11()
        if not data:
            self._eof = True
        if _h11.PASS_BODY and data and not (self._awaiting_head and data.endswith(b"\r\n\r\n")):
            return self._receive_passing_body(data)  # not for heads alone (GET): no gain there
        self._conn.receive_data(data)
        return self.next_events()

    def _receive_passing_body(self, data: bytes) -> list[Event]:
        """:meth:`receive_data` with body payload past h11's buffer (:func:`_h11.take_piece`):
        h11 and the checks get every other byte, in pieces, and the events are the same."""
        events: list[Event] = []
        start, size = 0, len(data)
        while start < size and (not events or events[-1] is not PAUSED):
            end, payload, chunk_end = _h11.take_piece(self._conn, data, start, self._awaiting_head)
            if payload:  # data itself when it is all payload: no copy
                events.append(self._body_data(data[start:end], chunk_end))
            else:
                self._conn.receive_data(data[start:end])
            start = end
            events += self.next_events()
        if start < size:
            self._conn.receive_data(data[start:])  # after PAUSED: parsed in the next cycle
        return events

    def _new_h11(self) -> h11.Connection:
        return h11.Connection(h11.SERVER, max_incomplete_event_size=self._limits.head)

    def release_if_idle(self) -> bool:
        """Drop the h11 state of a keep-alive connection waiting for its next request; return
        whether it is released. Such a connection is equivalent to a fresh one, so its h11
        objects are made again when the next byte arrives: thousands of idle connections cost
        little more than their sockets. For housekeeping, not per request."""
        conn = self._conn
        if conn is _RELEASED:
            return True
        if (
            conn.our_state is h11.IDLE
            and conn.their_state is h11.IDLE
            and self._awaiting_head
            and self._rejected is None
            and not conn.trailing_data[0]
        ):
            self._conn = _RELEASED
            return True
        return False

    @property
    def has_unparsed_data(self) -> bool:
        """Whether bytes of a next request wait in h11's buffer (pipelining)."""
        conn = self._conn
        return conn is not _RELEASED and bool(_h11.unparsed(conn))

    def next_events(self) -> list[Event]:
        """Return the events h11 can produce from data it already holds (after a new cycle).

        Raises:
            RequestRejected: as for :meth:`receive_data`.
        """
        if self._rejected is not None:
            raise self._rejected
        try:
            return self._next_events()
        except RequestRejected as exc:
            self._rejected = exc
            raise

    def _next_events(self) -> list[Event]:
        events: list[Event] = []
        conn = self._conn
        if conn.their_state is h11.MUST_CLOSE:
            # What follows a request that ends the connection is ignored (below), unless an
            # HTTP/1.0 keep-alive response may keep it: then it waits for the next cycle.
            if self._http10_keep_alive and _h11.unparsed(conn):
                events.append(PAUSED)
            return events
        while True:
            if self._awaiting_head:
                if not self._check_head():
                    return events
                conn = self._conn  # a new one when the head was rewritten
            elif self._chunk_line_due:
                self._check_chunk_line()
            elif self._trailers_due:
                self._trailers_due = not strict.check_trailers_at(
                    _h11.unparsed(conn), 0, self._limits
                )
            try:
                event = conn.next_event()
            except h11.RemoteProtocolError as exc:
                raise RequestRejected(exc.error_status_hint, str(exc)) from None
            if event is h11.NEED_DATA:
                return events
            if event is h11.PAUSED:
                events.append(PAUSED)
                return events
            if type(event) is h11.Data:
                events.append(self._body_data(event.data, event.chunk_end))
            elif type(event) is h11.Request:
                self._on_request(event)
                events.append(to_request(event))
            elif type(event) is h11.EndOfMessage:
                if event.headers:
                    strict.check_trailers(event.headers)
                self._framing = None
                self._chunk_line_due = self._trailers_due = False
                events.append(
                    EndOfMessage(_h11.header_pairs(event.headers))
                    if event.headers
                    else END_OF_MESSAGE
                )
                if conn.their_state is h11.MUST_CLOSE:
                    # The connection ends with this request. h11 would refuse any byte after
                    # it ("Got data when expecting EOF") before we could answer it; RFC 9112
                    # section 9.6 lets a server that closes ignore what follows. After an
                    # HTTP/1.0 keep-alive request, what follows waits (reading pauses).
                    if self._http10_keep_alive and _h11.unparsed(conn):
                        events.append(PAUSED)
                    return events
                if not self._eof and not _h11.unparsed(conn):
                    return events  # the usual end: h11 would only answer NEED_DATA
            elif type(event) is h11.ConnectionClosed:
                events.append(CONNECTION_CLOSED)
                return events

    def _body_data(self, data: bytes | bytearray, chunk_end: bool) -> Data:
        """Body payload counted against ``--limit-request-body``; ``chunk_end``: CRLF due next."""
        if self._max_body:
            self._request_body_bytes += len(data)
            if self._request_body_bytes > self._max_body:
                self._rejected = RequestRejected(413, "request body too large")
                raise self._rejected
        if chunk_end:
            self._chunk_line_due = True
            self._footer_left = 2
        return Data(data)

    def _check_head(self) -> bool:
        """Check the request head h11 holds, before h11 parses it or when it is incomplete.

        Returns False when h11 must not look at the bytes yet (a CR whose LF has not come).
        """
        buffered = _h11.unparsed(self._conn)
        if not buffered:
            return True
        if buffered[0] == 0x0D:
            # RFC 9112 section 2.2: a server SHOULD ignore at least one empty line (CRLF)
            # received before the request line (some clients send one after a request body).
            # h11 refuses it, so h11 is given what follows. A bare CR or LF stays refused.
            skip = 0
            while buffered[skip : skip + 2] == b"\r\n":
                skip += 2
            if not skip:
                if len(buffered) > 1:
                    raise RequestRejected(400, "bare CR before the request line")
                return False  # the LF may follow; h11 would refuse the CR alone
            self._replace_unparsed(buffered[skip:])
            buffered = _h11.unparsed(self._conn)
            if not buffered:
                return True
            if buffered == b"\r":
                return False
        if buffered[0] == 0x0A:
            raise RequestRejected(400, "bare LF before the request line")
        end = buffered.find(b"\r\n\r\n")
        if end < 0:
            strict.check_partial_head(buffered, self._limits)
            return True
        self._framing, rewritten = strict.check_head(buffered[: end + 2], self._limits)
        self._awaiting_head = False
        if rewritten is not None:
            self._replace_unparsed(rewritten + buffered[end + 2 :])
        return True

    def _replace_unparsed(self, data: bytes | bytearray) -> None:
        """Give a new h11 connection ``data`` instead of the bytes the current one holds: only
        between requests (h11 ``IDLE`` on both sides, or an HTTP/1.0 keep-alive cycle complete
        on both), where a new h11 connection is equivalent to the current one."""
        self._conn = _h11.hand_over(self._conn, self._new_h11(), data)

    def _check_chunk_line(self) -> None:
        """Check the next chunk-size line h11 holds before h11 parses it."""
        buffered = _h11.unparsed(self._conn)
        footer = self._footer_left
        if footer:
            received = buffered[:footer]
            if received != b"\r\n"[2 - footer :][: len(received)]:
                raise RequestRejected(400, "chunk data not followed by CRLF")
            # h11 discards these bytes of the footer on its next call.
            self._footer_left = footer - len(received)
            if len(buffered) <= footer:
                return
        end = buffered.find(b"\r\n", footer)
        if end < 0:
            return  # h11 waits for the CRLF too
        self._chunk_line_due = False
        last, rewritten = strict.check_chunk_line(buffered[footer:end])
        # Same length, no CR or LF: h11's buffer positions stay valid. Without access to h11's
        # buffer the line stays as it is, and h11 refuses it (400): fail closed.
        if rewritten is not None and not _h11.rewrite_unparsed(self._conn, footer, end, rewritten):
            return
        if last:
            self._trailers_due = not strict.check_trailers_at(buffered, end + 2, self._limits)

    def _on_request(self, request: h11.Request) -> None:
        strict.check_request(request)
        framing = self._framing
        if framing == strict.CHUNKED:
            self._chunk_line_due = True
            self._footer_left = 0
        if self._max_body:
            self._request_body_bytes = 0
            if framing is not None and framing > self._max_body:
                raise RequestRejected(413, "request body too large")
        self._body_allowed = request.method != b"HEAD"
        self._http10_keep_alive = request.http_version == b"1.0" and asks_keep_alive(request)

    @property
    def they_are_waiting_for_100_continue(self) -> bool:
        """Whether the client sent ``Expect: 100-continue`` and waits (RFC 9110 section 10.1.1)."""
        return self._conn.they_are_waiting_for_100_continue

    @property
    def request_complete(self) -> bool:
        """Whether the whole current request, body included, has been received."""
        return self._conn.their_state is h11.DONE

    # -- sending ------------------------------------------------------------------------------

    def send_continue(self) -> bytes:
        """Return ``HTTP/1.1 100 Continue``; call when the app first reads the body."""
        data = self._conn.send(
            h11.InformationalResponse(status_code=100, headers=[], reason=b"Continue")
        )
        assert data is not None
        return data

    def send_response(
        self,
        status: int,
        reason: bytes,
        headers: list[tuple[bytes, bytes]],
        date_header: tuple[bytes, bytes] | None,
        content_length: int | None = None,
        close: bool = False,
    ) -> bytes:
        """Return the serialised response head.

        Args:
            status: the status code, 200..599 (1xx is not a final response).
            reason: the reason phrase, latin-1 bytes.
            headers: ``(name, value)`` pairs as latin-1 bytes, already validated.
            date_header: the ``(b"date", ...)`` pair to add, or None.
            content_length: when the whole body is known, its size in bytes: added as
                ``Content-Length`` unless the headers carry one.
            close: the connection's last response: ``Connection: close`` is added once (RFC
                9112 section 9.6); an :func:`error_response` head has it and means ``close``.

        An HTTP/1.0 keep-alive request whose response has a known length and is not ``close``
        gets ``Connection: keep-alive`` (RFC 9112 appendix C.2.2, as gunicorn and waitress do).

        Raises:
            InvalidResponse: the head is invalid (a Content-Length that is not a number, a field
                h11 refuses), or a response is already under way.
        """
        self._body_bytes = 0
        self._reuse = False
        if status in _NO_BODY_STATUS or 100 <= status < 200:
            self._body_allowed = False
        declared: int | None = None
        has_date = has_server = has_close = False
        for name, value in headers:
            size = len(name)
            if size == 14 or size == 4 or size == 6 or size == 10:
                lowered = name.lower()
                if lowered == b"content-length":
                    if not value.isdigit():
                        raise InvalidResponse("bad Content-Length")
                    declared = int(value)
                elif lowered == b"date":
                    has_date = True
                elif lowered == b"server":
                    has_server = True
                elif lowered == b"connection":
                    # Only error_response() puts one here (PEP 3333 keeps it from the app).
                    has_close = close = True
        if close and not has_close:
            headers.append(_CLOSE)
        if declared is None and content_length is not None and status not in _NO_BODY_STATUS:
            headers.append((b"Content-Length", b"%d" % content_length))
            declared = content_length
        # RFC 9110 sections 6.6.1 and 10.2.4: one Date and one Server, the app's if it set one.
        if date_header is not None and not has_date:
            headers.append(date_header)
        if self._server_header is not None and not has_server:
            headers.append(self._server_header)
        self._bytes_left = declared if self._body_allowed else 0
        try:
            data = self._conn.send(_h11.new_response(status, reason, headers))
        except h11.LocalProtocolError as exc:
            raise InvalidResponse(str(exc)) from None
        assert data is not None
        if (
            self._http10_keep_alive
            and not close
            and (declared is not None or not self._body_allowed)
            and data.endswith(_CLOSE_END)
        ):
            # h11 ends the head with the Connection field it set (for an HTTP/1.0 peer, always
            # "close"); the framing it chose does not depend on it.
            data = data[: -len(_CLOSE_END)] + _KEEP_ALIVE_END
            self._reuse = True
        return data

    def send_data(self, data: bytes) -> Sequence[bytes]:
        """Return the wire pieces for one body chunk (no copy of ``data`` is made).

        Bytes past the declared Content-Length, and every body byte of a HEAD, 204 or 304
        response, are dropped and counted in :attr:`bytes_discarded`.
        """
        left = self._bytes_left
        if left is not None:
            if len(data) > left:
                if self._body_allowed:
                    self.bytes_discarded += len(data) - left
                data = data[:left]
            if not data:
                return ()
            self._bytes_left = left - len(data)
        self._body_bytes += len(data)
        try:
            pieces = self._conn.send_with_data_passthrough(h11.Data(data=data))
        except h11.LocalProtocolError as exc:
            raise InvalidResponse(str(exc)) from None
        assert pieces is not None  # None only for ConnectionClosed
        return pieces

    def send_file_placeholder(self, count: int) -> Sequence[object]:
        """Account for ``count`` bytes that go out by ``sendfile(2)`` (h11's passthrough hook).

        Only valid when the response declared a Content-Length of at least ``count``; returns the
        pieces to write around the file bytes (empty for Content-Length framing).
        """
        assert self._bytes_left is not None
        assert count <= self._bytes_left
        self._bytes_left -= count
        self._body_bytes += count
        return _h11.framing_around(self._conn, count)

    def send_end(self) -> bytes | None:
        """Return the bytes that end the response body, or None when the body fell short.

        A body shorter than its declared Content-Length cannot be completed: the caller must
        close the connection (the client sees a truncated response, as RFC 9112 section 6.3
        requires, rather than a misframed one).
        """
        if self._bytes_left:
            self._conn.send_failed()
            return None
        try:
            data = self._conn.send(_END_OF_MESSAGE)
        except h11.LocalProtocolError as exc:
            raise InvalidResponse(str(exc)) from None
        assert data is not None
        return data

    @property
    def bytes_left(self) -> int | None:
        """Body bytes still due under the declared Content-Length, or None when not declared."""
        return self._bytes_left

    @property
    def body_bytes_sent(self) -> int:
        """Response body bytes sent so far in this cycle."""
        return self._body_bytes

    @property
    def response_started(self) -> bool:
        """Whether the response head of the current cycle has been serialised."""
        return self._conn.our_state in (h11.SEND_BODY, h11.DONE, h11.MUST_CLOSE, h11.CLOSED)

    @property
    def keep_alive(self) -> bool:
        """Whether the connection can carry another request after this response."""
        ours = self._conn.our_state
        theirs = self._conn.their_state
        if self._reuse:
            # h11 ends an HTTP/1.0 cycle in MUST_CLOSE; both messages are complete there.
            return ours is h11.MUST_CLOSE and theirs is h11.MUST_CLOSE
        return ours is h11.DONE and theirs is h11.DONE

    def start_next_cycle(self) -> None:
        """Reset for the next request on a keep-alive connection (h11's ``start_next_cycle``).

        After an HTTP/1.0 keep-alive cycle, which h11 cannot restart, a new h11 connection gets
        the bytes the old one has not parsed (its public ``trailing_data``).
        """
        if self._reuse:
            self._replace_unparsed(self._conn.trailing_data[0])
            self._reuse = self._http10_keep_alive = False
        else:
            self._conn.start_next_cycle()
        self._awaiting_head = True
        self._framing = None
        self._chunk_line_due = self._trailers_due = False
        self._body_allowed = True

    def send_error(
        self, status: int, date_header: tuple[bytes, bytes] | None, *extra: tuple[bytes, bytes]
    ) -> bytes:
        """Return a whole :func:`error_response` with the body ``"<status> <phrase>"`` (dropped
        for HEAD), for a request the server answers itself (503 at ``--limit-concurrency``,
        504 at ``--timeout-request``, ``--health-path``; its 200 has the body ``ok``).

        Raises:
            InvalidResponse: a response is already under way: only cutting is left.
        """
        head = error_response(status, *extra)
        body = b"ok" if status == 200 else b"%d %s\n" % (status, head.reason)
        out = [self.send_response(status, head.reason, head.headers, date_header, len(body))]
        out.extend(self.send_data(body))
        out.append(self.send_end() or b"")
        return b"".join(out)

    def send_rejection(
        self, status: int, reason: str, date_header: tuple[bytes, bytes] | None = None
    ) -> bytes:
        """Return a complete ``Connection: close`` error response for a rejected request.

        The body, ``"<status> <phrase>: <reason>"``, is sent whatever the request's method: the
        request was not understood. Returns ``b""`` when a response is already under way (then
        only closing is left).
        """
        body = f"{status} {reason_phrase(status).decode()}: {reason}\n".encode("ascii", "replace")
        if self._conn is _RELEASED:
            self._conn = self._new_h11()
        if self._conn.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            return b""
        head = error_response(status)
        # h11 checks its own state only; after a RemoteProtocolError it still lets us answer.
        data = self.send_response(status, head.reason, head.headers, date_header, len(body))
        return data + body

    @property
    def their_state(self) -> PeerState:
        """Where the client is in the current exchange (h11's ``their_state``)."""
        conn = self._conn
        if conn is _RELEASED:
            return PeerState.IDLE
        return PEER_STATES[conn.their_state]
