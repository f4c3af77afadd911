"""The rounds of one server x scenario, reduced to medians."""

from __future__ import annotations

import statistics
from dataclasses import dataclass

from .runner import RunResult


@dataclass
class Summary:
    """The rounds of one server x scenario, reduced to medians."""

    server: str
    ok_runs: int
    failed: str | None
    rps: float
    rps_min: float
    rps_max: float
    p50_ms: float
    p99_ms: float
    p999_ms: float
    errors: int
    socket_errors: int
    bad_responses: int
    rss_mib: float
    cpu_ms_per_req: float
    threads: float
    wrk_cpu_pct: float
    noise_pct: float
    extra: dict[str, float]

    def errors_text(self) -> str:
        """Total errors, split as ``socket/bad responses`` when there are any."""
        if not self.errors:
            return "0"
        return f"{self.errors} ({self.socket_errors}/{self.bad_responses})"


def summarise(server: str, runs: list[RunResult]) -> Summary:
    ok = [r for r in runs if r.ok]
    failures = [r.error or "failed" for r in runs if not r.ok]
    if not ok:
        return Summary(
            server=server,
            ok_runs=0,
            failed=failures[0] if failures else "not run",
            rps=0.0,
            rps_min=0.0,
            rps_max=0.0,
            p50_ms=0.0,
            p99_ms=0.0,
            p999_ms=0.0,
            errors=0,
            socket_errors=0,
            bad_responses=0,
            rss_mib=0.0,
            cpu_ms_per_req=0.0,
            threads=0.0,
            wrk_cpu_pct=0.0,
            noise_pct=0.0,
            extra={},
        )

    def med(values: list[float]) -> float:
        return float(statistics.median(values))

    extra_keys = sorted({key for r in ok for key in r.extra})
    rps = [r.rps for r in ok]
    return Summary(
        server=server,
        ok_runs=len(ok),
        failed=failures[0] if failures else None,
        rps=med(rps),
        rps_min=min(rps),
        rps_max=max(rps),
        p50_ms=med([r.p50_ms for r in ok]),
        p99_ms=med([r.p99_ms for r in ok]),
        p999_ms=med([r.p999_ms for r in ok]),
        errors=sum(r.errors for r in ok),
        socket_errors=sum(r.socket_errors for r in ok),
        bad_responses=sum(r.bad_responses for r in ok),
        rss_mib=med([r.rss_mib for r in ok]),
        cpu_ms_per_req=med([r.cpu_ms_per_req for r in ok]),
        threads=med([float(r.threads) for r in ok]),
        wrk_cpu_pct=med([r.wrk_cpu_pct for r in ok]),
        noise_pct=max(r.noise_pct for r in ok),
        extra={key: med([r.extra[key] for r in ok if key in r.extra]) for key in extra_keys},
    )


def fmt_num(value: float, digits: int = 0) -> str:
    """``value`` with thousands separators: ``6,043``."""
    return f"{value:,.{digits}f}"


def fmt_ms(value: float) -> str:
    """A latency in ms: two decimals below 100 ms, none above."""
    return f"{value:.2f}" if value < 100 else f"{value:.0f}"
