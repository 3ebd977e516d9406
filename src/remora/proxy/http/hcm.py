"""``envoy.filters.network.http_connection_manager`` and ``envoy.filters.http.router``.

Owns, per downstream connection: choosing the codec (``codec_type`` AUTO: the HTTP/2 preface
means HTTP/2, anything else HTTP/1.1, whose ``Upgrade: h2c`` switches to HTTP/2), the streams
on it, and for each stream Envoy's request path: request-id and forwarding headers, route
selection (no route: ``404 NR``), direct responses and redirects, fault injection (``DI``/``FI``),
the router (cluster choice, host choice through the pool, per-try and total timeouts, retries
with Istio's policy, ``x-envoy-attempt-count``, ``x-envoy-expected-rq-timeout-ms``, request
mirroring), response headers (``server``, ``x-envoy-upstream-service-time``, header mutations),
local replies with Envoy's texts, details and response flags, flow control both ways, and the
stream's :class:`~remora.proxy.http.types.StreamInfo` (for access logs and Istio's metrics).
Must not: parse bytes (the codecs do), own listen sockets (:mod:`remora.proxy.server`) or pick
among a cluster's hosts by itself (:mod:`remora.proxy.upstream` / :mod:`.pool`).

References: spec §4.3, §5.3, §7.5–7.6, §9, §10; Envoy ``conn_manager_impl.cc``,
``conn_manager_utility.cc`` (header mutations), ``router.cc`` and ``retry_state_impl.cc``
(retry conditions and back-off), ``config/route/v3/route_components.proto`` (timeouts).
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import http
import logging
import random
import socket
import time
import typing
from collections.abc import Callable, Mapping
from typing import Any, Final

from mypy_extensions import mypyc_attr

from remora.proxy.http import accesslog, cors, hashing, telemetry, tracing
from remora.proxy.http import routes as rt
from remora.proxy.http.grpcstats import GrpcStream
from remora.proxy.http.h1 import H1ServerCodec
from remora.proxy.http.pool import ClusterHttpState, Flusher, HttpPool, UpstreamConnection
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
    ServerCodec,
    StreamInfo,
    StreamReset,
    Writable,
)
from remora.proxy.model import SocketAddress, TcpProxy
from remora.proxy.stats import Cell, Stats
from remora.proxy.tcp import ConnectionRecord
from remora.proxy.timers import Deadline
from remora.proxy.upstream import Host, UpstreamCluster, UpstreamError

log = logging.getLogger(__name__)

H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
BUFFER_LIMIT: Final = 1 << 20        # per_connection_buffer_limit_bytes (Envoy default 1 MiB)
RESET_BEFORE: Final = "upstream connect error or disconnect/reset before headers."
HCM_STATS = (
    "downstream_cx_total", "downstream_cx_destroy", "downstream_cx_http1_total",
    "downstream_cx_http2_total", "downstream_rq_total", "downstream_rq_http1_total",
    "downstream_rq_http2_total", "downstream_rq_completed", "downstream_rq_1xx",
    "downstream_rq_2xx", "downstream_rq_3xx", "downstream_rq_4xx", "downstream_rq_5xx",
    "downstream_rq_rx_reset", "downstream_rq_tx_reset", "downstream_rq_timeout",
    "downstream_rq_idle_timeout", "downstream_cx_delayed_close_timeout",
    "downstream_cx_idle_timeout", "downstream_cx_drain_close",
    "downstream_cx_max_duration_reached", "downstream_cx_max_requests_reached",
    "downstream_cx_protocol_error", "no_route", "no_cluster", "rq_direct_response",
    "rq_redirect", "downstream_rq_ws_on_non_ws_route", "downstream_rq_too_many_premature_resets",
)
HCM_GAUGES = ("downstream_cx_active", "downstream_rq_active")
EXCHANGE_FILTERS = ("istio.metadata_exchange", "istio.peer_metadata")
CORS_TYPE: Final = "envoy.extensions.filters.http.cors.v3.Cors"
DECORATOR_OPERATION: Final = "x-envoy-decorator-operation"
# (a Final reference: compiled code calls it without looking ``time`` up as a module attribute)
_wall_clock: Final = time.time
# Envoy's rapid-reset guard (CVE-2023-44487; runtime overload.premature_reset_total_stream_count
# and overload.premature_reset_min_stream_lifetime_seconds, defaults): a stream that ends with no
# response code within this many whole seconds was reset prematurely; once half the closed
# streams of a connection (counted up to PREMATURE_RESET_TOTAL) were, the connection is aborted.
PREMATURE_RESET_TOTAL: Final = 500
PREMATURE_RESET_MIN_LIFETIME: Final = 1
_H2_REFUSED_STREAM: Final = 7          # RFC 9113 §7 REFUSED_STREAM



def _addr_text(sa: SocketAddress | None) -> str:
    return "" if sa is None else str(sa)


def _status_text(status: int) -> str:
    try:
        return http.HTTPStatus(status).phrase
    except ValueError:
        return "Unknown"


# A UUID's variant digit (10xx in binary) from any random hex digit (its two low bits).
_VARIANT_DIGIT: Final = {d: "89ab"[int(d, 16) & 3] for d in "0123456789abcdef"}


def request_id(rng: random.Random) -> str:
    """A random UUID v4 in its text form (Envoy's UUID request-id extension): 122 random
    bits, version 4, variant 10 (RFC 9562 §5.4), without building a ``uuid.UUID``."""
    h = rng.getrandbits(128).to_bytes(16, "big").hex()
    return f"{h[:8]}-{h[8:12]}-4{h[13:16]}-{_VARIANT_DIGIT[h[16]]}{h[17:20]}-{h[20:]}"


def grpc_percent_encode(text: str) -> str:
    """gRPC's ``grpc-message`` encoding: UTF-8, then ``%XX`` for bytes outside printable
    ASCII and for ``%`` itself (gRPC "HTTP2 protocol", Responses)."""
    return "".join(chr(b) if 0x20 <= b <= 0x7E and b != 0x25 else f"%{b:02X}"
                   for b in text.encode())


def http_date(now: float | None = None) -> str:
    return email.utils.formatdate(now, usegmt=True)


class HttpContext:
    """What every connection manager of one worker shares."""

    def __init__(self, clusters: Mapping[str, UpstreamCluster], stats: Stats,
                 rng: random.Random, *, node_id: str = "", node_cluster: str = "",
                 node_metadata: Mapping[str, Any] | None = None) -> None:
        self.clusters = clusters
        self.stats = stats
        self.rng = rng
        self._states: dict[str, ClusterHttpState] = {}
        self.loop: asyncio.AbstractEventLoop | None = None
        self._flusher: Flusher | None = None
        self.connections: set[_Downstream] = set()
        self.shadows: set[asyncio.Task[None]] = set()   # request mirrors in flight
        self.draining = False           # every listener drains
        self.draining_inbound = False   # /drain_listeners?inboundonly
        self.writers = accesslog.AccessLogWriters()
        # Istio's peer metadata exchange: who this workload is, sent to the other side.
        self.local = telemetry.workload_from_node(node_metadata or {})
        self.exchange_headers = tuple(
            telemetry.encode_peer_metadata(self.local, node_id).items())
        self.node_id = node_id
        self.service_name = tracing.service_name(node_cluster, node_metadata or {})
        self.reporters: dict[str, tracing.ZipkinReporter] = {}

    def reporter(self, cfg: tracing.TracingConfig) -> tracing.ZipkinReporter:
        """The span reporter for ``cfg``'s collector cluster (one per worker)."""
        rep = self.reporters.get(cfg.collector_cluster)
        if rep is None:
            def target() -> tuple[str, int] | None:
                cluster = self.clusters.get(cfg.collector_cluster)
                host = cluster.pick(None) if cluster is not None else None
                return None if host is None else (host.sockaddr[0], host.sockaddr[1])
            rep = self.reporters[cfg.collector_cluster] = tracing.ZipkinReporter(cfg, target)
            if self.loop is not None:
                rep.start(self.loop)
        return rep

    def tcp_telemetry(self, tp: TcpProxy, *, outbound: bool,
                      ) -> Callable[[ConnectionRecord, float], None] | None:
        """tcp_proxy's access logs and Istio's ``istio_tcp_*`` metrics for one connection,
        reported when it closes (the plaintext case: no TCP metadata exchange, so the peer
        is unknown, as in Istio without mTLS)."""
        loggers = accesslog.open_access_logs(tp.access_logs, self.writers)
        if not loggers and not tp.istio_stats:
            return None
        reporter: telemetry.Reporter = "source" if outbound else "destination"

        def on_close(rec: ConnectionRecord, now: float) -> None:
            duration = max(0.0, now - rec.start)
            cluster = self.clusters.get(rec.cluster)
            info = StreamInfo(
                start_time=time.time() - duration, response_flags=set(rec.flags),
                connection_termination_details=rec.details,
                bytes_received=rec.bytes_received, bytes_sent=rec.bytes_sent,
                duration=duration, upstream_host=_addr_text(rec.upstream_host),
                upstream_cluster=rec.cluster,
                upstream_cluster_stat=cluster.config.observability_name if cluster else "",
                upstream_local_address=_addr_text(rec.upstream_local),
                downstream_local_address=_addr_text(rec.downstream_local),
                downstream_remote_address=_addr_text(rec.downstream_remote))
            if loggers:
                accesslog.log_all(loggers, info)
            if tp.istio_stats:
                telemetry.record_tcp(
                    self.stats, reporter=reporter, local=self.local, peer=None, info=info,
                    destination_service=telemetry.destination_service(
                        rec.cluster, local=self.local))
        return on_close

    async def stop_tracing(self) -> None:
        """Flush the spans still buffered (Envoy flushes its tracers on shutdown)."""
        for rep in self.reporters.values():
            await rep.stop()

    def start_drain(self, *, inbound_only: bool = False) -> None:
        """The listeners drain (SIGTERM, ``/drain_listeners``): as Envoy's connection manager
        does, close idle keep-alive connections now, answer the requests in flight with
        ``connection: close`` (HTTP/1) or send GOAWAY (HTTP/2), so clients move elsewhere
        instead of waiting out the drain time."""
        if inbound_only:
            self.draining_inbound = True
        else:
            self.draining = True
        for conn in list(self.connections):
            if not (inbound_only and conn.hcm.outbound) and not conn.closing:
                conn.hcm.stats.inc(conn.hcm.s["downstream_cx_drain_close"])
                conn.drain()

    def drains(self, hcm: HttpConnectionManager) -> bool:
        return self.draining or (self.draining_inbound and not hcm.outbound)

    def flusher_for(self) -> Flusher:
        """The worker's write coalescer (made with the running loop on first use)."""
        if self._flusher is None:
            self._flusher = Flusher(self.loop or asyncio.get_running_loop())
        return self._flusher

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.writers.arm(loop)
        for rep in self.reporters.values():
            rep.start(loop)

    def state(self, cluster: UpstreamCluster) -> ClusterHttpState:
        st = self._states.get(cluster.name)
        if st is None or st.cluster is not cluster:
            assert self.loop is not None
            st = self._states[cluster.name] = ClusterHttpState(cluster, self.stats, self.loop,
                                                               flusher=self.flusher_for())
        return st

    def close(self) -> None:
        for t in list(self.shadows):
            t.cancel()
        for st in self._states.values():
            st.close()
        self.writers.close()


@mypyc_attr(allow_interpreted_subclasses=True)   # the tests' RecordingHcm
class HttpConnectionManager:
    """One configured HCM (per filter chain, per worker)."""

    def __init__(self, config: rt.HcmConfig, ctx: HttpContext, *,
                 direction: str = "OUTBOUND") -> None:
        self.config = config
        self.ctx = ctx
        self.stats = ctx.stats
        self.direction = direction
        scope = f"http.{config.stat_prefix}."
        self.s = {n: scope + n for n in (*HCM_STATS, *HCM_GAUGES)}
        for n in HCM_STATS:
            ctx.stats.declare(scope + n, "counter")
        for n in HCM_GAUGES:
            ctx.stats.declare(scope + n, "gauge")
        # The stats every request updates, kept as cells (see Stats.counter). By class,
        # index 1-5 (downstream_rq_1xx..5xx; a status under 100 counts in none).
        st = ctx.stats
        self.rq_total = st.counter(scope + "downstream_rq_total")
        self.rq_http1 = st.counter(scope + "downstream_rq_http1_total")
        self.rq_http2 = st.counter(scope + "downstream_rq_http2_total")
        self.rq_completed = st.counter(scope + "downstream_rq_completed")
        self.rq_active = st.gauge(scope + "downstream_rq_active")
        self.rq_class: tuple[Cell, ...] = (Cell(), *(
            st.counter(f"{scope}downstream_rq_{c}xx") for c in range(1, 6)))
        self.loggers = accesslog.open_access_logs(config.access_logs, ctx.writers)
        istio_stats = config.filter("istio.stats")
        self.istio_stats = istio_stats is not None
        # Istio's stats filter reports a gRPC stream's message counts at its end and every
        # tcp_reporting_duration while it lasts (istio_stats.cc, "5s" by default).
        plugin = telemetry.StatsPluginConfig()
        if istio_stats is not None and isinstance(istio_stats.config, rt.OpaqueFilterConfig):
            plugin = telemetry.compile_plugin_config(istio_stats.config.value)  # (checked)
        self.report_interval = plugin.reporting_duration
        self.host_fallback = not plugin.disable_host_header_fallback
        # Envoy's CORS filter: its name keys the per-route policies; its stats are
        # http.<prefix>.cors.origin_valid / origin_invalid.
        self.cors_filter: str | None = next(
            (f.name for f in config.http_filters if isinstance(f.config, rt.OpaqueFilterConfig)
             and f.config.type_url == CORS_TYPE and not f.disabled), None)
        if self.cors_filter is not None:
            for n in ("cors.origin_valid", "cors.origin_invalid"):
                self.s[n] = scope + n
                ctx.stats.declare(scope + n, "counter")
        self.grpc_stats: rt.GrpcStatsConfig | None = next(
            (f.config for f in config.http_filters
             if isinstance(f.config, rt.GrpcStatsConfig) and not f.disabled), None)
        self.exchange = any(config.filter(n) is not None for n in EXCHANGE_FILTERS)
        self.outbound = direction != "INBOUND"
        self.reporter: telemetry.Reporter = "source" if self.outbound else "destination"
        self.tracer = ctx.reporter(config.trace) if config.trace is not None else None

    def flush_stats(self) -> None:
        """Nothing pending: the HTTP layer counts into the store as it goes."""

    def request_started(self, s: _Stream) -> None:
        """Inbound: learn who called (and hide the exchange headers from the app)."""
        if self.exchange and not self.outbound:
            h = s.head.headers
            s.peer_meta = telemetry.decode_peer_metadata(h)
            s.peer_sent_metadata = telemetry.strip_peer_metadata(h)

    def upstream_request(self, s: _Stream, head: RequestHead) -> None:
        if self.exchange and self.outbound:
            for k, v in self.ctx.exchange_headers:
                head.headers.set(k, v)

    def upstream_response(self, s: _Stream, head: ResponseHead) -> None:
        """Outbound: learn who answered; inbound: tell the caller who we are (only when it
        told us first, as Istio does)."""
        if not self.exchange:
            return
        h = head.headers
        if self.outbound:
            s.peer_meta = telemetry.decode_peer_metadata(h)
            telemetry.strip_peer_metadata(h)
        elif s.peer_sent_metadata:
            for k, v in self.ctx.exchange_headers:
                h.set(k, v)

    def completed(self, s: _Stream) -> None:
        """Where Envoy writes access logs: the stream is over."""
        info = s.info
        if info.grpc_status is None:
            src = info.response_trailers or (info.response.headers if info.response else None)
            value = src.get("grpc-status") if src is not None else None
            if value is not None and value.isdigit():
                info.grpc_status = int(value)
        if self.loggers:
            accesslog.log_all(self.loggers, info)
        span = s.span
        if (span is not None and span.sampled and self.config.trace is not None
                and self.tracer is not None):
            local = info.downstream_local_address if not self.outbound else ""
            self.tracer.report(tracing.span_json(
                span, info, cfg=self.config.trace, service=self.ctx.service_name,
                node_id=self.ctx.node_id, local_ip=local.rsplit(":", 1)[0].strip("[]"),
                now_us=int(time.time() * 1e6)))
        if self.istio_stats:
            service = self.destination_service(info)
            self.report_messages(s, service)
            telemetry.record_http(
                self.stats, reporter=self.reporter, local=self.ctx.local, peer=s.peer_meta,
                info=info, destination_service=service)

    def destination_service(self, info: StreamInfo) -> telemetry.DestinationService:
        """Istio's, from the request's Host unless ``disable_host_header_fallback``."""
        auth = info.request.authority if info.request is not None and self.host_fallback \
            else ""
        return telemetry.destination_service(
            info.upstream_cluster, authority=auth, route_name=info.route_name,
            local=self.ctx.local)

    def report_messages(self, s: _Stream, service: telemetry.DestinationService) -> None:
        """Istio's ``istio_request_messages_total`` / ``istio_response_messages_total``: the
        gRPC message counts the grpc_stats filter left since the last report, labelled with
        the reporter and peer labels only (Istio reports them before it adds the request
        labels)."""
        g = s.grpc
        deltas = g.message_deltas() if g is not None else None
        if deltas is None:
            return
        labels = telemetry.peer_labels(self.reporter, self.ctx.local, s.peer_meta, service)
        telemetry.record_grpc_messages(self.stats, labels, requests=deltas[0],
                                       responses=deltas[1])

    async def handle(self, sock: socket.socket, record: ConnectionRecord, *,
                     restored: SocketAddress | None, initial: bytes = b"",
                     loop: asyncio.AbstractEventLoop | None = None) -> None:
        """Serve HTTP on ``sock`` until it closes. Closes ``sock`` in every case."""
        if loop is None:
            loop = asyncio.get_running_loop()
        conn = _Downstream(self, record, loop)
        self.stats.inc(self.s["downstream_cx_total"])
        self.stats.gauge_add(self.s["downstream_cx_active"], 1)
        try:
            try:
                await loop.connect_accepted_socket(lambda: conn, sock)
            except BaseException:
                sock.close()
                raise
            runner = conn.start_runner()
            if initial:
                conn.data_received(initial)
            await runner
        except asyncio.CancelledError:
            conn.abort()
            raise
        finally:
            self.stats.gauge_add(self.s["downstream_cx_active"], -1)
            self.stats.inc(self.s["downstream_cx_destroy"])


class _Downstream(asyncio.Protocol):
    """One downstream connection: the server codec and its streams."""

    def __init__(self, hcm: HttpConnectionManager, record: ConnectionRecord,
                 loop: asyncio.AbstractEventLoop) -> None:
        self.hcm = hcm
        self.record = record
        self.loop = loop
        self.codec: H1ServerCodec | ServerCodec | None = None  # see pool.AnyWriter
        self.transport: asyncio.Transport | None = None
        self.flusher = hcm.ctx.flusher_for()
        self.dirty = False
        # Rendered once per connection for every stream's StreamInfo.
        self.local_text = _addr_text(record.downstream_local)
        self.remote_text = _addr_text(record.downstream_remote)
        self.streams: dict[int, _Stream] = {}
        # HTTP/1 streams come one after another: one task per connection (start_runner,
        # serve) runs them in turn, instead of a task per request (creating, registering and
        # freeing an asyncio task was ~5 % of a request's instructions). HTTP/2 streams run
        # side by side, each in a task of its own.
        self.queue: list[_Stream] = []
        self.wake: asyncio.Future[None] | None = None   # serve() waits on it for work
        self.runner: asyncio.Task[None] | None = None
        self.ended = False
        self.sniff = b""
        self.write_paused = False
        self.read_paused = False
        self.closing = False
        self.h1 = True
        self.requests = 0
        self._duration_timer: asyncio.TimerHandle | None = None
        cfg_idle = hcm.config.idle_timeout
        self.idle = Deadline(loop, cfg_idle, self._idle_expired) if cfg_idle else None
        self._sweep: asyncio.TimerHandle | None = None    # stream idle timeouts
        self._headers_timer: asyncio.TimerHandle | None = None
        self._delayed_close: asyncio.TimerHandle | None = None   # see close()
        self._drain_timer: asyncio.TimerHandle | None = None     # see start_drain_sequence()
        self.peer_eof = False                   # the client closed its side
        self.closed_requests = 0                # streams ended on this connection
        self.premature_resets = 0               # of which ended early with no response

    # ------------------------------------------------------------------ asyncio protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses; same interface.
        self.transport = typing.cast(asyncio.Transport, transport)
        self.hcm.ctx.connections.add(self)
        if self.hcm.config.max_connection_duration:
            self._duration_timer = self.loop.call_later(
                self.hcm.config.max_connection_duration, self._max_duration)
        self._arm_idle()

    def data_received(self, data: bytes) -> None:
        if self.closing:
            return
        if self._headers_timer is None and not self.streams and self.h1:
            # Envoy arms request_headers_timeout at the first byte of a request's head (an
            # idle connection is the idle timeout's business); the head's end disarms it.
            timeout = self.hcm.config.request_headers_timeout
            if timeout:
                self._headers_timer = self.loop.call_later(timeout, self._headers_timeout)
        if self.codec is None:
            data = self.sniff + data
            if not self._choose_codec(data):
                self.sniff = data
                return
            self.sniff = b""
        assert self.codec is not None
        self._dispatch(self.codec.receive(data))
        if self.premature_resets:
            self._check_premature_resets()
        self.flush()
        self.flusher.run()

    def eof_received(self) -> bool:
        self.peer_eof = True
        if self._delayed_close is not None:     # the peer closed: the delayed close is over
            self._cancel_timers()
            return False                        # (the transport closes itself)
        if self.codec is None:
            self.close()
            return False
        self._dispatch(self.codec.receive(b""))
        self.flush()
        self.flusher.run()
        # A tunnel's half-close went upstream (request_end); keep our side open for what the
        # upstream still sends. The tunnel's end closes the connection.
        return self.h1 and any(s.tunnel for s in self.streams.values())

    def pause_writing(self) -> None:
        self.write_paused = True
        for s in list(self.streams.values()):
            s.downstream_writable(False)

    def resume_writing(self) -> None:
        self.write_paused = False
        for s in list(self.streams.values()):
            s.downstream_writable(True)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closing = True
        self.hcm.ctx.connections.discard(self)
        self._cancel_timers()
        for s in list(self.streams.values()):
            s.downstream_reset("DC")
        self.streams.clear()
        self._end()

    # ------------------------------------------------------------------ running streams

    def start_runner(self) -> asyncio.Task[None]:
        """The task that runs this connection's HTTP/1 streams (serve) until it ends: a
        task of its own, so that its every await stays in compiled code (the listener's
        task that awaits it is Python)."""
        self.runner = self.loop.create_task(self.serve())
        return self.runner

    def run_stream(self, s: _Stream) -> None:
        """Start running a stream's request path: HTTP/1 in the connection's task (one
        request at a time), HTTP/2 in a task of its own."""
        if not self.h1 or self.runner is None:
            s.task = self.loop.create_task(s._run())
            return
        self.queue.append(s)
        self._wake()

    def _end(self) -> None:
        self.ended = True
        self._wake()

    def _wake(self) -> None:
        w = self.wake
        if w is not None:
            self.wake = None
            w.set_result(None)

    async def serve(self) -> None:
        """The connection's task: run its HTTP/1 streams in turn until it has ended."""
        task = self.runner
        assert task is not None
        queue = self.queue
        while True:
            while queue:
                s = queue.pop(0)
                if s.finished:
                    continue        # reset before its turn came
                s.task = task
                await s._run()
                s.task = None
                if s.cancels or s.cancel_seen:
                    await self._settle(task, s)
            if self.ended:
                self.runner = None
                return
            w = self.wake = self.loop.create_future()
            try:
                await w
            except asyncio.CancelledError:
                self.wake = None        # (cancelled: nothing may resolve it now)
                raise

    async def _settle(self, task: asyncio.Task[None], s: _Stream) -> None:
        """A stream cancelled in this shared task: take back the cancel requests that
        were its own, so the next stream starts clean; one made while the stream itself was
        running has not been delivered yet and is taken here. A cancel from elsewhere (the
        worker stopping) goes on."""
        if not s.cancel_seen:
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.sleep(0)
        for _ in range(s.cancels):
            task.uncancel()
        if task.cancelling():
            raise asyncio.CancelledError

    # ------------------------------------------------------------------ codec

    def _choose_codec(self, data: bytes) -> bool:
        kind = self.hcm.config.codec_type
        if kind == "AUTO":
            if len(data) < len(H2_PREFACE) and H2_PREFACE.startswith(data):
                return False   # could still be the preface
            kind = "HTTP2" if data.startswith(H2_PREFACE) else "HTTP1"
        cfg = self.hcm.config
        if kind == "HTTP2":
            from remora.proxy.http.h2codec import H2ServerCodec
            self.codec = H2ServerCodec()
            self.h1 = False
            self.hcm.stats.inc(self.hcm.s["downstream_cx_http2_total"])
        else:
            self.codec = H1ServerCodec(max_request_headers_kb=cfg.max_request_headers_kb,
                                       max_headers_count=cfg.max_headers_count)
            self.hcm.stats.inc(self.hcm.s["downstream_cx_http1_total"])
        return True

    def _dispatch(self, events: list[Event]) -> None:
        for ev in events:
            t = type(ev)
            if t is Body:
                assert isinstance(ev, Body)
                s = self.streams.get(ev.stream)
                if s is not None:
                    s.request_body(ev.data)
            elif t is RequestHeaders:
                assert isinstance(ev, RequestHeaders)
                self._new_stream(ev)
            elif t is EndStream:
                assert isinstance(ev, EndStream)
                s = self.streams.get(ev.stream)
                if s is not None:
                    s.request_end(ev.trailers)
            elif t is Writable:
                assert isinstance(ev, Writable)
                s = self.streams.get(ev.stream)
                if s is not None and not self.write_paused:
                    s.downstream_writable(True)
            elif t is StreamReset:
                assert isinstance(ev, StreamReset)
                s = self.streams.pop(ev.stream, None)
                if s is not None:
                    self.hcm.stats.inc(self.hcm.s["downstream_rq_rx_reset"])
                    # Envoy 1.29+: the client's RST_STREAM is DR with the codec's details.
                    if ev.remote:
                        refused = ev.code == _H2_REFUSED_STREAM
                        s.downstream_reset(
                            "DR", "http2.remote_refuse" if refused else "http2.remote_reset")
                    else:
                        s.downstream_reset("DPE")
            elif t is ProtocolError:
                assert isinstance(ev, ProtocolError)
                self._protocol_error(ev)
                return
            elif t is ConnectionClosed:
                if not self.streams:
                    self.close()
                else:
                    # HTTP/1 EOF with a request in flight: the client went away (Envoy does
                    # not half-close HTTP connections).
                    if self.h1:
                        for s in list(self.streams.values()):
                            s.downstream_reset("DC")
                        self.close()
                    else:
                        self.closing_after_streams = True

    closing_after_streams = False

    def _new_stream(self, ev: RequestHeaders) -> None:
        if self._headers_timer is not None:
            self._headers_timer.cancel()
            self._headers_timer = None
        self._cancel_idle()
        if ev.upgrade == "h2c" and self.h1 and self._upgrade_h2c(ev):
            return
        self.requests += 1
        limit = self.hcm.config.max_requests_per_connection
        if limit and self.requests >= limit:
            # Envoy: the connection's last request; it closes after this response (HTTP/1
            # ``connection: close``, HTTP/2 the drain sequence).
            self.hcm.stats.inc(self.hcm.s["downstream_cx_max_requests_reached"])
            self.wind_down()
        s = _Stream(self, ev)
        self.streams[ev.stream] = s
        s.start()

    def _upgrade_h2c(self, ev: RequestHeaders) -> bool:
        """HTTP/1.1 ``Upgrade: h2c`` (RFC 7540 §3.2): answer 101, switch the connection to
        HTTP/2, and serve the upgraded request as stream 1."""
        from remora.proxy.http.h2codec import H2ServerCodec
        settings = ev.head.headers.get("http2-settings")
        codec = self.codec
        if settings is None or not isinstance(codec, H1ServerCodec) or not ev.end_stream:
            return False   # serve it as HTTP/1.1 (RFC: the upgrade is optional)
        rest = codec.take_rest()
        head = ev.head
        for name in ("upgrade", "http2-settings"):
            head.headers.remove(name)
        try:
            h2 = H2ServerCodec.from_upgrade(settings, head, ev.end_stream)
        except Exception:   # a malformed HTTP2-Settings: serve as HTTP/1.1
            log.debug("bad HTTP2-Settings; not upgrading", exc_info=True)
            return False
        assert self.transport is not None
        self.write_now()     # earlier responses on this connection go first
        self.transport.write(b"HTTP/1.1 101 Switching Protocols\r\nconnection: Upgrade\r\n"
                             b"upgrade: h2c\r\n\r\n")
        self.codec = h2
        self.h1 = False
        self.hcm.stats.inc(self.hcm.s["downstream_cx_http2_total"])
        events = h2.initial_events() if hasattr(h2, "initial_events") else []
        if rest:
            events += h2.receive(rest)
        self._dispatch(events)
        self.flush()
        return True

    def _protocol_error(self, ev: ProtocolError) -> None:
        if self.h1 and not ev.status and ev.details == "http1.codec_error":
            # The H1 codec's EOF in the middle of a request: for Envoy that is the client
            # closing (remote close, DC), not a protocol error.
            for st in list(self.streams.values()):
                st.downstream_reset("DC")
            self.close()
            return
        self.hcm.stats.inc(self.hcm.s["downstream_cx_protocol_error"])
        s = self.streams.get(ev.stream) if ev.stream else None
        if s is None and len(self.streams) == 1 and self.h1:
            s = next(iter(self.streams.values()))
        if ev.status and (s is None or not s.response_started):
            if s is None:
                s = _Stream.for_error(self, ev)
            s.info.response_flags.add("DPE")
            # Envoy's codec-error reply carries the status text as its body
            # (``CodeUtility::toString``): "Bad Request", "Request Header Fields Too Large"…
            s.local_reply(ev.status, _status_text(ev.status), details=ev.details, close=True)
            if s.task is None:
                s._finish()     # a stream made for the error: nothing else will end it
        else:
            for st in list(self.streams.values()):
                st.downstream_reset("DPE")
        self.close()

    # ------------------------------------------------------------------ used by streams

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
        if self.codec is None or self.transport is None:
            return
        out = self.codec.data_to_send()
        if out and not self.transport.is_closing():
            self.transport.write(out)

    def stream_done(self, s: _Stream) -> None:
        if self.streams.get(s.id) is s:
            del self.streams[s.id]
        self.closed_requests += 1
        if not s.info.response_code:
            d = s.info.duration
            if d is None or int(d) <= PREMATURE_RESET_MIN_LIFETIME:
                self.premature_resets += 1
        codec = self.codec
        if codec is None:
            return
        if self.h1:
            # Held events first: a ProtocolError behind this (pipelined) request still owes
            # its own 400 before the connection closes.
            if isinstance(codec, H1ServerCodec) and not self.closing:
                self._dispatch(codec.resume())
                self.flush()
            if not codec.keep_alive or self.closing:
                self.flush()
                self.close()
                return
            if not self.streams and not self.closing:
                self._arm_idle()
                if self.read_paused:
                    self.resume_reading()
        elif not self.streams:
            if self.closing_after_streams:
                self.close()
            else:
                self._arm_idle()

    def drain(self) -> None:
        if self.closing:
            return
        if not self.streams and self._drain_timer is None:
            self.close()
            return
        self.wind_down()

    @property
    def draining(self) -> bool:
        """No new requests will be taken on this connection, or soon will not be."""
        return self.closing_after_streams or self._drain_timer is not None

    def wind_down(self) -> None:
        """Serve what is in flight, then close: no new requests on this connection (HTTP/1:
        after the response in flight; HTTP/2: the drain sequence)."""
        if not self.h1 and self.codec is not None:
            self.start_drain_sequence()
        else:
            self.closing_after_streams = True

    def start_drain_sequence(self) -> None:
        """Envoy's HTTP/2 drain (``startDrainSequence``): a GOAWAY with the largest stream id
        first, so the client stops opening streams while those racing it are still served;
        after ``drain_timeout`` (5 s) the final GOAWAY names the last stream taken, and the
        connection closes once its streams are done."""
        codec = self.codec
        if codec is None or self.closing or self.closing_after_streams \
                or self._drain_timer is not None:
            return
        codec.shutdown_notice()
        self.flush()
        self._drain_timer = self.loop.call_later(self.hcm.config.drain_timeout,
                                                 self._drain_timeout)

    def _drain_timeout(self) -> None:
        self._drain_timer = None
        self.closing_after_streams = True
        if self.codec is not None:
            self.codec.close()          # the final GOAWAY: streams in flight finish
            self.flush()
        if not self.streams:
            self.close()

    def _max_duration(self) -> None:
        """``max_connection_duration``: the connection drains, as at a listener drain."""
        self._duration_timer = None
        self.hcm.stats.inc(self.hcm.s["downstream_cx_max_duration_reached"])
        self.drain()

    def pause_reading(self) -> None:
        if not self.read_paused and self.transport is not None and not self.closing:
            self.read_paused = True
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.read_paused and self.transport is not None and not self.closing:
            self.read_paused = False
            self.transport.resume_reading()

    def close(self) -> None:
        if (self.closing and self.transport is None) or self._delayed_close is not None:
            return
        self.closing = True
        self._cancel_timers()
        if self.transport is not None:
            if self.codec is not None and not self.h1:
                with contextlib.suppress(Exception):
                    self.codec.close()
            self.write_now()
            delay = self.hcm.config.delayed_close_timeout
            codec = self.codec
            if delay > 0 and not self.peer_eof and (
                    not self.h1 or (isinstance(codec, H1ServerCodec) and codec.input_pending)):
                # Envoy's delayed close: the peer may still be sending (an answer came before
                # its request ended, or its bytes broke the protocol). Closing now with its
                # bytes unread would reset the connection, and a client still writing could
                # lose the answer. What it sends is read and dropped (data_received ignores a
                # closing connection) until it closes, or for delayed_close_timeout. HTTP/2:
                # always, since a client may send frames at any time (and the GOAWAY just
                # written tells it to close).
                self._delayed_close = self.loop.call_later(delay, self._delayed_close_expired)
                if self.read_paused:            # (flow control had stopped reading)
                    self.read_paused = False
                    self.transport.resume_reading()
                return
            self.transport.close()
        else:
            self._end()

    def _delayed_close_expired(self) -> None:
        self._delayed_close = None
        self.hcm.stats.inc(self.hcm.s["downstream_cx_delayed_close_timeout"])
        if self.transport is not None:
            self.transport.close()

    def _check_premature_resets(self) -> None:
        """Envoy's ``maybeDrainDueToPrematureResets``, after each read: abort the connection
        once at least half its closed streams were reset prematurely, counting from
        PREMATURE_RESET_TOTAL closed streams, or as soon as that many halved are (the ratio can
        no longer recover). A client opening and resetting streams in a loop ("rapid reset")
        costs it its connection, counted in ``downstream_rq_too_many_premature_resets``."""
        n = self.closed_requests
        if self.premature_resets * 2 < (PREMATURE_RESET_TOTAL if n < PREMATURE_RESET_TOTAL
                                        else n) or self.closing:
            return
        self.hcm.stats.inc(self.hcm.s["downstream_rq_too_many_premature_resets"])
        log.debug("[C%d] too many premature resets (%d of %d streams): aborting",
                  self.record.cid, self.premature_resets, n)
        self.record.details = "too_many_premature_resets"
        self.abort()

    def abort(self) -> None:
        self.closing = True
        for s in list(self.streams.values()):
            s.downstream_reset("DC")
        if self.transport is not None:
            self.transport.abort()

    # ------------------------------------------------------------------ timers

    def _arm_idle(self) -> None:
        if self.idle is not None:
            self.idle.start()

    def _cancel_idle(self) -> None:
        if self.idle is not None:
            self.idle.stop()

    def _idle_expired(self) -> None:
        """``idle_timeout``: HTTP/1 closes; HTTP/2 goes through the drain sequence (Envoy's
        ``onIdleTimeout``)."""
        if self.streams:
            return
        self.hcm.stats.inc(self.hcm.s["downstream_cx_idle_timeout"])
        if self.h1:
            self.close()
        else:
            self.start_drain_sequence()

    def watch_stream_idle(self, timeout: float) -> None:
        """A stream with ``stream_idle_timeout`` started: one sweep timer per connection
        checks every stream's last activity (not a timer per request)."""
        if self._sweep is None:
            self._sweep = self.loop.call_later(timeout, self._sweep_streams)

    def _sweep_streams(self) -> None:
        self._sweep = None
        now = self.loop.time()
        soonest: float | None = None
        for s in list(self.streams.values()):
            if not s.idle_timeout or s.finished:
                continue
            left = s.last_activity + s.idle_timeout - now
            if left <= 0.0005:
                s._timed_out("SI", "stream timeout", "stream_idle_timeout")
            elif soonest is None or left < soonest:
                soonest = left
        if soonest is not None and not self.closing:
            self._sweep = self.loop.call_later(soonest, self._sweep_streams)

    def _headers_timeout(self) -> None:
        """``request_headers_timeout``: the first request's head did not arrive in time
        (slowloris). Envoy answers 408 on HTTP/1."""
        self._headers_timer = None
        if self.streams or self.closing:
            return
        self.hcm.stats.inc(self.hcm.s["downstream_rq_timeout"])
        if self.h1:
            if self.codec is None:
                self.codec = H1ServerCodec()
            s = _Stream.for_error(self, ProtocolError(408, "request_header_timeout"))
            # Envoy's onRequestHeaderTimeout text and details.
            s.local_reply(408, "request header timeout", details="request_header_timeout",
                          close=True)
            s._finish()
        self.close()

    def _cancel_timers(self) -> None:
        if self.idle is not None:
            self.idle.cancel()
        for t in (self._duration_timer, self._sweep, self._headers_timer, self._delayed_close,
                  self._drain_timer):
            if t is not None:
                t.cancel()
        self._duration_timer = self._sweep = self._headers_timer = None
        self._delayed_close = self._drain_timer = None


class _Stream:
    """One request/response exchange on a downstream connection."""

    def __init__(self, conn: _Downstream, ev: RequestHeaders, *, run: bool = True) -> None:
        self.conn = conn
        self.hcm = conn.hcm
        self.id = ev.stream
        self.head = ev.head
        self.request_complete = ev.end_stream
        self.expect_continue = ev.expect_continue
        self.upgrade = ev.upgrade
        self.trailers: HeaderMap | None = None
        self.body: list[bytes] = []          # request body retained for retries / not sent
        self.body_size = 0
        self.retry_ok = True                 # the whole body is still retained
        self.sent_upto = 0                   # body chunks of self.body the attempt has
        self.attempt: _Attempt | None = None
        self.response_started = False
        self.response_done = False
        self.task: asyncio.Task[None] | None = None   # the task running it, while it runs
        self.running = False                 # its request path (_run) has begun
        self.cancels = 0                     # cancel requests made for it (see _cancel_run)
        self.cancel_seen = False
        self.start_mono = conn.loop.time()
        self.info = StreamInfo(
            start_time=_wall_clock(), protocol=ev.head.protocol, request=ev.head,
            downstream_local_address=conn.local_text,
            downstream_remote_address=conn.remote_text,
        )
        self.route: rt.Route | None = None
        self.vhost: rt.VirtualHost | None = None
        self.weight: rt.ClusterWeight | None = None
        self.router_config = self.hcm.config.router
        self.cluster: UpstreamCluster | None = None
        self.set_cookie = ""                 # a hash policy's generated cookie, for the response
        self.request_done: asyncio.Future[None] | None = None   # set for mirrors
        self._request_timer: asyncio.TimerHandle | None = None
        self._duration_timer: asyncio.TimerHandle | None = None
        self.idle_timeout = 0.0
        self.last_activity = 0.0
        self.span: tracing.Span | None = None
        self.decorated_operation = ""        # the route decorator's, to propagate (tracing)
        self.peer_meta: telemetry.WorkloadMeta | None = None
        self.peer_sent_metadata = False
        self.finished = False
        self.tunnel = False                  # HTTP/1 upgrade / CONNECT accepted: raw bytes
        self.grpc: GrpcStream | None = None  # the grpc_stats filter's state (gRPC requests)
        self.cors: cors.CorsRequest | None = None   # the CORS filter's, for the response
        self._report_timer: asyncio.TimerHandle | None = None

    @classmethod
    def for_error(cls, conn: _Downstream, ev: ProtocolError) -> _Stream:
        head = RequestHead(method="-", path="", protocol="HTTP/1.1")
        s = cls(conn, RequestHeaders(stream=ev.stream or 1, head=head, end_stream=True))
        s.info.request = None
        conn.streams[s.id] = s
        return s

    # ------------------------------------------------------------------ downstream events

    def start(self) -> None:
        hcm = self.hcm
        self._arm_timers()
        hcm.rq_total.value += 1
        (hcm.rq_http2 if self.head.protocol == "HTTP/2" else hcm.rq_http1).value += 1
        hcm.rq_active.value += 1
        if hcm.grpc_stats is not None and rt.is_grpc_request(self.head):
            self.grpc = GrpcStream(hcm.grpc_stats, self.head.path)
            if hcm.istio_stats and hcm.grpc_stats.emit_filter_state and hcm.report_interval:
                self._report_timer = self.conn.loop.call_later(hcm.report_interval,
                                                               self._report_tick)
        codec = self.conn.codec
        if self.expect_continue and not hcm.config.proxy_100_continue and codec is not None:
            # proxy_100_continue false (Envoy's default): Envoy answers "100 Continue" itself
            # before any filter runs and removes Expect so the upstream does not answer again.
            self.head.headers.remove("expect")
            codec.send_informational(self.id, ResponseHead(100, protocol=self.head.protocol))
            self.conn.flush()
        self.conn.run_stream(self)

    # ------------------------------------------------------------------ stream timers

    def _arm_timers(self) -> None:
        """The HCM's per-stream limits (Envoy ``ConnectionManagerImpl::ActiveStream``):
        ``request_timeout`` until the whole request is in, ``max_stream_duration`` for the
        whole exchange, ``stream_idle_timeout`` without a byte either way."""
        cfg, loop = self.hcm.config, self.conn.loop
        if cfg.request_timeout and not self.request_complete:
            self._request_timer = loop.call_later(
                cfg.request_timeout, self._timed_out, "", "request timeout",
                "request_overall_timeout")
        if cfg.max_stream_duration:
            self._duration_timer = loop.call_later(
                cfg.max_stream_duration, self._timed_out, "DT", "downstream duration timeout",
                "duration_timeout")
        self.set_idle_timeout(cfg.stream_idle_timeout)

    def set_idle_timeout(self, timeout: float | None) -> None:
        self.idle_timeout = timeout or 0.0
        if self.idle_timeout:
            self.last_activity = self.conn.loop.time()
            self.conn.watch_stream_idle(self.idle_timeout)

    def _timed_out(self, flag: str, text: str, details: str) -> None:
        """A stream limit expired: 408 if nothing was answered yet, else a reset."""
        if self.finished:
            return
        if flag:
            self.info.response_flags.add(flag)
        self.hcm.stats.inc(self.hcm.s["downstream_rq_timeout"] if flag != "SI"
                           else self.hcm.s["downstream_rq_idle_timeout"])
        if self.response_started:
            self.info.response_code_details = details
            self._reset_downstream()
        else:
            self.local_reply(408, text, details=details)
        if not self._cancel_run():
            self._finish()

    def _cancel_run(self) -> bool:
        """Stop this stream's request path (CancelledError at its await); False if it is
        not running, and then the caller finishes the stream. A task that has not begun
        (HTTP/2: a reset read with its HEADERS) is cancelled too, but cancelling it throws
        into a coroutine that never ran, so its ``finally`` (``_finish``) would never
        run either."""
        t = self.task
        if t is None or t.done():
            return False
        if not self.running:
            t.cancel()
            return False
        self.cancels += 1
        t.cancel()
        return True

    def _cancel_timers(self) -> None:
        for t in (self._request_timer, self._duration_timer, self._report_timer):
            if t is not None:
                t.cancel()
        self._request_timer = self._duration_timer = self._report_timer = None

    def _report_tick(self) -> None:
        """Istio's periodic report of a long gRPC stream's message counts: once the peer is
        known (its metadata came), every reporting interval; the rest at the end."""
        if self.finished:
            return
        if self.peer_meta is not None:
            self.hcm.report_messages(self, self.hcm.destination_service(self.info))
        self._report_timer = self.conn.loop.call_later(self.hcm.report_interval,
                                                       self._report_tick)

    def request_body(self, data: bytes) -> None:
        self.info.bytes_received += len(data)
        g = self.grpc
        if g is not None:
            g.request_data(data)
        if self.idle_timeout:
            self.last_activity = self.conn.loop.time()
        a = self.attempt
        if a is not None and a.sid and not a.done:
            a.conn.send_body(a.sid, data)
            if not self.conn.h1:
                self._consumed(len(data))
            if self.retry_ok:
                self._retain(data, sent=True)
            if a.conn.blocked(a.sid):
                self._pause_source()
            return
        self._retain(data, sent=False)
        if self.body_size > BUFFER_LIMIT:
            self._pause_source()

    def _retain(self, data: bytes, *, sent: bool) -> None:
        if not sent or self.retry_ok:
            self.body.append(data)
            self.body_size += len(data)
            if sent:
                self.sent_upto = len(self.body)
        if self.body_size > BUFFER_LIMIT and sent:
            # Too big to replay: no more retries, and free what was kept (Envoy: retry
            # buffer overflow disables retries for this request).
            self.retry_ok = False
            self.body = []
            self.sent_upto = 0

    def request_end(self, trailers: HeaderMap | None) -> None:
        self.request_complete = True
        self.trailers = trailers
        if self._request_timer is not None:
            self._request_timer.cancel()
            self._request_timer = None
        if self.request_done is not None and not self.request_done.done():
            self.request_done.set_result(None)
        a = self.attempt
        if a is not None and a.sid and not a.done:
            a.conn.send_end(a.sid, trailers)
            if self.tunnel:
                # An HTTP/1 tunnel's end is a half-close of the upstream socket (the codec
                # encodes nothing for it).
                a.conn.half_close()

    def _consumed(self, n: int) -> None:
        codec = self.conn.codec
        if codec is not None:
            codec.consumed(self.id, n)

    def _pause_source(self) -> None:
        self.conn.pause_reading()

    def upstream_writable(self, writable: bool) -> None:
        if writable:
            self.conn.resume_reading()
        else:
            self.conn.pause_reading()

    def downstream_writable(self, writable: bool) -> None:
        a = self.attempt
        if a is None:
            return
        if writable and (self.conn.codec is None or self.conn.codec.buffered(self.id) == 0):
            a.conn.resume_reading()
        elif not writable:
            a.conn.pause_reading()

    def downstream_reset(self, flag: str, details: str = "") -> None:
        """The client went away (or reset the stream) before the exchange finished."""
        if self.finished:
            return
        self.info.response_flags.add(flag)
        if details:
            self.info.response_code_details = details   # the codec's, as Envoy's HCM takes it
        elif not self.info.response_code_details:
            self.info.response_code_details = ("downstream_remote_disconnect" if flag == "DC"
                                               else "codec_error")
        if not self._cancel_run():
            self._finish()

    # ------------------------------------------------------------------ the request path

    async def _run(self) -> None:
        self.running = True
        if self.finished:
            return          # ended before its turn (see _cancel_run)
        try:
            await self._process()
        except asyncio.CancelledError:
            self.cancel_seen = True
            if self.attempt is not None:
                self.attempt.abandon()
            if not self.finished and not self.info.response_flags:
                self.info.response_flags.add("DC")
        except Exception:
            log.exception("[C%d] stream %d failed", self.conn.record.cid, self.id)
            if not self.response_started:
                self.local_reply(500, "internal error", details="internal_error")
            else:
                self._reset_downstream()
        finally:
            self._finish()
            # The stream and its attempt point at each other: drop this side so both are
            # freed by reference counting, not left to the cycle collector (which took 13 %
            # of the proxy's time under load when every request left such a cycle).
            self.attempt = None

    async def _process(self) -> None:
        hcm, cfg = self.hcm, self.hcm.config
        head = self.head
        self._mutate_request_headers()
        hcm.request_started(self)
        rc = cfg.route_config
        route = None
        vh = None
        if rc is not None:
            vh = rt.select_virtual_host(rc, head.authority)
            if vh is not None:
                route = rt.match_route(vh, head)
        self.vhost, self.route = vh, route
        if cfg.trace is not None:
            # Envoy decides on tracing once the route is known (its own tracing settings
            # replace the connection manager's); the span is named by the route's decorator,
            # else "egress"/"ingress".
            self.span = tracing.start_span(
                cfg.trace, head, outbound=hcm.outbound,
                operation="egress" if hcm.outbound else "ingress", rng=hcm.ctx.rng,
                now_us=int(self.info.start_time * 1e6),
                route=route.tracing if route is not None else None)
            self._decorate(self.span, route)
        if route is None:
            hcm.stats.inc(hcm.s["no_route"])
            self.info.response_flags.add("NR")
            self.local_reply(404, "", details="route_not_found")
            return
        self.info.route_name = route.name
        action = route.route
        if action is not None and action.idle_timeout is not None:
            self.set_idle_timeout(rt.stream_idle_timeout(action, cfg))
        if route.direct_response is not None:
            hcm.stats.inc(hcm.s["rq_direct_response"])
            dr = route.direct_response
            self.local_reply(dr.status, dr.body.decode("latin-1"), details="direct_response",
                             direct=True)
            return
        if route.redirect is not None:
            hcm.stats.inc(hcm.s["rq_redirect"])
            status, location = rt.redirect_response(route.redirect, head, route.match)
            self.local_reply(status, "", details="direct_response", direct=True,
                             extra=(("location", location),))
            return
        if self.upgrade and not cfg.upgrade_enabled(self.upgrade, route):
            hcm.stats.inc(hcm.s["downstream_rq_ws_on_non_ws_route"])
            self.local_reply(403, "", details="upgrade_failed")
            return
        action = route.route
        assert action is not None and rc is not None and vh is not None
        name, weight = rt.route_cluster(action, head, hcm.ctx.rng)
        self.weight = weight
        if self.grpc is not None and name:
            routed = hcm.ctx.clusters.get(name)
            if routed is not None:
                self.grpc.bind(hcm.stats, routed.config.observability_name)
        fault = self._fault(rc, vh, route, weight, name)
        if fault is not None:
            delay, abort, grpc_status = fault
            if delay:
                self.info.response_flags.add("DI")
                await asyncio.sleep(delay)
            if abort is not None or grpc_status is not None:
                self.info.response_flags.add("FI")
                extra: tuple[tuple[str, str], ...] = ()
                status = abort or 200
                if grpc_status is not None:
                    extra = (("grpc-status", str(grpc_status)),
                             ("grpc-message", "fault filter abort"))
                self.local_reply(status, "fault filter abort", details="fault_filter_abort",
                                 extra=extra)
                return
        if hcm.cors_filter is not None and "origin" in head.headers \
                and self._cors(rc, vh, route, weight):
            return
        cluster = hcm.ctx.clusters.get(name) if name else None
        if cluster is None:
            hcm.stats.inc(hcm.s["no_cluster"])
            self.info.response_flags.add("NC")
            self.local_reply(action.cluster_not_found_response_code or 503, "",
                             details="cluster_not_found")
            return
        self.cluster = cluster
        self.info.upstream_cluster = cluster.name
        self.info.upstream_cluster_stat = cluster.config.observability_name
        rt.finalize_request(rc, vh, route, head, cluster=weight,
                            insert_original_path=not self.router_config.suppress_envoy_headers)
        for policy in action.request_mirror_policies:
            self._mirror(policy)
        await _Router(self, cluster, action, rt.effective_retry_policy(vh, route)).run()

    def _decorate(self, span: tracing.Span, route: rt.Route | None) -> None:
        """Envoy's route decorator (``traceRequest``): the span takes its operation name.
        Outbound, the name goes upstream in ``x-envoy-decorator-operation`` (unless the
        decorator says not to propagate) so the server's sidecar can name its span alike;
        inbound, such a header renames the span and is removed before the app."""
        dec = route.decorator if route is not None else None
        if dec is not None and dec.operation:
            span.name = dec.operation
            self.decorated_operation = dec.operation if dec.propagate else ""
        h = self.head.headers
        if self.hcm.outbound:
            if self.decorated_operation:
                h.set(DECORATOR_OPERATION, self.decorated_operation)
            return
        override = h.get(DECORATOR_OPERATION)
        if override is not None:
            if override:
                span.name = override
                self.decorated_operation = ""
            h.remove(DECORATOR_OPERATION)

    def _cors(self, rc: rt.RouteConfiguration, vh: rt.VirtualHost, route: rt.Route,
              weight: rt.ClusterWeight | None) -> bool:
        """Envoy's CORS filter on a request with an ``Origin``; True when it answered a
        preflight itself (200, ``cors_response``)."""
        hcm = self.hcm
        assert hcm.cors_filter is not None
        policies = rt.resolve_cors(hcm.cors_filter, rc, vh, route, weight)
        if not policies:
            return False
        d = cors.decide(policies, self.head, hcm.ctx.rng)
        if d.origin_valid is not None:
            hcm.stats.inc(hcm.s["cors.origin_valid" if d.origin_valid
                                else "cors.origin_invalid"])
        self.cors = d.request
        if d.preflight is None:
            return False
        self.local_reply(200, "", details="cors_response", direct=True,
                         extra=tuple(d.preflight))
        return True

    def _mutate_request_headers(self) -> None:
        """Envoy's ``ConnectionManagerUtility::mutateRequestHeaders`` for a sidecar."""
        cfg = self.hcm.config
        h = self.head.headers
        if cfg.use_remote_address:
            remote = self.conn.record.downstream_remote
            if remote is not None and not cfg.skip_xff_append:
                xff = h.get("x-forwarded-for")
                h.set("x-forwarded-for", f"{xff},{remote.address}" if xff else remote.address)
            h.set("x-forwarded-proto", self.head.scheme)
        elif "x-forwarded-proto" not in h:
            h.add("x-forwarded-proto", self.head.scheme or "http")
        if cfg.generate_request_id and "x-request-id" not in h:
            h.add("x-request-id", request_id(self.hcm.ctx.rng))
        if cfg.via:
            via = h.get("via")
            h.set("via", f"{via}, {cfg.via}" if via else cfg.via)

    def _fault(self, rc: rt.RouteConfiguration, vh: rt.VirtualHost, route: rt.Route,
               weight: rt.ClusterWeight | None, cluster: str,
               ) -> tuple[float | None, int | None, int | None] | None:
        fault = rt.route_fault(route, self.hcm.config, vh=vh, rc=rc, cluster=weight)
        if fault is None:
            return None
        delay, abort, grpc = rt.fault_decision(fault, self.head, self.hcm.ctx.rng,
                                               cluster=cluster)
        if not delay and abort is None and grpc is None:
            return None
        return delay, abort, grpc

    def _mirror(self, policy: Any) -> None:
        cluster = self.hcm.ctx.clusters.get(policy.cluster)
        if cluster is None or not rt.mirror_selected(policy, self.hcm.ctx.rng):
            return
        head = self.head.copy()
        auth = head.authority
        host, sep, port = auth.rpartition(":") if ":" in auth and not auth.endswith("]") \
            else (auth, "", "")
        head.authority = f"{host}-shadow{sep}{port}" if sep else f"{auth}-shadow"
        stream = self

        async def shadow() -> None:
            with contextlib.suppress(Exception):
                await _shadow_request(stream.hcm, cluster, head, stream)
        task = self.conn.loop.create_task(shadow())
        # Tracked so a shutdown cancels them (they are not the connection's business).
        self.hcm.ctx.shadows.add(task)
        task.add_done_callback(self.hcm.ctx.shadows.discard)

    # ------------------------------------------------------------------ responses

    def send_response_headers(self, head: ResponseHead, end_stream: bool) -> None:
        codec = self.conn.codec
        if codec is None or self.conn.closing:
            return
        self._response_headers(head)
        if self.grpc is not None:
            self.grpc.response_headers(head, end_stream)
        self.response_started = True
        self.info.response = head
        self.info.response_code = head.status
        self.info.response_duration = self.conn.loop.time() - self.start_mono
        codec.send_headers(self.id, head, end_stream)
        self.conn.flush()
        if end_stream:
            self.response_done = True
        if self.conn.h1 and (self.upgrade or self.head.method == "CONNECT"):
            # The H1 codec holds what followed an upgrade request until it is answered:
            # after a 101 (2xx to CONNECT) the early tunnel bytes, after a refusal the
            # request's EndStream. Both come from resume().
            self.tunnel = head.status == 101 or (self.head.method == "CONNECT"
                                                 and 200 <= head.status < 300)
            resume = getattr(codec, "resume", None)
            if resume is not None:
                self.conn._dispatch(resume())
                self.conn.flush()

    def _response_headers(self, head: ResponseHead) -> None:
        cfg = self.hcm.config
        h = head.headers
        mode = cfg.server_header_transformation
        if mode == "OVERWRITE" or (mode == "APPEND_IF_ABSENT" and "server" not in h):
            h.set("server", cfg.server_name)
        conn = self.conn
        if self.hcm.ctx.drains(self.hcm) and not conn.draining \
                and not (conn.h1 and head.status == 101):
            # A connection made while the listeners drain: Envoy's drain close at its first
            # response (HTTP/1 connection: close, HTTP/2 the drain sequence).
            self.hcm.stats.inc(self.hcm.s["downstream_cx_drain_close"])
            conn.wind_down()
        if conn.h1 and conn.closing_after_streams and head.status != 101:
            h.set("connection", "close")    # draining: this connection ends here
        if self.route is not None and self.vhost is not None and cfg.route_config is not None:
            rt.apply_response_headers(cfg.route_config, self.vhost, self.route, head,
                                      request=self.head, cluster=self.weight)
        if self.info.response_code_details == "via_upstream":
            self.hcm.upstream_response(self, head)
            if self.set_cookie:
                h.add("set-cookie", self.set_cookie)
        if self.cors is not None:
            self.cors.response_headers(h)
        span = self.span
        if span is not None:
            # Envoy's encodeHeaders: inbound, the response names the decorator's operation
            # for the caller's span; outbound, such a header renames ours and goes no further.
            if not self.hcm.outbound:
                if self.decorated_operation:
                    h.set(DECORATOR_OPERATION, self.decorated_operation)
            else:
                override = h.get(DECORATOR_OPERATION)
                if override is not None:
                    if override:
                        span.name = override
                    h.remove(DECORATOR_OPERATION)

    def send_body(self, data: bytes) -> None:
        codec = self.conn.codec
        if codec is None or self.conn.closing:
            return
        self.info.bytes_sent += len(data)
        if self.idle_timeout:
            self.last_activity = self.conn.loop.time()
        if self.grpc is not None:
            self.grpc.response_data(data)
        codec.send_body(self.id, data)
        self.conn.flush()
        if self.conn.write_paused or codec.buffered(self.id):
            a = self.attempt
            if a is not None:
                a.conn.pause_reading()

    def send_end(self, trailers: HeaderMap | None) -> None:
        codec = self.conn.codec
        self.response_done = True
        if trailers is not None:
            self.info.response_trailers = trailers
            if self.grpc is not None:
                self.grpc.response_trailers(trailers)
        if codec is None or self.conn.closing:
            return
        codec.send_end(self.id, trailers)
        self.conn.flush()

    def local_reply(self, status: int, body: str, *, details: str, direct: bool = False,
                    close: bool = False, extra: tuple[tuple[str, str], ...] = ()) -> None:
        """An Envoy-generated response (``content-type: text/plain``, ``date``, ``server``);
        after a response has started, the stream is reset instead."""
        self.info.response_code_details = details
        if self.response_started:
            self._reset_downstream()
            return
        if not direct and rt.is_grpc_request(self.head):
            self._grpc_local_reply(status, body, extra)
            return
        data = body.encode()
        headers = HeaderMap.trusted([])
        if data or not direct:
            headers.add("content-length", str(len(data)))
        if data:
            headers.add("content-type", "text/plain")
        for k, v in extra:
            headers.add(k, v)
        headers.add("date", http_date())
        if close and self.conn.h1:
            headers.add("connection", "close")
        head = ResponseHead(status=status, headers=headers, protocol=self.head.protocol)
        bodyless = self.head.method == "HEAD" or not data
        self.send_response_headers(head, bodyless)
        if not bodyless:
            self.send_body(data)
            self.send_end(None)
        if close:
            self.conn.closing_after_streams = True

    def _grpc_local_reply(self, status: int, body: str,
                          extra: tuple[tuple[str, str], ...]) -> None:
        """Envoy answers a gRPC request's local reply as gRPC: HTTP 200, trailers-only, the
        HTTP status mapped to a gRPC status (``Grpc::Utility::httpToGrpcStatus``) and the
        text in ``grpc-message`` (percent-encoded, gRPC's HTTP/2 spec)."""
        headers = HeaderMap.trusted([("content-type", "application/grpc")])
        given = dict(extra)
        code = given.pop("grpc-status", None) or str(
            accesslog.HTTP_TO_GRPC_STATUS.get(status, 2))
        headers.add("grpc-status", code)
        message = given.pop("grpc-message", None) or body
        if message:
            headers.add("grpc-message", grpc_percent_encode(message))
        for k, v in given.items():
            headers.add(k, v)
        headers.add("date", http_date())
        self.info.grpc_status = int(code)
        self.send_response_headers(ResponseHead(status=200, headers=headers,
                                                protocol=self.head.protocol), True)

    def _reset_downstream(self) -> None:
        codec = self.conn.codec
        self.hcm.stats.inc(self.hcm.s["downstream_rq_tx_reset"])
        if codec is not None:
            codec.reset(self.id)
            self.conn.flush()
        if self.conn.h1:
            self.conn.close()

    def _finish(self) -> None:
        if self.finished:
            return
        self.finished = True
        self._cancel_timers()
        hcm = self.hcm
        hcm.rq_active.value -= 1
        code = self.info.response_code
        if code:
            hcm.rq_completed.value += 1
            if code >= 100:
                hcm.rq_class[min(code // 100, 5)].value += 1
        if not self.response_done and self.response_started:
            self._reset_downstream()
        self.info.duration = self.conn.loop.time() - self.start_mono
        try:
            hcm.completed(self)
        except Exception:
            log.exception("access log / stats failed")
        self.conn.stream_done(self)


class _Attempt:
    """One try of the router on one upstream connection (pool :class:`StreamCallbacks`)."""

    def __init__(self, stream: _Stream, conn: UpstreamConnection, host: Host,
                 loop: asyncio.AbstractEventLoop) -> None:
        self.stream = stream
        self.conn = conn
        self.host = host
        self.sid = 0
        self.headers: asyncio.Future[tuple[str, Any]] = loop.create_future()
        # How the response ended ("ok", "reset:<reason>"; "" while it goes on). A future
        # for it is made only when the router has to wait (see wait_complete): most
        # responses are whole by the time they are committed.
        self.outcome = ""
        self._waiter: asyncio.Future[str] | None = None
        self.committed = False
        self.done = False
        self.early: list[bytes] = []
        self.early_end: tuple[HeaderMap | None] | None = None
        self.start = loop.time()
        self.loop = loop
        self.status = 0
        self.active: Cell | None = None    # the cluster's upstream_rq_active while active

    def on_informational(self, head: ResponseHead) -> None:
        s = self.stream
        if head.status == 100 and s.hcm.config.proxy_100_continue and not s.response_started:
            codec = s.conn.codec
            if codec is not None:
                codec.send_informational(s.id, head)
                s.conn.flush()

    def on_headers(self, head: ResponseHead, end_stream: bool) -> None:
        self.status = head.status
        if not self.headers.done():
            self.headers.set_result(("headers", (head, end_stream)))

    def on_body(self, data: bytes) -> None:
        if self.committed:
            self.stream.send_body(data)
            self.conn.consumed(self.sid, len(data))
        else:
            self.early.append(data)

    def on_end(self, trailers: HeaderMap | None) -> None:
        if self.committed:
            self.stream.send_end(trailers)
            self._complete("ok")
        else:
            self.early_end = (trailers,)

    def on_reset(self, reason: str, *, refused: bool) -> None:
        self.done = True
        if not self.headers.done():
            self._request_ended()
            self.headers.set_result(("reset", (reason, refused)))
        elif self.committed:
            self._complete("reset:" + reason)
        else:
            # Reset between the headers and the commit decision: the body is incomplete.
            self.early_end = None
            self._complete("reset:" + reason)

    def on_upstream_writable(self, writable: bool) -> None:
        self.stream.upstream_writable(writable)

    def _complete(self, how: str) -> None:
        self.done = True
        self._request_ended()
        if not self.outcome:
            self.outcome = how
            w = self._waiter
            if w is not None and not w.done():
                w.set_result(how)

    def wait_complete(self) -> asyncio.Future[str]:
        """A future for :attr:`outcome` (call while it is still "")."""
        if self._waiter is None:
            self._waiter = self.loop.create_future()
        return self._waiter

    def request_started(self, active: Cell) -> None:
        """The request goes upstream: it counts as active for the host (LEAST_REQUEST
        reads that) and for the cluster (``active``) until :meth:`_request_ended`."""
        self.host.stats["rq_active"] += 1
        active.value += 1
        self.active = active

    def _request_ended(self) -> None:
        """The upstream request is over (its response ended, or the try was given up on)."""
        active = self.active
        if active is not None:
            self.host.stats["rq_active"] -= 1
            active.value -= 1
            self.active = None

    def commit(self, head: ResponseHead, end_stream: bool) -> None:
        """This response goes downstream."""
        s = self.stream
        self.committed = True
        if end_stream:
            s.send_response_headers(head, True)
            self._complete("ok")
            return
        s.send_response_headers(head, False)
        for chunk in self.early:
            s.send_body(chunk)
            self.conn.consumed(self.sid, len(chunk))
        self.early = []
        if self.early_end is not None:
            s.send_end(self.early_end[0])
            self._complete("ok")

    def abandon(self) -> None:
        self._request_ended()
        if not self.done:
            self.done = True
            self.conn.abandon(self.sid)
        if not self.headers.done():
            self.headers.cancel()


_RETRY_STATUS_5XX = range(500, 600)
_GATEWAY = (502, 503, 504)


class _Router:
    """``envoy.filters.http.router`` for one stream."""

    def __init__(self, stream: _Stream, cluster: UpstreamCluster, action: rt.RouteAction,
                 policy: rt.RetryPolicy | None) -> None:
        self.s = stream
        self.cluster = cluster
        self.action = action
        self.ctx = stream.hcm.ctx
        self.state = self.ctx.state(cluster)
        self.policy = policy
        self.timeouts = rt.final_timeouts(
            action, policy, stream.head,
            respect_expected_rq_timeout=stream.router_config.respect_expected_rq_timeout)
        self.retry_on: frozenset[str] = (frozenset(self.policy.retry_on)
                                         if self.policy is not None else frozenset())
        self.retries_left = self.policy.num_retries if self.policy is not None else 0
        self.tried: list[Host] = []
        self.loop = stream.conn.loop
        self.hash_key: int | None = None     # for RING_HASH / MAGLEV clusters
        if action.hash_policy:
            conn = stream.conn
            remote = conn.record.downstream_remote
            self.hash_key, stream.set_cookie = hashing.request_hash(
                action.hash_policy, stream.head, remote.address if remote is not None else "",
                conn.remote_text + conn.local_text)

    def _protocol(self) -> str:
        p = self.cluster.config.http_protocol
        if p == "HTTP2" or (p == "DOWNSTREAM" and self.s.head.protocol == "HTTP/2"):
            return "HTTP/2"
        return "HTTP/1.1"

    async def run(self) -> None:
        s = self.s
        timeout = self.timeouts.global_
        deadline = self.loop.time() + timeout if timeout else None
        expected = self.timeouts.expected
        if expected and not s.router_config.suppress_envoy_headers:
            s.head.headers.set("x-envoy-expected-rq-timeout-ms", str(int(expected * 1000)))
        st = self.state
        stats = self.ctx.stats
        if st.active_requests >= st.max_requests:
            stats.inc(st.s["upstream_rq_pending_overflow"])
            self._fail("UO", 503, f"{RESET_BEFORE} reset reason: overflow",
                       "upstream_reset_before_response_started{overflow}", overloaded=True)
            return
        st.active_requests += 1
        try:
            await self._attempts(deadline)
        finally:
            st.active_requests -= 1

    async def _attempts(self, deadline: float | None) -> None:
        s, info = self.s, self.s.info
        attempt_no = 0
        last_reason = ""
        retried = False
        stats, st = self.ctx.stats, self.state
        while True:
            attempt_no += 1
            info.attempt_count = attempt_no
            host = self._pick()
            if host is None:
                stats.inc(self.cluster.stat("upstream_cx_none_healthy"))
                info.response_flags.add("UH")
                s.local_reply(503, "no healthy upstream", details="no_healthy_upstream")
                return
            info.upstream_host = host.address_text
            self.tried.append(host)
            outcome, value, attempt = await self._try(host, attempt_no, deadline)
            if outcome == "response":
                head: ResponseHead = value[0]
                end_stream: bool = value[1]
                if (self._retriable_status(head.status) and self._may_retry()):
                    assert attempt is not None
                    attempt.abandon()
                    self._report(host, head.status)
                    retried = True
                    await self._backoff(attempt_no, deadline)
                    continue
                assert attempt is not None
                await self._forward(attempt, head, end_stream, host, deadline)
                if retried:
                    stats.inc(st.s["upstream_rq_retry_success"])
                return
            if outcome == "global_timeout":
                stats.inc(st.s["upstream_rq_timeout"])
                info.response_flags.add("UT")
                self._report(host, 504)
                s.local_reply(504, "upstream request timeout",
                              details="upstream_response_timeout")
                return
            if outcome == "overflow":
                self._fail("UO", 503, f"{RESET_BEFORE} reset reason: overflow",
                           "upstream_reset_before_response_started{overflow}", overloaded=True)
                return
            # connect failure, reset before response, per-try timeout
            flag, reason, refused = value
            last_reason = reason
            self._report(host, 504 if flag == "UT" else 503)
            if self._retriable_failure(flag, refused) and self._may_retry():
                retried = True
                await self._backoff(attempt_no, deadline)
                continue
            if retried:
                info.response_flags.add("URX")
            if flag == "UT":
                info.response_flags.add("UT")
                s.local_reply(504, "upstream request timeout",
                              details="upstream_per_try_timeout")
                return
            info.response_flags.add(flag)
            text = (f"{RESET_BEFORE} retried and the latest reset reason: {last_reason}"
                    if retried else f"{RESET_BEFORE} reset reason: {last_reason}")
            detail_reason = last_reason.replace(" ", "_").split(",_transport")[0]
            if flag == "UF":
                detail_reason = "connection_failure"
                info.upstream_transport_failure_reason = last_reason.split(
                    "transport failure reason: ", 1)[-1]
            s.local_reply(503, text,
                          details=f"upstream_reset_before_response_started{{{detail_reason}}}")
            return

    def _pick(self) -> Host | None:
        policy = self.policy
        attempts = (policy.host_selection_retry_max_attempts
                    if policy is not None and policy.previous_hosts else 1)
        host = None
        for i in range(max(1, attempts)):
            host = self.cluster.pick(self.s.conn.record.downstream_local
                                     if self.cluster.original_dst else None, self.hash_key, i)
            if host is None or host not in self.tried:
                return host
        return host

    def _retriable_status(self, status: int) -> bool:
        on = self.retry_on
        if "5xx" in on and status >= 500:
            return True
        if "gateway-error" in on and status in _GATEWAY:
            return True
        if "retriable-4xx" in on and status == 409:
            return True
        return bool("retriable-status-codes" in on and self.policy is not None
                    and status in self.policy.retriable_status_codes)

    def _retriable_failure(self, flag: str, refused: bool) -> bool:
        on = self.retry_on
        if flag == "UF":
            return bool(on & {"connect-failure", "5xx", "gateway-error", "reset"})
        if flag == "UT":   # per-try timeout
            return bool(on & {"5xx", "gateway-error", "reset"})
        if refused and ("refused-stream" in on or "reset-before-request" in on):
            return True
        return bool(on & {"5xx", "gateway-error", "reset", "reset-before-request"}
                    if flag in ("UC", "UR", "UPE") else set())

    def _may_retry(self) -> bool:
        if self.retries_left <= 0 or not self.s.retry_ok or self.s.response_started:
            return False
        st = self.state
        if st.active_retries >= st.max_retries:
            self.ctx.stats.inc(st.s["upstream_rq_retry_overflow"])
            return False
        self.retries_left -= 1
        self.ctx.stats.inc(st.s["upstream_rq_retry"])
        return True

    async def _backoff(self, attempt_no: int, deadline: float | None) -> None:
        """Envoy's fully jittered exponential back-off: a random time in
        [0, base·2^(n-1)), capped at max (base 25 ms, max 10× base)."""
        policy = self.policy
        base = policy.back_off_base if policy is not None else 0.025
        cap = policy.back_off_max if policy is not None else 0.25
        ceiling = min(base * (2 ** (attempt_no - 1)), cap)
        delay = self.ctx.rng.random() * ceiling
        if deadline is not None:
            delay = min(delay, max(0.0, deadline - self.loop.time()))
        st = self.state
        st.active_retries += 1
        try:
            await asyncio.sleep(delay)
        finally:
            st.active_retries -= 1

    def _report(self, host: Host, status: int) -> None:
        od = self.state.outlier
        if od is not None:
            od.result(host, status)
        hs = host.stats
        if status >= 500:
            hs["rq_error"] += 1
        else:
            hs["rq_success"] += 1

    def _fail(self, flag: str, status: int, body: str, details: str, *,
              overloaded: bool = False) -> None:
        self.s.info.response_flags.add(flag)
        extra = (("x-envoy-overloaded", "true"),) if overloaded else ()
        self.s.local_reply(status, body, details=details, extra=extra)

    async def _try(self, host: Host, attempt_no: int, deadline: float | None,
                   ) -> tuple[str, Any, _Attempt | None]:
        s = self.s
        pool = self.state.pool(host, self._protocol())
        per_try = self.timeouts.per_try or None
        limit = None
        now = self.loop.time()
        if deadline is not None:
            limit = deadline - now
        if per_try:
            limit = per_try if limit is None else min(limit, per_try)
        per_try_binding = bool(per_try and (deadline is None or now + per_try < deadline))
        try:
            if limit is None:      # (Istio's routes have no timeout: no timer, no wrapper)
                got = await self._send(pool, host, attempt_no)
            else:
                async with asyncio.timeout(limit):
                    got = await self._send(pool, host, attempt_no)
        except TimeoutError:
            a = s.attempt
            if a is not None and a.host is host:
                a.abandon()
            if per_try_binding:
                self.ctx.stats.inc(self.state.s["upstream_rq_per_try_timeout"])
                return "failure", ("UT", "per try timeout", False), None
            return "global_timeout", None, None
        if isinstance(got, tuple):
            return got
        attempt = got
        outcome, value = attempt.headers.result()
        if outcome == "reset":
            reason, refused = value
            self.ctx.stats.inc(self.state.s["upstream_rq_rx_reset"])
            # Envoy's flags: the connection ended (UC), the peer reset the stream (UR), or it
            # broke the protocol (UPE).
            flag = {"connection termination": "UC", "protocol error": "UPE"}.get(reason, "UR")
            return "failure", (flag, reason, refused), None
        return "response", value, attempt

    async def _send(self, pool: HttpPool, host: Host, attempt_no: int,
                    ) -> _Attempt | tuple[str, Any, _Attempt | None]:
        """Get a connection and send the request on it; the attempt once its response
        headers (or its end) are in, else the outcome for :meth:`_try`."""
        try:
            conn = await pool.acquire()
        except UpstreamError as exc:
            if exc.flag == "UO":
                return "overflow", None, None
            return "failure", ("UF", f"connection failure, transport failure reason: "
                                     f"{exc.detail}", False), None
        attempt = _Attempt(self.s, conn, host, self.loop)
        self.s.attempt = attempt
        self._start_request(attempt, attempt_no, host)
        await attempt.headers
        return attempt

    def _start_request(self, attempt: _Attempt, attempt_no: int, host: Host) -> None:
        s = self.s
        head = s.head
        if s.vhost is not None and s.vhost.include_request_attempt_count:
            head.headers.set("x-envoy-attempt-count", str(attempt_no))
        s.hcm.upstream_request(s, head)
        upstream_head = head
        if head.protocol != "HTTP/2" and self._protocol() == "HTTP/2":
            upstream_head = head.copy()
            upstream_head.protocol = "HTTP/2"
        state = self.state
        state.rq_total.value += 1
        host.stats["rq_total"] += 1
        attempt.request_started(state.rq_active)
        body = s.body[: s.sent_upto] if s.retry_ok else []
        pending = s.body[s.sent_upto:] if s.retry_ok else s.body
        end_now = s.request_complete and not body and not pending
        attempt.sid = attempt.conn.open_stream(attempt, upstream_head, end_now)
        s.info.upstream_local_address = attempt.conn.local_address
        for chunk in (*body, *pending):
            attempt.conn.send_body(attempt.sid, chunk)
        if pending:
            if not s.conn.h1:
                s._consumed(sum(len(c) for c in pending))
            if not s.retry_ok:
                s.body = []
            s.sent_upto = len(s.body)
            s.conn.resume_reading()
        if s.request_complete and not end_now:
            attempt.conn.send_end(attempt.sid, s.trailers)

    async def _forward(self, attempt: _Attempt, head: ResponseHead, end_stream: bool,
                       host: Host, deadline: float | None) -> None:
        s = self.s
        self._report(host, head.status)
        state = self.state
        code = head.status
        state.rq_completed.value += 1
        if 200 <= code < 600:
            state.rq_class[code // 100].value += 1
        state.code_cell(code).value += 1
        s.info.response_code_details = "via_upstream"
        head.headers.set("x-envoy-upstream-service-time",
                         str(int((self.loop.time() - attempt.start) * 1000)))
        attempt.commit(head, end_stream)
        how = attempt.outcome
        if not how:
            try:
                if deadline is None:
                    how = await attempt.wait_complete()
                else:
                    async with asyncio.timeout(max(0.0, deadline - self.loop.time())):
                        how = await attempt.wait_complete()
            except TimeoutError:
                self.ctx.stats.inc(state.s["upstream_rq_timeout"])
                s.info.response_flags.add("UT")
                attempt.abandon()
                s._reset_downstream()
                return
        if how.startswith("reset:"):
            s.info.response_flags.add("UC" if "termination" in how else "UR")
            s.info.response_code_details = "upstream_reset_after_response_started{" + \
                how[6:].replace(" ", "_") + "}"
            s._reset_downstream()


class _MirrorSink:
    """Receives a mirrored request's answer, and drops it."""

    def __init__(self, conn: UpstreamConnection, done: asyncio.Future[None]) -> None:
        self.conn = conn
        self.done = done
        self.sid = 0

    def on_informational(self, head: ResponseHead) -> None: ...

    def on_headers(self, head: ResponseHead, end_stream: bool) -> None:
        if end_stream and not self.done.done():
            self.done.set_result(None)

    def on_body(self, data: bytes) -> None:
        self.conn.consumed(self.sid, len(data))

    def on_end(self, trailers: HeaderMap | None) -> None:
        if not self.done.done():
            self.done.set_result(None)

    def on_reset(self, reason: str, *, refused: bool) -> None:
        if not self.done.done():
            self.done.set_result(None)

    def on_upstream_writable(self, writable: bool) -> None: ...


async def _shadow_request(hcm: HttpConnectionManager, cluster: UpstreamCluster,
                          head: RequestHead, stream: _Stream) -> None:
    """Request mirroring: the same request to another cluster; the answer is dropped."""
    # Wait for the whole request body (mirrors need it) while it is retained.
    if not stream.request_complete:
        whole = stream.request_done = asyncio.get_running_loop().create_future()
        async with asyncio.timeout(60):
            await whole
    if not stream.retry_ok:
        return
    state = hcm.ctx.state(cluster)
    host = cluster.pick(None)
    if host is None:
        return
    proto = "HTTP/2" if cluster.config.http_protocol == "HTTP2" else "HTTP/1.1"
    conn = await state.pool(host, proto).acquire()
    done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    body = list(stream.body)
    sink = _MirrorSink(conn, done)
    sid = sink.sid = conn.open_stream(sink, head, not body)
    for chunk in body:
        conn.send_body(sid, chunk)
    if body:
        conn.send_end(sid, None)
    async with asyncio.timeout(30):
        await done
