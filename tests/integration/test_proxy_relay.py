"""The proxy's worker on loopback sockets (no root): accept, listener filters, chain match,
tcp_proxy relay (half-close, flow control, idle timeout, resets), upstream failures (UH, UF,
UO, connect timeout), drain — under both asyncio's loop and uvloop. The relay tests also run
with the kernel relay (``relay`` = ``kernel``: the BPF sockmap of remora.proxy.bpf; skipped
when it cannot be loaded, e.g. without root).

Every wait is on an event or a condition with a deadline; nothing sleeps to synchronise.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import gc
import random
import signal
import socket
import ssl
import struct
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
import uvloop

from remora.proxy import bpf, tcp
from remora.proxy.bootstrap import compile_bootstrap, parse_bootstrap
from remora.proxy.model import Snapshot
from remora.proxy.server import Worker
from remora.proxy.tcp import HIGH_WATERMARK, IDLE_TICKS, TcpProxyFilter

# "thread": a SIGALRM cannot interrupt uvloop while it waits in epoll.
pytestmark = pytest.mark.timeout(60, method="thread")

T = TypeVar("T")
LOOPS: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {
    "asyncio": asyncio.new_event_loop, "uvloop": uvloop.new_event_loop}
TCP = "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy"
INSPECTORS = {
    "tls_inspector": "type.googleapis.com/envoy.extensions.filters.listener.tls_inspector.v3."
                     "TlsInspector",
    "http_inspector": "type.googleapis.com/envoy.extensions.filters.listener.http_inspector.v3."
                      "HttpInspector",
}
LO = "127.0.0.1"
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _ignore_sigpipe() -> Iterator[None]:
    """As in `remora proxy` (app.run_proxy): a write to a closed socket is an error, not a
    signal (cli.main, when run in-process by another test, resets SIGPIPE to die)."""
    before = signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    yield
    signal.signal(signal.SIGPIPE, before)


@pytest.fixture(params=sorted(LOOPS))
def run(request: pytest.FixtureRequest) -> Callable[[Coroutine[Any, Any, T]], T]:
    def runner(coro: Coroutine[Any, Any, T]) -> T:
        async def bounded() -> T:
            async with asyncio.timeout(30):
                return await coro
        with asyncio.Runner(loop_factory=LOOPS[request.param]) as r:
            return r.run(bounded())
    return runner


# The kernel relay's maps for the proxies a test starts (set by the ``relay`` fixture).
_OFFLOAD: list[bpf.SockPairs | None] = [None]


@pytest.fixture(params=["user", "kernel"])
def relay(request: pytest.FixtureRequest) -> Iterator[str]:
    if request.param == "user":
        yield "user"
        return
    try:
        pairs = bpf.load(capacity=64)
    except OSError as exc:
        pytest.skip(f"BPF sockmap not loadable here: {exc}")
    _OFFLOAD[0] = pairs
    try:
        yield "kernel"
    finally:
        _OFFLOAD[0] = None
        assert pairs.active == 0, "a pair was not released"
        pairs.close()


# ------------------------------------------------------------------------------ config


def tcp_chain(cluster: str, *, name: str = "", match: dict[str, Any] | None = None,
              **tcp: Any) -> dict[str, Any]:
    chain: dict[str, Any] = {"filters": [{"name": "envoy.filters.network.tcp_proxy",
                                          "typed_config": {"@type": TCP,
                                                           "stat_prefix": cluster,
                                                           "cluster": cluster, **tcp}}]}
    if name:
        chain["name"] = name
    if match:
        chain["filter_chain_match"] = match
    return chain


def listener(*chains: dict[str, Any], name: str = "l1", **extra: Any) -> dict[str, Any]:
    return {"name": name, "address": {"socket_address": {"address": LO, "port_value": 0}},
            "filter_chains": list(chains), **extra}


def cluster(name: str, *ports: int, **extra: Any) -> dict[str, Any]:
    eps = [{"endpoint": {"address": {"socket_address": {"address": LO, "port_value": p}}}}
           for p in ports]
    return {"name": name, "connect_timeout": "2s",
            "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": eps}]},
            **extra}


def snapshot(listeners: list[dict[str, Any]], clusters: list[dict[str, Any]]) -> Snapshot:
    return compile_bootstrap(parse_bootstrap(
        {"static_resources": {"listeners": listeners, "clusters": clusters}}))


@contextlib.asynccontextmanager
async def proxy(snap: Snapshot, *, drain_time: float = 5.0) -> AsyncIterator[Worker]:
    w = Worker(snap, drain_time=drain_time, rng=random.Random(0), offload=_OFFLOAD[0])
    w.bind()
    ready = asyncio.Event()
    task = asyncio.create_task(w.run(ready.set))
    await ready.wait()
    try:
        yield w
    finally:
        w.shutdown(graceful=False)
        await task


def port(w: Worker, name: str = "l1") -> int:
    return next(a.port for n, a in w.bound_addresses if n == name)


def stat(w: Worker, name: str) -> int:
    return w.stats_snapshot().value(name)


async def until(cond: Callable[[], bool], timeout: float = 5.0) -> None:
    """Wait for a condition the proxy reaches on its own (a counter, a close)."""
    async with asyncio.timeout(timeout):
        while not cond():
            await asyncio.sleep(0.005)


Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@contextlib.asynccontextmanager
async def upstream(handler: Handler) -> AsyncIterator[int]:
    tasks: set[asyncio.Task[None]] = set()

    async def wrapped(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        tasks.add(asyncio.current_task())  # type: ignore[arg-type]
        try:
            await handler(r, w)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            w.close()

    server = await asyncio.start_server(wrapped, LO, 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        for t in tasks:
            t.cancel()
        # uvloop's wait_closed also waits for the connections' transports
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(server.wait_closed(), 5)


async def echo(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
    while data := await r.read(65536):
        w.write(data)
        await w.drain()


async def read_all(r: asyncio.StreamReader) -> bytes:
    """Until EOF; a reset counts as the end too."""
    out = b""
    with contextlib.suppress(ConnectionError):
        while chunk := await r.read(65536):
            out += chunk
    return out


def free_port() -> int:
    s = socket.socket()
    s.bind((LO, 0))
    p: int = s.getsockname()[1]
    s.close()
    return p


# ------------------------------------------------------------------------------ relay


def test_no_python_code_of_the_relay_runs_per_chunk(run: Callable[..., None]) -> None:
    """User-space relay: each side's transport hands a chunk straight to the other side's
    write, so 100 round trips run no function of remora.proxy.tcp (a per-chunk callback
    would run 200 times); the byte counts, read from the kernel, are still exact."""
    tcp_file = tcp.__file__

    async def main() -> None:
        async with upstream(echo) as up, proxy(snapshot([listener(tcp_chain("c"))],
                                                        [cluster("c", up)])) as w:
            r, wr = await asyncio.open_connection(LO, port(w))
            wr.write(b"x")      # connected and relaying before counting
            assert await r.readexactly(1) == b"x"
            calls = 0

            def count(frame: Any, event: str, _arg: object) -> None:
                nonlocal calls
                if event == "call" and frame.f_code.co_filename == tcp_file:
                    calls += 1
            sys.setprofile(count)
            try:
                for _ in range(100):
                    wr.write(b"ping")
                    assert await r.readexactly(4) == b"ping"
            finally:
                sys.setprofile(None)
            assert calls == 0
            assert stat(w, "tcp.c.downstream_cx_rx_bytes_total") == 401
            assert stat(w, "cluster.c.upstream_cx_rx_bytes_total") == 401
            wr.close()
            await until(lambda: stat(w, "listener.127.0.0.1_0.downstream_cx_destroy") == 1)
            assert stat(w, "tcp.c.downstream_cx_tx_bytes_total") == 401
    run(main())


def test_echo_counts_bytes_and_connections(run: Callable[..., None], relay: str) -> None:
    async def main() -> None:
        async with upstream(echo) as up, proxy(snapshot([listener(tcp_chain("c"))],
                                                        [cluster("c", up)])) as w:
            r, wr = await asyncio.open_connection(LO, port(w))
            wr.write(b"hello")
            assert await r.readexactly(5) == b"hello"
            wr.write_eof()
            assert await read_all(r) == b""
            wr.close()
            await until(lambda: stat(w, "listener.127.0.0.1_0.downstream_cx_destroy") == 1)
            s = w.stats_snapshot()
            assert s.value("listener.127.0.0.1_0.downstream_cx_total") == 1
            assert s.value("listener.127.0.0.1_0.downstream_cx_active") == 0
            assert s.value("tcp.c.downstream_cx_total") == 1
            assert s.value("tcp.c.downstream_cx_rx_bytes_total") == 5
            assert s.value("tcp.c.downstream_cx_tx_bytes_total") == 5
            assert s.value("cluster.c.upstream_cx_total") == 1
            assert s.value("cluster.c.upstream_cx_tx_bytes_total") == 5
            assert s.value("cluster.c.upstream_cx_rx_bytes_total") == 5
            assert s.value("tcp.c.offloaded") == (relay == "kernel")
            await until(lambda: stat(w, "cluster.c.upstream_cx_active") == 0)
            host = w.cluster_status()[0].hosts[0]
            assert host.stats["cx_total"] == 1 and host.stats["rq_total"] == 1
            assert host.stats["cx_active"] == 0
    run(main())


def relay_cycle_count(loop: str) -> int:
    """Relay ten connections with the cycle collector off, then count the relay objects
    (sessions, sides) that still exist once every connection is closed: with the collector
    off, whatever reference cycles keep alive is still in gc.get_objects()."""
    async def main() -> int:
        async with upstream(echo) as up, proxy(snapshot([listener(tcp_chain("c"))],
                                                        [cluster("c", up)])) as w:
            gc.collect()
            gc.disable()
            for i in range(1, 11):
                r, wr = await asyncio.open_connection(LO, port(w))
                wr.write(b"hello")
                assert await r.readexactly(5) == b"hello"
                wr.close()
                await wr.wait_closed()
                # counted once the relay's run() has returned (its finally unlinks them)
                await until(lambda i=i: stat(
                    w, "listener.127.0.0.1_0.downstream_cx_destroy") == i)
            return sum(isinstance(o, tcp._Session | tcp._Half) for o in gc.get_objects())
    with asyncio.Runner(loop_factory=LOOPS[loop]) as r:
        return r.run(main())


@pytest.mark.parametrize("loop", sorted(LOOPS))
def test_closed_connections_leave_nothing_to_the_cycle_collector(loop: str) -> None:
    """A relayed pair (session, both sides, their transports) is freed by reference counting
    when both sides have closed; nothing of it waits for the cycle collector. Measured in a
    child process, so that switching the collector off does not shift when the rest of the
    suite's garbage is collected."""
    code = ("import sys; from tests.integration.test_proxy_relay import relay_cycle_count; "
            "print(relay_cycle_count(sys.argv[1]))")
    out = subprocess.run([sys.executable, "-c", code, loop], cwd=REPO, capture_output=True,
                         text=True, timeout=60, check=False)
    assert out.returncode == 0, out.stderr
    left = int(out.stdout.strip().splitlines()[-1])
    assert left == 0, f"{left} relay objects kept alive by reference cycles"


def test_half_close_from_the_client_keeps_the_reply_direction_open(
        run: Callable[..., None], relay: str) -> None:
    async def count_then_reply(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        data = await read_all(r)          # the client's EOF must arrive here
        w.write(b"got %d" % len(data))
        await w.drain()

    async def main() -> None:
        async with upstream(count_then_reply) as up, proxy(snapshot(
                [listener(tcp_chain("c"))], [cluster("c", up)])) as w:
            r, wr = await asyncio.open_connection(LO, port(w))
            wr.write(b"x" * 300_000)
            wr.write_eof()
            assert await read_all(r) == b"got 300000"
            wr.close()
    run(main())


def test_half_close_from_the_server_keeps_the_request_direction_open(
        run: Callable[..., None], relay: str) -> None:
    received: list[bytes] = []

    async def banner_then_listen(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        w.write(b"banner")
        w.write_eof()
        received.append(await read_all(r))

    async def main() -> None:
        async with upstream(banner_then_listen) as up, proxy(snapshot(
                [listener(tcp_chain("c"))], [cluster("c", up)])) as w:
            r, wr = await asyncio.open_connection(LO, port(w))
            assert await read_all(r) == b"banner"     # EOF seen, yet we can still send
            wr.write(b"late data")
            wr.write_eof()
            await until(lambda: bool(received))
            assert received == [b"late data"]
            wr.close()
    run(main())


def test_upstream_reset_closes_the_downstream(run: Callable[..., None], relay: str) -> None:
    async def send_then_reset(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        w.write(b"partial")
        await w.drain()
        await r.readexactly(3)
        sock = w.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        w.transport.abort()

    async def main() -> None:
        async with upstream(send_then_reset) as up, proxy(snapshot(
                [listener(tcp_chain("c"))], [cluster("c", up)])) as w:
            r, wr = await asyncio.open_connection(LO, port(w))
            assert await r.readexactly(7) == b"partial"
            wr.write(b"die")
            assert await read_all(r) == b""            # closed, not hanging
            await until(lambda: stat(w, "cluster.c.upstream_cx_destroy_remote") == 1)
            wr.close()
    run(main())


def test_downstream_reset_closes_the_upstream(run: Callable[..., None], relay: str) -> None:
    seen_eof = asyncio.Event

    async def main() -> None:
        done = seen_eof()

        async def wait_eof(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            await read_all(r)
            done.set()

        async with upstream(wait_eof) as up, proxy(snapshot(
                [listener(tcp_chain("c"))], [cluster("c", up)])) as w:
            _r, wr = await asyncio.open_connection(LO, port(w))
            wr.write(b"x")
            await wr.drain()
            await until(lambda: stat(w, "cluster.c.upstream_cx_total") == 1)
            sock = wr.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            wr.transport.abort()
            await done.wait()
            await until(lambda: stat(w, "cluster.c.upstream_cx_destroy_local") == 1)
    run(main())


def test_slow_reader_does_not_make_the_proxy_buffer_everything(
        run: Callable[..., None], relay: str) -> None:
    total = 64 * 1024 * 1024
    chunk = b"z" * 65536
    sent = [0]

    async def firehose(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        while sent[0] < total:
            w.write(chunk)
            await w.drain()
            sent[0] += len(chunk)
        w.write_eof()
        await read_all(r)

    async def stalled(timeout: float = 10.0) -> None:
        """The sender has made no progress for a while (everything is full)."""
        last, still = -1, 0
        async with asyncio.timeout(timeout):
            while still < 20:
                await asyncio.sleep(0.01)
                still = still + 1 if sent[0] == last else 0
                last = sent[0]

    async def main() -> None:
        async with upstream(firehose) as up, proxy(snapshot(
                [listener(tcp_chain("c"))], [cluster("c", up)])) as w:
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
            sock.connect((LO, port(w)))
            sock.setblocking(False)
            r, wr = await asyncio.open_connection(sock=sock)
            r._limit = 65536   # the stream reader buffers at most ~2x this before pausing
            await stalled()
            # kernel buffers (a few MB each way on loopback) + the proxy's watermark
            assert sent[0] < 24 * 1024 * 1024, sent[0]
            # In user space the proxy paused reading the upstream. The kernel relay may stall
            # before its byte limit passes the direction to user space (the downstream's send
            # buffer and the bounded redirect queue full): the bound above holds either way.
            if relay == "user":
                assert stat(w, "cluster.c.upstream_flow_control_paused_reading_total") >= 1
            got = 0
            while data := await r.read(1 << 20):
                got += len(data)
            assert got == total
            if relay == "user":
                assert stat(w, "cluster.c.upstream_flow_control_resumed_reading_total") >= 1
            assert stat(w, "tcp.c.downstream_cx_tx_bytes_total") == total
            wr.close()
    run(main())
    assert HIGH_WATERMARK == 1 << 20


def test_idle_timeout_closes_both_sides(run: Callable[..., None], relay: str) -> None:
    async def main() -> None:
        server_saw_eof = asyncio.Event()

        async def idle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            await read_all(r)
            server_saw_eof.set()

        async with upstream(idle) as up, proxy(snapshot(
                [listener(tcp_chain("c", idle_timeout="0.2s"))], [cluster("c", up)])) as w:
            r, wr = await asyncio.open_connection(LO, port(w))
            wr.write(b"ping")
            t0 = asyncio.get_running_loop().time()
            assert await read_all(r) == b""
            assert asyncio.get_running_loop().time() - t0 >= 0.15
            await server_saw_eof.wait()
            assert stat(w, "tcp.c.idle_timeout") == 1
            wr.close()
    run(main())


def test_byte_counters_exact_while_the_connection_is_open(
        run: Callable[..., None], relay: str) -> None:
    """The relay counts bytes per connection and folds them in when the stats are read:
    every read, mid-connection included, is exact, and a reset drops what came before."""
    async def main() -> None:
        async with upstream(echo) as up, proxy(snapshot([listener(tcp_chain("c"))],
                                                        [cluster("c", up)])) as w:
            r, wr = await asyncio.open_connection(LO, port(w))
            sent = 0
            for size in (1, 7, 1000, 70000):
                wr.write(b"x" * size)
                sent += size
                assert len(await r.readexactly(size)) == size
                s = w.stats_snapshot()
                for name in ("tcp.c.downstream_cx_rx_bytes_total",
                             "tcp.c.downstream_cx_tx_bytes_total",
                             "cluster.c.upstream_cx_tx_bytes_total",
                             "cluster.c.upstream_cx_rx_bytes_total"):
                    assert s.value(name) == sent, name
            w.reset_counters()
            assert stat(w, "tcp.c.downstream_cx_rx_bytes_total") == 0
            wr.write(b"abc")
            assert await r.readexactly(3) == b"abc"
            assert stat(w, "tcp.c.downstream_cx_rx_bytes_total") == 3
            wr.write_eof()
            assert await read_all(r) == b""
            wr.close()
            await until(lambda: stat(w, "listener.127.0.0.1_0.downstream_cx_destroy") == 1)
            s = w.stats_snapshot()   # after the close: counted once, not twice
            assert s.value("tcp.c.downstream_cx_rx_bytes_total") == 3
            assert s.value("cluster.c.upstream_cx_rx_bytes_total") == 3
    run(main())


def test_idle_timeout_counts_from_the_last_byte(run: Callable[..., None], relay: str) -> None:
    """Traffic in either direction keeps the connection open; it closes idle_timeout (plus
    at most one timer tick) after the last byte, never before."""
    async def main() -> None:
        async with upstream(echo) as up, proxy(snapshot(
                [listener(tcp_chain("c", idle_timeout="0.3s"))], [cluster("c", up)])) as w:
            loop = asyncio.get_running_loop()
            r, wr = await asyncio.open_connection(LO, port(w))
            for i in range(7):   # 0.6 s of traffic, longer than the idle timeout
                if i:
                    await asyncio.sleep(0.1)
                wr.write(b"ping")
                assert await r.readexactly(4) == b"ping"
            last = loop.time()   # just after the last byte went both ways
            assert await read_all(r) == b""
            waited = loop.time() - last
            assert 0.3 - 0.02 <= waited < 0.3 * (1 + 1 / IDLE_TICKS) + 0.25, waited
            assert stat(w, "tcp.c.idle_timeout") == 1
            wr.close()
    run(main())


def test_kernel_relay_carries_the_bytes_and_the_counters(
        run: Callable[..., None], relay: str) -> None:
    """With the sockmap, the bytes of a plain connection never reach Python; the counters
    come from the kernel's per-direction counts, exact while the connection is open."""
    if relay != "kernel":
        pytest.skip("kernel relay only")

    async def main() -> None:
        async with upstream(echo) as up, proxy(snapshot([listener(tcp_chain("c"))],
                                                        [cluster("c", up)])) as w:
            r, wr = await asyncio.open_connection(LO, port(w))
            await until(lambda: stat(w, "tcp.c.offloaded") == 1)
            flt = next(f for f in w._filters.values() if isinstance(f, TcpProxyFilter))
            session = next(iter(flt.offloaded))
            assert session.pair is not None
            sent = 0
            for size in (1, 1000, 200_000):
                wr.write(b"k" * size)
                sent += size
                assert len(await r.readexactly(size)) == size
                assert stat(w, "tcp.c.downstream_cx_rx_bytes_total") == sent
                assert stat(w, "cluster.c.upstream_cx_rx_bytes_total") == sent
            assert session.down.rx == session.up.rx == 0      # nothing went through Python
            assert session.pair.bytes(0) == session.pair.bytes(1) == sent
            wr.write_eof()
            assert await read_all(r) == b""
            wr.close()
            await until(lambda: stat(w, "listener.127.0.0.1_0.downstream_cx_destroy") == 1)
            assert not flt.offloaded
            assert stat(w, "tcp.c.downstream_cx_tx_bytes_total") == sent
    run(main())


# ------------------------------------------------------------------------------ failures


async def closed_at_once(w: Worker) -> None:
    r, wr = await asyncio.open_connection(LO, port(w))
    wr.write(b"hello?")
    assert await read_all(r) == b""
    wr.close()


def test_cluster_without_endpoints_closes_the_connection_uh(run: Callable[..., None]) -> None:
    async def main() -> None:
        snap = snapshot([listener(tcp_chain("BlackHoleCluster"))],
                        [{"name": "BlackHoleCluster", "type": "STATIC"}])
        async with proxy(snap) as w:
            await closed_at_once(w)
            await until(lambda: stat(w, "cluster.BlackHoleCluster.upstream_cx_none_healthy")
                        == 1)
            assert stat(w, "tcp.BlackHoleCluster.downstream_cx_total") == 1
            assert stat(w, "cluster.BlackHoleCluster.upstream_cx_total") == 0
    run(main())


def test_connection_refused_is_uf_with_stats(run: Callable[..., None]) -> None:
    async def main() -> None:
        dead = free_port()
        async with proxy(snapshot([listener(tcp_chain("c"))], [cluster("c", dead)])) as w:
            await closed_at_once(w)
            await until(lambda: stat(w, "cluster.c.upstream_cx_connect_fail") == 1)
            assert stat(w, "cluster.c.upstream_cx_connect_attempts_exceeded") == 1
            assert stat(w, "cluster.c.upstream_cx_total") == 1
            assert stat(w, "cluster.c.upstream_cx_active") == 0
            assert w.cluster_status()[0].hosts[0].stats["cx_connect_fail"] == 1
    run(main())


def test_max_connect_attempts_retries_another_host(run: Callable[..., None]) -> None:
    async def main() -> None:
        dead = free_port()
        async with upstream(echo) as up, proxy(snapshot(
                [listener(tcp_chain("c", max_connect_attempts=2))],
                [cluster("c", dead, up)])) as w:
            for _ in range(4):
                r, wr = await asyncio.open_connection(LO, port(w))
                wr.write(b"ok")
                assert await r.readexactly(2) == b"ok"
                wr.close()
            assert stat(w, "cluster.c.upstream_cx_connect_fail") >= 1
            assert stat(w, "cluster.c.upstream_cx_connect_attempts_exceeded") == 0
    run(main())


def test_connect_timeout(run: Callable[..., None]) -> None:
    async def main() -> None:
        # A listener whose accept queue is full drops SYNs: connects hang.
        full = socket.socket()
        full.bind((LO, 0))
        full.listen(0)
        fp = full.getsockname()[1]
        fillers = []
        try:
            for _ in range(8):
                s = socket.socket()
                s.setblocking(False)
                err = s.connect_ex((LO, fp))
                fillers.append(s)
                assert err in (0, errno.EINPROGRESS)
            snap = snapshot([listener(tcp_chain("c"))],
                            [cluster("c", fp, connect_timeout="0.3s")])
            async with proxy(snap) as w:
                await closed_at_once(w)
                assert stat(w, "cluster.c.upstream_cx_connect_timeout") == 1
                assert stat(w, "cluster.c.upstream_cx_connect_fail") == 1
        finally:
            for s in fillers:
                s.close()
            full.close()
    run(main())


def test_circuit_breaker_overflow_is_uo(run: Callable[..., None]) -> None:
    async def main() -> None:
        limits = {"circuit_breakers": {"thresholds": [{"max_connections": 1}]}}
        async with upstream(echo) as up, proxy(snapshot(
                [listener(tcp_chain("c"))], [cluster("c", up, **limits)])) as w:
            r1, w1 = await asyncio.open_connection(LO, port(w))
            w1.write(b"a")
            assert await r1.readexactly(1) == b"a"
            await closed_at_once(w)
            assert stat(w, "cluster.c.upstream_cx_overflow") == 1
            w1.write(b"b")                        # the first one is unaffected
            assert await r1.readexactly(1) == b"b"
            w1.close()
    run(main())


def test_upstream_bind_source(run: Callable[..., None]) -> None:
    peers: list[str] = []

    async def who(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        peers.append(w.get_extra_info("peername")[0])
        w.write(b"hi")
        await w.drain()

    async def main() -> None:
        bind = {"upstream_bind_config": {"source_address": {"address": "127.0.0.6",
                                                            "port_value": 0}}}
        async with upstream(who) as up, proxy(snapshot(
                [listener(tcp_chain("c"))], [cluster("c", up, **bind)])) as w:
            r, wr = await asyncio.open_connection(LO, port(w))
            assert await r.readexactly(2) == b"hi"
            wr.close()
    run(main())
    assert peers == ["127.0.0.6"]


# ------------------------------------------------------------------------------ listener side


def test_no_matching_filter_chain_closes_nr(run: Callable[..., None]) -> None:
    async def main() -> None:
        snap = snapshot([listener(tcp_chain("c", match={"destination_port": 1}))],
                        [cluster("c", free_port())])
        async with proxy(snap) as w:
            await closed_at_once(w)
            await until(lambda: stat(w, "listener.127.0.0.1_0.no_filter_chain_match") == 1)
            assert stat(w, "listener.127.0.0.1_0.downstream_cx_total") == 0
    run(main())


def _inspecting(timeout: str, cont: bool, *chains: dict[str, Any],
                default: dict[str, Any] | None = None) -> dict[str, Any]:
    extra: dict[str, Any] = {
        "listener_filters": [{"name": n, "typed_config": {"@type": t}}
                             for n, t in INSPECTORS.items()],
        "listener_filters_timeout": timeout,
        "continue_on_listener_filters_timeout": cont}
    if default is not None:
        extra["default_filter_chain"] = default
    return listener(*chains, **extra)


def _tagged(tag: bytes) -> Handler:
    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        data = await r.readuntil(b"\n") if tag != b"tls" else await r.read(65536)
        w.write(tag + b":" + data)
        await w.drain()
    return handler


def test_http_inspector_picks_the_http_chain_and_forwards_the_peeked_bytes(
        run: Callable[..., None]) -> None:
    async def main() -> None:
        async with upstream(_tagged(b"http")) as hp, upstream(_tagged(b"tcp")) as tp:
            snap = snapshot([_inspecting("5s", True, tcp_chain("http", match={
                "application_protocols": ["http/1.1", "h2c"]}), default=tcp_chain("tcp"))],
                [cluster("http", hp), cluster("tcp", tp)])
            async with proxy(snap) as w:
                r, wr = await asyncio.open_connection(LO, port(w))
                wr.write(b"GET /x HTTP/1.1\r\n")
                assert await r.readuntil(b"\n") == b"http:GET /x HTTP/1.1\r\n"
                wr.close()
                r, wr = await asyncio.open_connection(LO, port(w))
                wr.write(b"hello there\n")
                assert await r.readuntil(b"\n") == b"tcp:hello there\n"
                wr.close()
    run(main())


def _client_hello(server_name: str, alpn: list[str]) -> bytes:
    ctx = ssl.create_default_context()
    ctx.set_alpn_protocols(alpn)
    obj = ctx.wrap_bio(ssl.MemoryBIO(), out := ssl.MemoryBIO(), server_hostname=server_name)
    with contextlib.suppress(ssl.SSLWantReadError):
        obj.do_handshake()
    return out.read()


def test_tls_inspector_matches_server_name(run: Callable[..., None]) -> None:
    hello = _client_hello("Foo.Example.com", ["istio-peer-exchange", "istio"])

    async def main() -> None:
        async with upstream(_tagged(b"tls")) as sp, upstream(_tagged(b"tcp")) as tp:
            snap = snapshot([_inspecting("5s", True, tcp_chain("sni", match={
                "server_names": ["foo.example.com"], "transport_protocol": "tls"}),
                default=tcp_chain("tcp"))], [cluster("sni", sp), cluster("tcp", tp)])
            async with proxy(snap) as w:
                r, wr = await asyncio.open_connection(LO, port(w))
                wr.write(hello)
                got = await r.readexactly(4 + len(hello))
                assert got == b"tls:" + hello
                wr.close()
    run(main())


def test_silent_peer_times_out_in_listener_filters(run: Callable[..., None]) -> None:
    async def main() -> None:
        async with upstream(echo) as up:
            snap = snapshot([_inspecting("0.2s", False, tcp_chain("c"))], [cluster("c", up)])
            async with proxy(snap) as w:
                r, wr = await asyncio.open_connection(LO, port(w))
                assert await read_all(r) == b""       # closed by the timeout
                wr.close()
                assert stat(w, "listener.127.0.0.1_0.downstream_pre_cx_timeout") == 1
                assert stat(w, "listener.127.0.0.1_0.downstream_pre_cx_active") == 0
                assert stat(w, "listener.127.0.0.1_0.downstream_cx_total") == 0
    run(main())


def test_silent_peer_continues_after_the_timeout_when_configured(
        run: Callable[..., None]) -> None:
    async def main() -> None:
        async with upstream(echo) as up:
            snap = snapshot([_inspecting("0.1s", True, tcp_chain("c"))], [cluster("c", up)])
            async with proxy(snap) as w:
                r, wr = await asyncio.open_connection(LO, port(w))
                await until(lambda: stat(w, "tcp.c.downstream_cx_total") == 1)
                wr.write(b"late")
                assert await r.readexactly(4) == b"late"
                wr.close()
    run(main())


def test_garbage_resets_and_silence_cost_one_connection_each(
        run: Callable[..., None]) -> None:
    async def main() -> None:
        async with upstream(echo) as up:
            snap = snapshot([_inspecting("0.3s", False, tcp_chain("c"))], [cluster("c", up)])
            async with proxy(snap) as w:
                p = port(w)
                # a reset in the middle of a ClientHello
                s = socket.create_connection((LO, p))
                s.sendall(b"\x16\x03\x01\x02\x00\x01")
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                s.close()
                # garbage that looks like TLS and is not
                r, wr = await asyncio.open_connection(LO, p)
                wr.write(b"\x16\x03\x01\x00\x05\xff\xff\xff\xff\xff\n")
                assert await r.readexactly(11) == b"\x16\x03\x01\x00\x05\xff\xff\xff\xff\xff\n"
                wr.close()
                # silence, then a normal connection still works
                _r2, w2 = await asyncio.open_connection(LO, p)
                r3, w3 = await asyncio.open_connection(LO, p)
                w3.write(b"GET / HTTP/1.0\r\n")
                assert await r3.readexactly(16) == b"GET / HTTP/1.0\r\n"
                w2.close()
                w3.close()
    run(main())


def test_accept_error_policy() -> None:
    async def main() -> None:
        w = Worker(snapshot([listener(tcp_chain("c"))], [cluster("c", 9)]))
        w.bind()
        ready = asyncio.Event()
        task = asyncio.create_task(w.run(ready.set))
        await ready.wait()
        b = w._bound[0]
        w._accept_error(OSError(errno.EMFILE, "x"), b)       # resources: back off
        assert (b.backoff, b.loop, b.retry is not None) == (0.01, None, True)
        w._accept_error(OSError(errno.ENOBUFS, "x"), b)
        assert b.backoff == 0.02
        await until(lambda: b.loop is not None)               # watching again
        w._accept_error(OSError(errno.ECONNABORTED, "x"), b)  # one connection: skip
        assert b.loop is not None
        w._accept_error(OSError(errno.EBADF, "x"), b)         # anything else: fail
        with pytest.raises(OSError):
            await task
    asyncio.run(main())


# ------------------------------------------------------------------------------ drain


def test_drain_listeners_stops_accepting_but_keeps_connections(
        run: Callable[..., None]) -> None:
    async def main() -> None:
        async with upstream(echo) as up:
            snap = snapshot([listener(tcp_chain("c"), name="out", traffic_direction="OUTBOUND"),
                             listener(tcp_chain("c"), name="in", traffic_direction="INBOUND")],
                            [cluster("c", up)])
            async with proxy(snap) as w:
                pin, pout = port(w, "in"), port(w, "out")
                r, wr = await asyncio.open_connection(LO, pin)
                w.drain_listeners(inbound_only=True, graceful=False, skip_exit=False)
                with pytest.raises(ConnectionRefusedError):
                    await asyncio.open_connection(LO, pin)
                r2, w2 = await asyncio.open_connection(LO, pout)   # outbound still open
                w2.write(b"o")
                assert await r2.readexactly(1) == b"o"
                wr.write(b"i")                                    # and so is the old one
                assert await r.readexactly(1) == b"i"
                assert w.draining
                wr.close()
                w2.close()
    run(main())


def test_graceful_drain_stops_listeners_after_the_drain_time(
        run: Callable[..., None]) -> None:
    async def main() -> None:
        async with upstream(echo) as up:
            snap = snapshot([listener(tcp_chain("c"))], [cluster("c", up)])
            async with proxy(snap, drain_time=0.3) as w:
                p = port(w)
                w.drain_listeners(inbound_only=False, graceful=True, skip_exit=False)
                _r, wr = await asyncio.open_connection(LO, p)    # still accepting
                wr.close()

                async def refused() -> bool:
                    try:
                        _r, c = await asyncio.open_connection(LO, p)
                    except ConnectionRefusedError:
                        return True
                    c.close()
                    return False

                async with asyncio.timeout(5):
                    while not await refused():
                        await asyncio.sleep(0.02)
    run(main())


def test_shutdown_waits_for_the_drain_time_then_closes(run: Callable[..., None]) -> None:
    async def main() -> None:
        async with upstream(echo) as up:
            snap = snapshot([listener(tcp_chain("c"))], [cluster("c", up)])
            w = Worker(snap, drain_time=0.3)
            w.bind()
            ready = asyncio.Event()
            task = asyncio.create_task(w.run(ready.set))
            await ready.wait()
            r, wr = await asyncio.open_connection(LO, port(w))
            wr.write(b"x")
            assert await r.readexactly(1) == b"x"
            loop = asyncio.get_running_loop()
            t0 = loop.time()
            w.shutdown(graceful=True)
            wr.write(b"y")                      # still served while draining
            assert await r.readexactly(1) == b"y"
            assert await read_all(r) == b""     # then closed at the drain deadline
            assert loop.time() - t0 >= 0.25
            await task
            wr.close()
    run(main())


@pytest.mark.parametrize("policy", ["RING_HASH", "MAGLEV"])
def test_source_ip_hash_policy_keeps_each_client_ip_on_one_host(
        run: Callable[..., None], policy: str) -> None:
    """Istio's consistentHash useSourceIp for a TCP service: tcp_proxy ``hash_policy``
    source_ip over a RING_HASH / MAGLEV cluster. Every connection from one client IP reaches
    the same upstream; different IPs spread over the upstreams."""
    def named(tag: bytes) -> Handler:
        async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            w.write(tag)
            await w.drain()
        return handler

    async def main() -> None:
        async with contextlib.AsyncExitStack() as stack:
            ports = [await stack.enter_async_context(upstream(named(b"%d" % i)))
                     for i in range(4)]
            w = await stack.enter_async_context(proxy(snapshot(
                [listener(tcp_chain("c", hash_policy=[{"source_ip": {}}]))],
                [cluster("c", *ports, lb_policy=policy)])))
            hosts: dict[str, set[bytes]] = {}
            for _ in range(3):
                for ip in [f"127.0.0.{i}" for i in range(2, 12)]:
                    r, wr = await asyncio.open_connection(LO, port(w), local_addr=(ip, 0))
                    hosts.setdefault(ip, set()).add(await r.readexactly(1))
                    wr.close()
            assert all(len(got) == 1 for got in hosts.values()), hosts
            assert len(set().union(*hosts.values())) >= 2, hosts
    run(main())


def test_priority_levels_keep_connections_on_the_first_healthy_level(
        run: Callable[..., None]) -> None:
    """Istio's locality failover as Envoy gets it: localities at priorities. Every connection
    goes to P0 while it is healthy; with P0's only endpoint unhealthy (EDS health), to P1,
    never to P2."""
    def named(tag: bytes) -> Handler:
        async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            w.write(tag)
            await w.drain()
        return handler

    def levels(name: str, ports: list[int], health: list[str]) -> dict[str, Any]:
        return {"name": name, "connect_timeout": "2s", "load_assignment": {
            "cluster_name": name, "endpoints": [
                {"priority": i, "locality": {"zone": f"z{i}"}, "lb_endpoints": [
                    {"endpoint": {"address": {"socket_address": {"address": LO,
                                                                 "port_value": p}}},
                     "health_status": h}]}
                for i, (p, h) in enumerate(zip(ports, health, strict=True))]}}

    async def main() -> None:
        async with contextlib.AsyncExitStack() as stack:
            ports = [await stack.enter_async_context(upstream(named(b"%d" % i)))
                     for i in range(3)]
            w = await stack.enter_async_context(proxy(snapshot(
                [listener(tcp_chain("local"), name="local"),
                 listener(tcp_chain("failover"), name="failover")],
                [levels("local", ports, ["HEALTHY"] * 3),
                 levels("failover", ports, ["UNHEALTHY", "HEALTHY", "HEALTHY"])])))
            for name, want in (("local", b"0"), ("failover", b"1")):
                got = set()
                for _ in range(12):
                    r, wr = await asyncio.open_connection(LO, port(w, name))
                    got.add(await r.readexactly(1))
                    wr.close()
                assert got == {want}, (name, got)
    run(main())
