"""Config: every tunable of the server, in one frozen dataclass.

This is the single source of truth: ``asyncwsgi serve`` generates its flags from
``dataclasses.fields(Config)`` (see :mod:`asyncwsgi.cli`), and ``serve(app, **options)`` passes its
keyword arguments straight to ``Config``. Each field's metadata gives the flag's one-line
``help``, its ``group`` in ``--help``, its ``metavar`` (the unit: ``SECONDS``, ``BYTES``, ``N``)
and how its default reads; the README's flags table gives the longer explanation of each.
Field names follow gunicorn and uvicorn, so ``--limit-request-line`` and
``--timeout-keep-alive`` mean what they mean there.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Literal

from .accesslog import AccessFormat
from .errors import ConfigError
from .proxy import TrustedPeers, parse_trust_headers

__all__ = ["KiB", "MiB", "GROUPS", "Config", "BindSpec", "parse_bind"]

KiB = 1024
MiB = 1024 * KiB
#: The bound a limit set to 0 (no limit) stands for: larger than any request.

LoopName = Literal["auto", "asyncio", "uvloop"]
LogLevel = Literal["critical", "error", "warning", "info", "debug", "trace"]


#: The topics ``asyncwsgi serve --help`` groups the flags under, in this order (as gunicorn's and
#: uvicorn's documentation groups its settings).
GROUPS = (
    "Application",
    "Binding",
    "Processes",
    "Threads and timeouts",
    "Limits",
    "Logging",
    "Health and metrics",
    "TLS",
    "Proxies",
    "Development",
)


def _opt(
    default: Any,
    help: str,
    *flags: str,
    group: str | None = None,
    metavar: str | None = None,
    default_text: str | None = None,
    **extra: Any,
) -> Any:
    """Declare a Config field and its flag.

    Args:
        default: the default value (a tuple for a sequence).
        help: the flag's one-line help, lower case, without the default.
        flags: extra flag spellings (gunicorn's ``-b``).
        group: the topic of :data:`GROUPS` the flag is listed under.
        metavar: what the flag takes: ``SECONDS``, ``BYTES``, ``N``, ``PATH``, ``DIR``...
        default_text: the default as ``--help`` shows it, when ``default`` alone says too
            little (``0: no limit``).
        extra: ``repeat=True`` for a flag given more than once.
    """
    metadata: dict[str, Any] = {"help": help, "flags": flags, **extra}
    metadata.update(group=group, metavar=metavar, default_text=default_text)
    if isinstance(default, (list, dict, set)):
        raise TypeError("use a tuple for sequence defaults")
    return field(default=default, metadata=metadata)


@dataclass(frozen=True, slots=True, kw_only=True)
class Config:
    """Server settings. Immutable: derive variants with ``dataclasses.replace``.

    Raises:
        ConfigError: on construction, when a value is out of range or malformed, so that a bad
            flag is reported before anything binds.
    """

    # -- where to listen --------------------------------------------------------------------
    host: str = _opt(
        "127.0.0.1",
        "host to bind when no --bind/--uds/--fd is given",
        group="Binding",
        metavar="ADDRESS",
    )
    port: int = _opt(8000, "TCP port to bind; 0 picks a free one", group="Binding", metavar="PORT")
    bind: tuple[str, ...] = _opt(
        (),
        "HOST:PORT, [::1]:PORT, unix:PATH or fd://N; repeatable",
        "-b",
        repeat=True,
        group="Binding",
        metavar="ADDRESS",
    )
    uds: str | None = _opt(None, "bind this UNIX domain socket", group="Binding", metavar="PATH")
    uds_perms: str | None = _opt(
        None,
        "octal file mode of UNIX sockets, e.g. 660",
        group="Binding",
        metavar="MODE",
        default_text="as the umask leaves it",
    )
    fd: int | None = _opt(
        None, "serve on this inherited listening socket", group="Binding", metavar="FD"
    )
    backlog: int = _opt(2048, "listen backlog", group="Binding", metavar="N")

    # -- the application --------------------------------------------------------------------
    factory: bool = _opt(
        False, "APP is a factory: call it to get the application", group="Application"
    )
    app_dir: str = _opt(
        ".", "put this directory first on sys.path", group="Application", metavar="DIR"
    )
    root_path: str = _opt(
        "",
        "SCRIPT_NAME: URL prefix stripped from PATH_INFO",
        group="Application",
        metavar="PREFIX",
    )

    # -- concurrency ------------------------------------------------------------------------
    threads: int = _opt(
        64, "threads that run the application", group="Threads and timeouts", metavar="N"
    )
    loop: LoopName = _opt("auto", "event loop", group="Processes")
    workers: int = _opt(
        1,
        "worker processes under a supervisor",
        "-w",
        group="Processes",
        metavar="N",
        default_text="$WEB_CONCURRENCY, else none",
    )
    max_requests: int = _opt(
        0,
        "restart a worker after this many requests",
        "--limit-max-requests",
        group="Processes",
        metavar="N",
        default_text="0: never",
    )
    max_requests_jitter: int = _opt(
        0, "add up to N at random to --max-requests", group="Processes", metavar="N"
    )
    workers_max_rss: int = _opt(
        0,
        "replace a worker whose resident memory exceeds this",
        group="Processes",
        metavar="MIB",
        default_text="0: no limit",
    )
    workers_lifetime: float = _opt(
        0.0,
        "replace a worker once it has run this long",
        group="Processes",
        metavar="SECONDS",
        default_text="0: forever",
    )
    reuse_port: bool = _opt(
        False, "each worker binds its own SO_REUSEPORT socket", group="Processes"
    )
    reload: bool = _opt(False, "restart when files change; needs watchfiles", group="Development")
    reload_dir: tuple[str, ...] = _opt(
        (),
        "directory --reload watches; repeatable",
        repeat=True,
        group="Development",
        metavar="DIR",
        default_text="the current one",
    )
    reload_include: tuple[str, ...] = _opt(
        (),
        "files whose change reloads; repeatable",
        repeat=True,
        group="Development",
        metavar="GLOB",
        default_text="*.py",
    )
    reload_exclude: tuple[str, ...] = _opt(
        (),
        "files --reload ignores; repeatable",
        repeat=True,
        group="Development",
        metavar="GLOB",
        default_text=".*, *.py[cod], *~",
    )

    # -- timeouts (seconds) ------------------------------------------------------------------
    # Checked by one housekeeping sweep over the connections (about once a second, more often
    # for short timeouts), so a timeout fires up to a sweep late; no request arms a timer.
    timeout_keep_alive: float = _opt(
        5.0, "close a connection idle this long", group="Threads and timeouts", metavar="SECONDS"
    )
    timeout_request_header: float = _opt(
        10.0,
        "408 when a begun request head is not complete in time",
        "--header-timeout",
        group="Threads and timeouts",
        metavar="SECONDS",
    )
    timeout_read: float = _opt(
        60.0,
        "408 when wsgi.input waits this long for body data",
        group="Threads and timeouts",
        metavar="SECONDS",
    )
    timeout_write: float = _opt(
        60.0,
        "cut a response whose client reads nothing this long",
        group="Threads and timeouts",
        metavar="SECONDS",
    )
    timeout_request: float = _opt(
        0.0,
        "504 when the app has not started its response in time",
        group="Threads and timeouts",
        metavar="SECONDS",
        default_text="0: off",
    )
    timeout_queue: float = _opt(
        30.0,
        "503 for a request that waited this long for a thread",
        group="Threads and timeouts",
        metavar="SECONDS",
    )
    timeout_linger: float = _opt(
        5.0,
        "read and discard input this long after closing",
        group="Threads and timeouts",
        metavar="SECONDS",
    )
    timeout_graceful_shutdown: float = _opt(
        30.0,
        "time in-flight requests get on SIGTERM",
        "--graceful-timeout",
        group="Threads and timeouts",
        metavar="SECONDS",
    )
    shutdown_delay: float = _opt(
        0.0,
        "on SIGTERM, serve this long with the health check failing first",
        group="Health and metrics",
        metavar="SECONDS",
    )
    health_path: str | None = _opt(
        None,
        "answer this path on the loop: 200 ok, 503 once not serving",
        group="Health and metrics",
        metavar="PATH",
        default_text="off",
    )
    timeout_worker_healthcheck: float = _opt(
        30.0,
        "abort a worker whose event loop is silent this long",
        "--timeout",
        group="Processes",
        metavar="SECONDS",
        default_text="30; 0: off",
    )

    # -- limits (gunicorn's names; 0 is no limit, as in gunicorn) ------------------------------
    limit_request_line: int = _opt(
        8190, "414 above this request line; 0: no limit", group="Limits", metavar="BYTES"
    )
    limit_request_fields: int = _opt(
        100, "431 above this many header fields; 0: no limit", group="Limits", metavar="N"
    )
    limit_request_field_size: int = _opt(
        8190,
        "431 above this header field line; 0: no limit",
        "--limit-request-field_size",
        group="Limits",
        metavar="BYTES",
    )
    limit_request_head: int = _opt(
        64 * KiB, "431 above this whole request head; 0: no limit", group="Limits", metavar="BYTES"
    )
    limit_request_body: int = _opt(
        0,
        "413 above this request body",
        group="Limits",
        metavar="BYTES",
        default_text="0: no limit",
    )
    limit_concurrency: int = _opt(
        0,
        "503 at once beyond this many requests in progress",
        group="Limits",
        metavar="N",
        default_text="0: no limit",
    )
    limit_max_connections: int = _opt(
        0,
        "stop accepting at this many open connections",
        "--worker-connections",
        group="Limits",
        metavar="N",
        default_text="0: no limit",
    )

    # -- buffers (bytes) ----------------------------------------------------------------------
    write_high_water: int = _opt(
        256 * KiB, "unsent response that pauses the app", group="Limits", metavar="BYTES"
    )
    read_high_water: int = _opt(
        256 * KiB, "unread request body that pauses reading", group="Limits", metavar="BYTES"
    )

    # -- response headers and logging --------------------------------------------------------
    server_header: bool = _opt(True, "send 'Server: asyncwsgi'", group="Application")
    date_header: bool = _opt(True, "send a Date header", group="Application")
    log_level: LogLevel = _opt("info", "level of the asyncwsgi loggers", group="Logging")
    access_log: bool = _opt(True, "one access line per response", group="Logging")
    expose_tracebacks: bool = _opt(
        False, "tracebacks in 500 bodies; never in production", group="Development"
    )
    log_config: str | None = _opt(
        None,
        "logging config file: JSON, YAML or INI; replaces ours",
        group="Logging",
        metavar="PATH",
    )
    access_logfile: str | None = _opt(
        None,
        "access lines to this file, '-' for stdout",
        group="Logging",
        metavar="PATH",
        default_text="stderr",
    )
    access_logformat: str | None = _opt(
        None,
        "access line of gunicorn's atoms, see below",
        group="Logging",
        metavar="FORMAT",
        default_text="the built-in line",
    )
    access_log_json: bool = _opt(False, "one JSON object per access line", group="Logging")
    metrics_bind: str | None = _opt(
        None,
        "serve Prometheus metrics at http://HOST:PORT/metrics",
        group="Health and metrics",
        metavar="ADDRESS",
        default_text="off",
    )

    # -- TLS (uvicorn's names) ------------------------------------------------------------------
    ssl_certfile: str | None = _opt(
        None, "serve HTTPS with this PEM certificate chain", group="TLS", metavar="PATH"
    )
    ssl_keyfile: str | None = _opt(
        None, "PEM private key of --ssl-certfile", group="TLS", metavar="PATH"
    )
    ssl_keyfile_password: str | None = _opt(
        None, "password of an encrypted --ssl-keyfile", group="TLS", metavar="PASSWORD"
    )
    ssl_ca_certs: str | None = _opt(
        None, "PEM CA certificates for client certificates", group="TLS", metavar="PATH"
    )
    ssl_cert_reqs: int = _opt(
        0,
        "client certificates: 0 none, 1 optional, 2 required",
        group="TLS",
        metavar="{0,1,2}",
    )
    ssl_ciphers: str = _opt(
        "TLSv1", "OpenSSL cipher list for TLS 1.2 and below", group="TLS", metavar="CIPHERS"
    )

    # -- behind a proxy or load balancer ----------------------------------------------------------
    proxy_headers: bool = _opt(
        True, "trust X-Forwarded-*/Forwarded from trusted peers", group="Proxies"
    )
    forwarded_allow_ips: str | None = _opt(
        None,
        "trusted IPs, CIDRs or *; also $FORWARDED_ALLOW_IPS",
        group="Proxies",
        metavar="IPS",
        default_text="127.0.0.1",
    )
    forwarded_trust_headers: str = _opt(
        "x-forwarded-for,x-forwarded-proto,x-forwarded-host,x-forwarded-port,"
        "x-forwarded-prefix,forwarded",
        "forwarding headers to trust; the others are removed",
        group="Proxies",
        metavar="NAMES",
        default_text="all six",
    )
    proxy_protocol: bool = _opt(
        False, "read a PROXY protocol v1/v2 header from trusted peers", group="Proxies"
    )

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"port must be 0-65535, got {self.port}")
        if self.workers < 1:
            raise ConfigError(f"workers must be at least 1, got {self.workers}")
        if self.max_requests < 0 or self.max_requests_jitter < 0:
            raise ConfigError("max_requests and max_requests_jitter must not be negative")
        if self.workers_max_rss < 0 or self.workers_lifetime < 0:
            raise ConfigError("workers_max_rss and workers_lifetime must not be negative")
        if self.threads < 1:
            raise ConfigError(f"threads must be at least 1, got {self.threads}")
        if self.backlog < 1:
            raise ConfigError(f"backlog must be at least 1, got {self.backlog}")
        if self.loop not in ("auto", "asyncio", "uvloop"):
            raise ConfigError(f"loop must be auto, asyncio or uvloop, got {self.loop!r}")
        if self.log_level not in ("critical", "error", "warning", "info", "debug", "trace"):
            raise ConfigError(f"unknown log level {self.log_level!r}")
        if self.root_path and (not self.root_path.startswith("/") or self.root_path.endswith("/")):
            raise ConfigError(f"root_path must start and not end with '/', got {self.root_path!r}")
        for name in (
            "timeout_keep_alive",
            "timeout_request_header",
            "timeout_read",
            "timeout_write",
            "timeout_request",
            "timeout_queue",
            "timeout_linger",
            "timeout_graceful_shutdown",
            "timeout_worker_healthcheck",
            "shutdown_delay",
            "limit_request_line",
            "limit_request_fields",
            "limit_request_field_size",
            "limit_request_head",
            "limit_request_body",
            "limit_concurrency",
            "limit_max_connections",
        ):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must not be negative")
        for name in ("write_high_water", "read_high_water"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1 byte")
        if self.uds_perms is not None:
            try:
                mode = int(self.uds_perms, 8)
            except ValueError:
                mode = -1
            if not 0 <= mode <= 0o777:
                raise ConfigError(
                    f"uds_perms must be an octal mode such as 660, got {self.uds_perms!r}"
                )
        if self.health_path is not None and not self.health_path.startswith("/"):
            raise ConfigError(f"health_path must start with '/', got {self.health_path!r}")
        if self.fd is not None and self.fd < 0:
            raise ConfigError(f"fd must not be negative, got {self.fd}")
        for spec in self.bind:
            parse_bind(spec)
        _check_operation(self)

    def listen_specs(self) -> list[BindSpec]:
        """Return where to listen: ``bind``, ``uds`` and ``fd`` together; else the sockets
        systemd passed (socket activation); else ``host:port``."""
        specs = [parse_bind(spec) for spec in self.bind]
        if self.uds:
            specs.append(BindSpec(kind="unix", path=self.uds))
        if self.fd is not None:
            specs.append(BindSpec(kind="fd", fd=self.fd))
        if not specs:
            specs = [BindSpec(kind="fd", fd=fd) for fd in systemd_listen_fds()]
        if not specs:
            specs.append(BindSpec(kind="tcp", host=self.host, port=self.port))
        return specs


@dataclass(frozen=True, slots=True)
class BindSpec:
    """One place to listen: ``kind`` is ``tcp`` (host, port), ``unix`` (path) or ``fd`` (fd)."""

    kind: Literal["tcp", "unix", "fd"]
    host: str = ""
    port: int = 0
    path: str = ""
    fd: int = -1


def systemd_listen_fds() -> list[int]:
    """Return the listening sockets systemd passed to this process, as sd_listen_fds(3) does.

    systemd socket activation sets ``LISTEN_PID`` to the started process's pid and
    ``LISTEN_FDS`` to how many sockets it passed, as file descriptors 3, 4, ... The sockets are
    used only when ``LISTEN_PID`` is this process, so a child that inherits the variables does
    not take them for its own.
    """
    if os.environ.get("LISTEN_PID") != str(os.getpid()):
        return []
    count = os.environ.get("LISTEN_FDS", "")
    if not count.isdigit():
        return []
    return list(range(3, 3 + int(count)))


def parse_bind(spec: str) -> BindSpec:
    """Parse a gunicorn-style bind address.

    Args:
        spec: ``HOST:PORT``, ``HOST`` (port 8000), ``[::1]:PORT``, ``unix:PATH`` or ``fd://N``.

    Raises:
        ConfigError: when the address cannot be parsed or the port is out of range.
    """
    if spec.startswith("unix:"):
        path = spec[5:]
        if not path:
            raise ConfigError(f"empty UNIX socket path in bind {spec!r}")
        return BindSpec(kind="unix", path=path)
    if spec.startswith("fd://"):
        try:
            fd = int(spec[5:])
        except ValueError:
            raise ConfigError(f"bad file descriptor in bind {spec!r}") from None
        if fd < 0:
            raise ConfigError(f"negative file descriptor in bind {spec!r}")
        return BindSpec(kind="fd", fd=fd)
    host, port_text = spec, "8000"
    if spec.startswith("["):
        end = spec.find("]")
        if end < 0:
            raise ConfigError(f"unclosed '[' in bind {spec!r}")
        host, rest = spec[1:end], spec[end + 1 :]
        if rest:
            if not rest.startswith(":"):
                raise ConfigError(f"bad bind {spec!r}")
            port_text = rest[1:]
    elif ":" in spec:
        host, _, port_text = spec.rpartition(":")
        if ":" in host:
            raise ConfigError(f"an IPv6 address needs brackets, as [::1]:8000, in bind {spec!r}")
    try:
        port = int(port_text)
    except ValueError:
        raise ConfigError(f"bad port in bind {spec!r}") from None
    if not 0 <= port <= 65535:
        raise ConfigError(f"port out of range in bind {spec!r}")
    return BindSpec(kind="tcp", host=host or "0.0.0.0", port=port)


def _check_operation(config: Config) -> None:
    """Check the TLS, proxy and logging settings; resolve ``forwarded_allow_ips``.

    Raises:
        ConfigError: a value is out of range, malformed, or needs a setting that is missing.
    """
    if config.ssl_cert_reqs not in (0, 1, 2):
        raise ConfigError(f"ssl_cert_reqs must be 0, 1 or 2, got {config.ssl_cert_reqs}")
    if not config.ssl_certfile:
        for name in ("ssl_keyfile", "ssl_keyfile_password", "ssl_ca_certs"):
            if getattr(config, name):
                raise ConfigError(f"{name} needs ssl_certfile")
        if config.ssl_cert_reqs:
            raise ConfigError("ssl_cert_reqs needs ssl_certfile")
    if config.forwarded_allow_ips is None:
        object.__setattr__(
            config, "forwarded_allow_ips", os.environ.get("FORWARDED_ALLOW_IPS", "127.0.0.1")
        )
    assert config.forwarded_allow_ips is not None
    TrustedPeers(config.forwarded_allow_ips)
    parse_trust_headers(config.forwarded_trust_headers)
    if config.metrics_bind is not None and parse_bind(config.metrics_bind).kind != "tcp":
        raise ConfigError(f"metrics_bind must be HOST:PORT, got {config.metrics_bind!r}")
    if config.access_logformat is not None:
        AccessFormat(config.access_logformat, json=config.access_log_json)
