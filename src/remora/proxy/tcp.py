"""The ``envoy.filters.network.tcp_proxy`` network filter: one downstream connection relayed
to one upstream connection.

Owns: choosing the cluster (``cluster`` or ``weighted_clusters`` by weight), getting a host
and a connection from :mod:`remora.proxy.upstream` (up to ``max_connect_attempts``), relaying
bytes both ways with flow control (a side's reading pauses while the other side's write buffer
is above the high watermark and resumes below the low one, so a slow reader never makes the
proxy buffer more than about one watermark per direction), half-close (EOF from one side is a
``shutdown(SHUT_WR)`` towards the other; the other direction stays open until it ends too),
``idle_timeout``, closing one side when the other closes or resets, byte counters, Envoy's
``tcp.<stat_prefix>.…`` stats, and the connection's response flags (``UH``, ``UF``, ``UO``,
``URX``, ``NC``) for the log.
Hot path: no Python code runs per chunk. Each side's protocol has as its ``data_received``
the other side's ``transport.write`` (a method of uvloop's compiled transport, which the
transport calls directly), so a chunk is one read and one write inside the event loop. The
byte counts come from the kernel instead (``tcpi_bytes_received`` less what is unread,
:func:`remora.proxy.platform.tcp_read`), read when the stats are read
(:meth:`TcpProxyFilter.flush_stats`, called by the worker's snapshot), by the idle timer, and
once more as each socket closes. The idle timeout is a timer that ticks every
``idle_timeout / IDLE_TICKS`` and compares the byte counts with the previous tick (the
connection closes between ``idle_timeout`` and ``idle_timeout * (1 + 1/IDLE_TICKS)`` after
its last byte). Where the kernel cannot count (not a TCP socket) or the kernel relay may take
over (``--tcp-offload``), each chunk goes through :meth:`_Half.relay`, which counts it.
Kernel relay (``--tcp-offload``, maps from :mod:`remora.proxy.bpf`): once a plain IPv4,
non-transparent connection has nothing buffered in either write buffer and nothing unread on
either socket (so the sniffed ``initial`` bytes and a server-first upstream's first bytes have
gone out, and no half-read skb can be sent twice), its two sockets are paired in the sockmap
and the kernel moves the bytes; user space still sees EOF, errors and close. EOF and close
towards a socket wait until the bytes the kernel redirected to it have reached it (its
``tcpi_bytes_acked`` + ``SIOCOUTQ`` against the redirected count). A direction whose
receiver lags OFFLOAD_LIMIT bytes behind (raised every OFFLOAD_TICK) is handed back to user
space for good, after those bytes have drained: the kernel does not bound what it queues
for a slow receiver. Byte counters and the idle timer add the kernel's per-direction counts.
Must not: accept connections, run listener filters or match filter chains (that is
:mod:`remora.proxy.server`), or open sockets itself (upstream connections come from
:mod:`remora.proxy.upstream`; the downstream socket is handed in).

References: Envoy ``tcp_proxy.proto`` and tcp_proxy docs (stats, ``max_connect_attempts``,
``idle_timeout`` default 1 h); spec §10.1 for the flags; Envoy's default
``per_connection_buffer_limit_bytes`` (1 MiB) for the watermarks.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import random
import select
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import cast

import xxhash

from remora.proxy import platform
from remora.proxy.bpf import Pair, SockPairs
from remora.proxy.lb import pick_weighted
from remora.proxy.model import SocketAddress, TcpProxy
from remora.proxy.stats import TCP_STATS, Stats
from remora.proxy.upstream import Host, UpstreamCluster, UpstreamError

log = logging.getLogger(__name__)

HIGH_WATERMARK = 1 << 20          # Envoy per_connection_buffer_limit_bytes default
LOW_WATERMARK = HIGH_WATERMARK // 2
IDLE_TICKS = 8                    # idle-timer checks per idle_timeout
# Kernel relay (--tcp-offload): at most OFFLOAD_LIMIT bytes redirected but not yet taken by
# the receiving socket, per direction; the limits are raised every OFFLOAD_TICK seconds.
OFFLOAD_LIMIT = HIGH_WATERMARK
OFFLOAD_TICK = 0.05
OFFLOAD_TRIES = 8                 # loop iterations to wait for empty write buffers
DRAIN_STALL = 2.0                 # give up waiting for a drain that makes no progress (s)
KERNEL, DRAINING, USER = 0, 1, 2  # a direction's relay under offload
_INET = (socket.AF_INET, socket.AF_INET6)

# Envoy's core response flags in the order they are printed (spec §10.1).
FLAG_ORDER = ("LH", "UH", "UT", "LR", "UR", "UF", "UC", "UO", "NR", "DI", "FI", "RL", "UAEX",
              "RLSE", "DC", "URX", "SI", "IH", "DPE", "UMSDR", "RFCF", "NFCF", "DT", "UPE", "NC",
              "OM", "DF")


def format_flags(flags: set[str] | frozenset[str]) -> str:
    """``%RESPONSE_FLAGS%``: the flags joined by ``,`` in Envoy's order; ``-`` if none."""
    if not flags:
        return "-"
    return ",".join(f for f in FLAG_ORDER if f in flags)


@dataclass(slots=True)
class ConnectionRecord:
    """What happened to one downstream connection (for the access log and tests)."""

    cid: int
    downstream_remote: SocketAddress | None = None
    downstream_local: SocketAddress | None = None
    listener: str = ""
    filter_chain: str = ""
    cluster: str = ""
    upstream_host: SocketAddress | None = None
    upstream_local: SocketAddress | None = None
    flags: set[str] = field(default_factory=set)
    details: str = ""
    bytes_received: int = 0   # from downstream
    bytes_sent: int = 0       # to downstream
    start: float = 0.0
    duration: float = 0.0

    def log_line(self) -> str:
        def a(x: SocketAddress | None) -> str:
            return "-" if x is None else str(x)
        return (f'[C{self.cid}] "- - -" 0 {format_flags(self.flags)} {self.details or "-"} '
                f'{self.bytes_received} {self.bytes_sent} {int(self.duration * 1000)} '
                f'"{a(self.upstream_host)}" {self.cluster or "-"} {a(self.upstream_local)} '
                f'{a(self.downstream_local)} {a(self.downstream_remote)} '
                f'listener={self.listener} chain={self.filter_chain or "-"}')


class TcpProxyFilter:
    """One configured tcp_proxy (per filter chain, per worker)."""

    def __init__(self, config: TcpProxy, clusters: Mapping[str, UpstreamCluster], stats: Stats,
                 rng: random.Random,
                 on_close: Callable[[ConnectionRecord, float], None] | None = None,
                 offload: SockPairs | None = None) -> None:
        self.on_close = on_close     # access logs / Istio TCP metrics, with the loop's time
        self.offload = offload       # the kernel relay's maps, when loaded
        self.config = config
        self.clusters = clusters
        self.stats = stats
        self.rng = rng
        scope = f"tcp.{config.stat_prefix}."
        self.s = {name: scope + name for name, _ in TCP_STATS}
        for name, kind in TCP_STATS:
            stats.declare(scope + name, kind)
        self._weights = [w.weight for w in config.weighted_clusters]
        self.live: set[_Session] = set()   # sessions relaying (their bytes may be unflushed)
        self.offloaded: set[_Session] = set()   # sessions relayed by the kernel
        self.to_offload: set[_Session] = set()  # busy when last tried: tried again per tick
        self._ticker: asyncio.TimerHandle | None = None
        self._watch: select.epoll | None = None     # offloaded sockets' hang-ups and errors
        self._watched: dict[int, _Half] = {}
        self.stat_offloaded = scope + "offloaded"
        if offload is not None:
            stats.declare(self.stat_offloaded, "counter")

    def _tick(self, loop: asyncio.AbstractEventLoop) -> None:
        self._ticker = None
        for session in list(self.offloaded):
            session.refresh_limits()
        for session in list(self.to_offload):
            session.try_offload(1)
        self.start_ticker(loop)

    def watch(self, fd: int, half: _Half, loop: asyncio.AbstractEventLoop) -> None:
        """Call ``half.session.unpark(half)`` when ``fd`` sees EOF, a reset or an error.
        Unlike the loop's reader, this epoll set does not wake on data (the kernel relay's
        every skb would wake the loop for nothing)."""
        if self._watch is None:
            self._watch = select.epoll()
            loop.add_reader(self._watch.fileno(), self._on_watch)
        if fd in self._watched:
            self.unwatch(fd, self._watched[fd])
        self._watch.register(fd, select.EPOLLRDHUP | select.EPOLLHUP | select.EPOLLERR)
        self._watched[fd] = half

    def unwatch(self, fd: int, half: _Half) -> None:
        if self._watched.get(fd) is half and self._watch is not None:
            del self._watched[fd]
            with contextlib.suppress(OSError):
                self._watch.unregister(fd)

    def _on_watch(self) -> None:
        assert self._watch is not None
        for fd, _ in self._watch.poll(0):
            half = self._watched.pop(fd, None)
            with contextlib.suppress(OSError):
                self._watch.unregister(fd)
            if half is not None and not half.lost:     # (a lost half may be released)
                half.session.unpark(half)

    def start_ticker(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._ticker is None and (self.offloaded or self.to_offload):
            self._ticker = loop.call_later(OFFLOAD_TICK, self._tick, loop)

    def flush_stats(self) -> None:
        """Fold the byte counts of open connections into the stat store (before a read)."""
        for session in self.live:
            session.flush_bytes()

    def choose_cluster(self) -> UpstreamCluster | None:
        if self.config.cluster:
            return self.clusters.get(self.config.cluster)
        i = pick_weighted(self._weights, self.rng)
        if i is None:
            return None
        return self.clusters.get(self.config.weighted_clusters[i].name)

    async def handle(self, sock: socket.socket, record: ConnectionRecord, *,
                     restored: SocketAddress | None, initial: bytes = b"",
                     loop: asyncio.AbstractEventLoop | None = None) -> None:
        """Proxy ``sock`` (already accepted; its first ``initial`` bytes were read by the
        listener filters) until both sides are closed. Closes ``sock`` in every case.
        ``loop``: the running loop, when the caller has it at hand."""
        if self.on_close is None:
            await self._handle(sock, record, restored=restored, initial=initial, loop=loop)
            return
        loop = loop or asyncio.get_running_loop()
        try:
            await self._handle(sock, record, restored=restored, initial=initial, loop=loop)
        finally:
            try:
                self.on_close(record, loop.time())
            except Exception:
                log.exception("[C%d] access log / stats failed", record.cid)

    async def _handle(self, sock: socket.socket, record: ConnectionRecord, *,
                      restored: SocketAddress | None, initial: bytes,
                      loop: asyncio.AbstractEventLoop | None) -> None:
        st, s = self.stats, self.s
        st.inc(s["downstream_cx_total"])
        cluster = self.choose_cluster()
        if cluster is None:
            st.inc(s["downstream_cx_no_route"])
            record.flags.add("NC")
            sock.close()
            return
        record.cluster = cluster.name
        session = _Session(self, cluster, record, loop or asyncio.get_running_loop())
        attempts = 0
        upstream: asyncio.Transport | None = None
        hash_key = None
        remote = record.downstream_remote
        if self.config.hash_source_ip and remote is not None:
            # Envoy's tcp_proxy hash policy: xxHash64 of the downstream IP
            hash_key = xxhash.xxh64_intdigest(remote.address.encode())
        while upstream is None:
            host = cluster.pick(restored, hash_key)
            if host is None:
                st.inc(cluster.stat("upstream_cx_none_healthy"))
                record.flags.add("UH")
                record.details = "no_healthy_upstream"
                sock.close()
                return
            record.upstream_host = host.address
            attempts += 1
            try:
                upstream, _ = await cluster.connect(host, session.upstream_protocol,
                                                    session.loop)
            except UpstreamError as exc:
                record.flags.add(exc.flag)
                record.details = exc.detail
                if exc.flag == "UF" and attempts < self.config.max_connect_attempts:
                    continue
                if exc.flag == "UF":
                    st.inc(cluster.stat("upstream_cx_connect_attempts_exceeded"))
                    record.flags.add("URX")
                sock.close()
                return
            except BaseException:
                sock.close()
                raise
            session.host = host
        record.flags.discard("UF")  # a retry succeeded: not a failure of this connection
        record.details = ""
        await session.run(sock, initial)


class _Half(asyncio.Protocol):
    """One side's protocol; ``peer`` is the other side. ``DIR``: the offload direction whose
    bytes this side reads (0 downstream → upstream, 1 upstream → downstream)."""

    DIR = 0

    __slots__ = ("data_received", "lost", "paused", "peer", "read_eof", "rx", "session", "sock",
                 "transport", "write", "write_paused")

    transport: asyncio.Transport
    peer: _Half
    write: Callable[[bytes], None]    # the other side's transport.write
    # What the transport calls with each chunk read (it looks this up when the protocol is
    # set): self.relay, or the other side's transport.write itself (see the module's notes).
    data_received: Callable[[bytes], None]  # type: ignore[assignment]  # a slot, not a method
    # release() deletes these; mypyc needs the list should this module be compiled again
    # (remora.native leaves it interpreted today)
    __deletable__ = ("data_received", "peer", "session", "write")

    def __init__(self, session: _Session) -> None:
        self.session = session
        self.read_eof = False
        self.lost = False
        self.paused = False          # our reading is paused (the peer's buffer is full)
        self.write_paused = False    # our transport's write buffer is above the watermark
        self.rx = 0                  # bytes read from this side (and written to the other)
        # The socket whose kernel counts replace rx while the chunks bypass relay(); rx then
        # holds the last count read, and the final one once the side is closed.
        self.sock: socket.socket | None = None
        self.data_received = self.relay

    def read_count(self) -> int:
        """Bytes read from this side so far (and written to the other)."""
        sock = self.sock
        if sock is not None and not self.lost:
            with contextlib.suppress(OSError):
                self.rx = platform.tcp_read(sock, eof=self.read_eof)
        return self.rx

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not derive from asyncio.Transport; they implement it.
        self.transport = cast(asyncio.Transport, transport)
        self.transport.set_write_buffer_limits(high=HIGH_WATERMARK, low=LOW_WATERMARK)

    def relay(self, data: bytes) -> None:
        self.write(data)
        self.rx += len(data)

    def eof_received(self) -> bool:
        if self.read_eof:
            return True
        self.read_eof = True
        if self.session.pair is not None:
            self.session.offload_eof(self)
            return True
        peer = self.peer
        if not peer.lost and not peer.transport.is_closing():
            peer.transport.write_eof()
        if peer.read_eof:
            self.session.close_both(last=self)
        return True  # keep our write direction open until the peer's EOF

    def pause_writing(self) -> None:
        # our write buffer is full: stop reading from the other side
        self.write_paused = True
        peer = self.peer
        if not peer.read_eof and not peer.lost and not peer.transport.is_closing():
            peer.paused = True
            peer.transport.pause_reading()
            self._paused_peer(True)

    def resume_writing(self) -> None:
        self.write_paused = False
        peer = self.peer
        if peer.paused:
            peer.paused = False
            if not peer.read_eof and not peer.lost and not peer.transport.is_closing():
                peer.transport.resume_reading()
                self._paused_peer(False)

    def _paused_peer(self, paused: bool) -> None:
        raise NotImplementedError

    def connection_lost(self, exc: Exception | None) -> None:
        # The socket is still open here (the transport closes it after this call): take the
        # final byte count before it goes.
        self.read_count()
        self.sock = None
        self.lost = True
        self.session.half_lost(self, exc)

    def release(self) -> None:
        """Both sides are closed: drop the links to the other side (its protocol, its
        transport's write) so the pair is freed by reference counting, not left to the cycle
        collector (about 30 objects per connection)."""
        with contextlib.suppress(AttributeError):
            del self.peer
        with contextlib.suppress(AttributeError):     # unset when the upstream never connected
            del self.write
        with contextlib.suppress(AttributeError):
            del self.data_received
        with contextlib.suppress(AttributeError):
            del self.session


class _Early:
    """Stands in for the downstream transport between the upstream connect and the wrapping
    of the downstream socket: keeps what the upstream sends meanwhile (server-first
    protocols), pausing the upstream past the high watermark."""

    __slots__ = ("chunks", "closed", "eof", "size", "up")

    def __init__(self, up: _Upstream) -> None:
        self.up = up
        self.chunks: list[bytes] = []
        self.size = 0
        self.eof = False
        self.closed = False

    def write(self, data: bytes) -> None:
        self.chunks.append(data)
        self.size += len(data)
        if self.size > HIGH_WATERMARK and not self.up.paused:
            self.up.paused = True
            self.up.transport.pause_reading()

    def write_eof(self) -> None:
        self.eof = True

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.closed = True

    def pause_reading(self) -> None:
        """Nothing is read from the downstream before it is wrapped."""

    def resume_reading(self) -> None:
        """See :meth:`pause_reading`."""


class _Downstream(_Half):
    __slots__ = ("real",)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # Keep the stand-in as `transport` until _take_over_early has flushed what it kept:
        # upstream bytes, EOF or close arriving before then must queue behind those bytes.
        self.real = cast(asyncio.Transport, transport)
        self.real.set_write_buffer_limits(high=HIGH_WATERMARK, low=LOW_WATERMARK)

    def _paused_peer(self, paused: bool) -> None:
        # downstream's write buffer is full → upstream reading paused/resumed
        sess = self.session
        sess.filter.stats.inc(sess.cluster.stat(
            "upstream_flow_control_paused_reading_total" if paused
            else "upstream_flow_control_resumed_reading_total"))


class _Upstream(_Half):
    __slots__ = ()
    DIR = 1

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self.peer.write = self.transport.write

    def _paused_peer(self, paused: bool) -> None:
        # upstream's write buffer is full → downstream reading paused/resumed
        s = self.session.filter.s
        self.session.filter.stats.inc(
            s["downstream_flow_control_paused_reading_total"] if paused
            else s["downstream_flow_control_resumed_reading_total"])


class _Session:
    """The relay of one connection pair."""

    __slots__ = ("_base", "_drain_polls", "_dsock", "_fds", "_flushed_down", "_flushed_up", "_held",
                 "_idle", "_idle_last", "_idle_seen", "_state", "_usock", "_waiting", "cluster",
                 "done", "down", "early", "filter", "host", "loop", "pair", "record", "up",
                 "upstream_closed_locally")

    def __init__(self, flt: TcpProxyFilter, cluster: UpstreamCluster, record: ConnectionRecord,
                 loop: asyncio.AbstractEventLoop) -> None:
        self.filter = flt
        self.cluster = cluster
        self.record = record
        self.loop = loop
        self.down = _Downstream(self)
        self.up = _Upstream(self)
        self.down.peer, self.up.peer = self.up, self.down
        self.early = _Early(self.up)
        self.down.transport = cast(asyncio.Transport, self.early)
        self.up.write = self.early.write
        self.host: Host | None = None
        self.done: asyncio.Future[None] = loop.create_future()
        self.upstream_closed_locally = False
        self._flushed_down = 0      # down.rx / up.rx already added to the counters
        self._flushed_up = 0
        self._idle: asyncio.TimerHandle | None = None
        self._idle_last = 0.0       # when the idle timer last saw bytes move
        self._idle_seen = 0         # down.rx + up.rx at that time
        # kernel relay (offload): the pair, and per direction (0: down → up, 1: up → down)
        self.pair: Pair | None = None
        self._dsock: socket.socket | None = None
        self._usock: socket.socket | None = None
        self._base = [0, 0]         # bytes the receiving socket had been handed at pairing
        self._fds = (-1, -1)        # the paired sockets' fds (watched for EOF and errors)
        self._state = [KERNEL, KERNEL]
        self._held: tuple[list[bytes], list[bytes]] = ([], [])
        self._waiting: tuple[list[Callable[[], None]], list[Callable[[], None]]] = ([], [])
        self._drain_polls: list[tuple[int, float] | None] = [None, None]   # (pending, since)

    def rx_down(self) -> int:
        """Bytes read from downstream so far (user space and kernel)."""
        pair = self.pair
        return self.down.read_count() if pair is None else self.down.rx + pair.bytes(0)

    def rx_up(self) -> int:
        pair = self.pair
        return self.up.read_count() if pair is None else self.up.rx + pair.bytes(1)

    def flush_bytes(self) -> None:
        """Add the bytes relayed since the last flush to the stat store."""
        stats = self.filter.stats
        rx = self.rx_down()
        n = rx - self._flushed_down
        if n:
            self._flushed_down = rx
            stats.inc(self.filter.s["downstream_cx_rx_bytes_total"], n)
            stats.inc(self.cluster.stat("upstream_cx_tx_bytes_total"), n)
        rx = self.rx_up()
        n = rx - self._flushed_up
        if n:
            self._flushed_up = rx
            stats.inc(self.cluster.stat("upstream_cx_rx_bytes_total"), n)
            stats.inc(self.filter.s["downstream_cx_tx_bytes_total"], n)

    def upstream_protocol(self) -> _Upstream:
        return self.up

    def downstream_protocol(self) -> _Downstream:
        return self.down

    def _bypass_downstream(self, sock: socket.socket) -> None:
        """Unless the kernel relay may take over, have the downstream's chunks go straight
        to the upstream's transport (the module's notes; the upstream's follow in
        _take_over_early), both sides counted by their sockets."""
        up = self.up
        if self.filter.offload is not None or up.lost or sock.family not in _INET:
            return
        usock = up.transport.get_extra_info("socket")
        if usock is None or usock.family not in _INET:
            return
        self.down.sock, up.sock = sock, usock    # (up: those relayed so far included)
        self.down.data_received = self.down.write

    async def run(self, sock: socket.socket, initial: bytes) -> None:
        """Wrap the downstream socket, start relaying, return when both sides are closed."""
        live = self.filter.live
        live.add(self)
        try:
            self._bypass_downstream(sock)
            try:
                await self.loop.connect_accepted_socket(self.downstream_protocol, sock)
            except OSError:
                sock.close()
                self.down.lost = True
                self.abort()
                if self.up.lost:
                    self._finish()
                raise
            with contextlib.suppress(OSError, AttributeError, TypeError):
                local = self.up.transport.get_extra_info("sockname")
                if local:
                    self.record.upstream_local = SocketAddress(address=str(local[0]),
                                                               port=int(local[1]))
            self._take_over_early()
            if initial and not self.up.lost and not self.up.transport.is_closing():
                self.down.data_received(initial)
            if self.filter.offload is not None:
                self._dsock = sock
                self.try_offload(OFFLOAD_TRIES)
            idle = self.filter.config.idle_timeout
            if idle:
                now = self.loop.time()
                self._idle_last = now
                self._idle_seen = self.rx_down() + self.rx_up()
                self._idle = self.loop.call_at(now + idle / IDLE_TICKS, self._check_idle, idle)
            await self.done
        except BaseException:
            # cancelled (drain deadline) or a bug: never leave either side open
            self.abort()
            raise
        finally:
            if self._idle is not None:
                self._idle.cancel()
            live.discard(self)
            self.filter.to_offload.discard(self)
            self.flush_bytes()
            self.record.bytes_received = self.rx_down()
            self.record.bytes_sent = self.rx_up()
            if self.pair is not None:
                self._unpair()
            if self.down.lost and self.up.lost:
                self.down.release()
                self.up.release()

    def _take_over_early(self) -> None:
        """The real downstream transport replaces the stand-in, in one step: send what it
        kept, then what followed (EOF, close), and resume the upstream only if the
        downstream's buffer has room."""
        early = self.early
        down = self.down.transport = self.down.real
        up = self.up
        up.write = down.write
        if self.down.lost:
            early.chunks.clear()
            return
        if up.sock is not None and not up.transport.is_closing():   # (None once lost)
            # Chunks from upstream go straight to the downstream's transport from now on.
            up.data_received = down.write
            up.transport.set_protocol(up)    # the transport looks data_received up again
        for chunk in early.chunks:
            down.write(chunk)
        early.chunks.clear()
        if early.closed:        # the upstream is already gone
            down.close()
            return
        if early.eof:
            down.write_eof()
        if self.up.paused and not self.up.lost and not self.down.write_paused:
            self.up.paused = False
            self.up.transport.resume_reading()

    # ------------------------------------------------------------------ kernel relay

    def try_offload(self, tries: int) -> None:
        """Hand the relay to the kernel (BPF sockmap, :mod:`remora.proxy.bpf`) if nothing
        user space holds could be overtaken or repeated: both write buffers empty, nothing
        unread on either socket, no EOF yet, plain IPv4 sockets, not transparent (TPROXY).
        Retried for a few loop iterations while a write buffer (the sniffed ``initial``
        bytes, a server-first upstream's first bytes) drains or bytes are being read, then
        once per tick while the connection lasts (a bulk sender keeps it in user space)."""
        sp = self.filter.offload
        down, up = self.down, self.up
        self.filter.to_offload.discard(self)
        if (sp is None or self.pair is not None or self.done.done() or down.lost or up.lost
                or down.read_eof or up.read_eof or down.paused or up.paused):
            return
        dt, ut = down.transport, up.transport
        if dt.is_closing() or ut.is_closing():
            return
        dsock = dt.get_extra_info("socket")
        usock = ut.get_extra_info("socket")
        if (dsock is None or usock is None or dsock.family != socket.AF_INET
                or usock.family != socket.AF_INET or platform.is_transparent(dsock)):
            return
        try:
            # The kernel relay takes whole skbs from the receive queue: one that user space
            # has read part of would be sent again. With nothing unread, whatever arrives
            # from now on is whole (user space reads nothing before the pairing below).
            busy = (dt.get_write_buffer_size() or ut.get_write_buffer_size()
                    or platform.unread_bytes(dsock) or platform.unread_bytes(usock))
        except OSError:
            return
        if busy:
            if tries > 1:
                self.loop.call_soon(self.try_offload, tries - 1)
            else:
                self.filter.to_offload.add(self)
                self.filter.start_ticker(self.loop)
            return
        try:
            base = [platform.tcp_written(usock), platform.tcp_written(dsock)]
            pair = sp.pair(dsock, usock, OFFLOAD_LIMIT)
        except OSError as exc:
            log.debug("[C%d] tcp offload not used: %s", self.record.cid, exc)
            return
        if pair is None:
            return      # every slot in use
        self.pair = pair
        self._dsock, self._usock, self._base = dsock, usock, base
        down.write = functools.partial(self._passed, 0)
        up.write = functools.partial(self._passed, 1)
        flt = self.filter
        flt.stats.inc(flt.stat_offloaded)
        flt.offloaded.add(self)
        flt.start_ticker(self.loop)
        # Stop reading: the loop would wake for every skb the kernel relays. EOF, resets and
        # errors come through the filter's watch; a direction stopped at its limit, through
        # the tick (refresh_limits).
        self._fds = (dsock.fileno(), usock.fileno())
        for half, fd in zip((down, up), self._fds, strict=True):
            flt.watch(fd, half, self.loop)
            half.transport.pause_reading()
            # An skb that arrived between the unread check and the pairing waits for the next
            # one (a request/response peer may send none): have the kernel run it now.
            platform.peek_nowait(fd)

    def unpark(self, half: _Half) -> None:
        """Read ``half`` in user space again (its EOF, its error, or bytes the kernel passed
        to user space)."""
        if (not half.lost and not half.read_eof and not half.paused
                and not half.transport.is_closing()
                and self._state[half.DIR] != DRAINING):
            half.transport.resume_reading()

    def _pending(self, d: int) -> int:
        """Bytes the kernel has redirected in direction ``d`` that the receiving socket has
        not been handed yet (0 once that direction is back in user space)."""
        pair = self.pair
        if pair is None or self._state[d] == USER:
            return 0
        dst, sock = (self.up, self._usock) if d == 0 else (self.down, self._dsock)
        if dst.lost or sock is None or dst.transport.is_closing():
            return 0
        try:
            written = platform.tcp_written(sock) - self._base[d]
        except OSError:
            return 0
        return max(0, pair.bytes(d) - written)

    def _after_drain(self, d: int, action: Callable[[], None]) -> None:
        """Run ``action`` once direction ``d``'s redirected bytes have reached the receiving
        socket (EOF and close must not overtake them), in order with earlier actions."""
        waiting = self._waiting[d]
        if not waiting and self._pending(d) == 0:
            action()
            return
        waiting.append(action)
        if self._drain_polls[d] is None:
            self._drain_polls[d] = (-1, self.loop.time())
            self.loop.call_soon(self._poll_drain, d, 0)

    def _poll_drain(self, d: int, polls: int) -> None:
        pending = self._pending(d)
        if pending and not self.done.done():
            now = self.loop.time()
            last, since = self._drain_polls[d] or (-1, now)
            if pending != last:
                self._drain_polls[d] = (pending, now)
            elif now - since > DRAIN_STALL:
                log.warning("[C%d] tcp offload: %d bytes not drained for %.0f s; going on",
                            self.record.cid, pending, DRAIN_STALL)
                pending = 0
            if pending:
                if polls < 3:
                    self.loop.call_soon(self._poll_drain, d, polls + 1)
                else:
                    self.loop.call_later(0.001, self._poll_drain, d, polls + 1)
                return
        self._drain_polls[d] = None
        waiting = self._waiting[d]
        actions = waiting[:]
        waiting.clear()     # an action may wait again (for bytes it lets through)
        for action in actions:
            action()

    def _passed(self, d: int, data: bytes) -> None:
        """The kernel gave direction ``d``'s bytes to user space (its limit was reached: the
        receiver is slow). Hold them, stop reading, and once the redirected bytes have
        reached the receiving socket, relay that direction in user space from then on
        (with the usual flow control)."""
        self._held[d].append(data)
        if self._state[d] != KERNEL:
            return
        self._state[d] = DRAINING
        src = self.down if d == 0 else self.up
        if not src.lost and not src.transport.is_closing():
            src.transport.pause_reading()
        log.debug("[C%d] tcp offload: direction %d back to user space", self.record.cid, d)
        self._after_drain(d, functools.partial(self._to_user, d))

    def _to_user(self, d: int) -> None:
        src = self.down if d == 0 else self.up
        dst = src.peer
        self._state[d] = USER
        held = self._held[d]
        if dst.lost or dst.transport.is_closing():
            held.clear()
            return
        write = src.write = dst.transport.write
        for chunk in held:
            write(chunk)
        held.clear()
        if (not src.paused and not src.lost and not src.read_eof
                and not src.transport.is_closing()):
            src.transport.resume_reading()

    def offload_eof(self, src: _Half) -> None:
        """EOF from ``src`` while the kernel relays: pass it on once its bytes are through."""
        peer = src.peer

        def forward() -> None:
            if not peer.lost and not peer.transport.is_closing():
                peer.transport.write_eof()
            if peer.read_eof:
                self.close_both(last=src)
        self._after_drain(src.DIR, forward)

    def refresh_limits(self) -> None:
        """Per tick: let each kernel direction run OFFLOAD_LIMIT bytes past what its
        receiving socket has been handed (checked only when half its room is used)."""
        pair = self.pair
        if pair is None:
            return
        for d in (0, 1):
            if self._state[d] == KERNEL and pair.stopped(d):
                self.unpark(self.down if d == 0 else self.up)   # read what it passed us
                continue
            if self._state[d] != KERNEL or pair.limit(d) - pair.bytes(d) >= OFFLOAD_LIMIT // 2:
                continue
            sock = self._usock if d == 0 else self._dsock
            if sock is None:
                continue
            try:
                written = platform.tcp_written(sock) - self._base[d]
            except OSError:
                continue
            pair.set_limit(d, max(written, 0) + OFFLOAD_LIMIT)

    def _unpair(self) -> None:
        pair, sp = self.pair, self.filter.offload
        if pair is None or sp is None:
            return
        self.down.rx += pair.bytes(0)
        self.up.rx += pair.bytes(1)
        self.pair = None
        self.filter.offloaded.discard(self)
        for half, fd in zip((self.down, self.up), self._fds, strict=True):
            self.filter.unwatch(fd, half)
        sp.release(pair)

    def _check_idle(self, idle: float) -> None:
        now = self.loop.time()
        seen = self.rx_down() + self.rx_up()
        if seen != self._idle_seen:   # bytes moved since the last tick: active until now
            self._idle_seen = seen
            self._idle_last = now
        due = self._idle_last + idle
        if now < due:
            self._idle = self.loop.call_at(min(due, now + idle / IDLE_TICKS), self._check_idle,
                                           idle)
            return
        self._idle = None
        self.filter.stats.inc(self.filter.s["idle_timeout"])
        self.record.details = "idle_timeout"
        log.debug("[C%d] tcp_proxy idle timeout", self.record.cid)
        self.abort()

    def close_both(self, last: _Half, *, drained: bool = False) -> None:
        """Both directions have ended (``last`` sent the second EOF): close, flushing what is
        buffered. The upstream connection counts as closed by the remote if its EOF ended
        the exchange."""
        if last is self.down:
            self.upstream_closed_locally = True
        if self.pair is not None and not drained:
            self._after_drain(0, lambda: self._after_drain(
                1, lambda: self.close_both(last, drained=True)))
            return
        for half in (self.up, self.down):
            if not half.lost:
                half.transport.close()

    def abort(self) -> None:
        """Close both sides now, dropping buffered bytes (idle timeout, drain deadline)."""
        for half in (self.up, self.down):
            if not half.lost:
                if half is self.up:
                    self.upstream_closed_locally = True
                half.transport.abort()

    def half_lost(self, half: _Half, exc: Exception | None) -> None:
        peer = half.peer
        if half is self.up:
            if exc is not None and not self.upstream_closed_locally:
                self.record.flags.add("UR")
            if self.host is not None:
                self.cluster.disconnected(self.host, local=self.upstream_closed_locally)
        if not peer.lost:
            # Envoy closes the other side with FlushWrite: what it already has still goes out
            # (with the kernel relay: once the bytes it redirected have reached that socket).
            if peer is self.up:
                self.upstream_closed_locally = True
            if self.pair is not None:
                self._after_drain(half.DIR, lambda: None if peer.lost
                                  else peer.transport.close())
            else:
                peer.transport.close()
        elif not self.done.done():
            self._finish()

    def _finish(self) -> None:
        if not self.done.done():
            self.done.set_result(None)
