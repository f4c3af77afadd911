"""asyncwsgi: a WSGI (PEP 3333) server over HTTP/1.1 on one asyncio event loop.

One event loop (uvloop where available) owns every socket; h11 parses and frames HTTP/1.1; each
request's application call runs in a thread pool. Idle keep-alive connections and slow clients
hold no thread.

Public API:

- :func:`serve`: ``await asyncwsgi.serve(app, port=8000)`` inside a running loop.
- :func:`run`: ``asyncwsgi.run(app, port=8000)``, blocking, with signal handling.
- :class:`Server`: the server object (bound addresses, started signal, ``shutdown(timeout)``).
- :class:`Config`: every setting, the single source of truth for the CLI and the API.
- :func:`make_server`: ``wsgiref.simple_server.make_server`` with the same shape
  (``serve_forever()``, ``shutdown()``...), see :mod:`asyncwsgi.simple_server`.
- :class:`FileWrapper`: the ``wsgi.file_wrapper`` type.
- errors: :class:`AsyncWSGIError`, :class:`ConfigError`, :class:`ClientDisconnected`.
"""

from __future__ import annotations

from ._version import __version__
from .config import Config
from .errors import AsyncWSGIError, ClientDisconnected, ConfigError
from .filewrapper import FileWrapper
from .server import Server, run, serve
from .simple_server import make_server

__all__ = [
    "__version__",
    "AsyncWSGIError",
    "ClientDisconnected",
    "Config",
    "ConfigError",
    "FileWrapper",
    "Server",
    "make_server",
    "run",
    "serve",
]
