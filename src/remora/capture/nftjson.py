"""Native nftables rules (``nft -j list ruleset``) as the rule set `remora trace` walks.

Owns: :func:`ruleset_from_nft_json`, the pure translation of nft's JSON listing into a
:class:`~remora.capture.trace.Ruleset`: base chains placed where the walker looks for them
(a table kind from the chain's type and priority, a built-in chain name from its hook),
regular chains under their own names, every rule's expressions turned into the
:class:`~remora.capture.ruletext.Match`/:class:`~remora.capture.ruletext.Target` model, and
each rule's nft text (``ParsedRule.native``) rendered from its expressions so a trace shows
nft syntax. An ``inet`` table feeds both families, ``ip`` only IPv4, ``ip6`` only IPv6.

Must not: run ``nft`` or read a namespace (the caller passes the text), or guess: an expression
or statement outside the model becomes an *unknown* match or target naming it, and a base
chain the walker has no place for (a second one at the same hook and priority, an unusual
priority, an ingress/egress hook) becomes an unknown rule at the head of its hook, so a trace
that passes there is undecided rather than wrong.

What maps where (the walker visits tables raw, mangle, nat, filter at each hook):

* ``type filter`` priority -300 → raw; ``type filter``/``type route`` priority -150 →
  mangle; ``type nat`` priority -100 (prerouting/output) or 100 (input/postrouting) → nat;
  ``type filter`` priority 0 → filter. Hooks prerouting/input/output/postrouting become
  PREROUTING/INPUT/OUTPUT/POSTROUTING, and a base chain's policy the table's policy there;
  forward chains are left out (never on a local connection's path), as are ``bridge`` and
  ``arp`` tables, dormant tables, and base chains with no rules and an accept policy.
  Regular chains of two tables placed in the same kind that share a name are renamed
  ``table/chain`` (jumps follow).
* nft hides the dependencies of an expression in its listing: ``ip daddr`` in an ``inet``
  table only matches IPv4 and ``tcp dport`` only TCP. The first is made explicit here with a
  ``family`` match; the second is implied by the port match's module (tcp/udp), which never
  matches the other protocol, negated or not — as in nft.
* ``tproxy … [meta mark set M] accept`` is one TPROXY target (nft's tproxy statement does not
  end the rule; Istio's rules always end it with ``accept``); ``redirect`` is REDIRECT;
  ``meta mark set`` MARK; ``ct mark set meta mark`` / ``meta mark set ct mark`` CONNMARK
  save/restore; ``ct zone set`` CT. ``counter`` and ``log`` have no effect on the packet and
  are left out of the model (they stay in the text).
* Tables written by iptables-nft list their extensions as ``xt match "owner"`` without the
  options: those are unknown here (read such rules with ``iptables-save`` instead).

Reference: nft(8) and libnftables-json(5) for the JSON schema; the Istio nftables goldens in
``shared/conformance/istio-iptables/nftables/`` for the rule shapes that must be modelled.
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from typing import Any

from remora.capture.ruletext import (
    FULL_MASK,
    Match,
    MatchKind,
    ParsedRule,
    Table,
    Target,
    TargetKind,
)
from remora.capture.trace import Ruleset
from remora.errors import BadInput

Json = Any  # a decoded JSON value; every access below checks its shape

FAMILIES: dict[str, tuple[int, ...]] = {"ip": (4,), "ip6": (6,), "inet": (4, 6),
                                        "netdev": (4, 6)}
HOOKS = {"prerouting": "PREROUTING", "input": "INPUT", "output": "OUTPUT",
         "postrouting": "POSTROUTING"}
# The tables the walker visits at each built-in chain, in its order (both directions).
WALKED: dict[str, tuple[str, ...]] = {
    "PREROUTING": ("raw", "mangle", "nat"),
    "INPUT": ("mangle", "filter", "nat"),
    "OUTPUT": ("raw", "mangle", "nat", "filter"),
    "POSTROUTING": ("mangle", "nat"),
}
# Where a chain the walker cannot place makes a trace undecided: at the head of the hook.
_MARKER_HOOK = {"ingress": "PREROUTING", "egress": "POSTROUTING"}

_UNQUALIFIED_META = frozenset({"iif", "oif", "iifname", "oifname", "iifgroup", "oifgroup"})
_IFACE_KEYS = frozenset({"iif", "oif", "iifname", "oifname"})
_MARK_KEYS = ("meta mark", "ct mark")
_L4 = {6: "tcp", 17: "udp", 1: "icmp", 58: "ipv6-icmp", 132: "sctp"}
_CT_STATES = frozenset({"new", "established", "related", "invalid", "untracked"})
# Statements with no effect on the packet or the verdict.
_NO_EFFECT = frozenset({"counter", "log"})
# Statements that can stop the rule (rate and quota limits): conditions we do not model.
_CONDITIONAL = frozenset({"limit", "quota", "connlimit", "meter"})


class _Unmodelled(Exception):
    """An expression outside the model (caught per expression, never escapes)."""


# ------------------------------------------------------------------------------ rendering


def _lhs(expr: Json) -> str:
    """An expression that yields a value (the left side of a match, a set key)."""
    if isinstance(expr, dict) and len(expr) == 1:
        key, val = next(iter(expr.items()))
        if key == "meta" and isinstance(val, dict):
            k = str(val.get("key", "?"))
            return k if k in _UNQUALIFIED_META else f"meta {k}"
        if key == "payload" and isinstance(val, dict):
            if "protocol" in val:
                return f"{val['protocol']} {val.get('field', '?')}"
            return f"@{val.get('base', '?')},{val.get('offset', '?')},{val.get('len', '?')}"
        if key == "ct" and isinstance(val, dict):
            direction = f"{val['dir']} " if "dir" in val else ""
            return f"ct {direction}{val.get('key', '?')}"
        if key in ("&", "|", "^", "<<", ">>") and isinstance(val, list) and len(val) == 2:
            return f"{_lhs(val[0])} {key} {_value(val[1], _lhs(val[0]))}"
    return _value(expr, "")


def _value(v: Json, hint: str) -> str:
    """A right-hand value, formatted as nft lists it (``hint`` is the left side's text)."""
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, int):
        return f"0x{v:08x}" if hint.startswith(_MARK_KEYS) else str(v)
    if isinstance(v, str):
        bare = hint.removeprefix("meta ")
        return f'"{v}"' if bare in _IFACE_KEYS or " " in v else v
    if isinstance(v, list):
        return ",".join(_value(x, hint) for x in v)
    if isinstance(v, dict) and len(v) == 1:
        key, val = next(iter(v.items()))
        if key == "set" and isinstance(val, list):
            return "{ " + ", ".join(_value(x, hint) for x in val) + " }"
        if key == "prefix" and isinstance(val, dict):
            return f"{val.get('addr')}/{val.get('len')}"
        if key == "range" and isinstance(val, list) and len(val) == 2:
            return f"{_value(val[0], hint)}-{_value(val[1], hint)}"
        if key == "concat" and isinstance(val, list):
            return " . ".join(_lhs(x) for x in val)
        if key in ("meta", "payload", "ct", "&", "|", "^", "<<", ">>"):
            return _lhs(v)
    return json.dumps(v, separators=(",", ":"))


def _match_text(m: Json) -> str:
    if not isinstance(m, dict):
        return json.dumps(m, separators=(",", ":"))
    left = _lhs(m.get("left"))
    op = m.get("op", "==")
    right = _value(m.get("right"), left)
    # nft leaves out == (and the implicit flag test), except after a binary operation.
    binop = isinstance(m.get("left"), dict) and any(k in m["left"] for k in "&|^")
    return f"{left} {right}" if op == "in" or (op == "==" and not binop) \
        else f"{left} {op} {right}"


def _endpoint(addr: Json, port: Json) -> str:
    host = "" if addr is None else (f"[{addr}]" if ":" in str(addr) else str(addr))
    return host + ("" if port is None else f":{_value(port, '')}")


def _statement_text(key: str, val: Json) -> str:
    if key == "match":
        return _match_text(val)
    if key in ("accept", "drop", "return", "continue", "counter", "masquerade", "notrack"):
        return key
    if key in ("jump", "goto") and isinstance(val, dict):
        return f"{key} {val.get('target')}"
    if key == "redirect":
        if isinstance(val, dict) and "port" in val:
            return f"redirect to :{_value(val['port'], '')}"
        return "redirect"
    if key == "tproxy" and isinstance(val, dict):
        fam = f"{val['family']} " if "family" in val else ""
        return f"tproxy {fam}to {_endpoint(val.get('addr'), val.get('port'))}"
    if key in ("dnat", "snat") and isinstance(val, dict):
        fam = f"{val['family']} " if "family" in val else ""
        return f"{key} {fam}to {_endpoint(val.get('addr'), val.get('port'))}"
    if key == "mangle" and isinstance(val, dict):
        target = _lhs(val.get("key"))
        return f"{target} set {_value(val.get('value'), target)}"
    if key == "log":
        if isinstance(val, dict) and "prefix" in val:
            return f'log prefix "{val["prefix"]}"'
        return "log"
    if key == "reject":
        if isinstance(val, dict) and "type" in val:
            return f"reject with {val['type']}"
        return "reject"
    if key == "xt" and isinstance(val, dict):
        return f'xt {val.get("type", "?")} "{val.get("name", "?")}"'
    if key == "limit" and isinstance(val, dict):
        return f"limit rate {val.get('rate')}/{val.get('per')}"
    if val is None:
        return key
    return f"{key} {json.dumps(val, separators=(',', ':'))}"


def rule_text(exprs: Iterable[Json]) -> str:
    """A rule's expressions as ``nft list`` shows them (counters without their values)."""
    parts = []
    for e in exprs:
        if isinstance(e, dict) and len(e) == 1:
            key, val = next(iter(e.items()))
            parts.append(_statement_text(str(key), val))
        else:
            parts.append(json.dumps(e, separators=(",", ":")))
    return " ".join(parts)


def _native(rule: Json) -> str:
    text = rule_text(rule.get("expr") or [])
    comment = rule.get("comment")
    return f'{text} comment "{comment}"' if isinstance(comment, str) else text


# -------------------------------------------------------------------------------- matches


def _unknown(text: str) -> Match:
    return Match(kind="unknown", module="nft", text=text)


def _ranges(right: Json, op: str, top: int) -> tuple[tuple[tuple[int, int], ...], bool]:
    """Numbers, ranges and anonymous sets of them; relational operators as ranges.
    Returns the ranges and whether the match is negated."""

    def one(v: Json) -> tuple[int, int]:
        if isinstance(v, bool):
            raise _Unmodelled
        if isinstance(v, int):
            return v, v
        if isinstance(v, str) and v.isdigit():
            return int(v), int(v)
        if isinstance(v, dict) and isinstance(v.get("range"), list) and len(v["range"]) == 2:
            lo, hi = one(v["range"][0])[0], one(v["range"][1])[0]
            return lo, hi
        raise _Unmodelled  # a named set, a service name, a map …

    if op in ("<", "<=", ">", ">="):
        n = one(right)[0]
        lo, hi = {"<": (0, n - 1), "<=": (0, n), ">": (n + 1, top), ">=": (n, top)}[op]
        if lo > hi:
            raise _Unmodelled
        return ((lo, hi),), False
    if op not in ("==", "!=", "in"):
        raise _Unmodelled
    if isinstance(right, dict) and isinstance(right.get("set"), list):
        return tuple(one(x) for x in right["set"]), op == "!="
    return (one(right),), op == "!="


def _net(right: Json, version: int) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    if isinstance(right, str) and not right.startswith("@"):
        text = right
    elif isinstance(right, dict) and isinstance(right.get("prefix"), dict):
        text = f"{right['prefix'].get('addr')}/{right['prefix'].get('len')}"
    else:
        raise _Unmodelled  # a set, a range of addresses, a named set
    try:
        net = ipaddress.ip_network(text, strict=False)
    except ValueError:
        raise _Unmodelled from None
    if net.version != version:
        raise _Unmodelled
    return net


def _family(proto: str) -> Match:
    return Match(kind="family", proto=proto)


def _iface(right: Json) -> str:
    if not isinstance(right, str) or right.startswith("@") or right.endswith("+"):
        raise _Unmodelled  # a set, or a name the model would read as a prefix
    if right.endswith("\\*"):
        return right[:-2] + "*"
    if right.endswith("*"):
        return right[:-1] + "+"   # nft's wildcard is the model's (iptables') prefix
    return right


def _match(m: Json) -> list[Match]:
    """One ``match`` expression as model matches (a family match first for ip/ip6)."""
    if not isinstance(m, dict) or not isinstance(m.get("left"), dict):
        raise _Unmodelled
    op = m.get("op", "==")
    left, right = m["left"], m.get("right")
    neg = op == "!="
    eq_ops = ("==", "!=", "in")
    if "meta" in left and isinstance(left["meta"], dict):
        key = left["meta"].get("key")
        if key == "l4proto" and op in eq_ops:
            if isinstance(right, int) and not isinstance(right, bool):
                right = _L4.get(right, str(right))
            if not isinstance(right, str) or right.startswith("@"):
                raise _Unmodelled
            return [Match(kind="proto", negated=neg, proto=right)]
        if key in ("nfproto", "protocol") and op in eq_ops:
            which = {"ipv4": "ipv4", "ipv6": "ipv6", "ip": "ipv4", "ip6": "ipv6"}.get(str(right))
            if which is None:
                raise _Unmodelled
            return [Match(kind="family", negated=neg, proto=which)]
        if key in ("iifname", "oifname", "iif", "oif") and op in eq_ops:
            kind: MatchKind = "in" if key in ("iifname", "iif") else "out"
            return [Match(kind=kind, negated=neg, module="meta", iface=_iface(right))]
        if key in ("skuid", "skgid"):
            if isinstance(right, str) and not right.isdigit() and not right.startswith("@") \
                    and op in eq_ops:
                return [Match(kind="uid" if key == "skuid" else "gid", negated=neg,
                              module="meta", name=right)]
            ranges, neg = _ranges(right, op, 0xFFFFFFFF)
            if len(ranges) != 1:
                raise _Unmodelled
            return [Match(kind="uid" if key == "skuid" else "gid", negated=neg, module="meta",
                          ids=ranges[0])]
        if key == "mark" and op in ("==", "!="):
            return [Match(kind="mark", negated=neg, module="meta", mark=(_int(right),
                                                                          FULL_MASK))]
        raise _Unmodelled
    if "payload" in left and isinstance(left["payload"], dict):
        proto, fld = left["payload"].get("protocol"), left["payload"].get("field")
        if proto in ("ip", "ip6"):
            fam = _family("ipv4" if proto == "ip" else "ipv6")
            version = 4 if proto == "ip" else 6
            if fld in ("saddr", "daddr") and op in eq_ops:
                return [fam, Match(kind="src" if fld == "saddr" else "dst", negated=neg,
                                   net=_net(right, version))]
            if fld in ("protocol", "nexthdr") and op in eq_ops and isinstance(right, str) \
                    and not right.startswith("@"):
                # nexthdr is the first header after the fixed one: the transport protocol
                # for the packets a trace follows (no extension headers).
                return [fam, Match(kind="proto", negated=neg, proto=right)]
            raise _Unmodelled
        if proto in ("tcp", "udp") and fld in ("dport", "sport"):
            ranges, neg = _ranges(right, op, 0xFFFF)
            return [Match(kind="dport" if fld == "dport" else "sport", negated=neg,
                          module=str(proto), ports=ranges)]
        raise _Unmodelled
    if "ct" in left and isinstance(left["ct"], dict) and "dir" not in left["ct"]:
        key = left["ct"].get("key")
        if key == "state" and op in eq_ops:
            values = right if isinstance(right, list) else [right]
            states = tuple(str(v).upper() for v in values if isinstance(v, str)
                           and v in _CT_STATES)
            if not states or len(states) != len(values):
                raise _Unmodelled
            return [Match(kind="ctstate", negated=neg, module="ct", states=states)]
        if key == "mark" and op in ("==", "!="):
            return [Match(kind="connmark", negated=neg, module="ct",
                          mark=(_int(right), FULL_MASK))]
        raise _Unmodelled
    if "&" in left and isinstance(left["&"], list) and len(left["&"]) == 2 \
            and op in ("==", "!="):
        inner, mask = left["&"]
        if inner == {"meta": {"key": "mark"}}:
            return [Match(kind="mark", negated=neg, module="meta",
                          mark=(_int(right), _int(mask)))]
        if inner == {"ct": {"key": "mark"}}:
            return [Match(kind="connmark", negated=neg, module="ct",
                          mark=(_int(right), _int(mask)))]
    raise _Unmodelled


def _int(v: Json) -> int:
    if isinstance(v, bool):
        raise _Unmodelled
    if isinstance(v, int):
        return v
    if isinstance(v, str):
        try:
            return int(v, 0)
        except ValueError:
            raise _Unmodelled from None
    raise _Unmodelled


# -------------------------------------------------------------------------------- targets

_SIMPLE: dict[str, TargetKind] = {"accept": "ACCEPT", "drop": "DROP", "return": "RETURN",
                                  "reject": "REJECT"}
_META_MARK = {"meta": {"key": "mark"}}
_CT_MARK = {"ct": {"key": "mark"}}


def _xmark(value: Json) -> tuple[int, int]:
    """``meta mark set <value>`` as MARK's (value, mask): new = (mark & ~mask) ^ value."""
    if not isinstance(value, dict):
        return _int(value) & FULL_MASK, FULL_MASK
    if len(value) != 1:
        raise _Unmodelled
    op, args = next(iter(value.items()))
    if not isinstance(args, list) or len(args) != 2:
        raise _Unmodelled
    base, operand = args
    if op == "&" and base == _META_MARK:
        return 0, ~_int(operand) & FULL_MASK            # keep the operand's bits
    if op not in ("|", "^"):
        raise _Unmodelled
    if base == _META_MARK:
        keep = FULL_MASK
    elif isinstance(base, dict) and isinstance(base.get("&"), list) \
            and len(base["&"]) == 2 and base["&"][0] == _META_MARK:
        keep = _int(base["&"][1]) & FULL_MASK
    else:
        raise _Unmodelled
    v = _int(operand) & FULL_MASK
    if op == "|":
        # (mark & keep) | v == (mark & (keep & ~v)) ^ v
        return v, ~(keep & ~v) & FULL_MASK
    return v, ~keep & FULL_MASK                          # (mark & keep) ^ v


def _masked(value: Json, source: Json) -> int | None:
    """``source`` or ``source & M``: the mask M (all ones for the plain form), else None."""
    if value == source:
        return FULL_MASK
    if isinstance(value, dict) and isinstance(value.get("&"), list) and len(value["&"]) == 2 \
            and value["&"][0] == source:
        return _int(value["&"][1]) & FULL_MASK
    return None


def _mangle(val: Json) -> Target:
    if not isinstance(val, dict):
        raise _Unmodelled
    key, value = val.get("key"), val.get("value")
    if key == _META_MARK:
        from_ct = _masked(value, _CT_MARK)
        if from_ct is not None:   # meta mark set ct mark [& M]: CONNMARK --restore-mark
            return Target(kind="CONNMARK", mark_op="restore", masks=(FULL_MASK, from_ct))
        return Target(kind="MARK", mark_op="set-xmark", mark=_xmark(value))
    if key == _CT_MARK:
        from_meta = _masked(value, _META_MARK)
        if from_meta is not None:  # ct mark set meta mark [& M]: CONNMARK --save-mark
            return Target(kind="CONNMARK", mark_op="save", masks=(from_meta, FULL_MASK))
        raise _Unmodelled
    if key == {"ct": {"key": "zone"}} and isinstance(value, int) and not isinstance(value, bool):
        return Target(kind="CT", zone=value)
    raise _Unmodelled


def _target(stmts: list[tuple[str, Json]]) -> tuple[Target | None, list[Match]]:
    """The statements after the matches as one target (plus matches they imply)."""
    if not stmts:
        return None, []
    keys = [k for k, _ in stmts]
    try:
        if len(stmts) == 1:
            key, val = stmts[0]
            if key in _SIMPLE:
                return Target(kind=_SIMPLE[key]), []
            if key == "continue":
                return None, []
            if key in ("jump", "goto") and isinstance(val, dict) \
                    and isinstance(val.get("target"), str):
                return Target(kind="jump" if key == "jump" else "goto", chain=val["target"]), []
            if key == "redirect":
                if val is None or (isinstance(val, dict) and "port" not in val):
                    return Target(kind="REDIRECT"), []
                if not isinstance(val, dict):
                    raise _Unmodelled
                ports = _ranges(val["port"], "==", 0xFFFF)[0]
                if len(ports) != 1:
                    raise _Unmodelled
                return Target(kind="REDIRECT", to_ports=ports[0]), []
            if key == "mangle":
                return _mangle(val), []
        if keys[0] == "tproxy" and keys[-1] == "accept" and len(stmts) in (2, 3) \
                and (len(stmts) == 2 or keys[1] == "mangle"):
            val = stmts[0][1]
            if not isinstance(val, dict) or "port" not in val:
                raise _Unmodelled
            mark: tuple[int, int] | None = None
            if len(stmts) == 3:
                mangle = stmts[1][1]
                if not isinstance(mangle, dict) or mangle.get("key") != _META_MARK:
                    raise _Unmodelled
                mark = _xmark(mangle.get("value"))
            port = _ranges(val["port"], "==", 0xFFFF)[0]
            if len(port) != 1 or port[0][0] != port[0][1]:
                raise _Unmodelled
            implied = []
            fam = val.get("family")
            if fam in ("ip", "ip6"):
                # tproxy of one family does nothing to a packet of the other (no match).
                implied.append(_family("ipv4" if fam == "ip" else "ipv6"))
            return Target(kind="TPROXY", on_port=port[0][0], on_ip=str(val.get("addr", "")),
                          mark=mark), implied
    except (_Unmodelled, KeyError, TypeError, ValueError):
        pass
    return Target(kind="unknown", text=" ".join(_statement_text(k, v) for k, v in stmts)), []


def convert_rule(exprs: Json) -> tuple[tuple[Match, ...], Target | None]:
    """A rule's ``expr`` list as matches and one target. Matches come first; anything after
    the first statement that changes the packet or the verdict is part of the target."""
    if not isinstance(exprs, list):
        return (_unknown(f"rule without an expression list: {exprs!r}"),), None
    matches: list[Match] = []
    stmts: list[tuple[str, Json]] = []
    for e in exprs:
        if not isinstance(e, dict) or len(e) != 1:
            matches.append(_unknown(json.dumps(e, separators=(",", ":"))))
            continue
        key, val = next(iter(e.items()))
        key = str(key)
        if key in _NO_EFFECT:
            continue
        if key == "xt" and isinstance(val, dict) and val.get("type") == "match" and not stmts:
            # An iptables extension match (iptables-nft): JSON does not show its options.
            matches.append(_unknown(_statement_text(key, val)))
            continue
        if stmts or (key != "match" and key not in _CONDITIONAL):
            stmts.append((key, val))
            continue
        if key in _CONDITIONAL:
            matches.append(_unknown(_statement_text(key, val)))
            continue
        try:
            for m in _match(val):
                if m.kind == "family" and not m.negated and m in matches:
                    continue
                matches.append(m)
        except (_Unmodelled, KeyError, TypeError, ValueError):
            matches.append(_unknown(_match_text(val)))
    target, implied = _target(stmts)
    matches += [m for m in implied if m not in matches]
    return tuple(matches), target


# -------------------------------------------------------------------------------- chains


@dataclass(slots=True)
class _Chain:
    family: str
    table: str
    name: str
    order: int
    type: str = ""
    hook: str = ""
    prio: int | None = None
    policy: str = "accept"
    rules: list[Json] = field(default_factory=list)

    @property
    def base(self) -> bool:
        return bool(self.hook)

    @property
    def trivial(self) -> bool:
        """No rules and an accepting policy: the chain changes nothing."""
        return not self.rules and self.policy == "accept"

    @property
    def spec(self) -> str:
        return (f"chain {self.family} {self.table} {self.name} {{ type {self.type} hook "
                f"{self.hook} priority {self.prio}; policy {self.policy}; }}")


def _kind(c: _Chain) -> str | None:
    """The walker's table for a base chain at a standard priority, else None."""
    builtin = HOOKS.get(c.hook)
    if builtin is None:
        return None
    if c.type == "nat":
        kind = "nat" if c.prio == (-100 if builtin in ("PREROUTING", "OUTPUT") else 100) \
            else None
    elif c.type == "route":
        kind = "mangle" if c.prio == -150 else None
    elif c.type == "filter" and c.prio is not None:
        kind = {-300: "raw", -150: "mangle", 0: "filter"}.get(c.prio)
    else:
        kind = None
    return kind if kind in WALKED[builtin] else None


def _read(text: str) -> tuple[list[tuple[str, str]], dict[tuple[str, str], list[_Chain]]]:
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        raise BadInput(f"nft JSON: {exc}") from None
    items = doc.get("nftables") if isinstance(doc, dict) else None
    if not isinstance(items, list):
        raise BadInput('nft JSON: no "nftables" list (expected `nft -j list ruleset` output)')
    tables: list[tuple[str, str]] = []
    dormant: set[tuple[str, str]] = set()
    chains: dict[tuple[str, str], list[_Chain]] = {}
    by_name: dict[tuple[str, str, str], _Chain] = {}
    order = 0
    for item in items:
        if not isinstance(item, dict) or len(item) != 1:
            continue
        kind, obj = next(iter(item.items()))
        if not isinstance(obj, dict):
            continue
        if kind == "table":
            key = (str(obj.get("family")), str(obj.get("name")))
            if key not in chains:
                tables.append(key)
                chains[key] = []
            flags = obj.get("flags")
            if flags == "dormant" or (isinstance(flags, list) and "dormant" in flags):
                dormant.add(key)
        elif kind in ("chain", "rule"):
            fam, table = str(obj.get("family")), str(obj.get("table"))
            name = str(obj.get("name") if kind == "chain" else obj.get("chain"))
            if (fam, table) not in chains:
                tables.append((fam, table))
                chains[(fam, table)] = []
            chain = by_name.get((fam, table, name))
            if chain is None:
                order += 1
                chain = _Chain(family=fam, table=table, name=name, order=order)
                by_name[(fam, table, name)] = chain
                chains[(fam, table)].append(chain)
            if kind == "chain" and "hook" in obj:
                chain.type, chain.hook = str(obj.get("type", "filter")), str(obj["hook"])
                prio = obj.get("prio")
                chain.prio = prio if isinstance(prio, int) and not isinstance(prio, bool) \
                    else None
                chain.policy = str(obj.get("policy", "accept"))
            elif kind == "rule":
                chain.rules.append(obj)
    live = [t for t in tables if t not in dormant]
    return live, chains


def _marker(kind: str, builtin: str, family: int, text: str) -> ParsedRule:
    """A rule that makes every trace reaching it undecided, saying why."""
    return ParsedRule(table=kind, chain=builtin, family=family, matches=(_unknown(text),),
                      native=f"# not modelled: {text}", source=text)


def ruleset_from_nft_json(text: str) -> Ruleset:
    """The rule set of ``nft -j list ruleset`` output, as :func:`~remora.capture.trace.trace`
    walks it. Malformed JSON is a :class:`~remora.errors.BadInput`; anything well-formed but
    outside the model is kept as an unknown part (see the module docstring)."""
    tables, chains = _read(text)
    rs = Ruleset(origin="nft -j list ruleset")
    # 1. Place base chains: the first (by priority, then listing order) at each
    # (family, table kind, hook) wins; the others, and chains with no place, get markers.
    placed: dict[tuple[int, str, str], _Chain] = {}
    markers: list[tuple[int, str, str]] = []   # (family, builtin, description)
    base = sorted((c for t in tables for c in chains[t] if c.base),
                  key=lambda c: (c.prio if c.prio is not None else 0, c.order))
    for c in base:
        for fam in FAMILIES.get(c.family, ()):
            kind = _kind(c) if c.family != "netdev" else None
            builtin = HOOKS.get(c.hook) or _MARKER_HOOK.get(c.hook)
            if builtin is None or c.trivial:
                continue                 # forward, or a chain that changes nothing
            slot = (fam, kind or "", builtin)
            if kind is not None and slot not in placed:
                placed[slot] = c
            else:
                other = placed.get(slot)
                why = (f"{c.spec} runs at the same hook and priority as {other.family} "
                       f"{other.table} {other.name}" if other is not None else
                       f"{c.spec} has a type, priority or hook remora trace does not place")
                markers.append((fam, builtin, why))
    # 2. Regular chains of each placed table, per family and kind, renamed on a clash.
    names: dict[tuple[int, str, str, str], dict[str, str]] = {}
    for (fam, kind, builtin), c in sorted(placed.items(), key=lambda kv: kv[1].order):
        table = rs.tables[fam].setdefault(kind, Table(name=kind))
        table.chains.setdefault(builtin, [])
        if c.policy != "accept":
            table.policies[builtin] = c.policy.upper()
        key = (fam, kind, c.family, c.table)
        mapping = names.get(key)
        if mapping is None:
            mapping = names[key] = {}
            for reg in chains[(c.family, c.table)]:
                if reg.base:
                    continue
                name = reg.name
                if name in table.chains or name in HOOKS.values():
                    name = f"{c.table}/{reg.name}"
                mapping[reg.name] = name
                table.chains.setdefault(name, [])
        mapping[c.name] = builtin
    # 3. Rules, converted once per nft rule and copied into each family and kind.
    converted: dict[int, ParsedRule] = {}
    for (fam, kind, cfam, ctable), mapping in names.items():
        table = rs.tables[fam][kind]
        for c in chains[(cfam, ctable)]:
            if c.name not in mapping:
                continue
            for obj in c.rules:
                rule = converted.get(id(obj))
                if rule is None:
                    matches, target = convert_rule(obj.get("expr"))
                    rule = converted[id(obj)] = ParsedRule(
                        table=kind, chain=c.name, matches=matches, target=target,
                        source=json.dumps(obj, separators=(",", ":")), native=_native(obj))
                target = rule.target
                if target is not None and target.kind in ("jump", "goto"):
                    target = replace(target, chain=mapping.get(target.chain, target.chain))
                table.chains[mapping[c.name]].append(replace(
                    rule, table=kind, chain=mapping[c.name], family=fam, target=target))
    # 4. Markers at the head of their hook, in the first table the walker visits there.
    for fam, builtin, why in markers:
        kind = WALKED[builtin][0]
        table = rs.tables[fam].setdefault(kind, Table(name=kind))
        table.chains.setdefault(builtin, []).insert(0, _marker(kind, builtin, fam, why))
    return rs
