"""Upstream HTTP connection pools, circuit breakers and outlier detection, per worker.

Owns: one pool per (cluster, host, protocol) with keep-alive reuse (HTTP/1.1: one request at a
time per connection; HTTP/2: many streams on one connection), idle connections closed after the
cluster's ``http_idle_timeout``, the cluster's request circuit breakers (``max_pending_requests``:
requests waiting for a connection; ``max_requests``: requests in flight; ``max_retries``: retries
in flight; overflow → ``UO``), and outlier detection (consecutive 5xx / gateway errors eject a
host for ``base_ejection_time × times ejected``; the load balancer then skips it).
Must not: route, retry or parse bytes (the codecs do); it only moves codec events between an
upstream socket and the request that owns the stream.

References: Envoy ``source/common/conn_pool``, ``circuit_breakers.proto`` and the cluster stats
``upstream_rq_pending_overflow``/``upstream_rq_retry_overflow``, ``outlier_detection.proto``
(``max_ejection_percent`` with "at least one host may be ejected"), the arch overview
"Outlier detection" (ejection time grows with the number of ejections).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import typing
from typing import Final

from remora.proxy.http.h1 import H1ClientCodec
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
    ResponseHead,
    ResponseHeaders,
    StreamReset,
    Writable,
)
from remora.proxy.model import OutlierDetection
from remora.proxy.stats import Cell, Stats
from remora.proxy.timers import Deadline
from remora.proxy.upstream import Host, UpstreamCluster, UpstreamError

if typing.TYPE_CHECKING:
    from remora.proxy.http.hcm import _Attempt, _Downstream

log = logging.getLogger(__name__)

OUTLIER_FLAG: Final = "/failed_outlier_check"
REFUSED_STREAM: Final = 7   # RFC 9113 §7: the request was not processed; safe to retry

HTTP_CLUSTER_STATS = (
    "upstream_rq_pending_total", "upstream_rq_pending_overflow", "upstream_rq_retry",
    "upstream_rq_retry_success", "upstream_rq_retry_overflow", "upstream_rq_timeout",
    "upstream_rq_per_try_timeout", "upstream_rq_rx_reset", "upstream_rq_tx_reset",
    "upstream_cx_http1_total", "upstream_cx_http2_total", "upstream_cx_idle_timeout",
    "upstream_rq_completed", "upstream_rq_2xx", "upstream_rq_3xx", "upstream_rq_4xx",
    "upstream_rq_5xx", "outlier_detection.ejections_enforced_total",
    "outlier_detection.ejections_enforced_consecutive_5xx",
    "outlier_detection.ejections_enforced_consecutive_gateway_failure",
    "outlier_detection.ejections_overflow",
)
HTTP_CLUSTER_GAUGES = ("upstream_rq_pending_active", "outlier_detection.ejections_active")


class Flusher:
    """Coalesces writes: a connection that encoded output is marked, and every marked
    connection writes once at the end of the current batch of events (the end of the
    ``data_received`` that caused it, or the next loop turn). A response's head, body and end
    then leave in one ``write`` (one syscall) instead of three."""

    __slots__ = ("dirty", "loop", "scheduled")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.dirty: list[AnyWriter] = []
        self.scheduled = False

    def mark(self, w: AnyWriter) -> None:
        if w.mark_dirty():
            self.dirty.append(w)
            if not self.scheduled:
                self.scheduled = True
                self.loop.call_soon(self._scheduled)

    def _scheduled(self) -> None:
        self.scheduled = False
        self.run()

    def run(self) -> None:
        while self.dirty:
            batch, self.dirty = self.dirty, []
            for w in batch:
                w.write_now()


class Writer(typing.Protocol):
    """A connection the flusher writes for. (Methods, not a ``dirty`` attribute: compiled
    code sets an attribute of a union-typed value through Python's generic setattr, but
    calls a method of it directly.)"""

    def mark_dirty(self) -> bool:
        """Note that output is pending; False if it already was (then not added again)."""
        ...

    def write_now(self) -> None:
        """Write what is pending (and clear the mark)."""
        ...


# The unions below name the compiled class that implements a protocol on the hot path ahead of
# the protocol itself: compiled (remora.native), a call on such a value checks the type and
# calls the method directly, where a value typed by the protocol alone goes through a Python
# method lookup and argument parsing on every call. Anything else implementing the protocol
# (the HTTP/2 codecs, tests' fakes) still works, by the slower path.
AnyWriter = typing.Union["UpstreamConnection", "_Downstream", Writer]


class StreamCallbacks(typing.Protocol):
    """What a pooled connection tells the request that owns a stream."""

    def on_informational(self, head: ResponseHead) -> None: ...

    def on_headers(self, head: ResponseHead, end_stream: bool) -> None: ...

    def on_body(self, data: bytes) -> None: ...

    def on_end(self, trailers: HeaderMap | None) -> None: ...

    def on_reset(self, reason: str, *, refused: bool) -> None:
        """The stream ended without a complete response. ``reason`` is Envoy's reset reason
        text (``connection termination``, ``remote reset``, ``protocol error``);
        ``refused``: the peer did not process it (HTTP/2 REFUSED_STREAM or GOAWAY)."""
        ...

    def on_upstream_writable(self, writable: bool) -> None:
        """The upstream socket's write buffer crossed a watermark (or the HTTP/2 window
        opened): pause or resume the request body's source."""
        ...


AnyCallbacks = typing.Union["_Attempt", StreamCallbacks]
AnyClientCodec = H1ClientCodec | ClientCodec


class UpstreamConnection(asyncio.Protocol):
    """One upstream HTTP connection: a client codec and the streams on it."""

    def __init__(self, pool: HttpPool, codec: AnyClientCodec) -> None:
        self.pool = pool
        self.codec = codec
        self.flusher = pool.state.flusher
        self.dirty = False
        self.transport: asyncio.Transport | None = None
        self.streams: dict[int, AnyCallbacks] = {}
        self.closing = False
        self.lost = False
        self.local_address = ""
        self.requests = 0
        self.write_paused = False
        timeout = pool.cluster.config.http_idle_timeout
        self._idle = Deadline(pool.loop, timeout, self._idle_expired) if timeout else None

    # ------------------------------------------------------------------ asyncio protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses; same interface.
        self.transport = typing.cast(asyncio.Transport, transport)
        sock = transport.get_extra_info("sockname")
        if sock:
            host, port = sock[0], sock[1]
            self.local_address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        self.flush()

    def data_received(self, data: bytes) -> None:
        self._dispatch(self.codec.receive(data))
        self.flush()
        self.flusher.run()

    def eof_received(self) -> bool:
        self._dispatch(self.codec.receive(b""))
        self.flush()
        self.flusher.run()
        return False

    def pause_writing(self) -> None:
        self.write_paused = True
        for cb in list(self.streams.values()):
            cb.on_upstream_writable(False)

    def resume_writing(self) -> None:
        self.write_paused = False
        for cb in list(self.streams.values()):
            cb.on_upstream_writable(True)

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self._cancel_idle()
        streams, self.streams = self.streams, {}
        for cb in streams.values():
            cb.on_reset("connection termination", refused=False)
        self.pool.lost(self, local=self.closing)

    # ------------------------------------------------------------------ events

    def _dispatch(self, events: list[Event]) -> None:
        cb: AnyCallbacks | None     # declared: see AnyWriter
        for ev in events:
            t = type(ev)
            if t is Body:
                assert isinstance(ev, Body)
                cb = self.streams.get(ev.stream)
                if cb is not None:
                    cb.on_body(ev.data)
            elif t is ResponseHeaders:
                assert isinstance(ev, ResponseHeaders)
                cb = self.streams.get(ev.stream)
                if cb is not None:
                    cb.on_headers(ev.head, ev.end_stream)
                    if ev.end_stream:
                        self.finished(ev.stream)
            elif t is EndStream:
                assert isinstance(ev, EndStream)
                cb = self.streams.get(ev.stream)
                if cb is not None:
                    self.finished(ev.stream)
                    cb.on_end(ev.trailers)
            elif t is Informational:
                assert isinstance(ev, Informational)
                cb = self.streams.get(ev.stream)
                if cb is not None:
                    cb.on_informational(ev.head)
            elif t is StreamReset:
                assert isinstance(ev, StreamReset)
                cb = self.streams.pop(ev.stream, None)
                if cb is not None:
                    cb.on_reset("remote reset", refused=ev.code == REFUSED_STREAM)
                    self._maybe_idle()
            elif t is Writable:
                assert isinstance(ev, Writable)
                cb = self.streams.get(ev.stream)
                if cb is not None and not self.write_paused:
                    cb.on_upstream_writable(True)
            elif t is ConnectionClosed:
                assert isinstance(ev, ConnectionClosed)
                # GOAWAY: streams above last_stream were never processed.
                for sid in [s for s in self.streams if s > ev.last_stream > 0]:
                    cb = self.streams.pop(sid)
                    cb.on_reset("remote reset", refused=True)
                self.closing = True
                if not self.streams:
                    self.close()
            elif t is ProtocolError:
                assert isinstance(ev, ProtocolError)
                # The HTTP/1 client codec reports EOF under a request as a ProtocolError whose
                # details say so: Envoy calls that "connection termination" (flag UC), not a
                # protocol error.
                reason = ("connection termination" if "connection_termination" in ev.details
                          else "protocol error")
                streams, self.streams = self.streams, {}
                for cb in streams.values():
                    cb.on_reset(reason, refused=False)
                self.close()

    # ------------------------------------------------------------------ used by requests

    def flush(self) -> None:
        """Output is pending: write it at the end of this batch of events."""
        self.flusher.mark(self)

    def mark_dirty(self) -> bool:
        if self.dirty:
            return False
        self.dirty = True
        return True

    def write_now(self) -> None:
        self.dirty = False
        out = self.codec.data_to_send()
        if out and self.transport is not None and not self.lost:
            self.transport.write(out)

    def open_stream(self, cb: AnyCallbacks, head: RequestHead, end_stream: bool) -> int:
        self._cancel_idle()
        sid = self.codec.new_stream()
        self.streams[sid] = cb
        self.requests += 1
        self.codec.send_headers(sid, head, end_stream)
        self.flush()
        return sid

    def send_body(self, sid: int, data: bytes) -> None:
        self.codec.send_body(sid, data)
        self.flush()

    def send_end(self, sid: int, trailers: HeaderMap | None = None) -> None:
        self.codec.send_end(sid, trailers)
        self.flush()

    def half_close(self) -> None:
        """End an HTTP/1 tunnel's request side (``write_eof``); responses still arrive."""
        if self.transport is not None and not self.lost and self.transport.can_write_eof():
            self.write_now()
            self.transport.write_eof()

    def consumed(self, sid: int, n: int) -> None:
        self.codec.consumed(sid, n)
        self.flush()

    def blocked(self, sid: int) -> bool:
        """The request body should wait (socket buffer full or HTTP/2 window closed)."""
        return self.write_paused or self.codec.buffered(sid) > 0

    def pause_reading(self) -> None:
        if self.transport is not None and not self.lost:
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.transport is not None and not self.lost:
            self.transport.resume_reading()

    def finished(self, sid: int) -> None:
        """The response on ``sid`` is complete."""
        self.streams.pop(sid, None)
        self._maybe_idle()

    def abandon(self, sid: int) -> None:
        """The request gave up on ``sid`` (retry, timeout, downstream reset)."""
        if self.streams.pop(sid, None) is None:
            return
        self.codec.reset(sid)
        self.flush()
        if self.codec.protocol != "HTTP/2":
            self.close()    # an HTTP/1 connection mid-message cannot be reused
        else:
            self._maybe_idle()

    def _maybe_idle(self) -> None:
        if self.lost:
            return
        limit = self.pool.cluster.config.max_requests_per_connection
        if not self.codec.reusable or self.closing or (limit and self.requests >= limit):
            if not self.streams:
                self.close()
            return
        if not self.streams:
            if self._idle is not None:
                self._idle.start()
            self.pool.released(self)

    def _idle_expired(self) -> None:
        if not self.streams:
            self.pool.stats.inc(self.pool.state.s["upstream_cx_idle_timeout"])
            self.close()

    def _cancel_idle(self) -> None:
        if self._idle is not None:
            self._idle.stop()

    def close(self) -> None:
        self.closing = True
        if self._idle is not None:
            self._idle.cancel()
        self.pool.forget(self)
        if self.transport is not None and not self.lost:
            with contextlib.suppress(Exception):
                self.codec.close()
            self.write_now()
            self.transport.close()


CodecFactory = typing.Callable[[str], ClientCodec]


def default_codec(protocol: str) -> ClientCodec:
    if protocol == "HTTP/2":
        from remora.proxy.http.h2codec import H2ClientCodec
        return H2ClientCodec()
    from remora.proxy.http.h1 import H1ClientCodec
    return H1ClientCodec()


class HttpPool:
    """Connections to one host of one cluster speaking one protocol."""

    def __init__(self, state: ClusterHttpState, host: Host, protocol: str) -> None:
        self.state = state
        self.cluster = state.cluster
        self.stats = state.stats
        self.loop = state.loop
        self.host = host
        self.protocol = protocol
        self.conns: list[UpstreamConnection] = []
        self.idle: list[UpstreamConnection] = []

    async def acquire(self) -> UpstreamConnection:
        """A connection that can take a new stream now: an idle one, or a new one.
        Raises :class:`UpstreamError` (``UO`` overflow, ``UF`` connect failure)."""
        while self.idle:
            conn = self.idle.pop()
            if not conn.lost and not conn.closing and conn.codec.can_open:
                return conn
        if self.protocol == "HTTP/2":
            for conn in self.conns:
                if not conn.lost and not conn.closing and conn.codec.can_open:
                    return conn
        state = self.state
        if state.pending >= self.cluster.config.default_thresholds.max_pending_requests:
            self.stats.inc(state.s["upstream_rq_pending_overflow"])
            raise UpstreamError("UO", "overflow")
        state.pending += 1
        self.stats.inc(state.s["upstream_rq_pending_total"])
        self.stats.gauge_add(state.s["upstream_rq_pending_active"], 1)
        try:
            _, conn = await self.cluster.connect(
                self.host, lambda: UpstreamConnection(self, state.codec_factory(self.protocol)),
                as_request=False)
        finally:
            state.pending -= 1
            self.stats.gauge_add(state.s["upstream_rq_pending_active"], -1)
        self.stats.inc(state.s["upstream_cx_http2_total" if self.protocol == "HTTP/2"
                               else "upstream_cx_http1_total"])
        self.conns.append(conn)
        return conn

    def released(self, conn: UpstreamConnection) -> None:
        if self.protocol != "HTTP/2" and conn not in self.idle:
            self.idle.append(conn)

    def forget(self, conn: UpstreamConnection) -> None:
        if conn in self.idle:
            self.idle.remove(conn)
        if conn in self.conns:
            self.conns.remove(conn)

    def lost(self, conn: UpstreamConnection, *, local: bool) -> None:
        self.forget(conn)
        self.cluster.disconnected(self.host, local=local, as_request=False)

    def close_all(self) -> None:
        for conn in list(self.conns):
            conn.close()


class OutlierDetector:
    """Consecutive-error ejection for one cluster (Envoy ``DetectorImpl``, the parts Istio's
    DestinationRule ``outlierDetection`` sets)."""

    def __init__(self, state: ClusterHttpState, config: OutlierDetection) -> None:
        self.state = state
        self.config = config
        self.c5xx: dict[int, int] = collections.defaultdict(int)
        self.cgw: dict[int, int] = collections.defaultdict(int)
        self.times: dict[int, int] = collections.defaultdict(int)
        self.ejected: dict[int, asyncio.TimerHandle] = {}

    def result(self, host: Host, status: int) -> None:
        """Record one request's outcome on ``host`` (a local-origin failure — connect
        failure, reset, timeout — counts as a 503/504 unless the errors are split)."""
        key = id(host)
        cfg = self.config
        if status >= 500:
            self.c5xx[key] += 1
            if status in (502, 503, 504):
                self.cgw[key] += 1
            else:
                self.cgw[key] = 0
            if self.c5xx[key] >= cfg.consecutive_5xx and cfg.enforcing_consecutive_5xx:
                self._eject(host, "consecutive_5xx", cfg.enforcing_consecutive_5xx)
            elif (self.cgw[key] >= cfg.consecutive_gateway_failure
                  and cfg.enforcing_consecutive_gateway_failure):
                self._eject(host, "consecutive_gateway_failure",
                            cfg.enforcing_consecutive_gateway_failure)
        else:
            self.c5xx[key] = 0
            self.cgw[key] = 0

    def _eject(self, host: Host, kind: str, enforcing: int) -> None:
        key = id(host)
        self.c5xx[key] = 0
        self.cgw[key] = 0
        if key in self.ejected or not (host.healthy or host.degraded):
            return
        st, s = self.state.stats, self.state.s
        if enforcing < 100 and self.state.rng.randrange(100) >= enforcing:
            return
        hosts = self.state.cluster.hosts
        percent = 100.0 * (len(self.ejected) + 1) / max(1, len(hosts))
        if self.ejected and percent > self.config.max_ejection_percent:
            st.inc(s["outlier_detection.ejections_overflow"])
            return
        self.times[key] += 1
        duration = min(self.config.base_ejection_time * self.times[key],
                       max(self.config.max_ejection_time, self.config.base_ejection_time))
        host.health_flags = (*host.health_flags, OUTLIER_FLAG)
        self.ejected[key] = self.state.loop.call_later(duration, self._uneject, host)
        self.state.cluster.lb.update(hosts)
        st.inc(s["outlier_detection.ejections_enforced_total"])
        st.inc(s[f"outlier_detection.ejections_enforced_{kind}"])
        st.gauge_add(s["outlier_detection.ejections_active"], 1)
        log.info("cluster %s: ejected host %s (%s) for %.1fs", self.state.cluster.name,
                 host.address, kind, duration)

    def _uneject(self, host: Host) -> None:
        self.ejected.pop(id(host), None)
        host.health_flags = tuple(f for f in host.health_flags if f != OUTLIER_FLAG)
        self.state.cluster.lb.update(self.state.cluster.hosts)
        self.state.stats.gauge_add(self.state.s["outlier_detection.ejections_active"], -1)

    def stop(self) -> None:
        for handle in self.ejected.values():
            handle.cancel()
        self.ejected.clear()


class ClusterHttpState:
    """A cluster's HTTP side in one worker: pools per host, breaker counts, the detector."""

    def __init__(self, cluster: UpstreamCluster, stats: Stats, loop: asyncio.AbstractEventLoop,
                 *, codec_factory: CodecFactory = default_codec,
                 flusher: Flusher | None = None) -> None:
        self.flusher = flusher or Flusher(loop)
        import random
        self.cluster = cluster
        self.stats = stats
        self.loop = loop
        self.rng = random.Random(cluster.rng.random())
        self.codec_factory = codec_factory
        scope = f"cluster.{cluster.config.observability_name}."
        self.scope = scope
        self.s = {n: scope + n for n in (*HTTP_CLUSTER_STATS, *HTTP_CLUSTER_GAUGES)}
        for n in HTTP_CLUSTER_STATS:
            stats.declare(scope + n, "counter")
        for n in HTTP_CLUSTER_GAUGES:
            stats.declare(scope + n, "gauge")
        self.pools: dict[tuple[int, str], HttpPool] = {}
        self.pending = 0
        self.active_requests = 0
        self.active_retries = 0
        thresholds = cluster.config.default_thresholds
        self.max_requests = thresholds.max_requests
        self.max_retries = thresholds.max_retries
        od = cluster.config.outlier_detection
        self.outlier = OutlierDetector(self, od) if od is not None else None
        # The stats every request updates, kept as cells (see Stats.counter). By class,
        # index 2-5 (upstream_rq_2xx..5xx; the router counts no other class).
        self.rq_total = stats.counter(scope + "upstream_rq_total")
        self.rq_completed = stats.counter(scope + "upstream_rq_completed")
        self.rq_active = stats.gauge(scope + "upstream_rq_active")
        self.rq_class: tuple[Cell, ...] = (Cell(), Cell(), *(
            stats.counter(f"{scope}upstream_rq_{c}xx") for c in range(2, 6)))
        self._code_cells: dict[int, Cell] = {}

    def code_cell(self, code: int) -> Cell:
        """``cluster.<name>.upstream_rq_<code>``'s cell, made once per status code."""
        cell = self._code_cells.get(code)
        if cell is None:
            cell = self._code_cells[code] = self.stats.counter(
                f"{self.scope}upstream_rq_{code}")
        return cell

    def pool(self, host: Host, protocol: str) -> HttpPool:
        key = (id(host), protocol)
        p = self.pools.get(key)
        if p is None or p.host is not host:
            p = self.pools[key] = HttpPool(self, host, protocol)
        return p

    def close(self) -> None:
        for p in self.pools.values():
            p.close_all()
        if self.outlier is not None:
            self.outlier.stop()
