"""Istio's native nftables mode (``istio-iptables --native-nftables``): the nft transaction.

Owns: :func:`build_nft`, the pure translation of a :class:`CaptureConfig` into the lines of
one nft transaction (``add table`` / ``flush table`` / ``add chain`` / ``add rule`` /
``insert rule … index N``) exactly as Istio renders them through knftables, in three ``inet``
tables (``istio-proxy-nat``, ``istio-proxy-mangle``, ``istio-proxy-raw``);
:func:`nft_cleanup_lines`, the ``--cleanup-only`` transaction that deletes those three tables
(and only those); and :func:`nft_script`, the text to feed to ``nft -f -``.

The decision logic and step order mirror :func:`remora.capture.rules.build_rules` (spec
§6–§8) with the nftables differences of spec §14: one ``inet`` chain holds both families, so a
rule iptables would add to both families is emitted once, and only the address-specific
variants appear twice (``ip`` then ``ip6``, the latter only when IPv6 is enabled); every rule
carries ``counter``; owner matches are ``skuid``/``skgid``; drop-invalid matches TCP only; the
DNS jump and the raw PREROUTING jump are single rules; a wildcard ``-i`` gives one
``jump istio-redirect``. Insert positions are nft's 0-based indexes, and an insert into a chain
that has no more rules than the index (including an empty one) is rendered as an add, because
nft refuses to insert there.

Must not: run ``nft`` or touch a network namespace (the caller applies the script), honour
``--dry-run`` (Istio does not in this mode), or emit anything outside the three Istio tables:
the flush and the cleanup are scoped to them, so other tables survive.

Reference: spec ``capture-istio-iptables.md`` §14 and the corpus goldens in
``shared/conformance/istio-iptables/nftables/``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from remora.capture.config import CaptureConfig
from remora.capture.rules import DNS_AGENT_PORT, OUTBOUND_MARK

FAMILY = "inet"

# Tables, in the order Istio emits them.
NAT = "istio-proxy-nat"
MANGLE = "istio-proxy-mangle"
RAW = "istio-proxy-raw"
TABLES: tuple[str, ...] = (NAT, MANGLE, RAW)

# Chains (Istio's nftables constants).
PREROUTING = "prerouting"
OUTPUT_HOOK = "output"
INBOUND = "istio-inbound"
REDIRECT = "istio-redirect"
IN_REDIRECT = "istio-in-redirect"
OUTPUT = "istio-output"
OUTPUT_DNS = "istio-output-dns"
DIVERT = "istio-divert"
TPROXY = "istio-tproxy"
DROP = "istio-drop"

# Per table, every chain Istio may create, in its fixed order, with the base-chain spec
# (None for a regular chain). Only the chains that end up with rules are added.
CHAINS: dict[str, tuple[tuple[str, str | None], ...]] = {
    NAT: (
        (PREROUTING, "type nat hook prerouting priority -100"),
        (OUTPUT_HOOK, "type nat hook output priority -100"),
        (INBOUND, None),
        (REDIRECT, None),
        (IN_REDIRECT, None),
        (OUTPUT, None),
        (OUTPUT_DNS, None),
    ),
    MANGLE: (
        (PREROUTING, "type filter hook prerouting priority -150"),
        (OUTPUT_HOOK, "type route hook output priority -150"),
        (DIVERT, None),
        (TPROXY, None),
        (INBOUND, None),
        (DROP, None),
    ),
    RAW: (
        (PREROUTING, "type filter hook prerouting priority -300"),
        (OUTPUT_HOOK, "type filter hook output priority -300"),
        (INBOUND, None),
        (OUTPUT_DNS, None),
    ),
}

LO6 = "::1/128"
SRC6_V4 = "127.0.0.6/32"
SRC6_V6 = "::6/128"


@dataclass(frozen=True, slots=True, kw_only=True)
class NftRule:
    """One builder operation: append ``text`` to ``chain``, or insert it at 0-based ``index``."""

    table: str
    chain: str
    text: str
    index: int | None = None


class _Builder:
    """Collects rules in emission order; v6 variants are dropped when IPv6 is off."""

    def __init__(self, ipv6: bool) -> None:
        self.ipv6 = ipv6
        self.rules: list[NftRule] = []

    def add(self, table: str, chain: str, text: str, index: int | None = None) -> None:
        self.rules.append(NftRule(table=table, chain=chain, text=text, index=index))

    def add6(self, table: str, chain: str, text: str, index: int | None = None) -> None:
        if self.ipv6:
            self.add(table, chain, text, index)


def nft_rules(cfg: CaptureConfig) -> tuple[NftRule, ...]:
    """The rule operations of the nftables mode, in Istio's emission order (spec §6.2, §14)."""
    b = _Builder(cfg.facts.enable_ipv6)
    dns = cfg.effective_dns
    lo4 = cfg.ipv4_loopback_cidr
    tunnel, p, z, mark = (cfg.inbound_tunnel_port, cfg.proxy_port, cfg.inbound_capture_port,
                          cfg.tproxy_mark)

    # 1. Excluded interfaces: a return in the base chain ends its traversal there.
    for iface in cfg.exclude_interfaces:
        b.add(NAT, PREROUTING, f"iifname {iface} counter return")
        b.add(NAT, OUTPUT_HOOK, f"oifname {iface} counter return")
    if cfg.tproxy:
        for iface in cfg.exclude_interfaces:
            b.add(MANGLE, PREROUTING, f"iifname {iface} counter return")
            b.add(MANGLE, OUTPUT_HOOK, f"oifname {iface} counter return")
    # 2. Traffic arriving from a VM's virtual interface is not inbound traffic for this pod.
    for iface in cfg.kube_virt_interfaces:
        b.add(NAT, PREROUTING, f"iifname {iface} counter return", index=0)
    # 3. Drop invalid (TCP only in this mode).
    if cfg.drop_invalid:
        b.add(MANGLE, PREROUTING, f"meta l4proto tcp ct state invalid counter jump {DROP}")
        b.add(MANGLE, DROP, "counter drop")
    # 4-6. Always present.
    b.add(NAT, INBOUND, f"meta l4proto tcp tcp dport {tunnel} counter return")
    b.add(NAT, REDIRECT, f"meta l4proto tcp counter redirect to :{p}")
    b.add(NAT, IN_REDIRECT, f"meta l4proto tcp counter redirect to :{z}")
    # 7. Inbound.
    if cfg.inbound_enabled:
        table = MANGLE if cfg.tproxy else NAT
        if cfg.tproxy:
            b.add(MANGLE, DIVERT, f"counter meta mark set {mark}")
            b.add(MANGLE, DIVERT, "counter accept")
            b.add(MANGLE, TPROXY, f"meta l4proto tcp ip daddr != {lo4} tproxy ip to :{z} "
                  f"meta mark set {mark} counter accept")
            b.add6(MANGLE, TPROXY, f"meta l4proto tcp ip6 daddr != {LO6} tproxy ip6 to :{z} "
                   f"meta mark set {mark} counter accept")
        b.add(table, PREROUTING, f"meta l4proto tcp counter jump {INBOUND}")
        if cfg.inbound_ports_all:
            for port in cfg.local_exclude_ports:
                b.add(table, INBOUND, f"meta l4proto tcp tcp dport {port} counter return")
            if cfg.tproxy:
                b.add(MANGLE, INBOUND, "meta l4proto tcp ct state related,established "
                      f"counter jump {DIVERT}")
                b.add(MANGLE, INBOUND, f"meta l4proto tcp counter jump {TPROXY}")
            else:
                b.add(NAT, INBOUND, f"meta l4proto tcp counter jump {IN_REDIRECT}")
        else:
            for port in cfg.inbound_ports:
                if cfg.tproxy:
                    b.add(MANGLE, INBOUND, "meta l4proto tcp ct state related,established "
                          f"tcp dport {port} counter jump {DIVERT}")
                    b.add(MANGLE, INBOUND,
                          f"meta l4proto tcp tcp dport {port} counter jump {TPROXY}")
                else:
                    b.add(NAT, INBOUND,
                          f"meta l4proto tcp tcp dport {port} counter jump {IN_REDIRECT}")
    # 8. Outbound entry point.
    b.add(NAT, OUTPUT_HOOK, f"counter jump {OUTPUT}")
    # 9. Excluded outbound ports, before the self-redirect rules.
    for port in cfg.outbound_ports_exclude:
        b.add(NAT, OUTPUT, f"tcp dport {port} counter return")
        b.add(NAT, OUTPUT, f"udp dport {port} counter return")
    # 10. The proxy's inbound passthrough connects to the app from 127.0.0.6 / ::6.
    b.add(NAT, OUTPUT, f"oifname lo ip saddr {SRC6_V4} counter return")
    b.add6(NAT, OUTPUT, f"oifname lo ip6 saddr {SRC6_V6} counter return")
    # 11-12. Per proxy uid, then gid: self-redirect over lo, app-to-itself, loop avoidance.
    loopback_included = (cfg.outbound_include.has_loopback(4)
                         or cfg.outbound_include.has_loopback(6))
    for owner, ids in (("skuid", cfg.proxy_uids), ("skgid", cfg.proxy_gids)):
        for ident in ids:
            # As in iptables mode, only the uid rule uses the DNS form.
            ports = f"{{ 53, {tunnel} }}" if dns and owner == "skuid" else str(tunnel)
            tail = f"tcp dport != {ports} {owner} {ident} counter jump {IN_REDIRECT}"
            b.add(NAT, OUTPUT, f"oifname lo meta l4proto tcp ip daddr != {lo4} {tail}")
            b.add6(NAT, OUTPUT, f"oifname lo meta l4proto tcp ip6 daddr != {LO6} {tail}")
            if not loopback_included:
                if dns:
                    b.add(NAT, OUTPUT, f"oifname lo meta l4proto tcp tcp dport != 53 "
                          f"{owner} != {ident} counter return")
                else:
                    b.add(NAT, OUTPUT, f"oifname lo {owner} != {ident} counter return")
            b.add(NAT, OUTPUT, f"{owner} {ident} counter return")
    # 13. Owner groups.
    groups = cfg.owner_groups
    if groups.only is not None:
        matches = "".join(f"skgid != {g} " for g in groups.only)
        b.add(NAT, OUTPUT, f"{matches}counter return")
    else:
        for group in groups.exclude:
            b.add(NAT, OUTPUT, f"skgid {group} counter return")
    # 14. DNS.
    if dns:
        _dns_rules(b, cfg)
    # 15. Explicit localhost is never captured.
    b.add(NAT, OUTPUT, f"ip daddr {lo4} counter return")
    b.add6(NAT, OUTPUT, f"ip6 daddr {LO6} counter return")
    # 16. Excluded CIDRs.
    for net4 in cfg.outbound_exclude.v4:
        b.add(NAT, OUTPUT, f"ip daddr {net4} counter return")
    for net6 in cfg.outbound_exclude.v6:
        b.add6(NAT, OUTPUT, f"ip6 daddr {net6} counter return")
    # 17. Included outbound ports.
    for port in cfg.outbound_ports_include:
        b.add(NAT, OUTPUT, f"tcp dport {port} counter jump {REDIRECT}")
    # 18. Included CIDRs: a wildcard is one family-independent jump.
    inc = cfg.outbound_include
    if inc.wildcard:
        b.add(NAT, OUTPUT, f"counter jump {REDIRECT}")
        for iface in cfg.kube_virt_interfaces:
            b.add(NAT, PREROUTING, f"iifname {iface} counter jump {REDIRECT}", index=0)
    else:
        for net4 in inc.v4:
            for iface in cfg.kube_virt_interfaces:
                b.add(NAT, PREROUTING, f"iifname {iface} ip daddr {net4} counter jump {REDIRECT}",
                      index=0)
            b.add(NAT, OUTPUT, f"ip daddr {net4} counter jump {REDIRECT}")
        for net6 in inc.v6:
            for iface in cfg.kube_virt_interfaces:
                b.add6(NAT, PREROUTING,
                       f"iifname {iface} ip6 daddr {net6} counter jump {REDIRECT}", index=0)
            b.add6(NAT, OUTPUT, f"ip6 daddr {net6} counter jump {REDIRECT}")
    # 19. TPROXY tail (even without inbound ports).
    if cfg.tproxy:
        b.add(MANGLE, PREROUTING, f"meta l4proto tcp mark {mark} counter ct mark set mark")
        b.add(MANGLE, OUTPUT_HOOK, f"oifname lo meta l4proto tcp mark {mark} counter return")
        for owner, ids in (("skuid", cfg.proxy_uids), ("skgid", cfg.proxy_gids)):
            for ident in ids:
                b.add(MANGLE, OUTPUT_HOOK, f"oifname lo meta l4proto tcp ip daddr != {lo4} "
                      f"{owner} {ident} counter meta mark set {OUTBOUND_MARK}")
                b.add6(MANGLE, OUTPUT_HOOK, f"oifname lo meta l4proto tcp ip6 daddr != {LO6} "
                       f"{owner} {ident} counter meta mark set {OUTBOUND_MARK}")
        b.add(MANGLE, OUTPUT_HOOK,
              f"meta l4proto tcp ct mark {mark} counter meta mark set ct mark")
        b.add(MANGLE, INBOUND, f"meta l4proto tcp mark {mark} counter return", index=0)
        b.add(MANGLE, INBOUND,
              f"iifname lo meta l4proto tcp ip saddr {SRC6_V4} counter return", index=1)
        b.add6(MANGLE, INBOUND,
               f"iifname lo meta l4proto tcp ip6 saddr {SRC6_V6} counter return", index=1)
        b.add(MANGLE, INBOUND,
              f"iifname lo meta l4proto tcp mark != {OUTBOUND_MARK} counter return", index=2)
    return tuple(b.rules)


def _dns_rules(b: _Builder, cfg: CaptureConfig) -> None:
    """DNS capture to the agent and conntrack zones (spec §8, with the §14 differences)."""
    every = cfg.capture_all_dns
    v4, v6 = cfg.facts.dns_servers_v4, cfg.facts.dns_servers_v6
    agent = f":{DNS_AGENT_PORT}"
    b.add(RAW, OUTPUT_HOOK, f"counter jump {OUTPUT_DNS}")
    # One jump whatever the families (Istio: capture-all or any server at all).
    if every or v4 or v6:
        b.add(NAT, OUTPUT, f"counter jump {OUTPUT_DNS}")
    if every:
        b.add(NAT, OUTPUT_DNS, f"meta l4proto tcp tcp dport 53 counter redirect to {agent}")
        b.add(NAT, OUTPUT_DNS, f"udp dport 53 counter redirect to {agent}")
    else:
        for proto in ("tcp", "udp"):
            for s in v4:
                b.add(NAT, OUTPUT_DNS,
                      f"ip daddr {s}/32 {proto} dport 53 counter redirect to {agent}")
            for s in v6:
                b.add6(NAT, OUTPUT_DNS,
                       f"ip6 daddr {s}/128 {proto} dport 53 counter redirect to {agent}")
    for owner, ids in (("skuid", cfg.proxy_uids), ("skgid", cfg.proxy_gids)):
        for ident in ids:
            b.add(RAW, OUTPUT_DNS, f"udp dport 53 meta {owner} {ident} counter ct zone set 1")
            b.add(RAW, OUTPUT_DNS,
                  f"udp sport {DNS_AGENT_PORT} meta {owner} {ident} counter ct zone set 2")
    if every:
        b.add(RAW, PREROUTING, f"counter jump {INBOUND}")
        b.add(RAW, OUTPUT_DNS, "udp dport 53 counter ct zone set 2")
        b.add(RAW, INBOUND, "udp sport 53 counter ct zone set 1")
        return
    if v4 or v6:
        b.add(RAW, PREROUTING, f"counter jump {INBOUND}")
    for s in v4:
        b.add(RAW, OUTPUT_DNS, f"udp dport 53 ip daddr {s}/32 counter ct zone set 2")
        b.add(RAW, INBOUND, f"udp sport 53 ip saddr {s}/32 counter ct zone set 1")
    for s in v6:
        b.add6(RAW, OUTPUT_DNS, f"udp dport 53 ip6 daddr {s}/128 counter ct zone set 2")
        b.add6(RAW, INBOUND, f"udp sport 53 ip6 saddr {s}/128 counter ct zone set 1")


def _table_lines(table: str, rules: Sequence[NftRule]) -> list[str]:
    """One table's part of the transaction; empty when the table has no rules."""
    if not rules:
        return []
    used = {r.chain for r in rules}
    head = f"{FAMILY} {table}"
    lines = [f"add table {head}", f"flush table {head}"]
    for chain, base in CHAINS[table]:
        if chain in used:
            lines.append(f"add chain {head} {chain}" + (f" {{ {base} ; }}" if base else ""))
    # The table was just flushed, so each chain holds exactly the rules added so far.
    count: dict[str, int] = {}
    for rule in rules:
        n = count.get(rule.chain, 0)
        if rule.index is None or rule.index >= n:
            lines.append(f"add rule {head} {rule.chain} {rule.text}")
        else:
            lines.append(f"insert rule {head} {rule.chain} index {rule.index} {rule.text}")
        count[rule.chain] = n + 1
    return lines


def build_nft(cfg: CaptureConfig) -> list[str]:
    """The nft transaction for ``cfg``, one operation per line, as Istio's goldens show it."""
    rules = nft_rules(cfg)
    unknown = {(r.table, r.chain) for r in rules} - {
        (t, c) for t, chains in CHAINS.items() for c, _ in chains}
    if unknown:  # a programming error: the fixed chain lists must cover every rule
        raise AssertionError(f"rules in unknown chains: {sorted(unknown)}")
    lines: list[str] = []
    for table in TABLES:
        lines += _table_lines(table, [r for r in rules if r.table == table])
    return lines


def nft_cleanup_lines(cfg: CaptureConfig) -> list[str]:
    """The ``--cleanup-only`` transaction: delete Istio's three tables, nothing else.

    Each ``delete table`` is preceded by an ``add table`` of the same table (a no-op when it
    exists) so that one ``nft -f`` transaction succeeds whether or not the tables exist.
    ``cfg`` does not change the result (Istio deletes the tables whatever the flags); it is
    taken for symmetry with :func:`build_nft`.
    """
    del cfg
    lines: list[str] = []
    for table in TABLES:
        lines += [f"add table {FAMILY} {table}", f"delete table {FAMILY} {table}"]
    return lines


def nft_script(lines: Sequence[str]) -> str:
    """The text to feed to ``nft -f -``: one operation per line, newline-terminated."""
    return "".join(f"{line}\n" for line in lines)
