"""`remora trace` on native nftables: the rules `remora iptables --native-nftables` leaves in
the kernel, read back with ``nft -j list ruleset`` and translated by
:func:`~remora.capture.nftjson.ruleset_from_nft_json`, give the same verdicts as the iptables
model of the same flags (``ruleset_from_rules(build_rules(cfg))``), and the kernel agrees.

For each configuration a pod namespace (IPv4, or IPv6-only as in ``test_capture_traffic``) is
joined to a peer by a veth pair; the rules are applied with the real CLI inside the pod, which
reads its DNS servers from the test's own resolv.conf (bind-mounted in a private mount
namespace for that one command). A grid
of connections (inbound to the app, to excluded and tunnel ports; outbound as the app and as
the proxy to an off-link address, the peer, the pod itself, loopback, the DNS servers, over
TCP and UDP) is traced on both rule sets. Then a few of those connections are made for real
with the probe helpers, and where each arrived must match the nft trace.

Only connections of the pod's own IP version are compared: with IPv6 off, iptables mode has
no IPv6 rules at all while Istio's ``inet`` tables still see IPv6 packets.
"""

from __future__ import annotations

import contextlib
import ipaddress
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from remora import netns
from remora.capture.config import CaptureConfig, HostFacts, build_config, parse_flags
from remora.capture.host import parse_resolv_conf
from remora.capture.nftjson import ruleset_from_nft_json
from remora.capture.probe import ConnectResult, Endpoint, ListenSpec, ProbeServer, connect
from remora.capture.rules import build_rules
from remora.capture.trace import (
    Connection,
    Context,
    Ruleset,
    Verdict,
    local_context,
    ruleset_from_rules,
    trace,
    with_defaults,
)
from tests.conftest import require_root
from tests.netns.conftest import ADDRS, PREFIX, remora_bin

pytestmark = [pytest.mark.privileged, pytest.mark.timeout(300)]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

INJECTOR = ["-p", "15001", "-z", "15006", "-u", "1337", "-m", "REDIRECT", "-i", "*", "-x", "",
            "-b", "*", "-d", "15090,15021,15020"]
TPROXY = [*INJECTOR[:7], "TPROXY", *INJECTOR[8:]]
#: Everything at once on an IPv6 pod: CIDRs of both families, ports in and out, an excluded
#: interface, drop-invalid, a proxy gid.
EVERYTHING = ["-p", "15001", "-z", "15006", "-u", "1337", "-g", "1337", "-m", "TPROXY",
              "-i", "fd00:77::/64,fd00:99::/32,10.0.0.0/8", "-x", "fd00:99::1/128,10.1.0.0/16",
              "-b", "8080,9090", "-d", "15021", "-c", "eth9", "-o", "3306", "-q", "5432",
              "--drop-invalid", "--redirect-dns"]

CONFIGS: dict[str, tuple[int, list[str]]] = {
    "ipv4-injector-redirect": (4, INJECTOR),
    "ipv4-injector-tproxy": (4, TPROXY),
    "ipv4-dns-capture": (4, [*INJECTOR, "--redirect-dns"]),
    "ipv6-redirect-dns-all": (6, [*INJECTOR, "--redirect-dns", "--capture-all-dns"]),
    "ipv6-tproxy-dns": (6, [*TPROXY, "--redirect-dns"]),
    "ipv6-everything": (6, EVERYTHING),
}

PROXY_PORT, INBOUND_PORT, DNS_PORT = 15001, 15006, 15053
APP_PORT, PEER_PORT = 8080, 80
#: The pod's name servers (one per family) and one no rule names.
RESOLV_CONF = "nameserver 10.96.0.10\nnameserver fd00::a\n"
OTHER_DNS = {4: ipaddress.ip_address("10.96.0.53"), 6: ipaddress.ip_address("fd00::53")}


@dataclass
class Pod:
    pair: netns.NetnsPair
    version: int
    flags: list[str]
    cfg: CaptureConfig
    nft: Ruleset
    ipt: Ruleset
    ctx: Context
    dns: tuple[IPAddress, ...]

    @property
    def ns(self) -> netns.Netns:
        return self.pair.a.netns

    @property
    def ip(self) -> IPAddress:
        return self.pair.a.first(self.version)

    @property
    def peer_ip(self) -> IPAddress:
        return self.pair.b.first(self.version)


def _addresses(ns: netns.Netns) -> frozenset[IPAddress]:
    out = ns.run(["ip", "-o", "addr", "show"]).stdout
    return frozenset(ipaddress.ip_interface(line.split()[3]).ip for line in out.splitlines())


@pytest.fixture(scope="module", autouse=True)
def _needs_nft() -> None:
    require_root()
    if shutil.which("nft") is None:
        pytest.skip("nft not installed")


@contextlib.contextmanager
def pod_with_rules(version: int, flags: list[str]) -> Iterator[Pod]:
    """A pod + peer pair with ``remora iptables <flags> --native-nftables`` applied in the pod,
    and both rule sets: the nft one read back from the kernel, the iptables model."""
    a = ADDRS[version]
    with netns.netns_pair(prefix=PREFIX, a_role="npod", b_role="npeer",
                          a_addresses=[a["pod"]], b_addresses=[a["peer"]]) as pair:
        pod = pair.a.netns
        argv = [*flags, "--native-nftables"]
        # The CLI reads the DNS servers from a resolv.conf of ours, bind-mounted in a private
        # mount namespace of its own (nothing changes outside it).
        with tempfile.NamedTemporaryFile("w", suffix=".resolv.conf") as resolv:
            resolv.write(RESOLV_CONF)
            resolv.flush()
            proc = pod.run(["unshare", "--mount", "--propagation", "private", "sh", "-c",
                            'mount --bind "$0" /etc/resolv.conf && exec "$@"', resolv.name,
                            remora_bin(), "iptables", *argv], check=False, timeout=60)
        assert proc.returncode == 0, f"remora iptables {' '.join(argv)}: {proc.stderr}"
        nft = ruleset_from_nft_json(pod.run(["nft", "-j", "list", "ruleset"]).stdout)
        assert not nft.unknown, [(r.text, u) for r, u in nft.unknown]
        v4, v6 = parse_resolv_conf(RESOLV_CONF)
        redirect_dns, all_dns = "--redirect-dns" in flags, "--capture-all-dns" in flags
        facts = HostFacts(enable_ipv6=version == 6,
                          dns_servers_v4=v4 if redirect_dns and not all_dns else (),
                          dns_servers_v6=v6 if redirect_dns and not all_dns else ())
        cfg = build_config(parse_flags(argv, {}), {}, facts=facts)
        ipt = ruleset_from_rules(build_rules(cfg))
        servers = tuple(ipaddress.ip_address(s) for s in (*facts.dns_servers_v4,
                                                          *facts.dns_servers_v6))
        yield Pod(pair=pair, version=version, flags=flags, cfg=cfg, nft=nft, ipt=ipt,
                  ctx=local_context(_addresses(pod), ipt),
                  dns=tuple(s for s in (*servers, OTHER_DNS[version]) if s.version == version))


def grid(pod: Pod) -> list[Connection]:
    v = pod.version
    lo = ipaddress.ip_address("127.0.0.1" if v == 4 else "::1")
    passthrough = ipaddress.ip_address(ADDRS[v]["passthrough"])
    nowhere = ipaddress.ip_address(ADDRS[v]["nowhere"])
    conns = [Connection(direction="inbound", src=pod.peer_ip, dst=pod.ip, dport=port)
             for port in (APP_PORT, 9090, 15021, 15008, 15090, 3306)]
    targets = [(nowhere, 80), (nowhere, 5432), (nowhere, 3306), (pod.peer_ip, PEER_PORT),
               (pod.ip, APP_PORT), (pod.ip, 15008), (lo, APP_PORT),
               *((server, 53) for server in pod.dns)]
    for uid in (1000, 1337):
        for dst, port in targets:
            for proto in ("tcp", "udp"):
                conns.append(Connection(direction="outbound", proto=proto, src=pod.ip, dst=dst,
                                        dport=port, uid=uid, gid=uid))
    conns.append(Connection(direction="outbound", src=passthrough, dst=pod.ip, dport=APP_PORT,
                            uid=1337, gid=1337))
    return [with_defaults(c, pod.ctx, None) for c in conns]


def key(v: Verdict) -> tuple[object, ...]:
    return (v.captured, v.redirect_port, v.mode, v.dropped)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_nft_trace_matches_the_iptables_model(name: str) -> None:
    version, flags = CONFIGS[name]
    with pod_with_rules(version, flags) as pod:
        differences = []
        outcomes = set()
        for conn in grid(pod):
            want, got = trace(pod.ipt, conn, pod.ctx), trace(pod.nft, conn, pod.ctx)
            outcomes.add((got.captured, got.redirect_port, got.mode))
            if key(want) != key(got):
                differences.append(f"{conn}\n  iptables: {want.reason}\n  nft: {got.reason}")
        assert not differences, "\n".join(differences)
        # The grid exercises capture in both directions and exemptions.
        assert (True, PROXY_PORT, "REDIRECT") in outcomes
        assert any(o[1] == INBOUND_PORT for o in outcomes)
        assert (False, None, None) in outcomes
        if "--redirect-dns" in flags:
            assert (True, DNS_PORT, "REDIRECT") in outcomes


# ------------------------------------------------------------------------- real traffic


def observed(pod: Pod, conn: Connection, result: ConnectResult) -> tuple[bool, int | None]:
    """(captured, port) from where the probe connection arrived."""
    assert result.ok and result.reply is not None, f"{conn}: {result.error}"
    reply = result.reply
    if reply.server == "pod" and reply.listener_port in (PROXY_PORT, INBOUND_PORT):
        assert reply.original_dst == Endpoint(host=conn.dst, port=conn.dport), reply
        return True, reply.listener_port
    assert reply.listener_port == conn.dport, reply
    return False, None


@pytest.mark.parametrize(("version", "mode"), [(4, "REDIRECT"), (4, "TPROXY"),
                                               (6, "REDIRECT"), (6, "TPROXY")])
def test_nft_trace_agrees_with_the_kernel(version: int, mode: str) -> None:
    flags = INJECTOR if mode == "REDIRECT" else TPROXY
    with pod_with_rules(version, flags) as pod:
        pod_listeners = [
            ListenSpec.any(PROXY_PORT, version=version),
            ListenSpec.any(INBOUND_PORT, version=version, transparent=mode == "TPROXY"),
            ListenSpec.any(15021, version=version),
            ListenSpec(host=pod.ip, port=APP_PORT),
        ]
        with ProbeServer.start(pod.ns, pod_listeners, label="pod", lifetime=90) as server, \
                ProbeServer.start(pod.pair.b.netns,
                                  [ListenSpec.any(PEER_PORT, version=version)],
                                  label="peer", lifetime=90):
            plans = [
                Connection(direction="inbound", src=pod.peer_ip, dst=pod.ip, dport=APP_PORT),
                Connection(direction="inbound", src=pod.peer_ip, dst=pod.ip, dport=15021),
                *(Connection(direction="outbound", src=pod.ip, dst=dst, dport=port, uid=uid,
                             gid=uid)
                  for uid in (1000, 1337)
                  for dst, port in ((pod.peer_ip, PEER_PORT), (pod.ip, APP_PORT))),
            ]
            seen = set()
            for plan in plans:
                conn = with_defaults(plan, pod.ctx, None)
                verdict = trace(pod.nft, conn, pod.ctx)
                if conn.direction == "inbound":
                    result = connect(pod.pair.b.netns, Endpoint(host=conn.dst, port=conn.dport))
                else:
                    result = connect(pod.ns, Endpoint(host=conn.dst, port=conn.dport),
                                     uid=conn.uid, gid=conn.gid)
                got = observed(pod, conn, result)
                assert (verdict.captured, verdict.redirect_port) == got, (
                    f"{conn}: trace says {verdict.reason}; kernel: {got}")
                seen.add(got)
            assert server.poll()
            assert {(True, PROXY_PORT), (True, INBOUND_PORT), (False, None)} <= seen
