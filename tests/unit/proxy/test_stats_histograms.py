"""Labelled families and histograms in the stat store, snapshots, merge and Prometheus text."""

from __future__ import annotations

import json
import re

import pytest

from remora.proxy import admin_format as fmt
from remora.proxy.stats import DEFAULT_BUCKETS, Stats, StatsSnapshot, merge


def test_default_buckets_are_envoys() -> None:
    assert DEFAULT_BUCKETS == (0.5, 1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000,
                               30000, 60000, 300000, 600000, 1800000, 3600000)


@pytest.mark.parametrize(("value", "first_le"), [
    (0, 0.5), (0.49, 0.5), (0.5, 1), (0.99, 1), (1, 5), (4, 5), (5, 10), (24, 25), (25, 50),
    (3599999, 3600000), (3600000, None), (10**9, None)])
def test_bucket_edges_follow_envoy(value: float, first_le: float | None) -> None:
    # Envoy's buckets behave as "less than": a value equal to a bound counts in the next one.
    fam = Stats().family("h", "histogram", ())
    fam.observe((), value)
    h = fam.histograms[()]
    cum = h.cumulative()
    for bound, c in zip(DEFAULT_BUCKETS, cum, strict=True):
        expected = 1 if first_le is not None and bound >= first_le else 0
        assert c == expected, (value, bound)
    assert h.count == 1 and h.sum == value


def test_family_shape_is_fixed() -> None:
    s = Stats()
    fam = s.family("c", "counter", ("a",))
    assert s.family("c", "counter", ["a"]) is fam
    with pytest.raises(ValueError, match="another shape"):
        s.family("c", "counter", ("b",))


def test_existing_api_unchanged() -> None:
    s = Stats()
    s.inc("x")
    s.declare("y", "gauge")
    s.gauge_add("y", 3)
    snap = s.snapshot()
    assert snap.to_json() == {"counters": {"x": 1}, "gauges": {"y": 3}}
    assert StatsSnapshot.from_json(snap.to_json()) == snap


def _two_workers() -> tuple[StatsSnapshot, StatsSnapshot]:
    a, b = Stats(), Stats()
    for st, n in ((a, 1), (b, 2)):
        c = st.family("istio_requests_total", "counter", ("reporter", "code"),
                      namespace="istiocustom")
        c.inc(("source", "200"), n)
        h = st.family("istio_request_duration_milliseconds", "histogram", ("reporter",),
                      namespace="istiocustom")
        h.observe(("source",), 3 * n)
    b.families["istio_requests_total"].inc(("source", "503"))
    return a.snapshot(), b.snapshot()


def test_snapshot_json_round_trip_and_merge() -> None:
    a, b = _two_workers()
    # snapshots cross processes as JSON
    a2 = StatsSnapshot.from_json(json.loads(json.dumps(a.to_json())))
    b2 = StatsSnapshot.from_json(json.loads(json.dumps(b.to_json())))
    assert a2 == a and b2 == b
    m = merge([a2, b2])
    assert m.families["istio_requests_total"].values == {("source", "200"): 3,
                                                         ("source", "503"): 1}
    h = m.families["istio_request_duration_milliseconds"].histograms[("source",)]
    assert h.count == 2 and h.sum == 9
    assert h.cumulative()[:4] == [0, 0, 1, 2]          # 3 ms in le=5, 6 ms in le=10
    # merging never aliases a worker's data
    assert a.families["istio_requests_total"].values[("source", "200")] == 1


def test_reset_counters_zeroes_labelled_counters() -> None:
    s = Stats()
    s.family("c", "counter", ("a",)).inc(("x",), 5)
    s.family("h", "histogram", ()).observe((), 1)
    s.reset_counters()
    assert s.families["c"].values == {("x",): 0}
    assert s.families["h"].histograms[()].count == 1


def test_prometheus_text_for_a_small_store() -> None:
    s = Stats()
    s.inc("cluster.c.upstream_cx_total", 2)
    s.gauge_set("server.live", 1)
    req = s.family("istio_requests_total", "counter", ("reporter", "response_code"),
                   namespace="istiocustom")
    req.inc(("source", "503"))
    req.inc(("destination", "200"), 3)
    dur = s.family("istio_request_duration_milliseconds", "histogram",
                   ("reporter",), buckets=(0.5, 10, 1800000), namespace="istiocustom")
    dur.observe(("source",), 10)
    dur.observe(("source",), 2)
    # Written by hand from Envoy's prometheus_stats.cc rules: counters, gauges, histograms;
    # groups sorted by tag-extracted name ("cluster…" < "istiocustom…"), series by full name
    # ("…reporter.destination…" < "…reporter.source…"); bounds with {:.32g}; cumulative
    # buckets; custom-namespace metrics have no "envoy_" prefix.
    expected = (
        "# TYPE envoy_cluster_upstream_cx_total counter\n"
        'envoy_cluster_upstream_cx_total{cluster_name="c"} 2\n'
        "\n"
        "# TYPE istio_requests_total counter\n"
        'istio_requests_total{reporter="destination",response_code="200"} 3\n'
        'istio_requests_total{reporter="source",response_code="503"} 1\n'
        "\n"
        "# TYPE envoy_server_live gauge\n"
        "envoy_server_live{} 1\n"
        "\n"
        "# TYPE istio_request_duration_milliseconds histogram\n"
        'istio_request_duration_milliseconds_bucket{reporter="source",le="0.5"} 0\n'
        'istio_request_duration_milliseconds_bucket{reporter="source",le="10"} 1\n'
        'istio_request_duration_milliseconds_bucket{reporter="source",le="1800000"} 2\n'
        'istio_request_duration_milliseconds_bucket{reporter="source",le="+Inf"} 2\n'
        'istio_request_duration_milliseconds_sum{reporter="source"} 12\n'
        'istio_request_duration_milliseconds_count{reporter="source"} 2\n'
        "\n")
    assert fmt.render_prometheus(s.snapshot()) == expected


def test_prometheus_untagged_histogram_filter_usedonly_and_escaping() -> None:
    s = Stats()
    s.family("upstream_rq_time", "histogram", (), buckets=(1.5,)).observe((), 0.25)
    s.family("odd", "counter", ("v",), namespace="ns").inc(('a"b\\c\nd',))
    s.family("odd", "counter", ("v",), namespace="ns").inc(("zero",), 0)
    text = fmt.render_prometheus(s.snapshot(), used_only=True)
    assert text == (
        "# TYPE odd counter\n"
        'odd{v="a\\"b\\\\c\\nd"} 1\n'
        "\n"
        "# TYPE envoy_upstream_rq_time histogram\n"
        'envoy_upstream_rq_time_bucket{le="1.5"} 1\n'
        'envoy_upstream_rq_time_bucket{le="+Inf"} 1\n'
        "envoy_upstream_rq_time_sum{} 0.25\n"
        "envoy_upstream_rq_time_count{} 1\n"
        "\n")
    only = fmt.render_prometheus(s.snapshot(), pattern=re.compile(r"\.v\.zero$"))
    assert only == "# TYPE odd counter\nodd{v=\"zero\"} 0\n\n"


def test_stats_text_lists_labelled_counters_by_full_name() -> None:
    s = Stats()
    s.inc("a", 1)
    s.family("istio_requests_total", "counter", ("reporter", "response_code"),
             namespace="istiocustom").inc(("source", "200"), 4)
    s.family("h", "histogram", ()).observe((), 1)
    assert fmt.render_stats(s.snapshot()) == (
        "a: 1\n"
        "istiocustom.istio_requests_total.reporter.source.response_code.200: 4\n")
    assert fmt.render_stats(s.snapshot(), type="Gauges") == ""


def test_default_bucket_index_is_bisect_right_over_the_default_buckets() -> None:
    import bisect

    from remora.proxy.stats import bucket_index, default_bucket_index
    values = [-1.0, 0.0, 1e-9, 1e12]
    for b in DEFAULT_BUCKETS:
        values += [b - 0.5, b - 1e-6, b, b + 1e-6, b + 0.5]
    for v in values:
        assert default_bucket_index(v) == bisect.bisect_right(DEFAULT_BUCKETS, v), v
        assert bucket_index(DEFAULT_BUCKETS, v) == bisect.bisect_right(DEFAULT_BUCKETS, v), v


def test_custom_buckets_do_not_take_the_default_path() -> None:
    fam = Stats().family("h", "histogram", (), buckets=(2.0, 3.0))
    fam.observe((), 2.5)
    assert fam.histograms[()].counts == [0, 1, 0]


def test_cells_are_the_store() -> None:
    s = Stats()
    cell = s.counter("a")
    assert s.counters == {"a": 0}                       # declared by taking its cell
    cell.value += 2
    s.inc("a")
    assert s.counter("a") is cell and s.counters == {"a": 3}
    g = s.gauge("g")
    s.gauge_add("g", 5)
    g.value -= 1
    assert s.gauges == {"g": 4} and s.snapshot().gauges == {"g": 4}
    s.counters["a"] = 100                               # a copy: the store is unchanged
    assert s.counters == {"a": 3}
    s.reset_counters()
    assert cell.value == 0 and s.gauges == {"g": 4}


def test_family_counter_cells_follow_the_labels_not_the_last_tuple() -> None:
    fam = Stats().family("c", "counter", ("a",))
    x, y = ("x",), ("y",)
    fam.inc(x)
    fam.inc(y, 2)
    fam.inc(("x",))                                     # equal labels, another tuple
    fam.inc(x)
    assert fam.values == {("x",): 3, ("y",): 2}
