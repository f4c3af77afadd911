"""Gateway behaviour over real sockets on 127.0.0.1:0: HTTP/1.1, PEP 3333, flow control, close()."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import socket
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

import asyncwsgi
from asyncwsgi import bridge
from asyncwsgi.channel import HTTPChannel
from asyncwsgi.errors import ClientDisconnected

from . import apps
from .helpers import TIMEOUT, decode_replies, exchange, running

GET = b"GET / HTTP/1.1\r\nHost: t\r\n\r\n"


async def test_hello_has_date_server_and_length() -> None:
    async with running(apps.hello) as srv, httpx.AsyncClient() as client:
        reply = await client.get(srv.url + "/")
    assert reply.status_code == 200
    assert reply.content == b"Hello, world!"
    assert reply.headers["content-length"] == "13"
    assert reply.headers["server"] == "asyncwsgi"
    assert reply.headers["date"].endswith(" GMT")


async def test_serve_runs_on_current_loop_until_trigger() -> None:
    stop = asyncio.Event()
    sock = socket.create_server(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    task = asyncio.ensure_future(
        asyncwsgi.serve(apps.hello, sockets=[sock], shutdown_trigger=stop.wait)
    )
    raw = await exchange(port, GET.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n"))
    assert decode_replies(raw)[0].body == b"Hello, world!"
    assert not task.done()
    stop.set()
    await asyncio.wait_for(task, TIMEOUT)
    with pytest.raises(ConnectionRefusedError):
        await asyncio.open_connection("127.0.0.1", port)


async def test_keep_alive_serves_several_requests_on_one_connection() -> None:
    async with running(apps.hello) as srv:
        reader, writer = await asyncio.open_connection("127.0.0.1", srv.port)
        for _ in range(3):
            writer.write(GET)
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), TIMEOUT)
            assert head.startswith(b"HTTP/1.1 200 OK")
            assert await reader.readexactly(13) == b"Hello, world!"
        writer.close()


async def test_pipelined_requests_are_answered_in_order() -> None:
    async with running(apps.environ_app) as srv:
        data = (
            b"".join(f"GET /{i} HTTP/1.1\r\nHost: t\r\n\r\n".encode() for i in range(5))
            + b"GET /last HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"
        )
        replies = decode_replies(await exchange(srv.port, data))
    assert [json.loads(r.body)["PATH_INFO"] for r in replies] == [
        "/0",
        "/1",
        "/2",
        "/3",
        "/4",
        "/last",
    ]


async def test_connection_close_is_honoured() -> None:
    async with running(apps.hello) as srv:
        raw = await exchange(srv.port, b"GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
    (reply,) = decode_replies(raw)
    assert reply.headers["connection"] == "close"


async def test_http10_is_answered_and_closed() -> None:
    """HTTP/1.0 without ``Connection: keep-alive`` gets a 1.1 response with its body and a close
    (keep-alive ones: tests/test_conformance.py)."""
    async with running(apps.hello) as srv:
        raw = await exchange(srv.port, b"GET / HTTP/1.0\r\n\r\n")
    assert raw.startswith(b"HTTP/1.1 200 OK")
    assert b"\r\nConnection: close\r\n" in raw
    assert raw.endswith(b"Hello, world!")


async def test_stream_without_length_is_chunked_on_11_and_close_delimited_on_10() -> None:
    async with running(apps.stream) as srv:
        raw11 = await exchange(
            srv.port, b"GET /?4 HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"
        )
        raw10 = await exchange(srv.port, b"GET /?4 HTTP/1.0\r\n\r\n")
    (reply,) = decode_replies(raw11)
    assert reply.headers["transfer-encoding"] == "chunked"
    assert reply.body == b"A" * 1024 + b"B" * 1024 + b"C" * 1024 + b"D" * 1024
    head, _, body = raw10.partition(b"\r\n\r\n")
    assert b"transfer-encoding" not in head.lower()
    assert b"content-length" not in head.lower()
    assert body == reply.body


async def test_blocks_handed_over_together_go_out_as_one_chunk() -> None:
    """Blocks the app yields while the loop is busy reach the wire together, framed as one
    chunk: none is held back, and h11 frames them once."""
    started = threading.Event()
    go = threading.Event()
    yielded = threading.Event()

    def app(environ: dict[str, Any], start_response: Any) -> Iterator[bytes]:
        start_response("200 OK", [("Content-Type", "text/plain")])
        started.set()
        go.wait(TIMEOUT)
        yield b"ab"
        yield b"cd"
        yield b"ef"
        yielded.set()

    async with running(app) as srv:
        reader, writer = await asyncio.open_connection("127.0.0.1", srv.port)
        writer.write(b"GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        await writer.drain()
        assert await asyncio.to_thread(started.wait, TIMEOUT)
        go.set()
        # Keep the loop busy (this thread is the loop's) until the app has yielded every block.
        assert yielded.wait(TIMEOUT)
        raw = await asyncio.wait_for(reader.read(), TIMEOUT)
        writer.close()
    assert raw.endswith(b"\r\n\r\n6\r\nabcdef\r\n0\r\n\r\n")
    (reply,) = decode_replies(raw)
    assert reply.body == b"abcdef"


async def test_single_chunk_list_gets_content_length() -> None:
    app = apps.status_app("200 OK", [("Content-Type", "text/plain")], [b"abc"])
    async with running(app) as srv, httpx.AsyncClient() as client:
        reply = await client.get(srv.url)
    assert reply.headers["content-length"] == "3"
    assert "transfer-encoding" not in reply.headers


@pytest.mark.parametrize(
    ("method", "status"),
    [("HEAD", "200 OK"), ("GET", "204 No Content"), ("GET", "304 Not Modified")],
)
async def test_no_body_for_head_204_304(method: str, status: str) -> None:
    app = apps.status_app(status, [("Content-Type", "text/plain")], [b"should not be sent"])
    async with running(app) as srv:
        req = (
            f"{method} / HTTP/1.1\r\nHost: t\r\n\r\n"
            + "GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"
        )
        raw = await exchange(srv.port, req.encode())
    # Two complete responses and no stray body bytes between them.
    assert b"should not be sent" not in raw.split(b"\r\n\r\n", 1)[1].split(b"HTTP/1.1")[0]
    assert raw.count(b"HTTP/1.1 ") == 2


async def test_environ_has_every_required_key() -> None:
    async with running(apps.environ_app, root_path="/app") as srv:
        raw = await exchange(
            srv.port,
            b"POST /app/caf%C3%A9/x%2Fy?a=1&b=%20 HTTP/1.1\r\nHost: example.com\r\n"
            b"Content-Type: text/plain\r\nContent-Length: 5\r\nX-Multi: one\r\nX-Multi: two\r\n"
            b"Connection: close\r\n\r\nhello",
        )
    env = json.loads(decode_replies(raw)[0].body)
    assert env["REQUEST_METHOD"] == "POST"
    assert env["SCRIPT_NAME"] == "/app"
    assert env["PATH_INFO"] == "/caf\xc3\xa9/x/y"  # UTF-8 bytes carried as latin-1 (PEP 3333)
    assert env["QUERY_STRING"] == "a=1&b=%20"
    assert env["CONTENT_TYPE"] == "text/plain"
    assert env["CONTENT_LENGTH"] == "5"
    assert env["SERVER_NAME"] == "127.0.0.1"
    assert env["SERVER_PORT"] == str(srv.port)
    assert env["SERVER_PROTOCOL"] == "HTTP/1.1"
    assert env["REMOTE_ADDR"] == "127.0.0.1"
    assert env["REMOTE_PORT"].isdigit()
    assert env["SERVER_SOFTWARE"].startswith("asyncwsgi/")
    assert env["HTTP_HOST"] == "example.com"
    assert env["HTTP_X_MULTI"] == "one,two"
    assert env["wsgi.url_scheme"] == "http"
    assert env["wsgi.multithread"] is True
    assert env["wsgi.multiprocess"] is False
    assert env["wsgi.run_once"] is False
    assert env["wsgi.input_terminated"] is True
    assert env["wsgi.version"] == [1, 0]
    assert env["has_file_wrapper"] is True
    assert env["body"] == "hello"


@pytest.mark.parametrize(
    ("mode", "expected"),
    [
        ("read", b"ab\ncd\nef"),
        ("read-n", b"ab\ncd\nef"),
        ("readline", b"ab\n|cd\n|ef"),
        ("readline-n", b"ab\n|cd\n|ef"),
        ("readlines", b"ab\n|cd\n|ef"),
        ("iter", b"ab\n|cd\n|ef"),
    ],
)
@pytest.mark.parametrize("chunked", [False, True])
async def test_wsgi_input_reads(mode: str, expected: bytes, chunked: bool) -> None:
    body = b"ab\ncd\nef"
    if chunked:
        framing = b"Transfer-Encoding: chunked\r\n\r\n3\r\nab\n\r\n5\r\ncd\nef\r\n0\r\n\r\n"
    else:
        framing = b"Content-Length: 8\r\n\r\n" + body
    async with running(apps.echo) as srv:
        raw = await exchange(
            srv.port,
            f"POST /?{mode} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n".encode() + framing,
        )
    assert decode_replies(raw)[0].body == expected


async def test_streamed_upload_is_read_as_it_arrives() -> None:
    """The app gets the request when its head is complete, and reads the body as it arrives."""
    got_first = threading.Event()

    def app(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        stream = environ["wsgi.input"]
        first = stream.read(5)
        got_first.set()
        rest = stream.read()
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [first + b"+" + rest]

    async with running(app) as srv:
        reader, writer = await asyncio.open_connection("127.0.0.1", srv.port)
        writer.write(b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 10\r\n\r\nhello")
        await asyncio.wait_for(asyncio.to_thread(got_first.wait, TIMEOUT), TIMEOUT)
        assert got_first.is_set()
        writer.write(b"world")
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), TIMEOUT)
        assert b"200 OK" in head
        assert await reader.readexactly(11) == b"hello+world"
        writer.close()


async def test_100_continue_sent_only_when_app_reads() -> None:
    def reader_app(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        data = environ["wsgi.input"].read()
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [data]

    head = b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 4\r\nExpect: 100-continue\r\n\r\n"
    async with running(reader_app) as srv:
        reader, writer = await asyncio.open_connection("127.0.0.1", srv.port)
        writer.write(head)
        interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), TIMEOUT)
        assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
        writer.write(b"data")
        final = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), TIMEOUT)
        assert final.startswith(b"HTTP/1.1 200 OK")
        writer.close()
    async with running(apps.hello) as srv:
        reader, writer = await asyncio.open_connection("127.0.0.1", srv.port)
        writer.write(head)
        first = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), TIMEOUT)
        # The app answered without reading: no 100 Continue, the final answer comes first.
        assert first.startswith(b"HTTP/1.1 200 OK")
        writer.close()


async def test_write_callable() -> None:
    async with running(apps.write_app) as srv, httpx.AsyncClient() as client:
        reply = await client.get(srv.url)
    assert reply.content == b"first,second,third"


@pytest.mark.parametrize(
    "headers",
    [
        [("X-Bad", "a\r\nSet-Cookie: evil=1")],
        [("X-Bad\r\nInjected", "1")],
        [("Connection", "close")],
        [("Transfer-Encoding", "chunked")],
        [("X-Nul", "a\x00b")],
    ],
)
async def test_invalid_response_headers_give_500_not_split(
    headers: list[tuple[str, str]], caplog: pytest.LogCaptureFixture
) -> None:
    app = apps.status_app("200 OK", headers, [b"body"])
    async with running(app) as srv:
        raw = await exchange(srv.port, b"GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
    (reply,) = decode_replies(raw)
    assert reply.status == 500
    assert b"evil" not in raw
    assert b"Injected" not in raw
    assert any("Error handling request" in r.getMessage() for r in caplog.records)


async def test_second_start_response_without_exc_info_is_an_error() -> None:
    def app(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        start_response("200 OK", [])
        start_response("201 Created", [])
        return [b"x"]

    async with running(app) as srv:
        raw = await exchange(srv.port, b"GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
    assert decode_replies(raw)[0].status == 500


async def test_exc_info_replaces_pending_head() -> None:
    def app(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        start_response("200 OK", [("X-First", "1")])
        try:
            raise ValueError("oops")
        except ValueError:
            import sys

            start_response("503 Service Unavailable", [("X-Second", "1")], sys.exc_info())
        return [b"sorry"]

    async with running(app) as srv, httpx.AsyncClient() as client:
        reply = await client.get(srv.url)
    assert reply.status_code == 503
    assert "x-first" not in reply.headers
    assert reply.headers["x-second"] == "1"


async def test_short_content_length_closes_connection(caplog: pytest.LogCaptureFixture) -> None:
    app = apps.generator_app("200 OK", [("Content-Length", "10")], [b"short"])
    async with running(app) as srv:
        raw = await exchange(srv.port, GET + GET)
    assert raw.count(b"HTTP/1.1 200") == 1  # the connection closed after the short response
    assert raw.endswith(b"short")
    assert any("shorter than its Content-Length" in r.getMessage() for r in caplog.records)


async def test_long_content_length_is_cut(caplog: pytest.LogCaptureFixture) -> None:
    app = apps.generator_app("200 OK", [("Content-Length", "3")], [b"abcdef"])
    async with running(app) as srv:
        raw = await exchange(
            srv.port, GET + b"GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"
        )
    replies = decode_replies(raw)
    assert [r.body for r in replies] == [b"abc", b"abc"]
    assert any("longer than its Content-Length" in r.getMessage() for r in caplog.records)


async def test_app_error_before_head_is_500(caplog: pytest.LogCaptureFixture) -> None:
    app = apps.CloseRecorder("error-before")
    async with running(app) as srv, httpx.AsyncClient() as client:
        reply = await client.get(srv.url)
    assert reply.status_code == 500
    assert b"boom" not in reply.content  # no traceback without expose_tracebacks
    assert any(r.exc_info and "boom" in str(r.exc_info[1]) for r in caplog.records)


async def test_app_error_after_head_aborts_and_closes_once() -> None:
    app = apps.CloseRecorder("error-mid")
    async with running(app) as srv:
        raw = await exchange(srv.port, GET)
        assert await asyncio.to_thread(app.closed.wait, TIMEOUT)
    assert raw.startswith(b"HTTP/1.1 200 OK")
    assert not raw.endswith(b"0\r\n\r\n")  # no terminating chunk: the client sees it incomplete
    assert app.closes == 1


async def test_close_called_once_on_normal_end() -> None:
    app = apps.CloseRecorder("ok")
    async with running(app) as srv, httpx.AsyncClient() as client:
        reply = await client.get(srv.url)
        assert await asyncio.to_thread(app.closed.wait, TIMEOUT)
    assert len(reply.content) == 3 * 1024
    assert app.closes == 1


async def test_disconnect_mid_stream_stops_iteration_calls_close_frees_thread() -> None:
    """A client that goes away mid-download stops the app's iteration; close() runs once."""
    app = apps.CloseRecorder("ok", chunks=1_000_000, chunk_size=64 * 1024)

    def router(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        if environ["PATH_INFO"] == "/hello":
            return apps.hello(environ, start_response)  # type: ignore[no-any-return]
        return app(environ, start_response)

    async with running(router, threads=1, write_high_water=64 * 1024) as srv:
        reader, writer = await asyncio.open_connection("127.0.0.1", srv.port)
        writer.write(GET)
        await reader.readuntil(b"\r\n\r\n")
        await reader.readexactly(1000)
        writer.transport.abort()
        assert await asyncio.to_thread(app.closed.wait, TIMEOUT)
        assert app.closes == 1
        assert app.produced < 1_000_000 * 64 * 1024
        # The only thread is free again: a second request is served.
        async with httpx.AsyncClient() as client:
            ok = await client.get(srv.url + "/hello", timeout=TIMEOUT)
        assert ok.status_code == 200


async def test_slow_reader_pauses_app_iteration(monkeypatch: pytest.MonkeyPatch) -> None:
    """A client that reads nothing makes the app's thread wait: memory stays bounded."""
    waiting = threading.Event()
    original = bridge.ResponseSink._wait_writable

    def wait_writable(self: bridge.ResponseSink) -> None:
        waiting.set()
        original(self)

    monkeypatch.setattr(bridge.ResponseSink, "_wait_writable", wait_writable)
    app = apps.CloseRecorder("ok", chunks=100_000, chunk_size=16 * 1024)
    high = 64 * 1024
    async with running(app, write_high_water=high) as srv:
        _reader, writer = await asyncio.open_connection("127.0.0.1", srv.port)
        writer.transport.pause_reading()
        writer.write(GET)
        assert await asyncio.to_thread(waiting.wait, TIMEOUT)
        produced = app.produced
        # Socket buffers take some megabytes at most; the app is far from its 1.6 GB.
        assert produced < 32 * 1024 * 1024
        writer.transport.abort()
        assert await asyncio.to_thread(app.closed.wait, TIMEOUT)


async def test_slow_app_pauses_reading(monkeypatch: pytest.MonkeyPatch) -> None:
    """While the app has not consumed the buffered body, the loop stops reading the socket."""
    paused = threading.Event()
    release = threading.Event()
    original = bridge.RequestBody.feed

    def feed(self: bridge.RequestBody, data: bytes) -> bool:
        full = original(self, data)
        if full:
            paused.set()
        return full

    monkeypatch.setattr(bridge.RequestBody, "feed", feed)

    def app(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        stream = environ["wsgi.input"]
        first = stream.read(1)
        release.wait(TIMEOUT)
        total = len(first) + len(stream.read())
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [str(total).encode()]

    size = 8 * 1024 * 1024
    async with running(app, read_high_water=64 * 1024) as srv:
        reader, writer = await asyncio.open_connection("127.0.0.1", srv.port)
        writer.write(b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n\r\n" % size)
        send = asyncio.ensure_future(_send_zeros(writer, size))
        assert await asyncio.to_thread(paused.wait, TIMEOUT)
        (channel,) = srv.server.state.channels
        assert channel._reading_paused_by  # the transport stopped reading
        assert not send.done()  # the client is held back by TCP flow control
        release.set()
        await asyncio.wait_for(send, TIMEOUT)
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), TIMEOUT)
        assert b"200 OK" in head
        assert (await reader.read(100)).endswith(str(size).encode())
        writer.close()


async def _send_zeros(writer: asyncio.StreamWriter, size: int) -> None:
    block = b"\0" * 65536
    for _ in range(size // len(block)):
        writer.write(block)
        await writer.drain()


async def test_client_disconnect_mid_upload_raises_in_app() -> None:
    raised: list[BaseException] = []
    done = threading.Event()

    def app(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        try:
            environ["wsgi.input"].read()
        except OSError as exc:
            raised.append(exc)
            raise
        finally:
            done.set()
        start_response("200 OK", [])
        return [b""]

    async with running(app) as srv:
        _reader, writer = await asyncio.open_connection("127.0.0.1", srv.port)
        writer.write(b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 1000\r\n\r\npartial")
        await writer.drain()
        writer.transport.abort()
        assert await asyncio.to_thread(done.wait, TIMEOUT)
    assert isinstance(raised[0], ClientDisconnected)


@pytest.fixture
def big_file(tmp_path: Path) -> Path:
    path = tmp_path / "big.bin"
    path.write_bytes(os.urandom(3 * 1024 * 1024 + 17))
    return path


def _file_app(path: Path, *, seek: int = 0, length: bool = True) -> Any:
    def app(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        f = open(path, "rb")  # noqa: SIM115 - closed through the wrapper
        f.seek(seek)
        headers = [("Content-Type", "application/octet-stream")]
        if length:
            headers.append(("Content-Length", str(path.stat().st_size - seek)))
        start_response("200 OK", headers)
        return environ["wsgi.file_wrapper"](f, 65536)  # type: ignore[no-any-return]

    return app


@pytest.mark.parametrize("loop_name", ["uvloop", "asyncio"])
@pytest.mark.parametrize(("seek", "length"), [(0, True), (1000, True), (0, False)])
async def test_file_wrapper_goes_by_sendfile(
    big_file: Path, monkeypatch: pytest.MonkeyPatch, loop_name: str, seek: int, length: bool
) -> None:
    calls: list[int] = []
    real = os.sendfile

    def counting(out_fd: int, in_fd: int, offset: int | None, count: int) -> int:
        calls.append(count)
        return real(out_fd, in_fd, offset, count)

    monkeypatch.setattr(os, "sendfile", counting)

    async def scenario() -> bytes:
        async with running(_file_app(big_file, seek=seek, length=length)) as srv:
            raw = await exchange(
                srv.port, GET + GET.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n")
            )
        return raw

    raw = await _in_loop(loop_name, scenario)
    replies = decode_replies(raw)
    expected = (await asyncio.to_thread(big_file.read_bytes))[seek:]
    assert [hashlib.sha256(r.body).hexdigest() for r in replies] == [
        hashlib.sha256(expected).hexdigest()
    ] * 2
    assert replies[0].headers["content-length"] == str(len(expected))
    assert calls, "the file did not go out by sendfile"


async def _in_loop(loop_name: str, scenario: Any) -> Any:
    """Run ``scenario`` in a fresh loop of the given kind, in a thread (the test loop is busy)."""

    def target() -> Any:
        loop = asyncwsgi.server.new_event_loop(loop_name)
        try:
            return loop.run_until_complete(scenario())
        finally:
            loop.close()

    return await asyncio.to_thread(target)


async def test_file_wrapper_without_fileno_is_iterated(tmp_path: Path) -> None:
    import io

    payload = os.urandom(200_000)

    def app(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        start_response("200 OK", [("Content-Length", str(len(payload)))])
        return environ["wsgi.file_wrapper"](io.BytesIO(payload), 8192)  # type: ignore[no-any-return]

    async with running(app) as srv, httpx.AsyncClient() as client:
        reply = await client.get(srv.url)
    assert reply.content == payload


async def test_graceful_shutdown_lets_in_flight_request_finish() -> None:
    entered = threading.Event()
    release = threading.Event()

    def app(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        if environ["PATH_INFO"] == "/block":
            entered.set()
            release.wait(TIMEOUT)
        start_response("200 OK", [("Content-Length", "4")])
        return [b"done"]

    server = asyncwsgi.Server(app, asyncwsgi.Config(host="127.0.0.1", port=0))
    await server.start()
    port = server.addresses[0][1]
    idle_reader, idle_writer = await asyncio.open_connection("127.0.0.1", port)
    idle_writer.write(GET)
    await asyncio.wait_for(idle_reader.readuntil(b"done"), TIMEOUT)
    request = asyncio.ensure_future(exchange(port, b"GET /block HTTP/1.1\r\nHost: t\r\n\r\n"))
    assert await asyncio.to_thread(entered.wait, TIMEOUT)
    shutdown = asyncio.ensure_future(server.shutdown(TIMEOUT))
    # The idle keep-alive connection is closed; the listener no longer accepts.
    assert await asyncio.wait_for(idle_reader.read(), TIMEOUT) == b""
    with pytest.raises(ConnectionRefusedError):
        await asyncio.open_connection("127.0.0.1", port)
    release.set()
    raw = await asyncio.wait_for(request, TIMEOUT)
    await asyncio.wait_for(shutdown, TIMEOUT)
    assert decode_replies(raw)[0].body == b"done"
    idle_writer.close()


async def test_graceful_shutdown_serves_the_request_of_a_connection_it_just_accepted(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A rolling restart fails no request: a connection accepted before the shutdown began
    may still send its request, answered with Connection: close; one that sends nothing is
    closed once its grace has run out, and the shutdown does not wait for the timeout."""
    accepted = asyncio.Event()
    began = asyncio.Event()
    connection_made = HTTPChannel.connection_made
    idle_after_response = HTTPChannel.idle_after_response

    def counting_connection_made(self: HTTPChannel, transport: Any) -> None:
        connection_made(self, transport)
        if len(self.server.channels) == 2:
            accepted.set()

    def watched_idle_after_response(self: HTTPChannel) -> bool:
        began.set()  # the shutdown looks at each connection once it has begun
        return idle_after_response.fget(self)  # type: ignore[attr-defined,no-any-return]

    monkeypatch.setattr(HTTPChannel, "connection_made", counting_connection_made)
    monkeypatch.setattr(HTTPChannel, "idle_after_response", property(watched_idle_after_response))
    server = asyncwsgi.Server(apps.hello, asyncwsgi.Config(host="127.0.0.1", port=0))
    await server.start()
    port = server.addresses[0][1]
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    silent_reader, silent_writer = await asyncio.open_connection("127.0.0.1", port)
    await asyncio.wait_for(accepted.wait(), TIMEOUT)
    shutdown = asyncio.ensure_future(server.shutdown(TIMEOUT))
    await asyncio.wait_for(began.wait(), TIMEOUT)
    writer.write(GET)
    (reply,) = decode_replies(await asyncio.wait_for(reader.read(), TIMEOUT))
    assert reply.status == 200
    assert reply.body == b"Hello, world!"
    assert reply.headers["connection"] == "close"
    assert await asyncio.wait_for(silent_reader.read(), TIMEOUT) == b""
    await asyncio.wait_for(shutdown, TIMEOUT)
    writer.close()
    silent_writer.close()


async def test_idle_keep_alive_connection_is_closed_after_timeout() -> None:
    async with running(apps.hello, timeout_keep_alive=0.2) as srv:
        reader, writer = await asyncio.open_connection("127.0.0.1", srv.port)
        writer.write(GET)
        await reader.readuntil(b"Hello, world!")
        assert await asyncio.wait_for(reader.read(), TIMEOUT) == b""
        writer.close()


async def test_idle_connections_hold_no_thread() -> None:
    """Many idle keep-alive connections and one pool thread: requests are still served."""
    async with running(apps.hello, threads=1) as srv:
        idle = [await asyncio.open_connection("127.0.0.1", srv.port) for _ in range(50)]
        for _, writer in idle[:25]:
            writer.write(b"GET / HTTP/1.1\r\nHost: t\r\n")  # a head that never completes
        async with httpx.AsyncClient() as client:
            reply = await client.get(srv.url, timeout=TIMEOUT)
        assert reply.status_code == 200
        for _, writer in idle:
            writer.close()


async def test_access_log_line(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="asyncwsgi.access")
    async with running(apps.hello) as srv:
        await exchange(srv.port, b"GET /a%0Ab HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
    (line,) = [r.getMessage() for r in caplog.records if r.name == "asyncwsgi.access"]
    assert line.startswith("127.0.0.1:")
    assert ' - "GET /a%0Ab HTTP/1.1" 200 13 ' in line


def test_generator_body_is_not_delayed() -> None:
    """A chunk is handed over before the app's next block is produced (PEP 3333 buffering)."""
    handed: list[bytes] = []
    gate = threading.Event()

    class Sink:
        can_sendfile = False
        disconnected = False

        def send(self, head: Any, chunks: list[bytes], nbytes: int, end: bool) -> None:
            handed.extend(chunks)
            if chunks == [b"first"]:
                gate.set()

        def send_file(self, *args: Any) -> None:
            raise AssertionError

        def abort(self) -> None:
            raise AssertionError

    def body() -> Iterator[bytes]:
        yield b"first"
        assert gate.is_set(), "first chunk was held back"
        yield b"second"

    def app(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        start_response("200 OK", [])
        return body()

    from asyncwsgi.wsgi import run_wsgi

    run_wsgi(app, {"REQUEST_METHOD": "GET", "PATH_INFO": "/"}, Sink())
    assert handed == [b"first", b"second"]


async def test_uds_perms_sets_the_socket_mode(tmp_path: Path) -> None:
    path = tmp_path / "app.sock"
    async with running(apps.hello, uds=str(path), uds_perms="600"):
        assert (path.stat().st_mode & 0o777) == 0o600
        reader, writer = await asyncio.open_unix_connection(str(path))
        writer.write(b"GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        assert (await asyncio.wait_for(reader.read(), TIMEOUT)).endswith(b"Hello, world!")
        writer.close()
