"""Listening sockets: binding them (:func:`bind_socket`), and at a graceful shutdown taking
the connections the kernel has already accepted (:func:`accept_backlog`).

A listening socket closed with connections in its accept queue (the listen backlog, which the
kernel completes the TCP handshake for before ``accept()``) resets them: their clients, which
may already have sent a request, see a connection reset rather than a response. A graceful
shutdown therefore accepts every queued connection before it closes the socket, and serves
it like one accepted just before (:data:`asyncwsgi.server.FIRST_REQUEST_GRACE`).

Loop thread (:func:`accept_backlog`), or any thread before serving (:func:`bind_socket`).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import ssl
import stat
from collections.abc import Callable
from typing import Any

from .config import BindSpec, Config
from .logs import error_logger

__all__ = ["bind_socket", "listen_url", "accept_backlog"]


async def accept_backlog(
    listeners: list[socket.socket],
    protocol_factory: Callable[[], asyncio.Protocol],
    sslcontext: ssl.SSLContext | None,
    limit: int,
) -> int:
    """Accept every connection queued on ``listeners`` (non-blocking sockets), up to ``limit``
    each, and hand each to the running loop with a protocol from ``protocol_factory``.

    Call it after the loop stopped accepting on them and before closing them. Returns the
    number of connections taken. A connection that fails to set up (a TLS handshake that
    fails) is closed and logged at debug; nothing is raised but cancellation.
    """
    loop = asyncio.get_running_loop()
    accepted: list[socket.socket] = []
    for listener in listeners:
        if listener.gettimeout() != 0.0:
            continue  # a blocking socket would block the loop: not ours to drain
        for _ in range(limit):
            try:
                conn, _ = listener.accept()
            except (BlockingIOError, InterruptedError):
                break
            except OSError:  # ECONNABORTED and the like: the next one may be fine
                continue
            conn.setblocking(False)
            accepted.append(conn)
    results = await asyncio.gather(
        *(
            loop.connect_accepted_socket(protocol_factory, conn, ssl=sslcontext)
            for conn in accepted
        ),
        return_exceptions=True,
    )
    for conn, result in zip(accepted, results, strict=True):
        if isinstance(result, BaseException):
            error_logger.debug("A queued connection could not be served: %s", result)
            conn.close()
    return len(accepted)


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
        sock = _bind_listen(socket.AF_UNIX, spec.path, config.backlog, [])
        if config.uds_perms is not None:
            os.chmod(spec.path, int(config.uds_perms, 8))
        return sock
    infos = socket.getaddrinfo(
        spec.host or None, spec.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )
    family, _, _, _, address = infos[0]
    options = [(socket.SOL_SOCKET, socket.SO_REUSEADDR)]
    if config.reuse_port and hasattr(socket, "SO_REUSEPORT"):
        options.append((socket.SOL_SOCKET, socket.SO_REUSEPORT))
    if family == socket.AF_INET6:
        options.append((socket.IPPROTO_IPV6, socket.IPV6_V6ONLY))
    return _bind_listen(family, address, config.backlog, options)


def _bind_listen(
    family: int, address: Any, backlog: int, options: list[tuple[int, int]]
) -> socket.socket:
    """Create a non-blocking listening socket; set each (level, option) to 1 before binding."""
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        for level, option in options:
            sock.setsockopt(level, option, 1)
        sock.bind(address)
        sock.listen(backlog)
    except BaseException:
        sock.close()
        raise
    sock.setblocking(False)
    return sock


def listen_url(address: Any, scheme: str = "http") -> str:
    """``http://HOST:PORT`` (IPv6 in brackets), or ``unix:PATH``, for ``getsockname()``."""
    if isinstance(address, str):
        return f"unix:{address}"
    host, port = address[0], address[1]
    if ":" in host:
        host = f"[{host}]"
    return f"{scheme}://{host}:{port}"
