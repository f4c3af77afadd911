"""Prometheus metrics (``--metrics-bind HOST:PORT``): counted on the loop, exposed by
``prometheus_client`` at ``/metrics``.

Counting costs a request a few integer increments on the loop thread
(:meth:`Recorder.request_done`); ``prometheus_client`` is only involved when a scrape comes.
The figures of one server process are a :data:`Snapshot`, a plain JSON-able dict of its
cumulative counters, histogram buckets and current gauges.

- One process (no supervisor): ``prometheus_client``'s own HTTP server (``start_http_server``,
  in a thread of the library's) answers the scrape; the snapshot is taken on the loop thread
  when the scrape asks for it, so the figures are exact.
- ``--workers``: the supervisor creates a private temporary directory before it forks, and
  serves the scrapes itself (it has no application and no pool thread). Each worker writes its
  snapshot to ``DIR/PID.json`` every :data:`FLUSH_INTERVAL` seconds and once more after its
  graceful shutdown. The supervisor reads them on its own ticks; when a worker exits, its
  counters are folded into the totals of the exited workers, so that they survive recycling,
  and its gauges are dropped. The figures lag by up to about two seconds. The directory is
  removed when the supervisor exits.

A scrape never reaches the application server: no pool thread, no access line. The process
and platform collectors of ``prometheus_client`` describe the serving process (the supervisor
under ``--workers``).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import os
import shutil
import tempfile
import time
from bisect import bisect_left
from collections.abc import Callable, Collection, Iterator, Mapping, Sized
from typing import Any, Protocol, cast

from .checks import WorkerState
from .config import Config, parse_bind
from .errors import ConfigError
from .logs import error_logger

__all__ = [
    "BUCKETS",
    "FLUSH_INTERVAL",
    "QUEUE_TIME",
    "REJECTED",
    "REJECT_REASONS",
    "RESTART_REASONS",
    "Recorder",
    "SupervisorMetrics",
    "Snapshot",
    "count_rejected",
    "rejection_reason",
    "require_prometheus_client",
]

#: A process's figures: ``requests`` ({"METHOD STATUS": n}), ``rejected`` ({reason: n}),
#: ``duration`` and ``queue`` (the count of each bucket of :data:`BUCKETS`, then +Inf, then the
#: sum in seconds), ``gauges`` ({name: value}) and, from the supervisor, ``restarts``.
Snapshot = dict[str, Any]

#: Upper bounds of the histogram buckets, in seconds (prometheus_client's defaults, widened).
BUCKETS: tuple[float, ...] = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5)
BUCKETS += (0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 30.0, 60.0)
#: Seconds between two snapshots a worker writes for its supervisor.
FLUSH_INTERVAL = 1.0
#: Seconds a scrape waits for the loop to take a snapshot before it uses the last one.
SCRAPE_WAIT = 2.0
#: The environ key of the seconds a request waited between its complete head and the app call.
QUEUE_TIME = "asyncwsgi.queue_time"
#: The environ key set when the server itself refused the request in a pool thread.
REJECTED = "asyncwsgi.rejected"

#: The methods counted by name (RFC 9110 section 9 and PATCH, RFC 5789); others are ``other``.
METHODS = {
    m.encode(): m
    for m in ("GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH")
}
REJECT_REASONS = (
    "limit_concurrency",
    "queue_timeout",
    "request_timeout",
    "header_timeout",
    "bad_request",
    "too_large",
)
RESTART_REASONS = (
    "exit",
    "killed",
    "max_requests",
    "max_rss",
    "lifetime",
    "stuck",
    "healthcheck",
    "reload",
)
_GAUGES = {
    "requests_in_flight": "requests being served: waiting for a thread, running or sending",
    "threads": "pool threads started",
    "threads_busy": "pool threads running a request",
    "threads_stuck": "pool threads still running a request past --timeout-request",
    "connections_open": "open client connections",
}

#: Set in the supervisor before it forks (workers inherit it): where workers write snapshots.
_worker_dir: str | None = None
#: The supervisor's exporter, whose listening socket a worker closes (it inherited it).
_supervisor_exporter: Exporter | None = None


class _Request(Protocol):
    @property
    def method(self) -> bytes: ...


class _Cycle(Protocol):
    """What :meth:`Recorder.request_done` reads of a :class:`asyncwsgi.connstate.RequestCycle`."""

    @property
    def request(self) -> _Request: ...
    @property
    def status(self) -> int: ...
    @property
    def started(self) -> float: ...
    @property
    def environ(self) -> Mapping[str, Any] | None: ...


class _Server(Protocol):
    """What the gauges read of a :class:`asyncwsgi.state.ServerState`."""

    @property
    def config(self) -> Config: ...
    @property
    def requests_active(self) -> int: ...
    @property
    def channels(self) -> Sized: ...
    @property
    def pool(self) -> object: ...


def require_prometheus_client() -> None:
    """Raises:
    ConfigError: ``--metrics-bind`` is given and ``prometheus_client`` cannot be imported."""
    try:
        import prometheus_client  # noqa: F401
    except ImportError:
        raise ConfigError(
            "--metrics-bind needs prometheus_client: pip install 'asyncwsgi[metrics]'"
        ) from None


def empty_snapshot() -> Snapshot:
    """A snapshot of nothing counted yet."""
    buckets = [0] * (len(BUCKETS) + 1) + [0.0]
    return {
        "requests": {},
        "rejected": dict.fromkeys(REJECT_REASONS, 0),
        "duration": list(buckets),
        "queue": list(buckets),
        "gauges": dict.fromkeys(_GAUGES, 0),
    }


def add_snapshots(total: Snapshot, part: Snapshot, gauges: bool = True) -> None:
    """Add ``part``'s counters (and its gauges, unless ``gauges`` is False) into ``total``."""
    for name in ("requests", "rejected", "gauges") if gauges else ("requests", "rejected"):
        counts = total[name]
        for key, value in part.get(name, {}).items():
            counts[key] = counts.get(key, 0) + value
    for name in ("duration", "queue"):
        values = part.get(name)
        if values and len(values) == len(total[name]):
            total[name] = [a + b for a, b in zip(total[name], values, strict=True)]


def rejection_reason(status: int) -> str:
    """The ``reason`` label of a request refused with ``status`` while it was read: too large
    for 413, 414 and 431 (RFC 9110 section 15.5.14, 15.5.15; RFC 6585 section 5), else bad."""
    return "too_large" if status in (413, 414, 431) else "bad_request"


def count_rejected(
    recorder: Recorder | None, reason: str, status: int = 0, cycle: _Cycle | None = None
) -> None:
    """Count a request the server refused itself (``reason``, one of :data:`REJECT_REASONS`).

    A ``status`` also counts the response in ``asyncwsgi_requests_total``, for a refusal that
    does not end a request cycle (a 400 or 408 while the head is read), with the method of
    ``cycle``'s request when there is one. Loop thread; nothing when metrics are off.
    """
    if recorder is None:
        return
    recorder.rejected[reason] += 1
    if status:
        method = METHODS.get(cycle.request.method, "other") if cycle is not None else "other"
        key = (method, status)
        recorder.requests[key] = recorder.requests.get(key, 0) + 1


class Recorder:
    """The counters of one server process, kept on its loop thread.

    Created by :class:`asyncwsgi.state.ServerState` when ``--metrics-bind`` is set, on the
    running loop: in a supervised worker it writes its snapshot for the supervisor every
    :data:`FLUSH_INTERVAL` seconds; in a lone process it starts the :class:`Exporter`.

    Raises:
        ConfigError: prometheus_client is missing, or the metrics address cannot be bound.
    """

    def __init__(self, server: _Server) -> None:
        self.server = server
        self.loop = asyncio.get_running_loop()
        #: Responses by (method label, status).
        self.requests: dict[tuple[str, int], int] = {}
        self.rejected = dict.fromkeys(REJECT_REASONS, 0)
        # Observations per bucket of BUCKETS (the last one is +Inf), and their sum in seconds.
        self.duration = [0] * (len(BUCKETS) + 1)
        self.duration_sum = 0.0
        self.queue = [0] * (len(BUCKETS) + 1)
        self.queue_sum = 0.0
        self.last = empty_snapshot()
        self.exporter: Exporter | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._path = ""
        if _worker_dir is not None:
            if _supervisor_exporter is not None:
                _supervisor_exporter.close_inherited()
            self._path = os.path.join(_worker_dir, f"{os.getpid()}.json")
            self._timer = self.loop.call_later(FLUSH_INTERVAL, self._flush_regularly)
        else:
            address = server.config.metrics_bind
            assert address is not None
            self.exporter = Exporter(address, self._snapshot_from_loop)

    def request_done(self, cycle: _Cycle) -> None:
        """Count a response whose last byte went to the kernel now. Loop thread, per request."""
        elapsed = time.perf_counter() - cycle.started
        status = cycle.status
        key = (METHODS.get(cycle.request.method, "other"), status)
        requests = self.requests
        requests[key] = requests.get(key, 0) + 1
        self.duration[bisect_left(BUCKETS, elapsed)] += 1
        self.duration_sum += elapsed
        environ = cycle.environ
        if environ is not None:
            queued = environ.get(QUEUE_TIME)
            if type(queued) is float:
                self.queue[bisect_left(BUCKETS, queued)] += 1
                self.queue_sum += queued
            if status == 503 and environ.get(REJECTED) == "queue_timeout":
                self.rejected["queue_timeout"] += 1

    def snapshot(self) -> Snapshot:
        """The process's figures now (loop thread)."""
        server = self.server
        pool = server.pool
        self.last = snapshot = {
            "requests": {f"{m} {s}": n for (m, s), n in self.requests.items()},
            "rejected": dict(self.rejected),
            "duration": [*self.duration, self.duration_sum],
            "queue": [*self.queue, self.queue_sum],
            "gauges": {
                "requests_in_flight": server.requests_active,
                "threads": getattr(pool, "threads", 0),
                "threads_busy": getattr(pool, "busy", 0),
                "threads_stuck": getattr(pool, "stuck", 0),
                "connections_open": len(server.channels),
            },
        }
        return snapshot

    def _snapshot_from_loop(self) -> Snapshot:
        """The exporter's thread: a snapshot taken on the loop, or the last one when the loop
        does not answer within :data:`SCRAPE_WAIT` seconds (blocked, or closed)."""
        future: concurrent.futures.Future[Snapshot] = concurrent.futures.Future()

        def take() -> None:
            if not future.done():
                future.set_result(self.snapshot())

        try:
            self.loop.call_soon_threadsafe(take)
            return future.result(SCRAPE_WAIT)
        except (RuntimeError, concurrent.futures.TimeoutError):
            return self.last

    def _flush_regularly(self) -> None:
        self.flush()
        self._timer = self.loop.call_later(FLUSH_INTERVAL, self._flush_regularly)

    def flush(self) -> None:
        """Write the snapshot to the supervisor's directory (atomically: a reader sees the
        previous one or this one). Loop thread; an error (the supervisor is gone and its
        directory with it) is ignored."""
        data = json.dumps(self.snapshot()).encode()
        temporary = self._path + ".tmp"
        try:
            with open(temporary, "wb") as file:
                file.write(data)
            os.replace(temporary, self._path)
        except OSError as exc:
            error_logger.debug("Could not write the metrics snapshot %s: %s", self._path, exc)

    async def close(self) -> None:
        """After the server's graceful shutdown: write the final snapshot (a worker), or stop
        the exporter (a lone process; waits for its thread in an executor)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
            self.flush()
        if self.exporter is not None:
            exporter, self.exporter = self.exporter, None
            await self.loop.run_in_executor(None, exporter.close)


class Exporter:
    """``prometheus_client``'s HTTP server on ``address`` (``HOST:PORT``), in its own daemon
    thread, answering with the families of ``source()``'s snapshot and the process and
    platform collectors. Its requests are not logged.

    Raises:
        ConfigError: prometheus_client is missing, or ``address`` cannot be bound.
    """

    def __init__(self, address: str, source: Callable[[], Snapshot]) -> None:
        require_prometheus_client()
        from prometheus_client import (
            CollectorRegistry,
            PlatformCollector,
            ProcessCollector,
            start_http_server,
        )

        registry = CollectorRegistry()
        registry.register(_Collector(source))
        ProcessCollector(registry=registry)
        PlatformCollector(registry=registry)
        spec = parse_bind(address)
        try:
            self.httpd, self.thread = start_http_server(spec.port, spec.host, registry)
        except OSError as exc:
            reason = exc.strerror or str(exc)
            raise ConfigError(f"could not listen at {address} (--metrics-bind): {reason}") from None
        host = f"[{spec.host}]" if ":" in spec.host else spec.host
        self.url = f"http://{host}:{self.httpd.server_port}/metrics"
        error_logger.info("Metrics at: %s", self.url)

    def close(self) -> None:
        """Stop serving and close the socket; blocks until the thread has ended."""
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join()

    def close_inherited(self) -> None:
        """In a forked child: close the inherited listening socket (the thread is not there)."""
        self.httpd.socket.close()


class _Collector:
    """The asyncwsgi families of one snapshot, for ``prometheus_client``'s registry (the
    exporter's thread calls :meth:`collect` once per scrape)."""

    def __init__(self, source: Callable[[], Snapshot]) -> None:
        self.source = source

    def collect(self) -> Iterator[Any]:
        from prometheus_client import utils
        from prometheus_client.core import (
            CounterMetricFamily,
            GaugeMetricFamily,
            HistogramMetricFamily,
        )

        go_float = cast(Callable[[float], str], utils.floatToGoString)

        snapshot = self.source()
        requests = CounterMetricFamily(
            "asyncwsgi_requests",
            "HTTP responses sent, by request method and response status",
            labels=["method", "status"],
        )
        for key, count in sorted(snapshot["requests"].items()):
            method, _, status = key.partition(" ")
            requests.add_metric([method, status], count)
        yield requests
        for name, doc in (
            ("duration", "from the complete request head to the last byte handed to the kernel"),
            ("queue", "from the complete request head to the application call"),
        ):
            *counts, total = snapshot[name]
            cumulative, buckets = 0, []
            for bound, count in zip((*BUCKETS, float("inf")), counts, strict=True):
                cumulative += count
                buckets.append((go_float(bound), cumulative))
            yield HistogramMetricFamily(
                f"asyncwsgi_request_{name}_seconds", f"Seconds {doc}", buckets, total
            )
        for gauge, doc in _GAUGES.items():
            value = snapshot["gauges"].get(gauge, 0)
            yield GaugeMetricFamily(f"asyncwsgi_{gauge}", doc.capitalize(), value=value)
        for name, doc, reasons, counts in (
            ("rejected", "Requests refused by the server", REJECT_REASONS, snapshot["rejected"]),
            (
                "worker_restarts",
                "Worker processes replaced, by why they ended",
                RESTART_REASONS,
                snapshot.get("restarts", {}),
            ),
        ):
            family = CounterMetricFamily(f"asyncwsgi_{name}", doc, labels=["reason"])
            for reason in reasons:
                family.add_metric([reason], counts.get(reason, 0))
            yield family


class SupervisorMetrics:
    """The supervisor's side under ``--workers``: the directory, the exporter, the totals.

    Supervisor's main thread; the exporter's thread reads only :attr:`published`, a snapshot
    that is replaced, never changed. Does nothing when ``--metrics-bind`` is not set.
    """

    def __init__(self, config: Config) -> None:
        self.config = config
        self.directory = ""
        self.exporter: Exporter | None = None
        #: The last snapshot read of each live worker, by pid.
        self.live: dict[int, Snapshot] = {}
        #: The counters of the workers that have exited.
        self.retired = empty_snapshot()
        self.restarts = dict.fromkeys(RESTART_REASONS, 0)
        #: Why each retiring worker was told to stop, by pid.
        self.reasons: dict[int, str] = {}
        self.published = empty_snapshot()
        self._next_read = 0.0

    def collect(
        self, workers: Mapping[int, WorkerState], retiring: Collection[int], gen: int
    ) -> None:
        """Once per supervisor tick: start on the first (before any worker is forked), note
        why each newly retiring worker is stopping, and read the workers' snapshots at most
        twice a second."""
        global _worker_dir, _supervisor_exporter
        if self.config.metrics_bind is None:
            return
        if not self.directory:
            self.directory = _worker_dir = tempfile.mkdtemp(prefix="asyncwsgi-metrics-")
            self.exporter = _supervisor_exporter = Exporter(
                self.config.metrics_bind, lambda: self.published
            )
        for pid in retiring:
            worker = workers.get(pid)
            if pid not in self.reasons and worker is not None:
                self.reasons[pid] = _retiring_reason(worker, gen)
        now = time.monotonic()
        if now >= self._next_read:
            self._next_read = now + 0.5
            for pid in workers:
                self._read(pid)
            self._publish()

    def worker_exited(self, worker: WorkerState, code: int, retiring: bool, stopping: bool) -> None:
        """``worker`` was reaped with exit ``code`` (negative: the signal): fold its counters
        into the totals and count the restart, unless the supervisor is stopping."""
        if not self.directory:
            return
        pid = worker.pid
        self._read(pid)
        add_snapshots(self.retired, self.live.pop(pid, {}), gauges=False)
        reason = self.reasons.pop(pid, "")
        if not reason:
            reason = _retiring_reason(worker, None) if retiring else _exit_reason(worker, code)
        if not stopping:
            self.restarts[reason] += 1
        path = os.path.join(self.directory, f"{pid}.json")
        for name in (path, path + ".tmp"):
            with contextlib.suppress(OSError):
                os.unlink(name)
        self._publish()

    def _read(self, pid: int) -> None:
        path = os.path.join(self.directory, f"{pid}.json")
        with contextlib.suppress(OSError, ValueError), open(path, "rb") as file:
            self.live[pid] = json.loads(file.read())

    def _publish(self) -> None:
        total = empty_snapshot()
        add_snapshots(total, self.retired, gauges=False)
        for snapshot in self.live.values():
            add_snapshots(total, snapshot)
        total["restarts"] = dict(self.restarts)
        self.published = total

    def close(self) -> None:
        """Stop the exporter and remove the directory (the supervisor's exit)."""
        global _worker_dir, _supervisor_exporter
        if self.exporter is not None:
            self.exporter.close()
            self.exporter = _supervisor_exporter = None
        if self.directory:
            shutil.rmtree(self.directory, ignore_errors=True)
            self.directory = ""
            _worker_dir = None


def _retiring_reason(worker: WorkerState, generation: int | None) -> str:
    """Why a worker the supervisor told to stop (or that stopped accepting) is going."""
    if worker.aborted:
        return "healthcheck"
    recycling = worker.recycling
    if "--workers-max-rss" in recycling:
        return "max_rss"
    if "--workers-lifetime" in recycling:
        return "lifetime"
    if "stuck" in recycling:
        return "stuck"
    if generation is not None and worker.generation == generation:
        return "max_requests"  # it stopped accepting on its own, in the current generation
    return "reload"


def _exit_reason(worker: WorkerState, code: int) -> str:
    """Why a worker nobody told to stop ended: a signal (``killed``) or an exit."""
    if worker.aborted:
        return "healthcheck"
    return "killed" if code < 0 else "exit"
