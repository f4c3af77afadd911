"""``wsgi.file_wrapper`` (PEP 3333 "Optional Platform-Specific File Handling").

:class:`FileWrapper` is what an application gets as ``environ["wsgi.file_wrapper"]``. Returned
from the application, it lets the server send a regular file with ``sendfile(2)``: the loop
copies file pages straight to the socket, and the pool thread is free as soon as the app
returns. Where that cannot apply (TLS, an object without a real ``fileno()``, a pipe) it is an
ordinary iterable of ``block_size`` blocks, read in the pool thread.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from typing import IO, Any

__all__ = ["FileWrapper"]


class FileWrapper:
    """Wrap a file-like object as a WSGI response body.

    Args:
        filelike: an object with ``read(n)``; ``fileno()``, ``tell()`` and ``close()`` are used
            when present.
        block_size: bytes per block when the file is iterated rather than sent by sendfile.

    Iterating reads ``block_size`` blocks until ``read`` returns ``b""``. :meth:`close` closes
    the file-like object if it has ``close()`` (Django hooks its response's ``close`` there).
    Any thread.
    """

    __slots__ = ("block_size", "filelike")

    def __init__(self, filelike: IO[bytes] | Any, block_size: int = 64 * 1024) -> None:
        self.filelike = filelike
        self.block_size = block_size

    def __iter__(self) -> Iterator[bytes]:
        # Its own iterator, as wsgiref's: code that keeps ``iter(wrapper)`` and closes that
        # (Werkzeug's range wrapper) still reaches close().
        return self

    def __next__(self) -> bytes:
        block = self.filelike.read(self.block_size)
        if not block:
            raise StopIteration
        return block

    def close(self) -> None:
        """Close the wrapped object, if it can be closed."""
        close = getattr(self.filelike, "close", None)
        if close is not None:
            close()

    def sendfile_range(self) -> tuple[int, int, int] | None:
        """Return ``(fd, offset, count)`` when the body can go out by ``sendfile(2)``, else None.

        Only a regular file with a real ``fileno()`` qualifies; ``offset`` is its current position
        (so a file the app has seeked into is sent from there) and ``count`` the bytes to its end.
        Pool thread (it calls ``fstat`` and ``tell``).
        """
        filelike = self.filelike
        try:
            fd = filelike.fileno()
            if not isinstance(fd, int) or fd < 0:
                return None
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                return None
            offset = filelike.tell() if hasattr(filelike, "tell") else 0
        except (AttributeError, OSError, ValueError):
            return None
        if not isinstance(offset, int) or offset < 0:
            return None
        return fd, offset, max(0, st.st_size - offset)
