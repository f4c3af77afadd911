"""Property test: mutated and random requests over real sockets never break the server.

Hypothesis draws requests from gunicorn's corpus (``test_corpus.CORPUS``), mutates them (bytes
flipped, dropped, inserted, duplicated, line ends changed, requests run together, a head cut
short) or makes up random bytes, and sends each on its own connection to one running server,
in one to three writes, then half-closes or just waits. For every example:

- the server answers or closes within a bound a little above its (short) timeouts;
- what it sends starts as an HTTP/1.1 response;
- every request the application gets is well formed: a token method, a path from the target,
  header keys and values without control characters, a body of the declared length, never
  Content-Length with Transfer-Encoding;

and after all examples, once every connection has closed and every worker call has returned,
the process has the file descriptors it had before them, and, once the server is stopped, the
threads it had before it started.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import socket
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import Future
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import asyncwsgi
from asyncwsgi.errors import ClientDisconnected

from .test_corpus import CORPUS

Environ = dict[str, Any]

#: Seconds the server may take to answer or close any example: its timeouts are 0.2 s, its
#: sweep runs every 0.05 s, and a loaded machine gets a wide margin.
LIVENESS = 10.0
THREADS = 4
SERVER_OPTIONS: dict[str, Any] = {
    "host": "127.0.0.1",
    "port": 0,
    "threads": THREADS,
    "timeout_keep_alive": 0.2,
    "timeout_request_header": 0.2,
    "timeout_read": 0.2,
    "timeout_write": 2.0,
    "timeout_linger": 0.2,
    "limit_request_body": 1024 * 1024,
    "access_log": False,
}

SEEDS: list[bytes] = [
    base64.b64decode(case["raw_b64"])
    for case in json.loads(CORPUS.read_text(encoding="utf-8"))["cases"]
]

_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+\Z")
_VALUE = re.compile(r"[^\x00-\x08\x0a-\x1f\x7f]*\Z")  # VCHAR, obs-text, SP, HTAB
_KEY = re.compile(r"HTTP_[!#$%&'*+.^_`|~0-9A-Z]+\Z")
_TARGET_CHARS = re.compile(r"[\x21-\x7e]*\Z")


def check_environ(environ: Environ, body: bytes | None) -> list[str]:
    """Return what is wrong with a request the application got (nothing, normally)."""
    problems = []
    method = environ["REQUEST_METHOD"]
    if not _TOKEN.match(method):
        problems.append(f"method {method!r}")
    protocol = environ["SERVER_PROTOCOL"]
    if protocol not in ("HTTP/1.0", "HTTP/1.1"):
        problems.append(f"protocol {protocol!r}")
    path = environ["PATH_INFO"]
    if not (path.startswith("/") or (path == "*" and method == "OPTIONS")):
        problems.append(f"PATH_INFO {path!r}")
    if not _TARGET_CHARS.match(environ["QUERY_STRING"]):
        problems.append(f"QUERY_STRING {environ['QUERY_STRING']!r}")
    for key, value in environ.items():
        if key.startswith("HTTP_"):
            if not _KEY.match(key):
                problems.append(f"header key {key!r}")
            if not _VALUE.match(value) or value != value.strip(" \t"):
                problems.append(f"header value {key}={value!r}")
    length = environ.get("CONTENT_LENGTH")
    if length is not None:
        if not length.isdigit():
            problems.append(f"CONTENT_LENGTH {length!r}")
        elif body is not None and len(body) != int(length):
            problems.append(f"body of {len(body)} bytes for CONTENT_LENGTH {length}")
        if "HTTP_TRANSFER_ENCODING" in environ:
            problems.append("Content-Length with Transfer-Encoding")
    if protocol == "HTTP/1.1" and "HTTP_HOST" not in environ:
        problems.append("HTTP/1.1 without Host")
    return problems


class Recorder:
    """The application: reads each body, checks the request, answers 200. Any thread."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.requests = 0
        self.violations: list[str] = []

    def __call__(self, environ: Environ, start_response: Any) -> Iterable[bytes]:
        try:
            body: bytes | None = environ["wsgi.input"].read()
        except ClientDisconnected:
            body = None  # the body never completed: the client timed out or left
        problems = check_environ(environ, body)
        with self.lock:
            self.requests += 1
            self.violations.extend(problems)
        payload = b"ok %d\n" % (len(body) if body is not None else -1)
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [payload]


class FuzzServer:
    """A server on its own loop in a thread, so that hypothesis can drive it synchronously."""

    def __init__(self, app: Recorder) -> None:
        self.loop = asyncwsgi.server.new_event_loop("auto")
        self.thread = threading.Thread(target=self.loop.run_forever, name="asyncwsgi-fuzz-loop")
        self.app = app
        self.server: asyncwsgi.Server | None = None
        self.port = 0

    def call(self, factory: Callable[[], Any]) -> Any:
        """Run the coroutine ``factory()`` on the server's loop and return its result."""

        async def run() -> Any:
            return await factory()

        future: Future[Any] = asyncio.run_coroutine_threadsafe(run(), self.loop)
        return future.result(LIVENESS * 3)

    def start(self) -> None:
        self.thread.start()

        async def start() -> asyncwsgi.Server:
            server = asyncwsgi.Server(self.app, asyncwsgi.Config(**SERVER_OPTIONS))
            await server.start()
            return server

        self.server = self.call(start)
        self.port = self.server.addresses[0][1]

    def quiesce(self) -> None:
        """Wait until every connection has closed and every worker call has returned."""
        server = self.server
        assert server is not None
        state = server.state

        async def no_connections() -> None:
            idle = state.idle_changed
            assert idle is not None
            while state.channels:
                idle.clear()
                await asyncio.wait_for(idle.wait(), LIVENESS)

        self.call(no_connections)
        # One call per thread, all meeting at a barrier: they can only all run once every
        # call queued before them has returned.
        barrier = threading.Barrier(THREADS + 1)
        for _ in range(THREADS):
            self.loop.call_soon_threadsafe(state.pool.submit, barrier.wait, LIVENESS)
        barrier.wait(LIVENESS)
        assert state.requests_active == 0

    def stop(self) -> None:
        if self.server is not None:
            server = self.server
            self.call(lambda: server.shutdown(5.0))
            self.call(self.loop.shutdown_default_executor)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(LIVENESS)
        self.loop.close()


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def exchange(port: int, pieces: list[bytes], half_close: bool) -> bytes:
    """Send ``pieces``, half-close if asked, and read until the server closes.

    Raises:
        AssertionError: the server neither answered nor closed within :data:`LIVENESS` s.
    """
    deadline = time.monotonic() + LIVENESS
    received = b""
    with socket.create_connection(("127.0.0.1", port), timeout=LIVENESS) as sock:
        try:
            for piece in pieces:
                sock.sendall(piece)
            if half_close:
                sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # the server answered and closed before the client was done: fine
        while True:
            left = deadline - time.monotonic()
            assert left > 0, f"the server neither answered nor closed: {received[:200]!r}"
            sock.settimeout(left)
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                raise AssertionError(
                    f"the server neither answered nor closed: {received[:200]!r}"
                ) from None
            except ConnectionResetError:
                return received  # cut (after a lingering close ran out): also a close
            if not chunk:
                return received
            received += chunk


# -- strategies --------------------------------------------------------------------------------

_MUTATIONS = ("flip", "delete", "insert", "duplicate", "truncate", "bare-lf", "crlf", "join")


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    data = bytearray(draw(st.sampled_from(SEEDS)))
    for mutation in draw(st.lists(st.sampled_from(_MUTATIONS), max_size=4)):
        at = draw(st.integers(0, len(data)))
        if mutation == "flip" and data:
            data[min(at, len(data) - 1)] = draw(st.integers(0, 255))
        elif mutation == "delete":
            del data[at : at + draw(st.integers(1, 16))]
        elif mutation == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=16))
        elif mutation == "duplicate":
            data[at:at] = data[at : at + draw(st.integers(1, 64))]
        elif mutation == "truncate":
            del data[at:]
        elif mutation == "bare-lf":
            index = data.find(b"\r\n", at)
            if index >= 0:
                del data[index]
        elif mutation == "crlf":
            data[at:at] = b"\r\n"
        elif mutation == "join":
            data += draw(st.sampled_from(SEEDS))
    return bytes(data)


requests = st.one_of(mutated(), mutated(), mutated(), st.binary(max_size=2048))


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({min(cut, len(data)) for cut in cuts})
    pieces = [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True)]
    return [piece for piece in pieces if piece]


# -- the test ----------------------------------------------------------------------------------


def test_fuzzed_requests_never_break_the_server() -> None:
    threads_before = set(threading.enumerate())
    app = Recorder()
    harness = FuzzServer(app)
    harness.start()
    try:
        # Warm up, so that what the loop and the pool create once is there before the count.
        exchange(harness.port, [b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"], True)
        harness.quiesce()
        fds_before = open_fds()
        served = app.requests

        @settings(
            max_examples=200,
            deadline=None,
            database=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        )
        @given(
            data=requests,
            cuts=st.lists(st.integers(0, 4096), max_size=2),
            half_close=st.sampled_from([True, True, True, True, True, False]),
        )
        def example(data: bytes, cuts: list[int], half_close: bool) -> None:
            received = exchange(harness.port, split(data, cuts), half_close)
            assert not received or received.startswith(b"HTTP/1.1 "), received[:200]
            with app.lock:
                assert not app.violations, app.violations

        example()
        harness.quiesce()
        assert open_fds() == fds_before
        assert app.requests > served  # the mutations left some requests valid
    finally:
        harness.stop()
    leftover = [t for t in threading.enumerate() if t not in threads_before and t.is_alive()]
    assert not leftover, leftover
