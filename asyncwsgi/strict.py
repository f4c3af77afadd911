"""Strictness checks on top of h11, where h11 0.16 is lenient.

h11 parses and frames; these functions only refuse what h11 would let through and what a
request-smuggling or header-confusion attack needs an ambiguity for (RFC 9112 section 11.2).
Each raises :class:`~asyncwsgi.errors.RequestRejected` with the status to answer. Pure functions,
any thread.

What h11 0.16 already refuses, and is therefore not checked again here: a request line that is
not ``token SP 1*VCHAR SP HTTP/DIGIT.DIGIT`` (a method with a non-token byte, a NUL, a space too
many, ``HTTP/111``), a field name that is not a token or is followed by whitespace before the
colon, NUL, CR, LF, VT or FF inside a field value, a Content-Length that is not ``1*DIGIT`` or
a list of differing values, any Transfer-Encoding other than one ``chunked`` (with status 501),
a chunk size that does not start with a hex digit or is followed by anything but ``;``, OWS or
CRLF, a chunk not followed by CRLF (h11 0.16 fixed CVE-2025-43859), a missing or repeated Host
in HTTP/1.1.

What h11 refuses although it is valid, and these checks give h11 in a form it takes, with the
same meaning (:func:`check_head` and :func:`check_chunk_line` return the rewritten bytes):
``HTTP/1.2`` to ``HTTP/1.9`` (RFC 9110 section 2.5: served as HTTP/1.1), empty elements in
Transfer-Encoding (RFC 9110 section 5.6.1), more than 20 digits in a Content-Length or chunk
size when leading zeros make up the excess, and BWS before a chunk extension's ``;`` (RFC 9112
section 7.1.1). Empty lines before a request line (RFC 9112 section 2.2) are skipped by
:class:`asyncwsgi.http11.ServerConnection`.

What h11 lets through, and these checks refuse:

- on the raw head (:func:`check_head`, :func:`check_partial_head`): bare LF line endings (h11
  splits lines at ``\\n``) and bare CR; obs-fold (h11 unfolds it); control characters other than
  HTAB in any field value (h11 allows them, RFC 9110 section 5.5 lets a recipient reject them); a
  Content-Length with OWS inside, a list (``5, 5``) or a second Content-Length line; every
  Transfer-Encoding problem with its RFC status (400 or 501), Transfer-Encoding with
  Content-Length, Transfer-Encoding in HTTP/1.0; a second Content-Type; a Host value that is not
  ``uri-host [":" port]``; and the request-line, field-count, field-size and head-size limits;
- on the parsed request line (:func:`check_request`): CONNECT, versions other than 1.0 and 1.1,
  target forms the method does not allow, a fragment in the target, an absolute-form target
  whose authority is empty or not ``uri-host [":" port]``;
- on each raw chunk-size line (:func:`check_chunk_line`): anything but ``1*HEXDIG`` followed by
  well-formed chunk extensions (h11 takes ``;.*``, bare CR and control bytes included, and
  trailing whitespace);
- on the trailer section (:func:`check_trailer_section`, :func:`check_trailers`): the same line
  checks as the head, and fields that must not be trailers (RFC 9110 section 6.5.1).
"""

from __future__ import annotations

import re
import sys
from collections.abc import Iterable
from typing import Final, NamedTuple, Protocol

from .errors import RequestRejected

__all__ = [
    "CHUNKED",
    "UNLIMITED",
    "RequestLimits",
    "check_partial_head",
    "check_partial_trailers",
    "check_trailers_at",
    "check_head",
    "check_request",
    "check_chunk_line",
    "check_trailer_section",
    "check_trailers",
    "absolute_form_authority",
    "absolute_form_path",
]

#: What :func:`check_head` returns for a request whose body is chunked.
CHUNKED: Final = -1

#: A limit that is never reached (``0`` in a ``limit_request_*`` setting, as in gunicorn).
UNLIMITED: Final = sys.maxsize


class RequestLimits(NamedTuple):
    """The request limits, in bytes or fields, with gunicorn's names; any value may be
    :data:`UNLIMITED`. Build it with :meth:`of`, which maps a setting's 0 to :data:`UNLIMITED`.

    Attributes:
        request_line: the request line (414 above it).
        fields: the number of header fields, and of trailer fields (431 above it).
        field_size: one field line, its CRLF included (431 above it).
        head: the whole request head (431 above it).
        body: the request body (413 above it).
    """

    request_line: int = UNLIMITED
    fields: int = UNLIMITED
    field_size: int = UNLIMITED
    head: int = UNLIMITED
    body: int = UNLIMITED

    @classmethod
    def of(
        cls, request_line: int, fields: int, field_size: int, head: int, body: int
    ) -> RequestLimits:
        """Return the limits, each 0 (a setting's "no limit") as :data:`UNLIMITED`."""
        return cls(
            *(value or UNLIMITED for value in (request_line, fields, field_size, head, body))
        )


class RequestLine(Protocol):
    """The parsed request line :func:`check_request` reads."""

    @property
    def method(self) -> bytes: ...

    @property
    def target(self) -> bytes: ...

    @property
    def http_version(self) -> bytes: ...


_DIGITS = frozenset(b"0123456789")
# h11's limit for a Content-Length and a chunk size: 20 digits, leading zeros included. Longer
# values are given to h11 without their leading zeros; bigger ones are refused.
_MAX_LENGTH_DIGITS = 20

# A request line ending in HTTP/1.2 to HTTP/1.9 (h11 takes one digit on each side of the dot).
_MINOR_VERSION_ABOVE_1 = re.compile(rb" HTTP/1\.[2-9]\Z")

# Every control character but HTAB. In a head or trailer section, the only ones allowed are the
# CR and LF of each CRLF: RFC 9112 section 2.2 (no bare CR or LF), RFC 9110 section 5.5 (no
# control character in a field value; h11 only refuses NUL, CR and LF there).
_CTL = bytes(range(0x20)).replace(b"\t", b"") + b"\x7f"

# RFC 9110 section 5.6.2 token, section 5.6.4 quoted-string.
_TOKEN = rb"[-!#$%&'*+.^_`|~0-9A-Za-z]+"
_QUOTED = rb'"(?:[\t !#-\[\]-~\x80-\xff]|\\[\t -~\x80-\xff])*"'

# RFC 9112 section 7.1: chunk-size [ chunk-ext ], chunk-ext = *( BWS ";" BWS chunk-ext-name
# [ BWS "=" BWS chunk-ext-val ] ), chunk-ext-val = token / quoted-string. Nothing else, no OWS
# at the end.
_CHUNK_LINE = re.compile(
    rb"([0-9A-Fa-f]+)(?:[ \t]*;[ \t]*%s(?:[ \t]*=[ \t]*(?:%s|%s))?)*" % (_TOKEN, _TOKEN, _QUOTED)
)

# RFC 9112 section 3.2 / RFC 3986 section 3.2.2: Host = uri-host [ ":" port ]; uri-host is an
# IP-literal in brackets or a reg-name (IPv4 addresses are reg-names syntactically).
_HOST = re.compile(
    rb"(?:\[[0-9A-Za-z:.!$&'()*+,;=_~%-]+\]|[0-9A-Za-z.!$&'()*+,;=_~%-]*)(?::[0-9]*)?"
)

# RFC 3986 section 3.2.1: userinfo = *( unreserved / pct-encoded / sub-delims / ":" ).
_USERINFO = re.compile(rb"[-0-9A-Za-z._~%!$&'()*+,;=:]*")

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


def check_partial_head(head: bytes | bytearray, limits: RequestLimits) -> None:
    """Check a request head that has not yet ended with an empty line.

    Called while the head is still arriving, so that an oversized request line is refused as
    soon as it is too long rather than after the client has sent the rest, and so that h11,
    which also ends a head at ``\\n\\n`` or ``\\n\\r\\n``, never parses a head ended by a bare LF.

    Args:
        head: the bytes received so far (no ``\\r\\n\\r\\n`` among them).
        limits: the request limits.

    Raises:
        RequestRejected: 400 for a bare LF that h11 would take as the end of the head; 414 for a
            request line over ``limit_request_line`` bytes; 431 for a head over
            ``limit_request_head`` bytes or a field line over ``limit_request_field_size``.
    """
    if head.find(b"\n\n") >= 0 or head.find(b"\n\r\n") >= 0:
        raise RequestRejected(400, "bare LF line ending in request head")
    # The unfinished last line, without the CR of its CRLF if that has arrived alone.
    size = len(head) - 1 if head[-1:] == b"\r" else len(head)
    line_end = head.find(b"\r\n")
    if line_end < 0:
        if size > limits.request_line:
            raise RequestRejected(414, "request line too long")
        return
    if line_end > limits.request_line:
        raise RequestRejected(414, "request line too long")
    if len(head) > limits.head:
        raise RequestRejected(431, "request head too large")
    if size - (head.rfind(b"\r\n") + 2) + 2 > limits.field_size:
        raise RequestRejected(431, "request header field too large")


def _check_controls(lines: bytes | bytearray, where: str) -> int:
    """Refuse a bare CR or LF (some peer would see another message) or another control
    character; return the number of CRLFs. One C-level pass for the common case."""
    crlf = lines.count(b"\r\n")
    if len(lines) - len(lines.translate(None, _CTL)) != 2 * crlf:
        # Deleted bytes beyond the CRLFs: there is no CR or LF without the other only if
        # there are as many of each as CRLFs.
        if lines.count(b"\n") != crlf or lines.count(b"\r") != crlf:
            raise RequestRejected(400, f"bare CR or LF in {where}")
        raise RequestRejected(400, f"control character in {where}")
    return crlf


def check_head(head: bytes | bytearray, limits: RequestLimits) -> tuple[int | None, bytes | None]:
    """Check a complete raw request head, request line included, before h11 parses it.

    Args:
        head: the head from the request line up to and including the CRLF that ends the last
            field line (the empty line that ends the head is not included).
        limits: the request limits. A field line's size counts its CRLF, as
            gunicorn counts it.

    Returns:
        ``(framing, rewritten)``: the body framing the head declares (the Content-Length,
        :data:`CHUNKED`, or None when it declares neither), and the same head in the form h11
        parses when h11 would refuse a valid one (else None): ``HTTP/1.x`` with x above 1 as
        ``HTTP/1.1`` (RFC 9110 section 2.5), a Content-Length of more than 20 digits without its
        leading zeros, and Transfer-Encoding fields whose elements are ``chunked`` and empty
        ones as one ``Transfer-Encoding: chunked`` (RFC 9110 section 5.6.1: empty list elements
        are ignored). The rewritten head has the same meaning; h11 is given it instead.

    Raises:
        RequestRejected: 400 for a bare CR or LF (RFC 9112 section 2.2), obs-fold (section 5.2),
            a control character in a field value (RFC 9110 section 5.5), a Content-Length that
            is not one plain decimal number, more than one Content-Length, Content-Type or Host,
            a Host that is not ``uri-host [":" port]`` (RFC 9112 section 3.2), Transfer-Encoding
            with Content-Length or in HTTP/1.0, ``chunked`` applied twice or not last (sections
            6.1, 6.3); 501 for a transfer coding other than ``chunked`` before a final
            ``chunked`` (section 6.1); 414 and 431 for the limits.
    """
    _check_controls(head, "request head")
    lines: list[bytes | bytearray] = head.split(b"\r\n")  # type: ignore[assignment]
    lines.pop()  # the empty string after the final CRLF
    if len(lines[0]) > limits.request_line:
        raise RequestRejected(414, "request line too long")
    if len(lines) - 1 > limits.fields:
        raise RequestRejected(431, "too many header fields")
    if len(head) > limits.head:
        raise RequestRejected(431, "request head too large")
    max_field = limits.field_size - 2  # the CRLF counts
    content_length: bytes | bytearray | None = None
    codings: list[bytes | bytearray] | None = None
    hosts = content_types = te_lines = 0
    rewrite = False
    request_line = lines[0]
    if request_line[-1:] not in (b"0", b"1") and _MINOR_VERSION_ABOVE_1.search(request_line):
        # RFC 9110 section 2.5: processed as the highest 1.x this server implements.
        lines[0] = request_line = request_line[:-1] + b"1"
        rewrite = True
    for index in range(1, len(lines)):
        line = lines[index]
        if len(line) > max_field:
            raise RequestRejected(431, "request header field too large")
        first = line[:1]
        if first == b" " or first == b"\t":
            raise RequestRejected(400, "obsolete line folding in request head")
        # Only the framing and routing fields need more than h11 checks.
        if first not in b"CcTtHh":
            continue
        name, _, value = line.partition(b":")
        name = name.lower()
        if name == b"content-length":
            if content_length is not None:
                raise RequestRejected(400, "more than one Content-Length")
            content_length = value.strip(b" \t")
            if not content_length or not _DIGITS.issuperset(content_length):
                raise RequestRejected(400, "malformed Content-Length")
            if len(content_length) > _MAX_LENGTH_DIGITS:
                # h11 takes at most 20 digits; leading zeros do not count.
                content_length = content_length.lstrip(b"0") or b"0"
                if len(content_length) > _MAX_LENGTH_DIGITS:
                    raise RequestRejected(400, "Content-Length too large")
                lines[index] = b"Content-Length: " + content_length
                rewrite = True
        elif name == b"transfer-encoding":
            if codings is None:
                codings = []
            te_lines += 1
            for coding in value.split(b","):
                coding = coding.strip(b" \t").lower()
                if coding:
                    codings.append(coding)
                else:
                    rewrite = True  # an empty list element
            if te_lines > 1:
                rewrite = True
        elif name == b"host":
            hosts += 1
            if _HOST.fullmatch(value.strip(b" \t")) is None:
                raise RequestRejected(400, "malformed Host")
        elif name == b"content-type":
            content_types += 1
    if hosts > 1:
        raise RequestRejected(400, "more than one Host")
    if content_types > 1:
        raise RequestRejected(400, "more than one Content-Type")
    framing: int | None
    if codings is not None:
        _check_transfer_encoding(codings, content_length is not None, request_line)
        framing = CHUNKED
        if rewrite:
            # h11 takes one Transfer-Encoding field whose value is ``chunked``.
            fields = [line for line in lines if line[:18].lower() != b"transfer-encoding:"]
            fields.insert(1, b"Transfer-Encoding: chunked")
            lines = fields
    else:
        framing = None if content_length is None else int(content_length)
    if not rewrite:
        return framing, None
    lines.append(b"")
    return framing, b"\r\n".join(lines)


def _check_transfer_encoding(
    codings: list[bytes | bytearray], content_length: bool, request_line: bytes | bytearray
) -> None:
    """Accept only a lone ``chunked``; answer the rest with the status RFC 9112 asks for."""
    if content_length:
        # Section 6.3 item 3: the classic request-smuggling ambiguity.
        raise RequestRejected(400, "both Content-Length and Transfer-Encoding")
    if request_line.endswith(b" HTTP/1.0"):
        # Section 6.1: an HTTP/1.0 message with Transfer-Encoding has faulty framing.
        raise RequestRejected(400, "Transfer-Encoding in an HTTP/1.0 request")
    if not codings:
        raise RequestRejected(400, "Transfer-Encoding without a transfer coding")
    if codings.count(b"chunked") > 1:
        raise RequestRejected(400, "chunked transfer coding applied more than once")
    if codings[-1] != b"chunked":
        # Section 6.3 item 4: the body length cannot be determined.
        raise RequestRejected(400, "chunked is not the final transfer coding")
    if len(codings) > 1:
        raise RequestRejected(501, "unsupported transfer coding")


def check_request(request: RequestLine) -> None:
    """Check the parsed request line: method, version, and a target form the method allows.

    Raises:
        RequestRejected: 501 for CONNECT, which a WSGI server does not tunnel; 505 for an HTTP
            version other than 1.0 and 1.1; 400 for a target that is neither origin-form nor
            absolute-form, ``*`` with a method other than OPTIONS (RFC 9112 section 3.2), or a
            target with a fragment (``#`` is not part of any request-target form).
    """
    method = request.method
    if method == b"CONNECT":
        raise RequestRejected(501, "CONNECT is not supported")
    version = request.http_version
    if version != b"1.1" and version != b"1.0":
        raise RequestRejected(505, "HTTP version not supported")
    target = request.target
    if b"#" in target:
        raise RequestRejected(400, "fragment in request target")
    if target[:1] == b"/":
        return
    if target == b"*":
        if method != b"OPTIONS":
            raise RequestRejected(400, "asterisk-form target is only allowed with OPTIONS")
        return
    lowered = target[:8].lower()
    if lowered.startswith(b"http://") or lowered.startswith(b"https://"):
        start = target.find(b"//") + 2
        raw = target[start : start + _authority_end(target, start)]
        userinfo, _, authority = raw.rpartition(b"@")
        # RFC 9110 section 4.2.1: an http(s) URI with an empty host is invalid; host[:port] must
        # read as a Host value would (RFC 9112 section 3.2), and userinfo (deprecated, section
        # 4.2.4, and never used here) as RFC 3986 section 3.2.1 has it.
        if (
            authority[:1] in (b"", b":")
            or _HOST.fullmatch(authority) is None
            or _USERINFO.fullmatch(userinfo) is None
        ):
            raise RequestRejected(400, "invalid authority in request target")
        return
    raise RequestRejected(400, "invalid request target")


def absolute_form_authority(target: bytes) -> bytes:
    """Return ``host[:port]`` of an absolute-form ``http://`` or ``https://`` request-target
    (RFC 9112 section 3.2.2): the authority, without any userinfo, which
    :func:`check_request` has validated."""
    start = target.find(b"//") + 2
    end = start + _authority_end(target, start)
    at = target.rfind(b"@", start, end)
    return target[at + 1 if at >= 0 else start : end]


def absolute_form_path(target: bytes) -> bytes:
    """Return the ``path[?query]`` of an absolute-form request-target, ``/`` for an empty path
    (RFC 9112 section 3.3)."""
    start = target.find(b"//") + 2
    rest = target[start + _authority_end(target, start) :]
    return rest if rest[:1] == b"/" else b"/" + rest


def _authority_end(target: bytes, start: int) -> int:
    """The length of the authority that starts at ``start``: up to ``/``, ``?`` or the end."""
    end = len(target)
    for mark in (b"/", b"?"):
        found = target.find(mark, start, end)
        if found >= 0:
            end = found
    return end - start


def check_chunk_line(line: bytes | bytearray) -> tuple[bool, bytes | None]:
    """Check one chunk-size line, without its CRLF, before h11 parses it.

    Returns:
        ``(last, rewritten)``: whether this is the last chunk (size 0), after which the trailer
        section follows; and, when h11 would refuse this valid line, a line of the same length
        that h11 takes with the same size (else None): the size without its leading zeros,
        padded with spaces (OWS, which h11 allows before the CRLF). h11 takes at most 20 hex
        digits and no BWS before a ``;`` (RFC 9112 section 7.1.1 allows it); it ignores chunk
        extensions, so dropping them changes nothing.

    Raises:
        RequestRejected: 400 for anything but ``1*HEXDIG`` followed by well-formed chunk
            extensions (RFC 9112 section 7.1): a sign, ``0x``, ``_``, whitespace around the
            size, a bare CR or another control character, a malformed extension; and for a
            size over 20 hex digits without its leading zeros.
    """
    match = _CHUNK_LINE.fullmatch(line)
    if match is None:
        raise RequestRejected(400, "malformed chunk size line")
    size = match.group(1)
    end = match.end(1)
    if len(size) <= _MAX_LENGTH_DIGITS and line[end : end + 1] not in (b" ", b"\t"):
        return not size.strip(b"0"), None
    size = size.lstrip(b"0")
    if len(size) > _MAX_LENGTH_DIGITS:
        raise RequestRejected(400, "chunk size too large")
    return not size, bytes(size or b"0").ljust(len(line))


def check_partial_trailers(buffered: bytes | bytearray, start: int) -> None:
    """Check a trailer section, from ``start`` in ``buffered``, that has not ended yet.

    Raises:
        RequestRejected: 400 for a bare LF that h11 would take as the end of the section.
    """
    if (
        buffered[start : start + 1] == b"\n"
        or buffered.find(b"\n\n", start) >= 0
        or buffered.find(b"\n\r\n", start) >= 0
    ):
        raise RequestRejected(400, "bare LF line ending in trailer section")


def check_trailer_section(section: bytes | bytearray, limits: RequestLimits) -> None:
    """Check a complete raw trailer section before h11 parses it.

    Args:
        section: the field lines, each with its CRLF, without the empty line that ends them.
        limits: the field-count and field-size limits apply to trailers as to the head.

    Raises:
        RequestRejected: 400 for a bare CR or LF, obs-fold or a control character; 431 for the
            limits.
    """
    crlf = _check_controls(section, "trailer section")
    if crlf > limits.fields:
        raise RequestRejected(431, "too many trailer fields")
    max_field = limits.field_size - 2
    for line in section.split(b"\r\n"):
        if len(line) > max_field:
            raise RequestRejected(431, "trailer field too large")
        if line[:1] == b" " or line[:1] == b"\t":
            raise RequestRejected(400, "obsolete line folding in trailer section")


def check_trailers_at(buffered: bytes | bytearray, start: int, limits: RequestLimits) -> bool:
    """Check the trailer section from ``start`` in ``buffered``, complete or not.

    Returns whether it is complete (then checked whole), empty (no fields) included.

    Raises:
        RequestRejected: as :func:`check_partial_trailers` and :func:`check_trailer_section`.
    """
    if buffered[start : start + 2] == b"\r\n":
        return True  # no trailer fields
    end = buffered.find(b"\r\n\r\n", start)
    if end < 0:
        check_partial_trailers(buffered, start)
        return False
    check_trailer_section(buffered[start : end + 2], limits)
    return True


def check_trailers(headers: Iterable[tuple[bytes, bytes]]) -> None:
    """Refuse trailer fields that frame, route or authenticate (RFC 9110 section 6.5.1).

    Raises:
        RequestRejected: 400 when a forbidden field is in the trailer section.
    """
    for name, _ in headers:
        if name in _FORBIDDEN_TRAILERS:
            raise RequestRejected(400, "forbidden field in trailer section")
