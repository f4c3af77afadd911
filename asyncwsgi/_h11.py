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
  (the public iteration goes through ``Sequence.__getitem__`` per field).
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Sequence
from typing import Final

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
    """An ``h11.Response`` for headers validated before (skipping h11's own pass when it can)."""
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
    return Request(
        request.method, request.target, request.http_version, header_pairs(request.headers)
    )
