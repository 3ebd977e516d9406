"""Envoy-named counters and gauges, per worker, mergeable across workers.

Owns: the stat store (``listener.<addr>.downstream_cx_total``, ``cluster.<name>.upstream_cx_total``
…), labelled metric families (Istio's ``istio_requests_total{reporter=…}`` counters and
``istio_request_duration_milliseconds`` histograms), snapshots as plain dicts (so a worker
process can send them to the admin process) and the merge of several workers' snapshots
(counters, gauges, histogram buckets, sums and counts add up, as Envoy's do across worker
threads).
Must not: format output (see ``admin_format``) or do IO.

Names follow Envoy's stats documentation: a cluster's scope is its observability name
(``alt_stat_name`` when set, so Istio clusters read ``cluster.outbound|8080||x;.…``), a
listener's scope is its address (``listener.0.0.0.0_15006.…``), tcp_proxy's is
``tcp.<stat_prefix>.…``.

Labelled families model stats Envoy creates with explicit tags
(``Stats::Utility::counterFromStatNames(scope, {namespace, name}, tags)``, as Istio's stats
filter does): the family is the tag-extracted name, a series is one tuple of tag values in the
family's tag order. Hot path: the caller keeps the :class:`Family` and a ready values tuple, so
an observation is one dict lookup plus an add (histograms: plus a ``bisect``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

Kind = Literal["counter", "gauge"]
FamilyKind = Literal["counter", "gauge", "histogram"]
Labels = tuple[str, ...]

#: Envoy's default histogram buckets (``Stats::HistogramSettingsImpl::defaultBuckets``), used
#: for every histogram without ``stats_config.histogram_bucket_settings`` -- Istio's included
#: (its sidecar bootstrap sets bucket settings only for the ``statsHistogramBuckets``
#: annotation), so the byte-size histograms share the millisecond bounds.
DEFAULT_BUCKETS: tuple[float, ...] = (
    0.5, 1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000, 60000, 300000,
    600000, 1800000, 3600000)


def default_bucket_index(v: float) -> int:
    """:func:`bucket_index` over :data:`DEFAULT_BUCKETS`, as literal comparisons (compiled,
    each is one native float compare: no tuple item, no float unboxing)."""
    if v < 100:
        if v < 5:
            return 0 if v < 0.5 else 1 if v < 1 else 2
        if v < 25:
            return 3 if v < 10 else 4
        return 5 if v < 50 else 6
    if v < 5000:
        if v < 500:
            return 7 if v < 250 else 8
        return 9 if v < 1000 else 10 if v < 2500 else 11
    if v < 300000:
        return 12 if v < 10000 else 13 if v < 30000 else 14 if v < 60000 else 15
    if v < 1800000:
        return 16 if v < 600000 else 17
    return 18 if v < 3600000 else 19


def bucket_index(buckets: tuple[float, ...], value: float) -> int:
    """``bisect_right``: the index of the first bound above ``value`` (compiled, this is a
    few native float comparisons instead of a call into the bisect module)."""
    lo, hi = 0, len(buckets)
    while lo < hi:
        mid = (lo + hi) // 2
        if value < buckets[mid]:
            hi = mid
        else:
            lo = mid + 1
    return lo


class Cell:
    """One counter or gauge. Hot paths keep the cell (:meth:`Stats.counter`,
    :meth:`Stats.gauge`) and add to ``value`` directly: compiled, that is an add on a native
    int field, with no dict lookup and no int object made per update."""

    __slots__ = ("value",)

    def __init__(self, value: int = 0) -> None:
        self.value = value

    def __eq__(self, other: object) -> bool:     # (families compare by value)
        return isinstance(other, Cell) and other.value == self.value

    __hash__ = None     # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"Cell({self.value})"


@dataclass(slots=True)
class Histogram:
    """One histogram series. ``counts`` are disjoint, one per bucket plus an overflow slot:
    ``counts[i]`` holds the observations ``v`` with ``buckets[i-1] <= v < buckets[i]``.

    The upper bound is exclusive because Envoy's is: its log-linear histogram counts a value
    equal to a bound in the next bucket (envoyproxy/envoy#20087, #36549), so a 25 ms request
    lands in ``le="50"``. Cumulative ``le`` counts are derived when rendering."""

    counts: list[int]
    sum: float = 0

    @property
    def count(self) -> int:
        return sum(self.counts)

    def cumulative(self) -> list[int]:
        out = []
        running = 0
        for c in self.counts[:-1]:
            running += c
            out.append(running)
        return out


@dataclass(slots=True)
class Family:
    """A labelled metric: kind, tag names in order, buckets (histograms), and its series by
    tag values. ``namespace`` is the custom stat namespace Envoy strips from Prometheus names
    (Istio registers ``istiocustom``; its stats are ``istiocustom.istio_requests_total…``
    internally and ``istio_requests_total`` in Prometheus output)."""

    kind: FamilyKind
    label_names: Labels
    buckets: tuple[float, ...] = ()
    namespace: str = ""
    cells: dict[Labels, Cell] = field(default_factory=dict)     # counter / gauge series
    histograms: dict[Labels, Histogram] = field(default_factory=dict)
    # The series updated last, by the identity of its labels tuple: a caller that passes
    # the same tuple again (Istio's stats keep theirs per input) skips hashing its 25 values.
    _last_labels: Labels | None = field(default=None, repr=False, compare=False)
    _last_histogram: Histogram | None = field(default=None, repr=False, compare=False)
    _last_cell_labels: Labels | None = field(default=None, repr=False, compare=False)
    _last_cell: Cell | None = field(default=None, repr=False, compare=False)

    @property
    def values(self) -> dict[Labels, int]:
        """Counter / gauge values by label values (a copy: update through ``inc``)."""
        return {k: c.value for k, c in self.cells.items()}

    def cell(self, labels: Labels) -> Cell:
        c = self._last_cell
        if c is None or labels is not self._last_cell_labels:
            c = self.cells.get(labels)
            if c is None:
                c = self.cells[labels] = Cell()
            self._last_cell_labels, self._last_cell = labels, c
        return c

    def inc(self, labels: Labels, by: int = 1) -> None:
        self.cell(labels).value += by

    def observe(self, labels: Labels, value: float) -> None:
        h = self._last_histogram
        if h is None or labels is not self._last_labels:
            h = self.histograms.get(labels)
            if h is None:
                h = self.histograms[labels] = Histogram([0] * (len(self.buckets) + 1))
            self._last_labels, self._last_histogram = labels, h
        buckets = self.buckets
        h.counts[default_bucket_index(value) if buckets is DEFAULT_BUCKETS
                 else bucket_index(buckets, value)] += 1
        h.sum += value

    def copy(self) -> Family:
        return Family(kind=self.kind, label_names=self.label_names, buckets=self.buckets,
                      namespace=self.namespace,
                      cells={k: Cell(c.value) for k, c in self.cells.items()},
                      histograms={k: Histogram(list(h.counts), h.sum)
                                  for k, h in self.histograms.items()})

    def stat_name(self, name: str, labels: Labels) -> str:
        """The full Envoy stat name of one series: ``<namespace>.<name>.<tag>.<value>…``
        (``TagStatNameJoiner``), what ``/stats`` prints and Envoy sorts by."""
        parts = [self.namespace, name] if self.namespace else [name]
        for k, v in zip(self.label_names, labels, strict=True):
            parts.append(k)
            parts.append(v)
        return ".".join(parts)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"kind": self.kind, "labels": list(self.label_names)}
        if self.buckets:
            out["buckets"] = list(self.buckets)
        if self.namespace:
            out["namespace"] = self.namespace
        if self.kind == "histogram":
            out["series"] = [[list(k), list(h.counts), h.sum]
                             for k, h in self.histograms.items()]
        else:
            out["series"] = [[list(k), c.value] for k, c in self.cells.items()]
        return out

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Family:
        fam = cls(kind=data["kind"], label_names=tuple(data["labels"]),
                  buckets=tuple(data.get("buckets", ())), namespace=data.get("namespace", ""))
        for item in data.get("series", ()):
            if fam.kind == "histogram":
                fam.histograms[tuple(item[0])] = Histogram(list(item[1]), item[2])
            else:
                fam.cells[tuple(item[0])] = Cell(item[1])
        return fam

    def merge_from(self, other: Family) -> None:
        for k, c in other.cells.items():
            self.cell(k).value += c.value
        for k, h in other.histograms.items():
            have = self.histograms.get(k)
            if have is None:
                self.histograms[k] = Histogram(list(h.counts), h.sum)
            else:
                have.counts = [a + b for a, b in zip(have.counts, h.counts, strict=True)]
                have.sum += h.sum


@dataclass(slots=True)
class StatsSnapshot:
    """Counters and gauges by full name, labelled families by name."""

    counters: dict[str, int] = field(default_factory=dict)
    gauges: dict[str, int] = field(default_factory=dict)
    families: dict[str, Family] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"counters": dict(self.counters), "gauges": dict(self.gauges)}
        if self.families:
            out["families"] = {n: f.to_json() for n, f in self.families.items()}
        return out

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> StatsSnapshot:
        return cls(counters=dict(data.get("counters", {})), gauges=dict(data.get("gauges", {})),
                   families={n: Family.from_json(f)
                             for n, f in data.get("families", {}).items()})

    def value(self, name: str) -> int:
        return self.counters.get(name, self.gauges.get(name, 0))


def merge(snapshots: Iterable[StatsSnapshot]) -> StatsSnapshot:
    out = StatsSnapshot()
    for snap in snapshots:
        for name, value in snap.counters.items():
            out.counters[name] = out.counters.get(name, 0) + value
        for name, value in snap.gauges.items():
            out.gauges[name] = out.gauges.get(name, 0) + value
        for name, fam in snap.families.items():
            have = out.families.get(name)
            if have is None:
                out.families[name] = fam.copy()
            else:
                have.merge_from(fam)
    return out


class Stats:
    """A worker's store. Every counter and gauge is a :class:`Cell` by full name; ``inc`` /
    ``gauge_add`` on a name are one dict lookup and an add, and a hot path that keeps the cell
    skips the lookup too. Labelled metrics go through a :class:`Family` the caller obtained
    once from :meth:`family`."""

    __slots__ = ("_counters", "_gauges", "families")

    def __init__(self) -> None:
        self._counters: dict[str, Cell] = {}
        self._gauges: dict[str, Cell] = {}
        self.families: dict[str, Family] = {}

    @property
    def counters(self) -> dict[str, int]:
        """Counter values by name (a copy: update through ``inc`` or a cell)."""
        return {n: c.value for n, c in self._counters.items()}

    @property
    def gauges(self) -> dict[str, int]:
        """Gauge values by name (a copy: update through ``gauge_add``/``gauge_set``)."""
        return {n: c.value for n, c in self._gauges.items()}

    def counter(self, name: str) -> Cell:
        """The cell of counter ``name`` (declared at 0 if new), for a hot path to keep."""
        c = self._counters.get(name)
        if c is None:
            c = self._counters[name] = Cell()
        return c

    def gauge(self, name: str) -> Cell:
        """The cell of gauge ``name`` (declared at 0 if new), for a hot path to keep."""
        c = self._gauges.get(name)
        if c is None:
            c = self._gauges[name] = Cell()
        return c

    def inc(self, name: str, by: int = 1) -> None:
        self.counter(name).value += by

    def declare(self, name: str, kind: Kind = "counter") -> None:
        """Make a stat exist at 0 (Envoy lists declared stats even when unused)."""
        if kind == "counter":
            self.counter(name)
        else:
            self.gauge(name)

    def gauge_add(self, name: str, by: int) -> None:
        self.gauge(name).value += by

    def gauge_set(self, name: str, value: int) -> None:
        self.gauge(name).value = value

    def family(self, name: str, kind: FamilyKind, label_names: Sequence[str], *,
               buckets: Sequence[float] = DEFAULT_BUCKETS, namespace: str = "") -> Family:
        """The labelled family ``name``, created on first use. Asking again with another
        shape is a programming error."""
        fam = self.families.get(name)
        if fam is not None and fam.label_names is label_names and fam.kind == kind:
            return fam      # the hot path: the caller passes its constant tuple again
        shape = (kind, tuple(label_names),
                 tuple(buckets) if kind == "histogram" else (), namespace)
        if fam is None:
            fam = self.families[name] = Family(kind=shape[0], label_names=shape[1],
                                               buckets=shape[2], namespace=shape[3])
        elif (fam.kind, fam.label_names, fam.buckets, fam.namespace) != shape:
            raise ValueError(f"stat family {name} already exists with another shape")
        return fam

    def snapshot(self) -> StatsSnapshot:
        return StatsSnapshot(counters=self.counters, gauges=self.gauges,
                             families={n: f.copy() for n, f in self.families.items()})

    def reset_counters(self) -> None:
        for c in self._counters.values():
            c.value = 0
        for fam in self.families.values():
            if fam.kind == "counter":
                for c in fam.cells.values():
                    c.value = 0


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
