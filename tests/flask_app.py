"""A small Flask application for the integration tests (``tests.flask_app:app``).

- ``GET /``: a plain text greeting with the request's SCRIPT_NAME and path;
- ``POST /json``: echoes a JSON body back with the sum of its ``numbers``;
- ``GET /file``: ``send_file`` of the file named by the ``ASYNCWSGI_TEST_FILE`` environment
  variable (read at request time, so a test can create the file after import);
- ``GET /conditional-file``: the same with ``send_file``'s defaults (ETag, Range, 304), as
  ``send_from_directory`` and Flask's static files answer;
- ``GET /stream?n=N``: N lines streamed with ``stream_with_context``, each one using the request;
- ``GET /ping-pong?key=K``: streams ``ping``, then waits until the test sets ``RELEASES[K]``
  (a :class:`threading.Event`), then streams ``pong``.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator

from flask import Flask, Response, jsonify, request, send_file, stream_with_context

FILE_ENV = "ASYNCWSGI_TEST_FILE"
#: Events that ``/ping-pong`` waits on between its two pieces, by ``?key=``.
RELEASES: dict[str, threading.Event] = {}

app = Flask(__name__)


@app.get("/")
def index() -> Response:
    text = f"Hello from Flask at {request.script_root}{request.path}"
    return Response(text, mimetype="text/plain")


@app.post("/json")
def echo_json() -> Response:
    data = request.get_json()
    numbers = data.get("numbers", [])
    return jsonify(received=data, total=sum(numbers), content_length=request.content_length)


@app.get("/file")
def big_file() -> Response:
    return send_file(os.environ[FILE_ENV], mimetype="application/octet-stream", conditional=False)


@app.get("/conditional-file")
def conditional_file() -> Response:
    return send_file(os.environ[FILE_ENV], mimetype="application/octet-stream")


@app.get("/stream")
def stream() -> Response:
    count = int(request.args.get("n", "5"))

    def generate() -> Iterator[str]:
        for i in range(count):
            # request is only reachable here because stream_with_context keeps it alive.
            yield f"{i} {request.path} {request.args['n']}\n"

    return Response(stream_with_context(generate()), mimetype="text/plain")


@app.get("/ping-pong")
def ping_pong() -> Response:
    release = RELEASES[request.args["key"]]

    def generate() -> Iterator[str]:
        yield f"ping {request.path}\n"
        if not release.wait(10):
            raise TimeoutError("the test never released /ping-pong")
        yield f"pong {request.path}\n"

    return Response(stream_with_context(generate()), mimetype="text/plain")
