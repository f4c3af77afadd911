"""gunicorn's request corpus, over a real socket: valid requests reach the application as gunicorn
parses them, invalid ones get a 4xx/5xx and never reach it.

Each of the 137 cases of ``tests/data/gunicorn-requests.json`` (gunicorn's
``tests/requests``, MIT) is its own test. Its raw bytes go to a server on 127.0.0.1:0 in one
write, followed by a half-close; a recording application keeps the environ and the body of each
request it gets. A second connection then makes a barrier request: the pool has one thread, so
once the barrier is answered every application call the case caused has been recorded.

Every case runs under gunicorn's limits: its ``limit_request_*`` settings map to our fields of
the same names, and cases without one run under gunicorn's default ``limit_request_line`` of
4094 bytes (ours is 8190). Settings we do not have leave our defaults in force, and the case
asserts what we do then:

    setting                            our behaviour
    proxy_protocol                     off here: a PROXY line is not a request line (400);
                                       tests/test_proxy.py plays these cases with it on
    forwarded_allow_ips                every case runs with --no-proxy-headers: no forwarded
                                       header is trusted, so none can conflict; they reach the
                                       app as plain HTTP_* keys
    permit_obsolete_folding            not implemented: obs-fold gets 400
    header_map (dangerous, refuse)     not implemented: a field name with "_" is dropped (drop)
    strip_header_spaces                not implemented: whitespace before ":" gets 400
    permit_unconventional_http_method  not needed: any token is a method (RFC 9110 section 9.1)
    casefold_http_method               not implemented: methods are case-sensitive (9.1)

Deliberate differences from gunicorn (case: gunicorn's outcome -> ours; reason):

    HTTP/1.1 without Host: served -> 400, for valid/004 valid/005 valid/006 valid/007 valid/009
        valid/010 valid/011 valid/012 valid/013 valid/014 valid/018 valid/021 valid/023
        valid/025 valid/025_line valid/028 valid/029 valid/030 valid/031 valid/031compat
        valid/031compat2 valid/100 valid/compat_obs_fold_huge.
        RFC 9112 section 3.2: a server MUST answer 400 to an HTTP/1.1 request without Host.
        Each such case (valid or not) is also sent with "Host: x" after its HTTP/1.1 request
        lines, and that copy must get the outcome the corpus, or a row below, gives; the copy
        without Host gets 400, or the status of a check that runs before h11's Host check
        (limits, Transfer-Encoding).
    valid/005: served -> 400. A "#fragment" is in no request-target form (RFC 9112 section
        3.2, RFC 9110 section 4.2.5): it would land in QUERY_STRING, and an intermediary that
        strips it routes another target than the app sees.
    valid/009: served -> 400. Transfer-Encoding with Content-Length (RFC 9112 section 6.3 item
        3: the request-smuggling ambiguity); "identity" is no transfer coding any more.
    valid/012: served -> 400. Content-Type in the trailer section: fields that describe the
        content must not be trailers (RFC 9110 section 6.5.1).
    valid/022: both requests served -> the first served, the second 400. The HTTP/1.0
        keep-alive connection stays open (RFC 9112 appendix C.2.2), and its second request is
        HTTP/1.1 without Host (RFC 9112 section 3.2).
    valid/025 valid/025_line valid/029 valid/030 valid/rfc9112_smuggle_gzip_chunked_01
    valid/rfc9112_smuggle_te_identity_chunked_01: served -> 501. A transfer coding other than
        chunked (gzip, identity) is not implemented (RFC 9112 section 6.1: SHOULD answer 501).
    valid/027: served -> 400. Raw non-ASCII bytes in the target: a request-target is made of
        URI characters (RFC 9112 section 3.2, RFC 3986 section 2); h11 requires VCHAR.
    valid/028: served -> 400. Whitespace between a field name and ":" MUST get 400 (RFC 9112
        section 5.1); strip_header_spaces is not implemented.
    valid/031compat: method "-BLARGH" -> "-blargh". Methods are case-sensitive (RFC 9110
        section 9.1); casefold_http_method is not implemented.
    valid/040_compat: served with Transfer_Encoding and Content_Length -> served without them.
        A name with "_" is always dropped: as a CGI key it would collide with the "-" spelling
        (gunicorn's header_map="drop", nginx's underscores_in_headers off).
    valid/099: served -> the app gets the head, reading wsgi.input fails, the client gets 400.
        The corpus request declares Content-Length: 17914 but carries 8599 body bytes: the
        message is incomplete (RFC 9112 section 8).
    valid/compat_obs_fold valid/compat_obs_fold_huge: served -> 400. RFC 9112 section 5.2
        lets a server reject obs-fold with 400; permit_obsolete_folding is not implemented.
    valid/pp_01 valid/pp_02 valid/pp_04 valid/pp_05: served -> 400. The PROXY protocol
        (--proxy-protocol) is off here; its lines must never reach the app (tests/test_proxy.py
        serves these cases with it on).
    valid/rfc9112_target_authority_connect_01 valid/rfc9112_target_authority_ipv6_01:
        served -> 501. CONNECT asks for a tunnel (RFC 9110 section 9.3.6); a WSGI server has
        none to offer.
    invalid/003c: 400 -> served (with Host) with method "-bl". A method is any token (RFC 9110
        section 9.1); gunicorn refuses lower case by default.
    invalid/013: 431 -> 400. The obs-fold is refused before the folded line is measured.
    invalid/019: 400 -> served (with Host), X-Forwarded-Proto and X-Forwarded-Ssl as plain
        HTTP_X_FORWARDED_* keys, wsgi.url_scheme "http": no forwarded header is trusted
        (the corpus runs with --no-proxy-headers), so none conflicts with another.
    invalid/040 invalid/chunked_07: 400 -> served with the "_" fields dropped (header_map=
        "refuse" is not implemented); framing comes from Content-Length or Transfer-Encoding
        alone, so nothing is ambiguous.
    invalid/limit_header_default_01: 431 -> served. limit_request_field_size=0 means no limit
        for us, below the 64 KiB head limit, as gunicorn documents it; gunicorn's code applies
        8190 bytes a field even then.

Other statuses: invalid/version_02 (HTTP/2.0, well formed) gets 505 (RFC 9110 section 15.6.6).
invalid/rfc9112_chunked_missing_final_crlf_01 has a complete, valid head, so the application is
called as soon as it arrives, as with every streamed body; the body never ends: wsgi.input raises
at EOF and the client gets 400.
"""

from __future__ import annotations

import asyncio
import base64
import json
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any
from urllib.parse import unquote_to_bytes, urlsplit

import h11
import pytest

from asyncwsgi.errors import ClientDisconnected

from .helpers import TIMEOUT, exchange, running

#: gunicorn's request corpus as JSON (tests/data/LICENSE-gunicorn tells where it comes from).
CORPUS = Path(__file__).resolve().parent / "data" / "gunicorn-requests.json"
CASES: dict[str, dict[str, Any]] = {
    case["name"]: case for case in json.loads(CORPUS.read_text(encoding="utf-8"))["cases"]
}

BARRIER = "/__corpus_barrier__"
HOST = ("HOST", "x")  # short: it must not change the outcome of a field-size limit

#: gunicorn's limits, where its default differs from ours.
GUNICORN_LIMITS = {"limit_request_line": 4094}
#: gunicorn settings that are Config fields of the same name and meaning.
MAPPED_SETTINGS = frozenset(
    {"limit_request_line", "limit_request_fields", "limit_request_field_size"}
)
#: gunicorn settings we do not have (see the module docstring for what we do instead).
UNSUPPORTED_SETTINGS = frozenset(
    {
        "proxy_protocol",
        "forwarded_allow_ips",
        "permit_obsolete_folding",
        "header_map",
        "strip_header_spaces",
        "permit_unconventional_http_method",
        "casefold_http_method",
    }
)

#: The status an invalid case gets, by the error gunicorn raises.
STATUS_BY_ERROR = {
    "NoMoreData": 400,
    "InvalidRequestLine": 400,
    "InvalidRequestMethod": 400,
    "InvalidHTTPVersion": 400,
    "InvalidHeader": 400,
    "InvalidHeaderName": 400,
    "InvalidChunkSize": 400,
    "InvalidChunkExtension": 400,
    "ChunkMissingTerminator": 400,
    "ObsoleteFolding": 400,
    "InvalidProxyLine": 400,
    "LimitRequestLine": 414,
    "LimitRequestHeaders": 431,
}
STATUS_EXCEPTIONS = {"invalid/version_02": 505}

#: Cases whose first request is HTTP/1.1 without Host (RFC 9112 section 3.2).
HOSTLESS = frozenset(
    [
        "valid/004",
        "valid/005",
        "valid/006",
        "valid/007",
        "valid/009",
        "valid/010",
        "valid/011",
        "valid/012",
        "valid/013",
        "valid/014",
        "valid/018",
        "valid/021",
        "valid/023",
        "valid/025",
        "valid/025_line",
        "valid/028",
        "valid/029",
        "valid/030",
        "valid/031",
        "valid/031compat",
        "valid/031compat2",
        "valid/100",
        "valid/compat_obs_fold_huge",
        "invalid/002",
        "invalid/003b",
        "invalid/003c",
        "invalid/005",
        "invalid/010",
        "invalid/013",
        "invalid/016",
        "invalid/017",
        "invalid/019",
        "invalid/020",
        "invalid/021",
        "invalid/chunked_01",
        "invalid/chunked_02",
        "invalid/chunked_03",
        "invalid/chunked_04",
        "invalid/chunked_06",
        "invalid/chunked_07",
        "invalid/chunked_08",
        "invalid/chunked_09",
        "invalid/chunked_10",
        "invalid/chunked_11",
        "invalid/chunked_12",
        "invalid/chunked_13",
        "invalid/chunked_14",
        "invalid/nonascii_01",
        "invalid/nonascii_02",
        "invalid/nonascii_03",
        "invalid/nonascii_04",
        "invalid/prefix_01",
        "invalid/prefix_02",
        "invalid/prefix_03",
        "invalid/prefix_04",
        "invalid/prefix_05",
    ]
)


@dataclass(frozen=True)
class Outcome:
    """What a case must cause.

    Attributes:
        statuses: the status of each response the client gets, in order.
        requests: what the application gets, in order, in the corpus's ``expect`` shape;
            empty when the case must never reach it.
        incomplete: the body never ends: reading wsgi.input raises ClientDisconnected.
    """

    statuses: tuple[int, ...]
    requests: tuple[dict[str, Any], ...] = ()
    incomplete: bool = False


def rejected(status: int) -> Outcome:
    return Outcome((status,))


def served(requests: Iterable[dict[str, Any]]) -> Outcome:
    requests = tuple(requests)
    return Outcome((200,) * len(requests), requests)


def request(
    method: str, target: str, version: tuple[int, int], headers: list[tuple[str, str]], body: bytes
) -> dict[str, Any]:
    """An expected request, in the corpus's ``expect`` shape."""
    return {
        "method": method,
        "target": target,
        "version": list(version),
        "headers": [list(pair) for pair in headers],
        "body_b64": base64.b64encode(body).decode(),
    }


def expect(name: str) -> list[dict[str, Any]]:
    return list(CASES[name]["expect"])


def with_method(requests: list[dict[str, Any]], method: str) -> list[dict[str, Any]]:
    return [{**requests[0], "method": method}, *requests[1:]]


def long_field_value(name: str) -> str:
    raw = base64.b64decode(CASES[name]["raw_b64"])
    return raw.split(b"\r\n")[1].partition(b": ")[2].decode("latin-1")


#: The deliberate differences of the module docstring, as outcomes (of the copy with Host, for
#: a case in HOSTLESS).
DIFFERENCES: dict[str, Outcome] = {
    "valid/005": rejected(400),
    "valid/009": rejected(400),
    "valid/012": rejected(400),
    "valid/022": Outcome((200, 400), tuple(expect("valid/022")[:1])),
    "valid/025": rejected(501),
    "valid/025_line": rejected(501),
    "valid/029": rejected(501),
    "valid/030": rejected(501),
    "valid/rfc9112_smuggle_gzip_chunked_01": rejected(501),
    "valid/rfc9112_smuggle_te_identity_chunked_01": rejected(501),
    "valid/027": rejected(400),
    "valid/028": rejected(400),
    "valid/031compat": served(with_method(expect("valid/031compat"), "-blargh")),
    "valid/040_compat": served(expect("valid/040")),
    "valid/099": Outcome((400,), tuple(expect("valid/099")), incomplete=True),
    "valid/compat_obs_fold": rejected(400),
    "valid/compat_obs_fold_huge": rejected(400),
    "valid/pp_01": rejected(400),
    "valid/pp_02": rejected(400),
    "valid/pp_04": rejected(400),
    "valid/pp_05": rejected(400),
    "valid/rfc9112_target_authority_connect_01": rejected(501),
    "valid/rfc9112_target_authority_ipv6_01": rejected(501),
    "invalid/003c": served([request("-bl", "/foo", (1, 1), [], b"")]),
    "invalid/013": rejected(400),
    "invalid/019": served(
        [
            request(
                "GET",
                "/test",
                (1, 1),
                [("X-FORWARDED-PROTO", "https"), ("X-FORWARDED-SSL", "off")],
                b"",
            )
        ]
    ),
    "invalid/040": served(expect("valid/040")),
    "invalid/chunked_07": served(
        [
            request(
                "POST",
                "/chunked_ambiguous_header_mapping",
                (1, 1),
                [("TRANSFER-ENCODING", "chunked")],
                b"hello world",
            )
        ]
    ),
    "invalid/limit_header_default_01": served(
        [
            request(
                "GET",
                "/",
                (1, 0),
                [("X", long_field_value("invalid/limit_header_default_01"))],
                b"",
            )
        ]
    ),
}

#: Outcomes that differ from the default in status or timing only, not from gunicorn's verdict.
NOTES: dict[str, Outcome] = {
    "invalid/version_02": rejected(505),
    "invalid/rfc9112_chunked_missing_final_crlf_01": Outcome(
        (400,),
        (
            request(
                "POST",
                "/chunked_missing_final_crlf",
                (1, 1),
                [("HOST", "a"), ("TRANSFER-ENCODING", "chunked")],
                b"",
            ),
        ),
        incomplete=True,
    ),
}


def expected_outcome(name: str) -> Outcome:
    """The outcome of the case (of its copy with Host, for a case in HOSTLESS)."""
    if name in DIFFERENCES:
        return DIFFERENCES[name]
    if name in NOTES:
        return NOTES[name]
    case = CASES[name]
    if name.startswith("valid/"):
        return served(case["expect"])
    return rejected(STATUS_EXCEPTIONS.get(name, STATUS_BY_ERROR[case["gunicorn_error"]]))


def add_host(outcome: Outcome) -> Outcome:
    """The outcome with the injected Host among the fields of each HTTP/1.1 request."""
    requests = tuple(
        {**req, "headers": [*req["headers"], list(HOST)]} if req["version"] == [1, 1] else req
        for req in outcome.requests
    )
    return replace(outcome, requests=requests)


def config_for(name: str) -> dict[str, Any]:
    options: dict[str, Any] = {**GUNICORN_LIMITS, "proxy_headers": False}
    for key, value in CASES[name].get("gunicorn_settings", {}).items():
        if key in MAPPED_SETTINGS:
            options[key] = value
        else:
            assert key in UNSUPPORTED_SETTINGS, f"unknown gunicorn setting {key!r}"
    return options


# -- the recording application ---------------------------------------------------------------------


@dataclass
class Record:
    """What the application got for one request."""

    environ: dict[str, Any]
    body: bytes
    error: str | None = None
    headers: dict[str, str] = field(default_factory=dict)


def recorder(records: list[Record]) -> Callable[..., Iterable[bytes]]:
    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        if environ["PATH_INFO"] == BARRIER:
            start_response("204 No Content", [])
            return []
        body = bytearray()
        error = None
        try:
            while chunk := environ["wsgi.input"].read(4096):
                body += chunk
        except ClientDisconnected as exc:
            error = str(exc)
        headers = {
            key: value
            for key, value in environ.items()
            if key.startswith("HTTP_") or key in ("CONTENT_TYPE", "CONTENT_LENGTH")
        }
        records.append(Record(dict(environ), bytes(body), error, headers))
        start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "2")])
        return [b"ok"]

    return app


async def send(port: int, raw: bytes) -> bytes:
    """Send ``raw`` in one write, half-close, and return all the server sends until it closes."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(raw)
        writer.write_eof()
        return await asyncio.wait_for(reader.read(-1), TIMEOUT)
    finally:
        writer.close()
        await writer.wait_closed()


def statuses_of(data: bytes) -> list[int]:
    """The status of each complete response in ``data``, parsed by an h11 client."""
    client = h11.Connection(h11.CLIENT)
    client.receive_data(data)
    client.receive_data(b"")
    statuses: list[int] = []
    while client.trailing_data[0]:
        client.send(h11.Request(method="GET", target="/", headers=[("Host", "x")]))
        client.send(h11.EndOfMessage())
        while type(event := client.next_event()) is not h11.EndOfMessage:
            if type(event) is h11.Response:
                statuses.append(event.status_code)
        if client.their_state is not h11.DONE or client.our_state is not h11.DONE:
            assert not client.trailing_data[0], "bytes after a response that closes"
            break
        client.start_next_cycle()
    return statuses


async def play(port: int, raw: bytes, records: list[Record]) -> tuple[list[int], list[Record]]:
    """Play one request stream; return the response statuses and what the application got."""
    records.clear()
    data = await send(port, raw)
    barrier = await exchange(port, f"GET {BARRIER} HTTP/1.0\r\n\r\n".encode())
    assert statuses_of(barrier) == [204]
    return statuses_of(data), list(records)


# -- checks -------------------------------------------------------------------------------------


def environ_fields(headers: list[list[str]]) -> dict[str, str]:
    """The CGI keys of the corpus's parsed fields; repeated fields joined as PEP 3333 allows."""
    keys = {"CONTENT-TYPE": "CONTENT_TYPE", "CONTENT-LENGTH": "CONTENT_LENGTH"}
    result: dict[str, str] = {}
    for name, value in headers:
        key = keys.get(name) or "HTTP_" + name.replace("-", "_")
        if key in result:
            value = result[key] + ("; " if key == "HTTP_COOKIE" else ",") + value
        result[key] = value
    return result


def path_and_query(target: str) -> tuple[str, str]:
    """PATH_INFO (percent-decoded, latin-1) and QUERY_STRING of a request target."""
    if target == "*":
        return "*", ""
    if target.startswith(("http://", "https://")):
        parts = urlsplit(target)
        path, query = parts.path or "/", parts.query
    else:
        path, _, query = target.partition("?")
    return unquote_to_bytes(path.encode("latin-1")).decode("latin-1"), query


def check(outcome: Outcome, statuses: list[int], records: list[Record]) -> None:
    assert statuses == list(outcome.statuses)
    assert len(records) == len(outcome.requests), [r.environ["PATH_INFO"] for r in records]
    for record, want in zip(records, outcome.requests, strict=True):
        environ = record.environ
        assert environ["REQUEST_METHOD"] == want["method"]
        path, query = path_and_query(want["target"])
        assert (environ["PATH_INFO"], environ["QUERY_STRING"]) == (path, query)
        assert environ["SERVER_PROTOCOL"] == "HTTP/{}.{}".format(*want["version"])
        # RFC 9112 section 3.3: an absolute-form target is the target URI, scheme included.
        scheme = "https" if want["target"].startswith("https://") else "http"
        assert environ["wsgi.url_scheme"] == scheme
        assert record.headers == environ_fields(want["headers"])
        body = base64.b64decode(want["body_b64"])
        if outcome.incomplete:
            assert record.error is not None
            assert body.startswith(record.body)
        else:
            assert record.error is None
            assert record.body == body


@pytest.mark.parametrize("name", sorted(CASES))
async def test_case(name: str) -> None:
    raw = base64.b64decode(CASES[name]["raw_b64"])
    outcome = expected_outcome(name)
    records: list[Record] = []
    async with running(recorder(records), threads=1, **config_for(name)) as srv:
        if name not in HOSTLESS:
            check(outcome, *await play(srv.port, raw, records))
            return
        with_host = raw.replace(b" HTTP/1.1\r\n", b" HTTP/1.1\r\nHost: %s\r\n" % HOST[1].encode())
        check(add_host(outcome), *await play(srv.port, with_host, records))
        # Without Host: 400, unless a check that runs before h11's (a limit, the
        # Transfer-Encoding checks) refuses the request with its own status.
        raw_outcome = rejected(400) if outcome.requests else outcome
        check(raw_outcome, *await play(srv.port, raw, records))


# -- the tables above stay in step with the corpus -------------------------------------------------


def test_corpus_size() -> None:
    valid = [name for name in CASES if name.startswith("valid/")]
    invalid = [name for name in CASES if name.startswith("invalid/")]
    assert (len(CASES), len(valid), len(invalid)) == (137, 63, 74)


def test_hostless_cases_are_those_without_host() -> None:
    def hostless(raw: bytes) -> bool:
        head = raw.split(b"\r\n\r\n", 1)[0]
        first_line = head.split(b"\r\n", 1)[0]
        return first_line.endswith(b" HTTP/1.1") and not re.search(rb"\r\nhost:", head, re.I)

    detected = {name for name, case in CASES.items() if hostless(base64.b64decode(case["raw_b64"]))}
    assert detected == HOSTLESS


def test_every_difference_is_in_the_docstring_table() -> None:
    doc = __doc__ or ""
    table = doc[doc.index("Deliberate differences") : doc.index("Other statuses")]
    named = set(re.findall(r"(?:in)?valid/[\w.]*\w", table))
    assert named >= set(DIFFERENCES)
    assert named >= {name for name in HOSTLESS if name.startswith("valid/")}
    assert named <= set(DIFFERENCES) | HOSTLESS
    notes = doc[doc.index("Other statuses") :]
    assert set(re.findall(r"(?:in)?valid/[\w.]*\w", notes)) == set(NOTES)


def test_every_setting_is_mapped_or_listed() -> None:
    for name in CASES:
        config_for(name)
    doc = __doc__ or ""
    for setting in UNSUPPORTED_SETTINGS:
        assert f"\n    {setting} " in doc
