"""--metrics-bind: the Prometheus metrics, scraped over real sockets from real servers.

A lone server (in the test's loop) answers with figures taken on its loop when the scrape
comes, so they are exact at once. Under ``--workers`` (a subprocess) the supervisor answers
from the snapshots its workers write every second: those tests poll the scrape, with a
deadline, until the figure they wait for is there.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from asyncwsgi import Config
from asyncwsgi import wsgi as wsgi_module
from asyncwsgi.errors import ConfigError

from .helpers import exchange, running
from .test_cli import ROOT, CLIServer, http_client

DEADLINE = 20.0

#: Every asyncwsgi family and its type.
FAMILIES = {
    "asyncwsgi_requests": "counter",
    "asyncwsgi_request_duration_seconds": "histogram",
    "asyncwsgi_request_queue_seconds": "histogram",
    "asyncwsgi_requests_in_flight": "gauge",
    "asyncwsgi_threads": "gauge",
    "asyncwsgi_threads_busy": "gauge",
    "asyncwsgi_threads_stuck": "gauge",
    "asyncwsgi_connections_open": "gauge",
    "asyncwsgi_rejected": "counter",
    "asyncwsgi_worker_restarts": "counter",
}

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(url: str) -> tuple[dict[str, str], Samples]:
    """GET ``url``; return the type of each family and every sample by (name, labels)."""
    with http_client() as client:
        response = client.get(url)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    types: dict[str, str] = {}
    samples: Samples = {}
    for family in text_string_to_metric_families(response.text):
        types[family.name] = family.type
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return types, samples


def total(samples: Samples, name: str, **labels: str) -> float:
    """The sum of the samples of ``name`` whose labels include ``labels``."""
    wanted = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and wanted <= set(ls))


def scrape_until(url: str, ready: Callable[[Samples], bool]) -> Samples:
    """Scrape until ``ready(samples)``: the workers' figures reach the supervisor within about
    two seconds (no event tells when; this polls an external process, with a deadline)."""
    deadline = time.monotonic() + DEADLINE
    while True:
        _, samples = scrape(url)
        if ready(samples):
            return samples
        if time.monotonic() > deadline:
            raise AssertionError(f"metrics not as expected within {DEADLINE}s: {samples}")
        time.sleep(0.1)


def hello(environ: dict[str, Any], start_response: Any) -> list[bytes]:
    body = repr(type(environ.get("asyncwsgi.queue_time"))).encode()
    start_response("200 OK", [("Content-Length", str(len(body)))])
    return [body]


# -- one process -------------------------------------------------------------------------------


async def test_a_lone_server_exposes_every_family_with_its_type() -> None:
    async with running(hello, metrics_bind="127.0.0.1:0") as server:
        metrics = server.server.state.metrics
        assert metrics is not None
        assert metrics.exporter is not None
        url = metrics.exporter.url
        assert url.endswith("/metrics")
        with http_client() as client:
            for _ in range(3):
                reply = await asyncio.to_thread(client.get, server.url)
                assert reply.text == "<class 'float'>"  # asyncwsgi.queue_time
        await exchange(server.port, b"BREW / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        types, samples = await asyncio.to_thread(scrape, url)
    assert {name: types.get(name) for name in FAMILIES} == FAMILIES
    assert "process_resident_memory_bytes" in types  # prometheus_client's process collector
    assert "python_info" in types  # and its platform collector
    assert total(samples, "asyncwsgi_requests_total") == 4
    assert total(samples, "asyncwsgi_requests_total", method="GET", status="200") == 3
    assert total(samples, "asyncwsgi_requests_total", method="other", status="200") == 1
    assert total(samples, "asyncwsgi_request_duration_seconds_count") == 4
    assert total(samples, "asyncwsgi_request_queue_seconds_count") == 4
    assert total(samples, "asyncwsgi_request_duration_seconds_bucket", le="+Inf") == 4
    assert total(samples, "asyncwsgi_threads") >= 1
    assert total(samples, "asyncwsgi_connections_open") == 0
    assert total(samples, "asyncwsgi_worker_restarts_total") == 0


async def test_rejections_are_counted_by_reason() -> None:
    """503 over --limit-concurrency, 400, 413 and 408: each its reason, each a response."""
    entered, release = threading.Event(), threading.Event()

    def gated(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        if environ["PATH_INFO"] == "/gate":
            entered.set()
            release.wait(10)
        start_response("200 OK", [("Content-Length", "2")])
        return [b"ok"]

    options: dict[str, Any] = {"limit_concurrency": 1, "limit_request_body": 10}
    async with running(gated, metrics_bind="127.0.0.1:0", **options) as server:
        metrics = server.server.state.metrics
        assert metrics is not None
        assert metrics.exporter is not None
        first = asyncio.ensure_future(
            exchange(server.port, b"GET /gate HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        )
        assert await asyncio.to_thread(entered.wait, 10)
        _, in_flight = await asyncio.to_thread(scrape, metrics.exporter.url)
        busy = await exchange(server.port, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        release.set()
        assert (await first).startswith(b"HTTP/1.1 200 ")
        assert busy.startswith(b"HTTP/1.1 503 ")
        assert (await exchange(server.port, b"GARBAGE\r\n\r\n")).startswith(b"HTTP/1.1 400 ")
        big = b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 11\r\n\r\n"
        assert (await exchange(server.port, big)).startswith(b"HTTP/1.1 413 ")
        _, samples = await asyncio.to_thread(scrape, metrics.exporter.url)
    assert total(in_flight, "asyncwsgi_requests_in_flight") == 1
    assert total(in_flight, "asyncwsgi_threads_busy") == 1
    assert total(in_flight, "asyncwsgi_connections_open") == 1
    rejected = {
        labels[0][1]: value
        for (name, labels), value in samples.items()
        if name == "asyncwsgi_rejected_total"
    }
    assert rejected == {
        "limit_concurrency": 1,
        "queue_timeout": 0,
        "request_timeout": 0,
        "header_timeout": 0,
        "bad_request": 1,
        "too_large": 1,
    }
    assert total(samples, "asyncwsgi_requests_total", method="GET", status="503") == 1
    assert total(samples, "asyncwsgi_requests_total", method="other", status="400") == 1
    assert total(samples, "asyncwsgi_requests_total", status="413") == 1
    assert total(samples, "asyncwsgi_requests_total", method="GET", status="200") == 1


class _LaterClock:
    """``time`` as :mod:`asyncwsgi.wsgi` reads it, ``seconds`` later."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def perf_counter(self) -> float:
        return time.perf_counter() + self.seconds


async def test_queue_and_request_timeouts_are_counted(monkeypatch: pytest.MonkeyPatch) -> None:
    """A request past --timeout-request (504), then one that waited past --timeout-queue (503)."""
    monkeypatch.setattr(wsgi_module, "_queue_throttle", wsgi_module.LogThrottle())  # as new
    entered, release = threading.Event(), threading.Event()

    def slow(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        entered.set()
        release.wait(10)
        start_response("200 OK", [("Content-Length", "2")])
        return [b"ok"]

    request = b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    async with running(slow, metrics_bind="127.0.0.1:0", timeout_request=0.1) as server:
        metrics = server.server.state.metrics
        assert metrics is not None
        assert metrics.exporter is not None
        assert (await exchange(server.port, request)).startswith(b"HTTP/1.1 504 ")
        release.set()
        _, timed_out = await asyncio.to_thread(scrape, metrics.exporter.url)
    entered.clear()
    release.clear()
    async with running(slow, metrics_bind="127.0.0.1:0", threads=1, timeout_queue=0.01) as server:
        metrics = server.server.state.metrics
        assert metrics is not None
        assert metrics.exporter is not None
        url = metrics.exporter.url
        first = asyncio.ensure_future(exchange(server.port, request))
        assert await asyncio.to_thread(entered.wait, 10)
        second = asyncio.ensure_future(exchange(server.port, request))
        await asyncio.to_thread(
            scrape_until, url, lambda s: total(s, "asyncwsgi_requests_in_flight") == 2
        )
        # The second request has waited past --timeout-queue by the time the thread takes it:
        # the pool thread's clock moves on a second, not the test's wall clock.
        monkeypatch.setattr(wsgi_module, "time", _LaterClock(1.0))
        release.set()
        assert (await first).startswith(b"HTTP/1.1 200 ")
        assert (await second).startswith(b"HTTP/1.1 503 ")  # it waited for that thread
        _, queued = await asyncio.to_thread(scrape, url)
    assert total(timed_out, "asyncwsgi_rejected_total", reason="request_timeout") == 1
    assert total(timed_out, "asyncwsgi_rejected_total") == 1
    assert total(timed_out, "asyncwsgi_requests_total", method="GET", status="504") == 1
    assert total(queued, "asyncwsgi_rejected_total", reason="queue_timeout") == 1
    assert total(queued, "asyncwsgi_rejected_total") == 1
    assert total(queued, "asyncwsgi_requests_total", method="GET", status="503") == 1
    assert total(queued, "asyncwsgi_request_queue_seconds_count") == 1  # only the one served


def test_the_metrics_address_must_be_tcp() -> None:
    with pytest.raises(ConfigError, match="HOST:PORT"):
        Config(metrics_bind="unix:/tmp/metrics.sock")
    assert Config(metrics_bind="127.0.0.1:9100").metrics_bind == "127.0.0.1:9100"


# -- --workers ---------------------------------------------------------------------------------


def test_workers_are_counted_together_and_counters_survive_a_reload() -> None:
    """N requests to two workers sum to N; after SIGHUP replaced both, still N, and two restarts
    for "reload". The scrapes are not in the access log."""
    count = 24
    with CLIServer(
        "tests.apps:hello", "--port", "0", "--workers", "2", "--metrics-bind", "127.0.0.1:0"
    ) as server:
        url = server.wait_for(r"Metrics at: (http://\S+/metrics)").group(1)
        base = server.url()
        with http_client() as client:
            for _ in range(count):
                reply = client.get(base, headers={"Connection": "close"})
                assert reply.status_code == 200
        samples = scrape_until(url, lambda s: total(s, "asyncwsgi_requests_total") >= count)
        assert total(samples, "asyncwsgi_requests_total", method="GET", status="200") == count
        assert total(samples, "asyncwsgi_request_duration_seconds_count") == count
        assert total(samples, "asyncwsgi_request_queue_seconds_count") == count
        directory = snapshot_file(server).parent
        server.proc.send_signal(signal.SIGHUP)
        samples = scrape_until(
            url, lambda s: total(s, "asyncwsgi_worker_restarts_total", reason="reload") >= 2
        )
        assert total(samples, "asyncwsgi_requests_total") == count
        assert total(samples, "asyncwsgi_worker_restarts_total") == 2
        assert server.stop() == 0
    assert not directory.exists()  # removed at exit
    assert '"GET / HTTP/1.1" 200' in server.output
    assert "/metrics" not in server.output.replace(url, "")


def snapshot_file(server: CLIServer) -> Path:
    """The snapshot file (``DIR/PID.json``) of one of ``server``'s workers, once written."""
    pid = server.wait_for(r"\[(\d+)\] \[INFO\] Listening at").group(1)
    deadline = time.monotonic() + DEADLINE
    while not (found := list(Path(tempfile.gettempdir()).glob(f"asyncwsgi-metrics-*/{pid}.json"))):
        assert time.monotonic() < deadline, "no snapshot file written"
        time.sleep(0.1)
    return found[0]


@pytest.mark.parametrize("workers", [(), ("--workers", "2")], ids=["single", "workers"])
def test_without_prometheus_client_the_flag_is_a_clear_error(
    tmp_path: Path, workers: tuple[str, ...]
) -> None:
    shadow = tmp_path / "prometheus_client"
    shadow.mkdir()
    (shadow / "__init__.py").write_text("raise ImportError('not installed')\n")
    env = {**os.environ, "PYTHONPATH": str(tmp_path), "WEB_CONCURRENCY": ""}
    argv = [sys.executable, "-m", "asyncwsgi", "serve", "tests.apps:hello", "--app-dir", str(ROOT)]
    result = subprocess.run(
        [*argv, "--port", "0", "--metrics-bind", "127.0.0.1:0", *workers],
        capture_output=True,
        text=True,
        timeout=20,
        env=env,
        stdin=subprocess.DEVNULL,
    )
    assert result.returncode == 1, result.stderr
    assert (
        "Error: --metrics-bind needs prometheus_client: pip install 'asyncwsgi[metrics]'"
        in result.stderr
    )
    assert "Listening at" not in result.stderr
