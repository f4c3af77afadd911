"""Where the harness's files are, and the size units every module uses."""

from __future__ import annotations

from pathlib import Path

#: ``benchmarks/``, the directory above this package.
BENCH_DIR = Path(__file__).resolve().parent.parent
REPO_ROOT = BENCH_DIR.parent
VENV_DIR = BENCH_DIR / ".venv"
RESULTS_DIR = BENCH_DIR / "results"
CHECK_LUA = BENCH_DIR / "wrk" / "check.lua"
LAUNCH_PY = BENCH_DIR / "launch.py"
FLOOR_PY = BENCH_DIR / "floor.py"
BENCH_SERVER_PY = BENCH_DIR / "bench_server.py"
IDLE_CLIENTS_PY = BENCH_DIR / "idle_clients.py"

KiB = 1024
MiB = 1024 * KiB
