"""The whole run: every scenario, every round, every server in a rotated order, each result
logged and added to the report as it comes.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator, Sequence

from .constants import BENCH_DIR
from .environment import log, server_env
from .options import Options
from .report import Report
from .runner import START_FAILED, Expect, RunResult, run_case
from .scenarios import SCENARIOS
from .servers import BASE_REQUIREMENTS, CHART_REQUIREMENTS, SCENARIO_REQUIREMENTS, SERVERS


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
