"""Logging: ``--access-logformat`` atoms and ``--access-log-json`` (unit and over sockets),
``--access-logfile`` and ``--log-config`` (in-process and through the CLI)."""

from __future__ import annotations

import base64
import importlib
import io
import json
import logging
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from asyncwsgi import Config, ConfigError, accesslog
from asyncwsgi.accesslog import AccessFormat, AccessRecord
from asyncwsgi.logs import (
    BATCH_SIZE,
    BatchingHandler,
    access_line_handler,
    access_logger,
    error_logger,
    flush_logs,
    load_log_config,
    reopen_log_files,
    setup_logging,
)

from . import apps
from .helpers import exchange, running
from .test_cli import (
    ACCESS_LINE,
    ROOT,
    CLIServer,
    assert_one_error_line,
    port_of,
    raw_request,
    run_cli,
)

GUNICORN_FORMAT = '%(h)s %(l)s %(u)s %(t)s "%(r)s" %(s)s %(b)s "%(f)s" "%(a)s" %(D)s'


def entry(**changes: Any) -> AccessRecord:
    values: dict[str, Any] = {
        "client": "127.0.0.1:50000",
        "environ": {
            "REMOTE_ADDR": "127.0.0.1",
            "SCRIPT_NAME": "",
            "PATH_INFO": "/path",
            "QUERY_STRING": "q=1",
            "HTTP_X_CUSTOM": "env",
        },
        "method": b"GET",
        "target": b"/path?q=1",
        "version": b"1.1",
        "headers": [
            (b"host", b"example.com"),
            (b"referer", b"http://ref.example/"),
            (b"user-agent", b"curl/8.0"),
            (b"authorization", b"Basic " + base64.b64encode(b"alice:secret")),
            (b"x-request-id", b"abc-123"),
        ],
        "status": 200,
        "response_headers": [(b"Content-Type", b"text/plain")],
        "sent": 1234,
        "duration": 1.5,
    }
    values.update(changes)
    return AccessRecord(**values)


# -- atoms ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("atom", "text"),
    [
        ("h", "127.0.0.1"),
        ("l", "-"),
        ("u", "alice"),
        ("r", "GET /path?q=1 HTTP/1.1"),
        ("m", "GET"),
        ("U", "/path"),
        ("q", "q=1"),
        ("H", "HTTP/1.1"),
        ("s", "200"),
        ("B", "1234"),
        ("b", "1234"),
        ("f", "http://ref.example/"),
        ("a", "curl/8.0"),
        ("T", "1"),
        ("M", "1500"),
        ("D", "1500000"),
        ("L", "1.500000"),
        ("{x-request-id}i", "abc-123"),
        ("{X-Request-ID}i", "abc-123"),
        ("{content-type}o", "text/plain"),
        ("{HTTP_X_CUSTOM}e", "env"),
        ("{nothere}i", "-"),
    ],
)
def test_each_atom(atom: str, text: str) -> None:
    assert AccessFormat(f"%({atom})s").render(entry()) == text


def test_time_and_pid_atoms() -> None:
    import os

    line = AccessFormat("%(t)s %(p)s").render(entry())
    assert re.fullmatch(r"\[\d\d/\w{3}/\d{4}:\d\d:\d\d:\d\d [+-]\d{4}\] <\d+>", line), line
    assert line.endswith(f"<{os.getpid()}>")


def test_missing_values_are_dashes() -> None:
    bare = entry(headers=[], sent=0, environ=None)
    assert AccessFormat('%(u)s "%(f)s" "%(a)s" %(b)s %(B)s').render(bare) == '- "-" "-" - 0'
    assert AccessFormat("%(h)s %(U)s %(q)s").render(bare) == "127.0.0.1 /path q=1"


def test_gunicorn_default_format() -> None:
    line = AccessFormat(GUNICORN_FORMAT).render(entry())
    assert re.fullmatch(
        r'127\.0\.0\.1 - alice \[[^]]+\] "GET /path\?q=1 HTTP/1\.1" 200 1234 '
        r'"http://ref\.example/" "curl/8\.0" 1500000',
        line,
    ), line


def test_request_values_are_escaped() -> None:
    evil = entry(
        target=b'/a"b\\c',
        headers=[(b"user-agent", b"x\x1b[31m\nFAKE")],
        environ={"PATH_INFO": "/\n"},
    )
    line = AccessFormat('"%(r)s" "%(a)s" %(U)s').render(evil)
    assert line == '"GET /a\\"b\\\\c HTTP/1.1" "x\\x1b[31m\\x0aFAKE" /\\x0a'


@pytest.mark.parametrize("fmt", ["%(nope)s", "%(h)s %(Z)s", "%(h)d", "%(h)s %"])
def test_bad_formats_are_config_errors(fmt: str) -> None:
    with pytest.raises(ConfigError):
        AccessFormat(fmt)
    with pytest.raises(ConfigError):
        Config(access_logformat=fmt)


def test_json_lines() -> None:
    data = json.loads(AccessFormat(None, json=True).render(entry()))
    assert set(data) == {
        "time",
        "remote_addr",
        "method",
        "path",
        "query",
        "protocol",
        "status",
        "bytes",
        "duration_us",
        "referer",
        "user_agent",
    }
    assert data["status"] == 200
    assert data["bytes"] == 1234
    assert data["duration_us"] == 1500000
    assert data["path"] == "/path"
    picked = json.loads(
        AccessFormat("%(h)s %(s)s %({x-request-id}i)s %(L)s", json=True).render(entry())
    )
    assert picked == {
        "remote_addr": "127.0.0.1",
        "status": 200,
        "request_header.x-request-id": "abc-123",
        "duration": 1.5,
    }
    line = AccessFormat("%(a)s", json=True).render(entry(headers=[(b"user-agent", b"a\nb\x1b")]))
    assert "\n" not in line
    assert "\x1b" not in line
    assert json.loads(line) == {"user_agent": "a\nb\x1b"}


def test_only_the_named_atoms_are_computed(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    for name, (key, text, value) in list(accesslog.ATOMS.items()):

        def counting(e: AccessRecord, name: str = name, text: Any = text) -> Any:
            calls.append(name)
            return text(e)

        monkeypatch.setitem(accesslog.ATOMS, name, (key, counting, value))
    AccessFormat("%(s)s %(b)s").render(entry())
    assert calls == ["s", "b"]


# -- over sockets ------------------------------------------------------------------------------


def access_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "asyncwsgi.access"]


async def test_format_over_sockets(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="asyncwsgi.access")
    async with running(apps.hello, access_logformat=GUNICORN_FORMAT + " %(U)s %(q)s") as srv:
        await exchange(
            srv.port,
            b"GET /a%20b?x=1 HTTP/1.1\r\nHost: t\r\nUser-Agent: test/1\r\n"
            b"X-Forwarded-For: 203.0.113.9\r\nConnection: close\r\n\r\n",
        )
    (line,) = access_lines(caplog)
    # REMOTE_ADDR after the trusted proxy's X-Forwarded-For; U is the decoded PATH_INFO.
    assert re.fullmatch(
        r'203\.0\.113\.9 - - \[[^]]+\] "GET /a%20b\?x=1 HTTP/1\.1" 200 13 "-" "test/1" \d+ '
        r"/a b x=1",
        line,
    ), line


async def test_json_over_sockets(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="asyncwsgi.access")
    async with running(apps.hello, access_log_json=True) as srv:
        await exchange(srv.port, b"GET /j HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
    (line,) = access_lines(caplog)
    data = json.loads(line)
    assert (data["method"], data["path"], data["status"], data["bytes"]) == ("GET", "/j", 200, 13)
    assert data["remote_addr"] == "127.0.0.1"


async def test_disabled_access_logger_computes_nothing(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    rendered: list[AccessRecord] = []

    def render(self: AccessFormat, access: AccessRecord) -> str:
        rendered.append(access)
        return ""

    monkeypatch.setattr(AccessFormat, "render", render)
    caplog.set_level(logging.WARNING, logger="asyncwsgi.access")
    async with running(apps.hello, access_logformat=GUNICORN_FORMAT) as srv:
        await exchange(srv.port, b"GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        assert rendered == []
        caplog.set_level(logging.INFO, logger="asyncwsgi.access")
        await exchange(srv.port, b"GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
    assert len(rendered) == 1  # control: the same server renders once the logger is on


async def test_default_line_without_a_format(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="asyncwsgi.access")
    async with running(apps.hello) as srv:
        assert srv.server.state.access_format is None
        await exchange(srv.port, b"GET /d HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
    (line,) = access_lines(caplog)
    assert re.fullmatch(r'127\.0\.0\.1:\d+ - "GET /d HTTP/1\.1" 200 13 \d+\.\d{3}ms', line)


# -- setup_logging in this process ------------------------------------------------------------


@pytest.fixture
def restore_loggers() -> Iterator[None]:
    """setup_logging() changes process-wide state: put the asyncwsgi loggers back after."""
    names = ("asyncwsgi.error", "asyncwsgi.access", "custom")
    saved = {
        name: (
            logging.getLogger(name).handlers[:],
            logging.getLogger(name).level,
            logging.getLogger(name).propagate,
            logging.getLogger(name).disabled,
        )
        for name in names
    }
    yield
    for name, (handlers, level, propagate, disabled) in saved.items():
        logger = logging.getLogger(name)
        for handler in logger.handlers:
            if handler not in handlers:
                handler.close()
        logger.handlers[:] = handlers
        logger.setLevel(level)
        logger.propagate = propagate
        logger.disabled = disabled


def _flush() -> None:
    for logger in (access_logger, error_logger):
        for handler in logger.handlers:
            handler.flush()


@pytest.mark.usefixtures("restore_loggers")
def test_access_logfile_gets_bare_lines(tmp_path: Path) -> None:
    path = tmp_path / "access.log"
    setup_logging(Config(access_logfile=str(path)))
    access_logger.info("one line")
    error_logger.info("not here")
    _flush()
    assert path.read_text() == "one line\n"


@pytest.mark.usefixtures("restore_loggers")
def test_reopen_log_files_after_a_move(tmp_path: Path) -> None:
    path = tmp_path / "access.log"
    setup_logging(Config(access_logfile=str(path)))
    try:
        access_logger.info("before")
        path.rename(tmp_path / "access.log.1")
        assert reopen_log_files() >= 1  # the root logger may hold files of its own
        access_logger.info("after")
    finally:
        for handler in access_logger.handlers:
            handler.close()
    assert (tmp_path / "access.log.1").read_text() == "before\n"
    assert path.read_text() == "after\n"


@pytest.mark.usefixtures("restore_loggers")
def test_reopen_keeps_the_old_file_when_the_path_cannot_be_opened(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    directory = tmp_path / "logs"
    directory.mkdir()
    path = directory / "access.log"
    setup_logging(Config(access_logfile=str(path)))
    moved = tmp_path / "moved.log"
    try:
        path.rename(moved)
        directory.rmdir()  # nowhere to create the new file
        error_logger.propagate = True  # to caplog; restore_loggers puts it back
        with caplog.at_level(logging.ERROR, logger="asyncwsgi.error"):
            reopen_log_files()
        access_logger.info("still logged")
    finally:
        for handler in access_logger.handlers:
            handler.close()
    assert moved.read_text() == "still logged\n"
    assert any("Cannot reopen log file" in r.getMessage() for r in caplog.records)


@pytest.mark.usefixtures("restore_loggers")
def test_access_logfile_that_cannot_be_opened(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot open access_logfile"):
        setup_logging(Config(access_logfile=str(tmp_path / "no" / "such" / "dir.log")))


# -- access lines in batches --------------------------------------------------------------------


class CountingStream(io.StringIO):
    """A text stream that counts its ``write`` calls (one ``write(2)`` each on a real file)."""

    writes = 0

    def write(self, text: str) -> int:
        self.writes += 1
        return super().write(text)


def test_access_lines_are_written_in_batches() -> None:
    stream = CountingStream()
    handler = BatchingHandler(stream, prefixed=False)
    for i in range(100):
        handler.add(f"line {i}")
    assert stream.writes == 0  # gathered, not written one by one
    handler.flush()
    assert stream.writes == 1
    assert stream.getvalue().splitlines() == [f"line {i}" for i in range(100)]
    line = "x" * 1023
    for _ in range(BATCH_SIZE // 1024 - 1):
        handler.add(line)
    assert stream.writes == 1
    handler.add(line)  # BATCH_SIZE gathered: written without waiting for a flush
    assert stream.writes == 2
    assert len(stream.getvalue().splitlines()) == 100 + BATCH_SIZE // 1024


def test_other_records_are_written_at_once_after_the_access_lines() -> None:
    stream = CountingStream()
    handler = BatchingHandler(stream, prefixed=True)
    handler.add("access 1")
    handler.handle(
        access_logger.makeRecord(access_logger.name, logging.INFO, "", 0, "access 2", (), None)
    )
    assert stream.writes == 0
    handler.handle(
        error_logger.makeRecord(error_logger.name, logging.ERROR, "", 0, "boom", (), None)
    )
    assert stream.writes == 1
    lines = stream.getvalue().splitlines()
    assert [line.rpartition("] ")[2] for line in lines] == ["access 1", "access 2", "boom"]
    assert "[ERROR] boom" in lines[2]


@pytest.mark.parametrize("prefixed", [True, False])
def test_a_batched_line_reads_as_the_record_would(
    prefixed: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """add() writes what formatting an INFO record of the same message writes, gunicorn's
    ``[time] [pid] [INFO]`` prefix included, with the time made once a second."""
    now = 1_700_000_000.25
    monkeypatch.setattr(time, "time", lambda: now)
    stream = io.StringIO()
    handler = BatchingHandler(stream, prefixed=prefixed)
    record = access_logger.makeRecord(
        access_logger.name, logging.INFO, "", 0, "GET / 200", (), None
    )
    record.created = now
    handler.add("GET / 200")
    handler.flush()
    assert stream.getvalue() == handler.format(record) + "\n"


class ListHandler(logging.Handler):
    """Keeps the messages of the records it gets."""

    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.mark.usefixtures("restore_loggers")
async def test_access_lines_skip_logging_records_while_only_our_handler_writes_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "access.log"
    setup_logging(Config(access_logfile=str(path)))
    assert access_line_handler() is access_logger.handlers[0]
    made: list[str] = []
    make_record = logging.Logger.makeRecord

    def counting(self: logging.Logger, *args: Any, **kwargs: Any) -> logging.LogRecord:
        made.append(self.name)
        return make_record(self, *args, **kwargs)

    monkeypatch.setattr(logging.Logger, "makeRecord", counting)
    async with running(apps.hello) as srv:
        for i in range(3):
            request = f"GET /{i} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"
            await exchange(srv.port, request.encode())
    assert access_logger.name not in made
    lines = path.read_text().splitlines()  # written at shutdown at the latest
    assert [line.split('"')[1] for line in lines] == [f"GET /{i} HTTP/1.1" for i in range(3)]


@pytest.mark.usefixtures("restore_loggers")
@pytest.mark.parametrize("where", ["access", "root"])
async def test_another_handler_gets_access_records(tmp_path: Path, where: str) -> None:
    """A handler beside ours, on the access logger or on a logger it propagates to (what
    ``--log-config`` sets up), gets ordinary records; our file still gets every line."""
    path = tmp_path / "access.log"
    setup_logging(Config(access_logfile=str(path)))
    other = ListHandler()
    logger = access_logger if where == "access" else logging.getLogger()
    logger.addHandler(other)
    access_logger.propagate = where == "root"  # restore_loggers puts it back
    try:
        assert access_line_handler() is None
        async with running(apps.hello) as srv:
            request = b"GET /rec HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"
            await exchange(srv.port, request)
    finally:
        logger.removeHandler(other)
    (line,) = other.messages
    assert '"GET /rec HTTP/1.1" 200 13' in line
    assert path.read_text() == line + "\n"


def test_flush_logs_writes_every_batch() -> None:
    stream = io.StringIO()
    handler = BatchingHandler(stream, prefixed=False)
    handler.add("pending")
    flush_logs()
    assert stream.getvalue() == "pending\n"


def dict_config(path: Path) -> dict[str, Any]:
    return {
        "version": 1,
        "formatters": {"plain": {"format": "custom %(name)s %(levelname)s %(message)s"}},
        "handlers": {
            "file": {"class": "logging.FileHandler", "filename": str(path), "formatter": "plain"}
        },
        "loggers": {
            "asyncwsgi.error": {"handlers": ["file"], "level": "INFO", "propagate": False},
            "asyncwsgi.access": {"handlers": ["file"], "level": "INFO", "propagate": False},
        },
    }


@pytest.mark.usefixtures("restore_loggers")
@pytest.mark.parametrize("kind", ["json", "yaml", "yml", "ini"])
def test_log_config_files(tmp_path: Path, kind: str) -> None:
    out = tmp_path / "out.log"
    config_path = tmp_path / f"logging.{kind}"
    if kind == "json":
        config_path.write_text(json.dumps(dict_config(out)))
    elif kind in ("yaml", "yml"):
        yaml = importlib.import_module("yaml")
        config_path.write_text(yaml.safe_dump(dict_config(out)))
    else:
        config_path.write_text(
            "[loggers]\nkeys=root,error,access\n\n"
            "[handlers]\nkeys=file\n\n"
            "[formatters]\nkeys=plain\n\n"
            "[logger_root]\nhandlers=\n\n"
            "[logger_error]\nqualname=asyncwsgi.error\nhandlers=file\nlevel=INFO\npropagate=0\n\n"
            "[logger_access]\nqualname=asyncwsgi.access\nhandlers=file\nlevel=INFO\n"
            "propagate=0\n\n"
            f"[handler_file]\nclass=FileHandler\nargs=({str(out)!r},)\nformatter=plain\n\n"
            "[formatter_plain]\nformat=custom %(name)s %(levelname)s %(message)s\n"
        )
    setup_logging(Config(log_config=str(config_path)))
    error_logger.info("hello error")
    access_logger.info("hello access")
    _flush()
    assert out.read_text().splitlines() == [
        "custom asyncwsgi.error INFO hello error",
        "custom asyncwsgi.access INFO hello access",
    ]


@pytest.mark.usefixtures("restore_loggers")
def test_log_config_keeps_unnamed_loggers_and_no_access_log_wins(tmp_path: Path) -> None:
    config_path = tmp_path / "root.json"
    config_path.write_text(json.dumps({"version": 1, "root": {"level": "INFO"}}))
    setup_logging(Config(log_config=str(config_path), access_log=False))
    assert not error_logger.disabled  # disable_existing_loggers defaults to False
    assert not access_logger.isEnabledFor(logging.INFO)


def test_log_config_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigError, match="no such file"):
        load_log_config(str(tmp_path / "missing.ini"))
    with pytest.raises(ConfigError, match="cannot apply"):
        load_log_config(str(tmp_path / "missing.json"))
    bad = tmp_path / "bad.json"
    bad.write_text("[1, 2]")
    with pytest.raises(ConfigError, match="does not hold a mapping"):
        load_log_config(str(bad))
    bad.write_text('{"version": 1, "handlers": {"h": {"class": "no.such.Handler"}}}')
    with pytest.raises(ConfigError, match="cannot apply"):
        load_log_config(str(bad))
    monkeypatch.setitem(sys.modules, "yaml", None)  # as if PyYAML were not installed
    yml = tmp_path / "x.yaml"
    yml.write_text("version: 1\n")
    with pytest.raises(ConfigError, match="needs PyYAML"):
        load_log_config(str(yml))


# -- the command line ----------------------------------------------------------------------------


def test_cli_access_logfile_and_format(tmp_path: Path) -> None:
    path = tmp_path / "access.log"
    args = ("--port", "0", "--access-logfile", str(path), "--access-logformat", "%(m)s %(U)s %(s)s")
    with CLIServer("tests.apps:hello", *args) as server:
        port = port_of(server.url())
        raw_request(port, b"GET /file HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert server.stop() == 0
    assert path.read_text() == "GET /file 200\n"
    assert not ACCESS_LINE.search(server.output)  # not on stderr any more
    assert "Listening at" in server.output  # the error log still is


def test_cli_access_logfile_dash_is_stdout() -> None:
    proc = subprocess.Popen(
        [
            *(sys.executable, "-m", "asyncwsgi", "serve", "tests.apps:hello", "--port", "0"),
            *("--access-logfile", "-", "--access-log-json", "--app-dir", str(ROOT)),
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stderr is not None
        assert proc.stdout is not None
        while True:
            line = proc.stderr.readline()
            assert line, "the server exited before listening"
            match = re.search(r"Listening at: http://127\.0\.0\.1:(\d+)", line)
            if match:
                break
        raw_request(int(match.group(1)), b"GET /o HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        data = json.loads(proc.stdout.readline())
        proc.terminate()
        proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert (data["path"], data["status"]) == ("/o", 200)
    assert proc.returncode == 0


def test_cli_log_config(tmp_path: Path) -> None:
    out = tmp_path / "out.log"
    config = dict_config(out)
    config["handlers"]["stderr"] = {
        "class": "logging.StreamHandler",
        "stream": "ext://sys.stderr",
        "formatter": "plain",
    }
    config["loggers"]["asyncwsgi.error"]["handlers"].append("stderr")
    config_path = tmp_path / "logging.json"
    config_path.write_text(json.dumps(config))
    with CLIServer("tests.apps:hello", "--port", "0", "--log-config", str(config_path)) as server:
        match = server.wait_for(
            r"^custom asyncwsgi\.error INFO Listening at: http://127\.0\.0\.1:(\d+)"
        )
        raw_request(
            int(match.group(1)), b"GET /cfg HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        assert server.stop() == 0
    text = out.read_text()
    assert "custom asyncwsgi.error INFO Listening at: http://127.0.0.1:" in text
    assert re.search(r'custom asyncwsgi\.access INFO 127\.0\.0\.1:\d+ - "GET /cfg HTTP/1\.1"', text)
    assert "/cfg" not in server.output  # the access logger writes to the file only
    assert "[INFO]" not in server.output  # the default format is replaced


ROOT_FORMAT = "root %(name)s %(levelname)s %(process)d %(message)s"


def root_config(log: Path, *, access_file: Path | None = None) -> dict[str, Any]:
    """A dictConfig whose root logger writes to ``log`` and to stderr (where the test waits for
    "Listening at"), naming no asyncwsgi logger; with ``access_file``, it also configures
    ``asyncwsgi.access`` explicitly, to that file only."""
    config: dict[str, Any] = {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"root": {"format": ROOT_FORMAT}},
        "handlers": {
            "file": {"class": "logging.FileHandler", "filename": str(log), "formatter": "root"},
            "stderr": {
                "class": "logging.StreamHandler",
                "stream": "ext://sys.stderr",
                "formatter": "root",
            },
        },
        "root": {"handlers": ["file", "stderr"], "level": "WARNING"},
    }
    if access_file is not None:
        config["handlers"]["access"] = {
            "class": "logging.FileHandler",
            "filename": str(access_file),
            "formatter": "root",
        }
        config["loggers"] = {
            "asyncwsgi.access": {"handlers": ["access"], "level": "INFO", "propagate": False}
        }
    return config


def write_log_config(directory: Path, kind: str, config: dict[str, Any]) -> Path:
    """Write ``config`` (as :func:`root_config` builds it) as a JSON, YAML or INI file."""
    path = directory / f"logging.{kind}"
    if kind == "json":
        path.write_text(json.dumps(config))
    elif kind == "yaml":
        path.write_text(importlib.import_module("yaml").safe_dump(config))
    else:
        handlers = config["handlers"]
        loggers = config.get("loggers", {})
        sections = [
            f"[loggers]\nkeys=root{''.join(f',l{i}' for i in range(len(loggers)))}",
            f"[handlers]\nkeys={','.join(handlers)}",
            "[formatters]\nkeys=root",
            f"[logger_root]\nlevel={config['root']['level']}\n"
            f"handlers={','.join(config['root']['handlers'])}",
            f"[formatter_root]\nformat={ROOT_FORMAT}",  # read raw: no %% escapes
        ]
        for i, (name, logger) in enumerate(loggers.items()):
            sections.append(
                f"[logger_l{i}]\nqualname={name}\nlevel={logger['level']}\n"
                f"handlers={','.join(logger['handlers'])}\npropagate={int(logger['propagate'])}"
            )
        for name, handler in handlers.items():
            if "filename" in handler:
                args = f"({handler['filename']!r},)"
                sections.append(f"[handler_{name}]\nclass=FileHandler\nargs={args}\nformatter=root")
            else:
                sections.append(
                    f"[handler_{name}]\nclass=StreamHandler\nargs=(sys.stderr,)\nformatter=root"
                )
        path.write_text("\n\n".join(sections) + "\n")
    return path


def serve_one_request(*args: str, path: str = "/logged") -> str:
    """Run ``asyncwsgi serve tests.apps:hello --port 0`` with ``args``, make one request once it
    listens (the "Listening at" record, seen on stderr through the root logger), stop it with
    SIGTERM and return its stderr."""
    with CLIServer("tests.apps:hello", "--port", "0", *args) as server:
        match = server.wait_for(
            r"^root asyncwsgi\.error INFO \d+ Listening at: http://[\d.]+:(\d+)"
        )
        request = f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode()
        assert raw_request(int(match.group(1)), request).startswith(b"HTTP/1.1 200")
        assert server.stop() == 0
    return server.output


@pytest.mark.parametrize("kind", ["json", "yaml", "ini"])
def test_cli_log_config_root_handler_gets_server_and_access_records(
    tmp_path: Path, kind: str
) -> None:
    log = tmp_path / "root.log"
    config_path = write_log_config(tmp_path, kind, root_config(log))
    stderr = serve_one_request("--log-config", str(config_path))
    text = log.read_text()
    assert re.search(r"^root asyncwsgi\.error INFO \d+ Listening at: http://", text, re.M)
    assert re.search(
        r'^root asyncwsgi\.access INFO \d+ 127\.0\.0\.1:\d+ - "GET /logged ', text, re.M
    )
    assert "[INFO]" not in stderr  # no default handler was installed beside the file's


@pytest.mark.parametrize("kind", ["json", "yaml", "ini"])
def test_cli_log_config_that_names_the_access_logger_wins(tmp_path: Path, kind: str) -> None:
    log, access = tmp_path / "root.log", tmp_path / "access.log"
    config_path = write_log_config(tmp_path, kind, root_config(log, access_file=access))
    stderr = serve_one_request("--log-config", str(config_path), path="/own-file")
    assert re.search(r"^root asyncwsgi\.error INFO \d+ Listening at: ", log.read_text(), re.M)
    assert "/own-file" not in log.read_text()  # propagate: false, as the file says
    assert "/own-file" not in stderr
    assert re.search(
        r'^root asyncwsgi\.access INFO \d+ .* "GET /own-file ', access.read_text(), re.M
    )


def test_cli_log_config_reaches_the_workers(tmp_path: Path) -> None:
    log = tmp_path / "root.log"
    config_path = write_log_config(tmp_path, "json", root_config(log))
    serve_one_request("--log-config", str(config_path), "--workers", "2")
    text = log.read_text()
    workers = set(
        re.findall(r"^root asyncwsgi\.error INFO \d+ Booting worker with pid: (\d+)", text, re.M)
    )
    assert len(workers) == 2
    access = re.findall(
        r'^root asyncwsgi\.access INFO (\d+) 127\.0\.0\.1:\d+ - "GET /logged ', text, re.M
    )
    assert len(access) == 1
    assert access[0] in workers  # written by the worker that served it


def test_cli_bad_log_config_is_one_error_line(tmp_path: Path) -> None:
    result = run_cli(
        "serve", "tests.apps:hello", "--port", "0", "--log-config", str(tmp_path / "no.json")
    )
    assert result.returncode == 1
    assert_one_error_line(result.stderr, "cannot apply log_config")


def test_cli_help_shows_format_atoms() -> None:
    result = run_cli("serve", "--help")
    assert result.returncode == 0, result.stderr
    assert "%(h)s %(l)s %(u)s %(t)s" in " ".join(result.stdout.split())
