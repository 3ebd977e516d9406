"""Reading a live network namespace for `remora trace`: rules, addresses, routes, ip rules.

Owns: finding the namespace (``--netns NAME`` → ``/run/netns/NAME``, ``--pid PID`` →
``/proc/PID/ns/net``), and read-only commands inside it through ``nsenter --net``:
``iptables-save``/``ip6tables-save`` (nft or legacy, whichever holds rules), ``nft -j list
ruleset`` for native nftables, ``ip -j addr``, ``ip -j route get``, ``ip -j rule``.
Must not: change anything in the namespace.
"""

from __future__ import annotations

import ipaddress
import json
import os
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass, field

from remora.capture.trace import IPAddress, Ruleset, ruleset_from_save
from remora.errors import BadInput, EnvironmentFault


def namespace_path(netns: str | None = None, pid: int | None = None) -> str:
    if netns is not None:
        path = netns if "/" in netns else f"/run/netns/{netns}"
        if not os.path.exists(path):
            raise BadInput(f"unknown network namespace {netns!r} (no {path})")
        return path
    if pid is not None:
        path = f"/proc/{pid}/ns/net"
        if not os.path.exists(path):
            raise BadInput(f"no process with pid {pid}")
        return path
    raise BadInput("no namespace given")


def _run(path: str, argv: Sequence[str], check: bool = True) -> str:
    if shutil.which(argv[0]) is None:
        raise EnvironmentFault(f"{argv[0]}: command not found")
    try:
        proc = subprocess.run(["nsenter", f"--net={path}", *argv], capture_output=True,
                              text=True, timeout=30, check=False)
    except FileNotFoundError:
        raise EnvironmentFault("nsenter: command not found (install util-linux)") from None
    except subprocess.TimeoutExpired:
        raise EnvironmentFault(f"{argv[0]} did not answer within 30s") from None
    if proc.returncode != 0 and check:
        msg = (proc.stderr.strip().splitlines() or [f"exit code {proc.returncode}"])[-1]
        if "Permission denied" in msg or "Operation not permitted" in msg:
            raise EnvironmentFault(f"reading {path} needs root: {msg}")
        raise EnvironmentFault(f"{' '.join(argv)} failed in {path}: {msg}")
    return proc.stdout


@dataclass(slots=True)
class LiveNamespace:
    path: str
    ruleset: Ruleset
    addresses: list[IPAddress] = field(default_factory=list)
    routed_marks: set[int] = field(default_factory=set)

    def own_address(self, version: int) -> IPAddress | None:
        for addr in self.addresses:
            if addr.version == version and not addr.is_loopback and not addr.is_link_local:
                return addr
        return None

    def route_iface(self, dst: IPAddress) -> str:
        out = _run(self.path, ["ip", "-j", "route", "get", str(dst)], check=False)
        try:
            routes = json.loads(out or "[]")
        except json.JSONDecodeError:
            return ""
        return str(routes[0].get("dev", "")) if routes else ""


def _has_rules(text: str) -> bool:
    return any(line.startswith("-A ") for line in text.splitlines())


def read_rules(path: str) -> Ruleset:
    """The namespace's rules: iptables (nft backend, else legacy) or native nftables."""
    pick: dict[int, tuple[str, str]] = {}
    for fam, base in ((4, "iptables"), (6, "ip6tables")):
        for binary in (f"{base}-nft-save", f"{base}-legacy-save", f"{base}-save"):
            if shutil.which(binary) is None:
                continue
            text = _run(path, [binary], check=False)
            if _has_rules(text):
                pick[fam] = (binary, text)
                break
        else:
            pick.setdefault(fam, ("", ""))
    if not pick[4][1] and not pick[6][1] and shutil.which("nft"):
        text = _run(path, ["nft", "-j", "list", "ruleset"], check=False)
        if "istio-proxy" in text or '"rule"' in text:
            from remora.capture.nftjson import ruleset_from_nft_json

            rs = ruleset_from_nft_json(text)
            rs.origin = "nft -j list ruleset"
            return rs
    origin = " + ".join(b for b, _ in pick.values() if b) or "iptables-save (empty)"
    return ruleset_from_save(pick[4][1], pick[6][1], origin=origin)


def read_namespace(path: str) -> LiveNamespace:
    ns = LiveNamespace(path=path, ruleset=read_rules(path))
    try:
        links = json.loads(_run(path, ["ip", "-j", "addr", "show"]) or "[]")
    except json.JSONDecodeError as exc:
        raise EnvironmentFault(f"cannot read addresses in {path}: {exc}") from None
    for link in links:
        for info in link.get("addr_info", []):
            try:
                ns.addresses.append(ipaddress.ip_address(info["local"]))
            except (KeyError, ValueError):
                continue
    for fam in ("-4", "-6"):
        try:
            rules = json.loads(_run(path, ["ip", fam, "-j", "rule", "show"], check=False) or "[]")
        except json.JSONDecodeError:
            continue
        for rule in rules:
            mark = rule.get("fwmark")
            if mark is not None:
                try:
                    ns.routed_marks.add(int(str(mark).split("/")[0], 0))
                except ValueError:
                    continue
    return ns
