"""Where settings come from besides flags: environment variables, an env file, a TOML file.

Every source is generated from :class:`~asyncwsgi.config.Config`'s fields, like the flags, so a
field added there is at once ``--its-name``, ``ASYNCWSGI_ITS_NAME`` and ``its_name`` (or
``its-name``) in a config file. Precedence, highest first:

1. command-line flags;
2. environment variables ``ASYNCWSGI_<FIELD>`` (``ASYNCWSGI_THREADS=16``,
   ``ASYNCWSGI_PROXY_HEADERS=false``, ``ASYNCWSGI_BIND=127.0.0.1:8000,unix:/run/app.sock``);
   ``--env-file FILE`` adds the variables of a dotenv file to the environment first (for the
   application too), without replacing variables already set, as uvicorn's ``--env-file``;
3. a TOML file: ``-c FILE`` (top-level keys, or a ``[tool.asyncwsgi]`` table), else
   ``[tool.asyncwsgi]`` of ``pyproject.toml`` in the current directory when there is one;
4. the defaults.

Values are converted by the field's type: booleans from ``1/true/yes/on`` and
``0/false/no/off``, numbers from their text, repeatable fields from a TOML list or a
comma-separated string. Everything here runs once, at start, in the main thread.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import sys
import types
import typing
from collections.abc import Mapping, MutableMapping
from pathlib import Path
from typing import Any

from dotenv import dotenv_values

from .config import Config
from .errors import ConfigError

__all__ = [
    "ENV_PREFIX",
    "layered_options",
    "options_from_environ",
    "options_from_toml",
    "read_env_file",
    "load_env_file",
    "coerce",
]

#: Environment variables named ``ASYNCWSGI_`` + the upper-case field name set that field.
ENV_PREFIX = "ASYNCWSGI_"

_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})


def _fields() -> dict[str, tuple[dataclasses.Field[Any], Any]]:
    hints = typing.get_type_hints(Config)
    return {field.name: (field, hints[field.name]) for field in dataclasses.fields(Config)}


def coerce(name: str, value: object, source: str) -> Any:
    """Convert ``value`` from a text or TOML source to the type of Config field ``name``.

    Args:
        name: the field.
        value: a string (environment) or a TOML value.
        source: where it came from, for the error message (``ASYNCWSGI_THREADS``, a file).

    Raises:
        ConfigError: the value cannot be converted (``threads = "many"``).
    """
    _, hint = _fields()[name]
    optional = typing.get_origin(hint) in (typing.Union, types.UnionType) and type(None) in (
        typing.get_args(hint)
    )
    base = next(a for a in typing.get_args(hint) if a is not type(None)) if optional else hint
    if optional and (value is None or value == ""):
        return None
    if typing.get_origin(base) is tuple:
        if isinstance(value, str):
            return tuple(part.strip() for part in value.split(",") if part.strip())
        if isinstance(value, list) and all(isinstance(item, str) for item in value):
            return tuple(value)
        raise ConfigError(f"{source}: {name} must be a list of strings, got {value!r}")
    if base is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
            return value.strip().lower() in _TRUE
        raise ConfigError(f"{source}: {name} must be true or false, got {value!r}")
    if base is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str):
            try:
                return int(value.strip())
            except ValueError:
                pass
        raise ConfigError(f"{source}: {name} must be an integer, got {value!r}")
    if base is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value.strip())
            except ValueError:
                pass
        raise ConfigError(f"{source}: {name} must be a number, got {value!r}")
    if isinstance(value, str):  # str, or a Literal of strings (Config checks the choice)
        return value
    raise ConfigError(f"{source}: {name} must be a string, got {value!r}")


def options_from_environ(environ: Mapping[str, str]) -> dict[str, Any]:
    """Return the Config options set by ``ASYNCWSGI_<FIELD>`` variables of ``environ``.

    Variables with the prefix that name no field are ignored (other tools use the prefix).

    Raises:
        ConfigError: a value cannot be converted.
    """
    options: dict[str, Any] = {}
    for name in _fields():
        key = ENV_PREFIX + name.upper()
        if key in environ:
            options[name] = coerce(name, environ[key], key)
    return options


def options_from_toml(path: str | Path, *, required: bool = True) -> dict[str, Any]:
    """Return the Config options of a TOML file.

    The options are the ``[tool.asyncwsgi]`` table when the file has one (``pyproject.toml``),
    else its top-level keys. Keys may use ``-`` or ``_`` (``timeout-keep-alive``).

    Args:
        path: the file.
        required: when False, a missing file or one without ``[tool.asyncwsgi]`` gives ``{}``
            (for the ``pyproject.toml`` read by default).

    Raises:
        ConfigError: the file is missing (when required), is not valid TOML, names an unknown
            setting (a typo must not pass silently), or has a value of the wrong type.
    """
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # Python 3.10: the same parser, packaged as tomli
        try:
            tomllib = importlib.import_module("tomli")
        except ImportError:
            raise ConfigError(
                f"reading {str(path)!r} needs tomli on Python 3.10 (pip install tomli)"
            ) from None
    try:
        with open(path, "rb") as file:
            data = tomllib.load(file)
    except FileNotFoundError:
        if not required:
            return {}
        raise ConfigError(f"config file {str(path)!r} not found") from None
    except OSError as exc:
        raise ConfigError(f"cannot read config file {str(path)!r}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {str(path)!r} is not valid TOML: {exc}") from None
    tool = data.get("tool")
    if isinstance(tool, dict) and "asyncwsgi" in tool:
        table = tool["asyncwsgi"]
        where = f"{path} [tool.asyncwsgi]"
    elif not required:
        return {}
    else:
        table = {key: value for key, value in data.items() if key != "tool"}
        where = str(path)
    if not isinstance(table, dict):
        raise ConfigError(f"{where}: [tool.asyncwsgi] must be a table")
    fields = _fields()
    options: dict[str, Any] = {}
    for key, value in table.items():
        name = key.replace("-", "_")
        if name not in fields:
            raise ConfigError(f"{where}: unknown setting {key!r}")
        options[name] = coerce(name, value, where)
    return options


def read_env_file(path: str | Path) -> dict[str, str]:
    """Return the variables of a dotenv file, as python-dotenv's ``dotenv_values`` reads it.

    python-dotenv's syntax: ``KEY=VALUE`` lines, an optional ``export`` prefix, ``#``
    comments, single- and double-quoted values (escapes in double quotes), and ``${VAR}``
    expansion. A key without ``=`` sets nothing.

    Raises:
        ConfigError: the file is missing or cannot be read.
    """
    if not os.path.isfile(path):
        raise ConfigError(f"env file {str(path)!r} not found")
    try:
        values = dotenv_values(path, encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else exc
        raise ConfigError(f"cannot read env file {str(path)!r}: {reason}") from None
    return {key: value for key, value in values.items() if value is not None}


def load_env_file(path: str | Path, environ: MutableMapping[str, str] | None = None) -> None:
    """Add the variables of a dotenv file to ``environ`` (``os.environ``), keeping those set.

    Raises:
        ConfigError: the file cannot be read.
    """
    target = os.environ if environ is None else environ
    for key, value in read_env_file(path).items():
        target.setdefault(key, value)


def layered_options(
    cli: Mapping[str, Any],
    *,
    config_file: str | None = None,
    env_file: str | None = None,
    environ: MutableMapping[str, str] | None = None,
    cwd: str | Path = ".",
) -> dict[str, Any]:
    """Merge the sources into Config options: CLI > environment > TOML file > defaults.

    Args:
        cli: options given as flags (only those the user gave).
        config_file: ``-c FILE``; without it, ``pyproject.toml`` in ``cwd`` is read if present.
        env_file: ``--env-file FILE``, loaded into ``environ`` first.
        environ: the environment (``os.environ``).
        cwd: where to look for ``pyproject.toml``.

    Raises:
        ConfigError: a source is unreadable or holds a bad value.
    """
    environ = os.environ if environ is None else environ
    if env_file:
        load_env_file(env_file, environ)
    if config_file:
        options = options_from_toml(config_file)
    else:
        options = options_from_toml(Path(cwd) / "pyproject.toml", required=False)
    options.update(options_from_environ(environ))
    options.update(cli)
    return options
