"""Request bodies over real sockets: large uploads arrive whole, in order, and exactly.

The HTTP/1.1 layer hands body payload to ``wsgi.input`` without passing it through h11's
buffer where the framing allows it (``asyncwsgi._h11.take_piece``); these tests check the
result end to end, with reads of many sizes and pipelined requests after each body.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable
from typing import Any

from .helpers import decode_replies, exchange, running


def digest_app(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
    """Answer ``<length> <sha256>`` of the body, read in 64 KiB reads as the benchmarks do."""
    stream = environ["wsgi.input"]
    digest = hashlib.sha256()
    size = 0
    while chunk := stream.read(65536):
        digest.update(chunk)
        size += len(chunk)
    body = b"%d %s" % (size, digest.hexdigest().encode())
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]


def expected(body: bytes) -> bytes:
    return b"%d %s" % (len(body), hashlib.sha256(body).hexdigest().encode())


async def test_large_uploads_back_to_back_arrive_exactly() -> None:
    length_body = os.urandom(4 * 1024 * 1024 + 17)
    chunked_body = os.urandom(3 * 1024 * 1024 + 5)
    sizes = [1, 4095, 65536, 100_000, 262_144, 1_000_003]
    chunks, offset = [], 0
    while offset < len(chunked_body):
        size = sizes[len(chunks) % len(sizes)]
        chunks.append(chunked_body[offset : offset + size])
        offset += size
    chunked = b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in chunks) + b"0\r\n\r\n"
    requests = (
        b"POST /a HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n\r\n" % len(length_body)
        + length_body
        + b"POST /b HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
        + chunked
        + b"POST /c HTTP/1.1\r\nHost: t\r\nContent-Length: 3\r\nConnection: close\r\n\r\nend"
    )
    async with running(digest_app, access_log=False) as srv:
        raw = await exchange(srv.port, requests)
    replies = decode_replies(raw, method=b"POST")
    assert [reply.status for reply in replies] == [200, 200, 200]
    assert [reply.body for reply in replies] == [
        expected(length_body),
        expected(chunked_body),
        expected(b"end"),
    ]
