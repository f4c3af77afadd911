"""TLS: the server's :class:`ssl.SSLContext`, built once from :class:`~asyncwsgi.config.Config`.

The settings and their defaults are uvicorn's (``--ssl-certfile``, ``--ssl-keyfile``,
``--ssl-keyfile-password``, ``--ssl-ca-certs``, ``--ssl-cert-reqs``, ``--ssl-ciphers``), so a
deployment moves over by renaming the command. The context goes to ``loop.create_server(ssl=...)``
for every listener; the event loop's own TLS layer (asyncio's or uvloop's ``SSLProtocol``) does
the handshake and the record layer, on the loop thread, with no thread per connection.

Over TLS, a ``wsgi.file_wrapper`` body cannot go by ``sendfile(2)`` (the kernel would write the
file's plain bytes past the TLS layer), so :class:`~asyncwsgi.channel.HTTPChannel` turns
``can_sendfile`` off when the transport reports an ``sslcontext`` and the file is read and written
through the transport in blocks instead.
"""

from __future__ import annotations

import ssl
from typing import TYPE_CHECKING

from .errors import ConfigError

if TYPE_CHECKING:
    from .config import Config

__all__ = ["create_ssl_context"]


def create_ssl_context(config: Config) -> ssl.SSLContext | None:
    """Return the server-side TLS context of ``config``, or None when TLS is off.

    TLS is on when ``config.ssl_certfile`` is set. The context is ``PROTOCOL_TLS_SERVER`` with
    the certificate chain and key loaded, ``verify_mode`` from ``ssl_cert_reqs`` (0
    ``CERT_NONE``, 1 ``CERT_OPTIONAL``, 2 ``CERT_REQUIRED``), client CAs from ``ssl_ca_certs``
    and the cipher list ``ssl_ciphers``, as uvicorn builds it. Any thread; reads the files.

    Raises:
        ConfigError: a file is missing or unreadable, the key does not match the certificate,
            the password is wrong, or the cipher list selects nothing; the message names the
            setting, so the CLI reports it in one line.
    """
    if not config.ssl_certfile:
        return None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    password = config.ssl_keyfile_password
    try:
        context.load_cert_chain(
            config.ssl_certfile, config.ssl_keyfile, (lambda: password) if password else None
        )
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(
            f"cannot load the TLS certificate {config.ssl_certfile!r}"
            + (f" with key {config.ssl_keyfile!r}" if config.ssl_keyfile else "")
            + f": {_reason(exc)}"
        ) from None
    context.verify_mode = ssl.VerifyMode(config.ssl_cert_reqs)
    if config.ssl_ca_certs:
        try:
            context.load_verify_locations(config.ssl_ca_certs)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(
                f"cannot load ssl_ca_certs {config.ssl_ca_certs!r}: {_reason(exc)}"
            ) from None
    if config.ssl_ciphers:
        try:
            context.set_ciphers(config.ssl_ciphers)
        except ssl.SSLError as exc:
            raise ConfigError(f"bad ssl_ciphers {config.ssl_ciphers!r}: {_reason(exc)}") from None
    return context


def _reason(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__
