"""The capture demo (`remora.demo`) run for real: where each of its connections arrives."""

from __future__ import annotations

import io

import pytest
from rich.console import Console

from remora import netns
from remora.demo import Mode, run_capture_demo, run_demo
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
