"""Socket helpers on loopback (no root): sockaddr decoding, listen/upstream sockets."""

from __future__ import annotations

import contextlib
import socket
import struct
import sys

import pytest

from remora.proxy import platform
from remora.proxy.model import SocketAddress


def _sockaddr_in(ip: str, port: int) -> bytes:
    fam = socket.AF_INET.to_bytes(2, sys.byteorder)
    return fam + struct.pack("!H", port) + socket.inet_aton(ip) + b"\0" * 8


def _sockaddr_in6(ip: str, port: int) -> bytes:
    fam = socket.AF_INET6.to_bytes(2, sys.byteorder)
    return (fam + struct.pack("!H", port) + b"\0" * 4 + socket.inet_pton(socket.AF_INET6, ip)
            + b"\0" * 4)


def test_parse_sockaddr_v4_and_v6() -> None:
    assert platform.parse_sockaddr(_sockaddr_in("10.100.0.7", 8080)) == SocketAddress(
        address="10.100.0.7", port=8080)
    assert platform.parse_sockaddr(_sockaddr_in6("fd00::7", 443)) == SocketAddress(
        address="fd00::7", port=443)


@pytest.mark.parametrize("data", [b"", b"\x02\x00", b"\x07\x00" + b"\0" * 14,
                                  socket.AF_INET6.to_bytes(2, sys.byteorder) + b"\0" * 10])
def test_parse_sockaddr_rejects_bad_input(data: bytes) -> None:
    with pytest.raises(ValueError):
        platform.parse_sockaddr(data)


def test_to_address_strips_scope() -> None:
    assert platform.to_address(("fe80::1%eth0", 80, 0, 2)) == SocketAddress(
        address="fe80::1", port=80)


@contextlib.contextmanager
def _pair(listener: socket.socket) -> object:
    port = listener.getsockname()[1]
    client = socket.create_connection(("127.0.0.1", port), timeout=5)
    listener.setblocking(True)
    server, _ = listener.accept()
    try:
        yield client, server
    finally:
        client.close()
        server.close()


def test_listen_socket_reuse_port_lets_two_sockets_share_an_address() -> None:
    a = platform.listen_socket(SocketAddress(address="127.0.0.1", port=0))
    try:
        port = a.getsockname()[1]
        b = platform.listen_socket(SocketAddress(address="127.0.0.1", port=port))
        b.close()
        assert not a.getblocking()
    finally:
        a.close()


def test_listen_socket_without_reuse_port_conflicts() -> None:
    a = platform.listen_socket(SocketAddress(address="127.0.0.1", port=0), reuse_port=False)
    try:
        port = a.getsockname()[1]
        with pytest.raises(OSError):
            platform.listen_socket(SocketAddress(address="127.0.0.1", port=port),
                                   reuse_port=False).close()
    finally:
        a.close()


def test_ipv6_wildcard_is_v6_only() -> None:
    if not socket.has_ipv6:
        pytest.skip("no IPv6")
    try:
        s = platform.listen_socket(SocketAddress(address="::", port=0))
    except OSError as exc:
        pytest.skip(f"no IPv6 here: {exc}")
    try:
        assert s.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY) == 1
    finally:
        s.close()


def test_original_destination_without_nat() -> None:
    """No NAT: SO_ORIGINAL_DST gives nothing or the socket's own name; a transparent listener
    reports its socket name."""
    lst = platform.listen_socket(SocketAddress(address="127.0.0.1", port=0))
    try:
        with _pair(lst) as (_client, server):  # type: ignore[misc]
            local = platform.local_address(server)
            assert platform.original_destination(server, transparent=False) in (None, local)
            assert platform.original_destination(server, transparent=True) == local
            assert platform.peer_address(server).address == "127.0.0.1"
    finally:
        lst.close()


def test_upstream_socket_binds_the_source_address() -> None:
    sock = platform.upstream_socket(socket.AF_INET,
                                    SocketAddress(address="127.0.0.6", port=0))
    try:
        assert sock.getsockname()[0] == "127.0.0.6"
        assert not sock.getblocking()
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
    finally:
        sock.close()


def test_upstream_socket_freebinds_a_non_local_source() -> None:
    # 192.0.2.1 (TEST-NET-1) is on no interface: a plain bind fails, freebind succeeds.
    sock = platform.upstream_socket(socket.AF_INET,
                                    SocketAddress(address="192.0.2.1", port=0))
    try:
        assert sock.getsockname()[0] == "192.0.2.1"
    finally:
        sock.close()


def test_drop_privileges_when_not_root_is_a_no_op(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(platform.os, "geteuid", lambda: 1000)
    assert platform.drop_privileges(1337, 1337) is False
