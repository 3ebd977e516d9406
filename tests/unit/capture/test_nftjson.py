"""`nft -j list ruleset` output as the walker's rule set.

The JSON under ``data/`` was captured from a real ``nft -j list ruleset`` (nftables 1.0.6)
after loading, in a throwaway namespace:

* ``nft-injector-redirect.json``: Remora's nft transaction for the injector's defaults;
* ``nft-tproxy-dns-ipv6.json``: TPROXY, DNS capture (v4 and v6 servers), IPv6 on, include/
  exclude CIDRs and ports, an excluded and a KubeVirt interface, ``--drop-invalid``;
* ``nft-other-shapes.json``: hand-written rules outside Istio's set (ranges, sets, masks,
  relational operators, wildcards, NAT statements, limits, an oddly placed base chain).
"""

from __future__ import annotations

import ipaddress
import json
from pathlib import Path

import pytest

from remora.capture.config import HostFacts, build_config, parse_flags
from remora.capture.nftjson import convert_rule, rule_text, ruleset_from_nft_json
from remora.capture.rules import build_rules
from remora.capture.ruletext import FULL_MASK, Match, ParsedRule, Target
from remora.capture.trace import (
    Connection,
    Ruleset,
    local_context,
    ruleset_from_rules,
    trace,
    with_defaults,
)
from remora.errors import BadInput

DATA = Path(__file__).parent / "data"
INJECTOR = ["-p", "15001", "-z", "15006", "-u", "1337", "-m", "REDIRECT", "-i", "*", "-x", "",
            "-b", "*", "-d", "15090,15021,15020", "--native-nftables"]
EVERYTHING = ["-p", "15001", "-z", "15006", "-u", "1337", "-g", "1337", "-m", "TPROXY",
              "-i", "10.0.0.0/8,2001:db8::/32", "-x", "10.1.0.0/16,2001:db8:1::/48",
              "-b", "8080,9090", "-k", "eth1", "-c", "eth9", "-o", "3306", "-q", "5432",
              "--drop-invalid", "--redirect-dns", "--native-nftables"]
EVERYTHING_FACTS = HostFacts(enable_ipv6=True, dns_servers_v4=("10.96.0.10",),
                             dns_servers_v6=("fd00::a",))

A = ipaddress.ip_address
N = ipaddress.ip_network


def load(name: str) -> Ruleset:
    return ruleset_from_nft_json((DATA / f"{name}.json").read_text())


def chain(rs: Ruleset, family: int, table: str, name: str) -> list[ParsedRule]:
    t = rs.table(family, table)
    assert t is not None, f"no {table} table for IPv{family}"
    return t.chains[name]


def rule(rs: Ruleset, family: int, table: str, name: str, native: str) -> ParsedRule:
    found = [r for r in chain(rs, family, table, name) if r.native == native]
    assert len(found) == 1, [r.native for r in chain(rs, family, table, name)]
    return found[0]


def fam(proto: str) -> Match:
    return Match(kind="family", proto=proto)


# ------------------------------------------------------------------------- Istio's rules


def test_injector_defaults_layout() -> None:
    rs = load("nft-injector-redirect")
    assert not rs.unknown
    for family in (4, 6):
        assert set(rs.tables[family]) == {"nat"}
        nat = rs.tables[family]["nat"]
        assert list(nat.chains) == ["PREROUTING", "istio-inbound", "istio-redirect",
                                    "istio-in-redirect", "istio-output", "OUTPUT"]
        assert nat.policies == {}
        assert [r.native for r in nat.chains["OUTPUT"]] == ["counter jump istio-output"]
        assert all(r.family == family and r.table == "nat" for r in rs.rules()
                   if r in nat.chains["istio-output"])


def test_injector_rule_matches_and_targets() -> None:
    rs = load("nft-injector-redirect")
    r = rule(rs, 4, "nat", "istio-output", 'oifname "lo" ip daddr != 127.0.0.1 tcp dport != '
             "15008 meta skuid 1337 counter jump istio-in-redirect")
    assert r.matches == (
        Match(kind="out", module="meta", iface="lo"),
        fam("ipv4"),
        Match(kind="dst", negated=True, net=N("127.0.0.1/32")),
        Match(kind="dport", negated=True, module="tcp", ports=((15008, 15008),)),
        Match(kind="uid", module="meta", ids=(1337, 1337)),
    )
    assert r.target == Target(kind="jump", chain="istio-in-redirect")
    r = rule(rs, 6, "nat", "istio-output",
             'oifname "lo" meta skuid != 1337 counter return')
    assert r.matches == (Match(kind="out", module="meta", iface="lo"),
                         Match(kind="uid", negated=True, module="meta", ids=(1337, 1337)))
    assert r.target == Target(kind="RETURN")
    assert r.family == 6
    r = rule(rs, 4, "nat", "istio-redirect", "meta l4proto tcp counter redirect to :15001")
    assert r.matches == (Match(kind="proto", proto="tcp"),)
    assert r.target == Target(kind="REDIRECT", to_ports=(15001, 15001))
    r = rule(rs, 4, "nat", "istio-inbound", "tcp dport 15090 counter return")
    assert r.matches == (Match(kind="dport", module="tcp", ports=((15090, 15090),)),)
    # The text users see is nft's, and the source is the JSON it came from.
    assert r.text == r.native
    assert json.loads(r.source)["chain"] == "istio-inbound"


def test_everything_tproxy_mark_connmark_zone() -> None:
    rs = load("nft-tproxy-dns-ipv6")
    assert not rs.unknown
    assert set(rs.tables[4]) == set(rs.tables[6]) == {"nat", "mangle", "raw"}
    r = rule(rs, 6, "mangle", "istio-tproxy", "meta l4proto tcp ip6 daddr != ::1 tproxy ip6 "
             "to :15006 meta mark set 0x00000539 counter accept")
    assert r.matches == (Match(kind="proto", proto="tcp"), fam("ipv6"),
                         Match(kind="dst", negated=True, net=N("::1/128")))
    assert r.target == Target(kind="TPROXY", on_port=15006, mark=(1337, FULL_MASK))
    r = rule(rs, 4, "mangle", "istio-divert", "counter meta mark set 0x00000539")
    assert r.target == Target(kind="MARK", mark_op="set-xmark", mark=(1337, FULL_MASK))
    r = rule(rs, 4, "mangle", "PREROUTING",
             "meta l4proto tcp meta mark 0x00000539 counter ct mark set meta mark")
    assert r.matches[1] == Match(kind="mark", module="meta", mark=(1337, FULL_MASK))
    assert r.target == Target(kind="CONNMARK", mark_op="save")
    r = rule(rs, 4, "mangle", "OUTPUT",
             "meta l4proto tcp ct mark 0x00000539 counter meta mark set ct mark")
    assert r.matches[1] == Match(kind="connmark", module="ct", mark=(1337, FULL_MASK))
    assert r.target == Target(kind="CONNMARK", mark_op="restore")
    r = rule(rs, 4, "mangle", "istio-inbound", "ct state established,related tcp dport 8080 "
             "counter jump istio-divert")
    assert r.matches[0] == Match(kind="ctstate", module="ct", states=("ESTABLISHED", "RELATED"))
    r = rule(rs, 4, "mangle", "PREROUTING",
             "meta l4proto tcp ct state invalid counter jump istio-drop")
    assert r.matches[1].states == ("INVALID",)
    assert [x.target for x in chain(rs, 4, "mangle", "istio-drop")] == [Target(kind="DROP")]
    r = rule(rs, 4, "raw", "istio-output-dns", "udp sport 15053 meta skgid 1337 counter ct zone "
             "set 2")
    assert r.matches == (Match(kind="sport", module="udp", ports=((15053, 15053),)),
                         Match(kind="gid", module="meta", ids=(1337, 1337)))
    assert r.target == Target(kind="CT", zone=2)
    r = rule(rs, 4, "nat", "istio-output", 'oifname "lo" ip daddr != 127.0.0.1 tcp dport != '
             "{ 53, 15008 } meta skuid 1337 counter jump istio-in-redirect")
    assert r.matches[3] == Match(kind="dport", negated=True, module="tcp",
                                 ports=((53, 53), (15008, 15008)))
    r = rule(rs, 6, "nat", "PREROUTING",
             'iifname "eth1" ip6 daddr 2001:db8::/32 counter jump istio-redirect')
    assert r.matches == (Match(kind="in", module="meta", iface="eth1"), fam("ipv6"),
                         Match(kind="dst", net=N("2001:db8::/32")))
    # Both families hold every rule of an inet table, the family match sorting them out.
    assert len(chain(rs, 4, "nat", "istio-output")) == len(chain(rs, 6, "nat", "istio-output"))


# -------------------------------------------------------------------------- other shapes


def test_other_shapes_matches() -> None:
    rs = load("nft-other-shapes")
    pre = {r.native: r for r in chain(rs, 4, "nat", "PREROUTING")}
    assert pre['iifname "veth*" tcp dport 1000-2000 redirect'].matches == (
        Match(kind="in", module="meta", iface="veth+"),
        Match(kind="dport", module="tcp", ports=((1000, 2000),)))
    assert pre['iifname "veth*" tcp dport 1000-2000 redirect'].target == Target(kind="REDIRECT")
    assert pre["tcp dport { 80, 8000-8100 } redirect to :15001"].matches[0].ports == (
        (80, 80), (8000, 8100))
    assert pre["meta mark & 0x0000ff00 == 0x00000100 return"].matches == (
        Match(kind="mark", module="meta", mark=(0x100, 0xFF00)),)
    both = pre["meta mark & 0x0000ff00 != 0x00000100 ct mark & 0x000000ff == 0x00000003 return"]
    assert both.matches == (Match(kind="mark", negated=True, module="meta", mark=(0x100, 0xFF00)),
                            Match(kind="connmark", module="ct", mark=(3, 0xFF)))
    assert pre["ip protocol udp meta skuid 1000-2000 return"].matches == (
        fam("ipv4"), Match(kind="proto", proto="udp"),
        Match(kind="uid", module="meta", ids=(1000, 2000)))
    assert pre["meta skuid < 1000 return"].matches[0].ids == (0, 999)
    assert pre["tcp sport != 1024-65535 counter return"].matches == (
        Match(kind="sport", negated=True, module="tcp", ports=((1024, 65535),)),)
    # log changes nothing: the verdict is the rule's target.
    logged = pre['ct state established,new log prefix "hi " accept']
    assert logged.matches[0].states == ("ESTABLISHED", "NEW")
    assert logged.target == Target(kind="ACCEPT")


def test_other_shapes_unknown_parts_are_named() -> None:
    rs = load("nft-other-shapes")
    pre = {r.native: r for r in chain(rs, 4, "nat", "PREROUTING")}
    named = pre["ip daddr @allowed dnat to 10.0.0.1"]
    assert named.matches == (Match(kind="unknown", module="nft", text="ip daddr @allowed"),)
    assert named.target == Target(kind="unknown", text="dnat to 10.0.0.1")
    assert pre["limit rate 10/second accept"].unknown == ("limit rate 10/second",)
    assert pre["ip saddr { 10.0.0.0/8, 192.168.1.1 } return"].unknown == (
        "ip saddr { 10.0.0.0/8, 192.168.1.1 }",)
    post = chain(rs, 4, "nat", "POSTROUTING")
    assert post[0].target == Target(kind="unknown", text="masquerade")
    other = {r.native: r for r in chain(rs, 4, "filter", "other")}
    assert other["meta l4proto { tcp, udp } return"].unknown == ("meta l4proto { tcp, udp }",)
    flt = {r.native: r for r in chain(rs, 4, "filter", "INPUT")}
    # A mark and a verdict in one rule do not fit one target: unknown, not half of it.
    assert flt["meta mark set 0x00000002 accept"].target == Target(
        kind="unknown", text="meta mark set 0x00000002 accept")
    m = {r.native: r for r in chain(rs, 6, "mangle", "PREROUTING")}
    assert m["meta l4proto tcp tproxy to :15006"].target == Target(
        kind="unknown", text="tproxy to :15006")       # no accept: the rule goes on
    assert m["th dport 53 notrack"].unknown == ("th dport 53", "notrack")


def test_other_shapes_targets_and_placement() -> None:
    rs = load("nft-other-shapes")
    # An ip table feeds IPv4 only; the inet table both.
    assert set(rs.tables[4]) == {"nat", "filter", "mangle", "raw"}
    assert set(rs.tables[6]) == {"mangle", "raw"}
    flt = rs.tables[4]["filter"]
    assert flt.policies == {"INPUT": "DROP"}
    by_text = {r.native: r for r in flt.chains["INPUT"]}
    assert by_text["tcp dport 22 reject with tcp reset"].target == Target(kind="REJECT")
    assert by_text["ct mark set meta mark & 0x0000ffff"].target == Target(
        kind="CONNMARK", mark_op="save", masks=(0xFFFF, FULL_MASK))
    # (mark & 0xffff0001) | 1 == (mark & ~0xffff) ^ 1
    assert by_text["meta mark set meta mark & 0xffff0001 | 0x00000001"].target == Target(
        kind="MARK", mark_op="set-xmark", mark=(1, 0xFFFF))
    assert by_text["ip daddr 10.0.0.1 goto other"].target == Target(kind="goto", chain="other")
    other = {r.native: r for r in flt.chains["other"]}
    assert other["continue"].target is None
    assert other['iif "lo" accept'].matches == (Match(kind="in", module="meta", iface="lo"),)
    assert other['oifname "eth0*" drop'].matches == (
        Match(kind="out", module="meta", iface="eth0+"),)
    assert other["meta skuid 0 return"].matches[0].ids == (0, 0)
    # The regular chain is copied into each table kind its table's base chains feed.
    assert "other" in rs.tables[4]["nat"].chains
    m6 = {r.native: r for r in rs.tables[6]["mangle"].chains["PREROUTING"]}
    tp = m6["meta l4proto tcp tproxy ip to 127.0.0.1:15006 meta mark set 0x00000001 accept"]
    assert tp.matches == (Match(kind="proto", proto="tcp"), fam("ipv4"))
    assert tp.target == Target(kind="TPROXY", on_port=15006, on_ip="127.0.0.1", mark=(1, FULL_MASK))
    tp6 = m6["ip6 nexthdr tcp meta l4proto tcp tproxy ip6 to [::1]:15006 accept"]
    assert tp6.matches == (fam("ipv6"), Match(kind="proto", proto="tcp"),
                           Match(kind="proto", proto="tcp"))
    assert tp6.target == Target(kind="TPROXY", on_port=15006, on_ip="::1")
    assert m6["meta nfproto ipv6 meta mark 0x00000005 return"].matches == (
        fam("ipv6"), Match(kind="mark", module="meta", mark=(5, FULL_MASK)))
    # A base chain at a priority the walker has no place for: undecided at its hook.
    head = rs.tables[6]["raw"].chains["OUTPUT"][0]
    assert head.unknown and "inet tp weird" in head.unknown[0]
    conn = Connection(direction="outbound", src=A("fd00::2"), dst=A("fd00::9"), dport=80,
                      uid=1000, gid=1000)
    v = trace(rs, conn)
    assert v.captured is None and "inet tp weird" in v.reason


def test_two_base_chains_at_one_place_make_that_hook_undecided() -> None:
    istio = json.loads((DATA / "nft-injector-redirect.json").read_text())["nftables"]
    other = [item for item in json.loads((DATA / "nft-other-shapes.json").read_text())[
        "nftables"] if next(iter(item.values())).get("family") == "ip"]
    rs = ruleset_from_nft_json(json.dumps({"nftables": istio + other}))
    # ip extra's nat prerouting meets Istio's in IPv4 only.
    head = rs.tables[4]["raw"].chains["PREROUTING"][0]
    assert "chain ip extra pre" in head.unknown[0] and "inet istio-proxy-nat" in head.unknown[0]
    assert "raw" not in rs.tables[6] or not any(
        r.unknown for r in rs.tables[6]["raw"].chains.get("PREROUTING", []))
    inbound4 = Connection(direction="inbound", src=A("10.0.0.9"), dst=A("10.0.0.2"), dport=8080)
    inbound6 = Connection(direction="inbound", src=A("fd00::9"), dst=A("fd00::2"), dport=8080)
    assert trace(rs, inbound4).captured is None
    assert trace(rs, inbound6).redirect_port == 15006
    # Istio's nat chains are still the ones placed, and ip extra's post/filt chains too.
    assert rs.tables[4]["nat"].chains["OUTPUT"][-1].native == "counter jump istio-output"
    assert "POSTROUTING" in rs.tables[4]["nat"].chains


def test_empty_and_forward_chains_change_nothing() -> None:
    text = json.dumps({"nftables": [
        {"table": {"family": "inet", "name": "t", "handle": 1}},
        {"chain": {"family": "inet", "table": "t", "name": "fw", "handle": 1, "type": "filter",
                   "hook": "forward", "prio": 0, "policy": "drop"}},
        {"chain": {"family": "inet", "table": "t", "name": "odd", "handle": 2, "type": "filter",
                   "hook": "output", "prio": 7, "policy": "accept"}},
        {"table": {"family": "bridge", "name": "b", "handle": 2}},
        {"chain": {"family": "bridge", "table": "b", "name": "x", "handle": 1, "type": "filter",
                   "hook": "output", "prio": 0, "policy": "drop"}},
    ]})
    rs = ruleset_from_nft_json(text)
    assert rs.tables == {4: {}, 6: {}}


def test_rule_comment_is_part_of_the_text() -> None:
    doc = json.loads((DATA / "nft-injector-redirect.json").read_text())
    for item in doc["nftables"]:
        if "rule" in item and item["rule"]["chain"] == "output":
            item["rule"]["comment"] = "istio"
    rs = ruleset_from_nft_json(json.dumps(doc))
    assert [r.native for r in rs.tables[4]["nat"].chains["OUTPUT"]] == [
        'counter jump istio-output comment "istio"']


def test_dormant_tables_are_left_out() -> None:
    doc = json.loads((DATA / "nft-injector-redirect.json").read_text())
    for item in doc["nftables"]:
        if "table" in item:
            item["table"]["flags"] = "dormant"
    assert ruleset_from_nft_json(json.dumps(doc)).tables == {4: {}, 6: {}}


@pytest.mark.parametrize("bad", ["", "not json", "[]", '{"nftables": 3}'])
def test_bad_input(bad: str) -> None:
    with pytest.raises(BadInput):
        ruleset_from_nft_json(bad)


def test_convert_rule_edge_shapes() -> None:
    # A match after a statement is a condition of what follows: the model cannot split it.
    matches, target = convert_rule([
        {"mangle": {"key": {"meta": {"key": "mark"}}, "value": 1}},
        {"match": {"op": "==", "left": {"meta": {"key": "l4proto"}}, "right": "tcp"}},
        {"accept": None}])
    assert matches == () and target is not None and target.kind == "unknown"
    # l4proto by number, interface names nft escapes, malformed expressions.
    matches, target = convert_rule([
        {"match": {"op": "!=", "left": {"meta": {"key": "l4proto"}}, "right": 17}},
        {"match": {"op": "==", "left": {"meta": {"key": "iifname"}}, "right": "a\\*"}},
        {"match": {"op": "==", "left": {"meta": {"key": "oifname"}}, "right": "plus+"}},
        {"match": {"op": "==", "left": {"payload": {"protocol": "ip", "field": "daddr"}},
                   "right": "fd00::1"}},
        "garbage",
        {"drop": None}])
    assert matches[:2] == (Match(kind="proto", negated=True, proto="udp"),
                           Match(kind="in", module="meta", iface="a*"))
    assert [m.kind for m in matches[2:]] == ["unknown", "unknown", "unknown"]
    assert target == Target(kind="DROP")
    # iptables-nft's extension matches: JSON names them without their options.
    matches, target = convert_rule([
        {"xt": {"type": "match", "name": "owner"}}, {"counter": None}, {"return": None}])
    assert matches == (Match(kind="unknown", module="nft", text='xt match "owner"'),)
    assert target == Target(kind="RETURN")
    assert rule_text([{"match": {"op": "==", "left": {"ct": {"key": "zone", "dir": "original"}},
                                 "right": 3}}, {"queue": {"num": 1}}]) == \
        'ct original zone 3 queue {"num":1}'


# ------------------------------------------------------- agreement with the iptables model

POD4, PEER4, EXT4, DNS4 = A("10.0.0.2"), A("10.0.0.9"), A("10.5.0.1"), A("10.96.0.10")
POD6, PEER6, EXT6, DNS6 = A("fd00::2"), A("fd00::9"), A("2001:db8::5"), A("fd00::a")


def grid(version: int) -> list[Connection]:
    pod, peer, ext, dns = (POD4, PEER4, EXT4, DNS4) if version == 4 else (POD6, PEER6, EXT6, DNS6)
    lo, passthrough = (A("127.0.0.1"), A("127.0.0.6")) if version == 4 else (A("::1"), A("::6"))
    conns = [Connection(direction="inbound", src=peer, dst=pod, dport=p)
             for p in (8080, 9090, 15021, 15008, 15090, 3306)]
    for uid in (1000, 1337):
        for dst, port in ((ext, 80), (ext, 5432), (ext, 3306), (pod, 8080), (pod, 15008),
                          (lo, 8080), (dns, 53)):
            for proto in ("tcp", "udp"):
                conns.append(Connection(direction="outbound", proto=proto, src=pod, dst=dst,
                                        dport=port, uid=uid, gid=uid))
    conns.append(Connection(direction="outbound", src=passthrough, dst=pod, dport=8080,
                            uid=1337, gid=1337))
    return conns


@pytest.mark.parametrize(("name", "args", "facts"), [
    ("nft-injector-redirect", INJECTOR, HostFacts()),
    ("nft-tproxy-dns-ipv6", EVERYTHING, EVERYTHING_FACTS),
])
def test_saved_rules_trace_like_the_iptables_model(name: str, args: list[str],
                                                   facts: HostFacts) -> None:
    cfg = build_config(parse_flags(args, {}), {}, facts=facts)
    ipt = ruleset_from_rules(build_rules(cfg))
    nft = load(name)
    ctx = local_context([POD4, POD6], ipt)
    # With IPv6 off iptables mode has no IPv6 rules, while the inet tables still see IPv6.
    versions = (4, 6) if facts.enable_ipv6 else (4,)
    seen = set()
    for version in versions:
        for conn in grid(version):
            conn = with_defaults(conn, ctx, None)
            want, got = trace(ipt, conn, ctx), trace(nft, conn, ctx)
            assert (got.captured, got.redirect_port, got.mode, got.dropped) == (
                want.captured, want.redirect_port, want.mode, want.dropped), (conn, want.reason,
                                                                              got.reason)
            seen.add((got.captured, got.redirect_port, got.mode))
    assert (True, 15001, "REDIRECT") in seen and (False, None, None) in seen


def test_regular_chains_of_two_tables_in_one_kind_keep_apart() -> None:
    def table(name: str, hook: str, prio: int, verdict: str) -> list[dict[str, object]]:
        return [
            {"table": {"family": "ip", "name": name, "handle": 1}},
            {"chain": {"family": "ip", "table": name, "name": "base", "handle": 1,
                       "type": "nat", "hook": hook, "prio": prio, "policy": "accept"}},
            {"chain": {"family": "ip", "table": name, "name": "x", "handle": 2}},
            {"rule": {"family": "ip", "table": name, "chain": "base", "handle": 3,
                      "expr": [{"jump": {"target": "x"}}]}},
            {"rule": {"family": "ip", "table": name, "chain": "x", "handle": 4,
                      "expr": [{verdict: None}]}},
        ]
    rs = ruleset_from_nft_json(json.dumps({"nftables": [*table("a", "output", -100, "accept"),
                                                        *table("b", "postrouting", 100, "drop")]}))
    nat = rs.tables[4]["nat"]
    assert [r.target for r in nat.chains["OUTPUT"]] == [Target(kind="jump", chain="x")]
    assert [r.target for r in nat.chains["POSTROUTING"]] == [Target(kind="jump", chain="b/x")]
    assert [r.target for r in nat.chains["x"]] == [Target(kind="ACCEPT")]
    assert [r.target for r in nat.chains["b/x"]] == [Target(kind="DROP")]
    assert rs.tables[6] == {}


def test_verdict_words_on_nft_chain_names() -> None:
    # Istio's nft chains are istio-in-redirect etc.: the proxy calling its own pod IP is an
    # inbound capture, not a loop, and an excluded inbound port is called inbound.
    import ipaddress

    from remora.capture.trace import Connection, local_context, trace, with_defaults

    rs = load("nft-injector-redirect")
    pod = ipaddress.ip_address("10.0.0.2")
    ctx = local_context([pod], rs)
    own = with_defaults(Connection(direction="outbound", src=pod, dst=pod, dport=8080,
                                   uid=1337, gid=1337), ctx, None)
    v = trace(rs, own, ctx)
    assert (v.captured, v.redirect_port, v.loops) == (True, 15006, False)
    assert v.reason == "captured: REDIRECT to 15006 (inbound)"
    probe = Connection(direction="inbound", src=ipaddress.ip_address("10.0.0.9"), dst=pod,
                       dport=15021)
    assert "port 15021 is excluded (inbound)" in trace(rs, probe, ctx).reason
    assert ctx.proxy_uids == frozenset({1337})
