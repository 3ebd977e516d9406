"""Facts istio-iptables learns from the host, and the netlink changes it makes.

Owns: IPv6 / host IP detection from the namespace's interface addresses, DNS servers from
resolv.conf, the proxy UID lookup, and (through pyroute2) the ``::6`` address on ``lo`` and
the TPROXY policy routing (``ip rule fwmark M lookup T``, ``ip route add local default dev lo
table T``) with their removal on ``--cleanup-only``.
Must not: run iptables or decide rules.

Reference: spec ``capture-istio-iptables.md`` §2 (FillConfigFromEnvironment), §10.6.
"""

from __future__ import annotations

import ipaddress
import pwd
import socket
import struct
from collections.abc import Iterable

from remora.capture.config import CaptureConfig, HostFacts
from remora.errors import BadInput, EnvironmentFault

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def proxy_uid_default(envoy_user: str) -> str:
    """UID of ``$ENVOY_USER`` (default istio-proxy), else Istio's fallback 1337."""
    try:
        return str(pwd.getpwnam(envoy_user or "istio-proxy").pw_uid)
    except KeyError:
        return "1337"


def choose_host_ip(addresses: Iterable[IPAddress], dual_stack: bool) -> tuple[bool, IPAddress]:
    """Istio's rule: skip loopback and link-local; the first address left decides IPv6
    (with ``--dual-stack``, IPv6 is on if any address up to the first IPv6 one is IPv6)."""
    seen: list[IPAddress] = []
    for addr in addresses:
        if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
            addr = addr.ipv4_mapped
        if addr.is_loopback or addr.is_link_local:
            continue
        if isinstance(addr, ipaddress.IPv6Address) and addr.is_multicast \
                and (int(addr) >> 112) & 0xF == 2:  # link-local multicast scope
            continue
        seen.append(addr)
        if not dual_stack or isinstance(addr, ipaddress.IPv6Address):
            break
    if not seen:
        raise EnvironmentFault("no valid local IP address found")
    ipv6 = any(isinstance(a, ipaddress.IPv6Address) for a in seen)
    return ipv6, seen[0]


_RTM_NEWADDR, _RTM_GETADDR = 20, 22
_NLMSG_ERROR, _NLMSG_DONE = 2, 3
_NLM_F_REQUEST, _NLM_F_DUMP = 0x1, 0x300
_IFA_ADDRESS, _IFA_LOCAL = 1, 2
_NLMSG_HDR = struct.Struct("=IHHII")
_IFADDRMSG = struct.Struct("=BBBBI")
_RTATTR = struct.Struct("=HH")


def interface_addresses() -> list[IPAddress]:
    """Addresses of this namespace in netlink dump order (IPv4 first, as Go sees them).

    A plain RTM_GETADDR dump on a netlink socket: importing pyroute2 for this alone would
    cost more than everything else `remora iptables` does.
    """
    out: list[IPAddress] = []
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 0) as sock:
        sock.settimeout(5.0)
        for seq, family in enumerate((socket.AF_INET, socket.AF_INET6), start=1):
            body = _IFADDRMSG.pack(family, 0, 0, 0, 0)
            sock.send(_NLMSG_HDR.pack(_NLMSG_HDR.size + len(body), _RTM_GETADDR,
                                      _NLM_F_REQUEST | _NLM_F_DUMP, seq, 0) + body)
            out += _read_addr_dump(sock, family)
    return out


def _read_addr_dump(sock: socket.socket, family: int) -> list[IPAddress]:
    out: list[IPAddress] = []
    size = 4 if family == socket.AF_INET else 16
    while True:
        data = sock.recv(65536)
        pos = 0
        while pos + _NLMSG_HDR.size <= len(data):
            length, kind, _, _, _ = _NLMSG_HDR.unpack_from(data, pos)
            if length < _NLMSG_HDR.size:
                return out
            if kind == _NLMSG_DONE:
                return out
            if kind == _NLMSG_ERROR:
                raise EnvironmentFault("netlink refused the address dump")
            if kind == _RTM_NEWADDR:
                attrs: dict[int, bytes] = {}
                apos = pos + _NLMSG_HDR.size + _IFADDRMSG.size
                while apos + _RTATTR.size <= pos + length:
                    alen, atype = _RTATTR.unpack_from(data, apos)
                    if alen < _RTATTR.size:
                        break
                    attrs[atype] = data[apos + _RTATTR.size:apos + alen]
                    apos += (alen + 3) & ~3
                raw = attrs.get(_IFA_LOCAL) if family == socket.AF_INET else None
                raw = raw or attrs.get(_IFA_ADDRESS)
                if raw is not None and len(raw) == size:
                    out.append(ipaddress.ip_address(raw))
            pos += (length + 3) & ~3


def parse_resolv_conf(text: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """``nameserver`` entries, canonicalised, split by family; unparsable ones dropped."""
    v4: list[str] = []
    v6: list[str] = []
    for line in text.splitlines():
        fields = line.split()
        if len(fields) < 2 or fields[0] != "nameserver":
            continue
        try:
            addr = ipaddress.ip_address(fields[1].split("%")[0])
        except ValueError:
            continue
        (v4 if addr.version == 4 else v6).append(str(addr))
    return tuple(v4), tuple(v6)


def detect_facts(cfg: CaptureConfig, resolv_conf: str = "/etc/resolv.conf") -> HostFacts:
    ipv6, host_ip = choose_host_ip(interface_addresses(), cfg.dual_stack)
    v4: tuple[str, ...] = ()
    v6: tuple[str, ...] = ()
    if cfg.redirect_dns and not cfg.capture_all_dns:
        try:
            with open(resolv_conf, encoding="utf-8") as fh:
                v4, v6 = parse_resolv_conf(fh.read())
        except OSError as exc:
            raise EnvironmentFault(f"cannot read {resolv_conf}: {exc.strerror}") from None
    return HostFacts(enable_ipv6=ipv6, host_ip=host_ip, dns_servers_v4=v4, dns_servers_v6=v6)


# ------------------------------------------------------------------------------ netlink

_LOCAL_DEFAULT = {socket.AF_INET: "0.0.0.0/0", socket.AF_INET6: "::/0"}
_EEXIST = 17
_ENOENT = 2
_ESRCH = 3


def _code(exc: Exception) -> int:
    code = getattr(exc, "code", None)
    return code if isinstance(code, int) else -1


def configure_routes(cfg: CaptureConfig, cleanup: bool) -> None:
    """Spec §10.6, plus removal on cleanup.

    Unlike Istio, an ``ip rule`` that already exists with the same mark and table is not an
    error, so re-running with the same flags succeeds and changes nothing.
    """
    tproxy_routes = cfg.tproxy and cfg.inbound_enabled
    if not tproxy_routes and not (cfg.facts.enable_ipv6 and not cleanup):
        return  # nothing to do: spare the pyroute2 import (~0.1 s)
    from pyroute2 import IPRoute
    from pyroute2.netlink.exceptions import NetlinkError

    families = [socket.AF_INET] + ([socket.AF_INET6] if cfg.facts.enable_ipv6 else [])
    with IPRoute() as ipr:
        lo = ipr.link_lookup(ifname="lo")
        if not lo:
            raise EnvironmentFault("no loopback interface in this network namespace")
        if cfg.facts.enable_ipv6 and not cleanup:
            try:
                ipr.addr("add", index=lo[0], address="::6", prefixlen=128)
            except NetlinkError as exc:
                if _code(exc) != _EEXIST:
                    raise EnvironmentFault(f"cannot add ::6/128 to lo: {exc}") from None
        if not tproxy_routes:
            return
        mark, table = cfg.tproxy_mark, cfg.tproxy_route_table
        if not 0 < table < 2**32 or mark >= 2**32:
            raise BadInput(f"invalid TPROXY mark {mark} / route table {table}")
        for fam in families:
            existing = [r for r in ipr.get_rules(family=fam)
                        if r.get_attr("FRA_FWMARK") == mark
                        and (r.get_attr("FRA_TABLE") or r["table"]) == table]
            route = {"dst": _LOCAL_DEFAULT[fam], "table": table, "type": "local",
                     "oif": lo[0], "scope": 254, "family": fam}
            try:
                if cleanup:
                    for _ in existing:
                        ipr.rule("del", family=fam, fwmark=mark, table=table)
                    try:
                        ipr.route("del", **route)
                    except NetlinkError as exc:
                        if _code(exc) not in (_ENOENT, _ESRCH):
                            raise
                    continue
                if not existing:
                    ipr.rule("add", family=fam, fwmark=mark, table=table)
                try:
                    ipr.route("add", **route)
                except NetlinkError as exc:
                    if _code(exc) != _EEXIST:
                        raise
            except NetlinkError as exc:
                verb = "remove" if cleanup else "add"
                raise EnvironmentFault(f"cannot {verb} TPROXY policy routing (fwmark {mark} "
                                       f"table {table}): {exc}") from None
