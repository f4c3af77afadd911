"""``make_server()`` in the shape of :mod:`wsgiref.simple_server`, served by asyncwsgi.

Code written against the standard library's reference server switches by changing one import::

    from asyncwsgi.simple_server import make_server   # was: from wsgiref.simple_server import ...

    with make_server("", 8000, app) as httpd:
        httpd.serve_forever()          # blocks; another thread may call httpd.shutdown()

The object has what ``wsgiref.simple_server.WSGIServer`` (a :class:`socketserver.TCPServer`)
offers its users: ``serve_forever()``, ``shutdown()``, ``handle_request()``, ``server_close()``,
``server_address``, ``server_port``, ``server_name``, ``socket``, ``timeout``, ``get_app()``,
``set_app()`` and the context manager. Underneath it is the full asyncwsgi server: HTTP/1.1 with
keep-alive, the event loop (uvloop when installed) run in the thread that calls
``serve_forever()``, and a thread pool for the application.

Differences from wsgiref: requests are served concurrently (by ``threads`` pool threads), the
socket is bound in :func:`make_server` as wsgiref does but listens with asyncwsgi's backlog, and
nothing is printed per request: access lines go to the ``asyncwsgi.access`` logger, which the
program configures (``logging.basicConfig(level=logging.INFO)`` shows them).
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
import threading  # noqa: TID251 - shutdown() comes from another thread, as in socketserver
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any

from .config import BindSpec, Config
from .server import Server, bind_socket, new_event_loop

if TYPE_CHECKING:
    from ._types import StartResponse, WSGIApplication, WSGIEnvironment

__all__ = ["make_server", "WSGIServer"]


class WSGIServer:
    """A bound listening socket and the WSGI application to serve on it, wsgiref style.

    Args:
        host: address to bind; ``""`` means every IPv4 interface, as in wsgiref.
        port: TCP port; 0 picks a free one (read it back from :attr:`server_port`).
        app: the WSGI application.
        config: further settings (``threads``, limits, timeouts); ``host``/``port`` in it are
            ignored.

    Raises:
        OSError: the address cannot be bound.
        ConfigError: a setting is invalid.
    """

    #: Seconds :meth:`handle_request` waits for a request; None waits without limit.
    timeout: float | None = None

    def __init__(
        self, host: str, port: int, app: WSGIApplication, config: Config | None = None
    ) -> None:
        self.config = config or Config()
        self.application = app
        host = host or "0.0.0.0"
        #: The listening socket, bound and listening until :meth:`server_close`.
        self.socket = bind_socket(BindSpec(kind="tcp", host=host, port=port), self.config)
        sockname = self.socket.getsockname()
        self.server_address: tuple[str, int] = (str(sockname[0]), int(sockname[1]))
        self.server_port = self.server_address[1]
        self.server_name = socket.getfqdn(self.server_address[0])
        self._stopper: Callable[[], None] | None = None
        self._shutdown_request = False
        self._interrupted = False
        self._is_shut_down = threading.Event()
        self._is_shut_down.set()

    # -- wsgiref's WSGIServer --------------------------------------------------------------

    def get_app(self) -> WSGIApplication:
        """Return the application."""
        return self.application

    def set_app(self, application: WSGIApplication) -> None:
        """Serve ``application`` from the next :meth:`serve_forever` or :meth:`handle_request`."""
        self.application = application

    # -- socketserver's BaseServer -------------------------------------------------------------

    def serve_forever(self, poll_interval: float = 0.5) -> None:
        """Serve until :meth:`shutdown` is called from another thread. Blocks the caller.

        The event loop runs in the calling thread, the application in the pool threads. On
        return every connection is closed; requests in flight were allowed to finish (up to
        ``config.timeout_graceful_shutdown`` seconds). ``poll_interval`` is accepted for
        compatibility and unused: :meth:`shutdown` wakes the loop at once.

        Raises:
            KeyboardInterrupt: Ctrl-C (SIGINT) in the main thread, after connections are closed.
        """
        self._serve(self.application, None)

    def shutdown(self) -> None:
        """Stop :meth:`serve_forever` and wait until it has returned. Any other thread.

        Calling it from the thread running :meth:`serve_forever` deadlocks, as in socketserver.
        Returns at once when the server is not serving.
        """
        self._shutdown_request = True
        stopper = self._stopper
        if stopper is not None:
            stopper()
        self._is_shut_down.wait()

    def handle_request(self) -> None:
        """Serve until one request has been answered, or :attr:`timeout` seconds without one.

        Blocks the caller, like :meth:`serve_forever`; connections are closed on return, the
        listening socket stays open for the next call.
        """
        self._serve(self.application, self.timeout if self.timeout is not None else -1.0)

    def server_close(self) -> None:
        """Close the listening socket."""
        self.socket.close()

    def fileno(self) -> int:
        """The listening socket's file descriptor (for ``selectors``)."""
        return self.socket.fileno()

    def __enter__(self) -> WSGIServer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.server_close()

    # -- the loop ----------------------------------------------------------------------------

    def _serve(self, app: WSGIApplication, one_request: float | None) -> None:
        loop = new_event_loop(self.config.loop)
        stop = asyncio.Event()

        def stopper() -> None:
            with contextlib.suppress(RuntimeError):  # the loop has closed already
                loop.call_soon_threadsafe(stop.set)

        self._is_shut_down.clear()
        self._stopper = stopper
        sigint = False

        def on_sigint() -> None:
            # Ctrl-C as a loop signal handler: a KeyboardInterrupt raised inside a transport
            # callback would be swallowed by uvloop ("Fatal error on transport").
            nonlocal sigint
            sigint = self._interrupted = True
            stop.set()

        try:
            loop.add_signal_handler(signal.SIGINT, on_sigint)
            handles_sigint = True
        except (RuntimeError, ValueError):  # not the main thread: SIGINT is not ours to take
            handles_sigint = False
        try:
            if one_request is not None:
                app = _OneRequest(app, stopper)
            main = loop.create_task(self._main(app, stop, one_request))
            try:
                loop.run_until_complete(main)
            except BaseException:  # KeyboardInterrupt while serving: cut connections, re-raise
                self._interrupted = True
                main.cancel()
                with contextlib.suppress(BaseException):
                    loop.run_until_complete(main)
                raise
            finally:
                if handles_sigint:
                    loop.remove_signal_handler(signal.SIGINT)
                loop.run_until_complete(loop.shutdown_asyncgens())
                loop.run_until_complete(loop.shutdown_default_executor())
                loop.close()
            if sigint:
                raise KeyboardInterrupt
        finally:
            self._stopper = None
            self._shutdown_request = False
            self._interrupted = False
            self._is_shut_down.set()

    async def _main(
        self, app: WSGIApplication, stop: asyncio.Event, one_request: float | None
    ) -> None:
        # A duplicate, because stopping the asyncio server closes its socket; ours stays open.
        server = Server(app, self.config, sockets=[self.socket.dup()])
        await server.start()
        try:
            if self._shutdown_request:
                return
            if one_request is None or one_request < 0:
                await stop.wait()
            else:
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(stop.wait(), one_request)
        finally:
            await server.shutdown(0.0 if self._interrupted else None)


class _OneRequest:
    """Wraps the app for :meth:`WSGIServer.handle_request`: signals when a response is done."""

    def __init__(self, app: WSGIApplication, done: Callable[[], None]) -> None:
        self.app = app
        self.done = done

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        try:
            result = self.app(environ, start_response)
        except BaseException:
            self.done()
            raise
        return _Closing(result, self.done)


class _Closing:
    """The app's iterable; calls ``done`` after its ``close()``, which asyncwsgi runs once."""

    def __init__(self, result: Iterable[bytes], done: Callable[[], None]) -> None:
        self.result = result
        self.done = done

    def __iter__(self) -> Iterator[bytes]:
        return iter(self.result)

    def close(self) -> None:
        try:
            close = getattr(self.result, "close", None)
            if close is not None:
                close()
        finally:
            self.done()


def make_server(
    host: str,
    port: int,
    app: WSGIApplication,
    server_class: Any = None,
    handler_class: Any = None,
    **options: Any,
) -> WSGIServer:
    """Bind ``host:port`` and return a :class:`WSGIServer` for ``app``, as wsgiref's does.

    Args:
        host: address to bind; ``""`` means every IPv4 interface.
        port: TCP port; 0 picks a free one.
        app: the WSGI application.
        server_class, handler_class: wsgiref's hooks; asyncwsgi has neither, so passing one
            raises TypeError rather than silently serving something else.
        **options: :class:`~asyncwsgi.config.Config` fields (``threads=8``,
            ``timeout_keep_alive=10``...).

    Raises:
        TypeError: ``server_class`` or ``handler_class`` was given, or an option is unknown.
        ConfigError: an option is invalid.
        OSError: the address cannot be bound.
    """
    if server_class is not None or handler_class is not None:
        raise TypeError(
            "asyncwsgi's make_server() takes no server_class or handler_class; pass Config "
            "fields as keyword arguments instead"
        )
    return WSGIServer(host, port, app, Config(**options) if options else None)
