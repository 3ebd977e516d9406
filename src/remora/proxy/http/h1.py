"""The HTTP/1.1 codec: bytes ⇄ the events and heads of :mod:`remora.proxy.http.types`.

Owns: Envoy's ``http1`` codec for both sides of a connection, sans-IO, on top of the
``httptools`` (llhttp) parser:

* :class:`H1ServerCodec` — the downstream side: requests in (``RequestHeaders`` numbered
  1, 2, 3 … per connection, ``Body``, ``EndStream`` with trailers, ``ProtocolError`` carrying
  the local reply Envoy would send and its response code details, ``ConnectionClosed``),
  responses out (status line, lower-case header names, framing: ``content-length`` as given,
  else ``transfer-encoding: chunked`` for HTTP/1.1 or close-delimited for HTTP/1.0,
  ``connection: close`` when the connection ends after the response);
* :class:`H1ClientCodec` — the upstream side: requests out (``host`` first, framing, Envoy's
  ``content-length: 0`` on body-less POST/PUT/PATCH), responses in (``Informational`` for 1xx
  other than 101, ``ResponseHeaders``, ``Body``, ``EndStream``, close-delimited bodies ended by
  EOF), and whether the connection can carry another request.

Both own the hop-by-hop headers of HTTP/1 (RFC 9110 §7.6.1): ``connection``, ``keep-alive``,
``proxy-connection`` and ``transfer-encoding`` never reach the header maps and are never
copied from them; the codec writes its own. ``upgrade`` survives only on an upgrade.

Must not: do IO, read clocks, log, route, or know about HTTP/2 (the caller sniffs the h2c
preface before choosing this codec; an accepted ``Upgrade: h2c`` hands the unparsed bytes
back with :meth:`H1ServerCodec.take_rest`). It never raises on received bytes: a broken
message is a :class:`ProtocolError`, after which the codec emits nothing more.

Caller contract (server side):

* **Pipelining.** Requests are parsed as bytes arrive, but the events of request *n+1* are held
  until the response to request *n* has ended (``send_end``, or ``end_stream`` on
  ``send_headers``) and request *n* was fully received. Held events (and a held
  ``ProtocolError`` or ``ConnectionClosed``) are returned by :meth:`H1ServerCodec.resume`,
  which the caller calls after it ends a response or answers an upgrade request (it is cheap
  when nothing is held). :attr:`H1ServerCodec.buffered_input` counts the bytes held, so the
  caller can stop reading while it is large (Envoy stops reading a pipelining client too).
* **EOF** (``receive(b"")``): between messages → ``ConnectionClosed(last_stream)``;
  mid-message → ``ProtocolError(0, "http1.codec_error", stream)`` (status 0: the peer is gone,
  there is nothing to answer); in a tunnel → ``EndStream`` of the tunnelled stream; while an
  upgrade request waits for its answer → ``ConnectionClosed``.
* **Upgrades** (``Connection: upgrade`` + ``Upgrade: x``, and ``CONNECT``): the request comes
  as ``RequestHeaders(end_stream=False, upgrade=x)`` (``upgrade=""`` for CONNECT) and its
  ``Content-Length`` body, if any, as ``Body``; no ``EndStream`` until the server answers.
  ``send_headers`` with 101 (2xx for CONNECT) turns the connection into a raw tunnel: the bytes
  received after the request — available through :meth:`~H1ServerCodec.resume` — and
  everything received later are ``Body`` of that stream, ``send_body`` writes raw bytes, and
  the connection closes afterwards. Any other answer ends the request (``EndStream`` via
  ``resume``) and the connection goes on as HTTP/1. An upgrade request with a chunked body is
  rejected (400).
* **h2c** (``upgrade == "h2c"``) is an ordinary request as well: ``end_stream`` and
  ``EndStream`` follow its framing, so it can be answered as HTTP/1.1 (the connection then goes
  on) or, once it has ended, taken over by HTTP/2: :meth:`~H1ServerCodec.take_rest` returns
  the bytes after it (the HTTP/2 preface …), whether the caller writes the 101 itself or
  through ``send_headers``.

Caller contract (client side): EOF with a request outstanding is a ``ProtocolError`` with
status 0 whose ``details`` are Envoy's response code details, so the HCM can tell a stale
pooled connection closed before any byte of the response (:data:`UPSTREAM_CLOSED_BEFORE`,
safe to retry on a fresh connection) from a response cut short (:data:`UPSTREAM_CLOSED_AFTER`)
or a malformed response (:data:`UPSTREAM_PROTOCOL_ERROR_BEFORE` /
:data:`UPSTREAM_PROTOCOL_ERROR_AFTER`). EOF while idle is ``ConnectionClosed``.

Where this differs from Envoy, on purpose:

* Duplicate ``Content-Length`` fields are rejected even when equal (llhttp refuses them; Envoy
  with Balsa accepts identical copies). Envoy reports both cases as a codec error, as here.
* ``Transfer-Encoding`` must be exactly ``chunked`` (Envoy's rule: 501 otherwise), so
  ``gzip, chunked`` is refused rather than having its gzip coding silently dropped.
* The ``Host`` of an absolute-form request target (``GET http://h/p``) wins over the ``Host``
  field (RFC 9112 §3.2.2), as Envoy's ``allow_absolute_url`` does.
* Header size is counted as the request target plus every field's name and value (after OWS
  trimming); a head that has not ended after ``2 × limit + 16 KiB`` raw bytes is refused as
  too large too, so one endless field cannot grow memory.
* The response reason phrase is always the standard one (``http.HTTPStatus``), as Envoy
  writes it; ``ResponseHead.reason`` is only informative.

References: RFC 9112 (message syntax, framing §6, chunked §7), RFC 9110 §7.6.1 (hop-by-hop),
§7.8 (Upgrade), §9.3.6 (CONNECT), §15 (reason phrases); Envoy ``http1/codec_impl.cc``
behaviour as documented (``max_request_headers_kb``, ``max_headers_count``, response code
details ``http1.*``). Written from those descriptions; no upstream code.
"""

from __future__ import annotations

import http
import typing
from types import SimpleNamespace
from typing import Final, cast

import httptools

from remora.proxy.http.types import (
    Body,
    ConnectionClosed,
    EndStream,
    Event,
    HeaderMap,
    Informational,
    Protocol,
    ProtocolError,
    RequestHead,
    RequestHeaders,
    ResponseHead,
    ResponseHeaders,
)

__all__ = [
    "CODEC_ERROR",
    "CONTENT_LENGTH_AND_CHUNKED",
    "HEADERS_TOO_LARGE",
    "INVALID_TRANSFER_ENCODING",
    "TOO_MANY_HEADERS",
    "UPSTREAM_CLOSED_AFTER",
    "UPSTREAM_CLOSED_BEFORE",
    "UPSTREAM_PROTOCOL_ERROR_AFTER",
    "UPSTREAM_PROTOCOL_ERROR_BEFORE",
    "H1ClientCodec",
    "H1ServerCodec",
]

# Envoy's Http1ResponseCodeDetails.
CODEC_ERROR: Final = "http1.codec_error"
HEADERS_TOO_LARGE: Final = "http1.headers_too_large"
TOO_MANY_HEADERS: Final = "http1.too_many_headers"
CONTENT_LENGTH_AND_CHUNKED: Final = "http1.content_length_and_chunked_not_allowed"
INVALID_TRANSFER_ENCODING: Final = "http1.invalid_transfer_encoding"
# Envoy's router details for an upstream connection that ended or broke under a request.
UPSTREAM_CLOSED_BEFORE: Final = "upstream_reset_before_response_started{connection_termination}"
UPSTREAM_CLOSED_AFTER: Final = "upstream_reset_after_response_started{connection_termination}"
UPSTREAM_PROTOCOL_ERROR_BEFORE: Final = "upstream_reset_before_response_started{protocol_error}"
UPSTREAM_PROTOCOL_ERROR_AFTER: Final = "upstream_reset_after_response_started{protocol_error}"


class _Parser(typing.Protocol):
    """The part of ``httptools``' (untyped) parsers this module uses."""

    def feed_data(self, data: bytes) -> None: ...

    def should_keep_alive(self) -> bool: ...

    def should_upgrade(self) -> bool: ...

    def get_http_version(self) -> str: ...


class _RequestParser(_Parser, typing.Protocol):
    def get_method(self) -> bytes: ...


class _ResponseParser(_Parser, typing.Protocol):
    def get_status_code(self) -> int: ...


def _request_parser(callbacks: SimpleNamespace) -> _RequestParser:
    return cast(_RequestParser, httptools.HttpRequestParser(callbacks))


def _response_parser(callbacks: SimpleNamespace) -> _ResponseParser:
    return cast(_ResponseParser, httptools.HttpResponseParser(callbacks))


class _Abort(Exception):
    """Raised inside a parser callback to stop llhttp; the reason is kept on the codec."""


def _llhttp_error(exc: Exception) -> tuple[int, str]:
    """Envoy's local reply for an llhttp refusal (its messages are stable strings)."""
    msg = str(exc)
    if "Transfer-Encoding" in msg:
        if "Content-Length" in msg:       # "Transfer-Encoding can't be present with C-L"
            return 400, CONTENT_LENGTH_AND_CHUNKED
        return 501, INVALID_TRANSFER_ENCODING   # "Invalid `Transfer-Encoding` header value"
    return 400, CODEC_ERROR


def _status_line(status: int) -> str:
    try:
        phrase = http.HTTPStatus(status).phrase
    except ValueError:
        phrase = "Unknown"                # Envoy's CodeUtility::toString for unknown codes
    return f"HTTP/1.1 {status} {phrase}\r\n"


_STATUS_LINES: Final[dict[int, str]] = {int(s): _status_line(int(s)) for s in http.HTTPStatus}

# Request fields the server codec treats specially (everything else is copied as is).
_F_HOST: Final = 0
_F_CL: Final = 1
_F_TE: Final = 2
_F_HOP: Final = 3
_F_UPGRADE: Final = 4
_F_TE_HDR: Final = 5
_F_EXPECT: Final = 6
_REQUEST_FIELDS: Final[dict[str, int]] = {
    "host": _F_HOST, "content-length": _F_CL, "transfer-encoding": _F_TE,
    "connection": _F_HOP, "keep-alive": _F_HOP, "proxy-connection": _F_HOP,
    "upgrade": _F_UPGRADE, "te": _F_TE_HDR, "expect": _F_EXPECT,
}
# Fields a sender never copies from a head: the codec writes the framing and connection
# management itself (RFC 9110 §7.6.1).
_HOP_BY_HOP: Final = frozenset(
    {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "upgrade"})
_METHODS: Final[dict[bytes, str]] = {
    m.encode(): m for m in ("GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS",
                            "TRACE", "PATCH")}
# Envoy adds ``content-length: 0`` to body-less requests of these methods.
_BODY_METHODS: Final = frozenset({"POST", "PUT", "PATCH"})
_OWS: Final = b" \t"

# Output framing of the message being sent.
_NONE: Final = 0
_RAW: Final = 1
_CHUNKED: Final = 2
# Server upgrade states.
_UP_NONE: Final = 0
_UP_WAIT: Final = 1
_UP_TUNNEL: Final = 2
_UP_REJECTED: Final = 3
_UP_H2C: Final = 4


# Field names as received -> their lower-case str. The common names repeat on every message:
# one bytes-keyed lookup returns a str made once (whose hash is kept for the set and dict
# lookups that follow) instead of decoding and lowering two new strings per field. Bounded,
# since names are the peer's choice.
_NAMES: Final[dict[bytes, str]] = {}
_NAMES_MAX: Final = 512


def _name_str(name: bytes) -> str:
    n = _NAMES.get(name)
    if n is None:
        n = name.decode("latin-1").lower()
        if len(_NAMES) < _NAMES_MAX:
            _NAMES[name] = n
    return n


def _clean_line(line: str) -> bool:
    return line.count("\n") == 1 and line.count("\r") == 1 and "\0" not in line


def _field_block(items: list[tuple[str, str]]) -> str:
    """``name: value`` lines, dropping fields that would split the message (CR, LF, NUL)."""
    lines = [f"{k}: {v}\r\n" for k, v in items]
    return "".join(ln for ln in lines if _clean_line(ln))


def _encode_head(parts: list[str]) -> bytes:
    """Join a head whose ``parts`` are each one CRLF-terminated line (the blank one included).
    A name or value holding CR, LF or NUL would let a header inject a message (response
    splitting): each part holds exactly one CR and one LF, so deleting every CR, LF and NUL
    from the encoded head (one pass in C) must remove exactly two bytes per part; if it
    removes more, the culprit lines are dropped."""
    data = "".join(parts).encode("latin-1", "replace")
    if len(data) - len(data.translate(None, b"\r\n\0")) != 2 * len(parts):
        data = "".join(ln for ln in parts if _clean_line(ln)).encode("latin-1", "replace")
    return data


def _trailer_bytes(trailers: HeaderMap | None) -> bytes:
    if not trailers:
        return b"0\r\n\r\n"
    items = [(k, v) for k, v in trailers.items() if k not in _HOP_BY_HOP
             and k not in ("content-length", "host")]
    return ("0\r\n" + _field_block(items) + "\r\n").encode("latin-1", "replace")


class _Request:
    """What the server codec remembers of a parsed request until its response ends."""

    __slots__ = ("connect", "http10", "keep_alive", "method", "upgrade", "upgrade_token")

    def __init__(self, method: str, http10: bool, keep_alive: bool, upgrade: bool,
                 upgrade_token: str, connect: bool) -> None:
        self.method = method
        self.http10 = http10
        self.keep_alive = keep_alive
        self.upgrade = upgrade
        self.upgrade_token = upgrade_token
        self.connect = connect


_NO_REQUEST: Final = _Request("GET", False, False, False, "", False)


# ============================================================================= server side


class _Output:
    """What both HTTP/1 codecs do alike: output accumulates in ``_out`` until taken, and
    there is no per-stream flow control (TCP's is the only one)."""

    __slots__ = ("_out",)
    _out: list[bytes]

    def consumed(self, stream: int, n: int) -> None:
        pass

    def buffered(self, stream: int) -> int:
        return 0

    def data_to_send(self) -> bytes:
        out = self._out
        if not out:
            return b""
        self._out = []
        return b"".join(out)


class H1ServerCodec(_Output):
    """The downstream side of one HTTP/1.x connection (see the module docstring for the
    caller's contract: :meth:`resume`, EOF, upgrades)."""

    __slots__ = (
        "_abort",
        "_bparts",
        "_cb",
        "_cl",
        "_closing",
        "_conn_field",
        "_dead",
        "_err_stream",
        "_expect",
        "_hcount",
        "_hdrs",
        "_head_raw",
        "_host",
        "_hsize",
        "_in_head",
        "_in_msg",
        "_max_count",
        "_max_size",
        "_must_close",
        "_parser",
        "_queue",
        "_requests",
        "_rest",
        "_rx",
        "_rx_done",
        "_served",
        "_te",
        "_trailers",
        "_tx_mode",
        "_up_body_left",
        "_up_state",
        "_up_stream",
        "_upgrade_value",
        "_url",
        "protocol",
    )

    protocol: Protocol

    def __init__(self, max_request_headers_kb: int = 60, max_headers_count: int = 100) -> None:
        self.protocol = "HTTP/1.1"
        self._max_size = max_request_headers_kb * 1024
        self._max_count = max_headers_count
        self._cb = SimpleNamespace(
            on_message_begin=self._on_message_begin, on_url=self._on_url,
            on_header=self._on_header, on_headers_complete=self._on_headers_complete,
            on_body=self._on_body, on_message_complete=self._on_message_complete)
        self._parser = _request_parser(self._cb)
        self._queue: list[Event] = []       # parsed, not yet returned (held when pipelined)
        self._bparts: list[bytes] = []      # body bytes of the current feed, not yet an event
        self._out: list[bytes] = []
        self._requests: dict[int, _Request] = {}
        self._rx = 0                        # stream of the request being (last) parsed
        self._rx_done = 0                   # highest stream whose request was fully received
        self._served = 1                    # stream being answered; events up to it are free
        self._in_msg = False
        self._in_head = False
        self._head_raw = 0
        self._closing = False               # a request said close: ignore what follows it
        self._dead = False                  # a ProtocolError or EOF was queued
        self._must_close = False
        self._err_stream = 0                # the stream a ProtocolError was queued for
        self._abort: tuple[int, str] | None = None
        self._tx_mode = _NONE
        self._up_state = _UP_NONE
        self._up_stream = 0
        self._up_body_left = 0
        self._rest = bytearray()
        self._reset_message()

    def _reset_message(self) -> None:
        self._url = b""
        self._hdrs: list[tuple[str, str]] = []
        self._conn_field = False            # a Connection (or Proxy-Connection) field came
        self._hsize = 0
        self._hcount = 0
        self._cl: str | None = None
        self._te: str | None = None
        self._host: str | None = None
        self._upgrade_value: str | None = None
        self._expect = False
        self._trailers: list[tuple[str, str]] | None = None

    # ------------------------------------------------------------------ parser callbacks

    def _fail_cb(self, status: int, details: str) -> typing.NoReturn:
        self._abort = (status, details)
        raise _Abort

    def _on_message_begin(self) -> None:
        if self._closing:
            self._fail_cb(0, "")            # bytes after a closing request: dropped
        self._rx += 1
        self._in_msg = True
        self._in_head = True
        self._head_raw = 0
        self._reset_message()

    def _on_url(self, frag: bytes) -> None:
        # llhttp hands the target over in pieces when it spans reads.
        self._url += frag
        self._hsize += len(frag)
        if self._hsize > self._max_size:
            self._fail_cb(431, HEADERS_TOO_LARGE)

    def _on_header(self, name: bytes, value: bytes) -> None:
        # llhttp drops leading OWS but keeps trailing OWS (RFC 9112 §5: not part of the value).
        if value and (value[-1] == 32 or value[-1] == 9):     # SP / HTAB (native compares)
            value = value.rstrip(_OWS)
        if not self._in_head:
            self._on_trailer(name, value)
            return
        self._hcount += 1
        self._hsize += len(name) + len(value)
        # Envoy: > max_headers_count fields or > max_request_headers_kb → 431.
        if self._hcount > self._max_count:
            self._fail_cb(431, TOO_MANY_HEADERS)
        if self._hsize > self._max_size:
            self._fail_cb(431, HEADERS_TOO_LARGE)
        # (llhttp takes only token characters in names: ASCII, so str.lower is bytes.lower)
        n = _name_str(name)
        v = value.decode("latin-1")
        kind = _REQUEST_FIELDS.get(n)
        if kind is None:
            self._hdrs.append((n, v))
        elif kind == _F_HOST:
            if self._host is not None:      # two Hosts: which one routes? (RFC 9112 §3.2)
                self._fail_cb(400, CODEC_ERROR)
            self._host = v
        elif kind == _F_CL:                 # llhttp has checked digits and duplicates
            self._cl = v
            self._hdrs.append((n, v))
        elif kind == _F_TE:
            self._te = v if self._te is None else f"{self._te}, {v}"
        elif kind == _F_UPGRADE:
            self._upgrade_value = v
            self._hdrs.append((n, v))       # removed again unless this is an upgrade
        elif kind == _F_TE_HDR:
            # Envoy keeps ``te`` only for "trailers" (gRPC), the one value meaning end to end.
            if "trailers" in v.lower():
                self._hdrs.append((n, "trailers"))
        elif kind == _F_EXPECT:
            self._expect = v.lower() == "100-continue"
            self._hdrs.append((n, v))
        elif n != "keep-alive":             # connection / proxy-connection: consumed
            self._conn_field = True

    def _on_trailer(self, name: bytes, value: bytes) -> None:
        if self._trailers is None:
            self._trailers = []
            self._hcount = 0
            self._hsize = 0
        self._hcount += 1
        self._hsize += len(name) + len(value)
        if self._hcount > self._max_count:
            self._fail_cb(431, TOO_MANY_HEADERS)
        if self._hsize > self._max_size:
            self._fail_cb(431, HEADERS_TOO_LARGE)
        self._trailers.append((name.lower().decode("latin-1"), value.decode("latin-1")))

    def _on_headers_complete(self) -> None:
        self._in_head = False
        p = self._parser
        keep_alive = p.should_keep_alive()
        proto: Protocol = "HTTP/1.1"
        if not keep_alive or self._conn_field:
            # (Otherwise the version is 1.1: llhttp keeps 1.0, 2.0 and 0.9 alive only when a
            # Connection field asks; get_http_version formats a string per call.)
            version = p.get_http_version()
            if version == "1.0":
                proto = "HTTP/1.0"
            elif version != "1.1":          # llhttp takes "HTTP/2.0" and "HTTP/0.9" lines
                self._fail_cb(400, CODEC_ERROR)
        raw_method = p.get_method()
        method = _METHODS.get(raw_method) or raw_method.decode("latin-1")
        connect = method == "CONNECT"
        chunked = False
        if self._te is not None:
            # RFC 9112 §6.1 lets a server refuse codings it does not know; Envoy refuses all
            # but ``chunked``, and any body framing on CONNECT (RFC 9110 §9.3.6).
            if self._te.strip().lower() != "chunked" or connect:
                self._fail_cb(501, INVALID_TRANSFER_ENCODING)
            if self._cl is not None:        # RFC 9112 §6.3 ¶3: a smuggling vector; refuse
                self._fail_cb(400, CONTENT_LENGTH_AND_CHUNKED)
            chunked = True
        body_len = int(self._cl) if self._cl is not None else 0
        upgrade = p.should_upgrade()        # Connection: upgrade + Upgrade, or CONNECT
        hdrs = self._hdrs
        token = ""
        if upgrade and not connect:
            token = (self._upgrade_value or "").strip().lower()
        elif self._upgrade_value is not None:
            hdrs[:] = [kv for kv in hdrs if kv[0] != "upgrade"]
        if upgrade and chunked:             # the tunnel would start inside a chunk
            self._fail_cb(400, CODEC_ERROR)
        url = self._url.decode("latin-1")
        authority = self._host or ""
        if connect:
            authority, url = url, ""        # authority-form (RFC 9112 §3.2.3)
        elif url[:1] != "/" and url != "*":
            # absolute-form (RFC 9112 §3.2.2): the target's authority replaces Host.
            scheme_end = url.find("://")
            if scheme_end > 0:
                rest = url[scheme_end + 3:]
                slash = rest.find("/")
                if slash < 0:
                    authority, url = rest, "/"
                else:
                    authority, url = rest[:slash], rest[slash:]
        stream = self._rx
        self.protocol = proto
        self._requests[stream] = _Request(method, proto == "HTTP/1.0", keep_alive, upgrade,
                                          token, connect)
        head = RequestHead(method, url, authority, "http", HeaderMap.trusted(hdrs), proto)
        if upgrade:
            self._up_body_left = body_len
            # h2c (RFC 9113 §3.2, obsoleted but still sent) asks for nothing beyond the request
            # itself, which is answered either way: it ends as its framing says.
            end = token == "h2c" and body_len == 0
        else:
            end = not chunked and body_len == 0
        self._emit(RequestHeaders(stream, head, end, token, self._expect))
        if end:
            self._rx_done = stream

    def _on_body(self, data: bytes) -> None:
        self._bparts.append(data)

    def _on_message_complete(self) -> None:
        self._in_msg = False
        stream = self._rx
        req = self._requests[stream]
        if req.upgrade:                     # HttpParserUpgrade follows: see _feed
            return
        if self._rx_done < stream:
            trailers = self._trailers
            self._emit(EndStream(stream, HeaderMap.trusted(trailers) if trailers else None))
            self._rx_done = stream
        if not req.keep_alive:
            self._closing = True

    # ------------------------------------------------------------------ event plumbing

    def _emit(self, event: Event) -> None:
        if self._bparts:
            self._flush_body()
        self._queue.append(event)

    def _flush_body(self) -> None:
        parts = self._bparts
        self._queue.append(Body(self._rx, b"".join(parts)))
        self._bparts = []

    def _drain(self) -> list[Event]:
        """Events whose stream may be seen now: up to the one being answered."""
        q = self._queue
        if not q:
            return []
        limit = self._served
        n = 0
        for ev in q:
            if not isinstance(ev, ConnectionClosed) and ev.stream > limit:
                break
            n += 1
        if n == len(q):
            self._queue = []
            return q
        out = q[:n]
        del q[:n]
        return out

    def _pending_abort(self) -> tuple[int, str] | None:
        """What a parser callback set during ``feed_data``. Read through a call: after
        ``self._abort = None`` above it, a plain read is narrowed to None by the type checker,
        and the compiled module (remora.native) would trust that."""
        return self._abort

    def _fail(self, status: int, details: str) -> None:
        if self._bparts:
            self._flush_body()
        stream = self._rx if self._in_msg else self._rx + 1
        self._queue.append(ProtocolError(status, details, stream))
        self._dead = True
        # The connection closes after the error's reply, not after the replies to the
        # requests before it (whose responses must not depend on when the bad bytes came).
        self._err_stream = stream

    def _feed(self, data: bytes) -> None:
        self._abort = None
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            if self._bparts:
                self._flush_body()
            self._up_state = _UP_WAIT
            self._up_stream = self._rx
            self._wait_input(data[cast(int, exc.args[0]):])
            return
        except httptools.HttpParserError as exc:
            abort = self._pending_abort()
            if abort is None and isinstance(exc, httptools.HttpParserCallbackError):
                raise                       # a bug in a callback, not the peer's fault
            if self._closing:               # bytes after Connection: close are ignored
                if self._bparts:
                    self._flush_body()
                return
            self._fail(*(abort or _llhttp_error(exc)))
            return
        if self._bparts:
            self._flush_body()
        if self._in_head:
            # llhttp buffers a field until its end: bound what one unfinished head may hold.
            self._head_raw += len(data)
            if self._head_raw > 2 * self._max_size + 16384:
                self._fail(431, HEADERS_TOO_LARGE)

    def _wait_input(self, data: bytes) -> None:
        """Bytes after an upgrade request, before (or after a refused) upgrade: first the
        request's own Content-Length body, then the rest is kept raw."""
        left = self._up_body_left
        if left and data:
            chunk = data[:left]
            self._up_body_left = left = left - len(chunk)
            self._queue.append(Body(self._up_stream, chunk))
            data = data[len(chunk):]
            if not left and (self._up_state == _UP_REJECTED or self._waiting_h2c()):
                self._end_request()
        if data:
            self._rest += data

    def _waiting_h2c(self) -> bool:
        req = self._requests.get(self._up_stream)
        return req is not None and req.upgrade_token == "h2c"

    def _end_request(self) -> None:
        if self._rx_done < self._up_stream:
            self._queue.append(EndStream(self._up_stream))
            self._rx_done = self._up_stream

    # ------------------------------------------------------------------ receiving

    def receive(self, data: bytes) -> list[Event]:
        """Bytes read from the connection (``b""``: EOF). Returns the events that may be seen
        now; later requests wait for :meth:`resume`."""
        if self._dead:
            return []
        if not data:
            return self._eof()
        state = self._up_state
        if state == _UP_TUNNEL:
            if not self._queue:
                return [Body(self._up_stream, data)]
            self._queue.append(Body(self._up_stream, data))
        elif state != _UP_NONE:
            if state == _UP_H2C:
                self._rest += data
            else:
                self._wait_input(data)
        elif not self._closing:
            self._feed(data)
        return self._drain()

    def resume(self) -> list[Event]:
        """Events that became visible since the last call: the next pipelined request once a
        response ended, the bytes following an accepted upgrade, the ``EndStream`` of a
        refused one."""
        return self._drain()

    @property
    def buffered_input(self) -> int:
        """Bytes received but not yet returned as events (held requests, upgrade leftovers)."""
        n = len(self._rest)
        for ev in self._queue:
            if isinstance(ev, Body):
                n += len(ev.data)
            elif isinstance(ev, RequestHeaders):
                n += len(ev.head.path) + ev.head.headers.byte_size()
        return n

    def take_rest(self) -> bytes:
        """The unparsed bytes after an upgrade request (for ``h2c``: what the HTTP/2 codec
        takes over). Only while the request waits for its answer or after a 101 to ``h2c``,
        and once its Content-Length body has been read; the codec is finished afterwards."""
        if self._up_state not in (_UP_WAIT, _UP_H2C) or self._up_body_left:
            raise RuntimeError("take_rest: no complete upgrade request pending")
        rest = bytes(self._rest)
        self._rest = bytearray()
        self._dead = True
        self._must_close = True
        return rest

    def _eof(self) -> list[Event]:
        self._dead = True
        state = self._up_state
        if state == _UP_TUNNEL:
            self._queue.append(EndStream(self._up_stream))
        elif state != _UP_NONE and self._up_body_left:
            self._queue.append(ProtocolError(0, CODEC_ERROR, self._up_stream))
        elif state == _UP_NONE and self._in_msg and not self._closing:
            self._queue.append(ProtocolError(0, CODEC_ERROR, self._rx))
        else:
            self._queue.append(ConnectionClosed(last_stream=self._rx))
        return self._drain()

    # ------------------------------------------------------------------ sending

    def send_informational(self, stream: int, head: ResponseHead) -> None:
        parts = [_STATUS_LINES.get(head.status) or _status_line(head.status)]
        for k, v in head.headers.items():
            if k not in _HOP_BY_HOP and k != "content-length":
                parts.append(f"{k}: {v}\r\n")
        parts.append("\r\n")
        self._out.append(_encode_head(parts))

    def send_headers(self, stream: int, head: ResponseHead, end_stream: bool) -> None:
        req = self._requests.get(stream, _NO_REQUEST)
        status = head.status
        tunnel = False
        if self._up_state == _UP_WAIT and stream == self._up_stream:
            if (200 <= status < 300) if req.connect else status == 101:
                tunnel = True
            else:
                self._up_state = _UP_REJECTED
                if not self._up_body_left:
                    self._end_request()
        keep_alive = req.keep_alive and not self._closes_at(stream) and not tunnel
        if end_stream and self._rx_done < stream:
            keep_alive = False              # answered before the request ended: Envoy closes
        no_body = (status < 200 or status == 204 or status == 304 or req.method == "HEAD"
                   or tunnel)
        parts = [_STATUS_LINES.get(status) or _status_line(status)]
        content_length: str | None = None
        for k, v in head.headers.items():
            if k in _HOP_BY_HOP:
                if k == "upgrade" and tunnel and status == 101:
                    parts.append(f"upgrade: {v}\r\n")
                elif k == "connection" and "close" in v.lower():
                    keep_alive = False      # the HCM asks to close (drain, local reply)
                continue
            if k == "content-length":
                if status < 200 or status == 204 or tunnel:
                    continue                # RFC 9110 §8.6: never on 1xx / 204 / 2xx CONNECT
                content_length = v
            parts.append(f"{k}: {v}\r\n")
        if tunnel:
            mode = _RAW
            if status == 101:
                parts.append("connection: upgrade\r\n")
        elif no_body:
            mode = _NONE
        elif content_length is not None:
            mode = _RAW
        elif end_stream:
            parts.append("content-length: 0\r\n")
            mode = _NONE
        elif req.http10:
            mode = _RAW                     # no chunked in HTTP/1.0: the close delimits
            keep_alive = False
        else:
            parts.append("transfer-encoding: chunked\r\n")
            mode = _CHUNKED
        if not tunnel:
            if not keep_alive:
                parts.append("connection: close\r\n")
            elif req.http10:                # a 1.0 client assumes close otherwise
                parts.append("connection: keep-alive\r\n")
        if not keep_alive:
            self._must_close = True
        parts.append("\r\n")
        self._out.append(_encode_head(parts))
        self._tx_mode = mode
        if tunnel:
            if req.upgrade_token == "h2c":
                self._up_state = _UP_H2C    # the bytes stay for take_rest()
            else:
                self._up_state = _UP_TUNNEL
                self._up_body_left = 0
                if self._rest:
                    self._queue.append(Body(stream, bytes(self._rest)))
                    self._rest = bytearray()
        elif end_stream:
            self._response_done(stream)

    def send_body(self, stream: int, data: bytes) -> None:
        mode = self._tx_mode
        if not data or mode == _NONE:
            return
        if mode == _CHUNKED:
            self._out += (b"%x\r\n" % len(data), data, b"\r\n")
        else:
            self._out.append(data)

    def send_end(self, stream: int, trailers: HeaderMap | None = None) -> None:
        if self._tx_mode == _CHUNKED:
            self._out.append(_trailer_bytes(trailers))
        self._tx_mode = _NONE
        if self._up_state in (_UP_TUNNEL, _UP_H2C):
            return
        self._response_done(stream)

    def _closes_at(self, stream: int) -> bool:
        return self._must_close or 0 < self._err_stream <= stream

    def _response_done(self, stream: int) -> None:
        self._requests.pop(stream, None)
        if self._rx_done < stream:
            self._must_close = True         # Envoy closes when the response beat the request
        if self._closes_at(stream):
            self._queue = [ev for ev in self._queue
                           if not isinstance(ev, ConnectionClosed) and ev.stream <= stream]
            return
        self._served = stream + 1
        if self._up_state == _UP_REJECTED:
            # The refused upgrade's leftovers are HTTP/1 again: a new parser (llhttp stays
            # paused after an upgrade) continues the numbering.
            self._up_state = _UP_NONE
            rest = bytes(self._rest)
            self._rest = bytearray()
            self._parser = _request_parser(self._cb)
            self._in_msg = False
            if rest and not self._dead:
                self._feed(rest)

    def reset(self, stream: int) -> None:
        self._must_close = True
        self._tx_mode = _NONE

    @property
    def input_pending(self) -> bool:
        """The peer may still be sending what this codec will not read: a request it is in
        the middle of (answered early), or input that broke the protocol."""
        return self._in_msg or self._dead

    @property
    def keep_alive(self) -> bool:
        if self._closes_at(self._served) or self._up_state in (_UP_TUNNEL, _UP_H2C):
            return False
        req = self._requests.get(self._served)
        return req.keep_alive if req is not None else True

    def close(self) -> None:
        pass

    def shutdown_notice(self) -> None:
        pass


# ============================================================================= client side


class H1ClientCodec(_Output):
    """The upstream side of one HTTP/1.1 connection: one request at a time (no pipelining,
    like Envoy's HTTP/1 connection pool)."""

    __slots__ = (
        "_abort",
        "_bparts",
        "_cb",
        "_cl",
        "_close_delimited",
        "_conn_field",
        "_connect",
        "_dead",
        "_events",
        "_hcount",
        "_hdrs",
        "_head_only",
        "_hsize",
        "_in_head",
        "_info",
        "_last_stream",
        "_max_count",
        "_max_size",
        "_msg_done",
        "_next_id",
        "_parser",
        "_partial",
        "_reason",
        "_req_done",
        "_req_mode",
        "_resp_done",
        "_resp_started",
        "_reusable",
        "_stream",
        "_tail",
        "_te",
        "_trailers",
        "_tunnel",
        "_upgrade_req",
        "protocol",
    )

    protocol: Protocol

    def __init__(self, max_response_headers_kb: int = 60, max_headers_count: int = 100) -> None:
        self.protocol = "HTTP/1.1"
        self._max_size = max_response_headers_kb * 1024
        self._max_count = max_headers_count
        self._cb = SimpleNamespace(
            on_message_begin=self._on_message_begin, on_status=self._on_status,
            on_header=self._on_header, on_headers_complete=self._on_headers_complete,
            on_body=self._on_body, on_message_complete=self._on_message_complete)
        self._parser = _response_parser(self._cb)
        self._out: list[bytes] = []
        self._events: list[Event] = []
        self._bparts: list[bytes] = []
        self._next_id = 1
        self._stream = 0                    # the request outstanding, 0 when idle
        self._last_stream = 0
        self._req_mode = _NONE
        self._req_done = True
        self._resp_done = True
        self._resp_started = False          # its ResponseHeaders went out
        self._partial = False               # bytes of an unfinished response head arrived
        self._msg_done = False
        self._info = False                  # the message being parsed is a 1xx
        self._head_only = False             # HEAD / CONNECT: the head is fed alone
        self._connect = False
        self._upgrade_req = False
        self._tunnel = False
        self._close_delimited = False
        self._reusable = True
        self._dead = False
        self._abort: str | None = None
        self._tail = b""
        self._reset_message()

    def _reset_message(self) -> None:
        self._reason = b""
        self._hdrs: list[tuple[str, str]] = []
        self._conn_field = False            # a Connection (or Proxy-Connection) field came
        self._hsize = 0
        self._hcount = 0
        self._cl: str | None = None
        self._te: str | None = None
        self._trailers: list[tuple[str, str]] | None = None
        self._in_head = True

    # ------------------------------------------------------------------ sending

    def new_stream(self) -> int:
        stream = self._next_id
        self._next_id += 1
        return stream

    def send_headers(self, stream: int, head: RequestHead, end_stream: bool) -> None:
        if not self.can_open:
            raise RuntimeError("H1ClientCodec: connection busy or not reusable")
        method = head.method
        connect = method == "CONNECT"
        target = (head.authority or head.path) if connect else head.path
        parts = [f"{method} {target} HTTP/1.1\r\n", f"host: {head.authority}\r\n"]
        upgrade = False
        content_length = False
        for k, v in head.headers.items():
            if k in _HOP_BY_HOP or k == "host":
                if k == "upgrade" and not connect:
                    upgrade = True
                    parts.append(f"upgrade: {v}\r\n")
                continue
            if k == "content-length":
                content_length = True
            parts.append(f"{k}: {v}\r\n")
        if connect:
            mode = _RAW                     # everything after the head is the tunnel
        elif upgrade:
            parts.append("connection: upgrade\r\n")
            mode = _RAW                     # a Content-Length body, then the raw protocol
        elif content_length:
            mode = _RAW
        elif end_stream:
            if method in _BODY_METHODS:
                parts.append("content-length: 0\r\n")
            mode = _NONE
        else:
            parts.append("transfer-encoding: chunked\r\n")
            mode = _CHUNKED
        parts.append("\r\n")
        self._out.append(_encode_head(parts))
        self._stream = self._last_stream = stream
        self._req_mode = mode
        self._req_done = end_stream
        self._resp_done = False
        self._resp_started = False
        self._partial = False
        self._head_only = connect or method == "HEAD"
        self._connect = connect
        self._upgrade_req = upgrade

    def send_body(self, stream: int, data: bytes) -> None:
        if stream != self._stream or self._req_done or not data:
            return
        mode = self._req_mode
        if mode == _CHUNKED:
            self._out += (b"%x\r\n" % len(data), data, b"\r\n")
        elif mode == _RAW:
            self._out.append(data)

    def send_end(self, stream: int, trailers: HeaderMap | None = None) -> None:
        """End the request. In a tunnel nothing is encoded: the caller half-closes."""
        if stream != self._stream or self._req_done:
            return
        if self._req_mode == _CHUNKED:
            self._out.append(_trailer_bytes(trailers))
        self._req_done = True
        if self._resp_done:
            self._stream = 0

    # ------------------------------------------------------------------ parser callbacks

    def _fail_cb(self) -> typing.NoReturn:
        self._abort = (UPSTREAM_PROTOCOL_ERROR_AFTER if self._resp_started
                       else UPSTREAM_PROTOCOL_ERROR_BEFORE)
        raise _Abort

    def _on_message_begin(self) -> None:
        if self._stream == 0 or self._resp_done:
            self._fail_cb()                 # a response nobody asked for
        self._reset_message()
        self._partial = True
        self._msg_done = False
        self._info = False

    def _on_status(self, frag: bytes) -> None:
        self._reason += frag

    def _on_header(self, name: bytes, value: bytes) -> None:
        if value and (value[-1] == 32 or value[-1] == 9):     # SP / HTAB (native compares)
            value = value.rstrip(_OWS)
        self._hcount += 1
        self._hsize += len(name) + len(value)
        if self._hcount > self._max_count or self._hsize > self._max_size:
            self._fail_cb()
        n = _name_str(name)                     # token characters only: ASCII
        v = value.decode("latin-1")
        if not self._in_head:
            if self._trailers is None:
                self._trailers = []
            self._trailers.append((n, v))
            return
        if n in _HOP_BY_HOP:
            if n == "connection" or n == "proxy-connection":
                self._conn_field = True
            elif n == "transfer-encoding":
                self._te = v if self._te is None else f"{self._te}, {v}"
            elif n == "upgrade":
                self._hdrs.append((n, v))   # dropped again unless the status is 101
            return
        if n == "content-length":
            self._cl = v
        self._hdrs.append((n, v))

    def _on_headers_complete(self) -> None:
        self._in_head = False
        self._hcount = 0
        self._hsize = 0
        p = self._parser
        status = p.get_status_code()
        keep_alive = p.should_keep_alive()
        proto: Protocol = "HTTP/1.1"        # see H1ServerCodec._on_headers_complete
        if (not keep_alive or self._conn_field) and p.get_http_version() == "1.0":
            proto = "HTTP/1.0"
        stream = self._stream
        hdrs = self._hdrs
        if status != 101 and any(k == "upgrade" for k, _ in hdrs):
            hdrs[:] = [kv for kv in hdrs if kv[0] != "upgrade"]
        head = ResponseHead(status, HeaderMap.trusted(hdrs), self._reason.decode("latin-1"),
                            proto)
        if status < 200 and status != 101:
            self._info = True
            self._events.append(Informational(stream, head))
            return
        if status == 101:
            if not self._upgrade_req:
                self._fail_cb()
            self._resp_started = True
            self._msg_done = True           # llhttp completes the message, then pauses
            self._reusable = False
            self._events.append(ResponseHeaders(stream, head, False))
            return                          # HttpParserUpgrade follows: see _feed
        te = self._te
        if te is not None and (te.strip().lower() != "chunked" or self._cl is not None):
            self._fail_cb()                 # Envoy: 501 / 400 rules apply to responses too
        if not keep_alive:
            self._reusable = False
        self._resp_started = True
        self._partial = False
        if self._connect and 200 <= status < 300:
            self._tunnel = True
            self._reusable = False
            self._events.append(ResponseHeaders(stream, head, False))
            return
        # RFC 9112 §6.3: no body after HEAD, 1xx, 204, 304; Content-Length 0 is empty too.
        no_body = (self._head_only or status == 204 or status == 304
                   or (te is None and self._cl is not None and int(self._cl) == 0))
        if no_body:
            self._events.append(ResponseHeaders(stream, head, True))
            self._msg_done = True
            self._response_done()
            return
        self._close_delimited = te is None and self._cl is None
        if self._close_delimited:
            self._reusable = False
        self._events.append(ResponseHeaders(stream, head, False))

    def _on_body(self, data: bytes) -> None:
        self._bparts.append(data)

    def _on_message_complete(self) -> None:
        if self._info:                      # a 1xx: the final response is still to come
            self._info = False
            self._partial = False
            return
        if self._msg_done or self._tunnel or not self._resp_started:
            return
        self._msg_done = True
        self._flush_body()
        trailers = self._trailers
        self._events.append(EndStream(self._stream,
                                      HeaderMap.trusted(trailers) if trailers else None))
        self._response_done()

    def _flush_body(self) -> None:
        if self._bparts:
            self._events.append(Body(self._stream, b"".join(self._bparts)))
            self._bparts = []

    def _response_done(self) -> None:
        self._resp_done = True
        self._close_delimited = False
        if not self._req_done:
            # Envoy closes when the response beat the request; the rest of it is not wanted.
            self._reusable = False
            self._req_done = True
        self._stream = 0

    # ------------------------------------------------------------------ receiving

    def _pending_abort(self) -> str | None:
        """What a parser callback set during ``feed_data``. Read through a call: after
        ``self._abort = None`` above it, a plain read is narrowed to None by the type checker,
        and the compiled module (remora.native) would trust that."""
        return self._abort

    def _fail(self, details: str) -> None:
        self._flush_body()
        self._events.append(ProtocolError(0, details, self._stream))
        self._dead = True
        self._reusable = False

    def _feed(self, data: bytes) -> None:
        self._abort = None
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            self._flush_body()
            self._tunnel = True
            rest = data[cast(int, exc.args[0]):]
            if rest:
                self._events.append(Body(self._stream, rest))
            return
        except httptools.HttpParserError as exc:
            abort = self._pending_abort()
            if abort is None and isinstance(exc, httptools.HttpParserCallbackError):
                raise                       # a bug in a callback, not the peer's fault
            self._fail(abort or (UPSTREAM_PROTOCOL_ERROR_AFTER if self._resp_started
                                 else UPSTREAM_PROTOCOL_ERROR_BEFORE))
            return
        self._flush_body()

    def _feed_head_only(self, data: bytes) -> None:
        """HEAD and CONNECT: llhttp cannot be told that the response has no body (HEAD) or
        that a 2xx starts a tunnel (CONNECT), so feed it one head at a time (up to each blank
        line) and take over once the final head is in."""
        while data and self._head_only and not self._dead:
            tail = self._tail
            end = (tail + data).find(b"\r\n\r\n")
            if end < 0:
                self._feed(data)
                self._tail = (tail + data)[-3:]
                return
            cut = end + 4 - len(tail)
            self._tail = b""
            self._feed(data[:cut])
            data = data[cut:]
            if self._dead or not self._resp_started:
                continue                    # a 1xx, or an error
            self._head_only = False
            if self._tunnel:
                if data:
                    self._events.append(Body(self._stream, data))
                return
            if self._resp_done:             # HEAD: llhttp may still wait for a body
                self._parser = _response_parser(self._cb)
        if data and not self._dead:
            if self._tunnel:
                self._events.append(Body(self._stream, data))
            else:
                self._feed(data)

    def receive(self, data: bytes) -> list[Event]:
        if self._dead:
            return []
        if not data:
            self._eof()
        elif self._tunnel:
            return [Body(self._stream, data)]
        elif self._head_only:
            self._feed_head_only(data)
        else:
            self._feed(data)
        events = self._events
        if not events:
            return []
        self._events = []
        return events

    def _eof(self) -> None:
        stream = self._stream
        if self._tunnel:
            self._events.append(EndStream(stream))
        elif stream and not self._resp_done:
            if self._close_delimited:
                self._flush_body()
                self._events.append(EndStream(stream))
                self._resp_done = True
                self._stream = 0
            elif self._resp_started:
                self._events.append(ProtocolError(0, UPSTREAM_CLOSED_AFTER, stream))
            elif self._partial:
                self._events.append(ProtocolError(0, UPSTREAM_PROTOCOL_ERROR_BEFORE, stream))
            else:
                self._events.append(ProtocolError(0, UPSTREAM_CLOSED_BEFORE, stream))
        else:
            self._events.append(ConnectionClosed(last_stream=self._last_stream))
        self._dead = True
        self._reusable = False

    def reset(self, stream: int) -> None:
        self._reusable = False
        self._dead = True

    @property
    def can_open(self) -> bool:
        return self._stream == 0 and self._reusable and not self._dead

    @property
    def reusable(self) -> bool:
        return self._reusable and not self._dead

    @property
    def active_streams(self) -> int:
        return 1 if self._stream else 0

    def close(self) -> None:
        pass
