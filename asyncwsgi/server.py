"""Server: listening sockets, the thread pool, connection housekeeping and graceful shutdown.

Three entry points:

- :class:`Server` for programs that want the object: ``await server.start()``, the bound
  :attr:`Server.addresses`, :attr:`Server.started`, ``await server.shutdown(timeout)``.
- :func:`serve`: ``await asyncwsgi.serve(app, port=8000)`` on the loop that is already running,
  until cancelled or until ``shutdown_trigger`` returns.
- :func:`run`: the blocking entry for scripts and the CLI; it creates the loop (uvloop when
  installed), installs SIGINT/SIGTERM handlers and returns after a graceful shutdown.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import stat
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from .bridge import WorkerPool
from .channel import HTTPChannel, ServerState
from .config import BindSpec, Config
from .logs import error_logger, setup_logging
from .tls import create_ssl_context

if TYPE_CHECKING:
    from ._types import WSGIApplication

__all__ = ["Server", "serve", "run", "new_event_loop", "bind_socket"]


class Server:
    """An HTTP/1.1 server for one WSGI application, on the running event loop.

    Args:
        app: the WSGI application.
        config: settings; ``Config()`` defaults when None.
        sockets: already-bound listening sockets to serve on instead of ``config``'s addresses
            (a supervisor or socket activation passes these).

    Loop thread only, except that the application runs in the pool of ``config.threads`` threads.
    """

    def __init__(
        self,
        app: WSGIApplication,
        config: Config | None = None,
        *,
        sockets: list[socket.socket] | None = None,
    ) -> None:
        self.app = app
        self.config = config or Config()
        self.started = asyncio.Event()
        #: The bound addresses, as ``getsockname()`` gives them, once started.
        self.addresses: list[Any] = []
        self._sockets = sockets
        self._servers: list[asyncio.base_events.Server] = []
        self._state: ServerState | None = None
        self._pool: WorkerPool | None = None
        self._housekeeping: asyncio.Task[None] | None = None
        self._stopped = asyncio.Event()

    @property
    def state(self) -> ServerState:
        """The state shared by the connections (after :meth:`start`)."""
        assert self._state is not None, "server not started"
        return self._state

    async def start(self) -> None:
        """Bind (unless sockets were given), start accepting, and set :attr:`started`.

        Raises:
            OSError: a socket could not be bound (address in use, permission denied).
            ConfigError: the TLS certificate, key or CA file cannot be loaded.
        """
        loop = asyncio.get_running_loop()
        config = self.config
        sslcontext = create_ssl_context(config)  # once, for every listener
        scheme = "https" if sslcontext is not None else "http"
        self._pool = WorkerPool(config.threads)
        state = self._state = ServerState(config, self.app, self._pool)
        state.idle_changed = asyncio.Event()
        sockets = self._sockets
        if sockets is None:
            sockets = []
            try:
                for spec in config.listen_specs():
                    sockets.append(bind_socket(spec, config))
            except BaseException:
                for sock in sockets:
                    sock.close()
                raise
        for sock in sockets:
            server = await loop.create_server(
                lambda: HTTPChannel(state, scheme),
                sock=sock,
                backlog=config.backlog,
                ssl=sslcontext,
            )
            self._servers.append(server)
            self.addresses.append(sock.getsockname())
        self._housekeeping = loop.create_task(self._housekeep())
        for address in self.addresses:
            error_logger.info(
                "Listening at: %s (threads: %d)", _url(address, scheme), config.threads
            )
        self.started.set()

    async def _housekeep(self) -> None:
        """Refresh the Date header and close connections idle past their keep-alive timeout."""
        state = self.state
        interval = min(1.0, max(0.01, self.config.timeout_keep_alive / 4))
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(interval)
            state.refresh_date()
            now = loop.time()
            for channel in list(state.channels):
                channel.check_timeouts(now)

    async def wait_closed(self) -> None:
        """Wait until :meth:`shutdown` has completed."""
        await self._stopped.wait()

    async def shutdown(self, timeout: float | None = None) -> None:
        """Stop gracefully: stop accepting, close idle connections, let requests finish.

        Args:
            timeout: seconds in-flight requests get before their connections are cut; defaults
                to ``config.timeout_graceful_shutdown``.

        Worker threads still running the application when time runs out are not killed (Python
        cannot); their output is discarded and their ``close()`` still runs when they finish.
        """
        if self._state is None or self._stopped.is_set():
            self._stopped.set()
            return
        state = self._state
        state.shutting_down = True
        timeout = self.config.timeout_graceful_shutdown if timeout is None else timeout
        for server in self._servers:
            server.close()
        for channel in list(state.channels):
            if not channel.in_flight:
                channel.close()
        idle = state.idle_changed
        assert idle is not None

        async def requests_finished() -> None:
            while any(channel.in_flight for channel in state.channels):
                idle.clear()
                await idle.wait()

        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(requests_finished(), timeout)
        for channel in list(state.channels):
            channel.abort()
        if self._housekeeping is not None:
            self._housekeeping.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._housekeeping
        for server in self._servers:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(server.wait_closed(), 1.0)
        if self._pool is not None:
            # Queued close() calls still run; application code that overran is abandoned.
            stuck = await asyncio.get_running_loop().run_in_executor(None, self._pool.shutdown, 1.0)
            if stuck:
                error_logger.warning(
                    "%d worker thread(s) still running the application after shutdown; "
                    "exiting without waiting for them",
                    stuck,
                )
        for spec in self.config.listen_specs():
            if spec.kind == "unix" and self._sockets is None:
                with contextlib.suppress(OSError):
                    os.unlink(spec.path)
        self._stopped.set()

    async def __aenter__(self) -> Server:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.shutdown()


def bind_socket(spec: BindSpec, config: Config) -> socket.socket:
    """Create, bind and listen on one socket for ``spec``.

    Raises:
        OSError: the address is in use, not available, or not permitted.
    """
    if spec.kind == "fd":
        sock = socket.socket(fileno=spec.fd)
        sock.setblocking(False)
        return sock
    if spec.kind == "unix":
        with contextlib.suppress(FileNotFoundError):
            if stat.S_ISSOCK(os.stat(spec.path).st_mode):
                os.unlink(spec.path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(spec.path)
            sock.listen(config.backlog)
        except BaseException:
            sock.close()
            raise
        sock.setblocking(False)
        return sock
    infos = socket.getaddrinfo(
        spec.host or None, spec.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )
    family, _, _, _, address = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(address)
        sock.listen(config.backlog)
    except BaseException:
        sock.close()
        raise
    sock.setblocking(False)
    return sock


def _url(address: Any, scheme: str = "http") -> str:
    if isinstance(address, str):
        return f"unix:{address}"
    host, port = address[0], address[1]
    if ":" in host:
        host = f"[{host}]"
    return f"{scheme}://{host}:{port}"


async def serve(
    app: WSGIApplication,
    *,
    config: Config | None = None,
    shutdown_trigger: Callable[[], Awaitable[object]] | None = None,
    sockets: list[socket.socket] | None = None,
    **options: Any,
) -> None:
    """Serve ``app`` on the running event loop until cancelled or ``shutdown_trigger`` returns.

    Example: ``await asyncwsgi.serve(app, host="0.0.0.0", port=8000, threads=16)``.

    Args:
        app: the WSGI application.
        config: a :class:`Config`; or pass its fields as keyword ``options`` instead.
        shutdown_trigger: an async callable; when it returns, the server shuts down gracefully
            (for example ``stop_event.wait``).
        sockets: already-bound listening sockets to use instead of the configured addresses.
        **options: :class:`Config` fields (``host``, ``port``, ``threads``...).

    Raises:
        ConfigError: an option is invalid.
        TypeError: an option is not a Config field.
        OSError: a socket could not be bound.
    """
    if config is None:
        config = Config(**options)
    elif options:
        import dataclasses

        config = dataclasses.replace(config, **options)
    server = Server(app, config, sockets=sockets)
    await server.start()
    try:
        if shutdown_trigger is None:
            await asyncio.get_running_loop().create_future()
        else:
            await shutdown_trigger()
    finally:
        await asyncio.shield(server.shutdown())


def new_event_loop(name: str) -> asyncio.AbstractEventLoop:
    """Return a new event loop: ``uvloop``, ``asyncio``, or ``auto`` (uvloop when installed).

    Raises:
        ImportError: ``uvloop`` was asked for and is not installed.
    """
    if name in ("uvloop", "auto"):
        try:
            import uvloop
        except ImportError:
            if name == "uvloop":
                raise
        else:
            return uvloop.new_event_loop()
    return asyncio.new_event_loop()


def run(
    app: WSGIApplication,
    *,
    config: Config | None = None,
    sockets: list[socket.socket] | None = None,
    configure_logs: bool = True,
    **options: Any,
) -> None:
    """Serve ``app`` until SIGINT or SIGTERM, then shut down gracefully. Blocks; main thread.

    Creates the event loop named by ``config.loop`` (uvloop by default when installed), sets up
    logging to stderr unless ``configure_logs`` is False, and returns once every connection is
    closed. A second signal during the graceful shutdown cuts it short.

    Raises:
        ConfigError: an option is invalid.
        OSError: a socket could not be bound.
    """
    if config is None:
        config = Config(**options)
    elif options:
        import dataclasses

        config = dataclasses.replace(config, **options)
    if configure_logs:
        setup_logging(config)
    loop = new_event_loop(config.loop)
    try:
        asyncio.set_event_loop(loop)
        loop.run_until_complete(_main(app, config, sockets))
    finally:
        try:
            loop.run_until_complete(loop.shutdown_asyncgens())
        finally:
            asyncio.set_event_loop(None)
            loop.close()


async def _main(app: WSGIApplication, config: Config, sockets: list[socket.socket] | None) -> None:
    loop = asyncio.get_running_loop()
    server = Server(app, config, sockets=sockets)
    stop = asyncio.Event()
    signals = 0

    def on_signal(signum: int) -> None:
        nonlocal signals
        signals += 1
        if signals == 1:
            error_logger.info("Received %s, shutting down", signal.Signals(signum).name)
            stop.set()
        else:
            error_logger.info(
                "Received %s again, closing connections now", signal.Signals(signum).name
            )
            for channel in list(server.state.channels):
                channel.abort()

    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, on_signal, signum)
    error_logger.info("Starting asyncwsgi (pid: %d, loop: %s)", os.getpid(), _loop_name(loop))
    await server.start()
    try:
        await stop.wait()
    finally:
        await server.shutdown()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(signum)
        error_logger.info("Shutdown complete")


def _loop_name(loop: asyncio.AbstractEventLoop) -> str:
    return "uvloop" if type(loop).__module__.startswith("uvloop") else "asyncio"
