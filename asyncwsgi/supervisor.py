"""Supervisor: ``--workers N`` worker processes sharing the listening sockets, and ``--reload``.

The supervisor binds the sockets once (or, with ``--reuse-port``, lets each worker bind its own
with ``SO_REUSEPORT``), then forks N workers. Each worker imports the application itself and
runs its own event loop and thread pool (:func:`asyncwsgi.server.run`); the kernel spreads new
connections over them. The supervisor never imports the application and never serves a request.

Signals, as gunicorn's arbiter, except that SIGINT is graceful the first time:

- SIGTERM, SIGINT: graceful shutdown. Each worker gets SIGTERM (a worker that a reload has
  already told to stop is not told again) and ``--timeout-graceful-shutdown`` seconds to finish
  its requests, then SIGKILL. A repeated SIGTERM changes nothing; a second SIGINT (Ctrl-C
  pressed again) is SIGQUIT.
- SIGQUIT: stop now. Each worker gets SIGQUIT and closes its connections at once.
- SIGHUP: rolling restart. For each old worker a new one is started, and the old one gets SIGTERM
  only once the new one is accepting: no request is refused during the reload.
- SIGUSR1: reopen the log files (after logrotate moved them), in the supervisor and every worker.
- A worker that dies is replaced ("Worker (pid: N) died"); one that exits after
  ``--max-requests`` (plus up to ``--max-requests-jitter``) requests is replaced too. A worker
  that cannot import the application stops the supervisor with exit status 3, as gunicorn's
  "Worker failed to boot".

``--reload`` is the same machinery with one worker and a file watcher (watchfiles): a change to a
watched file restarts the worker the way SIGHUP does, while the supervisor keeps the listening
socket, so a browser never sees a refused connection. A worker that cannot import the changed
application prints the error, and the supervisor waits for the next change.

A signal sent to the whole process group (systemd's ``KillMode=control-group``, Ctrl-C in a
terminal) reaches each worker directly as well as forwarded, which is why a worker takes a
repeated SIGTERM as no news, and why the supervisor forwards SIGTERM, never SIGINT: a worker sees
one SIGINT per keypress. A worker is forked with the signals blocked and keeps those that arrive
while it imports the application until its event loop handles them, so none is lost or handled
by the supervisor's handlers in the child.

Main thread of the supervisor process only; Unix only (``os.fork``).
"""

from __future__ import annotations

import contextlib
import fnmatch
import os
import selectors
import signal
import socket
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .config import Config
from .logs import error_logger, reopen_log_files

if TYPE_CHECKING:
    from ._types import WSGIApplication

__all__ = ["Supervisor", "APP_LOAD_ERROR"]

#: Exit status of a worker (and of the supervisor) when the application cannot be imported.
APP_LOAD_ERROR = 3

# The signals the supervisor handles (see the module docstring).
_SIGNALS = (
    signal.SIGTERM,
    signal.SIGINT,
    signal.SIGQUIT,
    signal.SIGHUP,
    signal.SIGUSR1,
    signal.SIGCHLD,
)

AppLoader = Callable[[], "WSGIApplication"]


@dataclass
class _Worker:
    pid: int
    ready_fd: int
    started: float
    ready: bool = False


class Supervisor:
    """Run ``config.workers`` worker processes and keep that many alive.

    Args:
        load_app: imports and returns the WSGI application; called in each worker after fork.
        config: the server settings; ``workers``, ``reuse_port`` and the timeouts are used here.
    """

    def __init__(self, load_app: AppLoader, config: Config) -> None:
        self.load_app = load_app
        self.config = config
        self.workers: dict[int, _Worker] = {}
        self._sockets: list[socket.socket] = []
        self._stopping = False
        self._interrupted = False  # a SIGINT came: a second one means "now"
        self._quick = ""  # the signal that asked to stop now (SIGQUIT, a second SIGINT)
        self._reload_queue: list[int] = []
        self._reopen_logs = False
        self._retiring: set[int] = set()  # told to stop by a reload: not replaced when they exit
        self._replacing: int | None = None
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = os.pipe()
        self._exit_status = 0

    # -- supervisor process ---------------------------------------------------------------------

    def run(self) -> int:
        """Serve until SIGTERM/SIGINT; return the exit status (0, or 3 if a worker cannot boot).

        Raises:
            OSError: a listening socket could not be bound.
        """
        from .server import bind_socket

        config = self.config
        if not config.reuse_port:
            self._sockets = [bind_socket(spec, config) for spec in config.listen_specs()]
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        signal.set_wakeup_fd(self._wake_w)
        for signum in _SIGNALS:
            signal.signal(signum, self._on_signal)
        self._selector.register(self._wake_r, selectors.EVENT_READ)
        if config.reload:
            error_logger.info(
                "Will watch for changes in these directories: %s", list(self._watch_dirs())
            )
        else:
            error_logger.info(
                "Starting supervisor (pid: %d, workers: %d)", os.getpid(), config.workers
            )
        try:
            if config.reload:
                self._watch()
            else:
                for _ in range(config.workers):
                    self._spawn()
                while not self._stopping:
                    self._tick(1.0)
            self._stop_workers()
        finally:
            signal.set_wakeup_fd(-1)
            for signum in _SIGNALS:
                signal.signal(signum, signal.SIG_DFL)
            for sock in self._sockets:
                sock.close()
            self._selector.close()
            os.close(self._wake_r)
            os.close(self._wake_w)
        error_logger.info("Supervisor shutdown complete")
        return self._exit_status

    def _tick(self, timeout: float) -> None:
        """Handle wake-ups and ready reports for up to ``timeout`` s, reap, advance a reload."""
        for key, _ in self._selector.select(timeout=timeout):
            if key.fd == self._wake_r:
                self._drain_wakeups()
            else:
                self._on_ready(key.fd)
        self._reap()
        self._step_reload()
        if self._reopen_logs:
            self._reopen_logs = False
            error_logger.info("Received SIGUSR1, reopening %d log file(s)", reopen_log_files())
            for pid in self.workers:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGUSR1)

    def _watch_dirs(self) -> list[str]:
        return [os.path.abspath(d) for d in (self.config.reload_dir or (".",))]

    def _watch(self) -> None:
        """``--reload``: restart the worker when a watched file changes (watchfiles)."""
        import watchfiles

        watcher = watchfiles.watch(
            *self._watch_dirs(),
            watch_filter=_ReloadFilter(self.config),
            yield_on_timeout=True,
            rust_timeout=200,
            raise_interrupt=False,
        )
        next(watcher)  # watching starts here: before the worker boots, so no change is missed
        self._spawn()
        for changes in watcher:
            if self._stopping:
                return
            if changes:
                names = sorted({os.path.relpath(path) for _, path in changes})
                error_logger.warning(
                    "WatchFiles detected changes in %s. Reloading...",
                    ", ".join(repr(n) for n in names),
                )
                if self.workers:
                    self._reload_queue = list(self.workers)
                else:
                    self._spawn()  # the last one could not start; try the new code
            self._tick(0)
            if self._stopping:
                return

    def _on_signal(self, signum: int, frame: object) -> None:
        # Runs between bytecodes of the main thread; keep it to flag setting.
        if signum in (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT):
            name = signal.Signals(signum).name
            if signum == signal.SIGQUIT or (signum == signal.SIGINT and self._interrupted):
                self._quick = self._quick or name
            self._interrupted = self._interrupted or signum == signal.SIGINT
            if not self._stopping:
                self._stopping = True
                self._signal_name = name
        elif signum == signal.SIGHUP:
            self._reload_queue = [pid for pid in self.workers if pid not in self._reload_queue]
        elif signum == signal.SIGUSR1:
            self._reopen_logs = True

    def _drain_wakeups(self) -> None:
        with contextlib.suppress(BlockingIOError):
            while os.read(self._wake_r, 512):
                pass

    def _spawn(self) -> _Worker:
        ready_r, ready_w = os.pipe()
        pid = _fork()
        if pid == 0:  # the worker
            os.close(ready_r)
            status = 1
            try:
                status = self._worker_main(ready_w)
            except BaseException:
                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(status)
        os.close(ready_w)
        worker = _Worker(pid, ready_r, time.monotonic())
        self.workers[pid] = worker
        self._selector.register(ready_r, selectors.EVENT_READ, pid)
        error_logger.info("Booting worker with pid: %d", pid)
        return worker

    def _on_ready(self, fd: int) -> None:
        worker = next((w for w in self.workers.values() if w.ready_fd == fd), None)
        try:
            data = os.read(fd, 1)
        except OSError:
            data = b""
        self._selector.unregister(fd)
        os.close(fd)
        if worker is None:
            return
        worker.ready_fd = -1
        worker.ready = bool(data)

    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            worker = self.workers.pop(pid, None)
            if worker is None:
                continue
            if worker.ready_fd >= 0:
                self._selector.unregister(worker.ready_fd)
                os.close(worker.ready_fd)
            code = os.waitstatus_to_exitcode(status)
            if pid in self._reload_queue:
                self._reload_queue.remove(pid)
            if self._stopping or pid in self._retiring:
                self._retiring.discard(pid)
                continue
            if code == APP_LOAD_ERROR and not worker.ready and pid == self._replacing:
                # A reload with a broken application keeps the workers that still run.
                error_logger.error("Worker (pid: %d) failed to boot; reload abandoned", pid)
                self._replacing = None
                self._reload_queue.clear()
                continue
            if code == APP_LOAD_ERROR and not worker.ready and self.config.reload:
                error_logger.error("Application failed to start; waiting for file changes")
                continue
            if code == APP_LOAD_ERROR and not worker.ready:
                error_logger.error("Worker (pid: %d) failed to boot; stopping", pid)
                self._exit_status = APP_LOAD_ERROR
                self._stopping = True
                self._signal_name = ""
                continue
            if code == 0:
                error_logger.info("Worker (pid: %d) exited; starting a new one", pid)
            else:
                error_logger.warning(
                    "Worker (pid: %d) died with %s; starting a new one", pid, _describe(code)
                )
            self._spawn()

    def _step_reload(self) -> None:
        """Advance a rolling restart: one new worker ready → one old worker told to stop."""
        if self._stopping:
            return
        if self._replacing is not None:
            new = self.workers.get(self._replacing)
            if new is not None and not new.ready:
                return
            self._replacing = None
            if self._reload_queue:
                old = self._reload_queue.pop(0)
                self._retiring.add(old)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(old, signal.SIGTERM)
        if self._reload_queue and self._replacing is None:
            error_logger.info("Reloading: replacing worker (pid: %d)", self._reload_queue[0])
            self._replacing = self._spawn().pid

    def _stop_workers(self) -> None:
        """Stop every worker: SIGTERM, and SIGKILL after ``--timeout-graceful-shutdown`` + 5 s.

        A worker already told to stop (retiring after a reload) is not told again; the deadline
        bounds its drain as any other's. SIGQUIT, or a second SIGINT, to the supervisor, before
        or during the wait, sends SIGQUIT to every worker: stop now.
        """
        name = getattr(self, "_signal_name", "")
        if name:
            error_logger.info("Received %s, shutting down workers", name)
        quick_sent = False
        if not self._quick:
            for pid in list(self.workers):
                if pid not in self._retiring:  # a reload told it already; it is draining
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + self.config.timeout_graceful_shutdown + 5.0
        while self.workers and time.monotonic() < deadline:
            if self._quick and not quick_sent:
                quick_sent = True
                error_logger.info("Received %s, stopping workers now", self._quick)
                for pid in list(self.workers):
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGQUIT)
            self._reap()
            if self.workers:
                self._selector.select(timeout=0.1)
                self._drain_wakeups()
        for pid in list(self.workers):
            error_logger.warning("Worker (pid: %d) did not stop in time; killing it", pid)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)
            self.workers.pop(pid, None)

    # -- worker process -------------------------------------------------------------------------

    def _worker_main(self, ready_fd: int) -> int:
        """The worker process after fork: import the app, serve, report ready on ``ready_fd``.

        Signals come blocked from :func:`_fork`. Those that :func:`asyncwsgi.server.run`
        handles are kept by a :class:`_BootSignals` until its handlers are installed, so a
        signal that arrives while the application is imported is acted on once the worker is
        up; SIGHUP is the supervisor's alone.
        """
        signal.set_wakeup_fd(-1)
        boot_signals = _BootSignals()
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _SIGNALS)
        self._selector.close()
        os.close(self._wake_r)
        os.close(self._wake_w)
        for worker in self.workers.values():
            if worker.ready_fd >= 0:
                os.close(worker.ready_fd)
        try:
            app = self.load_app()
        except Exception as exc:
            from .cli import AppLoadError

            if isinstance(exc, AppLoadError):
                print(f"Error: {exc}", file=sys.stderr)
            else:
                traceback.print_exc()
            return APP_LOAD_ERROR
        from .server import run

        boot_signals.hand_over()

        def started() -> None:
            with contextlib.suppress(OSError):
                os.write(ready_fd, b"R")
                os.close(ready_fd)

        sockets = self._sockets or None
        run(app, config=self.config, sockets=sockets, configure_logs=False, on_started=started)
        return 0


def _fork() -> int:
    """``os.fork()`` with the supervisor's signals blocked across it.

    The parent unblocks them at once. The child starts with them blocked, so that none reaches
    the supervisor's handlers in the child; it unblocks them once its own are installed
    (:meth:`Supervisor._worker_main`).

    Raises:
        OSError: the fork failed (no memory, process limit).
    """
    signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS)
    pid = -1
    try:
        pid = os.fork()
    finally:
        if pid != 0:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, _SIGNALS)
    return pid


class _BootSignals:
    """The signals a worker receives while it boots, kept for its event loop.

    Installed as the handler of :data:`asyncwsgi.server.HANDLED_SIGNALS` in a new worker, it
    records them while the application is imported. :meth:`hand_over` then blocks these signals
    and raises the recorded ones again, so that they are pending when
    :func:`asyncwsgi.server.run` has installed its handlers and unblocks them. Two SIGINTs
    become one SIGQUIT, which the loop takes for the same "stop now" (the kernel keeps one
    pending signal of each kind). Main thread of the worker.
    """

    def __init__(self) -> None:
        from .server import HANDLED_SIGNALS

        self.signals = HANDLED_SIGNALS
        self.received: list[int] = []
        self.handed_over = False
        for signum in self.signals:
            signal.signal(signum, self)

    def __call__(self, signum: int, frame: object) -> None:
        if self.handed_over:
            signal.raise_signal(signum)  # blocked in this thread: pending until run() unblocks
        else:
            self.received.append(signum)

    def hand_over(self) -> None:
        """Block the signals and make the ones received so far pending again (main thread)."""
        signal.pthread_sigmask(signal.SIG_BLOCK, self.signals)
        self.handed_over = True
        received = set(self.received)
        if self.received.count(signal.SIGINT) > 1:
            received.add(signal.SIGQUIT)
        for signum in received:
            signal.raise_signal(signum)


class _ReloadFilter:
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


def _describe(code: int) -> str:
    if code < 0:
        with contextlib.suppress(ValueError):
            return signal.Signals(-code).name
        return f"signal {-code}"
    return f"exit status {code}"
