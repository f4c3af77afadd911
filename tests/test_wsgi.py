"""Unit tests of :func:`asyncwsgi.wsgi.run_wsgi`, the worker-thread side of PEP 3333.

``run_wsgi`` runs in a plain thread, as in the pool, and hands the response to a fake sink that
records every call. No socket and no event loop.
"""

from __future__ import annotations

import io
import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any
from wsgiref.validate import validator

import h11
import pytest

from asyncwsgi import wsgi
from asyncwsgi.bridge import EMPTY_BODY
from asyncwsgi.config import Config
from asyncwsgi.environ import build_environ, connection_environ
from asyncwsgi.errors import ClientDisconnected
from asyncwsgi.events import ResponseHead as Head
from asyncwsgi.filewrapper import FileWrapper
from asyncwsgi.http11 import ServerConnection, to_request
from asyncwsgi.logs import LogThrottle
from asyncwsgi.state import request_limits
from asyncwsgi.wsgi import run_wsgi

App = Callable[[dict[str, Any], Any], Iterable[bytes]]
TIMEOUT = 10.0


class FakeSink:
    """Records what ``run_wsgi`` hands over; can raise ClientDisconnected on a given send."""

    def __init__(self, can_sendfile: bool = False, disconnect_on_send: int | None = None) -> None:
        self.can_sendfile = can_sendfile
        self.disconnected = False
        self.disconnect_on_send = disconnect_on_send
        self.sends: list[tuple[Head | None, list[bytes], int, bool]] = []
        self.files: list[tuple[Head, FileWrapper, int, int]] = []
        self.aborts = 0
        self.calls: list[str] = []
        self.threads: set[int] = set()

    def send(self, head: Head | None, chunks: list[bytes], nbytes: int, end: bool) -> None:
        self.threads.add(threading.get_ident())
        if self.disconnect_on_send is not None and len(self.sends) + 1 >= self.disconnect_on_send:
            self.disconnected = True
        if self.disconnected:
            self.calls.append("send-refused")
            raise ClientDisconnected("client disconnected")
        assert nbytes == sum(map(len, chunks))
        self.sends.append((head, list(chunks), nbytes, end))
        self.calls.append("send")

    def send_file(self, head: Head, wrapper: FileWrapper, offset: int, count: int) -> None:
        self.threads.add(threading.get_ident())
        if self.disconnected:
            raise ClientDisconnected("client disconnected")
        self.files.append((head, wrapper, offset, count))
        self.calls.append("send_file")

    def abort(self) -> None:
        self.threads.add(threading.get_ident())
        self.aborts += 1
        self.calls.append("abort")

    # -- views of what was handed over ---------------------------------------------------------

    @property
    def head(self) -> Head:
        heads = [head for head, _, _, _ in self.sends if head is not None]
        heads += [head for head, _, _, _ in self.files]
        assert len(heads) == 1, f"expected exactly one head, got {heads}"
        return heads[0]

    @property
    def body(self) -> bytes:
        return b"".join(b"".join(chunks) for _, chunks, _, _ in self.sends)

    @property
    def ended(self) -> bool:
        return bool(self.sends) and self.sends[-1][3]


def make_environ(
    method: bytes = b"GET",
    target: bytes = b"/",
    body: object = EMPTY_BODY,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    base = connection_environ(
        server=("127.0.0.1", 8000),
        url_scheme="http",
        root_path="",
        multiprocess=False,
    )
    request = to_request(
        h11.Request(method=method, target=target, headers=[(b"host", b"localhost")])
    )
    environ = build_environ(base, request, body)
    environ.update(extra or {})
    return environ


def run(app: App, sink: FakeSink, environ: dict[str, Any] | None = None) -> None:
    """Run ``run_wsgi`` in a plain thread, as the pool does, and wait for it."""
    errors: list[BaseException] = []

    def target() -> None:
        try:
            run_wsgi(app, environ if environ is not None else make_environ(), sink)
        except BaseException as exc:  # run_wsgi must not raise: fail the test if it does
            errors.append(exc)

    thread = threading.Thread(target=target, name="test-run-wsgi", daemon=True)
    thread.start()
    thread.join(TIMEOUT)
    assert not thread.is_alive(), "run_wsgi did not return"
    assert not errors, f"run_wsgi raised {errors[0]!r}"
    assert sink.threads <= {thread.ident}, "the sink was called from another thread"


@pytest.fixture
def errors(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> Callable[[], list[logging.LogRecord]]:
    """Return a function giving the ERROR records of the ``asyncwsgi.error`` logger so far."""
    logger = logging.getLogger("asyncwsgi.error")
    monkeypatch.setattr(logger, "propagate", True)
    monkeypatch.setattr(logger, "disabled", False)
    caplog.set_level(logging.DEBUG, logger="asyncwsgi.error")

    def records() -> list[logging.LogRecord]:
        return [
            record
            for record in caplog.records
            if record.name == "asyncwsgi.error" and record.levelno >= logging.ERROR
        ]

    return records


def assert_500(sink: FakeSink) -> None:
    """The response is a complete 500 that closes the connection, in one hand-off."""
    assert sink.aborts == 0
    assert not sink.files
    assert len(sink.sends) == 1
    head, chunks, nbytes, end = sink.sends[0]
    assert head is not None
    status, reason, headers = head
    assert status == 500
    assert reason == b"Internal Server Error"
    assert (b"Connection", b"close") in headers
    assert end
    assert b"".join(chunks).startswith(b"Internal Server Error")
    assert nbytes == len(b"".join(chunks))


class Closing:
    """A response iterable that records ``close()`` calls; raises where told."""

    def __init__(self, chunks: Iterable[bytes], fail_at: int | None = None) -> None:
        self.chunks = list(chunks)
        self.fail_at = fail_at
        self.closes = 0

    def __iter__(self) -> Iterator[bytes]:
        for i, chunk in enumerate(self.chunks):
            if i == self.fail_at:
                raise RuntimeError("boom mid-iteration")
            yield chunk

    def close(self) -> None:
        self.closes += 1


# -- the happy paths, checked by wsgiref's validator ------------------------------------------


def test_list_body_is_one_hand_off(errors: Callable[[], list[logging.LogRecord]]) -> None:
    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        start_response("200 OK", [("Content-Type", "text/plain"), ("X-Custom", "yes")])
        return [b"Hello, ", b"", b"world!"]

    sink = FakeSink()
    run(app, sink)
    assert sink.sends == [
        (
            (200, b"OK", [(b"Content-Type", b"text/plain"), (b"X-Custom", b"yes")]),
            [b"Hello, ", b"world!"],  # empty chunks are dropped
            13,
            True,
        )
    ]
    assert not errors()


def test_tuple_body_is_one_hand_off() -> None:
    def app(environ: dict[str, Any], start_response: Any) -> tuple[bytes, ...]:
        start_response("201 Created", [("Content-Type", "text/plain")])
        return (b"a", b"b")

    sink = FakeSink()
    run(app, sink)
    assert len(sink.sends) == 1
    assert sink.sends[0] == (
        (201, b"Created", [(b"Content-Type", b"text/plain")]),
        [b"a", b"b"],
        2,
        True,
    )


def test_validated_app_with_list_body(errors: Callable[[], list[logging.LogRecord]]) -> None:
    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"Hello, world!"]

    sink = FakeSink()
    run(validator(app), sink)
    assert not errors()
    assert sink.head == (200, b"OK", [(b"Content-Type", b"text/plain")])
    assert sink.body == b"Hello, world!"
    assert sink.ended
    assert sink.aborts == 0


def test_generator_hands_off_each_chunk_before_the_next_is_made(
    errors: Callable[[], list[logging.LogRecord]],
) -> None:
    sink = FakeSink()
    seen: list[int] = []

    def app(environ: dict[str, Any], start_response: Any) -> Iterator[bytes]:
        start_response("200 OK", [("Content-Type", "text/plain")])
        for part in (b"one", b"two", b"three"):
            yield part
            seen.append(len(sink.sends))  # the block just yielded is already with the sink

    run(validator(app), sink)
    assert not errors()
    assert seen == [1, 2, 3]
    assert [(head is not None, chunks, end) for head, chunks, _, end in sink.sends] == [
        (True, [b"one"], False),
        (False, [b"two"], False),
        (False, [b"three"], False),
        (False, [], True),
    ]
    assert sink.head == (200, b"OK", [(b"Content-Type", b"text/plain")])


def test_head_goes_with_the_first_non_empty_chunk(
    errors: Callable[[], list[logging.LogRecord]],
) -> None:
    sink = FakeSink()
    seen: list[int] = []

    def app(environ: dict[str, Any], start_response: Any) -> Iterator[bytes]:
        start_response("200 OK", [("Content-Type", "text/plain")])
        yield b""
        seen.append(len(sink.sends))
        yield b""
        seen.append(len(sink.sends))
        yield b"data"

    run(validator(app), sink)
    assert not errors()
    assert seen == [0, 0]  # nothing, not even the head, before the first non-empty block
    assert sink.sends[0] == ((200, b"OK", [(b"Content-Type", b"text/plain")]), [b"data"], 4, False)
    assert sink.sends[-1] == (None, [], 0, True)


def test_empty_iterable_body_sends_head_at_the_end(
    errors: Callable[[], list[logging.LogRecord]],
) -> None:
    def app(environ: dict[str, Any], start_response: Any) -> Iterator[bytes]:
        start_response("200 OK", [("Content-Type", "text/plain")])
        yield from ()

    sink = FakeSink()
    run(validator(app), sink)
    assert not errors()
    assert sink.sends == [((200, b"OK", [(b"Content-Type", b"text/plain")]), [], 0, True)]


def test_write_callable_sends_the_head_first(errors: Callable[[], list[logging.LogRecord]]) -> None:
    sink = FakeSink()
    seen: list[int] = []

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        write = start_response("200 OK", [("Content-Type", "text/plain")])
        seen.append(len(sink.sends))  # start_response itself sends nothing
        write(b"first,")
        seen.append(len(sink.sends))
        write(b"second,")
        return [b"third"]

    run(validator(app), sink)
    assert not errors()
    assert seen == [0, 1]
    head, chunks, _, end = sink.sends[0]
    assert head == (200, b"OK", [(b"Content-Type", b"text/plain")])
    assert (chunks, end) == ([b"first,"], False)
    assert all(head is None for head, _, _, _ in sink.sends[1:])
    assert sink.body == b"first,second,third"
    assert sink.ended


def test_first_write_sends_the_head_even_when_empty() -> None:
    """PEP 3333: the head goes out "upon the application's first invocation of write()"."""
    sink = FakeSink()
    seen: list[int] = []

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        write = start_response("200 OK", [("Content-Type", "text/event-stream")])
        write(b"")  # flush the head now: the client learns the status before any event
        seen.append(len(sink.sends))
        return []

    run(app, sink)
    assert seen == [1]
    assert sink.head == (200, b"OK", [(b"Content-Type", b"text/event-stream")])
    assert sink.body == b""
    assert sink.ended


def test_write_callable_with_an_unwrapped_app() -> None:
    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        write = start_response("200 OK", [])
        write(b"a")
        write(b"")  # nothing to send
        return []

    sink = FakeSink()
    run(app, sink)
    assert sink.sends == [((200, b"OK", []), [b"a"], 1, False), (None, [], 0, True)]


def test_environ_given_to_the_app_passes_the_validator(
    errors: Callable[[], list[logging.LogRecord]],
) -> None:
    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        body = environ["wsgi.input"].read(100)
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [environ["PATH_INFO"].encode("latin-1"), body]

    sink = FakeSink()
    run(validator(app), sink, make_environ(b"POST", b"/a%20b?x=1", body=io.BytesIO(b"payload")))
    assert not errors()
    assert sink.body == b"/a bpayload"


# -- start_response validation ------------------------------------------------------------------


BAD_RESPONSES = [
    pytest.param(200, [], id="status-not-str"),
    pytest.param(b"200 OK", [], id="status-bytes"),
    pytest.param("OK", [], id="status-no-code"),
    pytest.param("20 OK", [], id="status-two-digits"),
    pytest.param("200OK", [], id="status-no-space"),
    pytest.param("200 OK\r\nX-Injected: 1", [], id="status-crlf"),
    pytest.param("200 OK\n", [], id="status-lf"),
    pytest.param("200 OK\x00", [], id="status-nul"),
    pytest.param("200 OK", [("X-A", "1\r\nSet-Cookie: evil=1")], id="value-crlf"),
    pytest.param("200 OK", [("X-A", "1\nX-B: 2")], id="value-lf"),
    pytest.param("200 OK", [("X-A", "1\rX-B: 2")], id="value-cr"),
    pytest.param("200 OK", [("X-A", "1\x00")], id="value-nul"),
    pytest.param("200 OK", [("X-A\r\nX-B", "1")], id="name-crlf"),
    pytest.param("200 OK", [("X-A\n", "1")], id="name-lf"),
    pytest.param("200 OK", [("X-A\x00", "1")], id="name-nul"),
    pytest.param("200 OK", [("X A", "1")], id="name-space"),
    pytest.param("200 OK", [("X-A:", "1")], id="name-colon"),
    pytest.param("200 OK", [("", "1")], id="name-empty"),
    pytest.param("200 OK", [(b"X-A", "1")], id="name-bytes"),
    pytest.param("200 OK", [("X-A", b"1")], id="value-bytes"),
    pytest.param("200 OK", [("X-A", 1)], id="value-int"),
    pytest.param("200 OK", [("X-A", "snow \u2603")], id="value-not-latin1"),
    pytest.param("200 OK", [("X-A", "1", "2")], id="three-tuple"),
    pytest.param("200 OK", [["X-A", "1"]], id="list-not-tuple"),
    pytest.param("200 OK", (("X-A", "1"),), id="headers-tuple"),
    pytest.param("200 OK", [("Connection", "close")], id="hop-connection"),
    pytest.param("200 OK", [("Transfer-Encoding", "chunked")], id="hop-transfer-encoding"),
    pytest.param("200 OK", [("keep-alive", "timeout=5")], id="hop-keep-alive"),
    pytest.param("200 OK", [("Upgrade", "h2c")], id="hop-upgrade"),
    pytest.param("200 OK", [("TE", "trailers")], id="hop-te"),
    pytest.param("200 OK", [("Trailer", "X-A")], id="hop-trailer"),
    pytest.param("200 OK", [("Proxy-Authenticate", "Basic")], id="hop-proxy-authenticate"),
    pytest.param("200 OK", [("Proxy-Authorization", "Basic x")], id="hop-proxy-authorization"),
]


@pytest.mark.parametrize(("status", "headers"), BAD_RESPONSES)
def test_invalid_start_response_gives_500_and_one_logged_error(
    status: Any, headers: Any, errors: Callable[[], list[logging.LogRecord]]
) -> None:
    result = Closing([b"must not be sent"])

    def app(environ: dict[str, Any], start_response: Any) -> Closing:
        start_response(status, headers)
        return result

    sink = FakeSink()
    run(app, sink)
    assert_500(sink)
    assert b"must not be sent" not in sink.body
    for _, _, headers_sent in [sink.head]:
        for name, value in headers_sent:
            assert b"\r" not in name + value
            assert b"\n" not in name + value
    assert len(errors()) == 1
    assert errors()[0].exc_info is not None


@pytest.mark.parametrize(
    ("status", "headers"),
    [
        pytest.param("100 Continue", [], id="status-100"),
        pytest.param("101 Switching Protocols", [], id="status-101"),
        pytest.param("199 Informational", [], id="status-199"),
        pytest.param("200 OK", [("X-A", " leading space")], id="value-leading-space"),
        pytest.param("200 OK", [("X-A", "trailing space ")], id="value-trailing-space"),
        pytest.param("200 OK", [("X-A", "\ttab")], id="value-leading-tab"),
        pytest.param("200 OK", [("Content-Length", "abc")], id="content-length-not-a-number"),
        pytest.param("200 OK", [("Content-Length", "-1")], id="content-length-negative"),
        pytest.param(
            "200 OK", [("Content-Length", "1"), ("Content-Length", "2")], id="content-length-twice"
        ),
    ],
)
def test_every_head_handed_over_can_be_serialised(
    status: str, headers: list[tuple[str, str]], errors: Callable[[], list[logging.LogRecord]]
) -> None:
    """A head ``run_wsgi`` lets through must be one the HTTP/1.1 layer can send.

    Otherwise the connection is cut with no response at all where the application deserved a
    500 (or a normalised head): "a bad one is a 500" is the promise of :mod:`asyncwsgi.wsgi`.
    """

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        start_response(status, headers)
        return [b"x"]

    sink = FakeSink()
    run(app, sink)
    code, reason, encoded = sink.head
    conn = ServerConnection(request_limits(Config()), None)
    conn.receive_data(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    conn.send_response(code, reason, list(encoded), None, len(sink.body))
    if code == 500:
        assert len(errors()) == 1


def test_valid_statuses_and_headers_are_encoded_as_latin1() -> None:
    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        start_response(
            "599 Custom \xe9tat\t!",
            [("X-Latin", "caf\xe9"), ("X-Empty", ""), ("x-lower", "v"), ("Set-Cookie", "a=1")],
        )
        return []

    sink = FakeSink()
    run(app, sink)
    assert sink.head == (
        599,
        b"Custom \xe9tat\t!",
        [(b"X-Latin", b"caf\xe9"), (b"X-Empty", b""), (b"x-lower", b"v"), (b"Set-Cookie", b"a=1")],
    )


def test_headers_are_checked_the_same_every_time_a_pair_repeats(
    errors: Callable[[], list[logging.LogRecord]],
) -> None:
    """Encoded pairs are remembered, so a repeated header skips its checks: a refused one is
    never remembered, a remembered Content-Length still counts (a second one in the same
    response is refused, however often it was seen before), and a remembered pair encodes as it
    did the first time."""
    heads = [
        [("X-Same", "caf\xe9"), ("Content-Length", "1")],
        [("X-Same", "caf\xe9"), ("Content-Length", "1"), ("Content-Length", "1")],
        [("X-Bad", "a\nb")],
        [("Connection", "close")],
        [("X-Same", "caf\xe9")],
    ]
    outcomes = []
    for _ in range(2):
        for headers in heads:

            def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
                start_response("200 OK", headers)  # noqa: B023 - called before the next loop
                return [b"x"]

            sink = FakeSink()
            run(app, sink)
            outcomes.append(sink.head)
    assert outcomes[:5] == outcomes[5:]
    assert [head[0] for head in outcomes[:5]] == [200, 500, 500, 500, 200]
    assert outcomes[0][2] == [(b"X-Same", b"caf\xe9"), (b"Content-Length", b"1")]
    assert len(errors()) == 6


def test_second_start_response_without_exc_info_is_an_error(
    errors: Callable[[], list[logging.LogRecord]],
) -> None:
    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        start_response("200 OK", [])
        start_response("404 Not Found", [])
        return [b"not sent"]

    sink = FakeSink()
    run(app, sink)
    assert_500(sink)
    assert len(errors()) == 1


def test_start_response_with_exc_info_before_the_head_replaces_it(
    errors: Callable[[], list[logging.LogRecord]],
) -> None:
    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        start_response("200 OK", [("Content-Type", "text/plain"), ("X-First", "1")])
        try:
            raise ValueError("handled by the app")
        except ValueError:
            start_response(
                "503 Service Unavailable", [("Content-Type", "text/plain")], sys.exc_info()
            )
        return [b"sorry"]

    sink = FakeSink()
    run(validator(app), sink)
    assert not errors()
    assert sink.head == (503, b"Service Unavailable", [(b"Content-Type", b"text/plain")])
    assert sink.body == b"sorry"


def test_start_response_with_exc_info_after_the_head_reraises(
    errors: Callable[[], list[logging.LogRecord]],
) -> None:
    reraised: list[BaseException] = []
    originals: list[BaseException] = []
    result = Closing([])

    def app(environ: dict[str, Any], start_response: Any) -> Closing:
        write = start_response("200 OK", [("Content-Type", "text/plain")])
        write(b"partial")
        try:
            raise ValueError("late failure")
        except ValueError as exc:
            originals.append(exc)
            try:
                start_response("500 Oops", [("Content-Type", "text/plain")], sys.exc_info())
            except ValueError as again:
                reraised.append(again)
                raise
        return result

    sink = FakeSink()
    run(app, sink)
    assert len(reraised) == 1
    assert reraised[0] is originals[0]
    assert sink.head[0] == 200  # the head that went out is not replaced
    assert sink.body == b"partial"
    assert not sink.ended
    assert sink.aborts == 1
    assert len(errors()) == 1


# -- bodies the application gets wrong --------------------------------------------------------


def test_str_chunk_in_a_list_gives_500(errors: Callable[[], list[logging.LogRecord]]) -> None:
    def app(environ: dict[str, Any], start_response: Any) -> list[Any]:
        start_response("200 OK", [])
        return [b"ok", "not bytes"]

    sink = FakeSink()
    run(app, sink)
    assert_500(sink)
    assert len(errors()) == 1


def test_str_chunk_from_an_iterable_gives_500_before_the_head(
    errors: Callable[[], list[logging.LogRecord]],
) -> None:
    result = Closing(["text"])  # type: ignore[list-item]

    def app(environ: dict[str, Any], start_response: Any) -> Closing:
        start_response("200 OK", [])
        return result

    sink = FakeSink()
    run(app, sink)
    assert_500(sink)
    assert result.closes == 1
    assert len(errors()) == 1


def test_str_chunk_after_the_head_aborts(errors: Callable[[], list[logging.LogRecord]]) -> None:
    result = Closing([b"bytes first", "then text"])  # type: ignore[list-item]

    def app(environ: dict[str, Any], start_response: Any) -> Closing:
        start_response("200 OK", [])
        return result

    sink = FakeSink()
    run(app, sink)
    assert sink.body == b"bytes first"
    assert not sink.ended
    assert sink.aborts == 1
    assert result.closes == 1
    assert len(errors()) == 1


def test_str_given_to_write_is_an_error(errors: Callable[[], list[logging.LogRecord]]) -> None:
    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        write = start_response("200 OK", [])
        write("text")
        return []

    sink = FakeSink()
    run(app, sink)
    assert_500(sink)
    assert len(errors()) == 1


def test_no_start_response_gives_500(errors: Callable[[], list[logging.LogRecord]]) -> None:
    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        return [b"body without a head"]

    sink = FakeSink()
    run(app, sink)
    assert_500(sink)
    assert len(errors()) == 1


def test_error_before_the_head_gives_500(errors: Callable[[], list[logging.LogRecord]]) -> None:
    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        raise RuntimeError("boom before start_response")

    sink = FakeSink()
    run(app, sink)
    assert_500(sink)
    assert b"boom" not in sink.body  # no traceback unless expose_tracebacks
    [record] = errors()
    assert record.exc_info is not None
    assert isinstance(record.exc_info[1], RuntimeError)
    assert "GET /" in record.getMessage()


def test_error_before_the_head_exposes_the_traceback_when_asked() -> None:
    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        raise RuntimeError("boom with traceback")

    sink = FakeSink()
    run(app, sink, make_environ(extra={"asyncwsgi.expose_tracebacks": True}))
    assert_500(sink)
    assert b"RuntimeError: boom with traceback" in sink.body
    assert b"Traceback" in sink.body


def test_error_after_the_head_aborts(errors: Callable[[], list[logging.LogRecord]]) -> None:
    result = Closing([b"one", b"two", b"three"], fail_at=2)

    def app(environ: dict[str, Any], start_response: Any) -> Closing:
        start_response("200 OK", [])
        return result

    sink = FakeSink()
    run(app, sink)
    assert sink.body == b"onetwo"
    assert not sink.ended
    assert sink.aborts == 1
    assert sink.calls[-1] == "abort"
    assert result.closes == 1
    assert len(errors()) == 1


def test_error_before_the_head_on_a_disconnected_client_sends_nothing(
    errors: Callable[[], list[logging.LogRecord]],
) -> None:
    sink = FakeSink()

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        sink.disconnected = True
        raise RuntimeError("boom")

    run(app, sink)
    assert sink.calls == []  # not even an attempt to send the 500
    assert len(errors()) == 1


class Interrupting(Closing):
    """A response whose iteration or ``close()`` raises a BaseException; counts closes."""

    def __init__(self, error: BaseException, where: str) -> None:
        super().__init__([b"a", b"b"])
        self.error = error
        self.where = where

    def __iter__(self) -> Iterator[bytes]:
        if self.where == "first chunk":
            raise self.error
        yield b"a"
        if self.where == "mid-body":
            raise self.error
        yield b"b"

    def close(self) -> None:
        super().close()
        if self.where == "close()":
            raise self.error


@pytest.mark.parametrize(
    "error",
    [SystemExit(2), KeyboardInterrupt(), GeneratorExit(), type("AppError", (BaseException,), {})()],
    ids=lambda error: type(error).__name__,
)
@pytest.mark.parametrize("where", ["app call", "first chunk", "mid-body", "close()"])
def test_base_exception_is_answered_logged_and_not_raised(
    error: BaseException, where: str, errors: Callable[[], list[logging.LogRecord]]
) -> None:
    """SystemExit (``sys.exit()`` in a view), KeyboardInterrupt... raised by the application's
    code are handled like any error: 500 or abort, one logged traceback, close() once; and
    run_wsgi returns normally, so the worker thread that runs it goes on (``run`` fails the test
    if run_wsgi raises)."""
    result = Interrupting(error, where)

    def app(environ: dict[str, Any], start_response: Any) -> Interrupting:
        if where == "app call":
            raise error
        start_response("200 OK", [])
        return result

    sink = FakeSink()
    run(app, sink)
    if where in ("app call", "first chunk"):
        assert_500(sink)
    elif where == "mid-body":
        assert sink.aborts == 1
        assert not sink.ended
    else:
        assert sink.body == b"ab"
        assert sink.ended
    assert [record.exc_info[1] if record.exc_info else None for record in errors()] == [error]
    assert result.closes == (0 if where == "app call" else 1)


def test_base_exception_looking_up_close_is_logged_and_not_raised(
    errors: Callable[[], list[logging.LogRecord]],
) -> None:
    """A result whose ``close`` attribute lookup itself raises (a ``__getattr__``) is logged."""

    class Proxy:
        def __iter__(self) -> Iterator[bytes]:
            return iter([b"body"])

        def __getattr__(self, name: str) -> Any:
            raise SystemExit(f"no {name}")

    def app(environ: dict[str, Any], start_response: Any) -> Proxy:
        start_response("200 OK", [])
        return Proxy()

    sink = FakeSink()
    run(app, sink)
    assert sink.body == b"body"
    assert sink.ended
    assert [record.exc_info[0] if record.exc_info else None for record in errors()] == [SystemExit]


# -- close() exactly once ---------------------------------------------------------------------


def test_close_called_once_on_normal_end(errors: Callable[[], list[logging.LogRecord]]) -> None:
    result = Closing([b"a", b"b"])

    def app(environ: dict[str, Any], start_response: Any) -> Closing:
        start_response("200 OK", [("Content-Type", "text/plain")])
        return result

    sink = FakeSink()
    run(validator(app), sink)
    assert not errors()
    assert result.closes == 1
    assert sink.body == b"ab"
    assert sink.ended


def test_close_called_once_on_a_list_subclass() -> None:
    class ClosingList(list[bytes]):
        closes = 0

        def close(self) -> None:
            self.closes += 1

    result = ClosingList([b"x"])

    def app(environ: dict[str, Any], start_response: Any) -> ClosingList:
        start_response("200 OK", [])
        return result

    sink = FakeSink()
    run(app, sink)
    assert result.closes == 1
    assert sink.body == b"x"
    assert sink.ended


def test_close_called_once_on_error_mid_iteration() -> None:
    result = Closing([b"a", b"b", b"c"], fail_at=1)

    def app(environ: dict[str, Any], start_response: Any) -> Closing:
        start_response("200 OK", [])
        return result

    sink = FakeSink()
    run(app, sink)
    assert result.closes == 1
    assert sink.aborts == 1


def test_close_called_once_when_the_sink_disconnects_mid_stream(
    errors: Callable[[], list[logging.LogRecord]],
) -> None:
    produced: list[int] = []

    class Endless(Closing):
        def __iter__(self) -> Iterator[bytes]:
            for i in range(1000):
                produced.append(i)
                yield b"chunk %d" % i

    result = Endless([])

    def app(environ: dict[str, Any], start_response: Any) -> Endless:
        start_response("200 OK", [])
        return result

    sink = FakeSink(disconnect_on_send=3)
    run(app, sink)
    assert result.closes == 1
    assert len(produced) == 3  # iteration stopped at the failed hand-off
    assert sink.calls == ["send", "send", "send-refused"]
    assert sink.aborts == 0
    assert not errors()  # a client going away is not an application error


def test_client_timeout_before_the_head_is_408_and_close_called_once(
    errors: Callable[[], list[logging.LogRecord]],
) -> None:
    """ClientDisconnected while the client is still there (wsgi.input timed out): 408, close."""

    class Reading(Closing):
        def __iter__(self) -> Iterator[bytes]:
            raise ClientDisconnected("no request body data for 60 s")
            yield b""  # pragma: no cover

    result = Reading([])

    def app(environ: dict[str, Any], start_response: Any) -> Reading:
        start_response("200 OK", [])
        return result

    sink = FakeSink()
    run(app, sink)
    assert result.closes == 1
    assert sink.aborts == 0
    (head, chunks, _, end) = sink.sends[0]
    assert len(sink.sends) == 1
    assert end
    assert head is not None
    assert head[0] == 408
    assert (b"Connection", b"close") in head[2]
    assert b"".join(chunks) == b"Request Timeout\n"
    assert not errors()  # a client timing out is not an application error


def test_client_timeout_after_the_head_aborts_and_close_called_once(
    errors: Callable[[], list[logging.LogRecord]],
) -> None:
    class Stalled(Closing):
        def __iter__(self) -> Iterator[bytes]:
            yield b"first"
            raise ClientDisconnected("client read nothing for 60 s")

    result = Stalled([])

    def app(environ: dict[str, Any], start_response: Any) -> Stalled:
        start_response("200 OK", [])
        return result

    sink = FakeSink()
    run(app, sink)
    assert result.closes == 1
    assert sink.body == b"first"
    assert not sink.ended
    assert sink.aborts == 1  # the head went out: only cutting the connection is left
    assert not errors()


def test_client_disconnected_on_a_gone_client_sends_nothing(
    errors: Callable[[], list[logging.LogRecord]],
) -> None:
    result = Closing([])

    def app(environ: dict[str, Any], start_response: Any) -> Closing:
        sink.disconnected = True  # the loop saw the connection go while the app ran
        raise ClientDisconnected("client disconnected")

    sink = FakeSink()
    run(app, sink)
    assert result.closes == 0  # the app returned nothing to close
    assert sink.sends == []
    assert sink.aborts == 0
    assert not errors()


def test_request_that_waited_too_long_for_a_thread_gets_503_without_calling_the_app(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The warning is rate-limited process-wide: an earlier test's 503 must not swallow this one.
    monkeypatch.setattr(wsgi, "_queue_throttle", LogThrottle())
    called: list[bool] = []

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        called.append(True)
        start_response("200 OK", [])
        return [b"late"]

    sink = FakeSink()
    caplog.set_level(logging.WARNING, logger="asyncwsgi.error")
    queued_at = time.perf_counter() - 5.0
    run_wsgi(app, make_environ(target=b"/late"), sink, queued_at, 1.0)
    assert not called
    (head, chunks, _, end) = sink.sends[0]
    assert head is not None
    assert head[0] == 503
    assert end
    assert (b"Retry-After", b"1") in head[2]
    assert (b"Connection", b"close") in head[2]
    assert b"".join(chunks) == b"Service Unavailable\n"
    assert any("GET /late waited" in r.getMessage() for r in caplog.records)
    # Within the limit, or with the check off, the app runs.
    for queue_timeout in (10.0, 0.0):
        sink = FakeSink()
        run_wsgi(app, make_environ(), sink, queued_at, queue_timeout)
        assert sink.body == b"late"
    assert len(called) == 2


def test_close_error_is_logged_and_not_raised(
    errors: Callable[[], list[logging.LogRecord]],
) -> None:
    class BadClose(Closing):
        def close(self) -> None:
            super().close()
            raise RuntimeError("close failed")

    result = BadClose([b"ok"])

    def app(environ: dict[str, Any], start_response: Any) -> BadClose:
        start_response("200 OK", [])
        return result

    sink = FakeSink()
    run(app, sink)
    assert result.closes == 1
    assert sink.body == b"ok"
    assert sink.ended
    assert len(errors()) == 1


def test_validator_checks_close_is_called(errors: Callable[[], list[logging.LogRecord]]) -> None:
    """wsgiref's validator fails if ``close()`` of its iterator is not called, or called late."""
    closed = threading.Event()

    def app(environ: dict[str, Any], start_response: Any) -> Iterator[bytes]:
        start_response("200 OK", [("Content-Type", "text/plain")])
        try:
            yield b"x"
        finally:
            closed.set()

    sink = FakeSink()
    run(validator(app), sink)
    assert closed.is_set()
    assert not errors()


# -- wsgi.file_wrapper ----------------------------------------------------------------------------


@pytest.fixture
def data_file(tmp_path: Path) -> Path:
    path = tmp_path / "data.bin"
    path.write_bytes(bytes(range(256)) * 40)  # 10240 bytes
    return path


def test_file_wrapper_goes_to_send_file(data_file: Path) -> None:
    opened: list[Any] = []

    def app(environ: dict[str, Any], start_response: Any) -> FileWrapper:
        start_response("200 OK", [("Content-Type", "application/octet-stream")])
        f = data_file.open("rb")
        opened.append(f)
        wrapper: FileWrapper = environ["wsgi.file_wrapper"](f, 4096)
        return wrapper

    sink = FakeSink(can_sendfile=True)
    run(app, sink)
    try:
        assert sink.sends == []
        [(head, wrapper, offset, count)] = sink.files
        assert head == (200, b"OK", [(b"Content-Type", b"application/octet-stream")])
        assert wrapper.filelike is opened[0]
        assert (offset, count) == (0, 10240)
        # The loop owns the file now: run_wsgi must not have closed it.
        assert not opened[0].closed
    finally:
        opened[0].close()


def test_file_wrapper_after_seek_sends_from_the_position(data_file: Path) -> None:
    opened: list[Any] = []

    def app(environ: dict[str, Any], start_response: Any) -> FileWrapper:
        start_response("200 OK", [("Content-Type", "application/octet-stream")])
        f = data_file.open("rb")
        opened.append(f)
        f.seek(1000)
        return FileWrapper(f)

    sink = FakeSink(can_sendfile=True)
    run(app, sink)
    try:
        [(_, _, offset, count)] = sink.files
        assert (offset, count) == (1000, 9240)
    finally:
        opened[0].close()


def test_file_wrapper_is_iterated_without_sendfile(data_file: Path) -> None:
    opened: list[Any] = []

    def app(environ: dict[str, Any], start_response: Any) -> FileWrapper:
        start_response("200 OK", [("Content-Type", "application/octet-stream")])
        f = data_file.open("rb")
        opened.append(f)
        f.seek(240)
        return FileWrapper(f, 4000)

    sink = FakeSink(can_sendfile=False)
    run(app, sink)
    assert sink.files == []
    assert sink.body == data_file.read_bytes()[240:]
    assert [len(chunks[0]) for _, chunks, _, _ in sink.sends[:-1]] == [4000, 4000, 2000]
    assert sink.ended
    assert opened[0].closed  # iterated: run_wsgi closed it


@pytest.mark.parametrize("can_sendfile", [True, False])
def test_file_wrapper_over_bytesio_is_iterated(can_sendfile: bool) -> None:
    """A BytesIO has no file descriptor: it is iterated even where sendfile is possible."""
    buffer = io.BytesIO(b"in-memory file body")

    def app(environ: dict[str, Any], start_response: Any) -> FileWrapper:
        start_response("200 OK", [("Content-Type", "text/plain")])
        return FileWrapper(buffer, 8)

    sink = FakeSink(can_sendfile=can_sendfile)
    run(app, sink)
    assert sink.files == []
    assert sink.head == (200, b"OK", [(b"Content-Type", b"text/plain")])
    assert sink.body == b"in-memory file body"
    assert sink.ended
    assert buffer.closed


def test_file_wrapper_over_a_pipe_is_iterated_where_sendfile_is_possible() -> None:
    read_fd, write_fd = os.pipe()
    with os.fdopen(write_fd, "wb") as writer:
        writer.write(b"from a pipe")
    reader = os.fdopen(read_fd, "rb")

    def app(environ: dict[str, Any], start_response: Any) -> FileWrapper:
        start_response("200 OK", [("Content-Type", "text/plain")])
        return FileWrapper(reader)

    sink = FakeSink(can_sendfile=True)
    try:
        run(app, sink)
    finally:
        reader.close()
    assert sink.files == []
    assert sink.body == b"from a pipe"
    assert sink.ended


def test_file_wrapper_after_write_is_iterated(data_file: Path) -> None:
    """Once write() sent the head, the file goes after it as ordinary body chunks."""
    opened: list[Any] = []

    def app(environ: dict[str, Any], start_response: Any) -> FileWrapper:
        write = start_response("200 OK", [("Content-Type", "application/octet-stream")])
        write(b"prefix")
        f = data_file.open("rb")
        opened.append(f)
        return FileWrapper(f)

    sink = FakeSink(can_sendfile=True)
    run(app, sink)
    assert sink.files == []
    assert sink.body == b"prefix" + data_file.read_bytes()
    assert sink.ended
    assert opened[0].closed


def test_file_wrapper_without_start_response_gives_500_and_is_closed(data_file: Path) -> None:
    opened: list[Any] = []

    def app(environ: dict[str, Any], start_response: Any) -> FileWrapper:
        f = data_file.open("rb")
        opened.append(f)
        return FileWrapper(f)

    sink = FakeSink(can_sendfile=True)
    run(app, sink)
    assert_500(sink)
    assert opened[0].closed


def test_file_wrapper_to_a_disconnected_client_is_closed(data_file: Path) -> None:
    opened: list[Any] = []
    sink = FakeSink(can_sendfile=True)

    def app(environ: dict[str, Any], start_response: Any) -> FileWrapper:
        start_response("200 OK", [])
        f = data_file.open("rb")
        opened.append(f)
        sink.disconnected = True
        return FileWrapper(f)

    run(app, sink)
    assert sink.files == []
    assert opened[0].closed
