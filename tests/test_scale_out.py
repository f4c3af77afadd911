"""Scale-out: rolling restarts of several asyncwsgi instances behind a real load balancer.

Each instance is a ``asyncwsgi serve`` subprocess on its own 127.0.0.1 port, with
``--health-path /healthz --shutdown-delay 1``, serving an application that answers its pid. A
few client threads send GET requests with keep-alive through the balancer for the whole test,
bounded in count and time. Then each instance in turn gets SIGTERM, is waited for until it has
exited, and is replaced by a new process on the same port, which must serve traffic through
the balancer before the next instance goes. No request may fail.

- HAProxy (three instances): active health checks on ``/healthz`` every 200 ms take an instance
  out of rotation while ``--shutdown-delay`` keeps it serving, and put its replacement back in.
  The test follows HAProxy's own "Server app/sN is DOWN/UP" lines.
- nginx (two instances): open-source nginx has no active health checks, so it relies on
  passive ones: a refused connection, or a kept-alive connection closed under a request, marks
  the server failed for ``fail_timeout`` and the idempotent GET is retried on the other one
  (``proxy_next_upstream``).

Both balancers listen on a socket the test bound and passes down (``bind fd@N`` for HAProxy,
the ``NGINX`` variable for nginx), so their port is known before they start. The configurations
are the README's "Running at scale" ones. Without haproxy or nginx these tests are skipped,
except under ``CI=true``, where they fail (``.ci/run`` installs both).
"""

from __future__ import annotations

import collections
import contextlib
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import httpx

from .helpers import TIMEOUT, ProcessOutput, nginx_preamble, require_program
from .test_cli import CLIServer, port_of

#: Answers ``str(os.getpid())``: which instance served a request.
APP = "tests.test_stuck_threads:app"
SHUTDOWN_DELAY = 1
#: Client threads, each with one keep-alive connection to the balancer.
CLIENTS = 3
#: Bounds of the load: requests in all, seconds, and the pause between one client's requests.
MAX_REQUESTS = 20_000
MAX_SECONDS = 30.0
PAUSE = 0.005


class Program(CLIServer):
    """An external program (haproxy, nginx) whose stderr is read as it arrives, with
    :class:`CLIServer`'s ``wait_for``, ``finish``, ``stop`` and ``close``.

    Args:
        argv: the command line.
        pass_fds: file descriptors it inherits (its listening socket).
        env: extra environment variables.
    """

    def __init__(
        self, argv: Sequence[str], pass_fds: Sequence[int] = (), env: dict[str, str] | None = None
    ) -> None:
        self.proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env={**os.environ, **(env or {})},
            pass_fds=tuple(pass_fds),
        )
        assert self.proc.stderr is not None
        ProcessOutput.__init__(self, self.proc.stderr.fileno())


def start_instance(stack: contextlib.ExitStack, port: int = 0) -> CLIServer:
    """Start one instance on 127.0.0.1:``port`` (0: any) and wait until it listens; ``stack``
    kills it at the end if it is still running."""
    server = stack.enter_context(
        CLIServer(
            APP,
            *("--host", "127.0.0.1", "--port", str(port)),
            *("--health-path", "/healthz", "--shutdown-delay", str(SHUTDOWN_DELAY)),
            "--no-access-log",
            env={"WEB_CONCURRENCY": ""},  # one unsupervised process: its pid answers
        )
    )
    server.started()
    return server


@contextlib.contextmanager
def listener() -> Iterator[socket.socket]:
    """The balancer's listening socket on 127.0.0.1, bound here and inherited by it."""
    sock = socket.socket()
    try:
        sock.bind(("127.0.0.1", 0))
        sock.listen(128)
        sock.set_inheritable(True)
        yield sock
    finally:
        sock.close()


class Load:
    """:data:`CLIENTS` threads sending ``GET /`` through ``url`` until :meth:`stop`, or until
    :data:`MAX_REQUESTS` or :data:`MAX_SECONDS` is reached.

    A request fails on any transport error, a status other than 200, or a body that is not a
    pid. :attr:`served` counts the responses of each pid.
    """

    def __init__(self, url: str) -> None:
        self.url = url
        self.sent = 0
        self.failed: list[str] = []
        self.served: collections.Counter[int] = collections.Counter()
        self._changed = threading.Condition()
        self._stopping = threading.Event()
        self._running = CLIENTS
        self._deadline = time.monotonic() + MAX_SECONDS
        self._threads = [
            threading.Thread(target=self._client, name=f"load-{n}") for n in range(CLIENTS)
        ]

    def __enter__(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def stop(self) -> None:
        self._stopping.set()
        for thread in self._threads:
            thread.join(TIMEOUT * 2)
        assert not any(thread.is_alive() for thread in self._threads)

    def _client(self) -> None:
        try:
            with httpx.Client(base_url=self.url, trust_env=False, timeout=TIMEOUT) as client:
                for _ in range(MAX_REQUESTS // CLIENTS):
                    if self._stopping.is_set() or time.monotonic() > self._deadline:
                        break
                    pid, error = 0, ""
                    try:
                        response = client.get("/")
                        if response.status_code == 200 and response.text.isdigit():
                            pid = int(response.text)
                        else:
                            error = f"{response.status_code} {response.text[:200]!r}"
                    except httpx.HTTPError as exc:
                        error = repr(exc)
                    with self._changed:
                        self.sent += 1
                        if error:
                            self.failed.append(error)
                        else:
                            self.served[pid] += 1
                        self._changed.notify_all()
                    self._stopping.wait(PAUSE)
        finally:
            with self._changed:
                self._running -= 1
                self._changed.notify_all()

    def wait_served(self, pid: int) -> None:
        """Wait until a response from ``pid`` came through the balancer."""
        with self._changed:
            self._changed.wait_for(lambda: self.served[pid] > 0 or not self._running, TIMEOUT)
            assert self.served[pid] > 0, (
                f"no response from pid {pid} through the balancer "
                f"({self.sent} sent, served: {dict(self.served)}, failed: {self.failed[:5]})"
            )

    def report(self, balancer: str) -> str:
        return (
            f"rolling restart behind {balancer}: {self.sent} requests sent, "
            f"{len(self.failed)} failed; responses per pid: {dict(self.served)}"
        )


def rolling_restart(
    stack: contextlib.ExitStack,
    instances: list[CLIServer],
    load: Load,
    out_of_rotation: Callable[[int], None] = lambda index: None,
    back_in_rotation: Callable[[int], None] = lambda index: None,
) -> set[int]:
    """Replace each of ``instances`` in turn, under ``load``: SIGTERM, wait for its exit, start
    a new process on its port, and wait until the balancer sends it traffic. The two callbacks
    wait for the balancer's view of instance ``index``: after SIGTERM, and after the restart.
    Return the pids of every instance, the replaced and the replacements."""
    pids = {instance.proc.pid for instance in instances}
    for index, old in enumerate(instances):
        load.wait_served(old.proc.pid)  # it was in rotation, under load, when it went
        port = port_of(old.url())
        old.proc.send_signal(signal.SIGTERM)
        old.wait_for(r"Received SIGTERM; serving \d+ s more while the health check answers 503")
        out_of_rotation(index)
        assert old.finish() == 0, old.output
        assert "Shutdown complete" in old.output
        new = start_instance(stack, port)
        back_in_rotation(index)
        load.wait_served(new.proc.pid)
        instances[index] = new
        pids.add(new.proc.pid)
    return pids


# -- HAProxy ------------------------------------------------------------------------------------


def haproxy_config(listen_fd: int, ports: Sequence[int]) -> str:
    """The README's HAProxy configuration, listening on the inherited ``listen_fd``."""
    servers = "\n".join(
        f"    server app{n} 127.0.0.1:{port} check" for n, port in enumerate(ports, 1)
    )
    return f"""global
    maxconn 256

defaults
    mode http
    timeout connect 1s
    timeout client 30s
    timeout server 30s
    timeout http-keep-alive 10s
    timeout check 1s
    retries 3
    option redispatch 1
    retry-on conn-failure empty-response response-timeout

frontend web
    bind fd@{listen_fd}
    default_backend app

backend app
    balance roundrobin
    http-request disable-l7-retry if !METH_GET
    option httpchk GET /healthz
    http-check expect status 200
    default-server inter 200ms fall 1 rise 1
{servers}
"""


def test_rolling_restart_behind_haproxy_fails_no_request(tmp_path: Path) -> None:
    haproxy = require_program("haproxy")
    with contextlib.ExitStack() as stack:
        instances = [start_instance(stack) for _ in range(3)]
        sock = stack.enter_context(listener())
        config = tmp_path / "haproxy.cfg"
        ports = [port_of(instance.url()) for instance in instances]
        config.write_text(haproxy_config(sock.fileno(), ports))
        # -db: foreground, server state changes and alerts on stderr.
        balancer = stack.enter_context(
            Program([haproxy, "-db", "-f", str(config)], pass_fds=[sock.fileno()])
        )

        def out_of_rotation(index: int) -> None:
            # Taken out by the failing health check while it still serves (--shutdown-delay),
            # not by a refused connection after it has gone.
            balancer.wait_for(
                rf"Server app/app{index + 1} is DOWN, reason: Layer7 wrong status, code: 503"
            )

        def back_in_rotation(index: int) -> None:
            balancer.wait_for(rf"Server app/app{index + 1} is UP, reason: Layer7 check passed")

        with Load(f"http://127.0.0.1:{sock.getsockname()[1]}") as load:
            pids = rolling_restart(stack, instances, load, out_of_rotation, back_in_rotation)
        print(load.report("HAProxy"))
        assert balancer.stop(signal.SIGUSR1) == 0, balancer.output  # soft stop
    assert load.failed == [], load.report("HAProxy") + "\n" + "\n".join(load.failed[:20])
    assert "no server available" not in balancer.output, balancer.output
    # Every original instance and every replacement served through HAProxy.
    assert len(pids) == 6
    assert set(load.served) == pids, load.report("HAProxy")
    assert sum(load.served.values()) == load.sent


# -- nginx --------------------------------------------------------------------------------------


def nginx_config(directory: Path, port: int, upstream_ports: Sequence[int]) -> str:
    """The README's nginx configuration for several instances, every path in ``directory``."""
    servers = "\n".join(
        f"        server 127.0.0.1:{p} max_fails=1 fail_timeout=1s;" for p in upstream_ports
    )
    return f"""{nginx_preamble(directory, 256)}

    upstream app {{
{servers}
        keepalive 8;
        keepalive_timeout 4s;
    }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://app;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $host;
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
            proxy_set_header X-Forwarded-Proto $scheme;
            proxy_connect_timeout 1s;
            proxy_next_upstream error timeout http_503;
            proxy_next_upstream_tries 3;
            proxy_next_upstream_timeout 10s;
        }}
    }}
}}
"""


def test_rolling_restart_behind_nginx_fails_no_request(tmp_path: Path) -> None:
    nginx = require_program("nginx")
    with contextlib.ExitStack() as stack:
        instances = [start_instance(stack) for _ in range(2)]
        sock = stack.enter_context(listener())
        port = sock.getsockname()[1]
        config = tmp_path / "nginx.conf"
        upstream_ports = [port_of(instance.url()) for instance in instances]
        config.write_text(nginx_config(tmp_path, port, upstream_ports))
        balancer = stack.enter_context(
            Program(
                [nginx, "-p", str(tmp_path), "-c", str(config), "-e", "stderr"],
                pass_fds=[sock.fileno()],
                env={"NGINX": f"{sock.fileno()};"},  # inherit the listening socket
            )
        )
        balancer.wait_for("start worker process ")
        with Load(f"http://127.0.0.1:{port}") as load:
            pids = rolling_restart(stack, instances, load)
        print(load.report("nginx"))
        assert balancer.stop(signal.SIGQUIT) == 0, balancer.output  # graceful stop
    assert load.failed == [], load.report("nginx") + "\n" + "\n".join(load.failed[:20])
    assert "no live upstreams" not in balancer.output, balancer.output
    assert len(pids) == 4
    assert set(load.served) == pids, load.report("nginx")
    assert sum(load.served.values()) == load.sent
