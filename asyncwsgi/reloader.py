"""``--reload``: the file watcher process (watchfiles) and what it reports to the supervisor.

The watcher runs in a process of its own, forked by the supervisor, and writes each changed
path to a pipe, followed by a NUL byte; the supervisor starts a new generation of workers for
each batch (:class:`asyncwsgi.supervisor.Supervisor`). Which paths count is
``--reload-include``/``--reload-exclude`` (:class:`ReloadFilter`).

Main thread of the supervisor (:class:`Watcher`) and of the watcher process
(:func:`watch_files`); Unix only.
"""

from __future__ import annotations

import contextlib
import fnmatch
import os
import signal
import traceback
from collections.abc import Callable, Iterable

from .config import Config
from .logs import error_logger
from .worker import fork

__all__ = ["ReloadFilter", "Watcher", "watch_files", "forget_bytecode", "RELOAD_SETTLE_MS"]

#: Milliseconds without a further change after which a burst of changes is one reload
#: (watchfiles' ``step``).
RELOAD_SETTLE_MS = 100


class ReloadFilter:
    """Which changed paths restart the server: ``--reload-include``/``--reload-exclude`` globs."""

    def __init__(self, config: Config) -> None:
        self.include = config.reload_include or ("*.py",)
        self.exclude = config.reload_exclude or (".*", "*.py[cod]", "*~", "__pycache__")

    def __call__(self, change: object, path: str) -> bool:
        parts = path.split(os.sep)
        name = parts[-1]
        if any(fnmatch.fnmatch(part, pattern) for part in parts for pattern in self.exclude):
            return False
        return any(fnmatch.fnmatch(name, pattern) for pattern in self.include)


class Watcher:
    """The watcher process, seen from the supervisor.

    Args:
        config: ``reload_dir``, ``reload_include`` and ``reload_exclude`` are used.
    """

    def __init__(self, config: Config) -> None:
        self.config = config
        self.pid = -1
        #: Read end of the pipe the watcher writes changed paths to (non-blocking), or -1.
        self.fd = -1
        self._buffer = b""

    def dirs(self) -> list[str]:
        """The watched directories, absolute."""
        return [os.path.abspath(d) for d in (self.config.reload_dir or (".",))]

    def start(self, in_child: Callable[[], None], signals: Iterable[int]) -> None:
        """Fork the watcher; return once it watches, so that no change made after this is
        missed.

        Args:
            in_child: called first in the new process, to close the supervisor's descriptors.
            signals: the supervisor's signals, reset to their defaults in the watcher (SIGTERM
                stops it; the others are ignored there).

        Raises:
            RuntimeError: the watcher exited before it began watching.
            OSError: the fork failed.
        """
        changes_r, changes_w = os.pipe()
        pid = fork()
        if pid == 0:
            status = 1
            try:
                os.close(changes_r)
                in_child()
                signal.set_wakeup_fd(-1)
                for signum in signals:
                    signal.signal(signum, signal.SIG_DFL)
                for signum in (signal.SIGINT, signal.SIGQUIT, signal.SIGHUP, signal.SIGUSR1):
                    signal.signal(signum, signal.SIG_IGN)
                signal.pthread_sigmask(signal.SIG_UNBLOCK, signals)
                status = watch_files(self.dirs(), ReloadFilter(self.config), changes_w)
            except BaseException:
                traceback.print_exc()
            finally:
                os._exit(status)
        os.close(changes_w)
        self.pid, self.fd = pid, changes_r
        if os.read(changes_r, 1) != b"\0":  # blocks until it watches
            raise RuntimeError("the file watcher could not start")
        os.set_blocking(changes_r, False)

    def read(self) -> tuple[list[str], bool]:
        """Return the changed paths the watcher wrote so far, and False once it has stopped
        (its pipe is at EOF: changes are no longer detected)."""
        alive = True
        while True:
            try:
                data = os.read(self.fd, 65536)
            except BlockingIOError:
                break
            if not data:
                error_logger.error("The file watcher stopped; changes are no longer detected")
                alive = False
                break
            self._buffer += data
        *paths, self._buffer = self._buffer.split(b"\0")
        return [os.fsdecode(path) for path in paths if path], alive

    def stop(self) -> None:
        """SIGTERM the watcher, wait for it, close the pipe."""
        if self.pid < 0:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGTERM)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(self.pid, 0)
        os.close(self.fd)
        self.pid = self.fd = -1


def watch_files(dirs: list[str], watch_filter: ReloadFilter, out: int) -> int:
    """The watcher process: write each changed path to ``out``, then a NUL byte (a first NUL
    byte once watching has begun). Returns the exit status once the supervisor is gone."""
    import watchfiles

    parent = os.getppid()
    watching = False
    for changes in watchfiles.watch(
        *dirs,
        watch_filter=watch_filter,
        step=RELOAD_SETTLE_MS,
        yield_on_timeout=True,
        rust_timeout=200,
        raise_interrupt=False,
    ):
        if os.getppid() != parent:
            return 0
        data = b"".join(os.fsencode(path) + b"\0" for _, path in changes)
        if not watching:
            watching = True
            data = b"\0" + data
        try:
            while data:
                data = data[os.write(out, data) :]
        except BrokenPipeError:
            return 0
    return 0


def forget_bytecode(path: str) -> None:
    """Remove the cached bytecode of a changed ``.py`` file. A timestamp-based ``.pyc`` records
    the source's mtime in whole seconds and its size, so a same-size edit within a second of
    the last import would otherwise load the old code."""
    if not path.endswith(".py"):
        return
    import importlib.util

    with contextlib.suppress(OSError, ValueError, NotImplementedError):
        os.unlink(importlib.util.cache_from_source(path))
