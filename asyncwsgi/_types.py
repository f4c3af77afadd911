"""Type aliases over ``wsgiref.types`` (PEP 3333), for annotations only.

``wsgiref.types`` exists from Python 3.11; modules import these names under ``TYPE_CHECKING``
so that the package also runs on 3.10.
"""

from __future__ import annotations

from types import TracebackType
from typing import TypeAlias
from wsgiref.types import StartResponse, WSGIApplication, WSGIEnvironment

__all__ = [
    "ExcInfo",
    "OptExcInfo",
    "StartResponse",
    "WSGIApplication",
    "WSGIEnvironment",
    "Address",
]

#: ``sys.exc_info()`` while an exception is being handled.
ExcInfo: TypeAlias = tuple[type[BaseException], BaseException, TracebackType]
#: ``sys.exc_info()`` in general: all None outside an ``except`` block.
OptExcInfo: TypeAlias = ExcInfo | tuple[None, None, None]

#: A socket address as asyncio reports it: (host, port) for IPv4, a 4-tuple for IPv6, a str path.
Address: TypeAlias = tuple[str, int] | tuple[str, int, int, int] | str
