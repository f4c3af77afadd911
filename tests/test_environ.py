"""Unit tests of :mod:`asyncwsgi.environ`: the PEP 3333 environ built from an h11 request."""

from __future__ import annotations

import io
import sys
from collections.abc import Sequence
from typing import Any
from wsgiref.validate import check_environ  # type: ignore[attr-defined]

import h11
import pytest

from asyncwsgi import __version__
from asyncwsgi.bridge import EMPTY_BODY
from asyncwsgi.environ import (
    SERVER_SOFTWARE,
    build_environ,
    connection_environ,
    environ_key,
)
from asyncwsgi.filewrapper import FileWrapper
from asyncwsgi.http11 import to_request


def base(
    root_path: str = "",
    peer: tuple[str, int] | None = ("10.0.0.7", 51234),
    url_scheme: str = "http",
    multiprocess: bool = False,
) -> dict[str, Any]:
    shared = connection_environ(
        server=("127.0.0.1", 8000),
        url_scheme=url_scheme,
        root_path=root_path,
        multiprocess=multiprocess,
    )
    if peer is not None:  # as the channel sets them per request
        shared["REMOTE_ADDR"], shared["REMOTE_PORT"] = peer[0], str(peer[1])
    return shared


def environ_for(
    target: bytes = b"/",
    headers: Sequence[tuple[bytes, bytes]] = (),
    method: bytes = b"GET",
    http_version: bytes = b"1.1",
    root_path: str = "",
    body: object = EMPTY_BODY,
) -> dict[str, Any]:
    all_headers = list(headers)
    if http_version == b"1.1" and not any(name.lower() == b"host" for name, _ in all_headers):
        all_headers.insert(0, (b"Host", b"example.com"))
    request = to_request(
        h11.Request(method=method, target=target, headers=all_headers, http_version=http_version)
    )
    return build_environ(base(root_path=root_path), request, body)


def test_every_required_key_is_there() -> None:
    body = io.BytesIO(b"")
    environ = environ_for(
        b"/path?x=1",
        [(b"Content-Type", b"text/plain"), (b"Content-Length", b"0")],
        method=b"POST",
        body=body,
    )
    assert environ["REQUEST_METHOD"] == "POST"
    assert environ["SCRIPT_NAME"] == ""
    assert environ["PATH_INFO"] == "/path"
    assert environ["QUERY_STRING"] == "x=1"
    assert environ["CONTENT_TYPE"] == "text/plain"
    assert environ["CONTENT_LENGTH"] == "0"
    assert environ["SERVER_NAME"] == "127.0.0.1"
    assert environ["SERVER_PORT"] == "8000"
    assert environ["SERVER_PROTOCOL"] == "HTTP/1.1"
    assert environ["REMOTE_ADDR"] == "10.0.0.7"
    assert environ["REMOTE_PORT"] == "51234"
    assert environ["SERVER_SOFTWARE"] == SERVER_SOFTWARE == f"asyncwsgi/{__version__}"
    assert environ["HTTP_HOST"] == "example.com"
    assert environ["wsgi.version"] == (1, 0)
    assert environ["wsgi.url_scheme"] == "http"
    assert environ["wsgi.input"] is body
    assert environ["wsgi.errors"] is sys.stderr
    assert environ["wsgi.multithread"] is True
    assert environ["wsgi.multiprocess"] is False
    assert environ["wsgi.run_once"] is False
    assert environ["wsgi.input_terminated"] is True
    assert environ["wsgi.file_wrapper"] is FileWrapper
    check_environ(environ)  # wsgiref's own checks: types, required keys, forbidden keys


def test_environ_values_are_native_strings() -> None:
    environ = environ_for(b"/caf%C3%A9?q=%C3%A9", [(b"X-Latin", b"caf\xe9")])
    for key, value in environ.items():
        if "." not in key:
            assert type(value) is str, key


@pytest.mark.parametrize(
    ("target", "path_info", "query"),
    [
        (b"/", "/", ""),
        (b"/a/b", "/a/b", ""),
        (b"/a%20b", "/a b", ""),
        (b"/%E4", "/\xe4", ""),  # one byte, decoded as latin-1
        (b"/caf%C3%A9", "/caf\xc3\xa9", ""),  # UTF-8 bytes as latin-1 characters
        (b"/a%2Fb", "/a/b", ""),  # PEP 3333 PATH_INFO is fully decoded
        (b"/100%25", "/100%", ""),
        (b"/p?x=%20&y=%E4", "/p", "x=%20&y=%E4"),  # QUERY_STRING stays raw
        (b"/p?", "/p", ""),
        (b"/p?a=1?b=2", "/p", "a=1?b=2"),
        (b"/p?q=a+b", "/p", "q=a+b"),
    ],
)
def test_path_info_and_query_string(target: bytes, path_info: str, query: str) -> None:
    environ = environ_for(target)
    assert environ["PATH_INFO"] == path_info
    assert environ["QUERY_STRING"] == query


def test_path_info_round_trips_to_the_utf8_path() -> None:
    environ = environ_for(b"/%E2%98%83/caf%C3%A9")
    assert environ["PATH_INFO"].encode("latin-1").decode("utf-8") == "/\u2603/caf\xe9"


@pytest.mark.parametrize(
    ("target", "path_info", "query"),
    [
        (b"http://example.com/a/b?x=1", "/a/b", "x=1"),
        (b"https://example.com:8443/a%20b", "/a b", ""),
        (b"http://example.com", "/", ""),
        (b"http://example.com/", "/", ""),
        (b"http://user@example.com/p", "/p", ""),
    ],
)
def test_absolute_form_target(target: bytes, path_info: str, query: str) -> None:
    environ = environ_for(target)
    assert environ["PATH_INFO"] == path_info
    assert environ["QUERY_STRING"] == query


@pytest.mark.parametrize(
    ("target", "path_info", "query"),
    [
        (b"http://example.com?x=1", "/", "x=1"),
        (b"http://example.com?next=/admin", "/", "next=/admin"),
        (b"http://example.com:8080?a=/b/c&d=e", "/", "a=/b/c&d=e"),
    ],
)
def test_absolute_form_target_with_an_empty_path_keeps_its_query(
    target: bytes, path_info: str, query: str
) -> None:
    """RFC 3986: ``http://host?query`` has an empty path; the query is still the query."""
    environ = environ_for(target)
    assert environ["PATH_INFO"] == path_info
    assert environ["QUERY_STRING"] == query


def test_asterisk_form_target() -> None:
    environ = environ_for(b"*", method=b"OPTIONS")
    assert environ["REQUEST_METHOD"] == "OPTIONS"
    assert environ["PATH_INFO"] == "*"
    assert environ["QUERY_STRING"] == ""


@pytest.mark.parametrize(
    ("target", "script_name", "path_info"),
    [
        (b"/app", "/app", ""),
        (b"/app/", "/app", "/"),
        (b"/app/x/y", "/app", "/x/y"),
        (b"/app/x?q=1", "/app", "/x"),
        (b"/application/x", "/app", "/application/x"),  # a prefix of a segment is no match
        (b"/other", "/app", "/other"),
        (b"/%61pp/x", "/app", "/x"),  # compared after percent-decoding
    ],
)
def test_root_path_moves_into_script_name(target: bytes, script_name: str, path_info: str) -> None:
    environ = environ_for(target, root_path="/app")
    assert environ["SCRIPT_NAME"] == script_name
    assert environ["PATH_INFO"] == path_info
    check_environ(environ)


def test_nested_root_path() -> None:
    environ = environ_for(b"/a/b/c", root_path="/a/b")
    assert (environ["SCRIPT_NAME"], environ["PATH_INFO"]) == ("/a/b", "/c")


def test_repeated_headers_are_joined_with_commas() -> None:
    environ = environ_for(
        b"/",
        [
            (b"Accept", b"text/html"),
            (b"X-Forwarded-For", b"1.1.1.1"),
            (b"Accept", b"application/json"),
            (b"X-Forwarded-For", b"2.2.2.2, 3.3.3.3"),
        ],
    )
    assert environ["HTTP_ACCEPT"] == "text/html,application/json"
    assert environ["HTTP_X_FORWARDED_FOR"] == "1.1.1.1,2.2.2.2, 3.3.3.3"


def test_repeated_cookie_headers_are_joined_with_semicolons() -> None:
    environ = environ_for(
        b"/", [(b"Cookie", b"a=1"), (b"Cookie", b"b=2; c=3"), (b"Cookie", b"d=4")]
    )
    assert environ["HTTP_COOKIE"] == "a=1; b=2; c=3; d=4"


def test_content_type_and_length_have_no_http_prefix() -> None:
    environ = environ_for(
        b"/",
        [(b"Content-Type", b"application/json"), (b"Content-Length", b"42")],
        method=b"POST",
    )
    assert environ["CONTENT_TYPE"] == "application/json"
    assert environ["CONTENT_LENGTH"] == "42"
    assert "HTTP_CONTENT_TYPE" not in environ
    assert "HTTP_CONTENT_LENGTH" not in environ


def test_no_content_type_or_length_without_those_headers() -> None:
    environ = environ_for(b"/")
    assert "CONTENT_TYPE" not in environ
    assert "CONTENT_LENGTH" not in environ
    check_environ(environ)


def test_header_names_become_http_keys() -> None:
    environ = environ_for(
        b"/",
        [(b"X-Request-ID", b"abc"), (b"user-agent", b"test/1.0"), (b"X-Latin", b"caf\xe9")],
    )
    assert environ["HTTP_X_REQUEST_ID"] == "abc"
    assert environ["HTTP_USER_AGENT"] == "test/1.0"
    assert environ["HTTP_X_LATIN"] == "caf\xe9"  # values are latin-1 native strings


def test_header_names_with_underscores_are_dropped() -> None:
    environ = environ_for(
        b"/",
        [
            (b"X-Forwarded-For", b"10.0.0.1"),  # set by the proxy
            (b"X_Forwarded_For", b"6.6.6.6"),  # spoofed by the client
            (b"Content_Type", b"text/evil"),
            (b"Under_Score", b"x"),
        ],
    )
    assert environ["HTTP_X_FORWARDED_FOR"] == "10.0.0.1"
    assert "CONTENT_TYPE" not in environ
    assert "HTTP_CONTENT_TYPE" not in environ
    assert "HTTP_UNDER_SCORE" not in environ
    assert not any("6.6.6.6" in str(value) for value in environ.values())


def test_environ_key() -> None:
    assert environ_key(b"content-type") == "CONTENT_TYPE"
    assert environ_key(b"content-length") == "CONTENT_LENGTH"
    assert environ_key(b"x-forwarded-proto") == "HTTP_X_FORWARDED_PROTO"
    assert environ_key(b"x_forwarded_proto") is None
    assert environ_key(b"x-forwarded-proto") == "HTTP_X_FORWARDED_PROTO"  # cached answer


@pytest.mark.parametrize(("version", "protocol"), [(b"1.1", "HTTP/1.1"), (b"1.0", "HTTP/1.0")])
def test_server_protocol(version: bytes, protocol: str) -> None:
    assert environ_for(b"/", http_version=version)["SERVER_PROTOCOL"] == protocol


def test_connection_environ_for_https_unix_and_multiprocess() -> None:
    shared = connection_environ(
        server=("/run/app.sock", 0),
        url_scheme="https",
        root_path="/mount",
        multiprocess=True,
    )
    assert shared["wsgi.url_scheme"] == "https"
    assert shared["wsgi.multiprocess"] is True
    assert shared["REMOTE_ADDR"] == ""
    assert "REMOTE_PORT" not in shared
    assert shared["SERVER_NAME"] == "/run/app.sock"
    assert shared["SERVER_PORT"] == "0"
    assert shared["SCRIPT_NAME"] == "/mount"


def test_build_environ_does_not_change_the_shared_dict() -> None:
    shared = base()
    before = dict(shared)
    request = to_request(
        h11.Request(method="GET", target="/x?y=1", headers=[("Host", "h"), ("Cookie", "a=1")])
    )
    first = build_environ(shared, request, EMPTY_BODY)
    second = build_environ(shared, request, EMPTY_BODY)
    assert shared == before
    assert first is not second
    assert second["HTTP_COOKIE"] == "a=1"  # not joined with the first request's cookie


def test_method_is_passed_through() -> None:
    assert environ_for(b"/", method=b"PATCH")["REQUEST_METHOD"] == "PATCH"
    assert environ_for(b"/", method=b"PROPFIND")["REQUEST_METHOD"] == "PROPFIND"
