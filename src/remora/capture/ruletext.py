"""iptables rule text as data: parse a rule (Istio's input form or the kernel's
``iptables-save`` form) into matches and a target, and print it the way the kernel lists it.

Owns: the match and target model `remora trace` evaluates, for every match and target that
istio-iptables and Remora generate (addresses, interfaces, protocol, tcp/udp ports, multiport,
owner, mark, connmark, conntrack state, comment; RETURN, ACCEPT, DROP, REJECT, jumps,
REDIRECT, TPROXY, MARK, CONNMARK, CT, LOG). Anything else is kept as an *unknown* part, so
a caller can say it does not model it rather than guess.
Must not: run anything or decide what a rule means for a connection (see ``trace``).

The printed form follows iptables' own ordering (``-s -d -i -o -p``, then modules in the
order given, with the implicit ``-m tcp``/``-m udp`` made explicit, then ``-j``), its number
formats (marks in hex, ``MARK --set-xmark``) and its masking of CIDRs, so a rule set
generated from flags can be shown exactly as `iptables -S` would show it once applied.
"""

from __future__ import annotations

import ipaddress
import shlex
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

from remora.errors import BadInput

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

MatchKind = Literal["src", "dst", "in", "out", "proto", "dport", "sport", "dports", "sports",
                    "ports", "uid", "gid", "mark", "connmark", "ctstate", "comment", "family",
                    "unknown"]
TargetKind = Literal["jump", "goto", "RETURN", "ACCEPT", "DROP", "REJECT", "REDIRECT",
                     "TPROXY", "MARK", "CONNMARK", "CT", "LOG", "unknown"]

FULL_MASK = 0xFFFFFFFF
STANDARD_TARGETS = frozenset({"RETURN", "ACCEPT", "DROP", "REJECT"})


@dataclass(frozen=True, slots=True, kw_only=True)
class Match:
    """One condition of a rule. Which value fields are set depends on ``kind``."""

    kind: MatchKind
    negated: bool = False
    module: str = ""                                  # the -m module it came from ("" = none)
    net: IPNetwork | None = None                      # src, dst
    iface: str = ""                                   # in, out (a trailing + is a prefix)
    proto: str = ""                                   # proto; family: "ipv4" / "ipv6"
    ports: tuple[tuple[int, int], ...] = ()           # dport, sport, dports, sports, ports
    ids: tuple[int, int] | None = None                # uid, gid (a range)
    name: str = ""                                    # uid/gid given as a name
    mark: tuple[int, int] | None = None               # mark, connmark: (value, mask)
    states: tuple[str, ...] = ()                      # ctstate
    text: str = ""                                    # comment text / unknown tokens


@dataclass(frozen=True, slots=True, kw_only=True)
class Target:
    kind: TargetKind
    chain: str = ""                                   # jump / goto
    to_ports: tuple[int, int] | None = None           # REDIRECT
    on_port: int | None = None                        # TPROXY
    on_ip: str = ""                                   # TPROXY
    mark: tuple[int, int] | None = None               # TPROXY --tproxy-mark, MARK
    mark_op: str = ""                                 # MARK: set-xmark; CONNMARK: save/restore
    masks: tuple[int, int] = (FULL_MASK, FULL_MASK)   # CONNMARK --nfmask, --ctmask
    zone: int | None = None                           # CT
    text: str = ""                                    # unknown target options


@dataclass(frozen=True, slots=True, kw_only=True)
class ParsedRule:
    """A rule of one chain, in order."""

    table: str
    chain: str
    matches: tuple[Match, ...] = ()
    target: Target | None = None
    source: str = ""                                  # the text it was parsed from
    family: int = 4
    native: str = ""                                  # nft rule text, for nftables rules

    @property
    def unknown(self) -> tuple[str, ...]:
        """Descriptions of the parts this model does not understand."""
        parts = [m.text for m in self.matches if m.kind == "unknown"]
        if self.target is not None and self.target.kind == "unknown":
            parts.append(self.target.text if self.native else f"-j {self.target.text}")
        return tuple(parts)

    @property
    def text(self) -> str:
        """The rule as the kernel lists it (``-A CHAIN …``, or nft's own text)."""
        return self.native or print_rule(self)

    @property
    def jumps_to(self) -> str:
        return self.target.chain if self.target and self.target.kind in ("jump", "goto") else ""


# ---------------------------------------------------------------------------------- parse


def _net(text: str) -> IPNetwork:
    try:
        return ipaddress.ip_network(text if "/" in text else text + (
            "/128" if ":" in text else "/32"), strict=False)
    except ValueError:
        raise BadInput(f"bad address {text!r}") from None


def _port_list(text: str) -> tuple[tuple[int, int], ...]:
    out = []
    for part in text.split(","):
        lo, _, hi = part.partition(":")
        if not lo.isdigit() or (hi and not hi.isdigit()):
            raise BadInput(f"bad port {part!r}")
        out.append((int(lo), int(hi) if hi else int(lo)))
    return tuple(out)


def _id_range(text: str) -> tuple[tuple[int, int] | None, str]:
    lo, _, hi = text.partition("-")
    if lo.isdigit() and (not hi or hi.isdigit()):
        return (int(lo), int(hi) if hi else int(lo)), ""
    return None, text


def _mark(text: str) -> tuple[int, int]:
    value, _, mask = text.partition("/")
    try:
        return int(value, 0), int(mask, 0) if mask else FULL_MASK
    except ValueError:
        raise BadInput(f"bad mark {text!r}") from None


# Options each module we model takes, with whether they carry a value.
_MODULE_OPTS: dict[str, set[str]] = {
    "tcp": {"--dport", "--destination-port", "--sport", "--source-port"},
    "udp": {"--dport", "--destination-port", "--sport", "--source-port"},
    "multiport": {"--dports", "--destination-ports", "--sports", "--source-ports", "--ports"},
    "owner": {"--uid-owner", "--gid-owner"},
    "mark": {"--mark"},
    "connmark": {"--mark"},
    "conntrack": {"--ctstate"},
    "comment": {"--comment"},
}
_SHORT = {"-s": "--source", "-d": "--destination", "-i": "--in-interface",
          "-o": "--out-interface", "-p": "--protocol", "-j": "--jump", "-g": "--goto",
          "-m": "--match"}


def parse_rule(text: str, table: str = "", chain: str = "", family: int = 4) -> ParsedRule:
    """Parse ``-A CHAIN …`` (or ``-I CHAIN N …``, or bare rule options with ``chain``)."""
    try:
        tokens = shlex.split(text)
    except ValueError as exc:
        raise BadInput(f"cannot parse rule {text!r}: {exc}") from None
    if tokens and tokens[0] in ("-A", "--append", "-I", "--insert"):
        if len(tokens) < 2:
            raise BadInput(f"cannot parse rule {text!r}: no chain")
        insert = tokens[0] in ("-I", "--insert")
        chain, tokens = tokens[1], tokens[2:]
        if insert and tokens and tokens[0].isdigit():
            tokens = tokens[1:]
    matches: list[Match] = []
    target: Target | None = None
    module = ""
    proto = ""
    neg = False
    i = 0

    def take() -> str:
        nonlocal i
        if i >= len(tokens):
            raise BadInput(f"cannot parse rule {text!r}: {tokens[i - 1]} needs a value")
        i += 1
        return tokens[i - 1]

    while i < len(tokens):
        tok = tokens[i]
        i += 1
        if tok == "!":
            neg = True
            continue
        opt = _SHORT.get(tok, tok)
        if opt in ("--source", "--src"):
            matches.append(Match(kind="src", negated=neg, net=_net(take())))
        elif opt in ("--destination", "--dst"):
            matches.append(Match(kind="dst", negated=neg, net=_net(take())))
        elif opt == "--in-interface":
            matches.append(Match(kind="in", negated=neg, iface=take()))
        elif opt == "--out-interface":
            matches.append(Match(kind="out", negated=neg, iface=take()))
        elif opt == "--protocol":
            proto = take().lower()
            proto = {"6": "tcp", "17": "udp"}.get(proto, proto)
            matches.append(Match(kind="proto", negated=neg, proto=proto))
            if neg:
                proto = ""
        elif opt == "--match":
            module = take()
            if module not in _MODULE_OPTS:
                # Collect the module's options verbatim: we do not model it.
                start = i - 2
                while i < len(tokens) and tokens[i] not in ("-m", "--match", "-j", "--jump",
                                                            "-g", "--goto"):
                    i += 1
                matches.append(Match(kind="unknown", module=module,
                                     text=" ".join(tokens[start:i])))
                module = ""
        elif opt in ("--jump", "--goto"):
            target = _parse_target(take(), tokens[i:], goto=opt == "--goto", rule=text)
            i = len(tokens)
        elif opt in ("--dport", "--destination-port", "--sport", "--source-port"):
            mod = module if module in ("tcp", "udp") else proto
            if mod not in ("tcp", "udp"):
                matches.append(Match(kind="unknown", text=f"{opt} without -p tcp/udp"))
                take()
            else:
                kind: MatchKind = "dport" if opt in ("--dport", "--destination-port") \
                    else "sport"
                matches.append(Match(kind=kind, negated=neg, module=mod,
                                     ports=_port_list(take())))
        elif opt in ("--dports", "--destination-ports", "--sports", "--source-ports", "--ports"):
            kind = {"--dports": "dports", "--destination-ports": "dports", "--sports": "sports",
                    "--source-ports": "sports", "--ports": "ports"}[opt]  # type: ignore[assignment]
            matches.append(Match(kind=kind, negated=neg, module="multiport",
                                 ports=_port_list(take())))
        elif opt in ("--uid-owner", "--gid-owner"):
            ids, name = _id_range(take())
            matches.append(Match(kind="uid" if opt == "--uid-owner" else "gid", negated=neg,
                                 module="owner", ids=ids, name=name))
        elif opt == "--mark" and module in ("mark", "connmark"):
            matches.append(Match(kind="mark" if module == "mark" else "connmark", negated=neg,
                                 module=module, mark=_mark(take())))
        elif opt == "--ctstate":
            matches.append(Match(kind="ctstate", negated=neg, module="conntrack",
                                 states=tuple(take().upper().split(","))))
        elif opt == "--comment":
            matches.append(Match(kind="comment", module="comment", text=take()))
        else:
            rest = " ".join(tokens[i - 1:])
            matches.append(Match(kind="unknown", module=module, text=rest))
            i = len(tokens)
        neg = False
    return ParsedRule(table=table, chain=chain, matches=tuple(matches), target=target,
                      source=text, family=family)


def _parse_target(name: str, opts: Sequence[str], *, goto: bool, rule: str) -> Target:
    args: dict[str, str] = {}
    flags: set[str] = set()
    j = 0
    while j < len(opts):
        key = opts[j]
        if j + 1 < len(opts) and not opts[j + 1].startswith("--"):
            args[key] = opts[j + 1]
            j += 2
        else:
            flags.add(key)
            j += 1
    if goto:
        return Target(kind="goto", chain=name)
    if name in STANDARD_TARGETS and not args and not flags - {"--reject-with"}:
        return Target(kind=name)  # type: ignore[arg-type]
    try:
        if name == "REDIRECT":
            ports = args.get("--to-ports") or args.get("--to-port")
            if ports is None:
                return Target(kind="REDIRECT")
            lo, _, hi = ports.partition("-")
            return Target(kind="REDIRECT", to_ports=(int(lo), int(hi or lo)))
        if name == "TPROXY":
            return Target(kind="TPROXY", on_port=int(args["--on-port"]),
                          on_ip=args.get("--on-ip", ""),
                          mark=_mark(args["--tproxy-mark"]) if "--tproxy-mark" in args
                          else None)
        if name == "MARK":
            if "--set-xmark" in args:
                return Target(kind="MARK", mark_op="set-xmark", mark=_mark(args["--set-xmark"]))
            if "--set-mark" in args:
                value, mask = _mark(args["--set-mark"])
                # --set-mark V/M clears the mask bits and sets V: xmark (V, M) in the kernel.
                return Target(kind="MARK", mark_op="set-xmark", mark=(value, mask))
        if name == "CONNMARK" and ("--save-mark" in flags or "--restore-mark" in flags):
            op = "save" if "--save-mark" in flags else "restore"
            return Target(kind="CONNMARK", mark_op=op,
                          masks=(int(args.get("--nfmask", hex(FULL_MASK)), 0),
                                 int(args.get("--ctmask", hex(FULL_MASK)), 0)))
        if name == "CT" and "--zone" in args and len(args) == 1:
            return Target(kind="CT", zone=int(args["--zone"]))
        if name == "LOG":
            return Target(kind="LOG", text=" ".join(opts))
    except (KeyError, ValueError):
        raise BadInput(f"cannot parse target of rule {rule!r}") from None
    if opts:
        return Target(kind="unknown", text=" ".join([name, *opts]))
    # An option-less name is a jump; the tracer reports it as unknown if no such chain exists
    # (an option-less target such as MASQUERADE or NOTRACK).
    return Target(kind="jump", chain=name)


# ---------------------------------------------------------------------------------- print


def _ports_text(ports: tuple[tuple[int, int], ...]) -> str:
    return ",".join(str(lo) if lo == hi else f"{lo}:{hi}" for lo, hi in ports)


def _mark_text(mark: tuple[int, int]) -> str:
    value, mask = mark
    return hex(value) if mask == FULL_MASK else f"{hex(value)}/{hex(mask)}"


def print_rule(rule: ParsedRule) -> str:
    """The rule in iptables-save's layout."""
    out = [f"-A {rule.chain}"]
    order = {"src": 0, "dst": 1, "in": 2, "out": 3, "proto": 4}
    basics = sorted((m for m in rule.matches if m.kind in order), key=lambda m: order[m.kind])
    for m in basics:
        bang = "! " if m.negated else ""
        if m.kind in ("src", "dst"):
            out.append(f"{bang}-{'s' if m.kind == 'src' else 'd'} {m.net}")
        elif m.kind in ("in", "out"):
            out.append(f"{bang}-{'i' if m.kind == 'in' else 'o'} {m.iface}")
        else:
            out.append(f"{bang}-p {m.proto}")
    current = ""
    for m in rule.matches:
        if m.kind in order:
            continue
        bang = "! " if m.negated else ""
        if m.kind == "unknown":
            out.append(m.text)
            current = ""
            continue
        if m.module != current or m.module in ("owner", "mark", "connmark", "comment"):
            # iptables prints one -m per match instance for these modules.
            if not (m.module == current and m.module in ("tcp", "udp", "multiport")):
                out.append(f"-m {m.module}")
            current = m.module
        if m.kind in ("dport", "sport", "dports", "sports", "ports"):
            out.append(f"{bang}--{m.kind} {_ports_text(m.ports)}")
        elif m.kind in ("uid", "gid"):
            value = m.name or (str(m.ids[0]) if m.ids and m.ids[0] == m.ids[1]
                               else f"{m.ids[0]}-{m.ids[1]}" if m.ids else "")
            out.append(f"{bang}--{m.kind}-owner {value}")
        elif m.kind in ("mark", "connmark") and m.mark is not None:
            out.append(f"{bang}--mark {_mark_text(m.mark)}")
        elif m.kind == "ctstate":
            out.append(f"{bang}--ctstate {','.join(m.states)}")
        elif m.kind == "comment":
            quoted = f'"{m.text}"' if any(c.isspace() for c in m.text) else m.text
            out.append(f"--comment {quoted}")
    t = rule.target
    if t is not None:
        out.append(_target_text(t, rule.family))
    return " ".join(out)


def _target_text(t: Target, family: int) -> str:
    if t.kind in ("jump", "goto"):
        return f"-{'j' if t.kind == 'jump' else 'g'} {t.chain}"
    if t.kind == "REDIRECT":
        if t.to_ports is None:
            return "-j REDIRECT"
        lo, hi = t.to_ports
        return f"-j REDIRECT --to-ports {lo}" + (f"-{hi}" if hi != lo else "")
    if t.kind == "TPROXY":
        any_ip = "0.0.0.0" if family == 4 else "::"
        text = f"-j TPROXY --on-port {t.on_port} --on-ip {t.on_ip or any_ip}"
        if t.mark is not None:
            text += f" --tproxy-mark {hex(t.mark[0])}/{hex(t.mark[1])}"
        return text
    if t.kind == "MARK" and t.mark is not None:
        return f"-j MARK --set-xmark {hex(t.mark[0])}/{hex(t.mark[1])}"
    if t.kind == "CONNMARK":
        return (f"-j CONNMARK --{t.mark_op}-mark --nfmask {hex(t.masks[0])} "
                f"--ctmask {hex(t.masks[1])}")
    if t.kind == "CT":
        return f"-j CT --zone {t.zone}"
    if t.kind in ("LOG", "unknown"):
        return f"-j {t.text}" if t.kind == "unknown" else f"-j LOG {t.text}".rstrip()
    return f"-j {t.kind}"


@dataclass(slots=True)
class Table:
    """One table of a family: chains in order, each a rule list, and built-in policies."""

    name: str
    chains: dict[str, list[ParsedRule]] = field(default_factory=dict)
    policies: dict[str, str] = field(default_factory=dict)
