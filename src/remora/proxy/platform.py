"""Linux socket options the proxy needs, behind small typed functions.

Owns: the original destination of an accepted connection (``SO_ORIGINAL_DST`` /
``IP6T_SO_ORIGINAL_DST`` after a REDIRECT, ``getsockname`` on an ``IP_TRANSPARENT`` listener
after a TPROXY), opening listen sockets (``SO_REUSEADDR``, ``SO_REUSEPORT`` so several worker
processes can each bind the same address, ``IPV6_V6ONLY`` for ``::`` as Envoy does,
``IP_TRANSPARENT``/``IPV6_TRANSPARENT`` when a listener is transparent), opening upstream
sockets bound to a source address (``upstream_bind_config``: a plain bind when the address is
local, such as 127.0.0.6 which lives on ``lo``; ``IP_FREEBIND``/``IPV6_FREEBIND`` only when the
kernel says the address is not local), how many bytes a TCP socket has been handed
(``tcp_written``, for the kernel relay's drain checks), and dropping privileges.
Must not: accept, connect, read or write (that is the server and the TCP layer), or decide
anything about configuration.

References: Envoy ``original_dst`` listener filter (``original_dst_filter.rst``), Envoy
``Listener.transparent`` / ``freebind`` (``listener.proto``), Linux ``ip(7)``, ``ipv6(7)``.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import socket
import struct
import sys

from remora.proxy.model import SocketAddress

# <linux/in.h>, <linux/netfilter_ipv4.h>, <linux/netfilter_ipv6/ip6_tables.h>, <linux/in6.h>
SOL_IP = 0
SOL_IPV6 = 41
SO_ORIGINAL_DST = 80
IP6T_SO_ORIGINAL_DST = 80
IP_TRANSPARENT = 19
IPV6_TRANSPARENT = 75
IP_FREEBIND = 15
IPV6_FREEBIND = 78
IP_BIND_ADDRESS_NO_PORT = 24
SO_REUSEPORT = getattr(socket, "SO_REUSEPORT", 15)

_SOCKADDR_IN_LEN = 16
_SOCKADDR_IN6_LEN = 28

DEFAULT_BACKLOG = 1024


def family_of(address: SocketAddress) -> socket.AddressFamily:
    return socket.AF_INET6 if address.family == 6 else socket.AF_INET


def parse_sockaddr(data: bytes) -> SocketAddress:
    """Decode the ``struct sockaddr_in``/``sockaddr_in6`` that ``SO_ORIGINAL_DST`` fills in
    (family in host byte order, port in network byte order)."""
    if len(data) < 8:
        raise ValueError(f"sockaddr too short: {len(data)} bytes")
    family = int.from_bytes(data[0:2], sys.byteorder)
    port = int.from_bytes(data[2:4], "big")
    if family == socket.AF_INET:
        return SocketAddress(address=socket.inet_ntop(socket.AF_INET, data[4:8]), port=port)
    if family == socket.AF_INET6 and len(data) >= 24:
        return SocketAddress(address=socket.inet_ntop(socket.AF_INET6, data[8:24]), port=port)
    raise ValueError(f"unsupported sockaddr (family {family}, {len(data)} bytes)")


def to_address(name: tuple[object, ...] | str) -> SocketAddress:
    """A ``getsockname``/``getpeername`` result as a SocketAddress (IPv4-mapped IPv6 kept)."""
    if isinstance(name, str):  # AF_UNIX; not used by TCP listeners
        return SocketAddress(address=name, port=0)
    host = str(name[0])
    port = name[1]
    assert isinstance(port, int)
    return SocketAddress(address=host.split("%", 1)[0], port=port)


def local_address(sock: socket.socket) -> SocketAddress:
    return to_address(sock.getsockname())


def peer_address(sock: socket.socket) -> SocketAddress:
    return to_address(sock.getpeername())


def so_original_dst(sock: socket.socket) -> SocketAddress | None:
    """The pre-NAT destination of an accepted socket; None if conntrack has no entry for it
    (``ENOENT``) or the option does not exist for this socket (``ENOPROTOOPT``)."""
    try:
        if sock.family == socket.AF_INET6:
            raw = sock.getsockopt(SOL_IPV6, IP6T_SO_ORIGINAL_DST, _SOCKADDR_IN6_LEN)
        else:
            raw = sock.getsockopt(SOL_IP, SO_ORIGINAL_DST, _SOCKADDR_IN_LEN)
    except OSError as exc:
        if exc.errno in (errno.ENOENT, errno.ENOPROTOOPT):
            return None
        raise
    return parse_sockaddr(raw)


def original_destination(sock: socket.socket, *, transparent: bool) -> SocketAddress | None:
    """What Envoy's ``original_dst`` listener filter restores as the local address.

    REDIRECT (a plain listener): ``SO_ORIGINAL_DST``. TPROXY (a transparent listener): the
    socket's own name is the original destination, unless conntrack shows a NAT to this
    listener that differs from it (the proxy's own-pod-IP traffic is REDIRECTed even in TPROXY
    mode, spec §1). None: nothing to restore (the local address stays the listener's).
    """
    nat = so_original_dst(sock)
    if not transparent:
        return nat
    local = local_address(sock)
    if nat is not None and nat != local:
        return nat
    return local


def listen_socket(address: SocketAddress, *, transparent: bool = False, reuse_port: bool = True,
                  backlog: int = DEFAULT_BACKLOG) -> socket.socket:
    """A non-blocking listening TCP socket on ``address``."""
    family = family_of(address)
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            # Envoy binds "::" v6-only unless ipv4_compat is set, so 0.0.0.0 and :: coexist.
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        if transparent:
            if family == socket.AF_INET6:
                sock.setsockopt(SOL_IPV6, IPV6_TRANSPARENT, 1)
            else:
                sock.setsockopt(SOL_IP, IP_TRANSPARENT, 1)
        sock.bind(address.sockaddr())
        sock.listen(backlog)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def _freebind(sock: socket.socket) -> None:
    if sock.family == socket.AF_INET6:
        sock.setsockopt(SOL_IPV6, IPV6_FREEBIND, 1)
    else:
        sock.setsockopt(SOL_IP, IP_FREEBIND, 1)


def upstream_socket(family: socket.AddressFamily,
                    source: SocketAddress | None = None) -> socket.socket:
    """A non-blocking TCP socket for an upstream connection, bound to ``source`` if given.

    Port 0 sources use ``IP_BIND_ADDRESS_NO_PORT`` so the kernel picks the port at connect
    time (per destination), not at bind time (per source address: 127.0.0.6 would otherwise
    run out of ephemeral ports after ~28k connections). A source that is not a local address
    (``EADDRNOTAVAIL``, e.g. ``::6`` without an address on ``lo``) is bound with freebind.
    """
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if source is not None:
            if source.port == 0:
                sock.setsockopt(SOL_IP, IP_BIND_ADDRESS_NO_PORT, 1)
            try:
                sock.bind(source.sockaddr())
            except OSError as exc:
                if exc.errno != errno.EADDRNOTAVAIL:
                    raise
                _freebind(sock)
                sock.bind(source.sockaddr())
    except BaseException:
        sock.close()
        raise
    return sock


SIOCINQ = 0x541B                  # <asm/ioctls.h> FIONREAD: rcv_nxt - copied_seq for TCP
SIOCOUTQ = 0x5411                 # <asm/ioctls.h> TIOCOUTQ: write_seq - snd_una for TCP
TCPI_BYTES_ACKED = 120            # offset of tcpi_bytes_acked in struct tcp_info (u64)
TCPI_BYTES_RECEIVED = 128         # offset of tcpi_bytes_received (u64, Linux 4.1+)
# tcpi_state values (<net/tcp_states.h>) in which the peer's FIN has been received
_FIN_RECEIVED = frozenset({6, 8, 9, 11})   # TIME_WAIT, CLOSE_WAIT, LAST_ACK, CLOSING
_TCP_CLOSE = 7
_INT = struct.Struct("i")


def _tcp_info_u64(sock: socket.socket, offset: int, name: str) -> tuple[int, int]:
    """The u64 field of ``struct tcp_info`` at ``offset``, and ``tcpi_state``."""
    info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, offset + 8)
    if len(info) < offset + 8:
        raise OSError(errno.EOPNOTSUPP, f"tcp_info without {name}")
    return int.from_bytes(info[offset:offset + 8], sys.byteorder), info[0]


def tcp_written(sock: socket.socket) -> int:
    """Bytes the application has handed to this TCP socket so far (acked + still queued;
    after a connect, +1 for the SYN; after a shutdown, +1 for the FIN): ``tcpi_bytes_acked``
    plus ``SIOCOUTQ``. Raises OSError when the socket is gone."""
    acked = _tcp_info_u64(sock, TCPI_BYTES_ACKED, "tcpi_bytes_acked")[0]
    outq = _INT.unpack(fcntl.ioctl(sock.fileno(), SIOCOUTQ, b"\0\0\0\0"))[0]
    return acked + int(outq)


def tcp_read(sock: socket.socket, *, eof: bool = False) -> int:
    """Bytes the application has read from this TCP socket so far: ``tcpi_bytes_received``
    (which counts the peer's FIN as one) minus ``SIOCINQ`` (what is still unread), minus
    the FIN once received (``eof``: the caller has read it, for a socket already closed by
    a reset). Raises OSError when the socket is gone."""
    received, state = _tcp_info_u64(sock, TCPI_BYTES_RECEIVED, "tcpi_bytes_received")
    fin = state in _FIN_RECEIVED or (eof and state == _TCP_CLOSE)
    return max(0, received - unread_bytes(sock) - fin)


def unread_bytes(sock: socket.socket) -> int:
    """Bytes received but not yet read (``SIOCINQ``/``FIONREAD``)."""
    return int(_INT.unpack(fcntl.ioctl(sock.fileno(), SIOCINQ, b"\0\0\0\0"))[0])


def peek_nowait(fd: int) -> None:
    """``recv(fd, 1, MSG_PEEK | MSG_DONTWAIT)``, ignoring the outcome: on a socket in a BPF
    sockmap this runs the skbs that were already queued through the verdict program (new
    ones are run as they arrive)."""
    with socket.socket(fileno=os.dup(fd)) as dup, contextlib.suppress(OSError):
        dup.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)


def is_transparent(sock: socket.socket) -> bool:
    """The socket (accepted from an ``IP_TRANSPARENT`` listener, as TPROXY needs) is
    transparent."""
    try:
        if sock.family == socket.AF_INET6:
            return bool(sock.getsockopt(SOL_IPV6, IPV6_TRANSPARENT))
        return bool(sock.getsockopt(SOL_IP, IP_TRANSPARENT))
    except OSError:
        return False


def drop_privileges(uid: int, gid: int) -> bool:
    """Become ``uid``/``gid`` with no supplementary groups. Only root can; returns False (and
    changes nothing) when not root or already that identity."""
    if os.geteuid() != 0:
        return False
    if (os.getuid(), os.getgid()) == (uid, gid) and not os.getgroups():
        return False
    os.setgroups([])
    os.setgid(gid)
    os.setuid(uid)
    return True
