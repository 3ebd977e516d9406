"""`remora trace` against live namespaces: our printed rules equal the kernel's listing, and
the CLI reads a namespace by name or by pid."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from remora.capture.config import HostFacts, build_config, parse_flags
from remora.capture.rules import build_rules
from remora.capture.trace import ruleset_from_rules, ruleset_from_save
from tests.conftest import require_root

pytestmark = pytest.mark.privileged

BIN = Path(sys.executable).parent
INJECTOR = ["-p", "15001", "-z", "15006", "-u", "1337", "-m", "REDIRECT", "-i", "*", "-x", "",
            "-b", "*", "-d", "15090,15021,15020"]
CONFIGS = [
    INJECTOR,
    ["-u", "1337", "-m", "TPROXY", "-b", "*", "-i", "*", "-d", "15020,15021"],
    ["-u", "3,4", "-g", "1,2", "-b", "4000,5000", "-i", "10.0.0.0/8,fd00::/8", "-x",
     "10.1.2.3/16", "-q", "8443", "-o", "9090,9091", "-k", "vm0", "-c", "eth9"],
    ["-u", "1337", "-m", "TPROXY", "-b", "8080,9090", "-i", "*", "--redirect-dns",
     "--capture-all-dns", "--drop-invalid"],
    ["-u", "1337", "-i", "*", "--redirect-dns"],
]


def sh(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, check=check, timeout=60)


@pytest.fixture
def ns() -> Iterator[str]:
    """Dual-stack namespace: --dual-stack turns IPv6 on, so both families get rules."""
    require_root()
    name = f"rtk-{os.getpid()}-{secrets.token_hex(3)}"
    sh("ip", "netns", "add", name)
    etc = Path("/etc/netns") / name
    try:
        sh("ip", "-n", name, "link", "set", "lo", "up")
        sh("ip", "-n", name, "link", "add", "eth0", "type", "veth", "peer", "name", "eth1")
        sh("ip", "-n", name, "addr", "add", "10.233.0.2/24", "dev", "eth0")
        sh("ip", "-n", name, "addr", "add", "fd00:233::2/64", "dev", "eth0", "nodad")
        sh("ip", "-n", name, "link", "set", "eth0", "up")
        sh("ip", "-n", name, "link", "set", "eth1", "up")
        etc.mkdir(parents=True)
        (etc / "resolv.conf").write_text("nameserver 10.96.0.10\nnameserver fd00:96::a\n")
        yield name
    finally:
        if etc.exists():
            (etc / "resolv.conf").unlink(missing_ok=True)
            etc.rmdir()
        sh("ip", "netns", "del", name, check=False)


def kernel_chains(ns: str, family: int) -> dict[tuple[str, str], list[str]]:
    save = sh("ip", "netns", "exec", ns, "iptables-save" if family == 4 else "ip6tables-save")
    rs = ruleset_from_save(save.stdout if family == 4 else "", save.stdout if family == 6 else "")
    return {(t, c): [r.source for r in rules]
            for t, table in rs.tables[family].items() for c, rules in table.chains.items()
            if rules}


@pytest.mark.parametrize("flags", CONFIGS, ids=["injector", "tproxy", "lists", "tproxy-dns",
                                                "dns"])
def test_printed_rules_equal_the_kernel_listing(ns: str, flags: list[str]) -> None:
    out = sh("ip", "netns", "exec", ns, str(BIN / "remora"), "iptables", *flags, "--dual-stack",
             check=False)
    assert out.returncode == 0, out.stderr
    facts = HostFacts(enable_ipv6=True, dns_servers_v4=("10.96.0.10",),
                      dns_servers_v6=("fd00:96::a",))
    ours = ruleset_from_rules(build_rules(build_config(parse_flags(flags, {}), {},
                                                       facts=facts)))
    for family in (4, 6):
        want = {(t, c): [r.text for r in rules]
                for t, table in ours.tables[family].items()
                for c, rules in table.chains.items() if rules}
        assert kernel_chains(ns, family) == want


def trace_json(*args: str) -> dict[str, object]:
    out = sh(str(BIN / "remora"), "trace", *args, "--json", check=False)
    assert out.returncode == 0, out.stderr
    doc: dict[str, object] = json.loads(out.stdout)
    return doc


def test_cli_reads_a_namespace_by_name_and_by_pid(ns: str) -> None:
    assert sh("ip", "netns", "exec", ns, str(BIN / "remora"), "iptables", *INJECTOR).returncode == 0
    doc = trace_json("--netns", ns, "--outbound", "--dst", "10.96.0.10:80")
    assert (doc["captured"], doc["redirect_port"], doc["mode"]) == (True, 15001, "REDIRECT")
    assert doc["reason"] == "captured: REDIRECT to 15001 (outbound)"
    path = doc["path"]
    assert isinstance(path, list) and {"table", "chain", "rule", "matched"} <= set(path[0])
    assert {"table": "nat", "chain": "ISTIO_REDIRECT", "hook": "OUTPUT", "matched": True,
            "rule": "-A ISTIO_REDIRECT -p tcp -j REDIRECT --to-ports 15001"} in path
    conn = doc["connection"]
    assert isinstance(conn, dict) and conn["src"] == "10.233.0.2" and conn["iface"] == "eth0"
    # The same namespace through a process living in it.
    holder = subprocess.Popen(["ip", "netns", "exec", ns, "sleep", "60"])
    try:
        doc = trace_json("--pid", str(holder.pid), "--inbound", "--dst", "10.233.0.2:15021")
        assert doc["captured"] is False
        assert str(doc["reason"]).startswith("not captured: port 15021 is excluded (inbound)")
    finally:
        holder.kill()
        holder.wait()


def test_cli_matrix_and_explain_on_a_live_namespace(ns: str) -> None:
    assert sh("ip", "netns", "exec", ns, str(BIN / "remora"), "iptables", *INJECTOR).returncode == 0
    doc = trace_json("--netns", ns, "--matrix")
    cases = {c["case"]: c for c in doc["cases"]}  # type: ignore[attr-defined]
    assert cases["app → service"]["redirect_port"] == 15001
    assert cases["proxy → external"]["captured"] is False
    assert cases["proxy → own pod IP"]["redirect_port"] == 15006
    assert cases["probe :15021"]["captured"] is False
    text = sh(str(BIN / "remora"), "trace", "explain", "--netns", ns).stdout
    assert "the proxy's own traffic (uid 1337) is not captured" in text


@pytest.mark.parametrize(("args", "needle"), [
    (["--netns", "no-such-ns-here", "--outbound", "--dst", "1.2.3.4:80"],
     "unknown network namespace 'no-such-ns-here'"),
    (["--iptables-args", "-i '*'", "--outbound", "--dst", "1.2.3.4"], "a port is required"),
    (["--iptables-args", "-i '*'", "--outbound", "--dst", "1.2.3:80"], "not an IP address"),
    (["--iptables-args", "-m FOO", "--outbound", "--dst", "1.2.3.4:80"], "'FOO'"),
    (["--save-file", "/dev/null", "--inbound"], "needs --outbound or --inbound and --dst"),
    (["--outbound", "--dst", "1.2.3.4:80"], "say where the rules come from"),
    (["--frobnicate"], "unrecognized arguments: --frobnicate"),
])
def test_bad_input_is_one_line_and_exit_2(args: list[str], needle: str) -> None:
    out = sh(str(BIN / "remora"), "trace", *args, check=False)
    assert out.returncode == 2
    assert out.stderr.count("\n") == 1 and needle in out.stderr


def test_unparseable_save_file(tmp_path: Path) -> None:
    bad = tmp_path / "rules.txt"
    bad.write_text("*nat\n:OUTPUT ACCEPT [0:0]\n-A OUTPUT -s not-an-ip -j RETURN\nCOMMIT\n")
    out = sh(str(BIN / "remora"), "trace", "--save-file", str(bad), "--outbound", "--dst",
             "1.2.3.4:80", check=False)
    assert out.returncode == 2
    assert out.stderr.strip() == ("Error: iptables-save line 3: bad address 'not-an-ip'")
