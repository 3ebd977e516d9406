"""The nftables transaction is accepted by the real ``nft -f -`` (in a throwaway netns).

For a few representative configurations: apply, check the tables and rule counts, apply again
(idempotent thanks to ``flush table``), then clean up and check that only Istio's tables went.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
from collections.abc import Iterator

import pytest

from remora.capture.config import CaptureConfig, HostFacts, build_config, parse_flags
from remora.capture.nft import TABLES, build_nft, nft_cleanup_lines, nft_script

pytestmark = pytest.mark.privileged

_TIMEOUT = 30.0

# The injected init container's flags (spec §1), in nftables mode.
_INJECTOR = ["-p", "15001", "-z", "15006", "-u", "1337", "-m", "REDIRECT", "-i", "*", "-x", "",
             "-b", "*", "-d", "15090,15021,15020", "--native-nftables"]


def _cfg(args: list[str], facts: HostFacts) -> CaptureConfig:
    return build_config(parse_flags(args, {}), {}, facts=facts)


def _tproxy(args: list[str]) -> list[str]:
    i = args.index("-m")
    return [*args[:i + 1], "TPROXY", *args[i + 2:]]


CONFIGS: dict[str, CaptureConfig] = {
    "redirect-default": _cfg(_INJECTOR, HostFacts()),
    "tproxy": _cfg(_tproxy(_INJECTOR), HostFacts()),
    "dns-capture": _cfg([*_INJECTOR, "--redirect-dns"],
                        HostFacts(dns_servers_v4=("10.96.0.10",))),
    "dns-capture-all": _cfg([*_INJECTOR, "--redirect-dns", "--capture-all-dns"], HostFacts()),
    # Everything at once with IPv6 on: all three tables, v4 and v6 variants, inserts.
    "ipv6-everything": _cfg(
        ["-p", "15001", "-z", "15006", "-u", "1337", "-m", "TPROXY",
         "-i", "10.0.0.0/8,2001:db8::/32", "-x", "10.1.0.0/16,2001:db8:1::/48",
         "-b", "8080,9090", "-k", "eth1", "-c", "eth9", "-o", "3306", "-q", "5432",
         "--drop-invalid", "--redirect-dns", "--native-nftables"],
        HostFacts(enable_ipv6=True, dns_servers_v4=("10.96.0.10",),
                  dns_servers_v6=("fd00::a",))),
}


def _run(cmd: list[str], stdin: str | None = None) -> str:
    res = subprocess.run(cmd, input=stdin, capture_output=True, text=True, timeout=_TIMEOUT,
                         check=False)
    if res.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({res.returncode}): {res.stderr.strip()}")
    return res.stdout


@pytest.fixture
def netns() -> Iterator[str]:
    if os.geteuid() != 0:
        pytest.skip("needs root")
    for tool in ("ip", "nft"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} not installed")
    name = f"remora-nft-{os.getpid()}-{secrets.token_hex(4)}"
    _run(["ip", "netns", "add", name])
    try:
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=_TIMEOUT,
                       check=False)


def _nft(ns: str, *args: str, stdin: str | None = None) -> str:
    return _run(["ip", "netns", "exec", ns, "nft", *args], stdin=stdin)


def _tables(ns: str) -> set[str]:
    return {line.removeprefix("table ").strip()
            for line in _nft(ns, "list", "tables").splitlines() if line.startswith("table ")}


def _rule_counts(ns: str) -> dict[str, int]:
    counts: dict[str, int] = {}
    for item in json.loads(_nft(ns, "-j", "list", "ruleset"))["nftables"]:
        if "rule" in item:
            table = item["rule"]["table"]
            counts[table] = counts.get(table, 0) + 1
    return counts


def _expected_counts(lines: list[str]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for line in lines:
        words = line.split()
        if words[:2] in (["add", "rule"], ["insert", "rule"]):
            counts[words[3]] = counts.get(words[3], 0) + 1
    return counts


@pytest.mark.parametrize("name", list(CONFIGS))
def test_apply_reapply_cleanup(netns: str, name: str) -> None:
    lines = build_nft(CONFIGS[name])
    script = nft_script(lines)
    wanted = {" ".join(line.split()[2:4]) for line in lines if line.startswith("add table ")}
    assert "inet istio-proxy-nat" in wanted

    _nft(netns, "add", "table", "inet", "other")
    _nft(netns, "-f", "-", stdin=script)
    assert _tables(netns) == {*wanted, "inet other"}
    assert _rule_counts(netns) == _expected_counts(lines)

    # Re-applying replaces rather than duplicates: each table is flushed first.
    _nft(netns, "-f", "-", stdin=script)
    assert _rule_counts(netns) == _expected_counts(lines)

    cleanup = nft_script(nft_cleanup_lines(CONFIGS[name]))
    _nft(netns, "-f", "-", stdin=cleanup)
    assert _tables(netns) == {"inet other"}
    # Cleaning up when nothing is left must not fail either.
    _nft(netns, "-f", "-", stdin=cleanup)
    assert _tables(netns) == {"inet other"}


def test_everything_config_creates_all_three_tables(netns: str) -> None:
    _nft(netns, "-f", "-", stdin=nft_script(build_nft(CONFIGS["ipv6-everything"])))
    assert _tables(netns) == {f"inet {t}" for t in TABLES}
