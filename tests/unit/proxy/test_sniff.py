"""tls_inspector / http_inspector decisions on real ClientHellos (made by Python's ``ssl``),
hand-built edge cases, HTTP request lines, and fuzzing (never raises, decisions are stable)."""

from __future__ import annotations

import os
import ssl
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from remora.proxy.sniff import (
    H2C_PREFACE,
    HTTP_MAX_INSPECT_SIZE,
    TLS_MAX_CLIENT_HELLO,
    NeedMore,
    NotTls,
    SniffResult,
    TlsResult,
    http_protocol,
    sniff,
    tls_client_hello,
)

# --------------------------------------------------------------------------------------------
# ClientHellos from a real TLS stack


def real_hello(server_hostname: str | None = None, alpn: list[str] | None = None,
               maximum: ssl.TLSVersion | None = None,
               minimum: ssl.TLSVersion | None = None) -> bytes:
    """The bytes Python's TLS client sends first (run until it wants to read)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    if alpn:
        ctx.set_alpn_protocols(alpn)
    if maximum is not None:
        ctx.maximum_version = maximum
    if minimum is not None:
        ctx.minimum_version = minimum
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing, server_hostname=server_hostname)
    with pytest.raises(ssl.SSLWantReadError):
        obj.do_handshake()
    data = outgoing.read()
    assert data[0] == 22
    return data


HELLO_SNI_ALPN = real_hello("reviews.default.svc.cluster.local", ["h2", "http/1.1"])
HELLO_NO_SNI = real_hello()
HELLO_TLS12 = real_hello("api.example.com", ["http/1.1"], maximum=ssl.TLSVersion.TLSv1_2)
HELLO_TLS13 = real_hello("outbound_.9080_._.reviews.default.svc.cluster.local",
                         ["istio-peer-exchange", "istio-http/1.1", "istio", "http/1.1"],
                         minimum=ssl.TLSVersion.TLSv1_3)
HELLO_IP = real_hello("10.1.2.3", ["h2"])    # clients send no SNI for an IP literal

REAL = {
    "sni+alpn": (HELLO_SNI_ALPN, "reviews.default.svc.cluster.local", ("h2", "http/1.1")),
    "no sni": (HELLO_NO_SNI, "", ()),
    "tls1.2 only": (HELLO_TLS12, "api.example.com", ("http/1.1",)),
    "tls1.3 only": (HELLO_TLS13, "outbound_.9080_._.reviews.default.svc.cluster.local",
                    ("istio-peer-exchange", "istio-http/1.1", "istio", "http/1.1")),
    "ip literal": (HELLO_IP, "", ("h2",)),
}


@pytest.mark.parametrize("name", list(REAL))
def test_real_client_hello(name: str) -> None:
    data, sni, alpn = REAL[name]
    assert tls_client_hello(data) == TlsResult(server_name=sni, alpn=alpn, hello_bytes=len(data))
    assert sniff(data, want_tls=True, want_http=True) == SniffResult("tls", sni, alpn)


@pytest.mark.parametrize("name", list(REAL))
def test_every_prefix_needs_more(name: str) -> None:
    data, _, _ = REAL[name]
    for cut in range(len(data)):
        assert tls_client_hello(data[:cut]) == NeedMore(), cut
        assert sniff(data[:cut], want_tls=True, want_http=True) is None, cut


def test_bytes_after_the_hello_do_not_matter() -> None:
    data = HELLO_SNI_ALPN + b"\x14\x03\x03\x00\x01\x01" + os.urandom(100)
    assert tls_client_hello(data) == tls_client_hello(HELLO_SNI_ALPN)


# --------------------------------------------------------------------------------------------
# Hand-built ClientHellos


def u8(b: bytes) -> bytes:
    return bytes([len(b)]) + b


def u16(b: bytes) -> bytes:
    return struct.pack("!H", len(b)) + b


def ext(ext_type: int, body: bytes) -> bytes:
    return struct.pack("!H", ext_type) + u16(body)


def sni_ext(*names: bytes, name_type: int = 0) -> bytes:
    return ext(0, u16(b"".join(bytes([name_type]) + u16(n) for n in names)))


def alpn_ext(*protos: bytes) -> bytes:
    return ext(16, u16(b"".join(u8(p) for p in protos)))


def hello_body(*extensions: bytes, version: int = 0x0303, session_id: bytes = b"\x11" * 32,
               suites: bytes = b"\x13\x01\x00\x2f", compression: bytes = b"\x00",
               with_ext_block: bool = True, trailer: bytes = b"") -> bytes:
    out = struct.pack("!H", version) + b"\x42" * 32 + u8(session_id) + u16(suites)
    out += u8(compression)
    if with_ext_block:
        out += u16(b"".join(extensions))
    return out + trailer


def handshake(body: bytes, msg_type: int = 1) -> bytes:
    return bytes([msg_type]) + struct.pack("!I", len(body))[1:] + body


def records(message: bytes, size: int = 16384, version: bytes = b"\x03\x01",
            content_type: int = 22) -> bytes:
    out = b""
    for i in range(0, len(message), size):
        chunk = message[i:i + size]
        out += bytes([content_type]) + version + u16(chunk)
    return out


def client_hello(*extensions: bytes, **kw: object) -> bytes:
    return records(handshake(hello_body(*extensions, **kw)))  # type: ignore[arg-type]


def test_sni_is_lower_cased() -> None:
    data = client_hello(sni_ext(b"Reviews.Default.SVC"), alpn_ext(b"h2"))
    assert tls_client_hello(data) == TlsResult("reviews.default.svc", ("h2",), len(data))


def test_alpn_keeps_offered_order() -> None:
    data = client_hello(alpn_ext(b"http/1.1", b"h2", b"istio"))
    result = tls_client_hello(data)
    assert isinstance(result, TlsResult)
    assert result.alpn == ("http/1.1", "h2", "istio")
    assert result.server_name == ""


def test_hello_without_extensions_block() -> None:
    data = client_hello(with_ext_block=False)
    assert tls_client_hello(data) == TlsResult("", (), len(data))


def test_hello_split_over_many_records_and_every_boundary() -> None:
    message = handshake(hello_body(sni_ext(b"a.example"), alpn_ext(b"h2", b"http/1.1")))
    for size in (1, 3, 7, 64):
        data = records(message, size=size)
        assert tls_client_hello(data) == TlsResult("a.example", ("h2", "http/1.1"), len(data))
        for cut in range(len(data)):
            assert tls_client_hello(data[:cut]) == NeedMore(), (size, cut)


def test_empty_records_are_tolerated_up_to_a_limit() -> None:
    data = client_hello(sni_ext(b"x.y"))
    empty = b"\x16\x03\x01\x00\x00"
    assert tls_client_hello(empty * 3 + data) == TlsResult("x.y", (), 15 + len(data))
    assert isinstance(tls_client_hello(empty * 33 + data), NotTls)


def test_hello_ending_mid_record_needs_the_whole_record() -> None:
    message = handshake(hello_body(sni_ext(b"x.y")))
    data = records(message + b"\x00" * 10)   # trailing bytes of a next message, same record
    assert tls_client_hello(data[:-1]) == NeedMore()
    assert tls_client_hello(data) == TlsResult("x.y", (), len(data))


@pytest.mark.parametrize("data", [
    pytest.param(b"\x17\x03\x03\x00\x10" + b"\x00" * 16, id="application-data record"),
    pytest.param(b"\x15\x03\x01\x00\x02\x02\x28", id="alert record"),
    pytest.param(b"\x16\x02\x00", id="record version 2.x"),
    pytest.param(b"\x16\x03\x01\x40\x01", id="record longer than 2^14"),
    pytest.param(records(handshake(b"\x00" * 40, msg_type=2)), id="ServerHello"),
    pytest.param(b"\x16\x03\x01\x00\x04\x01\x00\x40\x01", id="hello body longer than 16384"),
    pytest.param(b"\x80\x2e\x01\x03\x01", id="SSLv2 ClientHello"),
    pytest.param(b"GET / HTTP/1.1\r\n\r\n", id="http"),
    pytest.param(b"SSH-2.0-OpenSSH_9.6\r\n", id="ssh"),
])
def test_not_tls(data: bytes) -> None:
    assert isinstance(tls_client_hello(data), NotTls)


@pytest.mark.parametrize("data", [
    pytest.param(client_hello(session_id=b"\x00" * 33), id="session id > 32"),
    pytest.param(client_hello(suites=b""), id="no cipher suites"),
    pytest.param(client_hello(suites=b"\x13\x01\x00"), id="odd cipher suites"),
    pytest.param(client_hello(compression=b""), id="no compression methods"),
    pytest.param(client_hello(trailer=b"\x00"), id="bytes after extensions"),
    pytest.param(records(handshake(hello_body()[:-1] + b"\x05")), id="extensions overrun"),
    pytest.param(client_hello(sni_ext(b"a"), sni_ext(b"b")), id="duplicate extension"),
    pytest.param(client_hello(sni_ext(b"a", b"b")), id="two server names"),
    pytest.param(client_hello(sni_ext(b"a", name_type=1)), id="name type not host_name"),
    pytest.param(client_hello(sni_ext(b"")), id="empty host name"),
    pytest.param(client_hello(sni_ext(b"a\x00b")), id="NUL in host name"),
    pytest.param(client_hello(sni_ext(b"a" * 256)), id="host name > 255"),
    pytest.param(client_hello(ext(0, b"")), id="empty server_name extension"),
    pytest.param(client_hello(ext(16, u16(b""))), id="empty ALPN list"),
    pytest.param(client_hello(alpn_ext(b"h2", b"")), id="empty ALPN name"),
    pytest.param(client_hello(ext(16, u16(b"\x05h2"))), id="ALPN name overrun"),
    pytest.param(client_hello(version=0x0300), id="SSL 3.0 only"),
    pytest.param(client_hello(ext(43, u8(b"\x03\x00\x7f\x7f"))), id="no TLS in supported_versions"),
    pytest.param(client_hello(ext(43, u8(b"\x03"))), id="odd supported_versions"),
])
def test_malformed_client_hello(data: bytes) -> None:
    result = tls_client_hello(data)
    assert isinstance(result, NotTls)
    assert result.reason.startswith("malformed ClientHello")


def test_supported_versions_decides_over_legacy_version() -> None:
    data = client_hello(ext(43, u8(b"\x0a\x0a\x03\x04")), version=0x0300)
    assert tls_client_hello(data) == TlsResult("", (), len(data))


def test_read_limit() -> None:
    # A 16 KiB hello cut into 1-byte records needs ~98 KiB on the wire: past the 64 KiB limit.
    message = handshake(hello_body(ext(21, b"\x00" * 16000)))
    data = records(message, size=1)
    assert len(data) > TLS_MAX_CLIENT_HELLO
    for cut in (100, TLS_MAX_CLIENT_HELLO - 1):
        assert tls_client_hello(data[:cut]) == NeedMore()
    assert isinstance(tls_client_hello(data[:TLS_MAX_CLIENT_HELLO]), NotTls)
    assert isinstance(tls_client_hello(data), NotTls)
    # The same hello in 3-byte records (~27 KiB) is fine.
    data3 = records(message, size=3)
    assert tls_client_hello(data3) == TlsResult("", (), len(data3))


# --------------------------------------------------------------------------------------------
# http_inspector


@pytest.mark.parametrize(("data", "expected"), [
    (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", "http/1.1"),
    (b"GET /index.html HTTP/1.0\r\n\r\n", "http/1.0"),
    (b"POST /api?x=1 HTTP/1.1\r\n", "http/1.1"),
    (b"CONNECT example.com:443 HTTP/1.1\r\n", "http/1.1"),
    (b"OPTIONS * HTTP/1.1\r\n", "http/1.1"),
    (b"VERSION-CONTROL /a HTTP/1.1\r\n", "http/1.1"),
    (b"PROPFIND /dav HTTP/1.1\r\n", "http/1.1"),
    (b"GET / HTTP/1.1\n", "http/1.1"),             # bare LF ends the line too
    (b"GET / HTTP/1.1\r", "http/1.1"),             # the CR alone is enough to decide
    (H2C_PREFACE, "h2c"),
    (H2C_PREFACE + b"\x00\x00\x12\x04\x00", "h2c"),
])
def test_http_detected(data: bytes, expected: str) -> None:
    assert http_protocol(data) == expected
    assert sniff(data, want_tls=False, want_http=True) == SniffResult("raw_buffer", "",
                                                                      (expected,))
    assert sniff(data, want_tls=True, want_http=True) == SniffResult("raw_buffer", "",
                                                                     (expected,))


@pytest.mark.parametrize("data", [
    b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
    b"DELETE /things/1 HTTP/1.0\r\n",
    H2C_PREFACE,
])
def test_http_prefixes_need_more(data: bytes) -> None:
    line_end = data.find(b"\r")
    decided_at = len(H2C_PREFACE) if data == H2C_PREFACE else line_end + 1
    for cut in range(decided_at):
        assert http_protocol(data[:cut]) == NeedMore(), cut
        assert sniff(data[:cut], want_tls=False, want_http=True) is None
    assert isinstance(http_protocol(data[:decided_at]), str)


@pytest.mark.parametrize("data", [
    pytest.param(b"SSH-2.0-OpenSSH_9.6\r\n", id="ssh banner"),
    pytest.param(b"SSH-2.0", id="ssh banner, partial"),
    pytest.param(b"get / HTTP/1.1\r\n", id="lowercase method"),
    pytest.param(b"g", id="lowercase method, one byte"),
    pytest.param(b"Get / HTTP/1.1\r\n", id="mixed-case method"),
    pytest.param(b"FETCH / HTTP/1.1\r\n", id="unknown method"),
    pytest.param(b"PRI * HTTP/2.0\r\n\r\nXX\r\n\r\n", id="broken preface"),
    pytest.param(b"GET / HTTP/2.0\r\n", id="HTTP/2.0 request line"),
    pytest.param(b"GET / HTTP/1.1 extra\r\n", id="four fields"),
    pytest.param(b"GET /  HTTP/1.1\r\n", id="double space"),
    pytest.param(b"GET  HTTP/1.1\r\n", id="empty target"),
    pytest.param(b"GET /\r\n", id="HTTP/0.9 line"),
    pytest.param(b"GET / http/1.1\r\n", id="lowercase version"),
    pytest.param(b"GET / HTTP/1.1x", id="version too long"),
    pytest.param(b"GET /a\x00b HTTP/1.1\r\n", id="NUL in target"),
    pytest.param(b"GET /a\tb", id="TAB in target, partial"),
    pytest.param(b"\r\nGET / HTTP/1.1\r\n", id="leading CRLF"),
    pytest.param(b"\x16\x03\x01\x02\x00\x01", id="TLS record"),
    pytest.param(b"\x00\xff\x13\x37", id="binary"),
    pytest.param(b"GET / HTTP/1.1\r\n"[:3] + b"X", id="GETX"),
])
def test_not_http(data: bytes) -> None:
    assert http_protocol(data) is None
    assert sniff(data, want_tls=False, want_http=True) == SniffResult("raw_buffer", "", ())


def test_http_read_limit() -> None:
    long_line = b"GET /" + b"a" * (HTTP_MAX_INSPECT_SIZE - 5)
    assert http_protocol(long_line[:-1]) == NeedMore()
    assert http_protocol(long_line) is None
    assert http_protocol(long_line + b" HTTP/1.1\r\n") is None
    fits = b"GET /" + b"a" * (HTTP_MAX_INSPECT_SIZE - 20) + b" HTTP/1.1\r\n"
    assert len(fits) < HTTP_MAX_INSPECT_SIZE
    assert http_protocol(fits) == "http/1.1"


# --------------------------------------------------------------------------------------------
# sniff: the two filters in order


def test_sniff_nothing_wanted() -> None:
    assert sniff(b"", want_tls=False, want_http=False) == SniffResult("raw_buffer", "", ())
    assert sniff(HELLO_SNI_ALPN, want_tls=False, want_http=False) == SniffResult(
        "raw_buffer", "", ())


def test_sniff_tls_without_http_inspector() -> None:
    assert sniff(HELLO_NO_SNI, want_tls=True, want_http=False) == SniffResult("tls", "", ())
    assert sniff(b"GET / HTTP/1.1\r\n", want_tls=True, want_http=False) == SniffResult(
        "raw_buffer", "", ())


def test_sniff_tls_is_not_inspected_for_http() -> None:
    assert sniff(HELLO_TLS12, want_tls=False, want_http=True) == SniffResult("raw_buffer", "", ())


def test_sniff_empty_input_waits() -> None:
    assert sniff(b"", want_tls=True, want_http=False) is None
    assert sniff(b"", want_tls=False, want_http=True) is None
    assert sniff(b"", want_tls=True, want_http=True) is None


def test_sniff_h2c_preface_prefix_waits_with_tls_inspector() -> None:
    # 'P' is not a TLS record, so tls_inspector decides at once; http_inspector then waits.
    assert sniff(b"PRI * HT", want_tls=True, want_http=True) is None
    assert sniff(H2C_PREFACE, want_tls=True, want_http=True) == SniffResult(
        "raw_buffer", "", ("h2c",))


# --------------------------------------------------------------------------------------------
# Fuzzing: never raises, deterministic, a decision never changes as more bytes arrive


def _mutations() -> st.SearchStrategy[bytes]:
    seeds = [h for h, _, _ in REAL.values()] + [
        records(handshake(hello_body(sni_ext(b"a.b"), alpn_ext(b"h2"))), size=5),
        b"GET / HTTP/1.1\r\n\r\n", H2C_PREFACE,
    ]

    @st.composite
    def mutate(draw: st.DrawFn) -> bytes:
        data = bytearray(draw(st.sampled_from(seeds)))
        for _ in range(draw(st.integers(0, 4))):
            i = draw(st.integers(0, len(data) - 1))
            data[i] = draw(st.integers(0, 255))
        cut = draw(st.integers(0, len(data)))
        return bytes(data[:cut])

    return mutate()


inputs = st.one_of(
    st.binary(max_size=600),
    st.binary(max_size=300).map(lambda b: b"\x16\x03\x01" + b),
    st.binary(max_size=300).map(lambda b: b"\x16\x03\x01\x01\x00\x01\x00\x00\xfc\x03\x03" + b),
    st.text(alphabet="GETPOSHT/1.0 \r\n*", max_size=40).map(str.encode),
    _mutations(),
)


@settings(max_examples=400, deadline=None)
@given(data=inputs, cut=st.integers(0, 700))
def test_fuzz_never_raises_and_decisions_are_stable(data: bytes, cut: int) -> None:
    tls = tls_client_hello(data)
    http = http_protocol(data)
    assert isinstance(tls, TlsResult | NeedMore | NotTls)
    assert http is None or isinstance(http, NeedMore | str)
    assert tls_client_hello(data) == tls
    assert http_protocol(data) == http
    for want_tls in (False, True):
        for want_http in (False, True):
            combined = sniff(data, want_tls, want_http)
            assert sniff(data, want_tls, want_http) == combined
    # Whatever a prefix decided, the whole input decides the same.
    prefix = data[:cut]
    prefix_tls = tls_client_hello(prefix)
    if not isinstance(prefix_tls, NeedMore):
        assert prefix_tls == tls
    prefix_http = http_protocol(prefix)
    if not isinstance(prefix_http, NeedMore):
        assert prefix_http == http
    prefix_sniff = sniff(prefix, want_tls=True, want_http=True)
    if prefix_sniff is not None:
        assert prefix_sniff == sniff(data, want_tls=True, want_http=True)
