"""The workloads: which app each scenario serves, and whether wrk alone or wrk beside the idle
or slowloris clients drives it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from .constants import MiB

#: How long the sleep app blocks, in seconds (``apps.SLEEP_S``): the base of its bound.
SLEEP_APP_S = 0.05

ScenarioKind = Literal["wrk", "idle", "slowloris"]


@dataclass(frozen=True)
class Scenario:
    """One workload: which app, how wrk drives it, and what it shows."""

    name: str
    app: str
    description: str
    kind: ScenarioKind = "wrk"
    close: bool = False
    post_bytes: int | None = None
    #: Every server runs with its own default settings here, as ``--defaults`` does for a run.
    defaults: bool = False


SCENARIOS: dict[str, Scenario] = {
    s.name: s
    for s in (
        Scenario("hello", "hello", "13-byte body on keep-alive connections: per-request overhead"),
        Scenario(
            "hello-close",
            "hello",
            "13-byte body with `Connection: close`: one TCP connection per request",
            close=True,
        ),
        Scenario("body64k", "body64k", "one 64 KiB chunk with Content-Length"),
        Scenario("body1m", "body1m", "one 1 MiB chunk with Content-Length"),
        Scenario("stream", "stream", "generator of 64 x 16 KiB chunks, no Content-Length"),
        Scenario("file", "file", "10 MiB file through wsgi.file_wrapper (sendfile if supported)"),
        Scenario("echo", "echo", "1 MiB POST body read from wsgi.input", post_bytes=MiB),
        Scenario("sleep", "sleep", "app blocks 50 ms: bounded by the thread pool"),
        Scenario(
            "sleep-defaults",
            "sleep",
            "app blocks 50 ms, every server with its own defaults (threads, backlog, keep-alive)",
            defaults=True,
        ),
        Scenario("flask", "flask", "a Flask view returning a small JSON"),
        Scenario("django", "django", "a minimal Django view (HttpResponse)"),
        Scenario(
            "idle",
            "hello",
            "10,000 idle keep-alive connections: memory per connection, hello req/s beside them",
            kind="idle",
        ),
        Scenario(
            "slowloris",
            "hello",
            "1,000 clients sending their request head at 1 byte/s: hello req/s beside them",
            kind="slowloris",
        ),
    )
}

QUICK_SCENARIOS = ("hello", "stream", "file")
