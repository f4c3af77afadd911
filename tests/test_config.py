"""Tests of :mod:`asyncwsgi.config`: defaults, validation, bind addresses, immutability, and
what a limit of 0 means to a server over real sockets."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from asyncwsgi.config import BindSpec, Config, KiB, MiB, parse_bind
from asyncwsgi.errors import AsyncWSGIError, ConfigError
from asyncwsgi.state import request_limits
from asyncwsgi.strict import UNLIMITED, RequestLimits

from . import apps
from .helpers import decode_replies, exchange, running

DEFAULTS: dict[str, Any] = {
    "host": "127.0.0.1",
    "port": 8000,
    "bind": (),
    "uds": None,
    "uds_perms": None,
    "fd": None,
    "backlog": 2048,
    "factory": False,
    "app_dir": ".",
    "root_path": "",
    "threads": 64,
    "loop": "auto",
    "workers": 1,
    "max_requests": 0,
    "max_requests_jitter": 0,
    "workers_max_rss": 0,
    "workers_lifetime": 0.0,
    "reuse_port": False,
    "reload": False,
    "reload_dir": (),
    "reload_include": (),
    "reload_exclude": (),
    "timeout_keep_alive": 5.0,
    "timeout_request_header": 10.0,
    "timeout_read": 60.0,
    "timeout_write": 60.0,
    "timeout_request": 0.0,
    "timeout_queue": 30.0,
    "timeout_linger": 5.0,
    "timeout_graceful_shutdown": 30.0,
    "timeout_worker_healthcheck": 30.0,
    "shutdown_delay": 0.0,
    "health_path": None,
    "limit_request_line": 8190,
    "limit_request_fields": 100,
    "limit_request_field_size": 8190,
    "limit_request_head": 64 * KiB,
    "limit_request_body": 0,
    "limit_concurrency": 0,
    "limit_max_connections": 0,
    "write_high_water": 256 * KiB,
    "read_high_water": 256 * KiB,
    "server_header": True,
    "date_header": True,
    "log_level": "info",
    "access_log": True,
    "expose_tracebacks": False,
    "log_config": None,
    "access_logfile": None,
    "access_logformat": None,
    "access_log_json": False,
    "metrics_bind": None,
    "ssl_certfile": None,
    "ssl_keyfile": None,
    "ssl_keyfile_password": None,
    "ssl_ca_certs": None,
    "ssl_cert_reqs": 0,
    "ssl_ciphers": "TLSv1",
    "proxy_headers": True,
    "forwarded_allow_ips": "127.0.0.1",
    "forwarded_trust_headers": (
        "x-forwarded-for,x-forwarded-proto,x-forwarded-host,x-forwarded-port,"
        "x-forwarded-prefix,forwarded"
    ),
    "proxy_protocol": False,
}


def test_units() -> None:
    assert KiB == 1024
    assert MiB == 1024 * 1024


def test_defaults() -> None:
    config = Config()
    assert {name: getattr(config, name) for name in DEFAULTS} == DEFAULTS
    assert {field.name for field in dataclasses.fields(Config)} == set(DEFAULTS)


def test_every_field_has_help() -> None:
    for field in dataclasses.fields(Config):
        assert field.metadata.get("help"), field.name


def test_keyword_only() -> None:
    with pytest.raises(TypeError):
        Config("0.0.0.0")  # type: ignore[call-arg]


def test_frozen() -> None:
    config = Config()
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.port = 9000  # type: ignore[misc]
    with pytest.raises((AttributeError, TypeError)):
        config.not_a_field = 1  # type: ignore[attr-defined]
    assert config.port == 8000


def test_replace_gives_a_new_validated_config() -> None:
    config = Config()
    changed = dataclasses.replace(config, port=9000, threads=4)
    assert (changed.port, changed.threads) == (9000, 4)
    assert config.port == 8000
    with pytest.raises(ConfigError):
        dataclasses.replace(config, port=-1)


def test_config_error_is_a_value_error() -> None:
    assert issubclass(ConfigError, ValueError)
    assert issubclass(ConfigError, AsyncWSGIError)


@pytest.mark.parametrize(
    "options",
    [
        {"port": -1},
        {"port": 65536},
        {"threads": 0},
        {"threads": -4},
        {"backlog": 0},
        {"loop": "trio"},
        {"log_level": "verbose"},
        {"log_level": "INFO"},
        {"root_path": "app"},
        {"root_path": "/app/"},
        {"root_path": "/"},
        {"timeout_keep_alive": -1.0},
        {"timeout_graceful_shutdown": -0.5},
        {"timeout_write": -1},
        {"timeout_request_header": -1},
        {"timeout_read": -1},
        {"timeout_request": -1},
        {"timeout_queue": -1},
        {"timeout_linger": -1},
        {"limit_concurrency": -1},
        {"limit_max_connections": -1},
        {"limit_request_line": -1},
        {"limit_request_fields": -1},
        {"limit_request_field_size": -1},
        {"limit_request_head": -1},
        {"limit_request_body": -1},
        {"write_high_water": 0},
        {"read_high_water": 0},
        {"bind": ("127.0.0.1:notaport",)},
        {"bind": ("0.0.0.0:8000", "unix:")},
        {"bind": ("[::1",)},
    ],
    ids=lambda options: ",".join(f"{k}={v!r}" for k, v in options.items()),
)
def test_bad_values_raise_config_error(options: dict[str, Any]) -> None:
    with pytest.raises(ConfigError):
        Config(**options)


@pytest.mark.parametrize(
    "options",
    [
        {"port": 0},
        {"port": 65535},
        {"threads": 1},
        {"backlog": 1},
        {"loop": "asyncio"},
        {"loop": "uvloop"},
        {"log_level": "trace"},
        {"log_level": "critical"},
        {"root_path": "/app"},
        {"root_path": "/a/b"},
        {"timeout_keep_alive": 0},
        {"limit_request_line": 0},
        {"limit_request_body": 1},
        {"write_high_water": 1},
        {"bind": ("127.0.0.1:0", "[::1]:8080", "unix:/tmp/a.sock", "fd://3")},
    ],
    ids=lambda options: ",".join(f"{k}={v!r}" for k, v in options.items()),
)
def test_edge_values_are_accepted(options: dict[str, Any]) -> None:
    config = Config(**options)
    for name, value in options.items():
        assert getattr(config, name) == value


def test_zero_limits_mean_no_limit() -> None:
    """``limit_request_*=0`` means no limit, as in gunicorn; the defaults are limits."""
    zeros = {
        "limit_request_line": 0,
        "limit_request_fields": 0,
        "limit_request_field_size": 0,
        "limit_request_head": 0,
        "limit_request_body": 0,
    }
    assert request_limits(Config(**zeros)) == RequestLimits.of(0, 0, 0, 0, 0)
    assert set(request_limits(Config(**zeros))) == {UNLIMITED}
    limits = request_limits(Config(limit_request_line=100, limit_request_field_size=200))
    assert (limits.request_line, limits.field_size) == (100, 200)
    assert request_limits(Config()) == RequestLimits(8190, 100, 8190, 64 * KiB, UNLIMITED)


# -- limits of 0 over real sockets -------------------------------------------------------------

CLOSE_HEAD = b"GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n"


async def status_of(request: bytes, **options: Any) -> int:
    """Serve ``request`` on a new server with ``options``; return the response's status."""
    async with running(apps.hello, **options) as srv:
        replies = decode_replies(await exchange(srv.port, request))
    assert len(replies) == 1, replies
    return replies[0].status


async def test_limit_request_line_0_serves_a_long_request_line() -> None:
    line = b"GET /" + b"a" * (100 * KiB) + b" HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"
    assert await status_of(line, limit_request_line=0, limit_request_head=0) == 200
    # The head limit still bounds a request line when only the line limit is lifted.
    assert await status_of(line, limit_request_line=0) == 431
    assert await status_of(line) == 414


async def test_limit_request_fields_0_serves_many_fields() -> None:
    request = CLOSE_HEAD + b"".join(b"X-%d: v\r\n" % i for i in range(300)) + b"\r\n"
    assert await status_of(request, limit_request_fields=0) == 200
    assert await status_of(request) == 431


async def test_limit_request_field_size_0_serves_a_long_field() -> None:
    request = CLOSE_HEAD + b"X-Long: " + b"v" * (100 * KiB) + b"\r\n\r\n"
    assert await status_of(request, limit_request_field_size=0, limit_request_head=0) == 200
    assert await status_of(request, limit_request_head=0) == 431


async def test_limit_request_head_0_serves_a_large_head() -> None:
    request = CLOSE_HEAD + b"".join(b"X-%d: %s\r\n" % (i, b"v" * 4000) for i in range(50))
    request += b"\r\n"
    assert len(request) > 128 * KiB
    assert await status_of(request, limit_request_head=0) == 200
    assert await status_of(request) == 431


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("127.0.0.1:9000", BindSpec(kind="tcp", host="127.0.0.1", port=9000)),
        ("localhost:80", BindSpec(kind="tcp", host="localhost", port=80)),
        ("example.com", BindSpec(kind="tcp", host="example.com", port=8000)),
        ("0.0.0.0:0", BindSpec(kind="tcp", host="0.0.0.0", port=0)),
        ("10.0.0.1:65535", BindSpec(kind="tcp", host="10.0.0.1", port=65535)),
        (":9000", BindSpec(kind="tcp", host="0.0.0.0", port=9000)),
        ("[::1]:9000", BindSpec(kind="tcp", host="::1", port=9000)),
        ("[::]:80", BindSpec(kind="tcp", host="::", port=80)),
        ("[::1]", BindSpec(kind="tcp", host="::1", port=8000)),
        ("[fe80::1%eth0]:8080", BindSpec(kind="tcp", host="fe80::1%eth0", port=8080)),
        ("unix:/tmp/app.sock", BindSpec(kind="unix", path="/tmp/app.sock")),
        ("unix:relative.sock", BindSpec(kind="unix", path="relative.sock")),
        ("fd://3", BindSpec(kind="fd", fd=3)),
        ("fd://0", BindSpec(kind="fd", fd=0)),
    ],
)
def test_parse_bind(spec: str, expected: BindSpec) -> None:
    assert parse_bind(spec) == expected


@pytest.mark.parametrize(
    "spec",
    [
        "host:",
        "host:http",
        "host:70000",
        "host:-1",
        "[::1",
        "[::1]9000",
        "[::1]:",
        "[::1]:x",
        "unix:",
        "fd://",
        "fd://three",
    ],
)
def test_parse_bind_errors(spec: str) -> None:
    with pytest.raises(ConfigError):
        parse_bind(spec)


@pytest.mark.parametrize("spec", ["::1", "::1:8000", "fe80::1"])
def test_parse_bind_refuses_ipv6_without_brackets(spec: str) -> None:
    """``::1`` is not host ``:`` port 1; an IPv6 address needs brackets (``[::1]:8000``)."""
    with pytest.raises(ConfigError):
        parse_bind(spec)


def test_negative_file_descriptor_is_a_config_error() -> None:
    """A negative descriptor is out of range: refused on construction, not at bind time."""
    with pytest.raises(ConfigError):
        parse_bind("fd://-1")
    with pytest.raises(ConfigError):
        Config(fd=-1)


def test_bind_spec_is_frozen() -> None:
    spec = parse_bind("127.0.0.1:80")
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.port = 81  # type: ignore[misc]


def test_listen_specs_default_to_host_and_port() -> None:
    assert Config(host="0.0.0.0", port=9000).listen_specs() == [
        BindSpec(kind="tcp", host="0.0.0.0", port=9000)
    ]


def test_listen_specs_combine_bind_uds_and_fd() -> None:
    config = Config(
        host="ignored", port=1, bind=("127.0.0.1:8001", "[::1]:8002"), uds="/tmp/s", fd=5
    )
    assert config.listen_specs() == [
        BindSpec(kind="tcp", host="127.0.0.1", port=8001),
        BindSpec(kind="tcp", host="::1", port=8002),
        BindSpec(kind="unix", path="/tmp/s"),
        BindSpec(kind="fd", fd=5),
    ]
    assert Config(uds="/tmp/only").listen_specs() == [BindSpec(kind="unix", path="/tmp/only")]
    assert Config(fd=0).listen_specs() == [BindSpec(kind="fd", fd=0)]


def test_uds_perms_is_an_octal_mode() -> None:
    assert Config(uds_perms="660").uds_perms == "660"
    for bad in ("999", "rw-", "1000"):
        with pytest.raises(ConfigError, match="octal"):
            Config(uds_perms=bad)
