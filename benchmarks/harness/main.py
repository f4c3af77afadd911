"""The entry point behind ``python benchmarks/bench_server.py``: re-run inside ``benchmarks/.venv``,
take the machine-wide lock, run the suite (or render saved results again), print the report.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import IO

from .constants import BENCH_SERVER_PY, RESULTS_DIR
from .environment import (
    bench_file_path,
    ensure_system_tools,
    ensure_venv,
    log,
    raise_nofile_limit,
    venv_python,
)
from .options import Options, parse_args
from .report import Report
from .suite import requirements_for, run_all

IN_VENV_MARK = "ASYNCWSGI_BENCH_IN_VENV"


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
    os.execv(str(python), [str(python), str(BENCH_SERVER_PY), *argv])


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


def load_results(names: str) -> Report | None:
    """results/NAME.json for each of the comma-separated ``names``, merged scenario by scenario
    (each later run's scenarios replace the earlier ones'); None, logged, if one cannot be read.
    """
    reports: list[Report] = []
    for name in names.split(","):
        path = RESULTS_DIR / f"{name.strip()}.json"
        try:
            reports.append(Report.load(path))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log(f"cannot load {path}: {exc}")
            return None
    report = reports[0]
    for later in reports[1:]:
        report.merge(later)
    return report


def render_again(names: str, output: str | None, charts: bool) -> int:
    """Re-render saved results; merge several runs scenario by scenario."""
    report = load_results(names)
    if report is None:
        return 1
    if output:
        report.opts.output = output
    report.write()
    if charts:
        report.charts()
    print(report.markdown())
    return 0


def print_readme_table(names: str) -> int:
    """Print the README's benchmark tables from saved results, writing nothing."""
    report = load_results(names)
    if report is None:
        return 1
    print(report.readme_table(), end="")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    opts = parse_args(argv)
    if opts.readme_table:
        return print_readme_table(opts.render or "latest")
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
