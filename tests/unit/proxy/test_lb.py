"""Load balancers with a seeded RNG: which hosts, in what proportions, skipping the unhealthy."""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass
from typing import Any

import pytest

from remora.proxy.lb import (
    LeastRequest,
    Maglev,
    PriorityLb,
    RandomLb,
    RingHash,
    RoundRobin,
    hosts_to_use,
    make_lb,
    pick_weighted,
    priority_loads,
    slow_start_factor,
)
from remora.proxy.model import SlowStart


@dataclass(eq=False)
class H:
    name: str
    weight: int = 1
    healthy: bool = True
    active_requests: int = 0
    degraded: bool = False
    priority: int = 0
    created: float = 0.0
    locality: tuple[str, str, str] = ("", "", "")
    locality_weight: int = 0

    @property
    def address_text(self) -> str:
        return self.name

    def __repr__(self) -> str:
        return self.name


def counts(lb: object, n: int) -> Counter[str]:
    pick = lb.pick  # type: ignore[attr-defined]
    return Counter(pick().name for _ in range(n))


def test_hosts_to_use_skips_unhealthy() -> None:
    a, b, c = H("a"), H("b", healthy=False), H("c")
    assert hosts_to_use([a, b, c]) == ([a, c], False)


def test_panic_when_fewer_than_half_are_healthy_uses_all_hosts() -> None:
    a, b, c = H("a"), H("b", healthy=False), H("c", healthy=False)
    assert hosts_to_use([a, b, c]) == ([a, b, c], True)
    # exactly 50 % healthy is not panic
    assert hosts_to_use([a, b]) == ([a], False)


def test_no_hosts_no_pick() -> None:
    rng = random.Random(1)
    for lb in (RoundRobin([], rng), LeastRequest([], rng), RandomLb([], rng)):
        assert lb.pick() is None


def test_round_robin_rotates_over_healthy_hosts() -> None:
    hosts = [H("a"), H("b", healthy=False), H("c"), H("d")]
    lb = RoundRobin(hosts, random.Random(7))
    seq = [lb.pick() for _ in range(6)]
    names = [h.name for h in seq if h is not None]
    assert "b" not in names
    assert names[:3] == names[3:]          # a strict rotation
    assert sorted(names[:3]) == ["a", "c", "d"]


def test_round_robin_starts_at_a_seeded_random_offset() -> None:
    hosts = [H(str(i)) for i in range(10)]
    firsts = {RoundRobin(hosts, random.Random(seed)).pick().name  # type: ignore[union-attr]
              for seed in range(20)}
    assert len(firsts) > 3


def test_round_robin_weighted_is_proportional() -> None:
    lb = RoundRobin([H("a", weight=1), H("b", weight=3)], random.Random(3))
    assert counts(lb, 400) == Counter({"a": 100, "b": 300})


def test_round_robin_update_changes_membership() -> None:
    a, b = H("a"), H("b")
    lb = RoundRobin([a], random.Random(0))
    assert counts(lb, 4) == Counter({"a": 4})
    lb.update([a, b])
    assert counts(lb, 4) == Counter({"a": 2, "b": 2})


def test_least_request_p2c_prefers_the_less_loaded_host() -> None:
    idle, busy = H("idle"), H("busy", active_requests=10)
    lb = LeastRequest([idle, busy], random.Random(11))
    got = counts(lb, 4000)
    # busy wins only when both random choices are busy: 1/4 of the time
    assert 850 < got["busy"] < 1150
    assert got["idle"] + got["busy"] == 4000


def test_least_request_equal_load_spreads_evenly() -> None:
    lb = LeastRequest([H("a"), H("b"), H("c")], random.Random(5))
    got = counts(lb, 3000)
    assert all(900 < got[n] < 1100 for n in "abc")


def test_least_request_choice_count_one_is_random() -> None:
    idle, busy = H("idle"), H("busy", active_requests=10)
    got = counts(LeastRequest([idle, busy], random.Random(2), choice_count=1), 2000)
    assert 900 < got["busy"] < 1100


def test_least_request_weighted_uses_weight_over_active() -> None:
    a, b = H("a", weight=1), H("b", weight=2)
    lb = LeastRequest([a, b], random.Random(0))
    assert counts(lb, 300) == Counter({"a": 100, "b": 200})
    # b now carries 3 active requests: effective weights 1/1 and 2/4
    b.active_requests = 3
    lb.update([a, b])
    got = counts(lb, 300)
    assert got["a"] == 200 and got["b"] == 100


def test_least_request_skips_unhealthy() -> None:
    lb = LeastRequest([H("a"), H("b", healthy=False), H("c")], random.Random(9))
    assert set(counts(lb, 200)) == {"a", "c"}


def test_random_is_uniform_and_ignores_weights() -> None:
    lb = RandomLb([H("a", weight=1), H("b", weight=9)], random.Random(4))
    got = counts(lb, 4000)
    assert 1800 < got["a"] < 2200


def test_random_is_repeatable_with_a_seed() -> None:
    hosts = [H("a"), H("b"), H("c")]
    one = [RandomLb(hosts, random.Random(42)).pick() for _ in range(1)]
    two = [RandomLb(hosts, random.Random(42)).pick() for _ in range(1)]
    assert one == two


@pytest.mark.parametrize(("policy", "cls"), [("ROUND_ROBIN", RoundRobin),
                                             ("LEAST_REQUEST", LeastRequest),
                                             ("RANDOM", RandomLb),
                                             ("CLUSTER_PROVIDED", RoundRobin)])
def test_make_lb(policy: str, cls: type) -> None:
    lb = make_lb(policy, [H("a")], random.Random(0))  # type: ignore[arg-type]
    assert type(lb) is PriorityLb and len(lb.levels) == 1 and type(lb.levels[0]) is cls


def test_pick_weighted() -> None:
    rng = random.Random(8)
    assert pick_weighted([0, 0], rng) is None
    assert pick_weighted([], rng) is None
    got = Counter(pick_weighted([1, 0, 3], rng) for _ in range(4000))
    assert set(got) == {0, 2}
    assert 850 < got[0] < 1150


# ============================================================================ consistent hashing


def _hosts(n: int) -> list[H]:
    """Hosts named by their addresses (the hashing balancers' key)."""
    return [H(f"10.1.0.{i}:8080") for i in range(1, n + 1)]


@pytest.mark.parametrize("make", [lambda hs: RingHash(hs, random.Random(1)),
                                  lambda hs: Maglev(hs, random.Random(1), table_size=65537)])
def test_hash_balancers_are_consistent_and_spread(make: Any) -> None:
    hosts = _hosts(4)
    lb = make(hosts)
    keys = [random.Random(k).getrandbits(64) for k in range(4000)]
    first = [lb.pick(k) for k in keys]
    assert [lb.pick(k) for k in keys] == first                  # same hash, same host
    share = Counter(h.name for h in first)
    assert len(share) == 4 and min(share.values()) > 4000 / 4 * 0.75, share
    # a second balancer over the same hosts (another worker, another process) agrees
    other = make(list(hosts))
    assert [other.pick(k) for k in keys] == first
    # one host leaves: most keys stay where they were (not all: the ring is rescaled to its
    # minimum size over the remaining hosts, 342 points each instead of 256, as in Envoy)
    gone = hosts[1]
    lb.update([h for h in hosts if h is not gone])
    after = [lb.pick(k) for k in keys]
    kept = [a is b for a, b in zip(first, after, strict=True) if b is not gone and a is not gone]
    assert gone not in after
    assert sum(kept) / len(kept) > 0.8, sum(kept) / len(kept)


def test_ring_size_and_weights() -> None:
    hosts = _hosts(3)
    assert RingHash(hosts, random.Random(1)).ring_size == 3 * 342      # ceil(1024 / 3) each
    assert RingHash(hosts, random.Random(1), min_size=8, max_size=16).ring_size == 9
    heavy = [H("10.2.0.1:80", weight=1), H("10.2.0.2:80", weight=3)]
    lb = RingHash(heavy, random.Random(1))
    assert lb.ring_size == 1024                                         # 256 + 768 points
    got = Counter(lb.pick(random.Random(k).getrandbits(64)).name  # type: ignore[union-attr]
                  for k in range(8000))
    assert 0.18 < got["10.2.0.1:80"] / 8000 < 0.32, got


def test_maglev_table_is_full_and_weighted() -> None:
    lb = Maglev(_hosts(3), random.Random(1), table_size=31)
    assert sorted(lb.slot_counts()) == [10, 10, 11]                    # equal turns
    heavy = [H("10.2.0.1:80", weight=1), H("10.2.0.2:80", weight=2)]
    counts = Maglev(heavy, random.Random(1), table_size=65537).slot_counts()
    assert sum(counts) == 65537 and abs(counts[1] / counts[0] - 2) < 0.01, counts


@pytest.mark.parametrize("cls", [RingHash, Maglev])
def test_hash_balancers_retry_elsewhere_and_pick_at_random_without_a_hash(cls: Any) -> None:
    hosts = _hosts(3)
    lb = cls(hosts, random.Random(5))
    moved = sum(lb.pick(k, 1) is not lb.pick(k) for k in range(0, 2**64 - 1, 2**54))
    assert moved > 300                       # attempt 1 goes elsewhere for most keys (of 1024)
    assert {lb.pick() for _ in range(200)} == set(hosts)
    sick = H("10.1.0.9:8080", healthy=False)
    lb.update([*hosts, sick])                # 3 of 4 healthy: no panic, the sick one unused
    assert {lb.pick(k) for k in range(0, 2**64 - 1, 2**54)} == set(hosts)
    lb.update([])
    assert lb.pick(12345) is None


def test_make_lb_hashing_policies() -> None:
    ring = make_lb("RING_HASH", _hosts(2), random.Random(0), ring_min=64, ring_max=64).levels[0]
    assert isinstance(ring, RingHash) and ring.ring_size == 64
    maglev = make_lb("MAGLEV", _hosts(2), random.Random(0), maglev_table=7).levels[0]
    assert isinstance(maglev, Maglev) and sum(maglev.slot_counts()) == 7


# ---------------------------------------------------------------- priority levels (failover)

def level(percent_healthy: int, priority: int = 0) -> list[H]:
    """100 hosts of one priority, ``percent_healthy`` of them healthy."""
    return [H(f"p{priority}-{i}", healthy=i < percent_healthy, priority=priority)
            for i in range(100)]


@pytest.mark.parametrize(("healthy", "loads"), [
    # Envoy's priority.rst, two levels, P=1 fully healthy
    ((100, 100), [100, 0]), ((72, 100), [100, 0]), ((71, 100), [99, 1]),
    ((50, 100), [70, 30]), ((25, 100), [35, 65]), ((0, 100), [0, 100]),
    # both levels degrade
    ((72, 72), [100, 0]), ((71, 71), [99, 1]), ((50, 50), [70, 30]),
    ((25, 25), [50, 50]),
    # three levels
    ((100, 100, 100), [100, 0, 0]), ((72, 72, 100), [100, 0, 0]),
    ((71, 71, 100), [99, 1, 0]), ((50, 50, 100), [70, 30, 0]),
    ((25, 100, 100), [35, 65, 0]), ((25, 25, 100), [35, 35, 30]),
    # the docs round this row to 36/36/28; Envoy's code truncates each share (35, 35, 28) and
    # gives the remainder to the first level with health
    ((25, 25, 20), [37, 35, 28]),
])
def test_priority_loads_match_envoys_tables(healthy: tuple[int, ...], loads: list[int]) -> None:
    """The load spread alone (panic off: with it, rows where every level is under 50 %
    healthy are total panic, spread by host counts; see test_priority_panic)."""
    got, _, _ = priority_loads([level(h, p) for p, h in enumerate(healthy)],
                               panic_threshold=0)
    assert got == loads
    assert sum(got) == 100


@pytest.mark.parametrize(("healthy", "loads", "panics"), [
    # Envoy's panic_threshold.rst: no level panics while the total health is 100 %
    ((5, 100), [7, 93], [False, False]),
    ((25, 25), [50, 50], [True, True]),
    ((5, 65), [8, 92], [True, False]),     # docs: 7/93 (rounded, as above)
    ((25, 25, 20), [34, 33, 33], [True, True, True]),
    # nothing healthy anywhere: total panic, the load follows the host counts
    ((0, 0), [50, 50], [True, True]),
])
def test_priority_panic(healthy: tuple[int, ...], loads: list[int],
                        panics: list[bool]) -> None:
    assert priority_loads([level(h, p) for p, h in enumerate(healthy)]) == (
        loads, [0] * len(loads), panics)


def test_priority_total_panic_by_host_counts_and_threshold_zero() -> None:
    small = [H("a", healthy=False)]
    large = [H(f"b{i}", healthy=False, priority=1) for i in range(3)]
    assert priority_loads([small, large]) == ([25, 75], [0, 0], [True, True])
    # panic disabled: nothing healthy means P0 gets it all, and has nothing to pick
    assert priority_loads([small, large], panic_threshold=0) == ([100, 0], [0, 0],
                                                                 [False, False])
    lb = make_lb("ROUND_ROBIN", [*small, *large], random.Random(0), panic_threshold=0)
    assert lb.pick() is None
    # an empty level in between counts as a level with no health
    assert priority_loads([[H("a")], [], [H("c", priority=2)]]) == (
        [100, 0, 0], [0, 0, 0], [False, False, False])


def test_overprovisioning_factor() -> None:
    # factor 100: a level takes exactly its healthy share
    assert priority_loads([level(80, 0), level(100, 1)], overprovisioning=100)[0] == [80, 20]
    assert priority_loads([level(80, 0), level(100, 1)])[0] == [100, 0]


def test_failover_moves_traffic_to_the_next_priority() -> None:
    """Istio's locality failover: local endpoints at P0, the next locality at P1. Traffic
    stays local while enough local hosts are healthy and spills over as they fail."""
    local = [H(f"l{i}") for i in range(4)]
    remote = [H(f"r{i}", priority=1) for i in range(2)]
    lb = make_lb("ROUND_ROBIN", [*local, *remote], random.Random(3))
    assert set(counts(lb, 400)) == {"l0", "l1", "l2", "l3"}
    for h in local[:2]:
        h.healthy = False           # 50 % healthy: P0 takes 70 %
    lb.update([*local, *remote])
    got = counts(lb, 4000)
    assert set(got) == {"l2", "l3", "r0", "r1"}
    assert 0.66 < (got["l2"] + got["l3"]) / 4000 < 0.74
    for h in local:
        h.healthy = False
    lb.update([*local, *remote])
    assert set(counts(lb, 400)) == {"r0", "r1"}
    assert not lb.panic and lb.hosts == remote


def test_hashing_policies_choose_the_level_by_the_hash() -> None:
    local = [H(f"l{i}", healthy=i == 0) for i in range(2)]      # 50 %: P0 takes 70 %
    remote = [H("r0", priority=1)]
    for policy in ("RING_HASH", "MAGLEV"):
        lb = make_lb(policy, [*local, *remote], random.Random(5))  # type: ignore[arg-type]
        # the same request hash always lands on the same level and host
        for key in range(0, 10**6, 9973):
            first = lb.pick(key)
            assert first is not None and all(lb.pick(key) is first for _ in range(3))
            assert first.name == ("l0" if key % 100 < 70 else "r0")


# ---------------------------------------------------------------------------- slow start

class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_slow_start_factor_follows_envoys_formula() -> None:
    slow = SlowStart(window=60.0)
    assert slow_start_factor(slow, 0.0) == 0.1          # max(age, 1) / 60 < 10 %: the floor
    assert slow_start_factor(slow, 30.0) == 0.5
    assert slow_start_factor(slow, 60.0) == 1.0
    fast = SlowStart(window=100.0, aggression=2.0, min_weight_percent=0.0)
    assert slow_start_factor(fast, 25.0) == 0.5          # sqrt(0.25)
    assert slow_start_factor(fast, 0.0) == 0.1           # sqrt(1 / 100): age counts as 1 s


@pytest.mark.parametrize("policy", ["ROUND_ROBIN", "LEAST_REQUEST"])
def test_a_new_host_ramps_up_over_the_window(policy: str) -> None:
    """Istio's warmupDurationSecs: a host that joins takes a growing share of the picks
    over the window (here the share its scaled weight gives it), then its full share."""
    clock = Clock()
    old = [H(f"o{i}", created=0.0) for i in range(3)]
    new = H("new", created=clock.now)
    lb = make_lb(policy, [*old, new], random.Random(7),  # type: ignore[arg-type]
                 slow_start=SlowStart(window=60.0), clock=clock)
    shares = []
    for age in (0.0, 30.0, 59.0):
        clock.now = new.created + age
        lb.update([*old, new])          # (fresh schedule: the share at this age alone)
        shares.append(counts(lb, 3000)["new"] / 3000)
    expected = [0.1 / 3.1, 0.5 / 3.5, (59 / 60) / (3 + 59 / 60)]
    for got, want in zip(shares, expected, strict=True):
        assert abs(got - want) < 0.02, (shares, expected)
    clock.now = new.created + 60.0      # the window has passed: the plain method again
    assert counts(lb, 4000)["new"] == 1000 if policy == "ROUND_ROBIN" else \
        abs(counts(lb, 4000)["new"] / 4000 - 0.25) < 0.03
    assert lb.levels[0]._edf is None    # type: ignore[attr-defined]


def test_slow_start_without_a_window_open_changes_nothing() -> None:
    clock = Clock()
    hosts = [H(f"h{i}", created=0.0) for i in range(4)]
    lb = make_lb("ROUND_ROBIN", hosts, random.Random(2), slow_start=SlowStart(window=60.0),
                 clock=clock)
    assert lb.levels[0]._edf is None    # type: ignore[attr-defined]
    assert set(counts(lb, 400).values()) == {100}


# ----------------------------------------------------------------- locality weighting

@pytest.mark.parametrize(("x_healthy", "x_share"), [
    # Envoy's locality_weight.rst: X weight 1, Y weight 2 and fully healthy
    (100, 33), (70, 33), (69, 32), (50, 26), (25, 15), (0, 0)])
@pytest.mark.parametrize("policy", ["ROUND_ROBIN", "LEAST_REQUEST", "RANDOM"])
def test_locality_weights_match_envoys_table(policy: str, x_healthy: int,
                                             x_share: int) -> None:
    x = [H(f"x{i}", healthy=i < x_healthy, locality=("r", "x", ""), locality_weight=1)
         for i in range(100)]
    y = [H(f"y{i}", locality=("r", "y", ""), locality_weight=2) for i in range(100)]
    lb = make_lb(policy, [*x, *y], random.Random(4),  # type: ignore[arg-type]
                 locality_weighted=True)
    picks = 6000
    to_x = sum(1 for _ in range(picks) if lb.pick().name.startswith("x"))  # type: ignore[union-attr]
    assert abs(100 * to_x / picks - x_share) < 1.0, to_x / picks
    assert all(h.healthy for h in lb.hosts)


def test_localities_without_weight_get_nothing_and_panic_ignores_localities() -> None:
    a = [H("a0", locality=("r", "a", ""), locality_weight=3)]
    b = [H("b0", locality=("r", "b", ""))]                   # no weight: no traffic
    lb = make_lb("ROUND_ROBIN", [*a, *b], random.Random(1), locality_weighted=True)
    assert set(counts(lb, 50)) == {"a0"}
    # without locality weighting the weights are ignored
    assert set(counts(make_lb("ROUND_ROBIN", [*a, *b], random.Random(1)), 50)) == {"a0", "b0"}
    # a level in panic balances over all its hosts, localities aside
    sick = [H(f"s{i}", healthy=i == 0, locality=("r", f"z{i}", ""), locality_weight=1)
            for i in range(4)]
    lb = make_lb("ROUND_ROBIN", sick, random.Random(1), locality_weighted=True)
    assert lb.panic and set(counts(lb, 40)) == {"s0", "s1", "s2", "s3"}
    # no weighted locality left: the level's healthy hosts, as without weighting
    lb = make_lb("ROUND_ROBIN", b, random.Random(1), locality_weighted=True)
    assert set(counts(lb, 10)) == {"b0"}


# ------------------------------------------------------------------------ degraded hosts

@pytest.mark.parametrize(("mix", "healthy_share", "degraded_share"), [
    # Envoy's degraded.rst: P=0 healthy / degraded / unhealthy percent
    ((100, 0, 0), 100, 0), ((71, 0, 29), 100, 0), ((71, 29, 0), 99, 1),
    ((25, 65, 10), 35, 65)])
def test_degraded_hosts_take_what_the_healthy_cannot(mix: tuple[int, int, int],
                                                     healthy_share: int,
                                                     degraded_share: int) -> None:
    ok, degraded, _ = mix
    hosts = [H(f"h{i}", healthy=i < ok, degraded=ok <= i < ok + degraded)
             for i in range(100)]
    assert priority_loads([hosts]) == ([healthy_share], [degraded_share], [False])
    lb = make_lb("ROUND_ROBIN", hosts, random.Random(6))
    picks = [lb.pick() for _ in range(4000)]
    to_degraded = sum(1 for h in picks if h is not None and h.degraded) / 4000
    assert abs(100 * to_degraded - degraded_share) < 2.5
    assert all(h is not None and (h.healthy or h.degraded) for h in picks)


def test_degraded_hosts_count_against_panic() -> None:
    # 30 % healthy + 30 % degraded: 60 % available, above the 50 % threshold
    hosts = [H(f"h{i}", healthy=i < 3, degraded=3 <= i < 6) for i in range(10)]
    assert priority_loads([hosts]) == ([50], [50], [False])      # 42 and 42 of NTA 84
    # the same healthy hosts without the degraded ones: 30 % available, panic
    lone = [H(f"h{i}", healthy=i < 3) for i in range(10)]
    assert priority_loads([lone]) == ([100], [0], [True])
    # only degraded hosts left: they take everything
    only = [H(f"d{i}", healthy=False, degraded=True) for i in range(2)]
    lb = make_lb("LEAST_REQUEST", only, random.Random(1))
    assert {lb.pick().name for _ in range(20)} == {"d0", "d1"}  # type: ignore[union-attr]
