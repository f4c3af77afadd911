"""Applications that break PEP 3333 or HTTP, over real sockets.

Whatever the app does wrong, the client gets either a complete, well-framed ``500`` or a
connection cut before the response is complete (the head had already gone out); the log gets
exactly one error; and the server goes on serving. Framing is checked with h11's client, fed
everything the server sent before the EOF, so a malformed byte anywhere fails the test.
"""

from __future__ import annotations

import io
import sys
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import h11
import pytest

from .helpers import exchange, running
from .logwatch import watch_errors

Environ = dict[str, Any]
App = Callable[[Environ, Any], Any]

OK_REQUEST = b"GET /ok HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"
BAD_REQUEST = b"GET /bad HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"


def answering(status: Any, headers: Any, body: Any = (b"body",)) -> App:
    def app(environ: Environ, start_response: Any) -> Any:
        start_response(status, headers)
        return list(body)

    return app


def no_start_response(environ: Environ, start_response: Any) -> Any:
    return [b"never announced"]


def no_start_response_generator(environ: Environ, start_response: Any) -> Iterator[bytes]:
    yield b"never announced"


def str_in_a_list(environ: Environ, start_response: Any) -> Any:
    start_response("200 OK", [])
    return ["text, not bytes"]


def str_first(environ: Environ, start_response: Any) -> Iterator[Any]:
    start_response("200 OK", [])
    yield "text, not bytes"


def str_after_the_head(environ: Environ, start_response: Any) -> Iterator[Any]:
    start_response("200 OK", [])
    yield b"fine so far, "
    yield "then text"


def raises_before_start_response(environ: Environ, start_response: Any) -> Any:
    raise RuntimeError("boom")


def raises_at_the_first_chunk(environ: Environ, start_response: Any) -> Iterator[bytes]:
    start_response("200 OK", [])
    raise RuntimeError("boom")
    yield b""  # pragma: no cover


def raises_mid_body(environ: Environ, start_response: Any) -> Iterator[bytes]:
    start_response("200 OK", [])
    yield b"part one, "
    raise RuntimeError("boom")


def returns_none(environ: Environ, start_response: Any) -> Any:
    start_response("200 OK", [])
    return None


def write_str(environ: Environ, start_response: Any) -> Any:
    write = start_response("200 OK", [])
    write("text, not bytes")
    return []


def start_response_twice(environ: Environ, start_response: Any) -> Any:
    start_response("200 OK", [])
    start_response("201 Created", [])
    return [b"x"]


def exc_info_after_the_head(environ: Environ, start_response: Any) -> Iterator[bytes]:
    start_response("200 OK", [])
    yield b"sent, "
    try:
        raise ValueError("too late")
    except ValueError:
        start_response("500 Internal Server Error", [], sys.exc_info())  # re-raises
    yield b"unreachable"  # pragma: no cover


class _CloseFails:
    def __init__(self, chunks: list[bytes]) -> None:
        self.chunks = chunks

    def __iter__(self) -> Iterator[bytes]:
        return iter(self.chunks)

    def close(self) -> None:
        raise RuntimeError("close failed")


def close_raises(environ: Environ, start_response: Any) -> Iterable[bytes]:
    start_response("200 OK", [("Content-Length", "8")])
    return _CloseFails([b"complete"])


def generator(status: str, headers: list[tuple[str, str]], chunks: list[bytes]) -> App:
    def app(environ: Environ, start_response: Any) -> Iterator[bytes]:
        start_response(status, headers)
        yield from chunks

    return app


# (app, what the client sees: "500", "cut" (incomplete response, then EOF) or "200")
CASES: dict[str, tuple[App, str]] = {
    "no start_response": (no_start_response, "500"),
    "no start_response, generator": (no_start_response_generator, "500"),
    "str in a list": (str_in_a_list, "500"),
    "str as first chunk": (str_first, "500"),
    "str after the head": (str_after_the_head, "cut"),
    "raises before start_response": (raises_before_start_response, "500"),
    "raises at the first chunk": (raises_at_the_first_chunk, "500"),
    "raises mid-body": (raises_mid_body, "cut"),
    "returns None": (returns_none, "500"),
    "write() with str": (write_str, "500"),
    "start_response twice": (start_response_twice, "500"),
    "exc_info after the head": (exc_info_after_the_head, "cut"),
    "close() raises": (close_raises, "200"),
    "status without reason": (answering("200", []), "200"),
    "status not a number": (answering("OK", []), "500"),
    "status of four digits": (answering("2000 OK", []), "500"),
    "status 099": (answering("099 Weird", []), "500"),
    "status 600": (answering("600 Nope", []), "500"),
    "1xx status": (answering("100 Continue", []), "500"),
    "status with CRLF": (answering("200 OK\r\nX-Injected: 1", []), "500"),
    "status as bytes": (answering(b"200 OK", []), "500"),
    "status as int": (answering(200, []), "500"),
    "header value with CRLF": (answering("200 OK", [("X-A", "a\r\nSet-Cookie: x=1")]), "500"),
    "header value with LF": (answering("200 OK", [("X-A", "a\nb")]), "500"),
    "header value with CR": (answering("200 OK", [("X-A", "a\rb")]), "500"),
    "header value with NUL": (answering("200 OK", [("X-A", "a\x00b")]), "500"),
    "header name with colon": (answering("200 OK", [("X-A:", "1")]), "500"),
    "header name with space": (answering("200 OK", [("X A", "1")]), "500"),
    "empty header name": (answering("200 OK", [("", "1")]), "500"),
    "header value not str": (answering("200 OK", [("X-A", 1)]), "500"),
    "header name as bytes": (answering("200 OK", [(b"X-A", "1")]), "500"),
    "header value not latin-1": (answering("200 OK", [("X-A", "\u20ac")]), "500"),
    "header not a pair": (answering("200 OK", [("X-A", "1", "2")]), "500"),
    "headers not a list": (answering("200 OK", (("X-A", "1"),)), "500"),
    "hop-by-hop Connection": (answering("200 OK", [("Connection", "close")]), "500"),
    "hop-by-hop Keep-Alive": (answering("200 OK", [("Keep-Alive", "timeout=5")]), "500"),
    "hop-by-hop Transfer-Encoding": (
        answering("200 OK", [("Transfer-Encoding", "chunked")]),
        "500",
    ),
    "hop-by-hop Upgrade": (answering("200 OK", [("Upgrade", "h2c")]), "500"),
    "hop-by-hop TE": (answering("200 OK", [("TE", "trailers")]), "500"),
    "hop-by-hop Trailer": (answering("200 OK", [("Trailer", "X-A")]), "500"),
    "Content-Length not a number": (answering("200 OK", [("Content-Length", "abc")]), "500"),
    "Content-Length negative": (answering("200 OK", [("Content-Length", "-1")]), "500"),
    "Content-Length twice": (
        answering("200 OK", [("Content-Length", "4"), ("Content-Length", "4")]),
        "500",
    ),
    "body shorter than Content-Length": (
        generator("200 OK", [("Content-Length", "10")], [b"short"]),
        "cut",
    ),
    "body longer than Content-Length": (
        generator("200 OK", [("Content-Length", "3")], [b"abc", b"def"]),
        "200",
    ),
}


def check_framing(raw: bytes) -> tuple[list[tuple[int, bytes]], bool]:
    """Decode ``raw`` as responses to one GET; return (status, body) pairs and whether the last
    response was cut short by the EOF.

    Raises:
        h11.RemoteProtocolError: the bytes before the EOF are not well-framed HTTP/1.1.
    """
    client = h11.Connection(h11.CLIENT)
    client.send(h11.Request(method="GET", target="/bad", headers=[("Host", "t")]))
    client.send(h11.EndOfMessage())
    client.receive_data(raw)
    responses: list[tuple[int, bytes]] = []
    status, body = 0, b""
    while True:  # everything the server sent must parse, whatever comes after
        event = client.next_event()
        if isinstance(event, h11.Response):
            status = event.status_code
        elif isinstance(event, h11.Data):
            body += bytes(event.data)
        elif isinstance(event, h11.EndOfMessage):
            responses.append((status, body))
        elif event is h11.NEED_DATA or isinstance(event, h11.ConnectionClosed):
            break
        else:  # pragma: no cover
            raise AssertionError(f"unexpected event {event!r}")
    if client.their_state is h11.SEND_BODY or (status and not responses):
        client.receive_data(b"")
        with pytest.raises(h11.RemoteProtocolError, match=r"incomplete|without sending complete"):
            client.next_event()
        return responses, True
    return responses, False


@pytest.mark.parametrize("name", list(CASES))
async def test_misbehaving_app_gets_500_or_a_cut_connection_and_one_error(name: str) -> None:
    bad, expected = CASES[name]

    def router(environ: Environ, start_response: Any) -> Any:
        if environ["PATH_INFO"] == "/ok":
            start_response("200 OK", [("Content-Length", "2")])
            return [b"ok"]
        return bad(environ, start_response)

    with watch_errors() as log:
        async with running(router) as srv:
            raw = await exchange(srv.port, BAD_REQUEST)
            ok = await exchange(srv.port, OK_REQUEST)
            errors = log.errors()
    responses, cut = check_framing(raw)
    if expected == "500":
        assert [status for status, _ in responses] == [500]
        assert not cut
        assert b"injected" not in raw.lower()
        assert b"set-cookie" not in raw.lower()
    elif expected == "cut":
        assert raw.startswith(b"HTTP/1.1 200 ")
        assert cut
        assert not responses
    else:
        assert [status for status, _ in responses] == [200]
        assert not cut
    if name == "status without reason":
        assert not errors  # "200" alone is a valid status line (RFC 9112 section 4)
    else:
        assert len(errors) == 1, [r.getMessage() for r in errors]
    assert ok.startswith(b"HTTP/1.1 200 ")
    assert ok.endswith(b"\r\n\r\nok")  # the server goes on serving


async def test_body_longer_than_content_length_keeps_the_connection_usable() -> None:
    """The excess is dropped, not sent: the next response on the connection is intact."""
    app = generator("200 OK", [("Content-Length", "3")], [b"abc", b"def"])
    with watch_errors() as log:
        async with running(app) as srv:
            raw = await exchange(
                srv.port, b"GET / HTTP/1.1\r\nHost: t\r\n\r\n" + OK_REQUEST.replace(b"/ok", b"/")
            )
    client = h11.Connection(h11.CLIENT)
    bodies = []
    client.receive_data(raw)
    for _ in range(2):
        client.send(h11.Request(method="GET", target="/", headers=[("Host", "t")]))
        client.send(h11.EndOfMessage())
        body = b""
        while not isinstance(event := client.next_event(), h11.EndOfMessage):
            if isinstance(event, h11.Data):
                body += bytes(event.data)
        bodies.append(body)
        if client.our_state is h11.DONE and client.their_state is h11.DONE:
            client.start_next_cycle()
    assert bodies == [b"abc", b"abc"]
    assert len(log.errors()) == 2  # one per response


# -- BaseException from application code: answered, logged, and the thread lives on --------------


class AppBaseError(BaseException):
    """A BaseException subclass of the application's own (as some task libraries define)."""


BASE_EXCEPTIONS: dict[str, type[BaseException]] = {
    "SystemExit": SystemExit,
    "KeyboardInterrupt": KeyboardInterrupt,
    "GeneratorExit": GeneratorExit,
    "BaseException subclass": AppBaseError,
}


class _Body:
    """A response iterable that raises ``error`` at a given point and counts ``close()`` calls."""

    def __init__(self, error: type[BaseException], raise_in: str, closes: list[int]) -> None:
        self.error = error
        self.raise_in = raise_in
        self.closes = closes

    def __iter__(self) -> Iterator[bytes]:
        if self.raise_in == "first chunk":
            raise self.error("from the first chunk")
        yield b"part one, "
        if self.raise_in == "mid-body":
            raise self.error("from mid-body")
        yield b"part two"

    def close(self) -> None:
        self.closes.append(1)
        if self.raise_in == "close()":
            raise self.error("from close()")


class _FileClosing(io.FileIO):
    """A real file (so it goes out by sendfile) whose first ``close()`` raises ``error``."""

    error: type[BaseException] = SystemExit

    def close(self) -> None:
        first = not self.closed
        super().close()
        if first:
            raise self.error("from the file's close()")


def raising(error: type[BaseException], where: str, closes: list[int], path: str) -> App:
    """An app that raises ``error`` from ``where`` (a key of :data:`RAISE_PLACES`)."""

    def app(environ: Environ, start_response: Any) -> Any:
        if where == "app call":
            raise error("from the app call")
        if where == "reading wsgi.input":
            environ["wsgi.input"].read(4)
            raise error("while reading the body")
        if where == "start_response(exc_info)":
            start_response("200 OK", [])

            def body() -> Iterator[bytes]:
                yield b"sent, "
                try:
                    raise error("re-raised by start_response")
                except BaseException:
                    start_response("500 Internal Server Error", [], sys.exc_info())

            return body()
        if where == "file_wrapper close()":
            start_response("200 OK", [("Content-Length", "8")])
            file = _FileClosing(path)
            file.error = error
            return environ["wsgi.file_wrapper"](file)
        start_response("200 OK", [])
        return _Body(error, where, closes)

    return app


# where the application raises: what the client sees, and whether a result was returned to close
RAISE_PLACES: dict[str, str] = {
    "app call": "500",
    "reading wsgi.input": "500",
    "first chunk": "500",
    "mid-body": "cut",
    "start_response(exc_info)": "cut",
    "close()": "200",
    "file_wrapper close()": "200",
}

POST_BAD = (
    b"POST /bad HTTP/1.1\r\nHost: t\r\nConnection: close\r\nContent-Length: 8\r\n\r\n12345678"
)


@pytest.mark.parametrize("where", list(RAISE_PLACES))
@pytest.mark.parametrize("name", list(BASE_EXCEPTIONS))
async def test_base_exception_from_the_app_is_answered_and_the_thread_lives_on(
    name: str, where: str, tmp_path: Path
) -> None:
    """With one thread, three requests that raise SystemExit, KeyboardInterrupt... each get their
    500 (or cut, once the head went out), one logged traceback and one close(); a fourth, normal
    request still gets 200: the pool's only thread survived every one of them."""
    error = BASE_EXCEPTIONS[name]
    expected = RAISE_PLACES[where]
    path = tmp_path / "body"
    path.write_bytes(b"complete")
    closes: list[int] = []
    bad = raising(error, where, closes, str(path))

    def router(environ: Environ, start_response: Any) -> Any:
        if environ["PATH_INFO"] == "/ok":
            start_response("200 OK", [("Content-Length", "2")])
            return [b"ok"]
        return bad(environ, start_response)

    rounds = 3
    with watch_errors() as log:
        async with running(router, threads=1) as srv:
            raws = [await exchange(srv.port, POST_BAD) for _ in range(rounds)]
            ok = await exchange(srv.port, OK_REQUEST)
            errors = log.errors()
    assert ok.startswith(b"HTTP/1.1 200 ")
    assert ok.endswith(b"\r\n\r\nok")
    for raw in raws:
        responses, cut = check_framing(raw)
        if expected == "500":
            assert [status for status, _ in responses] == [500]
            assert not cut
        elif expected == "cut":
            assert raw.startswith(b"HTTP/1.1 200 ")
            assert cut
        else:
            assert responses == [(200, b"complete" if "file" in where else b"part one, part two")]
    # One traceback per request, of the exception the app raised.
    assert [r.exc_info[0] if r.exc_info else None for r in errors] == [error] * rounds, [
        r.getMessage() for r in errors
    ]
    if where in ("first chunk", "mid-body", "close()"):
        assert len(closes) == rounds  # close() exactly once per response
    if "close()" in where:  # logged as the close() that failed, not as a stray thread error
        assert all(r.getMessage().startswith("Error closing") for r in errors)


async def test_system_exit_in_every_thread_leaves_the_pool_serving() -> None:
    """``sys.exit()`` in a view, once per thread and more, with two threads: every request gets
    its 500 and a later request still gets 200 (the threads were not lost, nor counted busy)."""

    def app(environ: Environ, start_response: Any) -> Any:
        if environ["PATH_INFO"] == "/ok":
            start_response("200 OK", [("Content-Length", "2")])
            return [b"ok"]
        sys.exit("argparse said no")

    with watch_errors() as log:
        async with running(app, threads=2) as srv:
            raws = [await exchange(srv.port, BAD_REQUEST) for _ in range(5)]
            oks = [await exchange(srv.port, OK_REQUEST) for _ in range(3)]
        errors = log.errors()
    assert all(raw.startswith(b"HTTP/1.1 500 ") for raw in raws)
    assert all(ok.endswith(b"\r\n\r\nok") for ok in oks)
    assert len(errors) == 5
    assert all(r.exc_info and r.exc_info[0] is SystemExit for r in errors)
