"""``asyncwsgi.make_server``, used the way code written for ``wsgiref.simple_server`` uses it:
``serve_forever()`` in one thread, ``shutdown()`` from another, ``handle_request()``, the context
manager, ``server_port``. Real sockets on 127.0.0.1:0; threads are joined before each test ends.
"""

from __future__ import annotations

import contextlib
import http.client
import signal
import socket
import subprocess
import sys
import threading
import urllib.request
import wsgiref.simple_server
from collections.abc import Iterable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

import asyncwsgi
import asyncwsgi.simple_server
from asyncwsgi import ConfigError, make_server

from . import apps

TIMEOUT = 10.0
ROOT = Path(__file__).resolve().parent.parent


def get(port: int, path: str = "/") -> tuple[int, bytes]:
    """A GET with urllib, ignoring proxy settings from the environment."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(f"http://127.0.0.1:{port}{path}", timeout=TIMEOUT) as response:
        return response.status, response.read()


@contextlib.contextmanager
def serving_in_thread(httpd: Any) -> Iterator[threading.Thread]:
    """The classic pattern: serve_forever in a thread, shutdown() and join at the end."""
    thread = threading.Thread(target=httpd.serve_forever, name="serve_forever")
    thread.start()
    try:
        yield thread
    finally:
        httpd.shutdown()
        thread.join(TIMEOUT)
        assert not thread.is_alive(), "serve_forever did not return after shutdown()"


def test_make_server_is_exported() -> None:
    assert asyncwsgi.make_server is asyncwsgi.simple_server.make_server


@pytest.mark.parametrize("module", [wsgiref.simple_server, asyncwsgi.simple_server])
def test_same_code_runs_on_wsgiref_and_asyncwsgi(module: ModuleType) -> None:
    """Code written against wsgiref switches by changing the module it imports from."""
    with module.make_server("127.0.0.1", 0, apps.hello) as httpd, serving_in_thread(httpd):
        port = httpd.server_port
        assert httpd.server_address == ("127.0.0.1", port)
        assert get(port) == (200, b"Hello, world!")
        assert get(port, "/again") == (200, b"Hello, world!")


def test_serve_forever_in_the_calling_thread_stopped_from_another() -> None:
    results: list[tuple[int, bytes]] = []
    errors: list[BaseException] = []
    httpd = make_server("127.0.0.1", 0, apps.environ_app)

    def client() -> None:
        try:
            results.append(get(httpd.server_port, "/from/client"))
        except BaseException as exc:
            errors.append(exc)
        finally:
            httpd.shutdown()

    # The socket listens from make_server() on, so the client may connect before serving.
    thread = threading.Thread(target=client)
    thread.start()
    try:
        httpd.serve_forever()  # returns when the client thread calls shutdown()
    finally:
        thread.join(TIMEOUT)
        httpd.server_close()
    assert not errors, errors
    ((status, body),) = results
    assert status == 200
    assert b'"PATH_INFO": "/from/client"' in body
    assert b'"wsgi.multithread": true' in body


def test_keep_alive_connections_are_served_and_closed_by_shutdown() -> None:
    with make_server("127.0.0.1", 0, apps.hello) as httpd:
        with serving_in_thread(httpd):
            conn = http.client.HTTPConnection("127.0.0.1", httpd.server_port, timeout=TIMEOUT)
            for _ in range(3):
                conn.request("GET", "/")
                response = conn.getresponse()
                assert response.read() == b"Hello, world!"
            sock = conn.sock
            assert sock is not None
        # serve_forever has returned: the idle keep-alive connection was closed.
        assert sock.recv(1) == b""
        conn.close()


def test_shutdown_lets_the_request_in_flight_finish(monkeypatch: pytest.MonkeyPatch) -> None:
    entered = threading.Event()
    release = threading.Event()
    shutting_down = threading.Event()

    class Server(asyncwsgi.Server):
        async def shutdown(self, timeout: float | None = None) -> None:
            shutting_down.set()
            await super().shutdown(timeout)

    monkeypatch.setattr(asyncwsgi.simple_server, "Server", Server)

    def app(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        entered.set()
        release.wait(TIMEOUT)
        start_response("200 OK", [("Content-Length", "4")])
        return [b"done"]

    results: list[tuple[int, bytes]] = []
    with make_server("127.0.0.1", 0, app) as httpd, serving_in_thread(httpd):
        client = threading.Thread(target=lambda: results.append(get(httpd.server_port)))
        client.start()
        assert entered.wait(TIMEOUT)
        stopper = threading.Thread(target=httpd.shutdown)
        stopper.start()
        assert shutting_down.wait(TIMEOUT)  # the graceful shutdown has begun
        release.set()
        stopper.join(TIMEOUT)
        client.join(TIMEOUT)
    assert results == [(200, b"done")]


def test_serve_forever_again_after_shutdown() -> None:
    with make_server("127.0.0.1", 0, apps.hello) as httpd:
        for _ in range(2):
            with serving_in_thread(httpd):
                assert get(httpd.server_port) == (200, b"Hello, world!")


def test_shutdown_when_not_serving_returns_at_once() -> None:
    with make_server("127.0.0.1", 0, apps.hello) as httpd:
        httpd.shutdown()


def test_handle_request_serves_one_request_per_call() -> None:
    paths: list[str] = []

    def app(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        paths.append(environ["PATH_INFO"])
        start_response("200 OK", [("Content-Length", "2")])
        return [b"ok"]

    results: list[tuple[int, bytes]] = []
    with make_server("127.0.0.1", 0, app) as httpd:
        port = httpd.server_port
        client = threading.Thread(target=lambda: results.append(get(port, "/one")))
        client.start()
        httpd.handle_request()
        client.join(TIMEOUT)
        assert paths == ["/one"]
        assert results == [(200, b"ok")]
        client = threading.Thread(target=lambda: results.append(get(port, "/two")))
        client.start()
        httpd.handle_request()
        client.join(TIMEOUT)
    assert paths == ["/one", "/two"]
    assert results == [(200, b"ok"), (200, b"ok")]


def test_handle_request_returns_after_timeout_without_a_request() -> None:
    with make_server("127.0.0.1", 0, apps.hello) as httpd:
        httpd.timeout = 0.01
        httpd.handle_request()  # returns: nobody connected


def test_handle_request_counts_a_failing_app() -> None:
    def app(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        raise RuntimeError("boom")

    statuses: list[int] = []

    def client(port: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=TIMEOUT)
        conn.request("GET", "/")
        statuses.append(conn.getresponse().status)
        conn.close()

    with make_server("127.0.0.1", 0, app) as httpd:
        thread = threading.Thread(target=client, args=(httpd.server_port,))
        thread.start()
        httpd.handle_request()
        thread.join(TIMEOUT)
    assert statuses == [500]


def test_server_close_closes_the_listening_socket() -> None:
    httpd = make_server("127.0.0.1", 0, apps.hello)
    port = httpd.server_port
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT):
        pass  # listening from make_server() on
    httpd.server_close()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)


def test_get_app_set_app_and_empty_host() -> None:
    def other(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        start_response("200 OK", [("Content-Length", "5")])
        return [b"other"]

    with make_server("", 0, apps.hello) as httpd:
        assert httpd.server_address[0] == "0.0.0.0"
        assert httpd.get_app() is apps.hello
        httpd.set_app(other)
        with serving_in_thread(httpd):
            assert get(httpd.server_port) == (200, b"other")


def test_options_are_config_fields() -> None:
    with make_server("127.0.0.1", 0, apps.hello, threads=3) as httpd:
        assert httpd.config.threads == 3
    with pytest.raises(ConfigError):
        make_server("127.0.0.1", 0, apps.hello, threads=0)
    with pytest.raises(TypeError, match="handler_class"):
        make_server(
            "127.0.0.1", 0, apps.hello, handler_class=wsgiref.simple_server.WSGIRequestHandler
        )


SCRIPT = """
import sys
from asyncwsgi.simple_server import make_server
from tests.apps import hello

with make_server("127.0.0.1", 0, hello) as httpd:
    print(httpd.server_port, flush=True)
    try:
        httpd.serve_forever()
    except KeyboardInterrupt:
        print("interrupted", flush=True)
"""


def test_ctrl_c_stops_serve_forever_with_keyboard_interrupt() -> None:
    """As with wsgiref: Ctrl-C raises KeyboardInterrupt out of serve_forever()."""
    proc = subprocess.Popen(
        [sys.executable, "-c", SCRIPT],
        cwd=ROOT,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        port = int(proc.stdout.readline())
        assert get(port) == (200, b"Hello, world!")  # serve_forever is running
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err
    assert out == "interrupted\n"
    assert "Traceback" not in err


_SIGINT_SCRIPT = """
import sys
from asyncwsgi import make_server

def app(environ, start_response):
    start_response("200 OK", [("Content-Length", "2")])
    return [b"ok"]

server = make_server("127.0.0.1", 0, app, loop=sys.argv[1])
print(server.server_port, flush=True)
try:
    server.serve_forever()
except KeyboardInterrupt:
    print("interrupted", flush=True)
    sys.exit(0)
"""


@pytest.mark.parametrize("loop_name", ["uvloop", "asyncio"])
def test_ctrl_c_stops_serve_forever_under_load(loop_name: str) -> None:
    """SIGINT while requests are in flight ends serve_forever() with KeyboardInterrupt."""
    import http.client
    import signal
    import subprocess
    import sys
    import threading

    proc = subprocess.Popen(
        [sys.executable, "-c", _SIGINT_SCRIPT, loop_name], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None
    port = int(proc.stdout.readline())
    answered = threading.Event()
    stop = threading.Event()

    def load() -> None:
        while not stop.is_set():
            try:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
                conn.request("GET", "/")
                if conn.getresponse().read() == b"ok":
                    answered.set()
                conn.close()
            except OSError:
                return

    client = threading.Thread(target=load)
    client.start()
    try:
        assert answered.wait(10)
        proc.send_signal(signal.SIGINT)
        assert proc.stdout.readline().strip() == "interrupted"
        assert proc.wait(10) == 0
    finally:
        stop.set()
        client.join()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
