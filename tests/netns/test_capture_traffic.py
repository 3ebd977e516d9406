"""Real connections through the rules `remora iptables` installs for the injector's default flags
(``-p 15001 -z 15006 -u 1337 -m REDIRECT|TPROXY -i '*' -x "" -b '*' -d 15090,15021,15020``),
in an IPv4 and an IPv6-only pod namespace, proving where each connection lands.

Every test asserts on what a probe server actually accepted (listener port, peer, original
destination), so each fails if the rules send traffic elsewhere.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from remora.capture.probe import Endpoint
from tests.netns.conftest import (
    APP_PORT,
    EXCLUDED_INBOUND,
    INBOUND_PORT,
    PEER_PORT,
    PROXY_PORT,
    TUNNEL_PORT,
    CaptureEnv,
    capture_env,
    remora_iptables,
)

pytestmark = [pytest.mark.privileged, pytest.mark.timeout(60)]

GOLDEN = Path(__file__).with_name("golden")


# 1. inbound --------------------------------------------------------------------------------


def test_inbound_to_app_port_arrives_at_inbound_listener(env: CaptureEnv) -> None:
    result = env.from_peer(APP_PORT)
    got = env.arrival(result)
    assert (got.server, got.listener_port) == ("pod", INBOUND_PORT)
    assert got.original_dst == env.ep(env.pod_ip, APP_PORT)
    assert got.peer == Endpoint(host=env.peer_ip, port=got.peer.port)
    if env.mode == "TPROXY":
        # not NATed: the accepted socket itself carries the original destination
        assert got.local == env.ep(env.pod_ip, APP_PORT)
        assert got.original_dst_source == "getsockname"
    else:
        assert got.local.port == INBOUND_PORT
        assert got.original_dst_source == "SO_ORIGINAL_DST"


def test_inbound_to_another_port_is_captured_too(env: CaptureEnv) -> None:
    # -b '*': every port not excluded, even one nothing listens on, goes to 15006
    got = env.arrival(env.from_peer(9999))
    assert (got.listener_port, got.original_dst) == (INBOUND_PORT, env.ep(env.pod_ip, 9999))


# 2. excluded inbound ports -----------------------------------------------------------------


@pytest.mark.parametrize("port", [*EXCLUDED_INBOUND, TUNNEL_PORT])
def test_excluded_inbound_ports_reach_their_own_listener(env: CaptureEnv, port: int) -> None:
    got = env.arrival(env.from_peer(port))
    if env.mode == "TPROXY" and port == TUNNEL_PORT:
        # Spec §6.2: the tunnel-port RETURN (step 4) exists only in nat ISTIO_INBOUND, which
        # TPROXY mode never jumps to; mangle ISTIO_INBOUND returns only the -d ports (step 7).
        # So with these flags Istio TPROXYs 15008 to the inbound listener.
        assert got.listener_port == INBOUND_PORT
        assert got.original_dst == env.ep(env.pod_ip, TUNNEL_PORT)
        return
    assert got.listener_port == port
    assert got.local == env.ep(env.pod_ip, port)


# 3. outbound from the app ------------------------------------------------------------------


def test_app_outbound_to_off_link_address_arrives_at_outbound_listener(env: CaptureEnv) -> None:
    result = env.from_pod(env.nowhere, PEER_PORT, uid=1000, gid=1000)
    got = env.arrival(result)
    assert (got.server, got.listener_port) == ("pod", PROXY_PORT)
    assert got.original_dst == env.ep(env.nowhere, PEER_PORT)
    assert got.original_dst_source == "SO_ORIGINAL_DST"


def test_app_outbound_to_peer_arrives_at_outbound_listener(env: CaptureEnv) -> None:
    result = env.from_pod(env.peer_ip, PEER_PORT, uid=1000, gid=1000)
    got = env.arrival(result)
    assert (got.server, got.listener_port) == ("pod", PROXY_PORT)
    assert got.original_dst == env.ep(env.peer_ip, PEER_PORT)
    assert result.source is not None
    assert all(a.peer != result.source for a in env.peer_server.poll())


# 4. the proxy's own traffic goes direct ----------------------------------------------------


@pytest.mark.parametrize(("uid", "gid"), [(1337, 1000), (1000, 1337), (1337, 1337)])
def test_proxy_uid_or_gid_outbound_goes_direct(env: CaptureEnv, uid: int, gid: int) -> None:
    result = env.from_pod(env.peer_ip, PEER_PORT, uid=uid, gid=gid)
    assert (result.uid, result.gid) == (uid, gid)
    got = env.arrival(result)
    assert (got.server, got.listener_port) == ("peer", PEER_PORT)
    assert got.local == env.ep(env.peer_ip, PEER_PORT)
    assert got.peer == Endpoint(host=env.pod_ip, port=got.peer.port)


@pytest.mark.parametrize(("uid", "gid"), [(1337, 1000), (1000, 1337)])
def test_proxy_uid_or_gid_to_nowhere_is_not_captured(env: CaptureEnv, uid: int, gid: int) -> None:
    # Off-link, no listener anywhere: direct means the connection fails (the peer does not
    # forward); captured would mean the 15001 listener accepts it.
    result = env.from_pod(env.nowhere, PEER_PORT, uid=uid, gid=gid, timeout=0.5)
    assert not result.ok, f"unexpectedly connected: {result.reply}"
    assert result.reply is None
    assert result.source is not None
    assert all(a.peer != result.source for a in env.pod_server.poll())


# 5. passthrough source vs the proxy calling its own pod IP ---------------------------------


def test_proxy_from_passthrough_source_reaches_app_directly(env: CaptureEnv) -> None:
    result = env.from_pod(env.pod_ip, APP_PORT, uid=1337, gid=1337, source=env.passthrough_src)
    got = env.arrival(result)
    assert (got.server, got.listener_port) == ("pod", APP_PORT)
    assert got.peer.host == env.passthrough_src
    assert got.local == env.ep(env.pod_ip, APP_PORT)


def test_proxy_to_own_pod_ip_from_pod_ip_goes_to_inbound_listener(env: CaptureEnv) -> None:
    result = env.from_pod(env.pod_ip, APP_PORT, uid=1337, gid=1337)
    got = env.arrival(result)
    assert got.peer.host == env.pod_ip
    assert (got.server, got.listener_port) == ("pod", INBOUND_PORT)
    # REDIRECTed in nat OUTPUT in both modes, so the original destination is the NAT one
    assert got.original_dst == env.ep(env.pod_ip, APP_PORT)
    assert got.original_dst_source == "SO_ORIGINAL_DST"


def test_app_to_own_pod_ip_is_not_captured(env: CaptureEnv) -> None:
    got = env.arrival(env.from_pod(env.pod_ip, APP_PORT, uid=1000, gid=1000))
    assert (got.server, got.listener_port) == ("pod", APP_PORT)


# 6. the rules as the kernel lists them -----------------------------------------------------


def listing(env: CaptureEnv) -> str:
    """``-S`` of nat and mangle, for iptables and ip6tables, each under a ``# command`` line."""
    parts: list[str] = []
    for binary in ("iptables", "ip6tables"):
        for table in ("mangle", "nat"):
            out = env.pod.run([binary, "-t", table, "-S"]).stdout
            parts.append(f"# {binary} -t {table} -S\n{out}")
    return "".join(parts)


def test_kernel_listing_matches_golden(env: CaptureEnv) -> None:
    golden = GOLDEN / f"{env.mode.lower()}-ipv{env.version}.txt"
    assert listing(env) == golden.read_text()


# cleanup -----------------------------------------------------------------------------------


def test_cleanup_only_removes_chains_and_stops_capture(env: CaptureEnv) -> None:
    # captured before the cleanup…
    assert env.arrival(env.from_peer(APP_PORT)).listener_port == INBOUND_PORT
    assert env.arrival(env.from_pod(env.peer_ip, PEER_PORT, uid=1000, gid=1000)).server == "pod"
    remora_iptables(env.pod, "--cleanup-only", *env.flags())
    for binary in ("iptables-save", "ip6tables-save"):
        assert "ISTIO" not in env.pod.run([binary]).stdout
    # …and not after it: inbound reaches the app itself
    got = env.arrival(env.from_peer(APP_PORT))
    assert (got.server, got.listener_port) == ("pod", APP_PORT)
    # the app's outbound reaches the peer
    got = env.arrival(env.from_pod(env.peer_ip, PEER_PORT, uid=1000, gid=1000))
    assert (got.server, got.listener_port) == ("peer", PEER_PORT)
    # the proxy calling its own pod IP reaches the app
    got = env.arrival(env.from_pod(env.pod_ip, APP_PORT, uid=1337, gid=1337))
    assert (got.server, got.listener_port) == ("pod", APP_PORT)


# control: without rules nothing is captured (so the tests above can tell the difference) ------


@pytest.mark.parametrize("version", [4, 6])
def test_without_rules_nothing_is_captured(version: int) -> None:
    with capture_env(version, "REDIRECT", apply=False) as bare:
        got = bare.arrival(bare.from_peer(APP_PORT))
        assert got.listener_port == APP_PORT
        got = bare.arrival(bare.from_pod(bare.peer_ip, PEER_PORT, uid=1000, gid=1000))
        assert (got.server, got.listener_port) == ("peer", PEER_PORT)
        result = bare.from_pod(bare.nowhere, PEER_PORT, uid=1000, gid=1000, timeout=0.5)
        assert not result.ok
