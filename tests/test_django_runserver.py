"""``python manage.py runserver`` through ``asyncwsgi.contrib.django``, run for real.

Each test starts the test project's ``manage.py runserver`` in a subprocess (settings
``settings_runserver``: DEBUG, ``asyncwsgi.contrib.django`` before ``django.contrib.staticfiles``),
waits for the banner line on its output, talks HTTP to it, and stops it with SIGINT as Ctrl-C
does. The autoreload test runs a copy of the project, edits its views module once Django's
autoreloader has recorded the file, and waits for the reloader's "changed, reloading." line and
the new server's banner: every step waits for an output line or a response, never a clock.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from .helpers import ProcessOutput

PROJECT = Path(__file__).resolve().parent / "djangoproject"
TIMEOUT = 10.0
BANNER = re.compile(r"^Starting asyncwsgi development server at http://([\d.]+):(\d+)/$")
LISTENING = re.compile(r"Listening at: http://\S+ \(threads: (\d+)\)")


class Runserver(ProcessOutput):
    """A ``manage.py runserver`` subprocess whose stdout and stderr are read as one stream.

    Args:
        project: the project directory (holding ``manage.py``); its name is the package name.
        args: arguments after ``runserver``.
    """

    def __init__(self, project: Path, *args: str) -> None:
        env = {**os.environ, "DJANGO_SETTINGS_MODULE": f"{project.name}.settings_runserver"}
        env.pop("DJANGO_RUNSERVER_HIDE_WARNING", None)
        self.proc = subprocess.Popen(
            [sys.executable, str(project / "manage.py"), "runserver", *args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=project.parent,
            start_new_session=True,  # a process group, as a terminal's Ctrl-C reaches
        )
        assert self.proc.stdout is not None
        super().__init__(self.proc.stdout.fileno())

    def wait_for(
        self, pattern: str | re.Pattern[str], timeout: float = TIMEOUT, *, anywhere: bool = False
    ) -> re.Match[str]:
        """Wait for a complete output line matching ``pattern``, after the previous match.

        With ``anywhere``, a line from the start of the output counts too, and the next search
        still starts after the previous match.
        """
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            text = self.output
            end = text.rfind("\n") + 1
            start = 0 if anywhere else self._scanned
            for line in re.finditer(r"[^\n]*\n", text[start:end]):
                match = regex.search(line.group().rstrip("\n"))
                if match:
                    if not anywhere:
                        self._scanned += line.end()
                    return match
            if not self._read(deadline):
                raise AssertionError(
                    f"no line matching {regex.pattern!r} within {timeout}s "
                    f"(exit status {self.proc.poll()}); output:\n{self.tail()}"
                )

    def tail(self) -> str:
        """The output without the autoreloader's "first seen" lines (there are hundreds)."""
        return "\n".join(line for line in self.output.splitlines() if " first seen " not in line)

    def started(self) -> str:
        """Wait for the next banner; return the URL it names."""
        match = self.wait_for(BANNER)
        return f"http://{match.group(1)}:{match.group(2)}"

    def finish(self, timeout: float = TIMEOUT) -> int:
        """Read the output to EOF and wait for the process to exit; return its status."""
        deadline = time.monotonic() + timeout
        while self._read(deadline):
            pass
        try:
            return self.proc.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"runserver did not exit within {timeout}s; output:\n{self.tail()}"
            ) from None

    def interrupt(self) -> int:
        """Ctrl-C: SIGINT to the whole process group; return the exit status."""
        os.killpg(self.proc.pid, signal.SIGINT)
        return self.finish()

    def close(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        assert self.proc.stdout is not None
        self.proc.stdout.close()


@pytest.fixture
def runserver() -> Iterator[type[Runserver]]:
    """Yield a factory for :class:`Runserver`; every process it started is killed at the end."""
    started: list[Runserver] = []

    class Tracked(Runserver):
        def __init__(self, project: Path, *args: str) -> None:
            super().__init__(project, *args)
            started.append(self)

    yield Tracked
    for process in started:
        process.close()


def client(url: str) -> httpx.Client:
    return httpx.Client(base_url=url, trust_env=False, timeout=TIMEOUT)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_runserver_serves_views_static_files_and_forms(runserver: type[Runserver]) -> None:
    server = runserver(PROJECT, "127.0.0.1:0", "--noreload")
    url = server.started()
    threads = server.wait_for(LISTENING)
    assert threads.group(1) == "64"  # threaded: asyncwsgi's pool
    with client(url) as http:
        view = http.get("/")
        assert view.status_code == 200
        assert view.text == "Hello from Django path=/ form=/form/"
        assert view.headers["server"] == "asyncwsgi"  # not wsgiref's "WSGIServer/0.2"

        static = http.get("/static/asyncwsgi-test.css")  # staticfiles' handler, DEBUG on
        assert static.status_code == 200, static.text
        assert static.content == (PROJECT / "static" / "asyncwsgi-test.css").read_bytes()
        assert static.headers["content-type"] == "text/css"

        token = http.get("/form/").json()["csrf_token"]
        posted = http.post("/form/", data={"csrfmiddlewaretoken": token, "name": "Zoë"})
        assert posted.status_code == 200, posted.text
        assert posted.json() == {"name": "Zoë", "colours": []}
        assert http.post("/form/", data={"name": "no token"}).status_code == 403
    server.wait_for(r'"POST /form/ HTTP/1\.1" 200 ')  # access lines on the console
    assert server.interrupt() == 0
    banner = server.output
    assert "Performing system checks..." in banner
    assert "Django version " in banner
    assert "using settings 'djangoproject.settings_runserver'" in banner
    assert "Quit the server with CONTROL-C." in banner
    assert "asyncwsgi serve djangoproject.wsgi:application" in banner


def test_runserver_nothreading_runs_one_request_at_a_time(runserver: type[Runserver]) -> None:
    server = runserver(PROJECT, "127.0.0.1:0", "--noreload", "--nothreading")
    url = server.started()
    assert server.wait_for(LISTENING).group(1) == "1"
    with client(url) as http:
        assert http.get("/").status_code == 200
    assert server.interrupt() == 0


def test_runserver_port_in_use_is_reported_as_django_does(runserver: type[Runserver]) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        server = runserver(PROJECT, f"127.0.0.1:{port}", "--noreload")
        assert server.finish() == 1
    assert "Error: That port is already in use." in server.output


def test_runserver_autoreloader_serves_the_edited_view(
    runserver: type[Runserver], tmp_path: Path
) -> None:
    project = tmp_path / "siteproject"
    shutil.copytree(PROJECT, project, ignore=shutil.ignore_patterns("__pycache__"))
    views = project / "views.py"
    port = free_port()  # the restarted server binds the same address again
    server = runserver(project, f"127.0.0.1:{port}")
    url = server.started()
    assert url == f"http://127.0.0.1:{port}"
    with client(url) as http:
        assert http.get("/").text == "Hello from Django path=/ form=/form/"
    # Django's StatReloader only notices a change to a file it has already recorded.
    server.wait_for(re.escape(f"File {views} first seen with mtime"), anywhere=True)
    recorded = views.stat().st_mtime
    views.write_text(views.read_text().replace("Hello from Django", "Reloaded Django"))
    os.utime(views, (recorded + 2, recorded + 2))
    server.wait_for(re.escape(f"{views} changed, reloading."))
    assert server.started() == url
    with client(url) as http:
        assert http.get("/").text == "Reloaded Django path=/ form=/form/"
    assert server.interrupt() == 0
