"""The command line of ``bench_server.py``, parsed into :class:`Options`."""

from __future__ import annotations

import argparse
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .scenarios import QUICK_SCENARIOS, SCENARIOS
from .servers import DEFAULT_SERVERS, QUICK_SERVERS, SERVERS


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
    readme_table: bool = False


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
    parser.add_argument(
        "--readme-table",
        action="store_true",
        help="measure and write nothing: print the top-level README.md's benchmark tables "
        "(where we stand, targets) from results/NAME.json, NAME from --render (default latest)",
    )
    parser.add_argument("--no-install", action="store_true", help="use the venv as it is")
    parser.add_argument("--reinstall", action="store_true", help="pip install everything again")
    args = parser.parse_args(argv)

    if args.quick:
        scenarios = list(QUICK_SCENARIOS)
        servers = list(QUICK_SERVERS)
        rounds, duration, warmup = 1, 2, 1
    else:
        scenarios, servers = list(SCENARIOS), list(DEFAULT_SERVERS)
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
        readme_table=args.readme_table,
    )


def split_names(text: str, known: dict[str, Any], parser: argparse.ArgumentParser) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in known]
    if unknown:
        parser.error(f"unknown: {', '.join(unknown)} (known: {', '.join(known)})")
    return names
