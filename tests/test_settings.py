"""Settings from ``ASYNCWSGI_*`` variables, ``--env-file`` and TOML files, and their precedence:
flags > environment > file > defaults (unit tests, then the command line in a subprocess)."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import types
import typing
from pathlib import Path
from typing import Any

import pytest

from asyncwsgi import Config, ConfigError
from asyncwsgi.settings import (
    coerce,
    layered_options,
    load_env_file,
    options_from_environ,
    options_from_toml,
    read_env_file,
)

from .test_cli import LISTENING, ROOT, CLIServer, http_client, run_cli

# -- conversion ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "value", "expected"),
    [
        ("threads", "16", 16),
        ("threads", 16, 16),
        ("timeout_keep_alive", "2.5", 2.5),
        ("timeout_keep_alive", 3, 3.0),
        ("proxy_headers", "false", False),
        ("proxy_headers", "On", True),
        ("proxy_headers", "0", False),
        ("proxy_headers", True, True),
        ("bind", "127.0.0.1:8000, unix:/run/a.sock", ("127.0.0.1:8000", "unix:/run/a.sock")),
        ("bind", ["[::1]:80"], ("[::1]:80",)),
        ("uds", "", None),
        ("uds", "/run/x.sock", "/run/x.sock"),
        ("fd", "3", 3),
        ("loop", "asyncio", "asyncio"),
        ("root_path", "/app", "/app"),
        ("forwarded_trust_headers", "X-Forwarded-For,forwarded", "X-Forwarded-For,forwarded"),
    ],
)
def test_coerce(name: str, value: object, expected: object) -> None:
    assert coerce(name, value, "test") == expected


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("threads", "many"),
        ("threads", 1.5),
        ("threads", True),
        ("timeout_keep_alive", "soon"),
        ("proxy_headers", "maybe"),
        ("proxy_headers", 1),
        ("bind", [1, 2]),
        ("host", 5),
    ],
)
def test_coerce_refuses(name: str, value: object) -> None:
    with pytest.raises(ConfigError, match=f"src: {name} must be"):
        coerce(name, value, "src")


def sample(hint: Any) -> tuple[str, object]:
    """A valid (environment text, TOML value) for a field type."""
    optional = typing.get_origin(hint) in (typing.Union, types.UnionType)
    base = next(a for a in typing.get_args(hint) if a is not type(None)) if optional else hint
    if typing.get_origin(base) is typing.Literal:
        choice = typing.get_args(base)[-1]
        return choice, choice
    if typing.get_origin(base) is tuple:
        return "", []
    return {
        bool: ("true", True),
        int: ("1", 1),
        float: ("1.5", 1.5),
        str: ("", ""),
    }[base]


def test_every_field_has_an_environment_variable_and_a_toml_key(tmp_path: Path) -> None:
    """One definition feeds every source: each Config field is settable from each of them."""
    hints = typing.get_type_hints(Config)
    for field in dataclasses.fields(Config):
        text, value = sample(hints[field.name])
        key = "ASYNCWSGI_" + field.name.upper()
        assert field.name in options_from_environ({key: text}), key
        path = tmp_path / f"{field.name}.toml"
        path.write_text(f"{field.name.replace('_', '-')} = {toml_literal(value)}\n")
        assert field.name in options_from_toml(path), field.name


def toml_literal(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f'"{value}"'
    return repr(value)


# -- sources -------------------------------------------------------------------------------------


def test_environment_variables() -> None:
    environ = {
        "ASYNCWSGI_THREADS": "16",
        "ASYNCWSGI_PROXY_HEADERS": "no",
        "ASYNCWSGI_BIND": "127.0.0.1:9000,unix:/tmp/x.sock",
        "ASYNCWSGI_TEST_GATE": "not a setting: ignored",
        "THREADS": "99",
    }
    assert options_from_environ(environ) == {
        "threads": 16,
        "proxy_headers": False,
        "bind": ("127.0.0.1:9000", "unix:/tmp/x.sock"),
    }
    with pytest.raises(ConfigError, match="ASYNCWSGI_PORT: port must be an integer"):
        options_from_environ({"ASYNCWSGI_PORT": "http"})


def test_toml_top_level_and_tool_table(tmp_path: Path) -> None:
    plain = tmp_path / "asyncwsgi.toml"
    plain.write_text('threads = 4\ntimeout-keep-alive = 2\nbind = ["127.0.0.1:1"]\n')
    assert options_from_toml(plain) == {
        "threads": 4,
        "timeout_keep_alive": 2.0,
        "bind": ("127.0.0.1:1",),
    }
    pyproject = tmp_path / "pyproject.toml"
    pyproject.write_text(
        '[project]\nname = "x"\n\n[tool.asyncwsgi]\nroot_path = "/app"\naccess-log = false\n'
    )
    assert options_from_toml(pyproject) == {"root_path": "/app", "access_log": False}
    assert options_from_toml(pyproject, required=False) == {
        "root_path": "/app",
        "access_log": False,
    }


def test_toml_without_our_table_or_file_when_optional(tmp_path: Path) -> None:
    pyproject = tmp_path / "pyproject.toml"
    pyproject.write_text('[project]\nname = "x"\n[tool.other]\nthreads = 1\n')
    assert options_from_toml(pyproject, required=False) == {}
    assert options_from_toml(tmp_path / "missing.toml", required=False) == {}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("thread = 4\n", "unknown setting 'thread'"),
        ("threads = 'four'\n", "threads must be an integer"),
        ("threads = \n", "not valid TOML"),
        ("[tool.asyncwsgi]\nnope = 1\n", r"\[tool.asyncwsgi\]: unknown setting 'nope'"),
        ("[tool]\nasyncwsgi = 1\n", "must be a table"),
    ],
)
def test_toml_errors(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        options_from_toml(path)


def test_missing_config_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        options_from_toml(tmp_path / "missing.toml")


ENV_FILE = """
# a comment
ASYNCWSGI_THREADS=7
export GREETING="hello world"
SINGLE='single quoted'
PLAIN=value # trailing comment
EMPTY=
"""


def test_read_env_file(tmp_path: Path) -> None:
    path = tmp_path / ".env"
    path.write_text(ENV_FILE)
    assert read_env_file(path) == {
        "ASYNCWSGI_THREADS": "7",
        "GREETING": "hello world",
        "SINGLE": "single quoted",
        "PLAIN": "value",
        "EMPTY": "",
    }
    with pytest.raises(ConfigError, match="not found"):
        read_env_file(tmp_path / "missing.env")


def test_read_env_file_is_python_dotenv_syntax(tmp_path: Path) -> None:
    """Escapes in double quotes and ``${VAR}`` expansion, as python-dotenv documents them; a
    key without ``=`` sets nothing."""
    path = tmp_path / ".env"
    path.write_text('BASE=/srv\nDATA=${BASE}/data\nLINES="a\\nb"\nNOVALUE\n')
    assert read_env_file(path) == {"BASE": "/srv", "DATA": "/srv/data", "LINES": "a\nb"}


def test_unreadable_env_file_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / ".env"
    path.write_bytes(b"A=\xff\xfe\n")
    with pytest.raises(ConfigError, match="cannot read env file"):
        read_env_file(path)


def test_load_env_file_keeps_variables_already_set(tmp_path: Path) -> None:
    path = tmp_path / ".env"
    path.write_text("A=from-file\nB=from-file\n")
    environ = {"A": "already"}
    load_env_file(path, environ)
    assert environ == {"A": "already", "B": "from-file"}


# -- precedence ----------------------------------------------------------------------------------


def test_precedence_flags_environment_file_defaults(tmp_path: Path) -> None:
    config_file = tmp_path / "asyncwsgi.toml"
    config_file.write_text("threads = 2\nbacklog = 10\nport = 1111\n")
    environ = {"ASYNCWSGI_THREADS": "4", "ASYNCWSGI_PORT": "2222"}
    cli = {"threads": 8}
    options = layered_options(cli, config_file=str(config_file), environ=environ)
    assert options == {"threads": 8, "port": 2222, "backlog": 10}
    assert layered_options({}, config_file=str(config_file), environ=environ) == {
        "threads": 4,
        "port": 2222,
        "backlog": 10,
    }
    assert layered_options({}, config_file=str(config_file), environ={}) == {
        "threads": 2,
        "port": 1111,
        "backlog": 10,
    }
    config = Config(**layered_options({}, environ={}, cwd=tmp_path))
    assert config.threads == Config().threads  # no pyproject.toml in tmp_path: defaults


def test_pyproject_in_cwd_is_read_without_c(tmp_path: Path) -> None:
    (tmp_path / "pyproject.toml").write_text("[tool.asyncwsgi]\nthreads = 3\n")
    assert layered_options({}, environ={}, cwd=tmp_path) == {"threads": 3}
    other = tmp_path / "other.toml"
    other.write_text("threads = 5\n")
    # -c replaces the default file rather than adding to it.
    assert layered_options({}, config_file=str(other), environ={}, cwd=tmp_path) == {"threads": 5}


def test_env_file_feeds_the_environment_layer(tmp_path: Path) -> None:
    env_file = tmp_path / ".env"
    env_file.write_text("ASYNCWSGI_THREADS=6\nASYNCWSGI_BACKLOG=77\n")
    environ = {"ASYNCWSGI_BACKLOG": "99"}  # a variable already set wins over the file
    options = layered_options({}, env_file=str(env_file), environ=environ, cwd=tmp_path)
    assert options == {"threads": 6, "backlog": 99}


# -- the command line ----------------------------------------------------------------------------


def threads_of(server: CLIServer) -> int:
    return int(server.wait_for(LISTENING).group(2))


def test_cli_precedence(tmp_path: Path) -> None:
    config_file = tmp_path / "asyncwsgi.toml"
    config_file.write_text('threads = 2\nroot-path = "/from-file"\n')
    base = ("--port", "0", "-c", str(config_file))
    with CLIServer("tests.apps:environ_app", *base) as server:
        assert threads_of(server) == 2
        with http_client() as client:
            environ = client.get(server.url() + "/from-file/x").json()
        assert environ["SCRIPT_NAME"] == "/from-file"
        assert server.stop() == 0
    env = {"ASYNCWSGI_THREADS": "3"}
    with CLIServer("tests.apps:hello", *base, env=env) as server:
        assert threads_of(server) == 3
        assert server.stop() == 0
    with CLIServer("tests.apps:hello", *base, "--threads", "4", env=env) as server:
        assert threads_of(server) == 4
        assert server.stop() == 0


def test_cli_forwarded_trust_headers_from_the_environment() -> None:
    env = {"ASYNCWSGI_FORWARDED_TRUST_HEADERS": "x-forwarded-host, X-FORWARDED-FOR"}
    headers = {
        "X-Forwarded-Proto": "https",
        "X-Forwarded-Host": "shop.example",
        "X-Forwarded-For": "203.0.113.9",
    }
    with CLIServer("tests.apps:environ_app", "--port", "0", env=env) as server:
        with http_client() as client:
            environ = client.get(server.url(), headers=headers).json()
        assert server.stop() == 0
    assert environ["HTTP_HOST"] == "shop.example"
    assert environ["REMOTE_ADDR"] == "203.0.113.9"
    assert environ["wsgi.url_scheme"] == "http"
    assert "HTTP_X_FORWARDED_PROTO" not in environ


def test_cli_env_file_reaches_the_app_and_the_settings(tmp_path: Path) -> None:
    (tmp_path / "envapp.py").write_text(
        "import os\n\n"
        "def application(environ, start_response):\n"
        "    start_response('200 OK', [('Content-Type', 'text/plain')])\n"
        "    return [os.environ['GREETING'].encode()]\n"
    )
    env_file = tmp_path / "app.env"
    env_file.write_text("GREETING=hello from the env file\nASYNCWSGI_THREADS=5\n")
    args = ("--port", "0", "--env-file", str(env_file), "--app-dir", str(tmp_path))
    with CLIServer("envapp", *args) as server:
        assert threads_of(server) == 5
        with http_client() as client:
            assert client.get(server.url()).text == "hello from the env file"
        assert server.stop() == 0


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        ({"asyncwsgi.toml": "thread = 1\n"}, "unknown setting 'thread'"),
        ({"asyncwsgi.toml": "threads = 0\n"}, "threads must be at least 1"),
    ],
)
def test_cli_config_file_errors_are_usage_errors(
    tmp_path: Path, setup: dict[str, str], message: str
) -> None:
    for name, text in setup.items():
        (tmp_path / name).write_text(text)
    result = run_cli("serve", "tests.apps:hello", "-c", str(tmp_path / "asyncwsgi.toml"))
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_cli_reads_pyproject_of_the_current_directory(tmp_path: Path) -> None:
    (tmp_path / "pyproject.toml").write_text("[tool.asyncwsgi]\nthreads = 0\n")
    result = subprocess.run(
        [sys.executable, "-m", "asyncwsgi", "serve", "tests.apps:hello", "--app-dir", str(ROOT)],
        capture_output=True,
        text=True,
        timeout=10,
        cwd=tmp_path,
        stdin=subprocess.DEVNULL,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    assert result.returncode == 2
    assert "threads must be at least 1" in result.stderr


def test_cli_missing_env_file(tmp_path: Path) -> None:
    result = run_cli("serve", "tests.apps:hello", "--env-file", str(tmp_path / "none.env"))
    assert result.returncode == 2
    assert "env file" in result.stderr
    assert "not found" in result.stderr


def test_help_lists_config_and_env_file() -> None:
    result = run_cli("serve", "--help")
    assert "-c FILE, --config FILE" in result.stdout
    assert "--env-file FILE" in result.stdout
