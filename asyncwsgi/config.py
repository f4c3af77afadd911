"""Config: every tunable of the server, in one frozen dataclass.

This is the single source of truth: ``asyncwsgi serve`` generates its flags from
``dataclasses.fields(Config)`` (see :mod:`asyncwsgi.cli`), and ``serve(app, **options)`` passes its
keyword arguments straight to ``Config``. Each field's ``metadata["help"]`` gives its unit and why
its default is what it is; the same text is the flag's ``--help``. Field names follow gunicorn and
uvicorn, so ``--limit-request-line`` and ``--timeout-keep-alive`` mean what they mean there.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any, Literal

from .errors import ConfigError

__all__ = ["KiB", "MiB", "Config", "BindSpec", "parse_bind"]

KiB = 1024
MiB = 1024 * KiB

LoopName = Literal["auto", "asyncio", "uvloop"]
LogLevel = Literal["critical", "error", "warning", "info", "debug", "trace"]


def _opt(default: Any, help: str, *flags: str, **extra: Any) -> Any:
    """Declare a Config field with its help text and extra CLI flag spellings."""
    metadata: dict[str, Any] = {"help": help, "flags": flags, **extra}
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
    host: str = _opt("127.0.0.1", "Bind to this host (used when no --bind/--uds/--fd is given).")
    port: int = _opt(8000, "Bind to this TCP port; 0 picks a free one.")
    bind: tuple[str, ...] = _opt(
        (),
        "Listen here; repeatable. HOST:PORT, [::1]:PORT, unix:PATH or fd://N (gunicorn's -b).",
        "-b",
        repeat=True,
    )
    uds: str | None = _opt(None, "Bind to this UNIX domain socket path.")
    uds_perms: str | None = _opt(
        None,
        "Octal file mode for UNIX sockets (--uds, unix:PATH), e.g. 660 so that only the owner "
        "and group (nginx's) can connect; default: as the umask leaves it.",
    )
    fd: int | None = _opt(None, "Serve on this already-bound listening socket file descriptor.")
    backlog: int = _opt(2048, "Listen backlog: connections the kernel queues before accept().")

    # -- the application --------------------------------------------------------------------
    factory: bool = _opt(False, "Treat APP as a factory: call it with no arguments to get the app.")
    app_dir: str = _opt(".", "Put this directory first on sys.path before importing APP.")
    root_path: str = _opt(
        "", "SCRIPT_NAME: the URL prefix the app is mounted under, stripped from PATH_INFO."
    )

    # -- concurrency ------------------------------------------------------------------------
    threads: int = _opt(
        32,
        "Worker threads that run the application (the pool grows to this on demand). Idle and "
        "slow connections hold no thread, so this bounds concurrent app calls only.",
    )
    loop: LoopName = _opt("auto", "Event loop: auto (uvloop when installed), asyncio or uvloop.")
    workers: int = _opt(
        1,
        "Worker processes, each with its own event loop and threads (gunicorn's -w; the "
        "WEB_CONCURRENCY environment variable sets it for the CLI). 1 serves in this process.",
        "-w",
    )
    max_requests: int = _opt(
        0,
        "Restart a worker process after it has served this many requests (0: never); bounds "
        "slow memory leaks in applications.",
        "--limit-max-requests",
    )
    max_requests_jitter: int = _opt(
        0, "Add up to this many requests at random to --max-requests, so workers restart apart."
    )
    reuse_port: bool = _opt(
        False,
        "Each worker binds its own socket with SO_REUSEPORT, and the kernel balances "
        "connections between them (TCP only).",
    )
    reload: bool = _opt(
        False, "Restart the server when Python files change (development; needs watchfiles)."
    )
    reload_dir: tuple[str, ...] = _opt(
        (), "Watch this directory for --reload; repeatable (default: the current one).", repeat=True
    )
    reload_include: tuple[str, ...] = _opt(
        (),
        "Glob of files whose change restarts under --reload; repeatable (default *.py).",
        repeat=True,
    )
    reload_exclude: tuple[str, ...] = _opt(
        (), "Glob of files --reload ignores; repeatable (default .*, *.py[cod], *~).", repeat=True
    )

    # -- timeouts (seconds) ------------------------------------------------------------------
    # Checked by one housekeeping sweep over the connections (about once a second, more often
    # for short timeouts), so a timeout fires up to a sweep late; no request arms a timer.
    timeout_keep_alive: float = _opt(
        5.0,
        "Seconds a connection may stay idle, with no byte of a next request, before it is closed "
        "(uvicorn's default). A new connection is idle until its first byte.",
    )
    timeout_request_header: float = _opt(
        10.0,
        "Seconds a client has to complete a request head once its first byte has arrived; then "
        "it gets 408 and the connection closes (slowloris). nginx's client_header_timeout.",
        "--header-timeout",
    )
    timeout_read: float = _opt(
        60.0,
        "Seconds a wsgi.input read waits for more request body data before raising "
        "ClientDisconnected; the client then gets 408 unless the app answers itself. nginx's "
        "client_body_timeout.",
    )
    timeout_write: float = _opt(
        60.0,
        "Seconds a response may wait for a client that reads nothing: then the app's iteration "
        "is stopped (its close() runs) and the connection is cut. nginx's send_timeout.",
    )
    timeout_request: float = _opt(
        0.0,
        "Seconds from a request's head to the start of its response; past it the client gets 504 "
        "and the connection closes, and the app's output is discarded when it comes (its close() "
        "still runs). Body upload time counts, as for gunicorn's --timeout. 0 disables.",
    )
    timeout_queue: float = _opt(
        30.0,
        "Seconds a request may wait for a free thread; one that waited longer gets 503 with "
        "Retry-After instead of running late, when its client has likely given up. 0 disables.",
    )
    timeout_linger: float = _opt(
        5.0,
        "Seconds a connection closed while its client may still be sending (a 413, a body the "
        "app did not read) keeps reading and discarding input after its response went out, so "
        "that the response is not lost to a TCP reset. nginx's lingering_timeout. 0 disables.",
    )
    timeout_graceful_shutdown: float = _opt(
        30.0,
        "Seconds in-flight requests get to finish on SIGTERM/SIGINT before connections are cut.",
        "--graceful-timeout",
    )

    # -- limits (gunicorn's names) -----------------------------------------------------------
    limit_request_line: int = _opt(
        8190, "Maximum request-line size in bytes (414 above it); 0 means 64 KiB."
    )
    limit_request_fields: int = _opt(100, "Maximum number of header fields (431 above it).")
    limit_request_field_size: int = _opt(
        8190,
        "Maximum size of one header field line in bytes (431 above it); 0 means 64 KiB.",
        "--limit-request-field_size",
    )
    limit_request_head: int = _opt(
        64 * KiB, "Maximum size of the whole request head in bytes (431 above it)."
    )
    limit_request_body: int = _opt(
        0, "Maximum request body size in bytes (413 above it); 0 means unlimited."
    )
    limit_concurrency: int = _opt(
        0,
        "Requests in progress (running or waiting for a thread) at which a new request gets an "
        "immediate 503 with Retry-After (uvicorn's name); idle keep-alive connections do not "
        "count. 0 means no limit.",
    )
    limit_max_connections: int = _opt(
        0,
        "Open connections at which the server stops accepting: new ones wait in the listen "
        "backlog until one closes (gunicorn's --worker-connections, waitress's "
        "connection_limit). 0 means no limit.",
        "--worker-connections",
    )

    # -- buffers (bytes) ----------------------------------------------------------------------
    write_high_water: int = _opt(
        256 * KiB,
        "Bytes of unsent response per connection above which the app's iteration waits for the "
        "client, and its next pipelined request is not started: a connection holds at most this "
        "plus the last block the app handed over, whatever the client pipelines.",
    )
    read_high_water: int = _opt(
        256 * KiB,
        "Bytes of request body buffered ahead of the app above which the server stops reading "
        "the socket until the app catches up.",
    )

    # -- response headers and logging --------------------------------------------------------
    server_header: bool = _opt(True, "Send a 'Server: asyncwsgi' header.")
    date_header: bool = _opt(True, "Send a 'Date' header (RFC 9110 section 6.6.1).")
    log_level: LogLevel = _opt("info", "Log level of the asyncwsgi.error logger.")
    access_log: bool = _opt(True, "Log one line per response to the asyncwsgi.access logger.")
    expose_tracebacks: bool = _opt(
        False, "Put the traceback of an application error in the 500 body (development only)."
    )
    log_config: str | None = _opt(
        None,
        "Logging configuration file, applied after the defaults: dictConfig JSON (*.json), "
        "YAML (*.yaml, *.yml; needs PyYAML) or fileConfig INI (any other name).",
    )
    access_logfile: str | None = _opt(
        None,
        "Write access lines to this file, or '-' for stdout, without the error log's prefix "
        "(gunicorn's --access-logfile). Default: stderr, with the error log.",
    )
    access_logformat: str | None = _opt(
        None,
        "Access line format with gunicorn's atoms, e.g. '%(h)s %(l)s %(u)s %(t)s \"%(r)s\" "
        '%(s)s %(b)s "%(f)s" "%(a)s" %(D)s\'. Default: the built-in line, which costs the '
        "least per request.",
    )
    access_log_json: bool = _opt(
        False,
        "Write each access line as one JSON object: the atoms of --access-logformat by name, or "
        "a fixed set of fields without it.",
    )

    # -- TLS (uvicorn's names) ------------------------------------------------------------------
    ssl_certfile: str | None = _opt(
        None, "Serve HTTPS with this certificate chain (PEM), read once at start."
    )
    ssl_keyfile: str | None = _opt(
        None, "Private key of --ssl-certfile (PEM); not needed when the certfile holds the key."
    )
    ssl_keyfile_password: str | None = _opt(None, "Password of an encrypted --ssl-keyfile.")
    ssl_ca_certs: str | None = _opt(
        None, "CA certificates (PEM) that client certificates are verified against."
    )
    ssl_cert_reqs: int = _opt(
        0,
        "Client certificates: 0 not asked for, 1 verified if sent, 2 required "
        "(ssl.CERT_NONE, CERT_OPTIONAL, CERT_REQUIRED, as uvicorn).",
    )
    ssl_ciphers: str = _opt(
        "TLSv1",
        "OpenSSL cipher list for TLS 1.2 and below (uvicorn's default; TLS 1.3 suites are "
        "OpenSSL's own).",
    )

    # -- behind a proxy or load balancer ----------------------------------------------------------
    proxy_headers: bool = _opt(
        True,
        "Take the client address, scheme, host, port and prefix from X-Forwarded-* and "
        "Forwarded (RFC 7239) headers, from trusted peers only (see --forwarded-allow-ips).",
    )
    forwarded_allow_ips: str | None = _opt(
        None,
        "Peers trusted with proxy headers and the PROXY protocol: comma-separated IP addresses "
        "and CIDR networks, or '*' for all. Unset: $FORWARDED_ALLOW_IPS, else 127.0.0.1. "
        "UNIX-socket peers are always trusted.",
    )
    forwarded_trust_headers: str = _opt(
        "x-forwarded-for,x-forwarded-proto,x-forwarded-host,x-forwarded-port,"
        "x-forwarded-prefix,forwarded",
        "The forwarding headers trusted peers may set with --proxy-headers: comma-separated "
        "field names, any case (waitress's trusted_proxy_headers). The others are removed from "
        "their requests, and all six from the requests of untrusted peers.",
    )
    proxy_protocol: bool = _opt(
        False,
        "Accept a HAProxy PROXY protocol v1 or v2 header at the start of connections from "
        "trusted peers, and take the client address from it (connections without one are "
        "served as they are).",
    )

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"port must be 0-65535, got {self.port}")
        if self.workers < 1:
            raise ConfigError(f"workers must be at least 1, got {self.workers}")
        if self.max_requests < 0 or self.max_requests_jitter < 0:
            raise ConfigError("max_requests and max_requests_jitter must not be negative")
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
        if self.fd is not None and self.fd < 0:
            raise ConfigError(f"fd must not be negative, got {self.fd}")
        for spec in self.bind:
            parse_bind(spec)
        _check_operation(self)

    @property
    def max_request_line(self) -> int:
        """The effective request-line limit in bytes (0 in the flag means 64 KiB)."""
        return self.limit_request_line or 64 * KiB

    @property
    def max_field_size(self) -> int:
        """The effective header-field-line limit in bytes (0 in the flag means 64 KiB)."""
        return self.limit_request_field_size or 64 * KiB

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

    @classmethod
    def field_names(cls) -> frozenset[str]:
        """Return the names ``serve(**options)`` accepts."""
        return frozenset(f.name for f in dataclasses.fields(cls))


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
    from .accesslog import AccessFormat
    from .proxy import TrustedPeers, parse_trust_headers

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
    if config.access_logformat is not None:
        AccessFormat(config.access_logformat, json=config.access_log_json)
