"""systemd integration: ``sd_notify(3)`` for ``Type=notify`` and ``Type=notify-reload`` services.

When systemd sets ``$NOTIFY_SOCKET`` (a UNIX datagram socket; a name starting with ``@`` is in
the abstract namespace), the server reports its state there, one datagram per change:

- ``READY=1`` once it accepts connections (under the supervisor: once ``--workers`` workers of
  the newest generation accept);
- ``RELOADING=1`` with ``MONOTONIC_USEC`` (``CLOCK_MONOTONIC`` in microseconds, as
  ``Type=notify-reload`` wants) on SIGHUP, and ``READY=1`` again once the reload is done;
- ``STOPPING=1`` when a shutdown begins;
- ``WATCHDOG=1`` every half of ``$WATCHDOG_USEC`` (systemd's ``WatchdogSec=``) while the event
  loop runs: in a single process from a timer of its loop; under the supervisor from the
  supervisor's loop, while at least one worker's heartbeat is fresh (see
  :class:`asyncwsgi.supervisor.Supervisor`).

Workers do not notify: ``NotifyAccess=main`` (systemd's default) accepts only the main process,
and :func:`forget` removes the variables in each worker. Socket activation (``LISTEN_FDS``) is
:func:`asyncwsgi.config.systemd_listen_fds`.

The functions run on the thread that calls them (the loop thread, or the supervisor's main
thread); sending never blocks and never raises.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import time
from typing import TYPE_CHECKING

from .logs import error_logger

if TYPE_CHECKING:
    from .server import Server

__all__ = ["notify", "reloading", "watchdog_interval", "forget", "notify_single_process"]

_VARIABLES = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")
_tasks: set[asyncio.Task[None]] = set()


def notify(*fields: str) -> bool:
    """Send ``fields`` (``"READY=1"``...) to ``$NOTIFY_SOCKET`` as one datagram, newline-separated.

    Returns False when the variable is not set or the datagram could not be sent (the error is
    logged at debug level: systemd is gone, or the socket is not a datagram socket).
    """
    address = os.environ.get("NOTIFY_SOCKET", "")
    if not address or not fields:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.setblocking(False)
            sock.sendto("\n".join(fields).encode(), address)
    except OSError as exc:
        error_logger.debug("sd_notify to %r failed: %s", os.environ["NOTIFY_SOCKET"], exc)
        return False
    return True


def reloading() -> tuple[str, str]:
    """The fields of a reload notification: ``RELOADING=1`` and ``MONOTONIC_USEC``."""
    usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    return "RELOADING=1", f"MONOTONIC_USEC={usec}"


def watchdog_interval() -> float:
    """Seconds between two ``WATCHDOG=1``: half of ``$WATCHDOG_USEC``; 0 when the watchdog is
    off, or when ``$WATCHDOG_PID`` names another process (``sd_watchdog_enabled(3)``)."""
    pid = os.environ.get("WATCHDOG_PID", "")
    if pid and pid != str(os.getpid()):
        return 0.0
    usec = os.environ.get("WATCHDOG_USEC", "")
    if not usec.isdigit() or not os.environ.get("NOTIFY_SOCKET"):
        return 0.0
    return int(usec) / 2e6


def forget() -> None:
    """In a worker process: remove the variables, so that neither the worker nor its
    application notifies systemd in the main process's place."""
    for name in _VARIABLES:
        os.environ.pop(name, None)


def notify_single_process(server: Server) -> None:
    """The ``on_started`` hook of :func:`asyncwsgi.server.run` for a single process (no
    supervisor): ``READY=1`` now, ``WATCHDOG=1`` from a loop timer, ``STOPPING=1`` once the
    server is told to exit. SIGHUP cannot reload the application in place: it is logged, and
    answered with ``RELOADING=1`` and ``READY=1``, so that ``systemctl reload`` completes and
    the process keeps serving. Loop thread.
    """
    loop = asyncio.get_running_loop()

    def on_hup() -> None:
        error_logger.info("Received SIGHUP; a single process has no reload (use --workers)")
        notify(*reloading())
        notify("READY=1")

    loop.add_signal_handler(signal.SIGHUP, on_hup)
    if not os.environ.get("NOTIFY_SOCKET"):
        return
    notify("READY=1")
    interval = watchdog_interval()
    if interval:

        def ping() -> None:
            notify("WATCHDOG=1")
            loop.call_later(interval, ping)

        ping()

    async def stopping() -> None:
        await server.should_exit.wait()
        notify("STOPPING=1")

    task = loop.create_task(stopping())
    _tasks.add(task)  # a reference until it has run
    task.add_done_callback(_tasks.discard)
