"""The pure parts of `remora.capture.probe`: sockaddr decoding, endpoint and listener text."""

from __future__ import annotations

import ipaddress
import socket
import struct
import sys

import pytest

from remora.capture.probe import (
    Accept,
    AcceptLine,
    Endpoint,
    ListenSpec,
    format_endpoint,
    parse_endpoint,
    parse_listen_spec,
    parse_sockaddr,
)

_BO = "<" if sys.byteorder == "little" else ">"


def sockaddr_in(addr: str, port: int) -> bytes:
    """What the kernel writes for SO_ORIGINAL_DST: family host order, port network order."""
    return (
        struct.pack(f"{_BO}H", socket.AF_INET)
        + struct.pack("!H", port)
        + socket.inet_pton(socket.AF_INET, addr)
        + b"\0" * 8
    )


def sockaddr_in6(addr: str, port: int, flowinfo: int = 0, scope_id: int = 0) -> bytes:
    return (
        struct.pack(f"{_BO}H", socket.AF_INET6)
        + struct.pack("!H", port)
        + struct.pack("!I", flowinfo)
        + socket.inet_pton(socket.AF_INET6, addr)
        + struct.pack(f"{_BO}I", scope_id)
    )


def test_sockaddr_in() -> None:
    ep = parse_sockaddr(sockaddr_in("10.77.0.1", 8080))
    assert ep == Endpoint(host=ipaddress.IPv4Address("10.77.0.1"), port=8080)


def test_sockaddr_in_high_port_is_network_order() -> None:
    assert parse_sockaddr(sockaddr_in("127.0.0.1", 0xABCD)).port == 0xABCD


def test_sockaddr_in6_ignores_flowinfo_and_scope() -> None:
    ep = parse_sockaddr(sockaddr_in6("fd00:77::1", 15006, flowinfo=7, scope_id=3))
    assert ep == Endpoint(host=ipaddress.IPv6Address("fd00:77::1"), port=15006)


def test_sockaddr_matches_what_the_socket_module_builds() -> None:
    # cross-check against the C library's own encoding of a bound socket's name
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    assert parse_sockaddr(sockaddr_in("127.0.0.1", port)).port == port


@pytest.mark.parametrize(
    "data",
    [b"", b"\x02", sockaddr_in("1.2.3.4", 1)[:6], sockaddr_in6("::1", 1)[:20],
     struct.pack(f"{_BO}H", 99) + b"\0" * 14],
)  # fmt: skip
def test_bad_sockaddr_is_rejected(data: bytes) -> None:
    with pytest.raises(ValueError):
        parse_sockaddr(data)


@pytest.mark.parametrize(
    ("text", "host", "port"),
    [("10.0.0.1:80", "10.0.0.1", 80), ("[fd00::1]:15001", "fd00::1", 15001),
     ("[::]:0", "::", 0)],
)  # fmt: skip
def test_endpoint_round_trip(text: str, host: str, port: int) -> None:
    ep = parse_endpoint(text)
    assert ep == Endpoint(host=ipaddress.ip_address(host), port=port)
    assert str(ep) == text == format_endpoint(host, port)


@pytest.mark.parametrize("text", ["10.0.0.1", "fd00::1:80", "[fd00::1]80", "1.2.3.4:x",
                                  "1.2.3.4:70000", "[10.0.0.1]:80", "host:80"])  # fmt: skip
def test_bad_endpoint(text: str) -> None:
    with pytest.raises(ValueError):
        parse_endpoint(text)


def test_listen_spec() -> None:
    spec = parse_listen_spec("[::]:15006/transparent")
    assert spec == ListenSpec.any(15006, version=6, transparent=True)
    assert str(spec) == "[::]:15006/transparent"
    assert parse_listen_spec("0.0.0.0:15001") == ListenSpec.any(15001)
    assert str(ListenSpec.any(15001)) == "0.0.0.0:15001"


def test_accept_line_parses() -> None:
    line = AcceptLine(
        event="accept", server="pod", listener_port=15006, transparent=False,
        peer="10.77.0.2:40000", local="10.77.0.1:15006", original_dst="10.77.0.1:8080",
        original_dst_source="SO_ORIGINAL_DST",
    )  # fmt: skip
    acc = Accept.from_line(line)
    assert acc.original_dst == parse_endpoint("10.77.0.1:8080")
    assert acc.peer.port == 40000
