#!/usr/bin/env python3
"""Micro-benchmark of the sans-IO HTTP/1.1 layer: one keep-alive request/response cycle.

    python benchmarks/bench_http11.py [--iterations 50000] [--repeat 5] [--json FILE]

Each cycle feeds a typical browser-like GET (8 headers) to the server side of the connection,
pulls the Request and EndOfMessage events, serialises a 200 response with 3 headers and a
13-byte body, ends it and starts the next cycle, as a keep-alive connection does. The time per
cycle (µs) is measured with ``time.perf_counter_ns`` over many iterations; the best of
``--repeat`` runs is reported, with the median beside it.

Implementations measured:

- ``h11``: raw ``h11.Connection(h11.SERVER)``, the floor that asyncwsgi builds on;
- ``asyncwsgi``: ``asyncwsgi.http11.ServerConnection`` (when it can be imported), which adds
  the strictness checks, limits and Date/Server headers on top of h11.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import importlib.metadata
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import h11

H11_VERSION = importlib.metadata.version("h11")

REQUEST = (
    b"GET /api/items?page=2&sort=name HTTP/1.1\r\n"
    b"Host: example.com\r\n"
    b"User-Agent: Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0\r\n"
    b"Accept: text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8\r\n"
    b"Accept-Language: en-US,en;q=0.5\r\n"
    b"Accept-Encoding: gzip, deflate, br\r\n"
    b"Connection: keep-alive\r\n"
    b"Cookie: sessionid=0123456789abcdef; csrftoken=fedcba9876543210\r\n"
    b"Cache-Control: max-age=0\r\n"
    b"\r\n"
)
BODY = b"Hello, world!"
RESPONSE_HEADERS = [
    (b"Content-Type", b"text/plain; charset=utf-8"),
    (b"Content-Length", str(len(BODY)).encode()),
    (b"Cache-Control", b"no-store"),
]

Cycle = Callable[[], int]


def make_h11_cycle() -> Cycle:
    """One keep-alive cycle on a raw h11 server connection; returns bytes produced."""
    conn = h11.Connection(h11.SERVER)

    def cycle() -> int:
        conn.receive_data(REQUEST)
        request = conn.next_event()
        if type(request) is not h11.Request:
            raise RuntimeError(f"expected a Request, got {request!r}")
        end = conn.next_event()
        if type(end) is not h11.EndOfMessage:
            raise RuntimeError(f"expected EndOfMessage, got {end!r}")
        head = conn.send(h11.Response(status_code=200, headers=RESPONSE_HEADERS, reason=b"OK"))
        body = conn.send(h11.Data(data=BODY))
        tail = conn.send(h11.EndOfMessage())
        conn.start_next_cycle()
        return len(head or b"") + len(body or b"") + len(tail or b"")

    return cycle


def make_asyncwsgi_cycle() -> Cycle:
    """The same cycle on ``asyncwsgi.http11.ServerConnection``.

    Raises:
        ImportError: asyncwsgi (or its sans-IO module) is not importable here.
    """
    http11: Any = importlib.import_module("asyncwsgi.http11")
    state: Any = importlib.import_module("asyncwsgi.state")
    config_module: Any = importlib.import_module("asyncwsgi.config")
    limits = state.request_limits(config_module.Config())
    conn = http11.ServerConnection(limits, (b"server", b"asyncwsgi"))
    date_header = (b"date", b"Mon, 01 Jan 2024 00:00:00 GMT")

    def cycle() -> int:
        events = conn.receive_data(REQUEST)
        if len(events) != 2 or type(events[0]).__name__ != "Request":
            raise RuntimeError(f"expected Request + EndOfMessage, got {events!r}")
        head = conn.send_response(200, b"OK", list(RESPONSE_HEADERS), date_header)
        body = conn.send_data(BODY)
        tail = conn.send_end()
        conn.start_next_cycle()
        return len(head) + sum(len(piece) for piece in body) + len(tail or b"")

    return cycle


IMPLEMENTATIONS: dict[str, Callable[[], Cycle]] = {
    "h11": make_h11_cycle,
    "asyncwsgi": make_asyncwsgi_cycle,
}


@dataclass
class Result:
    """Per-cycle time of one implementation."""

    name: str
    ok: bool
    error: str = ""
    best_us: float = 0.0
    median_us: float = 0.0
    cycles_per_s: float = 0.0
    wire_bytes: int = 0


def time_cycles(cycle: Cycle, iterations: int) -> float:
    """Run ``cycle`` ``iterations`` times and return µs per cycle (GC off while timing)."""
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        start = time.perf_counter_ns()
        for _ in range(iterations):
            cycle()
        elapsed = time.perf_counter_ns() - start
    finally:
        if gc_was_enabled:
            gc.enable()
    return elapsed / iterations / 1000


def bench(name: str, factory: Callable[[], Cycle], iterations: int, repeat: int) -> Result:
    try:
        cycle = factory()
        wire_bytes = cycle()  # checks the cycle works once before timing it
        time_cycles(cycle, max(iterations // 10, 100))  # warm-up
        samples = [time_cycles(cycle, iterations) for _ in range(repeat)]
    except Exception as exc:  # a broken implementation is reported, not fatal
        return Result(name, ok=False, error=f"{type(exc).__name__}: {exc}")
    best = min(samples)
    return Result(
        name,
        ok=True,
        best_us=best,
        median_us=statistics.median(samples),
        cycles_per_s=1e6 / best,
        wire_bytes=wire_bytes,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=50_000, help="cycles per timing run")
    parser.add_argument("--repeat", type=int, default=5, help="timing runs per implementation")
    parser.add_argument("--json", type=Path, help="also write the results to this file")
    args = parser.parse_args(argv)

    results = [
        bench(name, factory, args.iterations, args.repeat)
        for name, factory in IMPLEMENTATIONS.items()
    ]
    baseline = next((r for r in results if r.name == "h11" and r.ok), None)
    print(
        f"Python {platform.python_version()}, h11 {H11_VERSION}, "
        f"{args.iterations:,} cycles x {args.repeat}: parse GET (8 headers) + 200 (3 headers)"
    )
    print(f"{'implementation':<12} {'best µs':>9} {'median µs':>10} {'cycles/s':>10} {'vs h11':>7}")
    for r in results:
        if not r.ok:
            print(f"{r.name:<12} not measured: {r.error}")
            continue
        ratio = f"{r.best_us / baseline.best_us:.2f}x" if baseline else "-"
        print(
            f"{r.name:<12} {r.best_us:>9.2f} {r.median_us:>10.2f} "
            f"{r.cycles_per_s:>10,.0f} {ratio:>7}"
        )
    if args.json:
        payload = {
            "python": platform.python_version(),
            "h11": H11_VERSION,
            "results": [asdict(r) for r in results],
        }
        args.json.write_text(json.dumps(payload, indent=2) + "\n")
    return 0 if baseline else 1


if __name__ == "__main__":
    sys.exit(main())
