"""The invariants every cell of the fault matrix is checked against, one checker each.

A checker raises :class:`AssertionError` with a message naming the cell, the invariant, what was
expected and what was found, so a failing cell reads as one line in the report.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import h11

#: Seconds a shutdown or a reload may overrun its own timeout.
SLACK = 3.0


def fail(cell: str, invariant: str, expected: object, got: object) -> None:
    """Raise the one-line report of a broken invariant."""
    raise AssertionError(f"[{cell}] {invariant}: expected {expected}, got {got}")


# -- processes, threads and file descriptors ------------------------------------------------------


def open_fds(pid: int | str = "self") -> dict[int, str]:
    """The open file descriptors of ``pid`` (Linux ``/proc``), each with what it points to."""
    fds: dict[int, str] = {}
    base = f"/proc/{pid}/fd"
    for name in os.listdir(base):
        try:
            fds[int(name)] = os.readlink(f"{base}/{name}")
        except OSError:
            continue  # closed meanwhile (the listdir handle itself)
    return fds


def check_no_fd_leak(cell: str, before: dict[int, str], pid: int | str = "self") -> None:
    """No descriptor is open now that was not open before the cell (sockets, files, pipes)."""
    after = open_fds(pid)
    leaked = {fd: target for fd, target in after.items() if before.get(fd) != target}
    if leaked:
        fail(cell, "no fd leak", "no new file descriptors", leaked)


def check_no_thread_leak(cell: str, before: set[int], deadline: float = 5.0) -> None:
    """Every thread started during the cell has ended (pool threads end at shutdown)."""
    end = time.monotonic() + deadline
    # The loop's default executor threads (``asyncio_N``) live as long as the loop.
    new = [
        t
        for t in threading.enumerate()
        if t.ident not in before
        and t is not threading.current_thread()
        and not t.name.startswith("asyncio_")
    ]
    for thread in new:
        thread.join(max(0.0, end - time.monotonic()))
    alive = [t.name for t in new if t.is_alive()]
    if alive:
        fail(cell, "no thread leak", "every new thread ended", f"still running: {alive}")


def process_state(pid: int) -> str | None:
    """The one-letter state of ``pid`` (``R``, ``S``, ``Z``...), or None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[0]


def alive(pid: int) -> bool:
    """Whether ``pid`` exists and is not a zombie."""
    return process_state(pid) not in (None, "Z")


def children(pid: int) -> set[int]:
    """The live (non-zombie) children of ``pid``, from ``/proc/*/stat`` (no psutil)."""
    found: set[int] = set()
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            found.add(int(name))
    return found


def check_no_child_leak(cell: str, pids: Iterable[int], deadline: float = 5.0) -> None:
    """None of ``pids`` (workers ever started) is still running once the server has exited."""
    pids = set(pids)
    end = time.monotonic() + deadline
    while time.monotonic() < end and any(alive(pid) for pid in pids):
        time.sleep(0.02)  # polling an external process's state, bounded by the deadline
    left = sorted(pid for pid in pids if alive(pid))
    if left:
        fail(cell, "no child-process leak", "every worker gone after the server exited", left)


def check_worker_count(
    cell: str, supervisor: int, workers: int, deadline: float = 10.0
) -> set[int]:
    """The supervisor's live children converge to ``workers``; return them."""
    end = time.monotonic() + deadline
    seen = children(supervisor)
    while len(seen) != workers and time.monotonic() < end:
        time.sleep(0.02)  # polling an external process's state, bounded by the deadline
        seen = children(supervisor)
    if len(seen) != workers:
        fail(cell, "worker count converges to --workers", workers, f"{len(seen)} ({sorted(seen)})")
    return seen


# -- the application's side ----------------------------------------------------------------------


class CloseCounter:
    """Counts ``close()`` calls of one application result."""

    def __init__(self, label: str) -> None:
        self.label = label
        self.closes = 0
        self.closed = threading.Event()

    def close(self) -> None:
        self.closes += 1
        self.closed.set()


def check_close_once(cell: str, results: list[CloseCounter], deadline: float = 5.0) -> None:
    """PEP 3333: ``close()`` of every result the application returned ran exactly once."""
    end = time.monotonic() + deadline
    for result in results:
        result.closed.wait(max(0.0, end - time.monotonic()))
    wrong = {r.label: r.closes for r in results if r.closes != 1}
    if wrong:
        fail(cell, "close() called exactly once", "1 per result", wrong)


def check_no_call_for_gone(cell: str, calls: list[tuple[str, bool]]) -> None:
    """The application is never called for a request whose connection is already cut."""
    gone = [path for path, disconnected in calls if disconnected]
    if gone:
        fail(cell, "no application call for a cut connection", "none", gone)


def check_threads_survive(cell: str, deaths: list[str]) -> None:
    """No pool thread ended with an exception the application raised."""
    if deaths:
        fail(cell, "pool threads survive the application's exceptions", "no thread died", deaths)


def check_memory_bounded(cell: str, peak: int, bound: int) -> None:
    """The server's unsent output for one connection stays below ``bound`` bytes."""
    if peak > bound:
        fail(cell, "connection memory bounded", f"<= {bound} bytes buffered", f"{peak} bytes")


def check_within(cell: str, what: str, elapsed: float, timeout: float) -> None:
    """``what`` (a shutdown, a reload) returned within its timeout plus :data:`SLACK`."""
    if elapsed > timeout + SLACK:
        fail(
            cell,
            f"{what} returns within its timeout + {SLACK:g} s",
            f"<= {timeout + SLACK:.1f} s",
            f"{elapsed:.2f} s",
        )


# -- the client's side: responses, framing, desync -----------------------------------------------


@dataclass
class Expect:
    """What a request should be answered with: ``body`` exactly with status 200, or (for
    ``body=None``, or any response with status >= 400) an error response of any body."""

    label: str
    body: bytes | None


@dataclass
class Received:
    """One response as read: its status, body bytes so far, and whether its message ended."""

    label: str
    status: int = 0
    length: int | None = None
    received: int = 0
    complete: bool = False
    body: bytearray = field(default_factory=bytearray)


class ResponseReader:
    """Decodes the responses of one connection with an h11 client and checks them as they
    arrive against the requests sent, in order: a byte that does not belong to the body of the
    response being read is a desync, found at once rather than at a deadline."""

    def __init__(self, cell: str, expected: list[Expect]) -> None:
        self.cell = cell
        self.expected = list(expected)
        self.responses: list[Received] = []
        self.closed = False
        self.error: str | None = None
        self._client = h11.Connection(h11.CLIENT)
        self._begin()

    def expect(self, more: Expect) -> None:
        """One more request was sent on the connection."""
        self.expected.append(more)
        if self._client.our_state is h11.IDLE and self._client.their_state is h11.IDLE:
            self._begin()
            self._drain()

    def _begin(self) -> None:
        if len(self.responses) < len(self.expected):
            self._client.send(h11.Request(method="GET", target="/", headers=[("Host", "x")]))
            self._client.send(h11.EndOfMessage())

    @property
    def done(self) -> bool:
        """All expected responses ended, or the connection closed, or framing went wrong."""
        finished = len(self.responses) == len(self.expected) and all(
            r.complete for r in self.responses
        )
        return finished or self.closed or self.error is not None

    def feed(self, data: bytes) -> None:
        """Feed received bytes (``b""`` at EOF)."""
        if self.error is not None:
            return
        if not data:
            self.closed = True
        try:
            self._client.receive_data(data)
            self._drain()
        except h11.RemoteProtocolError as exc:
            if self.closed:
                return  # closed before or in the middle of a response: checked by the caller
            self.error = f"invalid framing after {len(self.responses)} response(s): {exc}"

    def _drain(self) -> None:
        client = self._client
        while True:
            if client.our_state is h11.DONE and client.their_state is h11.DONE:
                try:
                    client.start_next_cycle()
                except h11.LocalProtocolError:
                    return
                if len(self.responses) >= len(self.expected):
                    if client.trailing_data[0]:
                        self.error = f"bytes after response {len(self.responses)}: unrequested"
                    return
                self._begin()
            if client.our_state is h11.IDLE:
                return  # nothing more was asked for
            event = client.next_event()
            if event is h11.NEED_DATA or event is h11.PAUSED:
                return
            if isinstance(event, h11.ConnectionClosed):
                return
            if isinstance(event, h11.InformationalResponse):
                continue
            if isinstance(event, h11.Response):
                label = self.expected[len(self.responses)].label
                length = dict(event.headers).get(b"content-length")
                self.responses.append(
                    Received(label, event.status_code, int(length) if length else None)
                )
            elif isinstance(event, h11.Data):
                self._check_body(bytes(event.data))
            elif isinstance(event, h11.EndOfMessage):
                self.responses[-1].complete = True

    def _check_body(self, data: bytes) -> None:
        current = self.responses[-1]
        want = self.expected[len(self.responses) - 1].body
        start = current.received
        current.received += len(data)
        if want is None or current.status >= 400:
            return
        piece = want[start : start + len(data)]
        if piece != data:
            bad = next(
                (i for i, (a, b) in enumerate(zip(piece, data, strict=False)) if a != b),
                len(piece),
            )
            self.error = (
                f"response {len(self.responses)} ({current.label}) body byte {start + bad} is "
                f"{data[bad : bad + 16]!r}, expected {want[start + bad : start + bad + 16]!r}"
                " (the next response read as this body)"
            )


def check_no_desync(cell: str, reader: ResponseReader) -> None:
    """Every response is its own request's, whole, in order; a response cut short is followed
    by the connection closing, never by another response."""
    if reader.error is not None:
        fail(cell, "no response desync", "each request's own response", reader.error)
    for index, got in enumerate(reader.responses):
        if got.complete:
            want = reader.expected[index].body
            if want is not None and got.status < 400 and got.received != len(want):
                fail(
                    cell,
                    "no response desync",
                    f"{len(want)} body bytes for {got.label}",
                    f"{got.received}",
                )
        elif not reader.closed:
            fail(
                cell,
                "no response desync",
                f"{got.label} complete, or the connection closed",
                f"{got.received} of {got.length} body bytes and the connection still open",
            )


def check_started_complete(cell: str, reader: ResponseReader) -> None:
    """Graceful paths lose no byte: every response whose head arrived was received whole."""
    for index, got in enumerate(reader.responses):
        if not got.complete:
            want = reader.expected[index].body
            total = got.length if got.length is not None else want and len(want)
            fail(
                cell,
                "graceful paths lose no byte of a started response",
                f"all {total} body bytes of {got.label}",
                f"{got.received} and the connection closed",
            )


def check_answered(cell: str, reader: ResponseReader, labels: list[str]) -> None:
    """The requests named were answered (the server kept serving them)."""
    answered = {r.label for r in reader.responses if r.complete}
    missing = [label for label in labels if label not in answered]
    if missing:
        fail(cell, "the server keeps serving", f"answers to {labels}", f"none to {missing}")


def wait_until(predicate: Callable[[], bool], what: str, deadline: float = 10.0) -> None:
    """Poll a thread-safe ``predicate`` (blocking; for use in a helper thread)."""
    end = time.monotonic() + deadline
    while not predicate():
        if time.monotonic() > end:
            raise AssertionError(f"phase not reached in {deadline:g} s: {what}")
        time.sleep(0.005)
