"""HCM and RouteConfiguration protos → routing types: Istio-shaped configs, RDS from a file,
refused fields named by path, validation errors."""

from __future__ import annotations

import copy
import json
import random
from pathlib import Path
from typing import Any

import pytest
import yaml

from remora.errors import BadInput
from remora.proxy.http import routes as rt
from remora.proxy.http.hashing import HashPolicy
from remora.proxy.http.routes_compile import compile_hcm_dict
from remora.proxy.http.types import HeaderMap, RequestHead

SVC10 = "demoappv10.default.svc.cluster.local"
SVC11 = "demoappv11.default.svc.cluster.local"
TS = "type.googleapis.com/udpa.type.v1.TypedStruct"
FAULT_T = "type.googleapis.com/envoy.extensions.filters.http.fault.v3.HTTPFault"

# Istio's default outbound retry policy (§7.5).
ISTIO_RETRY: dict[str, Any] = {
    "retry_on": "connect-failure,refused-stream,unavailable,cancelled,retriable-status-codes",
    "num_retries": 2,
    "retry_host_predicate": [{
        "name": "envoy.retry_host_predicates.previous_hosts",
        "typed_config": {"@type": "type.googleapis.com/envoy.extensions.retry.host."
                                  "previous_hosts.v3.PreviousHostsPredicate"}}],
    "host_selection_retry_max_attempts": "5",
}


def domains(short: str) -> list[str]:
    fqdn = f"{short}.default.svc.cluster.local"
    return [fqdn, f"{fqdn}.", short, f"{short}.default.svc", f"{short}.default"]


def istio_filters(outbound: bool) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = [
        {"name": "istio.metadata_exchange", "typed_config": {
            "@type": TS, "type_url": "type.googleapis.com/io.istio.http.peer_metadata.Config",
            "value": {"upstream_discovery": [{"istio_headers": {}}, {"workload_discovery": {}}],
                      "upstream_propagation": [{"istio_headers": {}}]}}},
        {"name": "envoy.filters.http.grpc_stats", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.grpc_stats.v3."
                     "FilterConfig", "emit_filter_state": True, "stats_for_all_methods": False}},
    ]
    if outbound:
        out.append({"name": "istio.alpn", "typed_config": {
            "@type": TS, "type_url": "type.googleapis.com/istio.envoy.config.filter.http.alpn."
                                     "v2alpha1.FilterConfig",
            "value": {"alpn_override": [
                {"alpn_override": ["istio-http/1.0", "istio"], "upstream_protocol": "HTTP10"},
                {"alpn_override": ["istio-http/1.1", "istio"], "upstream_protocol": "HTTP11"},
                {"alpn_override": ["istio-h2", "istio"], "upstream_protocol": "HTTP2"}]}}})
    out += [
        {"name": "envoy.filters.http.fault", "typed_config": {"@type": FAULT_T}},
        {"name": "envoy.filters.http.cors", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.cors.v3.Cors"}},
        {"name": "istio.stats", "typed_config": {
            "@type": TS, "type_url": "type.googleapis.com/stats.PluginConfig", "value": {}}},
        {"name": "envoy.filters.http.router", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}},
    ]
    return out


def outbound_rc() -> dict[str, Any]:
    """Route config ``8080`` as Istio builds it (§7.2-7.5) with a VirtualService on v11."""
    return {
        "@type": "type.googleapis.com/envoy.config.route.v3.RouteConfiguration",
        "name": "8080",
        "virtual_hosts": [
            {"name": f"{SVC10}:8080", "domains": [*domains("demoappv10"), "10.96.0.10"],
             "routes": [{
                 "name": "default", "match": {"prefix": "/"},
                 "route": {"cluster": f"outbound|8080||{SVC10}", "timeout": "0s",
                           "retry_policy": ISTIO_RETRY, "max_grpc_timeout": "0s"},
                 "decorator": {"operation": f"{SVC10}:8080/*"}}],
             "include_request_attempt_count": True},
            {"name": f"{SVC11}:8080", "domains": [*domains("demoappv11"), "10.96.0.11"],
             "routes": [
                 {"name": "fault-route",
                  "match": {"prefix": "/fault",
                            "headers": [{"name": "end-user",
                                         "string_match": {"exact": "jason"}}]},
                  "route": {"cluster": f"outbound|8080|v1|{SVC11}", "timeout": "0s"},
                  "typed_per_filter_config": {"envoy.filters.http.fault": {
                      "@type": FAULT_T,
                      "delay": {"fixed_delay": "7s",
                                "percentage": {"numerator": 1000000,
                                               "denominator": "MILLION"}},
                      "abort": {"http_status": 500,
                                "percentage": {"numerator": 500000,
                                               "denominator": "MILLION"}}}},
                  "metadata": {"filter_metadata": {"istio": {
                      "config": "/apis/networking.istio.io/v1/namespaces/default/"
                                "virtual-service/demoappv11"}}},
                  "decorator": {"operation": f"{SVC11}:8080/fault*"}},
                 {"name": "canary", "match": {"prefix": "/"},
                  "route": {"weighted_clusters": {"clusters": [
                      {"name": f"outbound|8080|v1|{SVC11}", "weight": 90},
                      {"name": f"outbound|8080|v2|{SVC11}", "weight": 10,
                       "request_headers_to_add": [{"header": {"key": "x-canary",
                                                              "value": "v2"}}]}]},
                      "timeout": "0s", "retry_policy": ISTIO_RETRY,
                      "max_stream_duration": {"max_stream_duration": "0s",
                                              "grpc_timeout_header_max": "0s"}}}],
             "include_request_attempt_count": True},
            {"name": "allow_any", "domains": ["*"],
             "routes": [{"name": "allow_any", "match": {"prefix": "/"},
                         "route": {"cluster": "PassthroughCluster", "timeout": "0s",
                                   "max_grpc_timeout": "0s"}}],
             "include_request_attempt_count": True},
        ],
        "validate_clusters": False,
        "max_direct_response_body_size_bytes": 1048576,
        "ignore_port_in_host_matching": True,
    }


def write_rds(tmp_path: Path, rc: dict[str, Any], *, fmt: str = "yaml") -> str:
    other = {"@type": rc["@type"], "name": "9090", "virtual_hosts": []}
    doc = {"version_info": "1", "resources": [other, rc]}
    name = tmp_path / f"rds.{fmt}"
    name.write_text(yaml.safe_dump(doc) if fmt == "yaml" else json.dumps(doc))
    return str(name)


def outbound_hcm(rds_path: str) -> dict[str, Any]:
    """The HCM of listener ``0.0.0.0_8080`` (§4.2, §4.3), RDS from a file instead of ADS."""
    return {
        "stat_prefix": "outbound_0.0.0.0_8080;",
        "rds": {"config_source": {"path_config_source": {"path": rds_path},
                                  "initial_fetch_timeout": "0s",
                                  "resource_api_version": "V3"},
                "route_config_name": "8080"},
        "http_filters": istio_filters(outbound=True),
        "tracing": {"client_sampling": {"value": 100}, "random_sampling": {"value": 1},
                    "overall_sampling": {"value": 100}},
        "access_log": [{"name": "envoy.access_loggers.file", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.access_loggers.file.v3."
                     "FileAccessLog", "path": "/dev/stdout"}}],
        "use_remote_address": False,
        "upgrade_configs": [{"upgrade_type": "websocket"}],
        "stream_idle_timeout": "0s",
        "normalize_path": True,
        "request_id_extension": {"typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.request_id.uuid.v3."
                     "UuidRequestIdConfig", "use_request_id_for_trace_sampling": True}},
        "path_with_escaped_slashes_action": "KEEP_UNCHANGED",
        "proxy_100_continue": True,
    }


def inbound_hcm() -> dict[str, Any]:
    """The HCM of an inbound HTTP chain (§5.3), inline route config."""
    return {
        "stat_prefix": "inbound_0.0.0.0_8080;",
        "route_config": {
            "name": "inbound|8080||", "validate_clusters": False,
            "virtual_hosts": [{
                "name": "inbound|http|8080", "domains": ["*"],
                "routes": [{
                    "name": "default", "match": {"prefix": "/"},
                    "route": {"cluster": "inbound|8080||", "timeout": "0s",
                              "max_stream_duration": {"max_stream_duration": "0s",
                                                      "grpc_timeout_header_max": "0s"},
                              "retry_policy": {"retry_on": "reset-before-request",
                                               "num_retries": 2}},
                    "decorator": {"operation": "demoapp.default.svc.cluster.local:8080/*"}}]}]},
        "http_filters": istio_filters(outbound=False),
        "server_name": "istio-envoy",
        "forward_client_cert_details": "APPEND_FORWARD",
        "set_current_client_cert_details": {"subject": True, "dns": True, "uri": True},
        "use_remote_address": False,
        "upgrade_configs": [{"upgrade_type": "websocket"}],
        "stream_idle_timeout": "0s",
        "normalize_path": True,
        "proxy_100_continue": True,
    }


def req(path: str = "/", authority: str = "", headers: list[tuple[str, str]] | None = None
        ) -> RequestHead:
    return RequestHead(method="GET", path=path, authority=authority,
                       headers=HeaderMap(headers or []))


@pytest.fixture
def outbound(tmp_path: Path) -> rt.HcmConfig:
    return compile_hcm_dict(outbound_hcm(write_rds(tmp_path, outbound_rc())), "hcm")


# ----------------------------------------------------------------------------- outbound


def test_outbound_hcm_settings(outbound: rt.HcmConfig) -> None:
    h = outbound
    assert (h.stat_prefix, h.codec_type, h.rds_source, h.rds_route_config_name) == (
        "outbound_0.0.0.0_8080;", "AUTO", "path", "8080")
    assert (h.server_name, h.server_header_transformation) == ("envoy", "OVERWRITE")
    assert h.stream_idle_timeout == 0.0 and h.idle_timeout == 3600.0
    assert h.normalize_path and h.proxy_100_continue and h.tracing
    assert h.generate_request_id and not h.use_remote_address
    assert h.upgrade_enabled("websocket")
    assert h.request_id_extension.endswith("UuidRequestIdConfig")
    assert (h.max_request_headers_kb, h.max_headers_count) == (60, 100)
    assert len(h.access_logs) == 1
    assert [f.name for f in h.http_filters] == [
        "istio.metadata_exchange", "envoy.filters.http.grpc_stats", "istio.alpn",
        "envoy.filters.http.fault", "envoy.filters.http.cors", "istio.stats",
        "envoy.filters.http.router"]
    mx = h.http_filters[0].config
    assert isinstance(mx, rt.OpaqueFilterConfig)
    assert mx.type_url == "io.istio.http.peer_metadata.Config"
    assert mx.value["upstream_propagation"] == [{"istio_headers": {}}]
    assert isinstance(h.http_filters[3].config, rt.FaultConfig)
    assert h.router == rt.RouterConfig()


def test_outbound_route_config(outbound: rt.HcmConfig) -> None:
    rc = outbound.route_config
    assert rc is not None
    assert rc.name == "8080" and rc.ignore_port_in_host_matching
    assert not rc.validate_clusters and rc.max_direct_response_body_size_bytes == 1048576
    assert rc.config_json["name"] == "8080"
    cases = {
        f"{SVC10}:8080": f"{SVC10}:8080",
        f"{SVC10}.": f"{SVC10}:8080",
        "demoappv10:8080": f"{SVC10}:8080",
        "DemoAppV10.default": f"{SVC10}:8080",
        "10.96.0.10:8080": f"{SVC10}:8080",
        "demoappv11.default.svc:8080": f"{SVC11}:8080",
        "example.com": "allow_any",
        "10.1.1.1:8080": "allow_any",
    }
    for authority, want in cases.items():
        vh = rt.select_virtual_host(rc, authority)
        assert vh is not None and vh.name == want, authority


def test_outbound_default_route_has_istio_retry_policy(outbound: rt.HcmConfig) -> None:
    rc = outbound.route_config
    assert rc is not None
    vh = rt.select_virtual_host(rc, "demoappv10:8080")
    assert vh is not None and vh.include_request_attempt_count
    route = rt.match_route(vh, req("/anything?x=1"))
    assert route is not None and route.name == "default"
    action = route.route
    assert action is not None
    assert action.cluster == f"outbound|8080||{SVC10}"
    assert action.timeout == 0.0 and action.max_grpc_timeout == 0.0
    assert route.decorator == rt.Decorator(operation=f"{SVC10}:8080/*")
    pol = rt.effective_retry_policy(vh, route)
    assert pol is not None
    assert pol.retry_on == {"connect-failure", "refused-stream", "unavailable", "cancelled",
                            "retriable-status-codes"}
    assert (pol.num_retries, pol.host_selection_retry_max_attempts) == (2, 5)
    assert pol.previous_hosts and not pol.retriable_status_codes
    assert (pol.back_off_base, pol.back_off_max, pol.per_try_timeout) == (0.025, 0.25, 0.0)
    t = rt.final_timeouts(action, pol, req())
    assert (t.global_, t.per_try) == (0.0, 0.0)


def test_outbound_weighted_canary(outbound: rt.HcmConfig) -> None:
    rc = outbound.route_config
    assert rc is not None
    vh = rt.select_virtual_host(rc, "demoappv11:8080")
    assert vh is not None
    route = rt.match_route(vh, req("/api"))
    assert route is not None and route.name == "canary" and route.route is not None
    action = route.route
    assert [(w.name.split("|")[2], w.weight) for w in action.weighted_clusters] == [
        ("v1", 90), ("v2", 10)]
    rng = random.Random(11)
    picks = [rt.pick_weighted_cluster(action, rng) for _ in range(10000)]
    assert 0.88 < picks.count(f"outbound|8080|v1|{SVC11}") / 10000 < 0.92
    # The v2 entry's own header mutation applies when it is picked.
    name, cw = rt.route_cluster(action, req(), type("R", (), {
        "getrandbits": staticmethod(lambda k: 95)})())
    assert name.endswith(f"v2|{SVC11}") and cw is not None
    head = req("/api", "demoappv11:8080")
    rt.finalize_request(rc, vh, route, head, cluster=cw)
    assert head.headers.get("x-canary") == "v2"
    # max_stream_duration {0s, grpc_timeout_header_max 0s}: no limit, grpc-timeout honoured
    assert action.max_stream_duration == 0.0 and action.grpc_timeout_header_max == 0.0
    assert rt.stream_duration_limit(action, 0.0, req()) is None
    assert rt.stream_duration_limit(action, 0.0, req(headers=[("grpc-timeout", "2S")])) == 2.0


def test_outbound_fault_override(outbound: rt.HcmConfig) -> None:
    rc = outbound.route_config
    assert rc is not None
    vh = rt.select_virtual_host(rc, f"{SVC11}")
    assert vh is not None
    assert rt.match_route(vh, req("/fault")).name == "canary"  # type: ignore[union-attr]
    head = req("/fault/x", headers=[("end-user", "jason")])
    route = rt.match_route(vh, head)
    assert route is not None and route.name == "fault-route"
    assert route.metadata["istio"]["config"].endswith("virtual-service/demoappv11")
    fault = rt.route_fault(route, outbound, vh=vh, rc=rc)
    assert fault is not None and fault.delay is not None and fault.abort is not None
    assert fault.delay.fixed_delay == 7.0
    assert fault.delay.percentage == rt.FractionalPercent(numerator=1000000,
                                                          denominator=1000000)
    assert fault.abort.http_status == 500
    rng = random.Random(5)
    outcomes = [rt.fault_decision(fault, head, rng) for _ in range(2000)]
    assert all(d == 7.0 for d, _, _ in outcomes)
    aborted = sum(s == 500 for _, s, _ in outcomes)
    assert 900 < aborted < 1100
    # The filter-level HTTPFault is empty: other routes get no fault.
    other = rt.match_route(vh, req("/"))
    assert other is not None
    assert rt.fault_decision(rt.route_fault(other, outbound, vh=vh, rc=rc), req(), rng) == (
        None, None, None)


def test_rds_from_json_file(tmp_path: Path) -> None:
    h = compile_hcm_dict(outbound_hcm(write_rds(tmp_path, outbound_rc(), fmt="json")))
    assert h.route_config is not None and len(h.route_config.virtual_hosts) == 3


def test_rds_relative_path_uses_base_dir(tmp_path: Path) -> None:
    write_rds(tmp_path, outbound_rc())
    h = compile_hcm_dict(outbound_hcm("rds.yaml"), base_dir=str(tmp_path))
    assert h.route_config is not None and h.rds_path == str(tmp_path / "rds.yaml")


@pytest.mark.parametrize(("name", "message"), [
    ("7070", "has no RouteConfiguration named '7070'"),
    ("", "hcm.rds.route_config_name: is required"),
])
def test_rds_unknown_or_empty_name(tmp_path: Path, name: str, message: str) -> None:
    cfg = outbound_hcm(write_rds(tmp_path, outbound_rc()))
    cfg["rds"]["route_config_name"] = name
    with pytest.raises(BadInput, match=message) as err:
        compile_hcm_dict(cfg, "hcm")
    assert "\n" not in str(err.value)


def test_rds_missing_file(tmp_path: Path) -> None:
    cfg = outbound_hcm(str(tmp_path / "nope.yaml"))
    with pytest.raises(BadInput, match=r"hcm.rds.config_source.path_config_source.path: "
                                        r"cannot read .*nope.yaml"):
        compile_hcm_dict(cfg, "hcm")


def test_rds_deprecated_path_and_bad_file(tmp_path: Path) -> None:
    cfg = outbound_hcm(write_rds(tmp_path, outbound_rc()))
    cfg["rds"]["config_source"] = {"path": cfg["rds"]["config_source"]["path_config_source"][
        "path"]}
    assert compile_hcm_dict(cfg).route_config is not None
    bad = tmp_path / "bad.yaml"
    bad.write_text("resources: [{'@type': 'type.googleapis.com/envoy.config.route.v3."
                   "RouteConfiguration', bogus: 1}]")
    cfg["rds"]["config_source"] = {"path": str(bad)}
    with pytest.raises(BadInput, match=r"hcm\.rds\.config_source\.path: .*bad\.yaml"):
        compile_hcm_dict(cfg, "hcm")


def test_rds_errors_in_the_file_name_their_path(tmp_path: Path) -> None:
    rc = outbound_rc()
    rc["virtual_hosts"][0]["routes"][0]["route"]["rate_limits"] = [{"actions": [
        {"source_cluster": {}}]}]
    rds = write_rds(tmp_path, rc)
    with pytest.raises(BadInput, match=r"unsupported field .*rds.yaml\[8080\]\.virtual_hosts"
                                       r"\[0\]\.routes\[0\]\.route\.rate_limits"):
        compile_hcm_dict(outbound_hcm(rds), "hcm")


def test_ads_leaves_route_config_empty() -> None:
    cfg = outbound_hcm("unused")
    cfg["rds"]["config_source"] = {"ads": {}, "initial_fetch_timeout": "0s",
                                   "resource_api_version": "V3"}
    h = compile_hcm_dict(cfg)
    assert (h.route_config, h.rds_route_config_name, h.rds_source) == (None, "8080", "ads")


# ----------------------------------------------------------------------------- inbound


def test_inbound_inline_route_config() -> None:
    h = compile_hcm_dict(inbound_hcm(), "hcm")
    assert (h.rds_source, h.server_name, h.forward_client_cert_details) == (
        "", "istio-envoy", "APPEND_FORWARD")
    assert h.set_current_client_cert_details == {"subject": True, "dns": True, "uri": True}
    rc = h.route_config
    assert rc is not None and rc.name == "inbound|8080||" and not rc.validate_clusters
    vh = rt.select_virtual_host(rc, "anything:1234")
    assert vh is not None and vh.name == "inbound|http|8080"
    route = rt.match_route(vh, req("/x"))
    assert route is not None and route.route is not None
    assert route.route.cluster == "inbound|8080||" and route.route.timeout == 0.0
    pol = rt.effective_retry_policy(vh, route)
    assert pol is not None and pol.retry_on == {"reset-before-request"}
    assert pol.num_retries == 2 and pol.host_selection_retry_max_attempts == 1
    assert [f.name for f in h.http_filters][-1] == "envoy.filters.http.router"
    assert not h.access_logs


def test_inline_defaults() -> None:
    h = compile_hcm_dict({"stat_prefix": "s", "route_config": {"virtual_hosts": [
        {"name": "v", "domains": ["*"], "routes": [
            {"match": {"prefix": "/"}, "route": {"cluster": "c"}}]}]}})
    rc = h.route_config
    assert rc is not None and rc.validate_clusters          # inline: true by default
    assert h.stream_idle_timeout == 300.0 and h.codec_type == "AUTO"
    assert [f.name for f in h.http_filters] == ["envoy.filters.http.router"]
    action = rc.virtual_hosts[0].routes[0].route
    assert action is not None and action.timeout == 15.0 and action.retry_policy is None
    assert action.idle_timeout is None and action.max_stream_duration is None
    assert h.http2.max_concurrent_streams == 2147483647
    assert not rc.ignore_port_in_host_matching


# ----------------------------------------------------------------------------- route features


def one_route(route: dict[str, Any], **rc: Any) -> dict[str, Any]:
    return {"stat_prefix": "s", "route_config": {"name": "r", "virtual_hosts": [
        {"name": "v", "domains": ["*"], "routes": [route]}], **rc}}


def compiled_route(route: dict[str, Any], **rc: Any) -> rt.Route:
    h = compile_hcm_dict(one_route(route, **rc))
    assert h.route_config is not None
    return h.route_config.virtual_hosts[0].routes[0]


def test_matchers_compile() -> None:
    r = compiled_route({
        "match": {"safe_regex": {"regex": r"/v\d+/.*"}, "case_sensitive": False,
                  "headers": [
                      {"name": "X-Exact", "exact_match": "a"},
                      {"name": "x-re", "safe_regex_match": {"regex": "b+"}},
                      {"name": "x-range", "range_match": {"start": "1", "end": "5"}},
                      {"name": "x-present", "present_match": True, "invert_match": True},
                      {"name": "x-sm", "string_match": {"suffix": "z", "ignore_case": True},
                       "treat_missing_header_as_empty": True},
                      {"name": "x-bare"}],
                  "query_parameters": [{"name": "q", "string_match": {"exact": "1"}},
                                       {"name": "p", "present_match": True}],
                  "grpc": {}},
        "route": {"cluster": "c"}})
    m = r.match
    assert (m.kind, m.case_sensitive, m.grpc) == ("safe_regex", False, True)
    hs = m.headers
    assert hs[0].name == "x-exact" and hs[0].string == rt.StringMatcher(kind="exact", value="a")
    assert hs[1].string is not None and hs[1].string.kind == "safe_regex"
    assert (hs[2].kind, hs[2].range_start, hs[2].range_end) == ("range", 1, 5)
    assert (hs[3].kind, hs[3].present, hs[3].invert) == ("present", True, True)
    assert hs[4].treat_missing_as_empty and hs[4].string is not None and hs[4].string.ignore_case
    assert (hs[5].kind, hs[5].present) == ("present", True)
    assert [q.name for q in m.query_parameters] == ["q", "p"]
    assert m.query_parameters[1].string is None
    head = req("/v1/x?q=1&p", headers=[("x-exact", "a"), ("x-re", "bbb"), ("x-range", "3"),
                                        ("x-sm", "AZ"), ("x-bare", ""),
                                        ("content-type", "application/grpc")])
    assert rt.match_route(rt.VirtualHost(name="v", routes=(r,)), head) is r


def test_actions_compile(tmp_path: Path) -> None:
    body = tmp_path / "body.txt"
    body.write_text("from a file")
    h = compile_hcm_dict({"stat_prefix": "s", "route_config": {
        "virtual_hosts": [{"name": "v", "domains": ["*"], "routes": [
            {"match": {"path": "/redir"}, "redirect": {
                "https_redirect": True, "host_redirect": "h", "port_redirect": 8443,
                "prefix_rewrite": "/n", "response_code": "TEMPORARY_REDIRECT",
                "strip_query": True}},
            {"match": {"path": "/direct"}, "direct_response": {
                "status": 503, "body": {"inline_string": "nope"}}},
            {"match": {"path": "/file"}, "direct_response": {
                "status": 200, "body": {"filename": "body.txt"}}},
            {"match": {"prefix": "/"}, "route": {
                "cluster_header": "X-Cluster", "cluster_not_found_response_code": "NOT_FOUND",
                "regex_rewrite": {"pattern": {"regex": "^/a"}, "substitution": "/b"},
                "host_rewrite_literal": "up.host", "idle_timeout": "30s",
                "timeout": "2.5s",
                "request_mirror_policies": [{"cluster": "shadow", "runtime_fraction": {
                    "default_value": {"numerator": 10}}}],
                "hash_policy": [{"header": {"header_name": "x-user"}}],
                "upgrade_configs": [{"upgrade_type": "WebSocket", "enabled": False}],
                "retry_policy": {"retry_on": "5xx", "per_try_timeout": "1s",
                                 "retriable_status_codes": [503],
                                 "retry_back_off": {"base_interval": "0.1s"}}}}]}]}},
        base_dir=str(tmp_path))
    assert h.route_config is not None
    routes = h.route_config.virtual_hosts[0].routes
    assert routes[0].action == rt.RedirectAction(
        scheme_redirect="https", host_redirect="h", port_redirect=8443, prefix_rewrite="/n",
        response_code=307, strip_query=True)
    assert routes[1].action == rt.DirectResponseAction(status=503, body=b"nope")
    assert routes[2].action == rt.DirectResponseAction(status=200, body=b"from a file")
    a = routes[3].route
    assert a is not None
    assert (a.cluster_header, a.cluster_not_found_response_code) == ("x-cluster", 404)
    assert (a.host_rewrite_literal, a.idle_timeout, a.timeout) == ("up.host", 30.0, 2.5)
    assert a.request_mirror_policies == (rt.RequestMirrorPolicy(
        cluster="shadow", fraction=rt.FractionalPercent(numerator=10)),)
    assert a.hash_policy == (HashPolicy("header", "x-user"),)
    assert a.upgrade_configs == (rt.UpgradeConfig(upgrade_type="websocket", enabled=False),)
    pol = a.retry_policy
    assert pol is not None and pol.retriable_status_codes == {503}
    assert (pol.num_retries, pol.back_off_base, pol.back_off_max) == (1, 0.1, pytest.approx(1.0))
    head = req("/a/x")
    rt.rewrite(routes[3], head)
    assert (head.path, head.authority) == ("/b/x", "up.host")


def test_header_mutations_compile() -> None:
    r = compiled_route({
        "match": {"prefix": "/"}, "route": {"cluster": "c"},
        "request_headers_to_add": [
            {"header": {"key": "X-A", "value": "1"}},
            {"header": {"key": "x-b", "value": "2"}, "append": False},
            {"header": {"key": "x-c", "value": "3"}, "append": True},
            {"header": {"key": "x-d", "value": "4"}, "append_action": "ADD_IF_ABSENT"},
            {"header": {"key": "x-e", "raw_value": "NQ=="}, "keep_empty_value": True}],
        "request_headers_to_remove": ["X-Gone"],
        "response_headers_to_add": [{"header": {"key": "x-r", "value": "%REQ(x-a)%"},
                                     "append_action": "OVERWRITE_IF_EXISTS"}]},
        response_headers_to_remove=["x-internal"], most_specific_header_mutations_wins=True)
    add = r.request_headers.add
    assert [(o.key, o.value, o.append_action) for o in add] == [
        ("x-a", "1", "APPEND_IF_EXISTS_OR_ADD"), ("x-b", "2", "OVERWRITE_IF_EXISTS_OR_ADD"),
        ("x-c", "3", "APPEND_IF_EXISTS_OR_ADD"), ("x-d", "4", "ADD_IF_ABSENT"),
        ("x-e", "5", "APPEND_IF_EXISTS_OR_ADD")]
    assert add[4].keep_empty_value and r.request_headers.remove == ("x-gone",)
    assert r.response_headers.add[0].append_action == "OVERWRITE_IF_EXISTS"


def test_route_config_level_fields() -> None:
    h = compile_hcm_dict({"stat_prefix": "s", "route_config": {
        "name": "r", "internal_only_headers": ["X-Internal"],
        "response_headers_to_remove": ["x-internal"], "most_specific_header_mutations_wins": True,
        "typed_per_filter_config": {"envoy.filters.http.fault": {
            "@type": "type.googleapis.com/envoy.config.route.v3.FilterConfig",
            "disabled": True}},
        "virtual_hosts": [{
            "name": "v", "domains": ["*"],
            "retry_policy": {"retry_on": "gateway-error"},
            "include_attempt_count_in_response": True,
            "typed_per_filter_config": {"envoy.filters.http.fault": {
                "@type": "type.googleapis.com/envoy.config.route.v3.FilterConfig",
                "config": {"@type": FAULT_T, "abort": {"grpc_status": 14, "percentage": {
                    "numerator": 100}}}},
                "envoy.filters.http.cors": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.http.cors.v3."
                             "CorsPolicy", "allow_origin_string_match": [{"exact": "*"}]}},
            "routes": [{"match": {"prefix": "/"}, "route": {"cluster": "c"}}]}]}})
    rc = h.route_config
    assert rc is not None
    assert rc.internal_only_headers == ("x-internal",) and rc.most_specific_header_mutations_wins
    assert isinstance(rc.per_filter["envoy.filters.http.fault"], rt.FilterDisabled)
    vh = rc.virtual_hosts[0]
    assert vh.include_attempt_count_in_response
    assert vh.retry_policy is not None and vh.retry_policy.retry_on == {"gateway-error"}
    f = vh.per_filter["envoy.filters.http.fault"]
    assert isinstance(f, rt.FaultConfig) and f.abort is not None and f.abort.grpc_status == 14
    assert vh.per_filter["envoy.filters.http.cors"] == rt.CorsPolicy(
        allow_origins=(rt.StringMatcher(kind="exact", value="*"),))


def test_hcm_options_compile() -> None:
    h = compile_hcm_dict({
        "stat_prefix": "s", "codec_type": "HTTP2", "route_config": {},
        "server_header_transformation": "PASS_THROUGH", "generate_request_id": False,
        "preserve_external_request_id": True, "use_remote_address": True,
        "xff_num_trusted_hops": 1, "skip_xff_append": True, "via": "remora",
        "request_timeout": "10s", "request_headers_timeout": "5s", "drain_timeout": "1s",
        "common_http_protocol_options": {
            "idle_timeout": "60s", "max_headers_count": 50, "max_stream_duration": "9s",
            "headers_with_underscores_action": "REJECT_REQUEST",
            "max_requests_per_connection": 7},
        "max_request_headers_kb": 96, "merge_slashes": True,
        "path_with_escaped_slashes_action": "UNESCAPE_AND_REDIRECT",
        "http_protocol_options": {"accept_http_10": True, "allow_chunked_length": True,
                                  "default_host_for_http_10": "d"},
        "http2_protocol_options": {"max_concurrent_streams": 100,
                                   "initial_stream_window_size": 65535,
                                   "initial_connection_window_size": 1048576},
        "internal_address_config": {"cidr_ranges": [{"address_prefix": "10.0.0.0",
                                                     "prefix_len": 8}]},
        "http_filters": [{"name": "envoy.filters.http.router", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router",
            "suppress_envoy_headers": True, "start_child_span": True}}]})
    assert (h.codec_type, h.server_header_transformation) == ("HTTP2", "PASS_THROUGH")
    assert not h.generate_request_id and h.preserve_external_request_id
    assert (h.use_remote_address, h.xff_num_trusted_hops, h.skip_xff_append, h.via) == (
        True, 1, True, "remora")
    assert (h.request_timeout, h.request_headers_timeout, h.drain_timeout) == (10.0, 5.0, 1.0)
    assert (h.idle_timeout, h.max_headers_count, h.max_stream_duration) == (60.0, 50, 9.0)
    assert h.headers_with_underscores_action == "REJECT_REQUEST"
    assert (h.max_requests_per_connection, h.max_request_headers_kb) == (7, 96)
    assert h.merge_slashes and h.path_with_escaped_slashes_action == "UNESCAPE_AND_REDIRECT"
    assert h.http1 == rt.Http1Options(accept_http_10=True, allow_chunked_length=True,
                                      default_host_for_http_10="d")
    assert (h.http2.max_concurrent_streams, h.http2.initial_stream_window_size) == (100, 65535)
    assert [str(n) for n in h.internal_address_cidrs or ()] == ["10.0.0.0/8"]
    assert h.router.suppress_envoy_headers and h.router.start_child_span
    assert h.route_config is not None and h.route_config.virtual_hosts == ()


# ----------------------------------------------------------------------------- refusals


def set_in(data: dict[str, Any], dotted: str, value: Any) -> dict[str, Any]:
    out = copy.deepcopy(data)
    node: Any = out
    keys = dotted.split(".")
    for k in keys[:-1]:
        node = node[int(k)] if isinstance(node, list) else node[k]
    last = keys[-1]
    if isinstance(node, list):
        node[int(last)] = value
    else:
        node[last] = value
    return out


ROUTE0 = "route_config.virtual_hosts.0.routes.0"
ROUTE0_PATH = r"hcm\.route_config\.virtual_hosts\[0\]\.routes\[0\]"


@pytest.mark.parametrize(("where", "value", "message"), [
    ("http3_protocol_options", {}, r"unsupported field hcm\.http3_protocol_options"),
    ("local_reply_config", {"mappers": []}, r"unsupported field hcm\.local_reply_config"),
    ("common_http_protocol_options", {"max_response_headers_kb": 10},
     r"hcm\.common_http_protocol_options\.max_response_headers_kb"),
    ("upgrade_configs", [{"upgrade_type": "websocket", "filters": [{"name": "x"}]}],
     r"hcm\.upgrade_configs\[0\]\.filters"),
    ("route_config.vhds", {"config_source": {"ads": {}}}, r"hcm\.route_config\.vhds"),
    ("route_config.virtual_hosts.0.virtual_clusters", [{"name": "vc"}],
     r"hcm\.route_config\.virtual_hosts\[0\]\.virtual_clusters"),
    ("route_config.virtual_hosts.0.require_tls", "ALL",
     r"hcm\.route_config\.virtual_hosts\[0\]\.require_tls"),
    (f"{ROUTE0}.match.runtime_fraction", {"default_value": {"numerator": 1}},
     ROUTE0_PATH + r"\.match\.runtime_fraction"),
    (f"{ROUTE0}.tracing", {"custom_tags": [{"tag": "t", "environment": {"name": "E"}}]},
     r"unsupported field " + ROUTE0_PATH + r"\.tracing\.custom_tags\[0\]\.environment"),
    (f"{ROUTE0}.route.rate_limits", [{"actions": [{"source_cluster": {}}]}],
     ROUTE0_PATH + r"\.route\.rate_limits"),
    (f"{ROUTE0}.route.retry_policy", {"retry_priority": {"name": "p"}},
     ROUTE0_PATH + r"\.route\.retry_policy\.retry_priority"),
    (f"{ROUTE0}.route.metadata_match", {"filter_metadata": {}},
     ROUTE0_PATH + r"\.route\.metadata_match"),
    (f"{ROUTE0}.typed_per_filter_config", {"envoy.filters.http.fault": {
        "@type": FAULT_T, "response_rate_limit": {"fixed_limit": {"limit_kbps": 1},
                                                  "percentage": {"numerator": 1}}}},
     ROUTE0_PATH + r"\.typed_per_filter_config\['envoy\.filters\.http\.fault'\]"
                   r"\.response_rate_limit"),
    (f"{ROUTE0}.typed_per_filter_config", {"x": {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}},
     ROUTE0_PATH + r"\.typed_per_filter_config\['x'\]: envoy.*Router is not implemented"),
    ("http_filters", [{"name": "x", "typed_config": {
        "@type": TS, "type_url": "type.googleapis.com/some.Other", "value": {}}},
        {"name": "envoy.filters.http.router"}],
     r"unsupported hcm\.http_filters\[0\]\.typed_config: TypedStruct for some\.Other"),
    ("http_filters", [{"name": "envoy.filters.http.router", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router",
        "upstream_log": [{"name": "l"}]}}],
     r"hcm\.http_filters\[0\]\.typed_config\.upstream_log"),
    ("http_filters", [{"name": "mystery"}],
     r"hcm\.http_filters\[0\]\.typed_config: is required for filter 'mystery'"),
    ("http_filters", [{"name": "envoy.filters.http.fault", "config_discovery": {
        "type_urls": ["x"]}}, {"name": "envoy.filters.http.router"}],
     r"hcm\.http_filters\[0\]\.config_discovery"),
])
def test_refused_fields_name_their_path(where: str, value: Any, message: str) -> None:
    cfg = set_in(inbound_hcm(), where, value)
    with pytest.raises(BadInput, match=message) as err:
        compile_hcm_dict(cfg, "hcm")
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(("where", "value", "message"), [
    (f"{ROUTE0}.match", {"safe_regex": {"regex": "(["}},
     ROUTE0_PATH + r"\.match\.safe_regex\.regex: invalid regex"),
    (f"{ROUTE0}.match", {"prefix": "/", "headers": [{"name": "x", "string_match": {
        "safe_regex": {"regex": "a"}, "ignore_case": True}}]},
     ROUTE0_PATH + r"\.match\.headers\[0\]\.string_match\.ignore_case"),
    (f"{ROUTE0}.match", {"prefix": "/", "headers": [{"name": "x", "range_match": {
        "start": "5", "end": "5"}}]}, ROUTE0_PATH + r"\.match\.headers\[0\]\.range_match"),
    (f"{ROUTE0}.match", {"case_sensitive": True}, ROUTE0_PATH + r"\.match: one of prefix"),
    (f"{ROUTE0}.match", {"path_separated_prefix": "/a/"},
     ROUTE0_PATH + r"\.match\.path_separated_prefix"),
    (f"{ROUTE0}.route", {"timeout": "1s"}, ROUTE0_PATH + r"\.route: one of cluster"),
    (f"{ROUTE0}.route", {"weighted_clusters": {"clusters": [{"name": "a", "weight": 0}]}},
     ROUTE0_PATH + r"\.route\.weighted_clusters: the sum of weights"),
    (f"{ROUTE0}.route", {"weighted_clusters": {"clusters": [{"name": "a", "weight": 1}],
                                               "total_weight": 100}},
     ROUTE0_PATH + r"\.route\.weighted_clusters\.total_weight"),
    (f"{ROUTE0}.route", {"weighted_clusters": {"clusters": [{"weight": 1}]}},
     ROUTE0_PATH + r"\.route\.weighted_clusters\.clusters\[0\]\.name"),
    (f"{ROUTE0}.route", {"cluster": "c", "prefix_rewrite": "/a",
                         "regex_rewrite": {"pattern": {"regex": "a"}, "substitution": ""}},
     ROUTE0_PATH + r"\.route: prefix_rewrite and regex_rewrite"),
    (f"{ROUTE0}.route", {"cluster": "c", "retry_policy": {"retry_on": "5xx,sometimes"}},
     ROUTE0_PATH + r"\.route\.retry_policy\.retry_on: unknown retry condition 'sometimes'"),
    (f"{ROUTE0}.route", {"cluster": "c", "retry_policy": {"retry_back_off": {
        "base_interval": "1s", "max_interval": "0.5s"}}},
     ROUTE0_PATH + r"\.route\.retry_policy\.retry_back_off\.max_interval"),
    (f"{ROUTE0}.request_headers_to_add", [{"header": {"key": ":path", "value": "/"}}],
     ROUTE0_PATH + r"\.request_headers_to_add\[0\]\.header\.key: ':'-prefixed"),
    (f"{ROUTE0}.request_headers_to_remove", ["Host"],
     ROUTE0_PATH + r"\.request_headers_to_remove\[0\]"),
    (f"{ROUTE0}.request_headers_to_add", [{"header": {"key": "x", "value": "1"},
                                           "append": True, "append_action": "ADD_IF_ABSENT"}],
     ROUTE0_PATH + r"\.request_headers_to_add\[0\]: append and append_action"),
    (f"{ROUTE0}.typed_per_filter_config", {"envoy.filters.http.fault": {
        "@type": FAULT_T, "abort": {"http_status": 100}}},
     r"\.abort\.http_status: must be in \[200, 600\)"),
    ("route_config.max_direct_response_body_size_bytes", 2,
     r"hcm\.route_config\.virtual_hosts\[0\]\.routes\[1\]\.direct_response\.body: 3 bytes"),
    ("route_config.virtual_hosts.1", {"name": "dup", "domains": ["*"]},
     r"hcm\.route_config\.virtual_hosts: only a single wildcard domain"),
    ("route_config.virtual_hosts.1", {"name": "dup", "domains": ["a.com", "A.COM"]},
     r"hcm\.route_config\.virtual_hosts: duplicate domain 'a\.com'"),
    ("route_config.virtual_hosts.1", {"name": "nodomains"},
     r"hcm\.route_config\.virtual_hosts\[1\]\.domains: at least one"),
    ("http_filters", [{"name": "envoy.filters.http.router"}, {"name": "envoy.filters.http.cors"}],
     r"hcm\.http_filters\[0\]: the router is a terminal filter"),
    ("http_filters", [{"name": "envoy.filters.http.cors"}],
     r"hcm\.http_filters\[0\]: the last HTTP filter must be the router"),
    ("stat_prefix", "", r"hcm\.stat_prefix: is required"),
    ("codec_type", "HTTP3", r"unsupported hcm\.codec_type: HTTP3"),
])
def test_validation_errors(where: str, value: Any, message: str) -> None:
    cfg = inbound_hcm()
    cfg["route_config"]["virtual_hosts"][0]["routes"].append(
        {"match": {"prefix": "/d"}, "direct_response": {"status": 200,
                                                        "body": {"inline_string": "abc"}}})
    cfg["route_config"]["virtual_hosts"].append({"name": "other", "domains": ["b.com"]})
    cfg = set_in(cfg, where, value)
    with pytest.raises(BadInput, match=message) as err:
        compile_hcm_dict(cfg, "hcm")
    assert "\n" not in str(err.value)


def test_missing_route_specifier_and_parse_errors() -> None:
    with pytest.raises(BadInput, match=r"hcm: route_config or rds is required"):
        compile_hcm_dict({"stat_prefix": "s"}, "hcm")
    with pytest.raises(BadInput, match=r"^hcm: .*no_such_field"):
        compile_hcm_dict({"stat_prefix": "s", "no_such_field": 1}, "hcm")


def test_hash_policies_compile_and_unsupported_ones_are_refused() -> None:
    r = compiled_route({"match": {"prefix": "/"}, "route": {"cluster": "c", "hash_policy": [
        {"header": {"header_name": "X-User"}, "terminal": True},
        {"cookie": {"name": "sid", "ttl": "60s", "path": "/a",
                    "attributes": [{"name": "SameSite", "value": "Lax"}]}},
        {"connection_properties": {"source_ip": True}},
        {"query_parameter": {"name": "u"}}]}})
    assert r.route is not None
    assert r.route.hash_policy == (
        HashPolicy("header", "x-user", terminal=True),
        HashPolicy("cookie", "sid", ttl=60.0, path="/a", attributes=(("SameSite", "Lax"),)),
        HashPolicy("source_ip"),
        HashPolicy("query_parameter", "u"))
    for policy, needle in [({"filter_state": {"key": "k"}}, "filter_state"),
                           ({"header": {"header_name": "x", "regex_rewrite": {
                               "pattern": {"regex": "a"}, "substitution": "b"}}},
                            "unsupported field"),
                           ({"cookie": {}}, "cookie.name is required")]:
        with pytest.raises(BadInput, match=needle) as err:
            compiled_route({"match": {"prefix": "/"},
                            "route": {"cluster": "c", "hash_policy": [policy]}})
        assert "hash_policy[0]" in str(err.value)
