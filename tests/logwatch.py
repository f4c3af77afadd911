"""LogWatch: collect ``asyncwsgi.error`` records in a test and wait for a given one, without sleeps.

Records come from the loop thread and from worker threads; a waiter blocks on a
:class:`threading.Event` in a helper thread (``asyncio.to_thread``), so the test's loop, which
may be the server's, keeps running.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from .helpers import TIMEOUT


class LogWatch(logging.Handler):
    """A handler on the ``asyncwsgi.error`` logger that keeps every record it sees."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []
        self._changed = threading.Condition()

    def emit(self, record: logging.LogRecord) -> None:
        with self._changed:
            self.records.append(record)
            self._changed.notify_all()

    def messages(self, level: int = logging.DEBUG) -> list[str]:
        """The formatted messages at ``level`` or above, in order."""
        with self._changed:
            return [r.getMessage() for r in self.records if r.levelno >= level]

    def errors(self) -> list[logging.LogRecord]:
        """The records at ERROR or above."""
        with self._changed:
            return [r for r in self.records if r.levelno >= logging.ERROR]

    def _wait(self, fragment: str, count: int) -> bool:
        with self._changed:
            return self._changed.wait_for(
                lambda: sum(fragment in r.getMessage() for r in self.records) >= count, TIMEOUT
            )

    async def wait_for(self, fragment: str, count: int = 1) -> None:
        """Wait until ``count`` messages containing ``fragment`` have been logged.

        Raises:
            AssertionError: they did not come within :data:`TIMEOUT` seconds.
        """
        found = await asyncio.to_thread(self._wait, fragment, count)
        assert found, f"no log line with {fragment!r} in {self.messages()}"


@contextmanager
def watch_errors() -> Iterator[LogWatch]:
    """Attach a :class:`LogWatch` to ``asyncwsgi.error`` at DEBUG for the ``with`` block."""
    logger = logging.getLogger("asyncwsgi.error")
    watch = LogWatch()
    level, disabled = logger.level, logger.disabled
    logger.addHandler(watch)
    logger.setLevel(logging.DEBUG)
    logger.disabled = False
    try:
        yield watch
    finally:
        logger.removeHandler(watch)
        logger.setLevel(level)
        logger.disabled = disabled
