"""The supervisor keeps its workers healthy: --workers 1, hung workers, recycling by memory and
age. Real processes, signals and sockets; the subprocess serves the applications below
(``tests.test_worker_recovery:app``, imported with ``--app-dir`` at the repository root)."""

from __future__ import annotations

import os
from typing import Any

import pytest

from .test_cli import CLIServer, http_client

APP = "tests.test_worker_recovery:app"


# -- the application served by the subprocess --------------------------------------------------


def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
    """``/``: the serving process's pid."""
    body = str(os.getpid()).encode()
    start_response("200 OK", [("Content-Length", str(len(body)))])
    return [body]


# -- --workers 1 ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "env"),
    [(("--workers", "1"), {}), ((), {"WEB_CONCURRENCY": "1"})],
    ids=["flag", "WEB_CONCURRENCY"],
)
def test_explicit_one_worker_runs_the_supervisor(
    args: tuple[str, ...], env: dict[str, str]
) -> None:
    """As gunicorn's -w 1: a supervisor and one worker, which answers, not the supervisor."""
    with CLIServer(APP, "--port", "0", "--no-access-log", *args, env=env) as server:
        match = server.wait_for(r"Starting supervisor \(pid: (\d+), workers: 1\)")
        assert int(match.group(1)) == server.proc.pid
        with http_client() as client:
            served_by = int(client.get(server.url()).text)
        assert served_by != server.proc.pid
        assert server.stop() == 0


def test_without_workers_a_single_process_serves() -> None:
    env = {"WEB_CONCURRENCY": ""}
    with CLIServer(APP, "--port", "0", "--no-access-log", env=env) as server:
        with http_client() as client:
            served_by = int(client.get(server.url()).text)
        assert served_by == server.proc.pid
        assert server.stop() == 0
        assert "supervisor" not in server.output
