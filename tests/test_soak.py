"""Soak test: a few hundred concurrent clients that misbehave in the usual ways, against a mix of
applications, bounded in time.

Clients (asyncio, one task each, behaviour drawn from a seeded random generator) make keep-alive
requests in a row, pipeline several at once, read slowly in small pieces, upload bodies, and go
away at random points: mid-download, mid-upload, before reading anything. The applications
stream generator bodies, use ``write()``, echo uploads and send files with ``sendfile``; every
body they produce is a pure function of the request, so the client checks each complete
response byte for byte (decoded with h11, which checks the framing too).

Afterwards, once every connection has closed and every worker call has returned: nothing was
logged as an error (a client going away is not one), each result
the applications returned has been closed exactly once, no request is counted in progress, the
process has the file descriptors it had before the clients, and, once the server has stopped,
the threads it had before it started.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import threading
import typing
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import h11

from .helpers import TIMEOUT, running
from .logwatch import watch_errors

CLIENTS = 300
SEED = 20261123
THREADS = 16
#: The whole soak must finish within this (it takes a few seconds).
SOAK_LIMIT = 60.0

Environ = dict[str, Any]


def stream_body(seed: int, count: int, size: int) -> Iterator[bytes]:
    """``count`` chunks of ``size`` bytes, each saying which seed and index it is."""
    for index in range(count):
        yield (b"%d:%d;" % (seed, index)).ljust(size, b".")


class Apps:
    """The applications, behind one router, counting results made and closed. Any thread."""

    def __init__(self, file_path: Path) -> None:
        self.file_path = file_path
        self.lock = threading.Lock()
        self.made = 0
        self.closed = 0

    def made_one(self) -> None:
        with self.lock:
            self.made += 1

    def closed_one(self) -> None:
        with self.lock:
            self.closed += 1

    def __call__(self, environ: Environ, start_response: Any) -> Iterable[bytes]:
        path = environ["PATH_INFO"]
        query = {k: int(v[0]) for k, v in parse_qs(environ["QUERY_STRING"]).items()}
        if path == "/hello":
            start_response("200 OK", [("Content-Type", "text/plain")])
            return [b"Hello, soak!"]
        if path == "/stream":
            start_response("200 OK", [("Content-Type", "application/octet-stream")])
            return _Counted(self, stream_body(query["seed"], query["n"], query["size"]))
        if path == "/write":
            write = start_response("200 OK", [("Content-Type", "application/octet-stream")])
            for chunk in stream_body(query["seed"], query["n"], query["size"]):
                write(chunk)
            return _Counted(self, iter(()))
        if path == "/echo":
            body = environ["wsgi.input"].read()
            start_response("200 OK", [("Content-Length", str(len(body)))])
            return _Counted(self, iter([body]))
        if path == "/file":
            start_response("200 OK", [("Content-Length", str(self.file_path.stat().st_size))])
            self.made_one()
            return environ["wsgi.file_wrapper"](_CountedFile(self, self.file_path))  # type: ignore[no-any-return]
        start_response("404 Not Found", [("Content-Length", "0")])
        return []


class _Counted:
    def __init__(self, apps: Apps, chunks: Iterator[bytes]) -> None:
        apps.made_one()
        self.apps = apps
        self.chunks = chunks

    def __iter__(self) -> Iterator[bytes]:
        return self.chunks

    def close(self) -> None:
        self.apps.closed_one()


class _CountedFile:
    def __init__(self, apps: Apps, path: Path) -> None:
        self.apps = apps
        self.file = open(path, "rb")  # noqa: SIM115 - closed through the file wrapper

    def read(self, size: int = -1) -> bytes:
        return self.file.read(size)

    def fileno(self) -> int:
        return self.file.fileno()

    def tell(self) -> int:
        return self.file.tell()

    def seek(self, *args: int) -> int:
        return self.file.seek(*args)

    def close(self) -> None:
        self.file.close()
        self.apps.closed_one()


class Client:
    """One connection: raw requests out, responses decoded by an h11 client."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.h11 = h11.Connection(h11.CLIENT)

    @classmethod
    async def connect(cls, port: int) -> Client:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        return cls(reader, writer)

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def response(
        self, method: str = "GET", piece: int = 65536, pace: float = 0.0, stop_after: int = -1
    ) -> tuple[int, bytes] | None:
        """Read one response; None when ``stop_after`` body bytes came first (then give up)."""
        conn = self.h11
        if conn.our_state is h11.IDLE:  # h11 tracks the exchange; the bytes went out raw
            conn.send(h11.Request(method=method, target="/", headers=[("Host", "t")]))
            conn.send(h11.EndOfMessage())
        status = 0
        body = bytearray()
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                data = await asyncio.wait_for(self.reader.read(piece), TIMEOUT)
                conn.receive_data(data)
                if pace:
                    await asyncio.sleep(pace)  # a slow reader: pacing, not waiting for anything
                continue
            if isinstance(event, h11.Response):
                status = event.status_code
            elif isinstance(event, h11.Data):
                body += event.data
                if 0 <= stop_after <= len(body):
                    return None
            elif isinstance(event, h11.EndOfMessage):
                if conn.our_state is h11.DONE and conn.their_state is h11.DONE:
                    conn.start_next_cycle()
                return status, bytes(body)
            else:
                raise AssertionError(f"unexpected {event!r}")

    def abort(self) -> None:
        typing.cast(asyncio.Transport, self.writer.transport).abort()

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(OSError):
            await self.writer.wait_closed()


def get(target: str, close: bool = False) -> bytes:
    connection = b"Connection: close\r\n" if close else b""
    return b"GET %s HTTP/1.1\r\nHost: t\r\n%s\r\n" % (target.encode(), connection)


def post(target: str, body: bytes, length: int | None = None) -> bytes:
    size = len(body) if length is None else length
    return b"POST %s HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n\r\n%s" % (
        target.encode(),
        size,
        body,
    )


class Soak:
    """The clients' behaviours; counts completed responses, all checked."""

    def __init__(self, port: int, file_bytes: bytes) -> None:
        self.port = port
        self.file_bytes = file_bytes
        self.completed = 0
        self.aborted = 0

    def request(self, rng: random.Random) -> tuple[bytes, str, bytes]:
        """A random request: (bytes to send, method, expected body)."""
        kind = rng.choice(["hello", "stream", "write", "echo", "file"])
        if kind == "hello":
            return get("/hello"), "GET", b"Hello, soak!"
        if kind in ("stream", "write"):
            seed, count, size = rng.randrange(10**6), rng.randint(1, 40), rng.randint(16, 8192)
            target = f"/{kind}?seed={seed}&n={count}&size={size}"
            return get(target), "GET", b"".join(stream_body(seed, count, size))
        if kind == "echo":
            body = rng.randbytes(rng.randint(0, 200_000))
            return post("/echo", body), "POST", body
        return get("/file"), "GET", self.file_bytes

    def check(self, reply: tuple[int, bytes] | None, expected: bytes) -> None:
        assert reply is not None
        status, body = reply
        assert status == 200
        assert body == expected
        self.completed += 1

    async def keep_alive(self, rng: random.Random) -> None:
        client = await Client.connect(self.port)
        for _ in range(rng.randint(1, 4)):
            data, method, expected = self.request(rng)
            await client.send(data)
            self.check(await client.response(method), expected)
        await client.close()

    async def pipeline(self, rng: random.Random) -> None:
        client = await Client.connect(self.port)
        batch = [self.request(rng) for _ in range(rng.randint(2, 5))]
        await client.send(b"".join(data for data, _, _ in batch))
        for _, method, expected in batch:
            self.check(await client.response(method), expected)
        await client.close()

    async def slow_reader(self, rng: random.Random) -> None:
        client = await Client.connect(self.port)
        seed, count = rng.randrange(10**6), rng.randint(50, 200)
        await client.send(get(f"/stream?seed={seed}&n={count}&size=4096"))
        reply = await client.response(piece=rng.choice([512, 4096]), pace=0.001)
        self.check(reply, b"".join(stream_body(seed, count, 4096)))
        await client.close()

    async def leave_mid_download(self, rng: random.Random) -> None:
        client = await Client.connect(self.port)
        kind = rng.choice(["stream", "write", "file"])
        target = "/file" if kind == "file" else f"/{kind}?seed=1&n=100000&size=16384"
        await client.send(get(target))
        stop_after = rng.choice([0, 1, 100_000])
        assert await client.response(stop_after=stop_after) is None
        client.abort()
        self.aborted += 1

    async def leave_mid_upload(self, rng: random.Random) -> None:
        client = await Client.connect(self.port)
        await client.send(post("/echo", rng.randbytes(rng.randint(0, 300_000)), 10_000_000))
        client.abort()
        self.aborted += 1

    async def leave_before_reading(self, rng: random.Random) -> None:
        client = await Client.connect(self.port)
        data, _, _ = self.request(rng)
        await client.send(data)
        client.abort()
        self.aborted += 1

    async def run_client(self, index: int) -> None:
        rng = random.Random(SEED + index)
        behaviour = rng.choice(
            [
                self.keep_alive,
                self.keep_alive,
                self.pipeline,
                self.slow_reader,
                self.leave_mid_download,
                self.leave_mid_upload,
                self.leave_before_reading,
            ]
        )
        await behaviour(rng)


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


async def quiesce(state: Any, threads: int) -> None:
    """Wait until every connection has closed and every worker call has returned."""
    idle = state.idle_changed
    while state.channels:
        idle.clear()
        await asyncio.wait_for(idle.wait(), TIMEOUT)
    # One call per thread, meeting at a barrier: they can all run only once every call
    # queued before them has returned.
    barrier = threading.Barrier(threads + 1)
    for _ in range(threads):
        state.pool.submit(barrier.wait, TIMEOUT)
    await asyncio.to_thread(barrier.wait, TIMEOUT)


async def test_soak(tmp_path: Path) -> None:
    file_path = tmp_path / "file.bin"
    file_bytes = random.Random(SEED).randbytes(512 * 1024)
    file_path.write_bytes(file_bytes)
    apps = Apps(file_path)
    threads_before = set(threading.enumerate())
    with watch_errors() as log:
        async with running(
            apps, threads=THREADS, write_high_water=64 * 1024, access_log=False, timeout_write=10.0
        ) as srv:
            state = srv.server.state
            soak = Soak(srv.port, file_bytes)
            await soak.keep_alive(random.Random(SEED))  # warm up the loop and the pool
            await quiesce(state, THREADS)
            fds_before = open_fds()
            await asyncio.wait_for(
                asyncio.gather(*(soak.run_client(i) for i in range(CLIENTS))), SOAK_LIMIT
            )
            await quiesce(state, THREADS)
            assert state.requests_active == 0
            assert open_fds() == fds_before
            with apps.lock:
                assert apps.made == apps.closed, (apps.made, apps.closed)
    # Clients going away are not errors: nothing at ERROR level.
    assert not log.errors(), [r.getMessage() for r in log.errors()]
    assert soak.completed > CLIENTS  # most clients completed responses
    assert soak.aborted > CLIENTS // 10
    leftover = [t for t in threading.enumerate() if t not in threads_before and t.is_alive()]
    assert not [t for t in leftover if t.name.startswith("asyncwsgi")], leftover
