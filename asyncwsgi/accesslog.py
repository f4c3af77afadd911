"""Access-log formats: gunicorn's ``--access-logformat`` atoms, and one JSON object per line.

Without ``--access-logformat`` or ``--access-log-json`` the channel writes its built-in line
(see :mod:`asyncwsgi.logs`) and none of this runs. With a format, the format is compiled once at
start: only the atoms it names are computed per response, and only when the
``asyncwsgi.access`` logger is enabled for INFO (the channel checks that before calling here).

Atoms (gunicorn's; ``-`` stands for a missing value in text lines):

======  ==========================================  ====================
atom    value                                       JSON key
======  ==========================================  ====================
``h``   remote address (``REMOTE_ADDR``)            ``remote_addr``
``l``   ``-``                                       ``ident``
``u``   user name of HTTP Basic authentication      ``user``
``t``   time of the log line, ``[%d/%b/%Y:%H:%M:%S  ``time`` (ISO 8601)
        %z]``
``r``   request line, ``GET /path?q HTTP/1.1``      ``request``
``m``   request method                              ``method``
``U``   URL path, without the query                 ``path``
``q``   query string                                ``query``
``H``   protocol, ``HTTP/1.1``                      ``protocol``
``s``   status code                                 ``status``
``B``   response body bytes                         ``bytes``
``b``   response body bytes, ``-`` for none         ``bytes_clf``
``f``   ``Referer``                                 ``referer``
``a``   ``User-Agent``                              ``user_agent``
``T``   duration, whole seconds                     ``duration_s``
``M``   duration, whole milliseconds                ``duration_ms``
``D``   duration, whole microseconds                ``duration_us``
``L``   duration, decimal seconds                   ``duration``
``p``   process id, ``<1234>``                      ``pid``
``Q``   time waiting for a thread, milliseconds     ``queue_ms``
        (``asyncwsgi.queue_time``), ``12.345``
======  ==========================================  ====================

and ``%({name}i)s`` a request header, ``%({name}o)s`` a response header, ``%({key}e)s`` a key of
the WSGI environ (JSON keys ``request_header.name``, ``response_header.name``, ``environ.key``).
Text values from the request are escaped (:func:`asyncwsgi.logs.escape`), so a request cannot
forge log lines; JSON escapes them itself.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import re
import time
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from typing import Any, Final, NamedTuple

from .errors import ConfigError
from .logs import escape

__all__ = ["AccessFormat", "AccessRecord", "DEFAULT_JSON_ATOMS", "ATOMS"]

_ATOM = re.compile(r"%\((\{[^}]*\}[ioe]|[A-Za-z])\)")


class AccessRecord(NamedTuple):
    """What is known about one finished response, for the atoms. Loop thread.

    Attributes:
        client: the peer as the built-in line shows it (``127.0.0.1:51234``, ``unix``).
        environ: the request's environ, or None if it never got one.
        method, target, version: of the request line, as sent (``b"1.1"`` for ``version``).
        headers: the request's header fields, lower-case names.
        status: the response status (0 when none was sent).
        response_headers: the response's header fields as the application gave them.
        sent: response body bytes.
        duration: seconds from the complete request head to the end of the response.
    """

    client: str
    environ: dict[str, Any] | None
    method: bytes
    target: bytes
    version: bytes
    headers: Sequence[tuple[bytes, bytes]]
    status: int
    response_headers: Sequence[tuple[bytes, bytes]] | None
    sent: int
    duration: float

    def header(self, name: bytes) -> str | None:
        """The first request header field named ``name`` (lower case), decoded, or None."""
        for key, value in self.headers:
            if key == name:
                return value.decode("latin-1")
        return None


def _text(value: str | None) -> str:
    return "-" if value is None or value == "" else escape(value)


def _remote(entry: AccessRecord) -> str:
    environ = entry.environ
    if environ is not None:
        addr = environ.get("REMOTE_ADDR")
        if isinstance(addr, str) and addr:
            return addr
    return entry.client.rpartition(":")[0] or entry.client


def _user(entry: AccessRecord) -> str | None:
    auth = entry.header(b"authorization")
    if auth is None or auth[:6].lower() != "basic ":
        return None
    try:
        decoded = base64.b64decode(auth[6:].strip(), validate=True).decode("utf-8", "replace")
    except (binascii.Error, ValueError):
        return None
    return decoded.partition(":")[0] or None


def _path_query(entry: AccessRecord) -> tuple[str, str]:
    environ = entry.environ
    if environ is not None:
        return (
            str(environ.get("SCRIPT_NAME", "")) + str(environ.get("PATH_INFO", "")),
            str(environ.get("QUERY_STRING", "")),
        )
    path, _, query = entry.target.decode("latin-1").partition("?")
    return path, query


def _protocol(entry: AccessRecord) -> str:
    return "HTTP/" + entry.version.decode("latin-1")


def _request_line(entry: AccessRecord) -> str:
    return f"{entry.method.decode('latin-1')} {entry.target.decode('latin-1')} {_protocol(entry)}"


def _queue_ms(entry: AccessRecord) -> str | None:
    """``asyncwsgi.queue_time`` in milliseconds, three decimals; None before the app call."""
    value = None if entry.environ is None else entry.environ.get("asyncwsgi.queue_time")
    return None if value is None else f"{value * 1e3:.3f}"


def _float(text: str | None) -> float | None:
    return None if text is None else float(text)


_clf_cache: list[Any] = [-1, ""]  # [second, text]: formatting once a second is enough


def _clf_time() -> str:
    now = int(time.time())
    if _clf_cache[0] != now:
        _clf_cache[1] = time.strftime("[%d/%b/%Y:%H:%M:%S %z]", time.localtime(now))
        _clf_cache[0] = now
    return str(_clf_cache[1])


# Each atom: (JSON key, text value, JSON value).
_Getter = Callable[[AccessRecord], Any]
ATOMS: Final[dict[str, tuple[str, _Getter, _Getter]]] = {
    "h": ("remote_addr", lambda e: _text(_remote(e)), _remote),
    "l": ("ident", lambda e: "-", lambda e: None),
    "u": ("user", lambda e: _text(_user(e)), _user),
    "t": (
        "time",
        lambda e: _clf_time(),
        lambda e: datetime.now(timezone.utc).astimezone().isoformat(timespec="milliseconds"),
    ),
    "r": ("request", lambda e: escape(_request_line(e)), _request_line),
    "m": ("method", lambda e: escape(e.method.decode("latin-1")), lambda e: e.method.decode()),
    "U": ("path", lambda e: escape(_path_query(e)[0]), lambda e: _path_query(e)[0]),
    "q": ("query", lambda e: escape(_path_query(e)[1]), lambda e: _path_query(e)[1]),
    "H": ("protocol", _protocol, _protocol),
    "s": ("status", lambda e: str(e.status), lambda e: e.status),
    "B": ("bytes", lambda e: str(e.sent), lambda e: e.sent),
    "b": ("bytes_clf", lambda e: str(e.sent) if e.sent else "-", lambda e: e.sent or None),
    "f": ("referer", lambda e: _text(e.header(b"referer")), lambda e: e.header(b"referer")),
    "a": (
        "user_agent",
        lambda e: _text(e.header(b"user-agent")),
        lambda e: e.header(b"user-agent"),
    ),
    "T": ("duration_s", lambda e: str(int(e.duration)), lambda e: int(e.duration)),
    "M": ("duration_ms", lambda e: str(int(e.duration * 1e3)), lambda e: int(e.duration * 1e3)),
    "D": ("duration_us", lambda e: str(int(e.duration * 1e6)), lambda e: int(e.duration * 1e6)),
    "L": ("duration", lambda e: f"{e.duration:.6f}", lambda e: round(e.duration, 6)),
    "p": ("pid", lambda e: f"<{os.getpid()}>", lambda e: os.getpid()),
    "Q": ("queue_ms", lambda e: _text(_queue_ms(e)), lambda e: _float(_queue_ms(e))),
}

#: The atoms of a JSON line when no ``--access-logformat`` is given.
DEFAULT_JSON_ATOMS: Final = ("t", "h", "m", "U", "q", "H", "s", "B", "D", "f", "a")


def _braced(atom: str) -> tuple[str, _Getter, _Getter]:
    name, kind = atom[1:-2], atom[-1]
    if kind in "io":
        field = name.lower().encode("latin-1")
        key = ("request_header." if kind == "i" else "response_header.") + name.lower()

        def header(entry: AccessRecord) -> str | None:
            fields = entry.headers if kind == "i" else entry.response_headers
            for field_name, value in fields or ():
                if field_name.lower() == field:
                    return value.decode("latin-1")
            return None

        return key, lambda e: _text(header(e)), header

    def environ_value(entry: AccessRecord) -> str | None:
        environ = entry.environ
        value = None if environ is None else environ.get(name, environ.get(name.upper()))
        return None if value is None else str(value)

    return "environ." + name, lambda e: _text(environ_value(e)), environ_value


class AccessFormat:
    """A compiled access-line format. Immutable after construction; loop thread.

    Args:
        fmt: a gunicorn ``--access-logformat`` string, or None (JSON only: the fields of
            :data:`DEFAULT_JSON_ATOMS`).
        json: render each line as a JSON object of the atoms ``fmt`` names, keyed by the JSON
            keys of the module's table, instead of filling ``fmt`` in.

    Raises:
        ConfigError: ``fmt`` names an unknown atom, or cannot be filled in (a stray ``%``).
    """

    __slots__ = ("_atoms", "_format", "_json")

    def __init__(self, fmt: str | None, *, json: bool = False) -> None:
        names = DEFAULT_JSON_ATOMS if fmt is None else tuple(dict.fromkeys(_ATOM.findall(fmt)))
        atoms: list[tuple[str, str, _Getter, _Getter]] = []
        for name in names:
            if name.startswith("{"):
                key, text, value = _braced(name)
            elif name in ATOMS:
                key, text, value = ATOMS[name]
            else:
                raise ConfigError(f"unknown access log atom %({name})s")
            atoms.append((name, key, text, value))
        self._atoms = tuple(atoms)
        self._format = fmt
        self._json = json or fmt is None
        if fmt is not None and not self._json:
            try:
                fmt % {name: "" for name in names}
            except (KeyError, ValueError, TypeError) as exc:
                raise ConfigError(f"bad access log format {fmt!r}: {exc}") from None

    def render(self, entry: AccessRecord) -> str:
        """Return the access line of ``entry``: the format filled in, or a JSON object."""
        if self._json:
            return json.dumps({key: value(entry) for _, key, _, value in self._atoms})
        assert self._format is not None
        return self._format % {name: text(entry) for name, _, text, _ in self._atoms}
