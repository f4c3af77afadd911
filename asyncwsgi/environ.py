"""Build the WSGI ``environ`` of a request (PEP 3333 "environ Variables"). Pure; any thread.

The keys that do not change for a connection (server and peer address, scheme, ``wsgi.*``) are
built once per connection by :func:`connection_environ`; :func:`build_environ` copies that dict
and adds the request's own keys, which keeps the per-request cost to one dict copy and one pass
over the header fields.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote_to_bytes

from .filewrapper import FileWrapper
from .strict import absolute_form_authority, absolute_form_path

if TYPE_CHECKING:
    from ._types import WSGIEnvironment
    from .events import Request

__all__ = ["connection_environ", "build_environ", "environ_key", "SERVER_SOFTWARE"]

from ._version import __version__

SERVER_SOFTWARE = f"asyncwsgi/{__version__}"

_KEY_CACHE: dict[bytes, str | None] = {
    b"content-type": "CONTENT_TYPE",
    b"content-length": "CONTENT_LENGTH",
}
_KEY_CACHE_MAX = 1024


def environ_key(name: bytes) -> str | None:
    """Return the environ key of a lower-case header field name, or None to drop the field.

    ``content-type`` and ``content-length`` map to ``CONTENT_TYPE``/``CONTENT_LENGTH``, others to
    ``HTTP_`` + upper case with ``-`` as ``_``. A name containing ``_`` is dropped, because
    ``X_Forwarded_For`` and ``X-Forwarded-For`` would map to the same key and let a client
    shadow a field a proxy set (gunicorn's default ``header_map = "drop"``, nginx's
    ``underscores_in_headers off``).
    """
    key = _KEY_CACHE.get(name, "")
    if key != "":
        return key
    key = None if b"_" in name else "HTTP_" + name.decode("latin-1").upper().replace("-", "_")
    if len(_KEY_CACHE) < _KEY_CACHE_MAX:
        _KEY_CACHE[name] = key
    return key


def connection_environ(
    *,
    server: tuple[str, int],
    url_scheme: str,
    root_path: str,
    multiprocess: bool,
) -> dict[str, Any]:
    """Return the environ keys shared by every request of one listener.

    ``REMOTE_ADDR`` is ``""`` here: the channel sets ``REMOTE_ADDR`` and ``REMOTE_PORT`` per
    request when the client has an IP address (not over a UNIX socket).

    Args:
        server: (SERVER_NAME, SERVER_PORT) of the listening socket; a UNIX socket gives
            (path, 0) and is reported as it is.
        url_scheme: ``http`` or ``https``.
        root_path: SCRIPT_NAME, the prefix the application is mounted under.
        multiprocess: ``wsgi.multiprocess``, True when several worker processes serve.
    """
    base: dict[str, Any] = {
        "wsgi.version": (1, 0),
        "wsgi.url_scheme": url_scheme,
        "wsgi.errors": sys.stderr,
        "wsgi.multithread": True,
        "wsgi.multiprocess": multiprocess,
        "wsgi.run_once": False,
        "wsgi.file_wrapper": FileWrapper,
        "wsgi.input_terminated": True,
        "SERVER_SOFTWARE": SERVER_SOFTWARE,
        "SCRIPT_NAME": root_path,
        "SERVER_NAME": server[0],
        "SERVER_PORT": str(server[1]),
        "REMOTE_ADDR": "",
    }
    return base


def build_environ(base: dict[str, Any], request: Request, body: object) -> WSGIEnvironment:
    """Return the environ of one request.

    Args:
        base: from :func:`connection_environ` (copied, not changed).
        request: the parsed request; its target is origin-form, absolute-form or ``*`` (others
            were rejected before, see :func:`asyncwsgi.strict.check_request`).
        body: the ``wsgi.input`` object.

    PATH_INFO is the percent-decoded path as a latin-1 native string (PEP 3333 "Unicode
    Issues"), with SCRIPT_NAME removed from its front; repeated header fields are joined with
    ``,`` (``; `` for Cookie, RFC 6265 section 5.4). For an absolute-form target, HTTP_HOST is
    its authority, whatever the Host field says, and ``wsgi.url_scheme`` its scheme (RFC 9112
    sections 3.2.2 and 3.3); SERVER_NAME and SERVER_PORT stay those of the listening socket, as
    with origin-form. Trusted forwarded headers (asyncwsgi.proxy) are applied after this.
    """
    environ = base.copy()
    target = request.target
    authority: bytes | None = None
    if target[:1] != b"/" and target != b"*":
        # absolute-form: http(s)://host[:port]/path?query. RFC 9112 section 3.2.2: the server
        # MUST use the target's authority and ignore the Host field; section 3.3: the target
        # URI, its scheme included, is the request-target.
        authority = absolute_form_authority(target)
        environ["wsgi.url_scheme"] = "https" if target[4:5].lower() == b"s" else "http"
        target = absolute_form_path(target)
    path, _, query = target.partition(b"?")
    path_info = unquote_to_bytes(path).decode("latin-1") if b"%" in path else path.decode("latin-1")
    script_name = environ["SCRIPT_NAME"]
    if script_name and (path_info == script_name or path_info.startswith(script_name + "/")):
        path_info = path_info[len(script_name) :]
    environ["REQUEST_METHOD"] = request.method.decode("ascii")
    environ["PATH_INFO"] = path_info
    environ["QUERY_STRING"] = query.decode("latin-1")
    environ["SERVER_PROTOCOL"] = "HTTP/1.1" if request.http_version == b"1.1" else "HTTP/1.0"
    environ["wsgi.input"] = body
    get_key = _KEY_CACHE.get
    for name, value in request.headers:
        key = get_key(name, "")
        if key == "":
            key = environ_key(name)
        if key is None:
            continue
        text = value.decode("latin-1")
        if key in environ:
            text = environ[key] + ("; " if key == "HTTP_COOKIE" else ",") + text
        environ[key] = text
    if authority is not None:
        environ["HTTP_HOST"] = authority.decode("latin-1")
    return environ
