"""FileSender: a file response body sent with ``os.sendfile`` from the loop thread.

uvloop has no ``loop.sendfile()`` (MagicStack/uvloop#228), and the transport owns its file
descriptor's polling. So the socket is duplicated (``os.dup``) and the duplicate watched for
writability with ``loop.add_writer``; each time it is writable and the transport's own buffer is
empty, ``os.sendfile`` copies file pages to the socket without passing through Python, up to
:data:`SENDFILE_MAX_CHUNK` bytes per event, so that the loop serves its other connections in
between. This works the same under uvloop and asyncio.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable

from .filewrapper import FileWrapper

__all__ = ["FileSender", "SENDFILE_MAX_CHUNK"]

#: Bytes sendfile(2) sends per writable event before the loop runs its other callbacks (nginx's
#: ``sendfile_max_chunk``, and its default): a fast reader of a large file must not keep other
#: connections waiting.
SENDFILE_MAX_CHUNK = 2 * 1024 * 1024


class FileSender:
    """Send ``count`` bytes of a file from ``offset`` to a transport's socket. Loop thread only.

    Args:
        loop: the event loop.
        transport: the connection's transport (plain TCP: it has a ``socket``).
        wrapper: the file body; it is the caller's to close, after ``on_finished``.
        offset: the file position to start from, in bytes.
        count: the bytes to send.
        on_finished: called once with this sender and None when the bytes were sent (or the
            file ended early: then :attr:`left` is not 0), or the ``OSError`` that stopped it;
            also, with None, after :meth:`cancel`.
    """

    __slots__ = (
        "_dup",
        "_in_fd",
        "_loop",
        "_on_finished",
        "_out_fd",
        "_transport",
        "finished",
        "left",
        "offset",
        "sent",
        "wrapper",
    )

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        transport: asyncio.Transport,
        wrapper: FileWrapper,
        offset: int,
        count: int,
        on_finished: Callable[[FileSender, OSError | None], None],
    ) -> None:
        self._loop = loop
        self._transport = transport
        self._on_finished = on_finished
        self.wrapper = wrapper
        self.offset = offset
        #: Bytes still to send, and bytes sent so far.
        self.left = count
        self.sent = 0
        self._dup = -1
        self._in_fd = -1
        self._out_fd = -1
        #: Whether the sender has stopped (all sent, failed, or cancelled).
        self.finished = False

    def start(self) -> None:
        """Start sending (after the response head was written to the transport)."""
        try:
            self._in_fd = self.wrapper.filelike.fileno()
            self._out_fd = self._transport.get_extra_info("socket").fileno()
            self._dup = os.dup(self._out_fd)
            self._loop.add_writer(self._dup, self._on_writable)
        except OSError as exc:
            self._finish(exc)
            return
        self._on_writable()

    def _on_writable(self) -> None:
        if self.finished or self._transport.get_write_buffer_size():
            return  # the head is still buffered in the transport; wait until it has gone out
        sendfile: Callable[[int, int, int, int], int] = os.sendfile
        budget = SENDFILE_MAX_CHUNK
        try:
            while self.left > 0:
                sent = sendfile(self._out_fd, self._in_fd, self.offset, min(self.left, budget))
                if sent == 0:  # the file is shorter than it was: ``left`` stays non-zero
                    break
                self.offset += sent
                self.left -= sent
                self.sent += sent
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
        self._on_finished(self, error)

    def _stop(self) -> None:
        if not self.finished:
            self.finished = True
            if self._dup >= 0:
                self._loop.remove_writer(self._dup)
                os.close(self._dup)
                self._dup = -1

    def cancel(self) -> None:
        """The connection is gone: stop, and report (so that the file gets closed)."""
        if not self.finished:
            self._stop()
            self._on_finished(self, None)
