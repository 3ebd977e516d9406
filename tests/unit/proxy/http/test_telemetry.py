"""Istio standard metrics: labels per reporter, peer metadata exchange, recording, output."""

from __future__ import annotations

import base64

import pytest
from google.protobuf import struct_pb2

from remora.proxy import admin_format as fmt
from remora.proxy.http import telemetry as tm
from remora.proxy.http.types import HeaderMap, RequestHead, ResponseHead, StreamInfo
from remora.proxy.stats import Stats, merge

NODE = {
    "NAME": "productpage-v1-6b746f74dc-9stvs", "NAMESPACE": "default",
    "WORKLOAD_NAME": "productpage-v1", "CLUSTER_ID": "Kubernetes", "MESH_ID": "cluster.local",
    "OWNER": "kubernetes://apis/apps/v1/namespaces/default/deployments/productpage-v1",
    "LABELS": {"app": "productpage", "version": "v1", "pod-template-hash": "6b746f74dc",
               "service.istio.io/canonical-name": "productpage",
               "service.istio.io/canonical-revision": "v1"},
}
REVIEWS = tm.WorkloadMeta(name="reviews-v2-abc", namespace="default", workload_name="reviews-v2",
                          app="reviews", version="v2", canonical_service="reviews",
                          canonical_revision="v2", cluster_id="Kubernetes",
                          service_host="reviews.default.svc.cluster.local")


def info(**kw: object) -> StreamInfo:
    base: dict[str, object] = dict(
        start_time=0.0, protocol="HTTP/1.1",
        request=RequestHead("GET", "/reviews/0", authority="reviews:9080"),
        response=ResponseHead(200), response_code=200, bytes_received=0, bytes_sent=358,
        duration=0.0059, upstream_cluster="outbound|9080||reviews.default.svc.cluster.local")
    base.update(kw)
    return StreamInfo(**base)  # type: ignore[arg-type]


def test_label_names_and_order() -> None:
    assert tm.HTTP_LABELS == (
        "reporter", "source_workload", "source_canonical_service", "source_canonical_revision",
        "source_workload_namespace", "source_principal", "source_app", "source_version",
        "source_cluster", "destination_workload", "destination_workload_namespace",
        "destination_principal", "destination_app", "destination_version",
        "destination_service", "destination_canonical_service",
        "destination_canonical_revision", "destination_service_name",
        "destination_service_namespace", "destination_cluster", "request_protocol",
        "response_code", "grpc_response_status", "response_flags",
        "connection_security_policy")
    tcp = (*tm.HTTP_LABELS[:21], "response_flags", "connection_security_policy")
    assert tcp == tm.TCP_LABELS


def test_workload_from_node() -> None:
    m = tm.workload_from_node(NODE)
    assert m == tm.WorkloadMeta(
        name="productpage-v1-6b746f74dc-9stvs", namespace="default",
        workload_name="productpage-v1", app="productpage", version="v1",
        canonical_service="productpage", canonical_revision="v1", cluster_id="Kubernetes",
        mesh_id="cluster.local", owner=NODE["OWNER"],  # type: ignore[arg-type]
        labels=(("pod-template-hash", "6b746f74dc"),))
    assert tm.workload_from_node({}) == tm.WorkloadMeta()
    q = tm.workload_from_node({"LABELS": {"app.kubernetes.io/name": "x",
                                          "app.kubernetes.io/version": "2"}, "NAME": 3})
    assert (q.app, q.version, q.name) == ("x", "2", "")


def test_destination_service_derivation() -> None:
    ds = tm.destination_service
    assert ds("outbound|8080||reviews.default.svc.cluster.local") == tm.DestinationService(
        "reviews.default.svc.cluster.local", "reviews", "default")
    assert ds("outbound|80|v1|httpbin.org") == tm.DestinationService("httpbin.org",
                                                                      "httpbin.org")
    assert ds("inbound|9080||", authority="reviews:9080", local=REVIEWS).host == \
        "reviews.default.svc.cluster.local"
    assert ds("inbound|9080||", authority="reviews:9080") == tm.DestinationService(
        "reviews:9080", "reviews:9080")
    assert ds("PassthroughCluster", authority="example.com") == tm.DestinationService(
        "example.com", "PassthroughCluster")
    assert ds("x", authority="a", route_name="block_all").name == "BlackHoleCluster"
    assert ds("x", authority="a", route_name="allow_any").name == "PassthroughCluster"
    assert ds("") == tm.DestinationService()


def test_source_reporter_labels() -> None:
    store = Stats()
    local = tm.workload_from_node(NODE)
    labels = tm.record_http(store, reporter="source", local=local, peer=REVIEWS, info=info(),
                            destination_service=tm.destination_service(
                                "outbound|9080||reviews.default.svc.cluster.local"))
    assert dict(zip(tm.HTTP_LABELS, labels, strict=True)) == {
        "reporter": "source", "source_workload": "productpage-v1",
        "source_canonical_service": "productpage", "source_canonical_revision": "v1",
        "source_workload_namespace": "default", "source_principal": "unknown",
        "source_app": "productpage", "source_version": "v1", "source_cluster": "Kubernetes",
        "destination_workload": "reviews-v2", "destination_workload_namespace": "default",
        "destination_principal": "unknown", "destination_app": "reviews",
        "destination_version": "v2",
        "destination_service": "reviews.default.svc.cluster.local",
        "destination_canonical_service": "reviews", "destination_canonical_revision": "v2",
        "destination_service_name": "reviews", "destination_service_namespace": "default",
        "destination_cluster": "Kubernetes", "request_protocol": "http",
        "response_code": "200", "grpc_response_status": "", "response_flags": "-",
        "connection_security_policy": "unknown"}


def test_source_reporter_without_peer_falls_back_to_unknown() -> None:
    store = Stats()
    labels = tm.record_http(store, reporter="source", local=tm.workload_from_node(NODE),
                            peer=None, info=info(response_code=503, response_flags={"URX", "UF"}),
                            destination_service="reviews.default.svc.cluster.local")
    got = dict(zip(tm.HTTP_LABELS, labels, strict=True))
    assert got["destination_workload"] == "unknown"
    assert got["destination_canonical_revision"] == "latest"
    assert got["destination_service_namespace"] == "unknown"
    assert got["destination_service_name"] == "reviews"
    assert (got["response_code"], got["response_flags"]) == ("503", "UF,URX")


def test_destination_reporter_labels_and_security_policy() -> None:
    store = Stats()
    peer = tm.workload_from_node(NODE)
    i = info(upstream_cluster="inbound|9080||",
             request=RequestHead("POST", "/r.R/Get", authority="reviews:9080",
                                 headers=HeaderMap([("content-type", "application/grpc")])),
             grpc_status=14)
    labels = tm.record_http(
        store, reporter="destination", local=REVIEWS, peer=peer, info=i,
        destination_service=tm.destination_service("inbound|9080||", authority="reviews:9080",
                                                   local=REVIEWS),
        mtls=True, peer_principal="spiffe://cluster.local/ns/bookinfo/sa/productpage")
    got = dict(zip(tm.HTTP_LABELS, labels, strict=True))
    assert got["reporter"] == "destination"
    assert got["source_workload"] == "productpage-v1"
    assert got["source_workload_namespace"] == "bookinfo"       # the SAN's namespace wins
    assert got["source_principal"] == "spiffe://cluster.local/ns/bookinfo/sa/productpage"
    assert got["destination_workload"] == "reviews-v2"
    assert got["destination_principal"] == "unknown"
    assert got["destination_service"] == "reviews.default.svc.cluster.local"
    assert got["destination_service_name"] == "reviews"
    assert got["destination_service_namespace"] == "default"
    assert got["destination_canonical_revision"] == "v2"
    assert (got["request_protocol"], got["grpc_response_status"]) == ("grpc", "14")
    assert got["connection_security_policy"] == "mutual_tls"
    plain = tm.record_http(store, reporter="destination", local=REVIEWS, peer=None, info=info(),
                           destination_service=tm.DestinationService())
    got = dict(zip(tm.HTTP_LABELS, plain, strict=True))
    assert got["connection_security_policy"] == "none"
    assert got["source_workload"] == "unknown" and got["source_canonical_revision"] == "latest"
    # no service known: the local canonical service stands in
    assert got["destination_service"] == "reviews" == got["destination_service_name"]


def test_recorded_values_and_histograms() -> None:
    store = Stats()
    local = tm.workload_from_node(NODE)
    for d in (0.0059, 0.025, None):
        tm.record_http(store, reporter="source", local=local, peer=REVIEWS, info=info(duration=d),
                       destination_service="reviews.default.svc.cluster.local")
    fams = store.families
    (labels,) = fams[tm.REQUESTS_TOTAL].values
    assert fams[tm.REQUESTS_TOTAL].values[labels] == 3
    dur = fams[tm.REQUEST_DURATION].histograms[labels]
    assert dur.count == 2 and dur.sum == 30                      # 5 ms + 25 ms; None skipped
    assert dur.cumulative()[:6] == [0, 0, 0, 1, 1, 2]            # 25 lands in le="50"
    assert fams[tm.RESPONSE_BYTES].histograms[labels].sum == 3 * 358
    assert fams[tm.REQUEST_BYTES].histograms[labels].count == 3


def test_stores_used_in_turn_each_get_their_own_series() -> None:
    """Two stores (two workers' worth) recorded into alternately: each keeps its own counts,
    whatever the families looked up for the other one."""
    a, b = Stats(), Stats()
    local = tm.workload_from_node(NODE)
    for store in (a, b, a, a, b):
        tm.record_http(store, reporter="source", local=local, peer=REVIEWS, info=info(),
                       destination_service="reviews.default.svc.cluster.local")
    assert sum(a.families[tm.REQUESTS_TOTAL].values.values()) == 3
    assert sum(b.families[tm.REQUESTS_TOTAL].values.values()) == 2
    assert [h.count for h in b.families[tm.REQUEST_BYTES].histograms.values()] == [2]


def test_grpc_response_status_inferred_when_the_response_carried_none() -> None:
    """istio_stats.cc labels a gRPC request with Grpc::Common::getGrpcStatus(trailers,
    headers, info): a 503 without grpc-status is UNAVAILABLE (14); a plain HTTP request has
    no gRPC status."""
    store = Stats()
    local = tm.workload_from_node(NODE)
    grpc_head = RequestHead("POST", "/pkg.Svc/M", authority="reviews:9080",
                            headers=HeaderMap([("content-type", "application/grpc")]))
    got = {}
    for name, kw in (("grpc", {"request": grpc_head, "response_code": 503}),
                     ("sent", {"request": grpc_head, "grpc_status": 5}),
                     ("http", {"response_code": 503})):
        labels = tm.record_http(store, reporter="source", local=local, peer=REVIEWS,
                                info=info(**kw),
                                destination_service="reviews.default.svc.cluster.local")
        got[name] = dict(zip(tm.HTTP_LABELS, labels, strict=True))
    assert got["grpc"]["request_protocol"] == "grpc"
    assert got["grpc"]["grpc_response_status"] == "14"
    assert got["sent"]["grpc_response_status"] == "5"
    assert got["http"]["grpc_response_status"] == ""


def test_tcp_metrics() -> None:
    store = Stats()
    i = StreamInfo(start_time=0, bytes_received=517, bytes_sent=4210, duration=0.16,
                   response_flags={"UF", "URX"}, upstream_cluster="PassthroughCluster")
    labels = tm.record_tcp(store, reporter="source", local=tm.workload_from_node(NODE),
                           peer=None, info=i,
                           destination_service=tm.destination_service("PassthroughCluster"))
    got = dict(zip(tm.TCP_LABELS, labels, strict=True))
    assert (got["request_protocol"], got["response_flags"]) == ("tcp", "UF,URX")
    assert got["destination_service_name"] == "PassthroughCluster"
    assert got["destination_service"] == "unknown"
    f = store.families
    assert f[tm.TCP_OPENED].values[labels] == 1 == f[tm.TCP_CLOSED].values[labels]
    assert f[tm.TCP_SENT].values[labels] == 4210 and f[tm.TCP_RECEIVED].values[labels] == 517
    # the incremental form: open early, bytes as deltas, close
    tm.record_tcp_open(store, labels)
    tm.record_tcp_bytes(store, labels, sent=10, received=1)
    tm.record_tcp_close(store, labels, sent=5)
    assert f[tm.TCP_SENT].values[labels] == 4225 and f[tm.TCP_CLOSED].values[labels] == 2


def test_peer_metadata_round_trip() -> None:
    local = tm.workload_from_node(NODE)
    headers = tm.encode_peer_metadata(local, node_id="sidecar~10.0.0.1~pp.default~default.svc")
    assert set(headers) == {"x-envoy-peer-metadata-id", "x-envoy-peer-metadata"}
    assert headers["x-envoy-peer-metadata-id"] == "sidecar~10.0.0.1~pp.default~default.svc"
    # the value is base64 of a Struct with Istio's keys
    s = struct_pb2.Struct()
    s.ParseFromString(base64.b64decode(headers["x-envoy-peer-metadata"]))
    assert set(s.fields) == {"NAME", "NAMESPACE", "WORKLOAD_NAME", "CLUSTER_ID", "LABELS",
                             "OWNER"}
    assert dict(s.fields["LABELS"].struct_value.fields.items()).keys() == {
        "app", "version", "service.istio.io/canonical-name",
        "service.istio.io/canonical-revision"}
    got = tm.decode_peer_metadata(HeaderMap(list(headers.items())))
    assert got is not None
    assert got == tm.WorkloadMeta(
        name=local.name, namespace="default", workload_name="productpage-v1", app="productpage",
        version="v1", canonical_service="productpage", canonical_revision="v1",
        cluster_id="Kubernetes", owner=local.owner)
    assert tm.decode_peer_metadata(headers) == got                # plain dicts work too
    # unpadded base64 (Envoy decodes without padding)
    unpadded = headers["x-envoy-peer-metadata"].rstrip("=")
    assert tm.decode_peer_metadata({"x-envoy-peer-metadata": unpadded}) == got
    # deterministic: the same bytes every time
    assert tm.encode_peer_metadata(local) == {**headers, "x-envoy-peer-metadata-id": ""}


@pytest.mark.parametrize("value", [
    "", "!!!not base64!!!", "AAAA", base64.b64encode(b"\xff\xfe\xfd garbage").decode(),
    base64.b64encode(struct_pb2.Struct().SerializeToString()).decode(), "a" * 5, "=abc",
])
def test_peer_metadata_garbage_is_none(value: str) -> None:
    assert tm.decode_peer_metadata({"x-envoy-peer-metadata": value}) is None


def test_peer_metadata_absent_and_strip() -> None:
    assert tm.decode_peer_metadata(HeaderMap()) is None
    h = HeaderMap([("x-envoy-peer-metadata", "x"), ("x-envoy-peer-metadata-id", "y"),
                   ("accept", "*/*")])
    assert tm.strip_peer_metadata(h) is True
    assert h.items() == [("accept", "*/*")]
    assert tm.strip_peer_metadata(h) is False


def test_merge_and_prometheus_output_across_workers() -> None:
    local = tm.workload_from_node(NODE)
    workers = [Stats(), Stats()]
    for st in workers:
        tm.record_http(st, reporter="source", local=local, peer=REVIEWS, info=info(),
                       destination_service="reviews.default.svc.cluster.local")
    merged = merge(w.snapshot() for w in workers)
    text = fmt.render_prometheus(merged)
    labels = (
        'reporter="source",source_workload="productpage-v1",'
        'source_canonical_service="productpage",source_canonical_revision="v1",'
        'source_workload_namespace="default",source_principal="unknown",'
        'source_app="productpage",source_version="v1",source_cluster="Kubernetes",'
        'destination_workload="reviews-v2",destination_workload_namespace="default",'
        'destination_principal="unknown",destination_app="reviews",destination_version="v2",'
        'destination_service="reviews.default.svc.cluster.local",'
        'destination_canonical_service="reviews",destination_canonical_revision="v2",'
        'destination_service_name="reviews",destination_service_namespace="default",'
        'destination_cluster="Kubernetes",request_protocol="http",response_code="200",'
        'grpc_response_status="",response_flags="-",connection_security_policy="unknown"')
    assert f"# TYPE istio_requests_total counter\nistio_requests_total{{{labels}}} 2\n\n" in text
    assert f'istio_request_duration_milliseconds_bucket{{{labels},le="5"}} 0\n' in text
    assert f'istio_request_duration_milliseconds_bucket{{{labels},le="10"}} 2\n' in text
    assert f'istio_request_duration_milliseconds_bucket{{{labels},le="+Inf"}} 2\n' in text
    assert f"istio_request_duration_milliseconds_sum{{{labels}}} 10\n" in text
    assert f"istio_response_bytes_sum{{{labels}}} 716\n" in text
    # histogram groups in name order, after the counters
    order = [line.split()[2] for line in text.splitlines() if line.startswith("# TYPE")]
    assert order == ["istio_requests_total", "istio_request_bytes",
                     "istio_request_duration_milliseconds", "istio_response_bytes"]


def test_per_input_caches_stay_bounded_and_agree_with_the_derivation() -> None:
    """The destination service and the labels are remembered per input; the authority comes
    from requests, so the caches must not grow without bound, and a hit must give what the
    derivation gives."""
    local = tm.workload_from_node(NODE)
    for i in range(3 * tm._CACHE_MAX):
        host = f"h{i}.example"
        got = tm.destination_service("PassthroughCluster", authority=host, local=local)
        assert got == tm.derive_destination_service("PassthroughCluster", authority=host,
                                                    local=local)
        assert len(tm._DEST_CACHE) <= tm._CACHE_MAX
    svc = tm.destination_service("outbound|9080||reviews.default.svc.cluster.local")
    first = tm.peer_labels("source", local, REVIEWS, svc)
    assert tm.peer_labels("source", local, REVIEWS, svc) is first     # kept
    assert first == tm.derive_peer_labels("source", local, REVIEWS, svc)
    other = tm.workload_from_node({**NODE, "NAME": "other-pod"})
    assert tm.peer_labels("source", other, REVIEWS, svc) == \
        tm.derive_peer_labels("source", other, REVIEWS, svc)


def test_stats_plugin_config() -> None:
    assert tm.compile_plugin_config({}) == tm.StatsPluginConfig(False, 5.0)
    assert tm.compile_plugin_config({"tcp_reporting_duration": "0.5s", "reporter": 0,
                                     "disable_host_header_fallback": True, "metrics": []}) \
        == tm.StatsPluginConfig(True, 0.5)
    assert tm.compile_plugin_config({"tcpReportingDuration": "15s",
                                     "disableHostHeaderFallback": False,
                                     "rotationInterval": "0s"}) == tm.StatsPluginConfig(False, 15.0)


@pytest.mark.parametrize(("value", "why"), [
    ({"tcp_reporting_duration": "soon"}, "tcp_reporting_duration: 'soon' is not a duration"),
    ({"tcp_reporting_duration": 5.0}, "tcp_reporting_duration: 5.0 is not a duration"),
    ({"disable_host_header_fallback": "yes"}, "disable_host_header_fallback: 'yes' is not a"),
    ({"metrics": [{"dimensions": {"request_host": "request.host"}}]},
     "metrics: metric overrides and definitions are not implemented"),
    ({"definitions": [{"name": "x", "value": "1"}]}, "definitions: metric overrides"),
    ({"reporter": "SERVER_GATEWAY"}, "reporter: 'SERVER_GATEWAY' is not implemented"),
    ({"rotation_interval": "60s"}, "rotation_interval: '60s': scope rotation is not"),
    ({"stat_prefix": "x"}, "stat_prefix: unknown field of stats.PluginConfig"),
])
def test_stats_plugin_config_refuses_what_it_does_not_implement(value: dict[str, object],
                                                                 why: str) -> None:
    with pytest.raises(ValueError) as got:
        tm.compile_plugin_config(value)
    assert str(got.value).startswith(why), got.value
