"""Host facts: IPv6 detection as Istio does it, resolv.conf parsing."""

from __future__ import annotations

import ipaddress

import pytest

from remora.capture.host import choose_host_ip, parse_resolv_conf
from remora.errors import EnvironmentFault


def addrs(*texts: str) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    return [ipaddress.ip_address(t) for t in texts]


def test_first_usable_address_decides() -> None:
    assert choose_host_ip(addrs("127.0.0.1", "10.0.0.2", "fd00::2"), False) == (
        False, ipaddress.ip_address("10.0.0.2"))
    assert choose_host_ip(addrs("127.0.0.1", "::1", "fe80::1", "fd00::2"), False) == (
        True, ipaddress.ip_address("fd00::2"))


def test_dual_stack_collects_until_first_ipv6() -> None:
    ipv6, host = choose_host_ip(addrs("10.0.0.2", "fd00::2"), True)
    assert ipv6 and host == ipaddress.ip_address("10.0.0.2")
    assert choose_host_ip(addrs("10.0.0.2"), True)[0] is False


def test_ipv4_mapped_and_link_local_multicast() -> None:
    assert choose_host_ip(addrs("::ffff:10.0.0.9"), False) == (
        False, ipaddress.ip_address("10.0.0.9"))
    assert choose_host_ip(addrs("ff02::1", "10.1.1.1"), False)[1] == ipaddress.ip_address(
        "10.1.1.1")


def test_no_usable_address() -> None:
    with pytest.raises(EnvironmentFault, match="no valid local IP address found"):
        choose_host_ip(addrs("127.0.0.1", "::1", "fe80::1"), False)


def test_resolv_conf_is_canonicalised() -> None:
    text = "# c\nsearch x\nnameserver 10.96.0.10\nnameserver ::127.0.0.53\nnameserver bogus\n" \
           "nameserver fe80::1%eth0\noptions ndots:5\n"
    assert parse_resolv_conf(text) == (("10.96.0.10",), ("::7f00:35", "fe80::1"))
