"""The servers under test: what each needs installed, and the command line that starts it for a
scenario, tuned (``--threads``, backlog, keep-alive, connection limit) or with its own defaults.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .constants import BENCH_DIR, FLOOR_PY, LAUNCH_PY, KiB, MiB
from .environment import bench_file_path, nginx_binary, static_file
from .scenarios import Scenario

TUNED_BACKLOG = 2048
TUNED_KEEP_ALIVE_S = 60
TUNED_CONNECTION_LIMIT = 12_000


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
    #: Left out of the default server list: named with ``--servers`` only.
    opt_in: bool = False

    def supports(self, scenario: str) -> bool:
        return self.scenarios is None or scenario in self.scenarios


def app_spec(ctx: LaunchContext) -> str:
    return f"apps:{ctx.scenario.app}"


def cmd_asyncwsgi(ctx: LaunchContext, access_log: bool = False) -> list[str]:
    """``asyncwsgi serve``; with ``access_log``, its default access line goes to a file in the
    run's work directory (``--access-logfile``; without it the line goes to stderr)."""
    cmd = [ctx.python, "-m", "asyncwsgi", "serve", app_spec(ctx)]
    cmd += ["--host", "127.0.0.1", "--port", str(ctx.port), "--app-dir", str(BENCH_DIR)]
    if access_log:
        cmd += ["--access-logfile", str(ctx.workdir / "access.log")]
    else:
        cmd.append("--no-access-log")
    if not ctx.defaults:
        cmd += ["--threads", str(ctx.threads), "--backlog", str(TUNED_BACKLOG)]
        cmd += ["--timeout-keep-alive", str(TUNED_KEEP_ALIVE_S)]
    return cmd


def cmd_asyncwsgi_access_log(ctx: LaunchContext) -> list[str]:
    return cmd_asyncwsgi(ctx, access_log=True)


#: asyncwsgi's ``--threads`` default where ``asyncwsgi.config`` cannot be imported.
ASYNCWSGI_DEFAULT_THREADS = 64


def asyncwsgi_default_threads() -> int:
    """``--threads``'s default, from ``asyncwsgi.config.Config`` of this tree where importable."""
    try:
        from asyncwsgi.config import Config
    except ImportError:
        return ASYNCWSGI_DEFAULT_THREADS
    threads = next(f.default for f in dataclasses.fields(Config) if f.name == "threads")
    return threads if isinstance(threads, int) else ASYNCWSGI_DEFAULT_THREADS


#: ``asyncwsgi-baseline`` serves the asyncwsgi of this source tree (another checkout, such as a
#: ``git worktree`` of the revision to compare against), for a before/after A/B in one run.
BASELINE_ENV = "ASYNCWSGI_BASELINE"


def cmd_asyncwsgi_baseline(ctx: LaunchContext) -> list[str]:
    tree = os.environ.get(BASELINE_ENV)
    if not tree:
        raise SystemExit(f"asyncwsgi-baseline needs ${BASELINE_ENV}: a checkout to compare with")
    # The checkout goes first on sys.path, ahead of this repository's asyncwsgi.
    run = "import runpy, sys; sys.path.insert(0, sys.argv.pop(1)); "
    run += "runpy.run_module('asyncwsgi', run_name='__main__', alter_sys=True)"
    return [ctx.python, "-c", run, os.path.abspath(tree), *cmd_asyncwsgi(ctx)[3:]]


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


#: The floor rows answer hello only: they run no WSGI application (see floor.py). The access-log
#: row runs hello only: the cost of one access line shows best where a request costs least.
HELLO_ONLY = frozenset({"hello"})


def cmd_floor(kind: str) -> Callable[[LaunchContext], list[str]]:
    def build(ctx: LaunchContext) -> list[str]:
        cmd = [ctx.python, str(FLOOR_PY), kind, "--host", "127.0.0.1", "--port", str(ctx.port)]
        return [*cmd, "--backlog", str(TUNED_BACKLOG)]

    return build


SERVERS: dict[str, Server] = {
    s.name: s
    for s in (
        Server(
            "asyncwsgi",
            "asyncio event loop + worker thread pool",
            (),
            ("asyncwsgi",),
            cmd_asyncwsgi,
            default_threads=asyncwsgi_default_threads(),
        ),
        Server(
            "asyncwsgi-access-log",
            "asyncwsgi with its default access log on, to a file (reference, not a peer)",
            (),
            ("asyncwsgi",),
            cmd_asyncwsgi_access_log,
            scenarios=HELLO_ONLY,
            reference=True,
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
        Server(
            "asyncwsgi-baseline",
            f"asyncwsgi from ${BASELINE_ENV} (a before/after A/B; reference, not a peer)",
            (),
            ("asyncwsgi",),
            cmd_asyncwsgi_baseline,
            reference=True,
            # The default of the revisions compared against so far; for the bound shown only.
            default_threads=32,
            opt_in=True,
        ),
        Server(
            "floor-h11",
            "uvloop Protocol + h11, fixed hello response, no threads (reference, not WSGI)",
            ("uvloop",),
            ("uvloop", "h11"),
            cmd_floor("h11"),
            scenarios=HELLO_ONLY,
            reference=True,
        ),
        Server(
            "floor-uvloop",
            "uvloop Protocol, fixed bytes per request head, no parsing (reference, not WSGI)",
            ("uvloop",),
            ("uvloop",),
            cmd_floor("uvloop"),
            scenarios=HELLO_ONLY,
            reference=True,
        ),
    )
}


#: A full run's servers: all but the opt-in ones.
DEFAULT_SERVERS = tuple(name for name, server in SERVERS.items() if not server.opt_in)

#: The hello-only rows are cheap and keep their code path exercised in CI.
QUICK_SERVERS = (
    "asyncwsgi",
    "asyncwsgi-access-log",
    "waitress",
    "gunicorn-gthread",
    "floor-h11",
    "floor-uvloop",
)

BASE_REQUIREMENTS = ("h11",)
SCENARIO_REQUIREMENTS = {"flask": ("flask",), "django": ("django",)}
CHART_REQUIREMENTS = ("matplotlib",)
