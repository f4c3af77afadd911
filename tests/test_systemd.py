"""systemd socket activation: LISTEN_FDS/LISTEN_PID sockets are picked up without flags."""

from __future__ import annotations

import http.client
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from asyncwsgi.config import BindSpec, Config, systemd_listen_fds

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
