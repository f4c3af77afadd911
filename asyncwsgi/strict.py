"""Strictness checks on top of h11, where h11 0.16 is lenient.

h11 parses and frames; these functions only refuse what h11 would let through and what a
request-smuggling attack needs an ambiguity for (RFC 9112 section 11.2). Each raises
:class:`~asyncwsgi.errors.RequestRejected` with the status to answer. Pure functions, any thread.
"""

from __future__ import annotations

from collections.abc import Iterable

import h11

from .config import Config
from .errors import RequestRejected

__all__ = ["check_partial_head", "check_head", "check_request", "check_trailers"]

_DIGITS = frozenset(b"0123456789")

# RFC 9110 section 6.5.1: fields a sender must not put in trailers because they frame,
# route or authenticate the message, or alter how its content is processed.
_FORBIDDEN_TRAILERS = frozenset(
    {
        b"content-length",
        b"transfer-encoding",
        b"host",
        b"trailer",
        b"te",
        b"connection",
        b"keep-alive",
        b"upgrade",
        b"expect",
        b"content-encoding",
        b"content-type",
        b"content-range",
        b"range",
        b"authorization",
        b"cookie",
        b"set-cookie",
        b"proxy-authorization",
    }
)


def check_partial_head(head: bytes, config: Config) -> None:
    """Check an incomplete request head against the request-line and head limits.

    Called while the head is still arriving, so that an oversized request line is refused as
    soon as it is too long rather than after the client has sent the rest.

    Raises:
        RequestRejected: 414 for a request line over ``limit_request_line`` bytes, 431 for a head
            over ``limit_request_head`` bytes or a field line over ``limit_request_field_size``.
    """
    line_end = head.find(b"\r\n")
    if line_end < 0:
        if len(head) > config.max_request_line:
            raise RequestRejected(414, "request line too long")
        return
    if line_end > config.max_request_line:
        raise RequestRejected(414, "request line too long")
    if len(head) > config.limit_request_head:
        raise RequestRejected(431, "request head too large")
    last_line_start = head.rfind(b"\r\n") + 2
    if len(head) - last_line_start > config.max_field_size:
        raise RequestRejected(431, "request header field too large")


def check_head(head: bytes, config: Config) -> None:
    """Check a complete raw request head, request line included, before h11 parses it.

    Args:
        head: the head from the request line up to and including the CRLF that ends the last
            field line; empty lines before the request line already stripped.
        config: the ``limit_request_*`` values.

    Raises:
        RequestRejected: 400 for a bare CR or LF line ending (RFC 9112 section 2.2), obs-fold
            (section 5.2), a Content-Length that is not one plain decimal number, Content-Length
            together with Transfer-Encoding, a Transfer-Encoding other than a single ``chunked``
            (section 6.1), more than one Host (section 3.2); 414 and 431 for the limits.
    """
    lines = head.split(b"\r\n")
    lines.pop()  # the empty string after the final CRLF
    # A bare CR or LF would make some peer see a different message than we do.
    if head.count(b"\n") != len(lines) or head.count(b"\r") != len(lines):
        raise RequestRejected(400, "bare CR or LF in request head")
    if len(lines[0]) > config.max_request_line:
        raise RequestRejected(414, "request line too long")
    if len(lines) - 1 > config.limit_request_fields:
        raise RequestRejected(431, "too many header fields")
    if len(head) > config.limit_request_head:
        raise RequestRejected(431, "request head too large")
    max_field = config.max_field_size
    content_length = transfer_encoding = host = 0
    for line in lines[1:]:
        if len(line) > max_field:
            raise RequestRejected(431, "request header field too large")
        first = line[:1]
        if first == b" " or first == b"\t":
            raise RequestRejected(400, "obsolete line folding in request head")
        # Only the framing and routing fields need more than h11 checks.
        if first not in b"CcTtHh":
            continue
        name, sep, value = line.partition(b":")
        lname = name.lower()
        if lname == b"content-length":
            content_length += 1
            value = value.strip(b" \t")
            if not value or not _DIGITS.issuperset(value):
                raise RequestRejected(400, "malformed Content-Length")
        elif lname == b"transfer-encoding":
            transfer_encoding += 1
            if value.strip(b" \t").lower() != b"chunked":
                raise RequestRejected(400, "unsupported Transfer-Encoding")
        elif lname == b"host":
            host += 1
    if content_length > 1:
        raise RequestRejected(400, "more than one Content-Length")
    if transfer_encoding:
        if transfer_encoding > 1:
            raise RequestRejected(400, "more than one Transfer-Encoding")
        if content_length:
            raise RequestRejected(400, "both Content-Length and Transfer-Encoding")
        if lines[0].endswith(b" HTTP/1.0"):
            raise RequestRejected(400, "Transfer-Encoding in an HTTP/1.0 request")
    if host > 1:
        raise RequestRejected(400, "more than one Host")


def check_request(request: h11.Request) -> None:
    """Check the parsed request line: version, and a target form the method allows.

    Raises:
        RequestRejected: 505 for an HTTP version other than 1.0 and 1.1; 501 for CONNECT, which
            a WSGI server does not tunnel; 400 for a target that is neither origin-form nor
            absolute-form, or ``*`` with a method other than OPTIONS (RFC 9112 section 3.2).
    """
    version = request.http_version
    if version != b"1.1" and version != b"1.0":
        raise RequestRejected(505, "HTTP version not supported")
    target = request.target
    if target[:1] == b"/":
        return
    method = request.method
    if method == b"CONNECT":
        raise RequestRejected(501, "CONNECT is not supported")
    if target == b"*":
        if method != b"OPTIONS":
            raise RequestRejected(400, "asterisk-form target is only allowed with OPTIONS")
        return
    lowered = target[:8].lower()
    if lowered.startswith(b"http://") or lowered.startswith(b"https://"):
        return
    raise RequestRejected(400, "invalid request target")


def check_trailers(headers: Iterable[tuple[bytes, bytes]]) -> None:
    """Refuse trailer fields that frame, route or authenticate (RFC 9110 section 6.5.1).

    Raises:
        RequestRejected: 400 when a forbidden field is in the trailer section.
    """
    for name, _ in headers:
        if name in _FORBIDDEN_TRAILERS:
            raise RequestRejected(400, "forbidden field in trailer section")
