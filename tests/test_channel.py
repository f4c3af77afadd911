"""HTTPChannel unit tests: bytes in, bytes out, no socket, no pool thread, no real time.

Each test drives one connection through :class:`tests.channel_fakes.ChannelHandle`: it feeds
the client's bytes, runs the application calls the channel handed to the pool, advances the
clock and runs the server's timeout sweep, and reads back what the client received. A timeout
of many seconds is crossed with :meth:`~tests.channel_fakes.ChannelHandle.tick`, so the whole
file runs in well under a second. A few tests run the application in a thread of their own,
where it must block (reading a body that has not arrived, or a paused response); they
synchronise on what it asks of the loop, never on time.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import pytest

from asyncwsgi import Config
from asyncwsgi.errors import ClientDisconnected

from .apps import echo, generator_app, hello, status_app
from .channel_fakes import ChannelFactory

pytestmark = pytest.mark.timeout(30)

Environ = dict[str, Any]


@pytest.fixture
def make_channel(monkeypatch: pytest.MonkeyPatch) -> Iterator[ChannelFactory]:
    factory = ChannelFactory(monkeypatch)
    yield factory
    factory.close()


def get(target: str = "/", *extra: str, version: str = "1.1") -> bytes:
    lines = [f"GET {target} HTTP/{version}", "Host: example.org", *extra, "", ""]
    return "\r\n".join(lines).encode("latin-1")


def post_head(length: int, *extra: str) -> bytes:
    lines = ["POST / HTTP/1.1", "Host: example.org", f"Content-Length: {length}", *extra, "", ""]
    return "\r\n".join(lines).encode("latin-1")


class Recorder:
    """An app that answers 200 with its PATH_INFO, and records each call's environ."""

    def __init__(self) -> None:
        self.calls: list[Environ] = []

    def __call__(self, environ: Environ, start_response: Any) -> Iterable[bytes]:
        self.calls.append(environ)
        body = environ["PATH_INFO"].encode("latin-1")
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [body]


def remote_addr(environ: Environ, start_response: Any) -> Iterable[bytes]:
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [environ["REMOTE_ADDR"].encode("ascii")]


def read_body(environ: Environ, start_response: Any) -> Iterable[bytes]:
    """Read the whole body, then answer with it (a read error propagates to the server)."""
    body = environ["wsgi.input"].read()
    start_response("200 OK", [("Content-Type", "application/octet-stream")])
    return [body]


STREAM = generator_app("200 OK", [("Content-Type", "text/plain")], [b"one", b"two"])


# -- the ordinary path -----------------------------------------------------------------------------


async def test_request_is_answered_and_the_connection_kept_alive(make_channel) -> None:
    app = Recorder()
    ch = make_channel(app)
    ch.feed(get("/first"))
    assert ch.pending_app_calls == 1
    assert ch.run_pending_app_calls() == 1
    ch.feed(get("/second"))
    ch.run_pending_app_calls()
    assert [(r.status, r.body) for r in ch.replies] == [(200, b"/first"), (200, b"/second")]
    assert "connection" not in ch.replies[0].headers
    assert not ch.closed
    assert not ch.half_closed
    assert ch.requests_active == 0


async def test_a_head_split_over_reads_is_dispatched_once_complete(make_channel) -> None:
    app = Recorder()
    ch = make_channel(app)
    request = get("/split")
    for i in range(len(request) - 1):
        ch.feed(request[i : i + 1])
    assert ch.pending_app_calls == 0
    ch.feed(request[-1:])
    assert ch.pending_app_calls == 1
    ch.run_pending_app_calls()
    assert [r.body for r in ch.replies] == [b"/split"]


# -- timeouts --------------------------------------------------------------------------------------


async def test_incomplete_head_gets_408_after_timeout_request_header(make_channel) -> None:
    app = Recorder()
    ch = make_channel(app, Config(timeout_request_header=10, timeout_keep_alive=60))
    ch.feed(b"GET / HTTP/1.1\r\nHost: exa")
    ch.tick(1)
    ch.tick(8)
    assert ch.written == b""
    assert not ch.closed
    ch.tick(2)
    [reply] = ch.replies
    assert reply.status == 408
    assert reply.headers["connection"] == "close"
    # The rest of the head may be on its way: the server half-closes and reads on (lingers).
    assert ch.half_closed
    assert app.calls == []


async def test_header_timeout_does_not_apply_to_a_complete_head(make_channel) -> None:
    """A request whose app runs long is not the client's fault: no 408 while it runs."""
    app = Recorder()
    ch = make_channel(app, Config(timeout_request_header=10, timeout_keep_alive=60))
    ch.feed(get("/slow"))
    ch.tick(1)
    ch.tick(20)
    assert ch.written == b""
    ch.run_pending_app_calls()
    assert [(r.status, r.body) for r in ch.replies] == [(200, b"/slow")]
    assert not ch.closed


async def test_idle_keep_alive_connection_is_closed_after_timeout_keep_alive(make_channel) -> None:
    ch = make_channel(hello, Config(timeout_keep_alive=5, timeout_request_header=10))
    ch.feed(get())
    ch.run_pending_app_calls()
    ch.tick(1)
    ch.tick(3)
    assert not ch.closed
    ch.tick(2)
    assert ch.closed
    assert not ch.aborted  # closed after the buffered output, not cut
    assert len(ch.replies) == 1  # closed without a response of its own


async def test_new_connection_that_sends_nothing_is_closed_after_timeout_keep_alive(
    make_channel,
) -> None:
    ch = make_channel(hello, Config(timeout_keep_alive=5, timeout_request_header=2))
    ch.tick(4)
    assert not ch.closed
    ch.tick(2)
    assert ch.closed
    assert ch.written == b""  # no 408: not a byte of a request had come


async def test_wsgi_input_timeout_answers_408_and_closes(make_channel) -> None:
    # The read timeout is a wait in the application's thread (wsgi.input), not a sweep: the
    # client here never sends the rest, so the 1 ms wait always expires.
    ch = make_channel(read_body, Config(timeout_read=0.001))
    ch.feed(post_head(10) + b"abc")
    ch.run_pending_app_calls()
    [reply] = ch.replies
    assert reply.status == 408
    assert reply.headers["connection"] == "close"
    assert ch.half_closed  # the client may still be sending its body: linger
    assert ch.requests_active == 0


async def test_write_timeout_cuts_a_client_that_reads_nothing(make_channel) -> None:
    big = status_app("200 OK", [("Content-Type", "text/plain")], [b"x" * 256 * 1024])
    ch = make_channel(big, Config(timeout_write=10))
    ch.stop_reading()
    ch.feed(get())
    ch.run_pending_app_calls()
    ch.tick(1)
    ch.tick(8)
    assert not ch.closed
    ch.tick(2)
    assert ch.aborted


async def test_write_timeout_counts_from_the_last_byte_the_client_read(make_channel) -> None:
    big = status_app("200 OK", [("Content-Type", "text/plain")], [b"x" * 256 * 1024])
    ch = make_channel(big, Config(timeout_write=10))
    ch.stop_reading()
    ch.feed(get())
    ch.run_pending_app_calls()
    ch.tick(1)
    ch.tick(8)
    ch.read(1000)  # a slow reader, not a dead one
    ch.tick(8)
    assert not ch.closed  # 16 s since the first byte was due, 8 since the last one read
    ch.tick(11)
    assert ch.aborted


async def test_request_deadline_answers_504_and_discards_the_late_response(make_channel) -> None:
    app = Recorder()
    ch = make_channel(app, Config(timeout_request=30))
    ch.feed(get("/stuck"))
    ch.tick(1)
    ch.tick(28)
    assert ch.written == b""
    ch.tick(2)
    [reply] = ch.replies
    assert reply.status == 504
    assert reply.headers["connection"] == "close"
    # The server, not the client, ends the keep-alive connection: a next request may be on its
    # way, so it half-closes and lingers rather than reset it (RFC 9112 section 9.6).
    assert ch.half_closed
    assert ch.requests_active == 0
    answered = ch.written
    ch.run_pending_app_calls()  # the thread gets to the request at last
    assert app.calls == []  # nobody would read its response: the app is not called
    assert ch.written == answered


async def test_request_that_waited_past_timeout_queue_gets_503(make_channel) -> None:
    app = Recorder()
    late = make_channel(app, Config(timeout_queue=5))
    late.feed(get("/late"))
    late.tick(6)
    late.run_pending_app_calls()
    [reply] = late.replies
    assert reply.status == 503
    assert reply.headers["retry-after"] == "1"
    assert reply.headers["connection"] == "close"
    assert app.calls == []

    in_time = late.another_connection()
    in_time.feed(get("/in-time"))
    in_time.tick(4)
    in_time.run_pending_app_calls()
    assert [(r.status, r.body) for r in in_time.replies] == [(200, b"/in-time")]


async def test_limit_concurrency_answers_503_at_once(make_channel) -> None:
    app = Recorder()
    first = make_channel(app, Config(limit_concurrency=1))
    first.feed(get("/first"))
    assert first.requests_active == 1

    second = first.another_connection()
    second.feed(get("/second"))
    [reply] = second.replies
    assert reply.status == 503
    assert reply.headers["retry-after"] == "1"
    assert reply.headers["connection"] == "close"
    assert first.pending_app_calls == 1  # only the first went to the pool

    first.run_pending_app_calls()
    assert first.requests_active == 0
    third = first.another_connection(("127.0.0.1", 50002))
    third.feed(get("/third"))
    assert third.pending_app_calls == 1
    third.run_pending_app_calls()
    assert [r.body for r in third.replies] == [b"/third"]
    assert [e["PATH_INFO"] for e in app.calls] == ["/first", "/third"]


# -- lingering close -------------------------------------------------------------------------------


async def test_lingering_close_after_413_discards_input_until_timeout_linger(make_channel) -> None:
    app = Recorder()
    ch = make_channel(app, Config(limit_request_body=10, timeout_linger=5))
    ch.feed(post_head(100) + b"x" * 20)
    [reply] = ch.replies
    assert reply.status == 413
    assert reply.headers["connection"] == "close"
    assert ch.half_closed
    answered = ch.written
    ch.feed(b"x" * 80)  # the rest of the body: read and dropped
    ch.feed(get("/after"))
    assert ch.written == answered
    assert ch.pending_app_calls == 0
    ch.tick(1)
    ch.tick(3)
    assert not ch.closed
    ch.tick(2)
    assert ch.closed
    assert app.calls == []


async def test_lingering_close_ends_when_the_client_closes(make_channel) -> None:
    ch = make_channel(hello, Config(limit_request_body=10, timeout_linger=5))
    ch.feed(post_head(100))
    assert ch.half_closed
    ch.eof()
    assert ch.closed


async def test_linger_timer_restarts_while_the_response_is_still_being_read(make_channel) -> None:
    """timeout_linger counts from when the output has drained, not from the half-close."""
    ch = make_channel(hello, Config(limit_request_body=10, timeout_linger=5, timeout_write=60))
    ch.stop_reading()
    ch.feed(post_head(100))
    assert ch.half_closed
    ch.tick(1)
    ch.tick(10)  # the 413 is still unread: lingering has not begun counting
    assert not ch.closed
    ch.read()
    ch.tick(1)
    ch.tick(3)
    assert not ch.closed
    ch.tick(2)
    assert ch.closed


# -- pipelining ------------------------------------------------------------------------------------


async def test_pipelined_request_starts_only_after_the_response_before_it(make_channel) -> None:
    app = Recorder()
    ch = make_channel(app)
    ch.feed(get("/one") + get("/two"))
    assert ch.pending_app_calls == 1  # one request in flight at a time
    assert ch.reading_paused  # the rest waits in the socket meanwhile
    ch.run_pending_app_calls(limit=1)
    assert [r.body for r in ch.replies] == [b"/one"]
    assert ch.pending_app_calls == 1  # the second starts once the first response is out
    ch.run_pending_app_calls()
    assert [r.body for r in ch.replies] == [b"/one", b"/two"]
    assert not ch.reading_paused
    assert not ch.closed


async def test_pipelined_request_waits_while_writing_is_paused(make_channel) -> None:
    app = Recorder()
    ch = make_channel(app, Config(write_high_water=64))
    ch.stop_reading()
    ch.feed(get("/one") + get("/two"))
    ch.run_pending_app_calls()
    assert [r.body for r in ch.replies] == [b"/one"]
    # The client has not read the first response: its next request must wait, or a client
    # that pipelines and never reads would make the server buffer every response.
    assert ch.pending_app_calls == 0
    assert ch.reading_paused
    ch.read()
    assert ch.pending_app_calls == 1
    ch.run_pending_app_calls()
    assert [r.body for r in ch.replies] == [b"/one", b"/two"]
    assert not ch.reading_paused


# -- 100-continue ----------------------------------------------------------------------------------


async def test_100_continue_is_sent_when_the_app_begins_reading(make_channel) -> None:
    ch = make_channel(echo)
    ch.feed(post_head(5, "Expect: 100-continue"))
    assert ch.written == b""  # not before the app asks for the body
    app = ch.start_app_call_in_thread()
    app.wait_for_loop_callback()
    assert ch.written.startswith(b"HTTP/1.1 100 Continue\r\n")
    ch.feed(b"hello")
    app.join()
    [reply] = ch.replies
    assert (reply.status, reply.body) == (200, b"hello")
    assert ch.written.count(b"100 Continue") == 1


async def test_100_continue_is_not_sent_when_the_app_does_not_read(make_channel) -> None:
    ch = make_channel(hello)
    ch.feed(post_head(5, "Expect: 100-continue"))
    ch.run_pending_app_calls()
    assert b"100 Continue" not in ch.written
    [reply] = ch.replies
    assert reply.status == 200


# -- flow control ----------------------------------------------------------------------------------


@pytest.mark.parametrize("with_head", [16, 4], ids=["with-the-head", "after-the-head"])
async def test_body_over_read_high_water_pauses_reading_until_the_app_reads(
    make_channel, with_head: int
) -> None:
    chunks: list[bytes] = []

    def read_in_two(environ: Environ, start_response: Any) -> Iterable[bytes]:
        stream = environ["wsgi.input"]
        chunks.append(stream.read(16))
        chunks.append(stream.read(16))
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"|".join(chunks)]

    ch = make_channel(read_in_two, Config(read_high_water=8))
    ch.feed(post_head(32) + b"a" * with_head)
    if with_head < 16:
        ch.feed(b"a" * (16 - with_head))
    assert ch.reading_paused
    app = ch.start_app_call_in_thread()
    app.wait_for_loop_callback()  # the app consumed the buffer and asked for more
    assert not ch.reading_paused
    ch.feed(b"b" * 16)
    app.join()
    [reply] = ch.replies
    assert reply.body == b"a" * 16 + b"|" + b"b" * 16


async def test_pause_writing_before_the_app_runs_holds_back_its_stream(make_channel) -> None:
    # The app's thread waits for the transport to drain; nothing drains it here, so its
    # 1 ms write timeout expires and the response is cut.
    ch = make_channel(STREAM, Config(timeout_write=0.001))
    ch.pause_writing()
    ch.feed(get())
    ch.run_pending_app_calls()
    assert ch.aborted
    assert b"two" not in ch.written


async def test_pause_writing_during_a_request_holds_back_its_stream(make_channel) -> None:
    ch = make_channel(STREAM, Config(timeout_write=0.001))
    ch.feed(get())
    ch.pause_writing()
    ch.run_pending_app_calls()
    assert ch.aborted
    assert b"two" not in ch.written


async def test_resume_writing_releases_the_stream(make_channel) -> None:
    ch = make_channel(STREAM, Config(timeout_write=0.001))
    ch.feed(get())
    ch.pause_writing()
    ch.resume_writing()
    ch.run_pending_app_calls()
    assert not ch.aborted
    [reply] = ch.replies
    assert reply.body == b"onetwo"


async def test_resume_writing_wakes_an_app_waiting_to_write(make_channel) -> None:
    ch = make_channel(STREAM)
    ch.pause_writing()
    ch.feed(get())
    app = ch.start_app_call_in_thread()
    app.wait_for_loop_callback()  # the head and b"one" are handed over; the app waits
    ch.resume_writing()
    app.join()
    [reply] = ch.replies
    assert reply.body == b"onetwo"


# -- shutdown, PROXY protocol, the client going away -----------------------------------------------


async def test_graceful_shutdown_answers_with_connection_close(make_channel) -> None:
    ch = make_channel(hello)
    ch.feed(get())
    ch.begin_shutdown()
    ch.run_pending_app_calls()
    [reply] = ch.replies
    assert reply.status == 200
    connection = [v for k, v in reply.raw_headers if k.lower() == b"connection"]
    assert connection == [b"close"]
    assert ch.half_closed  # a lingering close: the client may have sent its next request


async def test_proxy_protocol_header_gives_the_client_address(make_channel) -> None:
    ch = make_channel(remote_addr, Config(proxy_protocol=True))
    header = b"PROXY TCP4 192.0.2.1 192.0.2.2 56324 443\r\n"
    ch.feed(header[:9])
    ch.feed(header[9:] + get())
    ch.run_pending_app_calls()
    [reply] = ch.replies
    assert reply.body == b"192.0.2.1"


async def test_invalid_proxy_protocol_header_gets_400(make_channel) -> None:
    app = Recorder()
    ch = make_channel(app, Config(proxy_protocol=True))
    ch.feed(b"PROXY TCP4 not-an-address\r\n" + get())
    [reply] = ch.replies
    assert reply.status == 400
    assert app.calls == []
    assert ch.closed or ch.half_closed


async def test_untrusted_peer_cannot_send_a_proxy_header(make_channel) -> None:
    app = Recorder()
    ch = make_channel(app, Config(proxy_protocol=True), peer=("203.0.113.9", 40000))
    ch.feed(b"PROXY TCP4 192.0.2.1 192.0.2.2 56324 443\r\n" + get())
    [reply] = ch.replies
    assert reply.status == 400
    assert app.calls == []


async def test_client_eof_on_an_idle_connection_closes_it(make_channel) -> None:
    ch = make_channel(hello)
    ch.feed(get())
    ch.run_pending_app_calls()
    ch.eof()
    assert ch.closed
    assert len(ch.replies) == 1


async def test_half_closed_client_still_gets_its_response(make_channel) -> None:
    seen: list[bool] = []

    def app(environ: Environ, start_response: Any) -> Iterable[bytes]:
        seen.append(environ["asyncwsgi.client_disconnected"]())
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"still here"]

    ch = make_channel(app)
    ch.feed(get())
    ch.eof()
    assert not ch.closed
    ch.run_pending_app_calls()
    assert seen == [True]  # the app can tell the client has gone (or half-closed)
    [reply] = ch.replies
    assert reply.body == b"still here"
    assert ch.closed
    assert not ch.aborted


async def test_connection_lost_before_the_app_runs(make_channel) -> None:
    app = Recorder()
    ch = make_channel(app)
    ch.feed(get())
    assert ch.requests_active == 1
    ch.lose(ConnectionResetError())
    assert ch.requests_active == 0
    ch.run_pending_app_calls()
    assert app.calls == []  # the response could not be sent: the app is not called
    assert ch.written == b""


async def test_connection_lost_during_an_upload_fails_the_read(make_channel) -> None:
    errors: list[BaseException] = []

    def reader(environ: Environ, start_response: Any) -> Iterable[bytes]:
        try:
            environ["wsgi.input"].read()
        except ClientDisconnected as exc:
            errors.append(exc)
            raise
        start_response("200 OK", [])
        return [b""]

    ch = make_channel(reader)
    ch.feed(post_head(100) + b"x" * 10)
    app = ch.start_app_call_in_thread()
    ch.lose(ConnectionResetError())
    app.join()
    assert len(errors) == 1
    assert ch.requests_active == 0
    assert ch.written == b""


# -- HTTP/1.0 and rejected requests ----------------------------------------------------------------


async def test_http10_keep_alive_keeps_the_connection(make_channel) -> None:
    ch = make_channel(hello)
    ch.feed(get("/", "Connection: keep-alive", version="1.0"))
    ch.run_pending_app_calls()
    ch.feed(get("/", "Connection: keep-alive", version="1.0"))
    ch.run_pending_app_calls()
    replies = ch.replies
    assert [r.status for r in replies] == [200, 200]
    assert [r.headers["connection"] for r in replies] == ["keep-alive", "keep-alive"]
    assert not ch.closed
    ch.feed(get("/", version="1.0"))  # without keep-alive: the last one
    ch.run_pending_app_calls()
    assert ch.closed
    assert ch.written.endswith(b"Hello, world!")
    assert ch.written.count(b"HTTP/1.1 200 OK") == 3


async def test_malformed_request_gets_400_and_close(make_channel) -> None:
    app = Recorder()
    ch = make_channel(app, Config(timeout_linger=5))
    ch.feed(b"GET / HTTP/1.1\r\nHost: example.org\r\nno colon here\r\n\r\n")
    [reply] = ch.replies
    assert reply.status == 400
    assert reply.headers["connection"] == "close"
    assert app.calls == []
    assert ch.closed or ch.half_closed
    ch.tick(6)
    assert ch.closed


@pytest.mark.parametrize(
    ("config", "request_bytes", "status"),
    [
        pytest.param(
            Config(limit_request_field_size=100),
            get("/", "X-Big: " + "b" * 200),
            431,
            id="field",
        ),
        pytest.param(
            Config(limit_request_head=1024),
            get("/", *(f"X-Field-{i}: {'v' * 60}" for i in range(30))),
            431,
            id="head",
        ),
        pytest.param(Config(limit_request_line=100), get("/" + "t" * 200), 414, id="target"),
    ],
)
async def test_oversized_request_is_rejected(
    make_channel, config: Config, request_bytes: bytes, status: int
) -> None:
    app = Recorder()
    ch = make_channel(app, config)
    ch.feed(request_bytes)
    [reply] = ch.replies
    assert reply.status == status
    assert reply.headers["connection"] == "close"
    assert app.calls == []
    assert ch.closed or ch.half_closed
    assert ch.late_writes == 0
