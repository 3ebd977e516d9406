"""Network-namespace fixtures for real-traffic tests of the capture rules (root only).

A "pod" namespace is joined by a veth pair to a "peer" namespace. The IPv4 pair uses 10.x
addresses that exist only inside those namespaces; the IPv6 pair uses ULA (fd00::/8) addresses and
no IPv4 address except lo's 127.0.0.1, because istio-iptables enables IPv6 from the *first*
non-loopback, non-link-local address and netlink lists IPv4 addresses first (spec §2).

`CaptureEnv` applies the rules with the real CLI (``ip netns exec <pod> remora iptables …``) and
runs probe servers in both namespaces; tests connect with `remora.capture.probe.connect` and
wait on the servers' accept lines (never on sleeps). Everything is deleted on exit, even when a
test fails.
"""

from __future__ import annotations

import contextlib
import ipaddress
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import pytest

from remora import netns
from remora.capture.probe import (
    Accept,
    ConnectResult,
    Endpoint,
    ListenSpec,
    ProbeServer,
    connect,
)
from tests.conftest import require_root

PREFIX = "rmr-t"

Mode = Literal["REDIRECT", "TPROXY"]

#: The typical injected init container (spec §9.1a), with the interception mode left out.
BASE_FLAGS = ("-p", "15001", "-z", "15006", "-u", "1337", "-i", "*", "-x", "",
              "-b", "*", "-d", "15090,15021,15020")  # fmt: skip

PROXY_PORT = 15001
INBOUND_PORT = 15006
TUNNEL_PORT = 15008
EXCLUDED_INBOUND = (15090, 15021, 15020)
APP_PORT = 8080
PEER_PORT = 80

ADDRS = {
    4: {"pod": "10.77.0.1/24", "peer": "10.77.0.2/24", "nowhere": "10.99.0.1",
        "passthrough": "127.0.0.6"},
    6: {"pod": "fd00:77::1/64", "peer": "fd00:77::2/64", "nowhere": "fd00:99::1",
        "passthrough": "::6"},
}  # fmt: skip


def remora_bin() -> str:
    """The `remora` console script next to the running interpreter (the venv's)."""
    return str(Path(sys.executable).with_name("remora"))


def flags(mode: Mode) -> list[str]:
    return [*BASE_FLAGS[:6], "-m", mode, *BASE_FLAGS[6:]]


def remora_iptables(pod: netns.Netns, *args: str) -> subprocess.CompletedProcess[str]:
    """``ip netns exec <pod> remora iptables <args>``; fails the test on a non-zero exit."""
    proc = pod.run([remora_bin(), "iptables", *args], check=False, timeout=60)
    assert proc.returncode == 0, f"remora iptables {' '.join(args)}: {proc.stderr}"
    return proc


@pytest.fixture(scope="session", autouse=True)
def _no_stale_namespaces() -> None:
    """Remove namespaces left by an earlier run that was killed before its cleanup."""
    netns.remove_stale(PREFIX)


@dataclass
class CaptureEnv:
    """A pod with capture rules applied, probe servers in the pod and in the peer."""

    pair: netns.NetnsPair
    version: int
    mode: Mode
    pod_server: ProbeServer
    peer_server: ProbeServer
    applied: bool = True

    @property
    def pod(self) -> netns.Netns:
        return self.pair.a.netns

    @property
    def peer(self) -> netns.Netns:
        return self.pair.b.netns

    @property
    def pod_ip(self) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
        return self.pair.a.first(self.version)

    @property
    def peer_ip(self) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
        return self.pair.b.first(self.version)

    @property
    def nowhere(self) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
        """An address off the link with no listener anywhere (routed to the peer, dropped)."""
        return ipaddress.ip_address(ADDRS[self.version]["nowhere"])

    @property
    def passthrough_src(self) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
        """Envoy's inbound passthrough source, 127.0.0.6 / ::6."""
        return ipaddress.ip_address(ADDRS[self.version]["passthrough"])

    def ep(self, host: object, port: int) -> Endpoint:
        return Endpoint(host=ipaddress.ip_address(str(host)), port=port)

    def flags(self) -> list[str]:
        return flags(self.mode)

    def from_peer(self, port: int, *, timeout: float = 3.0) -> ConnectResult:
        return connect(self.peer, self.ep(self.pod_ip, port), timeout=timeout)

    def from_pod(
        self,
        host: object,
        port: int,
        *,
        uid: int,
        gid: int,
        source: object | None = None,
        timeout: float = 3.0,
    ) -> ConnectResult:
        src = None if source is None else ipaddress.ip_address(str(source))
        return connect(self.pod, self.ep(host, port), uid=uid, gid=gid, source=src, timeout=timeout)

    def arrival(self, result: ConnectResult) -> Accept:
        """The accept line, at whichever server took it, for a connection that succeeded.

        Checks that the server's own report (read from its stdout) agrees with the line the
        client received.
        """
        assert result.ok, f"connection to {result.target} failed: {result.error}"
        assert result.reply is not None, f"no probe reply for {result.target}"
        assert result.source is not None
        server = {"pod": self.pod_server, "peer": self.peer_server}[result.reply.server]
        seen = server.accept_from(result.source)
        assert seen == result.reply
        return seen


def _servers(pair: netns.NetnsPair, version: int, mode: Mode) -> tuple[ProbeServer, ProbeServer]:
    pod_ip = pair.a.first(version)
    pod_listeners = [
        ListenSpec.any(PROXY_PORT, version=version),
        ListenSpec.any(INBOUND_PORT, version=version, transparent=mode == "TPROXY"),
        *(ListenSpec.any(p, version=version) for p in (*EXCLUDED_INBOUND, TUNNEL_PORT)),
        ListenSpec(host=pod_ip, port=APP_PORT),  # the app, on the pod IP only
    ]
    pod_server = ProbeServer.start(pair.a.netns, pod_listeners, label="pod", lifetime=90)
    try:
        peer_server = ProbeServer.start(
            pair.b.netns, [ListenSpec.any(PEER_PORT, version=version)], label="peer", lifetime=90
        )
    except BaseException:
        pod_server.stop()
        raise
    return pod_server, peer_server


@contextlib.contextmanager
def capture_env(version: int, mode: Mode, *, apply: bool = True) -> Iterator[CaptureEnv]:
    """Pod + peer of that IP version; rules applied with the CLI (unless ``apply`` is false);
    probe servers running. Servers are stopped and namespaces deleted on exit."""
    require_root()
    a = ADDRS[version]
    with netns.netns_pair(prefix=PREFIX, a_addresses=[a["pod"]], b_addresses=[a["peer"]]) as pair:
        if version == 6:
            v4 = pair.a.netns.run(["ip", "-4", "-o", "addr", "show"]).stdout
            assert [line.split()[1] for line in v4.splitlines()] == ["lo"], v4
        if apply:
            remora_iptables(pair.a.netns, *flags(mode))
        pod_server, peer_server = _servers(pair, version, mode)
        with pod_server, peer_server:
            yield CaptureEnv(
                pair=pair,
                version=version,
                mode=mode,
                pod_server=pod_server,
                peer_server=peer_server,
                applied=apply,
            )


CASES = [(4, "REDIRECT"), (4, "TPROXY"), (6, "REDIRECT"), (6, "TPROXY")]


@pytest.fixture(params=CASES, ids=[f"ipv{v}-{m}" for v, m in CASES])
def env(request: pytest.FixtureRequest) -> Iterator[CaptureEnv]:
    """`capture_env` for each IP version and interception mode."""
    version, mode = request.param
    with capture_env(version, mode) as e:
        yield e
