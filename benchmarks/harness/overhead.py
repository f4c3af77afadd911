"""asyncwsgi's own overhead on hello, measured against the floor rows of the same run.

``floor-uvloop`` (kernel and event loop, fixed bytes) and ``floor-h11`` (the same plus h11
parsing and serialising) are single-threaded uvloop servers in ``benchmarks/floor.py`` that send
the same bytes as asyncwsgi's hello. asyncwsgi's server CPU per request minus ``floor-h11``'s
is what asyncwsgi itself adds: the thread hand-off, the environ and the WSGI call. The target:
at most ``LIMIT_US`` µs, or at most ``LIMIT_SHARE`` of ``floor-h11``'s CPU per request,
whichever is larger.

Server CPU per request is the one every row reports: ``utime + stime`` of the server's process
tree (``/proc/PID/stat``) over the measured window, divided by the requests wrk completed
(:func:`harness.runner.result_from`), median of the rounds.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from .runner import RunResult
from .summary import Summary

SCENARIO = "hello"
OURS = "asyncwsgi"
FLOOR_H11 = "floor-h11"
FLOOR_UVLOOP = "floor-uvloop"
#: Our own overhead may be this many µs per request, or ``LIMIT_SHARE`` of floor-h11's CPU per
#: request, whichever is larger.
LIMIT_US = 20.0
LIMIT_SHARE = 0.30


@dataclass(frozen=True)
class Overhead:
    """asyncwsgi's server CPU per request on hello against the floor rows, in µs per request.

    ``overhead_us`` is ``ours_us - floor_h11_us`` (medians of the rounds); ``share`` is that
    over ``floor_h11_us``; ``per_round_us`` is the same difference round by round (rounds in
    which both ran), to show its spread. ``floor_uvloop_us`` is None when floor-uvloop did not
    run.
    """

    ours_us: float
    floor_h11_us: float
    floor_uvloop_us: float | None
    overhead_us: float
    share: float
    limit_us: float
    per_round_us: tuple[float, ...]

    @property
    def met(self) -> bool:
        return self.overhead_us <= self.limit_us

    def verdict(self) -> str:
        """``met, N µs to spare`` or ``missed by N µs``."""
        margin = self.limit_us - self.overhead_us
        return f"met, {margin:.1f} µs to spare" if margin >= 0 else f"missed by {-margin:.1f} µs"


def cpu_us(summary: Summary) -> float:
    return summary.cpu_ms_per_req * 1000


def measure(rows: Sequence[Summary], runs: Sequence[RunResult]) -> Overhead | None:
    """Our overhead from hello's summaries and runs; None unless asyncwsgi and floor-h11 ran.

    Args:
        rows: the hello summaries of every server in the run.
        runs: every run of the report (other scenarios are ignored).
    """
    ok = {s.server: s for s in rows if s.ok_runs and s.cpu_ms_per_req > 0}
    ours, floor_h11 = ok.get(OURS), ok.get(FLOOR_H11)
    if ours is None or floor_h11 is None:
        return None
    floor_uvloop = ok.get(FLOOR_UVLOOP)
    by_round: dict[tuple[str, int], float] = {
        (r.server, r.round): r.cpu_ms_per_req * 1000
        for r in runs
        if r.scenario == SCENARIO and r.ok and r.cpu_ms_per_req > 0
    }
    per_round = tuple(
        us - by_round[(FLOOR_H11, round_no)]
        for (server, round_no), us in sorted(by_round.items(), key=lambda item: item[0][1])
        if server == OURS and (FLOOR_H11, round_no) in by_round
    )
    overhead = cpu_us(ours) - cpu_us(floor_h11)
    return Overhead(
        ours_us=cpu_us(ours),
        floor_h11_us=cpu_us(floor_h11),
        floor_uvloop_us=cpu_us(floor_uvloop) if floor_uvloop else None,
        overhead_us=overhead,
        share=overhead / cpu_us(floor_h11),
        limit_us=max(LIMIT_US, LIMIT_SHARE * cpu_us(floor_h11)),
        per_round_us=per_round,
    )


def goal_text() -> str:
    return (
        f"our own overhead (server CPU/request minus floor-h11's) at most {LIMIT_US:.0f} µs "
        f"or {LIMIT_SHARE:.0%} of floor-h11's, whichever is larger"
    )


def measured_text(o: Overhead) -> str:
    return (
        f"{o.overhead_us:.1f} µs = {o.share:.0%} of floor-h11's {o.floor_h11_us:.1f} µs "
        f"(asyncwsgi {o.ours_us:.1f} µs); limit {o.limit_us:.1f} µs"
    )


def target_row(o: Overhead) -> str:
    """The Targets table row: scenario, goal, this run, met or missed by how much."""
    return f"| {SCENARIO} (overhead) | {goal_text()} | {measured_text(o)} | {o.verdict()} |"


ROLES = {
    FLOOR_UVLOOP: "kernel + event loop: fixed bytes per request head, no parsing",
    FLOOR_H11: "+ h11: parse each request, serialise the response",
    OURS: "+ our own: thread hand-off, environ, WSGI call, strictness checks",
}


def markdown(rows: Sequence[Summary], o: Overhead | None) -> list[str]:
    """The floor table under hello, with our overhead in µs and as a share of floor-h11's."""
    ok = {s.server: s for s in rows if s.ok_runs}
    present = [name for name in ROLES if name in ok]
    if not any(name in ok for name in (FLOOR_H11, FLOOR_UVLOOP)):
        return []
    lines = [
        "### The floor",
        "",
        "Server CPU per request (`utime + stime` of the process tree over the window / requests,",
        "median of the rounds). The floor rows are single-threaded uvloop servers",
        "(`benchmarks/floor.py`) sending the same bytes as asyncwsgi; each row adds one layer.",
        "",
        "| server | CPU µs/req | + over the row above | req/s | wrk CPU % | noise % "
        "| what it costs |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    previous: float | None = None
    for name in present:
        s = ok[name]
        step = f"{cpu_us(s) - previous:.1f}" if previous is not None else "-"
        lines.append(
            f"| {name} | {cpu_us(s):.1f} | {step} | {s.rps:,.0f} | {s.wrk_cpu_pct:.0f} "
            f"| {s.noise_pct:.0f} | {ROLES[name]} |"
        )
        previous = cpu_us(s)
    lines.append("")
    if o is not None:
        rounds = ", ".join(f"{us:.1f}" for us in o.per_round_us) or "-"
        lines += [
            f"**Our own overhead: {o.overhead_us:.1f} µs per request, {o.share:.0%} of "
            f"floor-h11's CPU per request** (the difference of the medians above; round by round: "
            f"{rounds} µs). Limit "
            f"max({LIMIT_US:.0f} µs, {LIMIT_SHARE:.0%} of floor-h11) = {o.limit_us:.1f} µs: "
            f"{o.verdict()}.",
            "",
        ]
    lines += [
        "CPU per request is only comparable between rows whose server core was busy: where",
        "wrk CPU % is near 100, wrk was the limit and the row's CPU per request includes idle",
        "wake-ups. Where noise % is more than a few %, other processes shared the server's",
        "core and the difference is suspect: rerun on a quiet machine.",
        "",
    ]
    return lines
