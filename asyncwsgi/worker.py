"""The worker process of ``--workers``: what runs after the supervisor forks.

A worker imports the application itself, then serves it with :func:`asyncwsgi.server.run` on
the listening sockets it inherited (or its own, with ``--reuse-port``). It keeps a pipe to the
supervisor and writes one-byte messages on it:

- ``B`` (:data:`BOUND`) once its sockets are bound, just before it accepts connections: from
  then on it may have served a request;
- ``R`` (:data:`READY`) once it accepts connections;
- ``M`` (:data:`RECYCLE`), the reason and ``\n`` when it recycles itself and stops accepting:
  ``--max-requests`` reached (``max_requests``), or ``--threads`` threads stuck (``stuck``);
- ``E`` (:data:`BOOT_ERROR`) followed by the error text, up to EOF, when it cannot boot;
- ``H`` (:data:`HEARTBEAT`) every few seconds from a timer of its event loop, so that the
  supervisor sees that the loop runs (``--timeout-worker-healthcheck``).

:mod:`faulthandler` is enabled in every worker: a worker that stops answering gets SIGABRT from
the supervisor, and the stack of each of its threads goes to stderr before it dies.

Main thread of a worker process (and :func:`fork` in the supervisor's); Unix only.
"""

from __future__ import annotations

import asyncio
import contextlib
import faulthandler
import os
import re
import signal
import socket
import sys
import traceback
from collections.abc import Callable
from typing import TYPE_CHECKING

from . import systemd
from .config import Config
from .logs import error_logger, flush_logs

if TYPE_CHECKING:
    from ._types import WSGIApplication
    from .server import Server

__all__ = [
    "APP_LOAD_ERROR",
    "BOUND",
    "READY",
    "RECYCLE",
    "recycle_reasons",
    "recycle_cause",
    "BOOT_ERROR",
    "HEARTBEAT",
    "SUPERVISOR_SIGNALS",
    "fork",
    "run_worker",
]

#: Exit status of a worker (and of the supervisor) when the application cannot be imported.
APP_LOAD_ERROR = 3

# Messages on a worker's pipe to the supervisor.
BOUND = b"B"  # sockets bound: accepting from now on
READY = b"R"  # accepting connections
RECYCLE = b"M"  # + reason + b"\n": recycling itself (no longer accepting, draining)
BOOT_ERROR = b"E"  # followed by the error text, up to EOF
HEARTBEAT = b"H"  # the event loop runs

#: The signals the supervisor handles; blocked across :func:`fork`.
SUPERVISOR_SIGNALS = (
    signal.SIGTERM,
    signal.SIGINT,
    signal.SIGQUIT,
    signal.SIGHUP,
    signal.SIGUSR1,
    signal.SIGCHLD,
)


_RECYCLE_RE = re.compile(rb"M([a-z_]*)\n")


def recycle_reasons(codes: bytes) -> list[str]:
    """The reasons of the :data:`RECYCLE` messages in ``codes`` (read from a worker's pipe)."""
    return [m.group(1).decode("ascii") for m in _RECYCLE_RE.finditer(codes)]


#: What the log says of a worker that recycles itself, by the reason it gives.
_RECYCLE_CAUSES = {
    "max_requests": "reached --max-requests",
    "stuck": "has all its threads stuck (--timeout-request)",
}


def recycle_cause(reason: str) -> str:
    """What the supervisor's log says of a worker recycling itself for ``reason``."""
    return _RECYCLE_CAUSES.get(reason, f"recycles itself ({reason})")


def fork() -> int:
    """``os.fork()`` with the supervisor's signals blocked across it.

    The parent unblocks them at once. The child starts with them blocked, so that none reaches
    the supervisor's handlers in the child; it unblocks them once its own are installed
    (:func:`run_worker`).

    Raises:
        OSError: the fork failed (no memory, process limit).
    """
    signal.pthread_sigmask(signal.SIG_BLOCK, SUPERVISOR_SIGNALS)
    pid = -1
    try:
        pid = os.fork()
    finally:
        if pid != 0:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, SUPERVISOR_SIGNALS)
    return pid


def run_worker(
    load_app: Callable[[], WSGIApplication],
    config: Config,
    sockets: list[socket.socket],
    pipe: int,
    close_inherited: Callable[[], None],
    heartbeat: float,
) -> int:
    """The worker process after fork: import the app, serve it, report on ``pipe``.

    Args:
        load_app: imports and returns the application.
        config: the server settings.
        sockets: the supervisor's listening sockets; empty with ``--reuse-port``.
        pipe: write end of the pipe to the supervisor.
        close_inherited: closes the supervisor's own descriptors (called once the supervisor's
            wake-up descriptor is no longer used for signals).
        heartbeat: seconds between two :data:`HEARTBEAT` messages once serving.

    Returns the exit status: 0 after a shutdown, :data:`APP_LOAD_ERROR` when the application
    cannot be imported, 1 when anything else stopped the worker (its traceback is reported).
    Never raises.
    """
    worker = _Worker(load_app, config, sockets, pipe, heartbeat)
    status = 1
    try:
        status = worker.main(close_inherited)
    except BaseException:
        worker.report_boot_error(traceback.format_exc())
    finally:
        flush_logs()  # os._exit() follows: no logging.shutdown() to write the last access lines
        sys.stdout.flush()
        sys.stderr.flush()
    return status


class _Worker:
    def __init__(
        self,
        load_app: Callable[[], WSGIApplication],
        config: Config,
        sockets: list[socket.socket],
        pipe: int,
        heartbeat: float,
    ) -> None:
        self.load_app = load_app
        self.config = config
        self.sockets = sockets
        self.pipe = pipe
        self.heartbeat = heartbeat
        self.booted = False  # whether it reported ready

    def main(self, close_inherited: Callable[[], None]) -> int:
        """Signals come blocked from :func:`fork`. Those that :func:`asyncwsgi.server.run`
        handles are kept by a :class:`_BootSignals` until its handlers are installed, so a
        signal that arrives while the application is imported is acted on once the worker is
        up; SIGHUP is the supervisor's alone.
        """
        signal.set_wakeup_fd(-1)
        boot_signals = _BootSignals()
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, SUPERVISOR_SIGNALS)
        close_inherited()
        systemd.forget()  # only the supervisor notifies systemd
        with contextlib.suppress(AttributeError, ValueError, OSError):  # stderr without a fd
            faulthandler.enable(file=sys.stderr, all_threads=True)
        try:
            app = self.load_app()
        except Exception as exc:
            from .importer import AppLoadError

            if isinstance(exc, AppLoadError):
                self.report_boot_error(f"Error: {exc}\n")
            else:
                self.report_boot_error(traceback.format_exc())
            return APP_LOAD_ERROR
        from .server import run

        boot_signals.hand_over()

        def bound() -> None:
            # Before any connection is accepted: a worker that has not said so has served
            # nothing, and a reload may kill it if it still boots an outdated version.
            self.report(BOUND)

        def started(server: Server) -> None:
            self.booted = True
            self.report(READY)
            # From now on a message is dropped rather than block the loop on a full pipe (a
            # supervisor that does not read: stopped, or busy stopping its workers).
            os.set_blocking(self.pipe, False)
            server.on_recycle = self.report_recycle
            if server.recycle_reason:
                self.report_recycle(server.recycle_reason)
            loop = asyncio.get_running_loop()
            supervisor = os.getppid()

            def beat() -> None:
                if os.getppid() != supervisor:
                    # The supervisor died (SIGKILL, a crash): nothing would stop this worker,
                    # so it stops itself, gracefully (gunicorn's "Parent changed").
                    error_logger.warning("Supervisor (pid: %d) is gone; shutting down", supervisor)
                    server.should_exit.set()
                    return
                self.report(HEARTBEAT)
                loop.call_later(self.heartbeat, beat)

            loop.call_later(self.heartbeat, beat)

        sockets = self.sockets or None
        run(
            app,
            config=self.config,
            sockets=sockets,
            configure_logs=False,
            on_bound=bound,
            on_started=started,
        )
        return 0

    def report(self, message: bytes) -> None:
        """Write ``message`` to the supervisor; nothing if it is gone or its pipe is full."""
        with contextlib.suppress(OSError):
            os.write(self.pipe, message)

    def report_recycle(self, reason: str) -> None:
        """Tell the supervisor that this worker recycles itself, and why (``max_requests``)."""
        self.report(RECYCLE + reason.encode("ascii") + b"\n")

    def report_boot_error(self, text: str) -> None:
        """Hand why the worker could not boot to the supervisor, which shows it once per
        failure streak; after the boot, print it."""
        if self.booted:
            sys.stderr.write(text)
            return
        data = BOOT_ERROR + text.encode("utf-8", "replace")
        with contextlib.suppress(OSError):
            while data:
                data = data[os.write(self.pipe, data) :]


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
