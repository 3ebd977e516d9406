"""The HTTP/1.1 codec as a playbook: bytes in → events out, ``send_*`` calls → bytes out."""

from __future__ import annotations

import http

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from remora.proxy.http.h1 import (
    CODEC_ERROR,
    CONTENT_LENGTH_AND_CHUNKED,
    HEADERS_TOO_LARGE,
    INVALID_TRANSFER_ENCODING,
    TOO_MANY_HEADERS,
    UPSTREAM_CLOSED_AFTER,
    UPSTREAM_CLOSED_BEFORE,
    UPSTREAM_PROTOCOL_ERROR_BEFORE,
    H1ClientCodec,
    H1ServerCodec,
)
from remora.proxy.http.types import (
    Body,
    ConnectionClosed,
    EndStream,
    Event,
    HeaderMap,
    Informational,
    ProtocolError,
    RequestHead,
    RequestHeaders,
    ResponseHead,
    ResponseHeaders,
)

# ----------------------------------------------------------------------------- helpers


def merge(events: list[Event]) -> list[Event]:
    """Adjacent Body events of one stream as one (how bytes were split is not an event)."""
    out: list[Event] = []
    for ev in events:
        last = out[-1] if out else None
        if isinstance(ev, Body) and isinstance(last, Body) and last.stream == ev.stream:
            out[-1] = Body(ev.stream, last.data + ev.data)
        else:
            out.append(ev)
    return out


def feed(codec: H1ServerCodec | H1ClientCodec, *chunks: bytes) -> list[Event]:
    events: list[Event] = []
    for chunk in chunks:
        events += codec.receive(chunk)
    return merge(events)


def splits(data: bytes) -> list[tuple[bytes, ...]]:
    """Every way to cut ``data`` in two, and byte by byte."""
    return [(data[:i], data[i:]) for i in range(1, len(data))] + [
        tuple(data[i:i + 1] for i in range(len(data)))]


def req_headers(stream: int, method: str, path: str, authority: str,
                headers: list[tuple[str, str]], end_stream: bool, protocol: str = "HTTP/1.1",
                upgrade: str = "", expect: bool = False) -> RequestHeaders:
    head = RequestHead(method, path, authority, "http", HeaderMap(headers),
                       protocol)  # type: ignore[arg-type]
    return RequestHeaders(stream, head, end_stream, upgrade, expect)


def resp(status: int, headers: list[tuple[str, str]] | None = None) -> ResponseHead:
    return ResponseHead(status, HeaderMap(headers or []))


def respond(codec: H1ServerCodec, stream: int, body: bytes = b"ok") -> bytes:
    codec.send_headers(stream, resp(200, [("content-length", str(len(body)))]), False)
    codec.send_body(stream, body)
    codec.send_end(stream)
    return codec.data_to_send()


GET = b"GET /a?b=1 HTTP/1.1\r\nHost: example.com\r\nUser-Agent: t\r\nAccept: */*\r\n\r\n"


# ----------------------------------------------------------------------------- server: requests


def test_simple_get_and_response() -> None:
    c = H1ServerCodec()
    assert feed(c, GET) == [req_headers(
        1, "GET", "/a?b=1", "example.com", [("user-agent", "t"), ("accept", "*/*")], True)]
    assert c.protocol == "HTTP/1.1"
    c.send_headers(1, resp(200, [("content-type", "text/plain"), ("content-length", "2")]),
                   False)
    c.send_body(1, b"hi")
    c.send_end(1)
    assert c.data_to_send() == (b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\n"
                                b"content-length: 2\r\n\r\nhi")
    assert c.data_to_send() == b""
    assert c.keep_alive
    assert c.resume() == []


def test_keep_alive_several_requests() -> None:
    c = H1ServerCodec()
    for stream in (1, 2, 3):
        [ev] = feed(c, GET)
        assert isinstance(ev, RequestHeaders) and ev.stream == stream and ev.end_stream
        assert respond(c, stream).startswith(b"HTTP/1.1 200 OK\r\n")
        assert c.keep_alive
    assert feed(c, b"") == [ConnectionClosed(last_stream=3)]
    assert c.receive(GET) == []


def test_pipelined_requests_held_until_response_ends() -> None:
    c = H1ServerCodec()
    post = b"POST /p HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\n\r\nabc"
    events = feed(c, GET + post + GET)
    assert len(events) == 1 and isinstance(events[0], RequestHeaders)
    assert c.buffered_input > 3
    assert c.resume() == []
    c.send_headers(1, resp(200, [("content-length", "0")]), False)
    assert c.resume() == []                 # the response has not ended yet
    c.send_end(1)
    second = merge(c.resume())
    assert second == [req_headers(2, "POST", "/p", "h", [("content-length", "3")], False),
                      Body(2, b"abc"), EndStream(2)]
    c.send_headers(2, resp(204), True)
    [third] = c.resume()
    assert isinstance(third, RequestHeaders) and third.stream == 3
    assert c.buffered_input == 0
    assert c.data_to_send() == (b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n"
                                b"HTTP/1.1 204 No Content\r\n\r\n")


def test_eof_held_behind_pipelined_request() -> None:
    c = H1ServerCodec()
    assert len(feed(c, GET + GET)) == 1
    assert c.receive(b"") == []
    respond(c, 1)
    assert [type(e) for e in c.resume()] == [RequestHeaders, ConnectionClosed]


CHUNKED = (b"POST /up HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n"
           b"5\r\nhello\r\n1;ext=x\r\n \r\n6\r\nworld!\r\n0\r\n\r\n")


@pytest.mark.parametrize("chunks", splits(CHUNKED))
def test_chunked_body_any_split(chunks: tuple[bytes, ...]) -> None:
    c = H1ServerCodec()
    assert feed(c, *chunks) == [req_headers(1, "POST", "/up", "h", [], False),
                                Body(1, b"hello world!"), EndStream(1)]


def test_chunked_with_trailers_any_split() -> None:
    raw = (b"POST / HTTP/1.1\r\nHost: h\r\nTE: trailers\r\nTransfer-Encoding: chunked\r\n\r\n"
           b"3\r\nabc\r\n0\r\nGrpc-Status: 0\r\nX-Trailer: a b \r\n\r\n")
    want = [req_headers(1, "POST", "/", "h", [("te", "trailers")], False), Body(1, b"abc"),
            EndStream(1, HeaderMap([("grpc-status", "0"), ("x-trailer", "a b")]))]
    for chunks in splits(raw):
        assert feed(H1ServerCodec(), *chunks) == want


def test_content_length_body_any_split() -> None:
    raw = b"PUT /x HTTP/1.1\r\nHost: h\r\nContent-Length: 10\r\n\r\n0123456789" + GET
    want = [req_headers(1, "PUT", "/x", "h", [("content-length", "10")], False),
            Body(1, b"0123456789"), EndStream(1)]
    for chunks in splits(raw):
        assert feed(H1ServerCodec(), *chunks) == want


def test_header_fields_normalised() -> None:
    raw = (b"GET / HTTP/1.1\r\nHOST: h:8080\r\nX-Caps:   v  \t\r\nConnection: keep-alive, foo\r\n"
           b"Keep-Alive: timeout=5\r\nProxy-Connection: x\r\nTE: gzip\r\nX-Latin: caf\xe9\r\n"
           b"Upgrade: websocket\r\nContent-Length: 0\r\n\r\n")
    [ev] = feed(H1ServerCodec(), raw)
    assert ev == req_headers(1, "GET", "/", "h:8080",
                             [("x-caps", "v"), ("x-latin", "café"), ("content-length", "0")],
                             True)


def test_absolute_form_target_names_the_authority() -> None:
    [ev] = feed(H1ServerCodec(), b"GET http://a.b:81/p?q HTTP/1.1\r\nHost: other\r\n\r\n")
    assert isinstance(ev, RequestHeaders)
    assert (ev.head.authority, ev.head.path) == ("a.b:81", "/p?q")
    [ev] = feed(H1ServerCodec(), b"OPTIONS * HTTP/1.1\r\nHost: h\r\n\r\n")
    assert isinstance(ev, RequestHeaders) and ev.head.path == "*"


def test_expect_100_continue() -> None:
    c = H1ServerCodec()
    [ev] = feed(c, b"POST / HTTP/1.1\r\nHost: h\r\nExpect: 100-Continue\r\n"
                   b"Content-Length: 1\r\n\r\n")
    assert isinstance(ev, RequestHeaders) and ev.expect_continue and not ev.end_stream
    assert ev.head.headers.get("expect") == "100-Continue"
    c.send_informational(1, resp(100))
    assert c.data_to_send() == b"HTTP/1.1 100 Continue\r\n\r\n"
    assert feed(c, b"x") == [Body(1, b"x"), EndStream(1)]


def test_http10_closes_by_default() -> None:
    c = H1ServerCodec()
    [ev] = feed(c, b"GET / HTTP/1.0\r\n\r\n")
    assert isinstance(ev, RequestHeaders) and ev.head.protocol == "HTTP/1.0" and ev.end_stream
    assert c.protocol == "HTTP/1.0"
    assert not c.keep_alive
    c.send_headers(1, resp(200), False)     # no length: the close delimits (no chunked in 1.0)
    c.send_body(1, b"abc")
    c.send_end(1)
    assert c.data_to_send() == b"HTTP/1.1 200 OK\r\nconnection: close\r\n\r\nabc"
    assert not c.keep_alive


# The codecs read the version without asking llhttp when the message is kept alive and has no
# Connection field: every combination of version, Connection and framing must still come out.
@pytest.mark.parametrize(("version", "fields", "want"), [
    (b"1.1", b"", "HTTP/1.1"),
    (b"1.1", b"Connection: close\r\n", "HTTP/1.1"),
    (b"1.1", b"Connection: keep-alive\r\n", "HTTP/1.1"),
    (b"1.1", b"Proxy-Connection: keep-alive\r\n", "HTTP/1.1"),
    (b"1.0", b"", "HTTP/1.0"),
    (b"1.0", b"Connection: keep-alive\r\n", "HTTP/1.0"),
    (b"1.0", b"Proxy-Connection: keep-alive\r\n", "HTTP/1.0"),
    (b"1.0", b"Keep-Alive: timeout=5\r\n", "HTTP/1.0"),
    (b"1.0", b"Connection: close\r\n", "HTTP/1.0"),
    (b"2.0", b"", None),
    (b"2.0", b"Connection: keep-alive\r\n", None),
    (b"0.9", b"Connection: keep-alive\r\n", None),
])
def test_request_version(version: bytes, fields: bytes, want: str | None) -> None:
    c = H1ServerCodec()
    events = feed(c, b"GET / HTTP/" + version + b"\r\nHost: a\r\n" + fields + b"\r\n")
    if want is None:
        assert isinstance(events[0], ProtocolError) and events[0].status == 400
        return
    assert isinstance(events[0], RequestHeaders) and events[0].head.protocol == want
    assert c.protocol == want


@pytest.mark.parametrize(("version", "fields", "want"), [
    (b"1.1", b"Content-Length: 2\r\n", "HTTP/1.1"),
    (b"1.1", b"Content-Length: 2\r\nConnection: keep-alive\r\n", "HTTP/1.1"),
    (b"1.1", b"Content-Length: 2\r\nConnection: close\r\n", "HTTP/1.1"),
    (b"1.1", b"", "HTTP/1.1"),                          # close-delimited
    (b"1.0", b"Content-Length: 2\r\n", "HTTP/1.0"),
    (b"1.0", b"Content-Length: 2\r\nConnection: keep-alive\r\n", "HTTP/1.0"),
    (b"1.0", b"Content-Length: 2\r\nProxy-Connection: keep-alive\r\n", "HTTP/1.0"),
    (b"1.0", b"", "HTTP/1.0"),
])
def test_response_version(version: bytes, fields: bytes, want: str) -> None:
    c = H1ClientCodec()
    c.send_headers(1, get(), True)
    events = feed(c, b"HTTP/" + version + b" 200 OK\r\n" + fields + b"\r\nok")
    assert isinstance(events[0], ResponseHeaders) and events[0].head.protocol == want


def test_http10_keep_alive() -> None:
    c = H1ServerCodec()
    feed(c, b"GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n")
    assert c.keep_alive
    assert respond(c, 1) == (b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n"
                             b"connection: keep-alive\r\n\r\nok")
    assert c.keep_alive
    [ev] = feed(c, b"GET / HTTP/1.0\r\n\r\n")
    assert isinstance(ev, RequestHeaders) and ev.stream == 2
    c.send_headers(2, resp(200), False)
    c.send_end(2)
    assert c.data_to_send() == b"HTTP/1.1 200 OK\r\nconnection: close\r\n\r\n"
    assert not c.keep_alive


def test_connection_close_ignores_what_follows() -> None:
    c = H1ServerCodec()
    events = feed(c, b"GET / HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n" + GET)
    assert len(events) == 1
    assert not c.keep_alive
    assert respond(c, 1) == (b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n"
                             b"connection: close\r\n\r\nok")
    assert c.resume() == []
    assert c.receive(GET) == []
    assert c.receive(b"") == [ConnectionClosed(last_stream=1)]


def test_server_asks_to_close() -> None:
    c = H1ServerCodec()
    feed(c, GET)
    c.send_headers(1, resp(200, [("connection", "close"), ("content-length", "0")]), True)
    assert c.data_to_send() == (b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n"
                                b"connection: close\r\n\r\n")
    assert not c.keep_alive


def test_response_framing() -> None:
    c = H1ServerCodec()
    feed(c, GET)
    c.send_headers(1, resp(200, [("transfer-encoding", "gzip"), ("keep-alive", "x"),
                                 ("x-a", "1")]), False)
    c.send_body(1, b"hello")
    c.send_body(1, b"")                     # an empty chunk would end the body
    c.send_body(1, b"x" * 26)
    c.send_end(1, HeaderMap([("grpc-status", "0"), ("grpc-message", "")]))
    assert c.data_to_send() == (b"HTTP/1.1 200 OK\r\nx-a: 1\r\ntransfer-encoding: chunked\r\n\r\n"
                                b"5\r\nhello\r\n1a\r\n" + b"x" * 26 + b"\r\n"
                                b"0\r\ngrpc-status: 0\r\ngrpc-message: \r\n\r\n")
    assert c.keep_alive
    feed(c, GET)
    c.send_headers(2, resp(404), True)      # ends at once: an explicit empty body
    feed(c, GET)
    c.send_headers(3, resp(599), True)
    assert c.data_to_send() == (b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n"
                                b"HTTP/1.1 599 Unknown\r\ncontent-length: 0\r\n\r\n")


def test_response_header_injection_dropped() -> None:
    c = H1ServerCodec()
    feed(c, GET)
    c.send_headers(1, resp(200, [("x-ok", "1"), ("x-bad", "a\r\nset-cookie: evil"),
                                 ("content-length", "0")]), True)
    assert c.data_to_send() == b"HTTP/1.1 200 OK\r\nx-ok: 1\r\ncontent-length: 0\r\n\r\n"


def test_head_response_has_no_body() -> None:
    c = H1ServerCodec()
    feed(c, b"HEAD / HTTP/1.1\r\nHost: h\r\n\r\n")
    c.send_headers(1, resp(200, [("content-length", "10")]), False)
    c.send_body(1, b"0123456789")
    c.send_end(1)
    assert c.data_to_send() == b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\n"
    assert c.keep_alive
    feed(c, b"HEAD / HTTP/1.1\r\nHost: h\r\n\r\n")
    c.send_headers(2, resp(200), False)     # no length and no chunked: there is no body
    c.send_end(2)
    assert c.data_to_send() == b"HTTP/1.1 200 OK\r\n\r\n"


@pytest.mark.parametrize(("status", "line"), [(204, b"204 No Content"),
                                              (304, b"304 Not Modified")])
def test_bodiless_statuses(status: int, line: bytes) -> None:
    c = H1ServerCodec()
    feed(c, GET)
    c.send_headers(1, resp(status, [("etag", "x"), ("content-length", "5")]), False)
    c.send_body(1, b"never")
    c.send_end(1)
    cl = b"" if status == 204 else b"content-length: 5\r\n"
    assert c.data_to_send() == b"HTTP/1.1 " + line + b"\r\netag: x\r\n" + cl + b"\r\n"
    assert c.keep_alive


def test_response_before_request_end_closes() -> None:
    c = H1ServerCodec()
    feed(c, b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 100\r\n\r\nabc")
    c.send_headers(1, resp(413), True)
    phrase = http.HTTPStatus(413).phrase.encode()
    assert c.data_to_send() == (b"HTTP/1.1 413 " + phrase + b"\r\ncontent-length: 0\r\n"
                                b"connection: close\r\n\r\n")
    assert not c.keep_alive


# ----------------------------------------------------------------------------- server: upgrades

WS = (b"GET /chat HTTP/1.1\r\nHost: h\r\nConnection: Upgrade\r\nUpgrade: WebSocket\r\n"
      b"Sec-WebSocket-Key: k\r\n\r\n")


def test_websocket_upgrade_tunnel() -> None:
    c = H1ServerCodec()
    events = feed(c, WS + b"\x81\x01a")
    assert events == [req_headers(1, "GET", "/chat", "h",
                                  [("upgrade", "WebSocket"), ("sec-websocket-key", "k")],
                                  False, upgrade="websocket")]
    assert c.buffered_input == 3
    assert c.receive(b"more") == []
    c.send_headers(1, resp(101, [("upgrade", "websocket"), ("sec-websocket-accept", "x")]),
                   False)
    assert c.data_to_send() == (b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\n"
                                b"sec-websocket-accept: x\r\nconnection: upgrade\r\n\r\n")
    assert c.resume() == [Body(1, b"\x81\x01amore")]
    assert c.receive(b"GET / HTTP/1.1\r\n\r\n") == [Body(1, b"GET / HTTP/1.1\r\n\r\n")]
    c.send_body(1, b"\x81\x01b")
    assert c.data_to_send() == b"\x81\x01b"
    assert not c.keep_alive
    assert c.receive(b"") == [EndStream(1)]
    c.send_end(1)
    assert c.data_to_send() == b""


def test_upgrade_refused_continues_as_http1() -> None:
    c = H1ServerCodec()
    assert len(feed(c, WS + GET)) == 1
    c.send_headers(1, resp(426, [("content-length", "0")]), False)
    assert c.resume() == [EndStream(1)]
    c.send_end(1)
    assert c.keep_alive
    [ev] = c.resume()
    assert isinstance(ev, RequestHeaders) and ev.stream == 2 and ev.upgrade == ""
    respond(c, 2)
    assert feed(c, GET) == [req_headers(
        3, "GET", "/a?b=1", "example.com", [("user-agent", "t"), ("accept", "*/*")], True)]


def test_upgrade_with_body() -> None:
    c = H1ServerCodec()
    raw = (b"POST / HTTP/1.1\r\nHost: h\r\nConnection: upgrade\r\nUpgrade: x\r\n"
           b"Content-Length: 4\r\n\r\nab")
    assert feed(c, raw) == [req_headers(1, "POST", "/", "h",
                                        [("upgrade", "x"), ("content-length", "4")], False,
                                        upgrade="x"), Body(1, b"ab")]
    c.send_headers(1, resp(200, [("content-length", "0")]), True)
    assert c.resume() == []
    assert not c.keep_alive                 # answered before the body was in
    assert feed(c, b"cdGET") == [Body(1, b"cd"), EndStream(1)]


def test_upgrade_header_alone_is_not_an_upgrade() -> None:
    [ev] = feed(H1ServerCodec(), b"GET / HTTP/1.1\r\nHost: h\r\nUpgrade: websocket\r\n\r\n")
    assert isinstance(ev, RequestHeaders) and ev.upgrade == "" and ev.end_stream
    assert "upgrade" not in ev.head.headers


H2C = (b"GET / HTTP/1.1\r\nHost: h\r\nConnection: Upgrade, HTTP2-Settings\r\n"
       b"Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQCAAAAAAIAAAAA\r\n\r\n")
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


def test_h2c_upgrade_take_rest() -> None:
    c = H1ServerCodec()
    [ev] = feed(c, H2C + PREFACE[:10])
    assert isinstance(ev, RequestHeaders) and ev.upgrade == "h2c" and ev.end_stream
    assert ev.head.headers.get("http2-settings") == "AAMAAABkAAQCAAAAAAIAAAAA"
    c.send_headers(1, resp(101, [("upgrade", "h2c")]), False)
    assert c.data_to_send() == (b"HTTP/1.1 101 Switching Protocols\r\nupgrade: h2c\r\n"
                                b"connection: upgrade\r\n\r\n")
    assert c.resume() == []
    assert c.receive(PREFACE[10:]) == []
    assert c.take_rest() == PREFACE
    assert c.receive(b"more") == []
    with pytest.raises(RuntimeError):
        H1ServerCodec().take_rest()


def test_h2c_take_rest_without_send_headers() -> None:
    c = H1ServerCodec()
    feed(c, H2C + PREFACE)
    assert c.take_rest() == PREFACE         # the caller writes its own 101


def test_h2c_with_body() -> None:
    c = H1ServerCodec()
    raw = H2C.replace(b"\r\n\r\n", b"\r\nContent-Length: 3\r\n\r\n")
    events = feed(c, raw + b"ab")
    assert isinstance(events[0], RequestHeaders) and not events[0].end_stream
    assert events[1:] == [Body(1, b"ab")]
    with pytest.raises(RuntimeError):       # the body is not in yet
        c.take_rest()
    assert feed(c, b"c" + PREFACE) == [Body(1, b"c"), EndStream(1)]
    assert c.take_rest() == PREFACE


def test_h2c_refused_served_as_http11() -> None:
    c = H1ServerCodec()
    assert len(feed(c, H2C + GET)) == 1
    respond(c, 1)
    assert c.keep_alive
    [ev] = c.resume()                       # no second EndStream for the h2c request
    assert isinstance(ev, RequestHeaders) and ev.stream == 2


def test_connect_tunnel() -> None:
    c = H1ServerCodec()
    [ev] = feed(c, b"CONNECT db:5432 HTTP/1.1\r\nHost: db:5432\r\n\r\n")
    assert ev == req_headers(1, "CONNECT", "", "db:5432", [], False)
    c.send_headers(1, resp(200, [("content-length", "0")]), False)
    assert c.data_to_send() == b"HTTP/1.1 200 OK\r\n\r\n"
    assert c.resume() == []
    assert c.receive(b"\x00raw") == [Body(1, b"\x00raw")]
    c.send_body(1, b"back")
    assert c.data_to_send() == b"back"


def test_connect_refused() -> None:
    c = H1ServerCodec()
    feed(c, b"CONNECT db:5432 HTTP/1.1\r\nHost: db:5432\r\n\r\n")
    c.send_headers(1, resp(403), True)
    assert c.resume() == [EndStream(1)]
    assert c.keep_alive


# ----------------------------------------------------------------------------- server: errors


def head_of_size(size: int, count: int = 1) -> bytes:
    """A request whose target + names + values are ``size`` bytes, in ``count`` fields."""
    target = b"/"
    names = [b"x%d" % i for i in range(count)]
    fixed = len(target) + sum(len(n) for n in names)
    values = [b"v" * ((size - fixed) // count)] * count
    values[-1] += b"v" * (size - fixed - sum(len(v) for v in values))
    fields = b"".join(n + b": " + v + b"\r\n" for n, v in zip(names, values, strict=True))
    return b"GET " + target + b" HTTP/1.1\r\n" + fields + b"\r\n"


def error_of(raw: bytes, **kw: int) -> list[Event]:
    c = H1ServerCodec(**kw)
    events = feed(c, raw)
    assert c.receive(b"GET / HTTP/1.1\r\n\r\n") == []   # nothing after an error
    assert c.receive(b"") == []
    assert not c.keep_alive
    return events


def test_headers_too_large_at_the_limit() -> None:
    [ev] = feed(H1ServerCodec(max_request_headers_kb=1), head_of_size(1024, 3))
    assert isinstance(ev, RequestHeaders)
    assert error_of(head_of_size(1025, 3), max_request_headers_kb=1) == [
        ProtocolError(431, HEADERS_TOO_LARGE, 1)]
    # byte by byte too (one endless field is caught by the raw guard at the latest)
    c = H1ServerCodec(max_request_headers_kb=1)
    events = feed(c, *[bytes([b]) for b in head_of_size(1025, 1)])
    assert events == [ProtocolError(431, HEADERS_TOO_LARGE, 1)]
    c = H1ServerCodec(max_request_headers_kb=1)
    assert feed(c, b"GET / HTTP/1.1\r\nX: " + b"v" * 20000) == [
        ProtocolError(431, HEADERS_TOO_LARGE, 1)]


def test_too_many_headers_at_the_limit() -> None:
    [ev] = feed(H1ServerCodec(max_headers_count=10), head_of_size(100, 10))
    assert isinstance(ev, RequestHeaders) and len(ev.head.headers) == 10
    assert error_of(head_of_size(100, 11), max_headers_count=10) == [
        ProtocolError(431, TOO_MANY_HEADERS, 1)]


@pytest.mark.parametrize(("raw", "status", "details"), [
    (b"POST / HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
     400, CONTENT_LENGTH_AND_CHUNKED),
    (b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n",
     400, CONTENT_LENGTH_AND_CHUNKED),
    (b"POST / HTTP/1.1\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd",
     400, CODEC_ERROR),
    (b"POST / HTTP/1.1\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\nabc",
     400, CODEC_ERROR),
    (b"POST / HTTP/1.1\r\nContent-Length: 1, 2\r\n\r\nab", 400, CODEC_ERROR),
    (b"POST / HTTP/1.1\r\nContent-Length: -1\r\n\r\n", 400, CODEC_ERROR),
    (b"POST / HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n", 501, INVALID_TRANSFER_ENCODING),
    (b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked, gzip\r\n\r\n",
     501, INVALID_TRANSFER_ENCODING),
    (b"POST / HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
     501, INVALID_TRANSFER_ENCODING),
    (b"CONNECT a:1 HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
     501, INVALID_TRANSFER_ENCODING),
    (b"GARBAGE\r\n\r\n", 400, CODEC_ERROR),
    (b"GET / HTTP/1.1\r\nBad Name: x\r\n\r\n", 400, CODEC_ERROR),
    (b"GET / HTTP/1.1\r\nX: a\x01b\r\n\r\n", 400, CODEC_ERROR),
    (b"GET / HTTP/1.1\nX: a\n\n", 400, CODEC_ERROR),
    (b"GET / HTTP/2.0\r\n\r\n", 400, CODEC_ERROR),
    (b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400, CODEC_ERROR),
    (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", 400, CODEC_ERROR),
    (b"GET /\x7f HTTP/1.1\r\n\r\n", 400, CODEC_ERROR),
    (b"GET / HTTP/1.1\r\nConnection: upgrade\r\nUpgrade: x\r\n"
     b"Transfer-Encoding: chunked\r\n\r\n", 400, CODEC_ERROR),
])
def test_protocol_errors(raw: bytes, status: int, details: str) -> None:
    assert error_of(raw) == [ProtocolError(status, details, 1)]


def test_bad_chunk_size_after_headers() -> None:
    events = error_of(b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\nzz\r\n")
    assert events[1:] == [Body(1, b"abc"), ProtocolError(400, CODEC_ERROR, 1)]


def test_error_in_pipelined_request_is_held() -> None:
    c = H1ServerCodec()
    assert len(feed(c, GET + b"BAD REQUEST\r\n\r\n")) == 1
    respond(c, 1)
    assert c.resume() == [ProtocolError(400, CODEC_ERROR, 2)]
    c.send_headers(2, resp(400, [("content-length", "0")]), True)
    assert c.data_to_send() == (b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n"
                                b"connection: close\r\n\r\n")


def test_server_eof() -> None:
    c = H1ServerCodec()
    assert feed(c, b"GET / HT", b"") == [ProtocolError(0, CODEC_ERROR, 1)]
    c = H1ServerCodec()
    assert feed(c, b"POST / HTTP/1.1\r\nContent-Length: 5\r\n\r\nab", b"")[-2:] == [
        Body(1, b"ab"), ProtocolError(0, CODEC_ERROR, 1)]
    c = H1ServerCodec()
    assert feed(c, b"") == [ConnectionClosed(last_stream=0)]
    c = H1ServerCodec()
    feed(c, WS)
    assert c.receive(b"") == [ConnectionClosed(last_stream=1)]


def test_server_reset_closes() -> None:
    c = H1ServerCodec()
    feed(c, GET + GET)
    c.send_headers(1, resp(200), False)
    c.send_body(1, b"partial")
    c.reset(1)
    c.send_body(1, b"dropped")
    assert not c.keep_alive
    assert c.data_to_send() == (b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n"
                                b"7\r\npartial\r\n")
    c.consumed(1, 7)
    assert c.buffered(1) == 0
    c.close()
    assert c.data_to_send() == b""


# ----------------------------------------------------------------------------- client


def get(authority: str = "svc:80", path: str = "/p", method: str = "GET",
        headers: list[tuple[str, str]] | None = None) -> RequestHead:
    return RequestHead(method, path, authority, "http", HeaderMap(headers or []))


def test_client_request_and_response() -> None:
    c = H1ClientCodec()
    assert c.can_open and c.reusable and c.active_streams == 0
    s = c.new_stream()
    assert s == 1
    c.send_headers(s, get(headers=[("x-a", "1"), ("host", "ignored"), ("connection", "x"),
                                   ("te", "trailers")]), True)
    assert c.data_to_send() == b"GET /p HTTP/1.1\r\nhost: svc:80\r\nx-a: 1\r\nte: trailers\r\n\r\n"
    assert not c.can_open and c.active_streams == 1
    raw = b"HTTP/1.1 200 Fine\r\nContent-Length: 5\r\nConnection: keep-alive\r\n\r\nhello"
    want = [ResponseHeaders(1, ResponseHead(200, HeaderMap([("content-length", "5")]), "Fine"),
                            False), Body(1, b"hello"), EndStream(1)]
    assert feed(c, raw) == want
    assert c.can_open and c.active_streams == 0
    for chunks in splits(raw):
        c2 = H1ClientCodec()
        c2.send_headers(c2.new_stream(), get(), True)
        assert feed(c2, *chunks) == want
    s = c.new_stream()
    c.send_headers(s, get(), True)
    assert feed(c, raw)[0] == ResponseHeaders(
        2, ResponseHead(200, HeaderMap([("content-length", "5")]), "Fine"), False)


def test_client_request_framing() -> None:
    c = H1ClientCodec()
    c.send_headers(1, get(method="POST"), True)
    assert c.data_to_send() == b"POST /p HTTP/1.1\r\nhost: svc:80\r\ncontent-length: 0\r\n\r\n"
    feed(c, b"HTTP/1.1 204 No Content\r\n\r\n")
    c.send_headers(2, get(method="POST", headers=[("content-length", "3")]), False)
    c.send_body(2, b"abc")
    c.send_end(2)
    assert c.data_to_send() == b"POST /p HTTP/1.1\r\nhost: svc:80\r\ncontent-length: 3\r\n\r\nabc"
    feed(c, b"HTTP/1.1 204 No Content\r\n\r\n")
    c.send_headers(3, get(method="POST", headers=[("transfer-encoding", "gzip")]), False)
    c.send_body(3, b"abc")
    c.send_body(3, b"")
    c.send_end(3, HeaderMap([("grpc-status", "0")]))
    assert c.data_to_send() == (b"POST /p HTTP/1.1\r\nhost: svc:80\r\n"
                                b"transfer-encoding: chunked\r\n\r\n3\r\nabc\r\n"
                                b"0\r\ngrpc-status: 0\r\n\r\n")
    with pytest.raises(RuntimeError):       # still waiting for the response
        c.send_headers(4, get(), True)


def test_client_head_response_has_no_body() -> None:
    c = H1ClientCodec()
    c.send_headers(1, get(method="HEAD"), True)
    events = feed(c, b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\nTransfer-Encoding: chunked"[:35],
                  b"\r\n\r", b"\n")
    assert events == [ResponseHeaders(1, ResponseHead(
        200, HeaderMap([("content-length", "10")]), "OK"), True)]
    assert c.can_open
    c.send_headers(2, get(), True)
    assert feed(c, b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nx") == [
        ResponseHeaders(2, ResponseHead(200, HeaderMap([("content-length", "1")]), "OK"),
                        False), Body(2, b"x"), EndStream(2)]


def test_client_head_response_then_unsolicited_bytes() -> None:
    c = H1ClientCodec()
    c.send_headers(1, get(method="HEAD"), True)
    events = feed(c, b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 3\r\n"
                     b"\r\nabc")
    assert [type(e) for e in events] == [Informational, ResponseHeaders, ProtocolError]
    assert not c.reusable


@pytest.mark.parametrize("status", [204, 304])
def test_client_bodiless_status(status: int) -> None:
    c = H1ClientCodec()
    c.send_headers(1, get(), True)
    [ev] = feed(c, b"HTTP/1.1 %d X\r\nContent-Length: 5\r\n\r\n" % status)
    assert isinstance(ev, ResponseHeaders) and ev.end_stream
    assert c.can_open


def test_client_content_length_zero() -> None:
    c = H1ClientCodec()
    c.send_headers(1, get(), True)
    [ev] = feed(c, b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    assert isinstance(ev, ResponseHeaders) and ev.end_stream


def test_client_close_delimited_response() -> None:
    c = H1ClientCodec()
    c.send_headers(1, get(), True)
    events = feed(c, b"HTTP/1.0 200 OK\r\n\r\nsome", b" body")
    assert events == [ResponseHeaders(1, ResponseHead(200, HeaderMap(), "OK", "HTTP/1.0"),
                                      False), Body(1, b"some body")]
    assert not c.reusable and not c.can_open
    assert c.receive(b"") == [EndStream(1)]


def test_client_connection_close_not_reusable() -> None:
    c = H1ClientCodec()
    c.send_headers(1, get(), True)
    feed(c, b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 0\r\n\r\n")
    assert not c.reusable and not c.can_open and c.active_streams == 0


def test_client_informational_then_final() -> None:
    c = H1ClientCodec()
    c.send_headers(1, get(method="POST", headers=[("expect", "100-continue"),
                                                  ("content-length", "1")]), False)
    c.data_to_send()
    [info] = feed(c, b"HTTP/1.1 100 Continue\r\n\r\n")
    assert info == Informational(1, ResponseHead(100, HeaderMap(), "Continue"))
    c.send_body(1, b"x")
    c.send_end(1)
    assert c.data_to_send() == b"x"
    assert feed(c, b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\nHTTP/1.1 200 OK\r\n"
                   b"Transfer-Encoding: chunked\r\n\r\n2\r\nhi\r\n0\r\nx-t: 1\r\n\r\n") == [
        Informational(1, ResponseHead(103, HeaderMap([("link", "</a>")]), "Early Hints")),
        ResponseHeaders(1, ResponseHead(200, HeaderMap(), "OK"), False), Body(1, b"hi"),
        EndStream(1, HeaderMap([("x-t", "1")]))]
    assert c.can_open


def test_client_upgrade() -> None:
    c = H1ClientCodec()
    c.send_headers(1, get(headers=[("upgrade", "websocket"), ("sec-websocket-key", "k")]),
                   False)
    assert c.data_to_send() == (b"GET /p HTTP/1.1\r\nhost: svc:80\r\nupgrade: websocket\r\n"
                                b"sec-websocket-key: k\r\nconnection: upgrade\r\n\r\n")
    events = feed(c, b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                     b"Connection: Upgrade\r\n\r\n\x81\x01a")
    assert events == [ResponseHeaders(1, ResponseHead(101, HeaderMap([("upgrade", "websocket")]),
                                                      "Switching Protocols"), False),
                      Body(1, b"\x81\x01a")]
    assert c.receive(b"HTTP/1.1 200") == [Body(1, b"HTTP/1.1 200")]
    c.send_body(1, b"\x81\x01b")
    assert c.data_to_send() == b"\x81\x01b"
    assert not c.reusable
    assert c.receive(b"") == [EndStream(1)]


def test_client_upgrade_refused() -> None:
    c = H1ClientCodec()
    c.send_headers(1, get(headers=[("upgrade", "websocket")]), False)
    events = feed(c, b"HTTP/1.1 426 Upgrade Required\r\nUpgrade: x\r\nContent-Length: 0\r\n\r\n")
    assert events == [ResponseHeaders(1, ResponseHead(
        426, HeaderMap([("content-length", "0")]), "Upgrade Required"), True)]
    assert not c.reusable                   # the request never ended


def test_client_connect_tunnel() -> None:
    c = H1ClientCodec()
    c.send_headers(1, get(method="CONNECT", authority="db:5432", path=""), False)
    assert c.data_to_send() == b"CONNECT db:5432 HTTP/1.1\r\nhost: db:5432\r\n\r\n"
    assert feed(c, b"HTTP/1.1 200 Connection established\r\n\r\n\x00x") == [
        ResponseHeaders(1, ResponseHead(200, HeaderMap(), "Connection established"), False),
        Body(1, b"\x00x")]
    assert c.receive(b"more") == [Body(1, b"more")]
    c.send_body(1, b"up")
    assert c.data_to_send() == b"up"


def test_client_eof_semantics() -> None:
    c = H1ClientCodec()
    assert feed(c, b"") == [ConnectionClosed(last_stream=0)]
    assert not c.can_open and c.receive(b"x") == []

    c = H1ClientCodec()
    c.send_headers(1, get(), True)
    assert feed(c, b"") == [ProtocolError(0, UPSTREAM_CLOSED_BEFORE, 1)]

    c = H1ClientCodec()
    c.send_headers(1, get(), True)
    assert feed(c, b"HTTP/1.1 200", b"") == [ProtocolError(0, UPSTREAM_PROTOCOL_ERROR_BEFORE, 1)]

    c = H1ClientCodec()
    c.send_headers(1, get(), True)
    events = feed(c, b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nabc", b"")
    assert events[1:] == [Body(1, b"abc"), ProtocolError(0, UPSTREAM_CLOSED_AFTER, 1)]

    c = H1ClientCodec()
    c.send_headers(1, get(), True)
    feed(c, b"HTTP/1.1 204 No Content\r\n\r\n")
    assert feed(c, b"") == [ConnectionClosed(last_stream=1)]


def test_client_protocol_errors() -> None:
    c = H1ClientCodec()
    assert feed(c, b"HTTP/1.1 200 OK\r\n\r\n") == [
        ProtocolError(0, UPSTREAM_PROTOCOL_ERROR_BEFORE, 0)]
    assert not c.can_open
    for raw in (b"garbage\r\n\r\n",
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n",
                b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\nConnection: upgrade\r\n\r\n",
                b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n"):
        c = H1ClientCodec()
        c.send_headers(1, get(), True)
        events = feed(c, raw)
        assert events[-1] == ProtocolError(0, UPSTREAM_PROTOCOL_ERROR_BEFORE, 1), raw
        assert not c.reusable


def test_client_reset() -> None:
    c = H1ClientCodec()
    c.send_headers(1, get(), True)
    c.reset(1)
    assert not c.reusable and not c.can_open
    assert c.receive(b"HTTP/1.1 200 OK\r\n\r\n") == []
    assert c.buffered(1) == 0


def test_client_response_before_request_end() -> None:
    c = H1ClientCodec()
    c.send_headers(1, get(method="POST"), False)
    events = feed(c, b"HTTP/1.1 413 Too Large\r\nContent-Length: 0\r\n\r\n")
    assert isinstance(events[0], ResponseHeaders) and events[0].end_stream
    assert c.active_streams == 0 and not c.reusable
    c.data_to_send()
    c.send_body(1, b"late")
    c.send_end(1)
    assert c.data_to_send() == b""


# ----------------------------------------------------------------------------- fuzz

VALID_REQUESTS = [
    GET,
    CHUNKED,
    WS,
    b"POST /p HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\n\r\nabc",
    b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\nT: 1\r\n\r\n",
    b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n",
    b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: h\r\nConnection: upgrade\r\nUpgrade: x\r\n"
    b"Content-Length: 2\r\n\r\nab",
    b"CONNECT a:1 HTTP/1.1\r\n\r\n",
    b"HEAD / HTTP/1.1\r\nExpect: 100-continue\r\n\r\n",
    H2C,
]


@st.composite
def request_bytes(draw: st.DrawFn) -> bytes:
    if draw(st.booleans()):
        return draw(st.binary(max_size=200))
    parts = draw(st.lists(st.sampled_from(VALID_REQUESTS), min_size=1, max_size=4))
    data = bytearray(b"".join(parts))
    for _ in range(draw(st.integers(0, 3))):
        pos = draw(st.integers(0, len(data)))
        op = draw(st.sampled_from(["insert", "delete", "replace"]))
        byte = draw(st.sampled_from(b"\r\n :;,\x00\xff0aZ-"))
        if op == "insert":
            data[pos:pos] = bytes([byte])
        elif pos < len(data):
            data[pos:pos + 1] = b"" if op == "delete" else bytes([byte])
    return bytes(data)


def serve(chunks: list[bytes]) -> tuple[list[Event], bytes]:
    """A server that answers every request as soon as it arrives and ends the answer when
    the request has ended, so what it sees cannot depend on how the bytes were cut."""
    c = H1ServerCodec()
    seen: list[Event] = []

    def handle(events: list[Event]) -> None:
        todo = list(events)
        while todo:
            ev = todo.pop(0)
            seen.append(ev)
            if isinstance(ev, RequestHeaders):
                c.send_headers(ev.stream, resp(200), ev.end_stream)
            elif isinstance(ev, EndStream):
                c.send_end(ev.stream)
            else:
                continue
            todo += c.resume()

    for chunk in chunks:
        if chunk:
            handle(c.receive(chunk))
    handle(c.receive(b""))
    return merge(seen), c.data_to_send()


def cut(data: bytes, points: list[int]) -> list[bytes]:
    marks = sorted({p % (len(data) + 1) for p in points})
    return [data[a:b] for a, b in zip([0, *marks], [*marks, len(data)], strict=True)]


@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(request_bytes(), st.lists(st.integers(0, 10_000), max_size=12))
def test_fuzz_server_split_invariant(data: bytes, points: list[int]) -> None:
    events, out = serve([data])
    for ev in events:
        if isinstance(ev, ProtocolError):
            assert ev is events[-1]         # nothing after an error
    for chunks in (cut(data, points), [data[i:i + 1] for i in range(len(data))]):
        split_events, split_out = serve(chunks)
        assert split_events == events
        # A reply already under way cannot take back its keep-alive when the request it
        # answers turns out broken later, so the bytes sent match only without errors.
        if not events or not isinstance(events[-1], ProtocolError):
            assert split_out == out


RESPONSES = [
    b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabc",
    b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 204 No Content\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nhi\r\n0\r\nT: 1\r\n\r\n",
    b"HTTP/1.0 200 OK\r\n\r\nuntil close",
    b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\nConnection: upgrade\r\n\r\nraw",
    b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n",
]


@settings(max_examples=600, deadline=None)
@given(st.one_of(st.binary(max_size=120),
                 st.lists(st.sampled_from(RESPONSES), min_size=1, max_size=2).map(b"".join)),
       st.sampled_from(["GET", "HEAD", "CONNECT", "UPGRADE"]),
       st.lists(st.integers(0, 10_000), max_size=8))
def test_fuzz_client_split_invariant(data: bytes, method: str, points: list[int]) -> None:
    def run(chunks: list[bytes]) -> list[Event]:
        c = H1ClientCodec()
        if method == "UPGRADE":
            c.send_headers(1, get(headers=[("upgrade", "x")]), False)
        else:
            c.send_headers(1, get(method=method), method != "CONNECT")
        events: list[Event] = []
        for chunk in chunks:
            if chunk:
                events += c.receive(chunk)
        events += c.receive(b"")
        return merge(events)

    whole = run([data])
    assert run(cut(data, points)) == whole
    assert run([data[i:i + 1] for i in range(len(data))]) == whole


def test_field_names_lowered_through_the_bounded_name_cache() -> None:
    """Names are lower-cased whatever their case and however many distinct names peers send
    (the name cache stops growing at its bound; names past it are still lowered)."""
    from remora.proxy.http import h1
    for i in range(h1._NAMES_MAX + 50):
        c = H1ServerCodec()
        [ev] = feed(c, b"GET / HTTP/1.1\r\nHost: a\r\nX-Name-%d: v\r\nX-NAME-%d: w\r\n\r\n"
                    % (i, i))
        assert isinstance(ev, RequestHeaders)
        assert ev.head.headers.items() == [(f"x-name-{i}", "v"), (f"x-name-{i}", "w")]
    assert len(h1._NAMES) <= h1._NAMES_MAX
    c2 = H1ClientCodec()
    c2.send_headers(1, get(), True)
    [ev] = merge(feed(c2, b"HTTP/1.1 200 OK\r\nContent-LENGTH: 2\r\nX-Up: 1\r\n\r\nok"))[:1]
    assert isinstance(ev, ResponseHeaders)
    assert ev.head.headers.items() == [("content-length", "2"), ("x-up", "1")]
