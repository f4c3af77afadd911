"""Server: listening sockets, the thread pool, connection housekeeping and graceful shutdown.

Three entry points:

- :class:`Server` for programs that want the object: ``await server.start()``, the bound
  :attr:`Server.addresses`, :attr:`Server.started`, ``await server.shutdown(timeout)``.
- :func:`serve`: ``await asyncwsgi.serve(app, port=8000)`` on the loop that is already running,
  until cancelled or until ``shutdown_trigger`` returns.
- :func:`run`: the blocking entry for scripts and the CLI; it creates the loop (uvloop when
  installed), installs the signal handlers and returns after a graceful shutdown.

Signals (:func:`run`), as gunicorn's, except that SIGINT is graceful the first time:

- SIGTERM: graceful shutdown; in-flight requests get ``--timeout-graceful-shutdown`` seconds.
  With ``--shutdown-delay``, the server first goes on serving for that long while its
  ``--health-path`` answers 503, so that a load balancer takes it out of rotation.
  Repeating it changes nothing, so a signal sent to the whole process group (systemd's
  ``KillMode=control-group``), which a worker also gets forwarded by its supervisor, is still
  graceful.
- SIGINT (Ctrl-C): graceful shutdown; a second SIGINT closes the connections now.
- SIGQUIT: close every connection now and exit.
- SIGUSR1: reopen the log files (after logrotate moved them).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import socket
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from .channel import HTTPChannel
from .config import Config
from .listeners import accept_backlog, bind_socket, listen_url
from .logs import LogThrottle, error_logger, flush_logs, reopen_log_files, setup_logging
from .pool import ThreadPool
from .state import Channel, ServerState
from .tls import create_ssl_context

if TYPE_CHECKING:
    from ._types import WSGIApplication

__all__ = ["Server", "serve", "run", "new_event_loop", "bind_socket"]

#: Seconds a connection accepted before a graceful shutdown began may still take to send its
#: first request (bounded by the shutdown timeout).
FIRST_REQUEST_GRACE = 1.0


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
        self._pool: ThreadPool | None = None
        self._housekeeping: asyncio.Task[None] | None = None
        self._stopped = asyncio.Event()
        # The listening sockets; each asyncio server listens on a duplicate of one (see _listen).
        self._listeners: list[socket.socket] = []
        self._listen: Callable[[socket.socket], Awaitable[asyncio.base_events.Server]] | None = None
        self._accept_paused = False
        self._resuming: asyncio.Task[None] | None = None
        #: The protocol factory and TLS context for connections taken from the backlog.
        self._drain: tuple[Callable[[], asyncio.Protocol], Any] | None = None
        self._overload_log = LogThrottle()
        #: Set when the server wants to stop on its own (``--max-requests``); ``serve()`` and
        #: ``run()`` then shut down gracefully.
        self.should_exit = asyncio.Event()
        #: Called once the sockets are bound, before the first connection is accepted.
        self.on_bound: Callable[[], object] | None = None
        #: Called on the loop with the reason (``max_requests``, ``stuck``) when this process
        #: recycles itself, as it stops accepting: a supervisor's worker sets it, to have its
        #: replacement started at once. Without it, stuck threads are only reported.
        self.on_recycle: Callable[[str], object] | None = None
        #: Why the process recycles itself ("" while it does not).
        self.recycle_reason = ""

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
        self._pool = ThreadPool(loop, config.threads)
        state = self._state = ServerState(
            config, self.app, self._pool, multiprocess=config.workers > 1, clock=loop.time
        )
        if config.max_requests:
            # Drawn once per process, so that workers started together restart apart.
            state.max_requests = config.max_requests + random.randint(0, config.max_requests_jitter)
            state.on_max_requests = self._max_requests_reached
        state.on_threads_stuck = self._threads_stuck
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

        async def listen(sock: socket.socket) -> asyncio.base_events.Server:
            # On a duplicate: closing the asyncio server, to pause accepting, closes only the
            # duplicate, and leaves the listening socket and its backlog in place.
            dup = sock.dup()
            try:
                return await loop.create_server(
                    lambda: HTTPChannel(state, scheme),
                    sock=dup,
                    backlog=config.backlog,
                    ssl=sslcontext,
                )
            except BaseException:
                dup.close()
                raise

        self._listen = listen
        if self.on_bound is not None:
            self.on_bound()
        self._drain = (lambda: HTTPChannel(state, scheme), sslcontext)
        for sock in sockets:
            self._listeners.append(sock)
            self._servers.append(await listen(sock))
            self.addresses.append(sock.getsockname())
        if config.limit_max_connections:
            state.on_connections_full = self._pause_accepting
            state.on_connections_room = self._resume_accepting
        self._housekeeping = loop.create_task(self._housekeep())
        for address in self.addresses:
            error_logger.info(
                "Listening at: %s (threads: %d)", listen_url(address, scheme), config.threads
            )
        self.started.set()

    async def _housekeep(self) -> None:
        """Refresh the Date header, enforce timeouts, report a saturated pool, write access lines.

        One sweep over the connections, about once a second, and four times per the shortest
        timeout when that is shorter: requests arm no timers of their own. A sweep is spread
        over up to ten ticks, each checking its share of the connections, so that ten thousand
        idle ones cost ten short pauses of the loop instead of one long one.
        """
        state = self.state
        pool = self._pool
        assert pool is not None
        interval = state.timeouts.sweep_interval
        slices = max(1, min(10, round(interval / 0.01)))
        clock = state.clock
        check = state.timeouts.check
        sweep: list[Channel] = []
        done = share = 0
        while True:
            await asyncio.sleep(interval / slices)
            state.refresh_date()
            flush_logs()
            now = clock()
            perf_now = time.perf_counter()
            if done >= len(sweep):
                sweep = list(state.channels)
                done = 0
                share = -(-len(sweep) // slices)  # ceiling
            for channel in sweep[done : done + share]:
                check(channel, now, perf_now)
            done += share
            queued = pool.queued
            if queued and pool.busy >= pool.max_threads and self._overload_log.ready():
                # waitress's "Task queue depth" warning.
                error_logger.warning(
                    "All %d threads busy; task queue depth is %d", pool.max_threads, queued
                )

    def _max_requests_reached(self) -> None:
        """The request that reaches ``--max-requests`` was accepted: stop. Loop thread."""
        error_logger.info(
            "Maximum request limit of %d exceeded. Terminating process.", self.state.max_requests
        )
        self.recycle("max_requests")

    def recycle(self, reason: str) -> None:
        """Stop accepting and shut down gracefully, telling ``on_recycle`` why. Loop thread."""
        if not self.recycle_reason:
            self.recycle_reason = reason
            self.should_exit.set()
            if self.on_recycle is not None:
                self.on_recycle(reason)

    def _threads_stuck(self) -> None:
        """``--threads`` threads are stuck: recycle under a supervisor, else report. Loop thread.

        Without a supervisor nothing would start a replacement: the process goes on serving
        with the replacement threads, and its health check answers 503 (``--health-path``)
        until a stuck thread finishes, so that an orchestrator restarts it.
        """
        threads = self.config.threads
        if self.on_recycle is None:
            error_logger.critical(
                "All %d threads are stuck in the application (--timeout-request); the health "
                "check answers 503 until one finishes: restart this process",
                threads,
            )
        elif not self.recycle_reason:
            error_logger.error(
                "All %d threads are stuck in the application (--timeout-request); recycling "
                "this worker: it stops accepting and exits once its other requests are done",
                threads,
            )
            self.recycle("stuck")

    def _pause_accepting(self) -> None:
        """Stop accepting: ``limit_max_connections`` connections are open. Loop thread.

        The asyncio servers are closed, but not the listening sockets, so new connections wait
        in the kernel's listen backlog (``--backlog``) until :meth:`_resume_accepting`.
        """
        if self._accept_paused or self.state.shutting_down:
            return
        self._accept_paused = True
        for server in self._servers:
            server.close()
        self._servers.clear()
        count = self._overload_log.ready()
        if count:
            error_logger.warning(
                "%d connections open (--limit-max-connections): not accepting new ones until "
                "one closes",
                len(self.state.channels),
            )

    def _resume_accepting(self) -> None:
        """Accept again: a connection closed below ``limit_max_connections``. Loop thread."""
        if self._accept_paused and self._resuming is None and not self.state.shutting_down:
            self._resuming = asyncio.get_running_loop().create_task(self._resume())

    async def _resume(self) -> None:
        listen = self._listen
        assert listen is not None
        servers: list[asyncio.base_events.Server] = []
        try:
            for sock in self._listeners:
                servers.append(await listen(sock))
        except BaseException as exc:
            for server in servers:
                server.close()
            if not isinstance(exc, Exception):
                raise  # cancelled by shutdown
            error_logger.exception("Could not accept connections again")
            return
        finally:
            self._resuming = None
        if self.state.shutting_down:
            for server in servers:
                server.close()
            return
        self._servers.extend(servers)
        self._accept_paused = False
        if len(self.state.channels) >= self.config.limit_max_connections:
            self._pause_accepting()

    async def wait_closed(self) -> None:
        """Wait until :meth:`shutdown` has completed."""
        await self._stopped.wait()

    async def shutdown(self, timeout: float | None = None) -> None:
        """Stop gracefully: stop accepting, close idle connections, let requests finish.

        Connections waiting in the listen backlog are accepted and served, not reset. Within
        ``timeout``, every response already begun is delivered in full (a connection
        counts as done once it has closed, not once it has started closing with output still
        buffered), and connections lingering after a response finish lingering. Only then, or
        when the time is up, are the connections left cut.

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
        if self._drain is not None:
            # Serve what the kernel accepted already: closing the sockets would reset it.
            await accept_backlog(self._listeners, *self._drain, self.config.backlog)
        for sock in self._listeners:
            sock.close()
        if self._resuming is not None:
            self._resuming.cancel()
        # Idle keep-alive connections close now. A connection accepted just before the listener
        # closed, whose request has not arrived or is arriving, gets FIRST_REQUEST_GRACE seconds
        # to send it, and is answered with Connection: close: a rolling restart (SIGHUP, or a
        # deploy behind a load balancer) then fails no request that reached this process.
        for channel in list(state.channels):
            if channel.idle_after_response:
                channel.close()

        def close_unstarted() -> None:
            for channel in list(state.channels):
                if not channel.in_flight:
                    channel.close()

        grace = asyncio.get_running_loop().call_later(
            min(timeout, FIRST_REQUEST_GRACE), close_unstarted
        )
        idle = state.idle_changed
        assert idle is not None

        async def connections_closed() -> None:
            # Closed, not closing: a closing connection may still be flushing a response or
            # lingering after one (a 413), and both end on their own: the client reads, or
            # --timeout-write, --timeout-linger or the shutdown timeout runs out.
            while state.channels:
                idle.clear()
                await idle.wait()

        if state.channels:
            error_logger.info(
                "Waiting for %d connection(s) to finish (--timeout-graceful-shutdown %g s)",
                len(state.channels),
                timeout,
            )
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(connections_closed(), timeout)
        grace.cancel()
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
        if state.metrics is not None:
            await state.metrics.close()
        flush_logs()  # every access line, whatever ended the server (SIGQUIT too)
        self._stopped.set()

    async def __aenter__(self) -> Server:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.shutdown()


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
        waiters: list[asyncio.Future[object]] = [asyncio.ensure_future(server.should_exit.wait())]
        if shutdown_trigger is not None:
            waiters.append(asyncio.ensure_future(shutdown_trigger()))
        try:
            await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in waiters:
                waiter.cancel()
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
    on_bound: Callable[[], object] | None = None,
    on_started: Callable[[Server], object] | None = None,
    **options: Any,
) -> None:
    """Serve ``app`` until SIGINT or SIGTERM, then shut down gracefully. Blocks; main thread.

    ``on_bound`` is called on the loop once every socket is bound, before any connection is
    accepted (a supervisor uses it to learn that a new worker is ready); ``on_started`` with the
    :class:`Server` once every socket accepts.

    Creates the event loop named by ``config.loop`` (uvloop by default when installed), sets up
    logging to stderr unless ``configure_logs`` is False, and returns once every connection is
    closed. SIGTERM and SIGINT shut down gracefully, SIGQUIT or a second SIGINT closes the
    connections at once, SIGUSR1 reopens the log files (see the module docstring). The handlers
    are installed, and then these signals unblocked in the calling thread, before the sockets
    accept: signals that arrived while they were blocked are handled then.

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
        loop.run_until_complete(_main(app, config, sockets, on_bound, on_started))
    finally:
        try:
            loop.run_until_complete(loop.shutdown_asyncgens())
        finally:
            asyncio.set_event_loop(None)
            loop.close()


#: The signals :func:`run` handles: SIGTERM and SIGINT stop gracefully, SIGQUIT (or a second
#: SIGINT) stops now, SIGUSR1 reopens the log files.
HANDLED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGUSR1)


async def _main(
    app: WSGIApplication,
    config: Config,
    sockets: list[socket.socket] | None,
    on_bound: Callable[[], object] | None,
    on_started: Callable[[Server], object] | None,
) -> None:
    loop = asyncio.get_running_loop()
    server = Server(app, config, sockets=sockets)
    server.on_bound = on_bound
    graceful = quick = False
    interrupts = 0

    def on_signal(signum: int) -> None:
        # gunicorn's meanings: SIGTERM is a graceful shutdown, however often it comes (systemd's
        # KillMode=control-group sends it to every process, and the supervisor forwards one
        # more); SIGQUIT is "now". SIGINT is graceful too, and a second SIGINT, a person pressing
        # Ctrl-C again, is "now": a supervisor forwards SIGTERM, never SIGINT, so a worker sees
        # one SIGINT per keypress.
        nonlocal graceful, quick, interrupts
        name = signal.Signals(signum).name
        if signum == signal.SIGINT:
            interrupts += 1
        if signum == signal.SIGQUIT or interrupts > 1:
            if quick:
                return
            quick = True
            again = " again" if signum == signal.SIGINT else ""
            error_logger.info("Received %s%s, closing connections now", name, again)
            server.should_exit.set()
            if server.started.is_set():
                for channel in list(server.state.channels):
                    channel.abort()
        elif graceful or quick:
            error_logger.info("Received %s; already shutting down", name)
        else:
            graceful = True
            delay = config.shutdown_delay
            if signum == signal.SIGTERM and delay > 0 and server.started.is_set():
                # Out of the load balancer's rotation first: the health check fails, while
                # requests are still served as usual.
                error_logger.info(
                    "Received SIGTERM; serving %g s more while the health check answers 503 "
                    "(--shutdown-delay), then shutting down",
                    delay,
                )
                server.state.draining = True
                loop.call_later(delay, server.should_exit.set)
                return
            error_logger.info("Received %s, shutting down", name)
            server.should_exit.set()

    def on_usr1() -> None:
        error_logger.info("Received SIGUSR1, reopening %d log file(s)", reopen_log_files())

    for signum in HANDLED_SIGNALS:
        if signum == signal.SIGUSR1:
            loop.add_signal_handler(signum, on_usr1)
        else:
            loop.add_signal_handler(signum, on_signal, signum)
    # A worker forked by the supervisor comes here with these signals blocked, and those it
    # received while it booted pending: they are handled now, by the handlers above.
    signal.pthread_sigmask(signal.SIG_UNBLOCK, HANDLED_SIGNALS)
    error_logger.info("Starting asyncwsgi (pid: %d, loop: %s)", os.getpid(), _loop_name(loop))
    await server.start()
    if on_started is not None:
        on_started(server)
    try:
        await server.should_exit.wait()
    finally:
        await server.shutdown(0 if quick else None)
        for signum in HANDLED_SIGNALS:
            loop.remove_signal_handler(signum)
        error_logger.info("Shutdown complete")


def _loop_name(loop: asyncio.AbstractEventLoop) -> str:
    return "uvloop" if type(loop).__module__.startswith("uvloop") else "asyncio"
