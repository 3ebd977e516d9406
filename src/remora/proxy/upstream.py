"""Clusters at run time: their hosts, how one is chosen, and how a connection to it is opened.

Owns, per worker: each cluster's live host set (STATIC/EDS endpoint lists from the snapshot;
STRICT_DNS/LOGICAL_DNS resolved with ``getaddrinfo`` in the default executor and refreshed every
``dns_refresh_rate``; ORIGINAL_DST hosts created on demand from a connection's restored
destination and removed after ``cleanup_interval`` of disuse), host choice through
:mod:`remora.proxy.lb`, the circuit breaker on ``max_connections`` (overflow: ``UO``), opening
an upstream connection (``upstream_bind_config`` source per family, ``connect_timeout``;
failure: ``UF``), and the per-cluster (``cluster.<observability name>.…``) and per-host stats.
Must not: accept connections, relay bytes (that is :mod:`remora.proxy.tcp`), or read the
bootstrap.

References: spec §2.3, §5.5–5.6, §6; Envoy ``cluster.proto`` (``cleanup_interval``,
``dns_refresh_rate``, ``dns_lookup_family``, ``upstream_bind_config``), Envoy cluster stats docs.
Circuit breakers are per worker process here (Envoy shares them across worker threads).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import random
import socket
import time
from collections.abc import Callable, Sequence
from typing import TypeVar

from mypy_extensions import mypyc_attr

from remora.proxy import platform
from remora.proxy.lb import PriorityLb, make_lb
from remora.proxy.model import DEGRADED_FLAG, Cluster, LbEndpoint, SocketAddress
from remora.proxy.state import HOST_STATS, ClusterStatus, HostStatus
from remora.proxy.stats import CLUSTER_STATS, Kind, Stats, cluster_scope

log = logging.getLogger(__name__)

P = TypeVar("P", bound=asyncio.BaseProtocol)

# Envoy counts each upstream TCP connection a tcp_proxy uses as one "request" of its pool, and
# counts flow control on the upstream side under the cluster.
EXTRA_CLUSTER_STATS: tuple[tuple[str, Kind], ...] = (
    ("upstream_rq_total", "counter"), ("upstream_rq_active", "gauge"),
    ("upstream_flow_control_paused_reading_total", "counter"),
    ("upstream_flow_control_resumed_reading_total", "counter"),
    ("lb_healthy_panic", "counter"),     # hosts chosen from a priority level in panic
    ("membership_degraded", "gauge"),
)

Resolver = Callable[[str, int, int], list[tuple[int, str]]]
"""``(hostname, port, family) -> [(family, ip), …]`` (blocking; run in an executor)."""


class UpstreamError(Exception):
    """No upstream connection for this downstream connection; ``flag`` is Envoy's response
    flag (``UH`` no healthy host, ``UO`` overflow, ``UF`` connect failure)."""

    def __init__(self, flag: str, detail: str) -> None:
        super().__init__(detail)
        self.flag = flag
        self.detail = detail


class Host:
    """One upstream host of one cluster in one worker, with Envoy's per-host stats."""

    __slots__ = ("address", "address_text", "created", "family", "health_flags", "hostname",
                 "locality", "locality_weight", "priority", "sockaddr", "stats", "used",
                 "weight")

    def __init__(self, address: SocketAddress, *, weight: int = 1,
                 health_flags: tuple[str, ...] = (),
                 hostname: str = "", locality: tuple[str, str, str] = ("", "", ""),
                 priority: int = 0, created: float | None = None,
                 locality_weight: int = 0) -> None:
        self.address = address
        self.address_text = str(address)       # for access logs, once
        self.family = platform.family_of(address)
        self.sockaddr = address.sockaddr()
        self.weight = max(1, weight)
        self.health_flags = health_flags        # () = healthy (Envoy's flags otherwise)
        self.hostname = hostname
        self.locality = locality
        self.priority = priority
        self.locality_weight = locality_weight
        # when it joined the cluster (time.monotonic, the balancers' clock): slow start
        self.created = time.monotonic() if created is None else created
        self.stats = dict.fromkeys(HOST_STATS, 0)
        self.used = True

    @classmethod
    def of(cls, ep: LbEndpoint, address: SocketAddress | None = None) -> Host:
        loc = ep.locality
        return cls(address or ep.address, weight=ep.weight, health_flags=ep.health_flags,
                   hostname=ep.hostname, locality=(loc.region, loc.zone, loc.sub_zone),
                   priority=ep.priority, locality_weight=ep.locality_weight)

    @property
    def healthy(self) -> bool:
        return not self.health_flags

    @property
    def degraded(self) -> bool:
        """EDS DEGRADED and nothing else wrong: used when the healthy hosts cannot take it all."""
        return self.health_flags == (DEGRADED_FLAG,)

    @property
    def active_requests(self) -> int:
        return self.stats["rq_active"]

    def status(self) -> HostStatus:
        region, zone, sub_zone = self.locality
        return HostStatus(address=self.address, stats=dict(self.stats),
                          health_flags=self.health_flags, weight=self.weight, region=region,
                          zone=zone, sub_zone=sub_zone, priority=self.priority,
                          hostname=self.hostname, locality_weight=self.locality_weight)


def _is_ip(text: str) -> bool:
    try:
        socket.inet_pton(socket.AF_INET6 if ":" in text else socket.AF_INET, text)
    except OSError:
        return False
    return True


def system_resolver(hostname: str, port: int, family: int) -> list[tuple[int, str]]:
    """Blocking getaddrinfo for TCP; (family, ip) pairs in the resolver's order."""
    out: list[tuple[int, str]] = []
    for fam, _type, _proto, _canon, sa in socket.getaddrinfo(
            hostname, port, family, socket.SOCK_STREAM, socket.IPPROTO_TCP):
        ip = str(sa[0])
        if (int(fam), ip) not in out:
            out.append((int(fam), ip))
    return out


def select_family(policy: str, found: Sequence[tuple[int, str]]) -> list[str]:
    """Apply ``dns_lookup_family`` to resolver results (Envoy: AUTO prefers IPv6 and falls
    back to IPv4, V4_PREFERRED the reverse, ALL keeps both)."""
    v4 = [ip for fam, ip in found if fam == socket.AF_INET]
    v6 = [ip for fam, ip in found if fam == socket.AF_INET6]
    if policy == "V4_ONLY":
        return v4
    if policy == "V6_ONLY":
        return v6
    if policy == "V4_PREFERRED":
        return v4 or v6
    if policy == "ALL":
        return v4 + v6
    return v6 or v4


@mypyc_attr(allow_interpreted_subclasses=True)   # the tests' FakeCluster
class UpstreamCluster:
    """A cluster's runtime in one worker."""

    def __init__(self, config: Cluster, stats: Stats, rng: random.Random, *,
                 resolver: Resolver = system_resolver) -> None:
        self.config = config
        self.name = config.name
        self.stats = stats
        self.rng = rng
        self.resolver = resolver
        scope = cluster_scope(config.observability_name) + "."
        self._s = {name: scope + name for name, _ in (*CLUSTER_STATS, *EXTRA_CLUSTER_STATS)}
        for name, kind in (*CLUSTER_STATS, *EXTRA_CLUSTER_STATS):
            stats.declare(scope + name, kind)
        self.original_dst = config.type == "ORIGINAL_DST"
        self.dns = config.type in ("STRICT_DNS", "LOGICAL_DNS")
        self.hosts: list[Host] = []
        self._by_addr: dict[SocketAddress, Host] = {}
        self.active_connections = 0
        self._max_connections = config.default_thresholds.max_connections
        self.lb: PriorityLb[Host] = make_lb(
            config.lb_policy, [], rng, ring_min=config.ring_min_size,
            ring_max=config.ring_max_size, maglev_table=config.maglev_table_size,
            panic_threshold=config.healthy_panic_threshold,
            overprovisioning=config.overprovisioning_factor,
            locality_weighted=config.locality_weighted, slow_start=config.slow_start,
            clock=time.monotonic, choice_count=config.choice_count,
            active_request_bias=config.active_request_bias)
        self._tasks: list[asyncio.Task[None]] = []
        if not self.dns:
            self._set_hosts([Host.of(ep) for ep in config.endpoints])

    # ---------------------------------------------------------------------- membership

    def _set_hosts(self, hosts: list[Host]) -> None:
        self.hosts = hosts
        self._by_addr = {h.address: h for h in hosts}
        self.lb.update(hosts)
        self._membership()

    def _membership(self) -> None:
        self.stats.gauge_set(self._s["membership_total"], len(self.hosts))
        self.stats.gauge_set(self._s["membership_healthy"],
                             sum(1 for h in self.hosts if h.healthy))
        self.stats.gauge_set(self._s["membership_degraded"],
                             sum(1 for h in self.hosts if h.degraded))

    def _merge_hosts(self, wanted: list[Host]) -> None:
        """New membership keeping the Host objects (and stats) of addresses that stay."""
        hosts = [self._by_addr.get(h.address, h) for h in wanted]
        self._set_hosts(hosts)

    async def resolve_once(self) -> None:
        """Resolve every endpoint of a DNS cluster once; on failure keep the old hosts."""
        loop = asyncio.get_running_loop()
        wanted: list[Host] = []
        family = {"V4_ONLY": socket.AF_INET, "V6_ONLY": socket.AF_INET6}.get(
            self.config.dns_lookup_family, socket.AF_UNSPEC)
        for ep in self.config.endpoints:
            name = ep.address.address
            if _is_ip(name):
                ips = [name]
            else:
                try:
                    found = await asyncio.wait_for(
                        loop.run_in_executor(None, self.resolver, name, ep.address.port,
                                             family), timeout=max(self.config.dns_refresh_rate,
                                                                  5.0))
                except (OSError, TimeoutError, UnicodeError) as exc:
                    log.warning("cluster %s: cannot resolve %s: %s", self.name, name, exc)
                    return
                ips = select_family(self.config.dns_lookup_family, found)
            if self.config.type == "LOGICAL_DNS":
                ips = ips[:1]
            for ip in ips:
                addr = SocketAddress(address=ip, port=ep.address.port)
                wanted.append(Host.of(ep, addr))
            if self.config.type == "LOGICAL_DNS":
                break
        self._merge_hosts(wanted)

    async def _dns_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.dns_refresh_rate)
            await self.resolve_once()

    async def _cleanup_loop(self) -> None:
        """ORIGINAL_DST: every ``cleanup_interval``, drop hosts not used since the last sweep
        and without connections (Envoy ``OriginalDstCluster::cleanup``)."""
        while True:
            await asyncio.sleep(self.config.cleanup_interval)
            self.sweep()

    def sweep(self) -> None:
        keep = []
        for h in self.hosts:
            if h.used or h.stats["cx_active"] > 0:
                h.used = False
                keep.append(h)
        if len(keep) != len(self.hosts):
            self._set_hosts(keep)

    async def start(self) -> None:
        """Initial DNS resolution (the cluster "warms" before listeners accept) and the
        background refresh / cleanup tasks."""
        if self.dns:
            await self.resolve_once()
            self._tasks.append(asyncio.create_task(self._dns_loop(),
                                                   name=f"dns {self.name}"))
        if self.original_dst:
            self._tasks.append(asyncio.create_task(self._cleanup_loop(),
                                                   name=f"cleanup {self.name}"))

    def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        self._tasks.clear()

    # ----------------------------------------------------------------------- choosing

    def pick(self, restored_destination: SocketAddress | None, hash_key: int | None = None,
             attempt: int = 0) -> Host | None:
        """The host for a new connection; None: no healthy upstream (``UH``). ``hash_key``
        and ``attempt``: for RING_HASH / MAGLEV (see :meth:`LoadBalancer.pick`)."""
        if self.original_dst:
            if restored_destination is None:
                return None
            host = self._by_addr.get(restored_destination)
            if host is None:
                host = Host(restored_destination)
                self.hosts.append(host)
                self._by_addr[restored_destination] = host
                self._membership()
            host.used = True
            return host
        host = self.lb.pick(hash_key, attempt)
        if self.lb.picked_in_panic and host is not None:
            self.stats.inc(self._s["lb_healthy_panic"])
        return host

    # ----------------------------------------------------------------------- connecting

    def source_for(self, host: Host) -> SocketAddress | None:
        return self.config.bind_source_for(6 if host.family == socket.AF_INET6 else 4)

    async def connect(self, host: Host, protocol_factory: Callable[[], P],
                      loop: asyncio.AbstractEventLoop | None = None, *,
                      as_request: bool = True) -> tuple[asyncio.Transport, P]:
        """Open a connection to ``host``; raises :class:`UpstreamError` (``UO``/``UF``).
        ``as_request``: count the connection as one request (tcp_proxy); HTTP pools count
        their requests themselves.

        Without a bind source the loop connects by itself (``create_connection`` with the
        numeric address: no resolver call; uvloop does it all in C). With one, the socket is
        made here (its options must precede ``bind``), connected without blocking, then
        wrapped. Never ``loop.sock_connect``: uvloop's sends even a numeric address through
        getaddrinfo on its thread pool (~100 µs and four futex calls per connection)."""
        s, st = self._s, self.stats
        if self.active_connections >= self._max_connections:
            st.inc(s["upstream_cx_overflow"])
            raise UpstreamError("UO", "overflow")
        if loop is None:
            loop = asyncio.get_running_loop()
        self.active_connections += 1
        st.inc(s["upstream_cx_total"])
        st.gauge_add(s["upstream_cx_active"], 1)
        hs = host.stats
        hs["cx_total"] += 1
        hs["cx_active"] += 1
        ok = False
        sock: socket.socket | None = None
        try:
            source = self.source_for(host)
            async with asyncio.timeout(self.config.connect_timeout):
                if source is None:
                    ip, port = host.sockaddr
                    transport, protocol = await loop.create_connection(
                        protocol_factory, ip, port, family=host.family)
                else:
                    sock = platform.upstream_socket(host.family, source)
                    await _connect(loop, sock, host.sockaddr)
            if sock is not None:
                transport, protocol = await loop.create_connection(protocol_factory, sock=sock)
                sock = None
            ok = True
        except TimeoutError:
            st.inc(s["upstream_cx_connect_timeout"])
            st.inc(s["upstream_cx_connect_fail"])
            hs["cx_connect_fail"] += 1
            raise UpstreamError("UF", "connection timeout") from None
        except OSError as exc:
            st.inc(s["upstream_cx_connect_fail"])
            hs["cx_connect_fail"] += 1
            raise UpstreamError("UF", f"delayed connect error: {exc.errno}") from None
        finally:
            if sock is not None:
                sock.close()
            if not ok:
                self._released(host, local=True)
        if as_request:
            hs["rq_total"] += 1
            hs["rq_active"] += 1
            st.inc(s["upstream_rq_total"])
            st.gauge_add(s["upstream_rq_active"], 1)
        return transport, protocol

    def _released(self, host: Host, *, local: bool) -> None:
        s, st = self._s, self.stats
        self.active_connections -= 1
        st.gauge_add(s["upstream_cx_active"], -1)
        st.inc(s["upstream_cx_destroy"])
        st.inc(s["upstream_cx_destroy_local"] if local else s["upstream_cx_destroy_remote"])
        host.stats["cx_active"] -= 1

    def disconnected(self, host: Host, *, local: bool, as_request: bool = True) -> None:
        """An upstream connection made by :meth:`connect` has ended (``local``: we closed it
        first)."""
        if as_request:
            host.stats["rq_active"] -= 1
            self.stats.gauge_add(self._s["upstream_rq_active"], -1)
        self._released(host, local=local)

    def stat(self, name: str) -> str:
        """The full name of one of this cluster's stats."""
        return self._s[name]

    def status(self) -> ClusterStatus:
        return ClusterStatus(name=self.name, hosts=[h.status() for h in self.hosts])


def _wake(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


async def _connect(loop: asyncio.AbstractEventLoop, sock: socket.socket,
                   address: tuple[str, int]) -> None:
    """Connect the non-blocking ``sock`` to the numeric ``address``; OSError on failure."""
    err = sock.connect_ex(address)
    if err in (errno.EINPROGRESS, errno.EINTR):
        fut = loop.create_future()
        fd = sock.fileno()
        loop.add_writer(fd, _wake, fut)
        try:
            await fut
        finally:
            loop.remove_writer(fd)
        err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
    if err:
        raise OSError(err, os.strerror(err))


def build_clusters(clusters: dict[str, Cluster], stats: Stats, rng: random.Random, *,
                   resolver: Resolver = system_resolver) -> dict[str, UpstreamCluster]:
    return {name: UpstreamCluster(c, stats, random.Random(rng.random()), resolver=resolver)
            for name, c in clusters.items()}


async def start_clusters(clusters: dict[str, UpstreamCluster]) -> None:
    """Warm every cluster (initial DNS) concurrently."""
    async with asyncio.TaskGroup() as tg:
        for c in clusters.values():
            tg.create_task(c.start(), name=f"warm {c.name}")


def stop_clusters(clusters: dict[str, UpstreamCluster]) -> None:
    for c in clusters.values():
        with contextlib.suppress(Exception):
            c.stop()
