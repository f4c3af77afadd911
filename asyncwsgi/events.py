"""The vocabulary between the sans-IO HTTP/1.1 layer and the rest of the server.

:meth:`asyncwsgi.http11.ServerConnection.receive_data` turns bytes into these events, and
nothing above :mod:`asyncwsgi.http11` sees an h11 object: the channel, the environ builder and
the access log read these. Pure data; any thread. h11's events of the same names are the model,
with what a server needs only, and kept cheap: ``__slots__``, no per-event ``__dict__``, and one
shared instance of each event that carries nothing.

Received, in this order for one request: :class:`Request` (the complete head), any number of
:class:`Data` (body bytes, chunk framing removed), then :data:`END_OF_MESSAGE`. Besides:
:data:`PAUSED` (a complete request is followed by pipelined bytes that wait for its response:
stop reading) and :data:`CONNECTION_CLOSED` (the client closed its side).

Sent: the worker thread describes a response head with a :class:`ResponseHead`; the HTTP/1.1
layer chooses its framing (RFC 9112 section 6) from the facts the channel passes with it.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Sequence
from typing import Final, NamedTuple

__all__ = [
    "Request",
    "Data",
    "EndOfMessage",
    "END_OF_MESSAGE",
    "Paused",
    "PAUSED",
    "ConnectionClosed",
    "CONNECTION_CLOSED",
    "Event",
    "PeerState",
    "ResponseHead",
    "HeaderList",
    "reason_phrase",
    "error_response",
]

#: Header fields: ``(name, value)`` pairs of latin-1 bytes.
HeaderList = Sequence[tuple[bytes, bytes]]


def connection_options(headers: Iterable[tuple[bytes, bytes]]) -> set[bytes]:
    """The lower-cased tokens of the Connection fields in ``headers`` (RFC 9110 section 7.6.1)."""
    tokens: set[bytes] = set()
    for name, value in headers:
        if name == b"connection":
            if b"," in value:
                tokens.update(token.strip(b" \t").lower() for token in value.split(b","))
            else:  # one token, as nearly always ("close", "keep-alive")
                tokens.add(value.strip(b" \t").lower())
    return tokens


class Request:
    """A complete, checked request head (RFC 9112 section 3 request line, section 5 fields).

    Attributes:
        method: the method token, as sent (``b"GET"``).
        target: the request-target, as sent (origin-form, absolute-form or ``*``).
        http_version: ``b"1.1"`` or ``b"1.0"``.
        headers: ``(name, value)`` pairs in arrival order, names lower-cased, values without
            surrounding whitespace.
    """

    __slots__ = ("headers", "http_version", "method", "target")

    def __init__(
        self, method: bytes, target: bytes, http_version: bytes, headers: HeaderList
    ) -> None:
        self.method = method
        self.target = target
        self.http_version = http_version
        self.headers = headers

    def __repr__(self) -> str:
        return f"Request(method={self.method!r}, target={self.target!r})"

    def asks_to_close(self) -> bool:
        """Whether this request ends its connection itself (RFC 9112 section 9.3): ``Connection:
        close``, or HTTP/1.0 without ``keep-alive``; such a client sends no next request."""
        tokens = connection_options(self.headers)
        return b"close" in tokens or (self.http_version == b"1.0" and b"keep-alive" not in tokens)


class Data:
    """Request body bytes, with any chunked framing removed.

    Attributes:
        data: the bytes; a fresh object the receiver may keep without copying.
    """

    __slots__ = ("data",)

    def __init__(self, data: bytes | bytearray) -> None:
        self.data = data

    def __repr__(self) -> str:
        return f"Data(<{len(self.data)} bytes>)"


class EndOfMessage:
    """The request body is complete.

    Attributes:
        headers: the trailer fields (RFC 9112 section 7.1.2), checked, as ``(name, value)``
            pairs with lower-case names; empty for most requests, which share
            :data:`END_OF_MESSAGE`.
    """

    __slots__ = ("headers",)

    def __init__(self, headers: HeaderList = ()) -> None:
        self.headers = headers

    def __repr__(self) -> str:
        return f"EndOfMessage(headers={list(self.headers)!r})"


class Paused:
    """A complete request is followed by pipelined bytes; they wait for its response."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "PAUSED"


class ConnectionClosed:
    """The client closed its side of the connection (EOF)."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "CONNECTION_CLOSED"


#: The :class:`EndOfMessage` of a message without trailer fields.
END_OF_MESSAGE = EndOfMessage()
#: The one :class:`Paused`.
PAUSED = Paused()
#: The one :class:`ConnectionClosed`.
CONNECTION_CLOSED = ConnectionClosed()

Event = Request | Data | EndOfMessage | Paused | ConnectionClosed


class PeerState(enum.Enum):
    """Where the client is in the current exchange (h11's ``their_state``, RFC 9112 terms)."""

    #: Between requests: no byte of the next request has been parsed.
    IDLE = "IDLE"
    #: The request head or body is arriving.
    SEND_BODY = "SEND_BODY"
    #: The whole request has been received; another may follow on this connection.
    DONE = "DONE"
    #: The whole request has been received and it was the connection's last.
    MUST_CLOSE = "MUST_CLOSE"
    #: The client closed its side.
    CLOSED = "CLOSED"
    #: The request was rejected; nothing more is parsed.
    ERROR = "ERROR"


class ResponseHead(NamedTuple):
    """A validated response head, as the worker thread hands it over.

    Attributes:
        status: the status code, 200..599.
        reason: the reason phrase, latin-1 bytes.
        headers: ``(name, value)`` pairs of latin-1 bytes, validated
            (:func:`asyncwsgi.wsgi.run_wsgi`); no hop-by-hop field, except the
            ``Connection: close`` of a server-made error response
            (:func:`asyncwsgi.http11.error_response`).
    """

    status: int
    reason: bytes
    headers: list[tuple[bytes, bytes]]


_REASONS: dict[int, bytes] = {}
_TEXT_PLAIN: Final = (b"Content-Type", b"text/plain; charset=utf-8")
_CLOSE: Final = (b"Connection", b"close")


def reason_phrase(status: int) -> bytes:
    """Return the standard reason phrase for ``status`` (RFC 9110 section 15), or ``b""``."""
    phrase = _REASONS.get(status)
    if phrase is None:
        from http import HTTPStatus

        try:
            phrase = HTTPStatus(status).phrase.encode("ascii")
        except ValueError:
            phrase = b""
        _REASONS[status] = phrase
    return phrase


def error_response(status: int, *extra: tuple[bytes, bytes]) -> ResponseHead:
    """Return the head of a plain-text error response that ends the connection.

    Every error response the server makes itself (a rejected request, 408, 413, 500, 503, 504)
    has this head: ``Content-Type: text/plain; charset=utf-8``, the ``extra`` fields, and
    ``Connection: close`` (which :meth:`ServerConnection.send_response` takes as its ``close``
    argument, never repeating it); ``Content-Length`` is added when the head is serialised with
    its whole body. Any thread.

    Args:
        status: the status code (RFC 9110 section 15).
        extra: more ``(name, value)`` fields, such as ``(b"Retry-After", b"1")``.
    """
    return ResponseHead(status, reason_phrase(status), [_TEXT_PLAIN, *extra, _CLOSE])
