#!/usr/bin/env python3
"""Benchmark asyncwsgi against other WSGI servers, and nginx as the physical-limit reference.

    python benchmarks/bench_server.py                 # every scenario, every server, 3 rounds
    python benchmarks/bench_server.py --quick         # CI smoke run, well under a minute
    python benchmarks/bench_server.py --scenarios hello,file --servers asyncwsgi,waitress

The script creates ``benchmarks/.venv`` on first use, installs the servers it needs there
(asyncwsgi itself as an editable install of this repository) and re-runs itself inside it.
Each server runs as one process tree pinned to one core, wrk is pinned to another, and every
response is checked by ``wrk/check.lua``. See ``benchmarks/README.md`` for what is measured and
how to read it; the code is the ``harness`` package next to this script.
"""

from __future__ import annotations

import sys

from harness.main import main

if __name__ == "__main__":
    sys.exit(main())
