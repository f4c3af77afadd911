"""ThreadPool: the pool threads that run the application (loop thread → pool thread).

"Worker" in asyncwsgi means a process (``--workers``); the threads of one process's pool are
pool threads (``--threads``). Their log lines keep the historical wording "worker thread".
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable
from typing import Any

from .logs import LogThrottle

__all__ = ["ThreadPool", "thread_stack", "current_thread_ident", "wait_for_client"]

#: The ident of the calling thread (:func:`threading.get_ident`): a pool thread records it
#: where the loop can find which thread runs a call.
current_thread_ident = threading.get_ident

logger = logging.getLogger("asyncwsgi.error")

#: ``pool``: the :class:`ThreadPool` of the calling pool thread (unset in any other thread).
_local = threading.local()


def wait_for_client(wait: Callable[[float], bool], timeout: float) -> bool:
    """Return ``wait(timeout)``, the calling pool thread counted meanwhile as waiting for its
    client (request body bytes, or room in the connection's output), not running the app.

    Any thread; outside a pool thread it is just ``wait(timeout)``. The pool's stall check
    wakes another thread while every thread awake waits so, even if calls finished since the
    last check: those threads take no queued call until their clients act, and a client's
    bytes may be what a queued call's own thread is needed for.
    """
    pool: ThreadPool | None = getattr(_local, "pool", None)
    if pool is None:
        return wait(timeout)
    with pool._lock:
        pool._waiting += 1
    try:
        return wait(timeout)
    finally:
        with pool._lock:
            pool._waiting -= 1


class ThreadPool:
    """The pool threads that run the application: loop → thread, one deque append per request.

    A thread that finds work takes the next call itself, without sleeping in between, so a burst
    of calls is run by as few threads as keep up with it, and waking a thread costs one wake-up
    per burst, not one per call. On a core shared with the loop every wake-up is a context switch
    and a handover of the GIL, which ``concurrent.futures.ThreadPoolExecutor`` (one waiting
    thread woken per call) pays for every call.

    - :meth:`submit` (loop thread) appends the call to a deque. Once per loop iteration, after
      the iteration's I/O callbacks, the pool wakes one parked thread if no thread is awake,
      or if the last stall check (below) found the busy threads blocked.
    - A thread runs calls until the deque is empty, then parks on a lock of its own.
    - While calls wait, the loop checks every ``stall`` seconds how many calls finished since
      the last check. Busy threads (running a call, not waiting for their client through
      :func:`wait_for_client`: request body bytes, room to write) that finished fewer calls
      than there are of them are mostly blocked (a database call, a sleep), so one more thread
      is woken, or started while the pool is below ``max_threads``. Threads that keep up (one
      call each or more per check) get no company: on one GIL it would only slow them. So a
      call waits at most about ``stall`` seconds behind blocked ones while a thread is free,
      and a pool whose calls block fills up to ``max_threads`` within ``max_threads`` checks.

    Threads are daemon threads, started on demand: a request stuck in application code past the
    graceful-shutdown timeout cannot keep the process from exiting.

    Stuck threads: the loop calls :meth:`mark_stuck` for a thread whose application call is
    past ``--timeout-request``. The pool then runs one more thread in its place, so that
    ``max_threads`` threads stay free for new calls; at most ``max_threads`` stuck threads are
    replaced at once. A stuck thread whose call ends is an ordinary thread again, and the pool
    shrinks back: a thread above ``max_threads`` plus the replacements still in use ends
    instead of parking.

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
    costs no lock: the lock is taken once per park and once per wake-up. ``_finished`` is only a
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
        #: Guarded by _lock: the stuck threads, by ident, and since when (time.monotonic()).
        self._stuck: dict[int, float] = {}
        #: Guarded by _lock: threads inside :func:`wait_for_client`.
        self._waiting = 0
        self._started = 0  # threads started so far, for their names
        self._wake_scheduled = False
        self._watch: asyncio.TimerHandle | None = None
        #: Counted by the threads after each call, reset by the loop's stall check.
        self._finished = 0
        #: What the last stall check found: the busy threads finished a call each or more.
        self._kept_up = True
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
        """The most threads the pool starts, stuck threads and their replacements aside."""
        return self._max

    @property
    def stuck(self) -> int:
        """Threads still running a call past ``--timeout-request`` (see :meth:`mark_stuck`)."""
        return len(self._stuck)

    def _limit(self) -> int:
        """The most threads now: ``max_threads``, plus one per stuck thread, up to twice as
        many. Lock held."""
        return self._max + min(len(self._stuck), self._max)

    def mark_stuck(self, ident: int) -> str | None:
        """The call running in the pool thread ``ident`` is past ``--timeout-request``.

        Loop thread. The thread counts as stuck until its call returns; a replacement thread
        is started (after this loop iteration) if calls wait. Returns the thread's name, or
        None when ``ident`` is not a pool thread or is already counted stuck.
        """
        with self._lock:
            if ident in self._stuck:
                return None
            name = next((t.name for t in self._threads if t.ident == ident), None)
            if name is None:
                return None
            self._stuck[ident] = time.monotonic()
        if self._calls and not self._wake_scheduled:
            # Not now: a call another connection's timeout answers later in this iteration
            # must not be taken by the replacement first.
            self._wake_scheduled = True
            self._loop.call_soon(self._wake)
        return name

    def _wake(self) -> None:
        """After the loop iteration's callbacks: make sure a thread is awake. Loop thread."""
        self._wake_scheduled = False
        if not self._calls:
            return
        # While the busy threads keep up, one of them takes the call; while they are blocked
        # (the last stall check said so), a parked thread takes it now, not a check later.
        self._wake_one(only_if_none_awake=self._kept_up)
        if self._watch is None:
            self._finished = 0
            self._watch = self._loop.call_later(self._stall, self._check)

    def _check(self) -> None:
        """Every ``stall`` seconds while calls wait: wake a thread unless the busy ones kept up.
        Loop thread."""
        self._watch = None
        if not self._calls:
            return
        finished, self._finished = self._finished, 0
        self._wake_one(only_if_none_awake=False, finished=finished)
        self._watch = self._loop.call_later(self._stall, self._check)

    def _wake_one(self, only_if_none_awake: bool, finished: int | None = None) -> None:
        """Unpark a thread, else start one below ``max_threads``. Loop thread; never raises.

        With ``only_if_none_awake``, do nothing while a thread is awake: it takes the waiting
        calls itself before it parks. With ``finished`` (the stall check: calls finished since
        the last one), do nothing while the busy threads, those running a call and not waiting
        for their client (:func:`wait_for_client`), finished at least one call each: they keep
        up, and a thread more would only share the GIL. Fewer means they are mostly blocked (a
        database, a sleep, a slow client): another thread runs a waiting call meanwhile.
        """
        wake_up: threading.Lock | None = None
        error: Exception | None = None
        with self._lock:
            # A stuck thread is awake but will not take a call; nor, for a while, is one that
            # waits for its client (a stuck one may be counted twice: one wake-up too many).
            idle = len(self._parked) + len(self._stuck)
            if only_if_none_awake and idle < len(self._threads):
                return
            busy = len(self._threads) - idle - self._waiting
            if finished is not None:
                self._kept_up = 0 < busy <= finished
                if self._kept_up:
                    return
            if self._parked:
                wake_up = self._parked.pop()
            elif len(self._threads) < self._limit():
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
        ident = threading.get_ident()
        stuck = self._stuck
        wake_up = threading.Lock()
        wake_up.acquire()
        calls = self._calls
        lock = self._lock
        parked = self._parked
        _local.pool = self
        try:
            while True:
                try:
                    fn, args = calls.popleft()
                except IndexError:
                    with lock:
                        if calls:  # appended since: take it (the loop saw this thread awake)
                            continue
                        if self._closing or len(self._threads) > self._limit():
                            # Closing, or one too many once a stuck call ended: shrink back.
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
                self._finished += 1
                if stuck and ident in stuck:  # a hint; decided under the lock
                    self._unstuck(me, ident)
        except BaseException:  # the pool's own code failed: do not leave this thread counted
            with lock:
                if me in self._threads:
                    self._threads.remove(me)
                if wake_up in parked:
                    parked.remove(wake_up)
            with contextlib.suppress(BaseException):
                logger.critical("Worker thread %s failed; it is replaced", me.name, exc_info=True)

    def _unstuck(self, me: threading.Thread, ident: int) -> None:
        """A stuck thread's call ended: it is an ordinary thread again. Pool thread."""
        with self._lock:
            since = self._stuck.pop(ident, None)
        if since is not None:
            with contextlib.suppress(BaseException):
                logger.info(
                    "Worker thread %s, stuck for %.1f s, finished its call; back in the pool",
                    me.name,
                    time.monotonic() - since,
                )

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


def thread_stack(ident: int) -> str:
    """The Python stack of the thread ``ident`` now, most recent call last, as
    :func:`traceback.format_stack` writes it (from :func:`sys._current_frames`). Any thread."""
    frame = sys._current_frames().get(ident)
    if frame is None:
        return "  (the thread has no Python frame)\n"
    return "".join(traceback.format_stack(frame))
