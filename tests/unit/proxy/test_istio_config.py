"""The Istio-shaped bootstrap builders: what they build is a bootstrap `remora proxy` takes, and
a field left None is left out."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from remora.proxy import istio_config as ic
from remora.proxy.bootstrap import compile_bootstrap, parse_bootstrap


def _every_piece(rds: Path) -> ic.Json:
    rt = ic.rds_file([{"name": "8080", "ignore_port_in_host_matching": True, "virtual_hosts": [
        ic.service_vhost("svc", 8080, "10.100.0.9", [{
            "name": "default", "match": {"prefix": "/"},
            "route": {"cluster": "outbound|8080||svc.default.svc.cluster.local",
                      "timeout": "0s", "retry_policy": ic.ISTIO_RETRY_POLICY}}]),
        ic.allow_any_vhost()]}])
    rds.write_text(json.dumps(rt))
    inbound_routes = {"name": "inbound|9090||", "virtual_hosts": [{
        "name": "inbound|http|9090", "domains": ["*"], "routes": [{
            "name": "default", "match": {"prefix": "/"},
            "route": {"cluster": "inbound|9090||", "timeout": "0s"}}]}]}
    svc = "outbound|7070||tcp.default.svc.cluster.local"
    return ic.bootstrap(
        node=ic.sidecar_node("10.0.0.1", "client"),
        listeners=[
            ic.virtual_outbound(),
            ic.outbound_http_listener(8080, ic.http_connection_manager(
                "outbound_0.0.0.0_8080", rds=ic.rds_from_file("8080", str(rds)),
                http_filters=ic.http_filters(), access_log=ic.file_access_log(),
                websocket=True)),
            ic.outbound_tcp_listener("10.100.0.3", 7070, svc,
                                     access_log=ic.file_access_log("/dev/stderr")),
            ic.virtual_inbound([ic.inbound_http_chain(9090, ic.http_connection_manager(
                "inbound_0.0.0.0_9090", route_config=inbound_routes,
                http_filters=ic.http_filters(istio_stats={"disable_host_header_fallback": True}),
                access_log=ic.file_access_log(), server_name="istio-envoy",
                server_header_transformation="OVERWRITE"))]),
        ],
        clusters=[
            *ic.passthrough_clusters("2s"),
            ic.inbound_passthrough_cluster("2s"),
            ic.original_dst_cluster("inbound|9090||", connect_timeout="2s", inbound=True,
                                    alt_stat_name=True, protocol_options=ic.upstream_http2()),
            ic.static_cluster(svc, [("10.0.0.2", 7070), ("10.0.0.3", 7070)],
                              connect_timeout="2s", lb_policy="LEAST_REQUEST"),
            ic.static_cluster("outbound|8080||svc.default.svc.cluster.local",
                              [("10.0.0.4", 8080)], connect_timeout="2s"),
        ])


def test_every_piece_compiles_as_a_sidecar_bootstrap(tmp_path: Path) -> None:
    snap = compile_bootstrap(parse_bootstrap(_every_piece(tmp_path / "rds.json")))
    assert [li.name for li in snap.listeners] == [
        "virtualOutbound", "0.0.0.0_8080", "10.100.0.3_7070", "virtualInbound"]
    vo, http, tcp, vi = snap.listeners
    assert vo.use_original_dst and vo.bind_to_port
    assert not http.bind_to_port and not tcp.bind_to_port
    assert http.listener_filters_timeout == 0.0 and http.continue_on_listener_filters_timeout
    assert [c.name for c in vi.filter_chains] == [
        "virtualInbound-blackhole", "0.0.0.0_9090", "virtualInbound"]
    assert snap.node.id == "sidecar~10.0.0.1~client-1.default~default.svc.cluster.local"
    inbound = snap.clusters["inbound|9090||"]
    assert inbound.observability_name == "inbound|9090||;"
    assert len(snap.clusters["outbound|7070||tcp.default.svc.cluster.local"].endpoints) == 2


def test_fields_left_none_are_left_out() -> None:
    hcm = ic.http_connection_manager(
        "p", route_config={"name": "r"}, http_filters=[], access_log=[],
        use_remote_address=None, normalize_path=None, stream_idle_timeout=None)["typed_config"]
    assert sorted(hcm) == ["@type", "access_log", "http_filters", "route_config",
                           "stat_prefix"]
    istio = ic.http_connection_manager("p", rds=ic.rds_from_file("8080", "/r"),
                                       http_filters=[], access_log=[])["typed_config"]
    assert (istio["use_remote_address"], istio["normalize_path"],
            istio["stream_idle_timeout"]) == (False, True, "0s")
    assert "listener_filters_timeout" not in ic.outbound_http_listener(
        8080, hcm, listener_filters_timeout=None)
    assert [c["name"] for c in ic.virtual_inbound([], catchall=None)["filter_chains"]] == [
        "virtualInbound-blackhole"]


def test_http_filters_keep_the_order_given() -> None:
    names = ("istio.stats", "envoy.filters.http.fault", "envoy.filters.http.router")
    assert [f["name"] for f in ic.http_filters(names)] == list(names)
    assert [f["name"] for f in ic.http_filters()] == list(ic.ISTIO_HTTP_FILTERS)


def test_service_vhost_domains() -> None:
    fqdn = "svc.default.svc.cluster.local"
    short = ["svc", "svc.default.svc", "svc.default", "10.100.0.9"]
    vh = ic.service_vhost("svc", 8080, "10.100.0.9", [])
    assert (vh["name"], vh["domains"], vh["include_request_attempt_count"]) == (
        f"{fqdn}:8080", [fqdn, f"{fqdn}.", *short], True)
    bare = ic.service_vhost("svc", 8080, "10.100.0.9", [], fqdn_dot=False,
                            include_request_attempt_count=False)
    assert bare == {"name": f"{fqdn}:8080", "domains": [fqdn, *short], "routes": []}


def test_hcm_takes_exactly_one_route_source() -> None:
    with pytest.raises(ValueError, match="exactly one"):
        ic.http_connection_manager("p", http_filters=[], access_log=[])
    with pytest.raises(ValueError, match="exactly one"):
        ic.http_connection_manager("p", rds={}, route_config={}, http_filters=[],
                                   access_log=[])
