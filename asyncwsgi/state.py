"""ServerState: what every connection of one server shares. Loop thread only."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

from .accesslog import AccessFormat
from .bridge import split_high_water
from .config import Config
from .connstate import TimedConnection, TimeoutPolicy
from .logs import LogThrottle
from .metrics import Recorder
from .proxy import ProxySupport
from .strict import RequestLimits

if TYPE_CHECKING:
    from ._types import WSGIApplication
    from .connstate import RequestCycle
    from .filewrapper import FileWrapper
    from .sendfile import FileSender

__all__ = ["Channel", "Pool", "ServerState", "request_limits"]


def request_limits(config: Config) -> RequestLimits:
    """The ``limit_request_*`` settings as the HTTP/1.1 layer takes them (0: no limit)."""
    return RequestLimits.of(
        config.limit_request_line,
        config.limit_request_fields,
        config.limit_request_field_size,
        config.limit_request_head,
        config.limit_request_body,
    )


class Pool(Protocol):
    """What the connections need of the thread pool (:class:`asyncwsgi.pool.ThreadPool`)."""

    def submit(self, fn: Callable[..., object], *args: Any) -> None: ...

    @property
    def stuck(self) -> int: ...

    def mark_stuck(self, ident: int) -> str | None: ...


class Channel(TimedConnection, Protocol):
    """What the server and the response side (:mod:`asyncwsgi.response`) use of a connection:
    the interface :class:`~asyncwsgi.channel.HTTPChannel` implements, so that neither imports
    the channel. Loop thread only."""

    server: ServerState
    config: Config
    loop: asyncio.AbstractEventLoop

    @property
    def closing(self) -> bool: ...
    @property
    def in_flight(self) -> bool: ...
    @property
    def idle_after_response(self) -> bool: ...
    def check_timeouts(self, now: float, perf_now: float) -> None: ...
    def on_file_sent(self, sender: FileSender, error: OSError | None) -> None: ...
    def _write(self, data: bytes) -> None: ...
    def _request_line(self, cycle: RequestCycle) -> str: ...
    def _answer(self, cycle: RequestCycle, status: int, *extra: tuple[bytes, bytes]) -> None: ...
    def _close_in_pool(self, wrapper: FileWrapper) -> None: ...
    def _end_file_response(self, cycle: RequestCycle) -> None: ...
    def _end_response(self, cycle: RequestCycle, tail: bytes | None) -> None: ...
    def _finish_cycle(self, cycle: RequestCycle, keep_alive: bool) -> None: ...
    def _close_after_response(self) -> None: ...
    def _linger(self) -> None: ...


class ServerState:
    """What every connection of one server shares. Loop thread only.

    Attributes:
        config: the server's configuration.
        app: the WSGI application.
        pool: the pool threads that run the application (anything with ``submit(fn, *args)``).
        channels: the open connections.
        date_header: the current ``(b"date", ...)`` pair, refreshed every second by the server,
            or None when ``config.date_header`` is off.
        server_header: the ``(b"Server", b"asyncwsgi")`` pair, or None.
        shutting_down: set when a graceful shutdown has begun (no new keep-alive cycles).
        draining: set during ``--shutdown-delay``; see :attr:`healthy`.
        multiprocess: ``wsgi.multiprocess``.
        requests_active: requests handed to the pool whose response has not ended (running or
            waiting for a thread), for ``--limit-concurrency``.
        on_connections_full: called when ``--limit-max-connections`` connections are open
            (the server stops accepting); ``on_connections_room`` when one of them closed.
        overload_log: throttles the warnings about overload.
        clock: the clock of the connections' timeouts, in seconds (the loop's ``time``; a test
            passes its own).
        limits: the request limits, from ``limit_request_*``.
        timeouts: the timeout of each connection state, from ``timeout_*``.
    """

    def __init__(
        self,
        config: Config,
        app: WSGIApplication,
        pool: Pool,
        multiprocess: bool = False,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self.clock = clock
        self.limits = request_limits(config)
        self.timeouts = TimeoutPolicy(config)
        self.app = app
        self.pool = pool
        self.channels: set[Channel] = set()
        self.date_header: tuple[bytes, bytes] | None = None
        self.server_header: tuple[bytes, bytes] | None = (
            (b"Server", b"asyncwsgi") if config.server_header else None
        )
        self.shutting_down = False
        self.multiprocess = multiprocess
        #: The environ keys shared by every connection of a listener, by (address, scheme).
        self.base_environs: dict[tuple[tuple[str, int], str], dict[str, Any]] = {}
        self.requests_active = 0
        self.on_connections_full: Callable[[], None] | None = None
        self.on_connections_room: Callable[[], None] | None = None
        self.overload_log = LogThrottle()
        #: Responses completed, for ``--max-requests``.
        self.requests_done = 0
        #: ``--max-requests`` for this process (0: none), and what to call when it is reached.
        self.max_requests = 0
        self.on_max_requests: Callable[[], None] | None = None
        #: Called when ``--threads`` threads are stuck at once (``--timeout-request``).
        self.on_threads_stuck: Callable[[], None] | None = None
        self.idle_changed: asyncio.Event | None = None
        #: ``--write-high-water`` split between each transport and its sink, in bytes.
        self.transport_high_water, self.sink_high_water = split_high_water(config.write_high_water)
        #: ``--health-path`` as a request-target, or None.
        self.health_target = (
            config.health_path.encode("latin-1") if config.health_path is not None else None
        )
        #: Set on SIGTERM during ``--shutdown-delay``: serving, but the health check fails.
        self.draining = False
        #: Forwarded headers and the PROXY protocol (asyncwsgi.proxy).
        self.proxy = ProxySupport(config)
        #: The compiled --access-logformat / --access-log-json, or None for the built-in line.
        self.access_format = (
            AccessFormat(config.access_logformat, json=config.access_log_json)
            if config.access_logformat is not None or config.access_log_json
            else None
        )
        self.refresh_date()
        #: ``--metrics-bind``: the counters of asyncwsgi.metrics, or None.
        self.metrics = Recorder(self) if config.metrics_bind else None

    def count_request(self) -> None:
        """A request was accepted; the one that reaches ``max_requests`` (counting those done
        and those in flight) is the last: every response from now on carries
        ``Connection: close``, and ``on_max_requests`` stops the server from accepting."""
        limit = self.max_requests
        if limit and not self.shutting_down and self.requests_done + self.requests_active >= limit:
            self.shutting_down = True
            if self.on_max_requests is not None:
                self.on_max_requests()

    @property
    def healthy(self) -> bool:
        """What ``--health-path`` says: serving, not shutting down, draining or recycling, and
        fewer than ``--threads`` threads stuck."""
        return (
            not self.shutting_down and not self.draining and self.pool.stuck < self.config.threads
        )

    def refresh_date(self) -> None:
        """Recompute the Date header (RFC 9110 section 5.6.7 IMF-fixdate), at most once a second."""
        if self.config.date_header:
            now = time.time()
            self.date_header = (
                b"Date",
                time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(now)).encode("ascii"),
            )
