"""The goals of the performance round, checked against one run: each goal in a few words, what
the run measured against it, and "met" with the margin to spare or "missed by" how much.

Every goal compares servers of the same run (ratios, never absolute req/s). The hello overhead
goal (asyncwsgi's CPU per request against floor-h11's) is :mod:`harness.overhead`'s.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .options import Options
from .scenarios import SCENARIOS, SLEEP_APP_S
from .servers import SERVERS
from .summary import Summary, fmt_ms, fmt_num

OURS = "asyncwsgi"
ACCESS_LOG = "asyncwsgi-access-log"
#: The access-log row's req/s over asyncwsgi's (``--no-access-log``) on hello, at least.
ACCESS_LOG_MIN_RATIO = 0.95
#: The best Python peer's req/s times this, at least, with p99 no worse.
PYTHON_PEER_RATIOS = {"body64k": 1.5, "flask": 1.4, "django": 1.4}
#: echo: at least these ratios to each of these peers.
ECHO_RATIOS = {"cheroot": 1.0, "granian": 0.8}
#: sleep with ``--threads N`` for all: req/s at least this share of N / 0.05 s.
SLEEP_MIN_SHARE = 0.97


@dataclass(frozen=True)
class Bound:
    """One inequality of a goal: ``value >= limit`` (``at_least``) or ``value <= limit``.

    ``unit`` follows the number in the verdict (``x`` for a ratio, `` ms``, `` %``, `` KiB``);
    ``label`` names the quantity where a goal has several bounds (``p99``, ``CPU``). A NaN
    ``value`` is a quantity the run could not measure: the bound counts as missed.
    """

    value: float
    limit: float
    unit: str = "x"
    label: str = ""
    at_least: bool = True
    digits: int = 2

    @property
    def margin(self) -> float:
        """How far inside the bound the value is: negative when the bound is missed."""
        return self.value - self.limit if self.at_least else self.limit - self.value

    @property
    def holds(self) -> bool:
        return self.margin >= 0  # False for NaN

    def amount(self) -> str:
        if math.isnan(self.value):
            text = "not measured"
        else:
            text = f"{abs(self.margin):.{self.digits}f}{self.unit}"
        return f"{self.label} {text}" if self.label else text


@dataclass(frozen=True)
class Target:
    """A goal and this run's measurement against it: met only when every bound holds."""

    scenario: str
    goal: str
    measured: str
    bounds: tuple[Bound, ...]

    @property
    def met(self) -> bool:
        return all(b.holds for b in self.bounds)

    def verdict(self) -> str:
        """``met, X to spare`` or ``missed by X`` (the bounds missed only)."""
        if self.met:
            return "met, " + ", ".join(b.amount() for b in self.bounds) + " to spare"
        return "missed by " + ", ".join(b.amount() for b in self.bounds if not b.holds)

    def markdown(self) -> str:
        return f"| {self.scenario} | {self.goal} | {self.measured} | {self.verdict()} |"


def best_peer(rows: list[Summary], python_only: bool = False) -> Summary | None:
    """The fastest WSGI peer; with ``python_only``, leave out granian (native) and wsgiref."""
    peers = [
        s
        for s in rows
        if s.ok_runs
        and s.server != OURS
        and not SERVERS[s.server].reference
        and not (python_only and (SERVERS[s.server].native or SERVERS[s.server].floor))
    ]
    return max(peers, key=lambda s: s.rps) if peers else None


def runs_with_defaults(scenario: str, opts: Options) -> bool:
    """Whether the servers ran ``scenario`` with their own defaults."""
    return opts.defaults or SCENARIOS[scenario].defaults


def evaluate(scenario: str, rows: list[Summary], opts: Options) -> list[Target]:
    """The targets of ``scenario`` (empty where it has none or what it compares did not run).

    Args:
        scenario: a :data:`harness.scenarios.SCENARIOS` name.
        rows: that scenario's summaries, one per server.
        opts: the run's options (``threads`` for the sleep bound, ``defaults``).
    """
    ok = {s.server: s for s in rows if s.ok_runs}
    ours = ok.get(OURS)
    if ours is None:
        return []
    found: Target | None = None
    if SCENARIOS[scenario].app == "sleep":
        found = sleep_target(scenario, ours, rows, opts)
    elif runs_with_defaults(scenario, opts):
        return []
    elif scenario == "hello":
        found = access_log_target(ours, ok.get(ACCESS_LOG))
    elif scenario in PYTHON_PEER_RATIOS:
        found = python_peer_target(scenario, ours, best_peer(rows, python_only=True))
    elif scenario in ("body1m", "stream"):
        best = best_peer(rows)
        if best is not None and best.rps:
            ratio = ours.rps / best.rps
            goal = "at least the best peer, granian included"
            found = Target(scenario, goal, f"{ratio:.2f}x {best.server}", (Bound(ratio, 1.0),))
    elif scenario == "echo":
        found = echo_target(ours, ok)
    elif scenario == "file":
        found = file_target(ours, ok.get("nginx"))
    elif scenario in ("idle", "slowloris"):
        found = helpers_target(scenario, ours)
    return [found] if found is not None else []


def access_log_target(ours: Summary, logging: Summary | None) -> Target | None:
    if logging is None or not ours.rps:
        return None
    ratio = logging.rps / ours.rps
    return Target(
        "hello (access log)",
        f"default access log on (to a file): hello at least {ACCESS_LOG_MIN_RATIO}x of "
        "--no-access-log, same run",
        f"{ratio:.2f}x ({fmt_num(logging.rps)} vs {fmt_num(ours.rps)} req/s); CPU "
        f"{logging.cpu_ms_per_req:.3f} vs {ours.cpu_ms_per_req:.3f} ms/req",
        (Bound(ratio, ACCESS_LOG_MIN_RATIO),),
    )


def python_peer_target(scenario: str, ours: Summary, best: Summary | None) -> Target | None:
    if best is None or not best.rps:
        return None
    want = PYTHON_PEER_RATIOS[scenario]
    ratio = ours.rps / best.rps
    return Target(
        scenario,
        f"{want}x the best Python peer, p99 no worse",
        f"{ratio:.2f}x {best.server}; p99 {fmt_ms(ours.p99_ms)} vs {fmt_ms(best.p99_ms)} ms",
        (
            Bound(ratio, want),
            Bound(ours.p99_ms, best.p99_ms, " ms", "p99", at_least=False),
        ),
    )


def echo_target(ours: Summary, ok: dict[str, Summary]) -> Target | None:
    peers = {name: ok.get(name) for name in ECHO_RATIOS}
    ratios = {name: ours.rps / s.rps for name, s in peers.items() if s is not None and s.rps}
    if len(ratios) < len(ECHO_RATIOS):
        return None
    return Target(
        "echo",
        " and ".join(f"at least {want}x {name}" for name, want in ECHO_RATIOS.items())
        + ", same run",
        ", ".join(f"{ratio:.2f}x {name}" for name, ratio in ratios.items()),
        tuple(Bound(ratios[name], want, label=name) for name, want in ECHO_RATIOS.items()),
    )


def file_target(ours: Summary, nginx: Summary | None) -> Target | None:
    if nginx is None or not nginx.cpu_ms_per_req or not nginx.rps:
        return None
    cpu = ours.cpu_ms_per_req / nginx.cpu_ms_per_req
    speed = ours.rps / nginx.rps
    return Target(
        "file",
        "CPU per response at most 1.5x nginx's, req/s at least 0.95x",
        f"CPU {ours.cpu_ms_per_req:.2f} vs {nginx.cpu_ms_per_req:.2f} ms ({cpu:.2f}x); "
        f"req/s {speed:.2f}x",
        (
            Bound(cpu, 1.5, label="CPU", at_least=False),
            Bound(speed, 0.95, label="req/s"),
        ),
    )


def helpers_target(scenario: str, ours: Summary) -> Target:
    with_over_without = ours.extra.get("with_over_without", 0.0)
    ratio = Bound(with_over_without, 0.9)
    if scenario == "slowloris":
        goal = "hello with 1,000 slow clients at least 0.9x of without"
        return Target(scenario, goal, f"{with_over_without:.2f}", (ratio,))
    kib = ours.extra.get("rss_kib_per_conn", -1.0)
    per_conn = f"{kib:.1f}" if kib >= 0 else "-"
    return Target(
        scenario,
        "at most 3 KiB per idle connection; hello with them at least 0.9x of without",
        f"{per_conn} KiB; {with_over_without:.2f}",
        # RSS per connection is not measured when too few connections were held.
        (Bound(kib if kib >= 0 else math.nan, 3.0, " KiB", at_least=False, digits=1), ratio),
    )


def sleep_target(scenario: str, ours: Summary, rows: list[Summary], opts: Options) -> Target | None:
    if runs_with_defaults(scenario, opts):
        best = best_peer(rows)
        if best is None or not best.rps:
            return None
        goal = "with --threads at its default, at least the best peer's defaults"
        ratio = ours.rps / best.rps
        measured = f"{ratio:.2f}x {best.server} ({fmt_num(ours.rps)} vs {fmt_num(best.rps)} req/s)"
        return Target(scenario, goal, measured, (Bound(ratio, 1.0),))
    bound = opts.threads / SLEEP_APP_S
    share = ours.rps / bound
    return Target(
        scenario,
        f"within {100 * (1 - SLEEP_MIN_SHARE):.0f} % of threads / {SLEEP_APP_S} s",
        f"{share:.1%} of {bound:.0f}",
        (Bound(100 * share, 100 * SLEEP_MIN_SHARE, " %", digits=1),),
    )
