"""Cluster runtime without sockets: membership, DNS with a fake resolver, ORIGINAL_DST hosts,
the circuit breaker, stats names."""

from __future__ import annotations

import asyncio
import random
import socket

import pytest

from remora.proxy.model import Cluster, LbEndpoint, SlowStart, SocketAddress, Thresholds
from remora.proxy.stats import Stats
from remora.proxy.upstream import UpstreamCluster, UpstreamError, select_family


def addr(a: str, p: int = 80) -> SocketAddress:
    return SocketAddress(address=a, port=p)


def test_static_cluster_hosts_and_membership_stats() -> None:
    stats = Stats()
    c = UpstreamCluster(Cluster(name="c", alt_stat_name="c;", endpoints=(
        LbEndpoint(address=addr("10.0.0.1")),
        LbEndpoint(address=addr("10.0.0.2"), health_status="UNHEALTHY"))), stats,
        random.Random(0))
    assert [h.address for h in c.hosts] == [addr("10.0.0.1"), addr("10.0.0.2")]
    assert stats.gauges["cluster.c;.membership_total"] == 2
    assert stats.gauges["cluster.c;.membership_healthy"] == 1
    assert stats.counters["cluster.c;.upstream_cx_total"] == 0
    assert c.status().hosts[1].health_flags == ("/failed_eds_health",)
    picks = {c.pick(None).address for _ in range(5)}  # type: ignore[union-attr]
    assert picks == {addr("10.0.0.1")}


def test_a_cluster_passes_its_lb_settings_to_its_balancer() -> None:
    """priorities, the panic threshold, slow start (its hosts just joined: inside the
    window) and LEAST_REQUEST's knobs reach the cluster's balancer."""
    c = UpstreamCluster(Cluster(
        name="c", lb_policy="LEAST_REQUEST", healthy_panic_threshold=0.0,
        slow_start=SlowStart(window=600.0), choice_count=3, active_request_bias=0.5,
        endpoints=(LbEndpoint(address=addr("10.0.0.1"), health_status="UNHEALTHY"),
                   LbEndpoint(address=addr("10.0.0.2"), priority=1))),
        Stats(), random.Random(0))
    assert c.lb.loads == [0, 100] and c.lb.panic_threshold == 0.0
    level = c.lb.levels[1]
    assert (level.slow_start, level.choice_count, level.bias) == (  # type: ignore[attr-defined]
        SlowStart(window=600.0), 3, 0.5)
    assert level._edf is not None              # type: ignore[attr-defined]
    assert {c.pick(None).address for _ in range(5)} == {addr("10.0.0.2")}  # type: ignore[union-attr]


def test_degraded_endpoints() -> None:
    """EDS DEGRADED: Envoy's ``/degraded_eds_health`` flag, counted apart from the healthy
    ones, and picked only for what the healthy hosts cannot take."""
    stats = Stats()
    c = UpstreamCluster(Cluster(name="c", endpoints=(
        LbEndpoint(address=addr("10.0.0.1")),
        LbEndpoint(address=addr("10.0.0.2"), health_status="DEGRADED"))), stats,
        random.Random(0))
    assert [h.health_flags for h in c.status().hosts] == [(), ("/degraded_eds_health",)]
    assert stats.gauges["cluster.c.membership_healthy"] == 1
    assert stats.gauges["cluster.c.membership_degraded"] == 1
    # one healthy host of two: 70 % of the traffic; the degraded one takes the rest
    picks = [c.pick(None).address for _ in range(2000)]  # type: ignore[union-attr]
    assert 0.25 < picks.count(addr("10.0.0.2")) / 2000 < 0.35


def test_picks_in_panic_are_counted() -> None:
    """Envoy's ``lb_healthy_panic``: hosts chosen from a level in panic (here 1 of 3 healthy,
    under the 50 % threshold: every host is used)."""
    stats = Stats()
    eps = (LbEndpoint(address=addr("10.0.0.1")),
           LbEndpoint(address=addr("10.0.0.2"), health_status="UNHEALTHY"),
           LbEndpoint(address=addr("10.0.0.3"), health_status="UNHEALTHY"))
    c = UpstreamCluster(Cluster(name="c", endpoints=eps), stats, random.Random(0))
    assert {c.pick(None).address for _ in range(6)} == {  # type: ignore[union-attr]
        addr("10.0.0.1"), addr("10.0.0.2"), addr("10.0.0.3")}
    assert stats.counters["cluster.c.lb_healthy_panic"] == 6
    calm = UpstreamCluster(Cluster(name="d", endpoints=eps[:1]), stats, random.Random(0))
    calm.pick(None)
    assert stats.counters["cluster.d.lb_healthy_panic"] == 0


def test_empty_cluster_has_no_host() -> None:
    c = UpstreamCluster(Cluster(name="BlackHoleCluster"), Stats(), random.Random(0))
    assert c.pick(addr("1.2.3.4")) is None


def test_original_dst_hosts_on_demand_and_cleanup() -> None:
    stats = Stats()
    c = UpstreamCluster(Cluster(name="PassthroughCluster", type="ORIGINAL_DST",
                                lb_policy="CLUSTER_PROVIDED"), stats, random.Random(0))
    assert c.pick(None) is None          # not restored: no host (UH)
    h1 = c.pick(addr("10.9.9.9", 443))
    assert h1 is not None and h1.address == addr("10.9.9.9", 443)
    assert c.pick(addr("10.9.9.9", 443)) is h1
    c.pick(addr("10.9.9.8", 80))
    assert stats.gauges["cluster.PassthroughCluster.membership_total"] == 2
    c.sweep()                            # both used since the last sweep: kept
    assert len(c.hosts) == 2
    c.pick(addr("10.9.9.8", 80))
    h1.stats["cx_active"] = 1            # in use: kept although not picked again
    c.sweep()
    assert {h.address for h in c.hosts} == {addr("10.9.9.9", 443), addr("10.9.9.8", 80)}
    h1.stats["cx_active"] = 0
    c.sweep()
    c.sweep()
    assert c.hosts == []
    assert stats.gauges["cluster.PassthroughCluster.membership_total"] == 0


@pytest.mark.parametrize(("policy", "want"), [
    ("AUTO", ["::1"]), ("V4_ONLY", ["127.0.0.1"]), ("V6_ONLY", ["::1"]),
    ("V4_PREFERRED", ["127.0.0.1"]), ("ALL", ["127.0.0.1", "::1"])])
def test_select_family(policy: str, want: list[str]) -> None:
    found = [(socket.AF_INET6, "::1"), (socket.AF_INET, "127.0.0.1")]
    assert select_family(policy, found) == want


def test_select_family_falls_back() -> None:
    assert select_family("AUTO", [(socket.AF_INET, "10.0.0.1")]) == ["10.0.0.1"]
    assert select_family("V4_PREFERRED", [(socket.AF_INET6, "fd00::1")]) == ["fd00::1"]


def _dns_cluster(kind: str) -> Cluster:
    return Cluster(name="dns", type=kind,  # type: ignore[arg-type]
                   dns_lookup_family="V4_ONLY", dns_refresh_rate=0.01,
                   endpoints=(LbEndpoint(address=addr("svc.example", 9000)),
                              LbEndpoint(address=addr("10.0.0.9", 9001))))


def test_strict_dns_resolves_every_address_and_refreshes() -> None:
    answers = [["10.1.0.1", "10.1.0.2"], ["10.1.0.2", "10.1.0.3"]]
    calls: list[tuple[str, int, int]] = []

    def resolver(name: str, port: int, family: int) -> list[tuple[int, str]]:
        calls.append((name, port, family))
        ips = answers[min(len(calls) - 1, 1)]
        return [(socket.AF_INET, ip) for ip in ips]

    async def main() -> list[list[SocketAddress]]:
        c = UpstreamCluster(_dns_cluster("STRICT_DNS"), Stats(), random.Random(0),
                            resolver=resolver)
        await c.resolve_once()
        first = [h.address for h in c.hosts]
        kept = c.hosts[1]
        await c.resolve_once()
        second = [h.address for h in c.hosts]
        assert c.hosts[0] is kept      # a host that stays keeps its object (and stats)
        return [first, second]

    first, second = asyncio.run(main())
    assert first == [addr("10.1.0.1", 9000), addr("10.1.0.2", 9000), addr("10.0.0.9", 9001)]
    assert second == [addr("10.1.0.2", 9000), addr("10.1.0.3", 9000), addr("10.0.0.9", 9001)]
    assert calls[0] == ("svc.example", 9000, socket.AF_INET)


def test_logical_dns_uses_the_first_address_of_the_first_endpoint() -> None:
    def resolver(name: str, port: int, family: int) -> list[tuple[int, str]]:
        return [(socket.AF_INET, "10.2.0.1"), (socket.AF_INET, "10.2.0.2")]

    async def main() -> list[SocketAddress]:
        c = UpstreamCluster(_dns_cluster("LOGICAL_DNS"), Stats(), random.Random(0),
                            resolver=resolver)
        await c.resolve_once()
        return [h.address for h in c.hosts]

    assert asyncio.run(main()) == [addr("10.2.0.1", 9000)]


def test_dns_failure_keeps_the_old_hosts() -> None:
    fail = False

    def resolver(name: str, port: int, family: int) -> list[tuple[int, str]]:
        if fail:
            raise socket.gaierror(-2, "Name or service not known")
        return [(socket.AF_INET, "10.3.0.1")]

    async def main() -> list[SocketAddress]:
        nonlocal fail
        c = UpstreamCluster(_dns_cluster("STRICT_DNS"), Stats(), random.Random(0),
                            resolver=resolver)
        await c.resolve_once()
        fail = True
        await c.resolve_once()
        return [h.address for h in c.hosts]

    assert asyncio.run(main()) == [addr("10.3.0.1", 9000), addr("10.0.0.9", 9001)]


def test_circuit_breaker_overflow_before_connecting() -> None:
    stats = Stats()
    c = UpstreamCluster(Cluster(name="c", endpoints=(LbEndpoint(address=addr("127.0.0.1", 9)),),
                                default_thresholds=Thresholds(max_connections=0)),
                        stats, random.Random(0))

    async def main() -> str:
        host = c.pick(None)
        assert host is not None
        try:
            await c.connect(host, asyncio.Protocol)
        except UpstreamError as exc:
            return exc.flag
        return "connected"

    assert asyncio.run(main()) == "UO"
    assert stats.counters["cluster.c.upstream_cx_overflow"] == 1
    assert stats.counters["cluster.c.upstream_cx_total"] == 0


def test_bind_source_by_family() -> None:
    c = UpstreamCluster(Cluster(name="inbound|8080||", type="ORIGINAL_DST",
                                lb_policy="CLUSTER_PROVIDED",
                                upstream_bind_source=addr("127.0.0.6", 0),
                                extra_bind_sources=(addr("::6", 0),)), Stats(),
                        random.Random(0))
    h4 = c.pick(addr("10.0.0.2", 8080))
    h6 = c.pick(addr("fd00::2", 8080))
    assert h4 is not None and h6 is not None
    assert c.source_for(h4) == addr("127.0.0.6", 0)
    assert c.source_for(h6) == addr("::6", 0)
