"""The ``asyncwsgi`` command, run for real in a subprocess.

Each test starts ``python -m asyncwsgi serve ...`` (or the console script), learns the address
from the "Listening at:" line on stderr, talks HTTP to it, and stops it with a signal. Nothing
waits on a clock: the tests wait for log lines, socket events and process exit, with timeouts.

The module also holds the applications these tests serve (``tests.test_cli:gated_app`` and
``tests.test_cli:make_app``), so the subprocess imports them with ``--app-dir`` at the repo root.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import sysconfig
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx
import pytest

import asyncwsgi

from .helpers import ProcessOutput

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT = 5.0
GATE_ENV = "ASYNCWSGI_TEST_GATE"
LISTENING = re.compile(r"Listening at: (\S+) \(threads: (\d+)\)")
ACCESS_LINE = re.compile(
    r"^\[[^]]+\] \[(?P<pid>\d+)\] \[INFO\] (?P<client>\S+) - "
    r'"(?P<request>(?:[^"\\]|\\.)*)" (?P<status>\d{3}) (?P<size>\d+) (?P<ms>\d+\.\d{3})ms$',
    re.MULTILINE,
)

# -- applications served by the subprocess ----------------------------------------------------


def gated_app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
    """Block until the test says go, over the UNIX socket named by ``$ASYNCWSGI_TEST_GATE``.

    The app connects to the test's gate socket, writes ``started <path>\\n``, and waits for the
    test to write ``go`` (or to close the gate), so a test decides exactly when it finishes.
    """
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as gate:
        gate.connect(os.environ[GATE_ENV])
        gate.sendall(f"started {environ['PATH_INFO']}\n".encode())
        word = gate.recv(16)
    body = b"finished after " + (word or b"gate closed")
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]


def make_app() -> Any:
    """A factory for ``--factory``: returns a new application each call."""

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"made by the factory"]

    return app


NOT_CALLABLE = 42


def failing_app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
    """Always raises, so the server logs the request's path in its error line."""
    raise RuntimeError("the application failed")


# -- running the command ------------------------------------------------------------------------


def console_script() -> str:
    """The installed ``asyncwsgi`` console script next to this interpreter."""
    return str(Path(sysconfig.get_path("scripts")) / "asyncwsgi")


def run_cli(*args: str, command: Sequence[str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run the command to completion (for commands that do not serve)."""
    return subprocess.run(
        [*(command or [sys.executable, "-m", "asyncwsgi"]), *args],
        capture_output=True,
        text=True,
        timeout=10,
        cwd=ROOT,
        stdin=subprocess.DEVNULL,
    )


class CLIServer(ProcessOutput):
    """A serving ``asyncwsgi`` subprocess whose stderr is read as it arrives.

    Args:
        app: ``module:attribute``.
        args: further command-line flags (give ``--port 0`` or ``-b``/``--uds``/``--fd``).
        env: extra environment variables.
        command: the program to run instead of ``python -m asyncwsgi``.
        pass_fds: file descriptors the subprocess inherits (for ``--fd``).
    """

    def __init__(
        self,
        app: str,
        *args: str,
        env: dict[str, str] | None = None,
        command: Sequence[str] | None = None,
        pass_fds: Iterable[int] = (),
    ) -> None:
        argv = [*(command or [sys.executable, "-m", "asyncwsgi"]), "serve", app]
        argv += ["--app-dir", str(ROOT), *args]
        self.proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env={**os.environ, **(env or {})},
            pass_fds=tuple(pass_fds),
            cwd="/",
        )
        assert self.proc.stderr is not None
        super().__init__(self.proc.stderr.fileno())

    def wait_for(self, pattern: str | re.Pattern[str], timeout: float = TIMEOUT) -> re.Match[str]:
        """Wait for a complete stderr line matching ``pattern``, after the previous match."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            text = self.output
            end = text.rfind("\n") + 1  # only complete lines
            for line in re.finditer(r"[^\n]*\n", text[self._scanned : end]):
                match = regex.search(line.group())
                if match:
                    self._scanned += line.end()
                    return match
            if not self._read(deadline):
                raise AssertionError(
                    f"no line matching {regex.pattern!r} within {timeout}s "
                    f"(exit status {self.proc.poll()}); stderr:\n{self.output}"
                )

    def started(self, timeout: float = TIMEOUT) -> list[str]:
        """Wait for the first "Listening at:" line; return every address listed so far."""
        if not LISTENING.search(self.output):
            self.wait_for(LISTENING, timeout)
        return [address for address, _ in LISTENING.findall(self.output)]

    def url(self) -> str:
        """Wait until listening and return the first address (``http://127.0.0.1:PORT``)."""
        return self.started()[0]

    def finish(self, timeout: float = TIMEOUT) -> int:
        """Read stderr to EOF and wait for the process to exit; return its status."""
        deadline = time.monotonic() + timeout
        while self._read(deadline):
            pass
        try:
            return self.proc.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"the server did not exit within {timeout}s; stderr:\n{self.output}"
            ) from None

    def stop(self, signum: int = signal.SIGTERM, timeout: float = TIMEOUT) -> int:
        """Send ``signum`` and return the exit status once the process has exited."""
        self.proc.send_signal(signum)
        return self.finish(timeout)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        assert self.proc.stderr is not None
        self.proc.stderr.close()

    def __enter__(self) -> CLIServer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def http_client(**kwargs: Any) -> httpx.Client:
    """A client that ignores proxy settings from the environment."""
    return httpx.Client(trust_env=False, timeout=TIMEOUT, **kwargs)


def raw_request(port: int, data: bytes) -> bytes:
    """Send ``data`` on a new connection and return all bytes until the server closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as sock:
        sock.sendall(data)
        return recv_all(sock)


def recv_all(sock: socket.socket) -> bytes:
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


def assert_closed_by_server(sock: socket.socket) -> None:
    """The server closed (or reset) the connection without sending anything more."""
    try:
        data = recv_all(sock)
    except ConnectionResetError:
        data = b""
    assert data == b"", data


def port_of(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


@contextlib.contextmanager
def gate_socket(directory: Path) -> Iterator[tuple[socket.socket, str]]:
    """A listening UNIX socket that :func:`gated_app` connects to."""
    path = str(directory / "gate.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as gate:
        gate.bind(path)
        gate.listen()
        gate.settimeout(TIMEOUT)
        yield gate, path


def accept_started(gate: socket.socket) -> socket.socket:
    """Wait for the app to reach the gate; return the connection to release it with."""
    conn, _ = gate.accept()
    conn.settimeout(TIMEOUT)
    line = b""
    while not line.endswith(b"\n"):
        chunk = conn.recv(100)
        assert chunk, "the app closed the gate before saying it started"
        line += chunk
    assert line.startswith(b"started ")
    return conn


# -- --version and --help --------------------------------------------------------------------


@pytest.mark.parametrize("args", [("--version",), ("serve", "--version")])
def test_version(args: tuple[str, ...]) -> None:
    result = run_cli(*args)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"asyncwsgi {asyncwsgi.__version__}"


def test_console_script_version() -> None:
    result = run_cli("--version", command=[console_script()])
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"asyncwsgi {asyncwsgi.__version__}"


@pytest.mark.parametrize(
    "flag",
    [
        "--bind",
        "-b",
        "--host",
        "--port",
        "--threads",
        "--backlog",
        "--timeout-keep-alive",
        "--timeout-graceful-shutdown",
        "--graceful-timeout",
        "--root-path",
        "--factory",
        "--app-dir",
        "--loop",
        "--log-level",
        "--access-log",
        "--no-access-log",
        "--uds",
        "--fd",
        "--limit-request-line",
        "--limit-request-fields",
        "--limit-request-field_size",
        "--limit-request-field-size",
        "--limit-request-body",
        "--forwarded-trust-headers",
    ],
)
def test_help_lists_flag(flag: str, serve_help: str) -> None:
    assert re.search(rf"(^|[\s,\[]){re.escape(flag)}([\s,=\]]|$)", serve_help, re.MULTILINE), (
        f"{flag} missing from `asyncwsgi serve --help`:\n{serve_help}"
    )


@pytest.fixture(scope="module")
def serve_help() -> str:
    result = run_cli("serve", "--help")
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_help_shows_each_setting_help_text(serve_help: str) -> None:
    text = " ".join(serve_help.split())
    for field in ("threads", "timeout_keep_alive", "limit_request_field_size", "access_log"):
        help_text = asyncwsgi.Config.__dataclass_fields__[field].metadata["help"]
        assert " ".join(help_text.split()) in text, field


def test_top_level_help_lists_serve() -> None:
    result = run_cli("--help")
    assert result.returncode == 0
    assert "serve" in result.stdout


# -- errors the user can fix: one line, no traceback ------------------------------------------


def assert_one_error_line(stderr: str, *fragments: str) -> None:
    assert "Traceback" not in stderr, stderr
    errors = [line for line in stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, stderr
    for fragment in fragments:
        assert fragment in errors[0], stderr
    others = [line for line in stderr.splitlines() if line and line not in errors]
    # The only other line allowed is the INFO line logged before binding.
    assert all("[INFO]" in line for line in others), stderr


@pytest.mark.parametrize(
    ("app", "extra", "fragments"),
    [
        ("nosuchmodule_xyz:app", (), ("nosuchmodule_xyz",)),
        ("nosuchpackage_xyz.sub:app", (), ("nosuchpackage_xyz.sub",)),
        ("tests.nosuchmodule:app", (), ("tests.nosuchmodule",)),
        ("tests.apps:nosuch_attribute", (), ("nosuch_attribute", "tests.apps")),
        ("tests.apps:CloseRecorder.nosuch", (), ("CloseRecorder.nosuch",)),
        ("tests.test_cli:NOT_CALLABLE", (), ("NOT_CALLABLE", "not a callable")),
        ("tests.test_cli:NOT_CALLABLE", ("--factory",), ("NOT_CALLABLE", "not callable")),
        ("tests.apps:hello:extra", (), ("MODULE:ATTRIBUTE",)),
        (":hello", (), ("MODULE:ATTRIBUTE",)),
    ],
)
def test_bad_application_gives_one_line(
    app: str, extra: tuple[str, ...], fragments: tuple[str, ...]
) -> None:
    result = run_cli("serve", app, "--port", "0", "--app-dir", str(ROOT), *extra)
    assert result.returncode == 1
    assert_one_error_line(result.stderr, *fragments)
    assert "Listening at" not in result.stderr


def test_missing_dependency_of_app_shows_its_traceback(tmp_path: Path) -> None:
    """A module that exists but imports something missing is a bug in the app: show where."""
    # The missing name is a prefix of the module's name, which must not hide the traceback.
    (tmp_path / "brokenapp.py").write_text("import broken\n\napplication = None\n")
    result = run_cli("serve", "brokenapp", "--port", "0", "--app-dir", str(tmp_path))
    assert result.returncode != 0
    assert "Traceback" in result.stderr
    assert "brokenapp.py" in result.stderr
    assert "No module named 'broken'" in result.stderr


def test_module_alone_means_application(tmp_path: Path) -> None:
    (tmp_path / "plainapp.py").write_text(
        "def application(environ, start_response):\n"
        "    start_response('200 OK', [('Content-Type', 'text/plain')])\n"
        "    return [b'gunicorn style']\n"
    )
    with CLIServer("plainapp", "--port", "0", "--app-dir", str(tmp_path)) as server:
        with http_client() as client:
            assert client.get(server.url()).text == "gunicorn style"
        assert server.stop() == 0


def test_port_in_use_gives_one_line_and_exit_1() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_cli("serve", "tests.apps:hello", "--port", str(port))
    assert result.returncode == 1
    assert_one_error_line(result.stderr, f"127.0.0.1:{port}", "in use")
    assert "Listening at" not in result.stderr


def test_second_bind_in_use_closes_the_first(tmp_path: Path) -> None:
    """A failing second address is reported and the first one is not left bound."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        path = tmp_path / "first.sock"
        result = run_cli(
            "serve", "tests.apps:hello", "-b", f"unix:{path}", "-b", f"127.0.0.1:{port}"
        )
    assert result.returncode == 1
    assert_one_error_line(result.stderr, f"127.0.0.1:{port}", "in use")


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (("--uds", "/nonexistent-dir-xyz/s.sock"), "unix:/nonexistent-dir-xyz/s.sock"),
        (("--fd", "987"), "fd://987"),
    ],
)
def test_cannot_listen_gives_one_line_and_exit_1(args: tuple[str, ...], fragment: str) -> None:
    result = run_cli("serve", "tests.apps:hello", *args)
    assert result.returncode == 1
    assert_one_error_line(result.stderr, fragment)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--threads", "many"), "argument --threads: invalid int value: 'many'"),
        (("--threads", "0"), "threads must be at least 1"),
        (("--port", "70000"), "port must be 0-65535"),
        (("--loop", "trio"), "argument --loop: invalid choice: 'trio'"),
        (("--log-level", "loud"), "argument --log-level: invalid choice: 'loud'"),
        (("--timeout-keep-alive", "soon"), "argument --timeout-keep-alive: invalid float"),
        (("--timeout-keep-alive", "-1"), "timeout_keep_alive must not be negative"),
        (("-b", "127.0.0.1:http"), "bad port in bind '127.0.0.1:http'"),
        (("--root-path", "prefix/"), "root_path must start"),
        (
            ("--forwarded-trust-headers", "x-forwarded-fro"),
            "forwarded_trust_headers: 'x-forwarded-fro'",
        ),
        (("--no-such-flag",), "unrecognized arguments: --no-such-flag"),
    ],
)
def test_bad_flag_value_exits_2(args: tuple[str, ...], message: str) -> None:
    result = run_cli("serve", "tests.apps:hello", *args)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert message in result.stderr
    # The usage shown is the serve subcommand's, whose flags the user got wrong.
    assert result.stderr.startswith("usage: asyncwsgi serve"), result.stderr


def test_missing_app_argument_exits_2() -> None:
    result = run_cli("serve")
    assert result.returncode == 2
    assert "APP" in result.stderr


# -- serving ----------------------------------------------------------------------------------


def test_python_m_serves_and_stops_on_sigterm() -> None:
    with CLIServer("tests.apps:hello", "--port", "0") as server:
        url = server.url()
        with http_client() as client:
            response = client.get(url + "/")
        assert response.status_code == 200
        assert response.text == "Hello, world!"
        assert response.headers["server"] == "asyncwsgi"
        assert server.stop() == 0
        assert "Received SIGTERM, shutting down" in server.output
        assert server.output.rstrip().endswith("Shutdown complete")


def test_console_script_serves() -> None:
    with CLIServer("tests.apps:hello", "--port", "0", command=[console_script()]) as server:
        with http_client() as client:
            assert client.get(server.url()).text == "Hello, world!"
        assert server.stop() == 0
        assert "Shutdown complete" in server.output


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_startup_lines_show_pid_loop_address_and_threads(loop: str) -> None:
    with CLIServer("tests.apps:hello", "--port", "0", "--threads", "7", "--loop", loop) as server:
        match = server.wait_for(LISTENING)
        url, threads = match.groups()
        assert re.fullmatch(r"http://127\.0\.0\.1:\d+", url)
        assert port_of(url) != 0
        assert threads == "7"
        starting = re.search(r"Starting asyncwsgi \(pid: (\d+), loop: (\w+)\)", server.output)
        assert starting is not None, server.output
        assert int(starting.group(1)) == server.proc.pid
        assert starting.group(2) == loop
        with http_client() as client:
            assert client.get(url).status_code == 200
        assert server.stop() == 0


def test_host_flag_binds_that_host() -> None:
    with CLIServer("tests.apps:hello", "--host", "127.0.0.2", "--port", "0") as server:
        url = server.url()
        assert url.startswith("http://127.0.0.2:")
        with http_client() as client:
            assert client.get(url).text == "Hello, world!"
        assert server.stop() == 0


def test_factory_flag_calls_the_factory() -> None:
    with CLIServer("tests.test_cli:make_app", "--factory", "--port", "0") as server:
        with http_client() as client:
            response = client.get(server.url())
        assert response.status_code == 200
        assert response.text == "made by the factory"
        assert server.stop() == 0


def test_without_factory_flag_the_factory_is_the_app() -> None:
    """Control for the test above: the same attribute served as an app fails (500)."""
    with CLIServer("tests.test_cli:make_app", "--port", "0") as server:
        with http_client() as client:
            response = client.get(server.url())
        assert response.status_code == 500
        assert server.stop() == 0


def test_root_path_sets_script_name() -> None:
    with CLIServer("tests.apps:environ_app", "--port", "0", "--root-path", "/mount") as server:
        with http_client() as client:
            environ = client.get(server.url() + "/mount/some/page?x=1").json()
        assert environ["SCRIPT_NAME"] == "/mount"
        assert environ["PATH_INFO"] == "/some/page"
        assert environ["QUERY_STRING"] == "x=1"
        assert server.stop() == 0


def test_forwarded_trust_headers_flag_limits_the_trusted_headers() -> None:
    args = ("--port", "0", "--forwarded-trust-headers", "X-Forwarded-Proto")
    headers = {"X-Forwarded-Proto": "https", "X-Forwarded-Host": "evil.example"}
    with CLIServer("tests.apps:environ_app", *args) as server:
        with http_client() as client:
            environ = client.get(server.url(), headers=headers).json()
        assert server.stop() == 0
    assert environ["wsgi.url_scheme"] == "https"
    assert environ["HTTP_X_FORWARDED_PROTO"] == "https"
    assert "HTTP_X_FORWARDED_HOST" not in environ
    assert environ["HTTP_HOST"] != "evil.example"


def test_uds_serves_over_a_unix_socket(tmp_path: Path) -> None:
    path = tmp_path / "app.sock"
    with CLIServer("tests.apps:environ_app", "--uds", str(path)) as server:
        assert server.started() == [f"unix:{path}"]
        with http_client(transport=httpx.HTTPTransport(uds=str(path))) as client:
            response = client.get("http://localhost/over/unix")
        assert response.status_code == 200
        environ = response.json()
        assert environ["PATH_INFO"] == "/over/unix"
        assert environ["REMOTE_ADDR"] == ""
        assert server.stop() == 0
    assert not path.exists(), "the socket file is removed on shutdown"


def test_bind_tcp_and_unix_together(tmp_path: Path) -> None:
    path = tmp_path / "both.sock"
    with CLIServer("tests.apps:hello", "-b", "127.0.0.1:0", "--bind", f"unix:{path}") as server:
        server.wait_for(LISTENING)
        server.wait_for(LISTENING)
        urls = server.started()
        assert len(urls) == 2
        assert re.fullmatch(r"http://127\.0\.0\.1:\d+", urls[0])
        assert urls[1] == f"unix:{path}"
        with http_client() as client:
            assert client.get(urls[0]).text == "Hello, world!"
        with http_client(transport=httpx.HTTPTransport(uds=str(path))) as client:
            assert client.get("http://localhost/").text == "Hello, world!"
        assert server.stop() == 0
    assert not path.exists()


def test_bind_ipv6_in_brackets() -> None:
    with CLIServer("tests.apps:environ_app", "-b", "[::1]:0") as server:
        url = server.url()
        assert re.fullmatch(r"http://\[::1\]:\d+", url), url
        with http_client() as client:
            environ = client.get(url + "/six").json()
        assert environ["REMOTE_ADDR"] == "::1"
        assert environ["PATH_INFO"] == "/six"
        assert server.stop() == 0


def test_fd_serves_on_an_inherited_socket() -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        fd = listener.fileno()
        with CLIServer("tests.apps:hello", "--fd", str(fd), pass_fds=[fd]) as server:
            assert server.started() == [f"http://127.0.0.1:{port}"]
            with http_client() as client:
                assert client.get(f"http://127.0.0.1:{port}/").text == "Hello, world!"
            assert server.stop() == 0


def test_gunicorn_spelling_of_limit_request_field_size_applies() -> None:
    with CLIServer(
        "tests.apps:hello", "--port", "0", "--limit-request-field_size", "100"
    ) as server:
        port = port_of(server.url())
        head = b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\nX-A: "
        small = raw_request(port, head + b"a" * 50 + b"\r\n\r\n")
        assert small.startswith(b"HTTP/1.1 200 "), small
        big = raw_request(port, head + b"a" * 200 + b"\r\n\r\n")
        assert big.startswith(b"HTTP/1.1 431 "), big
        assert server.stop() == 0


def test_limit_request_line_0_is_no_limit() -> None:
    """``--limit-request-line 0`` means no limit, as in gunicorn: a 100 KiB request line is
    served (with the head limit lifted too, as the line is part of the head). No access log:
    a 100 KiB line in it would fill the pipe the test reads the server's stderr from."""
    with CLIServer(
        "tests.apps:hello",
        "--port",
        "0",
        "--no-access-log",
        "--limit-request-line",
        "0",
        "--limit-request-head",
        "0",
    ) as server:
        port = port_of(server.url())
        target = b"/" + b"a" * (100 * 1024)
        reply = raw_request(
            port, b"GET " + target + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        assert reply.startswith(b"HTTP/1.1 200 "), reply[:100]
        assert server.stop() == 0


def test_timeout_keep_alive_closes_idle_connections() -> None:
    with CLIServer("tests.apps:hello", "--port", "0", "--timeout-keep-alive", "0.2") as server:
        port = port_of(server.url())
        with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as sock:
            sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            started = time.monotonic()
            data = recv_all(sock)  # returns when the server closes the idle connection
            assert time.monotonic() - started < 3.0
        assert data.startswith(b"HTTP/1.1 200 ")
        assert data.endswith(b"Hello, world!")
        assert server.stop() == 0


# -- graceful shutdown --------------------------------------------------------------------------


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_lets_in_flight_request_finish(signum: signal.Signals, tmp_path: Path) -> None:
    with (
        gate_socket(tmp_path) as (gate, gate_path),
        CLIServer("tests.test_cli:gated_app", "--port", "0", env={GATE_ENV: gate_path}) as server,
    ):
        port = port_of(server.url())
        with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as client:
            client.sendall(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n")
            release = accept_started(gate)
            server.proc.send_signal(signum)
            server.wait_for(rf"Received {signum.name}, shutting down")
            assert server.proc.poll() is None, "exited with a request in flight"
            with release:
                release.sendall(b"go")
            response = recv_all(client)
        assert response.startswith(b"HTTP/1.1 200 OK\r\n"), response
        assert response.endswith(b"\r\n\r\nfinished after go")
        assert server.finish() == 0
        assert "Shutdown complete" in server.output
        assert '"GET /slow HTTP/1.1" 200 17 ' in server.output


def test_graceful_shutdown_closes_idle_keep_alive_connections(tmp_path: Path) -> None:
    with (
        gate_socket(tmp_path) as (gate, gate_path),
        CLIServer("tests.test_cli:gated_app", "--port", "0", env={GATE_ENV: gate_path}) as server,
    ):
        port = port_of(server.url())
        with (
            socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as idle,
            socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as busy,
        ):
            busy.sendall(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n")
            release = accept_started(gate)
            server.proc.send_signal(signal.SIGTERM)
            assert_closed_by_server(idle)  # sent nothing: closed while the busy request is held
            with release:
                release.sendall(b"go")
            assert recv_all(busy).endswith(b"finished after go")
        assert server.finish() == 0


def test_graceful_timeout_cuts_a_stuck_request_and_exits(tmp_path: Path) -> None:
    """An app stuck past --graceful-timeout must not keep the process alive."""
    with (
        gate_socket(tmp_path) as (gate, gate_path),
        CLIServer(
            "tests.test_cli:gated_app",
            "--port",
            "0",
            "--graceful-timeout",
            "0.3",
            env={GATE_ENV: gate_path},
        ) as server,
    ):
        port = port_of(server.url())
        with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as client:
            client.sendall(b"GET /stuck HTTP/1.1\r\nHost: x\r\n\r\n")
            with accept_started(gate):  # never released while the server shuts down
                started = time.monotonic()
                status = server.stop(signal.SIGTERM, timeout=4.0)
                assert time.monotonic() - started < 4.0
                assert_closed_by_server(client)
        assert status == 0
        assert "Shutdown complete" in server.output


def test_second_signal_cuts_connections_and_exits(tmp_path: Path) -> None:
    with (
        gate_socket(tmp_path) as (gate, gate_path),
        CLIServer("tests.test_cli:gated_app", "--port", "0", env={GATE_ENV: gate_path}) as server,
    ):
        port = port_of(server.url())
        with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as client:
            client.sendall(b"GET /stuck HTTP/1.1\r\nHost: x\r\n\r\n")
            with accept_started(gate):
                server.proc.send_signal(signal.SIGINT)
                server.wait_for("Received SIGINT, shutting down")
                server.proc.send_signal(signal.SIGINT)
                server.wait_for("Received SIGINT again")
                assert_closed_by_server(client)
                assert server.finish(timeout=4.0) == 0
        assert "Shutdown complete" in server.output


# -- access log -------------------------------------------------------------------------------


def test_access_log_line_format() -> None:
    with CLIServer("tests.apps:hello", "--port", "0") as server:
        port = port_of(server.url())
        with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as sock:
            sock.sendall(b"GET /path?q=1 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            client_port = sock.getsockname()[1]
            assert recv_all(sock).endswith(b"Hello, world!")
        match = server.wait_for(ACCESS_LINE)
        assert match.group(0).split("] ", 3)[-1] == (
            f'127.0.0.1:{client_port} - "GET /path?q=1 HTTP/1.1" 200 13 {match["ms"]}ms'
        )
        assert int(match["pid"]) == server.proc.pid
        assert float(match["ms"]) < 5000
        assert server.stop() == 0


def test_access_log_counts_streamed_and_http10_responses() -> None:
    with CLIServer("tests.apps:stream", "--port", "0") as server:
        port = port_of(server.url())
        raw_request(port, b"GET /s?4 HTTP/1.0\r\n\r\n")
        match = server.wait_for(ACCESS_LINE)
        assert match["request"] == "GET /s?4 HTTP/1.0"
        assert (match["status"], match["size"]) == ("200", "4096")
        assert server.stop() == 0


def test_access_log_escapes_quotes_and_backslashes() -> None:
    """A request target cannot close the quoted field or forge escapes in the access line."""
    with CLIServer("tests.apps:hello", "--port", "0") as server:
        port = port_of(server.url())
        raw_request(port, b'GET /a"b\\c HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n')
        match = server.wait_for(ACCESS_LINE)
        assert match["request"] == 'GET /a\\"b\\\\c HTTP/1.1'
        assert server.stop() == 0


def test_error_log_escapes_control_characters_of_the_path() -> None:
    """A percent-encoded CR LF or ESC in the path cannot forge or colour a log line."""
    with CLIServer("tests.test_cli:failing_app", "--port", "0") as server:
        port = port_of(server.url())
        target = b"/boom%1b[31m%0d%0a[FAKE]%20injected%7f"
        reply = raw_request(port, b"GET " + target + b" HTTP/1.1\r\nHost: x\r\n\r\n")
        assert reply.startswith(b"HTTP/1.1 500 "), reply
        line = server.wait_for(r"\[ERROR\] Error handling request GET /boom.*")
        assert line.group(0) == (
            r"[ERROR] Error handling request GET /boom\x1b[31m\x0d\x0a[FAKE] injected\x7f"
        )
        # The access line names the raw target, which has no control characters to escape.
        assert server.wait_for(ACCESS_LINE)["request"] == f"GET {target.decode()} HTTP/1.1"
        assert server.stop() == 0
    assert b"\x1b" not in server.raw_output
    assert b"\x7f" not in server.raw_output
    assert not re.search(r"^\[FAKE\]", server.output, re.MULTILINE)


def test_control_characters_in_a_rejected_request_are_not_logged_raw() -> None:
    with CLIServer("tests.apps:hello", "--port", "0", "--log-level", "debug") as server:
        port = port_of(server.url())
        reply = raw_request(port, b"GET /a\x1b[31mred\x7f HTTP/1.1\r\nHost: x\r\n\r\n")
        assert reply.startswith(b"HTTP/1.1 400 "), reply
        reply = raw_request(port, b"GET / HTTP/1.1\r\nHost: x\r\nX-Bad: \x1b[31m\x00\r\n\r\n")
        assert reply.startswith(b"HTTP/1.1 400 "), reply
        server.wait_for(r"\[WARNING\] Invalid HTTP request from 127\.0\.0\.1:\d+: 400")
        server.wait_for(r"\[WARNING\] Invalid HTTP request from 127\.0\.0\.1:\d+: 400")
        assert server.stop() == 0
    for byte in (b"\x1b", b"\x7f"):
        assert byte not in server.raw_output, server.raw_output


def test_no_access_log_silences_access_lines() -> None:
    with CLIServer("tests.apps:hello", "--port", "0", "--no-access-log") as server:
        port = port_of(server.url())
        for _ in range(3):
            reply = raw_request(
                port, b"GET /quiet HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
            )
            assert reply.endswith(b"Hello, world!")
        assert server.stop() == 0
    assert "/quiet" not in server.output
    assert not ACCESS_LINE.search(server.output)
    assert "Shutdown complete" in server.output  # other logging is still on


def test_log_level_warning_hides_info_lines() -> None:
    # Nothing is logged at startup, so serve on a socket bound here to know where it listens.
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        fd = listener.fileno()
        args = ("--fd", str(fd), "--log-level", "warning")
        with CLIServer("tests.apps:hello", *args, pass_fds=[fd]) as server:
            reply = raw_request(port, b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            assert reply.endswith(b"Hello, world!")
            assert server.stop() == 0
    assert server.output == ""
