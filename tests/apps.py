"""Fixture WSGI applications, each wrapped in ``wsgiref.validate.validator`` where it is valid.

The validator checks both sides: that the app follows PEP 3333 and that the server gives it a
conforming environ, ``start_response``, ``wsgi.input`` and ``wsgi.errors``.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterable, Iterator
from typing import Any
from wsgiref.validate import validator

Environ = dict[str, Any]


def _hello(environ: Environ, start_response: Any) -> Iterable[bytes]:
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "13")])
    return [b"Hello, world!"]


hello = validator(_hello)

_ENV_KEYS = (
    "REQUEST_METHOD",
    "SCRIPT_NAME",
    "PATH_INFO",
    "QUERY_STRING",
    "CONTENT_TYPE",
    "CONTENT_LENGTH",
    "SERVER_NAME",
    "SERVER_PORT",
    "SERVER_PROTOCOL",
    "REMOTE_ADDR",
    "REMOTE_PORT",
    "SERVER_SOFTWARE",
    "wsgi.url_scheme",
    "wsgi.multithread",
    "wsgi.multiprocess",
    "wsgi.run_once",
    "wsgi.input_terminated",
    "wsgi.version",
)


def _environ(environ: Environ, start_response: Any) -> Iterable[bytes]:
    """Answer with the environ as JSON: the standard keys, every HTTP_* key, the body."""
    data = {key: environ[key] for key in _ENV_KEYS if key in environ}
    data.update({k: v for k, v in environ.items() if k.startswith("HTTP_")})
    stream = environ["wsgi.input"]  # the validator insists on read(size)
    data["body"] = b"".join(iter(lambda: stream.read(65536), b"")).decode("latin-1")
    data["has_file_wrapper"] = callable(environ.get("wsgi.file_wrapper"))
    body = json.dumps(data).encode()
    start_response("200 OK", [("Content-Type", "application/json")])
    return [body]


environ_app = validator(_environ)


def _stream(environ: Environ, start_response: Any) -> Iterable[bytes]:
    """Stream ``?n`` chunks of 1 KiB without Content-Length (chunked on HTTP/1.1)."""
    count = int(environ["QUERY_STRING"] or "3")
    start_response("200 OK", [("Content-Type", "application/octet-stream")])
    return (bytes([65 + i % 26]) * 1024 for i in range(count))


stream = validator(_stream)


def _write_app(environ: Environ, start_response: Any) -> Iterable[bytes]:
    """Use the legacy write() callable, then return a last chunk."""
    write = start_response("200 OK", [("Content-Type", "text/plain")])
    write(b"first,")
    write(b"second,")
    return [b"third"]


write_app = validator(_write_app)


def _echo(environ: Environ, start_response: Any) -> Iterable[bytes]:
    """Echo the request body; ``?mode=`` picks read(), read(n), readline or iteration."""
    stream = environ["wsgi.input"]
    mode = environ["QUERY_STRING"]
    if mode == "read-n":
        parts = []
        while chunk := stream.read(7):
            parts.append(chunk)
        body = b"".join(parts)
    elif mode == "readline":
        parts = []
        while line := stream.readline():
            parts.append(line)
        body = b"|".join(parts)
    elif mode == "readline-n":
        body = b"|".join(iter(lambda: stream.readline(4), b""))
    elif mode == "readlines":
        body = b"|".join(stream.readlines())
    elif mode == "iter":
        body = b"|".join(stream)
    else:
        body = stream.read(1 << 30)
    assert stream.read(1) == b""
    start_response("200 OK", [("Content-Type", "application/octet-stream")])
    return [body]


echo = validator(_echo)


class CloseRecorder:
    """An app whose result records ``close()`` calls; ``mode`` picks how it ends."""

    def __init__(self, mode: str = "ok", chunks: int = 3, chunk_size: int = 1024) -> None:
        self.mode = mode
        self.chunks = chunks
        self.chunk_size = chunk_size
        self.closes = 0
        self.closed = threading.Event()
        self.started = threading.Event()
        self.produced = 0

    def __call__(self, environ: Environ, start_response: Any) -> Iterable[bytes]:
        if self.mode == "error-before":
            raise RuntimeError("boom before start_response")
        start_response("200 OK", [("Content-Type", "application/octet-stream")])
        return _Recorded(self)


class _Recorded:
    def __init__(self, owner: CloseRecorder) -> None:
        self.owner = owner

    def __iter__(self) -> Iterator[bytes]:
        owner = self.owner
        owner.started.set()
        for i in range(owner.chunks):
            if owner.mode == "error-mid" and i == 1:
                raise RuntimeError("boom mid-iteration")
            owner.produced += owner.chunk_size
            yield b"x" * owner.chunk_size

    def close(self) -> None:
        self.owner.closes += 1
        self.owner.closed.set()


def status_app(status: str, headers: list[tuple[str, str]], body: list[bytes]) -> Any:
    """An app that answers with exactly these status, headers and body (no validation)."""

    def app(environ: Environ, start_response: Any) -> Iterable[bytes]:
        start_response(status, headers)
        return body

    return app


def generator_app(status: str, headers: list[tuple[str, str]], body: list[bytes]) -> Any:
    """Like :func:`status_app`, but the body is a fresh generator on every request."""

    def app(environ: Environ, start_response: Any) -> Iterable[bytes]:
        start_response(status, headers)
        return (chunk for chunk in body)

    return app
