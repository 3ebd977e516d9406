"""The proxy's connection handler: listen sockets, accept, listener filters, hand-off, filter
chain, then the network filter.

Owns, per worker: binding every ``bind_to_port`` listener address (``SO_REUSEPORT`` so each
worker process binds its own socket; ``IP_TRANSPARENT`` when the listener is transparent), the
accept loops (error policy as trio's: ``EMFILE``/``ENFILE``/``ENOBUFS``/``ENOMEM`` are logged and
retried after a back-off, a connection that died in the backlog is skipped, anything else
propagates), the listener filters (``original_dst`` restores the local address from
``SO_ORIGINAL_DST`` or, on a transparent listener, ``getsockname``; ``tls_inspector`` and
``http_inspector`` read the first bytes and ask :mod:`remora.proxy.sniff`, bounded by
``listener_filters_timeout`` with ``continue_on_listener_filters_timeout``), the hand-off of a
restored connection to the listener of its original destination (which runs its own listener
filters and chain match; never a second hand-off), the filter-chain match (no match: closed,
``no_filter_chain_match``, flag ``NR``), listener stats, and the drain: stopping listeners
(all or inbound only, now or after the drain time), waiting for open connections up to the
drain time, then closing them.
Every error a peer can cause (garbage, a reset, silence) ends that one connection only.
Must not: parse configuration, relay bytes (that is :mod:`remora.proxy.tcp`), choose hosts
(:mod:`remora.proxy.upstream`), or know about worker processes and the admin API.

References: spec §2.1 (accept pipeline), §2.2 (via :mod:`remora.proxy.dispatch`), Envoy
``listener.proto`` (``listener_filters_timeout`` default 15 s, ``bind_to_port``,
``use_original_dst``), Envoy listener stats docs, admin ``/drain_listeners``.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import itertools
import logging
import random
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from remora.proxy import platform
from remora.proxy.bpf import SockPairs
from remora.proxy.dispatch import ConnectionInfo, HandoffIndex, select_filter_chain
from remora.proxy.http.hcm import HttpConnectionManager, HttpContext
from remora.proxy.model import FilterChain, Listener, Snapshot, SocketAddress
from remora.proxy.sniff import SniffResult, sniff
from remora.proxy.state import ClusterStatus
from remora.proxy.stats import LISTENER_STATS, Stats, StatsSnapshot, listener_scope
from remora.proxy.tcp import ConnectionRecord, TcpProxyFilter
from remora.proxy.upstream import (
    Resolver,
    UpstreamCluster,
    build_clusters,
    start_clusters,
    stop_clusters,
    system_resolver,
)

log = logging.getLogger(__name__)
access_log = logging.getLogger("remora.proxy.connection")  # Envoy "connection"

# accept(2) errors. Out of resources: log, back off, retry (trio's policy).
ACCEPT_RESOURCE_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
# This one connection is gone (or a firewall refused it): skip it.
ACCEPT_SKIP_ERRNOS = frozenset({errno.ECONNABORTED, errno.EPROTO, errno.EPERM, errno.EAGAIN,
                                errno.EINTR})
ACCEPT_BACKOFF_MAX = 1.0
ACCEPT_BATCH = 64        # accepts per wake-up before yielding to the loop

PEEK_CHUNK = 16384
PEEK_MAX = 65536 + PEEK_CHUNK  # safety stop; the inspectors decide within 64 KiB themselves


Sniffer = Callable[[bytes, bool, bool], SniffResult | None]
"""``(data, want_tls, want_http)`` → what the inspectors set, or None for "need more bytes"."""


@dataclass(slots=True)
class _Pending:
    """A connection between accept and its network filter."""

    local: SocketAddress
    remote: SocketAddress
    restored: bool = False
    buffer: bytearray = field(default_factory=bytearray)
    eof: bool = False
    transport_protocol: str = ""
    server_name: str = ""
    application_protocols: tuple[str, ...] = ()


@dataclass(slots=True)
class _Bound:
    listener: Listener
    address: SocketAddress
    sock: socket.socket
    loop: asyncio.AbstractEventLoop | None = None   # set while registered for accepting
    backoff: float = 0.0
    retry: asyncio.TimerHandle | None = None


class _ListenerStats:
    __slots__ = ("active", "destroy", "no_chain", "pre_active", "pre_timeout", "total")

    def __init__(self, stats: Stats, listener: Listener) -> None:
        scope = listener_scope(str(listener.address)) + "."
        for name, kind in LISTENER_STATS:
            stats.declare(scope + name, kind)
        self.total = scope + "downstream_cx_total"
        self.destroy = scope + "downstream_cx_destroy"
        self.active = scope + "downstream_cx_active"
        self.pre_active = scope + "downstream_pre_cx_active"
        self.pre_timeout = scope + "downstream_pre_cx_timeout"
        self.no_chain = scope + "no_filter_chain_match"


class Worker:
    """Everything one worker process runs: listeners, connections, clusters, stats."""

    def __init__(self, snapshot: Snapshot, *, drain_time: float = 600.0, index: int = 0,
                 concurrency: int = 1, rng: random.Random | None = None,
                 sniffer: Sniffer = sniff,
                 resolver: Resolver = system_resolver,
                 offload: SockPairs | None = None) -> None:
        self.snapshot = snapshot
        self.drain_time = drain_time
        self.index = index
        self.rng = rng or random.Random()
        self.sniffer = sniffer
        self.stats = Stats()
        self.clusters: dict[str, UpstreamCluster] = build_clusters(
            snapshot.clusters, self.stats, self.rng, resolver=resolver)
        self._lstats = {li.name: _ListenerStats(self.stats, li) for li in snapshot.listeners}
        self._filters: dict[int, TcpProxyFilter | HttpConnectionManager] = {}
        self.http = HttpContext(self.clusters, self.stats, self.rng, node_id=snapshot.node.id,
                                node_cluster=snapshot.node.cluster,
                                node_metadata=snapshot.node.metadata)
        for li in snapshot.listeners:
            for chain in (*li.filter_chains, *([li.default_filter_chain]
                                               if li.default_filter_chain else [])):
                tp = chain.tcp_proxy
                if tp is not None:
                    self._filters[id(chain)] = TcpProxyFilter(
                        tp, self.clusters, self.stats, self.rng,
                        on_close=self.http.tcp_telemetry(
                            tp, outbound=li.traffic_direction != "INBOUND"),
                        offload=None if li.transparent else offload)
                hcm = chain.hcm
                if hcm is not None:
                    self._filters[id(chain)] = HttpConnectionManager(
                        hcm, self.http, direction=li.traffic_direction)
        self._bound: list[_Bound] = []
        self._stopped: set[str] = set()
        self._active_listeners = list(snapshot.listeners)
        self._handoff = HandoffIndex(self._active_listeners)
        self._conns: set[asyncio.Task[None]] = set()
        self._cid = itertools.count(index + 1, max(1, concurrency))
        self.draining = False
        self._drain_timer: asyncio.TimerHandle | None = None
        self._shutdown: asyncio.Future[bool] | None = None
        self._fatal: asyncio.Future[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None   # the running loop, in run()

    # ------------------------------------------------------------------------ binding

    def bind(self) -> None:
        """Open every listen socket (before dropping privileges: transparent sockets need
        CAP_NET_ADMIN). On failure, closes what was opened and raises OSError naming the
        listener."""
        try:
            for li in self.snapshot.listeners:
                if not li.bind_to_port:
                    continue
                for addr in li.addresses:
                    try:
                        sock = platform.listen_socket(addr, transparent=li.transparent)
                    except OSError as exc:
                        raise OSError(exc.errno, f"listener {li.name} cannot bind {addr}: "
                                      f"{exc.strerror}") from None
                    self._bound.append(_Bound(listener=li, address=addr, sock=sock))
        except BaseException:
            self.close_sockets()
            raise

    def close_sockets(self) -> None:
        for b in self._bound:
            self._unregister(b)
            b.sock.close()

    @property
    def bound_addresses(self) -> list[tuple[str, SocketAddress]]:
        return [(b.listener.name, platform.local_address(b.sock)) for b in self._bound
                if b.sock.fileno() >= 0]

    # ------------------------------------------------------------------------ running

    async def run(self, ready: Callable[[], None] | None = None) -> None:
        """Warm the clusters, start accepting, call ``ready``; return after a shutdown
        (:meth:`shutdown`) has finished. An accept error outside the policy is raised."""
        loop = self._loop = asyncio.get_running_loop()
        self._shutdown = loop.create_future()
        self._fatal = loop.create_future()
        try:
            await start_clusters(self.clusters)
            self.http.start(loop)
            for b in self._bound:
                self._register(b, loop)
            if ready is not None:
                ready()
            waiters: list[asyncio.Future[Any]] = [self._shutdown, self._fatal]
            await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
            graceful = self._shutdown.result() if self._shutdown.done() else False
            self.stop_listeners(inbound_only=False)
            await self._close_connections(self.drain_time if graceful else 0.0)
            if self._fatal.done():
                self._fatal.result()
        finally:
            if self._drain_timer is not None:
                self._drain_timer.cancel()
            self.close_sockets()
            with contextlib.suppress(Exception):
                async with asyncio.timeout(5.0):
                    await self.http.stop_tracing()
            self.http.close()
            stop_clusters(self.clusters)

    def shutdown(self, *, graceful: bool) -> None:
        """Stop: with ``graceful``, let open connections finish up to the drain time first."""
        if self._shutdown is not None and not self._shutdown.done():
            self.draining = True
            if graceful:
                self.http.start_drain()
            self._shutdown.set_result(graceful)

    async def _close_connections(self, grace: float) -> None:
        conns = set(self._conns)
        if conns and grace > 0:
            log.info("draining %d connections for up to %.1fs", len(conns), grace)
            _, conns = await asyncio.wait(conns, timeout=grace)
        for t in conns:
            t.cancel()
        if conns:
            await asyncio.wait(conns, timeout=5.0)

    def _register(self, b: _Bound, loop: asyncio.AbstractEventLoop) -> None:
        b.loop = loop
        loop.add_reader(b.sock.fileno(), self._accept_ready, b)

    def _unregister(self, b: _Bound) -> None:
        """Stop watching the socket (synchronously, before it may be closed)."""
        if b.retry is not None:
            b.retry.cancel()
            b.retry = None
        if b.loop is not None:
            if b.sock.fileno() >= 0:
                b.loop.remove_reader(b.sock.fileno())
            b.loop = None

    def _accept_ready(self, b: _Bound) -> None:
        """The listen socket is readable: accept what is in the backlog (up to a batch)."""
        for _ in range(ACCEPT_BATCH):
            try:
                conn, peer = b.sock.accept()
            except BlockingIOError:
                return
            except OSError as exc:
                self._accept_error(exc, b)
                return
            b.backoff = 0.0
            self._start(conn, b.listener, peer)

    def _accept_error(self, exc: OSError, b: _Bound) -> None:
        """trio's policy: out of resources → log, stop watching, retry after a growing
        back-off; this connection is gone → skip it; anything else → the worker fails."""
        if exc.errno in ACCEPT_RESOURCE_ERRNOS:
            b.backoff = min(max(b.backoff * 2, 0.01), ACCEPT_BACKOFF_MAX)
            log.warning("listener %s: accept failed (%s); retrying in %.2fs", b.listener.name,
                        errno.errorcode.get(exc.errno or 0, exc), b.backoff)
            loop = b.loop
            if loop is not None:
                self._unregister(b)
                b.loop = None

                def again() -> None:
                    b.retry = None
                    if b.sock.fileno() >= 0 and b.listener.name not in self._stopped:
                        self._register(b, loop)
                b.retry = loop.call_later(b.backoff, again)
            return
        if exc.errno in ACCEPT_SKIP_ERRNOS:
            return
        log.error("listener %s: accept failed: %s", b.listener.name, exc)
        self._unregister(b)
        if self._fatal is not None and not self._fatal.done():
            self._fatal.set_exception(exc)

    def _start(self, conn: socket.socket, listener: Listener, peer: Any = None) -> None:
        conn.setblocking(False)
        # Envoy sets TCP_NODELAY on every connection it accepts or opens. (The relay's
        # transport sets it again, but a listener filter may hold the connection first.)
        with contextlib.suppress(OSError):
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        cid = next(self._cid)
        loop = self._loop or asyncio.get_running_loop()
        task = loop.create_task(self._serve(conn, listener, cid, peer))
        self._conns.add(task)
        task.add_done_callback(self._conns.discard)

    # ------------------------------------------------------------------------ one connection

    async def _serve(self, sock: socket.socket, receiver: Listener, cid: int,
                     peer: Any = None) -> None:
        """``peer``: the remote address accept() returned (None: ask the socket)."""
        loop = self._loop or asyncio.get_running_loop()
        record = ConnectionRecord(cid=cid, listener=receiver.name, start=loop.time())
        owned = True   # until the network filter takes the socket
        try:
            try:
                pending = _Pending(local=platform.local_address(sock),
                                   remote=platform.to_address(peer) if peer
                                   else platform.peer_address(sock))
            except OSError:
                return  # reset before we looked at it
            record.downstream_remote = pending.remote
            listener = receiver
            if not await self._listener_filters(sock, listener, pending):
                return
            if listener.use_original_dst and pending.restored:
                target = self._handoff.find(listener, pending.local)
                if target is not None:
                    listener = target
                    record.listener = target.name
                    if not await self._listener_filters(sock, listener, pending):
                        return
            record.downstream_local = pending.local
            chain = self._match(listener, pending)
            if chain is None:
                self.stats.inc(self._lstats[listener.name].no_chain)
                record.flags.add("NR")
                record.details = "filter_chain_not_found"
                return
            record.filter_chain = chain.name
            flt = self._filters.get(id(chain))
            if flt is None:
                return  # a chain without a network filter we implement: nothing to do
            ls = self._lstats[listener.name]
            st = self.stats
            st.inc(ls.total)
            st.gauge_add(ls.active, 1)
            try:
                owned = False
                await flt.handle(sock, record,
                                 restored=pending.local if pending.restored else None,
                                 initial=bytes(pending.buffer), loop=loop)
            finally:
                st.gauge_add(ls.active, -1)
                st.inc(ls.destroy)
        except asyncio.CancelledError:
            raise
        except OSError as exc:
            log.debug("[C%d] closed: %s", cid, exc)
        except Exception:
            log.exception("[C%d] unexpected error; closing this connection", cid)
        finally:
            if owned:
                sock.close()
            record.duration = loop.time() - record.start
            if access_log.isEnabledFor(logging.DEBUG):
                access_log.debug("%s", record.log_line())

    def _match(self, listener: Listener, p: _Pending) -> FilterChain | None:
        local_ip, remote_ip = p.local.ip, p.remote.ip
        if local_ip is None or remote_ip is None:
            return listener.default_filter_chain
        info = ConnectionInfo(local_ip=local_ip, local_port=p.local.port, remote_ip=remote_ip,
                              remote_port=p.remote.port, server_name=p.server_name,
                              transport_protocol=p.transport_protocol or "raw_buffer",
                              application_protocols=p.application_protocols)
        return select_filter_chain(listener, info)

    async def _listener_filters(self, sock: socket.socket, listener: Listener,
                                p: _Pending) -> bool:
        """Run the listener's filters; False means close the connection."""
        tls = http = False
        for f in listener.effective_listener_filters():
            if not f.enabled_for(p.local.port):
                continue
            if f.name == "original_dst":
                dst = platform.original_destination(sock, transparent=listener.transparent)
                if dst is not None:
                    p.local = dst
                    p.restored = True
            elif f.name == "tls_inspector":
                tls = True
            elif f.name == "http_inspector":
                http = True
        if not (tls or http):
            return True
        ls = self._lstats[listener.name]
        self.stats.gauge_add(ls.pre_active, 1)
        try:
            async with asyncio.timeout(listener.listener_filters_timeout or None):
                await self._inspect(sock, p, tls=tls, http=http)
        except TimeoutError:
            self.stats.inc(ls.pre_timeout)
            return listener.continue_on_listener_filters_timeout
        finally:
            self.stats.gauge_add(ls.pre_active, -1)
        return True

    async def _inspect(self, sock: socket.socket, p: _Pending, *, tls: bool,
                       http: bool) -> None:
        """Read until the sniffer decides (or EOF, or too many bytes). Bytes read are kept
        in ``p.buffer`` and sent upstream first."""
        loop = self._loop or asyncio.get_running_loop()
        while True:
            data = bytes(p.buffer)
            if data or p.eof:
                result = self.sniffer(data, tls, http)
                if result is not None:
                    p.transport_protocol = result.transport_protocol
                    p.server_name = result.server_name
                    p.application_protocols = tuple(result.application_protocols)
                    return
                if p.eof or len(data) >= PEEK_MAX:
                    return
            chunk = await loop.sock_recv(sock, PEEK_CHUNK)
            if not chunk:
                p.eof = True
            p.buffer += chunk

    # ------------------------------------------------------------------------ control

    def stop_listeners(self, *, inbound_only: bool) -> None:
        """Stop accepting on all listeners (or those with traffic_direction INBOUND); stopped
        listeners no longer take hand-offs either."""
        for li in self.snapshot.listeners:
            if inbound_only and li.traffic_direction != "INBOUND":
                continue
            self._stopped.add(li.name)
        for b in self._bound:
            if b.listener.name in self._stopped and b.sock.fileno() >= 0:
                self._unregister(b)
                b.sock.close()
        self._active_listeners = [li for li in self.snapshot.listeners
                                  if li.name not in self._stopped]
        self._handoff = HandoffIndex(self._active_listeners)

    def drain_listeners(self, *, inbound_only: bool, graceful: bool, skip_exit: bool) -> None:
        """Envoy ``/drain_listeners``: stop listeners now, or with ``graceful`` after the drain
        time (still accepting meanwhile); ``skip_exit`` keeps them after a graceful drain.
        Open TCP connections are not closed by a drain; HTTP connections are asked to close
        (``connection: close``, GOAWAY) and idle keep-alive ones close now, as Envoy's
        connection manager does."""
        self.draining = True
        self.http.start_drain(inbound_only=inbound_only)
        if not graceful:
            self.stop_listeners(inbound_only=inbound_only)
            return
        if self._drain_timer is not None:
            return  # a graceful drain is already under way
        loop = asyncio.get_running_loop()

        def done() -> None:
            if not skip_exit:
                self.stop_listeners(inbound_only=inbound_only)
        self._drain_timer = loop.call_later(self.drain_time, done)

    def flush_stats(self) -> None:
        """Fold what open connections have counted but not yet reported into the store."""
        for flt in self._filters.values():
            flt.flush_stats()

    def stats_snapshot(self) -> StatsSnapshot:
        self.flush_stats()
        return self.stats.snapshot()

    def cluster_status(self) -> list[ClusterStatus]:
        return [c.status() for c in self.clusters.values()]

    def reopen_logs(self) -> None:
        """``POST /reopen_logs``: the access logs' files opened anew (after rotation)."""
        for path in self.http.writers.reopen():
            log.warning("cannot reopen access log %s: keeping the old file", path)

    def reset_counters(self) -> None:
        self.flush_stats()   # what open connections relayed so far is before the reset
        self.stats.reset_counters()
        for c in self.clusters.values():
            for h in c.hosts:
                for name in ("cx_total", "cx_connect_fail", "rq_total", "rq_error",
                             "rq_success", "rq_timeout"):
                    h.stats[name] = 0

    @property
    def connection_count(self) -> int:
        """Connections between accept and close (for drain decisions and tests)."""
        return len(self._conns)
