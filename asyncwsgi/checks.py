"""The supervisor's view of each worker process, and the checks it makes of them.

A worker's event loop writes ``H`` (:data:`asyncwsgi.worker.HEARTBEAT`) on its pipe every
:func:`heartbeat_interval` seconds, from a loop timer: as long as the heartbeats come, the loop
runs. Application code that holds the GIL (a catastrophic regular expression, a C extension
that does not release it) or a loop blocked in a call stops them; application code that is
merely slow in a pool thread, and releases the GIL while it waits, does not.

``--workers-max-rss`` and ``--workers-lifetime`` are checked every :data:`CHECK_INTERVAL`
seconds (:func:`recycle_reason`): the resident set size comes from ``/proc/PID/status``
(``VmRSS``, Linux), the age from the worker's start.

Supervisor's main thread only.
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Iterable
from dataclasses import dataclass, field

from .config import Config, MiB
from .logs import error_logger

__all__ = [
    "WorkerState",
    "heartbeat_interval",
    "silent_for",
    "abort_silent",
    "rss_bytes",
    "recycle_reason",
    "over_limits",
    "KILL_AFTER_ABORT",
    "CHECK_INTERVAL",
]

#: Seconds between SIGABRT to a silent worker and SIGKILL, if it is still alive then.
KILL_AFTER_ABORT = 2.0

#: Seconds between two checks of ``--workers-max-rss`` and ``--workers-lifetime``.
CHECK_INTERVAL = 1.0


@dataclass
class WorkerState:
    """One worker process, as the supervisor knows it. Times are ``time.monotonic()``."""

    pid: int
    generation: int
    #: Read end of the worker's pipe (non-blocking); -1 once the worker closed it.
    ready_fd: int
    started: float
    bound: bool = False  # its sockets are bound: it may have accepted a connection
    ready: bool = False
    #: What the worker wrote after ``E``: why it could not boot.
    boot_error: bytearray = field(default_factory=bytearray)
    #: When the worker last wrote on its pipe (a heartbeat, or any other message).
    last_beat: float = 0.0
    #: When it was sent SIGABRT for being silent (0: never); SIGKILL follows after
    #: :data:`KILL_AFTER_ABORT` seconds.
    aborted: float = 0.0
    killed: bool = False
    #: Why it is being replaced (``--workers-max-rss``, ``--workers-lifetime``), once it is.
    recycling: str = ""

    def __post_init__(self) -> None:
        self.last_beat = self.last_beat or self.started


def heartbeat_interval(config: Config, watchdog: float = 0.0) -> float:
    """Seconds between two heartbeats of a worker: a quarter of
    ``--timeout-worker-healthcheck`` and of the systemd ``watchdog`` timeout (seconds; 0: none),
    at most 1 s, at least 10 ms."""
    timeouts = [t / 4 for t in (config.timeout_worker_healthcheck, watchdog) if t > 0]
    return max(0.01, min([1.0, *timeouts]))


def silent_for(worker: WorkerState, now: float, timeout: float) -> float:
    """Seconds since ``worker`` last answered when that is over ``timeout``, else 0.

    Only a worker that reported ready and has not been aborted yet is judged: one that is still
    importing the application runs no event loop yet (its boot is bounded by the boot retries).
    ``timeout`` 0 disables the check.
    """
    if timeout <= 0 or not worker.ready or worker.aborted:
        return 0.0
    silent = now - worker.last_beat
    return silent if silent > timeout else 0.0


def abort_silent(workers: Iterable[WorkerState], now: float, config: Config) -> list[WorkerState]:
    """SIGABRT each worker silent for ``--timeout-worker-healthcheck`` seconds (its
    :mod:`faulthandler` then writes every thread's stack), and SIGKILL each one still alive
    :data:`KILL_AFTER_ABORT` seconds after its SIGABRT. Returns the workers aborted now, for
    the supervisor to replace."""
    timeout = config.timeout_worker_healthcheck
    aborted = []
    for worker in workers:
        silent = silent_for(worker, now, timeout)
        if silent:
            # gunicorn's "WORKER TIMEOUT (pid:N)".
            error_logger.critical(
                "WORKER TIMEOUT (pid: %d): its event loop has not answered for %.1f s "
                "(--timeout-worker-healthcheck %g); sending SIGABRT",
                worker.pid,
                silent,
                timeout,
            )
            worker.aborted = now
            aborted.append(worker)
            with contextlib.suppress(ProcessLookupError):
                os.kill(worker.pid, signal.SIGABRT)
        elif worker.aborted and not worker.killed and now >= worker.aborted + KILL_AFTER_ABORT:
            error_logger.error(
                "Worker (pid: %d) still alive %g s after SIGABRT; sending SIGKILL",
                worker.pid,
                KILL_AFTER_ABORT,
            )
            worker.killed = True
            with contextlib.suppress(ProcessLookupError):
                os.kill(worker.pid, signal.SIGKILL)
    return aborted


def rss_bytes(pid: int) -> int | None:
    """The resident set size of process ``pid`` in bytes (``VmRSS`` of ``/proc/PID/status``),
    or None where it cannot be read (the process is gone, not Linux)."""
    try:
        with open(f"/proc/{pid}/status", "rb") as status:
            for line in status:
                if line.startswith(b"VmRSS:"):
                    return int(line.split()[1]) * 1024  # in kB
    except (OSError, ValueError, IndexError):
        pass
    return None


def recycle_reason(worker: WorkerState, now: float, config: Config) -> str:
    """Which limit ``worker`` is over, by how much, as a log phrase; "" when none.

    ``--workers-lifetime`` (seconds since the worker started) is checked first, then
    ``--workers-max-rss`` (MiB, 1 MiB = 1,048,576 bytes). A limit of 0 is no limit.
    """
    age = now - worker.started
    if config.workers_lifetime and age > config.workers_lifetime:
        over = age - config.workers_lifetime
        return (
            f"is over --workers-lifetime {config.workers_lifetime:g} s by {over:.1f} s "
            f"(age {age:.1f} s)"
        )
    if config.workers_max_rss:
        rss = rss_bytes(worker.pid)
        if rss is not None and rss > config.workers_max_rss * MiB:
            over = rss / MiB - config.workers_max_rss
            return (
                f"is over --workers-max-rss {config.workers_max_rss} MiB by {over:.1f} MiB "
                f"(RSS {rss / MiB:.1f} MiB)"
            )
    return ""


def over_limits(workers: Iterable[WorkerState], now: float, config: Config) -> list[WorkerState]:
    """The serving workers newly over ``--workers-max-rss`` or ``--workers-lifetime``: each is
    logged once with the limit and by how much, and its :attr:`WorkerState.recycling` set."""
    over = []
    for worker in workers:
        if not worker.ready or worker.recycling:
            continue
        reason = recycle_reason(worker, now, config)
        if reason:
            worker.recycling = reason
            over.append(worker)
            error_logger.info("Worker (pid: %d) %s; starting its replacement", worker.pid, reason)
    return over
