"""The ``asyncwsgi`` command: ``asyncwsgi serve module:application [flags]``.

Every flag is generated from :class:`~asyncwsgi.config.Config`'s fields, with their help text,
so the CLI and the Python API cannot drift apart: ``threads`` is ``--threads``,
``timeout_keep_alive`` is ``--timeout-keep-alive``, booleans get ``--x/--no-x``, and fields
declare extra spellings (gunicorn's ``-b`` and ``--limit-request-field_size``) in their metadata.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import sys
import types
import typing
from collections.abc import Sequence
from typing import Any, get_args, get_origin

from ._version import __version__
from .config import GROUPS, BindSpec, Config
from .errors import ConfigError
from .importer import AppLoadError, load_app
from .settings import layered_options

__all__ = ["main", "load_app", "build_parser", "AppLoadError"]


#: ``--help`` is at most this wide, however wide the terminal.
HELP_WIDTH = 100

#: After the flags in ``asyncwsgi serve --help``.
SERVE_EPILOG = """\
--access-logformat takes gunicorn's atoms; its "combined" line is
  '%(h)s %(l)s %(u)s %(t)s "%(r)s" %(s)s %(b)s "%(f)s" "%(a)s" %(D)s'
Every flag is also an ASYNCWSGI_<SETTING> variable and a [tool.asyncwsgi] key of pyproject.toml.
The README's flags table explains each flag at length."""


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """argparse's layout, at most :data:`HELP_WIDTH` columns wide; the epilog is kept as written."""

    def __init__(self, prog: str) -> None:
        width = min(HELP_WIDTH, shutil.get_terminal_size().columns - 2)
        super().__init__(prog, width=width)


def _default_text(field: dataclasses.Field[Any]) -> str:
    """A field's default as ``--help`` shows it: ``on``/``off``, ``none``, or the value."""
    if field.metadata.get("default_text"):
        return str(field.metadata["default_text"])
    default = field.default
    if isinstance(default, bool):
        return "on" if default else "off"
    if default is None or default in ((), ""):
        return "none"
    if isinstance(default, float) and default.is_integer():
        return str(int(default))
    return str(default)


def _add_config_flags(
    parser: argparse.ArgumentParser, groups: dict[str, argparse._ArgumentGroup]
) -> None:
    """Add one flag per Config field, under its group (:data:`asyncwsgi.config.GROUPS`)."""
    hints = typing.get_type_hints(Config)
    for field in dataclasses.fields(Config):
        hint = hints[field.name]
        flags = [f"--{field.name.replace('_', '-')}", *field.metadata.get("flags", ())]
        text = f"{field.metadata['help']} (default: {_default_text(field)})"
        kwargs: dict[str, Any] = {
            "dest": field.name,
            "default": argparse.SUPPRESS,
            "help": text.replace("%", "%%"),
        }
        optional = get_origin(hint) in (typing.Union, types.UnionType)
        base = next((a for a in get_args(hint) if a is not type(None)), hint) if optional else hint
        if base is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif field.metadata.get("repeat"):
            kwargs["action"] = "append"
        elif get_origin(base) is typing.Literal:
            kwargs["choices"] = list(get_args(base))
        else:
            kwargs["type"] = base
        if field.metadata.get("metavar") and base is not bool:
            kwargs["metavar"] = field.metadata["metavar"]
        group = groups.get(field.metadata.get("group") or "", parser)
        group.add_argument(*flags, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    """Return the argument parser: a ``serve`` subcommand with one flag per Config field.

    The ``serve`` subparser is also available as ``parser.serve_parser`` (for its error messages).
    """
    parser = argparse.ArgumentParser(
        prog="asyncwsgi",
        description="Serve a WSGI application over HTTP/1.1.",
        formatter_class=_HelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"asyncwsgi {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    serve = commands.add_parser(
        "serve",
        help="serve a WSGI application",
        description="Serve the WSGI application APP (module:attribute).",
        epilog=SERVE_EPILOG,
        formatter_class=_HelpFormatter,
    )
    serve.add_argument("--version", action="version", version=f"asyncwsgi {__version__}")
    groups = {name: serve.add_argument_group(name) for name in GROUPS}
    application = groups["Application"]
    application.add_argument("app", metavar="APP", help="the application, as module:attribute")
    application.add_argument(
        "-c",
        "--config",
        dest="config_file",
        metavar="FILE",
        help="TOML file of settings (default: [tool.asyncwsgi] of ./pyproject.toml)",
    )
    application.add_argument(
        "--env-file",
        metavar="FILE",
        help="dotenv file added to the environment (default: none)",
    )
    _add_config_flags(serve, groups)
    parser.set_defaults(serve_parser=serve)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit status (0 after a graceful shutdown).

    Errors the user can fix (a bad flag, a bad APP, an address in use) print one line to stderr
    and return 1 (2 for a usage error).
    """
    parser = build_parser()
    namespace, unknown = parser.parse_known_args(argv)
    args = vars(namespace)
    args.pop("command")
    serve_parser: argparse.ArgumentParser = args.pop("serve_parser")
    if unknown:
        serve_parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    app_spec = args.pop("app")
    config_file, env_file = args.pop("config_file", None), args.pop("env_file", None)
    for name in ("bind", "reload_dir", "reload_include", "reload_exclude"):
        if name in args:
            args[name] = tuple(args[name])
    try:  # flags > ASYNCWSGI_* variables > config file > defaults
        args = layered_options(args, config_file=config_file, env_file=env_file)
    except ConfigError as exc:
        serve_parser.error(str(exc))
    if "workers" not in args and os.environ.get("WEB_CONCURRENCY", "").isdigit():
        args["workers"] = int(os.environ["WEB_CONCURRENCY"])  # gunicorn and uvicorn read it too
    try:
        config = Config(**args)
    except ConfigError as exc:
        serve_parser.error(str(exc))
    try:
        # An explicit --workers (1 included, as gunicorn's -w 1) runs the supervisor.
        recycle = config.max_requests or config.workers_max_rss or config.workers_lifetime
        if "workers" in args or config.reload or recycle:
            return _supervise(app_spec, config)
        app = load_app(app_spec, app_dir=config.app_dir, factory=config.factory)
    except (AppLoadError, ConfigError) as exc:  # ConfigError: --log-config, --access-logfile
        print(f"Error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        return _listen_error(config, exc)
    from .server import run
    from .systemd import notify_single_process

    try:
        run(app, config=config, on_started=notify_single_process)
    except ConfigError as exc:  # found on start: a TLS file, the log config
        print(f"Error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        return _listen_error(config, exc)
    except KeyboardInterrupt:
        pass
    return 0


def _supervise(app_spec: str, config: Config) -> int:
    """Run ``--workers`` processes or ``--reload``; each worker imports the app after fork."""
    import functools

    from .logs import setup_logging
    from .supervisor import Supervisor

    # Fail fast on a malformed APP; whether it imports is found out in the worker.
    module_name = app_spec.partition(":")[0]
    if not module_name:
        raise AppLoadError(f"APP must be MODULE:ATTRIBUTE, got {app_spec!r}")
    if config.reload:
        try:
            import watchfiles  # noqa: F401
        except ImportError:
            raise AppLoadError(
                "--reload needs watchfiles: pip install 'asyncwsgi[reload]'"
            ) from None
    if config.metrics_bind is not None:
        from .metrics import require_prometheus_client

        require_prometheus_client()  # ConfigError: reported before anything starts
    setup_logging(config)  # before forking: the workers inherit it
    loader = functools.partial(load_app, app_spec, app_dir=config.app_dir, factory=config.factory)
    return Supervisor(loader, config).run()


def _listen_error(config: Config, exc: OSError) -> int:
    where = ", ".join(_describe(spec) for spec in config.listen_specs())
    reason = exc.strerror or str(exc)
    print(f"Error: could not listen at {where}: {reason}", file=sys.stderr)
    return 1


def _describe(spec: BindSpec) -> str:
    """Return a listen address as the user wrote it: ``HOST:PORT``, ``unix:PATH``, ``fd://N``."""
    if spec.kind == "unix":
        return f"unix:{spec.path}"
    if spec.kind == "fd":
        return f"fd://{spec.fd}"
    host = f"[{spec.host}]" if ":" in spec.host else spec.host
    return f"{host}:{spec.port}"
