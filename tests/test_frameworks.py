"""Flask and Django served by asyncwsgi: in the test's event loop, and through the CLI.

The in-process tests start :class:`asyncwsgi.Server` with :func:`tests.helpers.running` and
talk to it with ``httpx.AsyncClient``; ``os.sendfile`` is wrapped to prove that file responses
(``send_file``, ``FileResponse``) leave by sendfile(2) rather than through Python. The CLI tests
run ``python -m asyncwsgi serve`` in a subprocess and stop it with SIGTERM.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import random
import signal
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import requests
from django.core.signals import request_finished  # type: ignore[import-untyped]

from tests import flask_app
from tests.djangoproject.wsgi import application as django_app
from tests.helpers import TIMEOUT, Running, running
from tests.test_cli import CLIServer

MiB = 1024 * 1024
FILE_SIZE = 5 * MiB + 12345  # not a multiple of any block size


@dataclass
class LargeFile:
    path: Path
    size: int
    sha256: str


@pytest.fixture(scope="module")
def large_file_data() -> bytes:
    return random.Random(3333).randbytes(FILE_SIZE)


@pytest.fixture
def large_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, large_file_data: bytes
) -> LargeFile:
    """A multi-megabyte file, named to both apps by ``$ASYNCWSGI_TEST_FILE``."""
    path = tmp_path / "large.bin"
    path.write_bytes(large_file_data)
    monkeypatch.setenv(flask_app.FILE_ENV, str(path))
    return LargeFile(path, len(large_file_data), hashlib.sha256(large_file_data).hexdigest())


@dataclass
class SendfileCounter:
    calls: int = 0
    bytes: int = 0


@pytest.fixture
def sendfile_counter(monkeypatch: pytest.MonkeyPatch) -> SendfileCounter:
    """Count the calls to ``os.sendfile`` and the bytes they sent."""
    counter = SendfileCounter()
    real_sendfile = os.sendfile

    def counting_sendfile(out_fd: int, in_fd: int, offset: int | None, count: int) -> int:
        sent = real_sendfile(out_fd, in_fd, offset, count)
        counter.calls += 1
        counter.bytes += sent
        return sent

    monkeypatch.setattr(os, "sendfile", counting_sendfile)
    return counter


@asynccontextmanager
async def serving(app: Any, **options: Any) -> AsyncIterator[tuple[Running, httpx.AsyncClient]]:
    """Serve ``app`` in this loop; yield the server and a client for it."""
    async with (
        running(app, **options) as server,
        httpx.AsyncClient(base_url=server.url, trust_env=False, timeout=TIMEOUT) as client,
    ):
        yield server, client


async def download(client: httpx.AsyncClient, url: str) -> tuple[httpx.Response, int, str]:
    """Stream ``url``; return the response, the body size and its SHA-256."""
    digest = hashlib.sha256()
    size = 0
    async with client.stream("GET", url) as response:
        async for chunk in response.aiter_raw():
            digest.update(chunk)
            size += len(chunk)
    return response, size, digest.hexdigest()


# -- Flask, in the test's loop ----------------------------------------------------------------


async def test_flask_view() -> None:
    async with serving(flask_app.app) as (_, client):
        response = await client.get("/")
    assert response.status_code == 200
    assert response.text == "Hello from Flask at /"
    assert response.headers["content-type"] == "text/plain; charset=utf-8"
    assert response.headers["content-length"] == str(len(response.content))


async def test_flask_view_under_root_path() -> None:
    async with serving(flask_app.app, root_path="/app") as (_, client):
        response = await client.get("/app/")
    assert response.text == "Hello from Flask at /app/"


async def test_flask_json_post() -> None:
    payload = {"numbers": [1, 2, 3.5], "name": "Zoë", "nested": {"ok": True}}
    async with serving(flask_app.app) as (_, client):
        response = await client.post("/json", json=payload)
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    data = response.json()
    assert data["received"] == payload
    assert data["total"] == 6.5
    assert data["content_length"] == len(response.request.content)
    assert json.loads(response.request.content) == payload


async def test_flask_large_and_chunked_json_posts() -> None:
    """A multi-megabyte body, and a chunked one without Content-Length (wsgi.input_terminated)."""
    numbers = list(range(400_000))
    body = json.dumps({"numbers": numbers}).encode()
    assert len(body) > 2 * MiB

    async def chunks() -> AsyncIterator[bytes]:
        for start in range(0, len(body), 100_000):
            yield body[start : start + 100_000]

    async with serving(flask_app.app) as (_, client):
        large = await client.post(
            "/json", content=body, headers={"content-type": "application/json"}
        )
        chunked = await client.post(
            "/json", content=chunks(), headers={"content-type": "application/json"}
        )
    assert large.json()["total"] == sum(numbers)
    assert large.json()["content_length"] == len(body)
    assert chunked.request.headers["transfer-encoding"] == "chunked"
    assert chunked.json()["total"] == sum(numbers)
    assert chunked.json()["content_length"] is None


async def test_flask_concurrent_json_posts_each_get_their_answer() -> None:
    async with serving(flask_app.app, threads=4) as (_, client):
        responses = await asyncio.gather(
            *(client.post("/json", json={"numbers": [i, i]}) for i in range(40))
        )
    assert [r.json()["total"] for r in responses] == [2 * i for i in range(40)]


async def test_flask_send_file_goes_out_by_sendfile(
    large_file: LargeFile, sendfile_counter: SendfileCounter
) -> None:
    async with serving(flask_app.app) as (_, client):
        response, size, sha256 = await download(client, "/file")
        again = await client.get("/")  # the connection is still usable after the file
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/octet-stream"
    assert response.headers["content-length"] == str(large_file.size)
    assert (size, sha256) == (large_file.size, large_file.sha256)
    assert sendfile_counter.bytes == large_file.size
    assert again.text == "Hello from Flask at /"


async def test_flask_send_file_range_request(large_file: LargeFile) -> None:
    """Werkzeug wraps ``iter(file_wrapper)`` for a Range and closes only that iterator.

    The file must still be closed when the response ends: an unclosed file shows up as a
    ResourceWarning, which this project's pytest settings turn into a failure.
    """
    data = large_file.path.read_bytes()
    async with serving(flask_app.app) as (_, client):
        middle = await client.get("/conditional-file", headers={"Range": "bytes=1000-1999"})
        tail = await client.get("/conditional-file", headers={"Range": f"bytes=-{MiB}"})
    assert middle.status_code == 206
    assert middle.headers["content-range"] == f"bytes 1000-1999/{large_file.size}"
    assert middle.content == data[1000:2000]
    assert tail.status_code == 206
    assert tail.content == data[-MiB:]


async def test_flask_send_file_not_modified(large_file: LargeFile) -> None:
    async with serving(flask_app.app) as (_, client):
        first = await client.get("/conditional-file")
        etag = first.headers["etag"]
        again = await client.get("/conditional-file", headers={"If-None-Match": etag})
        after = await client.get("/")  # same connection: the 304 had no body
    assert again.status_code == 304
    assert again.content == b""
    assert after.text == "Hello from Flask at /"


async def test_flask_conditional_send_file_has_one_date_header(large_file: LargeFile) -> None:
    """Werkzeug sets Date on conditional responses; the server must not add a second one.

    Date is a singleton field (RFC 9110 section 6.6.1); two Date fields make the message invalid.
    """
    async with serving(flask_app.app) as (_, client):
        full = await client.get("/conditional-file")
        not_modified = await client.get(
            "/conditional-file", headers={"If-None-Match": full.headers["etag"]}
        )
    assert (full.status_code, not_modified.status_code) == (200, 304)
    assert len(full.headers.get_list("date")) == 1, full.headers.get_list("date")
    assert len(not_modified.headers.get_list("date")) == 1, not_modified.headers


async def test_flask_stream_with_context() -> None:
    async with serving(flask_app.app) as (_, client):
        response = await client.get("/stream", params={"n": "300"})
    assert response.status_code == 200
    assert "content-length" not in response.headers
    assert response.headers["transfer-encoding"] == "chunked"
    assert response.text.splitlines() == [f"{i} /stream 300" for i in range(300)]


async def test_flask_stream_sends_each_piece_as_it_is_yielded() -> None:
    """The first piece reaches the client while the generator is still waiting for it to."""
    release = flask_app.RELEASES["ping"] = threading.Event()
    try:
        async with (
            serving(flask_app.app) as (_, client),
            client.stream("GET", "/ping-pong", params={"key": "ping"}) as response,
        ):
            pieces = response.aiter_text()
            first = await asyncio.wait_for(anext(pieces), TIMEOUT)
            assert first == "ping /ping-pong\n"
            release.set()
            rest = "".join([text async for text in pieces])
        assert rest == "pong /ping-pong\n"
    finally:
        release.set()
        del flask_app.RELEASES["ping"]


# -- Django, in the test's loop ---------------------------------------------------------------


async def test_django_view() -> None:
    async with serving(django_app) as (_, client):
        response = await client.get("/")
    assert response.status_code == 200
    assert response.text == "Hello from Django path=/ form=/form/"
    assert response.headers["content-type"] == "text/plain"


async def test_django_view_under_root_path() -> None:
    async with serving(django_app, root_path="/site") as (_, client):
        response = await client.get("/site/")
    assert response.text == "Hello from Django path=/site/ form=/site/form/"


async def test_django_not_found_and_redirect() -> None:
    async with serving(django_app) as (_, client):
        missing = await client.get("/nowhere/")
        redirect = await client.get("/form")  # CommonMiddleware's APPEND_SLASH
    assert missing.status_code == 404
    assert redirect.status_code == 301
    assert redirect.headers["location"] == "/form/"


async def test_django_response_that_sets_a_cookie() -> None:
    """Django writes Set-Cookie values with a leading space (``cookie.output(header="")``)."""
    async with serving(django_app) as (_, client):
        response = await client.get("/form/")
    assert response.status_code == 200
    assert response.headers["set-cookie"].startswith("csrftoken=")
    assert response.cookies["csrftoken"]


async def test_django_post_form_with_csrf_token() -> None:
    async with serving(django_app) as (_, client):
        token = (await client.get("/form/")).json()["csrf_token"]
        assert client.cookies.get("csrftoken")
        response = await client.post(
            "/form/",
            data={"csrfmiddlewaretoken": token, "name": "Zoë", "colour": ["red", "blue"]},
        )
        forbidden = await client.post("/form/", data={"name": "no token"})
        client.cookies.clear()
        no_cookie = await client.post("/form/", data={"csrfmiddlewaretoken": token})
    assert response.status_code == 200, response.text
    assert response.json() == {"name": "Zoë", "colours": ["red", "blue"]}
    assert forbidden.status_code == 403
    assert no_cookie.status_code == 403


async def test_django_multipart_upload_of_megabytes(large_file_data: bytes) -> None:
    data = large_file_data[: 3 * MiB + 7]
    async with serving(django_app) as (_, client):
        response = await client.post(
            "/upload/",
            files={"data": ("payload.bin", data, "application/octet-stream")},
            data={"label": "three megabytes"},
        )
    assert response.status_code == 200, response.text
    assert response.json() == {
        "size": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
        "label": "three megabytes",
    }


@pytest.fixture
async def request_finished_event() -> AsyncIterator[asyncio.Event]:
    """Set when Django's ``request_finished`` fires (the response's ``close()`` ran)."""
    loop = asyncio.get_running_loop()
    event = asyncio.Event()

    def receiver(**kwargs: Any) -> None:
        loop.call_soon_threadsafe(event.set)

    request_finished.connect(receiver, dispatch_uid="asyncwsgi-test")
    try:
        yield event
    finally:
        request_finished.disconnect(dispatch_uid="asyncwsgi-test")


async def test_django_file_response_goes_out_by_sendfile(
    large_file: LargeFile,
    sendfile_counter: SendfileCounter,
    request_finished_event: asyncio.Event,
) -> None:
    async with serving(django_app) as (_, client):
        response, size, sha256 = await download(client, "/file/")
        # Django's close() runs after the file has gone out: request_finished fires.
        await asyncio.wait_for(request_finished_event.wait(), TIMEOUT)
        again = await client.get("/")
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/octet-stream"
    assert response.headers["content-length"] == str(large_file.size)
    assert (size, sha256) == (large_file.size, large_file.sha256)
    assert sendfile_counter.calls >= 1
    assert sendfile_counter.bytes == large_file.size
    assert again.status_code == 200


async def test_django_file_response_to_head_sends_no_body(
    large_file: LargeFile, sendfile_counter: SendfileCounter
) -> None:
    async with serving(django_app) as (_, client):
        head = await client.head("/file/")
        after = await client.get("/")  # same connection: framing intact
    assert head.status_code == 200
    assert head.headers["content-length"] == str(large_file.size)
    assert head.content == b""
    assert sendfile_counter.bytes == 0
    assert after.text == "Hello from Django path=/ form=/form/"


# -- through the CLI ----------------------------------------------------------------------------


def test_flask_through_the_cli(large_file: LargeFile) -> None:
    env = {flask_app.FILE_ENV: str(large_file.path)}
    with CLIServer("tests.flask_app:app", "--port", "0", env=env) as server:
        url = server.url()
        with requests.Session() as session:
            session.trust_env = False
            view = session.get(url + "/", timeout=TIMEOUT)
            assert view.status_code == 200
            assert view.text == "Hello from Flask at /"

            posted = session.post(url + "/json", json={"numbers": [40, 2]}, timeout=TIMEOUT)
            assert posted.json()["total"] == 42

            with session.get(url + "/file", stream=True, timeout=TIMEOUT) as file_response:
                assert file_response.headers["content-length"] == str(large_file.size)
                digest = hashlib.sha256()
                for chunk in file_response.iter_content(256 * 1024):
                    digest.update(chunk)
            assert digest.hexdigest() == large_file.sha256

            streamed = session.get(url + "/stream?n=50", timeout=TIMEOUT)
            assert streamed.headers["transfer-encoding"] == "chunked"
            assert streamed.text.splitlines() == [f"{i} /stream 50" for i in range(50)]
        assert server.stop(signal.SIGTERM) == 0
    assert "Shutdown complete" in server.output
    assert '"GET /file HTTP/1.1" 200 ' + str(large_file.size) in server.output


def test_django_through_the_cli(large_file: LargeFile, large_file_data: bytes) -> None:
    env = {flask_app.FILE_ENV: str(large_file.path)}
    with CLIServer("tests.djangoproject.wsgi:application", "--port", "0", env=env) as server:
        url = server.url()
        with httpx.Client(base_url=url, trust_env=False, timeout=TIMEOUT) as client:
            view = client.get("/")
            assert view.text == "Hello from Django path=/ form=/form/"

            token = client.get("/form/").json()["csrf_token"]
            form = client.post("/form/", data={"csrfmiddlewaretoken": token, "name": "Ada"})
            assert form.status_code == 200, form.text
            assert form.json() == {"name": "Ada", "colours": []}
            assert client.post("/form/", data={"name": "Eve"}).status_code == 403

            upload = large_file_data[: 2 * MiB]
            uploaded = client.post("/upload/", files={"data": ("a.bin", upload)})
            assert uploaded.json()["sha256"] == hashlib.sha256(upload).hexdigest()

            digest = hashlib.sha256()
            with client.stream("GET", "/file/") as response:
                assert response.headers["content-length"] == str(large_file.size)
                for chunk in response.iter_raw():
                    digest.update(chunk)
            assert digest.hexdigest() == large_file.sha256
        assert server.stop(signal.SIGTERM) == 0
    assert "Shutdown complete" in server.output
    assert '"GET /file/ HTTP/1.1" 200 ' + str(large_file.size) in server.output
