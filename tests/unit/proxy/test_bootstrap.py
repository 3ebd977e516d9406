"""Bootstrap loading: the real Envoy protos, unsupported fields refused by path."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

from remora.errors import BadInput
from remora.proxy.bootstrap import compile_bootstrap, load_bootstrap, parse_bootstrap
from remora.proxy.model import SlowStart

EXAMPLE = Path(__file__).resolve().parents[3] / "examples" / "sidecar-bootstrap.yaml"


def base() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(EXAMPLE.read_text())
    return data


def test_example_compiles_with_envoy_defaults() -> None:
    snap = load_bootstrap(str(EXAMPLE))
    assert [li.name for li in snap.listeners] == ["virtualOutbound", "virtualInbound",
                                                  "10.100.0.7_8080"]
    vo = snap.listeners[0]
    assert vo.use_original_dst and vo.bind_to_port and vo.listener_filters_timeout == 15.0
    assert [f.name for f in vo.effective_listener_filters()] == ["original_dst"]
    svc = snap.listeners[2]
    assert not svc.bind_to_port
    tp = svc.filter_chains[0].tcp_proxy
    assert tp is not None and tp.idle_timeout == 3600.0
    c = snap.clusters["outbound|8080||svc.default.svc.cluster.local"]
    assert (c.type, c.lb_policy, c.connect_timeout, len(c.endpoints)) == (
        "EDS", "LEAST_REQUEST", 10.0, 2)
    assert c.default_thresholds.max_connections == 4294967295
    assert c.high_thresholds.max_connections == 1024 and c.high_thresholds.max_retries == 3
    assert c.observability_name.endswith(";")
    inbound = snap.clusters["inbound|8080||"]
    assert inbound.bind_source_for(4) is not None and str(inbound.bind_source_for(4)) == \
        "127.0.0.6:0"
    assert snap.clusters["BlackHoleCluster"].endpoints == ()
    assert snap.bootstrap_json["node"]["id"].startswith("sidecar~10.0.0.2")


@pytest.mark.parametrize(("edit", "needle"), [
    (lambda d: d.__setitem__("stats_flush_interval", "5s"),
     "unsupported field bootstrap.stats_flush_interval"),
    (lambda d: d["static_resources"]["listeners"][0].__setitem__(
        "per_connection_buffer_limit_bytes", 1024),
     "unsupported field bootstrap.static_resources.listeners[0].per_connection_buffer_limit_bytes"),
    (lambda d: d["static_resources"]["clusters"][0].__setitem__(
        "health_checks", [{"timeout": "1s"}]),
     "static_resources.clusters[0].health_checks"),
    (lambda d: d["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
     ["typed_config"].__setitem__("access_log", []), None),  # empty repeated: not set
    (lambda d: d["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
     ["typed_config"].__setitem__("hash_policy", [{"filter_state": {"key": "k"}}]),
     "filter_chains[0].filters[0].typed_config.hash_policy[0].filter_state"),
    (lambda d: d["static_resources"]["listeners"][0].__setitem__("bogus", 1),
     "bogus"),
])
def test_unsupported_fields_are_refused_by_path(edit: Any, needle: str | None) -> None:
    data = copy.deepcopy(base())
    edit(data)
    if needle is None:
        compile_bootstrap(parse_bootstrap(data))
        return
    with pytest.raises(BadInput) as err:
        compile_bootstrap(parse_bootstrap(data))
    assert needle in str(err.value)
    assert "\n" not in str(err.value)


def test_unsupported_filter_type_is_named() -> None:
    data = base()
    data["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0][
        "typed_config"] = {"@type": "type.googleapis.com/envoy.extensions.filters.network."
                           "echo.v3.Echo"}
    with pytest.raises(BadInput, match="echo"):
        compile_bootstrap(parse_bootstrap(data))


def test_semantic_errors() -> None:
    data = base()
    data["static_resources"]["listeners"][2]["filter_chains"][0]["filters"][0][
        "typed_config"]["cluster"] = "nope"
    with pytest.raises(BadInput, match="cluster 'nope' is not defined"):
        compile_bootstrap(parse_bootstrap(data))
    data = base()
    data["static_resources"]["clusters"][3]["lb_policy"] = "ROUND_ROBIN"
    with pytest.raises(BadInput, match="CLUSTER_PROVIDED"):
        compile_bootstrap(parse_bootstrap(data))


def test_malformed_files(tmp_path: Path) -> None:
    bad = tmp_path / "b.yaml"
    bad.write_text("static_resources: [unclosed\n")
    with pytest.raises(BadInput, match="not valid YAML"):
        load_bootstrap(str(bad))
    bad.write_text("- a list\n")
    with pytest.raises(BadInput, match="mapping"):
        load_bootstrap(str(bad))
    with pytest.raises(BadInput, match="cannot read"):
        load_bootstrap(str(tmp_path / "missing.yaml"))
    js = tmp_path / "b.json"
    js.write_text('{"static_resources": {"listeners": [{"name": 5}]}}')
    with pytest.raises(BadInput):
        load_bootstrap(str(js))


def test_cluster_http_options_and_outlier_detection() -> None:
    data = copy.deepcopy(base())
    c = data["static_resources"]["clusters"][0]
    c["typed_extension_protocol_options"] = {
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
            "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
            "explicit_http_config": {"http2_protocol_options": {}},
            "common_http_protocol_options": {"idle_timeout": "300s",
                                             "max_requests_per_connection": 7}}}
    c["outlier_detection"] = {"consecutive_5xx": 1, "base_ejection_time": "15s",
                              "max_ejection_percent": 100}
    snap = compile_bootstrap(parse_bootstrap(data))
    got = snap.clusters[c["name"]]
    assert got.http_protocol == "HTTP2"
    assert got.http_idle_timeout == 300.0
    assert got.max_requests_per_connection == 7
    assert got.outlier_detection is not None
    assert got.outlier_detection.consecutive_5xx == 1
    assert got.outlier_detection.base_ejection_time == 15.0
    assert got.outlier_detection.max_ejection_percent == 100
    assert got.outlier_detection.consecutive_gateway_failure == 5   # Envoy's default


def test_consistent_hashing_clusters() -> None:
    """DestinationRule consistentHash: RING_HASH (Envoy's ring sizes by default) and MAGLEV
    (a prime table size); what is not implemented or out of Envoy's bounds is refused."""
    def compiled(**fields: Any) -> Any:
        data = copy.deepcopy(base())
        c = data["static_resources"]["clusters"][0]
        c.update(fields)
        return compile_bootstrap(parse_bootstrap(data)).clusters[c["name"]]
    ring = compiled(lb_policy="RING_HASH")
    assert (ring.lb_policy, ring.ring_min_size, ring.ring_max_size) == (
        "RING_HASH", 1024, 8388608)
    ring = compiled(lb_policy="RING_HASH", ring_hash_lb_config={"minimum_ring_size": 64,
                                                                 "maximum_ring_size": 128})
    assert (ring.ring_min_size, ring.ring_max_size) == (64, 128)
    maglev = compiled(lb_policy="MAGLEV", maglev_lb_config={"table_size": 251})
    assert (maglev.lb_policy, maglev.maglev_table_size) == ("MAGLEV", 251)
    for fields, needle in [
            ({"lb_policy": "RING_HASH", "ring_hash_lb_config": {"hash_function":
                                                                "MURMUR_HASH_2"}},
             "only XX_HASH"),
            ({"lb_policy": "RING_HASH", "ring_hash_lb_config": {"minimum_ring_size": 200,
                                                                "maximum_ring_size": 100}},
             "minimum_ring_size <= maximum_ring_size"),
            ({"lb_policy": "MAGLEV", "maglev_lb_config": {"table_size": 65536}},
             "not a prime")]:
        with pytest.raises(BadInput, match=needle):
            compiled(**fields)


def test_priority_levels_panic_threshold_and_overprovisioning() -> None:
    """Istio's failover shape: endpoints by locality at priorities, DestinationRule
    minHealthPercent as the panic threshold; out-of-range values are refused."""
    def compiled(**fields: Any) -> Any:
        data = copy.deepcopy(base())
        c = data["static_resources"]["clusters"][0]
        c.update(fields)
        return compile_bootstrap(parse_bootstrap(data)).clusters[c["name"]]

    def assignment(priority: int, **extra: Any) -> dict[str, Any]:
        return {"cluster_name": "x", **extra, "endpoints": [
            {"locality": {"region": "r", "zone": "z"}, "lb_endpoints": [
                {"endpoint": {"address": {"socket_address": {"address": "10.0.0.1",
                                                             "port_value": 80}}}}]},
            {"locality": {"region": "r2"}, "priority": priority, "lb_endpoints": [
                {"endpoint": {"address": {"socket_address": {"address": "10.0.0.2",
                                                             "port_value": 80}}}}]}]}
    default = compiled(load_assignment=assignment(1))
    assert (default.healthy_panic_threshold, default.overprovisioning_factor) == (50.0, 140)
    assert [e.priority for e in default.endpoints] == [0, 1]
    got = compiled(load_assignment=assignment(1, policy={"overprovisioning_factor": 100}),
                   common_lb_config={"healthy_panic_threshold": {"value": 0}})
    assert (got.healthy_panic_threshold, got.overprovisioning_factor) == (0.0, 100)
    assert compiled(common_lb_config={"healthy_panic_threshold": {"value": 32.5}}
                    ).healthy_panic_threshold == 33.0      # rounded, as Envoy does
    # Istio's localityLbSetting distribute: locality weights, read with the config
    weighted = assignment(0)
    weighted["endpoints"][0]["load_balancing_weight"] = 80
    weighted["endpoints"][1]["load_balancing_weight"] = 20
    got = compiled(load_assignment=weighted, lb_policy="ROUND_ROBIN",
                   common_lb_config={"locality_weighted_lb_config": {}})
    assert got.locality_weighted and [e.locality_weight for e in got.endpoints] == [80, 20]
    assert not default.locality_weighted
    with pytest.raises(BadInput, match="locality_weighted_lb_config with lb_policy MAGLEV"):
        compiled(lb_policy="MAGLEV", common_lb_config={"locality_weighted_lb_config": {}})
    for fields, needle in [
            ({"load_assignment": assignment(129)}, r"endpoints\[1\]\.priority: at most 128"),
            ({"common_lb_config": {"healthy_panic_threshold": {"value": 101}}},
             "healthy_panic_threshold: need a percent"),
            ({"load_assignment": assignment(1, policy={"overprovisioning_factor": 0})},
             "overprovisioning_factor: must be above 0"),
            ({"common_lb_config": {"zone_aware_lb_config": {}}}, "zone_aware_lb_config"),
            ({"load_assignment": assignment(1, policy={"drop_overloads": [
                {"category": "x", "drop_percentage": {"numerator": 1}}]})},
             "drop_overloads")]:
        with pytest.raises(BadInput, match=needle):
            compiled(**fields)


def test_slow_start_and_least_request_config() -> None:
    """Istio's warmupDurationSecs (slow_start_config under the policy's own lb config) and
    LEAST_REQUEST's choice_count / active_request_bias; mismatches and bad values refused."""
    def compiled(**fields: Any) -> Any:
        data = copy.deepcopy(base())
        c = data["static_resources"]["clusters"][0]
        c.update(fields)
        return compile_bootstrap(parse_bootstrap(data)).clusters[c["name"]]
    rr = compiled(lb_policy="ROUND_ROBIN",
                  round_robin_lb_config={"slow_start_config": {"slow_start_window": "30s"}})
    assert rr.slow_start == SlowStart(window=30.0, aggression=1.0, min_weight_percent=10.0)
    lr = compiled(lb_policy="LEAST_REQUEST", least_request_lb_config={
        "choice_count": 3, "active_request_bias": {"default_value": 0.5, "runtime_key": "k"},
        "slow_start_config": {"slow_start_window": "10s",
                              "aggression": {"default_value": 2.0, "runtime_key": "a"},
                              "min_weight_percent": {"value": 25}}})
    assert (lr.choice_count, lr.active_request_bias) == (3, 0.5)
    assert lr.slow_start == SlowStart(window=10.0, aggression=2.0, min_weight_percent=25.0)
    assert compiled(lb_policy="LEAST_REQUEST").slow_start is None
    assert compiled(lb_policy="ROUND_ROBIN", round_robin_lb_config={
        "slow_start_config": {}}).slow_start is None           # no window, no slow start
    for fields, needle in [
            ({"lb_policy": "RANDOM", "round_robin_lb_config": {}},
             "round_robin_lb_config needs lb_policy ROUND_ROBIN, not RANDOM"),
            ({"lb_policy": "ROUND_ROBIN", "least_request_lb_config": {}},
             "needs lb_policy LEAST_REQUEST, not ROUND_ROBIN"),
            ({"lb_policy": "LEAST_REQUEST", "least_request_lb_config": {"choice_count": 1}},
             "choice_count: at least 2"),
            ({"lb_policy": "ROUND_ROBIN", "round_robin_lb_config": {"slow_start_config": {
                "slow_start_window": "5s", "aggression": {"default_value": 0,
                                                          "runtime_key": "a"}}}},
             "aggression: must be above 0"),
            ({"lb_policy": "ROUND_ROBIN", "round_robin_lb_config": {"slow_start_config": {
                "slow_start_window": "5s", "min_weight_percent": {"value": 150}}}},
             "min_weight_percent: need a percent"),
            ({"lb_policy": "LEAST_REQUEST", "least_request_lb_config": {
                "active_request_bias": {"default_value": -1, "runtime_key": "b"}}},
             "active_request_bias: must not be negative")]:
        with pytest.raises(BadInput, match=needle):
            compiled(**fields)


def test_cluster_protocol_options_fields_are_checked() -> None:
    data = copy.deepcopy(base())
    c = data["static_resources"]["clusters"][0]
    c["typed_extension_protocol_options"] = {
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
            "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
            "explicit_http_config": {"http2_protocol_options": {"allow_connect": True}}}}
    with pytest.raises(BadInput) as err:
        compile_bootstrap(parse_bootstrap(data))
    assert "allow_connect" in str(err.value)


def _first_tcp_chain(data: dict[str, Any]) -> dict[str, Any]:
    chain: dict[str, Any] = data["static_resources"]["listeners"][0]["filter_chains"][0]
    return chain


def test_istio_stats_network_filter_and_tcp_access_log() -> None:
    data = copy.deepcopy(base())
    chain = _first_tcp_chain(data)
    chain["filters"].insert(0, {"name": "istio.stats", "typed_config": {
        "@type": "type.googleapis.com/udpa.type.v1.TypedStruct",
        "type_url": "type.googleapis.com/stats.PluginConfig", "value": {}}})
    chain["filters"][1]["typed_config"]["access_log"] = [{
        "name": "envoy.access_loggers.file", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.access_loggers.file.v3."
                     "FileAccessLog", "path": "/dev/stdout"}}]
    snap = compile_bootstrap(parse_bootstrap(data))
    tp = snap.listeners[0].filter_chains[0].tcp_proxy
    assert tp is not None and tp.istio_stats
    assert len(tp.access_logs) == 1 and tp.access_logs[0].path == "/dev/stdout"


def test_istio_stats_network_filter_refuses_metric_overrides() -> None:
    data = copy.deepcopy(base())
    _first_tcp_chain(data)["filters"].insert(0, {"name": "istio.stats", "typed_config": {
        "@type": "type.googleapis.com/udpa.type.v1.TypedStruct",
        "type_url": "type.googleapis.com/stats.PluginConfig",
        "value": {"metrics": [{"name": "tcp_sent_bytes_total", "drop": True}]}}})
    with pytest.raises(BadInput) as err:
        compile_bootstrap(parse_bootstrap(data))
    assert "filters[0].typed_config.value.metrics: metric overrides" in str(err.value)


def test_unknown_typed_struct_network_filter_is_refused() -> None:
    data = copy.deepcopy(base())
    _first_tcp_chain(data)["filters"].insert(0, {"name": "x", "typed_config": {
        "@type": "type.googleapis.com/udpa.type.v1.TypedStruct",
        "type_url": "type.googleapis.com/some.Other", "value": {}}})
    with pytest.raises(BadInput) as err:
        compile_bootstrap(parse_bootstrap(data))
    assert "filters[0]" in str(err.value) and "some.Other" in str(err.value)


def test_http_example_compiles_and_routes_by_host(monkeypatch: pytest.MonkeyPatch) -> None:
    from remora.proxy.http import routes as rt
    from remora.proxy.http.types import RequestHead
    monkeypatch.chdir(EXAMPLE.parents[1])       # the RDS file path is relative, as in Envoy
    snap = load_bootstrap(str(EXAMPLE.with_name("sidecar-http-bootstrap.yaml")))
    li = snap.listener("0.0.0.0_8080")
    assert li is not None and not li.bind_to_port
    hcm = li.filter_chains[0].hcm
    assert hcm is not None and hcm.route_config is not None
    assert hcm.filter("istio.stats") is not None and len(hcm.access_logs) == 1
    svc = "outbound|8080||{}.default.svc.cluster.local".format
    for host, cluster in (("demoappv10:8080", svc("demoappv10")),
                          ("demoappv11", svc("demoappv11")),
                          ("example.com", "PassthroughCluster")):
        vh = rt.select_virtual_host(hcm.route_config, host)
        assert vh is not None
        route = rt.match_route(vh, RequestHead(method="GET", path="/", authority=host))
        assert route is not None and route.route is not None and route.route.cluster == cluster
    inbound = snap.listener("virtualInbound")
    assert inbound is not None
    chain = next(c for c in inbound.filter_chains if c.name == "0.0.0.0_8080")
    assert chain.hcm is not None and chain.hcm.server_name == "istio-envoy"
