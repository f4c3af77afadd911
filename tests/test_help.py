"""``asyncwsgi serve --help`` is a reference: flags grouped by topic, one line of help each with
a metavar that names what the flag takes and its default; the README's flags table explains
every flag at length."""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from asyncwsgi import Config
from asyncwsgi.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]

#: The topics, in order, as gunicorn's and uvicorn's documentation groups its settings.
GROUPS = (
    "Application",
    "Binding",
    "Processes",
    "Threads and timeouts",
    "Limits",
    "Logging",
    "Health and metrics",
    "TLS",
    "Proxies",
    "Development",
)

#: What a flag may say it takes.
METAVARS = frozenset(
    {
        "ADDRESS",
        "PORT",
        "PATH",
        "FILE",
        "DIR",
        "GLOB",
        "MODE",
        "FD",
        "N",
        "SECONDS",
        "BYTES",
        "MIB",
        "PREFIX",
        "FORMAT",
        "PASSWORD",
        "CIPHERS",
        "IPS",
        "NAMES",
        "APP",
        "{0,1,2}",
    }
)


def serve_parser() -> argparse.ArgumentParser:
    parser = build_parser()
    serve: argparse.ArgumentParser = parser.get_default("serve_parser")
    return serve


def option_actions() -> list[argparse.Action]:
    return [
        action
        for action in serve_parser()._actions
        if action.option_strings and action.dest not in ("help", "version")
    ]


@pytest.fixture(scope="module")
def serve_help() -> str:
    """``asyncwsgi serve --help`` on a terminal wider than the help is allowed to be."""
    result = subprocess.run(
        [sys.executable, "-m", "asyncwsgi", "serve", "--help"],
        capture_output=True,
        text=True,
        timeout=10,
        env={**os.environ, "COLUMNS": "300"},
        stdin=subprocess.DEVNULL,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_no_help_line_is_wider_than_100_columns(serve_help: str) -> None:
    wide = [line for line in serve_help.splitlines() if len(line) > 100]
    assert not wide, "\n".join(wide)


def test_each_flag_has_one_line_of_help_with_its_default(serve_help: str) -> None:
    lines = serve_help.splitlines()
    for action in option_actions():
        assert action.help is not None, action.option_strings
        text = action.help % {"default": action.default}
        assert "(default: " in text, action.option_strings
        whole = [line for line in lines if line.strip() == text or line.endswith(f"  {text}")]
        assert whole, f"{text!r} is wrapped or missing"


def test_every_flag_belongs_to_a_group() -> None:
    groups = {group.title: group for group in serve_parser()._action_groups}
    assert [title for title in groups if title in GROUPS] == list(GROUPS)
    generic = [a.option_strings for a in groups["options"]._group_actions]
    assert generic == [["-h", "--help"], ["--version"]]
    assert not groups["positional arguments"]._group_actions  # APP is under Application
    for field in dataclasses.fields(Config):
        assert field.metadata.get("group") in GROUPS, field.name
    grouped = {a.dest for title in GROUPS for a in groups[title]._group_actions}
    assert {field.name for field in dataclasses.fields(Config)} <= grouped
    assert {"app", "config_file", "env_file"} <= grouped
    # What a load balancer and a scraper talk to is one topic, beside the drain that uses it.
    health = {a.dest for a in groups["Health and metrics"]._group_actions}
    assert health == {"health_path", "shutdown_delay", "metrics_bind"}


def test_metavars_name_what_the_flag_takes() -> None:
    metavars = {action.dest: action.metavar for action in serve_parser()._actions}
    for action in option_actions():
        if isinstance(action, argparse.BooleanOptionalAction) or action.choices:
            continue
        assert action.metavar in METAVARS, (action.option_strings, action.metavar)
    for name, metavar in metavars.items():
        if name.startswith("timeout_"):
            assert metavar == "SECONDS", name
    assert metavars["reload_dir"] == "DIR"
    assert metavars["reload_include"] == metavars["reload_exclude"] == "GLOB"
    assert metavars["bind"] == "ADDRESS"
    assert metavars["limit_request_body"] == metavars["limit_request_line"] == "BYTES"
    assert metavars["workers"] == metavars["threads"] == "N"
    assert metavars["log_config"] == metavars["ssl_certfile"] == "PATH"


def readme_flags_table() -> str:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("### Flags", 1)[1].split("\n### ", 1)[0]
    return "\n".join(line for line in section.splitlines() if line.startswith("|"))


def test_the_readme_flags_table_covers_every_flag() -> None:
    table = readme_flags_table()
    named = set(re.findall(r"`[^`]*`", table))
    flags_in_table = {flag for cell in named for flag in re.findall(r"--[a-z][a-z_-]*", cell)}
    for action in option_actions():
        long_flags = [flag for flag in action.option_strings if flag.startswith("--")]
        assert long_flags[0] in flags_in_table, f"{long_flags[0]} is not in the README's table"
