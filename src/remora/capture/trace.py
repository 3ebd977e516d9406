"""Walk one connection's first packet through a rule set, as the kernel would, and say where
it goes and why.

Owns: the rule-set model of `remora trace` (tables of parsed rules per family, from
``iptables-save`` text or from a generated :class:`~remora.capture.rules.RuleSet`), the order
of hooks and tables the kernel visits (including the second pass over ``lo`` of a locally
generated packet to a local address), the evaluation of matches and targets, and the
verdict: captured or not, to which port, by REDIRECT or TPROXY, with the reason in words and
the path of rules visited.
Must not: run anything or read the namespace (the CLI gathers rules and addresses).

Reference: netfilter hook order (raw → mangle → nat → filter at each hook; nat consulted only
for a connection's first packet, once per direction), iptables-extensions(8) for match and
target semantics, spec ``capture-istio-iptables.md`` §6 for what each Istio rule is for.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Literal

from remora.capture.render import scan_save
from remora.capture.rules import IN_REDIRECT, OUTPUT_DNS, REDIRECT, RuleSet
from remora.capture.ruletext import Match, ParsedRule, Table, parse_rule
from remora.errors import BadInput

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Direction = Literal["outbound", "inbound"]

BUILTIN_CHAINS = ("PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING")
TABLE_NAMES = ("raw", "mangle", "nat", "filter")
PASSTHROUGH_SOURCES = (ipaddress.ip_address("127.0.0.6"), ipaddress.ip_address("::6"))


@dataclass(slots=True)
class Ruleset:
    """Rules of both families: ``tables[family][table]``."""

    tables: dict[int, dict[str, Table]] = field(default_factory=lambda: {4: {}, 6: {}})
    origin: str = ""

    def table(self, family: int, name: str) -> Table | None:
        return self.tables.get(family, {}).get(name)

    def rules(self) -> Iterable[ParsedRule]:
        for fam in (4, 6):
            for table in self.tables.get(fam, {}).values():
                for rules in table.chains.values():
                    yield from rules

    @property
    def unknown(self) -> list[tuple[ParsedRule, tuple[str, ...]]]:
        out = [(r, r.unknown) for r in self.rules() if r.unknown]
        for fam in (4, 6):
            for table in self.tables.get(fam, {}).values():
                for rules in table.chains.values():
                    for r in rules:
                        if r.jumps_to and r.jumps_to not in table.chains:
                            out.append((r, (f"-j {r.jumps_to} (no such chain or unknown "
                                            "target)",)))
        return out


def ruleset_from_save(v4: str, v6: str = "", origin: str = "iptables-save") -> Ruleset:
    """Parse ``iptables-save`` / ``ip6tables-save`` text. A line that is not part of that
    format is an error naming the line."""
    rs = Ruleset(origin=origin)
    for family, text in ((4, v4), (6, v6)):
        for ln in scan_save(text):
            where = f"{'ip6tables' if family == 6 else 'iptables'}-save line {ln.number}"
            if ln.kind == "table":
                rs.tables[family].setdefault(ln.table, Table(name=ln.table))
                continue
            if not ln.table:
                raise BadInput(f"{where}: rule outside a table: {ln.text or ln.chain!r}")
            current = rs.tables[family][ln.table]
            if ln.kind == "chain":
                current.chains.setdefault(ln.chain, [])
                if ln.policy and ln.policy != "-":
                    current.policies[ln.chain] = ln.policy
            elif ln.kind == "rule":
                try:
                    rule = parse_rule(ln.text, table=current.name, family=family)
                except BadInput as exc:
                    raise BadInput(f"{where}: {exc}") from None
                current.chains.setdefault(rule.chain, []).append(rule)
            else:
                raise BadInput(f"{where}: cannot parse {ln.text or '-N ' + ln.chain!r}")
    return rs


def ruleset_from_rules(rules: RuleSet, origin: str = "generated") -> Ruleset:
    """The kernel's view of a generated rule set: ``-A``/``-I`` applied in order."""
    rs = Ruleset(origin=origin)
    for family, ops in ((4, rules.v4), (6, rules.v6)):
        for op in ops:
            table = rs.tables[family].setdefault(op.table, Table(name=op.table))
            rule = parse_rule(" ".join(op.params), table=op.table, chain=op.chain, family=family)
            chain = table.chains.setdefault(op.chain, [])
            if op.position is None:
                chain.append(rule)
            else:
                chain.insert(op.position - 1, rule)
            if rule.jumps_to:
                table.chains.setdefault(rule.jumps_to, [])
    return rs


# ------------------------------------------------------------------------------ packets


@dataclass(frozen=True, slots=True, kw_only=True)
class Connection:
    """The first packet of a connection, as the trace sees it."""

    direction: Direction
    proto: Literal["tcp", "udp"] = "tcp"
    src: IPAddress
    sport: int = 40000
    dst: IPAddress
    dport: int
    uid: int | None = None
    gid: int | None = None
    iface: str = "eth0"        # output interface (outbound) or input interface (inbound)

    @property
    def family(self) -> int:
        return self.dst.version


@dataclass(frozen=True, slots=True, kw_only=True)
class Context:
    """What the trace knows about the namespace."""

    local_addresses: frozenset[IPAddress] = frozenset()
    proxy_uids: frozenset[int] = frozenset({1337})
    proxy_gids: frozenset[int] = frozenset({1337})
    tproxy_routed_marks: frozenset[int] | None = None  # None: unknown (not a live namespace)

    def is_local(self, addr: IPAddress) -> bool:
        return addr.is_loopback or addr in self.local_addresses


@dataclass(slots=True)
class _Packet:
    conn: Connection
    src: IPAddress
    dst: IPAddress
    sport: int
    dport: int
    in_iface: str
    out_iface: str
    mark: int = 0
    ctmark: int = 0
    zone: int = 0
    nat_done: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class Step:
    """One rule visited."""

    hook: str
    table: str
    chain: str
    rule: str
    matched: bool | None

    def as_json(self) -> dict[str, object]:
        return {"hook": self.hook, "table": self.table, "chain": self.chain, "rule": self.rule,
                "matched": self.matched}


@dataclass(slots=True)
class Verdict:
    captured: bool | None
    redirect_port: int | None
    mode: Literal["REDIRECT", "TPROXY"] | None
    reason: str
    path: list[Step]
    connection: Connection
    final_dst: str = ""
    loops: bool = False
    dropped: bool = False
    notes: list[str] = field(default_factory=list)

    def as_json(self) -> dict[str, object]:
        c = self.connection
        return {
            "captured": self.captured,
            "redirect_port": self.redirect_port,
            "mode": self.mode,
            "reason": self.reason,
            "loops": self.loops,
            "dropped": self.dropped,
            "final_dst": self.final_dst,
            "notes": self.notes,
            "connection": {"direction": c.direction, "proto": c.proto, "src": str(c.src),
                           "sport": c.sport, "dst": str(c.dst), "dport": c.dport, "uid": c.uid,
                           "gid": c.gid, "iface": c.iface},
            "path": [s.as_json() for s in self.path],
        }


# ----------------------------------------------------------------------------- matching


def _port_in(port: int, ranges: tuple[tuple[int, int], ...]) -> bool:
    return any(lo <= port <= hi for lo, hi in ranges)


def _iface_eq(pattern: str, name: str) -> bool:
    if pattern.endswith("+"):
        return name.startswith(pattern[:-1])
    return name == pattern


def match_one(m: Match, p: _Packet, hook: str) -> bool | None:
    """One match against a packet: True, False, or None when not modelled."""
    c = p.conn
    if m.kind == "comment":
        return True
    if m.kind == "family":
        # nft's implicit dependency of an `ip`/`ip6` expression: other families never match.
        return (p.dst.version == (4 if m.proto == "ipv4" else 6)) != m.negated
    if m.kind == "unknown":
        return None
    if m.kind in ("src", "dst"):
        addr = p.src if m.kind == "src" else p.dst
        assert m.net is not None
        hit = addr.version == m.net.version and addr in m.net
    elif m.kind in ("in", "out"):
        name = p.in_iface if m.kind == "in" else p.out_iface
        if not name and m.module == "meta":
            return False  # nft: no such interface in this hook never matches, even with !=
        hit = bool(name) and _iface_eq(m.iface, name)
    elif m.kind == "proto":
        hit = m.proto in ("all", "0") or m.proto == c.proto
    elif m.kind in ("dport", "sport", "dports", "sports", "ports"):
        if c.proto != (m.module if m.module in ("tcp", "udp") else c.proto):
            return False  # a tcp match never matches a udp packet, negated or not
        if m.kind in ("dport", "dports"):
            hit = _port_in(p.dport, m.ports)
        elif m.kind in ("sport", "sports"):
            hit = _port_in(p.sport, m.ports)
        else:
            hit = _port_in(p.dport, m.ports) or _port_in(p.sport, m.ports)
    elif m.kind in ("uid", "gid"):
        if hook not in ("OUTPUT", "POSTROUTING"):
            # No local socket: iptables' owner match is true only if every test is negated;
            # nft's meta skuid/skgid never matches.
            return m.negated and m.module != "meta"
        if m.ids is None:
            return None  # a name the kernel would have resolved; we cannot
        ident = c.uid if m.kind == "uid" else c.gid
        if ident is None:
            return None
        hit = m.ids[0] <= ident <= m.ids[1]
    elif m.kind in ("mark", "connmark"):
        assert m.mark is not None
        value, mask = m.mark
        hit = ((p.mark if m.kind == "mark" else p.ctmark) & mask) == value
    elif m.kind == "ctstate":
        hit = "NEW" in m.states   # the first packet of a connection
    else:  # pragma: no cover - every kind is handled above
        return None
    return hit != m.negated


def match_rule(rule: ParsedRule, p: _Packet, hook: str) -> bool | None:
    undecided = False
    for m in rule.matches:
        hit = match_one(m, p, hook)
        if hit is False:
            return False
        if hit is None:
            undecided = True
    return None if undecided else True


# ------------------------------------------------------------------------------- walking


@dataclass(slots=True)
class _Walk:
    path: list[Step] = field(default_factory=list)
    redirect: tuple[int, ParsedRule] | None = None
    tproxy: tuple[int, ParsedRule] | None = None
    dropped_by: ParsedRule | None = None
    unknown: ParsedRule | None = None
    # The first RETURN/ACCEPT per table on the connection's own hooks: what let it through.
    decisive: dict[str, ParsedRule] = field(default_factory=dict)

    def decided(self, rule: ParsedRule, hook: str, direction: Direction) -> None:
        if direction == "inbound" or hook in ("OUTPUT", "POSTROUTING"):
            self.decisive.setdefault(rule.table, rule)

    def reason_rule(self, direction: Direction) -> ParsedRule | None:
        order = ("nat", "mangle") if direction == "outbound" else ("mangle", "nat")
        for table in order:
            if table in self.decisive:
                return self.decisive[table]
        return next(iter(self.decisive.values()), None)


def _run_chain(table: Table, chain: str, p: _Packet, hook: str, walk: _Walk) -> str:
    """Run a built-in chain; returns "continue", "accept", "drop", "stop" (nat done or
    TPROXY) or "unknown"."""
    frames: list[tuple[str, int]] = [(chain, 0)]
    while frames:
        name, idx = frames.pop()
        rules = table.chains.get(name, [])
        jumped = False
        while idx < len(rules):
            rule = rules[idx]
            idx += 1
            hit = match_rule(rule, p, hook)
            walk.path.append(Step(hook=hook, table=table.name, chain=name, rule=rule.text,
                                  matched=hit))
            if hit is False:
                continue
            if hit is None:
                walk.unknown = rule
                return "unknown"
            t = rule.target
            if t is None or t.kind == "LOG":
                continue
            if t.kind in ("jump", "goto"):
                if t.chain not in table.chains:
                    walk.unknown = rule
                    return "unknown"
                if t.kind == "jump":
                    frames.append((name, idx))
                frames.append((t.chain, 0))
                jumped = True
                break
            if t.kind == "RETURN":
                walk.decided(rule, hook, p.conn.direction)
                break  # back to the caller, or the policy of a built-in chain
            if t.kind == "ACCEPT":
                walk.decided(rule, hook, p.conn.direction)
                return "accept"
            if t.kind in ("DROP", "REJECT"):
                walk.dropped_by = rule
                return "drop"
            if t.kind == "REDIRECT":
                port = t.to_ports[0] if t.to_ports else p.dport
                p.dst = (ipaddress.ip_address("127.0.0.1") if p.dst.version == 4
                         else ipaddress.ip_address("::1")) if hook == "OUTPUT" else p.dst
                p.dport = port
                walk.redirect = (port, rule)
                return "stop"
            if t.kind == "TPROXY":
                if t.mark is not None:
                    value, mask = t.mark
                    p.mark = (p.mark & ~mask) ^ value
                walk.tproxy = (t.on_port or p.dport, rule)
                return "stop"
            if t.kind == "MARK" and t.mark is not None:
                value, mask = t.mark
                p.mark = ((p.mark & ~mask) ^ value) & 0xFFFFFFFF
            elif t.kind == "CONNMARK":
                nfmask, ctmask = t.masks
                if t.mark_op == "save":
                    p.ctmark = (p.ctmark & ~ctmask) ^ (p.mark & nfmask)
                else:
                    p.mark = (p.mark & ~nfmask) ^ (p.ctmark & ctmask)
            elif t.kind == "CT":
                p.zone = t.zone or 0
            elif t.kind == "unknown":
                walk.unknown = rule
                return "unknown"
        if jumped:
            continue
    if table.policies.get(chain, "ACCEPT") == "DROP":
        return "drop"
    return "continue"


def _hooks(direction: Direction, second_pass: bool) -> list[tuple[str, tuple[str, ...]]]:
    if direction == "inbound":
        return [("PREROUTING", ("raw", "mangle", "nat")), ("INPUT", ("mangle", "filter", "nat"))]
    hooks: list[tuple[str, tuple[str, ...]]] = [("OUTPUT", ("raw", "mangle", "nat", "filter")),
                                                ("POSTROUTING", ("mangle", "nat"))]
    if second_pass:
        # Over lo the packet comes back in; nat was settled at OUTPUT/POSTROUTING.
        hooks += [("PREROUTING", ("raw", "mangle")), ("INPUT", ("mangle", "filter"))]
    return hooks


def trace(rs: Ruleset, conn: Connection, ctx: Context | None = None) -> Verdict:
    ctx = ctx or Context()
    tables = rs.tables.get(conn.family, {})
    p = _Packet(conn=conn, src=conn.src, dst=conn.dst, sport=conn.sport, dport=conn.dport,
                in_iface=conn.iface if conn.direction == "inbound" else "",
                out_iface=conn.iface if conn.direction == "outbound" else "")
    walk = _Walk()
    state = "continue"
    hooks = _hooks(conn.direction, False)
    i = 0
    while i < len(hooks):
        hook, names = hooks[i]
        i += 1
        if conn.direction == "outbound" and hook == "PREROUTING":
            p.in_iface, p.out_iface = "lo", ""
        for name in names:
            table = tables.get(name)
            if table is None:
                continue
            if name == "nat" and (p.nat_done or (hook == "INPUT")):
                continue
            state = _run_chain(table, hook, p, hook, walk)
            if name == "nat":
                p.nat_done = hook in ("OUTPUT", "PREROUTING") or p.nat_done
            if state in ("drop", "unknown"):
                break
        if state in ("drop", "unknown"):
            break
        if conn.direction == "outbound" and hook == "POSTROUTING" and (
                p.out_iface == "lo" or ctx.is_local(p.dst)):
            hooks += _hooks("outbound", True)[2:]
    return _verdict(walk, state, conn, ctx, p)


def _verdict(walk: _Walk, state: str, conn: Connection, ctx: Context, p: _Packet) -> Verdict:
    v = Verdict(captured=False, redirect_port=None, mode=None, reason="", path=walk.path,
                connection=conn, final_dst=_ep(p.dst, p.dport))
    if state == "unknown" and walk.unknown is not None:
        v.captured = None
        parts = walk.unknown.unknown or (walk.unknown.text,)
        v.reason = (f"undecided: rule `{walk.unknown.text}` uses {', '.join(parts)}, which "
                    "remora trace does not model")
        return v
    if state == "drop" or walk.dropped_by is not None:
        v.dropped = True
        rule = walk.dropped_by
        v.reason = f"not captured: dropped by `{rule.text}`" if rule else \
            "not captured: dropped by a chain policy"
        return v
    if walk.tproxy is not None:
        port, rule = walk.tproxy
        v.captured, v.redirect_port, v.mode = True, port, "TPROXY"
        mark = rule.target.mark[0] if rule.target and rule.target.mark else p.mark
        v.reason = f"captured inbound by TPROXY to {port}, mark {mark}"
        if walk.redirect is not None:
            v.notes.append(f"nat also rewrites the destination to port {walk.redirect[0]} "
                           f"(`{walk.redirect[1].text}`): the transparent listener accepts "
                           "it, but its local address shows that port; SO_ORIGINAL_DST still "
                           f"gives {conn.dport}")
        if ctx.tproxy_routed_marks is not None and mark not in ctx.tproxy_routed_marks:
            v.notes.append(f"no `ip rule fwmark {mark}` routes the marked packet to lo: it "
                           "would not reach the listener")
        if conn.src in PASSTHROUGH_SOURCES:
            v.loops = True
            v.reason = ("loops: the proxy's own inbound passthrough (source "
                        f"{conn.src}) would be captured again")
        return v
    if walk.redirect is not None:
        port, rule = walk.redirect
        v.captured, v.redirect_port, v.mode = True, port, "REDIRECT"
        kind = _capture_kind(rule, conn)
        v.reason = f"captured: REDIRECT to {port} ({kind})"
        proxy = (conn.uid is not None and conn.uid in ctx.proxy_uids) or (
            conn.gid is not None and conn.gid in ctx.proxy_gids)
        if kind == "outbound" and proxy:
            v.loops = True
            who = f"uid {conn.uid}" if conn.uid in ctx.proxy_uids else f"gid {conn.gid}"
            v.reason = f"loops: the proxy's own connection ({who}) would be captured again"
        elif kind == "inbound" and conn.src in PASSTHROUGH_SOURCES:
            v.loops = True
            v.reason = ("loops: the proxy's own inbound passthrough (source "
                        f"{conn.src}) would be captured again")
        return v
    v.reason = "not captured: " + _why_not(walk.reason_rule(conn.direction), conn)
    return v


def _ep(addr: IPAddress, port: int) -> str:
    return f"[{addr}]:{port}" if addr.version == 6 else f"{addr}:{port}"


def _chain_is(chain: str, iptables_name: str) -> bool:
    """Istio's chain names: ``ISTIO_IN_REDIRECT`` (iptables) or ``istio-in-redirect`` (nft)."""
    return chain in (iptables_name, iptables_name.lower().replace("_", "-"))


def _capture_kind(rule: ParsedRule, conn: Connection) -> str:
    if _chain_is(rule.chain, REDIRECT):
        return "outbound"
    if _chain_is(rule.chain, IN_REDIRECT):
        return "inbound"
    if _chain_is(rule.chain, OUTPUT_DNS) or (rule.target and rule.target.to_ports
                                             and rule.target.to_ports[0] == 15053):
        return "DNS"
    return conn.direction


def _why_not(rule: ParsedRule | None, conn: Connection) -> str:
    if rule is None:
        return "no rule redirects it"
    kinds: dict[str, Match] = {}
    for m in rule.matches:
        kinds.setdefault(m.kind, m)
    uid, gid = kinds.get("uid"), kinds.get("gid")
    src, dst = kinds.get("src"), kinds.get("dst")
    text = f"`{rule.text}`"
    if src is not None and not src.negated and src.net is not None \
            and any(a in src.net for a in PASSTHROUGH_SOURCES if a.version == src.net.version):
        return f"source {conn.src} is the proxy's inbound passthrough ({text})"
    if kinds.get("out") and kinds["out"].iface == "lo" and (
            (uid and uid.negated) or (gid and gid.negated)):
        return f"the app calling itself over lo is not captured ({text})"
    if uid is not None and not uid.negated:
        return f"uid {conn.uid} is the proxy ({text})"
    if gid is not None and not gid.negated:
        return f"gid {conn.gid} is the proxy's group ({text})"
    if gid is not None and gid.negated:
        return f"gid {conn.gid} is not in the captured owner groups ({text})"
    for key in ("dport", "dports"):
        port_match = kinds.get(key)
        if port_match is not None and not port_match.negated:
            side = "inbound" if "INBOUND" in rule.chain.upper() or rule.chain == "PREROUTING" \
                else "outbound"
            return f"port {conn.dport} is excluded ({side}) ({text})"
    if dst is not None and not dst.negated and dst.net is not None:
        if dst.net.network_address.is_loopback:
            return f"destination {conn.dst} is localhost ({text})"
        return f"destination {conn.dst} is in the excluded range {dst.net} ({text})"
    for key in ("in", "out"):
        iface = kinds.get(key)
        if iface is not None and not iface.negated and iface.iface != "lo":
            return f"interface {iface.iface} is excluded ({text})"
    if "mark" in kinds:
        return f"the packet's mark says the proxy handles it ({text})"
    if kinds.get("in") and kinds["in"].iface == "lo":
        return f"traffic over lo is not intercepted ({text})"
    return f"{text} returns it"


def local_context(addresses: Iterable[IPAddress], rs: Ruleset,
                  routed_marks: Iterable[int] | None = None) -> Context:
    """A context from the namespace's addresses, with the proxy's ids read off the rules
    (``-m owner --uid-owner N -j RETURN`` in ISTIO_OUTPUT) plus Istio's 1337, so a proxy
    running as 1337 under rules written for another uid shows up as a loop."""
    uids: set[int] = set()
    gids: set[int] = set()
    for rule in rs.rules():
        if not _chain_is(rule.chain, "ISTIO_OUTPUT") or rule.target is None \
                or rule.target.kind != "RETURN":
            continue
        owners = [m for m in rule.matches if m.kind in ("uid", "gid")]
        if len(owners) == 1 and not owners[0].negated and owners[0].ids \
                and len(rule.matches) == 1:
            (uids if owners[0].kind == "uid" else gids).add(owners[0].ids[0])
    return Context(local_addresses=frozenset(addresses),
                   proxy_uids=frozenset(uids | {1337}), proxy_gids=frozenset(gids | {1337}),
                   tproxy_routed_marks=None if routed_marks is None else frozenset(routed_marks))


def with_defaults(conn: Connection, ctx: Context, iface: str | None,
                  routes: Mapping[IPAddress, str] | None = None) -> Connection:
    """Fill in the interface: lo for local destinations (outbound), else the route's."""
    if iface:
        return replace(conn, iface=iface)
    if conn.direction == "outbound":
        if ctx.is_local(conn.dst):
            return replace(conn, iface="lo")
        if routes and conn.dst in routes:
            return replace(conn, iface=routes[conn.dst])
    return conn
