"""`remora trace` agrees with the kernel: a seeded random walk over `remora iptables` flag sets
and connections, each connection made for real and also traced on the rules read back from the
kernel (``iptables-save`` / ``ip6tables-save``).

For each IP version (an IPv4 pod, and an IPv6-only pod as in ``test_capture_traffic``), one pod
and one peer namespace are reused across flag sets: each flag set is applied with the real CLI
in the pod, the rules are read back, random connections are made (outbound from the pod as
various uids/gids to the peer, the pod's own IP, loopback and off-link addresses routed to the
peer; inbound from the peer to the pod IP), then the same flags clean up with
``--cleanup-only``.

Where a connection arrived is observable everywhere:

* the pod runs one probe server listening on every port of `POOL` (wildcard address) and on
  the capture ports 15001, 15006 (transparent, for TPROXY) and 15053;
* the peer sends *all* inbound TCP (to its own address or to any off-link address the pod
  routes to it) to one probe listener with a nat PREROUTING REDIRECT of its own, and reports
  the original destination (SO_ORIGINAL_DST).

So "captured to port P" means a pod listener on P took it with the connection's destination as
original destination (by REDIRECT when the accepted socket is on P itself, by TPROXY when it
keeps another port), and "direct" means the listener on the real destination took it (the pod
listener on that port for a local destination, the peer's catch-all otherwise).

The trace must give the same answer: ``captured``, ``redirect_port`` and ``mode`` equal to what
was observed, or not captured when the kernel delivered it directly. Every disagreement is
collected; the test fails once, listing each with the flags, the connection and both answers.
With the default seed: 36 flag sets × 14 connections per IP version, 1008 connections in all,
about 45 s.

UDP is left out: a UDP "connection" has no accept to observe, and DNS over UDP is the only UDP
the rules treat specially (TCP to port 53 exercises the same DNS redirect rules).

``REMORA_TRACE_SEED`` overrides the seed to explore other draws.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import random
import shlex
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest

from remora import netns
from remora.capture.config import FLAGS
from remora.capture.probe import ConnectResult, Endpoint, ListenSpec, ProbeServer, connect
from remora.capture.trace import (
    Connection,
    Context,
    Direction,
    Ruleset,
    Verdict,
    local_context,
    ruleset_from_save,
    trace,
    with_defaults,
)
from tests.conftest import require_root
from tests.netns.conftest import ADDRS, PREFIX, Mode, remora_bin

pytestmark = [pytest.mark.privileged, pytest.mark.timeout(120)]

SEED = int(os.environ.get("REMORA_TRACE_SEED", "20250611"))

#: Flag sets per IP version, alternating REDIRECT and TPROXY, and connections per flag set.
FLAG_SETS = 36
CONNECTIONS_PER_SET = 14

POD_IF = "eth0"
#: Destination ports of every connection; the pod listens on all of them.
POOL = (53, 80, 443, 8080, 9090, 15008, 15020, 15021, 15090)
PROXY_PORT, INBOUND_PORT, DNS_PORT = 15001, 15006, 15053
CAPTURE_PORTS = (PROXY_PORT, INBOUND_PORT, DNS_PORT)
#: The peer's catch-all listener (its nat PREROUTING redirects every inbound TCP here).
PEER_CATCH_ALL = 9999
CONNECT_TIMEOUT = 2.0

#: Off-link destinations (routed to the peer by the pod's default route) and CIDR choices.
OFF_LINK = {
    4: ("10.99.0.1", "10.98.0.7"),
    6: ("fd00:99::1", "fd00:98::7"),
}
#: -i besides '*': a CIDR holding the peer, one that doesn't, empty, mixed-family lists,
#: loopback (which drops the "app calling itself over lo" RETURN rules).
INCLUDE_CIDRS = {
    4: ("10.77.0.0/24", "10.77.0.2/32", "10.98.0.0/16", "", "fd00:77::/64",
        "10.77.0.0/24,fd00:77::/64", "127.0.0.0/8,10.99.0.0/16", "10.98.0.0/16,10.77.0.1/32"),
    6: ("fd00:77::/64", "fd00:77::2/128", "fd00:98::/32", "", "10.77.0.0/24",
        "10.77.0.0/24,fd00:77::/64", "::1/128,fd00:99::/32", "fd00:98::/32,fd00:77::1/128"),
}  # fmt: skip
EXCLUDE_CIDRS = {
    4: ("", "", "", "10.99.0.0/16", "10.77.0.2/32", "10.77.0.0/24", "10.99.0.1/32,fd00:99::/32"),
    6: ("", "", "", "fd00:99::/32", "fd00:77::2/128", "fd00:77::/64", "10.99.0.1/32,fd00:99::/32"),
}  # fmt: skip
OWNER_GROUP_ENVS: tuple[dict[str, str], ...] = (
    {},
    {},
    {"ISTIO_OUTBOUND_OWNER_GROUPS": "1000"},
    {"ISTIO_OUTBOUND_OWNER_GROUPS": "1000,2000"},
    {"ISTIO_OUTBOUND_OWNER_GROUPS_EXCLUDE": "2000"},
    {"ISTIO_OUTBOUND_OWNER_GROUPS_EXCLUDE": "1000,1600"},
)
#: Environment variables that would change `remora iptables` behind the flags' back.
_CONFIG_ENVS = {e for f in FLAGS for e in f.envs} | {
    "ISTIO_OUTBOUND_OWNER_GROUPS",
    "ISTIO_OUTBOUND_OWNER_GROUPS_EXCLUDE",
    "ISTIO_OUTBOUND_IPV4_LOOPBACK_CIDR",
    "ENVOY_USER",
    "DRY_RUN_FILE_PATH",
}

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


# ------------------------------------------------------------------------------ flag sets


@dataclass(frozen=True, slots=True)
class FlagSet:
    argv: tuple[str, ...]
    env: dict[str, str]
    #: Ports the flags name (-b, -d, -q, -o, DNS): connections favour them.
    ports: tuple[int, ...]
    proxy_uid: int

    def __str__(self) -> str:
        env = " ".join(f"{k}={shlex.quote(v)}" for k, v in sorted(self.env.items()))
        return f"{env + ' ' if env else ''}remora iptables {shlex.join(self.argv)}"


def _ports(rng: random.Random, lo: int, hi: int) -> list[int]:
    return rng.sample(POOL, rng.randint(lo, hi))


def _port_text(ports: list[int]) -> str:
    return ",".join(str(p) for p in ports)


def random_flags(rng: random.Random, version: int, mode: Mode) -> FlagSet:
    named: list[int] = []
    r = rng.random()
    if r < 0.5:
        inbound = "*"
    elif r < 0.85:
        ports = _ports(rng, 1, 4)
        named += ports
        inbound = _port_text(ports)
    else:
        inbound = ""
    local_exclude = _ports(rng, 1, 3) if rng.random() < 0.7 else []
    out_include = _ports(rng, 1, 2) if rng.random() < 0.3 else []
    out_exclude = _ports(rng, 1, 2) if rng.random() < 0.4 else []
    named += local_exclude + out_include + out_exclude
    include = "*" if rng.random() < 0.45 else rng.choice(INCLUDE_CIDRS[version])
    uid = rng.choice(("1337", "1337", "1500", ""))
    gid = rng.choice(("", "", "1337", "1600"))
    argv = ["-p", str(PROXY_PORT), "-z", str(INBOUND_PORT), "-m", mode,
            "-b", inbound, "-d", _port_text(local_exclude),
            "-i", include, "-x", rng.choice(EXCLUDE_CIDRS[version]),
            "-q", _port_text(out_include), "-o", _port_text(out_exclude),
            "-u", uid, "-g", gid]  # fmt: skip
    r = rng.random()
    if r < 0.15:
        argv += ["-c", POD_IF]
    r = rng.random()
    if r < 0.15:
        argv += ["-k", POD_IF]
    elif r < 0.25:
        argv += ["-k", "vm0"]
    r = rng.random()
    if r < 0.35:
        argv += ["--redirect-dns", "--capture-all-dns"]
        named.append(53)
    elif r < 0.5:
        argv += ["--redirect-dns"]  # only to the resolv.conf servers
        named.append(53)
    if rng.random() < 0.2:
        argv += ["--drop-invalid"]
    return FlagSet(
        argv=tuple(argv),
        env=dict(rng.choice(OWNER_GROUP_ENVS)),
        ports=tuple(sorted(set(named))),
        proxy_uid=int(uid or "1337"),
    )


# ---------------------------------------------------------------------------- connections


@dataclass(frozen=True, slots=True)
class Planned:
    direction: Direction
    dst: IPAddress
    dport: int
    uid: int | None = None
    gid: int | None = None
    source: IPAddress | None = None
    label: str = ""  # which destination: peer, pod, loopback, off-link, dns


@dataclass(frozen=True, slots=True)
class Observed:
    """Where the kernel delivered a connection."""

    kind: str  # "captured" | "direct" | "failed" | "odd"
    port: int | None = None
    mode: str | None = None  # for "captured": "REDIRECT" or "TPROXY"
    detail: str = ""

    def __str__(self) -> str:
        if self.kind == "captured":
            extra = f" ({self.detail})" if self.detail else ""
            return f"captured to {self.port} by {self.mode}{extra}"
        if self.kind == "direct":
            return f"direct ({self.detail})"
        return f"{self.kind}: {self.detail}"


@dataclass
class Pod:
    pair: netns.NetnsPair
    version: int
    pod_server: ProbeServer
    peer_server: ProbeServer
    local: frozenset[IPAddress]
    dns_servers: tuple[IPAddress, ...]

    @property
    def pod(self) -> netns.Netns:
        return self.pair.a.netns

    @property
    def peer(self) -> netns.Netns:
        return self.pair.b.netns

    @property
    def pod_ip(self) -> IPAddress:
        return self.pair.a.first(self.version)

    @property
    def peer_ip(self) -> IPAddress:
        return self.pair.b.first(self.version)


def plan_connection(rng: random.Random, env: Pod, flags: FlagSet) -> Planned:
    favour_named = flags.ports and rng.random() < 0.5
    dport = rng.choice(flags.ports) if favour_named else rng.choice(POOL)
    if rng.random() < 0.3:
        return Planned("inbound", env.pod_ip, dport, label="pod")
    v = env.version
    targets: list[tuple[str, IPAddress]] = [
        ("peer", env.peer_ip),
        ("peer", env.peer_ip),
        ("pod", env.pod_ip),
        ("pod", env.pod_ip),
        ("loopback", ipaddress.ip_address("127.0.0.1" if v == 4 else "::1")),
        *(("off-link", ipaddress.ip_address(a)) for a in OFF_LINK[v]),
        *(("dns", a) for a in env.dns_servers if a.version == v),
    ]
    label, dst = rng.choice(targets)
    uid = rng.choice((1000, 1000, 1337, 1500, 2000))
    gid = rng.choice((1000, 1337, 1600, 2000, uid))
    source: IPAddress | None = None
    if label == "pod" and uid in (1337, flags.proxy_uid) and rng.random() < 0.5:
        source = ipaddress.ip_address(ADDRS[v]["passthrough"])
    return Planned("outbound", dst, dport, uid, gid, source, label)


def observe(env: Pod, plan: Planned, result: ConnectResult) -> Observed:
    """Classify where a connection arrived, from the reply and the server's own report."""
    if not result.ok or result.reply is None:
        return Observed("failed", detail=result.error or "no probe reply")
    reply = result.reply
    assert result.source is not None
    server = env.pod_server if reply.server == "pod" else env.peer_server
    # The server's own line must match what the client read (this also drains its stdout).
    # Only lines since the connection started are kept (see run_flag_set), and connections
    # run one at a time, so the source address identifies it: not the port, which NAT
    # (REDIRECT in the pod or in the peer) changes when the tuple would clash with an old
    # conntrack entry.
    src = result.source
    got = server.wait_accept(lambda a: a.peer.host == src.host, timeout=5.0)
    assert got == reply, (result, server.accepts)
    want = Endpoint(host=plan.dst, port=plan.dport)
    if reply.server == "pod" and reply.listener_port in CAPTURE_PORTS:
        if reply.original_dst != want:
            return Observed(
                "odd",
                detail=f"pod :{reply.listener_port} reports original "
                f"destination {reply.original_dst}, not {want}",
            )
        # REDIRECT (NAT) puts the connection on the listener's own port. A listener that took
        # a connection addressed to another port got it by TPROXY's socket assignment, even
        # when a nat REDIRECT also rewrote the destination afterwards (TPROXY mode with -k: the
        # mangle TPROXY and the nat PREROUTING REDIRECT to 15001 both apply; the socket wins).
        if reply.local.port == reply.listener_port:
            return Observed("captured", port=reply.listener_port, mode="REDIRECT")
        nat = f"also NATed to {reply.local}" if reply.local != want else ""
        return Observed("captured", port=reply.listener_port, mode="TPROXY", detail=nat)
    if reply.server == "pod":
        if reply.listener_port == plan.dport and reply.local == want:
            return Observed("direct", detail=f"pod listener {reply.local}")
        return Observed(
            "odd", detail=f"pod listener :{reply.listener_port} got it as {reply.local}"
        )
    if reply.original_dst == want and plan.dst not in env.local:
        return Observed("direct", detail=f"peer, original destination {want}")
    return Observed("odd", detail=f"peer got it for {reply.original_dst}")


def agrees(verdict: Verdict, seen: Observed) -> bool:
    if verdict.captured is None:
        return False
    if verdict.captured:
        return (seen.kind, seen.port, seen.mode) == (
            "captured",
            verdict.redirect_port,
            verdict.mode,
        )
    if verdict.dropped:
        return seen.kind == "failed"
    return seen.kind == "direct"


def describe_verdict(v: Verdict) -> str:
    head = (
        f"captured={v.captured} port={v.redirect_port} mode={v.mode}"
        f"{' dropped' if v.dropped else ''}: {v.reason}"
    )
    hits = [f"{s.hook}/{s.table}: {s.rule}" for s in v.path if s.matched]
    return head + "".join(f"\n        matched {h}" for h in hits)


def describe_connection(c: Connection) -> str:
    who = "" if c.direction == "inbound" else f" uid={c.uid} gid={c.gid}"
    return (
        f"{c.direction} tcp {Endpoint(host=c.src, port=c.sport)} -> "
        f"{Endpoint(host=c.dst, port=c.dport)} iface={c.iface}{who}"
    )


# --------------------------------------------------------------------------------- set-up


def _iptables(env: Pod, flags: FlagSet, *extra: str) -> None:
    run_env = {k: v for k, v in os.environ.items() if k not in _CONFIG_ENVS} | flags.env
    proc = env.pod.run(
        [remora_bin(), "iptables", *extra, *flags.argv], check=False, timeout=60, env=run_env
    )
    assert proc.returncode == 0, f"{' '.join(extra)} {flags}: {proc.stderr}"


def _read_rules(ns: netns.Netns) -> Ruleset:
    return ruleset_from_save(ns.run(["iptables-save"]).stdout, ns.run(["ip6tables-save"]).stdout)


def _local_addresses(ns: netns.Netns) -> frozenset[IPAddress]:
    out = ns.run(["ip", "-o", "addr", "show"]).stdout
    return frozenset(ipaddress.ip_interface(line.split()[3]).ip for line in out.splitlines())


def _resolv_servers(ns: netns.Netns) -> tuple[IPAddress, ...]:
    """The name servers `remora iptables --redirect-dns` sees inside the pod."""
    text = ns.run(["cat", "/etc/resolv.conf"], check=False).stdout
    out: list[IPAddress] = []
    for line in text.splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0] == "nameserver":
            with contextlib.suppress(ValueError):
                out.append(ipaddress.ip_address(parts[1].split("%")[0]))
    return tuple(out)


@contextlib.contextmanager
def agreement_env(version: int) -> Iterator[Pod]:
    require_root()
    a = ADDRS[version]
    with netns.netns_pair(
        prefix=PREFIX,
        a_role="tpod",
        b_role="tpeer",
        a_addresses=[a["pod"]],
        b_addresses=[a["peer"]],
    ) as pair:
        pod, peer = pair.a.netns, pair.b.netns
        if version == 6:
            v4 = pod.run(["ip", "-4", "-o", "addr", "show"]).stdout
            assert [line.split()[1] for line in v4.splitlines()] == ["lo"], v4
            # Envoy's passthrough source; `remora iptables` adds it too (EEXIST is fine there).
            pod.run(["ip", "-6", "addr", "add", "::6/128", "dev", "lo"])
        # The peer: every inbound TCP connection, to any address, lands on one listener.
        binary = "ip6tables" if version == 6 else "iptables"
        peer.run([binary, "-t", "nat", "-A", "PREROUTING", "-p", "tcp",
                  "-j", "REDIRECT", "--to-ports", str(PEER_CATCH_ALL)])  # fmt: skip
        pod_listeners = [
            *(ListenSpec.any(p, version=version) for p in (*POOL, PROXY_PORT, DNS_PORT)),
            ListenSpec.any(INBOUND_PORT, version=version, transparent=True),
        ]
        pod_server = ProbeServer.start(pod, pod_listeners, label="pod", lifetime=300)
        with pod_server:
            peer_server = ProbeServer.start(
                peer,
                [ListenSpec.any(PEER_CATCH_ALL, version=version)],
                label="peer",
                lifetime=300,
            )
            with peer_server:
                yield Pod(
                    pair=pair,
                    version=version,
                    pod_server=pod_server,
                    peer_server=peer_server,
                    local=_local_addresses(pod),
                    dns_servers=_resolv_servers(pod),
                )


# ----------------------------------------------------------------------------------- test


@dataclass
class Tally:
    connections: int = 0
    flag_sets: int = 0
    observed: dict[str, int] = field(default_factory=dict)
    disagreements: list[str] = field(default_factory=list)

    def count(self, seen: Observed) -> None:
        key = str(seen) if seen.kind == "captured" else seen.kind
        self.observed[key] = self.observed.get(key, 0) + 1


def run_flag_set(env: Pod, flags: FlagSet, rng: random.Random, tally: Tally) -> None:
    _iptables(env, flags)
    try:
        rules = _read_rules(env.pod)
        ctx: Context = local_context(env.local, rules)
        for _ in range(CONNECTIONS_PER_SET):
            plan = plan_connection(rng, env, flags)
            # Source ports get reused: match each connection only against new accept lines.
            for server in (env.pod_server, env.peer_server):
                server.poll()
                server.accepts.clear()
            if plan.direction == "inbound":
                result = connect(
                    env.peer, Endpoint(host=plan.dst, port=plan.dport), timeout=CONNECT_TIMEOUT
                )
            else:
                result = connect(
                    env.pod,
                    Endpoint(host=plan.dst, port=plan.dport),
                    uid=plan.uid,
                    gid=plan.gid,
                    source=plan.source,
                    timeout=CONNECT_TIMEOUT,
                )
                assert (result.uid, result.gid) == (plan.uid, plan.gid)
            seen = observe(env, plan, result)
            # The connection as the kernel made it: its real source address and port.
            if result.source is not None:
                src, sport = result.source.host, result.source.port
            else:
                src = env.peer_ip if plan.direction == "inbound" else plan.source or env.pod_ip
                sport = 40000
            conn = Connection(
                direction=plan.direction,
                proto="tcp",
                src=src,
                sport=sport,
                dst=plan.dst,
                dport=plan.dport,
                uid=plan.uid,
                gid=plan.gid,
                iface=POD_IF,
            )
            if plan.direction == "outbound":
                conn = with_defaults(conn, ctx, None)
            verdict = trace(rules, conn, ctx)
            tally.connections += 1
            tally.count(seen)
            if not agrees(verdict, seen):
                tally.disagreements.append(
                    f"[{len(tally.disagreements) + 1}] IPv{env.version} flags: {flags}\n"
                    f"    connection: {describe_connection(conn)} (to the {plan.label})\n"
                    f"    kernel: {seen}\n"
                    f"    trace:  {describe_verdict(verdict)}"
                )
    finally:
        _iptables(env, flags, "--cleanup-only")
    for binary in ("iptables-save", "ip6tables-save"):
        left = [line for line in env.pod.run([binary]).stdout.splitlines() if "ISTIO" in line]
        assert not left, f"--cleanup-only {flags} left: {left}"
    tally.flag_sets += 1


@pytest.mark.parametrize("version", [4, 6], ids=["ipv4", "ipv6"])
def test_trace_agrees_with_kernel(version: int) -> None:
    rng = random.Random(f"{SEED}-{version}")
    tally = Tally()
    started = time.monotonic()
    with agreement_env(version) as env:
        for i in range(FLAG_SETS):
            mode: Mode = "REDIRECT" if i % 2 == 0 else "TPROXY"
            run_flag_set(env, random_flags(rng, version, mode), rng, tally)
    elapsed = time.monotonic() - started
    summary = (
        f"IPv{version}, seed {SEED}: {tally.connections} connections over "
        f"{tally.flag_sets} flag sets in {elapsed:.1f}s; kernel outcomes "
        f"{dict(sorted(tally.observed.items()))}"
    )
    print(summary)
    assert not tally.disagreements, (
        f"{summary}\n{len(tally.disagreements)} disagreements between remora trace and the "
        "kernel:\n" + "\n".join(tally.disagreements)
    )
    # The draw must exercise every kind of outcome, or agreement proves little.
    outcomes = (
        "direct",
        *(f"captured to {p} by REDIRECT" for p in CAPTURE_PORTS),
        f"captured to {INBOUND_PORT} by TPROXY",
    )
    for outcome in outcomes:
        assert tally.observed.get(outcome, 0) > 0, f"no connection was {outcome}: {summary}"
