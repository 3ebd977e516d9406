"""What the first bytes of a connection say: TLS ClientHello (SNI, ALPN) or HTTP flavour.

Owns: the decisions of Envoy's listener filters ``envoy.filters.listener.tls_inspector`` and
``envoy.filters.listener.http_inspector`` as pure functions of the bytes peeked so far, each
answering "decided" or "need more bytes":

* :func:`tls_client_hello` — a record-layer TLS ClientHello (possibly spread over several
  handshake records) → :class:`TlsResult` (SNI lower-cased, ALPN in offered order),
  :class:`NeedMore`, or :class:`NotTls`;
* :func:`http_protocol` — the HTTP/2 prior-knowledge preface → ``"h2c"``, an HTTP/1.x request
  line → ``"http/1.0"`` / ``"http/1.1"``, :class:`NeedMore`, or ``None``;
* :func:`sniff` — both, in listener-filter order, to the (transport protocol, server name,
  application protocols) that the filter-chain match (:mod:`remora.proxy.dispatch`) reads.

Must not: touch sockets, read the clock, log, or raise on any input (every malformed byte
string is an answer, not an exception). Timeouts (``listener_filters_timeout``) and the
closing of connections belong to the caller.

Reference: spec ``dataplane-envoy-pilot-agent.md`` §2.1 step 2 and §2.2 levels 3–5 (Envoy
``tls_inspector.cc``, ``http_inspector.cc``, ``http_inspector.rst``; ClientHello syntax from
RFC 8446 §4.1.2, server_name from RFC 6066 §3, ALPN from RFC 7301 §3.1). Written from those
descriptions; no upstream code.

Where this differs from Envoy, on purpose:

* Envoy judges a ClientHello with BoringSSL. Here the checks are the structural ones BoringSSL
  makes before it reports the SNI (record header, handshake header, ClientHello fields,
  no duplicate extensions, a well-formed server_name and ALPN extension, a version in
  TLS 1.0–1.3); deeper semantic checks (key shares, groups …) are not repeated.
* BoringSSL waits for a whole 5-byte record header; here a first byte that is not a handshake
  record (or a second byte that is not ``0x03``) is rejected at once.
* SSLv2-format ClientHellos are reported as not TLS.
* Past the read limit Envoy closes the connection (``client_hello_too_large`` for TLS,
  ``read_error`` for HTTP); here the inspector simply gives up (``NotTls`` / ``None``) and
  the caller decides.
* The HTTP/1.x method list is the explicit one Envoy's http_inspector checked by name (the
  WebDAV-extended set) with ``MERGE`` spelled in capitals and ``PROPFIND`` added; newer Envoy
  hands the line to its HTTP/1 parser, which is more lenient about methods.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "H2C_PREFACE",
    "HTTP1_METHODS",
    "HTTP_MAX_INSPECT_SIZE",
    "TLS_MAX_CLIENT_HELLO",
    "NeedMore",
    "NotTls",
    "SniffResult",
    "TlsResult",
    "http_protocol",
    "sniff",
    "tls_client_hello",
]

# tls_inspector's default (and largest allowed) ``max_client_hello_size``: raw bytes, record
# headers included, that it peeks before giving up on a ClientHello.
TLS_MAX_CLIENT_HELLO = 64 * 1024
# http_inspector's read buffer: bytes it peeks before giving up on finding a request line.
HTTP_MAX_INSPECT_SIZE = 8 * 1024

H2C_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

HTTP1_METHODS: frozenset[bytes] = frozenset({
    b"ACL", b"BASELINE-CONTROL", b"BIND", b"CHECKIN", b"CHECKOUT", b"CONNECT", b"COPY",
    b"DELETE", b"GET", b"HEAD", b"LABEL", b"LINK", b"LOCK", b"MERGE", b"MKACTIVITY",
    b"MKCALENDAR", b"MKCOL", b"MKREDIRECTREF", b"MKWORKSPACE", b"MOVE", b"OPTIONS",
    b"ORDERPATCH", b"PATCH", b"POST", b"PROPFIND", b"PROPPATCH", b"PURGE", b"PUT", b"REBIND",
    b"REPORT", b"SEARCH", b"TRACE", b"UNBIND", b"UNCHECKOUT", b"UNLINK", b"UNLOCK", b"UPDATE",
    b"UPDATEREDIRECTREF", b"VERSION-CONTROL",
})
_HTTP_VERSIONS = {b"HTTP/1.0": "http/1.0", b"HTTP/1.1": "http/1.1"}
# Every prefix of every method, so a partial first word is judged in O(1).
_METHOD_PREFIXES: frozenset[bytes] = frozenset(
    m[:i] for m in HTTP1_METHODS for i in range(len(m) + 1))
# Request-target bytes: anything visible (high bytes tolerated); no controls, no SP, no DEL.
_URI_BYTES = bytes(range(0x21, 0x7f)) + bytes(range(0x80, 0x100))

# TLS wire constants.
_CT_HANDSHAKE = 22
_HT_CLIENT_HELLO = 1
_RECORD_HEADER = 5
_MAX_PLAINTEXT = 16384          # largest record payload (RFC 8446 §5.1)
_MAX_HELLO_BODY = 16384         # BoringSSL's cap on a handshake message a server reads
_MAX_EMPTY_RECORDS = 32         # BoringSSL's tolerance for consecutive empty records
_EXT_SERVER_NAME = 0
_EXT_ALPN = 16
_EXT_SUPPORTED_VERSIONS = 43
_TLS_VERSIONS = range(0x0301, 0x0305)  # TLS 1.0 … 1.3, what tls_inspector negotiates


@dataclass(frozen=True, slots=True)
class NeedMore:
    """The bytes so far are a valid beginning; more are needed to decide."""


@dataclass(frozen=True, slots=True)
class NotTls:
    """The bytes are not (or can no longer become) a ClientHello tls_inspector accepts."""

    reason: str = ""


@dataclass(frozen=True, slots=True)
class TlsResult:
    """A complete ClientHello: SNI (lower-cased, ``""`` when absent) and ALPN as offered."""

    server_name: str
    alpn: tuple[str, ...]
    hello_bytes: int   # raw bytes up to the end of the record that completes the ClientHello


@dataclass(frozen=True, slots=True)
class SniffResult:
    """What the listener filters set on the connection (the inputs of §2.2 levels 3–5)."""

    transport_protocol: str          # "tls" or "raw_buffer"
    server_name: str
    application_protocols: tuple[str, ...]


NEED_MORE = NeedMore()


class _Malformed(Exception):
    """Internal: the ClientHello body is not acceptable. Never escapes this module."""


class _Reader:
    """Bounds-checked big-endian reads over one byte string."""

    __slots__ = ("_data", "_pos")

    def __init__(self, data: bytes) -> None:
        self._data = data
        self._pos = 0

    def left(self) -> int:
        return len(self._data) - self._pos

    def take(self, n: int) -> bytes:
        if n > self.left():
            raise _Malformed("truncated")
        out = self._data[self._pos:self._pos + n]
        self._pos += n
        return out

    def uint(self, width: int) -> int:
        return int.from_bytes(self.take(width), "big")

    def vector(self, width: int) -> bytes:
        """A ``width``-byte length prefix and that many bytes."""
        return self.take(self.uint(width))


def tls_client_hello(data: bytes) -> TlsResult | NeedMore | NotTls:
    """Judge ``data`` (the connection's first bytes) as a TLS ClientHello.

    Looks at most at the first :data:`TLS_MAX_CLIENT_HELLO` bytes: if they do not hold a
    complete ClientHello, the answer is :class:`NotTls` (Envoy: ``client_hello_too_large``).
    """
    view = bytes(data[:TLS_MAX_CLIENT_HELLO])
    message = bytearray()
    pos = 0
    empty_run = 0
    while True:
        if len(message) >= 4 and len(message) >= 4 + int.from_bytes(message[1:4], "big"):
            break
        header = view[pos:pos + _RECORD_HEADER]
        if header[:1] and header[0] != _CT_HANDSHAKE:
            return NotTls("not a handshake record")
        if header[1:2] and header[1] != 0x03:
            return NotTls("record version is not 3.x")
        if len(header) < _RECORD_HEADER:
            return _incomplete(view)
        length = int.from_bytes(header[3:5], "big")
        if length > _MAX_PLAINTEXT:
            return NotTls("record too long")
        if length == 0:
            empty_run += 1
            if empty_run > _MAX_EMPTY_RECORDS:
                return NotTls("too many empty records")
            pos += _RECORD_HEADER
            continue
        empty_run = 0
        fragment = view[pos + _RECORD_HEADER:pos + _RECORD_HEADER + length]
        had = len(message)
        message += fragment
        if had < 1 <= len(message) and message[0] != _HT_CLIENT_HELLO:
            return NotTls("first handshake message is not a ClientHello")
        if had < 4 <= len(message) and int.from_bytes(message[1:4], "big") > _MAX_HELLO_BODY:
            return NotTls("ClientHello too long")
        if len(fragment) < length:
            return _incomplete(view)
        pos += _RECORD_HEADER + length
    body = bytes(message[4:4 + int.from_bytes(message[1:4], "big")])
    try:
        server_name, alpn = _parse_client_hello(body)
    except _Malformed as err:
        return NotTls(f"malformed ClientHello: {err}")
    return TlsResult(server_name=server_name, alpn=alpn, hello_bytes=pos)


def _incomplete(view: bytes) -> NeedMore | NotTls:
    if len(view) >= TLS_MAX_CLIENT_HELLO:
        return NotTls("ClientHello larger than the read limit")
    return NEED_MORE


def _parse_client_hello(body: bytes) -> tuple[str, tuple[str, ...]]:
    r = _Reader(body)
    legacy_version = r.uint(2)
    r.take(32)                                   # random
    if len(r.vector(1)) > 32:                    # legacy_session_id
        raise _Malformed("session id longer than 32 bytes")
    suites = r.vector(2)
    if len(suites) < 2 or len(suites) % 2:
        raise _Malformed("bad cipher_suites length")
    if not r.vector(1):                          # legacy_compression_methods
        raise _Malformed("no compression methods")
    extensions: dict[int, bytes] = {}
    if r.left():
        exts = _Reader(r.vector(2))
        if r.left():
            raise _Malformed("bytes after the extensions")
        while exts.left():
            ext_type = exts.uint(2)
            ext_body = exts.vector(2)
            if ext_type in extensions:
                raise _Malformed(f"duplicate extension {ext_type}")
            extensions[ext_type] = ext_body
    _check_version(legacy_version, extensions.get(_EXT_SUPPORTED_VERSIONS))
    server_name = ""
    if _EXT_SERVER_NAME in extensions:
        server_name = _parse_server_name(extensions[_EXT_SERVER_NAME])
    alpn: tuple[str, ...] = ()
    if _EXT_ALPN in extensions:
        alpn = _parse_alpn(extensions[_EXT_ALPN])
    return server_name, alpn


def _check_version(legacy_version: int, supported_versions: bytes | None) -> None:
    if supported_versions is None:
        if legacy_version < _TLS_VERSIONS.start:
            raise _Malformed("client offers no TLS version in 1.0–1.3")
        return
    r = _Reader(supported_versions)
    versions = r.vector(1)
    if r.left() or not versions or len(versions) % 2:
        raise _Malformed("bad supported_versions")
    offered = {int.from_bytes(versions[i:i + 2], "big") for i in range(0, len(versions), 2)}
    if not any(v in _TLS_VERSIONS for v in offered):
        raise _Malformed("client offers no TLS version in 1.0–1.3")


def _parse_server_name(ext: bytes) -> str:
    # One entry, of type host_name: multiple or other name types are refused, as BoringSSL does.
    r = _Reader(ext)
    names = _Reader(r.vector(2))
    if r.left():
        raise _Malformed("bytes after server_name list")
    name_type = names.uint(1)
    host = names.vector(2)
    if names.left():
        raise _Malformed("more than one server name")
    if name_type != 0 or not host or len(host) > 255 or 0 in host:
        raise _Malformed("bad host_name")
    return host.lower().decode("latin-1")


def _parse_alpn(ext: bytes) -> tuple[str, ...]:
    r = _Reader(ext)
    names = _Reader(r.vector(2))
    if r.left() or not names.left():
        raise _Malformed("bad ALPN extension")
    out = []
    while names.left():
        proto = names.vector(1)
        if not proto:
            raise _Malformed("empty ALPN protocol name")
        out.append(proto.decode("latin-1"))
    return tuple(out)


def http_protocol(data: bytes) -> str | NeedMore | None:
    """Judge ``data`` as the start of cleartext HTTP: ``"h2c"``, ``"http/1.1"``,
    ``"http/1.0"``, :class:`NeedMore`, or ``None`` (not HTTP).

    The first line ends at the first CR or LF. Undecided after
    :data:`HTTP_MAX_INSPECT_SIZE` bytes means ``None``.
    """
    view = bytes(data[:HTTP_MAX_INSPECT_SIZE])
    n = min(len(view), len(H2C_PREFACE))
    if view[:n] == H2C_PREFACE[:n]:
        return "h2c" if n == len(H2C_PREFACE) else NEED_MORE
    ends = [i for i in (view.find(b"\r"), view.find(b"\n")) if i >= 0]
    if ends:
        return _request_line(view[:min(ends)])
    verdict = _request_line_prefix(view)
    if verdict is NEED_MORE and len(view) >= HTTP_MAX_INSPECT_SIZE:
        return None
    return verdict


def _request_line(line: bytes) -> str | None:
    parts = line.split(b" ")
    if len(parts) != 3:
        return None
    method, uri, version = parts
    if method not in HTTP1_METHODS or not _uri_ok(uri) or not uri:
        return None
    return _HTTP_VERSIONS.get(version)


def _request_line_prefix(partial: bytes) -> NeedMore | None:
    """NeedMore when ``partial`` (no CR/LF yet) can still grow into a valid request line."""
    parts = partial.split(b" ")
    if len(parts) == 1:
        return NEED_MORE if partial in _METHOD_PREFIXES else None
    if len(parts) > 3 or parts[0] not in HTTP1_METHODS or not _uri_ok(parts[1]):
        return None
    if len(parts) == 2:
        return NEED_MORE
    if not parts[1] or not any(v.startswith(parts[2]) for v in _HTTP_VERSIONS):
        return None
    return NEED_MORE


def _uri_ok(uri: bytes) -> bool:
    return not uri.translate(None, delete=_URI_BYTES)


def sniff(data: bytes, want_tls: bool, want_http: bool) -> SniffResult | None:
    """Run tls_inspector (if ``want_tls``) then http_inspector (if ``want_http``) over
    ``data``. ``None`` means a filter needs more bytes; otherwise what they set, with
    ``raw_buffer`` as transport protocol when no TLS was found (Envoy's default)."""
    if want_tls:
        tls = tls_client_hello(data)
        if isinstance(tls, NeedMore):
            return None
        if isinstance(tls, TlsResult):
            # http_inspector skips connections whose transport protocol is not raw_buffer.
            return SniffResult("tls", tls.server_name, tls.alpn)
    protocols: tuple[str, ...] = ()
    if want_http:
        http = http_protocol(data)
        if isinstance(http, NeedMore):
            return None
        if http is not None:
            protocols = (http,)
    return SniffResult("raw_buffer", "", protocols)
