"""The report: machine and versions, the markdown tables (where we stand, targets, one table per
scenario), the JSON file, and the PNG charts.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from . import overhead, targets
from .constants import BENCH_DIR, REPO_ROOT, RESULTS_DIR, MiB
from .environment import installed_dists, log, nginx_binary, server_env
from .options import Options
from .runner import WRK_TIMEOUT, RunResult
from .scenarios import SCENARIOS, SLEEP_APP_S
from .servers import SERVERS
from .summary import Summary, fmt_ms, fmt_num, summarise


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

    def overhead(self) -> overhead.Overhead | None:
        """asyncwsgi's CPU per hello request minus floor-h11's, when both ran."""
        return overhead.measure(self.summaries(overhead.SCENARIO), self.results)

    def scenarios_done(self) -> list[str]:
        done = {r.scenario for r in self.results}
        return [name for name in self.opts.scenarios if name in done]

    # -- markdown ---------------------------------------------------------------------------

    def markdown(self) -> str:
        o = self.opts
        mode = "each server's own defaults" if o.defaults else f"{o.threads} threads for all"
        own = [name for name in o.scenarios if SCENARIOS[name].defaults and not o.defaults]
        if own:
            mode += f" ({', '.join(own)}: each server's own defaults)"
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

    def markdown_overview(self) -> list[str]:
        lines = [
            "## Where we stand",
            "",
            "Medians of req/s (for idle and slowloris: hello req/s with the extra connections",
            "open). Python peers are gunicorn, waitress, cheroot and uvicorn: their HTTP handling",
            "runs in Python. granian's runs in Rust; wsgiref (HTTP/1.0, a thread per connection)",
            "is the low baseline; nginx is the static-file / fixed-response reference.",
            "floor-h11 and floor-uvloop (hello only, not WSGI) are what h11 and the kernel cost",
            'per request: see "The floor" under hello.',
            "",
            *self.overview_table(),
            "",
        ]
        rows = self.target_rows()
        return [*lines, "### Targets", "", *rows, ""] if rows else lines

    def overview_table(self) -> list[str]:
        """Where we stand: per scenario, asyncwsgi's req/s against the best peers and nginx."""
        lines = [
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
                best = targets.best_peer(list(rows.values()), python_only)
                cells.append(f"{best.server} {fmt_num(best.rps)}" if best else "-")
                ratio = ours_rps / best.rps if best and best.rps and ours_rps is not None else None
                cells.append(f"{ratio:.2f}x" if ratio is not None else "-")
            cells.append(fmt_num(nginx.rps) if nginx and nginx.ok_runs else "-")
            lines.append("| " + " | ".join(cells) + " |")
        return lines

    def targets(self) -> list[targets.Target]:
        """The goals of the round (:mod:`harness.targets`), each against this run."""
        return [
            target
            for scenario in self.scenarios_done()
            for target in targets.evaluate(scenario, self.summaries(scenario), self.opts)
        ]

    def target_rows(self) -> list[str]:
        """The Targets table, in scenario order (empty when no goal applies)."""
        rows = []
        for scenario in self.scenarios_done():
            if scenario == overhead.SCENARIO and (ours := self.overhead()) is not None:
                rows.append(overhead.target_row(ours))
            found = targets.evaluate(scenario, self.summaries(scenario), self.opts)
            rows += [target.markdown() for target in found]
        if not rows:
            return []
        return ["| scenario | target | this run | |", "|---|---|---|---|", *rows]

    def readme_table(self) -> str:
        """The benchmark tables of the top-level README.md: where we stand, then the targets."""
        lines = self.overview_table()
        if rows := self.target_rows():
            intro = "Against the goals of the benchmark harness (see benchmarks/README.md):"
            lines += ["", intro, "", *rows]
        return "\n".join(lines) + "\n"

    def markdown_scenario(self, scenario: str) -> list[str]:
        rows = self.summaries(scenario)
        spec = SCENARIOS[scenario]
        ours = next((s for s in rows if s.server == "asyncwsgi" and s.ok_runs), None)
        base = ours or targets.best_peer(rows)
        base_name = "asyncwsgi" if ours else "best peer"
        lines = [f"## {scenario}", "", spec.description + ".", ""]
        if spec.app == "sleep":
            lines += self.sleep_bounds(targets.runs_with_defaults(scenario, self.opts))
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
        lines += [*self.failure_notes(rows), ""]
        if scenario == overhead.SCENARIO:
            lines += overhead.markdown(rows, self.overhead())
        return lines

    def sleep_bounds(self, defaults: bool) -> list[str]:
        """The sleep app's theoretical bounds: threads / 0.05 s for each server's pool."""
        o = self.opts
        if defaults:
            parts = [
                f"{name} {threads / SLEEP_APP_S:.0f}"
                for name in o.servers
                if (threads := SERVERS[name].default_threads)
            ]
            text = (
                "Theoretical bound (default threads / 0.05 s), req/s: " + ", ".join(parts) + "; "
                f"and for every server at most {o.connections} connections / 0.05 s = "
                f"{o.connections / SLEEP_APP_S:,.0f} (wsgiref: a thread per connection)."
            )
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
            "overhead": dataclasses.asdict(ours) if (ours := self.overhead()) else None,
            "targets": [
                {**dataclasses.asdict(t), "met": t.met, "verdict": t.verdict()}
                for t in self.targets()
            ],
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
