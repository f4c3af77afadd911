"""Valid requests that h11 alone would refuse or misread, over a real socket (RFC 9110, 9112).

Each case is sent raw to a server on 127.0.0.1:0 and checked on what the application got (the
environ app answers with its environ as JSON) and on the response. The sans-IO side of each,
with the ambiguous neighbours that stay refused, is in tests/test_strict.py.
"""

from __future__ import annotations

import json

import pytest

from .apps import environ_app
from .helpers import decode_replies, exchange, running

CLOSE = b"Connection: close\r\n"


async def served(raw: bytes, count: int = 1) -> list[dict[str, object]]:
    """Send ``raw`` to the environ app; return the environ of each of ``count`` 200 replies."""
    async with running(environ_app) as srv:
        data = await exchange(srv.port, raw)
    replies = decode_replies(data)
    assert [reply.status for reply in replies] == [200] * count, data[:300]
    assert data.startswith(b"HTTP/1.1 200 ")
    return [json.loads(reply.body) for reply in replies]


@pytest.mark.parametrize(
    ("target", "scheme", "host", "path", "query"),
    [
        (b"http://good.example/h?x=1", "http", "good.example", "/h", "x=1"),
        (b"https://good.example:8443/a/b", "https", "good.example:8443", "/a/b", ""),
        (b"http://user:pw@good.example?q", "http", "good.example", "/", "q"),
    ],
)
async def test_absolute_form_target_sets_host_and_scheme(
    target: bytes, scheme: str, host: str, path: str, query: str
) -> None:
    """RFC 9112 section 3.2.2: with an absolute-form target the server MUST use its authority
    and ignore Host; section 3.3: the target URI, scheme included, is the request-target."""
    (environ,) = await served(
        b"GET " + target + b" HTTP/1.1\r\nHost: evil.example\r\n" + CLOSE + b"\r\n"
    )
    assert environ["HTTP_HOST"] == host
    assert environ["wsgi.url_scheme"] == scheme
    assert (environ["PATH_INFO"], environ["QUERY_STRING"]) == (path, query)
    assert environ["SERVER_NAME"] == "127.0.0.1"  # the listening socket's, as with Host


@pytest.mark.parametrize(
    "fields",
    [
        pytest.param(b"Transfer-Encoding: ,chunked\r\n", id="leading-comma"),
        pytest.param(b"Transfer-Encoding:\r\nTransfer-Encoding: chunked\r\n", id="empty-line"),
    ],
)
async def test_empty_transfer_encoding_elements_are_ignored(fields: bytes) -> None:
    """RFC 9110 section 5.6.1: a recipient MUST ignore empty list elements (h11 answers 501)."""
    (environ,) = await served(
        b"POST / HTTP/1.1\r\nHost: x\r\n" + CLOSE + fields + b"\r\n5\r\nhello\r\n0\r\n\r\n"
    )
    assert environ["body"] == "hello"


async def test_whitespace_before_a_chunk_extension_is_accepted() -> None:
    """RFC 9112 section 7.1.1: BWS before ``;`` in a chunk extension (h11 answers 400)."""
    (environ,) = await served(
        b"POST / HTTP/1.1\r\nHost: x\r\n" + CLOSE + b"Transfer-Encoding: chunked\r\n\r\n"
        b"5 ;a=b\r\nhello\r\n6\t; c\r\n world\r\n0\r\n\r\n"
    )
    assert environ["body"] == "hello world"


async def test_http_1_2_is_served_as_http_1_1() -> None:
    """RFC 9110 section 2.5: a higher minor version is processed as HTTP/1.1 (h11's version,
    answered HTTP/1.1); HTTP/2.0 in an HTTP/1 request line stays 505."""
    (environ,) = await served(b"GET /v HTTP/1.2\r\nHost: x\r\n" + CLOSE + b"\r\n")
    assert environ["SERVER_PROTOCOL"] == "HTTP/1.1"
    async with running(environ_app) as srv:
        data = await exchange(srv.port, b"GET / HTTP/2.0\r\nHost: x\r\n\r\n")
    assert data.startswith(b"HTTP/1.1 505 ")


async def test_empty_lines_before_request_lines_are_ignored() -> None:
    """RFC 9112 section 2.2: a server SHOULD ignore at least one empty line before the
    request line, also between pipelined requests after a body."""
    environs = await served(
        b"\r\nPOST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello\r\n"
        b"GET /b HTTP/1.1\r\nHost: x\r\n" + CLOSE + b"\r\n",
        count=2,
    )
    assert [(e["PATH_INFO"], e["body"]) for e in environs] == [("/a", "hello"), ("/b", "")]


async def test_leading_zeros_in_lengths_are_accepted() -> None:
    """Any number of leading zeros in a Content-Length or a chunk size, as long as the value is
    within 20 digits (h11 refuses more than 20 digits, zeros included)."""
    zeros = b"0" * 30
    environs = await served(
        b"POST /cl HTTP/1.1\r\nHost: x\r\nContent-Length: " + zeros + b"5\r\n\r\nhello"
        b"POST /te HTTP/1.1\r\nHost: x\r\n"
        + CLOSE
        + b"Transfer-Encoding: chunked\r\n\r\n"
        + zeros
        + b"5\r\nhello\r\n"
        + zeros
        + b"\r\n\r\n",
        count=2,
    )
    assert [(e["PATH_INFO"], e["body"]) for e in environs] == [("/cl", "hello"), ("/te", "hello")]
