"""Test helpers: a server on 127.0.0.1:0 in the test loop, raw-socket clients, h11 decoding."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import h11

from asyncwsgi import Config, Server

TIMEOUT = 10.0


@dataclass
class Running:
    """A started server: its object, port and base URL."""

    server: Server
    port: int
    url: str


@contextlib.asynccontextmanager
async def running(app: Callable[..., Any], **options: Any) -> AsyncIterator[Running]:
    """Start ``app`` on 127.0.0.1:0 in the running loop; shut it down (gracefully) on exit."""
    options.setdefault("host", "127.0.0.1")
    options.setdefault("port", 0)
    options.setdefault("access_log", True)
    server = Server(app, Config(**options))
    await server.start()
    port = server.addresses[0][1]
    try:
        yield Running(server, port, f"http://127.0.0.1:{port}")
    finally:
        await asyncio.wait_for(server.shutdown(options.get("timeout_graceful_shutdown", 5.0)), 30)


async def exchange(port: int, data: bytes, *, until_close: bool = True) -> bytes:
    """Send raw ``data`` and return everything received until the server closes."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        if until_close:
            return await asyncio.wait_for(reader.read(-1), TIMEOUT)
        return await asyncio.wait_for(reader.read(65536), TIMEOUT)
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


@dataclass
class Reply:
    """One decoded response."""

    status: int
    headers: dict[str, str]
    body: bytes
    raw_headers: list[tuple[bytes, bytes]] = field(default_factory=list)


def decode_replies(data: bytes, method: bytes = b"GET", count: int = 64) -> list[Reply]:
    """Decode up to ``count`` responses from ``data`` with an h11 client (strict framing)."""
    replies: list[Reply] = []
    client = h11.Connection(h11.CLIENT)
    client.receive_data(data)
    client.receive_data(b"")
    for _ in range(count):
        if client.our_state is not h11.IDLE or not client.trailing_data[0]:
            break
        client.send(h11.Request(method=method, target=b"/", headers=[(b"host", b"x")]))
        client.send(h11.EndOfMessage())
        reply: Reply | None = None
        while True:
            event = client.next_event()
            if isinstance(event, h11.InformationalResponse):
                continue
            if isinstance(event, h11.Response):
                reply = Reply(
                    event.status_code,
                    {k.decode(): v.decode("latin-1") for k, v in event.headers},
                    b"",
                    list(event.headers),
                )
            elif isinstance(event, h11.Data):
                assert reply is not None
                reply.body += bytes(event.data)
            elif isinstance(event, h11.EndOfMessage):
                assert reply is not None
                replies.append(reply)
                break
            elif event is h11.NEED_DATA or isinstance(event, h11.ConnectionClosed):
                return replies
        if h11.MUST_CLOSE in (client.their_state, client.our_state):
            break
        try:
            client.start_next_cycle()
        except h11.LocalProtocolError:
            break
    return replies
