"""Plain types shared by the HTTP codecs, the routing tables and the connection manager.

Owns: :class:`HeaderMap` (ordered, lower-case names, ``str`` values decoded as latin-1 the way
RFC 9110 treats obs-text), request and response heads, and the events a codec turns bytes
into. A codec is sans-IO: bytes in (``receive``), events out; calls in (``send_*``), bytes out.
Must not: do IO, or know about routes and clusters.

Pseudo-headers are not stored in :class:`HeaderMap`: ``:method``, ``:path``, ``:authority``,
``:scheme`` are fields of :class:`RequestHead` and ``:status`` of :class:`ResponseHead`. For
HTTP/1.1 the ``Host`` header is the authority (it is removed from the map on receipt and written
back by the HTTP/1 encoder), so routing and logging read one field whatever the protocol.
"""

from __future__ import annotations

import typing
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Final, Literal

Protocol = Literal["HTTP/1.0", "HTTP/1.1", "HTTP/2"]

# Names given to add/set/remove, lowered once: they come from the code and the config (the
# codecs build maps with :meth:`HeaderMap.trusted`), so there are few of them, and a dict hit
# on a str whose hash is cached is cheaper than ``str.islower`` (a Unicode database lookup per
# character) or ``str.lower`` (a new string) on every call. Bounded all the same.
_LOWERED: Final[dict[str, str]] = {}
_LOWERED_MAX: Final = 4096


def lower_name(name: str) -> str:
    low = _LOWERED.get(name)
    if low is None:
        low = name.lower()
        if len(_LOWERED) < _LOWERED_MAX:
            _LOWERED[name] = low
    return low


class HeaderMap:
    """Ordered header fields; names are lower-case ``str``. Cheap for the handful of headers a
    request carries (a list, scanned)."""

    __slots__ = ("_items",)

    def __init__(self, items: Iterable[tuple[str, str]] = ()) -> None:
        self._items: list[tuple[str, str]] = [(k.lower(), v) for k, v in items]

    @staticmethod
    def trusted(items: list[tuple[str, str]]) -> HeaderMap:
        """Adopt ``items`` as is (names already lower-case): the codecs' fast path."""
        h = HeaderMap()
        h._items = items
        return h

    def get(self, name: str, default: str | None = None) -> str | None:
        for k, v in self._items:
            if k == name:
                return v
        return default

    def get_all(self, name: str) -> list[str]:
        return [v for k, v in self._items if k == name]

    def __contains__(self, name: object) -> bool:
        for k, _ in self._items:  # noqa: SIM110  (a loop is cheaper than any() over a genexpr)
            if k == name:
                return True
        return False

    def add(self, name: str, value: str) -> None:
        self._items.append((lower_name(name), value))

    def set(self, name: str, value: str) -> None:
        """Replace every ``name`` field by one (in the first one's place)."""
        name = lower_name(name)
        items = self._items
        n = len(items)
        i = 0
        while i < n and items[i][0] != name:
            i += 1
        if i == n:
            items.append((name, value))
            return
        j = i + 1
        while j < n and items[j][0] != name:
            j += 1
        if j == n:                          # the usual case: one field, replaced in place
            items[i] = (name, value)
            return
        self._items = items[:i] + [(name, value)] + [kv for kv in items[i + 1:] if kv[0] != name]

    def setdefault(self, name: str, value: str) -> str:
        got = self.get(name)
        if got is None:
            self.add(name, value)
            return value
        return got

    def remove(self, name: str) -> None:
        name = lower_name(name)
        if name in self:
            self._items = [(k, v) for k, v in self._items if k != name]

    def items(self) -> list[tuple[str, str]]:
        return self._items

    def __iter__(self) -> Iterator[tuple[str, str]]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def copy(self) -> HeaderMap:
        return HeaderMap.trusted(list(self._items))

    def byte_size(self) -> int:
        """Envoy's header-size accounting: name + value lengths."""
        return sum(len(k) + len(v) for k, v in self._items)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, HeaderMap) and self._items == other._items

    def __repr__(self) -> str:
        return f"HeaderMap({self._items!r})"


# Each dataclass here writes its __init__ out: the one dataclasses generates is Python
# source, which stays interpreted in a compiled module (thousands of instructions per
# request over the events and heads of one exchange).

@dataclass(slots=True)
class RequestHead:
    """A request's head. ``path`` is the request target as sent (``/a/b?q=1``); ``authority``
    is ``Host`` (HTTP/1) or ``:authority`` (HTTP/2), ``""`` when absent."""

    method: str
    path: str
    authority: str = ""
    scheme: str = "http"
    headers: HeaderMap = field(default_factory=HeaderMap)
    protocol: Protocol = "HTTP/1.1"

    def __init__(self,
                 method: str, path: str, authority: str = "", scheme: str = "http",
                 headers: HeaderMap | None = None, protocol: Protocol = "HTTP/1.1") -> None:
        self.method = method
        self.path = path
        self.authority = authority
        self.scheme = scheme
        self.headers = HeaderMap() if headers is None else headers
        self.protocol = protocol

    def copy(self) -> RequestHead:
        return RequestHead(method=self.method, path=self.path, authority=self.authority,
                           scheme=self.scheme, headers=self.headers.copy(),
                           protocol=self.protocol)


@dataclass(slots=True)
class ResponseHead:
    status: int
    headers: HeaderMap = field(default_factory=HeaderMap)
    reason: str = ""               # HTTP/1 reason phrase as received; "" = the standard one
    protocol: Protocol = "HTTP/1.1"

    def __init__(self,
                 status: int, headers: HeaderMap | None = None, reason: str = "",
                 protocol: Protocol = "HTTP/1.1") -> None:
        self.status = status
        self.headers = HeaderMap() if headers is None else headers
        self.reason = reason
        self.protocol = protocol


# ----------------------------------------------------------------------------- codec events
# ``stream`` is the HTTP/2 stream id; HTTP/1 numbers requests on a connection 1, 2, 3 …


@dataclass(slots=True)
class RequestHeaders:
    """Server side: a request's head arrived. ``end_stream``: it has no body.
    ``upgrade``: the lower-cased Upgrade token (``"websocket"``, ``"h2c"`` is handled inside
    the codec) when the request asks for a protocol upgrade; its bytes after a 101 arrive as
    :class:`Body` events. ``expect_continue``: ``Expect: 100-continue`` was sent (the header
    stays in the map; the HCM decides whether to answer it)."""

    stream: int
    head: RequestHead
    end_stream: bool
    upgrade: str = ""
    expect_continue: bool = False

    def __init__(self,
                 stream: int, head: RequestHead, end_stream: bool, upgrade: str = "",
                 expect_continue: bool = False) -> None:
        self.stream = stream
        self.head = head
        self.end_stream = end_stream
        self.upgrade = upgrade
        self.expect_continue = expect_continue


@dataclass(slots=True)
class ResponseHeaders:
    """Client side: a final response head (status >= 200, or 101 for an accepted upgrade)."""

    stream: int
    head: ResponseHead
    end_stream: bool

    def __init__(self, stream: int, head: ResponseHead, end_stream: bool) -> None:
        self.stream = stream
        self.head = head
        self.end_stream = end_stream


@dataclass(slots=True)
class Informational:
    """Client side: a 1xx response other than 101 (e.g. ``100 Continue``)."""

    stream: int
    head: ResponseHead

    def __init__(self, stream: int, head: ResponseHead) -> None:
        self.stream = stream
        self.head = head


@dataclass(slots=True)
class Body:
    stream: int
    data: bytes

    def __init__(self, stream: int, data: bytes) -> None:
        self.stream = stream
        self.data = data


@dataclass(slots=True)
class EndStream:
    """The message is complete (after its last :class:`Body`), with trailers if any."""

    stream: int
    trailers: HeaderMap | None = None

    def __init__(self, stream: int, trailers: HeaderMap | None = None) -> None:
        self.stream = stream
        self.trailers = trailers


@dataclass(slots=True)
class StreamReset:
    """HTTP/2: the peer reset one stream (RST_STREAM), ``code`` is the h2 error code.
    HTTP/1 never emits it (a broken message is a :class:`ProtocolError`)."""

    stream: int
    code: int = 0
    remote: bool = True

    def __init__(self, stream: int, code: int = 0, remote: bool = True) -> None:
        self.stream = stream
        self.code = code
        self.remote = remote


@dataclass(slots=True)
class ProtocolError:
    """The peer broke the protocol; the connection cannot go on. ``status`` is the local reply
    Envoy sends on the server side (400, 431, 413 …; 0 on the client side), ``details``
    Envoy's response code details (``http1.codec_error``, ``http1.headers_too_large`` …).
    ``stream`` is the affected stream when known (0 = the connection)."""

    status: int
    details: str
    stream: int = 0

    def __init__(self, status: int, details: str, stream: int = 0) -> None:
        self.status = status
        self.details = details
        self.stream = stream


@dataclass(slots=True)
class ConnectionClosed:
    """HTTP/2 GOAWAY or the end of the byte stream seen by the codec (after complete
    messages). ``last_stream``: streams above it were not processed (safe to retry)."""

    last_stream: int = 0
    error_code: int = 0

    def __init__(self, last_stream: int = 0, error_code: int = 0) -> None:
        self.last_stream = last_stream
        self.error_code = error_code


@dataclass(slots=True)
class Writable:
    """HTTP/2: data queued for ``stream`` by flow control has all been framed (the window
    opened); a paused source for that stream may resume."""

    stream: int

    def __init__(self, stream: int) -> None:
        self.stream = stream


Event = (RequestHeaders | ResponseHeaders | Informational | Body | EndStream | StreamReset
         | ProtocolError | ConnectionClosed | Writable)


# ----------------------------------------------------------------------------- codec shapes


class ServerCodec(typing.Protocol):
    """The downstream side of one connection (HTTP/1.1 or HTTP/2)."""

    protocol: Protocol

    def receive(self, data: bytes) -> list[Event]:
        """Bytes read from the connection (``b""``: the peer closed its side)."""
        ...

    def send_informational(self, stream: int, head: ResponseHead) -> None: ...

    def send_headers(self, stream: int, head: ResponseHead, end_stream: bool) -> None: ...

    def send_body(self, stream: int, data: bytes) -> None: ...

    def send_end(self, stream: int, trailers: HeaderMap | None = None) -> None: ...

    def reset(self, stream: int) -> None:
        """Abandon a stream (HTTP/2 RST_STREAM; HTTP/1: the connection must then close)."""
        ...

    def consumed(self, stream: int, n: int) -> None:
        """``n`` body bytes of ``stream`` were passed on: HTTP/2 may open its window."""
        ...

    def buffered(self, stream: int) -> int:
        """Body bytes accepted by ``send_body`` but held back by flow control."""
        ...

    def data_to_send(self) -> bytes:
        """Everything encoded since the last call (and clears it)."""
        ...

    @property
    def keep_alive(self) -> bool:
        """False once the connection must close after what was sent (HTTP/1)."""
        ...

    def close(self) -> None:
        """Say goodbye (HTTP/2 GOAWAY); HTTP/1: nothing to encode."""
        ...

    def shutdown_notice(self) -> None:
        """HTTP/2: announce a coming close (GOAWAY with the largest stream id) while still
        taking new streams; :meth:`close` later names the last one. HTTP/1: nothing."""
        ...


class ClientCodec(typing.Protocol):
    """The upstream side of one connection (HTTP/1.1 or HTTP/2)."""

    protocol: Protocol

    def receive(self, data: bytes) -> list[Event]: ...

    def new_stream(self) -> int:
        """A stream id for the next request (only when :attr:`can_open` is true)."""
        ...

    def send_headers(self, stream: int, head: RequestHead, end_stream: bool) -> None: ...

    def send_body(self, stream: int, data: bytes) -> None: ...

    def send_end(self, stream: int, trailers: HeaderMap | None = None) -> None: ...

    def reset(self, stream: int) -> None: ...

    def consumed(self, stream: int, n: int) -> None: ...

    def buffered(self, stream: int) -> int: ...

    def data_to_send(self) -> bytes: ...

    @property
    def can_open(self) -> bool:
        """A new request may start now (HTTP/1: idle and reusable; HTTP/2: below the peer's
        max concurrent streams and no GOAWAY)."""
        ...

    @property
    def reusable(self) -> bool:
        """The connection may carry more requests (no ``Connection: close``, no error)."""
        ...

    @property
    def active_streams(self) -> int: ...

    def close(self) -> None: ...


# ----------------------------------------------------------------------------- stream info


@dataclass(slots=True)
class StreamInfo:
    """What happened to one request (or one TCP connection): Envoy's ``StreamInfo``, the
    input of access logs and Istio's metrics. Addresses are rendered ``ip:port`` (``[v6]:port``);
    ``""`` means unset (access logs print ``-``)."""

    start_time: float                      # epoch seconds (wall clock) at the first byte
    protocol: str = ""                     # "HTTP/1.1", "HTTP/2"; "" for a TCP connection
    request: RequestHead | None = None     # as received downstream (with x-request-id set)
    response: ResponseHead | None = None   # as sent downstream (local replies included)
    response_trailers: HeaderMap | None = None
    response_code: int = 0                 # 0: no response was sent (TCP, or reset)
    response_flags: set[str] = field(default_factory=set)   # Envoy short names: "UF", "URX" …
    response_code_details: str = ""        # "via_upstream", "route_not_found" …
    connection_termination_details: str = ""
    upstream_transport_failure_reason: str = ""
    bytes_received: int = 0                # request body bytes (TCP: bytes from downstream)
    bytes_sent: int = 0                    # response body bytes (TCP: bytes to downstream)
    duration: float | None = None          # seconds, start to the last byte sent
    response_duration: float | None = None  # seconds, start to the first response byte
    upstream_host: str = ""
    upstream_cluster: str = ""             # the cluster's name (UPSTREAM_CLUSTER_RAW)
    upstream_cluster_stat: str = ""        # its observability name (alt_stat_name), if any
    upstream_local_address: str = ""
    downstream_local_address: str = ""
    downstream_remote_address: str = ""
    requested_server_name: str = ""
    route_name: str = ""
    attempt_count: int = 0
    grpc_status: int | None = None         # from grpc-status (trailers or headers)

    # (written out, as for the dataclasses above: about 9,000 instructions per request less)
    def __init__(self, start_time: float, *,
                 protocol: str = "", request: RequestHead | None = None,
                 response: ResponseHead | None = None,
                 response_trailers: HeaderMap | None = None, response_code: int = 0,
                 response_flags: set[str] | None = None, response_code_details: str = "",
                 connection_termination_details: str = "",
                 upstream_transport_failure_reason: str = "", bytes_received: int = 0,
                 bytes_sent: int = 0, duration: float | None = None,
                 response_duration: float | None = None, upstream_host: str = "",
                 upstream_cluster: str = "", upstream_cluster_stat: str = "",
                 upstream_local_address: str = "", downstream_local_address: str = "",
                 downstream_remote_address: str = "", requested_server_name: str = "",
                 route_name: str = "", attempt_count: int = 0,
                 grpc_status: int | None = None) -> None:
        self.start_time = start_time
        self.protocol = protocol
        self.request = request
        self.response = response
        self.response_trailers = response_trailers
        self.response_code = response_code
        self.response_flags = set() if response_flags is None else response_flags
        self.response_code_details = response_code_details
        self.connection_termination_details = connection_termination_details
        self.upstream_transport_failure_reason = upstream_transport_failure_reason
        self.bytes_received = bytes_received
        self.bytes_sent = bytes_sent
        self.duration = duration
        self.response_duration = response_duration
        self.upstream_host = upstream_host
        self.upstream_cluster = upstream_cluster
        self.upstream_cluster_stat = upstream_cluster_stat
        self.upstream_local_address = upstream_local_address
        self.downstream_local_address = downstream_local_address
        self.downstream_remote_address = downstream_remote_address
        self.requested_server_name = requested_server_name
        self.route_name = route_name
        self.attempt_count = attempt_count
        self.grpc_status = grpc_status
