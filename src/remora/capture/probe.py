"""Probe listeners and clients that show, with real sockets, where the capture rules send traffic.

Owns:
* the pure helpers: decoding the ``sockaddr_in``/``sockaddr_in6`` bytes that
  ``getsockopt(SO_ORIGINAL_DST)`` returns, endpoint text (``10.0.0.1:80``, ``[fd00::1]:80``),
  listener specs, and the JSON lines a probe server prints;
* the probe server (`serve`): listens on a list of TCP ports (IPv4 and/or IPv6; optionally
  ``IP_TRANSPARENT``/``IPV6_TRANSPARENT`` for TPROXY), prints one ``ready`` line once every
  listener is bound, then one ``accept`` line per connection (listener port, peer, original
  destination), sends the same line to the client and closes; it stops at its deadline or when
  its stop pipe (stdin) reaches EOF;
* `ProbeServer`, the parent's handle on a server started inside a namespace, which waits on
  those lines (never sleeps);
* the probe client (`connect`): connects from inside a namespace as a given uid/gid, optionally
  from a given source address, with a timeout, and reports what happened.

Must not: program iptables, routes or addresses (that is ``remora.capture.apply``), create or
delete namespaces (that is ``remora.netns``), or exec the interpreter after dropping privileges
(the venv's python lives under /root, which uid 1337/1000 cannot read: the client forks, enters
the namespace, drops privileges and only uses modules imported before that).

Original destination (see Envoy's ``original_dst`` listener filter and Istio §11 validation):
``getsockopt(SOL_IP, SO_ORIGINAL_DST=80)`` for IPv4 and ``getsockopt(SOL_IPV6,
IP6T_SO_ORIGINAL_DST=80)`` for IPv6 give the destination before NAT (REDIRECT). A TPROXY'd
connection is not NATed: the accepted socket's own address (``getsockname``) *is* the original
destination. A transparent listener therefore reports the pre-NAT destination when one exists
and differs (the proxy's own-pod-IP traffic is REDIRECTed to it even in TPROXY mode), else its
socket name.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import ipaddress
import json
import os
import select
import selectors
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, NotRequired, TextIO, TypedDict

from remora import netns
from remora.errors import EnvironmentFault
from remora.proxy import platform
from remora.proxy.model import SocketAddress
from remora.proxy.platform import (
    IP6T_SO_ORIGINAL_DST,
    IP_TRANSPARENT,
    IPV6_TRANSPARENT,
    SO_ORIGINAL_DST,
    SOL_IP,
    SOL_IPV6,
)

__all__ = [
    "IP6T_SO_ORIGINAL_DST",
    "IPV6_TRANSPARENT",
    "IP_TRANSPARENT",
    "SOL_IP",
    "SOL_IPV6",
    "SO_ORIGINAL_DST",
    "Accept",
    "AcceptLine",
    "ConnectResult",
    "Endpoint",
    "ListenSpec",
    "ProbeServer",
    "ReadyLine",
    "connect",
    "format_endpoint",
    "main",
    "original_dst",
    "parse_endpoint",
    "parse_listen_spec",
    "parse_sockaddr",
    "serve",
]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# --------------------------------------------------------------------------------------------
# pure helpers


@dataclass(frozen=True, slots=True, kw_only=True)
class Endpoint:
    """An IP address and TCP port."""

    host: IPAddress
    port: int

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port out of range: {self.port}")

    def __str__(self) -> str:
        return format_endpoint(self.host, self.port)

    @property
    def version(self) -> int:
        return self.host.version

    def sockaddr(self) -> tuple[str, int]:
        return (str(self.host), self.port)


def format_endpoint(host: IPAddress | str, port: int) -> str:
    """``10.0.0.1:80`` or ``[fd00::1]:80``."""
    addr = ipaddress.ip_address(host)
    return f"[{addr}]:{port}" if addr.version == 6 else f"{addr}:{port}"


def parse_endpoint(text: str) -> Endpoint:
    """Inverse of `format_endpoint`: ``10.0.0.1:80`` or ``[fd00::1]:80`` (brackets required)."""
    if text.startswith("["):
        host, sep, port = text[1:].partition("]:")
        if not sep:
            raise ValueError(f"bad endpoint {text!r}: expected [v6addr]:port")
        addr: IPAddress = ipaddress.IPv6Address(host)
    else:
        host, sep, port = text.rpartition(":")
        if not sep:
            raise ValueError(f"bad endpoint {text!r}: expected addr:port")
        addr = ipaddress.IPv4Address(host)
    if not port.isdigit():
        raise ValueError(f"bad port in endpoint {text!r}")
    return Endpoint(host=addr, port=int(port))


def parse_sockaddr(data: bytes) -> Endpoint:
    """Decode a ``struct sockaddr_in`` (16 bytes) or ``sockaddr_in6`` (28 bytes), as
    ``getsockopt(SO_ORIGINAL_DST)`` fills it in (see :func:`remora.proxy.platform.parse_sockaddr`).
    """
    return _endpoint(platform.parse_sockaddr(data))


def _endpoint(addr: SocketAddress) -> Endpoint:
    return Endpoint(host=ipaddress.ip_address(addr.address), port=addr.port)


@dataclass(frozen=True, slots=True, kw_only=True)
class ListenSpec:
    """One listener of a probe server."""

    host: IPAddress
    port: int
    transparent: bool = False

    def __str__(self) -> str:
        text = format_endpoint(self.host, self.port)
        return f"{text}/transparent" if self.transparent else text

    @classmethod
    def any(cls, port: int, *, version: int = 4, transparent: bool = False) -> ListenSpec:
        """The wildcard address (``0.0.0.0`` or ``::``) of that IP version."""
        host: IPAddress = (
            ipaddress.IPv6Address("::") if version == 6 else ipaddress.IPv4Address("0.0.0.0")
        )
        return cls(host=host, port=port, transparent=transparent)


def parse_listen_spec(text: str) -> ListenSpec:
    """``0.0.0.0:15001``, ``[::]:15006/transparent``, ``10.0.0.1:8080``."""
    transparent = text.endswith("/transparent")
    if transparent:
        text = text.removesuffix("/transparent")
    ep = parse_endpoint(text)
    return ListenSpec(host=ep.host, port=ep.port, transparent=transparent)


OriginalDstSource = Literal["SO_ORIGINAL_DST", "getsockname"]


class ReadyLine(TypedDict):
    """Printed once, after every listener is bound and listening."""

    event: Literal["ready"]
    server: str
    pid: int
    listeners: list[str]


class AcceptLine(TypedDict):
    """Printed (and sent to the client) once per accepted connection."""

    event: Literal["accept"]
    server: str
    listener_port: int
    transparent: bool
    peer: str
    local: str
    original_dst: str | None
    original_dst_source: OriginalDstSource | None


class ErrorLine(TypedDict):
    event: Literal["error"]
    server: str
    message: str
    listener: NotRequired[str]


@dataclass(frozen=True, slots=True, kw_only=True)
class Accept:
    """A parsed ``accept`` line: which server and listener took a connection, and from whom."""

    server: str
    listener_port: int
    transparent: bool
    peer: Endpoint
    local: Endpoint
    original_dst: Endpoint | None
    original_dst_source: OriginalDstSource | None

    @classmethod
    def from_line(cls, line: AcceptLine) -> Accept:
        od = line["original_dst"]
        return cls(
            server=line["server"],
            listener_port=line["listener_port"],
            transparent=line["transparent"],
            peer=parse_endpoint(line["peer"]),
            local=parse_endpoint(line["local"]),
            original_dst=None if od is None else parse_endpoint(od),
            original_dst_source=line["original_dst_source"],
        )


def _accept_from_json(text: str) -> Accept | None:
    try:
        obj = json.loads(text)
    except ValueError:
        return None
    if not isinstance(obj, dict) or obj.get("event") != "accept":
        return None
    try:
        return Accept.from_line(obj)  # type: ignore[arg-type]
    except (KeyError, TypeError, ValueError):
        return None


# --------------------------------------------------------------------------------------------
# server side (runs inside the namespace)


def _sockname(sock: socket.socket) -> Endpoint:
    name = sock.getsockname()
    return Endpoint(host=ipaddress.ip_address(name[0]), port=int(name[1]))


def original_dst(sock: socket.socket) -> Endpoint | None:
    """The pre-NAT destination of an accepted TCP socket, or None if conntrack has none
    (nothing NATed it, or conntrack is not active in this namespace)."""
    addr = platform.so_original_dst(sock)
    return None if addr is None else _endpoint(addr)


def _open_listener(spec: ListenSpec) -> socket.socket:
    family = socket.AF_INET6 if spec.host.version == 6 else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            # so that an IPv4 wildcard listener on the same port can coexist
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        if spec.transparent:
            if family == socket.AF_INET6:
                sock.setsockopt(SOL_IPV6, IPV6_TRANSPARENT, 1)
            else:
                sock.setsockopt(SOL_IP, IP_TRANSPARENT, 1)
        sock.bind((str(spec.host), spec.port))
        sock.listen(128)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def _describe(conn: socket.socket, spec: ListenSpec, label: str) -> AcceptLine:
    local = _sockname(conn)
    peer_name = conn.getpeername()
    peer = Endpoint(host=ipaddress.ip_address(peer_name[0]), port=int(peer_name[1]))
    nat_dst = original_dst(conn)
    od: Endpoint | None
    source: OriginalDstSource | None
    if spec.transparent:
        # TPROXY keeps the destination on the socket; a REDIRECT (NAT) to this listener shows up
        # as a conntrack original destination that differs from it.
        if nat_dst is not None and nat_dst != local:
            od, source = nat_dst, "SO_ORIGINAL_DST"
        else:
            od, source = local, "getsockname"
    else:
        od, source = nat_dst, ("SO_ORIGINAL_DST" if nat_dst is not None else None)
    return AcceptLine(
        event="accept",
        server=label,
        listener_port=spec.port,
        transparent=spec.transparent,
        peer=str(peer),
        local=str(local),
        original_dst=None if od is None else str(od),
        original_dst_source=source,
    )


# accept() errors that mean "this one connection is gone" or "out of resources for now":
# log and carry on (trio's policy); anything else propagates.
_ACCEPT_TRANSIENT = {
    errno.ECONNABORTED,
    errno.EPROTO,
    errno.EPERM,
    errno.EMFILE,
    errno.ENFILE,
    errno.ENOBUFS,
    errno.ENOMEM,
    errno.EAGAIN,
}


def serve(
    listeners: Sequence[ListenSpec],
    *,
    out: TextIO,
    label: str = "probe",
    lifetime: float = 60.0,
    stop_fd: int | None = None,
) -> int:
    """Run a probe server in the current namespace until ``lifetime`` passes or ``stop_fd`` EOFs.

    Prints a ``ready`` line once all listeners are bound, then an ``accept`` line per
    connection; the same line is sent to the client before closing. Returns an exit code
    (1 if a listener could not be bound; an ``error`` line says which).
    """
    if not listeners:
        raise ValueError("a probe server needs at least one listener")
    deadline = time.monotonic() + lifetime

    def emit(obj: ReadyLine | AcceptLine | ErrorLine) -> None:
        out.write(json.dumps(obj, separators=(",", ":")) + "\n")
        out.flush()

    socks: list[tuple[socket.socket, ListenSpec]] = []
    sel = selectors.DefaultSelector()
    try:
        for spec in listeners:
            try:
                socks.append((_open_listener(spec), spec))
            except OSError as exc:
                emit(ErrorLine(event="error", server=label, listener=str(spec), message=str(exc)))
                return 1
        for sock, spec in socks:
            sel.register(sock, selectors.EVENT_READ, spec)
        if stop_fd is not None:
            sel.register(stop_fd, selectors.EVENT_READ, None)
        emit(
            ReadyLine(
                event="ready", server=label, pid=os.getpid(), listeners=[str(s) for s in listeners]
            )
        )
        while (remaining := deadline - time.monotonic()) > 0:
            for key, _ in sel.select(timeout=remaining):
                if key.data is None:  # stop pipe: EOF (or anything) means stop
                    return 0
                lsock = key.fileobj
                assert isinstance(lsock, socket.socket)
                try:
                    conn, _addr = lsock.accept()
                except OSError as exc:
                    if exc.errno in _ACCEPT_TRANSIENT:
                        continue
                    raise
                with conn:
                    conn.settimeout(2.0)
                    line = _describe(conn, key.data, label)
                    emit(line)
                    with contextlib.suppress(OSError):
                        conn.sendall(json.dumps(line, separators=(",", ":")).encode() + b"\n")
                        conn.shutdown(socket.SHUT_WR)
        return 0
    finally:
        sel.close()
        for sock, _ in socks:
            sock.close()


class ProbeServer:
    """A probe server running inside a namespace, started by `ProbeServer.start`.

    Reads its JSON lines from the process's stdout with a deadline (select), never by sleeping.
    Stop it with `stop` (or use it as a context manager): stdin is closed, which makes the
    server return; SIGTERM then SIGKILL follow if it does not exit in time.
    """

    def __init__(self, proc: subprocess.Popen[str], *, label: str, ns_name: str) -> None:
        self._proc = proc
        self.label = label
        self.ns_name = ns_name
        self.ready: ReadyLine | None = None
        self.accepts: list[Accept] = []
        self.errors: list[str] = []
        self._buf = b""
        self._eof = False
        assert proc.stdout is not None
        self._fd = proc.stdout.fileno()

    @classmethod
    def start(
        cls,
        ns: netns.Netns | str,
        listeners: Sequence[ListenSpec],
        *,
        label: str = "probe",
        lifetime: float = 60.0,
        ready_timeout: float = 15.0,
    ) -> ProbeServer:
        """Start ``python -m remora.capture.probe serve`` inside ``ns`` and wait until ready."""
        argv = [
            sys.executable,
            "-m",
            "remora.capture.probe",
            "serve",
            "--label",
            label,
            "--lifetime",
            str(lifetime),
            *(f"--listen={spec}" for spec in listeners),
        ]
        env = dict(os.environ)
        src = str(Path(__file__).resolve().parents[2])  # the directory that holds `remora`
        env["PYTHONPATH"] = os.pathsep.join(p for p in (src, env.get("PYTHONPATH")) if p)
        env["PYTHONUNBUFFERED"] = "1"
        proc = netns.popen_in_netns(ns, argv, env=env)
        name = ns.name if isinstance(ns, netns.Netns) else ns
        server = cls(proc, label=label, ns_name=name)
        try:
            server._wait_ready(ready_timeout)
        except BaseException:
            server.stop()
            raise
        return server

    def __enter__(self) -> ProbeServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def pid(self) -> int:
        return self._proc.pid

    def _read_lines(self, deadline: float) -> list[str]:
        """Lines that are available now, waiting until ``deadline`` for at least one."""
        lines: list[str] = []
        while not lines and not self._eof:
            remaining = max(0.0, deadline - time.monotonic())
            ready, _, _ = select.select([self._fd], [], [], remaining)
            if not ready:
                break
            chunk = os.read(self._fd, 65536)
            if not chunk:
                self._eof = True
            self._buf += chunk
            *complete, self._buf = self._buf.split(b"\n")
            lines.extend(c.decode(errors="replace") for c in complete)
        return lines

    def _take(self, lines: list[str]) -> None:
        for text in lines:
            try:
                obj = json.loads(text)
            except ValueError:
                self.errors.append(text)
                continue
            event = obj.get("event") if isinstance(obj, dict) else None
            if event == "ready":
                self.ready = obj
            elif event == "accept":
                acc = _accept_from_json(text)
                if acc is not None:
                    self.accepts.append(acc)
            else:
                self.errors.append(text)

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while self.ready is None:
            if self._eof or time.monotonic() >= deadline:
                raise EnvironmentFault(
                    f"probe server {self.label!r} in {self.ns_name} not ready "
                    f"in {timeout}s: {self._failure_text()}"
                )
            self._take(self._read_lines(deadline))

    def _failure_text(self) -> str:
        parts = list(self.errors)
        if self._proc.poll() is not None and self._proc.stderr is not None:
            parts.append(self._proc.stderr.read().strip())
        return "; ".join(p for p in parts if p) or "no output"

    def poll(self) -> list[Accept]:
        """Collect lines already printed (no waiting) and return every accept seen so far."""
        while lines := self._read_lines(time.monotonic()):
            self._take(lines)
        return list(self.accepts)

    def wait_accept(
        self, predicate: Callable[[Accept], bool] = lambda _a: True, *, timeout: float = 5.0
    ) -> Accept:
        """The first accept (seen before or arriving within ``timeout``) matching ``predicate``.

        Raises `TimeoutError` if none arrives in time.
        """
        deadline = time.monotonic() + timeout
        seen = 0
        while True:
            for acc in self.accepts[seen:]:
                if predicate(acc):
                    return acc
            seen = len(self.accepts)
            if self._eof or time.monotonic() >= deadline:
                raise TimeoutError(
                    f"no matching connection at probe server {self.label!r} within {timeout}s "
                    f"(saw {[str(a.peer) + '->' + str(a.listener_port) for a in self.accepts]})"
                )
            self._take(self._read_lines(deadline))

    def accept_from(self, peer: Endpoint, *, timeout: float = 5.0) -> Accept:
        """The accept whose peer is ``peer`` (a client's source address and port)."""
        return self.wait_accept(lambda a: a.peer == peer, timeout=timeout)

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the server and reap it (idempotent)."""
        proc = self._proc
        if proc.stdin is not None and not proc.stdin.closed:
            with contextlib.suppress(OSError):
                proc.stdin.close()
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.terminate()
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for stream in (proc.stdout, proc.stderr):
            if stream is not None and not stream.closed:
                stream.close()


# --------------------------------------------------------------------------------------------
# client side


@dataclass(frozen=True, slots=True, kw_only=True)
class ConnectResult:
    """What one probe connection did.

    ``source`` is the client's own address and port (match it against a server's
    ``Accept.peer``); ``reply`` is the ``accept`` line of the probe server that took the
    connection, if it was one.
    """

    target: Endpoint
    uid: int
    gid: int
    ok: bool
    source: Endpoint | None = None
    error: str | None = None
    reply: Accept | None = None


def drop_privileges(uid: int | None, gid: int | None) -> None:
    """Become ``uid``/``gid`` with no supplementary groups (None keeps the current one)."""
    if uid is None and gid is None:
        return
    os.setgroups([])
    if gid is not None:
        os.setgid(gid)
    if uid is not None:
        os.setuid(uid)


def _connect_here(
    target: Endpoint,
    *,
    uid: int | None,
    gid: int | None,
    source: IPAddress | None,
    timeout: float,
    read_reply: bool,
) -> ConnectResult:
    drop_privileges(uid, gid)
    real_uid, real_gid = os.getuid(), os.getgid()
    family = socket.AF_INET6 if target.version == 6 else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    local: Endpoint | None = None
    try:
        sock.settimeout(timeout)
        if source is not None:
            sock.bind((str(source), 0))
        try:
            sock.connect(target.sockaddr())
        except OSError as exc:
            with contextlib.suppress(OSError):
                local = _sockname(sock)
            return ConnectResult(
                target=target,
                uid=real_uid,
                gid=real_gid,
                ok=False,
                source=local,
                error=_error_text(exc),
            )
        local = _sockname(sock)
        reply: Accept | None = None
        if read_reply:
            data = b""
            with contextlib.suppress(OSError):
                while len(data) < 65536:
                    chunk = sock.recv(4096)
                    if not chunk:
                        break
                    data += chunk
            reply = _accept_from_json(data.decode(errors="replace").strip())
        return ConnectResult(
            target=target, uid=real_uid, gid=real_gid, ok=True, source=local, reply=reply
        )
    finally:
        sock.close()


def _error_text(exc: OSError) -> str:
    if isinstance(exc, TimeoutError) or exc.errno is None:
        return "timed out"
    return errno.errorcode.get(exc.errno, str(exc.errno))


def connect(
    ns: netns.Netns | str,
    target: Endpoint | str,
    *,
    uid: int | None = None,
    gid: int | None = None,
    source: IPAddress | str | None = None,
    timeout: float = 3.0,
    read_reply: bool = True,
) -> ConnectResult:
    """Connect to ``target`` from inside ``ns`` as ``uid``/``gid`` and report the outcome.

    Runs in a forked child: enter the namespace, ``setgroups([])``, ``setgid``, ``setuid``
    (None keeps root's), bind ``source`` (port 0) if given, connect with ``timeout``, then read
    the probe server's reply line until EOF (same timeout). Never raises for network
    failures: they come back as ``ok=False`` with an errno name (``ECONNREFUSED``,
    ``EHOSTUNREACH``) or ``"timed out"``.
    """
    ep = parse_endpoint(target) if isinstance(target, str) else target
    src = None if source is None else ipaddress.ip_address(source)

    def run() -> ConnectResult:
        return _connect_here(
            ep, uid=uid, gid=gid, source=src, timeout=timeout, read_reply=read_reply
        )

    return netns.call_in_netns(ns, run, timeout=2 * timeout + 5.0)


# --------------------------------------------------------------------------------------------
# command line: python -m remora.capture.probe serve --listen 0.0.0.0:15001 ...


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m remora.capture.probe")
    sub = parser.add_subparsers(dest="command", required=True)
    p_serve = sub.add_parser("serve", help="listen and report one JSON line per connection")
    p_serve.add_argument(
        "--listen",
        action="append",
        required=True,
        metavar="ADDR:PORT[/transparent]",
        help="e.g. 0.0.0.0:15001, [::]:15006/transparent, 10.0.0.1:8080 (repeatable)",
    )
    p_serve.add_argument("--label", default="probe", help="server name put in every line")
    p_serve.add_argument("--lifetime", type=float, default=60.0, help="seconds before exiting")
    p_serve.add_argument(
        "--no-stdin-stop", action="store_true", help="do not stop when stdin reaches EOF"
    )
    args = parser.parse_args(argv)
    try:
        specs = [parse_listen_spec(text) for text in args.listen]
    except ValueError as exc:
        parser.error(str(exc))
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    return serve(
        specs,
        out=sys.stdout,
        label=args.label,
        lifetime=args.lifetime,
        stop_fd=None if args.no_stdin_stop else sys.stdin.fileno(),
    )


if __name__ == "__main__":
    sys.exit(main())
