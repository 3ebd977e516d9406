"""What the admin API reads from the running proxy, and what it can ask of it.

Owns: the plain data types of a host's and a cluster's live status (for ``/clusters``), the
server states Envoy reports, and :class:`ProxyControl`, the protocol the server implements and
the admin calls. With ``--concurrency N`` the server side merges what its workers report
before answering, so the admin never knows how many workers there are.
Must not: do IO or know about sockets.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Protocol

from remora.proxy.model import LbEndpoint, Snapshot, SocketAddress
from remora.proxy.stats import StatsSnapshot

ServerState = Literal["LIVE", "DRAINING", "PRE_INITIALIZING", "INITIALIZING"]
SERVER_STATE_NUMBER = {"LIVE": 0, "DRAINING": 1, "PRE_INITIALIZING": 2, "INITIALIZING": 3}

# Envoy's per-host stats in /clusters, sorted by name: counters and gauges.
HOST_STATS = ("cx_active", "cx_connect_fail", "cx_total", "rq_active", "rq_error", "rq_success",
              "rq_timeout", "rq_total")
HOST_GAUGES = frozenset({"cx_active", "rq_active"})


@dataclass(slots=True)
class HostStatus:
    address: SocketAddress
    stats: dict[str, int] = field(default_factory=lambda: dict.fromkeys(HOST_STATS, 0))
    health_flags: tuple[str, ...] = ()      # e.g. ("/failed_outlier_check",); () = healthy
    weight: int = 1
    region: str = ""
    zone: str = ""
    sub_zone: str = ""
    priority: int = 0
    hostname: str = ""
    locality_weight: int = 0                # its locality's load_balancing_weight (0: unset)

    @classmethod
    def of(cls, ep: LbEndpoint) -> HostStatus:
        return cls(address=ep.address, health_flags=ep.health_flags, weight=ep.weight,
                   region=ep.locality.region, zone=ep.locality.zone,
                   sub_zone=ep.locality.sub_zone, priority=ep.priority, hostname=ep.hostname,
                   locality_weight=ep.locality_weight)


@dataclass(slots=True)
class ClusterStatus:
    """A cluster's live hosts (ORIGINAL_DST clusters list hosts once used)."""

    name: str
    hosts: list[HostStatus] = field(default_factory=list)


class ProxyControl(Protocol):
    """Implemented by the server; used by the admin API."""

    @property
    def snapshot(self) -> Snapshot: ...

    def state(self) -> ServerState: ...

    def stats(self) -> StatsSnapshot:
        """All workers' stats, merged."""
        ...

    def cluster_status(self) -> list[ClusterStatus]:
        """Per cluster (in config order), the hosts with their stats merged across workers."""
        ...

    def uptime(self) -> float: ...

    def command_line(self) -> dict[str, object]: ...

    def drain_listeners(self, inbound_only: bool, graceful: bool, skip_exit: bool) -> None: ...

    def healthcheck(self, fail: bool) -> None: ...

    def quit(self) -> None: ...

    def reset_counters(self) -> None: ...

    def reopen_logs(self) -> None:
        """Every worker's access-log files opened anew (log rotation)."""
        ...

    def memory(self) -> dict[str, int]:
        """``allocated``, ``heap_size``, ``total_physical_bytes`` of all the proxy's
        processes, in bytes."""
        ...

    def loggers(self) -> dict[str, str]:
        """Logger name → level (Envoy level names: trace debug info warning error critical
        off)."""
        ...

    def set_log_level(self, logger: str | None, level: str) -> None:
        """``logger`` None sets every logger. Raises KeyError / ValueError on bad input."""
        ...
