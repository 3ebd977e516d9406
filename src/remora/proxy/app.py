"""`remora proxy`: the program. Load the bootstrap, bind, drop privileges, run, stop.

Owns: the order of start-up (bootstrap → every module the process will need imported → listen
sockets bound as root → privileges dropped to ``--uid/--gid`` → event loop (uvloop when
available) → admin API → clusters warmed → accepting → one ``remora proxy ready`` log line),
loading the kernel relay's BPF maps (``--tcp-offload``, :mod:`remora.proxy.bpf`) while still
root, the choice between one process (``--concurrency 1``: worker and admin share a loop) and a
supervising parent with N workers (:mod:`remora.proxy.workers`), signals (SIGTERM/SIGINT: drain
then exit; SIGPIPE ignored), and Envoy's ``command_line_options`` for ``/server_info``.
Must not: parse the command line (that is :mod:`remora.cli`), print anything but log lines,
or touch sockets itself.

After ``setuid(1337)`` the interpreter's files (the standard library lives under /root) are
unreadable, so :func:`preload` imports everything a running proxy may import lazily.
"""

from __future__ import annotations

import asyncio
import gc
import importlib
import logging
import os
import signal
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from remora import native
from remora.errors import EnvironmentFault
from remora.proxy import bpf, platform, workers
from remora.proxy import control as ctl
from remora.proxy.bootstrap import load_bootstrap
from remora.proxy.model import Snapshot, SocketAddress
from remora.proxy.server import Worker
from remora.proxy.state import ProxyControl

log = logging.getLogger(__name__)

GC_YOUNG_THRESHOLD = 10_000   # gc.set_threshold's first value (CPython's default: 700)

# Modules imported lazily by the stdlib, uvloop or the admin at run time.
PRELOAD = (
    "concurrent.futures.thread", "encodings.idna", "encodings.ascii", "encodings.latin_1",
    "encodings.utf_8", "stringprep", "unicodedata", "json", "json.decoder", "json.encoder",
    "traceback", "linecache", "tokenize", "asyncio.unix_events", "asyncio.sslproto", "ssl",
    "email.utils", "http", "urllib.parse", "zlib", "gzip", "_strptime", "datetime",
)


@dataclass(frozen=True, slots=True, kw_only=True)
class ProxyOptions:
    config_path: str
    concurrency: int = 1
    uid: int = 1337
    gid: int = 1337
    drain_time_s: float = 600.0
    log_level: str = "info"
    base_id: int = 0
    tcp_offload: str = "off"       # auto | off (remora.proxy.bpf)


def command_line_options(opts: ProxyOptions) -> dict[str, object]:
    """Envoy's ``CommandLineOptions`` fields that these flags set (proto-JSON names)."""
    drain = opts.drain_time_s
    return {"base_id": str(opts.base_id), "concurrency": opts.concurrency,
            "config_path": opts.config_path, "log_level": opts.log_level,
            "drain_time": f"{int(drain)}s" if drain == int(drain) else f"{drain}s",
            "parent_shutdown_time": "900s", "mode": "Serve", "disable_hot_restart": True}


def preload() -> None:
    for name in PRELOAD:
        try:
            importlib.import_module(name)
        except ImportError:
            continue
    # Warm caches that would otherwise read files later.
    "x".encode("idna")


def loop_factory() -> Callable[[], asyncio.AbstractEventLoop]:
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory


AdminStart = Callable[[ProxyControl, SocketAddress], Awaitable[asyncio.AbstractServer]]


def admin_starter() -> AdminStart | None:
    """``remora.proxy.admin.start_admin`` if that module is available."""
    try:
        mod = importlib.import_module("remora.proxy.admin")
    except ImportError:
        return None
    fn: Any = getattr(mod, "start_admin", None)
    return fn if callable(fn) else None


def _ready_line(concurrency: int, admin: SocketAddress | None, listeners: list[str]) -> None:
    log.info("remora proxy ready: pid=%d concurrency=%d admin=%s listeners=%s", os.getpid(),
             concurrency, admin if admin is not None else "-", ",".join(listeners) or "-")


async def _start_admin(start: AdminStart | None, control: ProxyControl,
                       snapshot: Snapshot) -> asyncio.AbstractServer | None:
    if start is None:
        log.warning("admin API not available (remora.proxy.admin missing)")
        return None
    try:
        return await start(control, snapshot.admin.address)
    except OSError as exc:
        raise EnvironmentFault(f"admin cannot bind {snapshot.admin.address}: "
                               f"{exc.strerror or exc}") from None


async def _run_single(worker: Worker, control: ctl.LocalControl, start: AdminStart | None,
                      ) -> int:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, lambda: worker.shutdown(graceful=True))
    server = await _start_admin(start, control, control.snapshot)

    def ready() -> None:
        control.initialized = True
        _ready_line(1, control.snapshot.admin.address if server else None,
                    [f"{n}={a}" for n, a in worker.bound_addresses])

    try:
        await worker.run(ready)
    finally:
        if server is not None:
            server.close()
    return 0


def run_proxy(opts: ProxyOptions) -> int:
    """Run until SIGTERM/SIGINT or ``/quitquitquit``. Raises BadInput for a bad bootstrap,
    EnvironmentFault when a socket cannot be bound."""
    snapshot = load_bootstrap(opts.config_path)
    hot = native.status()
    (log.warning if hot.stale else log.info)("hot path: %s", hot.summary)
    start = admin_starter()
    preload()
    factory = loop_factory()
    # The config and the imported modules live as long as the process: move them out of the
    # collector's generations so full collections on the hot path don't rescan them (5.8 ms
    # per full collection with the Istio-shaped example, found by bench_proxy_l4), and so
    # forked workers share those pages instead of copying them when the GC touches them.
    gc.collect()
    gc.freeze()
    # Young-generation collections: at the default threshold (700 net allocations) 50
    # keep-alive HTTP connections in flight keep crossing it, and the collector ran every ~76
    # requests, finding next to nothing (1,600 collections in 5 s, 3 % of the CPU). In-flight
    # requests never hold 10,000 tracked objects, so collections become rare (a dozen in 5 s)
    # while real cyclic garbage is still collected within that many allocations.
    gc.set_threshold(GC_YOUNG_THRESHOLD)
    # cli.main sets SIGPIPE to the default (die) for pipelines; a proxy must never die of it.
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    cmdline = command_line_options(opts)
    if opts.concurrency <= 1:
        worker = Worker(snapshot, drain_time=opts.drain_time_s,
                        offload=bpf.try_load(opts.tcp_offload))
        try:
            worker.bind()
        except OSError as exc:
            raise EnvironmentFault(str(exc.strerror or exc)) from None
        platform.drop_privileges(opts.uid, opts.gid)
        control = ctl.LocalControl(snapshot_=snapshot, command_line_=cmdline, worker=worker)
        with asyncio.Runner(loop_factory=factory) as runner:
            return runner.run(_run_single(worker, control, start))
    return _run_workers(opts, snapshot, cmdline, start, factory)


def _run_workers(opts: ProxyOptions, snapshot: Snapshot, cmdline: dict[str, object],
                 start: AdminStart | None,
                 factory: Callable[[], asyncio.AbstractEventLoop]) -> int:
    spec = workers.WorkerSpec(snapshot=snapshot, concurrency=opts.concurrency,
                              drain_time=opts.drain_time_s, uid=opts.uid, gid=opts.gid,
                              loop_factory=factory, tcp_offload=opts.tcp_offload)
    handles = workers.spawn(spec)
    try:
        listeners = workers.wait_ready(handles, timeout=60.0)
    except BaseException:
        workers.stop_all(handles)
        raise
    platform.drop_privileges(opts.uid, opts.gid)
    control = workers.SupervisorControl(snapshot_=snapshot, command_line_=cmdline,
                                        concurrency=opts.concurrency, handles=handles)

    async def admin(c: workers.SupervisorControl) -> asyncio.AbstractServer | None:
        return await _start_admin(start, c, snapshot)

    def ready() -> None:
        _ready_line(opts.concurrency, snapshot.admin.address if start else None, listeners)

    try:
        with asyncio.Runner(loop_factory=factory) as runner:
            return runner.run(workers.supervise(control, drain_time=opts.drain_time_s,
                                                admin=admin, on_ready=ready))
    finally:
        workers.stop_all(handles, grace=0.0)
