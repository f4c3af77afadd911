"""WSGI applications for the server benchmarks, one per scenario.

Every server under test imports these as ``apps:NAME`` with ``benchmarks/`` as its working
directory (or on ``sys.path``). The framework apps (``flask``, ``django``) are built on first
attribute access, so importing this module stays cheap and works without Flask or Django
installed.

:func:`reference_response` calls an app in-process and returns its status and body length: the
benchmark harness uses it to learn what a correct response looks like, so a server that answers
fast but wrong is caught by the wrk check script instead of winning.
"""

from __future__ import annotations

import importlib
import io
import os
import tempfile
import time
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any, ClassVar
from wsgiref.util import FileWrapper, setup_testing_defaults

if TYPE_CHECKING:
    from wsgiref.types import StartResponse, WSGIApplication, WSGIEnvironment

__all__ = [
    "APP_NAMES",
    "ECHO_BODY_BYTES",
    "FILE_BYTES",
    "body1m",
    "body64k",
    "bench_file_path",
    "echo",
    "file",
    "hello",
    "reference_response",
    "sleep",
    "stream",
]

KiB = 1024
MiB = 1024 * KiB

HELLO = b"Hello, world!"
BODY_64K = b"x" * (64 * KiB)
BODY_1M = b"x" * MiB
STREAM_CHUNK = b"s" * (16 * KiB)
STREAM_CHUNKS = 64
FILE_BYTES = 10 * MiB
FILE_BLOCK_BYTES = 64 * KiB
ECHO_BODY_BYTES = MiB
SLEEP_S = 0.05

APP_NAMES = (
    "hello",
    "body64k",
    "body1m",
    "stream",
    "file",
    "echo",
    "sleep",
    "flask",
    "django",
)


def _plain_headers(length: int) -> list[tuple[str, str]]:
    return [("Content-Type", "text/plain"), ("Content-Length", str(length))]


def hello(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
    """13-byte body with Content-Length: the per-request overhead of the server."""
    start_response("200 OK", _plain_headers(len(HELLO)))
    return [HELLO]


def body64k(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
    """One 64 KiB chunk with Content-Length."""
    start_response("200 OK", _plain_headers(len(BODY_64K)))
    return [BODY_64K]


def body1m(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
    """One 1 MiB chunk with Content-Length."""
    start_response("200 OK", _plain_headers(len(BODY_1M)))
    return [BODY_1M]


def _stream_chunks() -> Iterator[bytes]:
    for _ in range(STREAM_CHUNKS):
        yield STREAM_CHUNK


def stream(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
    """A generator of 64 x 16 KiB chunks and no Content-Length (chunked on HTTP/1.1)."""
    start_response("200 OK", [("Content-Type", "application/octet-stream")])
    return _stream_chunks()


def bench_file_path() -> str:
    """Return the path of the 10 MiB benchmark file, creating it once.

    The file lives at a fixed path in the temp directory so that every server process (and
    nginx, for the reference row) serves the same bytes. It is written to a private name and
    renamed into place, so concurrent creators never see a partial file.
    """
    directory = os.path.join(tempfile.gettempdir(), "asyncwsgi-bench")
    path = os.path.join(directory, "file10m.bin")
    try:
        if os.path.getsize(path) == FILE_BYTES:
            return path
    except OSError:
        pass
    os.makedirs(directory, exist_ok=True)
    fd, tmp_path = tempfile.mkstemp(dir=directory, prefix=".file10m-")
    try:
        block = bytes(range(256)) * (MiB // 256)
        with os.fdopen(fd, "wb") as out:
            for _ in range(FILE_BYTES // MiB):
                out.write(block)
        os.chmod(tmp_path, 0o644)
        os.replace(tmp_path, path)
    except BaseException:
        os.unlink(tmp_path)
        raise
    return path


def file(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
    """A 10 MiB file through ``wsgi.file_wrapper`` with Content-Length, as FileResponse does."""
    path = bench_file_path()
    handle = open(path, "rb")  # noqa: SIM115 - closed by the server through the wrapper
    start_response(
        "200 OK",
        [("Content-Type", "application/octet-stream"), ("Content-Length", str(FILE_BYTES))],
    )
    wrapper = environ.get("wsgi.file_wrapper", FileWrapper)
    result: Iterable[bytes] = wrapper(handle, FILE_BLOCK_BYTES)
    return result


def echo(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
    """Read the whole request body from ``wsgi.input`` and answer its length in decimal."""
    stream_in = environ["wsgi.input"]
    remaining = int(environ.get("CONTENT_LENGTH") or 0)
    received = 0
    while remaining > 0:
        chunk = stream_in.read(min(remaining, 64 * KiB))
        if not chunk:
            break
        received += len(chunk)
        remaining -= len(chunk)
    body = str(received).encode("ascii")
    start_response("200 OK", _plain_headers(len(body)))
    return [body]


def sleep(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
    """Block the worker thread for 50 ms, then answer like ``hello``: thread-pool bound."""
    time.sleep(SLEEP_S)
    return hello(environ, start_response)


# Flask and Django are imported by name at build time: this module must import (and type-check)
# where neither is installed.


def _build_flask() -> WSGIApplication:
    flask = importlib.import_module("flask")
    jsonify = flask.jsonify
    app = flask.Flask("asyncwsgi_bench")

    def index() -> Any:
        return jsonify(message="Hello, world!", server="benchmark", items=[1, 2, 3])

    app.add_url_rule("/", view_func=index, methods=["GET"])

    wsgi_app: WSGIApplication = app
    return wsgi_app


class _DjangoURLConf:
    """Stands in for a ``urls.py`` module: Django reads ``urlpatterns`` from ROOT_URLCONF."""

    urlpatterns: ClassVar[list[Any]] = []


def _build_django() -> WSGIApplication:
    django = importlib.import_module("django")
    settings = importlib.import_module("django.conf").settings
    http = importlib.import_module("django.http")
    path = importlib.import_module("django.urls").path

    def index(request: Any) -> Any:
        return http.HttpResponse(HELLO, content_type="text/plain")

    if not settings.configured:
        _DjangoURLConf.urlpatterns = [path("", index)]
        settings.configure(
            DEBUG=False,
            SECRET_KEY="benchmark-only-not-secret",
            ALLOWED_HOSTS=["*"],
            ROOT_URLCONF=_DjangoURLConf,
            MIDDLEWARE=[
                "django.middleware.security.SecurityMiddleware",
                "django.middleware.common.CommonMiddleware",
            ],
            INSTALLED_APPS=[],
            USE_TZ=True,
            LOGGING_CONFIG=None,
        )
        django.setup()
    handler: WSGIApplication = importlib.import_module("django.core.handlers.wsgi").WSGIHandler()
    return handler


_LAZY_BUILDERS = {"flask": _build_flask, "django": _build_django}
_lazy_apps: dict[str, WSGIApplication] = {}


def __getattr__(name: str) -> WSGIApplication:
    """Build ``flask`` and ``django`` on first access (PEP 562)."""
    builder = _LAZY_BUILDERS.get(name)
    if builder is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    app = _lazy_apps.get(name)
    if app is None:
        app = _lazy_apps[name] = builder()
    return app


def get_app(name: str) -> WSGIApplication:
    """Return the app for a scenario name (``hello``, ``flask``, ...)."""
    if name not in APP_NAMES:
        raise KeyError(name)
    if name in _LAZY_BUILDERS:
        return __getattr__(name)
    app: WSGIApplication = globals()[name]
    return app


def reference_response(name: str) -> tuple[int, int]:
    """Call app ``name`` in-process and return ``(status code, body length in bytes)``.

    ``echo`` is called with a 1 MiB POST body, as the benchmark sends it.
    """
    app = get_app(name)
    environ: dict[str, Any] = {}
    setup_testing_defaults(environ)
    environ["wsgi.file_wrapper"] = FileWrapper
    if name == "echo":
        environ["REQUEST_METHOD"] = "POST"
        environ["CONTENT_LENGTH"] = str(ECHO_BODY_BYTES)
        environ["wsgi.input"] = io.BytesIO(b"x" * ECHO_BODY_BYTES)
    statuses: list[str] = []

    def start_response(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
        statuses.append(status)
        return lambda data: None

    result = app(environ, start_response)
    try:
        length = sum(len(chunk) for chunk in result)
    finally:
        close = getattr(result, "close", None)
        if close is not None:
            close()
    return int(statuses[-1].split(" ", 1)[0]), length


if __name__ == "__main__":
    import json
    import sys

    names = sys.argv[1:] or list(APP_NAMES)
    print(json.dumps({name: reference_response(name) for name in names}))
