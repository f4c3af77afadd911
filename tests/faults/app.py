"""The instrumented application of the in-process matrix.

Each route answers with a body that names its request (``?id=N``), so a response read in the
place of another is caught by its bytes. A gate (:class:`threading.Event`) holds the app at a
chosen point, so a test can put a connection exactly in a phase; every result counts its
``close()`` calls.

Routes (``?id=N`` on each):

- ``/ok``: a short body.
- ``/gate``: waits at the gate before ``start_response``; then does :attr:`FaultApp.action`
  (answers a 1 MiB list body, or raises).
- ``/stream?blocks=K&gate=1``: streams K blocks of 64 KiB; with ``gate=1`` it waits at the gate
  after the first block, then does :attr:`FaultApp.action` (goes on, or raises).
- ``/file``: the shared file through ``wsgi.file_wrapper`` (sent by sendfile(2)).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

from asyncwsgi.filewrapper import FileWrapper

from .invariants import CloseCounter

BLOCK = 64 * 1024
GATED_BODY = 1024 * 1024
FILE_SIZE = 8 * 1024 * 1024


def ok_body(ident: int) -> bytes:
    return b"ok %d" % ident


def letter(ident: int) -> bytes:
    return bytes([65 + ident % 26])


def gated_body(ident: int) -> bytes:
    return letter(ident) * GATED_BODY


def stream_body(ident: int, blocks: int) -> bytes:
    return letter(ident) * (BLOCK * blocks)


def file_content(size: int = FILE_SIZE) -> bytes:
    return bytes(range(256)) * (size // 256)


class _File:
    """A file object whose ``close()`` is counted (FileWrapper only needs these methods)."""

    def __init__(self, path: Path, counter: CloseCounter) -> None:
        self._file = open(path, "rb")  # noqa: SIM115 - closed by the server through close()
        self._counter = counter

    def read(self, size: int = -1) -> bytes:
        return self._file.read(size)

    def fileno(self) -> int:
        return self._file.fileno()

    def tell(self) -> int:
        return self._file.tell()

    def close(self) -> None:
        self._counter.close()
        self._file.close()


class _Stream:
    """A streamed result: K blocks, optionally held at the gate after the first."""

    def __init__(self, app: FaultApp, ident: int, blocks: int, gated: bool) -> None:
        self.app = app
        self.ident = ident
        self.blocks = blocks
        self.gated = gated
        self.counter = app.counter(f"/stream id={ident}")

    def __iter__(self) -> Iterator[bytes]:
        block = letter(self.ident) * BLOCK
        for index in range(self.blocks):
            yield block
            self.app.sample()
            if index == 0 and self.gated:
                self.app.hold()
                self.app.act()

    def close(self) -> None:
        self.counter.close()


class _Body:
    """A list-like body with a counted ``close()``."""

    def __init__(self, app: FaultApp, label: str, body: bytes) -> None:
        self.body = body
        self.counter = app.counter(label)

    def __iter__(self) -> Iterator[bytes]:
        yield self.body

    def close(self) -> None:
        self.counter.close()


class FaultApp:
    """A WSGI application whose phase the test controls; see the module docstring.

    Attributes:
        action: what a gated call does when released: ``"ok"``, or the name of the exception
            to raise (``"Exception"``, ``"SystemExit"``, ``"KeyboardInterrupt"``).
        reached: set when a call arrives at the gate.
        calls: (path with query, whether the client was already gone) per call.
    """

    def __init__(self, file_path: Path) -> None:
        self.file_path = file_path
        self.gate = threading.Event()
        self.reached = threading.Event()
        self.action = "ok"
        self.results: list[CloseCounter] = []
        self.calls: list[tuple[str, bool]] = []
        self.peak = 0
        self._lock = threading.Lock()
        self._sampler: Callable[[], None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def watch_memory(self, loop: asyncio.AbstractEventLoop, sampler: Callable[[], None]) -> None:
        """Have ``sampler`` run on ``loop`` each time the app hands over a block."""
        self._loop, self._sampler = loop, sampler

    def sample(self) -> None:
        """Worker thread: ask the loop to sample the connections' unsent output."""
        loop, sampler = self._loop, self._sampler
        if loop is not None and sampler is not None and not loop.is_closed():
            loop.call_soon_threadsafe(sampler)

    def counter(self, label: str) -> CloseCounter:
        counter = CloseCounter(label)
        with self._lock:
            self.results.append(counter)
        return counter

    def hold(self) -> None:
        self.reached.set()
        if not self.gate.wait(30):
            raise RuntimeError("the gate was never opened")

    def act(self) -> None:
        if self.action == "Exception":
            raise RuntimeError("application error")
        if self.action == "SystemExit":
            raise SystemExit("application called sys.exit()")
        if self.action == "KeyboardInterrupt":
            raise KeyboardInterrupt

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Any:
        path = environ["PATH_INFO"]
        query = {k: v[0] for k, v in parse_qs(environ["QUERY_STRING"]).items()}
        ident = int(query.get("id", "0"))
        with self._lock:
            self.calls.append(
                (f"{path}?{environ['QUERY_STRING']}", environ["asyncwsgi.client_disconnected"]())
            )
        if path == "/gate":
            self.hold()
            self.act()
            start_response("200 OK", [("Content-Type", "application/octet-stream")])
            self.sample()
            return [gated_body(ident)]
        if path == "/stream":
            blocks = int(query.get("blocks", "16"))
            start_response("200 OK", [("Content-Type", "application/octet-stream")])
            self.sample()
            return _Stream(self, ident, blocks, query.get("gate") == "1")
        if path == "/file":
            start_response("200 OK", [("Content-Type", "application/octet-stream")])
            wrapper = environ["wsgi.file_wrapper"]
            return wrapper(_File(self.file_path, self.counter(f"/file id={ident}")))
        body = ok_body(ident)
        start_response(
            "200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))]
        )
        return _Body(self, f"{path} id={ident}", body)


__all__ = ["BLOCK", "FILE_SIZE", "FaultApp", "FileWrapper", "file_content", "gated_body"]
