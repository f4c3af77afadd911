"""Running behind a proxy: forwarded headers, and who is trusted with them. Pure: no I/O, any
thread.

Two mechanisms tell the server who the client really is when a proxy or load balancer sits in
front of it. Both are believed only from trusted peers (``--forwarded-allow-ips``), because any
client can send them:

- **Proxy headers** (``--proxy-headers``, on by default, as uvicorn): ``X-Forwarded-For``,
  ``X-Forwarded-Proto``, ``X-Forwarded-Host``, ``X-Forwarded-Port``, ``X-Forwarded-Prefix`` and
  RFC 7239 ``Forwarded`` rewrite ``REMOTE_ADDR``, ``wsgi.url_scheme``, ``HTTP_HOST``,
  ``SERVER_NAME``, ``SERVER_PORT`` and ``SCRIPT_NAME`` of each request (:class:`ProxyHeaders`).
- **PROXY protocol** (``--proxy-protocol``): HAProxy's header at the start of a TCP connection
  gives the client's address and port (:mod:`asyncwsgi.proxy_protocol`).

With ``--proxy-headers``, the forwarding headers of a peer outside ``--forwarded-allow-ips`` are
removed from the environ, so that an application reading ``HTTP_X_FORWARDED_HOST`` itself (Django's
``USE_X_FORWARDED_HOST``) cannot be fooled by a direct client; ``--forwarded-trust-headers`` names
the ones a trusted proxy may set, and the others are removed from its requests too (waitress 3.0's
``clear_untrusted_proxy_headers`` and ``trusted_proxy_headers``). With ``--no-proxy-headers`` the
server interprets none of them and leaves them all in the environ.

Trust is decided once per connection (:meth:`ProxySupport.for_peer`); each request then costs a
few dict look-ups when no forwarded header is present.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Any, Final, Protocol
from urllib.parse import unquote_to_bytes

from .errors import ConfigError
from .proxy_protocol import ProxyProtocolError, ProxyProtocolReader

__all__ = [
    "FORWARDING_HEADERS",
    "TrustedPeers",
    "ProxyHeaders",
    "ProxySettings",
    "ProxySupport",
    "ProxyProtocolError",
    "ProxyProtocolReader",
    "parse_forwarded",
    "parse_trust_headers",
]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

_CACHE_SIZE: Final = 4096  # addresses whose trust is remembered (one bool each)
_MAX_ADDRESS: Final = 64  # longer text is no IP address (IPv6 with a zone id is under 64)


# -- trust ------------------------------------------------------------------------------------


class TrustedPeers:
    """The peers trusted with forwarded information (``--forwarded-allow-ips``).

    The settings are immutable; answers are cached (loop thread; a race between threads could
    only compute an answer twice).

    Args:
        spec: comma-separated IP addresses (``127.0.0.1``, ``::1``) and CIDR networks
            (``10.0.0.0/8``, ``fd00::/8``), or ``*`` to trust every peer. Blanks are ignored.

    Raises:
        ConfigError: an entry is neither an IP address nor a network.
    """

    __slots__ = ("_cache", "always", "hosts", "networks")

    def __init__(self, spec: str) -> None:
        entries = [entry.strip() for entry in spec.split(",") if entry.strip()]
        self.always = "*" in entries
        self.hosts: frozenset[IPAddress] = frozenset()
        self.networks: tuple[IPNetwork, ...] = ()
        hosts: set[IPAddress] = set()
        networks: list[IPNetwork] = []
        for entry in entries:
            if entry == "*":
                continue
            try:
                if "/" in entry:
                    networks.append(ipaddress.ip_network(entry, strict=False))
                else:
                    hosts.add(ipaddress.ip_address(entry))
            except ValueError:
                raise ConfigError(
                    f"forwarded_allow_ips: {entry!r} is not an IP address, a network or '*'"
                ) from None
        self.hosts = frozenset(hosts)
        self.networks = tuple(networks)
        # Parsing an address costs microseconds; the same proxies and clients come back.
        self._cache: dict[str, bool] = {}

    def __contains__(self, host: object) -> bool:
        """Whether ``host`` (an IP address as text) is trusted; text that is no IP is not."""
        if self.always:
            return True
        if not isinstance(host, str) or not host or len(host) > _MAX_ADDRESS:
            return False
        known = self._cache.get(host)
        if known is not None:
            return known
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            trusted = False
        else:
            if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
                address = address.ipv4_mapped  # ::ffff:127.0.0.1 from a dual-stack socket
            trusted = address in self.hosts or any(address in net for net in self.networks)
        if len(self._cache) >= _CACHE_SIZE:
            self._cache.clear()
        self._cache[host] = trusted
        return trusted

    def client_of(self, hops: list[str]) -> str:
        """Return the client among the ``X-Forwarded-For`` hops, left (client) to right.

        Each proxy appends the address it received the request from, so the rightmost hop that
        is not a trusted proxy is the client; the hops left of it are whatever that client
        claimed. When every hop is trusted, or every peer is (``*``), the leftmost hop is the
        client (uvicorn 0.30 and later).
        """
        if not self.always:
            for hop in reversed(hops):
                if hop not in self:
                    return hop
        return hops[0]


# -- forwarded headers ----------------------------------------------------------------------------

#: The forwarding header fields, by lower-case field name, and their environ keys.
FORWARDING_HEADERS: Final = {
    "x-forwarded-for": "HTTP_X_FORWARDED_FOR",
    "x-forwarded-proto": "HTTP_X_FORWARDED_PROTO",
    "x-forwarded-host": "HTTP_X_FORWARDED_HOST",
    "x-forwarded-port": "HTTP_X_FORWARDED_PORT",
    "x-forwarded-prefix": "HTTP_X_FORWARDED_PREFIX",
    "forwarded": "HTTP_FORWARDED",
}
_FORWARDING_KEYS: Final = frozenset(FORWARDING_HEADERS.values())


def parse_trust_headers(spec: str) -> frozenset[str]:
    """Parse ``--forwarded-trust-headers``: the forwarding fields a trusted proxy may set.

    Args:
        spec: comma-separated field names of :data:`FORWARDING_HEADERS`, in any case
            (``X-Forwarded-For, x-forwarded-proto``). Blanks are ignored; an empty list trusts
            none (every forwarding header is removed, from every peer).

    Returns:
        The lower-case field names.

    Raises:
        ConfigError: a name is not one of the forwarding headers (a typo must not silently
            leave a header untrusted).
    """
    names = frozenset(name.strip().lower() for name in spec.split(",") if name.strip())
    unknown = sorted(names - FORWARDING_HEADERS.keys())
    if unknown:
        raise ConfigError(
            f"forwarded_trust_headers: {', '.join(map(repr, unknown))} is not one of "
            f"{', '.join(FORWARDING_HEADERS)}"
        )
    return names


_HOST = re.compile(r"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._~!$&'()*+;=%-]+)(?::([0-9]{1,5}))?")
_PREFIX = re.compile(r"/[A-Za-z0-9._~!$&'()*+,;=:@%/-]*")
_SCHEMES: Final = {"http": "http", "https": "https", "ws": "http", "wss": "https"}
_DEFAULT_PORTS: Final = {"http": "80", "https": "443"}


def _split_host(value: str) -> tuple[str, str | None] | None:
    """``host[:port]`` → (host, port or None); None when it is not a plausible authority."""
    match = _HOST.fullmatch(value)
    if match is None:
        return None
    port = match.group(2)
    if port is not None and int(port) > 65535:
        return None
    return match.group(1), port


def _node(value: str) -> tuple[str, str | None]:
    """An X-Forwarded-For hop or a ``Forwarded: for=`` node → (address, port or None).

    Accepts ``192.0.2.1``, ``192.0.2.1:4711``, ``2001:db8::1``, ``[2001:db8::1]:4711``, and
    keeps anything else (``unknown``, an obfuscated ``_hidden``) as it is, without a port.
    """
    if value.startswith("["):
        end = value.find("]")
        if end > 0:
            rest = value[end + 1 :]
            port = rest[1:] if rest.startswith(":") and rest[1:].isdigit() else None
            return value[1:end], port
        return value, None
    if value.count(":") == 1:
        host, _, port = value.partition(":")
        if port.isdigit() and len(port) <= 5:
            return host, port
    return value, None


def parse_forwarded(value: str) -> list[dict[str, str]]:
    """Parse an RFC 7239 ``Forwarded`` field value into its elements, left to right.

    Each element maps lower-case parameter names (``for``, ``by``, ``proto``, ``host``) to
    their values, unquoted. Repeated fields joined with ``,`` parse as one list.

    Raises:
        ValueError: the value does not follow the RFC 7239 section 4 grammar.
    """
    elements: list[dict[str, str]] = []
    element: dict[str, str] = {}
    i, n = 0, len(value)
    while True:
        while i < n and value[i] in " \t":
            i += 1
        if i < n and value[i] not in ",;":
            eq = value.find("=", i)
            if eq < 0:
                raise ValueError("a forwarded-pair without '='")
            name = value[i:eq].strip().lower()
            if not name or not _TOKEN.fullmatch(name):
                raise ValueError(f"bad parameter name {name!r}")
            i = eq + 1
            if i < n and value[i] == '"':
                i += 1
                chars: list[str] = []
                while i < n and value[i] != '"':
                    if value[i] == "\\" and i + 1 < n:
                        i += 1
                    chars.append(value[i])
                    i += 1
                if i >= n:
                    raise ValueError("unterminated quoted-string")
                i += 1
                text = "".join(chars)
            else:
                start = i
                while i < n and value[i] not in ",; \t":
                    i += 1
                text = value[start:i]
                if not _TOKEN.fullmatch(text):
                    raise ValueError(f"bad token {text!r}")
            if name in element:
                raise ValueError(f"parameter {name!r} repeated in one element")
            element[name] = text
            while i < n and value[i] in " \t":
                i += 1
        if i >= n:
            elements.append(element)
            return elements
        if value[i] == ";":
            i += 1
        elif value[i] == ",":
            elements.append(element)
            element = {}
            i += 1
        else:
            raise ValueError(f"unexpected {value[i]!r}")


_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")


class ProxyHeaders:
    """Applies forwarded headers to the environ of a request from a trusted peer.

    Which header sets what (the value of the nearest trusted proxy wins):

    ========================  =======================================================
    ``Forwarded`` (RFC 7239)  ``for`` → REMOTE_ADDR (and REMOTE_PORT), ``proto`` →
                              wsgi.url_scheme, ``host`` → HTTP_HOST, SERVER_NAME,
                              SERVER_PORT; from the element of the rightmost untrusted
                              hop. When present, the three X-Forwarded headers below
                              are ignored.
    ``X-Forwarded-For``       REMOTE_ADDR: the rightmost untrusted hop; REMOTE_PORT
                              becomes ``0`` unless the hop carries a port.
    ``X-Forwarded-Proto``     wsgi.url_scheme (``http``, ``https``; ``ws``/``wss`` map
                              to them); the last value.
    ``X-Forwarded-Host``      HTTP_HOST, SERVER_NAME, SERVER_PORT; the last value.
    ``X-Forwarded-Port``      SERVER_PORT (and HTTP_HOST's port); the last value.
    ``X-Forwarded-Prefix``    prepended to SCRIPT_NAME (the proxy mounts the app there
                              and strips it from the path); the last value.
    ========================  =======================================================

    Only the fields in ``names`` are interpreted; the other forwarding headers are removed from
    the environ first, so that neither the server nor the application acts on them (waitress's
    ``trusted_proxy_headers``). An instance with no names removes all six: that is what a
    request from an untrusted peer gets. A malformed value of a trusted field is ignored (the
    request is served as if it were absent) and stays in the environ, as the well-formed ones
    do, as ``HTTP_X_FORWARDED_*`` and ``HTTP_FORWARDED``.

    Args:
        trusted: the trusted peers, for picking the client among the hops.
        names: the lower-case field names of :data:`FORWARDING_HEADERS` to interpret (default
            all of them); see :func:`parse_trust_headers`.
    """

    __slots__ = ("names", "removed", "trusted")

    def __init__(
        self, trusted: TrustedPeers, names: frozenset[str] = frozenset(FORWARDING_HEADERS)
    ) -> None:
        self.trusted = trusted
        self.names = names
        #: The environ keys of the forwarding headers not in ``names``.
        self.removed: tuple[str, ...] = tuple(
            key for name, key in FORWARDING_HEADERS.items() if name not in names
        )

    def apply(self, environ: dict[str, Any]) -> None:
        """Remove the untrusted forwarding headers of ``environ``, then rewrite it in place from
        the trusted ones. Loop thread or pool thread."""
        if _FORWARDING_KEYS.isdisjoint(environ):
            return  # the usual request: no forwarding header at all (one pass in C)
        for key in self.removed:
            environ.pop(key, None)
        forwarded = environ.get("HTTP_FORWARDED")
        if forwarded is not None:
            self._forwarded(environ, forwarded)
        else:
            value = environ.get("HTTP_X_FORWARDED_FOR")
            if value is not None:
                hops = [hop.strip() for hop in value.split(",")]
                if all(hops):
                    self._set_client(environ, self.trusted.client_of(hops))
            value = environ.get("HTTP_X_FORWARDED_PROTO")
            if value is not None:
                self._set_scheme(environ, _last(value))
            value = environ.get("HTTP_X_FORWARDED_HOST")
            if value is not None:
                self._set_host(environ, _last(value))
        value = environ.get("HTTP_X_FORWARDED_PORT")
        if value is not None:
            port = _last(value)
            if port.isdigit() and len(port) <= 5 and int(port) <= 65535:
                environ["SERVER_PORT"] = port
                host = environ.get("HTTP_HOST")
                if host:
                    split = _split_host(host)
                    if split is not None:
                        name = split[0]
                        default = _DEFAULT_PORTS.get(environ["wsgi.url_scheme"])
                        environ["HTTP_HOST"] = name if port == default else f"{name}:{port}"
        value = environ.get("HTTP_X_FORWARDED_PREFIX")
        if value is not None:
            prefix = _last(value).rstrip("/")
            if prefix and _PREFIX.fullmatch(prefix):
                if "%" in prefix:
                    prefix = unquote_to_bytes(prefix).decode("latin-1")
                environ["SCRIPT_NAME"] = prefix + environ["SCRIPT_NAME"]

    def _forwarded(self, environ: dict[str, Any], value: str) -> None:
        try:
            elements = parse_forwarded(value)
        except ValueError:
            return
        chosen = elements[0]
        if not self.trusted.always:
            for element in reversed(elements):
                node = element.get("for")
                if node is None or _node(node)[0] not in self.trusted:
                    chosen = element
                    break
        node = chosen.get("for")
        if node:
            self._set_client(environ, node)
        proto = chosen.get("proto")
        if proto is not None:
            self._set_scheme(environ, proto)
        host = chosen.get("host")
        if host is not None:
            self._set_host(environ, host)

    @staticmethod
    def _set_client(environ: dict[str, Any], hop: str) -> None:
        host, port = _node(hop)
        environ["REMOTE_ADDR"] = host
        environ["REMOTE_PORT"] = port or "0"

    @staticmethod
    def _set_scheme(environ: dict[str, Any], value: str) -> None:
        scheme = _SCHEMES.get(value.strip().lower())
        if scheme is not None:
            environ["wsgi.url_scheme"] = scheme

    @staticmethod
    def _set_host(environ: dict[str, Any], value: str) -> None:
        split = _split_host(value.strip())
        if split is None:
            return
        name, port = split
        environ["HTTP_HOST"] = value.strip()
        environ["SERVER_NAME"] = name[1:-1] if name.startswith("[") else name
        environ["SERVER_PORT"] = port or _DEFAULT_PORTS.get(environ["wsgi.url_scheme"], "80")


def _last(value: str) -> str:
    """The last of comma-separated values: the one the nearest proxy set."""
    return value.rpartition(",")[2].strip()


# -- per server ----------------------------------------------------------------------------------


class ProxySettings(Protocol):
    """The settings :class:`ProxySupport` reads, as :class:`asyncwsgi.config.Config` has them."""

    @property
    def proxy_headers(self) -> bool: ...
    @property
    def forwarded_allow_ips(self) -> str | None: ...
    @property
    def forwarded_trust_headers(self) -> str: ...
    @property
    def proxy_protocol(self) -> bool: ...


class ProxySupport:
    """The proxy settings of one server, decided once per connection. Immutable.

    Args:
        config: the server's settings (a :class:`asyncwsgi.config.Config`); ``proxy_headers``,
            ``forwarded_allow_ips`` (None: ``127.0.0.1``), ``forwarded_trust_headers`` and
            ``proxy_protocol`` are used.

    Raises:
        ConfigError: ``forwarded_allow_ips`` or ``forwarded_trust_headers`` is malformed.
    """

    __slots__ = ("headers", "protocol", "trusted", "untrusted")

    def __init__(self, config: ProxySettings) -> None:
        self.trusted = TrustedPeers(config.forwarded_allow_ips or "127.0.0.1")
        #: The header rewriter of trusted peers, or None when ``--no-proxy-headers``.
        self.headers: ProxyHeaders | None = None
        #: What untrusted peers get: removes every forwarding header; None likewise.
        self.untrusted: ProxyHeaders | None = None
        if config.proxy_headers:
            names = parse_trust_headers(config.forwarded_trust_headers)
            self.headers = ProxyHeaders(self.trusted, names)
            self.untrusted = ProxyHeaders(self.trusted, frozenset())
        self.protocol = config.proxy_protocol

    def for_peer(self, host: str | None) -> tuple[ProxyHeaders | None, ProxyProtocolReader | None]:
        """What a connection from ``host`` gets: the header rewriter and a PROXY reader.

        Args:
            host: the peer's IP address, or None for a UNIX-socket peer (always trusted: only
                processes allowed to open the socket file can connect).

        Returns:
            ``(headers, reader)``: ``headers`` is None with ``--no-proxy-headers``, and for an
            untrusted peer removes the forwarding headers without applying them; ``reader`` is
            None when ``--proxy-protocol`` is off or the peer is not trusted.
        """
        if self.headers is None and not self.protocol:
            return None, None  # both off: no address to look at
        if host is not None and host not in self.trusted:
            return self.untrusted, None
        return self.headers, (ProxyProtocolReader() if self.protocol else None)

    def headers_for(self, host: str) -> ProxyHeaders | None:
        """The header rewriter for a client whose address came from a PROXY header: the HTTP
        headers are that client's, so they get what a direct connection from it would get."""
        return self.headers if host in self.trusted else self.untrusted
