"""Hold many connections open against a server, for the ``idle`` and ``slowloris`` scenarios.

    python idle_clients.py idle --port 8000 --count 10000 --max-seconds 120
    python idle_clients.py slowloris --port 8000 --count 1000 --max-seconds 120

``idle``: every connection sends one keep-alive ``GET /``, reads the response and then stays
open without sending anything. ``slowloris``: every connection sends a request head one byte per
second, padded so that it never completes within the test; a connection the server drops is
opened again.

Protocol with the harness, one line each on stdout: ``READY {json}`` once every connection has
been tried (or the connect phase ran out of time), then ``DONE {json}`` after a line (or EOF)
on stdin, or after ``--max-seconds`` at the latest. Connections are then reset (SO_LINGER 0), so
that no TIME_WAIT sockets are left behind to use up local ports.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import resource
import socket
import struct
import sys
import time
from dataclasses import asdict, dataclass

IDLE_REQUEST = b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nUser-Agent: idle-client\r\n\r\n"
SLOW_HEAD = (
    b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nUser-Agent: slow-client\r\nX-Padding: "
    + b"a" * 400
    + b"\r\n\r\n"
)


@dataclass
class Counters:
    """What the clients saw; reported in the READY and DONE lines."""

    attempted: int = 0
    connected: int = 0
    answered: int = 0
    failed: int = 0
    open_now: int = 0
    closed_by_server: int = 0
    reconnects: int = 0
    answered_slow: int = 0


def raise_nofile_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit; return the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
    return soft


def abort(writer: asyncio.StreamWriter) -> None:
    """Close with a reset instead of a FIN, so the socket skips TIME_WAIT."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


async def read_response(reader: asyncio.StreamReader) -> None:
    """Read one response with a Content-Length body; raise on anything else."""
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value.strip())
    if not head.startswith(b"HTTP/1.") or length <= 0:
        raise ValueError("unexpected response")
    await reader.readexactly(length)


class Clients:
    """The connections of one run, sharing their counters and a stop event."""

    def __init__(self, host: str, port: int, timeout_s: float) -> None:
        self.host = host
        self.port = port
        self.timeout_s = timeout_s
        self.counters = Counters()
        self.stop = asyncio.Event()
        #: Set once every idle connection has been answered or has failed.
        self.settled = asyncio.Event()
        #: Set once every slow client has connected once.
        self.all_connected = asyncio.Event()
        self.expected = 0
        #: Idle connections still connecting or waiting for their response.
        self.connecting: set[asyncio.Task[None]] = set()

    def _check_settled(self) -> None:
        counters = self.counters
        if counters.answered + counters.failed >= self.expected:
            self.settled.set()

    def abandon_connecting(self) -> None:
        """End the connect phase: give up on connections not answered yet."""
        for task in list(self.connecting):
            task.cancel()

    async def idle_one(self, connect_limit: asyncio.Semaphore) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.connecting.add(task)
        try:
            await self._idle_one(connect_limit)
        except asyncio.CancelledError:
            if task in self.connecting:
                self.counters.failed += 1
            raise
        finally:
            self.connecting.discard(task)

    async def _idle_one(self, connect_limit: asyncio.Semaphore) -> None:
        counters = self.counters
        counters.attempted += 1
        async with connect_limit:
            try:
                async with asyncio.timeout(self.timeout_s):
                    reader, writer = await asyncio.open_connection(self.host, self.port)
                    counters.connected += 1
                    writer.write(IDLE_REQUEST)
                    await read_response(reader)
            except (OSError, ValueError, TimeoutError, asyncio.IncompleteReadError):
                counters.failed += 1
                self._check_settled()
                return
        counters.answered += 1
        self._check_settled()
        counters.open_now += 1
        task = asyncio.current_task()
        if task is not None:
            self.connecting.discard(task)
        stop_task = asyncio.create_task(self.stop.wait())
        read_task = asyncio.create_task(reader.read(1))
        await asyncio.wait({stop_task, read_task}, return_when=asyncio.FIRST_COMPLETED)
        if read_task.done():
            counters.closed_by_server += 1
        stop_task.cancel()
        read_task.cancel()
        counters.open_now -= 1
        abort(writer)

    async def slow_one(self) -> None:
        counters = self.counters
        first = True
        await asyncio.sleep(random.random())
        while not self.stop.is_set():
            counters.attempted += 1
            if not first:
                counters.reconnects += 1
            try:
                reader, writer = await asyncio.wait_for(
                    asyncio.open_connection(self.host, self.port), self.timeout_s
                )
            except (OSError, TimeoutError):
                counters.failed += 1
                await asyncio.sleep(1.0)
                continue
            if first:
                counters.connected += 1
                first = False
                if counters.connected >= self.expected:
                    self.all_connected.set()
            counters.open_now += 1
            try:
                await self._drip(reader, writer)
            finally:
                counters.open_now -= 1
                abort(writer)

    async def _drip(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Send SLOW_HEAD one byte a second until stopped or the server gives up on us."""
        for index in range(len(SLOW_HEAD)):
            if self.stop.is_set():
                return
            try:
                writer.write(SLOW_HEAD[index : index + 1])
                data = await asyncio.wait_for(reader.read(4096), timeout=1.0)
            except TimeoutError:
                continue
            except OSError:
                self.counters.closed_by_server += 1
                return
            if data:
                self.counters.answered_slow += 1
            else:
                self.counters.closed_by_server += 1
            return


def report(tag: str, counters: Counters, started: float) -> None:
    payload = asdict(counters)
    payload["elapsed_s"] = round(time.monotonic() - started, 3)
    print(f"{tag} {json.dumps(payload)}", flush=True)


async def wait_for_stdin_line() -> None:
    """Return once stdin has a line or is closed (no thread: the loop watches the fd)."""
    loop = asyncio.get_running_loop()
    ready = asyncio.Event()
    fd = sys.stdin.fileno()
    loop.add_reader(fd, ready.set)
    try:
        await ready.wait()
    finally:
        loop.remove_reader(fd)


async def run(args: argparse.Namespace) -> None:
    started = time.monotonic()
    clients = Clients(args.host, args.port, args.timeout)
    clients.expected = args.count
    tasks: list[asyncio.Task[None]] = []
    try:
        async with asyncio.timeout(args.max_seconds):
            if args.mode == "idle":
                limit = asyncio.Semaphore(args.concurrency)
                tasks = [asyncio.create_task(clients.idle_one(limit)) for _ in range(args.count)]
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(clients.settled.wait(), args.connect_phase)
                clients.abandon_connecting()
            else:
                tasks = [asyncio.create_task(clients.slow_one()) for _ in range(args.count)]
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(clients.all_connected.wait(), args.connect_phase)
                # Let every client send a few bytes before measuring.
                await asyncio.sleep(2.0)
            report("READY", clients.counters, started)
            await wait_for_stdin_line()
    except TimeoutError:
        pass
    clients.stop.set()
    report("DONE", clients.counters, started)
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=("idle", "slowloris"))
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--count", type=int, default=10_000)
    parser.add_argument("--concurrency", type=int, default=256, help="connects in flight")
    parser.add_argument("--timeout", type=float, default=5.0, help="per connect+response, s")
    parser.add_argument("--connect-phase", type=float, default=45.0, help="connect phase cap, s")
    parser.add_argument("--max-seconds", type=float, default=180.0, help="hard cap on the run, s")
    args = parser.parse_args(argv)
    raise_nofile_limit()
    asyncio.run(run(args))


if __name__ == "__main__":
    main()
