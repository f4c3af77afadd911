"""The process tier of the fault matrix: each phase of a worker x each signal, against a real
``asyncwsgi serve --workers 2`` in its own session (so a signal can go to its whole group).

Every cell starts with one request held in the middle of its response (the app yields a first
block, then waits for a file to appear), puts the supervisor in its phase, delivers the event,
lets the held request and any held boot go on, and checks the invariants of
:mod:`tests.faults.invariants`.
"""

from __future__ import annotations

import contextlib
import os
import queue
import re
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.test_supervisor import Proc

from . import invariants as inv

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
DEADLINE = 20.0
GRACEFUL = 5.0
WORKERS = 2
BLOCK = 16 * 1024
BLOCKS = 8

APP = f"""
import os, sys, time

HERE = os.path.dirname(os.path.abspath(__file__))


def _wait(*names):
    while not any(os.path.exists(os.path.join(HERE, name)) for name in names):
        time.sleep(0.01)  # the application's own pace: it waits for the test's go-ahead


if os.path.exists(os.path.join(HERE, "boot.hold")):
    print("booting %d held" % os.getpid(), file=sys.stderr, flush=True)
    _wait("boot.go", "boot.go.%d" % os.getpid())


def app(environ, start_response):
    if environ["PATH_INFO"] == "/hold":
        start_response("200 OK", [("Content-Length", str({BLOCK * BLOCKS}))])

        def body():
            yield b"h" * {BLOCK}
            print("holding %d" % os.getpid(), file=sys.stderr, flush=True)
            _wait("request.go")
            for _ in range({BLOCKS - 1}):
                yield b"h" * {BLOCK}

        return body()
    body = str(os.getpid()).encode()
    start_response("200 OK", [("Content-Length", str(len(body)))])
    return [body]
"""

PHASES = {
    "app": "app running in a worker",
    "booting": "worker booting (respawned after a crash)",
    "draining": "worker draining (retired by SIGHUP)",
    "reload": "a reload in progress (the replacement is booting)",
    "reload_last": "a reload in progress (the replacement of the last old worker is booting)",
}
SIGNALS = ("SIGTERM", "SIGINT", "SIGHUP", "SIGQUIT")
EVENTS = [
    *(f"{name}-{target}" for name in SIGNALS for target in ("one", "group")),
    *(f"{name}-twice" for name in SIGNALS),
    "SIGKILL-worker",
]
#: Cells outside the phase x event product: the crash of the last old worker of a reload while
#: its replacement boots, and log reopening (SIGUSR1, after the access log was rotated) while a
#: worker boots.
EXTRA_CELLS = [("reload_last", "SIGKILL-worker"), ("booting", "SIGUSR1-one")]
ACCESS_LOG = "access.log"


class Supervisor(Proc):
    """``asyncwsgi serve`` in a new session; its stderr lines are collected as they arrive."""

    def __init__(self, cwd: Path, port: int, *extra: str) -> None:
        args = ["faultapp:app", "--port", str(port), "-w", str(WORKERS)]
        args += ["--timeout-graceful-shutdown", str(GRACEFUL), *extra]
        super().__init__(args, cwd, new_session=True)
        self.pid = self.proc.pid

    def wait_for_match(self, pattern: str, count: int = 1) -> list[re.Match[str]]:
        """Wait until ``count`` stderr lines match ``pattern``; return their matches."""
        regex = re.compile(pattern)
        return [m for m in map(regex.search, self.wait_for(pattern, count)) if m]

    def booted(self) -> set[int]:
        """Every worker pid the supervisor reported booting."""
        while True:
            try:
                self.lines.append(self._queue.get_nowait())
            except queue.Empty:
                break
        return {
            int(m[1])
            for m in map(re.compile(r"Booting worker with pid: (\d+)").search, self.lines)
            if m
        }

    def exit_within(self, seconds: float) -> tuple[int | None, float]:
        """Wait up to ``seconds`` for the supervisor to exit: (status or None, elapsed)."""
        started = time.monotonic()
        try:
            status: int | None = self.proc.wait(seconds)
        except subprocess.TimeoutExpired:
            status = None
        return status, time.monotonic() - started

    def kill_all(self) -> None:
        """SIGKILL the supervisor's whole process group: workers it left behind included."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(DEADLINE)
        self._reader.join(DEADLINE)
        assert self.proc.stderr is not None
        self.proc.stderr.close()


class HeldRequest(threading.Thread):
    """A client with ``GET /hold`` and a pipelined ``GET /pid`` on one connection."""

    def __init__(self, cell: str, port: int) -> None:
        super().__init__(daemon=True)
        self.reader = inv.ResponseReader(
            cell,
            [inv.Expect("/hold", b"h" * (BLOCK * BLOCKS)), inv.Expect("/pid (follow-up)", None)],
        )
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=DEADLINE)
        self.sock.sendall(
            b"GET /hold HTTP/1.1\r\nHost: x\r\n\r\nGET /pid HTTP/1.1\r\nHost: x\r\n\r\n"
        )

    def run(self) -> None:
        try:
            while not self.reader.done:
                try:
                    data = self.sock.recv(65536)
                except OSError:
                    data = b""
                self.reader.feed(data)
        finally:
            self.sock.close()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _cells() -> Iterator[object]:
    for phase in PHASES:
        if phase == "reload_last":
            continue  # its one cell is in EXTRA_CELLS
        for event in EVENTS:
            yield pytest.param(phase, event, id=f"{phase}-{event}")
    for phase, event in EXTRA_CELLS:
        yield pytest.param(phase, event, id=f"{phase}-{event}")


@pytest.mark.parametrize(("phase", "event"), list(_cells()))
def test_cell(phase: str, event: str, tmp_path: Path) -> None:
    name = f"{phase} x {event}"
    (tmp_path / "faultapp.py").write_text(APP)
    port = _free_port()
    extra = ["--no-access-log"]
    if event.startswith("SIGUSR1"):
        extra = ["--access-logfile", ACCESS_LOG, "--access-logformat", "%(p)s %(r)s"]
    sup = Supervisor(tmp_path, port, *extra)
    try:
        _run(name, phase, event, tmp_path, port, sup)
    finally:
        (tmp_path / "request.go").touch()
        (tmp_path / "boot.go").touch()
        sup.kill_all()


def _run(name: str, phase: str, event: str, tmp: Path, port: int, sup: Supervisor) -> None:
    sup.wait_for("Listening at", count=WORKERS)
    fds = len(inv.open_fds(sup.pid))
    held = HeldRequest(name, port)
    held.start()
    holder = int(sup.wait_for_match(r"holding (\d+)")[0][1])
    first = inv.check_worker_count(name, sup.pid, WORKERS)
    other = next(pid for pid in first if pid != holder)
    booting = 0
    # -- the phase ---------------------------------------------------------------------------
    if phase == "booting":
        (tmp / "boot.hold").touch()
        os.kill(other, signal.SIGKILL)
        booting = int(sup.wait_for_match(r"booting (\d+) held")[0][1])
    elif phase == "reload":
        (tmp / "boot.hold").touch()
        os.kill(sup.pid, signal.SIGHUP)
        booting = int(sup.wait_for_match(r"booting (\d+) held")[0][1])
    elif phase == "reload_last":
        # The first replacement boots and accepts, one old worker is told to stop, and the
        # replacement of the last old worker is held while it boots.
        (tmp / "boot.hold").touch()
        os.kill(sup.pid, signal.SIGHUP)
        released = sup.wait_for_match(r"booting (\d+) held")[0][1]
        (tmp / f"boot.go.{released}").touch()
        stopped = int(sup.wait_for_match(r"Stopping worker \(pid: (\d+)\) of generation 0")[0][1])
        booting = int(sup.wait_for_match(r"booting (\d+) held", count=2)[1][1])
        last = next(pid for pid in first if pid != stopped)
    elif phase == "draining":
        os.kill(sup.pid, signal.SIGHUP)
        sup.wait_for(rf"\[{holder}\] \[INFO\] Received SIGTERM, shutting down")
    # -- the event ---------------------------------------------------------------------------
    signame, _, target = event.partition("-")
    victim = 0
    started = time.monotonic()
    if signame == "SIGKILL":
        # The crash of a worker: the booting one, or one other than the holder's (in the
        # draining phase, the draining holder itself).
        victim = other
        if phase == "booting":
            victim = booting
        elif phase == "draining":
            victim = holder
        elif phase == "reload_last":
            victim = last
        os.kill(victim, signal.SIGKILL)
    elif signame == "SIGUSR1":
        # logrotate moves the access log away, then asks every process to reopen its files.
        os.rename(tmp / ACCESS_LOG, tmp / f"{ACCESS_LOG}.1")
        os.kill(sup.pid, signal.SIGUSR1)
        sup.wait_for(rf"\[{sup.pid}\] \[INFO\] Received SIGUSR1, reopening")
    else:
        signum = signal.Signals[signame]
        if target == "group":
            os.killpg(sup.pid, signum)
        else:
            os.kill(sup.pid, signum)
        if target == "twice":
            with_reaction = {"SIGTERM": "shutting down workers", "SIGINT": "shutting down workers"}
            if signame in with_reaction:
                sup.wait_for(with_reaction[signame])
            elif signame == "SIGHUP":
                # The first one started its generation (the phase's own SIGHUP started one).
                reloads = 2 if phase in ("draining", "reload") else 1
                sup.wait_for(rf"Handling signal: hup; starting generation {reloads}\b")
            with contextlib.suppress(ProcessLookupError):
                os.kill(sup.pid, signum)
    (tmp / "boot.go").touch()
    (tmp / "request.go").touch()
    held.join(DEADLINE)
    # -- the invariants ----------------------------------------------------------------------
    stopping = signame in ("SIGTERM", "SIGINT", "SIGQUIT")
    immediate = signame == "SIGQUIT" or (signame == "SIGINT" and target == "twice")
    cut = signame == "SIGKILL" and victim == holder
    inv.check_no_desync(name, held.reader)
    if not immediate and not cut:
        inv.check_started_complete(name, held.reader)
    if stopping:
        timeout = SLACK_QUIT if immediate else GRACEFUL + 5.0
        status, elapsed = sup.exit_within(timeout + inv.SLACK + 5.0)
        inv.check_within(name, "shutdown", elapsed, timeout)
        if status is None or (not immediate and status != 0):
            inv.fail(name, "graceful shutdown exits 0", 0, status)
        inv.check_no_child_leak(name, sup.booted())
        return
    reloading = signame == "SIGHUP" or phase in ("draining", "reload", "reload_last")
    workers = _settle(name, sup, first if reloading else set())
    inv.check_within(name, "reload", time.monotonic() - started, GRACEFUL)
    deadline = time.monotonic() + inv.SLACK
    while len(inv.open_fds(sup.pid)) > fds and time.monotonic() < deadline:
        time.sleep(0.02)  # polling an external process's state, bounded by the deadline
    after = len(inv.open_fds(sup.pid))
    if after > fds:
        inv.fail(name, "no fd leak (supervisor)", f"<= {fds} descriptors", after)
    if signame == "SIGUSR1":
        _check_logs_reopened(name, sup, tmp, port, workers, booting)
    os.kill(sup.pid, signal.SIGTERM)
    status, _ = sup.exit_within(GRACEFUL + 5.0 + inv.SLACK)
    inv.check_no_child_leak(name, sup.booted())


def _settle(name: str, sup: Supervisor, replaced: set[int]) -> set[int]:
    """Wait until the supervisor has settled: none of ``replaced`` (the workers before a
    reload) is alive, every worker reports "Listening at", and there are --workers of them.
    Fails with what was seen at the deadline."""
    deadline = time.monotonic() + GRACEFUL + inv.SLACK
    while True:
        workers = inv.children(sup.pid)
        sup.booted()  # collect the lines logged so far
        listening = {int(m[1]) for m in map(_LISTENING.search, sup.lines) if m}
        stale = sorted(pid for pid in replaced if inv.alive(pid))
        if not stale and workers <= listening and len(workers) == WORKERS:
            return workers
        if time.monotonic() > deadline:
            if stale:
                inv.fail(name, "a reload replaces every worker", "only new workers", stale)
            inv.fail(
                name,
                "worker count converges to --workers",
                WORKERS,
                f"{len(workers)} ({sorted(workers)}; listening: {sorted(workers & listening)})",
            )
        time.sleep(0.02)  # polling an external process's state, bounded by the deadline


_LISTENING = re.compile(r"\[(\d+)\] \[INFO\] Listening at")

#: Seconds an immediate shutdown (SIGQUIT, a second SIGINT) may take.
SLACK_QUIT = 1.0


def _check_logs_reopened(
    name: str, sup: Supervisor, tmp: Path, port: int, workers: set[int], booting: int
) -> None:
    """SIGUSR1 reached every worker, the one that was booting included: each says so once it is
    up, and a request the booted worker serves is logged to the new file, not the rotated one."""
    for pid in sorted(workers):
        sup.wait_for(rf"\[{pid}\] \[INFO\] Received SIGUSR1, reopening")
    deadline = time.monotonic() + DEADLINE
    while True:  # the kernel spreads connections over the workers: ask until the booted one answers
        with socket.create_connection(("127.0.0.1", port), timeout=DEADLINE) as sock:
            sock.sendall(b"GET /pid HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            reply = b""
            while chunk := sock.recv(65536):
                reply += chunk
        if reply.endswith(b"\r\n\r\n%d" % booting):
            break
        if time.monotonic() > deadline:
            inv.fail(name, "log reopening reaches every worker", f"a reply of {booting}", reply)
    line = f"<{booting}> GET /pid HTTP/1.1"
    new, rotated = tmp / ACCESS_LOG, tmp / f"{ACCESS_LOG}.1"
    while line not in (new.read_text() if new.exists() else ""):
        if line in rotated.read_text():
            inv.fail(name, "log reopening reaches every worker", f"{line!r} in {new}", rotated)
        if time.monotonic() > deadline:
            inv.fail(name, "log reopening reaches every worker", f"{line!r} in {new}", "none")
        time.sleep(0.02)  # polling a file another process writes, bounded by the deadline
