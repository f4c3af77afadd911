"""Start a WSGI server that has no command line of its own fit for the benchmarks.

    python launch.py cheroot apps:hello --port 8000 [--threads 8] [--defaults]
    python launch.py wsgiref apps:hello --port 8000 [--defaults]
    python launch.py uvicorn apps:hello --port 8000 [--threads 8] [--defaults]

``cheroot`` runs ``cheroot.wsgi.Server``; ``wsgiref`` runs the thread-per-connection
``ThreadingWSGIServer`` that Django's ``runserver`` uses; ``uvicorn`` wraps the app in uvicorn's
own ``WSGIMiddleware`` (which is a2wsgi's when a2wsgi is installed) so that its thread pool size
can be set. ``--defaults`` keeps each library's own defaults instead of the tuned values (thread
count, listen backlog, keep-alive timeout) the benchmark otherwise gives every server.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import socketserver
import sys
from typing import TYPE_CHECKING, Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer

if TYPE_CHECKING:
    from wsgiref.types import WSGIApplication

TUNED_BACKLOG = 2048
TUNED_KEEP_ALIVE_S = 60
TUNED_CONNECTION_LIMIT = 12_000


def load_app(spec: str) -> WSGIApplication:
    """Import ``module:attribute`` and return the WSGI application it names."""
    app: WSGIApplication = pkgutil.resolve_name(spec)
    return app


def run_cheroot(app: WSGIApplication, args: argparse.Namespace) -> None:
    wsgi = importlib.import_module("cheroot.wsgi")
    options: dict[str, Any] = {}
    if not args.defaults:
        options = {
            "numthreads": args.threads,
            "request_queue_size": TUNED_BACKLOG,
            "timeout": TUNED_KEEP_ALIVE_S,
        }
    server = wsgi.Server((args.host, args.port), app, **options)
    if not args.defaults:
        # cheroot closes idle keep-alive connections beyond this many (default 10).
        server.keep_alive_conn_limit = TUNED_CONNECTION_LIMIT
    server.safe_start()


class QuietHandler(WSGIRequestHandler):
    """wsgiref's handler without the per-request line on stderr."""

    def log_message(self, format: str, *args: Any) -> None:
        pass


def run_wsgiref(app: WSGIApplication, args: argparse.Namespace) -> None:
    class ThreadingWSGIServer(socketserver.ThreadingMixIn, WSGIServer):
        """A thread per connection, as ``django.core.servers.basehttp`` does."""

        daemon_threads = True
        request_queue_size = 5 if args.defaults else TUNED_BACKLOG

    server = ThreadingWSGIServer((args.host, args.port), QuietHandler)
    server.set_app(app)
    print(f"Listening at: http://{args.host}:{args.port}", file=sys.stderr, flush=True)
    server.serve_forever()


def run_uvicorn(app: WSGIApplication, args: argparse.Namespace) -> None:
    uvicorn = importlib.import_module("uvicorn")
    # uvicorn's own adapter; uvicorn makes it a2wsgi's when a2wsgi is installed.
    wsgi_middleware = importlib.import_module("uvicorn.middleware.wsgi").WSGIMiddleware
    options: dict[str, Any] = {}
    if not args.defaults:
        options = {"backlog": TUNED_BACKLOG, "timeout_keep_alive": TUNED_KEEP_ALIVE_S}
    workers = 10 if args.defaults else args.threads
    uvicorn.run(
        wsgi_middleware(app, workers=workers),
        host=args.host,
        port=args.port,
        interface="asgi3",
        access_log=False,
        log_level="info",
        **options,
    )


RUNNERS = {"cheroot": run_cheroot, "wsgiref": run_wsgiref, "uvicorn": run_uvicorn}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("server", choices=sorted(RUNNERS))
    parser.add_argument("app", help="module:attribute")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--defaults", action="store_true", help="keep the library's defaults")
    args = parser.parse_args(argv)
    RUNNERS[args.server](load_app(args.app), args)


if __name__ == "__main__":
    main()
