"""What `remora trace` prints: a verdict with its path, the rule set explained, the matrix.

Owns: the words for what each Istio capture rule is for, the standard cases of the matrix,
and the text/JSON layouts. Must not: read the namespace or run anything.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from remora.capture.rules import DIVERT, DNS_AGENT_PORT, IN_REDIRECT, OUTBOUND_MARK, REDIRECT
from remora.capture.ruletext import Match, ParsedRule
from remora.capture.trace import (
    Connection,
    Context,
    IPAddress,
    Ruleset,
    Verdict,
    trace,
    with_defaults,
)

# ------------------------------------------------------------------------------- verdict


def _conn_line(c: Connection) -> str:
    src = f"[{c.src}]:{c.sport}" if c.src.version == 6 else f"{c.src}:{c.sport}"
    dst = f"[{c.dst}]:{c.dport}" if c.dst.version == 6 else f"{c.dst}:{c.dport}"
    who = []
    if c.uid is not None:
        who.append(f"uid {c.uid}")
    if c.gid is not None:
        who.append(f"gid {c.gid}")
    who.append(f"{'out' if c.direction == 'outbound' else 'in'} {c.iface or '?'}")
    return f"{c.direction} {c.proto} {src} -> {dst} ({', '.join(who)})"


def render_verdict(v: Verdict, origin: str, verbose: bool = False) -> str:
    """The path (matched rules, or all with ``verbose``) grouped by hook/table/chain."""
    lines = [_conn_line(v.connection), f"rules: {origin}", ""]
    last: tuple[str, str, str] | None = None
    skipped = 0
    for step in v.path:
        key = (step.hook, step.table, step.chain)
        if key != last:
            if skipped:
                lines.append(f"      … {skipped} rule(s) did not match")
                skipped = 0
            lines.append(f"  {step.hook:<11} {step.table:<6} {step.chain}")
            last = key
        if step.matched is False and not verbose:
            skipped += 1
            continue
        mark = {True: "✓", False: "·", None: "?"}[step.matched]
        lines.append(f"    {mark} {step.rule}")
    if skipped:
        lines.append(f"      … {skipped} rule(s) did not match")
    if not v.path:
        lines.append("  (no rule on this path)")
    lines += ["", f"verdict: {v.reason}"]
    if v.captured and v.final_dst:
        lines.append(f"arrives at: {v.final_dst}")
    lines += [f"note: {n}" for n in v.notes]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------- explain


def _m(rule: ParsedRule, kind: str) -> Match | None:
    return next((m for m in rule.matches if m.kind == kind), None)


def purpose(rule: ParsedRule, proxy_ids: frozenset[int] = frozenset({1337})) -> str:
    """What an Istio capture rule is for, in words; a literal reading for anything else."""
    t = rule.target
    chain, target = rule.chain, (t.chain if t and t.kind in ("jump", "goto") else "")
    kind = t.kind if t else ""
    dport, dports = _m(rule, "dport"), _m(rule, "dports")
    src, dst = _m(rule, "src"), _m(rule, "dst")
    iface_in, iface_out = _m(rule, "in"), _m(rule, "out")
    uid, gid = _m(rule, "uid"), _m(rule, "gid")
    mark = _m(rule, "mark")
    owner = uid or gid
    who = f"{owner.kind} {owner.ids[0] if owner.ids else owner.name}" if owner else ""
    port_match = dport or dports
    ports = ",".join(str(lo) for lo, _ in port_match.ports) if port_match else ""
    if kind == "REDIRECT" and t is not None and t.to_ports is not None:
        port = t.to_ports[0]
        if port == DNS_AGENT_PORT:
            return f"DNS ({ports or 'port 53'}) goes to the agent's DNS proxy on :{port}"
        if chain == REDIRECT:
            return f"outbound TCP goes to the proxy's outbound listener :{port}"
        if chain == IN_REDIRECT:
            return f"inbound TCP goes to the proxy's inbound listener :{port}"
        return f"redirect to :{port}"
    if kind == "TPROXY" and t is not None:
        return (f"new inbound TCP goes to the transparent listener :{t.on_port}, marked "
                f"{t.mark[0] if t.mark else '?'} for local delivery")
    if target == "ISTIO_INBOUND" and chain == "PREROUTING":
        if rule.table == "raw":
            return "inbound packets visit the DNS conntrack-zone chain"
        return "inbound TCP enters the capture chain"
    if target == "ISTIO_OUTPUT" and chain == "OUTPUT":
        return "every locally generated packet enters the outbound capture chain"
    if target == "ISTIO_OUTPUT_DNS":
        return "DNS capture chain"
    if target == "ISTIO_DROP":
        return "conntrack-INVALID packets (out of window) are dropped, not reset"
    if kind == "DROP":
        return "drop"
    if target == DIVERT:
        return "established inbound connections only need the mark (policy routing to lo)"
    if target == "ISTIO_TPROXY":
        return f"capture new inbound TCP{' to port ' + ports if ports else ''} (TPROXY)"
    if kind == "MARK" and t is not None and t.mark is not None:
        if chain == DIVERT:
            return (f"mark established inbound packets {t.mark[0]}, so policy routing "
                    "delivers them to the local socket")
        if t.mark[0] == OUTBOUND_MARK:
            return (f"the proxy's ({who}) connections to its own pod IP are marked "
                    f"{OUTBOUND_MARK}, so the inbound side intercepts them")
        return f"mark the packet {t.mark[0]}"
    if kind == "ACCEPT" and chain == DIVERT:
        return "accept the marked packet"
    if kind == "CONNMARK" and t is not None:
        if t.mark_op == "save":
            return "remember the packet's mark on the connection"
        return "replies of captured connections get the mark back (routed back via lo)"
    if kind == "CT" and t is not None:
        side = "agent <-> upstream resolvers" if t.zone == 1 else "app <-> agent"
        return f"DNS conntrack zone {t.zone} ({side}), so look-alike UDP flows don't collide"
    if target == IN_REDIRECT:
        if iface_out is not None and iface_out.iface == "lo" and owner:
            return (f"the proxy ({who}) calling its own pod IP goes to the inbound listener")
        return f"capture inbound TCP{' to port ' + ports if ports else ''}"
    if target == REDIRECT:
        if iface_in is not None:
            scope = f" to {dst.net}" if dst and dst.net else ""
            return (f"traffic arriving from VM interface {iface_in.iface}{scope} is outbound: "
                    "capture")
        if dport is not None:
            return f"outbound TCP to port {ports} is always captured"
        if dst is not None and dst.net is not None:
            return f"capture outbound traffic to {dst.net}"
        return "capture all other outbound traffic"
    if kind == "RETURN":
        if mark is not None and chain.startswith("ISTIO"):
            if mark.negated:
                return ("over lo, only the proxy's connections (mark "
                        f"{OUTBOUND_MARK}) are intercepted")
            return "already marked by the proxy: leave it"
        if mark is not None:
            return "marked loopback traffic is left alone"
        if src is not None and src.net is not None and src.net.num_addresses == 1 and \
                src.net.network_address in (ipaddress.ip_address("127.0.0.6"),
                                            ipaddress.ip_address("::6")):
            return ("the proxy's inbound passthrough to the app (source "
                    f"{src.net.network_address}) is not captured")
        if iface_out is not None and iface_out.iface == "lo" and owner and owner.negated:
            return "the app calling itself over lo is not captured"
        if owner is not None and not owner.negated:
            ident = owner.ids[0] if owner.ids else None
            if ident in proxy_ids:
                return f"the proxy's own traffic ({who}) is not captured (no loop)"
            return f"{who} is excluded from capture"
        if owner is not None and owner.negated:
            return "only the listed owner groups are captured"
        if dport is not None or dports is not None:
            where = "inbound" if "INBOUND" in chain or chain == "PREROUTING" else "outbound"
            return f"{where} port {ports} is not captured"
        if dst is not None and dst.net is not None:
            if dst.net.network_address.is_loopback:
                return "explicit localhost traffic is not captured"
            return f"traffic to {dst.net} is not captured"
        if iface_in is not None:
            return f"traffic entering on {iface_in.iface} is not captured"
        if iface_out is not None:
            return f"traffic leaving on {iface_out.iface} is not captured"
    if rule.unknown:
        return f"not modelled by remora trace: {', '.join(rule.unknown)}"
    return "if it matches: " + (f"-j {t.chain or t.kind}" if t else "count only")


@dataclass(frozen=True, slots=True)
class ExplainRow:
    family: int
    table: str
    chain: str
    rule: str
    purpose: str


def explain(rs: Ruleset, proxy_ids: frozenset[int] = frozenset({1337})) -> list[ExplainRow]:
    rows = []
    for fam in (4, 6):
        for tname in ("raw", "mangle", "nat", "filter"):
            table = rs.table(fam, tname)
            if table is None:
                continue
            for chain, rules in table.chains.items():
                for rule in rules:
                    rows.append(ExplainRow(fam, tname, chain, rule.text,
                                           purpose(rule, proxy_ids)))
    return rows


# -------------------------------------------------------------------------------- matrix

SERVICE = {4: ipaddress.ip_address("10.96.0.10"), 6: ipaddress.ip_address("fd00:96::a")}
EXTERNAL = {4: ipaddress.ip_address("203.0.113.10"), 6: ipaddress.ip_address("2001:db8::10")}
PEER = {4: ipaddress.ip_address("10.255.0.9"), 6: ipaddress.ip_address("fd00:ff::9")}
LOOPBACK = {4: ipaddress.ip_address("127.0.0.1"), 6: ipaddress.ip_address("::1")}
PASSTHROUGH = {4: ipaddress.ip_address("127.0.0.6"), 6: ipaddress.ip_address("::6")}


@dataclass(frozen=True, slots=True)
class MatrixRow:
    case: str
    connection: Connection
    verdict: Verdict


def inbound_ports(rs: Ruleset) -> list[int]:
    """Ports the rules name for inbound capture or exclusion, plus 8080 as an app port."""
    ports = {8080}
    for rule in rs.rules():
        if "INBOUND" in rule.chain:
            for m in rule.matches:
                if m.kind in ("dport", "dports") and m.module in ("tcp", "multiport", ""):
                    ports.update(lo for lo, _ in m.ports)
    return sorted(ports)


def matrix(rs: Ruleset, ctx: Context, pod: IPAddress, uid: int = 1000,
           proxy_uid: int = 1337, dns_server: IPAddress | None = None,
           iface: str = "eth0") -> list[MatrixRow]:
    fam = pod.version
    dns = dns_server or SERVICE[fam]
    out: list[tuple[str, Connection]] = [
        ("app → service", Connection(direction="outbound", src=pod, dst=SERVICE[fam], dport=80,
                                     uid=uid, gid=uid)),
        ("app → external", Connection(direction="outbound", src=pod, dst=EXTERNAL[fam],
                                      dport=443, uid=uid, gid=uid)),
        ("proxy → external", Connection(direction="outbound", src=pod, dst=EXTERNAL[fam],
                                        dport=443, uid=proxy_uid, gid=proxy_uid)),
        ("proxy → app (passthrough)", Connection(direction="outbound", src=PASSTHROUGH[fam],
                                                 dst=pod, dport=8080, uid=proxy_uid,
                                                 gid=proxy_uid)),
        ("proxy → own pod IP", Connection(direction="outbound", src=pod, dst=pod, dport=8080,
                                          uid=proxy_uid, gid=proxy_uid)),
        ("app → localhost", Connection(direction="outbound", src=LOOPBACK[fam],
                                       dst=LOOPBACK[fam], dport=8080, uid=uid, gid=uid)),
        ("app → own pod IP", Connection(direction="outbound", src=pod, dst=pod, dport=8080,
                                        uid=uid, gid=uid)),
        ("app DNS (udp 53)", Connection(direction="outbound", proto="udp", src=pod, dst=dns,
                                        dport=53, uid=uid, gid=uid)),
        ("app DNS (tcp 53)", Connection(direction="outbound", src=pod, dst=dns, dport=53,
                                        uid=uid, gid=uid)),
        ("agent DNS upstream (udp 53)", Connection(direction="outbound", proto="udp", src=pod,
                                                   dst=dns, dport=53, uid=proxy_uid,
                                                   gid=proxy_uid)),
    ]
    for port in (15020, 15021, 15090):
        out.append((f"probe :{port}", Connection(direction="inbound", src=PEER[fam], dst=pod,
                                                 dport=port, iface=iface)))
    for port in inbound_ports(rs):
        if port in (15020, 15021, 15090):
            continue
        out.append((f"inbound :{port}", Connection(direction="inbound", src=PEER[fam], dst=pod,
                                                   dport=port, iface=iface)))
    rows = []
    for case, conn in out:
        conn = with_defaults(conn, ctx, None if conn.direction == "outbound"
                             and ctx.is_local(conn.dst) else iface)
        rows.append(MatrixRow(case, conn, trace(rs, conn, ctx)))
    return rows


def short_verdict(v: Verdict) -> str:
    if v.captured is None:
        return "? undecided"
    if v.loops:
        return f"LOOP → :{v.redirect_port}"
    if v.captured:
        return f"captured → :{v.redirect_port} ({v.mode})"
    if v.dropped:
        return "dropped"
    return "direct"


def connection_text(c: Connection) -> str:
    dst = f"[{c.dst}]:{c.dport}" if c.dst.version == 6 else f"{c.dst}:{c.dport}"
    who = f" uid {c.uid}" if c.uid is not None else ""
    src = f" from {c.src}" if c.direction == "inbound" or c.src.is_loopback else ""
    return f"{c.proto} {dst}{who}{src}"

