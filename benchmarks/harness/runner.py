"""Running one server x scenario x round: start the server pinned to its core, wait until it
answers correctly, warm up, measure with wrk (beside the idle or slowloris clients where the
scenario asks), and stop it.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import resource
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .constants import BENCH_DIR, CHECK_LUA, IDLE_CLIENTS_PY, KiB
from .environment import free_port, log, server_env
from .options import Options
from .procstat import CLOCK_TICKS_PER_S, TreeSample, core_busy_ticks, process_state, sample_tree
from .scenarios import Scenario
from .servers import LaunchContext, Server

READY_TIMEOUT_S = 15.0
DRAIN_TIMEOUT_S = 10.0
START_FAILED = "start failed:"
IDLE_MIN_HELD = 100
QUIET_PROBE_S = 0.5
QUIET_BUSY_PCT = 10.0
STOP_TIMEOUT_S = 5.0
WRK_TIMEOUT = "5s"
#: Bodies up to this size are checked one by one in wrk's response(); larger ones in aggregate
#: (wrk 4.1 grows its body buffer 1 KiB at a time, which would make wrk the bottleneck).
PER_RESPONSE_CHECK_MAX_BYTES = 16 * KiB
#: Allowance per response for the head and chunked framing in the aggregate size check.
AGGREGATE_SLACK_BYTES = 4 * KiB


@dataclass(frozen=True)
class Expect:
    """A correct response: status code and body length in bytes."""

    status: int
    length: int


class ServerFailed(Exception):
    """The server did not start, died, or never answered a correct response."""


class RunningServer:
    """A server process group: started pinned to a core, stopped with SIGTERM then SIGKILL."""

    def __init__(self, argv: list[str], log_path: Path, cpu: str | None) -> None:
        self.log_path = log_path
        self.log_file = log_path.open("wb")
        pin = ["taskset", "-c", cpu] if cpu is not None else []
        self.proc = subprocess.Popen(
            [*pin, *argv],
            cwd=BENCH_DIR,
            env=server_env(),
            stdin=subprocess.DEVNULL,
            stdout=self.log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log_tail(self, lines: int = 6) -> str:
        self.log_file.flush()
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return " | ".join(line.strip() for line in text.strip().splitlines()[-lines:])

    def stop(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(STOP_TIMEOUT_S)
        # Kill leftovers of the group too (workers whose master is already gone).
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(STOP_TIMEOUT_S)
        self.log_file.close()


def probe(port: int, scenario: Scenario, expect: Expect, timeout_s: float = 2.0) -> str | None:
    """Send one request; return None if the answer is correct, else what was wrong."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout_s)
    try:
        if scenario.post_bytes is not None:
            conn.request("POST", "/", body=b"x" * scenario.post_bytes)
        else:
            conn.request("GET", "/")
        response = conn.getresponse()
        body = response.read()
    except (OSError, http.client.HTTPException) as exc:
        return f"{type(exc).__name__}: {exc}"
    finally:
        conn.close()
    if response.status != expect.status or len(body) != expect.length:
        return f"wrong answer: status {response.status}, {len(body)} body bytes"
    return None


def wait_ready(server: RunningServer, port: int, scenario: Scenario, expect: Expect) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    problem = "no answer"
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            raise ServerFailed(
                f"{START_FAILED} exited with {server.proc.returncode}: {server.log_tail()}"
            )
        problem = probe(port, scenario, expect) or ""
        if not problem:
            return
        time.sleep(0.1)
    raise ServerFailed(
        f"{START_FAILED} not ready after {READY_TIMEOUT_S:.0f} s ({problem}): "
        f"{process_state(server.pid)}; log: {server.log_tail()}"
    )


def drain(server: RunningServer, port: int, scenario: Scenario, expect: Expect) -> None:
    """Wait until requests queued by the warm-up are served, so they don't eat the measurement.

    A server that is slower than wrk (gunicorn-sync on the sleep app: 64 connections x 50 ms)
    still has the warm-up's connections in its accept queue when wrk exits. One fresh request
    queues behind them; its answer means the backlog is gone.
    """
    deadline = time.monotonic() + DRAIN_TIMEOUT_S
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            raise ServerFailed(f"exited with {server.proc.returncode}: {server.log_tail()}")
        if probe(port, scenario, expect, timeout_s=DRAIN_TIMEOUT_S) is None:
            return
        time.sleep(0.1)


@dataclass
class WrkResult:
    """One wrk run, from the BENCH_RESULT line of check.lua."""

    requests: int
    duration_s: float
    rps: float
    socket_errors: int
    bad_responses: int
    bad_sample: str
    p50_ms: float
    p99_ms: float
    p999_ms: float
    cpu_pct: float

    @property
    def errors(self) -> int:
        return self.socket_errors + self.bad_responses


def run_wrk(
    port: int, scenario: Scenario, expect: Expect, seconds: int, opts: Options
) -> WrkResult:
    pin = ["taskset", "-c", opts.client_cpu] if opts.client_cpu is not None else []
    cmd = [*pin, "wrk", "-t1", f"-c{opts.connections}", f"-d{seconds}s"]
    cmd += ["--timeout", WRK_TIMEOUT, "-s", str(CHECK_LUA)]
    if scenario.close:
        cmd += ["-H", "Connection: close"]
    cmd += [f"http://127.0.0.1:{port}/", "--", str(expect.status), str(expect.length)]
    if scenario.post_bytes is not None:
        cmd.append(str(scenario.post_bytes))
    per_response = expect.length <= PER_RESPONSE_CHECK_MAX_BYTES
    env = {**os.environ, "CHECK_BODIES": "1" if per_response else "0"}
    usage_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = subprocess.run(
        cmd, capture_output=True, text=True, timeout=seconds + 60, check=False, env=env
    )
    usage_after = resource.getrusage(resource.RUSAGE_CHILDREN)
    wrk_cpu_s = (usage_after.ru_utime + usage_after.ru_stime) - (
        usage_before.ru_utime + usage_before.ru_stime
    )
    for line in proc.stdout.splitlines():
        if line.startswith("BENCH_RESULT "):
            data: dict[str, Any] = json.loads(line.removeprefix("BENCH_RESULT "))
            break
    else:
        raise ServerFailed(f"wrk failed (rc {proc.returncode}): {proc.stderr.strip()[-300:]}")
    duration_s = data["duration_us"] / 1e6
    socket_errors = sum(
        data[key] for key in ("connect_errors", "read_errors", "write_errors", "timeouts")
    )
    bad_responses = data["bad_status"] + data["bad_length"]
    bad_sample = data["bad_sample"]
    if not per_response:
        bad_responses, bad_sample = check_in_aggregate(data, expect, opts.connections)
    return WrkResult(
        requests=data["requests"],
        duration_s=duration_s,
        rps=data["requests"] / duration_s if duration_s else 0.0,
        socket_errors=socket_errors,
        bad_responses=bad_responses,
        bad_sample=bad_sample,
        p50_ms=data["p50_us"] / 1000,
        p99_ms=data["p99_us"] / 1000,
        p999_ms=data["p999_us"] / 1000,
        cpu_pct=100.0 * wrk_cpu_s / duration_s if duration_s else 0.0,
    )


def check_in_aggregate(data: dict[str, Any], expect: Expect, connections: int) -> tuple[int, str]:
    """Check large responses from wrk's totals, for runs without a per-response check.

    Status: wrk counts non-2xx/3xx responses itself. Size: every complete response carries at
    least the expected body, so the bytes read must be at least requests x body length, and at
    most that plus head/chunk framing and the responses still in flight when wrk stopped.
    A wrong Content-Length or a truncated body also breaks wrk's parser (read errors).
    """
    requests: int = data["requests"]
    status_errors: int = data["status_errors"]
    if status_errors:
        return status_errors, f"{status_errors} non-2xx/3xx responses"
    low = requests * expect.length
    high = (requests + connections) * (expect.length + AGGREGATE_SLACK_BYTES)
    if requests and not low <= data["bytes"] <= high:
        per = data["bytes"] / requests
        return requests, f"{per:,.0f} bytes read per response, body is {expect.length:,}"
    return 0, ""


@dataclass
class RunResult:
    """One server x scenario x round."""

    server: str
    scenario: str
    round: int
    ok: bool
    error: str | None = None
    rps: float = 0.0
    requests: int = 0
    p50_ms: float = 0.0
    p99_ms: float = 0.0
    p999_ms: float = 0.0
    errors: int = 0
    socket_errors: int = 0
    bad_responses: int = 0
    bad_sample: str = ""
    rss_mib: float = 0.0
    cpu_ms_per_req: float = 0.0
    threads: int = 0
    processes: int = 0
    #: CPU used by wrk during the run, % of one core: near 100 means the client is the limit.
    wrk_cpu_pct: float = 0.0
    #: CPU used on the server's core by processes other than the server, % of the window.
    noise_pct: float = 0.0
    extra: dict[str, float] = field(default_factory=dict)


class HelperClients:
    """idle_clients.py in a subprocess pinned to the client core."""

    def __init__(self, mode: str, port: int, count: int, opts: Options, log_path: Path) -> None:
        pin = ["taskset", "-c", opts.client_cpu] if opts.client_cpu is not None else []
        cmd = [*pin, sys.executable, str(IDLE_CLIENTS_PY), mode, "--port", str(port)]
        cmd += ["--count", str(count), "--connect-phase", str(opts.connect_phase_s)]
        cmd += ["--max-seconds", str(opts.connect_phase_s + 4 * opts.duration + 60)]
        self.log_path = log_path
        with log_path.open("wb") as log_file:
            self.proc = subprocess.Popen(
                cmd,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=log_file,
                text=True,
                start_new_session=True,
            )

    def read_report(self, tag: str) -> dict[str, float]:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith(tag + " "):
                data: dict[str, float] = json.loads(line.removeprefix(tag + " "))
                return data
        try:
            lines = self.log_path.read_text(errors="replace").strip().splitlines()
        except OSError:
            lines = []
        raise ServerFailed(
            f"client helper ended without {tag} (rc {self.proc.wait()}): {' | '.join(lines[-4:])}"
        )

    def finish(self) -> dict[str, float]:
        assert self.proc.stdin is not None
        with contextlib.suppress(OSError):
            self.proc.stdin.write("\n")
            self.proc.stdin.close()
        try:
            return self.read_report("DONE")
        finally:
            self.kill()

    def kill(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()


def run_case(
    server: Server, scenario: Scenario, expect: Expect, round_no: int, opts: Options
) -> RunResult:
    port = free_port()
    with tempfile.TemporaryDirectory(prefix=f"bench-{server.name}-") as tmp:
        workdir = Path(tmp)
        defaults = opts.defaults or scenario.defaults
        ctx = LaunchContext(scenario, port, opts.threads, defaults, workdir, sys.executable)
        running = RunningServer(server.command(ctx), workdir / "server.log", opts.server_cpu)
        try:
            wait_ready(running, port, scenario, expect)
            if opts.warmup > 0:
                run_wrk(port, scenario, expect, opts.warmup, opts)
                drain(running, port, scenario, expect)
            wait_for_quiet(opts)
            if scenario.kind == "wrk":
                result = measure_wrk(running, port, scenario, expect, opts, server, round_no)
            else:
                result = measure_with_helpers(
                    running, port, scenario, expect, opts, server, round_no
                )
            if running.proc.poll() is not None:
                result.ok = False
                result.error = f"died during the run: {running.log_tail()}"
            return result
        except (ServerFailed, subprocess.TimeoutExpired) as exc:
            return RunResult(server.name, scenario.name, round_no, ok=False, error=str(exc))
        finally:
            running.stop()


def measure_wrk(
    running: RunningServer,
    port: int,
    scenario: Scenario,
    expect: Expect,
    opts: Options,
    server: Server,
    round_no: int,
) -> RunResult:
    before = sample_tree(running.pid)
    core_before, wall_before = core_busy_ticks(opts.server_cpu), time.monotonic()
    wrk = run_wrk(port, scenario, expect, opts.duration, opts)
    core_after, wall_after = core_busy_ticks(opts.server_cpu), time.monotonic()
    after = sample_tree(running.pid)
    result = result_from(server, scenario, round_no, wrk, before, after)
    if core_before is not None and core_after is not None:
        foreign = (core_after - core_before) - (after.cpu_ticks - before.cpu_ticks)
        window = (wall_after - wall_before) * CLOCK_TICKS_PER_S
        result.noise_pct = max(0.0, 100.0 * foreign / window) if window > 0 else 0.0
    return result


def wait_for_quiet(opts: Options) -> float:
    """Wait (at most ``opts.quiet_wait_s``) until both pinned cores are nearly idle.

    Other processes on the machine (a test suite, a build) distort the numbers; waiting for
    them to pause is cheaper than rerunning. Returns the seconds waited.
    """
    cores = [cpu for cpu in (opts.server_cpu, opts.client_cpu) if cpu is not None]
    if opts.quiet_wait_s <= 0 or not cores:
        return 0.0
    started = time.monotonic()
    while True:
        before = [core_busy_ticks(cpu) for cpu in cores]
        time.sleep(QUIET_PROBE_S)
        after = [core_busy_ticks(cpu) for cpu in cores]
        busy = [
            100.0 * (a - b) / (QUIET_PROBE_S * CLOCK_TICKS_PER_S)
            for a, b in zip(after, before, strict=True)
            if a is not None and b is not None
        ]
        waited = time.monotonic() - started
        if not busy or max(busy) <= QUIET_BUSY_PCT or waited >= opts.quiet_wait_s:
            if waited > 1.0:
                log(f"  waited {waited:.0f} s for the cores to be quiet (busy {max(busy):.0f}%)")
            return waited


def result_from(
    server: Server,
    scenario: Scenario,
    round_no: int,
    wrk: WrkResult,
    before: TreeSample,
    after: TreeSample,
) -> RunResult:
    cpu_ms = (after.cpu_ticks - before.cpu_ticks) * 1000 / CLOCK_TICKS_PER_S
    return RunResult(
        server=server.name,
        scenario=scenario.name,
        round=round_no,
        ok=True,
        rps=wrk.rps,
        requests=wrk.requests,
        p50_ms=wrk.p50_ms,
        p99_ms=wrk.p99_ms,
        p999_ms=wrk.p999_ms,
        errors=wrk.errors,
        socket_errors=wrk.socket_errors,
        bad_responses=wrk.bad_responses,
        bad_sample=wrk.bad_sample,
        rss_mib=after.rss_kib / KiB,
        cpu_ms_per_req=cpu_ms / wrk.requests if wrk.requests else 0.0,
        threads=after.threads,
        processes=len(after.pids),
        wrk_cpu_pct=wrk.cpu_pct,
    )


def measure_with_helpers(
    running: RunningServer,
    port: int,
    scenario: Scenario,
    expect: Expect,
    opts: Options,
    server: Server,
    round_no: int,
) -> RunResult:
    """idle/slowloris: hello req/s without, then with, the helper's connections open."""
    baseline = measure_wrk(running, port, scenario, expect, opts, server, round_no)
    idle = scenario.kind == "idle"
    count = opts.idle_connections if idle else opts.slowloris_clients
    quiet = sample_tree(running.pid)
    helpers = HelperClients(
        "idle" if idle else "slowloris", port, count, opts, running.log_path.parent / "clients.log"
    )
    try:
        ready = helpers.read_report("READY")
        time.sleep(1.0)
        loaded = sample_tree(running.pid)
        before = sample_tree(running.pid)
        wrk = run_wrk(port, scenario, expect, opts.duration, opts)
        after = sample_tree(running.pid)
        done = helpers.finish()
    finally:
        helpers.kill()
    result = result_from(server, scenario, round_no, wrk, before, after)
    result.errors += baseline.errors
    result.socket_errors += baseline.socket_errors
    result.bad_responses += baseline.bad_responses
    result.noise_pct = baseline.noise_pct
    held = ready["open_now"]
    extra = {
        "rps_without": baseline.rps,
        "rps_with": wrk.rps,
        "with_over_without": wrk.rps / baseline.rps if baseline.rps else 0.0,
        "threads_without": float(quiet.threads),
        "threads_with": float(loaded.threads),
        "rss_mib_without": quiet.rss_kib / KiB,
        "rss_mib_with": loaded.rss_kib / KiB,
        "connected": ready["connected"],
        "held_at_start": held,
        "held_at_end": done["open_now"],
        "closed_by_server": done["closed_by_server"],
        "failed": done["failed"],
        "connect_phase_s": ready["elapsed_s"],
    }
    if idle:
        delta = loaded.rss_kib - quiet.rss_kib
        # Per connection only when enough are held for the delta to mean something.
        extra["rss_kib_per_conn"] = delta / held if held >= IDLE_MIN_HELD else -1.0
    else:
        extra["reconnects"] = done["reconnects"]
    result.extra = extra
    return result
