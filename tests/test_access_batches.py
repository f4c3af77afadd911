"""Access lines written in batches lose nothing, over real processes: at a graceful shutdown
(SIGTERM, SIGINT), at SIGQUIT, across a SIGUSR1 reopen after logrotate moved the file, and when
a worker exits after ``--max-requests``."""

from __future__ import annotations

import os
import re
import signal
import time
from pathlib import Path

import pytest

from .helpers import decode_replies
from .test_cli import CLIServer, port_of, raw_request
from .test_supervisor import DEADLINE, Proc, _free_port, _worker_pids

#: Requests per batch of the tests: several housekeeping ticks' worth of lines on a slow
#: machine, and lines that may all still be in memory when the signal comes on a fast one.
COUNT = 300


def request_paths(port: int, paths: list[str]) -> None:
    """GET each of ``paths`` on one keep-alive connection (pipelined) and check every answer;
    the last request closes it, so each access line has been logged when this returns."""
    heads = [f"GET {path} HTTP/1.1\r\nHost: x\r\n" for path in paths]
    heads[-1] += "Connection: close\r\n"
    data = raw_request(port, "".join(head + "\r\n" for head in heads).encode())
    replies = decode_replies(data, count=len(paths))
    assert [reply.status for reply in replies] == [200] * len(paths)


def logged_paths(text: str) -> list[str]:
    """The request paths of the access lines in ``text``, in order."""
    return re.findall(r'"GET (\S+) HTTP/1\.1" 200 13 ', text)


@pytest.mark.parametrize("where", ["file", "stderr"])
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT, signal.SIGQUIT])
def test_no_access_line_is_lost_at_shutdown(tmp_path: Path, where: str, signum: int) -> None:
    """SIGTERM and SIGINT (graceful) and SIGQUIT (connections closed now) each write the lines
    still gathered in memory before the process exits."""
    log = tmp_path / "access.log"
    args = ["--port", "0", *(["--access-logfile", str(log)] if where == "file" else [])]
    paths = [f"/r{i}" for i in range(COUNT)]
    with CLIServer("tests.apps:hello", *args) as server:
        request_paths(port_of(server.url()), paths)
        assert server.stop(signum) == 0
    assert logged_paths(log.read_text() if where == "file" else server.output) == paths


def test_sigusr1_writes_earlier_lines_to_the_old_file_and_later_ones_to_the_new(
    tmp_path: Path,
) -> None:
    """logrotate's move, then SIGUSR1: the lines of requests answered before the signal are in
    the moved file, those after it in the new one; none is lost or written twice."""
    log, moved = tmp_path / "access.log", tmp_path / "access.log.1"
    before = [f"/before{i}" for i in range(COUNT)]
    after = [f"/after{i}" for i in range(COUNT)]
    with CLIServer("tests.apps:hello", "--port", "0", "--access-logfile", str(log)) as server:
        port = port_of(server.url())
        request_paths(port, before)
        log.rename(moved)
        server.proc.send_signal(signal.SIGUSR1)
        server.wait_for("Received SIGUSR1, reopening 1 log file")
        request_paths(port, after)
        assert server.stop() == 0
    assert logged_paths(moved.read_text()) == before
    assert logged_paths(log.read_text()) == after


def test_a_worker_leaving_after_max_requests_writes_its_lines(tmp_path: Path) -> None:
    """A worker that reached ``--max-requests`` writes its last lines before it exits, while
    the supervisor and the new worker keep running."""
    log = tmp_path / "access.log"
    port = _free_port()
    args = ["tests.apps:hello", "--port", str(port), "-w", "1", "--max-requests", "5"]
    proc = Proc([*args, "--access-logfile", str(log)], tmp_path)
    try:
        proc.wait_for("Listening at")
        (first,) = _worker_pids(proc)
        paths = [f"/m{i}" for i in range(5)]
        for path in paths:
            request_paths(port, [path])
        deadline = time.monotonic() + DEADLINE
        while True:  # no event says "reaped": poll the process table
            try:
                os.kill(first, 0)
            except ProcessLookupError:
                break
            assert time.monotonic() < deadline, "the worker did not exit after --max-requests"
            time.sleep(0.05)
        assert logged_paths(log.read_text()) == paths
    finally:
        assert proc.stop() == 0


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGQUIT])
def test_workers_write_every_line_when_the_supervisor_stops(tmp_path: Path, signum: int) -> None:
    """Workers end with os._exit(), where no logging.shutdown() runs: each writes its lines
    itself, on a graceful stop and on SIGQUIT's stop-now alike."""
    log = tmp_path / "access.log"
    port = _free_port()
    proc = Proc(
        ["tests.apps:hello", "--port", str(port), "-w", "2", "--access-logfile", str(log)], tmp_path
    )
    paths = [f"/w{i}" for i in range(COUNT)]
    try:
        proc.wait_for("Listening at", count=2)
        request_paths(port, paths[: COUNT // 2])
        request_paths(port, paths[COUNT // 2 :])  # perhaps to the other worker
        proc.proc.send_signal(signum)
        assert proc.proc.wait(DEADLINE) == 0
    finally:
        proc.stop()
    assert sorted(logged_paths(log.read_text())) == sorted(paths)
