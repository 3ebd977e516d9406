"""The demo (`remora.demo`, `remora.demo_sidecar`) run for real: where each of its connections
arrives, then what the sidecar does with the same rules in front of it."""

from __future__ import annotations

import io

import pytest
from rich.console import Console

from remora import netns
from remora.demo import Mode, run_capture_demo, run_demo
from remora.demo_sidecar import metric_labels, run_sidecar_demo
from tests.conftest import require_root

pytestmark = [pytest.mark.privileged, pytest.mark.timeout(90)]


@pytest.mark.parametrize("mode", ["REDIRECT", "TPROXY"])
def test_demo_rows(mode: Mode) -> None:
    require_root()
    result = run_capture_demo(mode=mode)
    rows = {row.name: row for row in result.rows}
    pod, peer = result.pod_ip, result.peer_ip

    inbound = rows["inbound request to the app"]
    assert (inbound.arrived, inbound.original_dst) == ("pod:15006", f"{pod}:8080")
    assert inbound.verdict == "captured (inbound)"

    outbound = rows["app calls a service"]
    assert (outbound.arrived, outbound.original_dst) == ("pod:15001", f"{peer}:80")
    assert outbound.verdict == "captured (outbound)"

    proxy = rows["proxy calls the upstream"]
    assert (proxy.arrived, proxy.verdict) == ("peer:80", "direct")

    health = rows["health check (excluded port)"]
    assert (health.arrived, health.verdict) == ("pod:15021", "direct")

    passthrough = rows["proxy hands inbound to the app"]
    assert (passthrough.arrived, passthrough.verdict) == ("pod:8080", "direct")

    assert result.ok and len(result.rows) == 5
    assert "-A ISTIO_OUTPUT -j ISTIO_REDIRECT" in result.rules
    # nothing left behind
    assert not netns.netns_exists(result.pod) and not netns.netns_exists(result.peer)


@pytest.mark.parametrize("width", [200, 80])
def test_run_demo_prints_the_table_and_returns_0(width: int) -> None:
    require_root()
    buf = io.StringIO()
    code = run_demo(Console(file=buf, width=width, color_system=None))
    text = buf.getvalue()
    assert code == 0, text
    assert "Where each connection arrived" in text
    assert "captured (inbound)" in text and "captured (outbound)" in text
    assert "-A ISTIO_INBOUND -p tcp -j ISTIO_IN_REDIRECT" in text
    assert "10.77.0.1:8080" in text and "pod:15006" in text and "pod:15001" in text
    assert "All 5 connections went where Istio's rules send them." in text
    # the second part: the sidecar behind the same rules
    assert "Through the sidecar" in text and "istio_requests_total" in text
    assert "127.0.0.6:" in text and "outbound|8080||demoappv10.default.svc.cluster.local" in text
    assert "The sidecar routed all 3 requests as Istio's would" in text


def test_sidecar_demo_routes_by_host_and_hands_inbound_from_127_0_0_6() -> None:
    """Behind the capture rules, the real `remora proxy` (uid 1337) sends the app's calls to
    two services on the same port by their Host header, hands the peer's call to the app from
    127.0.0.6, logs each request in Istio's format and counts it in istio_requests_total."""
    require_root()
    result = run_sidecar_demo()
    calls = {c.name: c for c in result.calls}
    for svc in ("demoappv10", "demoappv11"):
        c = calls[f"app calls {svc}"]
        assert (c.status, c.answered_by) == (200, svc)
        assert c.seen_from.startswith(f"{result.pod_ip}:")   # the sidecar's own connection
        assert c.headers.get("x-forwarded-proto") == "http" and c.headers.get("x-request-id")
    inbound = calls["peer calls the app (inbound)"]
    assert (inbound.status, inbound.answered_by) == (200, "app")
    assert inbound.seen_from.startswith("127.0.0.6:")
    assert result.ok and len(result.calls) == 3

    assert len(result.access_log) == 3
    for cluster in ("outbound|8080||demoappv10.default.svc.cluster.local",
                    "outbound|8080||demoappv11.default.svc.cluster.local", "inbound|8080||"):
        assert sum(f" {cluster} " in line for line in result.access_log) == 1, cluster
    series = [metric_labels(line) for line in result.metrics]
    assert {(s["reporter"], s["destination_service"]) for s in series
            if s["reporter"] == "source"} == {
        ("source", "demoappv10.default.svc.cluster.local"),
        ("source", "demoappv11.default.svc.cluster.local")}
    assert [s["destination_workload"] for s in series if s["reporter"] == "destination"] \
        == ["app"]
    assert not netns.netns_exists(result.pod) and not netns.netns_exists(result.peer)
