"""Logging: the ``asyncwsgi.error`` and ``asyncwsgi.access`` loggers, and log-safe text.

Log lines never carry raw request bytes: :func:`escape` turns control characters into visible
escapes, so a request cannot forge log lines (log injection). The access line is gunicorn's
"common" shape plus the duration::

    127.0.0.1:51234 - "GET /path?q=1 HTTP/1.1" 200 13 0.412ms
"""

from __future__ import annotations

import logging
import sys

__all__ = ["error_logger", "access_logger", "escape", "configure_logging", "TRACE"]

error_logger = logging.getLogger("asyncwsgi.error")
access_logger = logging.getLogger("asyncwsgi.access")

#: A level below DEBUG for per-event tracing, as uvicorn's ``--log-level trace``.
TRACE = 5
logging.addLevelName(TRACE, "TRACE")

# C0 and C1 controls, DEL, and the other latin-1 characters that are not printable (NBSP, soft
# hyphen): a decoded PATH_INFO is latin-1, and NEL (0x85) ends a line for ``str.splitlines()``
# and some log viewers, as U+2028/U+2029 do for text that is not latin-1.
_ESCAPES: dict[int, str] = {i: f"\\x{i:02x}" for i in (*range(0x20), *range(0x7F, 0xA1), 0xAD)}
_ESCAPES[0x2028] = "\\u2028"
_ESCAPES[0x2029] = "\\u2029"
_ESCAPES[ord("\\")] = "\\\\"
_ESCAPES[ord('"')] = '\\"'


def escape(text: str) -> str:
    """Return ``text`` with control characters, backslash and quote escaped (``\\x0a``)."""
    if text.isprintable() and "\\" not in text and '"' not in text:
        return text
    return text.translate(_ESCAPES)


_FORMAT = "[%(asctime)s] [%(process)d] [%(levelname)s] %(message)s"
_DATE_FORMAT = "%Y-%m-%d %H:%M:%S %z"


def configure_logging(level: str, access_log: bool) -> None:
    """Send both loggers to stderr in gunicorn's format, at ``level`` (``info``, ``debug``...).

    Used by the CLI and :func:`asyncwsgi.run`; ``serve()`` leaves logging to its host program.
    """
    numeric = TRACE if level == "trace" else getattr(logging, level.upper())
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(_FORMAT, _DATE_FORMAT))
    for logger in (error_logger, access_logger):
        logger.handlers[:] = [handler]
        logger.propagate = False
    error_logger.setLevel(numeric)
    access_logger.setLevel(numeric if access_log else logging.CRITICAL + 1)
