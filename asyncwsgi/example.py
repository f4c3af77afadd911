"""The bundled example application: ``asyncwsgi serve asyncwsgi.example:app``.

Pages:

- ``/``: the request as the application sees it (the WSGI environ), and a form to upload a file;
- ``/stream``: a response streamed in chunks, one every 0.2 s, without Content-Length (chunked);
- ``/file``: a file sent through ``wsgi.file_wrapper`` (zero-copy sendfile on plain TCP);
- ``/upload`` (POST): reads ``wsgi.input`` and reports the size and SHA-256 of what arrived.
"""

from __future__ import annotations

import hashlib
import html
import os
import time
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ._types import StartResponse, WSGIEnvironment

__all__ = ["app"]

_PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>asyncwsgi</title>
<style>body{{font-family:sans-serif;margin:2em}}td{{padding:2px 8px;vertical-align:top}}
tr:nth-child(odd){{background:#f4f4f4}}code{{font-size:90%}}</style></head>
<body><h1>asyncwsgi is serving this page</h1>
<p><a href="/stream">a streamed response</a> &middot; <a href="/file">a file via
wsgi.file_wrapper</a></p>
<form method="post" action="/upload" enctype="multipart/form-data">
<input type="file" name="file"> <button>Upload</button></form>
<h2>The request (WSGI environ)</h2><table>{rows}</table></body></html>
"""


def app(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
    """Route to the example pages. Worker thread."""
    path = environ.get("PATH_INFO", "/")
    method = environ["REQUEST_METHOD"]
    if path == "/" and method in ("GET", "HEAD"):
        return _index(environ, start_response)
    if path == "/stream":
        start_response("200 OK", [("Content-Type", "text/plain; charset=utf-8")])
        return _stream()
    if path == "/file":
        filelike = open(os.path.abspath(__file__), "rb")  # noqa: SIM115 - closed by the server
        size = os.fstat(filelike.fileno()).st_size
        start_response(
            "200 OK", [("Content-Type", "text/plain; charset=utf-8"), ("Content-Length", str(size))]
        )
        wrapper = environ["wsgi.file_wrapper"]
        return wrapper(filelike, 65536)  # type: ignore[no-any-return]
    if path == "/upload" and method == "POST":
        digest = hashlib.sha256()
        size = 0
        while chunk := environ["wsgi.input"].read(65536):
            digest.update(chunk)
            size += len(chunk)
        body = f"received {size} bytes, sha256 {digest.hexdigest()}\n".encode()
        start_response(
            "200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))]
        )
        return [body]
    body = b"Not Found\n"
    start_response("404 Not Found", [("Content-Type", "text/plain"), ("Content-Length", "10")])
    return [body]


def _index(environ: WSGIEnvironment, start_response: StartResponse) -> list[bytes]:
    rows = "".join(
        f"<tr><td><code>{html.escape(key)}</code></td><td><code>{html.escape(repr(value))}"
        "</code></td></tr>"
        for key, value in sorted(environ.items())
    )
    body = _PAGE.format(rows=rows).encode("utf-8")
    start_response("200 OK", [("Content-Type", "text/html; charset=utf-8")])
    return [body]


def _stream() -> Iterator[bytes]:
    for i in range(1, 11):
        yield f"chunk {i} of 10 at {time.strftime('%H:%M:%S')}\n".encode()
        time.sleep(0.2)
