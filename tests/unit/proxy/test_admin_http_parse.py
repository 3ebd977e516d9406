"""The admin's HTTP/1.1 request parser and query parsing, without sockets."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from remora.proxy.admin import (
    HttpError,
    Limits,
    Request,
    Response,
    find_head_end,
    parse_head,
    parse_query,
)


def test_parse_request() -> None:
    req = parse_head(b"POST /logging?level=debug HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n"
                     b"Connection: keep-alive")
    assert (req.method, req.path, req.query, req.version) == (
        "POST", "/logging", "level=debug", "HTTP/1.1")
    assert req.content_length == 3 and req.keep_alive and not req.chunked
    assert req.headers == (("host", "x"), ("content-length", "3"), ("connection", "keep-alive"))


@pytest.mark.parametrize(("head", "keep_alive"), [
    (b"GET / HTTP/1.1", True),
    (b"GET / HTTP/1.1\r\nConnection: Close", False),
    (b"GET / HTTP/1.0", False),
    (b"GET / HTTP/1.0\r\nConnection: keep-alive", True),
])
def test_keep_alive(head: bytes, keep_alive: bool) -> None:
    assert parse_head(head).keep_alive is keep_alive


def test_absolute_form_and_fragment() -> None:
    assert parse_head(b"GET http://127.0.0.1:15000/stats?filter=x HTTP/1.1").target == \
        "/stats?filter=x"
    assert parse_head(b"GET http://127.0.0.1:15000 HTTP/1.1").target == "/"
    assert parse_head(b"GET /ready#frag HTTP/1.1").target == "/ready"


def test_limits() -> None:
    tight = Limits(max_head_bytes=64, max_headers=2)
    with pytest.raises(HttpError) as err:
        parse_head(b"GET / HTTP/1.1\r\n" + b"X: y\r\n" * 2 + b"X: y", tight)
    assert err.value.status == 431
    with pytest.raises(HttpError) as err:
        parse_head(b"GET /" + b"a" * 100 + b" HTTP/1.1", tight)
    assert err.value.status == 431


def test_find_head_end() -> None:
    assert find_head_end(b"GET / HTTP/1.1\r\n\r\nrest") == (14, 18)
    assert find_head_end(b"GET / HTTP/1.0\n\nrest") == (14, 16)
    assert find_head_end(b"GET / HTTP/1.1\r\nHost: x\r\n") is None


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=300))
def test_any_bytes_parse_or_are_refused(data: bytes) -> None:
    try:
        req = parse_head(data)
    except HttpError as exc:
        assert 400 <= exc.status < 600
    else:
        assert isinstance(req, Request) and req.target.startswith("/")


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from([b"GET", b" ", b"/", b"HTTP/1.1", b"\r\n", b":", b"a",
                                 b"Content-Length", b"Transfer-Encoding", b"chunked", b"1",
                                 b"\x00", b"\xff", b"\t", b"?", b"="]), max_size=40))
def test_token_soup_parses_or_is_refused(parts: list[bytes]) -> None:
    test_any_bytes_parse_or_are_refused.hypothesis.inner_test(b"".join(parts))  # type: ignore[attr-defined]


def test_parse_query() -> None:
    assert parse_query("a=1&b&a=2&&c=%2F") == {"a": "1", "b": "", "c": "/"}
    assert parse_query("paths=a%3Ab", decode=False) == {"paths": "a%3Ab"}
    assert parse_query("") == {}


def test_response_encoding() -> None:
    data = Response(503, "DRAINING\n").encode(close=True, date="Thu, 01 Jan 2026 00:00:00 GMT")
    assert data == (b"HTTP/1.1 503 Service Unavailable\r\n"
                    b"content-type: text/plain; charset=UTF-8\r\n"
                    b"cache-control: no-cache, max-age=0\r\n"
                    b"x-content-type-options: nosniff\r\n"
                    b"date: Thu, 01 Jan 2026 00:00:00 GMT\r\n"
                    b"content-length: 9\r\n"
                    b"connection: close\r\n\r\nDRAINING\n")
    assert Response(200, "x").encode(head_only=True).endswith(b"content-length: 1\r\n\r\n")
