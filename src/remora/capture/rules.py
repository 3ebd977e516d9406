"""Which iptables rules istio-iptables writes, in which order.

Owns: the rule model (:class:`Rule`, :class:`RuleSet`) and :func:`build_rules`, the pure
translation of a :class:`CaptureConfig` into two ordered operation lists (IPv4, IPv6), step by
step as Istio emits them. The order is the emission order; it is never re-sorted (``-I`` rules
stay where they were generated), because Istio's output is compared byte for byte.
Must not: render text (see :mod:`remora.capture.render`) or run anything.

Reference: spec ``capture-istio-iptables.md`` §6–§8 (Istio
``tools/istio-iptables/pkg/capture/run.go``).
"""

from __future__ import annotations

from dataclasses import dataclass

from remora.capture.config import CaptureConfig

BUILTIN_CHAINS = frozenset({"INPUT", "OUTPUT", "FORWARD", "PREROUTING", "POSTROUTING"})
BUILTIN_TARGETS = frozenset({"ACCEPT", "RETURN", "DROP"})

# Chain names (Istio constants).
INBOUND = "ISTIO_INBOUND"
REDIRECT = "ISTIO_REDIRECT"
IN_REDIRECT = "ISTIO_IN_REDIRECT"
OUTPUT = "ISTIO_OUTPUT"
OUTPUT_DNS = "ISTIO_OUTPUT_DNS"
DIVERT = "ISTIO_DIVERT"
TPROXY = "ISTIO_TPROXY"
DROP = "ISTIO_DROP"

DNS_AGENT_PORT = 15053
# Hard-coded mark for the proxy's outbound connections to its own pod IP in TPROXY mode.
OUTBOUND_MARK = 1338


@dataclass(frozen=True, slots=True, kw_only=True)
class Rule:
    """One builder operation: ``-A chain params`` or ``-I chain position params``."""

    table: str
    chain: str
    params: tuple[str, ...]
    position: int | None = None

    @property
    def spec(self) -> str:
        """The rule as iptables-restore takes it (``-A …`` / ``-I … N …``)."""
        head = f"-A {self.chain}" if self.position is None else f"-I {self.chain} {self.position}"
        return " ".join((head, *self.params))

    @property
    def target(self) -> str | None:
        """The jump target when it is the last token (as Istio detects chains to create)."""
        if len(self.params) >= 2 and self.params[-2] == "-j":
            return self.params[-1]
        return None

    def delete_args(self) -> tuple[str, ...]:
        """Arguments that delete this rule: ``-t table -D chain params``."""
        return ("-t", self.table, "-D", self.chain, *self.params)


@dataclass(frozen=True, slots=True, kw_only=True)
class RuleSet:
    """The two families' operation lists. ``v6`` is empty when IPv6 is off."""

    v4: tuple[Rule, ...]
    v6: tuple[Rule, ...]

    def family(self, family: int) -> tuple[Rule, ...]:
        return self.v4 if family == 4 else self.v6


class _Builder:
    def __init__(self, ipv6: bool, loopback_v4: str) -> None:
        self.ipv6 = ipv6
        self.lo = {4: loopback_v4, 6: "::1/128"}
        self.src6 = {4: "127.0.0.6/32", 6: "::6/128"}
        self.v4: list[Rule] = []
        self.v6: list[Rule] = []

    def _add(self, family: int, table: str, chain: str, params: str, pos: int | None) -> None:
        rule = Rule(table=table, chain=chain, params=tuple(params.split()), position=pos)
        if family == 4:
            self.v4.append(rule)
        elif self.ipv6:
            self.v6.append(rule)

    def both(self, table: str, chain: str, params: str, pos: int | None = None) -> None:
        self._add(4, table, chain, params, pos)
        self._add(6, table, chain, params, pos)

    def one(self, family: int, table: str, chain: str, params: str,
            pos: int | None = None) -> None:
        self._add(family, table, chain, params, pos)

    def versioned(self, table: str, chain: str, template: str, pos: int | None = None) -> None:
        """Add to both families, with {LO} and {SRC6} replaced per family."""
        for fam in (4, 6):
            self._add(fam, table, chain,
                      template.format(LO=self.lo[fam], SRC6=self.src6[fam]), pos)


def build_rules(cfg: CaptureConfig) -> RuleSet:
    """Translate a config into Istio's operation lists (spec §6.2, in that order)."""
    b = _Builder(cfg.facts.enable_ipv6, cfg.ipv4_loopback_cidr)
    dns = cfg.effective_dns
    tunnel, p, z, mark = (cfg.inbound_tunnel_port, cfg.proxy_port, cfg.inbound_capture_port,
                          cfg.tproxy_mark)

    # 1. Excluded interfaces: a RETURN in the built-in chain ends its traversal there.
    for iface in cfg.exclude_interfaces:
        b.both("nat", "PREROUTING", f"-i {iface} -j RETURN")
        b.both("nat", "OUTPUT", f"-o {iface} -j RETURN")
    if cfg.tproxy:
        for iface in cfg.exclude_interfaces:
            b.both("mangle", "PREROUTING", f"-i {iface} -j RETURN")
            b.both("mangle", "OUTPUT", f"-o {iface} -j RETURN")
    # 2. Traffic arriving from a VM's virtual interface is not inbound traffic for this pod.
    for iface in cfg.kube_virt_interfaces:
        b.both("nat", "PREROUTING", f"-i {iface} -j RETURN", pos=1)
    # 3. Out-of-window packets would otherwise look unmatched and reset the connection.
    if cfg.drop_invalid:
        b.both("mangle", "PREROUTING", f"-m conntrack --ctstate INVALID -j {DROP}")
        b.both("mangle", DROP, "-j DROP")
    # 4-6. Always present.
    b.both("nat", INBOUND, f"-p tcp --dport {tunnel} -j RETURN")
    b.both("nat", REDIRECT, f"-p tcp -j REDIRECT --to-ports {p}")
    b.both("nat", IN_REDIRECT, f"-p tcp -j REDIRECT --to-ports {z}")
    # 7. Inbound.
    if cfg.inbound_enabled:
        table = "mangle" if cfg.tproxy else "nat"
        if cfg.tproxy:
            b.both("mangle", DIVERT, f"-j MARK --set-mark {mark}")
            b.both("mangle", DIVERT, "-j ACCEPT")
            b.versioned("mangle", TPROXY,
                        "! -d {LO} -p tcp -j TPROXY "
                        f"--tproxy-mark {mark}/0xffffffff --on-port {z}")
        b.both(table, "PREROUTING", f"-p tcp -j {INBOUND}")
        if cfg.inbound_ports_all:
            for port in cfg.local_exclude_ports:
                b.both(table, INBOUND, f"-p tcp --dport {port} -j RETURN")
            if cfg.tproxy:
                b.both("mangle", INBOUND,
                       f"-p tcp -m conntrack --ctstate RELATED,ESTABLISHED -j {DIVERT}")
                b.both("mangle", INBOUND, f"-p tcp -j {TPROXY}")
            else:
                b.both("nat", INBOUND, f"-p tcp -j {IN_REDIRECT}")
        else:
            for port in cfg.inbound_ports:
                if cfg.tproxy:
                    b.both("mangle", INBOUND, f"-p tcp --dport {port} -m conntrack --ctstate "
                           f"RELATED,ESTABLISHED -j {DIVERT}")
                    b.both("mangle", INBOUND, f"-p tcp --dport {port} -j {TPROXY}")
                else:
                    b.both("nat", INBOUND, f"-p tcp --dport {port} -j {IN_REDIRECT}")
    # 8. Outbound entry point; UDP (DNS) is sorted out inside.
    b.both("nat", "OUTPUT", f"-j {OUTPUT}")
    # 9. Excluded outbound ports, before the self-redirect rules.
    for port in cfg.outbound_ports_exclude:
        b.both("nat", OUTPUT, f"-p tcp --dport {port} -j RETURN")
        b.both("nat", OUTPUT, f"-p udp --dport {port} -j RETURN")
    # 10. The proxy's inbound passthrough connects to the app from 127.0.0.6 / ::6.
    b.versioned("nat", OUTPUT, "-o lo -s {SRC6} -j RETURN")
    # 11-12. Per proxy uid, then gid: self-redirect over lo, app-to-itself, loop avoidance.
    loopback_included = (cfg.outbound_include.has_loopback(4)
                         or cfg.outbound_include.has_loopback(6))
    for kind, ids in (("uid", cfg.proxy_uids), ("gid", cfg.proxy_gids)):
        for ident in ids:
            if dns and kind == "uid":  # Istio uses the DNS form for uids only
                b.versioned("nat", OUTPUT, "-o lo ! -d {LO} -p tcp -m multiport ! --dports "
                            f"53,{tunnel} -m owner --{kind}-owner {ident} -j {IN_REDIRECT}")
            else:
                b.versioned("nat", OUTPUT, f"-o lo ! -d {{LO}} -p tcp ! --dport {tunnel} "
                            f"-m owner --{kind}-owner {ident} -j {IN_REDIRECT}")
            if not loopback_included:
                if dns:
                    b.both("nat", OUTPUT,
                           f"-o lo -p tcp ! --dport 53 -m owner ! --{kind}-owner {ident} -j RETURN")
                else:
                    b.both("nat", OUTPUT, f"-o lo -m owner ! --{kind}-owner {ident} -j RETURN")
            b.both("nat", OUTPUT, f"-m owner --{kind}-owner {ident} -j RETURN")
    # 13. Owner groups.
    groups = cfg.owner_groups
    if groups.only is not None:
        matches = " ".join(f"-m owner ! --gid-owner {g}" for g in groups.only)
        b.both("nat", OUTPUT, f"{matches} -j RETURN")
    else:
        for group in groups.exclude:
            b.both("nat", OUTPUT, f"-m owner --gid-owner {group} -j RETURN")
    # 14. DNS.
    if dns:
        _dns_rules(b, cfg)
    # 15. Explicit localhost is never captured.
    b.versioned("nat", OUTPUT, "-d {LO} -j RETURN")
    # 16. Excluded CIDRs.
    for fam, nets in ((4, cfg.outbound_exclude.v4), (6, cfg.outbound_exclude.v6)):
        for net in nets:
            b.one(fam, "nat", OUTPUT, f"-d {net} -j RETURN")
    # 17. Included outbound ports.
    for port in cfg.outbound_ports_include:
        b.both("nat", OUTPUT, f"-p tcp --dport {port} -j {REDIRECT}")
    # 18. Included CIDRs, per family; an empty list leaves that family uncaptured.
    inc = cfg.outbound_include
    for fam, nets in ((4, inc.v4), (6, inc.v6)):
        if inc.wildcard:
            b.one(fam, "nat", OUTPUT, f"-j {REDIRECT}")
            for iface in cfg.kube_virt_interfaces:
                b.one(fam, "nat", "PREROUTING", f"-i {iface} -j {REDIRECT}", pos=1)
        else:
            for net in nets:
                for iface in cfg.kube_virt_interfaces:
                    b.one(fam, "nat", "PREROUTING", f"-i {iface} -d {net} -j {REDIRECT}", pos=1)
                b.one(fam, "nat", OUTPUT, f"-d {net} -j {REDIRECT}")
    # 19. TPROXY tail (even without inbound ports).
    if cfg.tproxy:
        b.both("mangle", "PREROUTING", f"-p tcp -m mark --mark {mark} -j CONNMARK --save-mark")
        b.both("mangle", "OUTPUT", f"-p tcp -o lo -m mark --mark {mark} -j RETURN")
        for kind, ids in (("uid", cfg.proxy_uids), ("gid", cfg.proxy_gids)):
            for ident in ids:
                b.versioned("mangle", "OUTPUT", f"! -d {{LO}} -p tcp -o lo -m owner "
                            f"--{kind}-owner {ident} -j MARK --set-mark {OUTBOUND_MARK}")
        b.both("mangle", "OUTPUT",
               f"-p tcp -m connmark --mark {mark} -j CONNMARK --restore-mark")
        b.both("mangle", INBOUND, f"-p tcp -m mark --mark {mark} -j RETURN", pos=1)
        b.versioned("mangle", INBOUND, "-p tcp -s {SRC6} -i lo -j RETURN", pos=2)
        b.both("mangle", INBOUND, f"-p tcp -i lo -m mark ! --mark {OUTBOUND_MARK} -j RETURN",
               pos=3)
    return RuleSet(v4=tuple(b.v4), v6=tuple(b.v6))


def _dns_rules(b: _Builder, cfg: CaptureConfig) -> None:
    """DNS capture to the agent on 15053 and conntrack zones (spec §8)."""
    every = cfg.capture_all_dns
    servers = {4: cfg.facts.dns_servers_v4, 6: cfg.facts.dns_servers_v6}
    suffix = {4: "/32", 6: "/128"}
    b.both("raw", "OUTPUT", f"-j {OUTPUT_DNS}")
    for fam in (4, 6):
        if every or servers[fam]:
            b.one(fam, "nat", OUTPUT, f"-j {OUTPUT_DNS}")
    for proto, to in (("tcp", "--to-ports"), ("udp", "--to-port")):
        if every:
            b.both("nat", OUTPUT_DNS, f"-p {proto} --dport 53 -j REDIRECT {to} {DNS_AGENT_PORT}")
        else:
            for fam in (4, 6):
                for s in servers[fam]:
                    b.one(fam, "nat", OUTPUT_DNS, f"-p {proto} --dport 53 -d {s}{suffix[fam]} "
                          f"-j REDIRECT {to} {DNS_AGENT_PORT}")
    for kind, ids in (("uid", cfg.proxy_uids), ("gid", cfg.proxy_gids)):
        for ident in ids:
            b.both("raw", OUTPUT_DNS, f"-p udp --dport 53 -m owner --{kind}-owner {ident} "
                   "-j CT --zone 1")
            b.both("raw", OUTPUT_DNS, f"-p udp --sport {DNS_AGENT_PORT} -m owner "
                   f"--{kind}-owner {ident} -j CT --zone 2")
    if every:
        b.both("raw", "PREROUTING", f"-j {INBOUND}")
        b.both("raw", OUTPUT_DNS, "-p udp --dport 53 -j CT --zone 2")
        b.both("raw", INBOUND, "-p udp --sport 53 -j CT --zone 1")
        return
    for fam in (4, 6):
        if not servers[fam]:
            continue
        b.one(fam, "raw", "PREROUTING", f"-j {INBOUND}")
        for s in servers[fam]:
            b.one(fam, "raw", OUTPUT_DNS, f"-p udp --dport 53 -d {s}{suffix[fam]} -j CT --zone 2")
            b.one(fam, "raw", INBOUND, f"-p udp --sport 53 -s {s}{suffix[fam]} -j CT --zone 1")
