"""The PROXY protocol: HAProxy's v1 (text) or v2 (binary) header at the start of a TCP
connection. Pure: no I/O. Loop thread.

HAProxy, AWS NLB, GCP and Azure load balancers send it (``--proxy-protocol``) to tell the server
the client's address and port; it is believed only from peers in ``--forwarded-allow-ips`` (see
:class:`asyncwsgi.proxy.ProxySupport`). The specification is
https://www.haproxy.org/download/2.9/doc/proxy-protocol.txt.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Final, Literal

__all__ = [
    "V2_SIGNATURE",
    "ProxyInfo",
    "ProxyProtocolError",
    "ProxyProtocolReader",
    "parse_proxy_header",
]

#: The 12 bytes a PROXY protocol v2 header starts with.
V2_SIGNATURE: Final = b"\r\n\r\n\x00\r\nQUIT\n"
_V1_PREFIX: Final = b"PROXY "
_V1_MAX: Final = 107  # the longest v1 line, CRLF included (section 2.1)
_V2_FAMILIES: Final = {0x11: 4, 0x12: 4, 0x21: 16, 0x22: 16}


class ProxyProtocolError(ValueError):
    """A PROXY protocol header is malformed: answer 400 and close the connection."""


@dataclass(frozen=True, slots=True)
class ProxyInfo:
    """What a PROXY protocol header says about the connection.

    Attributes:
        version: 1 (text) or 2 (binary).
        source: the client's (address, port), or None when the header carries none (v1
            ``UNKNOWN``, v2 ``LOCAL`` such as a load balancer's health check, UNIX or
            unspecified families): then the connection's own addresses stand.
        destination: the (address, port) the client connected to, or None likewise.
    """

    version: Literal[1, 2]
    source: tuple[str, int] | None
    destination: tuple[str, int] | None


def parse_proxy_header(data: bytes | bytearray) -> tuple[ProxyInfo | None, int] | None:
    """Parse a PROXY protocol header at the start of ``data``.

    Returns:
        None when more bytes are needed to decide; ``(None, 0)`` when ``data`` does not start
        with a PROXY header (it is the first request itself); ``(info, length)`` for a complete
        header of ``length`` bytes.

    Raises:
        ProxyProtocolError: the bytes start like a PROXY header but are not a valid one.
    """
    if data[:6] == _V1_PREFIX:
        return _parse_v1(data)
    if data[:12] == V2_SIGNATURE:
        return _parse_v2(data)
    if len(data) < 12 and (
        V2_SIGNATURE.startswith(data) or (len(data) < 6 and _V1_PREFIX.startswith(data))
    ):
        return None
    return None, 0


def _parse_v1(data: bytes | bytearray) -> tuple[ProxyInfo, int] | None:
    end = data.find(b"\r\n", 0, _V1_MAX)
    if end < 0:
        if len(data) >= _V1_MAX:
            raise ProxyProtocolError("PROXY v1 line longer than 107 bytes")
        return None
    parts = bytes(data[:end]).split(b" ")
    if len(parts) >= 2 and parts[1] == b"UNKNOWN":
        return ProxyInfo(1, None, None), end + 2
    if len(parts) != 6 or parts[1] not in (b"TCP4", b"TCP6"):
        raise ProxyProtocolError("PROXY v1 line is not 'PROXY TCP4|TCP6 SRC DST SPORT DPORT'")
    version = 4 if parts[1] == b"TCP4" else 6
    source = (_v1_address(parts[2], version), _v1_port(parts[4]))
    destination = (_v1_address(parts[3], version), _v1_port(parts[5]))
    return ProxyInfo(1, source, destination), end + 2


def _v1_address(text: bytes, version: int) -> str:
    try:
        address = ipaddress.ip_address(text.decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        raise ProxyProtocolError("PROXY v1 address is not an IP address") from None
    if address.version != version:
        raise ProxyProtocolError(f"PROXY v1 address is not IPv{version}")
    return str(address)


def _v1_port(text: bytes) -> int:
    if not (text.isdigit() and len(text) <= 5 and int(text) <= 65535):
        raise ProxyProtocolError("PROXY v1 port is not a number from 0 to 65535")
    return int(text)


def _parse_v2(data: bytes | bytearray) -> tuple[ProxyInfo, int] | None:
    if len(data) < 16:
        return None
    version_command, family = data[12], data[13]
    length = int.from_bytes(data[14:16], "big")
    if version_command >> 4 != 2:
        raise ProxyProtocolError("PROXY v2 header with a version other than 2")
    command = version_command & 0x0F
    if command > 1:
        raise ProxyProtocolError("PROXY v2 header with an unknown command")
    if len(data) < 16 + length:
        return None
    total = 16 + length
    if command == 0:  # LOCAL: the proxy's own connection (health checks); addresses ignored
        return ProxyInfo(2, None, None), total
    size = _V2_FAMILIES.get(family)
    if size is None:
        if family in (0x00, 0x31, 0x32):  # UNSPEC, UNIX stream/datagram: no IP address
            return ProxyInfo(2, None, None), total
        raise ProxyProtocolError("PROXY v2 header with an unknown address family")
    if length < 2 * size + 4:
        raise ProxyProtocolError("PROXY v2 address block shorter than its family needs")
    block = bytes(data[16 : 16 + 2 * size + 4])
    make = ipaddress.IPv4Address if size == 4 else ipaddress.IPv6Address
    source = (str(make(block[:size])), int.from_bytes(block[2 * size : 2 * size + 2], "big"))
    destination = (
        str(make(block[size : 2 * size])),
        int.from_bytes(block[2 * size + 2 : 2 * size + 4], "big"),
    )
    return ProxyInfo(2, source, destination), total


class ProxyProtocolReader:
    """Collects the bytes at the start of one connection until its PROXY header is complete.

    Sans-IO: the channel passes what it received to :meth:`feed` until it gets the bytes that
    follow the header, which are HTTP. A connection that does not start with a header is
    served as it is (as gunicorn's ``proxy_protocol = auto``; HAProxy's health checks, for one,
    come without a header unless ``check-send-proxy`` is set). Loop thread only.
    """

    __slots__ = ("_buffer", "info")

    def __init__(self) -> None:
        self._buffer = bytearray()
        #: The parsed header, once :meth:`feed` has returned bytes; None if there was none.
        self.info: ProxyInfo | None = None

    def feed(self, data: bytes) -> bytes | None:
        """Take received bytes; return None while the header is incomplete, then the bytes
        after it (possibly empty).

        Raises:
            ProxyProtocolError: the header is malformed.
        """
        buffer = self._buffer
        buffer += data
        result = parse_proxy_header(buffer)
        if result is None:
            return None
        self.info, length = result
        rest = bytes(buffer[length:])
        buffer.clear()
        return rest
