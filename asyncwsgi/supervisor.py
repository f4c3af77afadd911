"""Supervisor: ``--workers N`` worker processes sharing the listening sockets, and ``--reload``.

The supervisor binds the sockets once (or, with ``--reuse-port``, lets each worker bind its own
with ``SO_REUSEPORT``), then forks N workers. Each worker imports the application itself and
runs its own event loop and thread pool (:func:`asyncwsgi.server.run`); the kernel spreads new
connections over them. The supervisor never imports the application and never serves a request.

Each worker belongs to a generation. The supervisor keeps ``--workers`` workers of the newest
generation (gunicorn's arbiter does the same with its worker age): a reload request (SIGHUP, or
a file change with ``--reload``) starts a new generation, and the older workers are replaced one
at a time, each old worker getting SIGTERM only once a new one accepts. A worker told to stop is
*retiring*: it finishes its requests and exits, and is never counted, replaced nor signalled
again. Whatever happens during a reload (another SIGHUP, a crash, an old worker that exits on
its own), the number of serving workers converges to ``--workers``.

Each worker reports on a pipe (:mod:`asyncwsgi.worker`): bound, ready, recycling itself (its
replacement starts at once), a boot error, a heartbeat. The checks (:mod:`asyncwsgi.checks`):

- a worker whose loop has not answered for ``--timeout-worker-healthcheck`` seconds gets
  SIGABRT (its faulthandler writes every thread's stack), SIGKILL 2 s later if still alive, and
  is replaced at once, as gunicorn's "WORKER TIMEOUT";
- a worker over ``--workers-max-rss`` or ``--workers-lifetime`` (checked every second) joins an
  older generation: it is replaced as in a reload, its replacement first;
- sd_notify (``$NOTIFY_SOCKET``) is the supervisor's, not the workers' (:mod:`asyncwsgi.systemd`).

Signals, as gunicorn's arbiter, except that SIGINT is graceful the first time:

- SIGTERM, SIGINT: graceful shutdown. Each worker gets SIGTERM (a retiring worker is not told
  again) and ``--timeout-graceful-shutdown`` seconds to finish its requests, then SIGKILL. A
  repeated SIGTERM changes nothing; a second SIGINT (Ctrl-C pressed again) is SIGQUIT.
- SIGQUIT: stop now. Each worker gets SIGQUIT and closes its connections at once.
- SIGHUP: rolling restart: a new generation of workers, as above; no request is refused.
- SIGUSR1: reopen the log files (after logrotate moved them), in the supervisor and every worker.
- A worker that dies is replaced ("Worker (pid: N) died"); one that reaches ``--max-requests``
  (plus up to ``--max-requests-jitter``) requests is replaced as it stops accepting.

A worker that exits before it accepts connections failed to boot, whatever its exit status
(an import error, ``sys.exit()`` at import, a bind or TLS error). The error is shown once, and
the boot is retried after 0.25 s, 0.5 s, 1 s... (at most 4 s between tries). After
:data:`BOOT_TRIES` failed tries the supervisor stops with exit status 3, as gunicorn's "Worker
failed to boot", unless workers of an older generation still serve: then the reload is
abandoned, they keep serving, and the next SIGHUP tries again.

``--reload`` is the same machinery with one worker and a file watcher (:mod:`asyncwsgi.reloader`):
every change starts a new generation, so none is lost, and a worker still booting an outdated
version is stopped before it serves. A worker that cannot boot the changed application shows the
error once, is retried once after 0.25 s (a file still being written), and the old worker keeps
serving until the next change.

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
import os
import selectors
import signal
import socket
import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from . import systemd
from .checks import (
    CHECK_INTERVAL,
    KILL_AFTER_ABORT,
    WorkerState,
    abort_silent,
    heartbeat_interval,
    over_limits,
)
from .config import Config
from .logs import error_logger, reopen_log_files
from .metrics import SupervisorMetrics
from .reloader import Watcher, forget_bytecode
from .worker import (
    APP_LOAD_ERROR,
    BOOT_ERROR,
    BOUND,
    READY,
    SUPERVISOR_SIGNALS,
    fork,
    recycle_cause,
    recycle_reasons,
    run_worker,
)

if TYPE_CHECKING:
    from ._types import WSGIApplication

__all__ = ["Supervisor", "APP_LOAD_ERROR", "BOOT_TRIES"]

#: Failed boots in a row after which the supervisor gives up (2 with ``--reload``: one retry).
BOOT_TRIES = 5
_RELOAD_BOOT_TRIES = 2
#: Seconds before the first retry of a failed boot; doubled on each further failure, up to
#: ``_BOOT_BACKOFF_MAX``.
_BOOT_BACKOFF = 0.25
_BOOT_BACKOFF_MAX = 4.0

# The signals the supervisor handles (see the module docstring).
_SIGNALS = SUPERVISOR_SIGNALS

_WATCHER = -1  # the selector key data of the watcher's pipe (a worker's is its pid)
_RECYCLED = -1  # the generation of a worker over --workers-max-rss or --workers-lifetime

AppLoader = Callable[[], "WSGIApplication"]


class Supervisor:
    """Run ``config.workers`` worker processes and keep that many alive.

    Args:
        load_app: imports and returns the WSGI application; called in each worker after fork.
        config: the server settings; ``workers``, ``reuse_port``, ``reload*`` and the timeouts
            are used here.
    """

    def __init__(self, load_app: AppLoader, config: Config) -> None:
        self.load_app = load_app
        self.config = config
        self.workers: dict[int, WorkerState] = {}
        self._sockets: list[socket.socket] = []
        self._stopping = False
        self._interrupted = False  # a SIGINT came: a second one means "now"
        self._quick = ""  # the signal that asked to stop now (SIGQUIT, a second SIGINT)
        self._reopen_logs = False
        # Told to stop (a reload, or --max-requests): not counted, replaced nor signalled again.
        self._retiring: set[int] = set()
        self._generation = 0
        self._reload_requested = False
        self._boot_failures = 0  # failed boots in a row
        self._last_failure = 0.0  # time.monotonic() of the last one counted
        self._last_boot_error = b""  # shown once, not again for each retry
        self._spawn_after = 0.0  # no new worker before this time.monotonic() (backoff)
        self._halted = False  # gave up booting: no new worker until the next reload request
        self._watcher = Watcher(config)  # --reload
        self._changes: list[str] = []  # --reload: changed paths not yet acted on
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = os.pipe()
        self._exit_status = 0
        self._next_check = 0.0  # time.monotonic() of the next --workers-max-rss/-lifetime check
        self._announce = True  # sd_notify READY=1 once the newest generation serves in full
        self._watchdog = systemd.watchdog_interval()  # seconds between WATCHDOG=1; 0: off
        self._next_ping = 0.0
        self._metrics = SupervisorMetrics(config)  # --metrics-bind

    # -- supervisor process ---------------------------------------------------------------------

    def run(self) -> int:
        """Serve until SIGTERM/SIGINT; return the exit status (0, or 3 if no worker can boot).

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
                "Will watch for changes in these directories: %s", self._watcher.dirs()
            )
        else:
            error_logger.info(
                "Starting supervisor (pid: %d, workers: %d)", os.getpid(), config.workers
            )
        try:
            if config.reload:
                self._start_watcher()
            while not self._stopping:
                self._tick(self._next_timeout())
        finally:
            systemd.notify("STOPPING=1")
            self._stop_workers()  # after an unexpected error too: no worker is left behind
            self._watcher.stop()
            self._metrics.close()
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

    @property
    def _target(self) -> int:
        """How many workers of the newest generation to keep."""
        return 1 if self.config.reload else self.config.workers

    def _next_timeout(self) -> float:
        now = time.monotonic()
        deadlines = [self._spawn_after, self._next_ping]
        deadlines += [w.aborted + KILL_AFTER_ABORT for w in self.workers.values() if w.aborted]
        return min([1.0, *(d - now for d in deadlines if d > now)])

    def _tick(self, timeout: float) -> None:
        """Handle wake-ups and worker messages for up to ``timeout`` s, reap, manage workers."""
        for key, _ in self._selector.select(timeout=timeout):
            if key.fd == self._wake_r:
                self._drain_wakeups()
            elif key.data == _WATCHER:
                self._read_changes()
            else:
                worker = self.workers.get(key.data)
                if worker is not None:
                    self._read_messages(worker)
        self._metrics.collect(self.workers, self._retiring, self._generation)
        self._check_workers()
        self._reap()
        changed, self._changes = self._changes, []
        if changed:
            names = sorted({os.path.relpath(path) for path in changed})
            error_logger.warning(
                "WatchFiles detected changes in %s. Reloading...",
                ", ".join(repr(n) for n in names),
            )
            self._reload_requested = True
        if self._reload_requested:
            self._reload_requested = False
            self._new_generation()
            for path in changed:
                forget_bytecode(path)
        self._manage()
        self._notify()
        if self._reopen_logs:
            self._reopen_logs = False
            error_logger.info("Received SIGUSR1, reopening %d log file(s)", reopen_log_files())
            for pid in self.workers:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGUSR1)

    def _notify(self) -> None:
        """sd_notify (:mod:`asyncwsgi.systemd`): ``READY=1`` once ``--workers`` workers of the
        newest generation accept and no older one is left; ``WATCHDOG=1`` every half of
        ``$WATCHDOG_USEC`` while at least one worker's heartbeat is fresh (no older than
        ``$WATCHDOG_USEC``). One hung worker is the supervisor's to replace; all of them silent,
        or the supervisor's own loop stuck, is systemd's to restart the service."""
        if self._stopping:
            return
        now = time.monotonic()
        active = self._active()
        if (
            self._announce
            and len(active) == self._target
            and all(w.ready and w.generation == self._generation for w in active)
        ):
            self._announce = False
            systemd.notify("READY=1")
        if self._watchdog and now >= self._next_ping:
            fresh = 2 * self._watchdog
            if any(w.ready and now - w.last_beat <= fresh for w in active):
                systemd.notify("WATCHDOG=1")
                self._next_ping = now + self._watchdog

    def _start_watcher(self) -> None:
        """``--reload``: fork the file watcher; its changes arrive on a pipe (see :meth:`_tick`)."""

        def in_child() -> None:
            self._close_inherited()
            for sock in self._sockets:
                sock.close()

        self._watcher.start(in_child, _SIGNALS)
        self._selector.register(self._watcher.fd, selectors.EVENT_READ, _WATCHER)

    def _read_changes(self) -> None:
        paths, alive = self._watcher.read()
        self._changes.extend(paths)
        if not alive:
            self._selector.unregister(self._watcher.fd)

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
            self._reload_requested = True
        elif signum == signal.SIGUSR1:
            self._reopen_logs = True

    def _drain_wakeups(self) -> None:
        with contextlib.suppress(BlockingIOError):
            while os.read(self._wake_r, 512):
                pass

    # -- generations ----------------------------------------------------------------------------

    def _new_generation(self) -> None:
        """A reload request: the workers of every older generation are to be replaced.

        A worker still booting an older generation is stopped at once (SIGKILL: it has served
        nothing yet), so that it never serves outdated code; one that has bound its sockets
        (it may have accepted a connection) gets SIGTERM, and finishes what it accepted.
        """
        self._generation += 1
        systemd.notify(*systemd.reloading())
        self._announce = True
        self._boot_failures = 0
        self._spawn_after = 0.0
        self._halted = False
        self._last_failure = time.monotonic()
        if not self.config.reload:
            error_logger.info("Handling signal: hup; starting generation %d", self._generation)
        for worker in self._active():
            self._read_messages(worker)
            if not worker.ready:
                self._retire(worker, signal.SIGTERM if worker.bound else signal.SIGKILL)

    def _active(self) -> list[WorkerState]:
        """The workers not told to stop, oldest first."""
        return [w for pid, w in self.workers.items() if pid not in self._retiring]

    def _manage(self) -> None:
        """Keep ``_target`` workers of the newest generation: start the missing ones, and retire
        an older worker for each new one that accepts.

        During a rolling restart one new worker boots at a time; so does a worker after a failed
        boot. Otherwise (the first boot, or after a crash) all missing workers start at once.
        """
        if self._stopping:
            return
        target = self._target
        active = self._active()
        current = [w for w in active if w.generation == self._generation]
        old = [w for w in active if w.generation != self._generation]
        old.sort(key=lambda w: (w.ready, w.generation, w.started))  # booting, then oldest
        ready = sum(w.ready for w in current)
        while old and ready + len(old) > target:
            self._retire(old.pop(0), signal.SIGTERM)
        missing = target - len(current)
        if missing <= 0 or self._halted or time.monotonic() < self._spawn_after:
            return
        if old or self._boot_failures:
            missing = 0 if any(not w.ready for w in current) else 1
        for _ in range(missing):
            self._spawn()

    def _retire(self, worker: WorkerState, signum: int) -> None:
        """Tell ``worker`` to stop, once; it is no longer counted."""
        self._retiring.add(worker.pid)
        if worker.recycling:
            error_logger.info("Stopping worker (pid: %d): its replacement accepts", worker.pid)
        else:
            error_logger.info(
                "Stopping worker (pid: %d) of generation %d", worker.pid, worker.generation
            )
        with contextlib.suppress(ProcessLookupError):
            os.kill(worker.pid, signum)

    # -- worker processes -----------------------------------------------------------------------

    def _spawn(self) -> WorkerState:
        ready_r, ready_w = os.pipe()
        pid = fork()
        if pid == 0:  # the worker
            os.close(ready_r)
            os._exit(
                run_worker(
                    self.load_app,
                    self.config,
                    self._sockets,
                    ready_w,
                    self._close_inherited,
                    heartbeat_interval(self.config, 2 * self._watchdog),
                )
            )
        os.close(ready_w)
        os.set_blocking(ready_r, False)
        worker = WorkerState(pid, self._generation, ready_r, time.monotonic())
        self.workers[pid] = worker
        self._selector.register(ready_r, selectors.EVENT_READ, pid)
        error_logger.info("Booting worker with pid: %d", pid)
        return worker

    def _read_messages(self, worker: WorkerState) -> None:
        """Read what ``worker`` wrote on its pipe so far; close the pipe at EOF."""
        fd = worker.ready_fd
        while fd >= 0:
            try:
                data = os.read(fd, 65536)
            except BlockingIOError:
                return
            except OSError:
                data = b""
            if not data:
                self._selector.unregister(fd)
                os.close(fd)
                worker.ready_fd = -1
                return
            worker.last_beat = time.monotonic()
            if worker.boot_error:
                worker.boot_error += data
                continue
            codes, error, text = data.partition(BOOT_ERROR)
            if error:
                worker.boot_error += error + text
            if BOUND in codes:
                worker.bound = True
            if READY in codes and not worker.ready:
                worker.ready = True
                self._boot_failures = 0
                self._last_boot_error = b""
            reasons = recycle_reasons(codes)
            if reasons and worker.pid not in self._retiring:
                # It stops accepting now and exits once its requests are done.
                self._retiring.add(worker.pid)
                worker.recycling = reasons[0]
                cause = recycle_cause(reasons[0])
                error_logger.info("Worker (pid: %d) %s; starting a new one", worker.pid, cause)

    def _check_workers(self) -> None:
        """Abort the workers whose event loop is silent (they are replaced at once), and mark
        those over ``--workers-max-rss`` or ``--workers-lifetime`` as of an older generation:
        :meth:`_manage` then starts a replacement first, as in a reload, and sends SIGTERM
        only once it accepts."""
        now = time.monotonic()
        for worker in abort_silent(self.workers.values(), now, self.config):
            self._retiring.add(worker.pid)  # not counted: replaced now
        if now >= self._next_check and not (self._halted or self._stopping):
            self._next_check = now + CHECK_INTERVAL
            for worker in over_limits(self._active(), now, self.config):
                worker.generation = _RECYCLED

    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            worker = self.workers.get(pid)
            if worker is None:
                continue
            self._read_messages(worker)  # what it wrote before it exited
            del self.workers[pid]
            if worker.ready_fd >= 0:
                self._selector.unregister(worker.ready_fd)
                os.close(worker.ready_fd)
            code = os.waitstatus_to_exitcode(status)
            self._metrics.worker_exited(worker, code, pid in self._retiring, self._stopping)
            if pid in self._retiring:
                self._retiring.discard(pid)
                if worker.aborted:
                    error_logger.warning("Worker (pid: %d) ended by %s", pid, _describe(code))
                continue
            if self._stopping:
                continue
            if not worker.ready:
                self._boot_failed(worker, code)
                continue
            # An older generation's worker is not restarted: the reload replaces it.
            then = (
                "starting a new one"
                if worker.generation == self._generation
                else "the reload replaces it"
            )
            if code == 0:
                error_logger.info("Worker (pid: %d) exited; %s", pid, then)
            else:
                error_logger.warning(
                    "Worker (pid: %d) died with %s; %s", pid, _describe(code), then
                )

    def _boot_failed(self, worker: WorkerState, code: int) -> None:
        """``worker`` exited before it accepted connections: retry later, or give up."""
        text = bytes(worker.boot_error[len(BOOT_ERROR) :])
        if text and text != self._last_boot_error:
            sys.stderr.write(text.decode("utf-8", "replace"))
            sys.stderr.flush()
            self._last_boot_error = text
        if worker.started >= self._last_failure:  # not a sibling of the last counted failure
            self._boot_failures += 1
            self._last_failure = time.monotonic()
        tries = _RELOAD_BOOT_TRIES if self.config.reload else BOOT_TRIES
        if self._boot_failures < tries:
            delay = min(_BOOT_BACKOFF * 2 ** (self._boot_failures - 1), _BOOT_BACKOFF_MAX)
            self._spawn_after = time.monotonic() + delay
            error_logger.error(
                "Worker (pid: %d) failed to boot (%s); retrying in %.2f s (%d of %d tries)",
                worker.pid,
                _describe(code),
                delay,
                self._boot_failures,
                tries,
            )
            return
        serving = [w for w in self._active() if w.ready]
        self._boot_failures = 0
        self._halted = True
        if serving and (
            self.config.reload or any(w.generation != self._generation for w in serving)
        ):
            error_logger.error(
                "Worker (pid: %d) failed to boot (%s); reload abandoned, %d worker(s) of the "
                "previous version keep serving",
                worker.pid,
                _describe(code),
                len(serving),
            )
            for w in serving:
                w.generation = self._generation
        elif self.config.reload:
            error_logger.error(
                "Worker (pid: %d) failed to boot (%s); waiting for file changes",
                worker.pid,
                _describe(code),
            )
        else:
            error_logger.error(
                "Worker (pid: %d) failed to boot (%s) %d times in a row; stopping",
                worker.pid,
                _describe(code),
                tries,
            )
            self._exit_status = APP_LOAD_ERROR
            self._stopping = True
            self._signal_name = ""

    def _close_inherited(self) -> None:
        """In a child process: close the supervisor's own descriptors."""
        self._selector.close()
        os.close(self._wake_r)
        os.close(self._wake_w)
        if self._watcher.fd >= 0:
            os.close(self._watcher.fd)
        for worker in self.workers.values():
            if worker.ready_fd >= 0:
                os.close(worker.ready_fd)

    def _stop_workers(self) -> None:
        """Stop every worker: SIGTERM; SIGKILL after the shutdown delay, graceful timeout + 5 s.

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
        config = self.config
        deadline = time.monotonic() + config.shutdown_delay + config.timeout_graceful_shutdown + 5
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


def _describe(code: int) -> str:
    if code < 0:
        with contextlib.suppress(ValueError):
            return signal.Signals(-code).name
        return f"signal {-code}"
    return f"exit status {code}"
