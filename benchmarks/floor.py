"""The floor: what the kernel, the event loop and h11 cost per request, with nothing else around.

    python floor.py uvloop --port 8000 [--host 127.0.0.1] [--backlog 2048]
    python floor.py h11 --port 8000 [--host 127.0.0.1] [--backlog 2048]

Two reference servers for the ``hello`` scenario, each one ``asyncio.Protocol`` on a uvloop
event loop in a single thread. Both answer every request with the bytes asyncwsgi sends for
``apps:hello`` (status line, ``Content-Type``, ``Content-Length``, ``Date``, ``Server`` and the
13-byte body), so the bytes on the wire are the same and only the work behind them differs:

- ``uvloop``: no HTTP parsing at all. Each end of a request head (``CRLF CRLF``) in the bytes
  received is answered with the fixed response; pipelined requests are answered with one
  ``write``. This is the kernel and event-loop cost of a request.
- ``h11``: a real ``h11.Connection(h11.SERVER)`` per connection parses each request (RFC 9112)
  and serialises the response (``h11.Response`` + ``h11.Data`` + ``h11.EndOfMessage``, then
  ``start_next_cycle`` for keep-alive). The same loop plus h11, and nothing of a WSGI server.

Neither runs a WSGI application: the benchmark harness runs them on ``hello`` only, and the
difference between asyncwsgi's server CPU per request and ``h11``'s is asyncwsgi's own
overhead (the thread hand-off, the environ, the WSGI call).

The ``Date`` header (RFC 9110 section 6.6.1) is rebuilt once a second by a loop timer, as a
server caches it; it costs nothing per request.
"""

from __future__ import annotations

import argparse
import asyncio
import email.utils
import socket
import time
from collections.abc import Callable
from typing import cast

import h11
import uvloop

BODY = b"Hello, world!"
#: The head asyncwsgi sends for ``apps:hello``, in its order and letter case, less the Date.
HEAD_BEFORE_DATE: list[tuple[bytes, bytes]] = [
    (b"Content-Type", b"text/plain"),
    (b"Content-Length", str(len(BODY)).encode("ascii")),
]
HEAD_AFTER_DATE: list[tuple[bytes, bytes]] = [(b"Server", b"asyncwsgi")]
END_OF_HEAD = b"\r\n\r\n"
#: A request head that has not ended after this many bytes closes the connection (bytes).
MAX_HEAD_BYTES = 64 * 1024
TUNED_BACKLOG = 2048


class Hello:
    """The hello response, its ``Date`` header refreshed once a second on the loop's thread.

    Attributes:
        headers: the response header fields for h11, ``[(name, value)]`` as bytes.
        response: the whole response (head and body) as it goes on the wire, bytes.
    """

    def __init__(self) -> None:
        self.headers: list[tuple[bytes, bytes]] = []
        self.response = b""
        self.refresh()

    def refresh(self) -> None:
        date = email.utils.formatdate(usegmt=True).encode("ascii")
        self.headers = [*HEAD_BEFORE_DATE, (b"Date", date), *HEAD_AFTER_DATE]
        lines = [b"HTTP/1.1 200 OK"] + [name + b": " + value for name, value in self.headers]
        self.response = b"\r\n".join(lines) + END_OF_HEAD + BODY

    def keep_fresh(self, loop: asyncio.AbstractEventLoop) -> None:
        """Refresh now, and again just after the next second begins (a loop timer)."""
        self.refresh()
        loop.call_later(1.0 - time.time() % 1.0 + 0.001, self.keep_fresh, loop)


class FixedResponseProtocol(asyncio.Protocol):
    """Answers each request head ended by ``CRLF CRLF`` with the fixed hello bytes."""

    def __init__(self, hello: Hello) -> None:
        self.hello = hello
        self.transport: asyncio.Transport | None = None
        self.pending = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's TCPTransport implements asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        assert self.transport is not None
        received = self.pending + data if self.pending else data
        count = received.count(END_OF_HEAD)
        if count:
            self.transport.write(self.hello.response * count)
            received = received[received.rindex(END_OF_HEAD) + len(END_OF_HEAD) :]
        if len(received) > MAX_HEAD_BYTES:
            self.transport.close()
        self.pending = received


class H11Protocol(asyncio.Protocol):
    """Parses each request with h11 and serialises the hello response with it."""

    def __init__(self, hello: Hello) -> None:
        self.hello = hello
        self.transport: asyncio.Transport | None = None
        self.conn = h11.Connection(h11.SERVER)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's TCPTransport implements asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        transport, conn = self.transport, self.conn
        assert transport is not None
        conn.receive_data(data)
        out: list[bytes] = []
        close = False
        try:
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    break
                if type(event) is h11.EndOfMessage:
                    out.append(self.respond(conn))
                    if conn.our_state is h11.MUST_CLOSE:
                        close = True
                        break
                    conn.start_next_cycle()
                elif type(event) is h11.ConnectionClosed or event is h11.PAUSED:
                    close = True
                    break
        except h11.ProtocolError:
            close = True
        if out:
            transport.write(b"".join(out))
        if close:
            transport.close()

    def respond(self, conn: h11.Connection) -> bytes:
        head = conn.send(h11.Response(status_code=200, headers=self.hello.headers, reason=b"OK"))
        body = conn.send(h11.Data(data=BODY))
        tail = conn.send(h11.EndOfMessage())
        return (head or b"") + (body or b"") + (tail or b"")


PROTOCOLS: dict[str, Callable[[Hello], asyncio.Protocol]] = {
    "uvloop": FixedResponseProtocol,
    "h11": H11Protocol,
}


async def serve(kind: str, host: str, port: int, backlog: int) -> None:
    loop = asyncio.get_running_loop()
    hello = Hello()
    hello.keep_fresh(loop)
    factory = PROTOCOLS[kind]
    # A socket bound here, not a host name: libuv resolves names on its thread pool, and the
    # floor runs no thread but the loop's.
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    server = await loop.create_server(lambda: factory(hello), sock=sock, backlog=backlog)
    print(f"floor-{kind} listening at http://{host}:{port}", flush=True)
    async with server:
        await server.serve_forever()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("kind", choices=sorted(PROTOCOLS))
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--backlog", type=int, default=TUNED_BACKLOG)
    args = parser.parse_args(argv)
    uvloop.run(serve(args.kind, args.host, args.port, args.backlog))


if __name__ == "__main__":
    main()
