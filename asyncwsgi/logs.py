"""Logging: the ``asyncwsgi.error`` and ``asyncwsgi.access`` loggers, and log-safe text.

Log lines never carry raw request bytes: :func:`escape` turns control characters into visible
escapes, so a request cannot forge log lines (log injection). The access line is gunicorn's
"common" shape plus the duration::

    127.0.0.1:51234 - "GET /path?q=1 HTTP/1.1" 200 13 0.412ms

The handlers that :func:`setup_logging` installs are :class:`BatchingHandler` s: access lines
gather in memory and are written in batches, as nginx's ``access_log ... buffer=64k flush=1s``,
instead of one ``write(2)`` each. A batch is written when :data:`BATCH_SIZE` has gathered, by
:func:`flush_logs` (which the server's housekeeping calls about ten times a second, and at every
shutdown), before SIGUSR1 reopens the files (:func:`reopen_log_files`), before any other record
the handler writes (so an error line never comes before the access lines of earlier requests),
and at exit (:func:`logging.shutdown`). While the access logger writes to such a handler alone,
the server hands it finished lines (:func:`access_line_handler`) and makes no
:class:`logging.LogRecord` at all; with any other handler in the way (``--log-config``, a test's
``caplog``) access lines are ordinary records, as before.
"""

from __future__ import annotations

import logging
import os
import sys
import time
import weakref
from collections import deque
from typing import TYPE_CHECKING, Any, Protocol, TextIO

from .errors import ConfigError

__all__ = [
    "error_logger",
    "access_logger",
    "escape",
    "configure_logging",
    "LoggingSettings",
    "LogThrottle",
    "BatchingHandler",
    "BatchingFileHandler",
    "BATCH_SIZE",
    "access_line_handler",
    "flush_logs",
    "setup_logging",
    "load_log_config",
    "TRACE",
]

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


def _level(level: str) -> int:
    return TRACE if level == "trace" else int(getattr(logging, level.upper()))


#: Characters of access lines (about bytes: they are mostly ASCII) gathered before a batch is
#: written; nginx's ``access_log ... buffer=64k``.
BATCH_SIZE = 64 * 1024

_batching: weakref.WeakSet[BatchingHandler] = weakref.WeakSet()


if TYPE_CHECKING:
    _StreamHandler = logging.StreamHandler[TextIO]
else:  # generic at run time from Python 3.11 only
    _StreamHandler = logging.StreamHandler


class BatchingHandler(_StreamHandler):
    """A stream handler that writes access lines in batches and any other record at once.

    Args:
        stream: where lines go (``sys.stderr``, ``sys.stdout``).
        prefixed: format records in gunicorn's error-log shape (``[time] [pid] [LEVEL] msg``);
            else the bare message, as ``--access-logfile`` writes it.

    Any thread. :meth:`add` takes no lock: it appends to a :class:`collections.deque`, which
    a writer on another thread empties from the other end, under the handler's lock. A batch
    that cannot be written (disk full, a closed pipe) is dropped and reported once through
    :meth:`logging.Handler.handleError`.
    """

    def __init__(self, stream: TextIO, *, prefixed: bool) -> None:
        super().__init__(stream)
        self._start_batching(prefixed)

    def _start_batching(self, prefixed: bool) -> None:
        #: The formatter the handler was made with; :meth:`add` writes what it would.
        self.own_formatter = (
            logging.Formatter(_FORMAT, _DATE_FORMAT)
            if prefixed
            else logging.Formatter("%(message)s")
        )
        self.setFormatter(self.own_formatter)
        self._prefixed = prefixed
        self._lines: deque[str] = deque()
        self._size = 0  # characters gathered; a race with a writer only brings a write forward
        self._second = -1  # the second self._prefix was made for
        self._prefix = ""
        _batching.add(self)

    def add(self, message: str) -> None:
        """Add one access line, ``message`` as an INFO record of it would read before
        formatting: the same line as :meth:`emit` makes, without the record. Loop thread."""
        if self._prefixed:
            now = int(time.time())
            if now != self._second:  # the time and pid change once a second at most
                stamp = time.strftime(_DATE_FORMAT, time.localtime(now))
                self._prefix = f"[{stamp}] [{os.getpid()}] [INFO] "
                self._second = now
            message = self._prefix + message
        self._lines.append(message)
        self._size += len(message) + 1
        if self._size >= BATCH_SIZE:
            self.flush()

    def emit(self, record: logging.LogRecord) -> None:
        """Batch an ``asyncwsgi.access`` record; write any other at once, after the batch.
        Called with the lock held (:meth:`logging.Handler.handle`)."""
        try:
            self._lines.append(self.format(record))
            if record.name == access_logger.name:
                self._size += len(self._lines[-1]) + 1
                if self._size < BATCH_SIZE:
                    return
            self._write_batch()
        except RecursionError:
            raise
        except Exception:
            self.handleError(record)

    def flush(self) -> None:
        """Write the batch, then flush the stream."""
        self.acquire()
        try:
            self._write_batch()
            super().flush()
        finally:
            self.release()

    def _write_batch(self) -> None:
        """Write the gathered lines with one ``write`` and flush the stream. Lock held."""
        lines = self._lines
        count = len(lines)
        if not count:
            return
        self._size = 0
        popleft = lines.popleft  # add() may append meanwhile, at the other end
        batch = [popleft() for _ in range(count)]
        try:
            stream = self._open_stream()
            stream.write("\n".join(batch) + "\n")
            stream.flush()
        except RecursionError:
            raise
        except Exception:
            self.handleError(logging.makeLogRecord({"msg": batch[0], "name": access_logger.name}))

    def _open_stream(self) -> TextIO:
        return self.stream

    def _after_fork(self) -> None:
        """In a forked child: the parent writes the lines gathered before the fork."""
        self._lines.clear()
        self._size = 0
        self._second = -1


class BatchingFileHandler(BatchingHandler, logging.FileHandler):
    """A :class:`BatchingHandler` on a file, appended to (``--access-logfile PATH``); a
    :class:`logging.FileHandler`, so :func:`reopen_log_files` reopens it.

    Raises:
        OSError: the file cannot be opened.
    """

    def __init__(self, path: str) -> None:
        logging.FileHandler.__init__(self, path, encoding="utf-8")
        self._start_batching(prefixed=False)

    def _open_stream(self) -> TextIO:
        if self.stream is None:  # closed, as logging.FileHandler.emit does: open again
            self.stream = self._open()
        return self.stream


def _after_fork_in_child() -> None:
    for handler in list(_batching):
        handler._after_fork()


os.register_at_fork(after_in_child=_after_fork_in_child)


def flush_logs() -> None:
    """Write the access lines every :class:`BatchingHandler` has gathered. Any thread; the
    server calls it from its housekeeping (about ten times a second) and at shutdown."""
    for handler in list(_batching):
        handler.flush()


def access_line_handler() -> BatchingHandler | None:
    """The handler to give access lines to directly (:meth:`BatchingHandler.add`), or None
    when they must be logging records: the access logger has a filter, or a handler that is not
    one of ours or not as we made it, or propagates to a logger with handlers. Loop thread;
    checked per line, so that a handler added at run time gets the next one."""
    logger = access_logger
    handlers = logger.handlers
    if len(handlers) != 1 or logger.filters:
        return None
    handler = handlers[0]
    if (
        not isinstance(handler, BatchingHandler)
        or handler.formatter is not handler.own_formatter
        or handler.filters
        or handler.level > logging.INFO
    ):
        return None
    parent = logger.parent if logger.propagate else None
    while parent is not None:
        if parent.handlers:
            return None
        parent = parent.parent if parent.propagate else None
    return handler


def configure_logging(level: str, access_log: bool) -> None:
    """Send both loggers to stderr in gunicorn's format, at ``level`` (``info``, ``debug``...),
    through one :class:`BatchingHandler`: access lines are written in batches, at most a
    housekeeping tick (a tenth of a second) late, and every other record at once.

    Used by the CLI and :func:`asyncwsgi.run` when no ``log_config`` is given; ``serve()``
    leaves logging to its host program.
    """
    handler = BatchingHandler(sys.stderr, prefixed=True)
    for logger in (error_logger, access_logger):
        logger.handlers[:] = [handler]
        logger.propagate = False
    error_logger.setLevel(_level(level))
    access_logger.setLevel(_level(level) if access_log else logging.CRITICAL + 1)


class LoggingSettings(Protocol):
    """The settings :func:`setup_logging` reads, as :class:`asyncwsgi.config.Config` has them."""

    @property
    def log_level(self) -> str: ...
    @property
    def log_config(self) -> str | None: ...
    @property
    def access_log(self) -> bool: ...
    @property
    def access_logfile(self) -> str | None: ...


def setup_logging(config: LoggingSettings) -> None:
    """Configure logging from ``config``. Main thread, before serving (and before forking
    ``--workers``, which inherit it).

    - Without ``log_config``: the stderr handler of :func:`configure_logging`.
    - With ``log_config``, the file takes over, as uvicorn's ``--log-config``: no handler of
      ours is installed, ``asyncwsgi.error`` and ``asyncwsgi.access`` propagate to the root
      logger at ``log_level``, and then the file is applied (:func:`load_log_config`), so that
      whatever it says about these loggers (handlers, level, ``propagate``) wins.
    - ``access_logfile``: access lines go to that file (appended to), or to stdout for ``-``,
      as bare lines without the error log's prefix (gunicorn's ``--access-logfile``), and not
      to the root logger; a ``log_config`` that names ``asyncwsgi.access`` overrides it.
    - ``access_log`` false (``--no-access-log``) silences the access logger, whatever the file.

    Raises:
        ConfigError: the log config file cannot be read or applied, or the access log file
            cannot be opened.
    """
    if config.log_config:
        for logger in (error_logger, access_logger):
            logger.handlers[:] = []
            logger.propagate = True
            logger.setLevel(_level(config.log_level))
    else:
        configure_logging(config.log_level, config.access_log)
    if config.access_logfile:
        handler: logging.Handler
        if config.access_logfile == "-":
            handler = BatchingHandler(sys.stdout, prefixed=False)
        else:
            try:
                handler = BatchingFileHandler(config.access_logfile)
            except OSError as exc:
                raise ConfigError(
                    f"cannot open access_logfile {config.access_logfile!r}: {exc.strerror or exc}"
                ) from None
        access_logger.handlers[:] = [handler]
        access_logger.propagate = False
    if config.log_config:
        load_log_config(config.log_config)
    if not config.access_log:
        access_logger.setLevel(logging.CRITICAL + 1)


class LogThrottle:
    """Let a repeated warning through at most once per ``interval`` seconds. Any thread.

    Overload produces the same event many times a second; one line every few seconds, with the
    number of events it stands for, says as much without flooding the log. Two threads racing
    may let one extra line through, which is harmless.

    Args:
        interval: seconds between two lines.
    """

    __slots__ = ("_count", "_interval", "_next")

    def __init__(self, interval: float = 10.0) -> None:
        self._interval = interval
        self._next = 0.0
        self._count = 0

    def ready(self) -> int:
        """Count one event; return how many events the line to log now stands for, else 0."""
        self._count += 1
        now = time.monotonic()
        if now < self._next:
            return 0
        self._next = now + self._interval
        count, self._count = self._count, 0
        return count


def reopen_log_files() -> int:
    """Reopen every file the asyncwsgi loggers and the root logger write to; return how many.

    For SIGUSR1 (gunicorn's "reopen the log files"): once logrotate has moved a file away, the
    next line goes to a new file at the same path, and no line is lost or written to the moved
    file after the signal. Any thread; a file that cannot be opened keeps its old stream and
    the error is logged.
    """
    handlers: dict[int, logging.FileHandler] = {}
    for logger in (error_logger, access_logger, logging.getLogger()):
        for handler in logger.handlers:
            if isinstance(handler, logging.FileHandler):
                handlers[id(handler)] = handler
    reopened = 0
    for handler in handlers.values():
        try:
            stream: Any = open(  # noqa: SIM115 - the handler owns it from here on
                handler.baseFilename, handler.mode, encoding=handler.encoding, errors=handler.errors
            )
        except OSError as exc:
            error_logger.error(
                "Cannot reopen log file %s: %s", handler.baseFilename, exc.strerror or exc
            )
            continue
        old = handler.setStream(stream)
        if old is not None:
            old.close()
        reopened += 1
    return reopened


def load_log_config(path: str) -> None:
    """Apply a logging configuration file.

    ``*.json`` is a :func:`logging.config.dictConfig` dictionary, ``*.yaml``/``*.yml`` the same
    in YAML (needs PyYAML), any other name a :func:`logging.config.fileConfig` INI file.
    Loggers the file does not name keep working (``disable_existing_loggers`` defaults to
    False, as uvicorn's); :func:`setup_logging` has them propagate to the root logger.

    Raises:
        ConfigError: the file is missing, malformed, or PyYAML is needed and not installed.
    """
    import importlib
    import json
    import logging.config

    try:
        if path.endswith((".json", ".yaml", ".yml")):
            with open(path, encoding="utf-8") as file:
                if path.endswith(".json"):
                    data = json.load(file)
                else:
                    try:
                        yaml = importlib.import_module("yaml")
                    except ImportError:
                        raise ConfigError(
                            f"log_config {path!r} is YAML, which needs PyYAML (pip install pyyaml)"
                        ) from None
                    data = yaml.safe_load(file)
            if not isinstance(data, dict):
                raise ConfigError(f"log_config {path!r} does not hold a mapping")
            data.setdefault("disable_existing_loggers", False)
            logging.config.dictConfig(data)
        else:
            if not os.path.isfile(path):
                raise ConfigError(f"log_config {path!r}: no such file")
            logging.config.fileConfig(path, disable_existing_loggers=False)
    except ConfigError:
        raise
    except Exception as exc:
        raise ConfigError(f"cannot apply log_config {path!r}: {exc}") from None
