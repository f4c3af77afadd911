"""Signals to the supervisor and its workers, over real processes: to one process, to the whole
process group (systemd's ``KillMode=control-group``, Ctrl-C in a terminal), during a reload and
while a worker boots."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from .helpers import decode_replies
from .test_supervisor import DEADLINE, Proc, _free_port, _get, _worker_pids

# The request body arrives in two halves: the application blocks reading it until the test sends
# the second one, so a request is in flight for exactly as long as the test wants.
SIGNAL_APP = """
import os
import sys

if os.path.exists("gate"):  # a FIFO: this import finishes when the test writes to it
    gate = os.open("gate", os.O_RDWR)
    print("importing in %d" % os.getpid(), file=sys.stderr, flush=True)
    os.read(gate, 1)
    os.close(gate)


def app(environ, start_response):
    length = int(environ.get("CONTENT_LENGTH") or 0)
    if length:
        print("app reading in %d" % os.getpid(), file=sys.stderr, flush=True)
        body = environ["wsgi.input"].read(length)
    else:
        body = str(os.getpid()).encode()
    start_response("200 OK", [("Content-Length", str(len(body)))])
    return [body]
"""

BODY = b"0123456789"


@pytest.fixture
def app_dir(tmp_path: Path) -> Path:
    (tmp_path / "sigapp.py").write_text(SIGNAL_APP)
    return tmp_path


@contextlib.contextmanager
def _server(app_dir: Path, *args: str) -> Iterator[Proc]:
    """Two workers under a supervisor that leads its own process group."""
    port = _free_port()
    proc = Proc(["sigapp:app", "--port", str(port), "-w", "2", *args], app_dir, new_session=True)
    proc.port = port  # type: ignore[attr-defined]
    try:
        proc.wait_for("Listening at", count=2)
        yield proc
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.proc.pid, signal.SIGKILL)  # whatever a failed test left running
        proc.stop()


def _start_upload(proc: Proc, count: int) -> tuple[socket.socket, int]:
    """Send a request head and half its body; return the socket and the pid of the worker whose
    application is now reading the rest (``count``: how many uploads were started so far)."""
    sock = socket.create_connection(("127.0.0.1", proc.port), timeout=DEADLINE)  # type: ignore[attr-defined]
    sock.sendall(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\n" + BODY[:5])
    line = proc.wait_for(r"app reading in \d+", count=count)[count - 1]
    match = re.search(r"app reading in (\d+)", line)
    assert match is not None
    return sock, int(match.group(1))


def _read_all(sock: socket.socket) -> bytes:
    """Everything until the server closes (a reset ends it too)."""
    data = b""
    with contextlib.suppress(ConnectionResetError):
        while chunk := sock.recv(65536):
            data += chunk
    return data


def _finish(sock: socket.socket) -> tuple[int, bytes] | None:
    """Send the rest of the body; return the response's status and body, or None if the
    connection was cut."""
    try:
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            sock.sendall(BODY[5:])
        replies = decode_replies(_read_all(sock))
    finally:
        sock.close()
    return (replies[0].status, replies[0].body) if replies else None


def _lines(proc: Proc, pattern: str) -> list[str]:
    return [line for line in proc.lines if re.search(pattern, line)]


def _stopped(proc: Proc) -> int:
    """Wait for the supervisor to exit; every line its workers wrote has been read by then."""
    status = proc.proc.wait(DEADLINE)
    proc.wait_for("Supervisor shutdown complete")
    return status


def test_sigterm_to_the_process_group_lets_requests_finish(app_dir: Path) -> None:
    """systemd's KillMode=control-group: every process gets SIGTERM, and the supervisor forwards
    one more to each worker. A repeated SIGTERM changes nothing: the request finishes."""
    with _server(app_dir, "--no-access-log") as proc:
        sock, pid = _start_upload(proc, 1)
        os.killpg(proc.proc.pid, signal.SIGTERM)
        proc.wait_for(rf"\[{pid}\] .*Received SIGTERM, shutting down")
        proc.wait_for("Received SIGTERM, shutting down workers")
        # The kernel may merge the direct and the forwarded SIGTERM into one; another makes sure
        # the worker handles a repeated one while the request is in flight.
        os.kill(pid, signal.SIGTERM)
        proc.wait_for(rf"\[{pid}\] .*Received SIGTERM", count=2)
        assert _finish(sock) == (200, BODY)
        assert _stopped(proc) == 0
        assert not _lines(proc, "closing connections now|did not stop in time")


def test_ctrl_c_to_the_process_group_is_graceful_and_a_second_one_stops_now(
    app_dir: Path,
) -> None:
    """Ctrl-C in a terminal: SIGINT to every process, and the supervisor forwards SIGTERM. The
    first Ctrl-C lets requests finish; a second one cuts what is left."""
    with _server(app_dir, "--no-access-log") as proc:
        first, pid1 = _start_upload(proc, 1)
        second, pid2 = _start_upload(proc, 2)
        os.killpg(proc.proc.pid, signal.SIGINT)
        for pid in {pid1, pid2}:
            proc.wait_for(rf"\[{pid}\] .*Received SIGINT")
            proc.wait_for(rf"\[{pid}\] .*Received SIGTERM")  # the supervisor's
        assert _finish(first) == (200, BODY)
        os.killpg(proc.proc.pid, signal.SIGINT)
        assert _read_all(second) == b""  # closed without a response
        second.close()
        assert _stopped(proc) == 0
        # The worker's own second SIGINT or the supervisor's SIGQUIT, whichever it takes first.
        assert _lines(proc, rf"\[{pid2}\] .*Received SIG(INT again|QUIT), closing connections now")
        assert not _lines(proc, "did not stop in time")


@contextlib.contextmanager
def _single(app_dir: Path) -> Iterator[Proc]:
    """One process, no supervisor."""
    port = _free_port()
    proc = Proc(["sigapp:app", "--port", str(port), "--no-access-log"], app_dir)
    proc.port = port  # type: ignore[attr-defined]
    try:
        proc.wait_for("Listening at")
        yield proc
    finally:
        proc.stop()


def test_a_repeated_sigterm_to_a_single_process_changes_nothing(app_dir: Path) -> None:
    with _single(app_dir) as proc:
        sock, _ = _start_upload(proc, 1)
        for count in (1, 2):
            proc.proc.send_signal(signal.SIGTERM)
            proc.wait_for("Received SIGTERM", count=count)
        assert _finish(sock) == (200, BODY)
        assert proc.proc.wait(DEADLINE) == 0
        proc.wait_for("Shutdown complete")
        assert not _lines(proc, "closing connections now")


def test_sigquit_to_a_single_process_stops_now(app_dir: Path) -> None:
    with _single(app_dir) as proc:
        sock, _ = _start_upload(proc, 1)
        proc.proc.send_signal(signal.SIGQUIT)
        assert _read_all(sock) == b""  # the request is cut
        sock.close()
        assert proc.proc.wait(DEADLINE) == 0
        proc.wait_for("Received SIGQUIT, closing connections now")


@pytest.mark.parametrize("signals", [["SIGQUIT"], ["SIGTERM", "SIGQUIT"]])
def test_sigquit_to_the_supervisor_stops_now(app_dir: Path, signals: list[str]) -> None:
    """SIGQUIT means "now", as in gunicorn, also in the middle of a graceful shutdown."""
    with _server(app_dir, "--no-access-log") as proc:
        sock, pid = _start_upload(proc, 1)
        if signals[0] == "SIGTERM":
            proc.proc.send_signal(signal.SIGTERM)
            proc.wait_for(rf"\[{pid}\] .*Received SIGTERM, shutting down")
        proc.proc.send_signal(signal.SIGQUIT)
        assert _read_all(sock) == b""  # the request is cut
        sock.close()
        assert _stopped(proc) == 0
        assert _lines(proc, rf"\[{pid}\] .*Received SIGQUIT, closing connections now")


def test_sigterm_to_the_supervisor_does_not_cut_a_worker_draining_after_sighup(
    app_dir: Path,
) -> None:
    """A worker that a reload told to stop is not told again (and cut) when the supervisor
    stops; the supervisor waits for it."""
    with _server(app_dir, "--no-access-log") as proc:
        sock, pid = _start_upload(proc, 1)
        proc.proc.send_signal(signal.SIGHUP)
        proc.wait_for(rf"\[{pid}\] .*Received SIGTERM, shutting down")  # retired, draining
        proc.proc.send_signal(signal.SIGTERM)
        proc.wait_for("Received SIGTERM, shutting down workers")
        # A marker signal: the worker handles it after whatever the supervisor sent it on stopping.
        os.kill(pid, signal.SIGUSR1)
        proc.wait_for(rf"\[{pid}\] .*Received SIGUSR1")
        assert _finish(sock) == (200, BODY)
        assert _stopped(proc) == 0
        assert len(_lines(proc, rf"\[{pid}\] .*Received SIGTERM")) == 1
        assert not _lines(proc, "closing connections now|did not stop in time")


def _boot_gated_worker(proc: Proc, app_dir: Path) -> int:
    """Kill a worker; return the pid of its replacement, which is importing the application
    and stays there until :func:`_release`."""
    os.mkfifo(app_dir / "gate")
    os.kill(min(_worker_pids(proc)), signal.SIGKILL)
    match = re.search(r"importing in (\d+)", proc.wait_for(r"importing in \d+")[0])
    assert match is not None
    return int(match.group(1))


def _release(app_dir: Path) -> None:
    """Let the gated import finish (ENXIO if the importing worker is gone)."""
    gate = app_dir / "gate"
    fd = os.open(gate, os.O_WRONLY | os.O_NONBLOCK)
    try:
        gate.unlink()  # the next worker to boot is not held
        os.write(fd, b"g")
    finally:
        os.close(fd)


def test_sigusr1_while_a_worker_boots_reopens_its_logs_once_it_is_up(app_dir: Path) -> None:
    """logrotate's move-then-signal while a replacement worker imports the application: once up,
    that worker writes to the new file too."""
    log = app_dir / "access.log"
    args = ["--access-logfile", str(log), "--access-logformat", "%(p)s %(r)s"]
    with _server(app_dir, *args) as proc:
        survivor = max(_worker_pids(proc))
        booting = _boot_gated_worker(proc, app_dir)
        log.rename(app_dir / "access.log.1")
        os.killpg(proc.proc.pid, signal.SIGUSR1)
        proc.wait_for(rf"\[{survivor}\] .*Received SIGUSR1, reopening 1 log file")
        _release(app_dir)
        proc.wait_for(rf"\[{booting}\] .*Received SIGUSR1, reopening 1 log file")
        deadline = time.monotonic() + DEADLINE
        while int(_get(proc.port)) != booting:  # type: ignore[attr-defined]
            assert time.monotonic() < deadline, "the new worker answered no request"
        proc.proc.send_signal(signal.SIGTERM)
        assert _stopped(proc) == 0
    assert str(booting) not in (app_dir / "access.log.1").read_text()
    assert f"<{booting}> GET / HTTP/1.1" in log.read_text()


def test_sigterm_while_a_worker_boots_stops_it_gracefully_once_it_is_up(app_dir: Path) -> None:
    with _server(app_dir, "--no-access-log") as proc:
        booting = _boot_gated_worker(proc, app_dir)
        os.killpg(proc.proc.pid, signal.SIGTERM)
        proc.wait_for("Received SIGTERM, shutting down workers")
        _release(app_dir)
        assert _stopped(proc) == 0
        assert _lines(proc, rf"\[{booting}\] .*Received SIGTERM, shutting down")
        assert _lines(proc, rf"\[{booting}\] .*Shutdown complete")
        assert not _lines(proc, "did not stop in time")
