"""The running proxy as the admin API sees it: :class:`~remora.proxy.state.ProxyControl`.

Owns: Envoy's logger names and levels mapped onto Python loggers under ``remora.proxy``, the
server-wide stats Envoy adds (``server.live``, ``server.state``, ``server.uptime``,
``server.concurrency``, ``server.total_connections``), the merge of several workers' host
status (:func:`merge_cluster_status`), and :class:`LocalControl`, the control of a proxy that
runs its one worker in the admin's own process. The multi-process control lives in
:mod:`remora.proxy.workers`.
Must not: own sockets, format admin output (``admin_format``), or talk HTTP.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

from remora.proxy.model import Snapshot
from remora.proxy.server import Worker
from remora.proxy.state import SERVER_STATE_NUMBER, ClusterStatus, HostStatus, ServerState
from remora.proxy.stats import StatsSnapshot, merge

TRACE = 5
logging.addLevelName(TRACE, "TRACE")

#: Envoy level names → Python levels (Envoy has trace below debug, critical, off).
LEVELS: dict[str, int] = {"trace": TRACE, "debug": logging.DEBUG, "info": logging.INFO,
                          "warning": logging.WARNING, "error": logging.ERROR,
                          "critical": logging.CRITICAL, "off": logging.CRITICAL + 10}

#: Envoy logger names → the Python logger that does that job here.
ENVOY_LOGGERS: dict[str, str] = {
    "admin": "remora.proxy.admin",
    "config": "remora.proxy.bootstrap",
    "conn_handler": "remora.proxy.server",
    "connection": "remora.proxy.connection",
    "dns": "remora.proxy.dns",
    "filter": "remora.proxy.tcp",
    "main": "remora.proxy.app",
    "misc": "remora.proxy.misc",
    "pool": "remora.proxy.pool",
    "upstream": "remora.proxy.upstream",
}
ROOT_LOGGER = "remora.proxy"


def level_name(levelno: int) -> str:
    """The Envoy name of a Python level (rounded down to the nearest Envoy level)."""
    best = "trace"
    for name, value in sorted(LEVELS.items(), key=lambda kv: kv[1]):
        if levelno >= value:
            best = name
    return best


def parse_level(level: str) -> int:
    try:
        return LEVELS[level.lower()]
    except KeyError:
        raise ValueError(f"unknown log level {level!r} (one of {', '.join(LEVELS)})") from None


def loggers() -> dict[str, str]:
    return {name: level_name(logging.getLogger(py).getEffectiveLevel())
            for name, py in sorted(ENVOY_LOGGERS.items())}


def set_log_level(logger: str | None, level: str) -> None:
    value = parse_level(level)
    if logger is None:
        logging.getLogger(ROOT_LOGGER).setLevel(value)
        for py in ENVOY_LOGGERS.values():
            logging.getLogger(py).setLevel(value)
        return
    if logger not in ENVOY_LOGGERS:
        raise KeyError(logger)
    logging.getLogger(ENVOY_LOGGERS[logger]).setLevel(value)


def server_stats(state: ServerState, uptime: float, concurrency: int,
                 total_connections: int) -> dict[str, int]:
    return {"server.live": 1 if state == "LIVE" else 0,
            "server.state": SERVER_STATE_NUMBER[state],
            "server.uptime": int(uptime),
            "server.concurrency": concurrency,
            "server.total_connections": total_connections}


def total_connections(stats: StatsSnapshot) -> int:
    """Open downstream connections: the sum of every listener's ``downstream_cx_active``."""
    return sum(v for k, v in stats.gauges.items()
               if k.startswith("listener.") and k.endswith(".downstream_cx_active"))


def memory_usage(pids: Iterable[int]) -> dict[str, int]:
    """``GET /memory``'s numbers for processes with no tcmalloc, summed over ``pids`` from
    /proc/PID/status: ``allocated`` the private anonymous memory in RAM (RssAnon: the
    interpreter's heap and objects), ``heap_size`` the data segment (VmData), and
    ``total_physical_bytes`` all resident memory (VmRSS). A process gone meanwhile counts 0."""
    keys = {"RssAnon:": "allocated", "VmData:": "heap_size", "VmRSS:": "total_physical_bytes"}
    out = dict.fromkeys(keys.values(), 0)
    for pid in pids:
        try:
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    fields = line.split()       # "VmRSS:", "43339", "kB"
                    if len(fields) >= 2 and fields[0] in keys:
                        out[keys[fields[0]]] += int(fields[1]) * 1024
        except OSError:
            continue
    return out


#: Gauges every worker holds a copy of (cluster membership): merged by max, not summed.
SHARED_GAUGE_SUFFIXES = (".membership_total", ".membership_healthy", ".membership_degraded")


def merge_workers(snaps: list[StatsSnapshot]) -> StatsSnapshot:
    """:func:`remora.proxy.stats.merge`, except that per-worker copies of one value are not
    added up."""
    out = merge(snaps)
    for name in out.gauges:
        if name.endswith(SHARED_GAUGE_SUFFIXES):
            out.gauges[name] = max(s.gauges.get(name, 0) for s in snaps)
    return out


def merge_cluster_status(per_worker: Iterable[list[ClusterStatus]]) -> list[ClusterStatus]:
    """Host stats summed per (cluster, address); clusters and hosts in first-seen order."""
    out: dict[str, ClusterStatus] = {}
    hosts: dict[tuple[str, str, int], HostStatus] = {}
    for statuses in per_worker:
        for cs in statuses:
            merged = out.setdefault(cs.name, ClusterStatus(name=cs.name))
            for h in cs.hosts:
                key = (cs.name, h.address.address, h.address.port)
                have = hosts.get(key)
                if have is None:
                    copy = dataclasses.replace(h, stats=dict(h.stats))
                    hosts[key] = copy
                    merged.hosts.append(copy)
                else:
                    for k, v in h.stats.items():
                        have.stats[k] = have.stats.get(k, 0) + v
    return list(out.values())


@dataclass(slots=True)
class ControlBase:
    """What every ProxyControl shares: config, clock, command line, health, loggers."""

    snapshot_: Snapshot
    command_line_: Mapping[str, object]
    concurrency: int = 1
    started: float = field(default_factory=time.monotonic)
    health_failed: bool = False
    initialized: bool = False
    on_quit: Callable[[], None] | None = None

    @property
    def snapshot(self) -> Snapshot:
        return self.snapshot_

    def uptime(self) -> float:
        return time.monotonic() - self.started

    def command_line(self) -> dict[str, object]:
        return dict(self.command_line_)

    def healthcheck(self, fail: bool) -> None:
        self.health_failed = fail

    def pids(self) -> list[int]:
        """The proxy's processes (this one; a supervisor adds its workers)."""
        return [os.getpid()]

    def memory(self) -> dict[str, int]:
        return memory_usage(self.pids())

    def loggers(self) -> dict[str, str]:
        return loggers()

    def set_log_level(self, logger: str | None, level: str) -> None:
        set_log_level(logger, level)

    def _with_server_stats(self, snap: StatsSnapshot, state: ServerState) -> StatsSnapshot:
        snap.gauges.update(server_stats(state, self.uptime(), self.concurrency,
                                        total_connections(snap)))
        return snap


@dataclass(slots=True)
class LocalControl(ControlBase):
    """ProxyControl of a single-process proxy (``--concurrency 1``)."""

    worker: Worker | None = None

    def _w(self) -> Worker:
        assert self.worker is not None
        return self.worker

    def state(self) -> ServerState:
        if not self.initialized:
            return "INITIALIZING"
        return "DRAINING" if self.health_failed or self._w().draining else "LIVE"

    def stats(self) -> StatsSnapshot:
        return self._with_server_stats(self._w().stats_snapshot(), self.state())

    def cluster_status(self) -> list[ClusterStatus]:
        return self._w().cluster_status()

    def drain_listeners(self, inbound_only: bool, graceful: bool, skip_exit: bool) -> None:
        self._w().drain_listeners(inbound_only=inbound_only, graceful=graceful,
                                  skip_exit=skip_exit)

    def quit(self) -> None:
        if self.on_quit is not None:
            self.on_quit()
        else:
            self._w().shutdown(graceful=False)

    def reset_counters(self) -> None:
        self._w().reset_counters()

    def reopen_logs(self) -> None:
        self._w().reopen_logs()
