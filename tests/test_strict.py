"""Sans-IO tests of the strictness checks (:mod:`asyncwsgi.strict` through ``ServerConnection``).

No socket and no event loop: raw bytes go into :class:`asyncwsgi.http11.ServerConnection`, and
each test checks the :class:`~asyncwsgi.errors.RequestRejected` status, and that no request
hidden behind the malformed one is ever parsed. The first part has one test per published
advisory of a peer server or of h11; the second covers the other checks and the hooks that run
them on the bytes h11 holds (pipelined heads, chunk-size lines, trailer sections).

Every test runs twice: with the zero-copy view of h11's receive buffer, and with the
``trailing_data`` fallback that a future h11 might force.

waitress CVE-2022-31015 and CVE-2024-49769 (a crash, then a busy loop, when a client closes
before the server calls ``getpeername()``) are not request-parsing issues and have no test here.
"""

from __future__ import annotations

from typing import Any

import pytest

from asyncwsgi import _h11
from asyncwsgi.config import Config
from asyncwsgi.errors import RequestRejected
from asyncwsgi.events import END_OF_MESSAGE, Data, EndOfMessage, Request
from asyncwsgi.http11 import PAUSED, ServerConnection
from asyncwsgi.logs import escape
from asyncwsgi.state import request_limits
from asyncwsgi.wsgi import ResponseError, _encode_head, _path

#: Whether the checks may read h11's private buffer: the installed h11 has it, and
#: ``ASYNCWSGI_H11_PUBLIC_ONLY=1`` does not forbid it (CI runs this file both ways).
ZERO_COPY_AVAILABLE = _h11.PEEK_BUFFER

HEAD = b"POST /upload HTTP/1.1\r\nHost: example.com\r\n"
CHUNKED = HEAD + b"Transfer-Encoding: chunked\r\n\r\n"
SMUGGLED = b"GET /admin HTTP/1.1\r\nHost: example.com\r\n\r\n"


@pytest.fixture(autouse=True, params=["zero-copy", "trailing_data"])
def peek_mode(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run each test over both ways the checks read the bytes h11 has not parsed yet; with
    ``ASYNCWSGI_H11_PUBLIC_ONLY=1``, both runs take the public way, and the tests expect its
    outcomes."""
    zero_copy = request.param == "zero-copy" and ZERO_COPY_AVAILABLE
    monkeypatch.setattr(_h11, "PEEK_BUFFER", zero_copy)
    return "zero-copy" if zero_copy else "trailing_data"


def server(**options: Any) -> ServerConnection:
    return ServerConnection(request_limits(Config(**options)), None)


def targets(events: list[Any]) -> list[bytes]:
    return [event.target for event in events if type(event) is Request]


def body_of(events: list[Any]) -> bytes:
    return b"".join(bytes(event.data) for event in events if type(event) is Data)


def feed(conn: ServerConnection, *pieces: bytes) -> tuple[list[Any], RequestRejected | None]:
    """Feed ``pieces`` one read at a time; return the events delivered and the rejection."""
    events: list[Any] = []
    for piece in pieces:
        try:
            events += conn.receive_data(piece)
        except RequestRejected as exc:
            return events, exc
    return events, None


def rejected(*pieces: bytes, **options: Any) -> tuple[RequestRejected, list[Any]]:
    """Feed ``pieces`` to a fresh connection; fail unless it is rejected. Also return the events
    delivered before the rejection, and check that the connection stays rejected."""
    conn = server(**options)
    events, exc = feed(conn, *pieces)
    assert exc is not None, f"accepted: {events!r}"
    with pytest.raises(RequestRejected) as again:
        conn.receive_data(SMUGGLED)
    assert again.value is exc
    return exc, events


def accepted(*pieces: bytes, **options: Any) -> list[Any]:
    """Feed ``pieces`` to a fresh connection; fail if it is rejected."""
    events, exc = feed(server(**options), *pieces)
    assert exc is None, f"rejected: {exc}"
    return events


# -- advisories ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "fields",
    [
        pytest.param(b"Transfer-Encoding: chunked\r\nTransfer-Encoding: identity\r\n", id="te-te"),
        pytest.param(b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n", id="twice"),
        pytest.param(b"Transfer-Encoding: chunked, chunked\r\n", id="list-twice"),
        pytest.param(b"Transfer-Encoding: chunked, identity\r\n", id="not-last"),
        pytest.param(b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n", id="cl-te"),
        pytest.param(b"Transfer-Encoding: chunked\r\nContent-Length: 5\r\n", id="te-cl"),
    ],
)
def test_gunicorn_cve_2024_1135_conflicting_transfer_encoding(fields: bytes) -> None:
    """gunicorn CVE-2024-1135: conflicting Transfer-Encoding fields let a request be smuggled.

    Whatever two readings of the framing are possible, the request is refused with 400 before
    its head reaches the application, and the request hidden in its body is never parsed.
    """
    exc, events = rejected(HEAD + fields + b"\r\n0\r\n\r\n" + SMUGGLED)
    assert exc.status == 400
    assert events == []


@pytest.mark.parametrize(
    ("fields", "status"),
    [
        pytest.param(b"Transfer-Encoding: xchunked\r\nContent-Length: 34\r\n", 400, id="cl"),
        pytest.param(b"Transfer-Encoding: chunked-false\r\n", 400, id="bogus"),
        pytest.param(b"Transfer-Encoding: chunked;x=1\r\n", 400, id="params"),
        pytest.param(b"Transfer-Encoding: gzip, chunked\r\nContent-Length: 34\r\n", 400, id="gz"),
        pytest.param(b"Transfer-Encoding: gzip, chunked\r\n", 501, id="unsupported"),
    ],
)
def test_gunicorn_cve_2024_6827_transfer_encoding_not_validated(fields: bytes, status: int) -> None:
    """gunicorn CVE-2024-6827: an invalid Transfer-Encoding fell back to Content-Length (TE.CL).

    A Transfer-Encoding other than a lone ``chunked`` never falls back to another framing: it is
    refused, with 501 only for a well-formed coding list this server does not implement.
    """
    exc, events = rejected(HEAD + fields + b"\r\n" + SMUGGLED)
    assert exc.status == status
    assert events == []


@pytest.mark.parametrize(
    "pieces",
    [
        pytest.param((b"GET / HTTP/1.1\nHost: example.com\n\n",), id="all-lf"),
        pytest.param((b"GET / HTTP/1.1\r\nHost: example.com\nX: y\r\n\r\n",), id="one-lf"),
        pytest.param((b"GET / HTTP/1.1\r\nHost: example.com\r\n", b"\n"), id="lf-ends-head"),
        pytest.param((b"GET / HTTP/1.1\r\nHost: example.com\n", b"\r\n"), id="lf-crlf-ends"),
        pytest.param(
            (
                b"GET / HTTP/1.1\r\nHost: example.com\r\n"
                b"X: a\nContent-Length: 34\r\n\r\n" + SMUGGLED,
            ),
            id="lf-hides-field",
        ),
        pytest.param((CHUNKED + b"5\nhello\r\n0\r\n\r\n",), id="chunk-line"),
        pytest.param((CHUNKED + b"0\r\n\n",), id="empty-trailer-lf"),
        pytest.param((CHUNKED + b"0\r\nX: y\n\n",), id="trailer-lf"),
        pytest.param((CHUNKED + b"0\r\n", b"X: y\n", b"\r\n"), id="trailer-lf-pieces"),
    ],
)
def test_waitress_cve_2019_16785_bare_lf_line_endings(pieces: tuple[bytes, ...]) -> None:
    """waitress CVE-2019-16785: a bare LF accepted as a line ending allows request smuggling.

    h11 also ends lines and heads at a bare LF; every such line ending is refused before h11
    parses it, in a head arriving in pieces, in a chunk-size line and in a trailer section.
    """
    exc, events = rejected(*pieces)
    assert exc.status == 400
    assert SMUGGLED not in b"".join(pieces) or targets(events) == []
    assert all(type(event) is not EndOfMessage for event in events)


@pytest.mark.parametrize(
    ("coding", "status"),
    [
        pytest.param(b"gzip, chunked", 501, id="gzip-chunked"),
        pytest.param(b"identity, chunked", 501, id="identity-chunked"),
        pytest.param(b"chunked, gzip", 400, id="chunked-gzip"),
        pytest.param(b"identity", 400, id="identity"),
        pytest.param(b"gzip", 400, id="gzip"),
        pytest.param(b"", 400, id="empty"),
        pytest.param(b", ,", 400, id="empty-members-only"),
        pytest.param(b",gzip, chunked", 501, id="empty-member-gzip-chunked"),
    ],
)
def test_waitress_cve_2019_16786_invalid_transfer_encoding(coding: bytes, status: int) -> None:
    """waitress CVE-2019-16786: an unsupported Transfer-Encoding was ignored, not refused.

    RFC 9112 section 6.3: a request whose final coding is not ``chunked`` has no determinable
    length (400); section 6.1: a coding the server does not know gets 501.
    """
    exc, events = rejected(HEAD + b"Transfer-Encoding: " + coding + b"\r\n\r\n" + SMUGGLED)
    assert exc.status == status
    assert events == []


@pytest.mark.parametrize(
    "field",
    [
        pytest.param(b"Transfer-Encoding: \x0bchunked", id="vt-before"),
        pytest.param(b"Transfer-Encoding: chunked\x0c", id="ff-after"),
        pytest.param(b"Transfer-Encoding:\x1cchunked", id="fs-strip"),
        pytest.param(b"Content-Length: \x0b34", id="vt-length"),
        pytest.param(b"Content-Length: 34\x85", id="nel-length"),
        pytest.param(b"X-Padding: a\rContent-Length: 34", id="bare-cr"),
        pytest.param(b"Content-Length : 34", id="space-before-colon"),
    ],
)
def test_waitress_cve_2019_16789_invalid_whitespace_in_fields(field: bytes) -> None:
    """waitress CVE-2019-16789: whitespace other than SP/HTAB (``str.strip()``'s) or a bare CR
    in a field let a framing field be read differently than by a proxy.

    Only SP and HTAB are whitespace around a field value (RFC 9110 section 5.5); any other
    control character, a bare CR, or whitespace before the colon (RFC 9112 section 5.1) gets 400.
    """
    exc, events = rejected(HEAD + field + b"\r\n\r\n" + SMUGGLED)
    assert exc.status == 400
    assert events == []


@pytest.mark.parametrize(
    "fields",
    [
        pytest.param(b"Content-Length: 5\r\nContent-Length: 5\r\n", id="same"),
        pytest.param(b"Content-Length: 5\r\nContent-Length: 34\r\n", id="different"),
        pytest.param(b"Content-Length: 5, 5\r\n", id="list"),
        pytest.param(b"Content-Length: 5\r\ncontent-length: 0\r\n", id="case"),
    ],
)
def test_waitress_cve_2019_16792_two_content_lengths(fields: bytes) -> None:
    """waitress CVE-2019-16792: two Content-Length fields were not refused.

    RFC 9112 section 6.3 item 5: a recipient may accept identical repeated values; we do not,
    since some peer may take the first and another the list.
    """
    exc, events = rejected(HEAD + fields + b"\r\nhello" + SMUGGLED)
    assert exc.status == 400
    assert events == []


@pytest.mark.parametrize(
    "chunk",
    [
        pytest.param(b"+5\r\nhello\r\n", id="plus"),
        pytest.param(b"-5\r\nhello\r\n", id="minus"),
        pytest.param(b"0x5\r\nhello\r\n", id="0x"),
        pytest.param(b"0_5\r\nhello\r\n", id="underscore"),
        pytest.param(b" 5\r\nhello\r\n", id="space-before"),
        pytest.param(b"5 \r\nhello\r\n", id="space-after"),
        pytest.param(b"5\t\r\nhello\r\n", id="tab-after"),
        pytest.param(b"5;ext=val\rue\r\nhello\r\n", id="ext-bare-cr"),
        pytest.param(b"5;ext\x00\r\nhello\r\n", id="ext-nul"),
        pytest.param(b"5;ext=\x01\r\nhello\r\n", id="ext-ctl"),
        pytest.param(b'5;ext="open\r\nhello\r\n', id="ext-open-quote"),
        pytest.param(b"5;a b\r\nhello\r\n", id="ext-space"),
        pytest.param(b"5;\r\nhello\r\n", id="ext-empty"),
        pytest.param(b"5;ext=val \r\nhello\r\n", id="ext-trailing-space"),
    ],
)
def test_waitress_cve_2022_24761_chunk_size_and_extensions(chunk: bytes) -> None:
    """waitress CVE-2022-24761: chunk sizes like ``+0x5`` and unvalidated chunk extensions.

    h11 refuses a sign, ``0x``, ``_`` and leading whitespace; it takes ``;.*`` as the extension
    (bare CR and control bytes included) and whitespace before CRLF, which we refuse.
    """
    exc, events = rejected(CHUNKED + chunk + b"0\r\n\r\n" + SMUGGLED)
    assert exc.status == 400
    assert events == []
    # The same over a head that has already been delivered: the body is refused as it arrives.
    conn = server()
    assert targets(conn.receive_data(CHUNKED)) == [b"/upload"]
    events, exc2 = feed(conn, chunk + b"0\r\n\r\n" + SMUGGLED)
    assert exc2 is not None
    assert exc2.status == 400
    assert events == []


def test_waitress_cve_2022_24761_valid_chunk_extensions_pass() -> None:
    """waitress CVE-2022-24761, the other side: well-formed chunk extensions are accepted.

    (BWS before the first ``;``, which h11 refuses, is in
    ``test_valid_chunk_lines_that_h11_refuses``.)
    """
    events = accepted(
        CHUNKED + b'5; some; parameters=stuff;q="a \\"b\\" c"\r\nhello\r\n'
        b"00006;x = y ;z\r\n world\r\n000\r\n\r\n"
    )
    assert body_of(events) == b"hello world"
    assert type(events[-1]) is EndOfMessage


@pytest.mark.parametrize(
    ("first", "later"),
    [
        pytest.param(b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", b"", id="bad-head"),
        pytest.param(b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\n\r\n", b"", id="over-a-limit"),
        pytest.param(CHUNKED + b"5\r\nhello\r\nzz\r\n", b"", id="bad-chunk"),
        pytest.param(HEAD + b"Content-Length: 11\r\n\r\n", b"hello world", id="too-large"),
    ],
)
def test_waitress_cve_2024_49768_no_request_after_a_rejected_one(
    first: bytes, later: bytes
) -> None:
    """waitress CVE-2024-49768: a pipelined request behind an invalid one was still processed.

    Once a request is rejected, no later call parses anything: the pipelined request that came
    in the same read, and data that comes after, both raise the same rejection.
    """
    conn = server(limit_request_body=10)
    events, exc = feed(conn, first + SMUGGLED, later + SMUGGLED)
    assert exc is not None
    assert b"/admin" not in targets(events)
    for call in (
        conn.next_events,
        lambda: conn.receive_data(SMUGGLED),
        lambda: conn.receive_data(b""),
    ):
        with pytest.raises(RequestRejected) as again:
            call()
        assert again.value is exc
    assert conn.send_rejection(exc.status, exc.reason).startswith(b"HTTP/1.1 4")


@pytest.mark.parametrize(
    "text",
    [
        "/\x1b[2J\x1b[31mred",
        '/x" 200 0\n127.0.0.1:1 - "GET /forged HTTP/1.1',
        "/\r\n[2026-01-01 00:00:00 +0000] [1] [INFO] forged",
        "/\x00\x7f\x85\xa0",
        "/\u2028forged",
        "/back\\slash",
    ],
)
def test_uvicorn_cve_2020_7694_log_injection_is_escaped(text: str) -> None:
    """uvicorn CVE-2020-7694: control characters in the request path forged access-log lines.

    ``logs.escape`` makes every control character visible (``\\x1b``, C1 ones such as NEL
    included) and escapes the quote and the backslash, so a logged path can neither start a new
    line nor close the quoted request. The access line's target has only VCHARs (h11); the error
    log's ``METHOD /path`` has the percent-decoded path, so it can hold any latin-1 character.
    """
    assert len(escape(text).splitlines()) == 1
    escaped = escape(text)
    assert escaped.isprintable()
    assert '"' not in escaped.replace('\\"', "")
    assert escaped != text
    line = _path({"REQUEST_METHOD": "GET", "SCRIPT_NAME": "", "PATH_INFO": text})
    assert line.isprintable()
    assert line == "GET " + escaped


@pytest.mark.parametrize(
    ("status", "headers"),
    [
        pytest.param("200 OK", [("X-Test", "a\r\nSet-Cookie: evil=1")], id="value-crlf"),
        pytest.param("200 OK", [("X-Test", "a\nSet-Cookie: evil=1")], id="value-lf"),
        pytest.param("200 OK", [("X-Test", "a\rSet-Cookie: evil=1")], id="value-cr"),
        pytest.param("200 OK", [("X-Test", "a\x00b")], id="value-nul"),
        pytest.param("200 OK", [("X-Test\r\nSet-Cookie", "evil=1")], id="name-crlf"),
        pytest.param("200 OK\r\nSet-Cookie: evil=1", [], id="status-crlf"),
    ],
)
def test_uvicorn_cve_2020_7695_response_splitting(status: str, headers: list[Any]) -> None:
    """uvicorn CVE-2020-7695: CR/LF in response header values allowed HTTP response splitting.

    ``start_response`` arguments with CR, LF or NUL are refused (the app gets ResponseError).
    """
    with pytest.raises(ResponseError):
        _encode_head(status, headers)
    assert _encode_head("200 OK", [("X-Test", "a b")]) == (200, b"OK", [(b"X-Test", b"a b")])


@pytest.mark.parametrize(
    "pieces",
    [
        pytest.param((b"5\r\nhelloXX0\r\n\r\n",), id="one-read"),
        pytest.param((b"5\r\nhello", b"XX0\r\n\r\n"), id="footer-read-apart"),
        pytest.param((b"5\r\nhello\r", b"X0\r\n\r\n"), id="half-footer"),
        pytest.param((b"5\r\nhello\n0\r\n\r\n",), id="lf-footer"),
    ],
)
def test_h11_cve_2025_43859_lenient_chunk_terminator(pieces: tuple[bytes, ...]) -> None:
    """h11 CVE-2025-43859: h11 before 0.16 accepted any two bytes after a chunk as its CRLF.

    ``b"5\\r\\nhelloXX0\\r\\n\\r\\n"`` must be refused, and is, by our own check of the chunk
    footer as well as by h11 0.16, however the bytes are split across reads.
    """
    conn = server()
    events = conn.receive_data(CHUNKED)
    events, exc = feed(conn, *pieces, SMUGGLED)
    assert exc is not None
    assert exc.status == 400
    assert exc.reason == "chunk data not followed by CRLF"  # our check, not only h11's
    assert all(type(event) is not EndOfMessage for event in events)
    assert targets(events) == []


# -- the other checks -----------------------------------------------------------------------------


def test_zero_copy_view_is_h11_receive_buffer(peek_mode: str) -> None:
    """The checks read h11's own buffer without a copy (the installed h11 allows it), unless
    ``ASYNCWSGI_H11_PUBLIC_ONLY=1`` forbids it."""
    assert ZERO_COPY_AVAILABLE is not _h11.PUBLIC_ONLY
    conn = server()
    conn.receive_data(b"GET / HTTP/1.1\r\nHost: x\r\n\r\nGET /next HT")
    assert bytes(_h11.unparsed(conn._conn)) == conn._conn.trailing_data[0] == b"GET /next HT"
    if peek_mode == "zero-copy":
        assert _h11.unparsed(conn._conn) is conn._conn._receive_buffer._data


def test_every_pipelined_head_is_checked() -> None:
    """A head that arrived behind another is checked when its cycle starts, not skipped."""
    conn = server()
    events = conn.receive_data(
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\nGET /2 HTTP/1.1\r\nHost: x\r\nX: \x01\r\n\r\n"
    )
    assert targets(events) == [b"/"]
    assert events[-1] is PAUSED
    conn.send_response(204, b"No Content", [], None)
    conn.send_end()
    conn.start_next_cycle()
    with pytest.raises(RequestRejected) as excinfo:
        conn.next_events()
    assert excinfo.value.status == 400


def test_pipelined_chunked_requests_are_checked_each() -> None:
    """The chunk-line checks restart with each request of a keep-alive connection."""
    conn = server()
    ok = CHUNKED + b"3\r\nabc\r\n0\r\n\r\n"
    events = conn.receive_data(ok + ok + CHUNKED + b"3 \r\nabc\r\n0\r\n\r\n")
    statuses = []
    for _ in range(3):
        assert events[-1] is PAUSED or type(events[-1]) is EndOfMessage
        conn.send_response(204, b"No Content", [], None)
        conn.send_end()
        conn.start_next_cycle()
        try:
            events = conn.next_events()
        except RequestRejected as exc:
            statuses.append(exc.status)
            break
        assert body_of(events) == b"abc"
    assert statuses == [400]


def test_chunked_body_one_byte_at_a_time() -> None:
    """Chunk lines, footers and trailers split at every byte are checked and decoded."""
    body = (
        b'5;name=value\r\nhello\r\n6;q="x"\r\n world\r\n0\r\nX-Checksum: abc\r\nX-Other: d\r\n\r\n'
    )
    conn = server()
    events = conn.receive_data(CHUNKED)
    for i in range(len(body)):
        events += conn.receive_data(body[i : i + 1])
    assert body_of(events) == b"hello world"
    assert type(events[-1]) is EndOfMessage
    assert list(events[-1].headers) == [(b"x-checksum", b"abc"), (b"x-other", b"d")]

    bad = body.replace(b"name=value", b"name=va\x7flue")
    conn = server()
    conn.receive_data(CHUNKED)
    events, exc = feed(conn, *(bad[i : i + 1] for i in range(len(bad))))
    assert exc is not None
    assert exc.status == 400
    assert body_of(events) == b""


@pytest.mark.parametrize(
    ("trailers", "status"),
    [
        pytest.param(b"X: a\rb\r\n", 400, id="bare-cr"),
        pytest.param(b"X: a\x01b\r\n", 400, id="ctl"),
        pytest.param(b"X: a\r\n b\r\n", 400, id="obs-fold"),
        pytest.param(b"Content-Length: 5\r\n", 400, id="forbidden"),
        pytest.param(b"X: " + b"a" * 100 + b"\r\n", 431, id="too-large"),
        pytest.param(b"".join(b"X-%d: a\r\n" % i for i in range(11)), 431, id="too-many"),
    ],
)
def test_trailer_section_is_checked_like_a_head(trailers: bytes, status: int) -> None:
    """Trailer fields get the head's line checks and limits, and RFC 9110 section 6.5.1."""
    exc, events = rejected(
        CHUNKED + b"5\r\nhello\r\n0\r\n" + trailers + b"\r\n",
        limit_request_field_size=50,
        limit_request_fields=10,
    )
    assert exc.status == status
    assert events == []
    # Limits that the section is within: accepted.
    events = accepted(CHUNKED + b"5\r\nhello\r\n0\r\nX: a\r\nY: b\r\n\r\n", limit_request_fields=2)
    assert type(events[-1]) is EndOfMessage


@pytest.mark.parametrize(
    ("raw", "status"),
    [
        pytest.param(b"GET / HTTP/1.1\r\nHost: x\r\nX: a\x7fb\r\n\r\n", 400, id="del-in-value"),
        pytest.param(b"GET / HTTP/1.1\r\nHost: x\r\nX: a\x07b\r\n\r\n", 400, id="bel-in-value"),
        pytest.param(b"GET / HTTP/1.1\r\nHost: a b\r\n\r\n", 400, id="host-space"),
        pytest.param(b"GET / HTTP/1.1\r\nHost: a/b\r\n\r\n", 400, id="host-slash"),
        pytest.param(b"GET / HTTP/1.1\r\nHost: u@a\r\n\r\n", 400, id="host-userinfo"),
        pytest.param(b"GET / HTTP/1.1\r\nHost: a:80x\r\n\r\n", 400, id="host-port"),
        pytest.param(
            b"GET / HTTP/1.1\r\nHost: x\r\nContent-Type: a/b\r\nContent-Type: c/d\r\n\r\n",
            400,
            id="two-content-types",
        ),
        pytest.param(b"GET /a#b HTTP/1.1\r\nHost: x\r\n\r\n", 400, id="fragment"),
        pytest.param(b"GET a/b HTTP/1.1\r\nHost: x\r\n\r\n", 400, id="relative"),
        pytest.param(b"GET x:1 HTTP/1.1\r\nHost: x\r\n\r\n", 400, id="authority-form"),
        pytest.param(b"GET * HTTP/1.1\r\nHost: x\r\n\r\n", 400, id="asterisk-not-options"),
        pytest.param(b"CONNECT x:443 HTTP/1.1\r\nHost: x:443\r\n\r\n", 501, id="connect"),
        pytest.param(b"CONNECT / HTTP/1.1\r\nHost: x\r\n\r\n", 501, id="connect-origin"),
        pytest.param(b"GET / HTTP/2.0\r\nHost: x\r\n\r\n", 505, id="http-2.0"),
        pytest.param(b"GET / HTTP/3.1\r\nHost: x\r\n\r\n", 505, id="http-3.1"),
        pytest.param(b"GET / HTTP/0.9\r\n\r\n", 505, id="http-0.9"),
        pytest.param(b"GET / HTTP/1.2\r\n\r\n", 400, id="http-1.2-no-host"),
        pytest.param(b"\rGET / HTTP/1.1\r\nHost: x\r\n\r\n", 400, id="leading-bare-cr"),
        pytest.param(b"\nGET / HTTP/1.1\r\nHost: x\r\n\r\n", 400, id="leading-bare-lf"),
        pytest.param(b"\r\n\nGET / HTTP/1.1\r\nHost: x\r\n\r\n", 400, id="crlf-then-lf"),
        pytest.param(
            b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 0" + b"1" * 21 + b"\r\n\r\n",
            400,
            id="length-21-digits-after-zeros",
        ),
        pytest.param(b"GET http:///a HTTP/1.1\r\nHost: x\r\n\r\n", 400, id="absolute-no-host"),
        pytest.param(b"GET http://:80/a HTTP/1.1\r\nHost: x\r\n\r\n", 400, id="absolute-port-only"),
        pytest.param(b"GET http://a@b@c/ HTTP/1.1\r\nHost: x\r\n\r\n", 400, id="absolute-two-at"),
        pytest.param(
            b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: ,\r\n\r\n", 400, id="te-only-empty"
        ),
        pytest.param(
            b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding:\r\nContent-Length: 5\r\n\r\n",
            400,
            id="te-empty-with-length",
        ),
        pytest.param(
            b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: ,chunked\r\n"
            b"Content-Length: 5\r\n\r\n",
            400,
            id="te-empty-element-with-length",
        ),
        pytest.param(
            b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: , chunked, ,chunked\r\n\r\n",
            400,
            id="te-chunked-twice-among-empty",
        ),
        pytest.param(
            b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: " + b"1" * 21 + b"\r\n\r\n",
            400,
            id="length-21-digits",
        ),
        pytest.param(
            b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400, id="te-http10"
        ),
        pytest.param(b"GET / HTTP/1.1\r\n\r\n", 400, id="no-host"),
    ],
)
def test_head_and_request_line_checks(raw: bytes, status: int) -> None:
    exc, events = rejected(raw + SMUGGLED)
    assert exc.status == status
    assert events == []


@pytest.mark.parametrize(
    "raw",
    [
        b"OPTIONS * HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET http://example.com/a?b HTTP/1.1\r\nHost: example.com\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: [::1]:8080\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: my_host.example:\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost:\r\n\r\n",
        b"GET / HTTP/1.0\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: x\r\nX: \tcaf\xc3\xa9 \t\r\nCookie: a=1\r\nCookie: b=2\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 000\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: \tChunked \r\n\r\n0\r\n\r\n",
    ],
)
def test_valid_requests_pass(raw: bytes) -> None:
    events = accepted(raw)
    assert len(targets(events)) == 1
    assert type(events[-1]) is EndOfMessage


@pytest.mark.parametrize(
    ("raw", "body"),
    [
        pytest.param(CHUNKED.replace(b"chunked", b",chunked"), b"hello", id="te-leading-comma"),
        pytest.param(CHUNKED.replace(b"chunked", b"chunked,"), b"hello", id="te-trailing-comma"),
        pytest.param(CHUNKED.replace(b"chunked", b" , ,Chunked , "), b"hello", id="te-commas"),
        pytest.param(
            HEAD + b"Transfer-Encoding:\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"hello",
            id="te-empty-line-first",
        ),
        pytest.param(
            HEAD + b"Transfer-Encoding: chunked\r\nX: y\r\nTransfer-Encoding: ,\r\n\r\n",
            b"hello",
            id="te-empty-line-last",
        ),
        pytest.param(
            HEAD + b"Content-Length: " + b"0" * 30 + b"5\r\n\r\n", b"hello", id="length-zeros"
        ),
        pytest.param(HEAD + b"Content-Length: " + b"0" * 25 + b"\r\n\r\n", b"", id="length-0s"),
    ],
)
def test_valid_framing_that_h11_refuses_is_accepted(raw: bytes, body: bytes) -> None:
    """RFC 9110 section 5.6.1 (empty list elements are ignored) and any number of leading
    zeros in a Content-Length: h11 refuses these, so it is given the head without them. The
    request behind it on the connection is framed as every other parser frames it."""
    if b"chunked" in raw.lower():
        raw += b"5\r\nhello\r\n0\r\n\r\n" if body else b"0\r\n\r\n"
    else:
        raw += body
    conn = server()
    events = conn.receive_data(raw + SMUGGLED)
    assert targets(events) == [b"/upload"]
    assert body_of(events) == body
    assert events[-2:] == [END_OF_MESSAGE, PAUSED]
    conn.send_response(200, b"OK", [], None, content_length=0)
    conn.send_end()
    conn.start_next_cycle()
    assert targets(conn.next_events()) == [b"/admin"]


def test_http_1_minor_versions_above_1_are_served_as_http_1_1() -> None:
    """RFC 9110 section 2.5: HTTP/1.2 to HTTP/1.9 are processed as HTTP/1.1 (keep-alive,
    Host required), and answered with HTTP/1.1."""
    conn = server()
    events = conn.receive_data(b"GET /a HTTP/1.2\r\nHost: x\r\n\r\n" + SMUGGLED)
    assert [event.http_version for event in events if type(event) is Request] == [b"1.1"]
    head = conn.send_response(200, b"OK", [], None, content_length=0)
    assert head.startswith(b"HTTP/1.1 200 ")
    conn.send_end()
    assert conn.keep_alive
    conn.start_next_cycle()
    assert targets(conn.next_events()) == [b"/admin"]


@pytest.mark.parametrize(
    "pieces",
    [
        pytest.param((b"\r\nGET /a HTTP/1.1\r\nHost: x\r\n\r\n",), id="one-read"),
        pytest.param((b"\r", b"\n", b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n"), id="pieces"),
        pytest.param((b"\r\n\r\n\r\nGET /a HTTP/1.1\r\nHost: x\r\n\r\n",), id="several"),
    ],
)
def test_empty_lines_before_the_request_line_are_ignored(pieces: tuple[bytes, ...]) -> None:
    """RFC 9112 section 2.2: a server SHOULD ignore at least one empty line (CRLF) before the
    request line; h11 refuses it. A bare CR or LF there stays refused (see above)."""
    events = accepted(*pieces)
    assert targets(events) == [b"/a"]
    assert type(events[-1]) is EndOfMessage


def test_empty_line_after_a_body_before_a_pipelined_request_is_ignored() -> None:
    """Some clients send a CRLF after a request body (RFC 9112 section 2.2 names them): the
    pipelined request after it is served, and the body is exactly its Content-Length."""
    conn = server()
    events = conn.receive_data(
        HEAD + b"Content-Length: 5\r\n\r\nhello\r\n" + SMUGGLED + b"\r\n" + SMUGGLED
    )
    assert targets(events) == [b"/upload"]
    assert body_of(events) == b"hello"
    for _ in range(2):
        conn.send_response(200, b"OK", [], None, content_length=0)
        conn.send_end()
        conn.start_next_cycle()
        assert targets(conn.next_events()) == [b"/admin"]


@pytest.mark.parametrize(
    "line",
    [
        pytest.param(b"5 ;a=b", id="bws-before-semicolon"),
        pytest.param(b"5\t; a = b ;c", id="tab-before-semicolon"),
        pytest.param(b"0" * 30 + b"5", id="zero-padded"),
        pytest.param(b"0" * 30 + b"5 ;a=b", id="zero-padded-bws"),
    ],
)
def test_valid_chunk_lines_that_h11_refuses(line: bytes, peek_mode: str) -> None:
    """RFC 9112 section 7.1.1 allows BWS before ``;``, and a chunk size may have any number of
    leading zeros; h11 refuses both. With access to h11's buffer (h11 0.16) the line is given
    to h11 as the same size with OWS; without it, h11's refusal (400) stands: fail closed."""
    chunks = line + b"\r\nhello\r\n" + b"0" * 25 + b"\r\n\r\n"
    conn = server()
    events, exc = feed(conn, CHUNKED + chunks + SMUGGLED)
    if peek_mode == "zero-copy":
        assert exc is None
        assert body_of(events) == b"hello"
        assert events[-2:] == [END_OF_MESSAGE, PAUSED]
    else:
        assert exc is not None
        assert exc.status == 400
        assert all(type(event) is not EndOfMessage for event in events)


def test_chunk_size_over_20_hex_digits_without_zeros_is_refused() -> None:
    exc, _ = rejected(CHUNKED + b"0" * 5 + b"1" * 21 + b"\r\nhello\r\n0\r\n\r\n")
    assert exc.status == 400


@pytest.mark.parametrize(
    "target",
    [b"http://good.example/h", b"HTTPS://good.example:8443/h?q", b"http://u:p@good.example/"],
)
def test_absolute_form_targets_pass(target: bytes) -> None:
    events = accepted(b"GET " + target + b" HTTP/1.1\r\nHost: evil.example\r\n\r\n")
    assert targets(events) == [target]


def test_field_line_limit_counts_the_crlf() -> None:
    """``limit_request_field_size`` counts a field line with its CRLF, as gunicorn does."""
    line = b"X: " + b"a" * 15  # 18 bytes, 20 with the CRLF
    assert accepted(b"GET / HTTP/1.0\r\n" + line + b"\r\n\r\n", limit_request_field_size=20)
    exc, _ = rejected(b"GET / HTTP/1.0\r\n" + line + b"a\r\n\r\n", limit_request_field_size=20)
    assert exc.status == 431
    # Still arriving: refused as soon as the unfinished line is over the limit, and not
    # before: a line at the limit whose CR arrives without its LF is fine.
    exc, _ = rejected(b"GET / HTTP/1.0\r\n" + line + b"a", limit_request_field_size=20)
    assert exc.status == 431
    head = b"GET / HTTP/1.0\r\n" + line + b"\r"
    assert accepted(head, b"\n\r\n", limit_request_field_size=20)
    # The same for the request line.
    exc, _ = rejected(b"GET /" + b"a" * 96, limit_request_line=100)
    assert exc.status == 414
    assert accepted(b"GET /" + b"a" * 86 + b" HTTP/1.0\r", b"\n\r\n", limit_request_line=100)


def test_request_line_limit_and_head_limit_while_arriving() -> None:
    exc, _ = rejected(b"GET /" + b"a" * 100, limit_request_line=100)
    assert exc.status == 414
    exc, _ = rejected(b"GET / HTTP/1.0\r\n" + b"X: a\r\n" * 30, limit_request_head=100)
    assert exc.status == 431


def test_bytes_after_a_closing_request_are_ignored() -> None:
    """RFC 9112 section 9.6: after a request that ends the connection, nothing is processed.

    h11 would refuse such bytes ("Got data when expecting EOF") before the request is answered;
    they are ignored instead, so the request still gets its response.
    """
    for head in (
        b"GET /first HTTP/1.0\r\n\r\n",
        b"GET /first HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        b"POST /first HTTP/1.0\r\nContent-Length: 2\r\n\r\nok",
    ):
        conn = server()
        events = conn.receive_data(head + b"\r\n" + SMUGGLED)
        assert targets(events) == [b"/first"]
        assert type(events[-1]) is EndOfMessage
        assert conn.receive_data(SMUGGLED) == []
        assert conn.receive_data(b"") == []
        conn.send_response(200, b"OK", [], None, content_length=0)
        assert conn.send_end() == b""
        assert not conn.keep_alive
