"""The response side of :class:`~asyncwsgi.channel.HTTPChannel`: writing what the pool thread
passes back, the access log line, and the error responses the server makes itself.

These functions are methods of ``HTTPChannel`` (its class body binds them), kept in their own
module so that each module reads as one concern. They run on the loop thread, on the channel's
own state, typed against :class:`~asyncwsgi.state.Channel` (the interface the channel
implements), so that this module does not import the channel. The ``on_response_*`` ones are
the :class:`~asyncwsgi.bridge.ResponseTarget` that the :class:`~asyncwsgi.bridge.ResponseSink`
calls through ``call_soon_threadsafe``.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

from .accesslog import AccessRecord
from .bridge import ResponseSink
from .connstate import ENDING, SENDING_FILE
from .errors import InvalidResponse, RequestRejected
from .events import ResponseHead
from .filewrapper import FileWrapper
from .logs import access_line_handler, access_logger, error_logger, escape
from .metrics import count_rejected, rejection_reason
from .pool import thread_stack
from .sendfile import FileSender
from .wsgi import RETRY_AFTER

if TYPE_CHECKING:
    from .connstate import RequestCycle
    from .state import Channel

__all__ = [
    "on_response_data",
    "on_response_file",
    "on_file_sent",
    "end_file_response",
    "on_response_abort",
    "close_in_pool",
    "write",
    "log_access",
    "request_line",
    "reject",
    "answer",
    "overloaded",
    "answer_health",
    "head_timeout",
    "request_timeout",
]

# Responses up to this many body bytes are joined into one write.
_JOIN_BELOW = 16 * 1024
# Body blocks passed on together, up to this many bytes, are framed and written as one.
_MERGE_BELOW = 512 * 1024


# -- ResponseTarget: the response, from the pool thread through call_soon_threadsafe -------


def on_response_data(
    self: Channel,
    sink: ResponseSink,
    head: ResponseHead | None,
    chunks: list[bytes],
    end: bool,
    body_length: int | None,
) -> None:
    """Write the head and body chunks from the pool thread; finish the cycle at the end.

    ``body_length`` is the size of the whole body when it came with its head.
    """
    cycle = self.cycle
    if self.state in ENDING or cycle is None or cycle.sink is not sink:
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
                    self.server.date_header,
                    body_length,
                    close=self.server.shutting_down,
                )
            )
        if len(chunks) > 1 and nbytes <= _MERGE_BELOW:
            # Blocks the app yielded since the last delivery go out as one HTTP chunk (or
            # one piece of a Content-Length body): one copy costs less than framing each
            # block. PEP 3333 asks that no block be held back, not that each keep its own
            # chunk.
            out.extend(conn.send_data(b"".join(chunks)))
        else:
            for chunk in chunks:
                out.extend(conn.send_data(chunk))
        tail = conn.send_end() if end else b""
    except InvalidResponse as exc:
        error_logger.error("Invalid response to %s: %s", self._request_line(cycle), exc)
        self.abort()
        return
    if tail:
        out.append(tail)
    transport = self.transport
    assert transport is not None
    self.bytes_written += sum(map(len, out))
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
    self: Channel,
    sink: ResponseSink,
    head: ResponseHead,
    wrapper: FileWrapper,
    offset: int,
    count: int,
) -> None:
    """Write the head, then send the file by sendfile(2) from the loop."""
    cycle = self.cycle
    if self.state in ENDING or cycle is None or cycle.sink is not sink:
        self._close_in_pool(wrapper)
        return
    conn = self.conn
    status, reason, headers = head
    cycle.status = status
    cycle.response_headers = headers
    try:
        self._write(
            conn.send_response(
                status,
                reason,
                headers,
                self.server.date_header,
                count,
                close=self.server.shutting_down,
            )
        )
        left = conn.bytes_left
        count = min(count, left if left is not None else count)
        if count:
            pieces = conn.send_file_placeholder(count)
            assert not pieces  # Content-Length framing: nothing around the file bytes
    except InvalidResponse as exc:
        error_logger.error("Invalid response to %s: %s", self._request_line(cycle), exc)
        self._close_in_pool(wrapper)
        self.abort()
        return
    if not count:
        self._close_in_pool(wrapper)
        self._end_file_response(cycle)
        return
    assert self.transport is not None
    sender = self.file_sender = FileSender(
        self.loop, self.transport, wrapper, offset, count, self.on_file_sent
    )
    self.set_state(SENDING_FILE)
    sender.start()


def on_file_sent(self: Channel, sender: FileSender, error: OSError | None) -> None:
    """The sendfile of ``sender`` finished (``error`` is None) or failed."""
    self._close_in_pool(sender.wrapper)
    if self.file_sender is not sender:
        return
    self.file_sender = None
    self.bytes_written += sender.sent
    cycle = self.cycle
    if cycle is None or self.state in ENDING:
        return
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


def end_file_response(self: Channel, cycle: RequestCycle) -> None:
    tail = self.conn.send_end()
    if tail:
        self._write(tail)
    self._end_response(cycle, tail)


def on_response_abort(self: Channel, sink: ResponseSink) -> None:
    """The app failed after its head went out: cut the connection (RFC 9112 section 9.6)."""
    cycle = self.cycle
    if cycle is not None and cycle.sink is sink:
        self.abort()


def close_in_pool(self: Channel, wrapper: FileWrapper) -> None:
    """Run ``wrapper.close()`` in the pool: it may be app code (Django's response.close)."""
    self.server.pool.submit(_close_quietly, wrapper)


def write(self: Channel, data: bytes) -> None:
    assert self.transport is not None
    self.bytes_written += len(data)
    self.transport.write(data)


# -- the access log ---------------------------------------------------------------------


#: The built-in access line (see :mod:`asyncwsgi.logs`).
_ACCESS_LINE = '%s - "%s %s HTTP/%s" %d %d %.3fms'


def log_access(self: Channel, cycle: RequestCycle) -> None:
    """Log the access line of ``cycle``: straight into the access log's batch when asyncwsgi's
    own handler is its only one, else as a logging record (see :mod:`asyncwsgi.logs`)."""
    request = cycle.request
    handler = access_line_handler()
    access_format = self.server.access_format
    if access_format is not None:
        record = AccessRecord(
            client=self.client,
            environ=cycle.environ,
            method=request.method,
            target=request.target,
            version=request.http_version,
            headers=request.headers,
            status=cycle.status,
            response_headers=cycle.response_headers,
            sent=self.conn.body_bytes_sent,
            duration=time.perf_counter() - cycle.started,
        )
        if handler is not None:
            handler.add(access_format.render(record))
        else:
            access_logger.info("%s", access_format.render(record))
        return
    args = (
        self.client,
        request.method.decode("ascii"),  # a token (RFC 9110 section 9.1): nothing to escape
        escape(request.target.decode("latin-1")),
        request.http_version.decode("latin-1"),
        cycle.status,
        self.conn.body_bytes_sent,
        (time.perf_counter() - cycle.started) * 1000.0,
    )
    if handler is not None:
        handler.add(_ACCESS_LINE % args)
    else:
        access_logger.info(_ACCESS_LINE, *args)


def request_line(self: Channel, cycle: RequestCycle) -> str:
    request = cycle.request
    return escape(f"{request.method.decode('latin-1')} {request.target.decode('latin-1')}")


# -- error responses ----------------------------------------------------------------------


def reject(self: Channel, exc: RequestRejected) -> None:
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
    count_rejected(self.server.metrics, rejection_reason(exc.status), exc.status, cycle)
    data = self.conn.send_rejection(exc.status, exc.reason, self.server.date_header)
    if data and self.transport is not None and self.state not in ENDING:
        self._write(data)
    self._close_after_response()


def answer(self: Channel, cycle: RequestCycle, status: int, *extra: tuple[bytes, bytes]) -> None:
    """Answer the request in flight with a short plain-text ``status``; then close."""
    try:
        data = self.conn.send_error(status, self.server.date_header, *extra)
    except InvalidResponse:
        self.abort()  # a response had already begun: only cutting is left
        return
    cycle.status = status
    self._write(data)
    self._finish_cycle(cycle, keep_alive=False)


def overloaded(self: Channel, cycle: RequestCycle) -> None:
    """Answer 503 at once: ``--limit-concurrency`` requests are in progress."""
    server = self.server
    count = server.overload_log.ready()
    if count:
        error_logger.warning(
            "%d requests in progress (--limit-concurrency): answered 503 to %s "
            "(%d such request(s) since the last report)",
            server.requests_active,
            self._request_line(cycle),
            count,
        )
    count_rejected(server.metrics, "limit_concurrency")
    self._answer(cycle, 503, (b"Retry-After", RETRY_AFTER))


def answer_health(self: Channel, cycle: RequestCycle) -> None:
    """Answer ``--health-path`` on the loop: 200 ``ok`` while the server is
    :attr:`~asyncwsgi.state.ServerState.healthy`, else 503; then close, as every answer the
    server makes itself. No thread, no access line, not counted as a request."""
    server = self.server
    self._write(self.conn.send_error(200 if server.healthy else 503, server.date_header))
    self.cycle = None
    self._close_after_response()


def head_timeout(self: Channel) -> None:
    """Answer 408 to a request head not complete within ``timeout_request_header``."""
    if error_logger.isEnabledFor(logging.INFO):
        error_logger.info(
            "No complete request head from %s in %g s (--timeout-request-header): 408",
            self.client,
            self.config.timeout_request_header,
        )
    count_rejected(self.server.metrics, "header_timeout", 408)
    data = self.conn.send_rejection(
        408, "request head not complete in time", self.server.date_header
    )
    if data and self.transport is not None:
        self._write(data)
    self._linger()  # the client may be sending the rest of its head


def request_timeout(self: Channel, cycle: RequestCycle, sink: ResponseSink) -> None:
    """Answer 504: the app has not started its response within ``timeout_request``.

    The pool thread is not stopped (Python cannot): its next send raises, so its output is
    discarded and its ``close()`` runs; a read of the body raises at once. A thread still in
    the application counts as stuck (:meth:`~asyncwsgi.pool.ThreadPool.mark_stuck`): the
    record logged names it, with its stack, and the pool replaces it. A request that has not
    reached a thread yet never will (:func:`~asyncwsgi.wsgi.run_wsgi`).
    """
    server = self.server
    name = server.pool.mark_stuck(sink.thread) if sink.thread else None
    if name is None:
        error_logger.error(
            "%s did not start its response in %g s (--timeout-request): answered 504; %s",
            self._request_line(cycle),
            self.config.timeout_request,
            "its output will be discarded" if sink.thread else "the application is not called",
        )
    else:
        stuck = server.pool.stuck
        error_logger.error(
            "%s did not start its response in %g s (--timeout-request): answered 504; "
            "worker thread %s is stuck in it (%d stuck, a replacement for each up to %d), "
            "its output will be discarded. Its stack:\n%s",
            self._request_line(cycle),
            self.config.timeout_request,
            name,
            stuck,
            self.config.threads,
            thread_stack(sink.thread).rstrip("\n"),
        )
        if stuck == self.config.threads and server.on_threads_stuck is not None:
            server.on_threads_stuck()
    count_rejected(server.metrics, "request_timeout")
    sink.disconnect()
    if cycle.body is not None:
        cycle.body.disconnect("the request timed out")
    self._answer(cycle, 504)


def _close_quietly(wrapper: FileWrapper) -> None:
    """Pool thread: close a file body, logging (not raising) an error."""
    try:
        wrapper.close()
    except BaseException:  # app code: SystemExit and the like are logged too, never propagated
        error_logger.exception("Error closing a file response")
