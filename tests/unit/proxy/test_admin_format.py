"""Envoy admin output formats, rendered from the example sidecar bootstrap.

Whole outputs are golden files under ``tests/golden/admin/`` (rewrite them with
``REFRESH_GOLDEN=1`` and review the diff); the literal lines below are written from the spec
(§11, §13) and Envoy's handlers, independently of the code. JSON outputs are also parsed back
into the real ``envoy.admin.v3`` protos and re-printed by protobuf, which checks field names,
types, omitted defaults and field order.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
import re
from pathlib import Path
from typing import Any

import pytest

# Registers the Any types a config dump contains.
from envoy.admin.v3 import (
    clusters_pb2,
    config_dump_pb2,
    config_dump_shared_pb2,  # noqa: F401
    listeners_pb2,
    memory_pb2,
    server_info_pb2,
)
from envoy.config.endpoint.v3 import endpoint_pb2  # noqa: F401
from envoy.extensions.filters.listener.original_dst.v3 import original_dst_pb2  # noqa: F401
from envoy.extensions.filters.network.tcp_proxy.v3 import tcp_proxy_pb2  # noqa: F401
from google.protobuf import json_format, symbol_database
from google.protobuf.descriptor import Descriptor
from google.protobuf.message import Message

from remora.proxy import admin_format as fmt
from remora.proxy.bootstrap import load_bootstrap
from remora.proxy.model import Snapshot, SocketAddress
from remora.proxy.state import ClusterStatus, HostStatus
from remora.proxy.stats import (
    CLUSTER_STATS,
    LISTENER_STATS,
    TCP_STATS,
    StatsSnapshot,
    cluster_scope,
    listener_scope,
)

ROOT = Path(__file__).resolve().parents[3]
EXAMPLE = ROOT / "examples" / "sidecar-bootstrap.yaml"
GOLDEN = ROOT / "tests" / "golden" / "admin"
LOADED_AT = 1767225600.25          # 2026-01-01T00:00:00.250Z
SVC = "outbound|8080||svc.default.svc.cluster.local"


def check_golden(name: str, text: str) -> None:
    path = GOLDEN / name
    if os.environ.get("REFRESH_GOLDEN") == "1":
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        return
    want = path.read_text()
    if text != want:
        diff = "".join(difflib.unified_diff(want.splitlines(True), text.splitlines(True),
                                            f"golden/{name}", "rendered"))
        pytest.fail(f"{name} differs from its golden file (REFRESH_GOLDEN=1 rewrites):\n{diff}")


@pytest.fixture(scope="module")
def snap() -> Snapshot:
    return load_bootstrap(str(EXAMPLE))


def host(addr: str, port: int, **stats: int) -> HostStatus:
    h = HostStatus(address=SocketAddress(address=addr, port=port))
    h.stats.update(stats)
    return h


@pytest.fixture(scope="module")
def statuses(snap: Snapshot) -> list[ClusterStatus]:
    """Live hosts: the EDS cluster's two endpoints (one ejected by outlier detection, as
    another proxy would report it), the inbound cluster and PassthroughCluster after use."""
    svc = [HostStatus.of(ep) for ep in snap.clusters[SVC].endpoints]
    svc[0].stats.update(cx_total=3, cx_active=1)
    svc[1].stats.update(cx_total=2, cx_connect_fail=2)
    svc[1].health_flags = ("/failed_outlier_check",)
    return [
        ClusterStatus(name=SVC, hosts=svc),
        ClusterStatus(name="inbound|8080||", hosts=[host("10.0.0.2", 8080, cx_total=1)]),
        ClusterStatus(name="InboundPassthroughCluster"),
        ClusterStatus(name="PassthroughCluster",
                      hosts=[host("203.0.113.10", 443, cx_total=4, cx_active=2)]),
        ClusterStatus(name="BlackHoleCluster"),
    ]


@pytest.fixture(scope="module")
def stats(snap: Snapshot) -> StatsSnapshot:
    """Every stat the proxy declares for this config, a few of them counted."""
    out = StatsSnapshot()

    def declare(scope: str, table: tuple[tuple[str, str], ...]) -> None:
        for name, kind in table:
            (out.counters if kind == "counter" else out.gauges)[f"{scope}.{name}"] = 0

    for li in snap.listeners:
        declare(listener_scope(f"{li.address.address}:{li.address.port}"), LISTENER_STATS)
        for chain in li.filter_chains:
            if chain.tcp_proxy is not None:
                declare(f"tcp.{chain.tcp_proxy.stat_prefix}", TCP_STATS)
    for c in snap.clusters.values():
        declare(cluster_scope(c.observability_name), CLUSTER_STATS)
    out.counters["listener.0.0.0.0_15001.downstream_cx_total"] = 9
    out.gauges["listener.0.0.0.0_15001.downstream_cx_active"] = 3
    out.counters[f"cluster.{SVC};.upstream_cx_total"] = 5
    out.counters[f"cluster.{SVC};.upstream_cx_connect_fail"] = 2
    out.counters["cluster.BlackHoleCluster.upstream_cx_none_healthy"] = 1
    out.counters[f"tcp.{SVC}.downstream_cx_total"] = 5
    out.gauges["server.live"] = 1
    out.gauges["server.state"] = 0
    return out


def reprinted(text: str, message: Message, *, always: bool = False) -> None:
    """``text`` parses into ``message``, protobuf prints the same JSON value, and every object's
    keys come in field-number order (Envoy's printer sorts fields by number)."""
    ours = json.loads(text)
    json_format.Parse(text, message)
    theirs = json_format.MessageToDict(message, preserving_proto_field_name=True,
                                       always_print_fields_with_no_presence=always)
    assert ours == theirs
    assert_field_order(ours, message.DESCRIPTOR)


_OPAQUE = {"google.protobuf.Struct", "google.protobuf.Value", "google.protobuf.ListValue",
           "google.protobuf.Duration", "google.protobuf.Timestamp"}


def assert_field_order(obj: Any, desc: Descriptor, where: str = "$") -> None:
    wrapper = desc.full_name.startswith("google.protobuf.") and desc.full_name.endswith("Value")
    if desc.full_name in _OPAQUE or wrapper:
        return
    if desc.full_name == "google.protobuf.Any":
        keys = list(obj)
        assert keys[0] == "@type", where
        type_name = obj["@type"].rsplit("/", 1)[-1]
        inner = symbol_database.Default().pool.FindMessageTypeByName(type_name)
        assert_field_order({k: v for k, v in obj.items() if k != "@type"}, inner, where)
        return
    numbers = []
    for key, value in obj.items():
        f = desc.fields_by_name[key]
        numbers.append(f.number)
        if f.message_type is None or f.message_type.GetOptions().map_entry:
            continue
        for i, item in enumerate(value if f.is_repeated else [value]):
            assert_field_order(item, f.message_type, f"{where}.{key}[{i}]")
    assert numbers == sorted(numbers), f"{where}: keys {list(obj)} not in field-number order"


# ------------------------------------------------------------------------------ /listeners


def test_listeners_text(snap: Snapshot) -> None:
    # §11.1: one "<name>::<address>" line per address, bind_to_port:false listeners included.
    text = fmt.render_listeners(snap)
    assert text.splitlines() == [
        "virtualOutbound::0.0.0.0:15001",
        "virtualInbound::0.0.0.0:15006",
        "10.100.0.7_8080::10.100.0.7:8080",
    ]
    check_golden("listeners.txt", text)


def test_listeners_additional_addresses_and_ipv6(snap: Snapshot) -> None:
    from dataclasses import replace
    li = replace(snap.listeners[1], address=SocketAddress(address="0:0::0", port=15006),
                 additional_addresses=(SocketAddress(address="0.0.0.0", port=15006),))
    one = replace(snap, listeners=(li,))
    assert fmt.render_listeners(one) == ("virtualInbound::[::]:15006\n"
                                         "virtualInbound::0.0.0.0:15006\n")
    data = json.loads(fmt.render_listeners_json(one))
    assert data["listener_statuses"][0]["additional_local_addresses"] == [
        {"socket_address": {"address": "0.0.0.0", "port_value": 15006}}]
    reprinted(fmt.render_listeners_json(one), listeners_pb2.Listeners())


def test_listeners_json(snap: Snapshot) -> None:
    text = fmt.render_listeners_json(snap)
    assert text.startswith('{\n "listener_statuses": [\n  {\n   "name": "virtualOutbound",\n')
    reprinted(text, listeners_pb2.Listeners())
    check_golden("listeners.json", text)


# ------------------------------------------------------------------------------ /clusters


def test_clusters_text(snap: Snapshot, statuses: list[ClusterStatus]) -> None:
    text = fmt.render_clusters(snap, statuses)
    lines = text.splitlines()
    c, h = SVC, f"{SVC}::10.1.0.3:8080"
    # §11.2, in order: observability name, thresholds (Istio's outbound default_priority
    # 4294967295 ×4; high_priority at Envoy's defaults), added_via_api, eds_service_name,
    # then per host its stats sorted by name and the fixed fields.
    start = lines.index(f"{c}::observability_name::{c};")
    assert lines[start:start + 31] == [
        f"{c}::observability_name::{c};",
        f"{c}::default_priority::max_connections::4294967295",
        f"{c}::default_priority::max_pending_requests::4294967295",
        f"{c}::default_priority::max_requests::4294967295",
        f"{c}::default_priority::max_retries::4294967295",
        f"{c}::high_priority::max_connections::1024",
        f"{c}::high_priority::max_pending_requests::1024",
        f"{c}::high_priority::max_requests::1024",
        f"{c}::high_priority::max_retries::3",
        f"{c}::added_via_api::false",
        f"{c}::eds_service_name::{c}",
        f"{c}::10.1.0.2:8080::cx_active::1",
        f"{c}::10.1.0.2:8080::cx_connect_fail::0",
        f"{c}::10.1.0.2:8080::cx_total::3",
        f"{c}::10.1.0.2:8080::rq_active::0",
        f"{c}::10.1.0.2:8080::rq_error::0",
        f"{c}::10.1.0.2:8080::rq_success::0",
        f"{c}::10.1.0.2:8080::rq_timeout::0",
        f"{c}::10.1.0.2:8080::rq_total::0",
        f"{c}::10.1.0.2:8080::hostname::",
        f"{c}::10.1.0.2:8080::health_flags::healthy",
        f"{c}::10.1.0.2:8080::weight::1",
        f"{c}::10.1.0.2:8080::region::",
        f"{c}::10.1.0.2:8080::zone::",
        f"{c}::10.1.0.2:8080::sub_zone::",
        f"{c}::10.1.0.2:8080::canary::false",
        f"{c}::10.1.0.2:8080::priority::0",
        f"{c}::10.1.0.2:8080::success_rate::-1",
        f"{c}::10.1.0.2:8080::local_origin_success_rate::-1",
        f"{h}::cx_active::0",
        f"{h}::cx_connect_fail::2",
    ]
    assert f"{h}::health_flags::/failed_outlier_check" in lines
    # Bootstrap clusters without alt_stat_name are observed under their own name; no
    # eds_service_name line when none is set; no outlier lines (no outlier detection).
    assert "BlackHoleCluster::observability_name::BlackHoleCluster" in lines
    assert not any("BlackHoleCluster::eds_service_name" in ln for ln in lines)
    assert not any("::outlier::" in ln for ln in lines)
    # An ORIGINAL_DST cluster lists the hosts it has used.
    assert "PassthroughCluster::203.0.113.10:443::cx_active::2" in lines
    assert len([ln for ln in lines if ln.startswith("InboundPassthroughCluster::")]) == 10
    assert len(lines) == 5 * 10 + 1 + 4 * 18
    check_golden("clusters.txt", text)


def test_clusters_without_status_list_configured_endpoints(snap: Snapshot) -> None:
    lines = fmt.render_clusters(snap, []).splitlines()
    assert f"{SVC}::10.1.0.3:8080::health_flags::healthy" in lines
    assert not any(ln.startswith("PassthroughCluster::") and "::cx_total::" in ln
                   for ln in lines)


def test_health_flags_text_order() -> None:
    assert fmt.health_flags_text(()) == "healthy"
    assert fmt.health_flags_text(("/failed_eds_health", "/failed_active_hc")) == \
        "/failed_active_hc/failed_eds_health"


def test_clusters_json(snap: Snapshot, statuses: list[ClusterStatus]) -> None:
    text = fmt.render_clusters_json(snap, statuses)
    reprinted(text, clusters_pb2.Clusters())
    data = json.loads(text)
    svc = data["cluster_statuses"][0]
    assert svc["name"] == SVC and svc["observability_name"] == SVC + ";"
    assert svc["eds_service_name"] == SVC and "added_via_api" not in svc
    assert svc["circuit_breakers"]["thresholds"] == [
        {"max_connections": 4294967295, "max_pending_requests": 4294967295,
         "max_requests": 4294967295, "max_retries": 4294967295},
        {"priority": "HIGH", "max_connections": 1024, "max_pending_requests": 1024,
         "max_requests": 1024, "max_retries": 3}]
    first, second = svc["host_statuses"]
    # Counters in Envoy's declaration order, then gauges; zero values are defaults (absent);
    # uint64 values are strings.
    assert first["stats"] == [
        {"name": "cx_connect_fail"}, {"value": "3", "name": "cx_total"}, {"name": "rq_error"},
        {"name": "rq_success"}, {"name": "rq_timeout"}, {"name": "rq_total"},
        {"type": "GAUGE", "value": "1", "name": "cx_active"},
        {"type": "GAUGE", "name": "rq_active"}]
    assert first["health_status"] == {"eds_health_status": "HEALTHY"}
    assert second["health_status"] == {"failed_outlier_check": True,
                                       "eds_health_status": "HEALTHY"}
    assert first["weight"] == 1 and first["locality"] == {}
    assert "host_statuses" not in data["cluster_statuses"][2]     # InboundPassthroughCluster
    check_golden("clusters.json", text)


def test_istioctl_endpoint_table(snap: Snapshot, statuses: list[ClusterStatus]) -> None:
    """What ``istioctl proxy-config endpoint`` prints from this JSON (§13.4)."""
    data = json.loads(fmt.render_clusters_json(snap, statuses))
    rows = []
    for c in data["cluster_statuses"]:
        for h in c.get("host_statuses", []):
            sa = h["address"]["socket_address"]
            rows.append((f"{sa['address']}:{sa['port_value']}",
                         h["health_status"]["eds_health_status"],
                         "FAILED" if h["health_status"].get("failed_outlier_check") else "OK",
                         c["name"]))
    assert sorted(rows) == [
        ("10.0.0.2:8080", "HEALTHY", "OK", "inbound|8080||"),
        ("10.1.0.2:8080", "HEALTHY", "OK", SVC),
        ("10.1.0.3:8080", "HEALTHY", "FAILED", SVC),
        ("203.0.113.10:443", "HEALTHY", "OK", "PassthroughCluster"),
    ]


# ------------------------------------------------------------------------------ /config_dump


def test_config_dump(snap: Snapshot) -> None:
    configs = fmt.config_dump(snap, last_updated=LOADED_AT)
    text = fmt.render_config_dump(configs)
    # §11.3: one message per config tracker, in tracker-key order, 1-space indentation.
    assert [c["@type"] for c in configs] == [
        "type.googleapis.com/envoy.admin.v3.BootstrapConfigDump",
        "type.googleapis.com/envoy.admin.v3.ClustersConfigDump",
        "type.googleapis.com/envoy.admin.v3.ListenersConfigDump",
        "type.googleapis.com/envoy.admin.v3.ScopedRoutesConfigDump",
        "type.googleapis.com/envoy.admin.v3.RoutesConfigDump",
        "type.googleapis.com/envoy.admin.v3.SecretsConfigDump",
    ]
    assert text.startswith('{\n "configs": [\n  {\n   "@type": "type.googleapis.com/envoy.admin.'
                           'v3.BootstrapConfigDump",\n   "bootstrap": {\n    "node": {\n')
    assert text.endswith("  }\n ]\n}\n")
    assert '   "last_updated": "2026-01-01T00:00:00.250Z"\n' in text
    assert '  {\n   "@type": "type.googleapis.com/envoy.admin.v3.ScopedRoutesConfigDump"\n  }' \
        in text
    static = configs[1]["static_clusters"]
    assert [s["cluster"]["name"] for s in static] == list(snap.clusters)
    assert static[0]["cluster"]["@type"] == "type.googleapis.com/envoy.config.cluster.v3.Cluster"
    assert list(static[0]) == ["cluster", "last_updated"]
    listeners = configs[2]["static_listeners"]
    assert [s["listener"]["name"] for s in listeners] == [li.name for li in snap.listeners]
    reprinted(text, config_dump_pb2.ConfigDump())
    check_golden("config_dump.json", text)


def test_config_dump_include_eds(snap: Snapshot, statuses: list[ClusterStatus]) -> None:
    configs = fmt.config_dump(snap, last_updated=LOADED_AT, include_eds=True,
                              statuses=statuses)
    assert configs[2]["@type"] == "type.googleapis.com/envoy.admin.v3.EndpointsConfigDump"
    cla = [e["endpoint_config"] for e in configs[2]["static_endpoint_configs"]]
    assert [c["cluster_name"] for c in cla] == [SVC, "inbound|8080||",
                                                "InboundPassthroughCluster",
                                                "PassthroughCluster", "BlackHoleCluster"]
    eps = cla[0]["endpoints"][0]["lb_endpoints"]
    assert [e["endpoint"]["address"]["socket_address"]["address"] for e in eps] == [
        "10.1.0.2", "10.1.0.3"]
    assert cla[0]["policy"] == {"overprovisioning_factor": 140}         # Envoy's default
    text = fmt.render_config_dump(configs)
    reprinted(text, config_dump_pb2.ConfigDump())
    check_golden("config_dump_include_eds.json", text)
    # a cluster's own factor is the one shown
    first = next(iter(snap.clusters.values()))
    mine = dataclasses.replace(snap, clusters={
        **snap.clusters, first.name: dataclasses.replace(first, overprovisioning_factor=100)})
    configs = fmt.config_dump(mine, last_updated=LOADED_AT, include_eds=True,
                              statuses=statuses)
    assert configs[2]["static_endpoint_configs"][0]["endpoint_config"]["policy"] == {
        "overprovisioning_factor": 100}
    # a locality's load_balancing_weight is shown with its group, as Envoy does
    weighted = [dataclasses.replace(cs, hosts=[dataclasses.replace(h, locality_weight=7)
                                               for h in cs.hosts]) for cs in statuses]
    configs = fmt.config_dump(snap, last_updated=LOADED_AT, include_eds=True,
                              statuses=weighted)
    group = configs[2]["static_endpoint_configs"][0]["endpoint_config"]["endpoints"][0]
    assert group["load_balancing_weight"] == 7
    reprinted(fmt.render_config_dump(configs), config_dump_pb2.ConfigDump())


def test_config_dump_resource(snap: Snapshot) -> None:
    configs = fmt.config_dump(snap, last_updated=LOADED_AT)
    got = fmt.select_resource(configs, "static_listeners")
    assert [g["@type"] for g in got] == [
        "type.googleapis.com/envoy.admin.v3.ListenersConfigDump.StaticListener"] * 3
    reprinted(fmt.render_config_dump(got), config_dump_pb2.ConfigDump())
    assert fmt.select_resource(configs, "dynamic_active_clusters") == []
    assert fmt.render_config_dump([]) == "{}\n"
    with pytest.raises(fmt.AdminError) as err:
        fmt.select_resource(configs, "bootstrap")
    assert (err.value.status, err.value.body) == (
        400, "bootstrap is not a repeated field. Use ?mask=bootstrap to get only this field")
    with pytest.raises(fmt.AdminError) as err:
        fmt.select_resource(configs, "nope")
    assert (err.value.status, err.value.body) == (404, "nope not found in config dump")


def test_config_dump_name_match(snap: Snapshot) -> None:
    configs = fmt.config_dump(snap, last_updated=LOADED_AT,
                              name_match=lambda n: n.startswith("virtual"))
    assert [s["listener"]["name"] for s in configs[2]["static_listeners"]] == [
        "virtualOutbound", "virtualInbound"]
    assert "static_clusters" not in configs[1]


# ------------------------------------------------------------------------------ /stats


def test_stats_text(stats: StatsSnapshot) -> None:
    text = fmt.render_stats(stats)
    lines = text.splitlines()
    assert lines == sorted(lines)
    assert "listener.0.0.0.0_15001.downstream_cx_total: 9" in lines
    assert f"cluster.{SVC};.upstream_cx_total: 5" in lines
    assert "server.live: 1" in lines
    check_golden("stats.txt", text)


def test_stats_filter_usedonly_type(stats: StatsSnapshot) -> None:
    used = fmt.render_stats(stats, used_only=True)
    assert used == (
        "cluster.BlackHoleCluster.upstream_cx_none_healthy: 1\n"
        f"cluster.{SVC};.upstream_cx_connect_fail: 2\n"
        f"cluster.{SVC};.upstream_cx_total: 5\n"
        "listener.0.0.0.0_15001.downstream_cx_active: 3\n"
        "listener.0.0.0.0_15001.downstream_cx_total: 9\n"
        "server.live: 1\n"
        f"tcp.{SVC}.downstream_cx_total: 5\n")
    assert fmt.render_stats(stats, pattern=re.compile(r"^server\.")) == (
        "server.live: 1\nserver.state: 0\n")
    gauges = fmt.render_stats(stats, used_only=True, type="Gauges")
    assert gauges == "listener.0.0.0.0_15001.downstream_cx_active: 3\nserver.live: 1\n"
    assert fmt.render_stats(stats, type="Histograms") == ""


def test_stats_json(stats: StatsSnapshot) -> None:
    text = fmt.render_stats_json(stats, pattern=re.compile("^server"))
    assert text == ('{"stats":[{"name":"server.live","value":1},'
                    '{"name":"server.state","value":0}]}')
    assert fmt.render_stats_json(StatsSnapshot()) == '{"stats":[]}'


def test_prometheus(stats: StatsSnapshot) -> None:
    text = fmt.render_prometheus(stats)
    blocks = text.split("\n\n")
    assert blocks[-1] == ""
    # §11.5 / Envoy prometheus_stats.cc: counters before gauges, one "# TYPE" per
    # tag-extracted name, Istio's tag extractors, `{}` when a series has no tags.
    assert ("# TYPE envoy_cluster_upstream_cx_total counter\n"
            'envoy_cluster_upstream_cx_total{cluster_name="BlackHoleCluster"} 0\n'
            'envoy_cluster_upstream_cx_total{cluster_name="InboundPassthroughCluster"} 0\n'
            'envoy_cluster_upstream_cx_total{cluster_name="PassthroughCluster"} 0\n'
            'envoy_cluster_upstream_cx_total{cluster_name="inbound|8080||"} 0\n'
            f'envoy_cluster_upstream_cx_total{{cluster_name="{SVC}"}} 5') in blocks
    assert ("# TYPE envoy_listener_downstream_cx_active gauge\n"
            'envoy_listener_downstream_cx_active{listener_address="0.0.0.0_15001"} 3\n'
            'envoy_listener_downstream_cx_active{listener_address="0.0.0.0_15006"} 0\n'
            'envoy_listener_downstream_cx_active{listener_address="10.100.0.7_8080"} 0'
            ) in blocks
    assert ("# TYPE envoy_tcp_downstream_cx_total counter\n"
            'envoy_tcp_downstream_cx_total{tcp_prefix="BlackHoleCluster"} 0\n'
            'envoy_tcp_downstream_cx_total{tcp_prefix="InboundPassthroughCluster"} 0\n'
            'envoy_tcp_downstream_cx_total{tcp_prefix="PassthroughCluster"} 0\n'
            'envoy_tcp_downstream_cx_total{tcp_prefix="inbound|8080||"} 0\n'
            f'envoy_tcp_downstream_cx_total{{tcp_prefix="{SVC}"}} 5') in blocks
    assert "# TYPE envoy_server_live gauge\nenvoy_server_live{} 1" in blocks
    kinds = [ln.split()[-1] for ln in text.splitlines() if ln.startswith("# TYPE")]
    assert kinds == sorted(kinds)           # all counters, then all gauges
    check_golden("prometheus.txt", text)


@pytest.mark.parametrize(("name", "extracted", "tags"), [
    (f"cluster.{SVC};.upstream_cx_total", "cluster.upstream_cx_total", [("cluster_name", SVC)]),
    ("cluster.xds-grpc.upstream_cx_total", "cluster.upstream_cx_total",
     [("cluster_name", "xds-grpc")]),
    ("cluster.inbound|8080||;.upstream_rq_503", "cluster.upstream_rq",
     [("cluster_name", "inbound|8080||"), ("response_code", "503")]),
    ("listener.0.0.0.0_15006.downstream_cx_active", "listener.downstream_cx_active",
     [("listener_address", "0.0.0.0_15006")]),
    ("listener.[__]_15006.downstream_cx_total", "listener.downstream_cx_total",
     [("listener_address", "[__]_15006")]),
    ("listener.admin.downstream_cx_total", "listener.admin.downstream_cx_total", []),
    (f"tcp.{SVC}.downstream_cx_total", "tcp.downstream_cx_total", [("tcp_prefix", SVC)]),
    ("server.live", "server.live", []),
])
def test_tag_extraction(name: str, extracted: str, tags: list[tuple[str, str]]) -> None:
    assert fmt.extract_tags(name) == (extracted, tags)


def test_prometheus_filter_and_sanitize() -> None:
    s = StatsSnapshot(counters={"a-b.c": 1, "a.c": 0}, gauges={})
    assert fmt.render_prometheus(s) == ("# TYPE envoy_a_c counter\nenvoy_a_c{} 0\n\n"
                                        "# TYPE envoy_a_b_c counter\nenvoy_a_b_c{} 1\n\n")
    assert fmt.render_prometheus(s, used_only=True) == (
        "# TYPE envoy_a_b_c counter\nenvoy_a_b_c{} 1\n\n")
    assert fmt.render_prometheus(s, pattern=re.compile("^a\\.")) == (
        "# TYPE envoy_a_c counter\nenvoy_a_c{} 0\n\n")


# ------------------------------------------------------------------------------ others


def test_server_info(snap: Snapshot) -> None:
    info = fmt.server_info_json(state="LIVE", uptime=12.7,
                                command_line={"concurrency": 2, "drain_time": "45s"},
                                snapshot=snap)
    text = fmt.proto_json(info)
    reprinted(text, server_info_pb2.ServerInfo(), always=True)
    data = json.loads(text)
    assert data["state"] == "LIVE"
    assert data["uptime_current_epoch"] == data["uptime_all_epochs"] == "12s"
    assert data["version"].split("/")[1:] == ["remora-0.1.0", "Clean", "RELEASE", "OpenSSL"]
    assert data["node"]["id"] == snap.node.id
    assert data["command_line_options"]["concurrency"] == 2
    assert data["command_line_options"]["mode"] == "Serve"
    check_golden("server_info.json", fmt.proto_json(
        fmt.server_info_json(state="DRAINING", uptime=3, command_line={}, snapshot=snap)))


def test_logging_texts() -> None:
    assert fmt.render_loggers({"admin": "info", "upstream": "debug"}) == (
        "active loggers:\n  admin: info\n  upstream: debug\n\n")
    assert fmt.logging_usage("unknown logger name") == (
        "error: unknown logger name\n\n"
        "usage: /logging?<name>=<level> (change single level)\n"
        "usage: /logging?paths=name1:level1,name2:level2,... (change multiple levels)\n"
        "usage: /logging?level=<level> (change all levels)\n"
        "levels: trace debug info warning error critical off \n")


def test_help() -> None:
    text = fmt.render_help()
    lines = text.splitlines()
    assert lines[0] == "admin commands are:"
    assert "  /quitquitquit (POST): exit the server" in lines
    assert "  /ready: print server state, return 200 if LIVE, otherwise return 503" in lines
    assert "      format: File format to use; One of (text, json)" in lines
    paths = [ln.split()[0].rstrip(":") for ln in lines[1:] if ln.startswith("  /")]
    assert paths == sorted(paths)
    assert "  /memory: print current allocation/heap usage" in lines
    assert "  /reopen_logs (POST): reopen access logs" in lines
    check_golden("help.txt", text)


def test_memory_json() -> None:
    """``envoy.admin.v3.Memory``: every field, in proto order, uint64 as strings."""
    text = fmt.proto_json(fmt.memory_json({"allocated": 5, "heap_size": 7,
                                           "total_physical_bytes": 9}))
    assert text == ('{\n "allocated": "5",\n "heap_size": "7",\n "pageheap_unmapped": "0",\n'
                    ' "pageheap_free": "0",\n "total_thread_cache": "0",\n'
                    ' "total_physical_bytes": "9"\n}\n')
    reprinted(text, memory_pb2.Memory(), always=True)


# ------------------------------------------------------------------------------ proto-JSON


def test_proto_json_layout() -> None:
    assert fmt.proto_json({}) == "{}\n"
    assert fmt.proto_json({"a": [], "b": {}, "c": [1, {"d": True}]}) == (
        '{\n "a": [],\n "b": {},\n "c": [\n  1,\n  {\n   "d": true\n  }\n ]\n}\n')


def test_proto_json_escapes_and_numbers() -> None:
    assert fmt.quote('a"b\\c\n<>&\u2028é\U0001d173\x7f') == (
        '"a\\"b\\\\c\\n\\u003c\\u003e&\\u2028é\\ud834\\udd73\\u007f"')
    assert [fmt.format_double(v) for v in (1.0, 0.1, -1.0, 1e21, 1 / 3)] == [
        "1", "0.1", "-1", "1e+21", "0.33333333333333331"]
    assert fmt.format_timestamp(0) == "1970-01-01T00:00:00Z"
    assert fmt.format_timestamp(1.5) == "1970-01-01T00:00:01.500Z"
    assert fmt.format_timestamp(1.000001) == "1970-01-01T00:00:01.000001Z"
