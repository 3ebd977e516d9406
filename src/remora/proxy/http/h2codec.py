"""HTTP/2 (RFC 9113) for both ends of a connection: ``h2``'s state machine behind the codec shapes.

Owns: :class:`H2ServerCodec` (downstream, :class:`~remora.proxy.http.types.ServerCodec`) and
:class:`H2ClientCodec` (upstream, :class:`~remora.proxy.http.types.ClientCodec`), each wrapping
one ``h2.connection.H2Connection``; the mapping between HTTP/2 header blocks and
:class:`RequestHead` / :class:`ResponseHead`; per-stream send queues for flow control; the
connection's end (GOAWAY, EOF, protocol errors) as events. Sans-IO: bytes in (``receive``),
events out; calls in (``send_*``), bytes out (``data_to_send``).
Must not: do IO, read clocks, log per frame, route, or raise out of ``receive`` for anything the
peer sent (every peer error is an event: :class:`ProtocolError`, :class:`StreamReset`).

The contract a caller relies on:

* **Outbound flow control.** ``send_body`` frames what the peer's windows (stream and
  connection, RFC 9113 §5.2, §6.9) allow and queues the rest for that stream, without limit:
  the caller bounds it by checking ``buffered(stream)`` after each ``send_body`` and pausing its
  source while it is non-zero (or above its own mark). When a WINDOW_UPDATE (or a SETTINGS
  change of the initial window) lets a held-back queue drain completely, ``receive`` returns
  :class:`Writable` for that stream: resume the source. ``send_end`` after queued data is queued
  too (END_STREAM, or the trailers, go out after the last byte).
* **Inbound flow control.** Received DATA is *not* acknowledged by the codec: the caller calls
  ``consumed(stream, n)`` once it has passed ``n`` body bytes on (written them to the other
  side's transport, which was not paused). Only then do WINDOW_UPDATEs go out (``h2``'s window
  manager batches them to half a window), so a slow receiver stops a fast sender and memory stays
  bounded by the windows. Padding, data of streams already reset, and the unconsumed rest of a
  stream that is reset (by either side, or by ``reset()`` after it ended: do that when dropping
  bytes instead of passing them on) are given back to the connection window by the codec.
* **Stream ends.** Headers with ``end_stream=True`` are the whole message (no
  :class:`EndStream` follows); otherwise :class:`Body` events and one :class:`EndStream` (with
  trailers, if any). Every stream the codec still tracks when it dies ends with a
  :class:`StreamReset` event (peer RST_STREAM, refused by GOAWAY, connection lost or broken),
  unless the caller reset it itself; after ``reset(stream)`` nothing more is reported for it.
* **The connection's end.** A GOAWAY from the peer is :class:`ConnectionClosed`
  ``(last_stream, error_code)``: no new streams (``can_open``/``keep_alive`` false); our streams
  above ``last_stream`` were not processed and get ``StreamReset(code=REFUSED_STREAM)`` (safe to
  retry); the others go on to their end (graceful drain, which ``h2`` itself does not allow: the
  codec takes GOAWAY frames out of the byte stream before ``h2`` sees them). End of input
  (``receive(b"")``) is ``ConnectionClosed(last_stream=<highest stream seen>)`` (unless a GOAWAY
  already said it) and ``StreamReset(code=CONNECTION_TERMINATED)`` for every unfinished stream.
  A protocol violation is :class:`ProtocolError` (``status`` 0: HTTP/2 has no local reply for a
  connection error; a GOAWAY is queued) then a reset for every stream. ``close()`` queues our
  GOAWAY (server: ``last_stream`` = the highest request seen; later requests are refused with
  REFUSED_STREAM); streams in flight finish, the caller closes the socket when
  ``active_streams`` is 0.

Defaults, chosen here (Envoy's ``initial_stream_window_size`` and
``initial_connection_window_size`` default to 256 MiB, which bounds nothing): a 256 KiB stream
window (``SETTINGS_INITIAL_WINDOW_SIZE``) and an 8 MiB connection window (opened by a
WINDOW_UPDATE right after the preface). Envoy's edge best practice is 64 KiB / 1 MiB; ours are
larger so that one busy stream is not held back by the per-WINDOW_UPDATE cost of an interpreter,
and 32 stalled streams (a receiver that stopped consuming) are needed to stall the connection.
Frames are 16 KiB (the RFC minimum, what Envoy/nghttp2 advertise); ``MAX_CONCURRENT_STREAMS``
2^31-1 (Envoy's default); a 60 KiB header list (Envoy's ``max_request_headers_kb``).
All are keyword arguments.

Reference: RFC 9113 (framing, §5.1 stream states, §5.2 and §6.9 flow control, §6.8 GOAWAY,
§8.2.2 connection-specific fields, §8.3 pseudo-headers), RFC 7540 §3.2 (h2c upgrade), Envoy
``source/common/http/http2/codec_impl.cc`` behaviour as documented in
``http_protocol_options.proto`` / ``protocol.proto`` (Http2ProtocolOptions). Written from those
descriptions and ``h2``'s public API; no upstream code.

Where this differs from Envoy, on purpose:

* A malformed request (bad header field, missing pseudo-header) is a connection error, which is
  Envoy's default (``override_stream_error_on_invalid_http_message`` false) — and what ``h2``
  does anyway. Exceeding our ``MAX_CONCURRENT_STREAMS`` is one too (``h2``), where nghttp2 would
  refuse the one stream; with the default limit it cannot happen.
* Server push, PRIORITY and ALTSVC are ignored (push is disabled in our SETTINGS); PING is
  answered by ``h2``. Extended CONNECT's ``:protocol`` is reported as ``RequestHeaders.upgrade``.
* The client side does not implement the h2c upgrade (only prior knowledge / ALPN h2).
"""

from __future__ import annotations

import base64
import contextlib
import re
from collections import deque
from typing import TYPE_CHECKING, ClassVar

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings
from h2.connection import ConnectionState
from h2.errors import ErrorCodes
from h2.settings import SettingCodes
from hyperframe.frame import GoAwayFrame

from remora.proxy.http import hpack_codec
from remora.proxy.http.types import (
    Body,
    ClientCodec,
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
    ServerCodec,
    StreamReset,
    Writable,
)
from remora.proxy.http.types import Protocol as HttpProtocol

# ----------------------------------------------------------------------------- constants

NO_ERROR = int(ErrorCodes.NO_ERROR)
PROTOCOL_ERROR = int(ErrorCodes.PROTOCOL_ERROR)
REFUSED_STREAM = int(ErrorCodes.REFUSED_STREAM)   # RFC 9113 §8.7: not processed, safe to retry
CANCEL = int(ErrorCodes.CANCEL)
FRAME_SIZE_ERROR = int(ErrorCodes.FRAME_SIZE_ERROR)
#: ``StreamReset.code`` when the connection ended (EOF) under an unfinished stream: not an
#: RFC 9113 code (those are >= 0); Envoy's reset reason ``ConnectionTermination``.
CONNECTION_TERMINATED = -1

DEFAULT_STREAM_WINDOW = 256 * 1024
DEFAULT_CONNECTION_WINDOW = 8 * 1024 * 1024
DEFAULT_MAX_CONCURRENT_STREAMS = 2**31 - 1
DEFAULT_MAX_HEADER_LIST_SIZE = 60 * 1024

#: What the caller writes, in HTTP/1.1, to accept an ``Upgrade: h2c`` request before the bytes
#: of :meth:`H2ServerCodec.data_to_send` (RFC 7540 §3.2).
SWITCHING_PROTOCOLS_H2C = (b"HTTP/1.1 101 Switching Protocols\r\n"
                           b"Connection: Upgrade\r\nUpgrade: h2c\r\n\r\n")

_TOKEN68_B64URL = re.compile(r"[A-Za-z0-9_-]*=*")   # RFC 7540 §3.2.1: base64url (token68)
_RFC_INITIAL_WINDOW = 65535          # RFC 9113 §6.9.2: every window starts here
_MAX_STREAM_ID = 2**31 - 1
_PREFACE_LEN = 24                    # b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" (RFC 9113 §3.4)
_FRAME_HEADER_LEN = 9
_T_HEADERS, _T_PUSH_PROMISE, _T_GOAWAY, _T_CONTINUATION = 0x1, 0x5, 0x7, 0x9
_F_END_HEADERS = 0x4

# RFC 9113 §8.2.2: connection-specific fields must not appear in HTTP/2 (h2 refuses them);
# ``host`` becomes ``:authority`` (§8.3.1); ``http2-settings`` only means something in the
# HTTP/1.1 upgrade request.
_WS = " \t"
_DROP_OUTBOUND = frozenset({"connection", "keep-alive", "proxy-connection", "transfer-encoding",
                            "upgrade", "host", "http2-settings"})


class _GoAway:
    """A GOAWAY frame taken out of the byte stream (``payload`` None: it was malformed)."""

    __slots__ = ("error", "payload")

    def __init__(self, payload: bytes | None, error: int = 0) -> None:
        self.payload = payload
        self.error = error


class _Stream:
    """What the codec keeps per live stream (beyond ``h2``'s own state)."""

    __slots__ = ("end_pending", "local_done", "queue", "queued", "remote_done", "trailers")

    def __init__(self) -> None:
        self.queue: deque[memoryview] = deque()   # body held back by flow control
        self.queued = 0                           # its length
        self.end_pending = False                  # send_end came while data was queued
        self.trailers: HeaderMap | None = None
        self.local_done = False                   # our END_STREAM is written
        self.remote_done = False                  # the peer's END_STREAM was seen


def _encode(value: str) -> bytes:
    # HeaderMap values are latin-1 views of the wire bytes; a str made by us with characters
    # beyond latin-1 (from configuration) goes out as UTF-8, as Envoy passes bytes through.
    try:
        return value.encode("latin-1")
    except UnicodeEncodeError:
        return value.encode("utf-8")


def _fields(headers: HeaderMap) -> list[tuple[bytes, bytes]]:
    """Regular header fields for a HEADERS frame: without connection-specific fields, ``te``
    other than ``trailers`` (RFC 9113 §8.2.2), or stray pseudo-headers; values without leading
    or trailing whitespace (§8.2.1). Names are lower-case already (HeaderMap's)."""
    out: list[tuple[bytes, bytes]] = []
    for name, value in headers.items():
        if not name or name[0] == ":" or name in _DROP_OUTBOUND:
            continue
        if name == "te" and value.strip().lower() != "trailers":
            continue
        if value and (value[0] in _WS or value[-1] in _WS):
            value = value.strip(_WS)
        out.append((_encode(name), _encode(value)))
    return out


def _details(exc: Exception) -> str:
    """Envoy-style response code details for a connection-level HTTP/2 error."""
    if isinstance(exc, h2.exceptions.FlowControlError):
        return "http2.flow_control_error"
    if isinstance(exc, h2.exceptions.FrameTooLargeError):
        return "http2.frame_too_large"
    if isinstance(exc, h2.exceptions.TooManyStreamsError):
        return "http2.too_many_streams"
    if isinstance(exc, h2.exceptions.DenialOfServiceError):
        return "http2.too_many_headers"
    msg = str(exc).lower()
    if "pseudo" in msg or ":authority" in msg or ":path" in msg:
        return "http2.violation.of.messaging.rule"
    if "header" in msg:
        return "http2.invalid.header.field"
    return "http2.protocol_error"


# ----------------------------------------------------------------------------- shared engine


class _H2Codec:
    protocol: HttpProtocol = "HTTP/2"
    _client: ClassVar[bool]

    def __init__(self, *, stream_window: int, connection_window: int,
                 max_concurrent_streams: int, max_header_list_size: int,
                 upgrade_settings: bytes | None = None) -> None:
        client = self._client
        config = h2.config.H2Configuration(
            client_side=client, header_encoding=None,
            # inbound: h2 checks RFC 9113 §8.2/§8.3 and joins cookie crumbs (§8.2.3)
            validate_inbound_headers=True, normalize_inbound_headers=True,
            # outbound: we build the blocks ourselves (pseudo-headers first, lower-case names,
            # no connection-specific fields, values without surrounding whitespace; the
            # encoder never indexes credentials); h2's check would also refuse a request
            # without :authority, which HTTP/2 allows
            validate_outbound_headers=False, normalize_outbound_headers=False)
        conn = h2.connection.H2Connection(config)
        # Our compiled HPACK in place of hpack's (h2 only calls encode/decode and sets the
        # size limits, which these classes share with hpack's; see hpack_codec)
        conn.encoder = hpack_codec.Encoder()  # type: ignore[assignment]
        conn.decoder = hpack_codec.Decoder()  # type: ignore[assignment]
        initial: dict[SettingCodes, int] = {
            SettingCodes.INITIAL_WINDOW_SIZE: stream_window,
            SettingCodes.MAX_HEADER_LIST_SIZE: max_header_list_size,
        }
        if client:
            initial[SettingCodes.ENABLE_PUSH] = 0
        else:
            initial[SettingCodes.MAX_CONCURRENT_STREAMS] = max_concurrent_streams
        # Replaced before the preface is written, so the SETTINGS frame carries these values and
        # h2 sizes new streams' receive windows with them (the peer can only send less before it
        # applies them, never more).
        conn.local_settings = h2.settings.Settings(client=client, initial_values=initial)
        conn.decoder.max_header_list_size = max_header_list_size
        if upgrade_settings is None:
            conn.initiate_connection()
        else:
            conn.initiate_upgrade_connection(upgrade_settings)
        if connection_window > _RFC_INITIAL_WINDOW:
            # The connection window is not a setting: only a WINDOW_UPDATE on stream 0 grows it
            # (RFC 9113 §6.9.2).
            conn.increment_flow_control_window(connection_window - _RFC_INITIAL_WINDOW)
        self._conn = conn
        self._streams: dict[int, _Stream] = {}
        self._blocked: dict[int, None] = {}       # streams with queued data, in service order
        self._unacked: dict[int, int] = {}        # received body bytes not yet consumed()
        self._out = bytearray()                   # our own frames, after h2's bytes so far
        self._dead = False                        # EOF, protocol error: nothing more happens
        self._goaway_sent = False
        self._goaway_last = _MAX_STREAM_ID        # last peer stream accepted after our GOAWAY
        self._goaway_received = False
        self._peer_last = _MAX_STREAM_ID          # from the peer's GOAWAY
        self._closed_reported = False
        self._pending: list[Event] = []
        # GOAWAY extraction state (see _split)
        self._preface_left = 0 if client else _PREFACE_LEN
        self._hdr = bytearray()                   # a frame header split across reads
        self._left = 0                            # payload bytes of the current frame to come
        self._cap: bytearray | None = None        # a GOAWAY payload being collected
        self._in_block = False                    # inside HEADERS … CONTINUATION

    # ------------------------------------------------------------------ properties

    @property
    def active_streams(self) -> int:
        """Streams not finished in both directions (and not reset)."""
        return len(self._streams)

    @property
    def keep_alive(self) -> bool:
        return not (self._dead or self._goaway_sent or self._goaway_received)

    @property
    def reusable(self) -> bool:
        return self.keep_alive

    def buffered(self, stream: int) -> int:
        st = self._streams.get(stream)
        return st.queued if st is not None else 0

    # ------------------------------------------------------------------ bytes out

    def data_to_send(self) -> bytes:
        if self._out:
            self._out += self._conn.data_to_send()
            data = bytes(self._out)
            self._out.clear()
            return data
        return self._conn.data_to_send()

    def _write_goaway(self, last_stream: int, code: int) -> None:
        # Written by hand: h2's close_connection() moves its state machine to CLOSED, after which
        # it refuses to finish the streams in flight (RFC 9113 §6.8 lets them finish).
        self._out += self._conn.data_to_send()
        self._out += GoAwayFrame(0, last_stream_id=last_stream, error_code=code).serialize()

    # ------------------------------------------------------------------ calls in

    def send_body(self, stream: int, data: bytes) -> None:
        st = self._streams.get(stream)
        if st is None or st.local_done or st.end_pending or self._dead or not data:
            return
        if type(data) is not bytes:
            data = bytes(data)      # a queued view must not pin (or see changes to) a buffer
        st.queue.append(memoryview(data))
        st.queued += len(data)
        if self._pump(stream, st):
            self._blocked.pop(stream, None)
        else:
            self._blocked[stream] = None

    def send_end(self, stream: int, trailers: HeaderMap | None = None) -> None:
        st = self._streams.get(stream)
        if st is None or st.local_done or st.end_pending or self._dead:
            return
        st.end_pending = True
        st.trailers = trailers if trailers else None
        if not st.queue:
            self._finish_local(stream, st)

    def reset(self, stream: int, code: int = CANCEL) -> None:
        """RST_STREAM (CANCEL unless told), queued data dropped; nothing more is reported.
        On a stream that already ended it only gives back what was received and not
        ``consumed`` (so dropping a finished response's body never shrinks the window)."""
        st = self._streams.pop(stream, None)
        if st is None:
            if not self._dead:
                self._release(stream)
            return
        self._blocked.pop(stream, None)
        if self._dead:
            return
        # (h2 refuses if the stream is already closed on its side: nothing to say then)
        with contextlib.suppress(h2.exceptions.H2Error):
            self._conn.reset_stream(stream, code)
        self._release(stream)

    def consumed(self, stream: int, n: int) -> None:
        left = self._unacked.get(stream)
        if not left or n <= 0 or self._dead:
            return
        if n >= left:
            n = left
            del self._unacked[stream]
        else:
            self._unacked[stream] = left - n
        self._conn.acknowledge_received_data(n, stream)

    def shutdown_notice(self) -> None:
        """GOAWAY(NO_ERROR) with the largest stream id (RFC 9113 §6.8's graceful shutdown):
        the client should open no more streams, but any it sends meanwhile are still taken.
        :meth:`close` sends the final GOAWAY."""
        if self._dead or self._goaway_sent:
            return
        self._write_goaway(_MAX_STREAM_ID, NO_ERROR)

    def close(self) -> None:
        """GOAWAY(NO_ERROR): no new streams; those in flight go on."""
        if self._dead or self._goaway_sent:
            return
        self._goaway_sent = True
        self._goaway_last = self._conn.highest_inbound_stream_id
        self._write_goaway(self._goaway_last, NO_ERROR)

    # ------------------------------------------------------------------ bytes in

    def receive(self, data: bytes) -> list[Event]:
        out, self._pending = self._pending, []
        if self._dead:
            return out
        if not data:
            self._eof(out)
            return out
        for piece in self._split(data):
            if isinstance(piece, _GoAway):
                self._on_goaway(piece, out)
            else:
                try:
                    events = self._conn.receive_data(piece)
                except Exception as exc:
                    # Whatever h2 (or hpack/hyperframe below it) raises on these bytes ends the
                    # connection: never let it out of the codec. h2 has queued a GOAWAY (and
                    # closed its state machine) for the ProtocolErrors it raised while
                    # handling a frame, not for a bad preface or anything else.
                    self._fail(exc, out, answered=(
                        isinstance(exc, h2.exceptions.ProtocolError)
                        and self._conn.state_machine.state is ConnectionState.CLOSED))
                else:
                    self._translate(events, out)
            if self._dead:
                break
        return out

    def _split(self, data: bytes) -> list[bytes | _GoAway]:
        """Cut GOAWAY frames out of ``data``; everything else goes to h2 unchanged (and without
        a copy when no frame header straddles reads and no GOAWAY is in ``data``)."""
        out: list[bytes | _GoAway] = []
        run: list[bytes | memoryview] = []
        mv = memoryview(data)
        n = len(data)
        i = start = 0              # [start, i) is a stretch that passes through
        while i < n:
            if self._preface_left:
                k = min(self._preface_left, n - i)
                self._preface_left -= k
                i += k
                continue
            if self._left:
                k = min(self._left, n - i)
                if self._cap is not None:
                    self._cap += mv[i:i + k]
                i += k
                self._left -= k
                if self._cap is not None and not self._left:
                    out.append(_GoAway(bytes(self._cap)))
                    self._cap = None
                    start = i
                continue
            # At a frame header.
            if self._hdr or n - i < _FRAME_HEADER_LEN:
                if i > start:
                    run.append(mv[start:i])
                k = min(_FRAME_HEADER_LEN - len(self._hdr), n - i)
                self._hdr += mv[i:i + k]
                i += k
                start = i
                if len(self._hdr) < _FRAME_HEADER_LEN:
                    break
                hdr = bytes(self._hdr)
                self._hdr.clear()
                held = True
            else:
                hdr = bytes(mv[i:i + _FRAME_HEADER_LEN])
                held = False
            length = int.from_bytes(hdr[0:3], "big")
            ftype, flags = hdr[3], hdr[4]
            if ftype == _T_GOAWAY and not self._in_block:
                # (inside a header block h2 must see it: that is its protocol error)
                if not held:
                    if i > start:
                        run.append(mv[start:i])
                    i += _FRAME_HEADER_LEN
                    start = i
                if run:
                    out.append(b"".join(run))
                    run = []
                sid = int.from_bytes(hdr[5:9], "big") & 0x7FFFFFFF
                if sid != 0:                                    # RFC 9113 §6.8
                    out.append(_GoAway(None, PROTOCOL_ERROR))
                    return out
                if length < 8 or length > self._conn.max_inbound_frame_size:   # §4.2
                    out.append(_GoAway(None, FRAME_SIZE_ERROR))
                    return out
                self._cap = bytearray()
                self._left = length
                continue
            if held:
                run.append(hdr)
            else:
                i += _FRAME_HEADER_LEN
            self._left = length
            if ftype in (_T_HEADERS, _T_PUSH_PROMISE, _T_CONTINUATION):
                self._in_block = not flags & _F_END_HEADERS
        if self._cap is None and i > start:
            if not run and start == 0 and i == n:
                out.append(data)
                return out
            run.append(mv[start:i])
        if run:
            out.append(b"".join(run))
        return out

    def _translate(self, events: list[h2.events.Event], out: list[Event]) -> None:
        flush = False
        for ev in events:
            if isinstance(ev, h2.events.DataReceived):
                self._on_data(ev, out)
            elif isinstance(ev, h2.events.StreamEnded):
                st = self._streams.get(ev.stream_id)
                if st is not None and not st.remote_done:
                    st.remote_done = True
                    out.append(EndStream(ev.stream_id))
                    self._maybe_done(ev.stream_id, st)
            elif isinstance(ev, h2.events.TrailersReceived):
                st = self._streams.get(ev.stream_id)
                if st is not None and not st.remote_done:
                    st.remote_done = True
                    out.append(EndStream(ev.stream_id, HeaderMap.trusted(
                        [(k.decode("latin-1"), v.decode("latin-1")) for k, v in ev.headers])))
                    self._maybe_done(ev.stream_id, st)
            elif isinstance(ev, (h2.events.WindowUpdated, h2.events.RemoteSettingsChanged)):
                flush = True
            elif isinstance(ev, h2.events.StreamReset):
                st = self._streams.pop(ev.stream_id, None)
                if st is not None:
                    self._blocked.pop(ev.stream_id, None)
                    self._release(ev.stream_id)
                    out.append(StreamReset(ev.stream_id, int(ev.error_code),
                                           remote=ev.remote_reset))
            elif isinstance(ev, h2.events.ConnectionTerminated):   # not expected: see _split
                payload = (int(ev.last_stream_id or 0).to_bytes(4, "big")
                           + int(ev.error_code or 0).to_bytes(4, "big"))
                self._on_goaway(_GoAway(payload), out)
            else:
                self._on_headers(ev, out)
        if flush and self._blocked and not self._dead:
            self._flush_blocked(out)

    def _on_headers(self, ev: h2.events.Event, out: list[Event]) -> None:
        """Request / response / informational heads (side-specific); other events: ignored."""

    def _on_data(self, ev: h2.events.DataReceived, out: list[Event]) -> None:
        sid = ev.stream_id
        data = ev.data or b""
        flow = ev.flow_controlled_length or 0
        st = self._streams.get(sid)
        if st is None or st.remote_done:
            # A stream we reset or refused: nobody will consume it, give the window back.
            if flow:
                self._conn.acknowledge_received_data(flow, sid)
            return
        if flow > len(data):
            # Padding counts against the windows but is nobody's to consume (§6.1).
            self._conn.acknowledge_received_data(flow - len(data), sid)
        if data:
            self._unacked[sid] = self._unacked.get(sid, 0) + len(data)
            out.append(Body(sid, data))

    def _release(self, stream: int) -> None:
        """The stream is gone: its unconsumed bytes go back to the connection window."""
        left = self._unacked.pop(stream, 0)
        if left and not self._dead:
            self._conn.acknowledge_received_data(left, stream)

    def _maybe_done(self, stream: int, st: _Stream) -> None:
        if st.local_done and st.remote_done:
            self._streams.pop(stream, None)
            self._blocked.pop(stream, None)

    # ------------------------------------------------------------------ flow control

    def _pump(self, stream: int, st: _Stream) -> bool:
        """Frame queued data while the windows allow; True once the queue is empty (and a
        pending end has been sent)."""
        conn = self._conn
        q = st.queue
        while q:
            window = min(conn.local_flow_control_window(stream), conn.max_outbound_frame_size)
            if window <= 0:
                return False
            parts: list[memoryview] = []
            size = 0
            # coalesce small writes into full frames
            while q and size < window:
                chunk = q[0]
                need = window - size
                if len(chunk) <= need:
                    parts.append(q.popleft())
                    size += len(chunk)
                else:
                    parts.append(chunk[:need])
                    q[0] = chunk[need:]
                    size += need
            conn.send_data(stream, parts[0].tobytes() if len(parts) == 1 else b"".join(parts))
            st.queued -= size
        if st.end_pending:
            self._finish_local(stream, st)
        return True

    def _flush_blocked(self, out: list[Event]) -> None:
        for sid in list(self._blocked):
            st = self._streams.get(sid)
            if st is None:
                self._blocked.pop(sid, None)
                continue
            source_open = not st.end_pending
            if self._pump(sid, st):
                self._blocked.pop(sid, None)
                if source_open:
                    out.append(Writable(sid))
            else:
                # Round robin: the next window goes to the others first.
                del self._blocked[sid]
                self._blocked[sid] = None

    def _finish_local(self, stream: int, st: _Stream) -> None:
        st.end_pending = False
        trailers, st.trailers = st.trailers, None
        if trailers:
            self._conn.send_headers(stream, _fields(trailers), end_stream=True)
        else:
            self._conn.end_stream(stream)
        st.local_done = True
        self._maybe_done(stream, st)

    # ------------------------------------------------------------------ the connection's end

    def _own_stream(self, stream: int) -> bool:
        return stream % 2 == (1 if self._client else 0)

    def _on_goaway(self, g: _GoAway, out: list[Event]) -> None:
        if g.payload is None:
            self._fail(h2.exceptions.ProtocolError("malformed GOAWAY"), out, g.error)
            return
        last = int.from_bytes(g.payload[0:4], "big") & 0x7FFFFFFF
        code = int.from_bytes(g.payload[4:8], "big")
        last = min(last, self._peer_last)       # §6.8: it may only go down
        self._peer_last = last
        self._goaway_received = True
        self._closed_reported = True
        out.append(ConnectionClosed(last, code))
        for sid in sorted(s for s in self._streams if s > last and self._own_stream(s)):
            self._streams.pop(sid)
            self._blocked.pop(sid, None)
            self._release(sid)
            out.append(StreamReset(sid, REFUSED_STREAM, remote=True))

    def _eof(self, out: list[Event]) -> None:
        if not self._closed_reported:
            self._closed_reported = True
            conn = self._conn
            out.append(ConnectionClosed(
                max(conn.highest_inbound_stream_id, conn.highest_outbound_stream_id), NO_ERROR))
        self._die(out, CONNECTION_TERMINATED, remote=True)

    def _fail(self, exc: Exception, out: list[Event], code: int | None = None,
              *, answered: bool = False) -> None:
        """A connection error: GOAWAY (unless h2 ``answered`` it already), then events."""
        if code is None:
            code = int(getattr(exc, "error_code", None) or PROTOCOL_ERROR)
        if not answered:
            self._write_goaway(self._conn.highest_inbound_stream_id, code)
        out.append(ProtocolError(0, _details(exc)))
        self._closed_reported = True
        self._die(out, code, remote=False)

    def _die(self, out: list[Event], code: int, *, remote: bool) -> None:
        self._dead = True
        for sid in sorted(self._streams):
            out.append(StreamReset(sid, code, remote=remote))
        self._streams.clear()
        self._blocked.clear()
        self._unacked.clear()


# ----------------------------------------------------------------------------- server


class H2ServerCodec(_H2Codec):
    """The downstream side: requests in, responses out.

    Stream ids are the client's (odd). :meth:`send_headers` with ``end_stream`` or
    :meth:`send_end` finishes our side; the stream is forgotten once both sides are done.
    """

    _client = False

    def __init__(self, *, stream_window: int = DEFAULT_STREAM_WINDOW,
                 connection_window: int = DEFAULT_CONNECTION_WINDOW,
                 max_concurrent_streams: int = DEFAULT_MAX_CONCURRENT_STREAMS,
                 max_header_list_size: int = DEFAULT_MAX_HEADER_LIST_SIZE,
                 _upgrade_settings: bytes | None = None) -> None:
        super().__init__(stream_window=stream_window, connection_window=connection_window,
                         max_concurrent_streams=max_concurrent_streams,
                         max_header_list_size=max_header_list_size,
                         upgrade_settings=_upgrade_settings)

    @classmethod
    def from_upgrade(cls, settings_header: str, head: RequestHead, end_stream: bool = True,
                     body: bytes = b"", **options: int) -> H2ServerCodec:
        """A codec for a connection switched from HTTP/1.1 by ``Upgrade: h2c`` (RFC 7540 §3.2).

        ``settings_header`` is the request's ``HTTP2-Settings`` value (base64url, padding
        optional); ``head`` the HTTP/1.1 request, which becomes stream 1, already complete on
        the client's side: ``end_stream`` true when it had no body, else ``body`` is all of it
        (the caller must have read the whole request before switching). Raises ``ValueError``
        for a bad ``HTTP2-Settings`` (then do not upgrade: answer in HTTP/1.1).

        The caller then writes, in this order: :data:`SWITCHING_PROTOCOLS_H2C` (its own HTTP/1.1
        ``101``), then :meth:`data_to_send` (our SETTINGS, the server preface), then whatever
        later calls produce (the response on stream 1 included). Bytes the client sent after
        its request (its preface, SETTINGS …) go to :meth:`receive`. The stream-1 events
        (:class:`RequestHeaders`, then :class:`Body`/:class:`EndStream` if it had a body) come
        from :meth:`initial_events` or, if not taken, ahead of the first :meth:`receive`'s.
        ``consumed`` is not needed for that body (it was not flow-controlled).
        """
        value = settings_header.strip()
        if not _TOKEN68_B64URL.fullmatch(value):
            # (the decoder would skip stray characters instead of refusing them)
            raise ValueError(f"bad HTTP2-Settings: {settings_header!r}")
        try:
            raw = base64.urlsafe_b64decode(value + "=" * (-len(value) % 4))
            codec = cls(_upgrade_settings=base64.urlsafe_b64encode(raw), **options)
        except Exception as exc:   # binascii, h2 settings validation, hyperframe frame body
            raise ValueError(f"bad HTTP2-Settings: {exc}") from exc
        req = head.copy()
        req.protocol = "HTTP/2"
        named = {t.strip().lower() for v in req.headers.get_all("connection") for t in v.split(",")}
        for name in _DROP_OUTBOUND | named:
            if name and name != "host":
                req.headers.remove(name)
        te = req.headers.get("te")
        if te is not None and te.strip().lower() != "trailers":
            req.headers.remove("te")
        st = _Stream()
        st.remote_done = True          # h2: stream 1 is half-closed (remote)
        codec._streams[1] = st
        no_body = end_stream and not body
        codec._pending.append(RequestHeaders(
            1, req, no_body, expect_continue=_expects_continue(req.headers)))
        if not no_body:
            if body:
                codec._pending.append(Body(1, bytes(body)))
            codec._pending.append(EndStream(1))
        return codec

    def initial_events(self) -> list[Event]:
        """The events of an upgraded request (stream 1); empty otherwise or once taken."""
        out, self._pending = self._pending, []
        return out

    def send_informational(self, stream: int, head: ResponseHead) -> None:
        st = self._streams.get(stream)
        if st is None or self._dead or st.local_done:
            return
        if not 100 <= head.status < 200 or head.status == 101:
            # RFC 9113 §8.6: there is no 101 in HTTP/2
            raise ValueError(f"not an HTTP/2 informational status: {head.status}")
        self._conn.send_headers(stream, [(b":status", str(head.status).encode()),
                                         *_fields(head.headers)])

    def send_headers(self, stream: int, head: ResponseHead, end_stream: bool) -> None:
        st = self._streams.get(stream)
        if st is None or self._dead or st.local_done:
            return
        self._conn.send_headers(stream, [(b":status", str(head.status).encode()),
                                         *_fields(head.headers)], end_stream=end_stream)
        if end_stream:
            st.local_done = True
            self._maybe_done(stream, st)

    def _on_headers(self, ev: h2.events.Event, out: list[Event]) -> None:
        if not isinstance(ev, h2.events.RequestReceived):
            return                  # priority, ping, settings ack, unknown frames …
        sid = ev.stream_id
        if self._goaway_sent and sid > self._goaway_last:
            # after our GOAWAY: not processed, the client may retry elsewhere (§6.8)
            self._conn.reset_stream(sid, REFUSED_STREAM)
            return
        method = path = authority = protocol = ""
        scheme = "http"
        host: str | None = None
        items: list[tuple[str, str]] = []
        for name, value in ev.headers:
            if name[:1] == b":":
                v = value.decode("latin-1")
                if name == b":method":
                    method = v
                elif name == b":path":
                    path = v
                elif name == b":authority":
                    authority = v
                elif name == b":scheme":
                    scheme = v
                elif name == b":protocol":
                    protocol = v
            elif name == b"host":
                # RFC 9113 §8.3.1: :authority wins; one field for routing either way (h2 has
                # checked that both, when present, agree)
                host = value.decode("latin-1")
            else:
                items.append((name.decode("latin-1"), value.decode("latin-1")))
        headers = HeaderMap.trusted(items)
        head = RequestHead(method=method, path=path, authority=authority or host or "",
                           scheme=scheme, headers=headers, protocol="HTTP/2")
        end = ev.stream_ended is not None
        st = _Stream()
        st.remote_done = end
        self._streams[sid] = st
        out.append(RequestHeaders(sid, head, end, upgrade=protocol.lower(),
                                  expect_continue=_expects_continue(headers)))


def _expects_continue(headers: HeaderMap) -> bool:
    v = headers.get("expect")
    return v is not None and v.strip().lower() == "100-continue"


# ----------------------------------------------------------------------------- client


class H2ClientCodec(_H2Codec):
    """The upstream side: requests out, responses in. Call :meth:`new_stream` then
    :meth:`send_headers` for it before the next :meth:`new_stream` (ids must go out in order,
    RFC 9113 §5.1.1)."""

    _client = True

    def __init__(self, *, stream_window: int = DEFAULT_STREAM_WINDOW,
                 connection_window: int = DEFAULT_CONNECTION_WINDOW,
                 max_header_list_size: int = DEFAULT_MAX_HEADER_LIST_SIZE) -> None:
        super().__init__(stream_window=stream_window, connection_window=connection_window,
                         max_concurrent_streams=0, max_header_list_size=max_header_list_size)
        self._next_stream = 1

    @property
    def can_open(self) -> bool:
        conn = self._conn
        return (self.reusable and self._next_stream <= _MAX_STREAM_ID
                and conn.open_outbound_streams < conn.remote_settings.max_concurrent_streams)

    def new_stream(self) -> int:
        sid = self._next_stream
        self._next_stream += 2
        return sid

    def send_headers(self, stream: int, head: RequestHead, end_stream: bool) -> None:
        if self._dead or stream in self._streams:
            return
        authority = head.authority or head.headers.get("host") or ""
        block: list[tuple[bytes, bytes]] = [(b":method", _encode(head.method))]
        if head.method == "CONNECT":
            # RFC 9113 §8.5: only :method and :authority
            block.append((b":authority", _encode(authority)))
        else:
            block.append((b":scheme", _encode(head.scheme or "http")))
            if authority:
                block.append((b":authority", _encode(authority)))
            block.append((b":path", _encode(head.path or "/")))
        block += _fields(head.headers)
        self._conn.send_headers(stream, block, end_stream=end_stream)
        st = _Stream()
        st.local_done = end_stream
        self._streams[stream] = st

    def _on_headers(self, ev: h2.events.Event, out: list[Event]) -> None:
        if isinstance(ev, h2.events.ResponseReceived):
            final = True
        elif isinstance(ev, h2.events.InformationalResponseReceived):
            final = False
        else:
            return
        sid = ev.stream_id
        st = self._streams.get(sid)
        if st is None:
            return
        status = -1
        items: list[tuple[str, str]] = []
        for name, value in ev.headers:
            if name == b":status":
                if value.isdigit() and len(value) == 3:
                    status = int(value)
            elif name[:1] != b":":
                items.append((name.decode("latin-1"), value.decode("latin-1")))
        if status < 0 or (final and status < 200) or (not final and status == 101):
            # a malformed response is a stream error (RFC 9113 §8.1.1)
            self.reset(sid, PROTOCOL_ERROR)
            out.append(StreamReset(sid, PROTOCOL_ERROR, remote=False))
            return
        head = ResponseHead(status=status, headers=HeaderMap.trusted(items), protocol="HTTP/2")
        if not final:
            out.append(Informational(sid, head))
            return
        assert isinstance(ev, h2.events.ResponseReceived)
        end = ev.stream_ended is not None
        if end:
            st.remote_done = True
        out.append(ResponseHeaders(sid, head, end))
        if end:
            self._maybe_done(sid, st)


if TYPE_CHECKING:   # the codec shapes are structural: let mypy hold us to them
    def _conforms(s: H2ServerCodec, c: H2ClientCodec) -> tuple[ServerCodec, ClientCodec]:
        return s, c
