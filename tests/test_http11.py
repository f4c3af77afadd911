"""Unit tests of the sans-IO HTTP/1.1 layer, :class:`asyncwsgi.http11.ServerConnection`.

No socket and no event loop: an ``h11.Connection(h11.CLIENT)`` is the reference client. It
produces the request bytes the server connection is fed, and parses the response bytes the server
connection returns, so every framing decision is checked by an independent HTTP/1.1 parser.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Sequence
from typing import Any

import h11
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from asyncwsgi import _h11
from asyncwsgi.config import Config
from asyncwsgi.errors import RequestRejected
from asyncwsgi.events import ConnectionClosed, Data, EndOfMessage, Request
from asyncwsgi.http11 import PAUSED, ServerConnection, error_response, reason_phrase
from asyncwsgi.state import request_limits

DATE = (b"Date", b"Sun, 06 Nov 1994 08:49:37 GMT")
SERVER = (b"Server", b"asyncwsgi")


def server(server_header: tuple[bytes, bytes] | None = SERVER, **options: Any) -> ServerConnection:
    return ServerConnection(request_limits(Config(**options)), server_header)


def request_bytes(
    client: h11.Connection,
    method: str = "GET",
    target: str = "/",
    headers: Sequence[tuple[str, str]] = (),
    body: bytes | None = None,
) -> bytes:
    """Serialise one complete request with the reference client."""
    data = client.send(h11.Request(method=method, target=target, headers=[("Host", "x"), *headers]))
    assert data is not None
    if body:
        more = client.send(h11.Data(data=body))
        assert more is not None
        data += more
    end = client.send(h11.EndOfMessage())
    assert end is not None
    return data + end


def client_events(client: h11.Connection, data: bytes) -> list[Any]:
    """Feed response bytes to the reference client and return every event it can produce."""
    client.receive_data(data)
    events: list[Any] = []
    while True:
        event = client.next_event()
        if event is h11.NEED_DATA or event is h11.PAUSED:
            return events
        events.append(event)
        if type(event) is h11.ConnectionClosed:
            return events


def join(pieces: Iterable[bytes]) -> bytes:
    return b"".join(pieces)


def header_values(headers: Iterable[tuple[bytes, bytes]], name: bytes) -> list[bytes]:
    return [value for key, value in headers if key.lower() == name]


def body_of(events: Iterable[Any]) -> bytes:
    return b"".join(bytes(event.data) for event in events if type(event) in (h11.Data, Data))


def respond(
    conn: ServerConnection,
    body: bytes,
    status: int = 200,
    headers: list[tuple[bytes, bytes]] | None = None,
    content_length: int | None = None,
) -> bytes:
    """Send a whole response through ``conn`` and return its wire bytes."""
    head = conn.send_response(
        status, reason_phrase(status), list(headers or []), DATE, content_length
    )
    data = join(conn.send_data(body)) if body else b""
    tail = conn.send_end()
    assert tail is not None
    return head + data + tail


def first_request(events: Sequence[object]) -> Request:
    """The first event, which must be the request head."""
    request = events[0]
    assert type(request) is Request
    return request


def next_cycle(conn: ServerConnection) -> list[Any]:
    """Start the next keep-alive cycle and return the events already buffered for it."""
    conn.start_next_cycle()
    return conn.next_events()


# -- receiving ----------------------------------------------------------------------------


def test_get_request_gives_request_and_end_of_message() -> None:
    client = h11.Connection(h11.CLIENT)
    conn = server()
    events = conn.receive_data(
        request_bytes(client, "GET", "/path?q=1", [("Accept", "text/plain")])
    )
    assert [type(event) for event in events] == [Request, EndOfMessage]
    request = first_request(events)
    assert request.method == b"GET"
    assert request.target == b"/path?q=1"
    assert request.http_version == b"1.1"
    assert (b"accept", b"text/plain") in list(request.headers)
    assert conn.request_complete
    assert not conn.response_started


def test_post_with_content_length_body_arriving_in_pieces() -> None:
    client = h11.Connection(h11.CLIENT)
    conn = server()
    data = request_bytes(client, "POST", "/", [("Content-Length", "11")], b"hello world")
    head_end = data.index(b"\r\n\r\n") + 4
    events = conn.receive_data(data[:head_end])
    assert [type(event) for event in events] == [Request]
    assert not conn.request_complete
    events = conn.receive_data(data[head_end : head_end + 5])
    assert [type(event) for event in events] == [Data]
    assert not conn.request_complete
    events += conn.receive_data(data[head_end + 5 :])
    assert type(events[-1]) is EndOfMessage
    assert body_of(events) == b"hello world"
    assert conn.request_complete


def test_chunked_request_body_is_decoded() -> None:
    client = h11.Connection(h11.CLIENT)
    conn = server()
    data = client.send(
        h11.Request(
            method="POST", target="/", headers=[("Host", "x"), ("Transfer-Encoding", "chunked")]
        )
    )
    assert data is not None
    for part in (b"hello", b" ", b"chunked world"):
        more = client.send(h11.Data(data=part))
        assert more is not None
        data += more
    end = client.send(h11.EndOfMessage())
    assert end is not None
    data += end
    assert b"5\r\nhello\r\n" in data  # really chunked on the wire
    events = conn.receive_data(data)
    assert type(events[0]) is Request
    assert type(events[-1]) is EndOfMessage
    assert body_of(events) == b"hello chunked world"
    assert conn.request_complete


def test_eof_while_idle_gives_connection_closed() -> None:
    conn = server()
    assert [type(event) for event in conn.receive_data(b"")] == [ConnectionClosed]


def test_keep_alive_cycles() -> None:
    client = h11.Connection(h11.CLIENT)
    conn = server()
    for i in range(3):
        events = conn.receive_data(request_bytes(client, "GET", f"/{i}"))
        assert first_request(events).target == f"/{i}".encode()
        body = f"response {i}".encode()
        reply = client_events(client, respond(conn, body, content_length=len(body)))
        assert reply[0].status_code == 200
        assert body_of(reply) == body
        assert type(reply[-1]) is h11.EndOfMessage
        assert conn.keep_alive
        conn.start_next_cycle()
        client.start_next_cycle()
        assert not conn.response_started


def test_pipelined_requests_pause_until_next_cycle() -> None:
    # Two reference clients serialise the requests: one h11 client never pipelines.
    first = request_bytes(h11.Connection(h11.CLIENT), "GET", "/first")
    second = request_bytes(h11.Connection(h11.CLIENT), "GET", "/second")
    conn = server()
    events = conn.receive_data(first + second)
    assert [type(event) for event in events[:2]] == [Request, EndOfMessage]
    assert first_request(events).target == b"/first"
    assert events[-1] is PAUSED
    # Still paused until the first response is complete.
    assert conn.next_events() == [PAUSED]
    respond(conn, b"one", content_length=3)
    assert conn.keep_alive
    conn.start_next_cycle()
    events = conn.next_events()
    assert [type(event) for event in events] == [Request, EndOfMessage]
    assert first_request(events).target == b"/second"


def test_pipelined_request_runs_the_strict_head_checks() -> None:
    """A pipelined request with Content-Length and Transfer-Encoding is refused (smuggling).

    The first request of a connection with the same head is refused by ``strict.check_head``;
    a second one that arrived in the same read must not get past it.
    """
    smuggling = (
        b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
    )
    with pytest.raises(RequestRejected) as alone:
        server().receive_data(smuggling)
    assert alone.value.status == 400

    conn = server()
    events = conn.receive_data(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" + smuggling)
    assert events[-1] is PAUSED
    respond(conn, b"", content_length=0)
    with pytest.raises(RequestRejected) as pipelined:
        next_cycle(conn)
    assert pipelined.value.status == 400


def test_pipelined_request_body_is_not_checked_as_a_head() -> None:
    """The body of a pipelined request, arriving later, is body: not a too-long request line."""
    conn = server()
    events = conn.receive_data(
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"
        b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 9000\r\n\r\n"
    )
    assert events[-1] is PAUSED
    respond(conn, b"", content_length=0)
    conn.start_next_cycle()
    events = conn.next_events()
    assert [type(event) for event in events] == [Request]
    assert first_request(events).target == b"/upload"
    events = conn.receive_data(b"a" * 9000)
    assert body_of(events) == b"a" * 9000
    assert type(events[-1]) is EndOfMessage


def test_100_continue() -> None:
    client = h11.Connection(h11.CLIENT)
    conn = server()
    head = client.send(
        h11.Request(
            method="POST",
            target="/",
            headers=[("Host", "x"), ("Content-Length", "5"), ("Expect", "100-continue")],
        )
    )
    assert head is not None
    events = conn.receive_data(head)
    assert [type(event) for event in events] == [Request]
    assert conn.they_are_waiting_for_100_continue

    interim = conn.send_continue()
    assert interim.startswith(b"HTTP/1.1 100 ")
    reply = client_events(client, interim)
    assert len(reply) == 1
    assert type(reply[0]) is h11.InformationalResponse
    assert reply[0].status_code == 100
    assert not conn.they_are_waiting_for_100_continue
    assert not conn.response_started

    body = client.send(h11.Data(data=b"hello"))
    end = client.send(h11.EndOfMessage())
    assert body is not None
    assert end is not None
    events = conn.receive_data(body + end)
    assert body_of(events) == b"hello"
    assert conn.request_complete
    final = client_events(client, respond(conn, b"ok", content_length=2))
    assert final[0].status_code == 200
    assert body_of(final) == b"ok"


def test_no_100_continue_wait_without_expect_or_once_the_body_arrives() -> None:
    client = h11.Connection(h11.CLIENT)
    conn = server()
    conn.receive_data(request_bytes(client, "POST", "/", [("Content-Length", "2")], b"hi"))
    assert not conn.they_are_waiting_for_100_continue

    client = h11.Connection(h11.CLIENT)
    conn = server()
    head = client.send(
        h11.Request(
            method="POST",
            target="/",
            headers=[("Host", "x"), ("Content-Length", "2"), ("Expect", "100-continue")],
        )
    )
    assert head is not None
    conn.receive_data(head)
    assert conn.they_are_waiting_for_100_continue
    conn.receive_data(b"hi")  # the client gave up waiting and sent the body
    assert not conn.they_are_waiting_for_100_continue


# -- response framing -------------------------------------------------------------------------


def test_head_response_carries_no_body_bytes() -> None:
    client = h11.Connection(h11.CLIENT)
    conn = server()
    conn.receive_data(request_bytes(client, "HEAD", "/"))
    head = conn.send_response(200, b"OK", [(b"Content-Type", b"text/plain")], DATE, 11)
    assert header_values(h11_headers(head), b"content-length") == [b"11"]
    assert conn.send_data(b"hello world") == ()
    assert conn.body_bytes_sent == 0
    assert conn.bytes_discarded == 0  # HEAD bodies are dropped by design, not "too long"
    tail = conn.send_end()
    assert tail == b""
    assert b"hello" not in head
    reply = client_events(client, head)
    assert [type(event) for event in reply] == [h11.Response, h11.EndOfMessage]
    assert conn.keep_alive


def test_head_response_without_length_is_not_chunked() -> None:
    client = h11.Connection(h11.CLIENT)
    conn = server()
    conn.receive_data(request_bytes(client, "HEAD", "/"))
    head = conn.send_response(200, b"OK", [], DATE)
    assert conn.send_data(b"streamed") == ()
    assert conn.send_end() == b""
    reply = client_events(client, head)
    assert [type(event) for event in reply] == [h11.Response, h11.EndOfMessage]


@pytest.mark.parametrize("status", [204, 304])
def test_no_body_status_carries_no_body_bytes(status: int) -> None:
    client = h11.Connection(h11.CLIENT)
    conn = server()
    conn.receive_data(request_bytes(client))
    head = conn.send_response(status, reason_phrase(status), [], DATE, 4)
    headers = h11_headers(head)
    assert header_values(headers, b"content-length") == []
    assert header_values(headers, b"transfer-encoding") == []
    assert conn.send_data(b"body") == ()
    assert conn.bytes_discarded == 0
    tail = conn.send_end()
    assert tail == b""
    reply = client_events(client, head + tail)
    assert [type(event) for event in reply] == [h11.Response, h11.EndOfMessage]
    assert reply[0].status_code == status
    assert conn.keep_alive


def test_computed_content_length_when_the_whole_body_is_known() -> None:
    client = h11.Connection(h11.CLIENT)
    conn = server()
    conn.receive_data(request_bytes(client))
    wire = respond(conn, b"hello world", content_length=11)
    head = wire[: wire.index(b"\r\n\r\n") + 4]
    headers = h11_headers(head)
    assert header_values(headers, b"content-length") == [b"11"]
    assert header_values(headers, b"transfer-encoding") == []
    assert wire.endswith(b"\r\n\r\nhello world")
    reply = client_events(client, wire)
    assert body_of(reply) == b"hello world"
    assert conn.body_bytes_sent == 11
    assert conn.keep_alive


def test_declared_content_length_wins_and_the_excess_is_discarded() -> None:
    client = h11.Connection(h11.CLIENT)
    conn = server()
    conn.receive_data(request_bytes(client))
    head = conn.send_response(200, b"OK", [(b"Content-Length", b"5")], DATE, 8)
    assert header_values(h11_headers(head), b"content-length") == [b"5"]
    assert conn.bytes_left == 5
    sent = join(conn.send_data(b"abc"))
    assert conn.bytes_left == 2
    sent += join(conn.send_data(b"defgh"))
    assert sent == b"abcde"
    assert conn.bytes_discarded == 3
    assert join(conn.send_data(b"ijk")) == b""
    assert conn.bytes_discarded == 6
    assert conn.body_bytes_sent == 5
    tail = conn.send_end()
    assert tail == b""
    reply = client_events(client, head + sent + tail)
    assert body_of(reply) == b"abcde"
    assert type(reply[-1]) is h11.EndOfMessage
    assert conn.keep_alive


def test_send_end_returns_none_when_the_body_is_short() -> None:
    client = h11.Connection(h11.CLIENT)
    conn = server()
    conn.receive_data(request_bytes(client))
    conn.send_response(200, b"OK", [(b"Content-Length", b"10")], DATE)
    assert join(conn.send_data(b"abcd")) == b"abcd"
    assert conn.bytes_left == 6
    assert conn.send_end() is None
    assert not conn.keep_alive


def test_chunked_framing_on_http11_without_content_length() -> None:
    client = h11.Connection(h11.CLIENT)
    conn = server()
    conn.receive_data(request_bytes(client))
    head = conn.send_response(200, b"OK", [(b"Content-Type", b"text/plain")], DATE)
    assert header_values(h11_headers(head), b"transfer-encoding") == [b"chunked"]
    assert header_values(h11_headers(head), b"content-length") == []
    assert conn.bytes_left is None
    first = join(conn.send_data(b"hello"))
    second = join(conn.send_data(b" world"))
    assert first == b"5\r\nhello\r\n"
    assert second == b"6\r\n world\r\n"
    tail = conn.send_end()
    assert tail == b"0\r\n\r\n"
    reply = client_events(client, head + first + second + tail)
    assert body_of(reply) == b"hello world"
    assert type(reply[-1]) is h11.EndOfMessage
    assert conn.keep_alive


def test_close_delimited_body_on_http10() -> None:
    conn = server()
    events = conn.receive_data(b"GET / HTTP/1.0\r\n\r\n")
    assert first_request(events).http_version == b"1.0"
    head = conn.send_response(200, b"OK", [(b"Content-Type", b"text/plain")], DATE)
    headers = h11_headers(head)
    assert head.startswith(b"HTTP/1.1 200 OK\r\n")
    assert header_values(headers, b"transfer-encoding") == []
    assert header_values(headers, b"content-length") == []
    assert [value.lower() for value in header_values(headers, b"connection")] == [b"close"]
    assert join(conn.send_data(b"raw body")) == b"raw body"  # no chunk framing
    assert conn.send_end() == b""
    assert not conn.keep_alive


def test_http10_with_known_length_still_closes() -> None:
    conn = server()
    conn.receive_data(b"GET / HTTP/1.0\r\n\r\n")
    head = conn.send_response(200, b"OK", [], DATE, 2)
    assert header_values(h11_headers(head), b"content-length") == [b"2"]
    assert join(conn.send_data(b"ok")) == b"ok"
    assert conn.send_end() == b""
    assert not conn.keep_alive


KEEP_ALIVE_10 = b"GET /k HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n"


def test_http10_keep_alive_with_known_length_stays_open() -> None:
    """RFC 9112 appendix C.2.2: an HTTP/1.0 request with ``Connection: keep-alive`` whose
    response has a known length is answered with ``Connection: keep-alive``, and the pipelined
    requests behind it, which wait (PAUSED) meanwhile, get the following cycles."""
    conn = server()
    events = conn.receive_data(KEEP_ALIVE_10 + KEEP_ALIVE_10 + b"HEAD /h HTTP/1.0\r\n\r\n")
    assert events[-1] is PAUSED
    for target in (b"/k", b"/k"):
        assert first_request(events).target == target
        head = conn.send_response(200, b"OK", [], DATE, 2)
        assert header_values(h11_headers(head), b"connection") == [b"keep-alive"]
        assert header_values(h11_headers(head), b"content-length") == [b"2"]
        assert join(conn.send_data(b"ok")) == b"ok"
        assert conn.send_end() == b""
        assert conn.keep_alive
        conn.start_next_cycle()
        events = conn.next_events()
    # The last one does not ask for keep-alive: it closes as before.
    assert first_request(events).target == b"/h"
    head = conn.send_response(200, b"OK", [], DATE, None)
    assert header_values(h11_headers(head), b"connection") == [b"close"]
    conn.send_end()
    assert not conn.keep_alive


@pytest.mark.parametrize(
    ("method", "status", "length", "keep"),
    [
        pytest.param("GET", 200, None, False, id="unknown-length"),
        pytest.param("HEAD", 200, None, True, id="head"),
        pytest.param("GET", 204, None, True, id="204"),
        pytest.param("GET", 200, 0, True, id="empty"),
    ],
)
def test_http10_keep_alive_needs_a_known_length(
    method: str, status: int, length: int | None, keep: bool
) -> None:
    """Without a known length the body is close-delimited (RFC 9112 section 6.3): the
    connection closes and what follows is ignored, as for any HTTP/1.0 request."""
    conn = server()
    conn.receive_data(KEEP_ALIVE_10.replace(b"GET", method.encode()) + KEEP_ALIVE_10)
    head = conn.send_response(status, b"X", [], DATE, length)
    connection = header_values(h11_headers(head), b"connection")
    assert connection == ([b"keep-alive"] if keep else [b"close"])
    if not keep:
        assert join(conn.send_data(b"streamed")) == b"streamed"
    assert conn.send_end() == b""
    assert conn.keep_alive is keep


def test_http10_keep_alive_is_not_kept_when_closing() -> None:
    conn = server()
    conn.receive_data(KEEP_ALIVE_10)
    head = conn.send_response(200, b"OK", [], DATE, 2, close=True)
    assert header_values(h11_headers(head), b"connection") == [b"close"]
    conn.send_data(b"ok")
    conn.send_end()
    assert not conn.keep_alive


def test_http10_keep_alive_with_close_token_closes() -> None:
    conn = server()
    conn.receive_data(b"GET / HTTP/1.0\r\nConnection: keep-alive, close\r\n\r\n")
    head = conn.send_response(200, b"OK", [], DATE, 2)
    assert header_values(h11_headers(head), b"connection") == [b"close"]


def test_date_and_server_headers() -> None:
    client = h11.Connection(h11.CLIENT)
    conn = server()
    conn.receive_data(request_bytes(client))
    head = conn.send_response(200, b"OK", [(b"Content-Type", b"text/plain")], DATE, 0)
    headers = h11_headers(head)
    assert header_values(headers, b"date") == [DATE[1]]
    assert header_values(headers, b"server") == [b"asyncwsgi"]
    assert header_values(headers, b"content-type") == [b"text/plain"]


def test_date_and_server_headers_can_be_left_out() -> None:
    client = h11.Connection(h11.CLIENT)
    conn = server(server_header=None)
    conn.receive_data(request_bytes(client))
    head = conn.send_response(200, b"OK", [], None, 0)
    headers = h11_headers(head)
    assert header_values(headers, b"date") == []
    assert header_values(headers, b"server") == []


def test_response_started_and_body_bytes_sent() -> None:
    client = h11.Connection(h11.CLIENT)
    conn = server()
    conn.receive_data(request_bytes(client))
    assert not conn.response_started
    conn.send_response(200, b"OK", [], DATE)
    assert conn.response_started
    conn.send_data(b"abc")
    conn.send_data(b"defg")
    assert conn.body_bytes_sent == 7
    tail = conn.send_end()
    assert tail is not None
    conn.start_next_cycle()
    conn.receive_data(request_bytes(h11.Connection(h11.CLIENT)))
    conn.send_response(200, b"OK", [], DATE, 0)
    assert conn.body_bytes_sent == 0


def test_send_file_placeholder_accounts_for_file_bytes() -> None:
    client = h11.Connection(h11.CLIENT)
    conn = server()
    conn.receive_data(request_bytes(client))
    head = conn.send_response(200, b"OK", [], DATE, 100)
    assert header_values(h11_headers(head), b"content-length") == [b"100"]
    assert list(conn.send_file_placeholder(60)) == []
    assert conn.bytes_left == 40
    assert conn.body_bytes_sent == 60
    assert list(conn.send_file_placeholder(40)) == []
    assert conn.bytes_left == 0
    assert conn.body_bytes_sent == 100
    # h11 counted the file bytes too: the message ends cleanly.
    assert conn.send_end() == b""
    assert conn.keep_alive
    reply = client_events(client, head + b"f" * 100)
    assert body_of(reply) == b"f" * 100


def test_send_file_placeholder_short_file_cannot_end() -> None:
    client = h11.Connection(h11.CLIENT)
    conn = server()
    conn.receive_data(request_bytes(client))
    conn.send_response(200, b"OK", [], DATE, 100)
    conn.send_file_placeholder(30)
    assert conn.send_end() is None
    assert not conn.keep_alive


def test_send_file_placeholder_needs_a_declared_length() -> None:
    client = h11.Connection(h11.CLIENT)
    conn = server()
    conn.receive_data(request_bytes(client))
    conn.send_response(200, b"OK", [], DATE, 10)
    with pytest.raises(AssertionError):
        conn.send_file_placeholder(11)

    client = h11.Connection(h11.CLIENT)
    conn = server()
    conn.receive_data(request_bytes(client))
    conn.send_response(200, b"OK", [], DATE)  # chunked: no room for raw file bytes
    with pytest.raises(AssertionError):
        conn.send_file_placeholder(1)


# -- rejections and limits ---------------------------------------------------------------------


def parse_rejection(data: bytes) -> tuple[h11.Response, bytes]:
    """Parse a rejection with a fresh reference client; check it is complete and closing."""
    client = h11.Connection(h11.CLIENT)
    client.send(h11.Request(method="GET", target="/", headers=[("Host", "x")]))
    client.send(h11.EndOfMessage())
    events = client_events(client, data)
    assert type(events[0]) is h11.Response
    assert type(events[-1]) is h11.EndOfMessage
    assert client.their_state is h11.MUST_CLOSE
    return events[0], body_of(events)


@pytest.mark.parametrize(
    "raw",
    [
        pytest.param(b"GET / HTTP/1.1\nHost: x\n\n", id="bare-lf"),
        pytest.param(b"NOT A REQUEST LINE\r\n\r\n", id="h11-request-line"),
        pytest.param(
            b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
            id="two-content-lengths",
        ),
    ],
)
def test_send_rejection_is_a_parseable_closing_400(raw: bytes) -> None:
    conn = server()
    with pytest.raises(RequestRejected) as excinfo:
        conn.receive_data(raw)
    assert excinfo.value.status == 400
    data = conn.send_rejection(excinfo.value.status, excinfo.value.reason)
    response, body = parse_rejection(data)
    assert response.status_code == 400
    assert response.reason == b"Bad Request"
    headers = list(response.headers)
    assert [value.lower() for value in header_values(headers, b"connection")] == [b"close"]
    assert header_values(headers, b"content-length") == [str(len(body)).encode()]
    assert header_values(headers, b"server") == [b"asyncwsgi"]
    assert body.startswith(b"400 Bad Request: ")
    assert excinfo.value.reason.encode() in body


def test_send_rejection_carries_a_date_header() -> None:
    """RFC 9110 section 6.6.1: an origin server with a clock MUST send Date in a 4xx."""
    conn = server()
    with pytest.raises(RequestRejected) as excinfo:
        conn.receive_data(b"GET / HTTP/1.1\nHost: x\n\n")
    data = conn.send_rejection(excinfo.value.status, excinfo.value.reason, date_header=DATE)  # type: ignore[call-arg]
    response, _ = parse_rejection(data)
    assert header_values(list(response.headers), b"date") == [DATE[1]]


def test_send_rejection_after_the_response_started_gives_nothing() -> None:
    client = h11.Connection(h11.CLIENT)
    conn = server()
    conn.receive_data(request_bytes(client))
    conn.send_response(200, b"OK", [], DATE)
    assert conn.send_rejection(400, "too late") == b""


def test_request_line_limit_gives_414() -> None:
    conn = server(limit_request_line=100)
    with pytest.raises(RequestRejected) as excinfo:
        conn.receive_data(b"GET /" + b"a" * 200)  # refused before the line is complete
    assert excinfo.value.status == 414
    response, _ = parse_rejection(conn.send_rejection(414, excinfo.value.reason))
    assert response.status_code == 414


def test_header_field_count_limit_gives_431() -> None:
    conn = server(limit_request_fields=3)
    fields = b"".join(b"X-%d: v\r\n" % i for i in range(4))
    with pytest.raises(RequestRejected) as excinfo:
        conn.receive_data(b"GET / HTTP/1.1\r\nHost: x\r\n" + fields + b"\r\n")
    assert excinfo.value.status == 431


def test_body_limit_gives_413_for_content_length_and_chunked() -> None:
    client = h11.Connection(h11.CLIENT)
    conn = server(limit_request_body=10)
    with pytest.raises(RequestRejected) as excinfo:
        conn.receive_data(request_bytes(client, "POST", "/", [("Content-Length", "11")], b"x" * 11))
    assert excinfo.value.status == 413

    conn = server(limit_request_body=10)
    events = conn.receive_data(
        b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n"
    )
    assert body_of(events) == b"hello"
    with pytest.raises(RequestRejected) as excinfo:
        conn.receive_data(b"6\r\nworld!\r\n0\r\n\r\n")
    assert excinfo.value.status == 413


def test_body_limit_counts_each_request_separately() -> None:
    client = h11.Connection(h11.CLIENT)
    conn = server(limit_request_body=10)
    for _ in range(3):
        events = conn.receive_data(
            request_bytes(client, "POST", "/", [("Content-Length", "8")], b"x" * 8)
        )
        assert body_of(events) == b"x" * 8
        client_events(client, respond(conn, b"", content_length=0))
        conn.start_next_cycle()
        client.start_next_cycle()


def test_reason_phrase() -> None:
    assert reason_phrase(200) == b"OK"
    assert reason_phrase(404) == b"Not Found"
    assert reason_phrase(599) == b""


def h11_headers(head: bytes) -> list[tuple[bytes, bytes]]:
    """Split a serialised response head into (name, value) pairs, names as sent."""
    lines = head.split(b"\r\n")
    assert lines[0].startswith(b"HTTP/1.1 ")
    assert head.endswith(b"\r\n\r\n")
    pairs: list[tuple[bytes, bytes]] = []
    for line in lines[1:]:
        if not line:
            break
        name, _, value = line.partition(b":")
        pairs.append((name, value.strip()))
    return pairs


def test_idle_connection_releases_its_h11_state_and_revives() -> None:
    """An idle keep-alive connection frees its h11 objects and parses the next request."""
    conn = server()
    (request, _end) = conn.receive_data(b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n")
    assert isinstance(request, Request)
    assert not conn.release_if_idle()  # a request is in flight
    conn.send_response(200, b"OK", [(b"Content-Length", b"1")], None)
    conn.send_data(b"x")
    assert conn.send_end() == b""
    conn.start_next_cycle()
    before = conn._conn
    assert conn.release_if_idle()
    assert not conn.has_unparsed_data
    events = conn.receive_data(b"GET /b HTTP/1.1\r\nHost: x\r\n\r\n")
    assert isinstance(events[0], Request)
    assert events[0].target == b"/b"
    assert conn._conn is not before


def test_connection_with_pipelined_bytes_is_not_released() -> None:
    conn = server()
    conn.receive_data(b"GET /a HTTP/1.1\r\nHost: x\r\n\r\nGET /b HTTP/1.1\r\n")
    conn.send_response(200, b"OK", [(b"Content-Length", b"0")], None)
    conn.send_end()
    conn.start_next_cycle()
    assert conn.has_unparsed_data
    assert not conn.release_if_idle()


def test_zero_limits_mean_no_limit() -> None:
    """``limit_request_*=0`` means no limit (gunicorn's meaning), where 0 used to mean 64 KiB."""
    line = b"GET /" + b"a" * (70 * 1024) + b" HTTP/1.1\r\n"
    fields = b"".join(b"X-%d: v\r\n" % i for i in range(150))
    head = line + b"Host: x\r\n" + fields + b"X-Big: " + b"b" * (70 * 1024) + b"\r\n\r\n"
    conn = server(
        limit_request_line=0,
        limit_request_fields=0,
        limit_request_field_size=0,
        limit_request_head=0,
    )
    events = conn.receive_data(head)
    assert len(first_request(events).target) == 70 * 1024 + 1
    with pytest.raises(RequestRejected) as excinfo:
        server().receive_data(head)
    assert excinfo.value.status == 414  # the defaults are limits


def test_error_response_during_shutdown_has_one_connection_close() -> None:
    """A server-made error (a 500 from the pool thread) answered while shutting down carries
    ``Connection: close`` once, not once from its head and once for the shutdown."""
    conn = server()
    conn.receive_data(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    head = error_response(500)
    data = conn.send_response(head.status, head.reason, head.headers, DATE, 22, close=True)
    assert header_values(h11_headers(data), b"connection") == [b"close"]
    assert [name for name, _ in h11_headers(data)] == [
        b"Content-Type",
        b"Connection",
        b"Content-Length",
        b"Date",
        b"Server",
    ]


# -- body payload past h11's buffer (asyncwsgi._h11.take_piece) ------------------------------

NEXT_REQUEST = b"GET /next HTTP/1.1\r\nHost: x\r\n\r\n"


def chunked_upload(chunks: Sequence[bytes], trailer: bytes = b"") -> bytes:
    """A chunked POST with one chunk per item (sizes in upper-case hex, one with an extension)."""
    head = b"POST /up HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
    framed = [
        b"%X%s\r\n%s\r\n" % (len(c), b";n=1" if i == 1 else b"", c) for i, c in enumerate(chunks)
    ]
    return head + b"".join(framed) + b"0\r\n" + trailer + b"\r\n"


def length_upload(body: bytes, length: int | None = None) -> bytes:
    """A POST with a Content-Length of ``length`` (by default, that of ``body``)."""
    if length is None:
        length = len(body)
    return b"POST /up HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % length + body


def summary(events: Iterable[Any]) -> list[Any]:
    """Events as comparable values, adjacent Data merged (how the payload is cut may differ)."""
    out: list[Any] = []
    for event in events:
        if type(event) is Data:
            if out and type(out[-1]) is bytearray:
                out[-1] += event.data
            else:
                out.append(bytearray(event.data))
        elif type(event) is Request:
            out.append((event.method, event.target, tuple(event.headers)))
        elif type(event) is EndOfMessage:
            out.append(("end", tuple(event.headers)))
        else:
            out.append(event)
    return out


def feed_pieces(pieces: Sequence[bytes], passing: bool, **options: Any) -> list[Any]:
    """Feed ``pieces`` one call each, answer, and start the next cycle: the summary of each
    call's events (``passing`` False: with every body byte through h11's buffer), then, when
    the data came with ``passing``, whether a Data event carried bytes that bypassed h11."""
    with pytest.MonkeyPatch.context() as patch:
        if not passing:
            patch.setattr(_h11, "PASS_BODY", False)
        conn = server(**options)
        calls: list[Any] = []
        bypassed = False
        for piece in pieces:
            try:
                events = conn.receive_data(piece)
            except RequestRejected as exc:
                calls.append(("rejected", exc.status))
                return calls
            bypassed = bypassed or any(type(e) is Data and type(e.data) is bytes for e in events)
            calls.append(summary(events))
        if conn.request_complete:
            respond(conn, b"ok")
            calls.append(summary(next_cycle(conn)))
        return [*calls, bypassed and passing]


def split(data: bytes, cuts: Iterable[int]) -> list[bytes]:
    points = [0, *sorted(set(cuts)), len(data)]
    return [data[a:b] for a, b in itertools.pairwise(points) if b > a]


def test_body_detection_follows_public_only_mode() -> None:
    # The installed h11 (pinned below 0.17) keeps its counts where _h11 expects them.
    assert _h11.PASS_BODY is not _h11.PUBLIC_ONLY


def test_body_detection_needs_h11s_buffer(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_h11, "PEEK_BUFFER", False)
    assert _h11._body_readers() is None


def test_content_length_body_is_the_bytes_received_not_a_copy() -> None:
    conn = server()
    assert [type(e) for e in conn.receive_data(length_upload(b"", 90000))] == [Request]
    payload = b"x" * 65536  # bytes as the event loop delivers them
    first = conn.receive_data(payload[:40000])
    (event,) = first
    assert type(event) is Data
    if _h11.PASS_BODY:
        assert type(event.data) is bytes
    rest = payload[40000:] + b"y" * (90000 - 65536)
    events = conn.receive_data(rest)
    if _h11.PASS_BODY:
        assert events[0].data is rest  # the very object: no copy at all
    assert [type(e) for e in events] == [Data, EndOfMessage]
    assert body_of(first + events) == payload + b"y" * (90000 - 65536)


def test_chunk_payload_is_the_bytes_received_not_a_copy() -> None:
    conn = server()
    events = conn.receive_data(chunked_upload([])[:-5] + b"10000\r\n")
    assert [type(e) for e in events] == [Request]
    payload = b"z" * 0x10000
    (event,) = conn.receive_data(payload)
    if _h11.PASS_BODY:
        assert event.data is payload
    events = conn.receive_data(b"\r\n0\r\n\r\n")
    assert [type(e) for e in events] == [EndOfMessage]
    assert bytes(event.data) == payload


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_body_bytes_never_include_a_pipelined_request(chunked: bool) -> None:
    body = b"0123456789" * 30
    upload = chunked_upload([body[:100], body[100:]]) if chunked else length_upload(body)
    head_end = upload.index(b"\r\n\r\n") + 4
    conn = server()
    events = conn.receive_data(upload[:head_end])
    events += conn.receive_data(upload[head_end:] + NEXT_REQUEST)  # one read: body, then more
    assert [type(e) for e in events if type(e) is not Data] == [Request, EndOfMessage, type(PAUSED)]
    assert body_of(events) == body
    respond(conn, b"ok")
    after = next_cycle(conn)
    assert first_request(after).target == b"/next"
    assert [type(e) for e in after] == [Request, EndOfMessage]


#: Uploads, each followed by a pipelined request, in every framing the fast path handles.
UPLOADS = [
    length_upload(b"hello\r\n\r\nworld"),
    chunked_upload([b"ab", b"c\r\nd", b"e" * 5]),
    chunked_upload([b"one", b"two"], trailer=b"X-Sum: 6\r\n"),
]


@pytest.mark.parametrize("upload", UPLOADS, ids=["content-length", "chunked", "trailers"])
def test_body_split_at_every_pair_of_points_gives_the_same_events(upload: bytes) -> None:
    data = upload + NEXT_REQUEST
    bypassed = False
    for first in range(len(data)):
        for second in range(first, len(data)):
            pieces = split(data, (first, second))
            reference = feed_pieces(pieces, passing=False)
            passing = feed_pieces(pieces, passing=True)
            assert passing[:-1] == reference[:-1], pieces
            bypassed = bypassed or passing[-1]
    assert bypassed is _h11.PASS_BODY  # the fast path ran (where h11 allows it)


@settings(max_examples=300, deadline=None)
@given(
    body=st.binary(max_size=400),
    chunked=st.booleans(),
    data=st.data(),
)
def test_any_body_split_anywhere_gives_exactly_its_bytes(
    body: bytes, chunked: bool, data: st.DataObject
) -> None:
    if chunked:
        cuts = sorted(data.draw(st.lists(st.integers(0, len(body)), max_size=6)))
        upload = chunked_upload([c for c in split(body, cuts)])
    else:
        upload = length_upload(body)
    stream = upload + NEXT_REQUEST
    pieces = split(stream, data.draw(st.lists(st.integers(0, len(stream)), max_size=12)))
    passing = feed_pieces(pieces, passing=True)
    assert passing[:-1] == feed_pieces(pieces, passing=False)[:-1]
    flat = [item for call in passing[:-1] for item in call]
    received = b"".join(bytes(item) for item in flat if type(item) is bytearray)
    assert received == body
    assert [item[1] for item in flat if type(item) is tuple and item[0] != "end"] == [
        b"/up",
        b"/next",
    ]


def test_body_limit_applies_to_chunk_payload_that_bypasses_h11() -> None:
    # (A Content-Length over the limit is refused with the head, before any payload.)
    conn = server(limit_request_body=100)
    conn.receive_data(chunked_upload([])[:-5] + b"C8\r\n")  # a chunk of 200 bytes
    assert body_of(conn.receive_data(b"x" * 60)) == b"x" * 60  # within the limit
    with pytest.raises(RequestRejected) as excinfo:
        conn.receive_data(b"x" * 60)
    assert excinfo.value.status == 413
    with pytest.raises(RequestRejected):  # and on every later call
        conn.receive_data(b"x")
