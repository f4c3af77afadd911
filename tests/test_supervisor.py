"""Worker processes and --reload, with real processes, signals and sockets."""

from __future__ import annotations

import http.client
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DEADLINE = 20.0

PID_APP = """
import os

def app(environ, start_response):
    body = ("%d %s" % (os.getpid(), VERSION)).encode()
    start_response("200 OK", [("Content-Length", str(len(body)))])
    return [body]

VERSION = "{version}"
"""


class Proc:
    """A server subprocess whose stderr lines are collected as they arrive."""

    def __init__(self, args: list[str], cwd: Path, *, new_session: bool = False) -> None:
        self.lines: list[str] = []
        self._queue: queue.Queue[str] = queue.Queue()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "asyncwsgi", "serve", *args],
            cwd=cwd,
            stderr=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            text=True,
            env={**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"},
            start_new_session=new_session,  # its own process group, for killpg()
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self._queue.put(line)

    def wait_for(self, pattern: str, count: int = 1) -> list[str]:
        """Wait until ``count`` stderr lines (in all) match ``pattern``; return them."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + DEADLINE
        while True:
            found = [line for line in self.lines if regex.search(line)]
            if len(found) >= count:
                return found
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"no {count}x {pattern!r} in:\n{''.join(self.lines)}")
            try:
                self.lines.append(self._queue.get(timeout=remaining))
            except queue.Empty:
                continue

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(DEADLINE)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
            self._reader.join(DEADLINE)
            assert self.proc.stderr is not None
            self.proc.stderr.close()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _get(port: int) -> str:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", "/")
        response = conn.getresponse()
        assert response.status == 200
        return response.read().decode()
    finally:
        conn.close()


@pytest.fixture
def app_dir(tmp_path: Path) -> Path:
    (tmp_path / "pidapp.py").write_text(PID_APP.format(version="v1"))
    return tmp_path


@pytest.fixture
def workers(app_dir: Path) -> Iterator[tuple[Proc, int]]:
    port = _free_port()
    proc = Proc(["pidapp:app", "--port", str(port), "-w", "2", "--no-access-log"], app_dir)
    proc.wait_for("Listening at", count=2)
    yield proc, port
    proc.stop()


def _worker_pids(proc: Proc) -> set[int]:
    return {
        int(m) for line in proc.lines for m in re.findall(r"Booting worker with pid: (\d+)", line)
    }


def test_workers_serve_and_share_the_socket(workers: tuple[Proc, int]) -> None:
    proc, port = workers
    pids = _worker_pids(proc)
    assert len(pids) == 2
    seen = {int(_get(port).split()[0]) for _ in range(40)}
    assert seen  # only workers answer, never the supervisor
    assert seen <= pids


def test_killed_worker_is_replaced(workers: tuple[Proc, int]) -> None:
    proc, port = workers
    victim = min(_worker_pids(proc))
    os.kill(victim, signal.SIGKILL)
    proc.wait_for(rf"Worker \(pid: {victim}\) died with SIGKILL; starting a new one")
    proc.wait_for("Listening at", count=3)
    assert len(_worker_pids(proc)) == 3
    assert _get(port).split()[1] == "v1"


def test_workers_stop_when_the_supervisor_is_killed(workers: tuple[Proc, int]) -> None:
    """A supervisor killed outright (SIGKILL, the OOM killer) leaves no worker serving on."""
    proc, _ = workers
    pids = _worker_pids(proc)
    supervisor = proc.proc.pid
    proc.proc.kill()
    proc.wait_for(rf"Supervisor \(pid: {supervisor}\) is gone; shutting down", count=2)
    for pid in pids:
        proc.wait_for(rf"\[{pid}\] \[INFO\] Shutdown complete")
    deadline = time.monotonic() + DEADLINE
    while pids and time.monotonic() < deadline:
        for pid in list(pids):
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                pids.discard(pid)
        time.sleep(0.01)  # a bounded poll: an orphan's exit has no event to wait on here
    assert not pids


def test_sighup_reloads_without_failed_requests(workers: tuple[Proc, int]) -> None:
    proc, port = workers
    before = _worker_pids(proc)
    failures: list[BaseException] = []
    answered: set[int] = set()
    stop = threading.Event()

    def client() -> None:
        while not stop.is_set():
            try:
                answered.add(int(_get(port).split()[0]))
            except Exception as exc:
                failures.append(exc)

    threads = [threading.Thread(target=client) for _ in range(4)]
    for thread in threads:
        thread.start()
    try:
        proc.proc.send_signal(signal.SIGHUP)
        proc.wait_for("Listening at", count=4)  # two replacements are up
        proc.wait_for(r"Shutdown complete", count=2)  # and both old workers have stopped
    finally:
        stop.set()
        for thread in threads:
            thread.join()
    after = _worker_pids(proc) - before
    assert len(after) == 2
    assert not failures, failures[:3]
    assert {int(_get(port).split()[0]) for _ in range(20)} <= after


def test_sigusr1_reopens_the_access_log_in_every_process(app_dir: Path) -> None:
    """logrotate's move-then-signal: lines before SIGUSR1 stay in the moved file, every line
    after it goes to a new file at the configured path, from every worker."""
    port = _free_port()
    log = app_dir / "access.log"
    args = ["pidapp:app", "--port", str(port), "-w", "2", "--access-logfile", str(log)]
    proc = Proc(args, app_dir)
    try:
        proc.wait_for("Listening at", count=2)
        for _ in range(4):
            _get(port)
        log.rename(app_dir / "access.log.1")
        proc.proc.send_signal(signal.SIGUSR1)
        proc.wait_for(r"Received SIGUSR1, reopening 1 log file", count=3)  # supervisor, workers
        for _ in range(6):
            _get(port)
    finally:
        assert proc.stop() == 0
    assert len((app_dir / "access.log.1").read_text().splitlines()) == 4
    assert len(log.read_text().splitlines()) == 6


def test_max_requests_recycles_workers(app_dir: Path) -> None:
    port = _free_port()
    proc = Proc(
        ["pidapp:app", "--port", str(port), "-w", "1", "--max-requests", "5", "--no-access-log"],
        app_dir,
    )
    try:
        proc.wait_for("Listening at")
        first = int(_get(port).split()[0])
        for _ in range(5):
            _get(port)
        proc.wait_for("Maximum request limit of 5 exceeded")
        proc.wait_for("reached --max-requests; starting a new one")
        proc.wait_for("Listening at", count=2)
        assert int(_get(port).split()[0]) != first
    finally:
        assert proc.stop() == 0


def test_worker_that_cannot_import_stops_supervisor(tmp_path: Path) -> None:
    proc = Proc(["nosuchmodule:app", "--port", str(_free_port()), "-w", "2"], tmp_path)
    try:
        assert proc.proc.wait(DEADLINE) == 3
        proc.wait_for("could not import module 'nosuchmodule'")
        proc.wait_for("failed to boot")
    finally:
        assert proc.stop() == 3


def test_sigterm_stops_workers_and_exits_zero(workers: tuple[Proc, int]) -> None:
    proc, _ = workers
    assert proc.stop() == 0
    proc.wait_for("Supervisor shutdown complete")
    for pid in _worker_pids(proc):
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def _write(path: Path, text: str) -> None:
    """Replace a file in one step, as an editor saving it does (one change event)."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _until_version(port: int, version: str) -> None:
    """Ask the server until it answers with ``version`` (the reload is observed, not timed)."""
    deadline = time.monotonic() + DEADLINE
    seen = ""
    while time.monotonic() < deadline:
        seen = _get(port).split()[1]
        if seen == version:
            return
    raise AssertionError(f"still {seen!r}, expected {version!r}")


def test_reload_restarts_on_change_and_survives_syntax_error(app_dir: Path) -> None:
    port = _free_port()
    proc = Proc(
        ["pidapp:app", "--port", str(port), "--reload", "--reload-dir", str(app_dir)], app_dir
    )
    try:
        proc.wait_for("Listening at")
        assert _get(port).split()[1] == "v1"
        _write(app_dir / "pidapp.py", PID_APP.format(version="v2"))
        proc.wait_for(r"detected changes in 'pidapp.py'\. Reloading")
        _until_version(port, "v2")
        # A syntax error: the error is shown, the old worker keeps serving, the reloader lives.
        _write(app_dir / "pidapp.py", "def app(:\n")
        proc.wait_for("SyntaxError")
        proc.wait_for("reload abandoned")
        assert _get(port).split()[1] == "v2"
        _write(app_dir / "pidapp.py", PID_APP.format(version="v3"))
        _until_version(port, "v3")
        # A file that does not match the include glob changes nothing.
        reloads = len(proc.wait_for("detected changes in"))
        (app_dir / "notes.txt").write_text("hello")
        _write(app_dir / "pidapp.py", PID_APP.format(version="v4"))
        _until_version(port, "v4")
        proc.wait_for(r"detected changes in 'pidapp.py'", count=reloads + 1)
        assert not [line for line in proc.lines if "notes.txt" in line]
    finally:
        assert proc.stop() == 0


# -- generations: SIGHUP, crashes and boot failures during a reload --------------------------

SLOW_APP = """
import os
import time

time.sleep({boot_delay})  # a slow import: the window in which a replacement boots

def app(environ, start_response):
    seconds = float(environ.get("QUERY_STRING") or 0)
    body = ("%d %s" % (os.getpid(), VERSION)).encode()
    start_response("200 OK", [("Content-Length", str(len(body)))])
    time.sleep(seconds)
    return [body]

VERSION = "{version}"
"""


def _slow_app(app_dir: Path, version: str, boot_delay: float = 0.0) -> None:
    _write(app_dir / "pidapp.py", SLOW_APP.format(version=version, boot_delay=boot_delay))


def _children(pid: int) -> set[int]:
    """The live child processes of ``pid`` (Linux)."""
    text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    alive = set()
    for child in map(int, text.split()):
        try:
            state = Path(f"/proc/{child}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except FileNotFoundError:
            continue
        if state != "Z":
            alive.add(child)
    return alive


def _converges(proc: Proc, port: int, count: int, version: str) -> None:
    """Wait until the supervisor has exactly ``count`` workers, each serving ``version``
    (bounded polling of process state: no event tells that a process has exited)."""
    deadline = time.monotonic() + DEADLINE
    while True:
        children = _children(proc.proc.pid)
        if len(children) == count:
            answers = {_get(port) for _ in range(8 * count)}
            if all(a.split()[1] == version for a in answers):
                return
        if time.monotonic() > deadline:
            raise AssertionError(
                f"{len(children)} workers, expected {count} serving {version}:\n"
                + "".join(proc.lines)
            )
        with pytest.raises(subprocess.TimeoutExpired):
            proc.proc.wait(0.1)  # the supervisor must still run


def test_second_sighup_during_reload_ends_with_newest_code(app_dir: Path) -> None:
    """Each SIGHUP is a new generation: a second one while the first is under way is not lost,
    and the count of workers comes back to --workers."""
    port = _free_port()
    _slow_app(app_dir, "v1", boot_delay=0.5)
    proc = Proc(["pidapp:app", "--port", str(port), "-w", "2", "--no-access-log"], app_dir)
    try:
        proc.wait_for("Listening at", count=2)
        _slow_app(app_dir, "v2", boot_delay=0.5)
        proc.proc.send_signal(signal.SIGHUP)
        proc.wait_for("Listening at", count=3)  # the first replacement is up
        _slow_app(app_dir, "v3", boot_delay=0.5)
        proc.proc.send_signal(signal.SIGHUP)
        _converges(proc, port, 2, "v3")
    finally:
        assert proc.stop() == 0


def test_sighup_while_a_retired_worker_drains_does_not_signal_it_again(app_dir: Path) -> None:
    """A worker finishing its requests after a reload is neither replaced again nor sent a
    second SIGTERM (which would cut its request)."""
    port = _free_port()
    _slow_app(app_dir, "v1")
    proc = Proc(["pidapp:app", "--port", str(port), "-w", "2", "--no-access-log"], app_dir)
    result: list[str] = []
    try:
        proc.wait_for("Listening at", count=2)

        def slow_request() -> None:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            try:
                conn.request("GET", "/?6")
                response = conn.getresponse()
                result.append(f"{response.status} {response.read().decode()}")
            except Exception as exc:
                result.append(repr(exc))
            finally:
                conn.close()

        client = threading.Thread(target=slow_request)
        client.start()
        proc.proc.send_signal(signal.SIGHUP)
        proc.wait_for("Received SIGTERM, shutting down", count=2)  # both old workers retired
        proc.proc.send_signal(signal.SIGHUP)
        client.join(DEADLINE)
        assert result == [result[0]]
        assert result[0].startswith("200 "), result
        _converges(proc, port, 2, "v1")
        assert not [line for line in proc.lines if "Received SIGTERM again" in line]
    finally:
        assert proc.stop() == 0


def test_worker_killed_while_its_replacement_boots_is_not_respawned(app_dir: Path) -> None:
    """--workers 2, a 1.5 s import, SIGHUP; the last old worker dies while its replacement
    boots. The replacement stands in for it: two workers remain, not three."""
    port = _free_port()
    _slow_app(app_dir, "v1", boot_delay=1.5)
    proc = Proc(["pidapp:app", "--port", str(port), "-w", "2", "--no-access-log"], app_dir)
    try:
        proc.wait_for("Listening at", count=2)
        _, last = sorted(_worker_pids(proc))
        _slow_app(app_dir, "v2", boot_delay=1.5)
        proc.proc.send_signal(signal.SIGHUP)
        proc.wait_for("Listening at", count=3)  # the first replacement accepts...
        proc.wait_for("Booting worker", count=4)  # ...and the second one boots
        os.kill(last, signal.SIGKILL)
        proc.wait_for(rf"Worker \(pid: {last}\) died with SIGKILL")
        proc.wait_for("Listening at", count=4)
        _converges(proc, port, 2, "v2")
    finally:
        assert proc.stop() == 0


def test_worker_that_exits_at_import_is_retried_with_backoff_then_stops(tmp_path: Path) -> None:
    """Any exit before a worker accepts is a boot failure (here sys.exit at import, exit
    status 1): a bounded number of tries, the reason shown once, then exit status 3."""
    (tmp_path / "needsdb.py").write_text(
        'import sys\nsys.exit("DATABASE_URL is not set")\napp = None\n'
    )
    proc = Proc(["needsdb:app", "--port", str(_free_port()), "-w", "2"], tmp_path)
    try:
        assert proc.proc.wait(DEADLINE) == 3
        proc.stop()
        boots = proc.wait_for("Booting worker")
        failures = proc.wait_for(r"failed to boot \(exit status 1\)")
        assert len(boots) <= 2 * 5, len(boots)  # --workers x BOOT_TRIES at most
        assert len(failures) == len(boots)  # each failure logged once, with its reason
        assert sum("SystemExit: DATABASE_URL is not set" in line for line in proc.lines) == 1
        proc.wait_for("5 times in a row; stopping")
    finally:
        proc.stop()


def test_max_requests_is_a_limit_on_each_worker(app_dir: Path) -> None:
    """Each worker serves between --max-requests and --max-requests + jitter (+1) requests; the
    last one it serves carries Connection: close, and no request fails during the hand-over."""
    port = _free_port()
    args = ["pidapp:app", "--port", str(port), "-w", "1", "--no-access-log"]
    proc = Proc([*args, "--max-requests", "2", "--max-requests-jitter", "6"], app_dir)
    served: list[tuple[int, str | None]] = []
    try:
        proc.wait_for("Listening at")
        for _ in range(60):
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            try:
                conn.request("GET", "/")
                response = conn.getresponse()
                assert response.status == 200
                pid = int(response.read().split()[0])
                served.append((pid, response.getheader("Connection")))
            finally:
                conn.close()
    finally:
        assert proc.stop() == 0
    order = list(dict.fromkeys(pid for pid, _ in served))
    assert len(order) >= 60 // 9
    for pid in order[:-1]:  # the last worker was stopped before its limit
        mine = [header for p, header in served if p == pid]
        assert 2 <= len(mine) <= 2 + 6 + 1, (pid, len(mine))
        assert mine[-1] == "close"


# -- --reload: every way of saving a file ends with that file's code served ------------------

MOD_APP = """
import os

try:
    from pidextra import VERSION
except ImportError:
    VERSION = "{fallback}"

def app(environ, start_response):
    body = ("%d %s" % (os.getpid(), VERSION)).encode()
    start_response("200 OK", [("Content-Length", str(len(body)))])
    return [body]
"""


def _in_place(path: Path, version: str) -> None:
    path.write_text(PID_APP.format(version=version))  # truncate, then write


def _delete_create(path: Path, version: str) -> None:
    path.unlink()
    path.write_text(PID_APP.format(version=version))


def _burst(path: Path, version: str) -> None:
    for step in ("x2", "x3", "x4"):  # never to be served
        path.write_text(PID_APP.format(version=step))
    path.write_text(PID_APP.format(version=version))


def _rename(path: Path, version: str) -> None:
    _write(path, PID_APP.format(version=version))


def _add_module(path: Path, version: str) -> None:
    (path.parent / "pidextra.py").write_text(f"VERSION = {version!r}\n")


def _delete_module(path: Path, version: str) -> None:
    (path.parent / "pidextra.py").unlink()


def _serve_reload(app_dir: Path, save: Callable[[Path, str], None]) -> tuple[Proc, int]:
    """Start ``--reload`` on the app that ``save`` will change."""
    port = _free_port()
    module_app = save in (_add_module, _delete_module)
    app = app_dir / "pidapp.py"
    if module_app and save is _delete_module:
        app.write_text(MOD_APP.format(fallback="v2"))
        (app_dir / "pidextra.py").write_text('VERSION = "v1"\n')
    elif module_app:
        app.write_text(MOD_APP.format(fallback="v1"))
    args = ["pidapp:app", "--port", str(port), "--reload", "--reload-dir", str(app_dir)]
    return Proc([*args, "--no-access-log"], app_dir), port


class _Client:
    """Opens a new connection for each request, back to back, and records every answer's
    version (or the failure) until stopped; ``seen_final`` is set once ``final`` has answered
    20 times."""

    def __init__(self, port: int, final: str) -> None:
        self.port = port
        self.final = final
        self.answers: list[str] = []
        self.failures: list[BaseException] = []
        self.seen_final = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.answers.append(_get(self.port).split()[1])
            except Exception as exc:
                self.failures.append(exc)
            if self.answers.count(self.final) >= 20:
                self.seen_final.set()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(DEADLINE)


@pytest.mark.parametrize(
    "save",
    [_in_place, _rename, _delete_create, _burst, _add_module, _delete_module],
    ids=["in-place", "rename", "delete-create", "burst", "add-module", "delete-module"],
)
def test_reload_serves_the_saved_code_whatever_the_save_pattern(
    app_dir: Path, save: Callable[[Path, str], None]
) -> None:
    """Under a client opening a new connection for each request: no request fails, and once the
    new code answers, the old code never answers again (nor does an intermediate save)."""
    proc, port = _serve_reload(app_dir, save)
    client = None
    try:
        proc.wait_for("Listening at")
        assert _get(port).split()[1] == "v1"
        client = _Client(port, "v2")
        save(app_dir / "pidapp.py", "v2")
        assert client.seen_final.wait(DEADLINE), (client.answers[-5:], "".join(proc.lines))
    finally:
        if client is not None:
            client.stop()
        assert proc.stop() == 0
    assert not client.failures, client.failures[:3]
    first = client.answers.index("v2")
    assert set(client.answers[:first]) <= {"v1"}, client.answers
    assert set(client.answers[first:]) == {"v2"}, client.answers
    assert len(proc.wait_for(r"Booting worker")) <= 3  # no reload per intermediate save


def test_reload_broken_save_then_fixed_save_serves_the_fix(app_dir: Path) -> None:
    """A save with a syntax error shows the traceback once and keeps the old worker serving;
    the fixed save is then served. No request fails meanwhile."""
    port = _free_port()
    args = ["pidapp:app", "--port", str(port), "--reload", "--reload-dir", str(app_dir)]
    proc = Proc([*args, "--no-access-log"], app_dir)
    client = None
    try:
        proc.wait_for("Listening at")
        client = _Client(port, "v3")
        _write(app_dir / "pidapp.py", "def app(:\n")
        proc.wait_for("reload abandoned")  # tried twice, the old worker still serves
        assert _get(port).split()[1] == "v1"
        _write(app_dir / "pidapp.py", PID_APP.format(version="v3"))
        assert client.seen_final.wait(DEADLINE), "".join(proc.lines)
    finally:
        if client is not None:
            client.stop()
        assert proc.stop() == 0
    assert not client.failures, client.failures[:3]
    assert set(client.answers) == {"v1", "v3"}
    assert sum(line.startswith("SyntaxError") for line in proc.lines) == 1
    assert len(proc.wait_for(r"failed to boot \(exit status 3\)")) == 2


def test_a_changed_file_loses_its_cached_bytecode(tmp_path: Path) -> None:
    """A same-size edit within the same second keeps a timestamp-based .pyc valid; the
    supervisor removes it so that the next worker compiles the saved source."""
    import importlib.util
    import py_compile

    from asyncwsgi.reloader import forget_bytecode

    source = tmp_path / "mod.py"
    source.write_text('VERSION = "v1"\n')
    compiled = py_compile.compile(str(source))
    assert compiled is not None
    cached = Path(compiled)
    assert cached == Path(importlib.util.cache_from_source(str(source)))
    forget_bytecode(str(source))
    assert not cached.exists()
    forget_bytecode(str(source))  # already gone: nothing to do
