"""ProxyControl helpers: logger names and levels, worker merges, flags text, command line."""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Iterator

import pytest

from remora.proxy import control as ctl
from remora.proxy.app import ProxyOptions, command_line_options
from remora.proxy.model import Cluster, SocketAddress, TcpProxy, WeightedCluster
from remora.proxy.state import ClusterStatus, HostStatus
from remora.proxy.stats import Stats, StatsSnapshot
from remora.proxy.tcp import TcpProxyFilter, format_flags
from remora.proxy.upstream import UpstreamCluster
from remora.proxy.workers import host_from_json, host_to_json


@pytest.fixture(autouse=True)
def _restore_levels() -> Iterator[None]:
    names = [ctl.ROOT_LOGGER, *ctl.ENVOY_LOGGERS.values()]
    before = {n: logging.getLogger(n).level for n in names}
    yield
    for n, level in before.items():
        logging.getLogger(n).setLevel(level)


def test_level_names_round_trip() -> None:
    for name, value in ctl.LEVELS.items():
        assert ctl.level_name(value) == name
    assert ctl.level_name(logging.INFO + 5) == "info"
    with pytest.raises(ValueError):
        ctl.parse_level("loud")


def test_set_log_level_one_and_all() -> None:
    ctl.set_log_level("upstream", "debug")
    assert ctl.loggers()["upstream"] == "debug"
    assert logging.getLogger("remora.proxy.upstream").level == logging.DEBUG
    ctl.set_log_level(None, "warning")
    assert set(ctl.loggers().values()) == {"warning"}
    with pytest.raises(KeyError):
        ctl.set_log_level("no_such_logger", "info")
    with pytest.raises(ValueError):
        ctl.set_log_level("main", "chatty")


def test_envoy_logger_names_include_the_usual_ones() -> None:
    assert {"admin", "conn_handler", "connection", "filter", "main", "upstream", "pool",
            "config"} <= set(ctl.loggers())


def test_merge_workers_sums_but_not_membership() -> None:
    a = StatsSnapshot(counters={"cluster.c.upstream_cx_total": 2},
                      gauges={"cluster.c.membership_total": 3, "cluster.c.upstream_cx_active": 1})
    b = StatsSnapshot(counters={"cluster.c.upstream_cx_total": 5},
                      gauges={"cluster.c.membership_total": 3, "cluster.c.upstream_cx_active": 2})
    m = ctl.merge_workers([a, b])
    assert m.counters["cluster.c.upstream_cx_total"] == 7
    assert m.gauges["cluster.c.upstream_cx_active"] == 3
    assert m.gauges["cluster.c.membership_total"] == 3


def test_merge_cluster_status_sums_host_stats_per_address() -> None:
    def host(a: str, total: int) -> HostStatus:
        h = HostStatus(address=SocketAddress(address=a, port=80))
        h.stats["cx_total"] = total
        return h

    w0 = [ClusterStatus(name="c", hosts=[host("10.0.0.1", 1), host("10.0.0.2", 2)])]
    w1 = [ClusterStatus(name="c", hosts=[host("10.0.0.2", 3), host("10.0.0.3", 4)])]
    merged = ctl.merge_cluster_status([w0, w1])
    assert [(h.address.address, h.stats["cx_total"]) for h in merged[0].hosts] == [
        ("10.0.0.1", 1), ("10.0.0.2", 5), ("10.0.0.3", 4)]
    assert w0[0].hosts[1].stats["cx_total"] == 2   # inputs untouched


def test_server_stats_and_total_connections() -> None:
    snap = StatsSnapshot(gauges={"listener.0.0.0.0_15001.downstream_cx_active": 2,
                                 "listener.0.0.0.0_15006.downstream_cx_active": 1,
                                 "cluster.x.upstream_cx_active": 9})
    assert ctl.total_connections(snap) == 3
    s = ctl.server_stats("DRAINING", 12.7, 2, 3)
    assert s == {"server.live": 0, "server.state": 1, "server.uptime": 12,
                 "server.concurrency": 2, "server.total_connections": 3}


def test_format_flags_in_envoy_order() -> None:
    assert format_flags(set()) == "-"
    assert format_flags({"URX", "UF"}) == "UF,URX"
    assert format_flags({"NR"}) == "NR"


def test_weighted_clusters_follow_weights() -> None:
    stats = Stats()
    rng = random.Random(3)
    clusters = {n: UpstreamCluster(Cluster(name=n), stats, rng) for n in ("a", "b")}
    flt = TcpProxyFilter(TcpProxy(stat_prefix="w", weighted_clusters=(
        WeightedCluster(name="a", weight=1), WeightedCluster(name="b", weight=3))),
        clusters, stats, rng)
    picks = [flt.choose_cluster().name for _ in range(4000)]  # type: ignore[union-attr]
    assert 850 < picks.count("a") < 1150
    assert "tcp.w.downstream_cx_total" in stats.counters


def test_command_line_options_use_envoy_names() -> None:
    got = command_line_options(ProxyOptions(config_path="/etc/b.yaml", concurrency=2,
                                            drain_time_s=45))
    assert got["config_path"] == "/etc/b.yaml"
    assert got["concurrency"] == 2
    assert got["drain_time"] == "45s"
    assert got["base_id"] == "0"


def test_host_status_crosses_the_worker_pipe_whole() -> None:
    """Every HostStatus field survives the JSON the workers send the admin process."""
    h = HostStatus(address=SocketAddress(address="10.0.0.1", port=80),
                   stats={"rq_total": 3}, health_flags=("/failed_outlier_check",), weight=2,
                   region="r", zone="z", sub_zone="s", priority=1, hostname="h",
                   locality_weight=7)
    assert host_from_json(json.loads(json.dumps(host_to_json(h)))) == h
