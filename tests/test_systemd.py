"""systemd: socket activation (LISTEN_FDS/LISTEN_PID sockets are picked up without flags) and
sd_notify (READY, RELOADING, STOPPING, WATCHDOG on $NOTIFY_SOCKET)."""

from __future__ import annotations

import contextlib
import http.client
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from asyncwsgi.config import BindSpec, Config, systemd_listen_fds

from .test_cli import TIMEOUT, CLIServer, http_client

ROOT = Path(__file__).resolve().parent.parent


def test_listen_fds_for_this_process(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LISTEN_PID", str(os.getpid()))
    monkeypatch.setenv("LISTEN_FDS", "2")
    assert systemd_listen_fds() == [3, 4]
    assert Config().listen_specs() == [BindSpec(kind="fd", fd=3), BindSpec(kind="fd", fd=4)]
    # Explicit addresses win over activation.
    assert Config(bind=("127.0.0.1:9000",)).listen_specs()[0].port == 9000


def test_listen_fds_of_another_process_are_ignored(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LISTEN_PID", str(os.getpid() + 1))
    monkeypatch.setenv("LISTEN_FDS", "1")
    assert systemd_listen_fds() == []
    assert Config().listen_specs() == [BindSpec(kind="tcp", host="127.0.0.1", port=8000)]


@pytest.mark.parametrize("workers", ["1", "2"])
def test_cli_serves_on_the_activated_socket(workers: str) -> None:
    """As systemd starts it: the socket on fd 3, LISTEN_PID set to the server's own pid."""
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def as_fd_3() -> None:
        os.dup2(listener.fileno(), 3)

    # `exec` keeps the pid, so $$ is the server's pid, as systemd's LISTEN_PID is.
    script = (
        f'LISTEN_PID=$$ LISTEN_FDS=1 exec "{sys.executable}" -m asyncwsgi serve '
        f"tests.apps:hello --workers {workers} --no-access-log"
    )
    proc = subprocess.Popen(
        ["sh", "-c", script],
        cwd=ROOT,
        preexec_fn=as_fd_3,
        pass_fds=(3,),  # keep the dup2 target open across exec
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    listener.close()
    try:
        assert proc.stderr is not None
        for line in proc.stderr:
            if "Listening at" in line:
                break
        assert f":{port}" in line
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        conn.request("GET", "/")
        assert conn.getresponse().read() == b"Hello, world!"
        conn.close()
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
        assert proc.stderr is not None
        proc.stderr.close()


# -- sd_notify: Type=notify and Type=notify-reload ----------------------------------------------


@contextlib.contextmanager
def notify_socket(name: str) -> Iterator[tuple[socket.socket, str]]:
    """A datagram socket as systemd's notification socket: ``name`` is a path, or ``@name``
    in the abstract namespace; yields the socket and the ``$NOTIFY_SOCKET`` value."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name[1:] if name.startswith("@") else name)
    sock.settimeout(TIMEOUT)
    try:
        yield sock, name
    finally:
        sock.close()


def written_so_far(server: CLIServer) -> str:
    """Everything the server has written to stderr up to now (what is already in the pipe)."""
    while server._read(time.monotonic() + 0.01):
        pass
    return server.output


def next_message(sock: socket.socket, skip: str = "WATCHDOG=1") -> list[str]:
    """The fields of the next datagram other than ``skip``."""
    while True:
        fields = sock.recv(4096).decode().split("\n")
        if fields != [skip]:
            return fields


@pytest.mark.parametrize("workers", [(), ("--workers", "2")], ids=["single", "workers-2"])
def test_sd_notify_ready_reloading_stopping(workers: tuple[str, ...], tmp_path: Path) -> None:
    """READY=1 once serving; SIGHUP: RELOADING=1 with MONOTONIC_USEC, then READY=1 once the
    reload is done; SIGTERM: STOPPING=1. Under the supervisor READY=1 waits for every worker."""
    name = f"@asyncwsgi-test-{os.getpid()}" if workers else str(tmp_path / "notify")
    with notify_socket(name) as (sock, address):
        args = ("--port", "0", "--no-access-log", *workers)
        with CLIServer("tests.apps:hello", *args, env={"NOTIFY_SOCKET": address}) as server:
            assert next_message(sock) == ["READY=1"]
            # Each worker logs "Listening at" before it tells the supervisor it is ready.
            assert written_so_far(server).count("Listening at") == (2 if workers else 1)
            before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
            server.proc.send_signal(signal.SIGHUP)
            reloading, usec = next_message(sock)
            assert reloading == "RELOADING=1"
            assert usec.startswith("MONOTONIC_USEC=")
            assert before <= int(usec.split("=")[1]) <= time.monotonic_ns() // 1000
            assert next_message(sock) == ["READY=1"]
            if workers:  # two new workers accept
                assert written_so_far(server).count("Listening at") == 4
            with http_client() as client:
                assert client.get(server.url()).text == "Hello, world!"
            server.proc.send_signal(signal.SIGTERM)
            assert next_message(sock) == ["STOPPING=1"]
            assert server.finish() == 0


@pytest.mark.parametrize("workers", [(), ("--workers", "2")], ids=["single", "workers-2"])
def test_sd_notify_watchdog_pings(workers: tuple[str, ...]) -> None:
    """With WATCHDOG_USEC (200 ms), WATCHDOG=1 comes repeatedly once the server is ready."""
    with notify_socket(f"@asyncwsgi-test-wd-{os.getpid()}") as (sock, address):
        env = {"NOTIFY_SOCKET": address, "WATCHDOG_USEC": "200000"}
        args = ("--port", "0", "--no-access-log", *workers)
        with CLIServer("tests.apps:hello", *args, env=env) as server:
            assert next_message(sock) == ["READY=1"]
            for _ in range(5):
                assert sock.recv(4096) == b"WATCHDOG=1"
            server.proc.send_signal(signal.SIGTERM)
            assert next_message(sock) == ["STOPPING=1"]
            assert server.finish() == 0
