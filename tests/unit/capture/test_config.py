"""Flag/env parsing and validation of `remora iptables` (spec §2-§5)."""

from __future__ import annotations

import ipaddress

import pytest

from remora.capture.config import (
    HostFacts,
    build_config,
    parse_cidrs,
    parse_flags,
    parse_go_duration,
)
from remora.errors import BadInput


def cfg(argv: list[str], env: dict[str, str] | None = None, **facts: object):  # type: ignore[no-untyped-def]
    env = env or {}
    return build_config(parse_flags(argv, env), env, facts=HostFacts(**facts))  # type: ignore[arg-type]


def test_defaults_match_istio() -> None:
    c = cfg([])
    assert (c.proxy_port, c.inbound_capture_port, c.inbound_tunnel_port) == (15001, 15006, 15008)
    assert (c.tproxy_mark, c.tproxy_route_table, c.probe_port) == (1337, 133, 15002)
    assert c.probe_timeout == 5.0
    assert c.proxy_uids == ("1337",) and c.proxy_gids == ("1337",)
    assert not c.inbound_enabled and not c.outbound_include.wildcard


def test_gid_defaults_to_uid_string() -> None:
    assert cfg(["-u", "3,4"]).proxy_gids == ("3", "4")


def test_env_then_secondary_env_then_command_line() -> None:
    env = {"ISTIO_INBOUND_PORTS": "80", "REDIRECT_DNS": "false", "ISTIO_META_DNS_CAPTURE": "true"}
    c = cfg([], env)
    assert c.inbound_ports == (80,)
    assert c.redirect_dns  # the secondary name wins over the primary
    c = cfg(["-b", "90", "--redirect-dns=false"], env)
    assert c.inbound_ports == (90,) and not c.redirect_dns


def test_p_has_no_env_binding() -> None:
    assert cfg([], {"ENVOY_PORT": "1234"}).proxy_port == 15001


def test_bad_typed_env_is_ignored_but_bad_flag_is_an_error() -> None:
    assert not cfg([], {"DRY_RUN": "maybe"}).dry_run
    with pytest.raises(BadInput, match="--dry-run"):
        cfg(["--dry-run=maybe"])


def test_pflag_forms() -> None:
    c = cfg(["-p15002", "--inbound-capture-port=15007", "-n", "positional", "--log_as_json"])
    assert (c.proxy_port, c.inbound_capture_port, c.dry_run) == (15002, 15007, True)


def test_mode_tproxy_exact() -> None:
    assert cfg(["-m", "TPROXY"]).tproxy
    assert not cfg(["-m", "REDIRECT"]).tproxy


@pytest.mark.parametrize(("argv", "needle"), [
    (["--bogus"], "unknown flag: --bogus"),
    (["-Y"], "unknown shorthand flag: 'Y'"),
    (["-p", "70000"], "'70000'"),
    (["-b", "80,http"], "'http'"),
    (["-i", "10.0.0.0/33"], "'10.0.0.0/33'"),
    (["-i", "10.0.0.1"], "'10.0.0.1'"),
    (["-x", "*"], "OUTBOUND_IP_RANGES_EXCLUDE"),
    (["-m", "FOO"], "'FOO'"),
    (["-m", "tproxy"], "'tproxy'"),
    (["-t", "mark"], "'mark'"),
    (["--force-iptables-binary", "xt"], "'xt'"),
    (["--probe-timeout", "5 seconds"], "--probe-timeout"),
    (["-p"], "needs an argument"),
])
def test_bad_input_names_the_value(argv: list[str], needle: str) -> None:
    with pytest.raises(BadInput) as err:
        cfg(argv)
    assert needle in str(err.value)
    assert "\n" not in str(err.value)


def test_env_value_is_named_in_the_error() -> None:
    with pytest.raises(BadInput, match=r"\$ISTIO_INBOUND_PORTS"):
        cfg([], {"ISTIO_INBOUND_PORTS": "99999"})


def test_lists_drop_empty_elements() -> None:
    assert cfg(["-d", "6000,7000,"]).local_exclude_ports == (6000, 7000)


def test_cidrs_keep_host_bits_and_canonicalise_v6() -> None:
    c = parse_cidrs("10.1.2.3/8,2001:0db8::/32", "-i")
    assert [str(n) for n in c.v4] == ["10.1.2.3/8"]
    assert [str(n) for n in c.v6] == ["2001:db8::/32"]
    assert parse_cidrs("127.1.2.3/32", "-i").has_loopback(4)


def test_owner_groups() -> None:
    only = cfg([], {"ISTIO_OUTBOUND_OWNER_GROUPS": "java,202"}).owner_groups
    assert only.only == ("java", "202")
    excl = cfg([], {"ISTIO_OUTBOUND_OWNER_GROUPS_EXCLUDE": "888,ftp"}).owner_groups
    assert excl.only is None and excl.exclude == ("888", "ftp")
    with pytest.raises(BadInput, match="64"):
        cfg([], {"ISTIO_OUTBOUND_OWNER_GROUPS": ",".join(str(i) for i in range(65))})


@pytest.mark.parametrize("bad", ["10.0.0.0/8", "127.0.0.1/4", "127.0.0.1", "nope"])
def test_loopback_cidr_validation(bad: str) -> None:
    with pytest.raises(BadInput, match="LOOPBACK"):
        cfg([], {"ISTIO_OUTBOUND_IPV4_LOOPBACK_CIDR": bad})


def test_effective_dns_needs_servers_unless_capture_all() -> None:
    assert not cfg(["--redirect-dns"]).effective_dns
    assert cfg(["--redirect-dns"], dns_servers_v6=("::1",)).effective_dns
    assert cfg(["--redirect-dns", "--capture-all-dns"]).effective_dns
    assert not cfg(["--capture-all-dns"]).effective_dns


def test_go_durations() -> None:
    assert parse_go_duration("1m30s") == 90.0
    assert parse_go_duration("250ms") == 0.25
    assert parse_go_duration("0") == 0.0


def test_host_facts_are_carried() -> None:
    c = cfg([], enable_ipv6=True, host_ip=ipaddress.ip_address("fd00::2"))
    assert c.facts.enable_ipv6
