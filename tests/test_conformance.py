"""Valid requests that h11 alone would refuse or misread, over a real socket (RFC 9110, 9112).

Each case is sent raw to a server on 127.0.0.1:0 and checked on what the application got (the
environ app answers with its environ as JSON) and on the response. The sans-IO side of each,
with the ambiguous neighbours that stay refused, is in tests/test_strict.py.
"""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path
from typing import Any

import pytest

from asyncwsgi import _h11

from .apps import environ_app, hello, stream
from .helpers import TIMEOUT, decode_replies, exchange, require_program, running

CLOSE = b"Connection: close\r\n"

#: Giving h11 a valid chunk-size line it refuses, in a form it takes, needs h11's buffer
#: (asyncwsgi/_h11.py). With ASYNCWSGI_H11_PUBLIC_ONLY=1 (CI runs this file so too) such a
#: line is refused with 400 instead: the server fails closed.
CHUNK_LINE_REWRITE = _h11.PEEK_BUFFER


async def statuses(raw: bytes) -> list[int]:
    """Send ``raw`` to the environ app; return the status of each reply."""
    async with running(environ_app) as srv:
        data = await exchange(srv.port, raw)
    return [reply.status for reply in decode_replies(data)]


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
    raw = (
        b"POST / HTTP/1.1\r\nHost: x\r\n" + CLOSE + b"Transfer-Encoding: chunked\r\n\r\n"
        b"5 ;a=b\r\nhello\r\n6\t; c\r\n world\r\n0\r\n\r\n"
    )
    if not CHUNK_LINE_REWRITE:
        assert await statuses(raw) == [400]
        return
    (environ,) = await served(raw)
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
    raw = (
        b"POST /cl HTTP/1.1\r\nHost: x\r\nContent-Length: " + zeros + b"5\r\n\r\nhello"
        b"POST /te HTTP/1.1\r\nHost: x\r\n"
        + CLOSE
        + b"Transfer-Encoding: chunked\r\n\r\n"
        + zeros
        + b"5\r\nhello\r\n"
        + zeros
        + b"\r\n\r\n"
    )
    if not CHUNK_LINE_REWRITE:
        # The head's Content-Length is rewritten through h11's public API; the chunk size not.
        assert await statuses(raw) == [200, 400]
        return
    environs = await served(raw, count=2)
    assert [(e["PATH_INFO"], e["body"]) for e in environs] == [("/cl", "hello"), ("/te", "hello")]


# -- HTTP/1.0 keep-alive (RFC 9112 appendix C.2.2) ----------------------------------------------

KEEP_ALIVE_10 = b"GET /%d HTTP/1.0\r\nConnection: keep-alive\r\n\r\n"


async def test_http10_keep_alive_requests_share_one_connection() -> None:
    """Each request is answered with ``Connection: keep-alive`` on the same connection, sent
    one at a time and pipelined; the server closes only after a request without keep-alive."""
    async with running(hello) as srv:
        reader, writer = await asyncio.open_connection("127.0.0.1", srv.port)
        try:
            for number in range(3):  # one at a time: each answer comes on the open connection
                writer.write(KEEP_ALIVE_10 % number)
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), TIMEOUT)
                assert b"\r\nConnection: keep-alive\r\n" in head
                assert await asyncio.wait_for(reader.readexactly(13), TIMEOUT) == b"Hello, world!"
            # Pipelined, in one write, with a closing request last.
            writer.write(b"".join(KEEP_ALIVE_10 % n for n in range(5)) + b"GET / HTTP/1.0\r\n\r\n")
            data = await asyncio.wait_for(reader.read(-1), TIMEOUT)
        finally:
            writer.close()
    replies = decode_replies(data.replace(b"Connection: keep-alive", b"X-Was: keep-alive"))
    assert [reply.body for reply in replies] == [b"Hello, world!"] * 6
    assert data.count(b"Connection: keep-alive\r\n") == 5
    assert data.count(b"Connection: close\r\n") == 1


async def test_http10_keep_alive_without_known_length_closes() -> None:
    """A streamed response of unknown length is close-delimited on HTTP/1.0: the connection
    closes after it, and the pipelined request behind it is not answered."""
    async with running(stream) as srv:
        data = await exchange(srv.port, b"GET /?2 HTTP/1.0\r\nConnection: keep-alive\r\n\r\n" * 2)
    head, _, body = data.partition(b"\r\n\r\n")
    assert b"\r\nConnection: close" in head
    assert b"content-length" not in head.lower()
    assert body == b"A" * 1024 + b"B" * 1024  # one response only


async def test_ab_keep_alive() -> None:
    """ApacheBench with ``-k`` (HTTP/1.0 keep-alive): no failure, every request kept alive."""
    ab = require_program("ab")
    async with running(hello, threads=4) as srv:
        process = await asyncio.create_subprocess_exec(
            ab,
            "-k",
            "-n",
            "2000",
            "-c",
            "20",
            f"{srv.url}/",
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        output, _ = await asyncio.wait_for(process.communicate(), 120)
    text = output.decode("utf-8", "replace")
    assert process.returncode == 0, text
    assert re.search(r"^Complete requests:\s+2000$", text, re.M), text
    assert re.search(r"^Failed requests:\s+0$", text, re.M), text
    assert re.search(r"^Keep-Alive requests:\s+2000$", text, re.M), text


async def test_http10_keep_alive_file_response(tmp_path: Path) -> None:
    """A file response (sendfile) has a known length: the connection stays open after it."""
    path = tmp_path / "data.bin"
    path.write_bytes(b"f" * 100_000)

    def app(environ: dict[str, Any], start_response: Any) -> Any:
        start_response("200 OK", [("Content-Type", "application/octet-stream")])
        return environ["wsgi.file_wrapper"](path.open("rb"))

    async with running(app) as srv:
        data = await exchange(srv.port, KEEP_ALIVE_10 % 1 * 2 + b"GET / HTTP/1.0\r\n\r\n")
    replies = decode_replies(data.replace(b"Connection: keep-alive", b"X-Was: keep-alive"))
    assert [len(reply.body) for reply in replies] == [100_000] * 3
    assert data.count(b"Connection: keep-alive\r\n") == 2
