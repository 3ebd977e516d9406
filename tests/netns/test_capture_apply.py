"""`remora iptables` applying for real in throwaway network namespaces: atomicity,
idempotency, replacement, cleanup, backend choice, validation and environment errors."""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import require_root

pytestmark = pytest.mark.privileged

REMORA = str(Path(sys.executable).with_name("remora"))
INJECTOR = ["-p", "15001", "-z", "15006", "-u", "1337", "-m", "REDIRECT", "-i", "*", "-x", "",
            "-b", "*", "-d", "15090,15021,15020"]
TPROXY = ["-m", "TPROXY", "-b", "*", "-i", "*", "-u", "1337"]


def sh(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, check=check, timeout=60)


@pytest.fixture
def ns() -> Iterator[str]:
    """A namespace with lo up and one veth end holding 10.231.0.2/24 (so IPv4 is detected)."""
    require_root()
    name = f"rmt-{os.getpid()}-{secrets.token_hex(3)}"
    host_end, pod_end = f"vh{secrets.token_hex(4)}", f"vp{secrets.token_hex(4)}"
    sh("ip", "netns", "add", name)
    try:
        sh("ip", "link", "add", host_end, "type", "veth", "peer", "name", pod_end)
        sh("ip", "link", "set", pod_end, "netns", name)
        sh("ip", "-n", name, "link", "set", "lo", "up")
        sh("ip", "-n", name, "addr", "add", "10.231.0.2/24", "dev", pod_end)
        sh("ip", "-n", name, "link", "set", pod_end, "up")
        yield name
    finally:
        sh("ip", "link", "del", host_end, check=False)
        sh("ip", "netns", "del", name, check=False)


def remora(ns: str, *args: str, env: dict[str, str] | None = None,
           prefix: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
    return sh("ip", "netns", "exec", ns, *prefix, REMORA, "iptables", *args, check=False)


BUILTIN = {"PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING"}


def save(ns: str, binary: str = "iptables") -> str:
    """Rules and user chains per table, as ``*table -A ...`` / ``*table :CHAIN`` lines (empty
    tables and built-in chain headers, which iptables may leave or create, are left out)."""
    out = sh("ip", "netns", "exec", ns, f"{binary}-save").stdout
    lines, table = [], ""
    for line in out.splitlines():
        if line.startswith("*"):
            table = line
        elif line.startswith("-A") or (line.startswith(":") and line[1:].split()[0] not in BUILTIN):
            lines.append(f"{table} {line.split(' [')[0]}")
    return "\n".join(lines)


def nat_rules(ns: str) -> str:
    return sh("ip", "netns", "exec", ns, "iptables", "-t", "nat", "-S").stdout


def test_apply_is_idempotent(ns: str) -> None:
    first = remora(ns, *INJECTOR)
    assert first.returncode == 0, first.stderr
    before = nat_rules(ns)
    assert "-N ISTIO_INBOUND" in before and "-A OUTPUT -j ISTIO_OUTPUT" in before
    again = remora(ns, *INJECTOR)
    assert again.returncode == 0, again.stderr
    assert "nothing changed" in again.stderr
    assert nat_rules(ns) == before


def test_other_flags_replace_our_rules_and_keep_others(ns: str) -> None:
    sh("ip", "netns", "exec", ns, "iptables", "-t", "nat", "-A", "POSTROUTING", "-o", "lo",
       "-j", "ACCEPT")
    assert remora(ns, *INJECTOR, "-c", "eth7").returncode == 0
    out = remora(ns, "-u", "1337", "-b", "8080", "-i", "10.0.0.0/8")
    assert out.returncode == 0, out.stderr
    rules = nat_rules(ns)
    assert "--dport 15090" not in rules            # the old -d exclusion is gone
    assert "eth7" not in rules                     # and the old interface exclusion
    assert "-A ISTIO_INBOUND -p tcp -m tcp --dport 8080 -j ISTIO_IN_REDIRECT" in rules
    assert "-A ISTIO_OUTPUT -d 10.0.0.0/8 -j ISTIO_REDIRECT" in rules
    assert rules.count("-A PREROUTING -p tcp -j ISTIO_INBOUND") == 1
    assert "-A POSTROUTING -o lo -j ACCEPT" in rules  # someone else's rule survives


def test_refused_rule_changes_nothing_and_names_the_line(ns: str) -> None:
    out = remora(ns, *INJECTOR[:-2], "-u", "no-such-user-here")
    assert out.returncode == 1
    err = out.stderr.strip().splitlines()[-1]
    assert err.startswith("Error:") and "nothing was applied" in err
    assert "no-such-user-here" in err               # the refused line is quoted
    assert "ISTIO" not in save(ns)


def test_refused_replacement_keeps_the_previous_rules(ns: str) -> None:
    assert remora(ns, *INJECTOR).returncode == 0
    before = nat_rules(ns)
    out = remora(ns, "-u", "no-such-user-here", "-b", "*")
    assert out.returncode == 1
    assert nat_rules(ns) == before


def test_cleanup_removes_ours_only(ns: str) -> None:
    sh("ip", "netns", "exec", ns, "iptables", "-t", "nat", "-A", "OUTPUT", "-d", "192.0.2.1/32",
       "-j", "RETURN")
    sh("ip", "netns", "exec", ns, "iptables", "-t", "mangle", "-N", "MINE")
    pristine = save(ns)
    assert remora(ns, *TPROXY, "-c", "eth7", "--redirect-dns", "--capture-all-dns").returncode == 0
    assert "ISTIO" in save(ns)
    rules = sh("ip", "netns", "exec", ns, "ip", "rule").stdout
    assert "fwmark 0x539 lookup 133" in rules
    assert "local default dev lo" in sh("ip", "-n", ns, "route", "show", "table", "133").stdout
    out = remora(ns, *TPROXY, "-c", "eth7", "--redirect-dns", "--capture-all-dns",
                 "--cleanup-only")
    assert out.returncode == 0, out.stderr
    assert save(ns) == pristine
    assert "fwmark" not in sh("ip", "netns", "exec", ns, "ip", "rule").stdout
    assert sh("ip", "-n", ns, "route", "show", "table", "133").stdout.strip() == ""


def test_tproxy_rerun_changes_nothing(ns: str) -> None:
    assert remora(ns, *TPROXY).returncode == 0
    before = (save(ns), sh("ip", "netns", "exec", ns, "ip", "rule").stdout)
    out = remora(ns, *TPROXY)
    assert out.returncode == 0, out.stderr
    assert (save(ns), sh("ip", "netns", "exec", ns, "ip", "rule").stdout) == before


def test_legacy_chosen_when_it_holds_rules(ns: str) -> None:
    sh("ip", "netns", "exec", ns, "iptables-legacy", "-A", "INPUT", "-s", "192.0.2.9", "-j",
       "ACCEPT")
    assert remora(ns, *INJECTOR).returncode == 0
    assert "ISTIO_OUTPUT" in save(ns, "iptables-legacy")
    assert "ISTIO_OUTPUT" not in save(ns, "iptables-nft")


def test_nft_backend_by_default_and_no_legacy_tables_left(ns: str) -> None:
    assert remora(ns, *INJECTOR).returncode == 0
    assert "ISTIO_OUTPUT" in save(ns, "iptables-nft")
    assert save(ns, "iptables-legacy").strip() == ""


def test_force_legacy_binary(ns: str) -> None:
    assert remora(ns, *INJECTOR, "--force-iptables-binary=legacy").returncode == 0
    assert "ISTIO_OUTPUT" in save(ns, "iptables-legacy")


def test_dry_run_changes_nothing(ns: str, tmp_path: Path) -> None:
    target = tmp_path / "dry.txt"
    out = sh("ip", "netns", "exec", ns, "env", f"DRY_RUN_FILE_PATH={target}", REMORA,
             "iptables", *INJECTOR, "--dry-run", check=False)
    assert out.returncode == 0 and out.stdout == ""
    assert target.read_text().startswith("iptables-save\nip6tables-save\n* nat\n")
    assert "ISTIO" not in save(ns)


def test_validation_passes_with_rules_and_fails_126_without(ns: str) -> None:
    ok = remora(ns, *INJECTOR, "--run-validation", "--probe-timeout=5s")
    assert ok.returncode == 0, ok.stderr
    assert remora(ns, *INJECTOR, "--cleanup-only").returncode == 0
    bad = remora(ns, *INJECTOR, "--run-validation", "--skip-rule-apply", "--probe-timeout=1s")
    assert bad.returncode == 126
    assert "iptables validation failed" in bad.stderr


def test_without_net_admin_nothing_is_applied(ns: str) -> None:
    out = remora(ns, *INJECTOR, prefix=("setpriv", "--bounding-set=-net_admin",
                                        "--inh-caps=-net_admin"))
    assert out.returncode == 1
    assert out.stderr.strip().splitlines()[-1].startswith("Error: remora iptables must run as")
    assert "ISTIO" not in save(ns)


def test_missing_iptables_is_one_clear_line(ns: str, tmp_path: Path) -> None:
    out = remora(ns, *INJECTOR, prefix=("env", f"PATH={tmp_path}"))
    assert out.returncode == 1
    assert out.stderr.strip() == "Error: iptables: command not found (install the iptables package)"


def test_cleanup_of_a_partly_removed_rule_set(ns: str) -> None:
    pristine = save(ns)
    assert remora(ns, *INJECTOR).returncode == 0
    sh("ip", "netns", "exec", ns, "iptables", "-t", "nat", "-D", "OUTPUT", "-j", "ISTIO_OUTPUT")
    out = remora(ns, *INJECTOR, "--cleanup-only")
    assert out.returncode == 0, out.stderr
    assert save(ns) == pristine


def nft_tables(ns: str) -> str:
    return sh("ip", "netns", "exec", ns, "nft", "list", "tables").stdout


def test_native_nftables_through_the_cli(ns: str) -> None:
    dry = remora(ns, *INJECTOR, "--native-nftables", "--dry-run")
    assert dry.returncode == 0
    assert dry.stdout.startswith("add table inet istio-proxy-nat\n")
    assert "istio-proxy" not in nft_tables(ns)       # dry-run applied nothing
    sh("ip", "netns", "exec", ns, "nft", "add", "table", "inet", "other")
    assert remora(ns, *INJECTOR, "--native-nftables").returncode == 0
    ruleset = sh("ip", "netns", "exec", ns, "nft", "list", "table", "inet",
                 "istio-proxy-nat").stdout
    assert "redirect to :15001" in ruleset and "redirect to :15006" in ruleset
    again = remora(ns, *INJECTOR, "--native-nftables")
    assert again.returncode == 0
    assert sh("ip", "netns", "exec", ns, "nft", "list", "table", "inet",
              "istio-proxy-nat").stdout == ruleset
    assert remora(ns, *INJECTOR, "--native-nftables", "--cleanup-only").returncode == 0
    tables = nft_tables(ns)
    assert "istio-proxy" not in tables and "inet other" in tables


def test_force_apply_reapplies_in_place(ns: str) -> None:
    assert remora(ns, *INJECTOR).returncode == 0
    before = nat_rules(ns)
    out = remora(ns, *INJECTOR, "--force-apply")
    assert out.returncode == 0, out.stderr
    assert "nothing changed" not in out.stderr
    assert nat_rules(ns) == before


def test_dns_servers_come_from_the_namespace_resolv_conf(ns: str) -> None:
    # `ip netns exec NAME` bind-mounts /etc/netns/NAME/resolv.conf over /etc/resolv.conf.
    etc = Path("/etc/netns") / ns
    etc.mkdir(parents=True)
    try:
        (etc / "resolv.conf").write_text("search svc.cluster.local\nnameserver 10.96.0.10\n"
                                         "nameserver ::127.0.0.53\n")
        out = remora(ns, *INJECTOR, "--redirect-dns")
        assert out.returncode == 0, out.stderr
        rules = nat_rules(ns)
        assert "-A ISTIO_OUTPUT_DNS -d 10.96.0.10/32 -p udp -m udp --dport 53 " \
               "-j REDIRECT --to-ports 15053" in rules
        assert "-A ISTIO_OUTPUT -j ISTIO_OUTPUT_DNS" in rules
        # IPv6 is off here (the namespace's first address is IPv4): no ip6tables rules.
        assert "ISTIO" not in save(ns, "ip6tables")
    finally:
        (etc / "resolv.conf").unlink(missing_ok=True)
        etc.rmdir()


def test_ipv6_is_detected_from_an_ipv6_only_namespace(ns: str) -> None:
    pod_if = sh("ip", "-n", ns, "-o", "link", "show", "type", "veth").stdout.split(":")[1].strip()
    pod_if = pod_if.split("@")[0]
    sh("ip", "-n", ns, "addr", "flush", "dev", pod_if)
    sh("ip", "-n", ns, "addr", "add", "fd00:231::2/64", "dev", pod_if, "nodad")
    out = remora(ns, *INJECTOR)
    assert out.returncode == 0, out.stderr
    v6 = sh("ip", "netns", "exec", ns, "ip6tables", "-t", "nat", "-S").stdout
    assert "-A ISTIO_OUTPUT -s ::6/128 -o lo -j RETURN" in v6
    assert "inet6 ::6/128" in sh("ip", "-n", ns, "addr", "show", "dev", "lo").stdout
