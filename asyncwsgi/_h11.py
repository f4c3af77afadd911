"""How the HTTP/1.1 layer talks to h11: translations to our events, and every use of h11's
private internals, each beside its public fallback.

:mod:`asyncwsgi.http11` is the only caller. Each fast path is feature-detected once, at import,
against the installed h11 (pinned ``>=0.16,<0.17`` in ``pyproject.toml``); when h11 stores
things differently, or when the environment variable ``ASYNCWSGI_H11_PUBLIC_ONLY=1`` is set,
the public fallback is used instead. Both paths give the same results, with one exception:
rewriting a valid chunk-size line that h11 refuses needs h11's buffer, so without it h11's
refusal (400) stands, which fails closed. CI runs the strictness tests in both modes.

The private paths:

- ``Connection._receive_buffer._data``: the bytes h11 holds and has not parsed, read without a
  copy (the public ``trailing_data`` copies the whole buffer on each call, which many small
  pipelined requests or chunks in one read would make quadratic), and changed in place for a
  same-length chunk-line rewrite;
- ``Response(_parsed=True)``: skip h11's second validation of response headers the worker
  already validated with stricter rules;
- ``Headers._full_items``: the ``(raw name, lower-case name, value)`` triples, read as a list
  (the public iteration goes through ``Sequence.__getitem__`` per field);
- ``Connection._reader``, the body reader of the request h11 is receiving: its count of body
  bytes still due (``ContentLengthReader._remaining``) or of the current chunk's payload
  (``ChunkedReader._bytes_in_chunk``, then ``_bytes_to_discard`` for the CRLF after it). While
  h11's buffer is empty and a count is known, payload bytes bypass h11's buffer: they become our
  own :class:`~asyncwsgi.events.Data` without a copy, and h11 is told only their number
  (:func:`take_piece`). Without this, every body byte is copied into h11's
  buffer and out again.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Sequence
from typing import Any, Final

import h11

from .events import PeerState, Request, connection_options

__all__ = [
    "PUBLIC_ONLY",
    "PEEK_BUFFER",
    "TRUSTED_HEADERS",
    "FULL_ITEMS",
    "unparsed",
    "rewrite_unparsed",
    "new_response",
    "header_pairs",
    "to_request",
    "PASS_BODY",
    "take_piece",
    "framing_around",
    "hand_over",
    "asks_keep_alive",
    "PEER_STATES",
]

#: ``ASYNCWSGI_H11_PUBLIC_ONLY=1``: use h11's public API only.
PUBLIC_ONLY: Final = os.environ.get("ASYNCWSGI_H11_PUBLIC_ONLY", "") not in ("", "0")

#: Whether h11 keeps its receive buffer in one bytearray we may read (and rewrite in place).
PEEK_BUFFER: bool = not PUBLIC_ONLY and isinstance(
    getattr(getattr(h11.Connection(h11.SERVER), "_receive_buffer", None), "_data", None),
    bytearray,
)

#: Whether h11's events take ``_parsed=True`` for headers that were already validated.
TRUSTED_HEADERS: Final = (
    not PUBLIC_ONLY and "_parsed" in inspect.signature(h11.Response.__init__).parameters
)

#: Whether h11's ``Headers`` keeps its triples in a ``_full_items`` list.
FULL_ITEMS: Final = not PUBLIC_ONLY and isinstance(
    getattr(
        h11.Request(method="GET", target="/", headers=[("Host", "x")]).headers, "_full_items", None
    ),
    list,
)


def unparsed(conn: h11.Connection) -> bytes | bytearray:
    """The bytes ``conn`` holds and has not parsed yet (no copy where h11 allows it)."""
    if PEEK_BUFFER:
        return conn._receive_buffer._data
    return conn.trailing_data[0]


def rewrite_unparsed(conn: h11.Connection, start: int, end: int, data: bytes) -> bool:
    """Replace ``[start:end]`` of the unparsed bytes by ``data`` of the same length, no CR/LF.

    Returns False, changing nothing, when only the public API may be used: there is no public
    way to change bytes h11 holds in the middle of a message.
    """
    if not PEEK_BUFFER:
        return False
    conn._receive_buffer._data[start:end] = data
    return True


def new_response(status: int, reason: bytes, headers: list[tuple[bytes, bytes]]) -> h11.Response:
    """An ``h11.Response`` for headers asyncwsgi.wsgi validated with rules at least as strict as
    h11's (h11's second pass of the same regular expressions is skipped when it can be)."""
    if TRUSTED_HEADERS:
        return h11.Response(
            status_code=status, reason=reason, headers=headers, http_version=b"1.1", _parsed=True
        )
    return h11.Response(status_code=status, reason=reason, headers=headers)


def header_pairs(headers: Sequence[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """The ``(lower-case name, value)`` pairs of h11's request headers, as a new list."""
    if FULL_ITEMS:
        return [(name, value) for _, name, value in headers._full_items]  # type: ignore[attr-defined]
    return list(headers)


def _body_readers() -> tuple[type, type] | None:
    """h11's Content-Length and chunked body reader classes, when they keep their counts where
    :func:`take_piece` expects them and h11 honours a change of them (tried
    here on two requests); else None, and body bytes go through h11's buffer."""
    if not PEEK_BUFFER:
        return None
    try:
        conn = h11.Connection(h11.SERVER)
        conn.receive_data(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nab")
        for _ in range(2):
            conn.next_event()  # Request, Data(b"ab")
        length: Any = conn._reader
        if length._remaining != 3:
            return None
        length._remaining = 0  # as if b"cde" had come
        if type(conn.next_event()) is not h11.EndOfMessage:
            return None
        conn = h11.Connection(h11.SERVER)
        conn.receive_data(
            b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nab"
        )
        for _ in range(2):
            conn.next_event()
        chunked: Any = conn._reader
        if chunked._bytes_in_chunk != 3 or chunked._bytes_to_discard or chunked._reading_trailer:
            return None
        chunked._bytes_in_chunk, chunked._bytes_to_discard = 0, b"\r\n"  # as if b"cde" had come
        conn.receive_data(b"\r\n0\r\n\r\n")
        if type(conn.next_event()) is not h11.EndOfMessage:
            return None
    except (AttributeError, TypeError, h11.ProtocolError):
        return None
    return type(length), type(chunked)


_READERS: Final = _body_readers()
_LENGTH_READER: Final[Any] = _READERS[0] if _READERS else None
_CHUNKED_READER: Final[Any] = _READERS[1] if _READERS else None

#: Whether request body payload may bypass h11's receive buffer (:func:`take_piece`).
PASS_BODY: Final = _READERS is not None


def take_piece(
    conn: h11.Connection, data: bytes, start: int, head_due: bool
) -> tuple[int, bool, bool]:
    """Split off the next piece of ``data[start:]``, up to the returned end: body payload that
    bypasses h11 (then h11 has been told its size, as if it had parsed it), or bytes h11 must be
    fed. Returns ``(end, payload, chunk_end)``; ``chunk_end``: the payload ends a chunk, whose
    CRLF is due next (RFC 9112 section 7.1).

    Payload may bypass h11 while its buffer is empty and the count is known: the rest of the
    Content-Length, or of the current chunk once its size line has been parsed (never without
    :data:`PASS_BODY`, nor while the client waits for ``100 Continue``: h11 stops waiting on its
    own ``Data`` event). h11 is fed up to where such payload may start next: the end of a
    request head (``head_due``: none parsed yet in this cycle), or the CRLF after a chunk's data
    and the next chunk-size line; else the rest. That end is a guess that parses nothing: h11
    and the strictness checks still see every byte of framing and decide what it means, and a
    wrong guess costs a copy, never a different result.
    """
    size = len(data)
    state = conn.their_state
    if state is h11.IDLE and head_due:
        end = data.find(b"\r\n\r\n", start)
        return (end + 4 if end >= 0 else size), False, False
    if not PASS_BODY or state is not h11.SEND_BODY or conn.client_is_waiting_for_100_continue:
        return size, False, False
    reader: Any = conn._reader
    kind = type(reader)
    if conn._receive_buffer._data:
        pass  # h11 has yet to parse some framing
    elif kind is _LENGTH_READER and reader._remaining:
        end = min(size, start + reader._remaining)
        reader._remaining -= end - start
        return end, True, False
    elif (
        kind is _CHUNKED_READER
        and reader._bytes_in_chunk
        and not reader._bytes_to_discard
        and not reader._reading_trailer
    ):
        end = min(size, start + reader._bytes_in_chunk)
        reader._bytes_in_chunk -= end - start
        if reader._bytes_in_chunk:
            return end, True, False
        reader._bytes_to_discard = b"\r\n"
        return end, True, True
    if kind is _CHUNKED_READER and not reader._reading_trailer:
        end = data.find(b"\n", start + len(reader._bytes_to_discard))
        return (end + 1 if end >= 0 else size), False, False
    return size, False, False


def framing_around(conn: h11.Connection, count: int) -> list[object]:
    """The framing h11 writes around ``count`` body bytes sent by other means (``sendfile(2)``),
    through its public passthrough hook; empty for Content-Length framing."""

    class _Placeholder:
        def __len__(self) -> int:
            return count

    pieces = conn.send_with_data_passthrough(h11.Data(data=_Placeholder()))  # type: ignore[arg-type]
    assert pieces is not None
    return [piece for piece in pieces if not isinstance(piece, _Placeholder)]


def hand_over(old: h11.Connection, new: h11.Connection, data: bytes | bytearray) -> h11.Connection:
    """Give ``new`` the bytes ``data`` in place of those ``old`` holds unparsed, and the EOF
    ``old`` received, if any; return ``new``. Public API only."""
    closed = old.trailing_data[1]
    if data:
        new.receive_data(bytes(data))
    if closed:
        new.receive_data(b"")
    return new


# -- translations between h11 and asyncwsgi.events (public API only) -----------------------------

PEER_STATES: Final = {
    h11.IDLE: PeerState.IDLE,
    h11.SEND_BODY: PeerState.SEND_BODY,
    h11.DONE: PeerState.DONE,
    h11.MUST_CLOSE: PeerState.MUST_CLOSE,
    h11.CLOSED: PeerState.CLOSED,
    h11.ERROR: PeerState.ERROR,
}


def asks_keep_alive(request: h11.Request) -> bool:
    """Whether the request's Connection field has ``keep-alive`` and not ``close``."""
    tokens = connection_options(request.headers)
    return b"keep-alive" in tokens and b"close" not in tokens


def to_request(request: h11.Request) -> Request:
    """Return the :class:`~asyncwsgi.events.Request` of an ``h11.Request``."""
    if FULL_ITEMS:  # header_pairs(), inline: once per request
        headers = [(name, value) for _, name, value in request.headers._full_items]
    else:
        headers = list(request.headers)
    return Request(request.method, request.target, request.http_version, headers)
