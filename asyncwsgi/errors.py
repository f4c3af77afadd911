"""The exceptions asyncwsgi raises, in one small hierarchy."""

from __future__ import annotations

__all__ = [
    "AsyncWSGIError",
    "ClientDisconnected",
    "ConfigError",
    "InvalidResponse",
    "RequestRejected",
]


class AsyncWSGIError(Exception):
    """Base class of every error asyncwsgi raises on purpose."""


class ConfigError(AsyncWSGIError, ValueError):
    """A configuration value is invalid: a bad bind address, a negative limit, an unknown loop.

    Raised by :class:`asyncwsgi.Config` on construction, and by the CLI for a bad flag value.
    """


class ClientDisconnected(AsyncWSGIError, OSError):
    """The client closed the connection, or stopped reading for longer than the write timeout.

    Raised in the pool thread, into the application: by ``wsgi.input.read*()`` when the client
    goes away mid-upload, and by ``write()`` or when it passes on the next response chunk if it
    goes away mid-download (waitress raises its ``ClientDisconnected`` the same way). It is an
    :class:`OSError` so that code which already handles socket errors handles it too.
    """


class RequestRejected(AsyncWSGIError):
    """The request is malformed or breaks a limit; it gets ``status`` and never reaches the app.

    Attributes:
        status: the HTTP status to answer with: 400, 408, 413, 414, 431 or 501 (RFC 9110
            section 15.5).
        reason: a short, safe, human-readable explanation, sent as the response body and logged.
    """

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(f"{status} {reason}")
        self.status = status
        self.reason = reason


class InvalidResponse(AsyncWSGIError):
    """A response cannot be sent as asked: its head breaks HTTP/1.1 framing rules, or a response
    is already under way on the connection.

    Raised by :class:`asyncwsgi.http11.ServerConnection` (loop thread); the connection must be
    cut, since nothing well-framed can follow (RFC 9112 section 9.6).
    """
