"""The supervisor's view of each worker process, and the checks it makes of them.

A worker's event loop writes ``H`` (:data:`asyncwsgi.worker.HEARTBEAT`) on its pipe every
:func:`heartbeat_interval` seconds, from a loop timer: as long as the heartbeats come, the loop
runs. Application code that holds the GIL (a catastrophic regular expression, a C extension
that does not release it) or a loop blocked in a call stops them; application code that is
merely slow in a pool thread, and releases the GIL while it waits, does not.

Supervisor's main thread only.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .config import Config

__all__ = ["WorkerState", "heartbeat_interval", "silent_for", "KILL_AFTER_ABORT"]

#: Seconds between SIGABRT to a silent worker and SIGKILL, if it is still alive then.
KILL_AFTER_ABORT = 2.0


@dataclass
class WorkerState:
    """One worker process, as the supervisor knows it. Times are ``time.monotonic()``."""

    pid: int
    generation: int
    #: Read end of the worker's pipe (non-blocking); -1 once the worker closed it.
    ready_fd: int
    started: float
    ready: bool = False
    #: What the worker wrote after ``E``: why it could not boot.
    boot_error: bytearray = field(default_factory=bytearray)
    #: When the worker last wrote on its pipe (a heartbeat, or any other message).
    last_beat: float = 0.0
    #: When it was sent SIGABRT for being silent (0: never); SIGKILL follows after
    #: :data:`KILL_AFTER_ABORT` seconds.
    aborted: float = 0.0
    killed: bool = False

    def __post_init__(self) -> None:
        self.last_beat = self.last_beat or self.started


def heartbeat_interval(config: Config) -> float:
    """Seconds between two heartbeats of a worker: a quarter of
    ``--timeout-worker-healthcheck``, at most 1 s, at least 10 ms."""
    timeout = config.timeout_worker_healthcheck
    return max(0.01, min(1.0, timeout / 4)) if timeout > 0 else 1.0


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
