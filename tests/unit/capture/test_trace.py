"""The walker's verdicts on Istio's rule sets (the kernel-agreement test in
tests/netns/test_trace_agreement.py checks them against real connections)."""

from __future__ import annotations

import ipaddress
import shlex

import pytest

from remora.capture.config import HostFacts, build_config, parse_flags
from remora.capture.rules import build_rules
from remora.capture.trace import (
    Connection,
    local_context,
    ruleset_from_rules,
    ruleset_from_save,
    trace,
    with_defaults,
)
from remora.errors import BadInput

POD = ipaddress.ip_address("10.0.0.2")
PEER = ipaddress.ip_address("10.0.0.9")
SVC = ipaddress.ip_address("10.96.0.10")
INJECTOR = "-p 15001 -z 15006 -u 1337 -m {mode} -i '*' -x '' -b '*' -d 15090,15021,15020"


def rules(flags: str, dns: tuple[str, ...] = ()) -> tuple[object, object]:
    cfg = build_config(parse_flags(shlex.split(flags), {}), {},
                       facts=HostFacts(dns_servers_v4=dns))
    rs = ruleset_from_rules(build_rules(cfg))
    return rs, local_context([POD], rs)


def run(flags: str, conn: Connection, dns: tuple[str, ...] = ()):  # type: ignore[no-untyped-def]
    rs, ctx = rules(flags, dns)
    return trace(rs, with_defaults(conn, ctx, None), ctx)  # type: ignore[arg-type]


def out(dst: ipaddress.IPv4Address, port: int, uid: int = 1000, gid: int | None = None,
        src: ipaddress.IPv4Address = POD, proto: str = "tcp") -> Connection:
    return Connection(direction="outbound", src=src, dst=dst, dport=port, uid=uid,
                      gid=uid if gid is None else gid, proto=proto)  # type: ignore[arg-type]


def inb(port: int, src: ipaddress.IPv4Address = PEER) -> Connection:
    return Connection(direction="inbound", src=src, dst=POD, dport=port)


@pytest.mark.parametrize("mode", ["REDIRECT", "TPROXY"])
@pytest.mark.parametrize(("conn", "captured", "port", "reason"), [
    (out(SVC, 80), True, 15001, "captured: REDIRECT to 15001 (outbound)"),
    (out(SVC, 80, uid=1337), False, None, "uid 1337 is the proxy"),
    (out(SVC, 80, uid=1000, gid=1337), False, None, "gid 1337 is the proxy's group"),
    (out(POD, 8080, uid=1337), True, 15006, "captured: REDIRECT to 15006 (inbound)"),
    (out(POD, 8080, uid=1337, src=ipaddress.ip_address("127.0.0.6")), False, None,
     "inbound passthrough"),
    (out(POD, 8080), False, None, "the app calling itself over lo"),
    (inb(15021), False, None, "port 15021 is excluded (inbound)"),
])
def test_injector_defaults(mode: str, conn: Connection, captured: bool, port: int | None,
                           reason: str) -> None:
    v = run(INJECTOR.format(mode=mode), conn)
    assert (v.captured, v.redirect_port) == (captured, port), v.reason
    assert reason in v.reason
    assert not v.loops


def test_tunnel_port_is_only_exempt_in_redirect_mode() -> None:
    # Istio's tunnel RETURN lives in nat ISTIO_INBOUND, which TPROXY mode never jumps to.
    v = run(INJECTOR.format(mode="REDIRECT"), inb(15008))
    assert v.captured is False and "port 15008 is excluded (inbound)" in v.reason
    v = run(INJECTOR.format(mode="TPROXY"), inb(15008))
    assert (v.captured, v.mode) == (True, "TPROXY")


def test_inbound_capture_modes() -> None:
    v = run(INJECTOR.format(mode="REDIRECT"), inb(8080))
    assert (v.captured, v.redirect_port, v.mode) == (True, 15006, "REDIRECT")
    v = run(INJECTOR.format(mode="TPROXY"), inb(8080))
    assert (v.captured, v.redirect_port, v.mode) == (True, 15006, "TPROXY")
    assert v.reason == "captured inbound by TPROXY to 15006, mark 1337"


def test_loop_when_the_proxy_uid_is_not_excluded() -> None:
    v = run("-u 1338 -i *", out(SVC, 80, uid=1337))
    assert v.captured and v.loops
    assert v.reason.startswith("loops: the proxy's own connection")


def test_excluded_cidr_interface_and_ports() -> None:
    v = run("-u 1337 -i * -x 10.96.0.0/16", out(SVC, 80))
    assert v.reason.startswith("not captured: destination 10.96.0.10 is in the excluded range")
    v = run("-u 1337 -i * -o 5432", out(SVC, 5432))
    assert "port 5432 is excluded (outbound)" in v.reason
    rs, ctx = rules("-u 1337 -i * -c eth0")
    v = trace(rs, out(SVC, 80), ctx)  # type: ignore[arg-type]
    assert "interface eth0 is excluded" in v.reason
    v = run("-u 1337 -i 10.200.0.0/16", out(SVC, 80))
    assert v.captured is False and v.reason == "not captured: no rule redirects it"


def test_dns() -> None:
    v = run("-u 1337 -i * --redirect-dns", out(SVC, 53, proto="udp"), dns=("10.96.0.10",))
    assert (v.captured, v.redirect_port) == (True, 15053) and "(DNS)" in v.reason
    v = run("-u 1337 -i * --redirect-dns", out(SVC, 53, uid=1337, proto="udp"),
            dns=("10.96.0.10",))
    assert v.captured is False


def test_path_records_every_rule_visited() -> None:
    v = run(INJECTOR.format(mode="REDIRECT"), out(SVC, 80))
    matched = [s.rule for s in v.path if s.matched]
    assert matched == ["-A OUTPUT -j ISTIO_OUTPUT", "-A ISTIO_OUTPUT -j ISTIO_REDIRECT",
                       "-A ISTIO_REDIRECT -p tcp -j REDIRECT --to-ports 15001"]
    assert any(s.matched is False for s in v.path)
    assert all(s.table == "nat" for s in v.path)


SAVE = """*nat
:PREROUTING ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:ISTIO_OUTPUT - [0:0]
-A OUTPUT -j ISTIO_OUTPUT
-A ISTIO_OUTPUT -m statistic --mode random --probability 0.5 -j RETURN
-A ISTIO_OUTPUT -p tcp -j REDIRECT --to-ports 15001
COMMIT
"""


def test_unmodelled_match_makes_the_verdict_undecided() -> None:
    rs = ruleset_from_save(SAVE)
    v = trace(rs, out(SVC, 80))
    assert v.captured is None
    assert "-m statistic" in v.reason and "does not model" in v.reason
    assert rs.unknown and rs.unknown[0][1] == ("-m statistic --mode random --probability 0.5",)


def test_drop_policy_and_drop_rule() -> None:
    text = "*filter\n:OUTPUT DROP [0:0]\nCOMMIT\n"
    assert trace(ruleset_from_save(text), out(SVC, 80)).dropped
    text = "*mangle\n:OUTPUT ACCEPT [0:0]\n-A OUTPUT -p tcp -j DROP\nCOMMIT\n"
    v = trace(ruleset_from_save(text), out(SVC, 80))
    assert v.dropped and "dropped by `-A OUTPUT -p tcp -j DROP`" in v.reason


@pytest.mark.parametrize("bad", ["-A OUTPUT -j X\n", "*nat\nbogus line\n",
                                 "*nat\n-A OUTPUT -s 1.2.3.300 -j RETURN\n"])
def test_unparseable_save_text_names_the_line(bad: str) -> None:
    with pytest.raises(BadInput, match=r"iptables-save line \d"):
        ruleset_from_save(bad)


def test_tproxy_with_a_nat_redirect_too_is_noted() -> None:
    # Seen by the kernel-agreement test: -k eth0 adds `-i eth0 -j ISTIO_REDIRECT` in nat
    # PREROUTING, so an inbound TPROXY'd connection is also DNATed to 15001.
    rs, ctx = rules("-u 1337 -m TPROXY -b * -i * -k eth0")
    v = trace(rs, Connection(direction="inbound", src=PEER, dst=POD, dport=8080, iface="eth0"),
              ctx)  # type: ignore[arg-type]
    assert (v.captured, v.mode, v.redirect_port) == (True, "TPROXY", 15006)
    assert any("rewrites the destination to port 15001" in n for n in v.notes)
