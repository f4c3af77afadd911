"""The benchmark harness behind ``python benchmarks/bench_server.py``.

Modules, from the bottom up (each imports only those above it):

- ``constants``: where the harness's files are; the size units.
- ``scenarios``: the workloads.
- ``environment``: the virtualenv, wrk and nginx, file limits, the files the apps serve.
- ``servers``: the servers under test and the command line that starts each.
- ``procstat``: sampling /proc (process trees, core usage).
- ``options``: the command line, parsed.
- ``runner``: one server x scenario x round, from start to stop.
- ``summary``: the rounds of one server x scenario reduced to medians.
- ``report``: the markdown tables, the JSON file and the charts.
- ``suite``: the whole run, every scenario x round x server.
- ``main``: the entry point: virtualenv, machine-wide lock, run or re-render, print.
"""
