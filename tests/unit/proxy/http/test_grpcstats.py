"""The gRPC statistics filter's parts: message framing, names, the stats it keeps."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from remora.proxy.bootstrap import BadInput
from remora.proxy.http.grpcstats import (
    FrameCounter,
    GrpcStream,
    is_grpc_response,
    service_and_method,
)
from remora.proxy.http.routes import GrpcStatsConfig
from remora.proxy.http.types import HeaderMap, ResponseHead
from remora.proxy.stats import Stats
from tests.unit.proxy.http.harness import ROUTER, compile_hcm_dict, hcm_dict


def frame(payload: bytes, compressed: bool = False) -> bytes:
    return bytes([1 if compressed else 0]) + len(payload).to_bytes(4, "big") + payload


@given(st.lists(st.binary(max_size=300), max_size=12), st.data())
def test_frame_counter_counts_messages_across_any_chunking(payloads: list[bytes],
                                                           data: st.DataObject) -> None:
    wire = b"".join(frame(p) for p in payloads)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(wire)), max_size=10)))
    chunks = [wire[a:b] for a, b in zip([0, *cuts], [*cuts, len(wire)], strict=True)]
    starts = set()
    pos = 0
    for p in payloads:
        starts.add(pos)
        pos += 5 + len(p)
    c = FrameCounter()
    offset = 0
    for chunk in chunks:
        began = c.inspect(chunk)
        # a message counts in the chunk holding its first (flag) byte
        assert began == sum(1 for s in starts if offset <= s < offset + len(chunk))
        offset += len(chunk)
    assert c.count == len(payloads)


def test_frame_counter_empty_and_large_messages() -> None:
    c = FrameCounter()
    assert c.inspect(frame(b"") + frame(b"", compressed=True)) == 2
    big = frame(b"x" * 70_000)
    assert c.inspect(big[:3]) == 1 and c.inspect(big[3:40_000]) == 0
    assert c.inspect(big[40_000:] + frame(b"y")[:1]) == 1
    assert c.count == 4


@pytest.mark.parametrize(("path", "names"), [
    ("/helloworld.Greeter/SayHello", ("helloworld.Greeter", "SayHello")),
    ("/pkg.Svc/Call?x=1", ("pkg.Svc", "Call")),
    ("//pkg.Svc//Call", ("pkg.Svc", "Call")),
    ("/pkg.Svc", None),
    ("/a/b/c", None),
    ("/", None),
])
def test_service_and_method(path: str, names: tuple[str, str] | None) -> None:
    assert service_and_method(path) == names


@pytest.mark.parametrize(("status", "headers", "end", "grpc"), [
    (200, [("content-type", "application/grpc")], False, True),
    (200, [("content-type", "application/grpc+proto")], False, True),
    (200, [("content-type", "application/grpcx")], False, False),
    (503, [("content-type", "application/grpc")], False, False),
    (200, [("content-type", "text/plain")], False, False),
    (200, [("grpc-status", "14")], True, True),          # trailers-only
    (200, [("content-type", "application/grpc")], True, False),
])
def test_is_grpc_response(status: int, headers: list[tuple[str, str]], end: bool,
                          grpc: bool) -> None:
    assert is_grpc_response(ResponseHead(status, HeaderMap(headers)), end) is grpc


def _call(cfg: GrpcStatsConfig, path: str = "/helloworld.Greeter/SayHello",
          status: str = "0", bind: bool = True) -> tuple[Stats, GrpcStream]:
    stats = Stats()
    g = GrpcStream(cfg, path)
    g.request_data(frame(b"a") + frame(b"b")[:2])     # one and the start of another
    if bind:
        g.bind(stats, "outbound|50051||greeter.default.svc.cluster.local")
    g.request_data(frame(b"b")[2:])
    g.response_headers(ResponseHead(200, HeaderMap([("content-type", "application/grpc")])),
                       False)
    g.response_data(frame(b"r1") + frame(b"r2") + frame(b"r3"))
    g.response_trailers(HeaderMap([("grpc-status", status)]))
    return stats, g


CLUSTER = "cluster.outbound|50051||greeter.default.svc.cluster.local.grpc."


def test_stats_for_all_methods_names_the_service_and_method() -> None:
    stats, _ = _call(GrpcStatsConfig(stats_for_all_methods=True))
    p = CLUSTER + "helloworld.Greeter.SayHello."
    assert {k: v for k, v in stats.counters.items() if k.startswith(CLUSTER)} == {
        p + "request_message_count": 2, p + "response_message_count": 3,
        p + "0": 1, p + "success": 1, p + "total": 1}


def test_dots_replaced_in_the_service_name_when_asked() -> None:
    stats, _ = _call(GrpcStatsConfig(stats_for_all_methods=True,
                                     replace_dots_in_grpc_service_name=True), status="14")
    p = CLUSTER + "helloworld_Greeter.SayHello."
    assert stats.counters[p + "14"] == 1 and stats.counters[p + "failure"] == 1
    assert stats.counters[p + "total"] == 1 and p + "success" not in stats.counters


def test_without_all_methods_only_the_allowlist_is_named() -> None:
    stats, _ = _call(GrpcStatsConfig())
    assert stats.counters[CLUSTER + "total"] == 1
    assert stats.counters[CLUSTER + "request_message_count"] == 2
    allow = GrpcStatsConfig(allowlist=frozenset({("helloworld.Greeter", "SayHello")}))
    stats, _ = _call(allow)
    assert stats.counters[CLUSTER + "helloworld.Greeter.SayHello.total"] == 1
    stats, _ = _call(allow, path="/helloworld.Greeter/Other")
    assert stats.counters[CLUSTER + "total"] == 1


def test_no_cluster_stats_without_a_cluster_or_a_method_path() -> None:
    stats, g = _call(GrpcStatsConfig(stats_for_all_methods=True), bind=False)
    assert not stats.counters and g.requests.count == 2 and g.responses.count == 3
    stats, _ = _call(GrpcStatsConfig(stats_for_all_methods=True), path="/not-grpc")
    assert not stats.counters


def test_message_deltas_need_emit_filter_state_and_a_message() -> None:
    _, g = _call(GrpcStatsConfig())
    assert g.message_deltas() is None
    _, g = _call(GrpcStatsConfig(emit_filter_state=True))
    assert g.message_deltas() == (2, 3)
    g.response_data(frame(b"r4"))
    assert g.message_deltas() == (0, 1) and g.message_deltas() == (0, 0)
    fresh = GrpcStream(GrpcStatsConfig(emit_filter_state=True), "/a/b")
    assert fresh.message_deltas() is None


def test_response_messages_counted_only_in_a_grpc_response() -> None:
    g = GrpcStream(GrpcStatsConfig(emit_filter_state=True), "/a/b")
    g.response_headers(ResponseHead(503, HeaderMap([("content-type", "text/plain")])), False)
    g.response_data(frame(b"not a grpc message"))
    assert g.responses.count == 0


def _filter(config: dict[str, object]) -> dict[str, object]:
    return {"name": "envoy.filters.http.grpc_stats", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.grpc_stats.v3.FilterConfig",
        **config}}


def test_compiled_from_istio_shape_and_upstream_stats_refused() -> None:
    cfg = compile_hcm_dict(hcm_dict([], http_filters=[
        _filter({"emit_filter_state": True, "stats_for_all_methods": True}), ROUTER]))
    got = cfg.http_filters[0].config
    assert got == GrpcStatsConfig(emit_filter_state=True, stats_for_all_methods=True)
    cfg = compile_hcm_dict(hcm_dict([], http_filters=[_filter({
        "individual_method_stats_allowlist": {"services": [
            {"name": "a.S", "method_names": ["M", "N"]}]}}), ROUTER]))
    assert cfg.http_filters[0].config == GrpcStatsConfig(
        allowlist=frozenset({("a.S", "M"), ("a.S", "N")}))
    with pytest.raises(BadInput, match="enable_upstream_stats"):
        compile_hcm_dict(hcm_dict([], http_filters=[
            _filter({"enable_upstream_stats": True}), ROUTER]))


@pytest.mark.parametrize("value", ["soon", "5", 5])
def test_bad_istio_stats_reporting_duration_refused(value: object) -> None:
    stats_filter = {"name": "istio.stats", "typed_config": {
        "@type": "type.googleapis.com/udpa.type.v1.TypedStruct",
        "type_url": "type.googleapis.com/stats.PluginConfig",
        "value": {"tcp_reporting_duration": value}}}
    with pytest.raises(BadInput, match="tcp_reporting_duration"):
        compile_hcm_dict(hcm_dict([], http_filters=[stats_filter, ROUTER]))
