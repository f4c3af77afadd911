#!/usr/bin/env python3
"""Benchmark asyncwsgi against other WSGI servers, and nginx as the physical-limit reference.

    python benchmarks/bench_server.py                 # every scenario, every server, 3 rounds
    python benchmarks/bench_server.py --quick         # CI smoke run, well under a minute
    python benchmarks/bench_server.py --scenarios hello,file --servers asyncwsgi,waitress

The script creates ``benchmarks/.venv`` on first use, installs the servers it needs there
(asyncwsgi itself as an editable install of this repository) and re-runs itself inside it.
Each server runs as one process tree pinned to one core, wrk is pinned to another, and every
response is checked by ``wrk/check.lua``. See ``benchmarks/README.md`` for what is measured and
how to read it.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import fcntl
import http.client
import importlib
import json
import os
import platform
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Literal

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
VENV_DIR = BENCH_DIR / ".venv"
RESULTS_DIR = BENCH_DIR / "results"
CHECK_LUA = BENCH_DIR / "wrk" / "check.lua"
LAUNCH_PY = BENCH_DIR / "launch.py"
IDLE_CLIENTS_PY = BENCH_DIR / "idle_clients.py"
IN_VENV_MARK = "ASYNCWSGI_BENCH_IN_VENV"

KiB = 1024
MiB = 1024 * KiB
CLOCK_TICKS_PER_S = os.sysconf("SC_CLK_TCK")
PAGE_KIB = os.sysconf("SC_PAGE_SIZE") // KiB

READY_TIMEOUT_S = 15.0
DRAIN_TIMEOUT_S = 10.0
START_FAILED = "start failed:"
IDLE_MIN_HELD = 100
QUIET_PROBE_S = 0.5
QUIET_BUSY_PCT = 10.0
STOP_TIMEOUT_S = 5.0
WRK_TIMEOUT = "5s"
TUNED_BACKLOG = 2048
TUNED_KEEP_ALIVE_S = 60
TUNED_CONNECTION_LIMIT = 12_000
SLEEP_APP_S = 0.05
#: Bodies up to this size are checked one by one in wrk's response(); larger ones in aggregate
#: (wrk 4.1 grows its body buffer 1 KiB at a time, which would make wrk the bottleneck).
PER_RESPONSE_CHECK_MAX_BYTES = 16 * KiB
#: Allowance per response for the head and chunked framing in the aggregate size check.
AGGREGATE_SLACK_BYTES = 4 * KiB

# --------------------------------------------------------------------------------------------
# Scenarios
# --------------------------------------------------------------------------------------------

ScenarioKind = Literal["wrk", "idle", "slowloris"]


@dataclass(frozen=True)
class Scenario:
    """One workload: which app, how wrk drives it, and what it shows."""

    name: str
    app: str
    description: str
    kind: ScenarioKind = "wrk"
    close: bool = False
    post_bytes: int | None = None


SCENARIOS: dict[str, Scenario] = {
    s.name: s
    for s in (
        Scenario("hello", "hello", "13-byte body on keep-alive connections: per-request overhead"),
        Scenario(
            "hello-close",
            "hello",
            "13-byte body with `Connection: close`: one TCP connection per request",
            close=True,
        ),
        Scenario("body64k", "body64k", "one 64 KiB chunk with Content-Length"),
        Scenario("body1m", "body1m", "one 1 MiB chunk with Content-Length"),
        Scenario("stream", "stream", "generator of 64 x 16 KiB chunks, no Content-Length"),
        Scenario("file", "file", "10 MiB file through wsgi.file_wrapper (sendfile if supported)"),
        Scenario("echo", "echo", "1 MiB POST body read from wsgi.input", post_bytes=MiB),
        Scenario("sleep", "sleep", "app blocks 50 ms: bounded by the thread pool"),
        Scenario("flask", "flask", "a Flask view returning a small JSON"),
        Scenario("django", "django", "a minimal Django view (HttpResponse)"),
        Scenario(
            "idle",
            "hello",
            "10,000 idle keep-alive connections: memory per connection, hello req/s beside them",
            kind="idle",
        ),
        Scenario(
            "slowloris",
            "hello",
            "1,000 clients sending their request head at 1 byte/s: hello req/s beside them",
            kind="slowloris",
        ),
    )
}

QUICK_SCENARIOS = ("hello", "stream", "file")
QUICK_SERVERS = ("asyncwsgi", "waitress", "gunicorn-gthread")

# --------------------------------------------------------------------------------------------
# Servers
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LaunchContext:
    """What a server command line is built from."""

    scenario: Scenario
    port: int
    threads: int
    defaults: bool
    workdir: Path
    python: str


@dataclass(frozen=True)
class Server:
    """A server under test: how to install it, start it, and which scenarios it can serve."""

    name: str
    description: str
    requirements: tuple[str, ...]
    dists: tuple[str, ...]
    command: Callable[[LaunchContext], list[str]]
    scenarios: frozenset[str] | None = None
    reference: bool = False
    #: The HTTP side runs in native code (granian: Rust), not in Python.
    native: bool = False
    #: Shown as the floor, not a target (wsgiref: HTTP/1.0, a thread per connection).
    floor: bool = False
    default_threads: int | None = None

    def supports(self, scenario: str) -> bool:
        return self.scenarios is None or scenario in self.scenarios


def app_spec(ctx: LaunchContext) -> str:
    return f"apps:{ctx.scenario.app}"


def cmd_asyncwsgi(ctx: LaunchContext) -> list[str]:
    cmd = [ctx.python, "-m", "asyncwsgi", "serve", app_spec(ctx)]
    cmd += ["--host", "127.0.0.1", "--port", str(ctx.port), "--no-access-log"]
    cmd += ["--app-dir", str(BENCH_DIR)]
    if not ctx.defaults:
        cmd += ["--threads", str(ctx.threads), "--backlog", str(TUNED_BACKLOG)]
        cmd += ["--timeout-keep-alive", str(TUNED_KEEP_ALIVE_S)]
    return cmd


def cmd_gunicorn_gthread(ctx: LaunchContext) -> list[str]:
    cmd = [ctx.python, "-m", "gunicorn", "-k", "gthread", "-w", "1"]
    cmd += ["-b", f"127.0.0.1:{ctx.port}", "--chdir", str(BENCH_DIR)]
    if not ctx.defaults:
        cmd += ["--threads", str(ctx.threads), "--backlog", str(TUNED_BACKLOG)]
        cmd += ["--keep-alive", str(TUNED_KEEP_ALIVE_S)]
        cmd += ["--worker-connections", str(TUNED_CONNECTION_LIMIT)]
    return [*cmd, app_spec(ctx)]


def cmd_gunicorn_sync(ctx: LaunchContext) -> list[str]:
    cmd = [ctx.python, "-m", "gunicorn", "-w", "1"]
    cmd += ["-b", f"127.0.0.1:{ctx.port}", "--chdir", str(BENCH_DIR)]
    if not ctx.defaults:
        cmd += ["--backlog", str(TUNED_BACKLOG)]
    return [*cmd, app_spec(ctx)]


def cmd_waitress(ctx: LaunchContext) -> list[str]:
    cmd = [ctx.python, "-m", "waitress", f"--listen=127.0.0.1:{ctx.port}"]
    if not ctx.defaults:
        # waitress defaults to select(), which cannot watch fds above 1024: poll() is needed
        # past its default connection limit of 100.
        cmd += [f"--threads={ctx.threads}", f"--backlog={TUNED_BACKLOG}"]
        cmd += [f"--connection-limit={TUNED_CONNECTION_LIMIT}", "--asyncore-use-poll"]
    return [*cmd, app_spec(ctx)]


def cmd_launcher(name: str) -> Callable[[LaunchContext], list[str]]:
    def build(ctx: LaunchContext) -> list[str]:
        cmd = [ctx.python, str(LAUNCH_PY), name, app_spec(ctx), "--port", str(ctx.port)]
        cmd += ["--threads", str(ctx.threads)]
        return [*cmd, "--defaults"] if ctx.defaults else cmd

    return build


def cmd_uvicorn(ctx: LaunchContext) -> list[str]:
    if ctx.defaults:
        cmd = [ctx.python, "-m", "uvicorn", app_spec(ctx), "--interface", "wsgi"]
        return [*cmd, "--host", "127.0.0.1", "--port", str(ctx.port), "--no-access-log"]
    return cmd_launcher("uvicorn")(ctx)


def cmd_granian(ctx: LaunchContext) -> list[str]:
    cmd = [ctx.python, "-m", "granian", "--interface", "wsgi", "--workers", "1"]
    cmd += ["--host", "127.0.0.1", "--port", str(ctx.port), "--log-level", "warning"]
    cmd += ["--no-access-log"]
    if not ctx.defaults:
        cmd += ["--blocking-threads", str(ctx.threads), "--backlog", str(TUNED_BACKLOG)]
        # granian stops accepting past --backpressure connections (default backlog/workers).
        cmd += ["--backpressure", str(TUNED_CONNECTION_LIMIT)]
    return [*cmd, app_spec(ctx)]


NGINX_SCENARIOS = frozenset(
    {"hello", "hello-close", "body64k", "body1m", "file", "idle", "slowloris"}
)
NGINX_FILES = {"body64k": 64 * KiB, "body1m": MiB}


def cmd_nginx(ctx: LaunchContext) -> list[str]:
    name = ctx.scenario.name
    if name == "file" or name in NGINX_FILES:
        path = Path(bench_file_path() if name == "file" else static_file(NGINX_FILES[name]))
        location = f"root {path.parent}; try_files /{path.name} =404;"
    else:
        location = 'default_type text/plain; return 200 "Hello, world!";'
    temp = ctx.workdir
    conf = f"""
worker_processes 1;
worker_rlimit_nofile {TUNED_CONNECTION_LIMIT + 4096};
daemon off;
pid {temp}/nginx.pid;
error_log stderr warn;
events {{ worker_connections {TUNED_CONNECTION_LIMIT + 2048}; }}
http {{
    access_log off;
    sendfile on;
    tcp_nopush on;
    keepalive_timeout {TUNED_KEEP_ALIVE_S};
    keepalive_requests 10000000;
    default_type application/octet-stream;
    client_body_temp_path {temp}/body;
    proxy_temp_path {temp}/proxy;
    fastcgi_temp_path {temp}/fastcgi;
    uwsgi_temp_path {temp}/uwsgi;
    scgi_temp_path {temp}/scgi;
    server {{
        listen 127.0.0.1:{ctx.port} backlog={TUNED_BACKLOG};
        location / {{ {location} }}
    }}
}}
"""
    conf_path = temp / "nginx.conf"
    conf_path.write_text(conf)
    return [nginx_binary(), "-p", str(temp), "-c", str(conf_path), "-e", "stderr"]


SERVERS: dict[str, Server] = {
    s.name: s
    for s in (
        Server(
            "asyncwsgi",
            "asyncio event loop + worker thread pool",
            (),
            ("asyncwsgi",),
            cmd_asyncwsgi,
            default_threads=32,
        ),
        Server(
            "gunicorn-gthread",
            "gunicorn -k gthread -w 1",
            ("gunicorn",),
            ("gunicorn",),
            cmd_gunicorn_gthread,
            default_threads=1,
        ),
        Server(
            "gunicorn-sync",
            "gunicorn -w 1 (sync worker, one request at a time)",
            ("gunicorn",),
            ("gunicorn",),
            cmd_gunicorn_sync,
            default_threads=1,
        ),
        Server(
            "waitress",
            "waitress-serve",
            ("waitress",),
            ("waitress",),
            cmd_waitress,
            default_threads=4,
        ),
        Server(
            "cheroot",
            "cheroot.wsgi.Server",
            ("cheroot",),
            ("cheroot",),
            cmd_launcher("cheroot"),
            default_threads=10,
        ),
        Server(
            "uvicorn",
            "uvicorn + its WSGIMiddleware (a2wsgi)",
            ("uvicorn[standard]", "a2wsgi"),
            ("uvicorn", "a2wsgi", "uvloop", "httptools"),
            cmd_uvicorn,
            default_threads=10,
        ),
        Server(
            "granian",
            "granian --interface wsgi --workers 1",
            ("granian",),
            ("granian",),
            cmd_granian,
            native=True,
        ),
        Server(
            "wsgiref",
            "wsgiref ThreadingWSGIServer (Django runserver), thread per connection",
            (),
            (),
            cmd_launcher("wsgiref"),
            floor=True,
        ),
        Server(
            "nginx",
            "nginx static/return (reference, not WSGI)",
            (),
            (),
            cmd_nginx,
            scenarios=NGINX_SCENARIOS,
            reference=True,
        ),
    )
}

BASE_REQUIREMENTS = ("h11",)
SCENARIO_REQUIREMENTS = {"flask": ("flask",), "django": ("django",)}
CHART_REQUIREMENTS = ("matplotlib",)


def requirement_dist(requirement: str) -> str:
    return requirement.split("[", 1)[0].split("=", 1)[0].split(">", 1)[0].strip()


# --------------------------------------------------------------------------------------------
# Environment: virtualenv, system tools, files
# --------------------------------------------------------------------------------------------


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def venv_python() -> Path:
    return VENV_DIR / "bin" / "python"


def installed_dists(python: Path | str, names: Sequence[str]) -> dict[str, str | None]:
    """Return ``{dist: version or None}`` as seen by interpreter ``python``."""
    code = (
        "import importlib.metadata as m, json, sys\n"
        "out = {}\n"
        "for n in sys.argv[1:]:\n"
        "    try: out[n] = m.version(n)\n"
        "    except m.PackageNotFoundError: out[n] = None\n"
        "print(json.dumps(out))\n"
    )
    proc = subprocess.run(
        [str(python), "-c", code, *names], capture_output=True, text=True, check=False
    )
    if proc.returncode != 0:
        return dict.fromkeys(names)
    result: dict[str, str | None] = json.loads(proc.stdout)
    return result


def ensure_venv(requirements: Sequence[str], reinstall: bool) -> bool:
    """Create ``benchmarks/.venv`` if needed and install what is missing; False on failure."""
    python = venv_python()
    if not python.exists():
        log(f"creating virtualenv {VENV_DIR}")
        try:
            subprocess.run([sys.executable, "-m", "venv", str(VENV_DIR)], check=True)
        except (OSError, subprocess.CalledProcessError) as exc:
            log(f"cannot create the virtualenv ({exc}); using {sys.executable}")
            return False
    pip = [str(python), "-m", "pip", "install", "--disable-pip-version-check", "-q"]
    dists = sorted({requirement_dist(r) for r in requirements})
    present = installed_dists(python, dists)
    missing = [r for r in requirements if reinstall or present.get(requirement_dist(r)) is None]
    if "uvicorn[standard]" in requirements and None in (
        installed_dists(python, ["uvloop", "httptools"]).values()
    ):
        missing.append("uvicorn[standard]")
    if missing:
        log(f"installing into {VENV_DIR}: {' '.join(sorted(set(missing)))}")
        proc = subprocess.run([*pip, *sorted(set(missing))], check=False)
        if proc.returncode != 0:
            log("pip install failed; servers that need the missing packages will fail")
    if reinstall or installed_dists(python, ["asyncwsgi"])["asyncwsgi"] is None:
        if (REPO_ROOT / "pyproject.toml").exists():
            log("installing asyncwsgi (editable) from the repository")
            proc = subprocess.run([*pip, "-e", str(REPO_ROOT)], check=False)
            if proc.returncode != 0:
                log("pip install -e of asyncwsgi failed; continuing without it")
        else:
            log("no pyproject.toml at the repository root yet; asyncwsgi is not installed")
    return True


def ensure_system_tools(need_nginx: bool) -> None:
    """Install wrk (and nginx) from Debian packages when they are missing and we are root."""
    wanted = ["wrk"] + (["nginx"] if need_nginx else [])
    missing = [tool for tool in wanted if shutil.which(tool) is None and not nginx_installed(tool)]
    if not missing or os.geteuid() != 0 or shutil.which("apt-get") is None:
        return
    log(f"installing Debian packages: {' '.join(missing)}")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-q", *missing]
    if subprocess.run(install, env=env, check=False, capture_output=True).returncode != 0:
        subprocess.run(["apt-get", "update", "-q"], env=env, check=False, capture_output=True)
        subprocess.run(install, env=env, check=False, capture_output=True)


def nginx_installed(tool: str) -> bool:
    return tool == "nginx" and Path("/usr/sbin/nginx").exists()


def nginx_binary() -> str:
    return shutil.which("nginx") or "/usr/sbin/nginx"


def raise_nofile_limit() -> int:
    """Raise our soft RLIMIT_NOFILE to the hard limit; servers and clients inherit it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if target > soft:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
    return soft


def bench_file_path() -> str:
    sys.path.insert(0, str(BENCH_DIR))
    try:
        import apps
    finally:
        sys.path.remove(str(BENCH_DIR))
    return apps.bench_file_path()


def static_file(size: int) -> str:
    """A file of ``size`` bytes next to the 10 MiB one, for nginx's body64k/body1m rows."""
    path = Path(bench_file_path()).parent / f"static-{size}.bin"
    if not path.exists() or path.stat().st_size != size:
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(b"x" * size)
        tmp.chmod(0o644)
        tmp.replace(path)
    return str(path)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def server_env() -> dict[str, str]:
    paths = [str(BENCH_DIR), str(REPO_ROOT)]
    if os.environ.get("PYTHONPATH"):
        paths.append(os.environ["PYTHONPATH"])
    return {**os.environ, "PYTHONPATH": os.pathsep.join(paths), "PYTHONUNBUFFERED": "1"}


# --------------------------------------------------------------------------------------------
# /proc sampling
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TreeSample:
    """Resource use of a process and all its descendants at one instant."""

    pids: tuple[int, ...]
    rss_kib: int
    threads: int
    cpu_ticks: int


def process_tree(root: int) -> list[int]:
    """``root`` and all its descendants, from the parent links in /proc/*/stat."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry.name}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2 :].split()
        children.setdefault(int(fields[1]), []).append(int(entry.name))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(children.get(pid, []))
    return tree


def sample_tree(root: int) -> TreeSample:
    pids = process_tree(root)
    rss = threads = ticks = 0
    for pid in pids:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2 :].split()
        ticks += int(fields[11]) + int(fields[12])  # utime + stime
        for line in status.splitlines():
            if line.startswith("VmRSS:"):
                rss += int(line.split()[1])
            elif line.startswith("Threads:"):
                threads += int(line.split()[1])
    return TreeSample(tuple(pids), rss, threads, ticks)


# --------------------------------------------------------------------------------------------
# Running one server
# --------------------------------------------------------------------------------------------


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


def process_state(pid: int) -> str:
    """The kernel's view of a stuck process, for failure reports."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
        wchan = Path(f"/proc/{pid}/wchan").read_text().strip()
    except OSError:
        return "process gone"
    state = next((line for line in status.splitlines() if line.startswith("State:")), "")
    return f"{state.strip()} wchan={wchan or '-'}"


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
        ctx = LaunchContext(scenario, port, opts.threads, opts.defaults, workdir, sys.executable)
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


def core_busy_ticks(cpu: str | None) -> int | None:
    """Clock ticks one core spent running processes (user + nice + system), from /proc/stat.

    Interrupt and softirq time is left out: at high request rates much of it is the loopback
    network work of the benchmark itself, not noise. None when not pinned to a single core.
    """
    if cpu is None or not cpu.isdigit():
        return None
    prefix = f"cpu{cpu} "
    with contextlib.suppress(OSError):
        for line in Path("/proc/stat").read_text().splitlines():
            if line.startswith(prefix):
                user, nice, system = (int(v) for v in line.split()[1:4])
                return user + nice + system
    return None


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


# --------------------------------------------------------------------------------------------
# The whole benchmark
# --------------------------------------------------------------------------------------------


@dataclass
class Options:
    """Parsed command line."""

    scenarios: list[str]
    servers: list[str]
    threads: int
    defaults: bool
    duration: int
    warmup: int
    rounds: int
    connections: int
    idle_connections: int
    slowloris_clients: int
    connect_phase_s: float
    quiet_wait_s: float
    server_cpu: str | None
    client_cpu: str | None
    output: str
    charts: bool
    quick: bool
    install: bool
    reinstall: bool
    render: str | None = None
    render_output: str | None = None


def parse_args(argv: Sequence[str]) -> Options:
    parser = argparse.ArgumentParser(
        description="Benchmark asyncwsgi against other WSGI servers (see benchmarks/README.md).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--quick", action="store_true", help="short CI smoke run (< 60 s)")
    parser.add_argument("--scenarios", help=f"comma list of: {','.join(SCENARIOS)}")
    parser.add_argument("--servers", help=f"comma list of: {','.join(SERVERS)}")
    parser.add_argument("--threads", type=int, default=8, help="thread pool size for all")
    parser.add_argument(
        "--defaults", action="store_true", help="run each server with its own default settings"
    )
    parser.add_argument("--duration", type=int, default=10, help="measured seconds per run")
    parser.add_argument("--warmup", type=int, default=2, help="wrk warm-up seconds per run")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--connections", type=int, default=64, help="wrk connections")
    parser.add_argument("--idle-connections", type=int, default=10_000)
    parser.add_argument("--slowloris-clients", type=int, default=1_000)
    parser.add_argument(
        "--connect-phase", type=float, default=30.0, help="cap on opening idle connections, s"
    )
    parser.add_argument(
        "--quiet-wait",
        type=float,
        default=10.0,
        help="before each measurement, wait up to this many s for both cores to be idle",
    )
    parser.add_argument("--server-cpu", default="0", help="core for servers ('' = no pinning)")
    parser.add_argument("--client-cpu", default="1", help="core for wrk ('' = no pinning)")
    parser.add_argument(
        "--output", help="results/NAME.{md,json}; default latest, or quick with --quick"
    )
    parser.add_argument("--no-charts", action="store_true", help="skip the PNG charts")
    parser.add_argument(
        "--render",
        metavar="NAME[,NAME...]",
        help="measure nothing: render results/NAME.json again (into --output, default the first "
        "NAME); with several names, each later file's scenarios replace the earlier ones'",
    )
    parser.add_argument("--no-install", action="store_true", help="use the venv as it is")
    parser.add_argument("--reinstall", action="store_true", help="pip install everything again")
    args = parser.parse_args(argv)

    if args.quick:
        scenarios = list(QUICK_SCENARIOS)
        servers = list(QUICK_SERVERS)
        rounds, duration, warmup = 1, 2, 1
    else:
        scenarios, servers = list(SCENARIOS), list(SERVERS)
        rounds, duration, warmup = args.rounds, args.duration, args.warmup
    if args.scenarios:
        scenarios = split_names(args.scenarios, SCENARIOS, parser)
    if args.servers:
        servers = split_names(args.servers, SERVERS, parser)
    pinning = (os.cpu_count() or 1) >= 2 and shutil.which("taskset") is not None
    return Options(
        scenarios=scenarios,
        servers=servers,
        threads=args.threads,
        defaults=args.defaults,
        duration=duration,
        warmup=warmup,
        rounds=rounds,
        connections=args.connections,
        idle_connections=args.idle_connections,
        slowloris_clients=args.slowloris_clients,
        connect_phase_s=args.connect_phase,
        quiet_wait_s=0.0 if args.quick else args.quiet_wait,
        server_cpu=args.server_cpu if pinning and args.server_cpu else None,
        client_cpu=args.client_cpu if pinning and args.client_cpu else None,
        output=args.output or ("quick" if args.quick else "latest"),
        charts=not args.no_charts,
        quick=args.quick,
        install=not args.no_install,
        reinstall=args.reinstall,
        render=args.render,
        render_output=args.output,
    )


def split_names(text: str, known: dict[str, Any], parser: argparse.ArgumentParser) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in known]
    if unknown:
        parser.error(f"unknown: {', '.join(unknown)} (known: {', '.join(known)})")
    return names


def requirements_for(opts: Options) -> list[str]:
    reqs: list[str] = list(BASE_REQUIREMENTS)
    for name in opts.servers:
        reqs += SERVERS[name].requirements
    for name in opts.scenarios:
        reqs += SCENARIO_REQUIREMENTS.get(SCENARIOS[name].app, ())
    if opts.charts and not opts.quick:
        reqs += CHART_REQUIREMENTS
    return list(dict.fromkeys(reqs))


def reference_expectations(scenarios: Sequence[str]) -> dict[str, Expect | str]:
    """Ask apps.reference_response (in the venv) what each scenario's answer must be."""
    apps_needed = sorted({SCENARIOS[name].app for name in scenarios})
    out: dict[str, Expect | str] = {}
    for app in apps_needed:
        proc = subprocess.run(
            [sys.executable, str(BENCH_DIR / "apps.py"), app],
            capture_output=True,
            text=True,
            cwd=BENCH_DIR,
            env=server_env(),
            check=False,
        )
        if proc.returncode != 0:
            out[app] = f"app {app} is broken: {proc.stderr.strip().splitlines()[-1:]}"
            continue
        status, length = json.loads(proc.stdout)[app]
        out[app] = Expect(status, length)
    return out


def iter_rotations(items: list[str], rounds: int) -> Iterator[tuple[int, list[str]]]:
    """Round r starts at item r, so that no server always runs first (or right after another)."""
    for r in range(rounds):
        shift = r % len(items) if items else 0
        yield r + 1, items[shift:] + items[:shift]


def run_all(opts: Options, report: Report) -> None:
    expectations = reference_expectations(opts.scenarios)
    for scenario_name in opts.scenarios:
        scenario = SCENARIOS[scenario_name]
        expect = expectations[scenario.app]
        servers = [name for name in opts.servers if SERVERS[name].supports(scenario_name)]
        given_up: dict[str, str] = {}
        for round_no, order in iter_rotations(servers, opts.rounds):
            for name in order:
                if name in given_up:
                    continue
                if isinstance(expect, str):
                    result = RunResult(name, scenario_name, round_no, ok=False, error=expect)
                else:
                    result = run_case(SERVERS[name], scenario, expect, round_no, opts)
                    if not result.ok and result.error and result.error.startswith(START_FAILED):
                        log(describe(result, opts.rounds) + " (retrying once)")
                        result = run_case(SERVERS[name], scenario, expect, round_no, opts)
                report.add(result)
                log(describe(result, opts.rounds))
                if not result.ok and round_no == 1:
                    given_up[name] = result.error or "failed"
        report.write()


def describe(r: RunResult, rounds: int) -> str:
    head = f"[{r.scenario} {r.round}/{rounds}] {r.server:<17}"
    if not r.ok:
        return f"{head} FAILED: {(r.error or '')[:300]}"
    text = (
        f"{head} {r.rps:>9.0f} req/s  p50 {r.p50_ms:.2f} ms  p99 {r.p99_ms:.2f} ms  "
        f"errors {r.errors}  rss {r.rss_mib:.1f} MiB  cpu {r.cpu_ms_per_req:.3f} ms/req  "
        f"threads {r.threads}"
    )
    if r.extra:
        text += f"  without {r.extra['rps_without']:.0f} req/s  held {r.extra['held_at_start']:.0f}"
    if r.bad_sample:
        text += f"  (bad: {r.bad_sample})"
    return text


# --------------------------------------------------------------------------------------------
# Reporting
# --------------------------------------------------------------------------------------------


@dataclass
class Summary:
    """The rounds of one server x scenario, reduced to medians."""

    server: str
    ok_runs: int
    failed: str | None
    rps: float
    rps_min: float
    rps_max: float
    p50_ms: float
    p99_ms: float
    p999_ms: float
    errors: int
    socket_errors: int
    bad_responses: int
    rss_mib: float
    cpu_ms_per_req: float
    threads: float
    wrk_cpu_pct: float
    noise_pct: float
    extra: dict[str, float]

    def errors_text(self) -> str:
        """Total errors, split as ``socket/bad responses`` when there are any."""
        if not self.errors:
            return "0"
        return f"{self.errors} ({self.socket_errors}/{self.bad_responses})"


def summarise(server: str, runs: list[RunResult]) -> Summary:
    ok = [r for r in runs if r.ok]
    failures = [r.error or "failed" for r in runs if not r.ok]
    if not ok:
        return Summary(
            server=server,
            ok_runs=0,
            failed=failures[0] if failures else "not run",
            rps=0.0,
            rps_min=0.0,
            rps_max=0.0,
            p50_ms=0.0,
            p99_ms=0.0,
            p999_ms=0.0,
            errors=0,
            socket_errors=0,
            bad_responses=0,
            rss_mib=0.0,
            cpu_ms_per_req=0.0,
            threads=0.0,
            wrk_cpu_pct=0.0,
            noise_pct=0.0,
            extra={},
        )

    def med(values: list[float]) -> float:
        return float(statistics.median(values))

    extra_keys = sorted({key for r in ok for key in r.extra})
    rps = [r.rps for r in ok]
    return Summary(
        server=server,
        ok_runs=len(ok),
        failed=failures[0] if failures else None,
        rps=med(rps),
        rps_min=min(rps),
        rps_max=max(rps),
        p50_ms=med([r.p50_ms for r in ok]),
        p99_ms=med([r.p99_ms for r in ok]),
        p999_ms=med([r.p999_ms for r in ok]),
        errors=sum(r.errors for r in ok),
        socket_errors=sum(r.socket_errors for r in ok),
        bad_responses=sum(r.bad_responses for r in ok),
        rss_mib=med([r.rss_mib for r in ok]),
        cpu_ms_per_req=med([r.cpu_ms_per_req for r in ok]),
        threads=med([float(r.threads) for r in ok]),
        wrk_cpu_pct=med([r.wrk_cpu_pct for r in ok]),
        noise_pct=max(r.noise_pct for r in ok),
        extra={key: med([r.extra[key] for r in ok if key in r.extra]) for key in extra_keys},
    )


def read_cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def read_mem_total_gib() -> float:
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / MiB, 1)
    return 0.0


def tool_version(argv: list[str]) -> str:
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return "not found"
    text = (proc.stdout + proc.stderr).strip().splitlines()
    return text[0].strip() if text else "unknown"


def asyncwsgi_version() -> str | None:
    code = "import asyncwsgi; print(getattr(asyncwsgi, '__version__', 'unknown'))"
    proc = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env=server_env(),
        cwd=BENCH_DIR,
        check=False,
    )
    return proc.stdout.strip() if proc.returncode == 0 else None


def git_revision() -> str:
    proc = subprocess.run(
        ["git", "-C", str(REPO_ROOT), "rev-parse", "--short", "HEAD"],
        capture_output=True,
        text=True,
        check=False,
    )
    return proc.stdout.strip() if proc.returncode == 0 else "unknown"


def collect_versions(servers: Sequence[str]) -> dict[str, str]:
    dists = sorted({d for name in servers for d in SERVERS[name].dists} - {"asyncwsgi"})
    versions: dict[str, str] = {
        name: version or "not installed"
        for name, version in installed_dists(sys.executable, [*dists, "flask", "django"]).items()
    }
    if "asyncwsgi" in servers:
        versions["asyncwsgi"] = asyncwsgi_version() or "not importable"
    versions["python"] = platform.python_version()
    versions["wrk"] = tool_version(["wrk", "-v"]).split(" [", 1)[0].removeprefix("wrk ")
    if "nginx" in servers:
        versions["nginx"] = tool_version([nginx_binary(), "-v"]).rsplit("/", 1)[-1]
    return versions


def machine_info() -> dict[str, Any]:
    return {
        "cpu_model": read_cpu_model(),
        "cores": os.cpu_count(),
        "memory_gib": read_mem_total_gib(),
        "kernel": platform.release(),
        "os": platform.platform(),
        "python": platform.python_version(),
        "python_implementation": platform.python_implementation(),
    }


def fmt_num(value: float, digits: int = 0) -> str:
    return f"{value:,.{digits}f}"


def fmt_ms(value: float) -> str:
    return f"{value:.2f}" if value < 100 else f"{value:.0f}"


class Report:
    """Collects run results and writes latest.md, latest.json and the charts."""

    def __init__(self, opts: Options) -> None:
        self.opts = opts
        self.started = time.strftime("%Y-%m-%d %H:%M:%S %Z")
        self.revision = git_revision()
        self.notes: list[str] = []
        self.results: list[RunResult] = []
        self.machine = machine_info()
        self.versions = collect_versions(opts.servers)

    @classmethod
    def load(cls, path: Path) -> Report:
        """Rebuild a report from its JSON file, to render it again without re-measuring."""
        data = json.loads(path.read_text())
        report = cls.__new__(cls)
        report.opts = Options(**data["options"])
        report.started = data["started"]
        report.revision = data["revision"]
        report.results = [RunResult(**run) for run in data["runs"]]
        report.machine = data["machine"]
        report.versions = data["versions"]
        report.notes = data.get("notes", [])
        return report

    def add(self, result: RunResult) -> None:
        self.results.append(result)

    def merge(self, later: Report) -> None:
        """Take ``later``'s runs for the scenarios it measured, dropping ours for those."""
        replaced = set(later.opts.scenarios) & {r.scenario for r in later.results}
        self.results = [r for r in self.results if r.scenario not in replaced]
        self.results += later.results
        self.opts.scenarios += [s for s in later.opts.scenarios if s not in self.opts.scenarios]
        self.opts.servers += [s for s in later.opts.servers if s not in self.opts.servers]
        self.versions.update(later.versions)
        self.notes.append(
            f"Scenarios {', '.join(sorted(replaced))} were measured again on {later.started} "
            f"at revision `{later.revision}` and replace the first run's."
        )

    def summaries(self, scenario: str) -> list[Summary]:
        out = []
        for server in self.opts.servers:
            runs = [r for r in self.results if r.scenario == scenario and r.server == server]
            if runs:
                out.append(summarise(server, runs))
        return out

    def scenarios_done(self) -> list[str]:
        done = {r.scenario for r in self.results}
        return [name for name in self.opts.scenarios if name in done]

    # -- markdown ---------------------------------------------------------------------------

    def markdown(self) -> str:
        o = self.opts
        mode = "each server's own defaults" if o.defaults else f"{o.threads} threads for all"
        lines = [
            "# asyncwsgi server benchmarks",
            "",
            f"Run {self.started} at revision `{self.revision}`: {mode}; "
            f"{o.rounds} round(s) of {o.duration} s (after {o.warmup} s warm-up), "
            f"wrk -t1 -c{o.connections}; server on core {o.server_cpu}, "
            f"wrk on core {o.client_cpu}.",
            "",
            f"Machine: {self.machine['cpu_model']}, {self.machine['cores']} cores, "
            f"{self.machine['memory_gib']} GiB, Linux {self.machine['kernel']}, "
            f"Python {self.machine['python']}.",
            "",
            "Versions: " + ", ".join(f"{k} {v}" for k, v in sorted(self.versions.items())) + ".",
            "",
            "req/s is the median of the rounds (min-max beside it); latencies, RSS (summed over",
            "the server's process tree) and CPU ms per request are medians too; errors are summed",
            "over the rounds, shown as total (socket errors / wrong responses): socket errors",
            "are wrk's connect/read/write errors and timeouts, wrong responses a bad status or",
            "body length. wrk CPU % is wrk's CPU use on its core (near 100: the client is the",
            "limit, as for nginx); noise % is the highest share of the server's core used by",
            "other processes during a measurement (more than a few %: rerun on a quiet machine).",
            "",
        ]
        lines += [*self.notes, ""] if self.notes else []
        lines += self.markdown_overview()
        for scenario in self.scenarios_done():
            lines += self.markdown_scenario(scenario)
        return "\n".join(lines) + "\n"

    def best_peer(self, rows: list[Summary], python_only: bool = False) -> Summary | None:
        """The fastest WSGI peer; with ``python_only``, leave out servers with a native core."""
        peers = [
            s
            for s in rows
            if s.ok_runs
            and s.server != "asyncwsgi"
            and not SERVERS[s.server].reference
            and not (python_only and (SERVERS[s.server].native or SERVERS[s.server].floor))
        ]
        return max(peers, key=lambda s: s.rps) if peers else None

    def markdown_overview(self) -> list[str]:
        lines = [
            "## Where we stand",
            "",
            "Medians of req/s (for idle and slowloris: hello req/s with the extra connections",
            "open). Python peers are gunicorn, waitress, cheroot and uvicorn: their HTTP handling",
            "runs in Python. granian's runs in Rust; wsgiref (HTTP/1.0, a thread per connection)",
            "is the floor; nginx is the static-file / fixed-response reference.",
            "",
            "| scenario | asyncwsgi | best Python peer | asyncwsgi / it | best peer (any) "
            "| asyncwsgi / it | nginx |",
            "|---|---:|---|---:|---|---:|---:|",
        ]
        for scenario in self.scenarios_done():
            rows = {s.server: s for s in self.summaries(scenario)}
            ours = rows.get("asyncwsgi")
            ours_rps = ours.rps if ours and ours.ok_runs else None
            nginx = rows.get("nginx")
            cells = [scenario, fmt_num(ours_rps) if ours_rps is not None else "failed / not run"]
            for python_only in (True, False):
                best = self.best_peer(list(rows.values()), python_only)
                cells.append(f"{best.server} {fmt_num(best.rps)}" if best else "-")
                ratio = ours_rps / best.rps if best and best.rps and ours_rps is not None else None
                cells.append(f"{ratio:.2f}x" if ratio is not None else "-")
            cells.append(fmt_num(nginx.rps) if nginx and nginx.ok_runs else "-")
            lines.append("| " + " | ".join(cells) + " |")
        return [*lines, "", *self.markdown_targets()]

    def markdown_targets(self) -> list[str]:
        """The goals of the benchmark issue, each with what this run measured against it."""
        rows = []
        for scenario in self.scenarios_done():
            target = self.target(scenario, self.summaries(scenario))
            if target is not None:
                goal, measured, met = target
                rows.append(f"| {scenario} | {goal} | {measured} | {'met' if met else 'missed'} |")
        if not rows:
            return []
        return [
            "### Targets",
            "",
            "| scenario | target | this run | |",
            "|---|---|---|---|",
            *rows,
            "",
        ]

    def target(self, scenario: str, rows: list[Summary]) -> tuple[str, str, bool] | None:
        """(goal, measured, met) for ``scenario``, or None where it has no goal in this mode."""
        ok = {s.server: s for s in rows if s.ok_runs}
        ours = ok.get("asyncwsgi")
        if ours is None:
            return None
        if scenario == "sleep":
            if self.opts.defaults:
                best = self.best_peer(rows)
                if best is None:
                    return None
                ratio = ours.rps / best.rps
                return (
                    "ahead of every peer, each with its own defaults",
                    f"{ratio:.2f}x {best.server}",
                    ratio > 1.0,
                )
            bound = self.opts.threads / SLEEP_APP_S
            share = ours.rps / bound
            return ("within 3 % of threads / 0.05 s", f"{share:.1%} of {bound:.0f}", share >= 0.97)
        if self.opts.defaults:
            return None
        if scenario in ("hello", "body64k", "flask", "django"):
            best = self.best_peer(rows, python_only=True)
            if best is None:
                return None
            ratio = ours.rps / best.rps
            return (
                "1.5x the best Python peer, p99 no worse",
                f"{ratio:.2f}x {best.server}; p99 {fmt_ms(ours.p99_ms)} vs "
                f"{fmt_ms(best.p99_ms)} ms",
                ratio >= 1.5 and ours.p99_ms <= best.p99_ms,
            )
        if scenario in ("body1m", "stream", "echo"):
            best = self.best_peer(rows)
            if best is None:
                return None
            ratio = ours.rps / best.rps
            return (
                "at least the best peer, granian included",
                f"{ratio:.2f}x {best.server}",
                ratio >= 1.0,
            )
        if scenario == "file":
            nginx = ok.get("nginx")
            if nginx is None or not nginx.cpu_ms_per_req or not nginx.rps:
                return None
            cpu = ours.cpu_ms_per_req / nginx.cpu_ms_per_req
            speed = ours.rps / nginx.rps
            return (
                "CPU per response at most 1.5x nginx's, req/s at least 0.95x",
                f"CPU {ours.cpu_ms_per_req:.2f} vs {nginx.cpu_ms_per_req:.2f} ms ({cpu:.2f}x); "
                f"req/s {speed:.2f}x",
                cpu <= 1.5 and speed >= 0.95,
            )
        if scenario in ("idle", "slowloris"):
            with_over_without = ours.extra.get("with_over_without", 0.0)
            if scenario == "slowloris":
                return (
                    "hello with 1,000 slow clients at least 0.9x of without",
                    f"{with_over_without:.2f}",
                    with_over_without >= 0.9,
                )
            kib = ours.extra.get("rss_kib_per_conn", -1.0)
            return (
                "at most 3 KiB per idle connection; hello with them at least 0.9x of without",
                f"{per_conn_text(kib)} KiB; {with_over_without:.2f}",
                0 <= kib <= 3.0 and with_over_without >= 0.9,
            )
        return None

    def markdown_scenario(self, scenario: str) -> list[str]:
        rows = self.summaries(scenario)
        spec = SCENARIOS[scenario]
        ours = next((s for s in rows if s.server == "asyncwsgi" and s.ok_runs), None)
        base = ours or self.best_peer(rows)
        base_name = "asyncwsgi" if ours else "best peer"
        lines = [f"## {scenario}", "", spec.description + ".", ""]
        if scenario == "sleep":
            lines += self.sleep_bounds()
        if spec.kind != "wrk":
            return lines + self.markdown_helpers(scenario, rows, base, base_name)
        lines += [
            f"| server | req/s | min-max | vs {base_name} | p50 ms | p99 ms | p99.9 ms | errors "
            "| RSS MiB | CPU ms/req | threads | wrk CPU % | noise % |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for s in sorted(rows, key=lambda s: -s.rps):
            if not s.ok_runs:
                lines.append(f"| {s.server} | failed: {md_escape(s.failed)} " + "| " * 11 + "|")
                continue
            ratio = f"{s.rps / base.rps:.2f}x" if base and base.rps else "-"
            lines.append(
                f"| {s.server} | {fmt_num(s.rps)} | {fmt_num(s.rps_min)}-{fmt_num(s.rps_max)} "
                f"| {ratio} | {fmt_ms(s.p50_ms)} | {fmt_ms(s.p99_ms)} | {fmt_ms(s.p999_ms)} "
                f"| {s.errors_text()} | {s.rss_mib:.1f} | {s.cpu_ms_per_req:.3f} "
                f"| {s.threads:.0f} | {s.wrk_cpu_pct:.0f} | {s.noise_pct:.0f} |"
            )
        return [*lines, *self.failure_notes(rows), ""]

    def sleep_bounds(self) -> list[str]:
        o = self.opts
        if o.defaults:
            parts = [
                f"{name} {threads / SLEEP_APP_S:.0f}"
                for name in o.servers
                if (threads := SERVERS[name].default_threads)
            ]
            text = "Theoretical bound (default threads / 0.05 s), req/s: " + ", ".join(parts)
        else:
            text = (
                f"Theoretical bound for a pool of {o.threads} threads: "
                f"{o.threads} / {SLEEP_APP_S} s = {o.threads / SLEEP_APP_S:.0f} req/s "
                "(gunicorn-sync: 1 / 0.05 s = 20; wsgiref has a thread per connection)."
            )
        return [text, ""]

    def markdown_helpers(
        self, scenario: str, rows: list[Summary], base: Summary | None, base_name: str
    ) -> list[str]:
        idle = SCENARIOS[scenario].kind == "idle"
        count = self.opts.idle_connections if idle else self.opts.slowloris_clients
        what = "idle connections" if idle else "slow clients"
        head = (
            f"| server | {what} held | req/s without | req/s with | with/without "
            f"| vs {base_name} (with) | p99 ms (with) | errors "
        )
        if idle:
            head += (
                "| RSS MiB without | RSS MiB with | KiB per conn | threads without | threads with |"
            )
            sep = "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
        else:
            head += "| reconnects | threads with |"
            sep = "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
        lines = [
            f"{count:,} {what} are opened after the 'without' measurement and kept open during "
            f"the 'with' one; 'held' is how many were open when the measurement started. "
            "with/without is the median of the per-round ratios. 'starved': no hello request "
            f"completed while they were open (wrk's {WRK_TIMEOUT} timeout is not reached within "
            "the run, so such rows show no errors).",
            "",
            head,
            sep,
        ]
        for s in sorted(rows, key=lambda s: -s.rps):
            if not s.ok_runs:
                cells = 11 if idle else 8
                lines.append(f"| {s.server} | failed: {md_escape(s.failed)} " + "| " * cells + "|")
                continue
            e = s.extra
            ratio = f"{s.rps / base.rps:.2f}x" if base and base.rps else "-"
            row = (
                f"| {s.server} | {e.get('held_at_start', 0):,.0f} | {fmt_num(e['rps_without'])} "
                f"| {fmt_num(e['rps_with'])} | {e['with_over_without']:.2f} | {ratio} "
                f"| {fmt_ms(s.p99_ms) if e['rps_with'] else 'starved'} | {s.errors_text()} "
            )
            if idle:
                row += (
                    f"| {e['rss_mib_without']:.1f} | {e['rss_mib_with']:.1f} "
                    f"| {per_conn_text(e.get('rss_kib_per_conn', -1.0))} "
                    f"| {e['threads_without']:.0f} "
                    f"| {e['threads_with']:.0f} |"
                )
            else:
                row += f"| {e.get('reconnects', 0):,.0f} | {e['threads_with']:.0f} |"
            lines.append(row)
        return [*lines, *self.failure_notes(rows), ""]

    def failure_notes(self, rows: list[Summary]) -> list[str]:
        notes = [
            f"- {s.server}: {s.ok_runs} good run(s); a run failed: {md_escape(s.failed)}"
            for s in rows
            if s.ok_runs and s.failed
        ]
        return ["", *notes] if notes else []

    # -- json and charts --------------------------------------------------------------------

    def as_json(self) -> dict[str, Any]:
        return {
            "started": self.started,
            "revision": self.revision,
            "notes": self.notes,
            "machine": self.machine,
            "versions": self.versions,
            "options": dataclasses.asdict(self.opts),
            "summaries": {
                scenario: [dataclasses.asdict(s) for s in self.summaries(scenario)]
                for scenario in self.scenarios_done()
            },
            "runs": [dataclasses.asdict(r) for r in self.results],
        }

    def write(self) -> None:
        RESULTS_DIR.mkdir(parents=True, exist_ok=True)
        text = self.markdown()
        (RESULTS_DIR / f"{self.opts.output}.md").write_text(text)
        json_text = json.dumps(self.as_json(), indent=2)
        (RESULTS_DIR / f"{self.opts.output}.json").write_text(json_text + "\n")

    def charts(self) -> list[Path]:
        try:
            matplotlib = importlib.import_module("matplotlib")
            matplotlib.use("Agg")
            plt = importlib.import_module("matplotlib.pyplot")
        except ImportError:
            log("matplotlib is not installed: no charts")
            return []
        written = []
        prefix = "" if self.opts.output == "latest" else f"{self.opts.output}-"
        for scenario in self.scenarios_done():
            rows = [s for s in self.summaries(scenario) if s.ok_runs]
            if not rows:
                continue
            rows.sort(key=lambda s: -s.rps)
            names = [s.server for s in rows]
            values = [s.rps for s in rows]
            low = [s.rps - s.rps_min for s in rows]
            high = [s.rps_max - s.rps for s in rows]
            colors = [bar_color(name) for name in names]
            fig, ax = plt.subplots(figsize=(8, 0.45 * len(rows) + 1.4))
            ax.barh(names, values, xerr=[low, high], color=colors, capsize=3)
            ax.invert_yaxis()
            kind = SCENARIOS[scenario].kind
            label = "hello req/s with the connections open" if kind != "wrk" else "req/s"
            ax.set_xlabel(f"{label} (median, min-max whiskers)")
            ax.set_title(f"{scenario}: {SCENARIOS[scenario].description}", fontsize=9)
            for index, value in enumerate(values):
                ax.text(value, index, f" {value:,.0f}", va="center", fontsize=8)
            fig.tight_layout()
            path = RESULTS_DIR / f"{prefix}{scenario}.png"
            fig.savefig(path, dpi=100)
            plt.close(fig)
            written.append(path)
        return written


def per_conn_text(kib: float) -> str:
    return f"{kib:.1f}" if kib >= 0 else "-"


def bar_color(server: str) -> str:
    if server == "asyncwsgi":
        return "tab:red"
    return "tab:gray" if SERVERS[server].reference else "tab:blue"


def md_escape(text: str | None) -> str:
    return (text or "").replace("|", "/").replace("\n", " ")[:160]


# --------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------


def reexec_in_venv(opts: Options, argv: Sequence[str]) -> None:
    """Install what the selected servers need into benchmarks/.venv and re-run from there."""
    if os.environ.get(IN_VENV_MARK) == "1":
        return
    if opts.install and not ensure_venv(requirements_for(opts), opts.reinstall):
        return
    python = venv_python()
    if not python.exists():
        log(f"{python} does not exist: running with {sys.executable}")
        return
    os.environ[IN_VENV_MARK] = "1"
    os.execv(str(python), [str(python), str(Path(__file__).resolve()), *argv])


def take_machine_lock() -> IO[str]:
    """Take the machine-wide benchmark lock, waiting for a run already in progress.

    Two runs at once share the two cores and spoil each other's numbers. The lock is an
    advisory ``flock`` on a file in the temp directory, released when this process exits.
    """
    path = Path(tempfile.gettempdir()) / "asyncwsgi-bench" / "run.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = path.open("a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "unknown"
        log(f"another benchmark run holds {path} ({holder}); waiting for it to finish")
        fcntl.flock(handle, fcntl.LOCK_EX)
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()} since {time.strftime('%H:%M:%S')}\n")
    handle.flush()
    return handle


def pin_self(opts: Options) -> None:
    """Keep the harness itself off the server's core."""
    if opts.client_cpu is not None:
        with contextlib.suppress(OSError, ValueError):
            os.sched_setaffinity(0, {int(opts.client_cpu.split(",")[0])})


def render_again(names: str, output: str | None, charts: bool) -> int:
    """Re-render saved results; merge several runs scenario by scenario."""
    reports: list[Report] = []
    for name in names.split(","):
        path = RESULTS_DIR / f"{name.strip()}.json"
        try:
            reports.append(Report.load(path))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log(f"cannot load {path}: {exc}")
            return 1
    report = reports[0]
    for later in reports[1:]:
        report.merge(later)
    if output:
        report.opts.output = output
    report.write()
    if charts:
        report.charts()
    print(report.markdown())
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    opts = parse_args(argv)
    reexec_in_venv(opts, argv)
    if opts.render:
        return render_again(opts.render, opts.render_output, charts=opts.charts)
    ensure_system_tools(need_nginx="nginx" in opts.servers)
    if shutil.which("wrk") is None:
        log("wrk is not installed and could not be installed (apt-get install wrk)")
        return 2
    limit = raise_nofile_limit()
    if limit < opts.idle_connections + 1024 and "idle" in opts.scenarios:
        log(f"RLIMIT_NOFILE is {limit}: fewer idle connections than asked may be opened")
    pin_self(opts)
    lock = take_machine_lock()
    bench_file_path()
    report = Report(opts)
    log(f"versions: {json.dumps(report.versions)}")
    started = time.monotonic()
    try:
        run_all(opts, report)
    except KeyboardInterrupt:
        log("interrupted: writing what was measured")
    report.write()
    if opts.charts:
        report.charts()
    lock.close()
    print(report.markdown())
    log(f"wrote {RESULTS_DIR / (opts.output + '.md')} in {time.monotonic() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
