"""The steps of a `remora trace` run: get the rules (live namespace, istio-iptables flags, or
a saved file), build the connection with its defaults, trace, print.

Owns: defaults (source address, interface, uid/gid) and the choice of output.
Must not: parse argv (the CLI does) or evaluate rules (``trace`` does).
"""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import shlex
from dataclasses import dataclass, field
from typing import Literal, TextIO

from remora.capture.config import HostFacts, build_config, parse_flags
from remora.capture.rules import build_rules
from remora.capture.trace import (
    Connection,
    Context,
    IPAddress,
    Ruleset,
    local_context,
    ruleset_from_rules,
    ruleset_from_save,
    trace,
)
from remora.capture.trace_report import (
    LOOPBACK,
    PEER,
    connection_text,
    explain,
    matrix,
    render_verdict,
    short_verdict,
)
from remora.errors import BadInput

DEFAULT_POD = {4: ipaddress.ip_address("10.0.0.2"), 6: ipaddress.ip_address("fd00::2")}


@dataclass(slots=True, kw_only=True)
class TraceOptions:
    netns: str | None = None
    pid: int | None = None
    iptables_args: str | None = None
    save_file: str | None = None
    mode: Literal["trace", "explain", "matrix"] = "trace"
    direction: Literal["outbound", "inbound"] | None = None
    dst: str | None = None
    src: str | None = None
    proto: Literal["tcp", "udp"] = "tcp"
    uid: int | None = None
    gid: int | None = None
    iface: str | None = None
    pod_ip: str | None = None
    dns_servers: list[str] = field(default_factory=list)
    json: bool = False
    verbose: bool = False


def parse_endpoint(text: str, what: str, port_required: bool) -> tuple[IPAddress, int | None]:
    """``IP``, ``IP:PORT``, ``[IPv6]:PORT`` or a bare IPv6 address."""
    host, port = text, None
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise BadInput(f"malformed {what} {text!r}: want IP:PORT or [IPv6]:PORT")
        port = rest[1:] if rest else None
    elif text.count(":") == 1:
        host, port = text.split(":")
    try:
        addr = ipaddress.ip_address(host)
    except ValueError:
        raise BadInput(f"malformed {what} {text!r}: {host!r} is not an IP address") from None
    if port is None:
        if port_required:
            raise BadInput(f"malformed {what} {text!r}: a port is required (IP:PORT)")
        return addr, None
    if not port.isdigit() or not 0 < int(port) <= 65535:
        raise BadInput(f"malformed {what} {text!r}: port must be 1-65535")
    return addr, int(port)


@dataclass(slots=True)
class _Source:
    ruleset: Ruleset
    ctx: Context
    pod: IPAddress
    origin: str
    route: dict[str, str] = field(default_factory=dict)
    live: object | None = None


def _family(opts: TraceOptions) -> int:
    for text, what in ((opts.dst, "--dst"), (opts.pod_ip, "--pod-ip")):
        if text:
            return parse_endpoint(text, what, False)[0].version
    return 4


def load_source(opts: TraceOptions) -> _Source:
    fam = _family(opts)
    pod = parse_endpoint(opts.pod_ip, "--pod-ip", False)[0] if opts.pod_ip else DEFAULT_POD[fam]
    if opts.netns is not None or opts.pid is not None:
        from remora.capture.inspect import namespace_path, read_namespace

        path = namespace_path(opts.netns, opts.pid)
        live = read_namespace(path)
        own = live.own_address(fam)
        if own is not None and not opts.pod_ip:
            pod = own
        ctx = local_context(live.addresses, live.ruleset, live.routed_marks)
        where = f"namespace {opts.netns}" if opts.netns else f"pid {opts.pid}"
        return _Source(live.ruleset, ctx, pod, f"{where} ({live.ruleset.origin})", live=live)
    if opts.iptables_args is not None:
        try:
            argv = shlex.split(opts.iptables_args)
        except ValueError as exc:
            raise BadInput(f"cannot split --iptables-args: {exc}") from None
        servers = [parse_endpoint(s, "--dns-server", False)[0] for s in opts.dns_servers]
        facts = HostFacts(enable_ipv6=fam == 6 or opts.mode == "explain",
                          dns_servers_v4=tuple(str(s) for s in servers if s.version == 4),
                          dns_servers_v6=tuple(str(s) for s in servers if s.version == 6))
        cfg = build_config(parse_flags(argv, {}), {}, facts=facts)
        rs = ruleset_from_rules(build_rules(cfg), origin=f"remora iptables {opts.iptables_args}")
        return _Source(rs, local_context([pod], rs), pod, rs.origin)
    if opts.save_file is not None:
        try:
            with open(opts.save_file, encoding="utf-8") as fh:
                text = fh.read()
        except OSError as exc:
            raise BadInput(f"cannot read {opts.save_file}: {exc.strerror}") from None
        rs = ruleset_from_save(text if fam == 4 else "", text if fam == 6 else "",
                               origin=opts.save_file)
        return _Source(rs, local_context([pod], rs), pod, opts.save_file)
    raise BadInput("say where the rules come from: --netns, --pid, --iptables-args or "
                   "--save-file")


def build_connection(opts: TraceOptions, src: _Source) -> Connection:
    if opts.direction is None or opts.dst is None:
        raise BadInput("a trace needs --outbound or --inbound and --dst IP:PORT")
    dst, dport = parse_endpoint(opts.dst, "--dst", True)
    assert dport is not None
    fam = dst.version
    ctx = src.ctx
    sport = 40000
    if opts.src:
        s_addr, s_port = parse_endpoint(opts.src, "--src", False)
        sport = s_port or sport
    elif opts.direction == "inbound":
        s_addr = PEER[fam]
    elif dst.is_loopback:
        s_addr = LOOPBACK[fam]
    elif ctx.is_local(dst):
        s_addr = dst
    else:
        s_addr = src.pod if src.pod.version == fam else DEFAULT_POD[fam]
    if s_addr.version != fam:
        raise BadInput(f"--src {s_addr} and --dst {dst} are of different IP versions")
    # Outbound defaults to an app (uid/gid 1000); inbound packets have no local socket, so
    # only ids the user gives are kept.
    uid = opts.uid if opts.uid is not None else (1000 if opts.direction == "outbound" else None)
    gid = opts.gid if opts.gid is not None else uid
    iface = opts.iface or ""
    if not iface:
        if opts.direction == "outbound" and ctx.is_local(dst):
            iface = "lo"
        elif src.live is not None:
            from remora.capture.inspect import LiveNamespace

            assert isinstance(src.live, LiveNamespace)
            iface = src.live.route_iface(dst if opts.direction == "outbound" else s_addr)
        iface = iface or "eth0"
    return Connection(direction=opts.direction, proto=opts.proto, src=s_addr, sport=sport,
                      dst=dst, dport=dport, uid=uid, gid=gid, iface=iface)


def _unmodelled(rs: Ruleset) -> list[str]:
    return [f"{r.table} {r.text}: {', '.join(parts)}" for r, parts in rs.unknown]


def run_trace(opts: TraceOptions, out: TextIO) -> int:
    src = load_source(opts)
    unknown = _unmodelled(src.ruleset)
    if opts.mode == "explain":
        rows = explain(src.ruleset, src.ctx.proxy_uids | src.ctx.proxy_gids)
        if opts.json:
            json.dump({"origin": src.origin, "rules": [dataclasses.asdict(r) for r in rows],
                       "unmodelled": unknown}, out, indent=2)
            out.write("\n")
            return 0
        from rich.console import Console
        from rich.table import Table

        table = Table(title=f"capture rules: {src.origin}", show_lines=False)
        for col in ("ip", "table", "chain", "rule", "what it is for"):
            table.add_column(col, overflow="fold")
        for r in rows:
            table.add_row(f"v{r.family}", r.table, r.chain, r.rule, r.purpose)
        Console(file=out, width=200 if not out.isatty() else None).print(table)
        _warn_unknown(unknown, out)
        return 0
    if opts.mode == "matrix":
        dns = parse_endpoint(opts.dns_servers[0], "--dns-server", False)[0] \
            if opts.dns_servers else None
        rows_m = matrix(src.ruleset, src.ctx, src.pod, dns_server=dns,
                        iface=opts.iface or "eth0")
        if opts.json:
            json.dump({"origin": src.origin, "pod": str(src.pod), "unmodelled": unknown,
                       "cases": [{"case": r.case, **r.verdict.as_json()} for r in rows_m]},
                      out, indent=2)
            out.write("\n")
            return 0
        from rich.console import Console
        from rich.table import Table

        table = Table(title=f"capture matrix: {src.origin}, pod {src.pod}")
        for col in ("case", "connection", "verdict", "why"):
            table.add_column(col, overflow="fold")
        for row in rows_m:
            table.add_row(row.case, connection_text(row.connection), short_verdict(row.verdict),
                          row.verdict.reason)
        Console(file=out, width=200 if not out.isatty() else None).print(table)
        _warn_unknown(unknown, out)
        return 0
    conn = build_connection(opts, src)
    verdict = trace(src.ruleset, conn, src.ctx)
    if opts.json:
        doc = verdict.as_json()
        doc["origin"] = src.origin
        doc["unmodelled"] = unknown
        json.dump(doc, out, indent=2)
        out.write("\n")
        return 0
    out.write(render_verdict(verdict, src.origin, verbose=opts.verbose))
    _warn_unknown(unknown, out)
    return 0


def _warn_unknown(unknown: list[str], out: TextIO) -> None:
    if unknown:
        out.write(f"warning: {len(unknown)} rule(s) use matches or targets remora trace does "
                  "not model; a connection they decide is reported as undecided:\n")
        for line in unknown:
            out.write(f"  {line}\n")
