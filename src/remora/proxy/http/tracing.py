"""Distributed tracing as Envoy's Zipkin tracer does it for a sidecar.

Owns: the HCM's ``tracing`` settings (:class:`TracingConfig`, compiled from the
``HttpConnectionManager.Tracing`` proto with an ``envoy.tracers.zipkin`` provider), reading the
trace context a request carries (B3 multi-header ``x-b3-*``, the single ``b3`` header, and W3C
``traceparent`` when ``trace_context_option`` asks for it), the sampling decision, the span of
one request (a CLIENT span on outbound listeners, SERVER on inbound), the context sent upstream
(``x-b3-traceid``, ``x-b3-spanid``, ``x-b3-parentspanid``, ``x-b3-sampled`` and ``traceparent``),
the span's Zipkin v2 JSON, and :class:`ZipkinReporter`, which batches spans and POSTs them to
the collector cluster (``collector_endpoint``, default ``/api/v2/spans``) every flush interval.
Must not: route or proxy requests; it is told when a request starts and ends.

References: Envoy ``source/extensions/tracers/zipkin`` behaviour and docs (``zipkin.proto``:
``shared_span_context`` default true, ``trace_id_128bit``, ``trace_context_option``; flush every
5 s), the B3 spec (openzipkin/b3-propagation), W3C Trace Context (``traceparent``
``00-<trace>-<span>-<flags>``), Zipkin v2 API (``POST /api/v2/spans``, JSON list of spans).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

# Registered so that bootstraps naming them parse (and other providers get a clear refusal).
from envoy.config.trace.v3 import opentelemetry_pb2, zipkin_pb2  # noqa: F401

from remora.errors import BadInput
from remora.proxy.http.types import RequestHead, StreamInfo

log = logging.getLogger(__name__)

FLUSH_INTERVAL = 5.0       # Envoy runtime tracing.zipkin.flush_interval_ms default
MIN_FLUSH_SPANS = 5        # Envoy runtime tracing.zipkin.min_flush_spans default
MAX_BUFFERED_SPANS = 1000  # drop (and count) beyond this while the collector is away

Kind = Literal["CLIENT", "SERVER"]


@dataclass(frozen=True, slots=True, kw_only=True)
class TracingConfig:
    """``HttpConnectionManager.tracing`` with a Zipkin provider. Sampling values are
    percentages (Envoy's ``Percent``); Envoy defaults: 100 % each."""

    collector_cluster: str
    collector_endpoint: str = "/api/v2/spans"
    collector_hostname: str = ""
    trace_id_128bit: bool = False
    shared_span_context: bool = True
    w3c: bool = False                    # trace_context_option USE_B3_WITH_W3C_PROPAGATION
    client_sampling: float = 100.0
    random_sampling: float = 100.0
    overall_sampling: float = 100.0
    max_path_tag_length: int = 256
    custom_tags: tuple[tuple[str, str], ...] = ()   # literal tags only
    operation: str = ""


@dataclass(frozen=True, slots=True)
class RouteTracing:
    """A route's own ``tracing`` (``envoy.config.route.v3.Tracing``): its sampling replaces
    the connection manager's, each unset value meaning 100 % (Envoy's ``RouteTracingImpl``),
    and its literal custom tags are added to the span."""

    client_sampling: float = 100.0
    random_sampling: float = 100.0
    overall_sampling: float = 100.0
    custom_tags: tuple[tuple[str, str], ...] = ()


def _literal_tags(tags: Any, path: str) -> tuple[tuple[str, str], ...]:
    out: list[tuple[str, str]] = []
    for i, t in enumerate(tags):
        if t.WhichOneof("type") != "literal":
            raise BadInput(f"unsupported {path}.custom_tags[{i}]: only literal tags")
        out.append((t.tag, t.literal.value))
    return tuple(out)


def compile_route_tracing(msg: Any, path: str) -> RouteTracing:
    def pct(field: str) -> float:
        if not msg.HasField(field):
            return 100.0
        p = getattr(msg, field)
        return float(p.numerator) * 100.0 / (100, 10000, 1000000)[p.denominator]
    return RouteTracing(client_sampling=pct("client_sampling"),
                        random_sampling=pct("random_sampling"),
                        overall_sampling=pct("overall_sampling"),
                        custom_tags=_literal_tags(msg.custom_tags, path))


def compile_tracing(msg: Any, path: str) -> TracingConfig | None:
    """The ``tracing`` field of an HCM proto (already field-checked by the caller's
    allowlist). No provider: Envoy's bootstrap-level tracer would apply, which Remora does
    not implement, so tracing stays off."""
    if not msg.HasField("provider"):
        return None
    prov = msg.provider
    where = f"{path}.provider"
    if not prov.HasField("typed_config"):
        raise BadInput(f"{where}: typed_config is required")
    cfg = zipkin_pb2.ZipkinConfig()
    if not prov.typed_config.Is(cfg.DESCRIPTOR):
        raise BadInput(f"unsupported {where}: only envoy.tracers.zipkin is implemented "
                       f"(got {prov.typed_config.type_url.split('/')[-1]})")
    prov.typed_config.Unpack(cfg)
    if not cfg.collector_cluster:
        raise BadInput(f"{where}.typed_config: collector_cluster is required")
    if cfg.collector_endpoint_version not in (0, 1):   # DEPRECATED_AND_UNAVAILABLE, HTTP_JSON
        raise BadInput(f"unsupported {where}.typed_config.collector_endpoint_version: only "
                       "HTTP_JSON is implemented")
    unsupported = [f.name for f, _ in cfg.ListFields()
                   if f.name in ("split_spans_for_request", "collector_service")]
    if unsupported:
        raise BadInput(f"unsupported field {where}.typed_config.{unsupported[0]}")

    def pct(field: str) -> float:
        return float(getattr(msg, field).value) if msg.HasField(field) else 100.0
    return TracingConfig(
        collector_cluster=cfg.collector_cluster,
        collector_endpoint=cfg.collector_endpoint or "/api/v2/spans",
        collector_hostname=cfg.collector_hostname,
        trace_id_128bit=cfg.trace_id_128bit,
        shared_span_context=cfg.shared_span_context.value
        if cfg.HasField("shared_span_context") else True,
        w3c=cfg.trace_context_option == 1,
        client_sampling=pct("client_sampling"), random_sampling=pct("random_sampling"),
        overall_sampling=pct("overall_sampling"),
        max_path_tag_length=msg.max_path_tag_length.value
        if msg.HasField("max_path_tag_length") else 256,
        custom_tags=_literal_tags(msg.custom_tags, path))


# ----------------------------------------------------------------------------- context


@dataclass(slots=True)
class Context:
    """What a request arrived with."""

    trace_id: str
    span_id: str
    parent_id: str = ""
    sampled: bool | None = None       # None: no decision received


def _hex(text: str | None, lengths: tuple[int, ...]) -> str | None:
    if text is None:
        return None
    t = text.strip().lower()
    if len(t) not in lengths or any(c not in "0123456789abcdef" for c in t):
        return None
    return t


def _sampled(value: str | None) -> bool | None:
    if value is None:
        return None
    v = value.strip().lower()
    if v in ("1", "true", "d"):
        return True
    if v in ("0", "false"):
        return False
    return None


def extract(head: RequestHead, *, w3c: bool) -> Context | None:
    """The incoming trace context: B3 multi headers, else the single ``b3`` header, else
    (with ``w3c``) ``traceparent``. Malformed ids are ignored (a new trace starts)."""
    h = head.headers
    trace = _hex(h.get("x-b3-traceid"), (16, 32))
    span = _hex(h.get("x-b3-spanid"), (16,))
    if trace and span:
        sampled = _sampled(h.get("x-b3-sampled"))
        if h.get("x-b3-flags") == "1":       # debug: always sampled
            sampled = True
        return Context(trace_id=trace, span_id=span,
                       parent_id=_hex(h.get("x-b3-parentspanid"), (16,)) or "",
                       sampled=sampled)
    single = h.get("b3")
    if single:
        parts = single.strip().split("-")
        if len(parts) >= 2:
            t, s = _hex(parts[0], (16, 32)), _hex(parts[1], (16,))
            if t and s:
                parent = (_hex(parts[3], (16,)) or "") if len(parts) > 3 else ""
                return Context(trace_id=t, span_id=s, parent_id=parent,
                               sampled=_sampled(parts[2]) if len(parts) > 2 else None)
    if w3c:
        tp = h.get("traceparent")
        if tp:
            parts = tp.strip().split("-")
            if len(parts) == 4 and parts[0] == "00":
                t, s = _hex(parts[1], (32,)), _hex(parts[2], (16,))
                flags = _hex(parts[3], (2,))
                if t and s and flags and t != "0" * 32 and s != "0" * 16:
                    return Context(trace_id=t, span_id=s, sampled=bool(int(flags, 16) & 1))
    return None


# ----------------------------------------------------------------------------- spans


@dataclass(slots=True)
class Span:
    trace_id: str
    span_id: str
    parent_id: str
    sampled: bool
    kind: Kind
    name: str
    start_us: int
    shared: bool = False                  # the server half of a shared span context
    tags: dict[str, str] = field(default_factory=dict)


def _id(rng: random.Random, bits: int) -> str:
    value = 0
    while value == 0:
        value = rng.getrandbits(bits)
    return f"{value:0{bits // 4}x}"


def start_span(cfg: TracingConfig, head: RequestHead, *, outbound: bool, operation: str,
               rng: random.Random, now_us: int, route: RouteTracing | None = None) -> Span:
    """The span for one request, and the context written into ``head`` for the upstream
    request (Envoy's ``ZipkinSpan::injectContext``). A ``route`` tracing config replaces
    the connection manager's sampling and adds its tags."""
    ctx = extract(head, w3c=cfg.w3c)
    sampling = min(route.random_sampling, route.overall_sampling) if route is not None \
        else min(cfg.random_sampling, cfg.overall_sampling)
    kind: Kind = "CLIENT" if outbound else "SERVER"
    if ctx is None:
        trace_id = _id(rng, 128 if cfg.trace_id_128bit else 64)
        parent = ""
        span_id = _id(rng, 64)
        sampled = rng.random() * 100.0 < sampling
        shared = False
    else:
        trace_id = ctx.trace_id
        # An upstream decision is kept (B3: the caller decides for the whole trace).
        sampled = (ctx.sampled if ctx.sampled is not None
                   else rng.random() * 100.0 < sampling)
        if cfg.shared_span_context and not outbound:
            # Zipkin's shared span: the server records the client's span id.
            span_id, parent, shared = ctx.span_id, ctx.parent_id, True
        else:
            span_id, parent, shared = _id(rng, 64), ctx.span_id, False
    span = Span(trace_id=trace_id, span_id=span_id, parent_id=parent, sampled=sampled,
                kind=kind, name=operation, start_us=now_us, shared=shared)
    if route is not None:
        span.tags.update(route.custom_tags)
    h = head.headers
    h.set("x-b3-traceid", trace_id)
    h.set("x-b3-spanid", span_id)
    if parent:
        h.set("x-b3-parentspanid", parent)
    else:
        h.remove("x-b3-parentspanid")
    h.set("x-b3-sampled", "1" if sampled else "0")
    h.remove("b3")
    if cfg.w3c:
        tid = trace_id.rjust(32, "0")
        h.set("traceparent", f"00-{tid}-{span_id}-{'01' if sampled else '00'}")
    return span


def span_json(span: Span, info: StreamInfo, *, cfg: TracingConfig, service: str,
              node_id: str, local_ip: str, now_us: int) -> dict[str, Any]:
    """The Zipkin v2 JSON of a finished span, with Envoy's standard HTTP tags."""
    req = info.request
    tags: dict[str, str] = {"component": "proxy", "node_id": node_id,
                            "response_flags": ",".join(sorted(info.response_flags)) or "-",
                            "http.status_code": str(info.response_code),
                            "response_size": str(info.bytes_sent),
                            "request_size": str(info.bytes_received),
                            "upstream_cluster": info.upstream_cluster_stat or
                            info.upstream_cluster or "-",
                            "upstream_cluster.name": info.upstream_cluster or "-",
                            "http.protocol": info.protocol or "-"}
    if req is not None:
        url = f"{req.scheme}://{req.authority}{req.path}"
        tags["http.method"] = req.method
        tags["http.url"] = url[: cfg.max_path_tag_length]
        rid = req.headers.get("x-request-id")
        if rid:
            tags["guid:x-request-id"] = rid
        ua = req.headers.get("user-agent")
        if ua:
            tags["user_agent"] = ua
    if info.response_code >= 500 or info.response_code == 0:
        tags["error"] = "true"
    for k, v in cfg.custom_tags:
        tags[k] = v
    tags.update(span.tags)
    out: dict[str, Any] = {
        "traceId": span.trace_id, "id": span.span_id, "kind": span.kind,
        "name": span.name or "-", "timestamp": span.start_us,
        "duration": max(1, now_us - span.start_us),
        "localEndpoint": {"serviceName": service, "ipv4": local_ip} if local_ip
        else {"serviceName": service},
        "tags": tags,
    }
    if span.parent_id:
        out["parentId"] = span.parent_id
    if span.shared:
        out["shared"] = True
    return out


# ----------------------------------------------------------------------------- reporter


class ZipkinReporter:
    """Buffers finished spans and POSTs them to the collector every ``interval``.
    ``target`` gives the collector's ``(ip, port)`` at send time (from the cluster's hosts),
    or None when it has no host (the batch is kept, up to :data:`MAX_BUFFERED_SPANS`)."""

    def __init__(self, cfg: TracingConfig, target: Callable[[], tuple[str, int] | None], *,
                 interval: float = FLUSH_INTERVAL) -> None:
        self.cfg = cfg
        self.target = target
        self.interval = interval
        self.spans: list[dict[str, Any]] = []
        self.dropped = 0
        self.sent = 0
        self._task: asyncio.Task[None] | None = None
        self._ev_loop: asyncio.AbstractEventLoop | None = None
        self._flushing: asyncio.Task[None] | None = None

    def report(self, span: dict[str, Any]) -> None:
        """Buffer a span; a batch goes out at :data:`MIN_FLUSH_SPANS` spans or on the timer,
        as Envoy's Zipkin driver does."""
        if len(self.spans) >= MAX_BUFFERED_SPANS:
            self.dropped += 1
            return
        self.spans.append(span)
        if (len(self.spans) >= MIN_FLUSH_SPANS and self._flushing is None
                and self._ev_loop is not None):
            self._flushing = self._ev_loop.create_task(self._flush_now())

    async def _flush_now(self) -> None:
        try:
            await self.flush()
        finally:
            self._flushing = None

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._ev_loop = loop
        if self._task is None:
            self._task = loop.create_task(self._loop(), name="zipkin reporter")

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            await self.flush()

    async def flush(self) -> None:
        if not self.spans:
            return
        target = self.target()
        if target is None:
            return
        batch, self.spans = self.spans, []
        body = json.dumps(batch, separators=(",", ":")).encode()
        host = self.cfg.collector_hostname or self.cfg.collector_cluster
        head = (f"POST {self.cfg.collector_endpoint} HTTP/1.1\r\nhost: {host}\r\n"
                f"content-type: application/json\r\ncontent-length: {len(body)}\r\n"
                f"connection: close\r\n\r\n").encode()
        try:
            async with asyncio.timeout(5.0):
                reader, writer = await asyncio.open_connection(*target)
                try:
                    writer.write(head + body)
                    await writer.drain()
                    status = await reader.readline()
                finally:
                    writer.close()
                    with contextlib.suppress(OSError):
                        await writer.wait_closed()
            if not status.split(b" ")[1:2] or not status.split(b" ")[1].startswith(b"2"):
                log.warning("zipkin collector answered %r", status.strip())
            self.sent += len(batch)
        except (OSError, TimeoutError) as exc:
            log.warning("zipkin collector %s:%d unreachable: %s", *target, exc)
            self.dropped += len(batch)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        with contextlib.suppress(Exception):
            await self.flush()


def service_name(node_cluster: str, metadata: Mapping[str, Any]) -> str:
    """Istio's Zipkin ``localEndpoint.serviceName``: the node's ``--service-cluster``
    (``<app>.<namespace>``)."""
    if node_cluster:
        return node_cluster
    labels = metadata.get("LABELS") or {}
    app = labels.get("app", "") if isinstance(labels, Mapping) else ""
    ns = metadata.get("NAMESPACE", "")
    return f"{app}.{ns}" if app else "unknown"
