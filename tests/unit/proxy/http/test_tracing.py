"""Zipkin tracing: context extraction, span creation and propagation, span JSON, reporter."""

from __future__ import annotations

import asyncio
import json
import random
from typing import Any

import pytest

from remora.errors import BadInput
from remora.proxy.http import tracing
from remora.proxy.http.routes_compile import compile_hcm_dict
from remora.proxy.http.tracing import TracingConfig, extract, span_json, start_span
from remora.proxy.http.types import HeaderMap, RequestHead, StreamInfo

CFG = TracingConfig(collector_cluster="zipkin", trace_id_128bit=True,
                    shared_span_context=False)
TRACE = "463ac35c9f6413ad48485a3953bb6124"
SPAN = "a2fb4a1d1a96d312"
PARENT = "0020000000000001"


def head(**headers: str) -> RequestHead:
    return RequestHead(method="GET", path="/p?q=1", authority="reviews:9080",
                       headers=HeaderMap(headers.items()))


def test_b3_multi_headers() -> None:
    ctx = extract(head(**{"x-b3-traceid": TRACE, "x-b3-spanid": SPAN,
                          "x-b3-parentspanid": PARENT, "x-b3-sampled": "1"}), w3c=False)
    assert ctx is not None
    assert (ctx.trace_id, ctx.span_id, ctx.parent_id, ctx.sampled) == (TRACE, SPAN, PARENT,
                                                                       True)


def test_b3_single_header_and_debug_flag() -> None:
    ctx = extract(head(b3=f"{TRACE}-{SPAN}-0-{PARENT}"), w3c=False)
    assert ctx is not None and ctx.sampled is False and ctx.parent_id == PARENT
    ctx = extract(head(**{"x-b3-traceid": TRACE, "x-b3-spanid": SPAN, "x-b3-flags": "1"}),
                  w3c=False)
    assert ctx is not None and ctx.sampled is True


def test_traceparent_only_with_w3c() -> None:
    h = head(traceparent=f"00-{TRACE}-{SPAN}-01")
    assert extract(h, w3c=False) is None
    ctx = extract(h, w3c=True)
    assert ctx is not None and (ctx.trace_id, ctx.span_id, ctx.sampled) == (TRACE, SPAN, True)


@pytest.mark.parametrize("bad", [
    {"x-b3-traceid": "xyz", "x-b3-spanid": SPAN},
    {"x-b3-traceid": TRACE, "x-b3-spanid": "123"},
    {"traceparent": f"00-{'0' * 32}-{SPAN}-01"},
    {"traceparent": f"01-{TRACE}-{SPAN}"},
])
def test_malformed_context_starts_a_new_trace(bad: dict[str, str]) -> None:
    assert extract(head(**bad), w3c=True) is None


def test_new_trace_is_generated_and_injected() -> None:
    h = head()
    span = start_span(CFG, h, outbound=True, operation="reviews:9080/*",
                      rng=random.Random(1), now_us=1000)
    assert len(span.trace_id) == 32 and len(span.span_id) == 16 and not span.parent_id
    assert span.kind == "CLIENT" and span.sampled    # 100 % random sampling by default
    assert h.headers.get("x-b3-traceid") == span.trace_id
    assert h.headers.get("x-b3-spanid") == span.span_id
    assert "x-b3-parentspanid" not in h.headers
    assert h.headers.get("x-b3-sampled") == "1"


def test_child_span_keeps_trace_and_points_to_the_caller() -> None:
    h = head(**{"x-b3-traceid": TRACE, "x-b3-spanid": SPAN, "x-b3-sampled": "0"})
    span = start_span(CFG, h, outbound=False, operation="op", rng=random.Random(2),
                      now_us=5)
    assert span.trace_id == TRACE and span.parent_id == SPAN and span.span_id != SPAN
    assert span.kind == "SERVER" and not span.sampled     # the caller's decision is kept
    assert h.headers.get("x-b3-parentspanid") == SPAN
    assert h.headers.get("x-b3-sampled") == "0"


def test_shared_span_context_reuses_the_callers_span_on_inbound() -> None:
    cfg = TracingConfig(collector_cluster="zipkin")       # Envoy's default: shared
    h = head(**{"x-b3-traceid": TRACE, "x-b3-spanid": SPAN, "x-b3-parentspanid": PARENT})
    span = start_span(cfg, h, outbound=False, operation="op", rng=random.Random(3), now_us=0)
    assert (span.span_id, span.parent_id, span.shared) == (SPAN, PARENT, True)


def test_w3c_traceparent_written_alongside_b3() -> None:
    cfg = TracingConfig(collector_cluster="zipkin", w3c=True)
    h = head(traceparent=f"00-{TRACE}-{SPAN}-01")
    span = start_span(cfg, h, outbound=True, operation="op", rng=random.Random(4), now_us=0)
    assert h.headers.get("traceparent") == f"00-{TRACE}-{span.span_id}-01"
    assert h.headers.get("x-b3-traceid") == TRACE


def test_zero_percent_sampling_marks_unsampled() -> None:
    cfg = TracingConfig(collector_cluster="zipkin", random_sampling=0.0)
    h = head()
    span = start_span(cfg, h, outbound=True, operation="op", rng=random.Random(5), now_us=0)
    assert not span.sampled and h.headers.get("x-b3-sampled") == "0"


def test_span_json_has_zipkin_v2_fields_and_envoy_tags() -> None:
    h = head(**{"x-request-id": "rid-1", "x-b3-traceid": TRACE, "x-b3-spanid": SPAN})
    span = start_span(CFG, h, outbound=True, operation="reviews:9080/*",
                      rng=random.Random(6), now_us=1_000_000)
    info = StreamInfo(start_time=1.0, protocol="HTTP/1.1", request=h, response_code=503,
                      response_flags={"UF", "URX"}, upstream_cluster="outbound|9080||r",
                      bytes_sent=19)
    out = span_json(span, info, cfg=CFG, service="productpage.default",
                    node_id="sidecar~1", local_ip="10.0.0.1", now_us=1_002_500)
    assert out["traceId"] == TRACE and out["parentId"] == SPAN and out["kind"] == "CLIENT"
    assert out["duration"] == 2500 and out["timestamp"] == 1_000_000
    assert out["localEndpoint"] == {"serviceName": "productpage.default", "ipv4": "10.0.0.1"}
    tags = out["tags"]
    assert tags["http.url"] == "http://reviews:9080/p?q=1"
    assert tags["http.status_code"] == "503" and tags["error"] == "true"
    assert tags["guid:x-request-id"] == "rid-1"
    assert tags["upstream_cluster"] == "outbound|9080||r"
    json.dumps(out)   # serialisable


def test_compile_from_hcm_proto_and_refusals() -> None:
    def hcm(provider: dict[str, Any]) -> dict[str, Any]:
        return {"stat_prefix": "x", "route_config": {"name": "r"},
                "tracing": {"random_sampling": {"value": 1.0}, "provider": provider},
                "http_filters": [{"name": "envoy.filters.http.router", "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3."
                             "Router"}}]}
    zipkin = {"name": "envoy.tracers.zipkin", "typed_config": {
        "@type": "type.googleapis.com/envoy.config.trace.v3.ZipkinConfig",
        "collector_cluster": "zipkin", "collector_endpoint": "/api/v2/spans",
        "collector_endpoint_version": "HTTP_JSON", "trace_id_128bit": True,
        "shared_span_context": False}}
    cfg = compile_hcm_dict(hcm(zipkin)).trace
    assert cfg is not None
    assert (cfg.collector_cluster, cfg.trace_id_128bit, cfg.shared_span_context,
            cfg.random_sampling) == ("zipkin", True, False, 1.0)
    other = {"name": "envoy.tracers.opentelemetry", "typed_config": {
        "@type": "type.googleapis.com/envoy.config.trace.v3.OpenTelemetryConfig"}}
    with pytest.raises(BadInput) as err:
        compile_hcm_dict(hcm(other))
    assert "tracing.provider" in str(err.value)


def test_reporter_posts_batches_to_the_collector() -> None:
    async def run() -> tuple[bytes, int]:
        got: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

        async def collector(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            head = await r.readuntil(b"\r\n\r\n")
            length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                              if line.lower().startswith(b"content-length")))
            body = await r.readexactly(length)
            w.write(b"HTTP/1.1 202 Accepted\r\ncontent-length: 0\r\n\r\n")
            await w.drain()
            w.close()
            got.set_result(head + body)
        server = await asyncio.start_server(collector, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        rep = tracing.ZipkinReporter(CFG, lambda: ("127.0.0.1", port))
        rep.report({"traceId": TRACE, "id": SPAN})
        rep.report({"traceId": TRACE, "id": PARENT})
        await rep.flush()
        data = await asyncio.wait_for(got, 5)
        server.close()
        await server.wait_closed()
        return data, rep.sent
    data, sent = asyncio.run(run())
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"POST /api/v2/spans HTTP/1.1")
    assert [s["id"] for s in json.loads(body)] == [SPAN, PARENT]
    assert sent == 2


def test_reporter_keeps_spans_while_the_collector_has_no_host() -> None:
    rep = tracing.ZipkinReporter(CFG, lambda: None)
    rep.report({"id": "1"})
    asyncio.run(rep.flush())
    assert rep.spans == [{"id": "1"}] and rep.sent == 0
