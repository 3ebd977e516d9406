"""Throwaway Linux network namespaces for tests, the capture demo and the local mesh.

Owns: creating and deleting *named* network namespaces (``ip netns add/del``), joining two of
them with a veth pair and giving each end its addresses, and running a command or a Python
callable inside one of them (``ip netns exec`` for commands; ``fork`` + ``setns(2)`` for
callables, because Python 3.11 has no ``os.setns``).

Must not: touch the host's own network namespace (no links, addresses, routes or rules are
ever created there: the veth pair is created directly inside the namespaces), program
iptables/nftables (that is ``remora.capture.apply``), or delete a namespace it did not create
(names carry a prefix, our pid and a random part, and only names we made are removed, except by
``remove_stale`` which only removes names whose creating process is gone).

Everything that can block has a timeout. Failures of ``ip`` are raised as
``EnvironmentFault`` with the command and its stderr.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import ipaddress
import os
import pickle
import re
import secrets
import select
import signal
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from remora.errors import EnvironmentFault

__all__ = [
    "NETNS_DIR",
    "IPInterface",
    "Netns",
    "NetnsPair",
    "VethEnd",
    "add_default_route",
    "add_veth_pair",
    "call_in_netns",
    "create_netns",
    "delete_netns",
    "enter_netns",
    "netns_exists",
    "netns_pair",
    "popen_in_netns",
    "remove_stale",
    "run_in_netns",
    "temporary_netns",
    "unique_name",
    "wait_link_running",
]

T = TypeVar("T")

IPInterface = ipaddress.IPv4Interface | ipaddress.IPv6Interface

#: Where iproute2 keeps the bind mounts that give namespaces their names.
NETNS_DIR = Path("/run/netns")

#: From <sched.h>.
CLONE_NEWNET = 0x40000000

# Timeout for each `ip` invocation; they are local netlink calls and finish in milliseconds.
_IP_TIMEOUT = 10.0

_NAME_RE = re.compile(r"^[A-Za-z0-9_.-]{1,200}$")


@dataclass(frozen=True, slots=True, kw_only=True)
class Netns:
    """A named network namespace (``/run/netns/<name>``)."""

    name: str

    @property
    def path(self) -> Path:
        return NETNS_DIR / self.name

    def run(
        self,
        argv: Sequence[str],
        *,
        timeout: float = 30.0,
        check: bool = True,
        input: str | None = None,
        env: dict[str, str] | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run a command inside this namespace (see `run_in_netns`)."""
        return run_in_netns(self, argv, timeout=timeout, check=check, input=input, env=env)

    def call(self, fn: Callable[[], T], *, timeout: float = 30.0) -> T:
        """Run a Python callable inside this namespace (see `call_in_netns`)."""
        return call_in_netns(self, fn, timeout=timeout)


@dataclass(frozen=True, slots=True, kw_only=True)
class VethEnd:
    """One end of a veth pair: the namespace it lives in, its name and its addresses."""

    netns: Netns
    ifname: str
    addresses: tuple[IPInterface, ...] = ()

    def first(self, version: int) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
        """The first address of the given IP version (4 or 6) on this end."""
        for iface in self.addresses:
            if iface.version == version:
                return iface.ip
        raise LookupError(f"{self.netns.name}/{self.ifname} has no IPv{version} address")


@dataclass(frozen=True, slots=True, kw_only=True)
class NetnsPair:
    """Two namespaces joined by a veth pair (``a`` is usually the pod, ``b`` its peer)."""

    a: VethEnd
    b: VethEnd


# --------------------------------------------------------------------------------------------
# names


def unique_name(prefix: str = "remora") -> str:
    """A namespace name no other process (or parallel test run) will pick: prefix-pid-random."""
    name = f"{prefix}-{os.getpid()}-{secrets.token_hex(4)}"
    _check_name(name)
    return name


def _check_name(name: str) -> None:
    if not _NAME_RE.match(name) or name in {".", ".."}:
        raise ValueError(f"not a usable namespace name: {name!r}")


# --------------------------------------------------------------------------------------------
# ip(8)


def _ip(argv: Sequence[str], *, check: bool = True) -> subprocess.CompletedProcess[str]:
    cmd = ["ip", *argv]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=_IP_TIMEOUT, check=False)
    except FileNotFoundError as exc:
        raise EnvironmentFault("the `ip` command (iproute2) is not installed") from exc
    except subprocess.TimeoutExpired as exc:
        raise EnvironmentFault(f"`{' '.join(cmd)}` did not finish in {_IP_TIMEOUT}s") from exc
    if check and proc.returncode != 0:
        raise EnvironmentFault(
            f"`{' '.join(cmd)}` failed (exit {proc.returncode}): {proc.stderr.strip()}"
        )
    return proc


def netns_exists(name: str) -> bool:
    return (NETNS_DIR / name).exists()


def create_netns(name: str) -> Netns:
    """``ip netns add <name>`` and bring its ``lo`` up. Fails if the name is taken."""
    _check_name(name)
    _ip(["netns", "add", name])
    ns = Netns(name=name)
    try:
        _ip(["-n", name, "link", "set", "lo", "up"])
    except BaseException:
        delete_netns(name)
        raise
    return ns


def delete_netns(name: str, *, missing_ok: bool = True) -> None:
    """``ip netns del <name>``. The veth ends inside it disappear with it.

    A namespace whose processes are still running lives on (unnamed) until they exit; callers
    stop what they started in it first.
    """
    _check_name(name)
    if missing_ok and not netns_exists(name):
        return
    _ip(["netns", "del", name])


def add_veth_pair(
    a: Netns,
    b: Netns,
    *,
    a_ifname: str = "eth0",
    b_ifname: str = "eth0",
    a_addresses: Sequence[IPInterface | str] = (),
    b_addresses: Sequence[IPInterface | str] = (),
) -> NetnsPair:
    """Join two namespaces with a veth pair, address both ends and bring them up.

    The pair is created inside ``a`` with its peer end put straight into ``b``, so the host
    namespace never sees either end (and names only need to be unique per namespace). IPv6
    addresses get ``nodad`` so they are usable at once (no tentative state).
    """
    a_ifs = tuple(ipaddress.ip_interface(x) for x in a_addresses)
    b_ifs = tuple(ipaddress.ip_interface(x) for x in b_addresses)
    for ifname in (a_ifname, b_ifname):
        if not 0 < len(ifname) < 16 or "/" in ifname or " " in ifname:
            raise ValueError(f"not a usable interface name: {ifname!r}")
    # Distinct ifindexes on the two ends: the kernel's link watcher treats a carrier change of
    # a device whose peer index (iflink) equals its own index as non-urgent and rate-limits it
    # system-wide to one run per second, which would leave the second end "not running" (no
    # IPv6 multicast route, so neighbour discovery fails) for up to a second.
    a_index = _max_ifindex(a) + 1
    b_index = max(_max_ifindex(b) + 1, a_index + 1)
    _ip(["-n", a.name, "link", "add", a_ifname, "index", str(a_index), "type", "veth",
         "peer", "name", b_ifname, "index", str(b_index), "netns", b.name])  # fmt: skip
    for ns, ifname, ifs in ((a, a_ifname, a_ifs), (b, b_ifname, b_ifs)):
        for iface in ifs:
            extra = ["nodad"] if iface.version == 6 else []
            _ip(["-n", ns.name, "addr", "add", str(iface), "dev", ifname, *extra])
        _ip(["-n", ns.name, "link", "set", ifname, "up"])
    for ns, ifname in ((a, a_ifname), (b, b_ifname)):
        wait_link_running(ns, ifname)
    return NetnsPair(
        a=VethEnd(netns=a, ifname=a_ifname, addresses=a_ifs),
        b=VethEnd(netns=b, ifname=b_ifname, addresses=b_ifs),
    )


def _max_ifindex(ns: Netns) -> int:
    out = _ip(["-n", ns.name, "-o", "link", "show"]).stdout
    return max((int(line.split(":", 1)[0]) for line in out.splitlines() if line.strip()), default=1)


_SIOCGIFFLAGS = 0x8913
_IFF_RUNNING = 0x40
_RTMGRP_LINK = 0x1


def _link_running(ifname: str) -> bool:
    """IFF_RUNNING of an interface of the current namespace (SIOCGIFFLAGS)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        req = struct.pack("16sH22x", ifname.encode(), 0)
        res = fcntl.ioctl(sock.fileno(), _SIOCGIFFLAGS, req)
    (flags,) = struct.unpack_from("H", res, 16)
    return bool(flags & _IFF_RUNNING)


def _wait_running_here(ifname: str, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE) as nl:
        nl.bind((0, _RTMGRP_LINK))  # subscribe first, then look: no event can slip between
        while not _link_running(ifname):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            ready, _, _ = select.select([nl], [], [], remaining)
            if ready:
                nl.recv(65536)  # any link event: look again
    return True


def wait_link_running(ns: Netns | str, ifname: str, *, timeout: float = 5.0) -> None:
    """Wait (on netlink link events, not by polling) until ``ifname`` in ``ns`` is RUNNING.

    A veth end that was just brought up is not usable until the kernel's link watcher has
    processed its carrier change: only then does IPv6 add its multicast route (neighbour
    solicitations arriving earlier are dropped, costing the first connection a 1 s
    retransmission). Usually immediate (see `add_veth_pair` on ifindexes); when the link
    watcher is rate-limited it can take up to ~1 s.
    """
    name = _ns_name(ns)
    if not call_in_netns(name, lambda: _wait_running_here(ifname, timeout), timeout=timeout + 5):
        raise EnvironmentFault(f"{ifname} in netns {name} not running after {timeout}s")


def add_default_route(
    ns: Netns, via: ipaddress.IPv4Address | ipaddress.IPv6Address, *, dev: str | None = None
) -> None:
    """``ip route add default via <via>`` inside ``ns`` (``-6`` for an IPv6 gateway)."""
    family = "-6" if via.version == 6 else "-4"
    argv = ["-n", ns.name, family, "route", "add", "default", "via", str(via)]
    if dev is not None:
        argv += ["dev", dev]
    _ip(argv)


def remove_stale(prefix: str) -> list[str]:
    """Delete namespaces named by `unique_name` from ``prefix`` whose creating process is gone.

    Matches ``<prefix>[-<role>…]-<pid>-<8 hex>`` (roles start with a letter). For test sessions
    that were killed before their cleanup ran. Names of live processes (including parallel runs)
    are left alone. Returns the names removed.
    """
    pattern = re.compile(rf"^{re.escape(prefix)}(?:-[A-Za-z_][A-Za-z0-9_]*)*-(\d+)-[0-9a-f]{{8}}$")
    removed: list[str] = []
    if not NETNS_DIR.is_dir():
        return removed
    for entry in sorted(NETNS_DIR.iterdir()):
        m = pattern.match(entry.name)
        if m is None or _pid_alive(int(m.group(1))):
            continue
        with contextlib.suppress(EnvironmentFault):
            delete_netns(entry.name)
            removed.append(entry.name)
    return removed


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# --------------------------------------------------------------------------------------------
# context managers


@contextlib.contextmanager
def temporary_netns(prefix: str = "remora") -> Iterator[Netns]:
    """A fresh namespace with ``lo`` up, deleted on exit whatever happens."""
    name = unique_name(prefix)
    try:
        ns = create_netns(name)
        yield ns
    finally:
        delete_netns(name)


@contextlib.contextmanager
def netns_pair(
    *,
    prefix: str = "remora",
    a_role: str = "pod",
    b_role: str = "peer",
    a_addresses: Sequence[IPInterface | str] = (),
    b_addresses: Sequence[IPInterface | str] = (),
    a_ifname: str = "eth0",
    b_ifname: str = "eth0",
    a_default_via_b: bool = True,
) -> Iterator[NetnsPair]:
    """Two fresh namespaces joined by a veth pair; both are deleted on exit, even on failure.

    With ``a_default_via_b`` (the default) ``a`` gets a default route (per IP version present
    on both ends) through ``b``'s first address, so ``a`` can send to addresses that are not on
    the link (the connection then reaches ``b``, which does not forward it).
    """
    with temporary_netns(f"{prefix}-{a_role}") as a, temporary_netns(f"{prefix}-{b_role}") as b:
        pair = add_veth_pair(
            a,
            b,
            a_ifname=a_ifname,
            b_ifname=b_ifname,
            a_addresses=a_addresses,
            b_addresses=b_addresses,
        )
        if a_default_via_b:
            for version in (4, 6):
                if any(i.version == version for i in pair.a.addresses) and any(
                    i.version == version for i in pair.b.addresses
                ):
                    add_default_route(a, pair.b.first(version), dev=a_ifname)
        yield pair


# --------------------------------------------------------------------------------------------
# running things inside a namespace


def _ns_name(ns: Netns | str) -> str:
    name = ns.name if isinstance(ns, Netns) else ns
    _check_name(name)
    return name


def run_in_netns(
    ns: Netns | str,
    argv: Sequence[str],
    *,
    timeout: float = 30.0,
    check: bool = True,
    input: str | None = None,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run ``ip netns exec <ns> <argv…>``, capturing text output, with a timeout.

    ``check`` raises `EnvironmentFault` on a non-zero exit (with stderr in the message).
    """
    cmd = ["ip", "netns", "exec", _ns_name(ns), *argv]
    try:
        proc = subprocess.run(
            cmd,
            capture_output=True,
            text=True,
            timeout=timeout,
            input=input,
            env=env,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise EnvironmentFault(f"`{' '.join(cmd)}` did not finish in {timeout}s") from exc
    if check and proc.returncode != 0:
        raise EnvironmentFault(
            f"`{' '.join(cmd)}` failed (exit {proc.returncode}): "
            f"{proc.stderr.strip() or proc.stdout.strip()}"
        )
    return proc


def popen_in_netns(
    ns: Netns | str,
    argv: Sequence[str],
    *,
    env: dict[str, str] | None = None,
    stdin: int | None = subprocess.PIPE,
    stdout: int | None = subprocess.PIPE,
    stderr: int | None = subprocess.PIPE,
) -> subprocess.Popen[str]:
    """Start ``ip netns exec <ns> <argv…>`` in the background (text mode pipes).

    The caller owns the process: it must stop and reap it (before deleting the namespace).
    """
    cmd = ["ip", "netns", "exec", _ns_name(ns), *argv]
    return subprocess.Popen(
        cmd, stdin=stdin, stdout=stdout, stderr=stderr, text=True, env=env, close_fds=True
    )


def stop_process(proc: subprocess.Popen[str], *, grace: float = 15.0,
                 readers: Sequence[threading.Thread] = ()) -> None:
    """Stop a process started with `popen_in_netns` and release it: SIGTERM, SIGKILL after
    ``grace`` seconds, reaped; then the threads reading its output are joined (they see EOF)
    and its pipes closed."""
    if proc.poll() is None:
        proc.terminate()
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    for t in readers:
        t.join(5)
    for stream in (proc.stdin, proc.stdout, proc.stderr):
        if stream is not None:
            with contextlib.suppress(OSError):
                stream.close()


def enter_netns(ns: Netns | str) -> None:
    """Move the *calling thread* into ``ns`` with ``setns(2)``.

    Only for a freshly forked child (one thread): never call it in a long-lived process, it
    would change the namespace of every socket that process creates afterwards.
    """
    path = NETNS_DIR / _ns_name(ns)
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns({path}): {os.strerror(err)}")
    finally:
        os.close(fd)


@dataclass(frozen=True, slots=True)
class _ChildFailure:
    kind: str
    message: str
    exc: BaseException | None = field(default=None)


def call_in_netns(ns: Netns | str, fn: Callable[[], T], *, timeout: float = 30.0) -> T:
    """Run ``fn()`` in a forked child that has entered ``ns``, and return its result.

    The result (or the exception ``fn`` raised) comes back pickled through a pipe, so it must
    be picklable. ``fn`` runs with the parent's credentials; it may drop them (setuid) since it
    is in its own process. The child never execs, so it needs no access to the interpreter's
    files once running (useful after ``setuid`` to an unprivileged uid). If it does not finish
    within ``timeout`` seconds it is killed and `TimeoutError` is raised.
    """
    name = _ns_name(ns)
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: never returns
        _child_main(name, fn, rfd, wfd)
    os.close(wfd)
    data: bytes | None = None
    try:
        data = _read_all(rfd, deadline=time.monotonic() + timeout)
    finally:
        os.close(rfd)
        # EOF means the child is in os._exit: wait for it; otherwise it is past its deadline.
        _reap(pid, kill=data is None)
    if data is None:
        raise TimeoutError(f"callable in netns {name} did not finish in {timeout}s")
    if not data:
        raise EnvironmentFault(f"child in netns {name} died without a result")
    try:
        ok, payload = pickle.loads(data)
    except Exception as exc:
        raise EnvironmentFault(f"in netns {name}: unreadable result from child: {exc}") from exc
    if ok:
        return payload  # type: ignore[no-any-return]
    assert isinstance(payload, _ChildFailure)
    if payload.exc is not None:
        raise payload.exc
    raise EnvironmentFault(f"in netns {name}: {payload.kind}: {payload.message}")


def _child_main(name: str, fn: Callable[[], object], rfd: int, wfd: int) -> None:
    code = 0
    try:
        os.close(rfd)
        # Stop a SIGINT/SIGTERM meant for the parent from running the parent's handlers here.
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        try:
            enter_netns(name)
            out: tuple[bool, object] = (True, fn())
        except BaseException as exc:
            out = (False, _ChildFailure(type(exc).__name__, str(exc), exc))
        try:
            blob = pickle.dumps(out)
        except Exception as exc:
            blob = pickle.dumps((False, _ChildFailure(type(exc).__name__, f"unpicklable: {exc}")))
        view = memoryview(blob)
        while view:
            n = os.write(wfd, view)
            view = view[n:]
    except BaseException:
        code = 1
    finally:
        os._exit(code)


def _read_all(fd: int, *, deadline: float) -> bytes | None:
    """Read until EOF; None if the deadline passes first."""
    chunks: list[bytes] = []
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return None
        ready, _, _ = select.select([fd], [], [], remaining)
        if not ready:
            return None
        chunk = os.read(fd, 65536)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)


def _reap(pid: int, *, kill: bool) -> None:
    """Reap a child we forked, first killing it if asked (it is past its deadline)."""
    if kill:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
