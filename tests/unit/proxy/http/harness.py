"""In-memory plumbing for driving the real HTTP connection manager without sockets.

* :func:`pipe` joins two asyncio protocols with a pair of :class:`FakeTransport` ends: bytes
  written on one end reach the other protocol's ``data_received`` on a later loop iteration
  (never re-entrantly, as with a real socket), ``pause_reading`` holds them back and the
  writer sees ``pause_writing`` once 64 KiB are held, ``close`` is an EOF then
  ``connection_lost`` on the other side (when its ``eof_received`` returns false, as asyncio's
  selector transports do), ``abort`` a reset.
* :class:`Env` is one worker: real ``HttpContext``/``HttpConnectionManager`` (from an HCM
  dict compiled by ``compile_hcm_dict``) and real clusters (:class:`FakeCluster` only swaps
  the socket connect for a pipe to a scripted :class:`Server`).
* :class:`Client` is a downstream connection seen from the app: raw bytes in, parsed HTTP/1
  responses out (:func:`parse_response`).
* :class:`Server` is an upstream host: it parses requests with the real server codecs
  (HTTP/1.1 or HTTP/2) and runs a test-supplied ``handler(req)`` per request.

Waiting is on events (futures woken by the transports), bounded by ``asyncio.timeout``.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import random
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from remora.proxy.http.h1 import H1ServerCodec
from remora.proxy.http.h2codec import H2ServerCodec
from remora.proxy.http.hcm import HttpConnectionManager, HttpContext, _Downstream, _Stream
from remora.proxy.http.routes_compile import compile_hcm_dict
from remora.proxy.http.types import (
    Body,
    ConnectionClosed,
    EndStream,
    Event,
    HeaderMap,
    ProtocolError,
    RequestHead,
    RequestHeaders,
    ResponseHead,
    StreamInfo,
    StreamReset,
)
from remora.proxy.model import Cluster, LbEndpoint, SocketAddress
from remora.proxy.stats import Stats
from remora.proxy.tcp import ConnectionRecord
from remora.proxy.upstream import Host, UpstreamCluster, UpstreamError

HIGH_WATER = 64 * 1024
WAIT = 3.0          # upper bound for any single wait (a hang is a failure, not a stall)

_EOF = object()
_RST = object()


class FakeTransport(asyncio.Transport):
    """One end of an in-memory connection."""

    def __init__(self, loop: asyncio.AbstractEventLoop, protocol: asyncio.Protocol,
                 extra: dict[str, Any]) -> None:
        super().__init__(extra)
        self.loop = loop
        self.protocol = protocol
        self.peer: FakeTransport | None = None
        self.inq: collections.deque[Any] = collections.deque()
        self.queued = 0                 # bytes in inq
        self.paused = False
        self.closing = False            # close/abort called on this end
        self.lost = False               # connection_lost delivered to this end's protocol
        self.eof_sent = False
        self.write_paused = False
        self.written = bytearray()      # everything this end wrote (for assertions)
        self.pause_calls = 0
        self._pump_scheduled = False

    # ---- the asyncio.Transport interface the proxy uses

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self._extra.get(name, default)

    def is_closing(self) -> bool:
        return self.closing or self.lost

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self.closing or self.lost or self.eof_sent or not data:
            return
        data = bytes(data)
        self.written += data
        peer = self.peer
        if peer is not None and not peer.lost:
            peer._deliver(data)
            if peer.queued > HIGH_WATER and not self.write_paused:
                self.write_paused = True
                self.protocol.pause_writing()

    def write_eof(self) -> None:
        if self.closing or self.eof_sent:
            return
        self.eof_sent = True
        if self.peer is not None and not self.peer.lost:
            self.peer._deliver(_EOF)

    def can_write_eof(self) -> bool:
        return True

    def pause_reading(self) -> None:
        self.paused = True
        self.pause_calls += 1

    def resume_reading(self) -> None:
        if self.paused:
            self.paused = False
            self._schedule()

    def is_reading(self) -> bool:
        return not self.paused

    def close(self) -> None:
        if self.closing or self.lost:
            return
        self.closing = True
        if not self.eof_sent and self.peer is not None and not self.peer.lost:
            self.eof_sent = True
            self.peer._deliver(_EOF)
        self.loop.call_soon(self._lose, None)

    def abort(self) -> None:
        if self.lost:
            return
        self.closing = True
        if self.peer is not None and not self.peer.lost:
            self.peer._deliver(_RST)
        self.loop.call_soon(self._lose, None)

    def get_write_buffer_size(self) -> int:
        return self.peer.queued if self.peer is not None else 0

    # ---- delivery

    def _deliver(self, item: Any) -> None:
        if item is _RST:
            # A reset discards whatever was not read yet.
            self.inq.clear()
            self.queued = 0
            self.loop.call_soon(self._lose, ConnectionResetError("reset by peer"))
            return
        self.inq.append(item)
        if isinstance(item, bytes):
            self.queued += len(item)
        self._schedule()

    def _schedule(self) -> None:
        if not self._pump_scheduled and not self.paused and self.inq:
            self._pump_scheduled = True
            self.loop.call_soon(self._pump)

    def _pump(self) -> None:
        # One read per loop turn, as a selector transport does (one recv per readiness).
        self._pump_scheduled = False
        if self.inq and not self.paused and not self.lost:
            item = self.inq.popleft()
            if item is _EOF:
                if not self.protocol.eof_received():
                    self.close()
            else:
                self.queued -= len(item)
                self.protocol.data_received(item)
            self._schedule()
        peer = self.peer
        if peer is not None and peer.write_paused and self.queued <= HIGH_WATER // 4 \
                and not peer.lost:
            peer.write_paused = False
            peer.protocol.resume_writing()

    def _lose(self, exc: Exception | None) -> None:
        if self.lost:
            return
        self.closing = True
        self.lost = True
        self.protocol.connection_lost(exc)


def pipe(loop: asyncio.AbstractEventLoop, a: asyncio.Protocol, b: asyncio.Protocol, *,
         a_extra: dict[str, Any] | None = None, b_extra: dict[str, Any] | None = None,
         ) -> tuple[FakeTransport, FakeTransport]:
    """Connect protocols ``a`` and ``b``; ``connection_made`` is called on both (``b``
    first: the accepting side)."""
    ta = FakeTransport(loop, a, a_extra or {})
    tb = FakeTransport(loop, b, b_extra or {})
    ta.peer, tb.peer = tb, ta
    b.connection_made(tb)
    a.connection_made(ta)
    return ta, tb


class Waitable:
    """Something tests wait on: ``await w.until(pred)`` re-checks ``pred`` at each change."""

    def __init__(self) -> None:
        self._waiters: list[asyncio.Future[None]] = []

    def changed(self) -> None:
        waiters, self._waiters = self._waiters, []
        for f in waiters:
            if not f.done():
                f.set_result(None)

    async def until(self, pred: Callable[[], Any], timeout: float = WAIT) -> Any:
        async with asyncio.timeout(timeout):
            while True:
                got = pred()
                if got:
                    return got
                f = asyncio.get_running_loop().create_future()
                self._waiters.append(f)
                await f


# ============================================================================ responses


@dataclass
class Resp:
    status: int
    reason: str
    headers: list[tuple[str, str]]
    body: bytes = b""
    trailers: list[tuple[str, str]] = field(default_factory=list)
    chunked: bool = False

    def get(self, name: str, default: str | None = None) -> str | None:
        for k, v in self.headers:
            if k == name:
                return v
        return default

    def all(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k == name]


def _fields(lines: list[bytes]) -> list[tuple[str, str]]:
    out = []
    for ln in lines:
        k, _, v = ln.partition(b":")
        out.append((k.decode().strip().lower(), v.decode("latin-1").strip()))
    return out


def parse_response(buf: bytes, pos: int = 0, *, head_request: bool = False,
                   eof: bool = False) -> tuple[Resp, int] | None:
    """One HTTP/1.1 response from ``buf[pos:]`` (1xx included) and the position after it;
    None when incomplete. Strict enough to catch framing mistakes: the next message must start
    exactly where this one's framing says."""
    end = buf.find(b"\r\n\r\n", pos)
    if end < 0:
        return None
    lines = buf[pos:end].split(b"\r\n")
    version, status, reason = [*lines[0].decode("latin-1").split(" ", 2), ""][:3]
    assert version in ("HTTP/1.1", "HTTP/1.0"), lines[0]
    r = Resp(int(status), reason, _fields(lines[1:]))
    p = end + 4
    if r.status < 200 or r.status in (204, 304) or head_request:
        return r, p
    te = r.get("transfer-encoding")
    cl = r.get("content-length")
    if te is not None:
        assert te == "chunked" and cl is None, r.headers
        r.chunked = True
        body = bytearray()
        while True:
            nl = buf.find(b"\r\n", p)
            if nl < 0:
                return None
            size = int(buf[p:nl].split(b";")[0], 16)
            p = nl + 2
            if size == 0:
                tend = buf.find(b"\r\n\r\n", p - 2)
                if tend < 0:
                    return None
                tl = buf[p:tend].split(b"\r\n") if tend > p else []
                r.trailers = _fields([x for x in tl if x])
                p = tend + 4
                break
            if len(buf) < p + size + 2:
                return None
            body += buf[p:p + size]
            assert buf[p + size:p + size + 2] == b"\r\n"
            p += size + 2
        r.body = bytes(body)
        return r, p
    if cl is not None:
        n = int(cl)
        if len(buf) < p + n:
            return None
        r.body = bytes(buf[p:p + n])
        return r, p + n
    if r.status == 101:
        return r, p
    if not eof:          # close-delimited
        return None
    r.body = bytes(buf[p:])
    return r, len(buf)


class Collector(asyncio.Protocol, Waitable):
    """The far end of a pipe, as a test sees it: what arrived, EOF, loss."""

    def __init__(self) -> None:
        Waitable.__init__(self)
        self.data = bytearray()
        self.eof = False
        self.lost = False
        self.lost_exc: Exception | None = None
        self.transport: FakeTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, FakeTransport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.data += data
        self.changed()

    def eof_received(self) -> bool:
        self.eof = True
        self.changed()
        return True      # keep our side open until the test closes it

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.lost_exc = exc
        self.changed()


# ============================================================================ upstreams


class UpReq:
    """One request as a scripted upstream received it."""

    def __init__(self, conn: ServerConn, ev: RequestHeaders) -> None:
        self.conn = conn
        self.stream = ev.stream
        self.head = ev.head
        self.upgrade = ev.upgrade
        self.body = bytearray()
        self.trailers: HeaderMap | None = None
        self.ended = ev.end_stream
        self.reset = False
        self.changed = Waitable()

    @property
    def headers(self) -> HeaderMap:
        return self.head.headers

    async def complete(self) -> UpReq:
        await self.changed.until(lambda: self.ended or self.reset)
        return self

    # ---- answering

    def informational(self, status: int = 100) -> None:
        self.conn.codec.send_informational(self.stream, ResponseHead(status))
        self.conn.flush()

    def send_headers(self, status: int, headers: Iterable[tuple[str, str]] = (), *,
                     end: bool = False) -> None:
        head = ResponseHead(status, HeaderMap(list(headers)),
                            protocol=self.conn.codec.protocol)
        self.conn.codec.send_headers(self.stream, head, end)
        self.conn.flush()
        if end:
            self.conn.answered(self)

    def send_body(self, data: bytes) -> None:
        self.conn.codec.send_body(self.stream, data)
        self.conn.flush()

    def send_end(self, trailers: Iterable[tuple[str, str]] | None = None) -> None:
        self.conn.codec.send_end(self.stream,
                                 HeaderMap(list(trailers)) if trailers is not None else None)
        self.conn.flush()
        self.conn.answered(self)

    def respond(self, status: int = 200, body: bytes = b"",
                headers: Iterable[tuple[str, str]] = (), *,
                trailers: Iterable[tuple[str, str]] | None = None,
                chunked: bool = False) -> None:
        hs = list(headers)
        if not chunked and trailers is None:
            hs.append(("content-length", str(len(body))))
        if not body and trailers is None and not chunked:
            self.send_headers(status, hs, end=True)
            return
        self.send_headers(status, hs)
        if body:
            self.send_body(body)
        self.send_end(trailers)

    def close(self) -> None:
        self.conn.transport.close()

    def abort(self) -> None:
        self.conn.transport.abort()


Handler = Callable[[UpReq], Awaitable[None]]


async def ok_handler(req: UpReq) -> None:
    """Answer 200 with the request's path as the body, after the whole request arrived."""
    await req.complete()
    req.respond(200, f"ok {req.head.path}".encode(), [("content-type", "text/plain")])


class ServerConn(asyncio.Protocol):
    """An upstream host's side of one connection."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.codec: Any = (H2ServerCodec() if server.protocol == "HTTP/2"
                           else H1ServerCodec(max_request_headers_kb=1024,
                                              max_headers_count=1000))
        self.reqs: dict[int, UpReq] = {}
        self.transport: FakeTransport = None  # type: ignore[assignment]
        self.eof = False
        self.lost = False
        self.received = bytearray()
        self.events: list[Event] = []
        self.changed = Waitable()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, FakeTransport)
        self.transport = transport
        self.flush()

    def flush(self) -> None:
        out = self.codec.data_to_send()
        if out:
            self.transport.write(out)

    def data_received(self, data: bytes) -> None:
        self.received += data
        self._dispatch(self.codec.receive(data))
        self.flush()
        self.changed.changed()

    def eof_received(self) -> bool:
        self.eof = True
        self._dispatch(self.codec.receive(b""))
        self.flush()
        self.changed.changed()
        return self.server.half_close_ok

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        for r in self.reqs.values():
            if not r.ended:
                r.reset = True
                r.changed.changed()
        self.changed.changed()
        self.server.changed.changed()

    def answered(self, req: UpReq) -> None:
        if isinstance(self.codec, H1ServerCodec):
            self._dispatch(self.codec.resume())
            self.flush()
            if not self.codec.keep_alive:
                self.transport.close()

    def _dispatch(self, events: list[Event]) -> None:
        for ev in events:
            self.events.append(ev)
            if isinstance(ev, RequestHeaders):
                r = UpReq(self, ev)
                self.reqs[ev.stream] = r
                self.server.requests.append(r)
                self.server.changed.changed()
                task = asyncio.get_running_loop().create_task(self.server.handler(r))
                self.server.tasks.append(task)
            elif isinstance(ev, Body):
                r = self.reqs[ev.stream]
                r.body += ev.data
                self.codec.consumed(ev.stream, len(ev.data))
                r.changed.changed()
            elif isinstance(ev, EndStream):
                r = self.reqs[ev.stream]
                r.ended = True
                r.trailers = ev.trailers
                r.changed.changed()
            elif isinstance(ev, StreamReset):
                r2 = self.reqs.get(ev.stream)
                if r2 is not None:
                    r2.reset = True
                    r2.changed.changed()
            elif isinstance(ev, (ProtocolError, ConnectionClosed)):
                if isinstance(ev, ProtocolError):
                    self.transport.close()
                for r in self.reqs.values():
                    if not r.ended:
                        r.reset = True
                        r.changed.changed()


class Server:
    """A scripted upstream host."""

    def __init__(self, handler: Handler = ok_handler, *, protocol: str = "HTTP/1.1",
                 refuse: bool = False) -> None:
        self.handler = handler
        self.protocol = protocol
        self.refuse = refuse
        self.connect_gate: asyncio.Future[None] | None = None   # connect waits for it
        self.half_close_ok = False
        self.requests: list[UpReq] = []
        self.conns: list[ServerConn] = []
        self.connects = 0
        self.tasks: list[asyncio.Task[None]] = []
        self.changed = Waitable()

    async def request(self, n: int = 1) -> UpReq:
        """The ``n``-th request this host received (1-based), waiting for it."""
        await self.changed.until(lambda: len(self.requests) >= n)
        return self.requests[n - 1]


class FakeCluster(UpstreamCluster):
    """A real cluster whose ``connect`` opens a pipe to a :class:`Server` instead of a socket
    (the breaker on ``max_connections`` and the cx accounting stay as in ``connect``)."""

    servers: dict[str, Server]

    async def connect(self, host: Host, protocol_factory: Callable[[], Any], *,
                      as_request: bool = True) -> tuple[asyncio.Transport, Any]:
        s, st = self._s, self.stats
        if self.active_connections >= self._max_connections:
            st.inc(s["upstream_cx_overflow"])
            raise UpstreamError("UO", "overflow")
        self.active_connections += 1
        st.inc(s["upstream_cx_total"])
        st.gauge_add(s["upstream_cx_active"], 1)
        host.stats["cx_total"] += 1
        host.stats["cx_active"] += 1
        server = self.servers.get(str(host.address))
        try:
            if server is not None:
                server.connects += 1
                server.changed.changed()
                if server.connect_gate is not None:
                    await server.connect_gate
            else:
                await asyncio.sleep(0)
        except asyncio.CancelledError:      # the waiting request gave up: as connect does
            self._released(host, local=True)
            raise
        if server is None or server.refuse:
            st.inc(s["upstream_cx_connect_fail"])
            host.stats["cx_connect_fail"] += 1
            self._released(host, local=True)
            raise UpstreamError("UF", "delayed connect error: 111")
        loop = asyncio.get_running_loop()
        proto = protocol_factory()
        sc = ServerConn(server)
        server.conns.append(sc)
        n = len(server.conns)
        ta, _ = pipe(loop, proto, sc, a_extra={"sockname": ("10.0.0.100", 40000 + n)},
                     b_extra={"peername": ("10.0.0.100", 40000 + n)})
        return ta, proto


# ============================================================================ the worker

HCM_TYPE = ("type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3."
            "HttpConnectionManager")
ROUTER = {"name": "envoy.filters.http.router", "typed_config": {
    "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}
FAULT = {"name": "envoy.filters.http.fault", "typed_config": {
    "@type": "type.googleapis.com/envoy.extensions.filters.http.fault.v3.HTTPFault"}}
FAULT_TYPE = "type.googleapis.com/envoy.extensions.filters.http.fault.v3.HTTPFault"
ISTIO_RETRY = {"retry_on": "connect-failure,refused-stream,unavailable,cancelled,"
                           "retriable-status-codes",
               "num_retries": 2, "retry_host_predicate": [
                   {"name": "envoy.retry_host_predicates.previous_hosts", "typed_config": {
                       "@type": "type.googleapis.com/envoy.extensions.retry.host."
                                "previous_hosts.v3.PreviousHostsPredicate"}}],
               "host_selection_retry_max_attempts": "5"}


def vhost(name: str, domains: list[str], routes: list[dict[str, Any]]) -> dict[str, Any]:
    return {"name": name, "domains": domains, "routes": routes,
            "include_request_attempt_count": True}


def route(cluster: str, *, prefix: str = "/", name: str = "default",
          **action: Any) -> dict[str, Any]:
    return {"name": name, "match": {"prefix": prefix},
            "route": {"cluster": cluster, "timeout": "0s", **action}}


def hcm_dict(vhosts: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    """Istio's outbound HCM shape (spec §4.3) with an inline route config."""
    d: dict[str, Any] = {
        "stat_prefix": "outbound_0.0.0.0_8080",
        "route_config": {"name": "8080", "virtual_hosts": vhosts, "validate_clusters": False},
        "http_filters": [FAULT, ROUTER],
        "upgrade_configs": [{"upgrade_type": "websocket"}],
        "use_remote_address": False, "normalize_path": True, "stream_idle_timeout": "0s",
    }
    d.update(extra)
    return d


def cluster(name: str, addrs: Iterable[str], *, priorities: Iterable[int] = (),
            **kw: Any) -> Cluster:
    """A STATIC cluster of ``addrs``; ``priorities``: each endpoint's priority level (all 0
    when not given)."""
    addrs = list(addrs)
    levels = list(priorities) or [0] * len(addrs)
    eps = tuple(LbEndpoint(address=SocketAddress(address=a.rsplit(":", 1)[0],
                                                 port=int(a.rsplit(":", 1)[1])), priority=p)
                for a, p in zip(addrs, levels, strict=True))
    return Cluster(name=name, type="STATIC", connect_timeout=1.0, endpoints=eps, **kw)


class RecordingHcm(HttpConnectionManager):
    """The real connection manager, remembering each finished stream's StreamInfo."""

    infos: list[StreamInfo]
    spans: list[Any]
    done: Waitable

    def completed(self, s: _Stream) -> None:
        super().completed(s)
        self.infos.append(s.info)
        self.spans.append(s.span)
        self.done.changed()


class Env:
    """One worker: clusters, servers, an HCM."""

    def __init__(self, hcm: dict[str, Any], clusters: Iterable[Cluster],
                 servers: dict[str, Server] | None = None, *, direction: str = "OUTBOUND",
                 seed: int = 7) -> None:
        self.loop = asyncio.get_running_loop()
        self.stats = Stats()
        self.servers = servers or {}
        rng = random.Random(seed)
        self.clusters: dict[str, UpstreamCluster] = {}
        for c in clusters:
            fc = FakeCluster(c, self.stats, random.Random(rng.random()))
            fc.servers = self.servers
            self.clusters[c.name] = fc
        self.ctx = HttpContext(self.clusters, self.stats, rng)
        self.ctx.start(self.loop)
        self.config = compile_hcm_dict(hcm)
        self.hcm = RecordingHcm(self.config, self.ctx, direction=direction)
        self.hcm.infos = []
        self.hcm.spans = []
        self.hcm.done = Waitable()
        self.clients: list[Client] = []
        self.errors: list[dict[str, Any]] = []
        self.loop.set_exception_handler(lambda _loop, c: self.errors.append(c))
        # A stream that dies of an exception is logged (and answered 500): that is a bug.
        self.logged: list[logging.LogRecord] = []
        self._log_handler = _ListHandler(self.logged)
        logging.getLogger("remora.proxy.http").addHandler(self._log_handler)

    @property
    def infos(self) -> list[StreamInfo]:
        return self.hcm.infos

    async def info(self, n: int = 1) -> StreamInfo:
        """The ``n``-th finished stream's StreamInfo (waiting for it)."""
        await self.hcm.done.until(lambda: len(self.hcm.infos) >= n)
        return self.hcm.infos[n - 1]

    def client(self, *, remote: str = "10.0.0.5") -> Client:
        c = Client(self, remote=remote)
        self.clients.append(c)
        return c

    def counter(self, name: str) -> int:
        return self.stats.counters.get(name, 0)

    def ccounter(self, cluster_name: str, stat: str) -> int:
        return self.counter(f"cluster.{cluster_name}.{stat}")

    def hcounter(self, stat: str) -> int:
        return self.counter(f"http.{self.config.stat_prefix}.{stat}")

    async def close(self) -> None:
        for c in self.clients:
            c.transport.close()
        runners = {c.runner for c in self.clients}
        if runners:
            # Each connection's stream runner ends once its connection has.
            _, pending = await asyncio.wait(runners, timeout=WAIT)
            assert not pending, "a connection's task outlived its connection"
        for srv in self.servers.values():
            for t in srv.tasks:
                t.cancel()
        self.ctx.close()
        await asyncio.sleep(0)
        logging.getLogger("remora.proxy.http").removeHandler(self._log_handler)
        real = [e for e in self.errors
                if not isinstance(e.get("exception"), asyncio.CancelledError)]
        assert not real, real
        assert not self.logged, [r.getMessage() for r in self.logged]


class _ListHandler(logging.Handler):
    def __init__(self, out: list[logging.LogRecord]) -> None:
        super().__init__(logging.ERROR)
        self.out = out

    def emit(self, record: logging.LogRecord) -> None:
        self.out.append(record)


class Client:
    """A downstream connection as the app sees it."""

    _ids = 0

    def __init__(self, env: Env, *, remote: str) -> None:
        Client._ids += 1
        self.env = env
        self.record = ConnectionRecord(
            cid=Client._ids, downstream_remote=SocketAddress(address=remote, port=50000),
            downstream_local=SocketAddress(address="10.100.1.10", port=8080))
        self.conn = _Downstream(env.hcm, self.record, env.loop)
        self.end = Collector()
        self.transport, self.server_side = pipe(env.loop, self.end, self.conn)
        self.runner = self.conn.start_runner()     # as HttpConnectionManager.handle does
        self.pos = 0

    def send(self, data: bytes) -> None:
        self.transport.write(data)

    def shutdown(self) -> None:
        self.transport.write_eof()

    async def response(self, *, head_request: bool = False, timeout: float = WAIT) -> Resp:
        """The next response (1xx included) from the proxy."""
        def ready() -> tuple[Resp, int] | None:
            return parse_response(bytes(self.end.data), self.pos, head_request=head_request,
                                  eof=self.end.eof or self.end.lost)
        got = await self.end.until(
            lambda: ready() or ((self.end.eof or self.end.lost) and ("closed",)), timeout)
        if got == ("closed",):
            raise ConnectionError(f"closed; unparsed: {bytes(self.end.data[self.pos:])!r}")
        resp, self.pos = got
        return resp

    async def request(self, method: str = "GET", path: str = "/", host: str = "svc",
                      headers: Iterable[tuple[str, str]] = (), body: bytes | None = None,
                      ) -> Resp:
        self.send(http1_request(method, path, host, headers, body))
        return await self.response(head_request=method == "HEAD")

    async def closed(self, timeout: float = WAIT) -> None:
        await self.end.until(lambda: self.end.eof or self.end.lost, timeout)

    @property
    def rest(self) -> bytes:
        return bytes(self.end.data[self.pos:])


def http1_request(method: str = "GET", path: str = "/", host: str = "svc",
                  headers: Iterable[tuple[str, str]] = (), body: bytes | None = None) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", f"host: {host}"]
    lines += [f"{k}: {v}" for k, v in headers]
    if body is not None:
        lines.append(f"content-length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + (body or b"")


def request_head(method: str, path: str, authority: str,
                 headers: Iterable[tuple[str, str]] = ()) -> RequestHead:
    return RequestHead(method, path, authority, "http", HeaderMap(list(headers)), "HTTP/2")
