"""``python manage.py runserver``, served by asyncwsgi instead of ``wsgiref``.

The command is Django's own (``django.contrib.staticfiles``'s when that app is installed, so
static files are still served in DEBUG), with two changes: the ``server_cls`` that Django's
``django.core.servers.basehttp.run()`` instantiates is :class:`RunserverServer`, which has the
shape ``run()`` expects (``server_port``, ``set_app()``, ``serve_forever()``) and serves with
asyncwsgi, and the banner names asyncwsgi. Everything else is Django's: the address parsing,
``--ipv6``, ``--noreload`` and the autoreloader (which restarts the process when a file
changes), the system checks, the migrations warning, the error messages for a port in use, and
Ctrl-C.

``--nothreading`` gives the server a single worker thread, so requests run one at a time as
with Django's non-threading server (handy under a debugger); otherwise the application runs in
asyncwsgi's pool of ``Config.threads`` threads.

Access lines and the server's own messages go to stderr through the ``asyncwsgi.access`` and
``asyncwsgi.error`` loggers, unless the project's ``LOGGING`` setting configures them.
"""

from __future__ import annotations

import os
import socket
import socketserver
import sys
import threading  # noqa: TID251 - the thread that serves decides who handles Ctrl-C
from datetime import datetime
from typing import Any

from django.apps import apps  # type: ignore[import-untyped]
from django.conf import settings  # type: ignore[import-untyped]

from asyncwsgi.config import Config
from asyncwsgi.logs import access_logger, configure_logging, error_logger
from asyncwsgi.server import run
from asyncwsgi.simple_server import WSGIServer

if apps.is_installed("django.contrib.staticfiles"):
    from django.contrib.staticfiles.management.commands.runserver import (  # type: ignore[import-untyped]
        Command as RunserverCommand,
    )
else:
    from django.core.management.commands.runserver import (  # type: ignore[import-untyped]
        Command as RunserverCommand,
    )

__all__ = ["Command", "RunserverServer"]


def _not_set(environ: dict[str, Any], start_response: Any) -> list[bytes]:
    raise RuntimeError("RunserverServer.set_app() was not called")


class RunserverServer(WSGIServer):
    """The ``server_cls`` of :class:`Command`: asyncwsgi in the shape Django's ``run()`` uses.

    ``run()`` calls ``server_cls((addr, port), WSGIRequestHandler, ipv6=...)``, mixing in
    :class:`socketserver.ThreadingMixIn` first unless ``--nothreading`` was given, then
    ``set_app(handler)`` and ``serve_forever()``. The request handler class is not used.

    Raises:
        OSError: the address cannot be resolved or bound (Django prints it and exits).
    """

    def __init__(
        self, server_address: tuple[str, int], handler_class: object = None, ipv6: bool = False
    ) -> None:
        host, port = server_address
        if ipv6:  # a host name given with --ipv6 binds its IPv6 address, as Django's server
            host = str(socket.getaddrinfo(host, port, socket.AF_INET6, socket.SOCK_STREAM)[0][4][0])
        threading = isinstance(self, socketserver.ThreadingMixIn)
        config = Config(threads=Config().threads if threading else 1)
        _configure_logs(config)
        super().__init__(host, port, _not_set, config)

    def serve_forever(self, poll_interval: float = 0.5) -> None:
        """Serve until Ctrl-C (or SIGTERM), then raise KeyboardInterrupt as wsgiref's server.

        With ``--noreload`` this runs in the main thread: :func:`asyncwsgi.run` handles SIGINT
        and SIGTERM on the event loop and shuts down gracefully, and the KeyboardInterrupt
        raised afterwards takes Django's own Ctrl-C path (exit status 0). Under the
        autoreloader it runs in Django's ``django-main-thread``, and the reloader in the main
        thread ends the process on Ctrl-C or a file change.
        """
        if threading.current_thread() is not threading.main_thread():
            super().serve_forever(poll_interval)
            return
        sock = self.socket.dup()  # run() closes what it serves on; server_close() closes ours
        try:
            run(self.application, config=self.config, sockets=[sock], configure_logs=False)
        finally:
            sock.close()
        raise KeyboardInterrupt


def _configure_logs(config: Config) -> None:
    """Send asyncwsgi's log lines to stderr, unless ``settings.LOGGING`` names its loggers."""
    configured = getattr(settings, "LOGGING", None) or {}
    loggers = configured.get("loggers", {}) if isinstance(configured, dict) else {}
    if any(name == "asyncwsgi" or name.startswith("asyncwsgi.") for name in loggers):
        return
    if error_logger.handlers or access_logger.handlers:
        return
    configure_logging(config.log_level, config.access_log)


class Command(RunserverCommand):  # type: ignore[misc]
    """Django's ``runserver`` (with staticfiles' additions when installed), on asyncwsgi."""

    help = (
        "Starts a development server served by asyncwsgi, with Django's autoreloader, and "
        "static files when django.contrib.staticfiles is installed."
    )
    server_cls = RunserverServer

    def on_bind(self, server_port: int) -> None:
        """Print Django's banner, naming asyncwsgi, once the socket is bound.

        Django's ``run()`` calls it with the bound port (so ``runserver 127.0.0.1:0`` shows the
        port chosen); Django versions older than that hook print their own banner, naming the
        port as given, before binding.
        """
        if self._raw_ipv6:
            addr = f"[{self.addr}]"
        elif self.addr == "0":
            addr = "0.0.0.0"
        else:
            addr = self.addr
        quit_command = "CTRL-BREAK" if sys.platform == "win32" else "CONTROL-C"
        now = datetime.now().strftime("%B %d, %Y - %X")
        self.stdout.write(
            f"{now}\n"
            f"Django version {self.get_version()}, using settings {settings.SETTINGS_MODULE!r}\n"
            f"Starting asyncwsgi development server at {self.protocol}://{addr}:{server_port}/\n"
            f"Quit the server with {quit_command}."
        )
        if os.environ.get("DJANGO_RUNSERVER_HIDE_WARNING") != "true":
            app = str(getattr(settings, "WSGI_APPLICATION", None) or "mysite.wsgi.application")
            module, _, attribute = app.rpartition(".")
            self.stdout.write(
                self.style.WARNING(
                    "WARNING: runserver is for development (autoreloader, static files from "
                    "staticfiles in DEBUG). In production, serve the WSGI application with "
                    f"asyncwsgi directly: asyncwsgi serve {module}:{attribute}"
                )
            )
        self.stdout.flush()  # a banner on a pipe is seen at once, not when the buffer fills
