"""Envoy-named counters and gauges, per worker, mergeable across workers.

Owns: the stat store (``listener.<addr>.downstream_cx_total``, ``cluster.<name>.upstream_cx_total``
…), snapshots as plain dicts (so a worker process can send them to the admin process) and
the merge of several workers' snapshots (counters and gauges add up, as Envoy's do across
worker threads).
Must not: format output (see ``admin``) or do IO.

Names follow Envoy's stats documentation: a cluster's scope is its observability name
(``alt_stat_name`` when set, so Istio clusters read ``cluster.outbound|8080||x;.…``), a
listener's scope is its address (``listener.0.0.0.0_15006.…``), tcp_proxy's is
``tcp.<stat_prefix>.…``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Literal

Kind = Literal["counter", "gauge"]


@dataclass(slots=True)
class StatsSnapshot:
    """Counters and gauges by full name."""

    counters: dict[str, int] = field(default_factory=dict)
    gauges: dict[str, int] = field(default_factory=dict)

    def to_json(self) -> dict[str, dict[str, int]]:
        return {"counters": dict(self.counters), "gauges": dict(self.gauges)}

    @classmethod
    def from_json(cls, data: Mapping[str, Mapping[str, int]]) -> StatsSnapshot:
        return cls(counters=dict(data.get("counters", {})), gauges=dict(data.get("gauges", {})))

    def value(self, name: str) -> int:
        return self.counters.get(name, self.gauges.get(name, 0))


def merge(snapshots: Iterable[StatsSnapshot]) -> StatsSnapshot:
    out = StatsSnapshot()
    for snap in snapshots:
        for name, value in snap.counters.items():
            out.counters[name] = out.counters.get(name, 0) + value
        for name, value in snap.gauges.items():
            out.gauges[name] = out.gauges.get(name, 0) + value
    return out


class Stats:
    """A worker's store. Hot path: ``inc``/``add`` on a name are one dict update."""

    __slots__ = ("counters", "gauges")

    def __init__(self) -> None:
        self.counters: dict[str, int] = {}
        self.gauges: dict[str, int] = {}

    def inc(self, name: str, by: int = 1) -> None:
        self.counters[name] = self.counters.get(name, 0) + by

    def declare(self, name: str, kind: Kind = "counter") -> None:
        """Make a stat exist at 0 (Envoy lists declared stats even when unused)."""
        (self.counters if kind == "counter" else self.gauges).setdefault(name, 0)

    def gauge_add(self, name: str, by: int) -> None:
        self.gauges[name] = self.gauges.get(name, 0) + by

    def gauge_set(self, name: str, value: int) -> None:
        self.gauges[name] = value

    def snapshot(self) -> StatsSnapshot:
        return StatsSnapshot(counters=dict(self.counters), gauges=dict(self.gauges))

    def reset_counters(self) -> None:
        for name in self.counters:
            self.counters[name] = 0


def listener_scope(address: str) -> str:
    """``listener.0.0.0.0_15006``: Envoy names a listener's stats by its address, with
    ``:`` turned into ``_`` (``[::]:15006`` → ``[__]_15006``)."""
    return "listener." + address.replace(":", "_")


def cluster_scope(observability_name: str) -> str:
    return f"cluster.{observability_name}"


# The stats Envoy declares for every listener / cluster / tcp_proxy (a subset, the ones the
# proxy maintains; all appear at 0 before traffic).
LISTENER_STATS: tuple[tuple[str, Kind], ...] = (
    ("downstream_cx_total", "counter"), ("downstream_cx_destroy", "counter"),
    ("downstream_cx_active", "gauge"), ("downstream_pre_cx_timeout", "counter"),
    ("downstream_pre_cx_active", "gauge"), ("no_filter_chain_match", "counter"),
    ("downstream_cx_overflow", "counter"),
)
CLUSTER_STATS: tuple[tuple[str, Kind], ...] = (
    ("upstream_cx_total", "counter"), ("upstream_cx_active", "gauge"),
    ("upstream_cx_connect_fail", "counter"), ("upstream_cx_connect_timeout", "counter"),
    ("upstream_cx_destroy", "counter"), ("upstream_cx_destroy_local", "counter"),
    ("upstream_cx_destroy_remote", "counter"), ("upstream_cx_overflow", "counter"),
    ("upstream_cx_none_healthy", "counter"), ("upstream_cx_rx_bytes_total", "counter"),
    ("upstream_cx_tx_bytes_total", "counter"), ("upstream_cx_connect_attempts_exceeded",
                                                "counter"),
    ("membership_total", "gauge"), ("membership_healthy", "gauge"),
)
TCP_STATS: tuple[tuple[str, Kind], ...] = (
    ("downstream_cx_total", "counter"), ("downstream_cx_no_route", "counter"),
    ("downstream_cx_rx_bytes_total", "counter"), ("downstream_cx_tx_bytes_total", "counter"),
    ("downstream_flow_control_paused_reading_total", "counter"),
    ("downstream_flow_control_resumed_reading_total", "counter"),
    ("upstream_flush_total", "counter"), ("idle_timeout", "counter"),
    ("downstream_cx_rx_bytes_buffered", "gauge"), ("downstream_cx_tx_bytes_buffered", "gauge"),
)
