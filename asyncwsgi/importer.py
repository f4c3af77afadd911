"""Import the WSGI application named on the command line (``module:attribute``).

Used by the CLI for a single process and by each worker process after fork, as uvicorn's
``importer.py``.
"""

from __future__ import annotations

import importlib
import os
import sys
import typing
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ._types import WSGIApplication

__all__ = ["AppLoadError", "load_app"]


class AppLoadError(Exception):
    """The application could not be imported: the message is one line for the user."""


def load_app(spec: str, *, app_dir: str = ".", factory: bool = False) -> WSGIApplication:
    """Import the WSGI application named by ``spec``.

    Args:
        spec: ``module:attribute`` (the attribute may be dotted), or ``module`` alone, which
            means ``module:application`` as in gunicorn.
        app_dir: directory put first on ``sys.path`` before importing.
        factory: call the attribute with no arguments and use what it returns.

    Raises:
        AppLoadError: the module or attribute does not exist, or is not callable.
        Exception: whatever importing the module raised inside its own code (shown in full).
    """
    module_name, _, attr = spec.partition(":")
    attr = attr or "application"
    if not module_name or not all(part.isidentifier() for part in attr.split(".")):
        raise AppLoadError(f"APP must be MODULE:ATTRIBUTE, got {spec!r}")
    path = os.path.abspath(app_dir)
    if path not in sys.path:
        sys.path.insert(0, path)
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        # Only the module itself (or a package on its path) missing is a one-line error; a
        # missing dependency imported by the module's own code gets its full traceback.
        if exc.name and (module_name == exc.name or module_name.startswith(exc.name + ".")):
            raise AppLoadError(f"could not import module {module_name!r}: {exc}") from None
        raise
    obj: Any = module
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise AppLoadError(f"attribute {attr!r} not found in module {module_name!r}") from None
    if factory:
        if not callable(obj):
            raise AppLoadError(f"factory {spec!r} is not callable")
        obj = obj()
    if not callable(obj):
        raise AppLoadError(f"{spec!r} is not a callable WSGI application")
    return typing.cast("WSGIApplication", obj)
