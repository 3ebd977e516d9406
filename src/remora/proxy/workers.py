"""``--concurrency N``: N worker processes share the listeners; the parent supervises them and
answers the admin API for all of them.

Owns: forking the workers (each builds its own :class:`~remora.proxy.server.Worker`, binds its
own ``SO_REUSEPORT`` sockets while still root, drops privileges and runs its own event loop),
the control channel (JSON lines over a socketpair: the worker's ``ready``/``error`` line, then
request/reply by id: ``stats``, ``clusters``, ``reset_counters``, ``reopen_logs``,
``drain_listeners``, ``set_log_level``, ``quit``), the supervision (a ``pidfd`` per worker; a
worker that exits on its own stops the proxy with exit code 1; stopping is SIGTERM, a grace
period, SIGKILL, and every child is always reaped) and :class:`SupervisorControl`, the
ProxyControl that asks each worker and merges their stats (:func:`remora.proxy.stats.merge`)
and host status.
Must not: parse flags or the bootstrap, accept connections, or run admin HTTP itself (the
caller passes a starter).

The parent forks before it creates an event loop or any thread, so each child starts with
one thread and no loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import os
import random
import select
import signal
import socket
import sys
import time
import traceback
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from remora.errors import EnvironmentFault
from remora.proxy import bpf, platform
from remora.proxy import control as ctl
from remora.proxy.model import Snapshot, SocketAddress
from remora.proxy.server import Worker
from remora.proxy.state import ClusterStatus, HostStatus, ServerState
from remora.proxy.stats import StatsSnapshot

log = logging.getLogger("remora.proxy.app")

REPLY_TIMEOUT = 5.0      # a worker answers a control request from its loop at once
STOP_GRACE = 5.0         # after the drain time, before SIGKILL

LoopFactory = Callable[[], asyncio.AbstractEventLoop]
AdminStarter = Callable[["SupervisorControl"], Awaitable[asyncio.AbstractServer | None]]


@dataclass(frozen=True, slots=True, kw_only=True)
class WorkerSpec:
    snapshot: Snapshot
    concurrency: int
    drain_time: float
    uid: int
    gid: int
    loop_factory: LoopFactory
    tcp_offload: str = "auto"


def _line(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode() + b"\n"


def host_to_json(h: HostStatus) -> dict[str, Any]:
    return {"address": h.address.address, "port": h.address.port, "stats": h.stats,
            "health_flags": list(h.health_flags), "weight": h.weight, "region": h.region,
            "zone": h.zone, "sub_zone": h.sub_zone, "priority": h.priority,
            "hostname": h.hostname, "locality_weight": h.locality_weight}


def host_from_json(d: dict[str, Any]) -> HostStatus:
    return HostStatus(address=SocketAddress(address=d["address"], port=d["port"]),
                      stats=dict(d["stats"]), health_flags=tuple(d["health_flags"]),
                      weight=d["weight"], region=d["region"], zone=d["zone"],
                      sub_zone=d["sub_zone"], priority=d["priority"], hostname=d["hostname"],
                      locality_weight=d["locality_weight"])


# ---------------------------------------------------------------------------------- child


def _answer(worker: Worker, req: dict[str, Any]) -> dict[str, Any]:
    op = req.get("op")
    if op == "stats":
        return {"stats": worker.stats_snapshot().to_json()}
    if op == "clusters":
        return {"clusters": [{"name": c.name, "hosts": [host_to_json(h) for h in c.hosts]}
                             for c in worker.cluster_status()]}
    if op == "reset_counters":
        worker.reset_counters()
        return {}
    if op == "reopen_logs":
        worker.reopen_logs()
        return {}
    if op == "drain_listeners":
        worker.drain_listeners(inbound_only=bool(req["inbound_only"]),
                               graceful=bool(req["graceful"]), skip_exit=bool(req["skip_exit"]))
        return {}
    if op == "set_log_level":
        ctl.set_log_level(req.get("logger"), str(req["level"]))
        return {}
    if op == "quit":
        worker.shutdown(graceful=False)
        return {}
    return {"error": f"unknown op {op!r}"}


async def _serve_channel(worker: Worker, reader: asyncio.StreamReader,
                         writer: asyncio.StreamWriter) -> None:
    while True:
        raw = await reader.readline()
        if not raw:
            # The parent is gone: nobody supervises us any more.
            worker.shutdown(graceful=False)
            return
        req: dict[str, Any] = {}
        try:
            loaded = json.loads(raw)
            if isinstance(loaded, dict):
                req = loaded
            reply = _answer(worker, req)
        except (ValueError, KeyError, TypeError) as exc:
            reply = {"error": str(exc)}
        reply["id"] = req.get("id")
        writer.write(_line(reply))


async def _child_async(worker: Worker, chan: socket.socket) -> int:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, lambda: worker.shutdown(graceful=True))
    reader, writer = await asyncio.open_unix_connection(sock=chan)

    def ready() -> None:
        writer.write(_line({"event": "ready", "pid": os.getpid(),
                            "listeners": [f"{n}={a}" for n, a in worker.bound_addresses]}))

    channel = loop.create_task(_serve_channel(worker, reader, writer), name="control channel")
    try:
        await worker.run(ready)
    finally:
        channel.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await channel
        writer.close()
    return 0


def _child(spec: WorkerSpec, index: int, chan: socket.socket) -> int:
    worker = Worker(spec.snapshot, drain_time=spec.drain_time, index=index,
                    concurrency=spec.concurrency, rng=random.Random(),
                    offload=bpf.try_load(spec.tcp_offload))
    try:
        worker.bind()
    except OSError as exc:
        chan.sendall(_line({"event": "error", "message": str(exc.strerror or exc)}))
        return 1
    platform.drop_privileges(spec.uid, spec.gid)
    chan.setblocking(False)
    with asyncio.Runner(loop_factory=spec.loop_factory) as runner:
        return runner.run(_child_async(worker, chan))


# ---------------------------------------------------------------------------------- parent


@dataclass(slots=True)
class WorkerHandle:
    index: int
    pid: int
    chan: socket.socket
    pidfd: int
    buf: bytes = b""
    exit_status: int | None = None

    @property
    def alive(self) -> bool:
        return self.exit_status is None

    def read_message(self, deadline: float) -> dict[str, Any] | None:
        """The next JSON line, or None on EOF or when the deadline passes."""
        while b"\n" not in self.buf:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            ready, _, _ = select.select([self.chan], [], [], remaining)
            if not ready:
                return None
            try:
                chunk = self.chan.recv(1 << 20)
            except OSError:
                return None
            if not chunk:
                return None
            self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\n")
        try:
            msg = json.loads(line)
        except ValueError:
            return None
        return msg if isinstance(msg, dict) else None

    def reap(self, *, block: bool) -> bool:
        """Collect the exit status if the child has exited."""
        if self.exit_status is not None:
            return True
        try:
            pid, status = os.waitpid(self.pid, 0 if block else os.WNOHANG)
        except ChildProcessError:
            self.exit_status = 0
            return True
        if pid == 0:
            return False
        self.exit_status = os.waitstatus_to_exitcode(status)
        return True

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.chan.close()
        with contextlib.suppress(OSError):
            os.close(self.pidfd)


def spawn(spec: WorkerSpec) -> list[WorkerHandle]:
    """Fork ``spec.concurrency`` workers. Must be called with no event loop and no threads."""
    handles: list[WorkerHandle] = []
    sys.stdout.flush()
    sys.stderr.flush()
    for index in range(spec.concurrency):
        parent_end, child_end = socket.socketpair()
        pid = os.fork()
        if pid == 0:  # the worker; never returns
            code = 1
            try:
                parent_end.close()
                for h in handles:
                    h.close()
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                signal.signal(signal.SIGINT, signal.SIG_DFL)
                code = _child(spec, index, child_end)
            except BaseException:
                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        child_end.close()
        handles.append(WorkerHandle(index=index, pid=pid, chan=parent_end,
                                    pidfd=os.pidfd_open(pid)))
    return handles


def wait_ready(handles: list[WorkerHandle], timeout: float) -> list[str]:
    """Each worker's ``ready`` line; raises EnvironmentFault with the first worker error."""
    deadline = time.monotonic() + timeout
    listeners: list[str] = []
    for h in handles:
        msg = h.read_message(deadline)
        if msg is None:
            raise EnvironmentFault(f"worker {h.index} did not start within {timeout:.0f}s")
        if msg.get("event") == "error":
            raise EnvironmentFault(str(msg.get("message")))
        listeners = [str(x) for x in msg.get("listeners", [])]
    return listeners


def stop_all(handles: list[WorkerHandle], *, sig: int = signal.SIGTERM,
             grace: float = STOP_GRACE) -> None:
    """Signal every live worker, wait up to ``grace``, SIGKILL the rest, reap all."""
    for h in handles:
        if not h.reap(block=False):
            with contextlib.suppress(ProcessLookupError):
                os.kill(h.pid, sig)
    deadline = time.monotonic() + grace
    for h in handles:
        while not h.reap(block=False):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(h.pid, signal.SIGKILL)
                h.reap(block=True)
                break
            select.select([h.pidfd], [], [], remaining)
    for h in handles:
        h.close()


@dataclass(slots=True)
class SupervisorControl(ctl.ControlBase):
    """ProxyControl of the parent: every question goes to every live worker."""

    handles: list[WorkerHandle] = field(default_factory=list)
    draining: bool = False
    _ids: itertools.count[int] = field(default_factory=itertools.count)

    def _ask(self, op: str, **args: object) -> list[dict[str, Any]]:
        req_id = next(self._ids)
        live = [h for h in self.handles if h.alive]
        asked = []
        for h in live:
            try:
                h.chan.sendall(_line({"op": op, "id": req_id, **args}))
                asked.append(h)
            except OSError:
                continue
        deadline = time.monotonic() + REPLY_TIMEOUT
        replies = []
        for h in asked:
            while True:
                msg = h.read_message(deadline)
                if msg is None:
                    log.warning("worker %d did not answer %r", h.index, op)
                    break
                if msg.get("id") == req_id:
                    replies.append(msg)
                    break
        return replies

    def state(self) -> ServerState:
        if not self.initialized:
            return "INITIALIZING"
        return "DRAINING" if self.health_failed or self.draining else "LIVE"

    def stats(self) -> StatsSnapshot:
        snaps = [StatsSnapshot.from_json(r["stats"]) for r in self._ask("stats")
                 if "stats" in r]
        return self._with_server_stats(ctl.merge_workers(snaps), self.state())

    def cluster_status(self) -> list[ClusterStatus]:
        per_worker = [[ClusterStatus(name=c["name"],
                                     hosts=[host_from_json(h) for h in c["hosts"]])
                       for c in r["clusters"]]
                      for r in self._ask("clusters") if "clusters" in r]
        return ctl.merge_cluster_status(per_worker)

    def drain_listeners(self, inbound_only: bool, graceful: bool, skip_exit: bool) -> None:
        self.draining = True
        self._ask("drain_listeners", inbound_only=inbound_only, graceful=graceful,
                  skip_exit=skip_exit)

    def quit(self) -> None:
        if self.on_quit is not None:
            self.on_quit()

    def reset_counters(self) -> None:
        self._ask("reset_counters")

    def reopen_logs(self) -> None:
        self._ask("reopen_logs")

    def pids(self) -> list[int]:
        return [os.getpid(), *(h.pid for h in self.handles if h.alive)]

    def set_log_level(self, logger: str | None, level: str) -> None:
        ctl.set_log_level(logger, level)   # validates (KeyError / ValueError) first
        self._ask("set_log_level", logger=logger, level=level)


async def supervise(control: SupervisorControl, *, drain_time: float,
                    admin: AdminStarter | None, on_ready: Callable[[], None]) -> int:
    """Run the parent until a signal, ``/quitquitquit`` or a worker's death; stop the
    workers; return the exit code."""
    loop = asyncio.get_running_loop()
    stop: asyncio.Future[bool] = loop.create_future()   # result: graceful?
    died: asyncio.Future[WorkerHandle] = loop.create_future()

    def request_stop(graceful: bool) -> None:
        control.draining = True
        if not stop.done():
            stop.set_result(graceful)

    def on_exit(h: WorkerHandle) -> None:
        loop.remove_reader(h.pidfd)
        h.reap(block=True)
        if not died.done() and not stop.done():
            died.set_result(h)

    for h in control.handles:
        loop.add_reader(h.pidfd, on_exit, h)
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, request_stop, True)
    control.on_quit = lambda: request_stop(False)
    server = await admin(control) if admin is not None else None
    control.initialized = True
    on_ready()
    code = 0
    try:
        waiters: list[asyncio.Future[Any]] = [stop, died]
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        if died.done() and not stop.done():
            h = died.result()
            log.error("worker %d (pid %d) exited with status %s; stopping", h.index, h.pid,
                      h.exit_status)
            code = 1
            graceful = False
        else:
            graceful = stop.result()
        for h in control.handles:
            with contextlib.suppress(OSError, ValueError):
                loop.remove_reader(h.pidfd)
        if not graceful:
            control._ask("quit")
        await loop.run_in_executor(None, lambda: stop_all(
            control.handles, grace=(drain_time if graceful else 0.0) + STOP_GRACE))
    finally:
        if server is not None:
            server.close()
    return code
