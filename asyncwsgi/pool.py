"""ThreadPool: the pool threads that run the application (loop thread → pool thread).

"Worker" in asyncwsgi means a process (``--workers``); the threads of one process's pool are
pool threads (``--threads``). Their log lines keep the historical wording "worker thread".
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from .logs import LogThrottle

__all__ = ["ThreadPool"]

logger = logging.getLogger("asyncwsgi.error")


class ThreadPool:
    """The pool threads that run the application: loop → thread, one deque append per request.

    A thread that finds work takes the next call itself, without sleeping in between, so a burst
    of calls is run by as few threads as keep up with it, and waking a thread costs one wake-up
    per burst, not one per call. On a core shared with the loop every wake-up is a context switch
    and a handover of the GIL, which ``concurrent.futures.ThreadPoolExecutor`` (one waiting
    thread woken per call) pays for every call.

    - :meth:`submit` (loop thread) appends the call to a deque. Once per loop iteration, after
      the iteration's I/O callbacks, the pool wakes one parked thread if no thread is awake.
    - A thread runs calls until the deque is empty, then parks on a lock of its own.
    - While calls wait, the loop checks every ``stall`` seconds whether any call finished since
      the last check. If none did, the awake threads are blocked (a database call, a slow
      client, a sleep), and one more thread is woken, or started while the pool is below
      ``max_threads``. So a call waits at most about ``stall`` seconds behind a blocked one
      while a thread is free.

    Threads are daemon threads, started on demand: a request stuck in application code past the
    graceful-shutdown timeout cannot keep the process from exiting.

    Robustness: a thread never ends because of what a call raises; any ``BaseException``
    (``SystemExit`` from ``sys.exit()`` in application code, say) is logged and the thread takes
    the next call. A thread that fails to start is not counted, and is started again at the next
    check. Should a thread end anyway, it is no longer counted, and the next check starts another.

    Thread safety, with or without the GIL (free-threaded CPython): ``_lock`` guards the thread
    list, the parked list and the closing flag, and every decision to park, wake, start or end a
    thread is taken under it. A thread checks the deque for calls and parks in one critical
    section, and the loop checks for parked threads after appending a call, so a wake-up is
    never lost and a parked thread is popped (and its lock released) exactly once. The deque
    itself is outside the lock (``append`` and ``popleft`` are atomic on every build), so a call
    costs no lock: the lock is taken once per park and once per wake-up. ``_progress`` is only a
    hint for the stall check: a stale read wakes one thread too many or one check late.

    Args:
        loop: the event loop whose thread calls :meth:`submit`.
        max_threads: the most threads, and so the most concurrent application calls.
        name: thread name prefix (``asyncwsgi_0``, ``asyncwsgi_1``...).
        stall: seconds without a finished call, while calls wait, before another thread is woken.
    """

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        max_threads: int,
        name: str = "asyncwsgi",
        stall: float = 0.002,
    ) -> None:
        self._loop = loop
        self._calls: deque[tuple[Callable[..., object], tuple[Any, ...]]] = deque()
        self._max = max_threads
        self._name = name
        self._stall = stall
        self._lock = threading.Lock()
        # Guarded by _lock: the live threads, the wake-up lock of each parked thread (the same
        # list object for the pool's life: threads keep a reference), and the closing flag.
        self._threads: list[threading.Thread] = []
        self._parked: list[threading.Lock] = []
        self._closing = False
        self._started = 0  # threads started so far, for their names
        self._wake_scheduled = False
        self._watch: asyncio.TimerHandle | None = None
        #: Set by a worker after each call, cleared by the loop's stall check.
        self._progress = False
        self._start_errors = LogThrottle()

    def submit(self, fn: Callable[..., object], *args: Any) -> None:
        """Run ``fn(*args)`` in a pool thread. Loop thread only; never blocks.

        ``fn`` should not raise; if it does (even ``SystemExit``), the error is logged and the
        thread carries on. A call submitted during or after :meth:`shutdown` still runs, in a
        thread that ends once no call is left.
        """
        self._calls.append((fn, args))
        if not self._wake_scheduled:
            self._wake_scheduled = True
            self._loop.call_soon(self._wake)

    @property
    def threads(self) -> int:
        """Threads running: started and not ended."""
        return len(self._threads)

    @property
    def busy(self) -> int:
        """Threads not parked: running a call, or about to take one (approximate)."""
        return len(self._threads) - len(self._parked)

    @property
    def queued(self) -> int:
        """Calls waiting for a thread (approximate)."""
        return len(self._calls)

    @property
    def max_threads(self) -> int:
        """The most threads the pool starts."""
        return self._max

    def _wake(self) -> None:
        """After the loop iteration's callbacks: make sure a thread is awake. Loop thread."""
        self._wake_scheduled = False
        if not self._calls:
            return
        self._wake_one(only_if_none_awake=True)
        if self._watch is None:
            self._progress = False
            self._watch = self._loop.call_later(self._stall, self._check)

    def _check(self) -> None:
        """Every ``stall`` seconds while calls wait: wake a thread if none finished. Loop thread."""
        self._watch = None
        if not self._calls:
            return
        self._wake_one(only_if_none_awake=self._progress)
        self._progress = False
        self._watch = self._loop.call_later(self._stall, self._check)

    def _wake_one(self, only_if_none_awake: bool) -> None:
        """Unpark a thread, else start one below ``max_threads``. Loop thread; never raises.

        With ``only_if_none_awake``, do nothing while a thread is awake: it takes the waiting
        calls itself before it parks.
        """
        wake_up: threading.Lock | None = None
        error: Exception | None = None
        with self._lock:
            if only_if_none_awake and len(self._parked) < len(self._threads):
                return
            if self._parked:
                wake_up = self._parked.pop()
            elif len(self._threads) < self._max:
                # Started under the lock, so every listed thread has started (shutdown joins).
                thread = threading.Thread(
                    target=self._work, name=f"{self._name}_{self._started}", daemon=True
                )
                try:
                    thread.start()
                except Exception as exc:  # "can't start new thread": out of memory, a ulimit
                    error = exc
                else:
                    self._started += 1
                    self._threads.append(thread)
            else:
                return
            running = len(self._threads)
        if wake_up is not None:
            wake_up.release()
        if error is None:
            return
        count = self._start_errors.ready()
        if count:
            logger.error(
                "Cannot start a worker thread (%d of %d running): %s "
                "(%d failure(s) since the last report); retrying",
                running,
                self._max,
                error,
                count,
            )

    def _work(self) -> None:
        """A pool thread: run calls until none is left, then park; end once closing."""
        me = threading.current_thread()
        wake_up = threading.Lock()
        wake_up.acquire()
        calls = self._calls
        lock = self._lock
        parked = self._parked
        try:
            while True:
                try:
                    fn, args = calls.popleft()
                except IndexError:
                    with lock:
                        if calls:  # appended since: take it (the loop saw this thread awake)
                            continue
                        if self._closing:
                            self._threads.remove(me)
                            return
                        parked.append(wake_up)
                    wake_up.acquire()  # released by the loop's _wake_one or by shutdown
                    continue
                try:
                    fn(*args)
                except BaseException:  # SystemExit from app code too: the thread must not end
                    with contextlib.suppress(BaseException):  # nor if a log handler fails
                        logger.exception("Unhandled error in a worker thread")
                del fn, args
                self._progress = True
        except BaseException:  # the pool's own code failed: do not leave this thread counted
            with lock:
                if me in self._threads:
                    self._threads.remove(me)
                if wake_up in parked:
                    parked.remove(wake_up)
            with contextlib.suppress(BaseException):
                logger.critical("Worker thread %s failed; it is replaced", me.name, exc_info=True)

    def shutdown(self, timeout: float) -> int:
        """Let the threads run the queued calls and end; wait up to ``timeout`` seconds.

        Blocks: call it in a thread other than the loop's. Parked threads are woken and end;
        busy ones end after their call once nothing is queued. Calls still queued when time ran
        out (every thread stuck, or none started) run in the calling thread; a call submitted
        later still runs, in a thread started for it. Whatever a call raises is logged.

        Returns:
            The number of threads still running a call when time ran out (daemon threads,
            abandoned).
        """
        with self._lock:
            self._closing = True
            wake_ups = self._parked[:]
            self._parked.clear()
        for wake_up in wake_ups:
            wake_up.release()
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:  # threads started meanwhile (for late calls) are waited for too
                running = self._threads[:]
            remaining = deadline - time.monotonic()
            if not running or remaining <= 0:
                break
            running[0].join(remaining)
        calls = self._calls
        while True:
            try:
                fn, args = calls.popleft()
            except IndexError:
                break
            try:
                fn(*args)
            except BaseException:
                logger.exception("Unhandled error in a worker thread")
            del fn, args
        return len(self._threads)
