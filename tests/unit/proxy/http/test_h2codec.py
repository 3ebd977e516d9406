"""The HTTP/2 codec pair wired back to back in memory (no sockets): header mapping, gRPC-shaped
exchanges with trailers, many streams, flow control in both directions, resets, GOAWAY and EOF,
the h2c upgrade, and hostile bytes (fuzzed)."""

from __future__ import annotations

import base64

import h2.config
import h2.connection
import h2.events
import pytest
from hyperframe.frame import GoAwayFrame, HeadersFrame
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from remora.proxy.http.h2codec import (
    CANCEL,
    CONNECTION_TERMINATED,
    DEFAULT_STREAM_WINDOW,
    REFUSED_STREAM,
    SWITCHING_PROTOCOLS_H2C,
    H2ClientCodec,
    H2ServerCodec,
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
    StreamReset,
    Writable,
)

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
MiB = 1024 * 1024


class Pair:
    """A client codec and a server codec joined by two in-memory pipes."""

    def __init__(self, client: H2ClientCodec | None = None,
                 server: H2ServerCodec | None = None) -> None:
        self.c = client or H2ClientCodec()
        self.s = server or H2ServerCodec()
        self.sev: list[Event] = []      # events the server saw
        self.cev: list[Event] = []      # events the client saw
        self.c2s = 0                    # bytes moved client → server
        self.s2c = 0
        self.pump()

    def pump(self, rounds: int = 1000) -> tuple[list[Event], list[Event]]:
        """Move bytes both ways until both sides are quiet; the new events of each side."""
        sev: list[Event] = []
        cev: list[Event] = []
        for _ in range(rounds):
            a = self.c.data_to_send()
            b = self.s.data_to_send()
            if not a and not b:
                break
            if a:
                self.c2s += len(a)
                sev += self.s.receive(a)
            if b:
                self.s2c += len(b)
                cev += self.c.receive(b)
        self.sev += sev
        self.cev += cev
        return sev, cev

    def request(self, method: str = "GET", path: str = "/", *, end: bool = True,
                headers: list[tuple[str, str]] | None = None,
                authority: str = "svc.ns:8080") -> int:
        sid = self.c.new_stream()
        self.c.send_headers(sid, RequestHead(method, path, authority,
                                             headers=HeaderMap(headers or [])), end)
        return sid


def of(events: list[Event], kind: type, stream: int | None = None) -> list:  # type: ignore[type-arg]
    return [e for e in events if isinstance(e, kind) and (stream is None
                                                          or getattr(e, "stream", None) == stream)]


def body_of(events: list[Event], stream: int) -> bytes:
    return b"".join(e.data for e in of(events, Body, stream))


# --------------------------------------------------------------------------------------------
# round trips


def test_get_round_trip_maps_pseudo_headers() -> None:
    p = Pair()
    sid = p.request("GET", "/a/b?q=1", headers=[
        ("x-request-id", "r1"), ("te", "trailers"), ("connection", "keep-alive"),
        ("keep-alive", "timeout=5"), ("transfer-encoding", "chunked"), ("upgrade", "foo"),
        ("proxy-connection", "x"), ("host", "ignored.example"), ("user-agent", "t/1")])
    assert sid == 1
    sev, _ = p.pump()
    (req,) = sev
    assert isinstance(req, RequestHeaders)
    assert req.stream == 1 and req.end_stream and req.upgrade == ""
    h = req.head
    assert (h.method, h.path, h.authority, h.scheme, h.protocol) == (
        "GET", "/a/b?q=1", "svc.ns:8080", "http", "HTTP/2")
    # connection-specific fields and Host are not HTTP/2 fields; te: trailers is
    assert h.headers.items() == [("x-request-id", "r1"), ("te", "trailers"),
                                 ("user-agent", "t/1")]
    assert p.s.active_streams == 1

    p.s.send_headers(1, ResponseHead(200, HeaderMap([("content-type", "text/plain"),
                                                     ("connection", "close")])), False)
    p.s.send_body(1, b"hello ")
    p.s.send_body(1, b"world")
    p.s.send_end(1)
    _, cev = p.pump()
    resp = cev[0]
    assert isinstance(resp, ResponseHeaders) and not resp.end_stream
    assert resp.head.status == 200 and resp.head.protocol == "HTTP/2"
    assert resp.head.headers.items() == [("content-type", "text/plain")]
    assert body_of(cev, 1) == b"hello world"
    assert cev[-1] == EndStream(1, None)
    assert p.c.active_streams == 0 and p.s.active_streams == 0
    assert p.c.can_open and p.c.reusable and p.s.keep_alive
    assert p.c.protocol == p.s.protocol == "HTTP/2"


def test_headers_only_response_has_no_end_stream_event() -> None:
    p = Pair()
    sid = p.request()
    p.pump()
    p.s.send_headers(sid, ResponseHead(204), True)
    _, cev = p.pump()
    assert cev == [ResponseHeaders(sid, ResponseHead(204, protocol="HTTP/2"), True)]
    assert p.c.active_streams == 0


def raw_client() -> h2.connection.H2Connection:
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True,
                                                                header_encoding=None))
    conn.initiate_connection()
    return conn


def test_host_header_becomes_authority() -> None:
    s = H2ServerCodec()
    c = raw_client()
    c.send_headers(1, [(b":method", b"GET"), (b":scheme", b"https"), (b":path", b"/"),
                       (b"host", b"h.example"), (b"cookie", b"a=1"), (b"cookie", b"b=2")],
                   end_stream=True)
    (req,) = s.receive(c.data_to_send())
    assert isinstance(req, RequestHeaders)
    assert req.head.authority == "h.example" and req.head.scheme == "https"
    assert "host" not in req.head.headers
    assert req.head.headers.get("cookie") == "a=1; b=2"     # crumbs joined (RFC 9113 §8.2.3)


def test_grpc_shaped_exchange_with_trailers_both_ways() -> None:
    p = Pair()
    msg = b"\x00\x00\x00\x00\x05hello"
    sid = p.request("POST", "/pkg.Svc/Method", end=False, headers=[
        ("content-type", "application/grpc"), ("te", "trailers"), ("grpc-timeout", "1S")])
    p.c.send_body(sid, msg)
    p.c.send_end(sid, HeaderMap([("x-client-trailer", "yes")]))
    sev, _ = p.pump()
    req = sev[0]
    assert isinstance(req, RequestHeaders) and not req.end_stream
    assert req.head.method == "POST" and req.head.headers.get("te") == "trailers"
    assert req.head.headers.get("content-type") == "application/grpc"
    assert body_of(sev, sid) == msg
    assert sev[-1] == EndStream(sid, HeaderMap([("x-client-trailer", "yes")]))
    p.s.consumed(sid, len(msg))

    p.s.send_headers(sid, ResponseHead(200, HeaderMap([("content-type", "application/grpc")])),
                     False)
    p.s.send_body(sid, msg)
    p.s.send_end(sid, HeaderMap([("grpc-status", "0"), ("grpc-message", "")]))
    _, cev = p.pump()
    assert isinstance(cev[0], ResponseHeaders) and cev[0].head.status == 200
    assert body_of(cev, sid) == msg
    end = cev[-1]
    assert isinstance(end, EndStream) and end.trailers is not None
    assert end.trailers.get("grpc-status") == "0"
    assert p.c.active_streams == 0 and p.s.active_streams == 0


def test_grpc_trailers_only_response() -> None:
    p = Pair()
    sid = p.request("POST", "/pkg.Svc/M", end=True,
                    headers=[("content-type", "application/grpc"), ("te", "trailers")])
    p.pump()
    p.s.send_headers(sid, ResponseHead(200, HeaderMap([("grpc-status", "14")])), True)
    _, cev = p.pump()
    (resp,) = cev
    assert isinstance(resp, ResponseHeaders) and resp.end_stream
    assert resp.head.headers.get("grpc-status") == "14"


def test_expect_continue_and_informational() -> None:
    p = Pair()
    sid = p.request("PUT", "/up", end=False, headers=[("expect", "100-continue")])
    sev, _ = p.pump()
    assert sev[0].expect_continue  # type: ignore[union-attr]
    p.s.send_informational(sid, ResponseHead(100))
    _, cev = p.pump()
    assert cev == [Informational(sid, ResponseHead(100, protocol="HTTP/2"))]
    with pytest.raises(ValueError):
        p.s.send_informational(sid, ResponseHead(101))


def test_many_concurrent_streams_interleaved() -> None:
    p = Pair()
    sids = [p.request("POST", f"/{i}", end=False) for i in range(64)]
    assert sids == list(range(1, 128, 2))
    assert p.c.active_streams == 64
    for round_ in range(3):
        for i, sid in enumerate(sids):
            p.c.send_body(sid, f"{i}:{round_};".encode())
    for sid in sids:
        p.c.send_end(sid)
    sev, _ = p.pump()
    assert len(of(sev, RequestHeaders)) == 64
    for i, sid in enumerate(sids):
        assert body_of(sev, sid) == f"{i}:0;{i}:1;{i}:2;".encode()
        assert of(sev, EndStream, sid) == [EndStream(sid)]
    for sid in reversed(sids):
        p.s.send_headers(sid, ResponseHead(200), False)
        p.s.send_body(sid, str(sid).encode())
        p.s.send_end(sid)
    _, cev = p.pump()
    for sid in sids:
        assert body_of(cev, sid) == str(sid).encode()
    assert p.c.active_streams == 0 and p.s.active_streams == 0


# --------------------------------------------------------------------------------------------
# flow control


def test_upload_stalls_at_the_window_until_consumed() -> None:
    p = Pair()
    sid = p.request("POST", "/big", end=False)
    p.pump()
    payload = bytes(range(256)) * (4 * 1024)          # 1 MiB
    p.c.send_body(sid, payload)
    p.c.send_end(sid)                                  # queued behind the data
    sev, _ = p.pump()
    got = body_of(sev, sid)
    assert len(got) == DEFAULT_STREAM_WINDOW           # the stream window, not a byte more
    assert p.c.buffered(sid) == len(payload) - DEFAULT_STREAM_WINDOW
    assert not of(sev, EndStream)
    # nothing moves while the receiver does not consume
    before = p.c2s
    sev, cev = p.pump()
    assert sev == [] and cev == [] and p.c2s == before

    received = bytearray(got)
    writable = []
    while len(received) < len(payload):
        p.s.consumed(sid, len(got))
        sev, cev = p.pump()
        got = body_of(sev, sid)
        assert got, "consumed() must reopen the window"
        received += got
        writable += of(cev, Writable)
    assert bytes(received) == payload
    assert p.c.buffered(sid) == 0
    assert of(p.sev, EndStream, sid) == [EndStream(sid)]   # END_STREAM after the last byte
    # the end was queued: the source has nothing more to resume, so no Writable then
    assert writable == []


def test_writable_when_held_back_data_drains() -> None:
    p = Pair()
    sid = p.request("POST", "/", end=False)
    p.pump()
    p.c.send_body(sid, b"x" * (DEFAULT_STREAM_WINDOW + 1000))
    sev, _ = p.pump()
    assert p.c.buffered(sid) == 1000
    p.s.consumed(sid, len(body_of(sev, sid)))
    sev, cev = p.pump()
    assert of(cev, Writable) == [Writable(sid)]
    assert p.c.buffered(sid) == 0 and len(body_of(sev, sid)) == 1000


def test_download_stalls_until_client_consumes() -> None:
    p = Pair()
    sid = p.request()
    p.pump()
    p.s.send_headers(sid, ResponseHead(200), False)
    p.s.send_body(sid, b"d" * MiB)
    _, cev = p.pump()
    assert len(body_of(cev, sid)) == DEFAULT_STREAM_WINDOW
    assert p.s.buffered(sid) == MiB - DEFAULT_STREAM_WINDOW
    total, got = DEFAULT_STREAM_WINDOW, DEFAULT_STREAM_WINDOW
    while total < MiB:
        p.c.consumed(sid, got)
        _, cev = p.pump()
        got = len(body_of(cev, sid))
        assert 0 < got <= DEFAULT_STREAM_WINDOW
        total += got
    assert total == MiB and p.s.buffered(sid) == 0
    assert of(p.sev, Writable) == [Writable(sid)]     # at the sender, once its queue drained


def test_streaming_transfer_with_backpressure_stays_bounded() -> None:
    """A proxy-shaped loop: the sender pauses while anything is buffered and resumes on
    Writable; the receiver consumes what it got. The queue never holds more than one write."""
    p = Pair()
    sid = p.request("POST", "/stream", end=False)
    p.pump()
    chunk = b"z" * 65536
    total, sent, received, max_buffered = 8 * MiB, 0, 0, 0
    paused = False
    while received < total:
        while not paused and sent < total:
            p.c.send_body(sid, chunk)
            sent += len(chunk)
            max_buffered = max(max_buffered, p.c.buffered(sid))
            paused = p.c.buffered(sid) > 0
        if sent >= total and not of(p.sev, EndStream):
            p.c.send_end(sid)
        sev, cev = p.pump(rounds=1)
        n = len(body_of(sev, sid))
        received += n
        if n:
            p.s.consumed(sid, n)
        if of(cev, Writable):
            paused = False
    assert received == total
    assert max_buffered <= len(chunk)


def test_connection_window_is_shared_and_returned_for_reset_streams() -> None:
    # small windows make the connection window the limit
    p = Pair(server=H2ServerCodec(stream_window=65535, connection_window=100_000))
    a = p.request("POST", "/a", end=False)
    b = p.request("POST", "/b", end=False)
    p.pump()
    p.c.send_body(a, b"a" * 65535)
    p.c.send_body(b, b"b" * 65535)
    sev, _ = p.pump()
    assert len(body_of(sev, a)) + len(body_of(sev, b)) == 100_000
    # the server resets a without consuming it: its bytes go back to the connection window
    got_a = len(body_of(sev, a))
    p.s.reset(a)
    p.s.consumed(a, got_a)                       # late: ignored, not counted twice
    sev, cev = p.pump()
    assert of(cev, StreamReset) == [StreamReset(a, CANCEL, remote=True)]
    assert p.c.buffered(b) == 0 and len(body_of(p.sev, b)) == 65535


def test_padding_is_given_back_by_the_codec() -> None:
    s = H2ServerCodec(stream_window=65535, connection_window=65535)
    c = raw_client()
    c.send_headers(1, [(b":method", b"POST"), (b":scheme", b"http"), (b":path", b"/"),
                       (b":authority", b"x")])
    for _ in range(30):                 # 30 × (1000 + 201) flow-controlled bytes > half a window
        c.send_data(1, b"p" * 1000, pad_length=200)
    evs = s.receive(c.data_to_send())
    assert body_of(evs, 1) == b"p" * 30000
    s.consumed(1, 30000)
    c.receive_data(s.data_to_send())
    # h2 acknowledges in batches (half a window): everything came back, padding included
    assert c.local_flow_control_window(1) == 65535


# --------------------------------------------------------------------------------------------
# resets


def test_client_reset_reaches_server_and_later_frames_are_dropped() -> None:
    p = Pair()
    sid = p.request("POST", "/", end=False)
    p.c.send_body(sid, b"abc")
    p.pump()
    p.c.reset(sid)
    assert p.c.active_streams == 0
    sev, _ = p.pump()
    assert sev == [StreamReset(sid, CANCEL, remote=True)]
    assert p.s.active_streams == 0
    # the server's response crossed the reset: nothing reaches the client
    p.s.send_headers(sid, ResponseHead(200), False)
    p.s.send_body(sid, b"late")
    p.pump()
    assert not of(p.cev, ResponseHeaders) and not of(p.cev, Body)
    # the connection is still fine
    sid2 = p.request()
    sev, _ = p.pump()
    assert of(sev, RequestHeaders)[0].stream == sid2


def test_server_reset_reaches_client_and_drops_queued_data() -> None:
    p = Pair()
    sid = p.request("POST", "/", end=False)
    p.pump()
    p.c.send_body(sid, b"q" * (DEFAULT_STREAM_WINDOW + 10))
    p.pump()
    assert p.c.buffered(sid) == 10
    p.s.reset(sid, REFUSED_STREAM)
    _, cev = p.pump()
    assert cev == [StreamReset(sid, REFUSED_STREAM, remote=True)]
    assert p.c.buffered(sid) == 0 and p.c.active_streams == 0
    p.c.send_body(sid, b"after")                      # a race the caller may lose: no-op
    p.c.send_end(sid)
    assert p.pump() == ([], [])


def test_early_response_while_request_body_still_sent() -> None:
    p = Pair()
    sid = p.request("POST", "/", end=False)
    p.c.send_body(sid, b"part1")
    p.pump()
    p.s.send_headers(sid, ResponseHead(413), True)      # answered before the body ended
    _, cev = p.pump()
    assert of(cev, ResponseHeaders)[0].end_stream
    assert p.c.active_streams == 1                       # our side still open (half-closed)
    p.c.send_body(sid, b"part2")
    p.c.send_end(sid)
    sev, _ = p.pump()
    assert body_of(sev, sid) == b"part2" and of(sev, EndStream)
    assert p.c.active_streams == 0 and p.s.active_streams == 0


# --------------------------------------------------------------------------------------------
# the connection's end


def test_server_goaway_lets_streams_in_flight_finish_and_refuses_later_ones() -> None:
    p = Pair()
    s1 = p.request("POST", "/", end=False)
    p.pump()
    p.s.close()
    assert not p.s.keep_alive
    s3 = p.request()                                    # crosses the GOAWAY on the wire
    sev, cev = p.pump()
    assert not of(sev, RequestHeaders)                  # refused, never reported
    assert cev[0] == ConnectionClosed(last_stream=1, error_code=0)
    assert StreamReset(s3, REFUSED_STREAM, remote=True) in cev
    assert not p.c.can_open and not p.c.reusable
    # stream 1 still completes in both directions (graceful drain)
    p.c.send_body(s1, b"tail")
    p.c.send_end(s1)
    sev, _ = p.pump()
    assert body_of(sev, s1) == b"tail" and of(sev, EndStream, s1)
    p.s.send_headers(s1, ResponseHead(200), False)
    p.s.send_body(s1, b"ok")
    p.s.send_end(s1)
    _, cev = p.pump()
    assert body_of(cev, s1) == b"ok" and of(cev, EndStream, s1)
    assert p.s.active_streams == 0 and p.c.active_streams == 0


def test_client_goaway_is_connection_closed_at_server() -> None:
    p = Pair()
    sid = p.request()
    p.pump()
    p.c.close()
    sev, _ = p.pump()
    assert sev == [ConnectionClosed(last_stream=0, error_code=0)]
    assert not p.s.keep_alive and p.s.active_streams == 1
    p.s.send_headers(sid, ResponseHead(200), True)      # the request in flight still answered
    _, cev = p.pump()
    assert of(cev, ResponseHeaders)


def test_goaway_split_across_reads() -> None:
    p = Pair()
    sid = p.request()
    p.pump()
    p.s.send_headers(sid, ResponseHead(200), False)
    p.s.send_body(sid, b"0123456789")
    p.s.close()
    p.s.send_end(sid)
    data = p.s.data_to_send()
    cev: list[Event] = []
    for i in range(len(data)):                          # one byte at a time
        cev += p.c.receive(data[i:i + 1])
    assert [type(e) for e in cev] == [ResponseHeaders, Body, ConnectionClosed, EndStream]
    assert body_of(cev, sid) == b"0123456789"
    assert of(cev, ConnectionClosed) == [ConnectionClosed(sid, 0)]


def test_eof_resets_unfinished_streams() -> None:
    p = Pair()
    a = p.request()
    b = p.request("POST", "/", end=False)
    p.pump()
    p.s.send_headers(a, ResponseHead(200), True)
    p.pump()
    assert p.c.receive(b"") == [ConnectionClosed(last_stream=b, error_code=0),
                                StreamReset(b, CONNECTION_TERMINATED, remote=True)]
    assert not p.c.can_open and p.c.active_streams == 0
    assert p.c.receive(b"more") == []
    assert p.s.receive(b"") == [ConnectionClosed(last_stream=b, error_code=0),
                                StreamReset(b, CONNECTION_TERMINATED, remote=True)]


def test_garbage_is_a_protocol_error_with_goaway() -> None:
    s = H2ServerCodec()
    s.data_to_send()
    evs = s.receive(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert len(evs) == 1 and isinstance(evs[0], ProtocolError)
    assert evs[0].status == 0 and evs[0].details.startswith("http2.")
    out = s.data_to_send()
    assert out[3] == GoAwayFrame.type
    assert not s.keep_alive
    assert s.receive(PREFACE) == []


def test_protocol_error_resets_streams_in_flight() -> None:
    p = Pair()
    sid = p.request("POST", "/", end=False)
    p.pump()
    bad = HeadersFrame(2, data=b"\xff\xff\xff", flags=["END_HEADERS"]).serialize()  # even id
    evs = p.s.receive(bad)
    assert isinstance(evs[0], ProtocolError)
    assert evs[1:] == [StreamReset(sid, 1, remote=False)]
    p.pump()
    assert of(p.cev, ConnectionClosed)[0].error_code != 0


def test_goaway_inside_a_header_block_is_a_protocol_error() -> None:
    s = H2ServerCodec()
    c = raw_client()
    s.receive(c.data_to_send())
    head = HeadersFrame(1, data=b"\x82", flags=[]).serialize()       # no END_HEADERS
    goaway = GoAwayFrame(0, last_stream_id=0).serialize()
    evs = s.receive(head + goaway)
    assert [type(e) for e in evs] == [ProtocolError]


def test_ping_priority_and_settings_are_handled_quietly() -> None:
    s = H2ServerCodec()
    c = raw_client()
    c.ping(b"12345678")
    c.prioritize(1, weight=32)
    c.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 1000})
    assert s.receive(c.data_to_send()) == []
    acks = c.receive_data(s.data_to_send())
    assert any(isinstance(e, h2.events.PingAckReceived) for e in acks)


def test_can_open_respects_max_concurrent_streams() -> None:
    p = Pair(server=H2ServerCodec(max_concurrent_streams=2))
    assert p.c.can_open
    a = p.request()
    b = p.request()
    assert not p.c.can_open
    p.pump()
    p.s.send_headers(a, ResponseHead(200), True)
    p.pump()
    assert p.c.can_open
    p.request()
    assert not p.c.can_open
    assert b


# --------------------------------------------------------------------------------------------
# h2c upgrade


def upgrade_client() -> tuple[h2.connection.H2Connection, str]:
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True,
                                                                header_encoding=None))
    header = conn.initiate_upgrade_connection()
    assert header is not None
    return conn, header.decode()


@pytest.mark.parametrize("strip_padding", [False, True])
def test_h2c_upgrade(strip_padding: bool) -> None:
    client, header = upgrade_client()
    if strip_padding:
        header = header.rstrip("=")                      # as curl sends it (token68)
    head = RequestHead("GET", "/up", "h.example", headers=HeaderMap([
        ("connection", "Upgrade, HTTP2-Settings"), ("upgrade", "h2c"),
        ("http2-settings", header), ("accept", "*/*")]))
    s = H2ServerCodec.from_upgrade(header, head, end_stream=True)
    (req,) = s.initial_events()
    assert isinstance(req, RequestHeaders) and req.stream == 1 and req.end_stream
    assert req.head.protocol == "HTTP/2" and req.head.authority == "h.example"
    assert req.head.headers.items() == [("accept", "*/*")]
    assert head.protocol == "HTTP/1.1"                   # the caller's head is not changed
    # the wire: 101 in HTTP/1.1, then our SETTINGS, then the response on stream 1
    wire = SWITCHING_PROTOCOLS_H2C + s.data_to_send()
    assert wire.startswith(b"HTTP/1.1 101 ")
    preface = client.data_to_send()                      # the client's preface after the 101
    assert s.receive(preface) == []
    s.send_headers(1, ResponseHead(200), False)
    s.send_body(1, b"upgraded")
    s.send_end(1)
    evs = client.receive_data(wire[len(SWITCHING_PROTOCOLS_H2C):] + s.data_to_send())
    kinds = {type(e) for e in evs}
    assert h2.events.ResponseReceived in kinds and h2.events.StreamEnded in kinds
    assert b"".join(e.data for e in evs if isinstance(e, h2.events.DataReceived)) == b"upgraded"
    assert s.active_streams == 0
    # later streams are ordinary
    client.send_headers(3, [(b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/2"),
                            (b":authority", b"h.example")], end_stream=True)
    (req3,) = s.receive(client.data_to_send())
    assert isinstance(req3, RequestHeaders) and req3.stream == 3


def test_h2c_upgrade_with_body_events_come_with_first_receive() -> None:
    client, header = upgrade_client()
    head = RequestHead("POST", "/form", "h.example")
    s = H2ServerCodec.from_upgrade(header, head, end_stream=False, body=b"a=1")
    evs = s.receive(client.data_to_send())
    assert [type(e) for e in evs] == [RequestHeaders, Body, EndStream]
    assert not evs[0].end_stream and evs[1] == Body(1, b"a=1")  # type: ignore[union-attr]
    s.consumed(1, 3)                                     # harmless: not flow-controlled
    assert s.initial_events() == []


TOO_BIG_WINDOW = base64.urlsafe_b64encode(bytes.fromhex("000300000064" "000480000000")).decode()


@pytest.mark.parametrize("bad", ["!!!", "AAAA", TOO_BIG_WINDOW])
def test_h2c_upgrade_rejects_bad_settings(bad: str) -> None:
    # "AAAA": 3 bytes, not a whole setting; then INITIAL_WINDOW_SIZE above 2^31-1 (§6.5.2)
    with pytest.raises(ValueError):
        H2ServerCodec.from_upgrade(bad, RequestHead("GET", "/"), True)


# --------------------------------------------------------------------------------------------
# hostile bytes


def _valid_client_start() -> bytes:
    return raw_client().data_to_send()


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(junk=st.binary(max_size=300), cut=st.integers(min_value=1, max_value=64))
def test_fuzz_server_never_raises(junk: bytes, cut: int) -> None:
    s = H2ServerCodec()
    data = _valid_client_start() + junk
    for i in range(0, len(data), cut):
        evs = s.receive(data[i:i + cut])
        assert all(not isinstance(e, RequestHeaders) or e.stream % 2 == 1 for e in evs)
    s.receive(b"")
    s.data_to_send()


def _frame(ftype: int, flags: int, sid: int, payload: bytes) -> bytes:
    return len(payload).to_bytes(3, "big") + bytes([ftype, flags]) + sid.to_bytes(4, "big") \
        + payload


frames = st.builds(_frame, st.integers(0, 10), st.integers(0, 255),
                   st.sampled_from([0, 1, 2, 3, 5]), st.binary(max_size=40))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seq=st.lists(frames, max_size=8))
def test_fuzz_frames_never_raise(seq: list[bytes]) -> None:
    # well-framed but arbitrary frames reach deeper than random bytes: both sides
    p = Pair()
    sid = p.request("POST", "/", end=False)
    p.pump()
    p.c.send_body(sid, b"x" * 10)
    blob = b"".join(seq)
    p.s.receive(blob)
    p.c.receive(blob)
    p.pump()
    p.s.receive(b"")
    p.c.receive(b"")


def test_dropping_a_finished_response_gives_its_window_back() -> None:
    # a pooled upstream connection must not shrink when a response body is thrown away
    p = Pair(server=H2ServerCodec(stream_window=65535, connection_window=65535),
             client=H2ClientCodec(stream_window=65535, connection_window=65535))
    for _ in range(3):
        sid = p.request()
        p.pump()
        p.s.send_headers(sid, ResponseHead(200), False)
        p.s.send_body(sid, b"r" * 40000)
        p.s.send_end(sid)
        _, cev = p.pump()
        assert len(body_of(cev, sid)) == 40000 and of(cev, EndStream, sid)
        assert p.c.active_streams == 0
        p.c.reset(sid)                       # nothing consumed: drop it all
        p.pump()
    assert p.s.buffered(sid) == 0
