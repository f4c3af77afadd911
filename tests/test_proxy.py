"""Proxy headers and the PROXY protocol: the pure parts of :mod:`asyncwsgi.proxy`, then real
sockets on 127.0.0.1:0 from a trusted peer (127.0.0.1, the default) and an untrusted one (the
same client with ``forwarded_allow_ips`` naming another network)."""

from __future__ import annotations

import asyncio
import base64
import ipaddress
import json
from pathlib import Path
from typing import Any

import pytest

from asyncwsgi import Config, ConfigError
from asyncwsgi.proxy import (
    FORWARDING_HEADERS,
    ProxyHeaders,
    ProxySupport,
    TrustedPeers,
    parse_forwarded,
    parse_trust_headers,
)
from asyncwsgi.proxy_protocol import (
    V2_SIGNATURE,
    ProxyInfo,
    ProxyProtocolError,
    ProxyProtocolReader,
    parse_proxy_header,
)

from . import apps
from .helpers import TIMEOUT, decode_replies, exchange, running

UNTRUSTED = {"forwarded_allow_ips": "10.0.0.0/8"}

# -- trusted peers ---------------------------------------------------------------------------------


def test_trusted_peers_addresses_networks_and_star() -> None:
    peers = TrustedPeers("127.0.0.1, 10.0.0.0/8,::1 , fd00::/8")
    assert "127.0.0.1" in peers
    assert "10.1.2.3" in peers
    assert "::1" in peers
    assert "fd00::5" in peers
    assert "::ffff:127.0.0.1" in peers  # IPv4-mapped, as a dual-stack socket reports it
    assert "127.0.0.2" not in peers
    assert "11.0.0.1" not in peers
    assert "unknown" not in peers
    assert "" not in peers
    assert None not in peers
    star = TrustedPeers("*")
    assert "203.0.113.9" in star
    assert "anything" in star


def test_trusted_peers_answers_stay_right_past_the_cache_size() -> None:
    peers = TrustedPeers("10.0.0.0/16")
    for i in range(10_000):  # more than the cache holds: it is cleared and refilled
        address = f"10.{i % 2}.{i // 256 % 256}.{i % 256}"
        assert (address in peers) is (i % 2 == 0), address
    assert "10.0.0.1" in peers
    assert "10.1.0.1" not in peers
    assert "10.0.0.1" + " " * 100 not in peers  # far too long for an address: not parsed


@pytest.mark.parametrize("spec", ["localhost", "10.0.0.0/33", "1.2.3.4.5", "127.0.0.1,nope"])
def test_trusted_peers_refuse_what_is_no_address(spec: str) -> None:
    with pytest.raises(ConfigError, match="forwarded_allow_ips"):
        TrustedPeers(spec)
    with pytest.raises(ConfigError, match="forwarded_allow_ips"):
        Config(forwarded_allow_ips=spec)


def test_forwarded_allow_ips_default_and_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FORWARDED_ALLOW_IPS", raising=False)
    assert Config().forwarded_allow_ips == "127.0.0.1"
    monkeypatch.setenv("FORWARDED_ALLOW_IPS", "10.0.0.0/8,192.0.2.1")
    assert Config().forwarded_allow_ips == "10.0.0.0/8,192.0.2.1"
    assert Config(forwarded_allow_ips="*").forwarded_allow_ips == "*"


@pytest.mark.parametrize(
    ("spec", "hops", "client"),
    [
        ("127.0.0.1", ["203.0.113.1"], "203.0.113.1"),
        # The rightmost hop that is not a trusted proxy; what is left of it is the client's claim.
        ("127.0.0.1,10.0.0.0/8", ["1.1.1.1", "203.0.113.1", "10.0.0.2"], "203.0.113.1"),
        ("127.0.0.1", ["forged", "203.0.113.1"], "203.0.113.1"),
        # Every hop trusted: the leftmost.
        ("10.0.0.0/8", ["10.0.0.3", "10.0.0.2"], "10.0.0.3"),
        ("*", ["198.51.100.1", "203.0.113.1"], "198.51.100.1"),
    ],
)
def test_client_of_x_forwarded_for(spec: str, hops: list[str], client: str) -> None:
    assert TrustedPeers(spec).client_of(hops) == client


# -- RFC 7239 Forwarded ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "elements"),
    [
        ('for="_gazonk"', [{"for": "_gazonk"}]),
        ('For="[2001:db8:cafe::17]:4711"', [{"for": "[2001:db8:cafe::17]:4711"}]),
        (
            "for=192.0.2.60;proto=http;by=203.0.113.43",
            [{"for": "192.0.2.60", "proto": "http", "by": "203.0.113.43"}],
        ),
        ("for=192.0.2.43, for=198.51.100.17", [{"for": "192.0.2.43"}, {"for": "198.51.100.17"}]),
        ('for=unknown;host="example.com:8443"', [{"for": "unknown", "host": "example.com:8443"}]),
        ('for="a\\"b"', [{"for": 'a"b'}]),
    ],
)
def test_parse_forwarded_rfc7239_examples(value: str, elements: list[dict[str, str]]) -> None:
    assert parse_forwarded(value) == elements


@pytest.mark.parametrize(
    "value",
    ["for", 'for="unterminated', "for=a b", "for=1;for=2", "=x", "for=[::1]", "f(r=1"],
)
def test_parse_forwarded_refuses_malformed(value: str) -> None:
    with pytest.raises(ValueError):  # noqa: PT011 - parse_forwarded raises plain ValueError
        parse_forwarded(value)


# -- applying headers to an environ ----------------------------------------------------------------


def base_environ(**extra: str) -> dict[str, Any]:
    environ: dict[str, Any] = {
        "REMOTE_ADDR": "127.0.0.1",
        "REMOTE_PORT": "50000",
        "SERVER_NAME": "127.0.0.1",
        "SERVER_PORT": "8000",
        "SCRIPT_NAME": "",
        "PATH_INFO": "/x",
        "HTTP_HOST": "backend:8000",
        "wsgi.url_scheme": "http",
    }
    environ.update(extra)
    return environ


def applied(spec: str = "127.0.0.1", **headers: str) -> dict[str, Any]:
    environ = base_environ(**headers)
    ProxyHeaders(TrustedPeers(spec)).apply(environ)
    return environ


def test_apply_nothing_to_do() -> None:
    assert applied() == base_environ()


def test_apply_x_forwarded_for_and_proto() -> None:
    environ = applied(HTTP_X_FORWARDED_FOR="203.0.113.7", HTTP_X_FORWARDED_PROTO="https")
    assert (environ["REMOTE_ADDR"], environ["REMOTE_PORT"]) == ("203.0.113.7", "0")
    assert environ["wsgi.url_scheme"] == "https"
    assert environ["HTTP_HOST"] == "backend:8000"  # no X-Forwarded-Host: unchanged


@pytest.mark.parametrize(
    ("hop", "addr", "port"),
    [
        ("[2001:db8::1]:4711", "2001:db8::1", "4711"),
        ("2001:db8::1", "2001:db8::1", "0"),
        ("198.51.100.4:5000", "198.51.100.4", "5000"),
    ],
)
def test_apply_x_forwarded_for_with_ports_and_ipv6(hop: str, addr: str, port: str) -> None:
    environ = applied(HTTP_X_FORWARDED_FOR=hop)
    assert (environ["REMOTE_ADDR"], environ["REMOTE_PORT"]) == (addr, port)


def test_apply_x_forwarded_proto_last_value_and_unknown_ignored() -> None:
    assert applied(HTTP_X_FORWARDED_PROTO="http,https")["wsgi.url_scheme"] == "https"
    assert applied(HTTP_X_FORWARDED_PROTO="wss")["wsgi.url_scheme"] == "https"
    assert applied(HTTP_X_FORWARDED_PROTO="gopher")["wsgi.url_scheme"] == "http"


def test_apply_x_forwarded_host_and_port() -> None:
    environ = applied(HTTP_X_FORWARDED_PROTO="https", HTTP_X_FORWARDED_HOST="example.com")
    assert environ["HTTP_HOST"] == "example.com"
    assert (environ["SERVER_NAME"], environ["SERVER_PORT"]) == ("example.com", "443")
    environ = applied(HTTP_X_FORWARDED_HOST="example.com:8443")
    assert (environ["SERVER_NAME"], environ["SERVER_PORT"]) == ("example.com", "8443")
    environ = applied(HTTP_X_FORWARDED_HOST="[2001:db8::5]:81")
    assert (environ["SERVER_NAME"], environ["SERVER_PORT"]) == ("2001:db8::5", "81")
    environ = applied(HTTP_X_FORWARDED_HOST="example.com", HTTP_X_FORWARDED_PORT="8080")
    assert environ["HTTP_HOST"] == "example.com:8080"
    assert environ["SERVER_PORT"] == "8080"
    environ = applied(
        HTTP_X_FORWARDED_HOST="example.com",
        HTTP_X_FORWARDED_PROTO="https",
        HTTP_X_FORWARDED_PORT="443",
    )
    assert (environ["HTTP_HOST"], environ["SERVER_PORT"]) == ("example.com", "443")


@pytest.mark.parametrize(
    "header",
    [
        {"HTTP_X_FORWARDED_HOST": "evil.com/path"},
        {"HTTP_X_FORWARDED_HOST": "a b"},
        {"HTTP_X_FORWARDED_HOST": "example.com:99999"},
        {"HTTP_X_FORWARDED_PORT": "http"},
        {"HTTP_X_FORWARDED_PORT": "70000"},
        {"HTTP_X_FORWARDED_PREFIX": "no-slash"},
        {"HTTP_X_FORWARDED_PREFIX": "/a b"},
        {"HTTP_X_FORWARDED_FOR": "1.2.3.4,,5.6.7.8"},
        {"HTTP_FORWARDED": 'for="unterminated'},
    ],
)
def test_apply_ignores_malformed_values(header: dict[str, str]) -> None:
    environ = applied(**header)
    for key in ("REMOTE_ADDR", "SERVER_NAME", "SERVER_PORT", "SCRIPT_NAME", "HTTP_HOST"):
        assert environ[key] == base_environ()[key], key


def test_apply_prefix_goes_before_root_path() -> None:
    environ = applied(HTTP_X_FORWARDED_PREFIX="/api/", SCRIPT_NAME="/v1")
    assert environ["SCRIPT_NAME"] == "/api/v1"
    assert environ["PATH_INFO"] == "/x"
    assert applied(HTTP_X_FORWARDED_PREFIX="/caf%C3%A9")["SCRIPT_NAME"] == "/caf\xc3\xa9"
    assert applied(HTTP_X_FORWARDED_PREFIX="/")["SCRIPT_NAME"] == ""


def test_apply_forwarded_picks_the_rightmost_untrusted_element() -> None:
    environ = applied(
        "127.0.0.1,10.0.0.0/8",
        HTTP_FORWARDED=(
            "for=198.51.100.1;proto=http;host=forged.example, "
            'for="[2001:db8::7]:4711";proto=https;host=shop.example, '
            "for=10.0.0.2;proto=http;host=internal"
        ),
        HTTP_X_FORWARDED_FOR="192.0.2.99",  # ignored: Forwarded is present
        HTTP_X_FORWARDED_HOST="ignored.example",
    )
    assert (environ["REMOTE_ADDR"], environ["REMOTE_PORT"]) == ("2001:db8::7", "4711")
    assert environ["wsgi.url_scheme"] == "https"
    assert environ["HTTP_HOST"] == "shop.example"
    assert (environ["SERVER_NAME"], environ["SERVER_PORT"]) == ("shop.example", "443")


def test_apply_forwarded_all_trusted_takes_the_leftmost() -> None:
    environ = applied("*", HTTP_FORWARDED="for=198.51.100.1;proto=https, for=203.0.113.5")
    assert environ["REMOTE_ADDR"] == "198.51.100.1"
    assert environ["wsgi.url_scheme"] == "https"


ALL_SIX = {
    "HTTP_X_FORWARDED_FOR": "203.0.113.7",
    "HTTP_X_FORWARDED_PROTO": "https",
    "HTTP_X_FORWARDED_HOST": "evil.example",
    "HTTP_X_FORWARDED_PORT": "8443",
    "HTTP_X_FORWARDED_PREFIX": "/evil",
    "HTTP_FORWARDED": "for=198.51.100.1;proto=https;host=evil.example",
}


def test_forwarding_headers_are_the_six() -> None:
    assert set(FORWARDING_HEADERS.values()) == set(ALL_SIX)
    for name, key in FORWARDING_HEADERS.items():
        assert key == "HTTP_" + name.upper().replace("-", "_")


@pytest.mark.parametrize(
    ("spec", "names"),
    [
        ("x-forwarded-for", {"x-forwarded-for"}),
        (" X-Forwarded-FOR ,x-FORWARDED-proto,", {"x-forwarded-for", "x-forwarded-proto"}),
        ("Forwarded", {"forwarded"}),
        ("", set()),
        (" , ", set()),
        (",".join(FORWARDING_HEADERS).upper(), set(FORWARDING_HEADERS)),
    ],
)
def test_parse_trust_headers(spec: str, names: set[str]) -> None:
    assert parse_trust_headers(spec) == names


@pytest.mark.parametrize("spec", ["x-forwarded-fro", "x-real-ip", "x-forwarded-for;proto", "*"])
def test_trust_headers_refuse_unknown_names(spec: str) -> None:
    with pytest.raises(ConfigError, match="forwarded_trust_headers"):
        parse_trust_headers(spec)
    with pytest.raises(ConfigError, match="forwarded_trust_headers"):
        Config(forwarded_trust_headers=spec)


def test_trust_headers_default_is_all_six() -> None:
    assert parse_trust_headers(Config().forwarded_trust_headers) == set(FORWARDING_HEADERS)
    support = ProxySupport(Config())
    assert support.headers is not None
    assert support.headers.removed == ()


def test_apply_with_no_trusted_names_removes_all_six_and_applies_none() -> None:
    environ = base_environ(**ALL_SIX)
    ProxyHeaders(TrustedPeers("127.0.0.1"), frozenset()).apply(environ)
    assert environ == base_environ()


def test_apply_removes_and_ignores_the_headers_not_trusted() -> None:
    environ = base_environ(**ALL_SIX)
    names = parse_trust_headers("x-forwarded-for,x-forwarded-proto")
    ProxyHeaders(TrustedPeers("127.0.0.1"), names).apply(environ)
    assert (environ["REMOTE_ADDR"], environ["wsgi.url_scheme"]) == ("203.0.113.7", "https")
    assert (environ["HTTP_HOST"], environ["SERVER_PORT"]) == ("backend:8000", "8000")
    assert environ["SCRIPT_NAME"] == ""
    keys = {key for key in ALL_SIX if key in environ}
    assert keys == {"HTTP_X_FORWARDED_FOR", "HTTP_X_FORWARDED_PROTO"}


def test_apply_untrusted_forwarded_no_longer_hides_x_forwarded_for() -> None:
    """A proxy that sets X-Forwarded-For but passes the client's own Forwarded header on: with
    Forwarded untrusted, the client cannot pick its address with it."""
    environ = base_environ(
        HTTP_FORWARDED="for=192.0.2.66", HTTP_X_FORWARDED_FOR="192.0.2.66, 203.0.113.7"
    )
    ProxyHeaders(TrustedPeers("127.0.0.1"), parse_trust_headers("x-forwarded-for")).apply(environ)
    assert environ["REMOTE_ADDR"] == "203.0.113.7"
    assert "HTTP_FORWARDED" not in environ


# -- proxy headers over sockets --------------------------------------------------------------------

FORWARDED_HEAD = (
    b"GET /app/page?q=1 HTTP/1.1\r\nHost: backend\r\n"
    b"X-Forwarded-For: 198.51.100.2, 203.0.113.50\r\n"
    b"X-Forwarded-Proto: https\r\n"
    b"X-Forwarded-Host: www.example.com\r\n"
    b"X-Forwarded-Port: 8443\r\n"
    b"X-Forwarded-Prefix: /shop\r\n"
    b"Connection: close\r\n\r\n"
)


async def environ_of(port: int, request: bytes) -> dict[str, Any]:
    (reply,) = decode_replies(await exchange(port, request))
    assert reply.status == 200, reply.body
    return json.loads(reply.body)  # type: ignore[no-any-return]


async def test_trusted_peer_headers_rewrite_the_environ() -> None:
    async with running(apps.environ_app) as srv:  # 127.0.0.1 is trusted by default
        environ = await environ_of(srv.port, FORWARDED_HEAD)
    assert environ["REMOTE_ADDR"] == "203.0.113.50"
    assert environ["REMOTE_PORT"] == "0"
    assert environ["wsgi.url_scheme"] == "https"
    assert environ["HTTP_HOST"] == "www.example.com:8443"
    assert (environ["SERVER_NAME"], environ["SERVER_PORT"]) == ("www.example.com", "8443")
    assert environ["SCRIPT_NAME"] == "/shop"
    assert environ["PATH_INFO"] == "/app/page"
    # Still visible to the application, as the proxy set them.
    assert environ["HTTP_X_FORWARDED_FOR"] == "198.51.100.2, 203.0.113.50"
    assert environ["HTTP_X_FORWARDED_PROTO"] == "https"
    assert environ["HTTP_X_FORWARDED_HOST"] == "www.example.com"
    assert environ["HTTP_X_FORWARDED_PORT"] == "8443"
    assert environ["HTTP_X_FORWARDED_PREFIX"] == "/shop"


async def test_untrusted_peer_headers_are_ignored() -> None:
    async with running(apps.environ_app, **UNTRUSTED) as srv:
        environ = await environ_of(srv.port, FORWARDED_HEAD)
        (channel_headers,) = await _proxy_headers_of_a_connection(srv)
    assert environ["REMOTE_ADDR"] == "127.0.0.1"
    assert environ["REMOTE_PORT"] != "0"
    assert environ["wsgi.url_scheme"] == "http"
    assert environ["HTTP_HOST"] == "backend"
    assert (environ["SERVER_NAME"], environ["SERVER_PORT"]) == ("127.0.0.1", str(srv.port))
    assert environ["SCRIPT_NAME"] == ""
    assert environ["PATH_INFO"] == "/app/page"
    assert channel_headers is srv.server.state.proxy.untrusted  # removes, applies nothing


ALL_SIX_HEAD = (
    b"GET / HTTP/1.1\r\nHost: backend\r\n"
    b"X-Forwarded-For: 203.0.113.7\r\n"
    b"X-Forwarded-Proto: https\r\n"
    b"X-Forwarded-Host: evil.example\r\n"
    b"X-Forwarded-Port: 8443\r\n"
    b"X-Forwarded-Prefix: /evil\r\n"
    b"Forwarded: for=198.51.100.1;proto=https;host=evil.example\r\n"
    b"Connection: close\r\n\r\n"
)


def forwarding_keys(environ: dict[str, Any]) -> set[str]:
    return {key for key in ALL_SIX if key in environ}


async def test_untrusted_peer_forwarding_headers_are_removed() -> None:
    """A direct client cannot hand the application a forged X-Forwarded-Host (Django's
    USE_X_FORWARDED_HOST), nor any other forwarding header (waitress 3.0's default)."""
    async with running(apps.environ_app, **UNTRUSTED) as srv:
        environ = await environ_of(srv.port, ALL_SIX_HEAD)
    assert forwarding_keys(environ) == set()
    assert environ["REMOTE_ADDR"] == "127.0.0.1"
    assert environ["wsgi.url_scheme"] == "http"
    assert environ["HTTP_HOST"] == "backend"
    assert environ["SCRIPT_NAME"] == ""


@pytest.mark.parametrize("key", sorted(ALL_SIX))
async def test_untrusted_peer_each_forwarding_header_is_removed(key: str) -> None:
    name = key[5:].replace("_", "-").encode()
    request = (
        b"GET / HTTP/1.1\r\nHost: backend\r\n"
        + name
        + b": "
        + ALL_SIX[key].encode()
        + b"\r\nX-Other: kept\r\nConnection: close\r\n\r\n"
    )
    async with running(apps.environ_app, **UNTRUSTED) as srv:
        environ = await environ_of(srv.port, request)
    assert key not in environ
    assert environ["HTTP_X_OTHER"] == "kept"


async def test_trusted_peer_keeps_and_applies_all_six() -> None:
    async with running(apps.environ_app) as srv:
        environ = await environ_of(srv.port, ALL_SIX_HEAD)
    assert forwarding_keys(environ) == set(ALL_SIX)
    # Forwarded replaces the three X- headers it covers; Port and Prefix still apply.
    assert environ["REMOTE_ADDR"] == "198.51.100.1"
    assert environ["wsgi.url_scheme"] == "https"
    assert environ["HTTP_HOST"] == "evil.example:8443"
    assert environ["SCRIPT_NAME"] == "/evil"


async def test_trust_headers_limit_what_a_trusted_peer_sets() -> None:
    async with running(
        apps.environ_app, forwarded_trust_headers=" X-Forwarded-FOR, x-forwarded-PROTO"
    ) as srv:
        environ = await environ_of(srv.port, ALL_SIX_HEAD)
    assert forwarding_keys(environ) == {"HTTP_X_FORWARDED_FOR", "HTTP_X_FORWARDED_PROTO"}
    assert environ["REMOTE_ADDR"] == "203.0.113.7"  # not Forwarded's 198.51.100.1: removed
    assert environ["wsgi.url_scheme"] == "https"
    assert environ["HTTP_HOST"] == "backend"
    assert (environ["SERVER_NAME"], environ["SERVER_PORT"]) == ("127.0.0.1", str(srv.port))
    assert environ["SCRIPT_NAME"] == ""


async def test_trust_headers_x_forwarded_for_only() -> None:
    async with running(apps.environ_app, forwarded_trust_headers="x-forwarded-for") as srv:
        environ = await environ_of(srv.port, FORWARDED_HEAD)
    assert forwarding_keys(environ) == {"HTTP_X_FORWARDED_FOR"}
    assert environ["REMOTE_ADDR"] == "203.0.113.50"
    assert environ["wsgi.url_scheme"] == "http"
    assert environ["HTTP_HOST"] == "backend"
    assert environ["SCRIPT_NAME"] == ""


async def test_trust_headers_empty_trusts_none() -> None:
    async with running(apps.environ_app, forwarded_trust_headers="") as srv:
        environ = await environ_of(srv.port, ALL_SIX_HEAD)
    assert forwarding_keys(environ) == set()
    assert environ["REMOTE_ADDR"] == "127.0.0.1"
    assert environ["HTTP_HOST"] == "backend"


async def _proxy_headers_of_a_connection(srv: Any) -> list[ProxyHeaders | None]:
    """The per-connection rewriter of one open connection (white box: None costs nothing)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", srv.port)
    writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), TIMEOUT)
    found = [channel.proxy_headers for channel in srv.server.state.channels]
    writer.close()
    return found


async def test_no_proxy_headers_ignores_them_from_trusted_peers() -> None:
    async with running(apps.environ_app, proxy_headers=False) as srv:
        environ = await environ_of(srv.port, FORWARDED_HEAD)
        assert await _proxy_headers_of_a_connection(srv) == [None]
    assert environ["REMOTE_ADDR"] == "127.0.0.1"
    assert environ["wsgi.url_scheme"] == "http"
    assert environ["SCRIPT_NAME"] == ""


@pytest.mark.parametrize("options", [{}, UNTRUSTED, {"forwarded_trust_headers": ""}])
async def test_no_proxy_headers_leaves_every_forwarding_header_in_place(
    options: dict[str, str],
) -> None:
    """Without --proxy-headers the server interprets none of them: they are left for the
    application (or its own middleware) to judge, from any peer."""
    async with running(apps.environ_app, proxy_headers=False, **options) as srv:
        environ = await environ_of(srv.port, ALL_SIX_HEAD)
    assert forwarding_keys(environ) == set(ALL_SIX)
    assert environ["HTTP_X_FORWARDED_HOST"] == "evil.example"
    assert environ["REMOTE_ADDR"] == "127.0.0.1"


async def test_client_cannot_forge_script_name() -> None:
    """SCRIPT_NAME comes from --root-path, or X-Forwarded-Prefix from a trusted proxy only."""
    request = (
        b"GET /mount/x HTTP/1.1\r\nHost: t\r\nX-Forwarded-Prefix: /evil\r\n"
        b"Script-Name: /evil\r\nScript_Name: /evil\r\nConnection: close\r\n\r\n"
    )
    async with running(apps.environ_app, root_path="/mount", **UNTRUSTED) as srv:
        environ = await environ_of(srv.port, request)
    assert environ["SCRIPT_NAME"] == "/mount"
    assert environ["PATH_INFO"] == "/x"
    assert environ["HTTP_SCRIPT_NAME"] == "/evil"  # a plain header, not the CGI variable
    async with running(apps.environ_app, root_path="/mount") as srv:
        environ = await environ_of(srv.port, request)
    assert environ["SCRIPT_NAME"] == "/evil/mount"  # from the trusted proxy: applied


async def test_forwarded_header_over_sockets() -> None:
    request = (
        b"GET / HTTP/1.1\r\nHost: backend\r\n"
        b'Forwarded: for="[2001:db8::9]:3333";proto=https;host=api.example\r\n'
        b"Connection: close\r\n\r\n"
    )
    async with running(apps.environ_app) as srv:
        trusted = await environ_of(srv.port, request)
    async with running(apps.environ_app, **UNTRUSTED) as srv:
        untrusted = await environ_of(srv.port, request)
    assert (trusted["REMOTE_ADDR"], trusted["REMOTE_PORT"]) == ("2001:db8::9", "3333")
    assert trusted["wsgi.url_scheme"] == "https"
    assert trusted["HTTP_HOST"] == "api.example"
    assert trusted["HTTP_FORWARDED"].startswith("for=")
    assert untrusted["REMOTE_ADDR"] == "127.0.0.1"
    assert untrusted["wsgi.url_scheme"] == "http"
    assert untrusted["HTTP_HOST"] == "backend"
    assert "HTTP_FORWARDED" not in untrusted


async def test_headers_apply_to_each_request_of_a_connection() -> None:
    async with running(apps.environ_app) as srv:
        reader, writer = await asyncio.open_connection("127.0.0.1", srv.port)
        addrs = []
        for hop in (b"192.0.2.1", None, b"192.0.2.3"):
            head = b"GET / HTTP/1.1\r\nHost: t\r\n"
            if hop is not None:
                head += b"X-Forwarded-For: " + hop + b"\r\n"
            writer.write(head + b"\r\n")
            await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), TIMEOUT)
            size = int(await asyncio.wait_for(reader.readuntil(b"\r\n"), TIMEOUT), 16)
            addrs.append(json.loads(await reader.readexactly(size))["REMOTE_ADDR"])
            await reader.readuntil(b"0\r\n\r\n")
        writer.close()
    assert addrs == ["192.0.2.1", "127.0.0.1", "192.0.2.3"]


async def test_unix_socket_peers_are_trusted(tmp_path: Path) -> None:
    path = str(tmp_path / "app.sock")
    async with running(apps.environ_app, uds=path, forwarded_allow_ips="10.0.0.0/8") as srv:
        reader, writer = await asyncio.open_unix_connection(path)
        writer.write(FORWARDED_HEAD)
        raw = await asyncio.wait_for(reader.read(-1), TIMEOUT)
        writer.close()
        assert srv.server.addresses == [path]
    environ = json.loads(decode_replies(raw)[0].body)
    assert environ["REMOTE_ADDR"] == "203.0.113.50"
    assert environ["wsgi.url_scheme"] == "https"


# -- PROXY protocol: the parser --------------------------------------------------------------------


def v2(command: int = 1, family: int = 0x11, addresses: bytes = b"", tlvs: bytes = b"") -> bytes:
    body = addresses + tlvs
    return V2_SIGNATURE + bytes([0x20 | command, family]) + len(body).to_bytes(2, "big") + body


V2_IPV4 = v2(
    addresses=bytes([192, 168, 1, 10, 192, 168, 1, 1]) + (12345).to_bytes(2, "big") + b"\x01\xbb"
)
V2_IPV6 = v2(
    family=0x21,
    addresses=ipaddress.IPv6Address("2001:db8::1").packed
    + ipaddress.IPv6Address("2001:db8::2").packed
    + (54321).to_bytes(2, "big")
    + (443).to_bytes(2, "big"),
)


@pytest.mark.parametrize(
    ("header", "info"),
    [
        (
            b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n",
            ProxyInfo(1, ("192.168.0.1", 56324), ("192.168.0.11", 443)),
        ),
        (
            b"PROXY TCP6 2001:db8::1 2001:db8::2 1 65535\r\n",
            ProxyInfo(1, ("2001:db8::1", 1), ("2001:db8::2", 65535)),
        ),
        (b"PROXY UNKNOWN\r\n", ProxyInfo(1, None, None)),
        (b"PROXY UNKNOWN ffff::1 ffff::2 1 2\r\n", ProxyInfo(1, None, None)),
        (V2_IPV4, ProxyInfo(2, ("192.168.1.10", 12345), ("192.168.1.1", 443))),
        (V2_IPV6, ProxyInfo(2, ("2001:db8::1", 54321), ("2001:db8::2", 443))),
        # TLVs after the addresses (AWS puts its VPC endpoint id there) are skipped.
        (
            v2(addresses=V2_IPV4[16:], tlvs=b"\xea\x00\x05\x01vpce"),
            ProxyInfo(2, ("192.168.1.10", 12345), ("192.168.1.1", 443)),
        ),
        (v2(command=0, family=0x00), ProxyInfo(2, None, None)),  # LOCAL: a health check
        (v2(command=0, family=0x11, addresses=V2_IPV4[16:]), ProxyInfo(2, None, None)),
        (v2(family=0x00), ProxyInfo(2, None, None)),  # UNSPEC
        (v2(family=0x31, addresses=b"\0" * 216), ProxyInfo(2, None, None)),  # UNIX
    ],
)
def test_parse_proxy_header(header: bytes, info: ProxyInfo) -> None:
    rest = b"GET / HTTP/1.1\r\n\r\n"
    assert parse_proxy_header(header + rest) == (info, len(header))
    # Byte by byte: undecided until the header is complete, then the rest is untouched.
    reader = ProxyProtocolReader()
    for i in range(len(header) - 1):
        assert reader.feed(header[i : i + 1]) is None, i
    assert reader.feed(header[-1:] + rest) == rest
    assert reader.info == info


@pytest.mark.parametrize(
    "data", [b"GET / HTTP/1.1\r\n", b"\r\nGET /", b"POST", b"PROXZ", b"\r\n\r\n\x00\r\nQUIX"]
)
def test_no_proxy_header_is_no_header(data: bytes) -> None:
    assert parse_proxy_header(data) == (None, 0)
    reader = ProxyProtocolReader()
    assert reader.feed(data) == data
    assert reader.info is None


@pytest.mark.parametrize("data", [b"", b"P", b"PROXY", b"\r\n", b"\r\n\r\n\x00\r\nQUIT"])
def test_a_prefix_of_a_signature_waits_for_more(data: bytes) -> None:
    assert parse_proxy_header(data) is None


@pytest.mark.parametrize(
    "header",
    [
        b"PROXY TCP4 192.168.0.1 192.16...\r\n",  # gunicorn's invalid/pp_01
        b"PROXY TCP4 192.168.0.1 192.168.0.11 65iii 100000\r\n",  # invalid/pp_02
        b"PROXY TCP4 not-an-ip 192.168.0.11 56324 443\r\n",  # invalid/pp_03
        b"PROXY TCP4 2001:db8::1 192.168.0.11 1 2\r\n",  # family mismatch
        b"PROXY TCP6 192.168.0.1 192.168.0.11 1 2\r\n",
        b"PROXY TCP4 192.168.0.1 192.168.0.11 1 65536\r\n",
        b"PROXY TCP4 192.168.0.1 192.168.0.11 1 2 3\r\n",
        b"PROXY UDP4 192.168.0.1 192.168.0.11 1 2\r\n",
        b"PROXY TCP4  192.168.0.1 192.168.0.11 1 2\r\n",
        b"PROXY " + b"9" * 101 + b"\r\n",  # longer than 107 bytes
        V2_SIGNATURE + b"\x11\x11\x00\x0c" + V2_IPV4[16:],  # version 1 in a v2 header
        V2_SIGNATURE + b"\x22\x11\x00\x0c" + V2_IPV4[16:],  # command 2
        v2(family=0x41, addresses=b"\0" * 12),  # unknown family
        v2(family=0x21, addresses=V2_IPV4[16:]),  # IPv6 needs 36 bytes, got 12
    ],
)
def test_malformed_proxy_header(header: bytes) -> None:
    with pytest.raises(ProxyProtocolError):
        parse_proxy_header(header + b"GET / HTTP/1.1\r\n\r\n")


def test_v1_line_without_crlf_is_refused_at_107_bytes() -> None:
    assert parse_proxy_header(b"PROXY TCP4 " + b"1" * 90) is None
    with pytest.raises(ProxyProtocolError):
        parse_proxy_header(b"PROXY TCP4 " + b"1" * 96)


def test_support_gives_readers_to_trusted_peers_only() -> None:
    support = ProxySupport(Config(proxy_protocol=True, forwarded_allow_ips="10.0.0.0/8"))
    headers, reader = support.for_peer("10.1.1.1")
    assert headers is support.headers is not None
    assert reader is not None
    assert support.for_peer("127.0.0.1") == (support.untrusted, None)
    assert support.untrusted is not None
    assert support.untrusted.names == frozenset()
    assert support.for_peer(None)[1] is not None  # UNIX socket
    off = ProxySupport(Config(forwarded_allow_ips="10.0.0.0/8"))
    assert off.for_peer("10.1.1.1")[1] is None
    both_off = ProxySupport(Config(proxy_headers=False))
    assert both_off.for_peer("127.0.0.1") == (None, None)
    assert both_off.for_peer(None) == (None, None)


# -- PROXY protocol over sockets -------------------------------------------------------------------


async def test_proxy_protocol_v1_sets_remote_addr_and_port() -> None:
    request = b"GET /p HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"
    async with running(apps.environ_app, proxy_protocol=True) as srv:
        environ = await environ_of(
            srv.port, b"PROXY TCP4 198.51.100.7 10.0.0.1 40000 443\r\n" + request
        )
        v6 = await environ_of(srv.port, V2_IPV6 + request)
        local = await environ_of(srv.port, v2(command=0, family=0x00) + request)
        plain = await environ_of(srv.port, request)
    assert (environ["REMOTE_ADDR"], environ["REMOTE_PORT"]) == ("198.51.100.7", "40000")
    assert environ["PATH_INFO"] == "/p"
    assert (v6["REMOTE_ADDR"], v6["REMOTE_PORT"]) == ("2001:db8::1", "54321")
    assert local["REMOTE_ADDR"] == "127.0.0.1"  # LOCAL: the connection's own address
    assert plain["REMOTE_ADDR"] == "127.0.0.1"  # no header: served as it is


async def test_proxy_protocol_header_in_pieces_then_keep_alive() -> None:
    header = b"PROXY TCP4 198.51.100.8 10.0.0.1 40001 443\r\n"
    async with running(apps.environ_app, proxy_protocol=True) as srv:
        reader, writer = await asyncio.open_connection("127.0.0.1", srv.port)
        for piece in (header[:3], header[3:20], header[20:], b"GET /1 HTTP/1.1\r\nHost: t\r\n"):
            writer.write(piece)
            await writer.drain()
        writer.write(b"\r\n")
        addrs = []
        for request in (None, b"GET /2 HTTP/1.1\r\nHost: t\r\n\r\n"):
            if request is not None:
                writer.write(request)
            await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), TIMEOUT)
            size = int(await asyncio.wait_for(reader.readuntil(b"\r\n"), TIMEOUT), 16)
            environ = json.loads(await reader.readexactly(size))
            addrs.append((environ["PATH_INFO"], environ["REMOTE_ADDR"], environ["REMOTE_PORT"]))
            await reader.readuntil(b"0\r\n\r\n")
        writer.close()
    assert addrs == [("/1", "198.51.100.8", "40001"), ("/2", "198.51.100.8", "40001")]


async def test_proxy_protocol_malformed_gets_400_and_close() -> None:
    seen: list[str] = []

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        seen.append(environ["PATH_INFO"])
        start_response("200 OK", [("Content-Length", "2")])
        return [b"ok"]

    async with running(app, proxy_protocol=True) as srv:
        raw = await exchange(
            srv.port,
            b"PROXY TCP4 not-an-ip 10.0.0.1 1 2\r\nGET /x HTTP/1.1\r\nHost: t\r\n\r\n",
        )
    (reply,) = decode_replies(raw)
    assert reply.status == 400
    assert b"PROXY" in reply.body
    assert reply.headers["connection"] == "close"
    assert seen == []


async def test_proxy_protocol_header_that_never_completes_times_out() -> None:
    """A peer stuck inside its PROXY header is under --timeout-request-header like a head."""
    async with running(
        apps.environ_app, proxy_protocol=True, timeout_request_header=0.2, timeout_linger=0.2
    ) as srv:
        reader, writer = await asyncio.open_connection("127.0.0.1", srv.port)
        writer.write(b"PROXY TCP4 198.51.100.7 ")  # and nothing more
        raw = await asyncio.wait_for(reader.read(-1), TIMEOUT)
        writer.close()
    (reply,) = decode_replies(raw)
    assert reply.status == 408


async def test_proxy_protocol_from_untrusted_peer_is_not_parsed() -> None:
    """An untrusted client cannot set its address: its PROXY line is a bad request line."""
    async with running(apps.environ_app, proxy_protocol=True, **UNTRUSTED) as srv:
        raw = await exchange(
            srv.port,
            b"PROXY TCP4 198.51.100.7 10.0.0.1 40000 443\r\nGET / HTTP/1.1\r\nHost: t\r\n\r\n",
        )
        plain = await environ_of(
            srv.port, b"GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"
        )
    assert decode_replies(raw)[0].status == 400
    assert plain["REMOTE_ADDR"] == "127.0.0.1"


async def test_proxy_protocol_client_is_not_trusted_with_headers() -> None:
    """Behind a TCP load balancer the HTTP headers come from the client named in the PROXY
    header: its X-Forwarded-For is ignored unless that client is itself trusted."""
    request = (
        b"GET / HTTP/1.1\r\nHost: t\r\nX-Forwarded-For: 192.0.2.66\r\n"
        b"X-Forwarded-Proto: https\r\nConnection: close\r\n\r\n"
    )
    async with running(apps.environ_app, proxy_protocol=True) as srv:
        outside = await environ_of(srv.port, b"PROXY TCP4 198.51.100.7 10.0.0.1 1 2\r\n" + request)
        inside = await environ_of(srv.port, b"PROXY TCP4 127.0.0.1 10.0.0.1 1 2\r\n" + request)
    assert outside["REMOTE_ADDR"] == "198.51.100.7"
    assert outside["wsgi.url_scheme"] == "http"
    assert "HTTP_X_FORWARDED_FOR" not in outside  # removed, as from a direct client
    assert "HTTP_X_FORWARDED_PROTO" not in outside
    assert inside["REMOTE_ADDR"] == "192.0.2.66"
    assert inside["wsgi.url_scheme"] == "https"
    assert inside["HTTP_X_FORWARDED_FOR"] == "192.0.2.66"


async def test_proxy_protocol_client_gets_the_trust_headers_list() -> None:
    """A trusted client named by the PROXY header is held to --forwarded-trust-headers; an
    untrusted one has all six removed."""
    async with running(
        apps.environ_app, proxy_protocol=True, forwarded_trust_headers="x-forwarded-proto"
    ) as srv:
        inside = await environ_of(srv.port, b"PROXY TCP4 127.0.0.1 10.0.0.1 1 2\r\n" + ALL_SIX_HEAD)
        outside = await environ_of(
            srv.port, b"PROXY TCP4 198.51.100.7 10.0.0.1 1 2\r\n" + ALL_SIX_HEAD
        )
    assert forwarding_keys(inside) == {"HTTP_X_FORWARDED_PROTO"}
    assert inside["REMOTE_ADDR"] == "127.0.0.1"
    assert inside["wsgi.url_scheme"] == "https"
    assert inside["HTTP_HOST"] == "backend"
    assert forwarding_keys(outside) == set()
    assert outside["REMOTE_ADDR"] == "198.51.100.7"
    assert outside["wsgi.url_scheme"] == "http"


async def test_proxy_protocol_off_by_default() -> None:
    async with running(apps.environ_app) as srv:
        raw = await exchange(
            srv.port, b"PROXY TCP4 198.51.100.7 10.0.0.1 40000 443\r\nGET / HTTP/1.1\r\n\r\n"
        )
    assert decode_replies(raw)[0].status == 400


# -- gunicorn's PROXY corpus cases with --proxy-protocol -------------------------------------------

#: gunicorn's request corpus as JSON (tests/data/LICENSE-gunicorn tells where it comes from).
CORPUS = Path(__file__).resolve().parent / "data" / "gunicorn-requests.json"
PROXY_CASES = {
    case["name"]: case
    for case in json.loads(CORPUS.read_text(encoding="utf-8"))["cases"]
    if case.get("gunicorn_settings", {}).get("proxy_protocol")
}
#: REMOTE_ADDR and REMOTE_PORT each valid case's header gives (pp_03 has none).
PROXY_ADDRESSES = {
    "valid/pp_01": ("192.168.0.1", "56324"),
    "valid/pp_02": ("192.168.0.1", "56324"),
    "valid/pp_03": ("127.0.0.1", None),
    "valid/pp_04": ("192.168.1.10", "12345"),
    "valid/pp_05": ("2001:db8::1", "54321"),
}


def test_corpus_proxy_cases_are_all_here() -> None:
    assert set(PROXY_CASES) == set(PROXY_ADDRESSES) | {
        "invalid/pp_01",
        "invalid/pp_02",
        "invalid/pp_03",
    }


def recorder(records: list[dict[str, Any]]) -> Any:
    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        record = {
            key: value for key, value in environ.items() if isinstance(value, str | int | tuple)
        }
        record["body"] = environ["wsgi.input"].read()
        records.append(record)
        start_response("200 OK", [("Content-Length", "2")])
        return [b"ok"]

    return app


@pytest.mark.parametrize("name", sorted(PROXY_CASES))
async def test_corpus_proxy_case(name: str) -> None:
    case = PROXY_CASES[name]
    raw = base64.b64decode(case["raw_b64"])
    # pp_02's requests are HTTP/1.1 without Host, which RFC 9112 section 3.2 makes a 400
    # (tests/test_corpus.py explains); add one so that the PROXY handling is what is tested.
    if name == "valid/pp_02":
        raw = raw.replace(b" HTTP/1.1\r\n", b" HTTP/1.1\r\nHost: x\r\n")
    records: list[dict[str, Any]] = []
    async with running(recorder(records), threads=1, proxy_protocol=True) as srv:
        reader, writer = await asyncio.open_connection("127.0.0.1", srv.port)
        writer.write(raw)
        writer.write_eof()
        data = await asyncio.wait_for(reader.read(-1), TIMEOUT)
        writer.close()
    statuses = [reply.status for reply in decode_replies(data)]
    if name.startswith("invalid/"):
        assert case["gunicorn_error"] == "InvalidProxyLine"
        assert statuses == [400]
        assert records == []
        return
    expected = case["expect"]
    assert statuses == [200] * len(expected)
    assert len(records) == len(expected)
    addr, port = PROXY_ADDRESSES[name]
    for record, want in zip(records, expected, strict=True):
        assert record["REQUEST_METHOD"] == want["method"]
        path, _, query = want["target"].partition("?")
        assert (record["PATH_INFO"], record["QUERY_STRING"]) == (path, query)
        assert record["SERVER_PROTOCOL"] == "HTTP/{}.{}".format(*want["version"])
        assert record["body"] == base64.b64decode(want["body_b64"])
        assert record["REMOTE_ADDR"] == addr
        if port is not None:
            assert record["REMOTE_PORT"] == port
