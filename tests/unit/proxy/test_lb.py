"""Load balancers with a seeded RNG: which hosts, in what proportions, skipping the unhealthy."""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass

import pytest

from remora.proxy.lb import (
    LeastRequest,
    RandomLb,
    RoundRobin,
    hosts_to_use,
    make_lb,
    pick_weighted,
)


@dataclass(eq=False)
class H:
    name: str
    weight: int = 1
    healthy: bool = True
    active_requests: int = 0

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
    assert type(make_lb(policy, [H("a")], random.Random(0))) is cls  # type: ignore[arg-type]


def test_pick_weighted() -> None:
    rng = random.Random(8)
    assert pick_weighted([0, 0], rng) is None
    assert pick_weighted([], rng) is None
    got = Counter(pick_weighted([1, 0, 3], rng) for _ in range(4000))
    assert set(got) == {0, 2}
    assert 850 < got[0] < 1150
