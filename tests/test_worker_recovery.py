"""The supervisor keeps its workers healthy: --workers 1, hung workers, recycling by memory and
age. Real processes, signals and sockets; the subprocess serves the applications below
(``tests.test_worker_recovery:app``, imported with ``--app-dir`` at the repository root)."""

from __future__ import annotations

import contextlib
import http.client
import os
import re
import subprocess
import threading
import time
from typing import Any

import pytest

from asyncwsgi.cli import build_parser

from .test_cli import CLIServer, http_client, port_of
from .test_supervisor import _children

APP = "tests.test_worker_recovery:app"
DEADLINE = 20.0


# -- the application served by the subprocess --------------------------------------------------

_HELD: list[bytearray] = []


def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
    """``/``: the serving process's pid. ``/regex``: a catastrophic regular expression, which
    holds the GIL for hours. ``/sleep?S``: sleeps S seconds (releasing the GIL) first.
    ``/alloc``: keeps 100 MiB in a module global, resident (every page written)."""
    path = environ["PATH_INFO"]
    if path == "/alloc":
        _HELD.append(bytearray(b"x" * 100 * 1024 * 1024))
    elif path == "/regex":
        re.match(r"(a+)+$", "a" * 40 + "b")
    elif path == "/sleep":
        time.sleep(float(environ["QUERY_STRING"]))
    body = str(os.getpid()).encode()
    start_response("200 OK", [("Content-Length", str(len(body)))])
    return [body]


# -- --workers 1 ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "env"),
    [(("--workers", "1"), {}), ((), {"WEB_CONCURRENCY": "1"})],
    ids=["flag", "WEB_CONCURRENCY"],
)
def test_explicit_one_worker_runs_the_supervisor(
    args: tuple[str, ...], env: dict[str, str]
) -> None:
    """As gunicorn's -w 1: a supervisor and one worker, which answers, not the supervisor."""
    with CLIServer(APP, "--port", "0", "--no-access-log", *args, env=env) as server:
        match = server.wait_for(r"Starting supervisor \(pid: (\d+), workers: 1\)")
        assert int(match.group(1)) == server.proc.pid
        with http_client() as client:
            served_by = int(client.get(server.url()).text)
        assert served_by != server.proc.pid
        assert server.stop() == 0


def test_without_workers_a_single_process_serves() -> None:
    env = {"WEB_CONCURRENCY": ""}
    with CLIServer(APP, "--port", "0", "--no-access-log", env=env) as server:
        with http_client() as client:
            served_by = int(client.get(server.url()).text)
        assert served_by == server.proc.pid
        assert server.stop() == 0
        assert "supervisor" not in server.output


# -- hung workers: --timeout-worker-healthcheck ---------------------------------------------------


def _get(port: int, path: str = "/", timeout: float = DEADLINE) -> str:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        assert response.status == 200
        return response.read().decode()
    finally:
        conn.close()


def _converges(server: CLIServer, count: int) -> None:
    """Wait until the supervisor has exactly ``count`` live workers (bounded polling of process
    state: no event tells that a process has exited)."""
    deadline = time.monotonic() + DEADLINE
    while len(_children(server.proc.pid)) != count:
        assert time.monotonic() < deadline, server.output
        with pytest.raises(subprocess.TimeoutExpired):
            server.proc.wait(0.1)  # the supervisor must still run


def test_timeout_is_gunicorns_spelling_of_the_health_check_timeout() -> None:
    parse = build_parser().parse_args
    assert parse(["serve", "a:b", "--timeout", "5"]).timeout_worker_healthcheck == 5
    assert parse(["serve", "a:b", "--timeout-keep-alive", "7"]).timeout_keep_alive == 7


def test_worker_holding_the_gil_is_aborted_with_its_stacks_and_replaced() -> None:
    """A request runs a catastrophic regular expression: the worker's event loop stops, the
    supervisor aborts it (faulthandler writes every thread's stack), then replaces it."""
    args = ("--port", "0", "--workers", "2", "--timeout-worker-healthcheck", "2")
    with CLIServer(APP, *args, "--no-access-log") as server:
        server.wait_for("Listening at")
        server.wait_for("Listening at")
        port = port_of(server.url())

        def hang() -> None:
            with contextlib.suppress(OSError, http.client.HTTPException):
                _get(port, "/regex")

        client = threading.Thread(target=hang)
        client.start()
        timeout = server.wait_for(
            r"WORKER TIMEOUT \(pid: (\d+)\): its event loop has not answered for ([\d.]+) s"
        )
        hung, silent = int(timeout.group(1)), float(timeout.group(2))
        assert silent >= 2
        server.wait_for(rf"Worker \(pid: {hung}\) ended by SIG(ABRT|KILL)")
        client.join(DEADLINE)
        _converges(server, 2)
        assert hung not in _children(server.proc.pid)
        for _ in range(6):
            assert int(_get(port)) != hung
        assert server.stop() == 0
    # faulthandler's dump of the hung worker: its threads, the app's frame among them.
    assert "Fatal Python error: Aborted" in server.output
    assert "Current thread 0x" in server.output
    assert re.search(r'File "[^"]*test_worker_recovery\.py", line \d+ in app', server.output)


def test_app_slow_in_a_thread_is_not_mistaken_for_a_hung_worker() -> None:
    """A request that sleeps (releasing the GIL) for longer than the health-check timeout: the
    event loop keeps answering, and the same worker serves the response and the next one."""
    args = ("--port", "0", "--workers", "1", "--timeout-worker-healthcheck", "0.5")
    with CLIServer(APP, *args, "--no-access-log") as server:
        port = port_of(server.url())
        pid = int(_get(port, "/sleep?2"))
        assert int(_get(port)) == pid
        assert server.stop() == 0
    assert "WORKER TIMEOUT" not in server.output


# -- recycling by memory and age: --workers-max-rss, --workers-lifetime ----------------------------


class _Client:
    """Requests back to back, a new connection each, recording every failure, until stopped."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.answers = 0
        self.failures: list[BaseException] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                _get(self.port)
                self.answers += 1
            except Exception as exc:
                self.failures.append(exc)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(DEADLINE)


def test_workers_lifetime_replaces_workers_without_failing_a_request() -> None:
    """--workers-lifetime 1: each worker is replaced once it is a second old, replacement first;
    under a steady client no request fails, and the count of workers stays bounded and comes
    back to --workers between replacements."""
    args = ("--port", "0", "--workers", "2", "--workers-lifetime", "1")
    with CLIServer(APP, *args, "--no-access-log") as server:
        port = port_of(server.url())
        client = _Client(port)
        most = 0
        try:
            for _ in range(5):
                line = server.wait_for(
                    r"Worker \(pid: \d+\) is over --workers-lifetime 1 s by ([\d.]+) s "
                    r"\(age ([\d.]+) s\); starting its replacement"
                )
                assert float(line.group(2)) >= 1  # one decimal: 1.04 s is "1.0"
                most = max(most, len(_children(server.proc.pid)))
            _converges(server, 2)
        finally:
            client.stop()
        assert server.stop() == 0
    assert not client.failures, client.failures[:3]
    assert client.answers > 0
    assert most <= 2 * 2 + 1, most  # at most a replacement booting and old ones draining


def test_workers_max_rss_replaces_the_worker_over_it() -> None:
    """A worker that holds 100 MiB, with --workers-max-rss 80: that worker is replaced (its
    replacement first, then SIGTERM), the log names the limit and by how much it is over."""
    args = ("--port", "0", "--workers", "2", "--workers-max-rss", "80")
    with CLIServer(APP, *args, "--no-access-log") as server:
        server.wait_for("Listening at")
        server.wait_for("Listening at")
        port = port_of(server.url())
        big = int(_get(port, "/alloc"))
        line = server.wait_for(
            rf"Worker \(pid: {big}\) is over --workers-max-rss 80 MiB by ([\d.]+) MiB "
            r"\(RSS ([\d.]+) MiB\); starting its replacement"
        )
        over, rss = float(line.group(1)), float(line.group(2))
        assert rss > 100
        assert over == pytest.approx(rss - 80, abs=0.1)
        server.wait_for(r"Booting worker with pid: \d+")
        server.wait_for("Listening at")  # the replacement accepts...
        server.wait_for(rf"\[{big}\] \[INFO\] Received SIGTERM, shutting down")  # ...then this
        _converges(server, 2)
        assert big not in _children(server.proc.pid)
        assert server.stop() == 0
    assert server.output.count("is over --workers-max-rss") == 1
