"""The pool-thread side of PEP 3333: call the application, check its response, pass it on.

:func:`run_wsgi` runs in a pool thread, once per request. It calls the application with the
``environ`` and a ``start_response``, validates the status and headers (a bad one is a 500,
never a split response), iterates the result and hands the head and body to a
:class:`~asyncwsgi.bridge.ResponseSink`. The result's ``close()`` is called exactly once, in a
``finally``, on every path. This module has no socket and no asyncio: ``tests/test_wsgi.py`` runs
it with a fake sink in a plain thread.
"""

from __future__ import annotations

import contextlib
import logging
import re
import sys
import time
import traceback
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, Protocol

from .errors import ClientDisconnected
from .events import ResponseHead
from .filewrapper import FileWrapper
from .http11 import error_response
from .logs import LogThrottle, escape
from .pool import current_thread_ident

if TYPE_CHECKING:
    from ._types import OptExcInfo, WSGIApplication, WSGIEnvironment

__all__ = ["run_wsgi", "Sink", "HOP_BY_HOP", "ResponseError", "LogThrottle"]

logger = logging.getLogger("asyncwsgi.error")

#: Hop-by-hop fields (RFC 9110 section 7.6.1); PEP 3333 forbids applications to send them.
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "trailers",
        "transfer-encoding",
        "upgrade",
    }
)

# A final status (2xx-5xx; 1xx are the server's business) and an optional reason phrase.
_STATUS_RE = re.compile(r"[2-5][0-9][0-9](?: [^\x00-\x08\x0a-\x1f\x7f]*)?\Z")
_TOKEN_RE = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+\Z")
_VALUE_RE = re.compile(r"[^\x00-\x08\x0a-\x1f\x7f]*\Z")
_NAME_CACHE: dict[str, bytes] = {}
# Validated, encoded (name, value) pairs an app sends again and again (Content-Type, Vary,
# X-Frame-Options...), by the str pair. Bounded; any thread.
_PAIR_CACHE: dict[tuple[str, str], tuple[bytes, bytes]] = {}
# The same for Content-Length pairs, kept apart: a response may carry only one.
_LENGTH_CACHE: dict[tuple[str, str], tuple[bytes, bytes]] = {}
# Validated status lines: (status code, reason phrase as latin-1 bytes). Bounded; any thread.
_STATUS_CACHE: dict[str, tuple[int, bytes]] = {}
_SERVER_ERROR_BODY = b"Internal Server Error\n"
_REQUEST_TIMEOUT_BODY = b"Request Timeout\n"
_UNAVAILABLE_BODY = b"Service Unavailable\n"
#: Seconds a client told 503 is asked to wait before it tries again (RFC 9110 section 10.2.3).
RETRY_AFTER = b"1"


_queue_throttle = LogThrottle()


class Sink(Protocol):
    """What :func:`run_wsgi` hands the response to (see :class:`asyncwsgi.bridge.ResponseSink`)."""

    can_sendfile: bool
    disconnected: bool
    #: Set by :func:`run_wsgi` to the ident of the pool thread that calls the application.
    thread: int

    def send(
        self, head: ResponseHead | None, chunks: list[bytes], nbytes: int, end: bool
    ) -> None: ...

    def send_file(
        self, head: ResponseHead, wrapper: FileWrapper, offset: int, count: int
    ) -> None: ...

    def abort(self) -> None: ...


class ResponseError(Exception):
    """The application broke PEP 3333: bad status or headers, no ``start_response``, str body."""


def _encode_head(status: object, headers: object) -> ResponseHead:
    """Validate ``start_response`` arguments and encode them to latin-1 bytes.

    Raises:
        ResponseError: status or headers are not native strings of the right form, contain
            CR, LF or NUL (response splitting), or name a hop-by-hop field.
    """
    status_line = _STATUS_CACHE.get(status) if type(status) is str else None
    if status_line is None:
        if type(status) is not str or not _STATUS_RE.match(status):
            raise ResponseError(f"invalid status line {status!r}")
        status_line = (int(status[:3]), status[4:].encode("latin-1", "replace"))
        if len(_STATUS_CACHE) < 256:
            _STATUS_CACHE[status] = status_line
    if type(headers) is not list:
        raise ResponseError(f"headers must be a list, got {type(headers).__name__}")
    encoded: list[tuple[bytes, bytes]] = []
    append = encoded.append
    length_seen = False
    for item in headers:
        if type(item) is not tuple or len(item) != 2:
            raise ResponseError(f"header must be a (name, value) tuple, got {item!r}")
        try:
            pair = _PAIR_CACHE.get(item)
        except TypeError:  # unhashable: not two strings, refused below
            pair = None
        if pair is not None:
            append(pair)
            continue
        pair = _LENGTH_CACHE.get(item)
        if pair is not None:
            if length_seen:
                raise ResponseError(f"invalid or repeated Content-Length {item[1]!r}")
            length_seen = True
            append(pair)
            continue
        name, value = item
        raw_name = _NAME_CACHE.get(name)
        if raw_name is None:
            if type(name) is not str or not _TOKEN_RE.match(name):
                raise ResponseError(f"invalid header name {name!r}")
            if name.lower() in HOP_BY_HOP:
                raise ResponseError(f"hop-by-hop header {name!r} is not allowed (PEP 3333)")
            raw_name = name.encode("ascii")
            if len(_NAME_CACHE) < 512:
                _NAME_CACHE[name] = raw_name
        if type(value) is not str or not _VALUE_RE.match(value):
            raise ResponseError(f"invalid value for header {name!r}: {value!r}")
        try:
            # RFC 9110 section 5.5: surrounding whitespace is not part of a field value.
            raw_value = value.strip(" \t").encode("latin-1")
        except UnicodeEncodeError:
            raise ResponseError(f"header {name!r} value is not latin-1") from None
        if raw_name.lower() == b"content-length":
            if not raw_value.isdigit() or length_seen:
                raise ResponseError(f"invalid or repeated Content-Length {value!r}")
            length_seen = True
            pair = (raw_name, raw_value)
            if len(_LENGTH_CACHE) < 1024:
                _LENGTH_CACHE[item] = pair
            append(pair)
            continue
        pair = (raw_name, raw_value)
        if len(_PAIR_CACHE) < 1024:
            _PAIR_CACHE[item] = pair
        append(pair)
    return ResponseHead(status_line[0], status_line[1], encoded)


class _Response:
    """``start_response`` and ``write`` for one request. Pool thread only."""

    __slots__ = ("head", "head_handed_over", "sink")

    def __init__(self, sink: Sink) -> None:
        self.sink = sink
        self.head: ResponseHead | None = None
        #: Whether the head has been handed to the sink (it may not be on the wire yet).
        self.head_handed_over = False

    def start_response(
        self,
        status: str,
        headers: list[tuple[str, str]],
        exc_info: OptExcInfo | None = None,
        /,
    ) -> Callable[[bytes], object]:
        """PEP 3333 ``start_response``: validate and store the head; return ``write``.

        Raises:
            ResponseError: a second call without ``exc_info``, or an invalid status or header.
            BaseException: with ``exc_info`` once the head has been sent, that exception again.
        """
        if exc_info is not None and exc_info[1] is not None:
            try:
                if self.head_handed_over:
                    raise exc_info[1].with_traceback(exc_info[2])
            finally:
                exc_info = None
        elif self.head is not None:
            raise ResponseError("start_response() called a second time without exc_info")
        self.head = _encode_head(status, headers)
        return self.write

    def take_head(self) -> ResponseHead:
        head = self.head
        if head is None:
            raise ResponseError("the application did not call start_response()")
        self.head_handed_over = True
        return head

    def write(self, data: bytes) -> None:
        """PEP 3333 ``write()``: send ``data`` now (after the head, on first use).

        Raises:
            TypeError: ``data`` is not bytes.
            ClientDisconnected: the client has gone away.
        """
        if type(data) is not bytes:
            if not isinstance(data, bytes):
                raise TypeError(f"response body chunks must be bytes, got {type(data).__name__}")
            data = bytes(data)
        if self.head_handed_over:
            if data:
                self.sink.send(None, [data], len(data), False)
        else:
            # The first write() sends the head even when empty (PEP 3333 "The write() Callable").
            self.sink.send(self.take_head(), [data] if data else [], len(data), False)


def run_wsgi(
    app: WSGIApplication,
    environ: WSGIEnvironment,
    sink: Sink,
    queued_at: float = 0.0,
    queue_timeout: float = 0.0,
    request_timeout: float = 0.0,
) -> None:
    """Run one request through the application and hand its response to ``sink``.

    Pool thread only. Never raises: an application error before the head was handed over
    becomes a 500 and a logged traceback; after it, the connection is aborted. That includes
    every ``BaseException`` the application's code raises (from the call, ``start_response``,
    iterating the result or reading ``wsgi.input``): ``sys.exit()`` or argparse in a view raises
    ``SystemExit`` in this pool thread, which must neither end the thread nor stop the server
    (signals, and so a real Ctrl-C, only ever reach the main thread). ``close()`` of the result
    runs in a ``finally``, exactly once (PEP 3333 "Specification Details"); whatever it raises is
    logged, never propagated.

    A client still connected that timed out (``wsgi.input`` got no data for ``timeout_read``
    seconds, or the response waited ``timeout_write`` seconds for it to read) gets 408 when the
    head has not gone out, else its connection is cut.

    Args:
        app: the WSGI application.
        environ: the request's environ (see :func:`asyncwsgi.environ.build_environ`).
        sink: where the response goes.
        queued_at: ``time.perf_counter()`` when the request head was complete (0: unknown).
        queue_timeout: seconds the request may have waited; past them it gets 503 with
            ``Retry-After`` and the application is not called. 0 disables the check.
        request_timeout: ``--timeout-request``, seconds; a request that waited that long has
            been (or is about to be) answered 504 by the loop, and the application is not
            called. 0 disables the check.

    The application is never called for a request whose response has already gone out or
    whose client is gone (``sink.disconnected``: a 504, a reset connection, a shutdown that
    cut it), nor for one past ``request_timeout``: its side effects would reach nobody. A
    client that only half-closed is still served. The environ gets
    ``asyncwsgi.queue_time``: seconds from the complete head to the application call.
    """
    waited = time.perf_counter() - queued_at if queued_at else 0.0
    if sink.disconnected or (request_timeout and waited >= request_timeout):
        if logger.isEnabledFor(logging.INFO):
            logger.info(
                "%s waited %.1f s for a thread and was answered meanwhile (or its client "
                "went away); the application is not called",
                _path(environ),
                waited,
            )
        return
    if queue_timeout and waited > queue_timeout:
        environ["asyncwsgi.rejected"] = "queue_timeout"  # for the metrics (on the loop)
        _too_late(environ, sink, waited)
        return
    environ["asyncwsgi.queue_time"] = waited
    sink.thread = current_thread_ident()
    response = _Response(sink)
    result: Iterable[bytes] | None = None
    try:
        result = app(environ, response.start_response)
        if type(result) is list or type(result) is tuple:
            _send_sequence(response, result)
        elif type(result) is FileWrapper and sink.can_sendfile and _send_file(response, result):
            result = None  # the loop owns the file now and has it closed in a pool thread
        else:
            _send_iterable(response, result)
    except ClientDisconnected as exc:
        _client_gone(response, environ, exc)
    except BaseException:  # SystemExit, KeyboardInterrupt... too: they are the app's, not ours
        _fail(response, environ, sys.exc_info())
    finally:
        if result is not None:
            try:
                close = getattr(result, "close", None)
                if close is not None:
                    close()
            except BaseException:
                logger.exception("Error closing the response of %s", _path(environ))


def _send_sequence(response: _Response, result: list[bytes] | tuple[bytes, ...]) -> None:
    """Send a body that is all in memory with its head, in one call: its length is known."""
    chunks: list[bytes] = []
    nbytes = 0
    for chunk in result:
        if type(chunk) is not bytes:
            if not isinstance(chunk, bytes):
                raise TypeError(f"response body chunks must be bytes, got {type(chunk).__name__}")
            chunk = bytes(chunk)
        if chunk:
            chunks.append(chunk)
            nbytes += len(chunk)
    if response.head_handed_over:
        response.sink.send(None, chunks, nbytes, True)
    else:
        response.sink.send(response.take_head(), chunks, nbytes, True)


def _send_iterable(response: _Response, result: Iterable[bytes]) -> None:
    """Send each chunk as the app yields it: a block is never held back (PEP 3333 "Buffering")."""
    write = response.write
    for chunk in result:
        if chunk or type(chunk) is not bytes:  # an empty block does not send the head
            write(chunk)
    if response.head_handed_over:
        response.sink.send(None, [], 0, True)
    else:
        response.sink.send(response.take_head(), [], 0, True)


def _send_file(response: _Response, wrapper: FileWrapper) -> bool:
    """Hand a file body to the loop for sendfile(2); False when it must be iterated instead."""
    if response.head_handed_over:
        return False
    file_range = wrapper.sendfile_range()
    if file_range is None:
        return False
    _, offset, count = file_range
    head = response.take_head()
    response.sink.send_file(head, wrapper, offset, count)
    return True


def _fail(response: _Response, environ: WSGIEnvironment, exc_info: OptExcInfo) -> None:
    """Answer 500 if the head has not gone out, else abort the connection; log once."""
    logger.error("Error handling request %s", _path(environ), exc_info=exc_info)
    sink = response.sink
    if response.head_handed_over:
        sink.abort()
        return
    if sink.disconnected:
        return
    body = _SERVER_ERROR_BODY
    if environ.get("asyncwsgi.expose_tracebacks"):
        body += "".join(traceback.format_exception(exc_info[1])).encode("utf-8", "replace")
    response.head_handed_over = True
    _send_error(sink, 500, body)


def _client_gone(response: _Response, environ: WSGIEnvironment, exc: ClientDisconnected) -> None:
    """The application gave up on the client: nothing to send when it is gone; 408 or a cut
    connection when it is there but timed out (read or write)."""
    sink = response.sink
    if sink.disconnected:
        logger.debug("client disconnected during %s", _path(environ))
        return
    log = logger.isEnabledFor(logging.INFO)
    if response.head_handed_over:
        if log:
            logger.info("%s: %s; closing the connection", _path(environ), exc)
        sink.abort()
        return
    if log:
        logger.info("%s: %s; answering 408", _path(environ), exc)
    response.head_handed_over = True
    _send_error(sink, 408, _REQUEST_TIMEOUT_BODY)


def _too_late(environ: WSGIEnvironment, sink: Sink, waited: float) -> None:
    """Answer 503 to a request that waited too long for a thread; log it, throttled."""
    count = _queue_throttle.ready()
    if count:
        logger.warning(
            "%s waited %.1f s for a thread (over --timeout-queue): answered 503 "
            "(%d such request(s) since the last report)",
            _path(environ),
            waited,
            count,
        )
    _send_error(sink, 503, _UNAVAILABLE_BODY, (b"Retry-After", RETRY_AFTER))


def _send_error(sink: Sink, status: int, body: bytes, *extra: tuple[bytes, bytes]) -> None:
    """Hand over a complete plain-text error response that closes the connection (its head
    from :func:`asyncwsgi.http11.error_response`, like every error the server makes)."""
    with contextlib.suppress(ClientDisconnected):
        sink.send(error_response(status, *extra), [body], len(body), True)


def _path(environ: WSGIEnvironment) -> str:
    """Return ``METHOD /path`` with control characters escaped, for log lines."""
    method: Any = environ.get("REQUEST_METHOD", "-")
    path: Any = environ.get("SCRIPT_NAME", "") + environ.get("PATH_INFO", "")
    return escape(f"{method} {path}")
