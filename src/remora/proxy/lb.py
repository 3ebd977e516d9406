"""Load balancers: which host of a cluster gets the next connection. Pure: no IO, no clock.

Owns: Envoy's ROUND_ROBIN (weighted by earliest-deadline-first when weights differ), its
LEAST_REQUEST (power of two choices on active requests when all weights are equal, else EDF
with weights divided by ``active + 1``), RANDOM (uniform, weights ignored), the choice of the
hosts to balance over (healthy ones; all of them in "panic" when fewer than the panic
threshold, 50 %, are healthy), and weighted choice among clusters.
Must not: know about sockets, clusters' configs or stats; randomness comes from an injected
``random.Random`` so tests are repeatable and workers differ.

References: Envoy docs ``arch_overview/upstream/load_balancing/load_balancers.rst`` and
``panic_threshold.rst``; ``source/common/upstream/load_balancer_impl.cc`` (behaviour, not code).
Simplifications: one priority level (hosts of every priority are balanced together), no
locality weighting, no slow start.
"""

from __future__ import annotations

import heapq
import random
from collections.abc import Callable, Sequence
from typing import Generic, Protocol, TypeVar

from remora.proxy.model import LbPolicy

DEFAULT_PANIC_THRESHOLD = 50.0   # percent (Envoy common_lb_config.healthy_panic_threshold)
DEFAULT_CHOICE_COUNT = 2          # Envoy LeastRequestLbConfig.choice_count
DEFAULT_ACTIVE_REQUEST_BIAS = 1.0  # Envoy LeastRequestLbConfig.active_request_bias


class LbHost(Protocol):
    """What a balancer reads of a host."""

    @property
    def weight(self) -> int: ...

    @property
    def healthy(self) -> bool: ...

    @property
    def active_requests(self) -> int: ...


H = TypeVar("H", bound=LbHost)


def hosts_to_use(hosts: Sequence[H], panic_threshold: float = DEFAULT_PANIC_THRESHOLD,
                 ) -> tuple[list[H], bool]:
    """The hosts to balance over and whether the cluster is in panic (then: all hosts)."""
    healthy = [h for h in hosts if h.healthy]
    if hosts and 100.0 * len(healthy) < panic_threshold * len(hosts):
        return list(hosts), True
    return healthy, False


class _Edf(Generic[H]):
    """Earliest-deadline-first: each host is due again ``1/weight`` after it was picked; the
    smallest deadline wins, ties in insertion order."""

    def __init__(self, hosts: Sequence[H], weight: Callable[[H], float]) -> None:
        self._weight = weight
        self._now = 0.0
        self._seq = 0
        self._heap: list[tuple[float, int, int]] = []
        self._hosts = list(hosts)
        for i, h in enumerate(self._hosts):
            self._push(i, h)

    def _push(self, index: int, host: H) -> None:
        w = self._weight(host)
        heapq.heappush(self._heap, (self._now + 1.0 / w if w > 0 else float("inf"), self._seq,
                                    index))
        self._seq += 1

    def pick(self) -> H | None:
        if not self._heap:
            return None
        deadline, _, index = heapq.heappop(self._heap)
        if deadline != float("inf"):
            self._now = deadline
        host = self._hosts[index]
        self._push(index, host)
        return host


class LoadBalancer(Generic[H]):
    """Picks among a host set; :meth:`update` replaces the set (membership or health change)."""

    def __init__(self, hosts: Sequence[H], rng: random.Random,
                 panic_threshold: float = DEFAULT_PANIC_THRESHOLD) -> None:
        self.rng = rng
        self.panic_threshold = panic_threshold
        self.panic = False
        self._hosts: list[H] = []
        self.update(hosts)

    def update(self, hosts: Sequence[H]) -> None:
        self._hosts, self.panic = hosts_to_use(hosts, self.panic_threshold)
        self._rebuild()

    def _rebuild(self) -> None:
        """Recompute per-set state after :meth:`update`."""

    @property
    def hosts(self) -> list[H]:
        return self._hosts

    def pick(self) -> H | None:
        raise NotImplementedError


def _equal_weights(hosts: Sequence[LbHost]) -> bool:
    return len({h.weight for h in hosts}) <= 1


class RoundRobin(LoadBalancer[H]):
    """Rotation from a random start (so workers do not all begin with the same host); EDF
    on the static weights when they differ."""

    def _rebuild(self) -> None:
        n = len(self._hosts)
        self._index = self.rng.randrange(n) if n else 0
        self._edf: _Edf[H] | None = None
        if not _equal_weights(self._hosts):
            self._edf = _Edf(self._hosts, lambda h: float(h.weight))
            for _ in range(self.rng.randrange(n)):
                self._edf.pick()

    def pick(self) -> H | None:
        if not self._hosts:
            return None
        if self._edf is not None:
            return self._edf.pick()
        host = self._hosts[self._index % len(self._hosts)]
        self._index += 1
        return host


class LeastRequest(LoadBalancer[H]):
    """Power of ``choice_count`` choices on active requests (equal weights); otherwise EDF with
    each host's weight divided by ``(active + 1) ** active_request_bias``, recomputed when the
    host is scheduled again."""

    def __init__(self, hosts: Sequence[H], rng: random.Random,
                 panic_threshold: float = DEFAULT_PANIC_THRESHOLD, *,
                 choice_count: int = DEFAULT_CHOICE_COUNT,
                 active_request_bias: float = DEFAULT_ACTIVE_REQUEST_BIAS) -> None:
        self.choice_count = max(1, choice_count)
        self.bias = active_request_bias
        super().__init__(hosts, rng, panic_threshold)

    def _rebuild(self) -> None:
        self._edf: _Edf[H] | None = None
        if not _equal_weights(self._hosts):
            bias = self.bias
            self._edf = _Edf(self._hosts,
                             lambda h: h.weight / float(h.active_requests + 1) ** bias)

    def pick(self) -> H | None:
        hosts = self._hosts
        if not hosts:
            return None
        if self._edf is not None:
            return self._edf.pick()
        n = len(hosts)
        best = hosts[self.rng.randrange(n)]
        for _ in range(self.choice_count - 1):
            other = hosts[self.rng.randrange(n)]
            if other.active_requests < best.active_requests:
                best = other
        return best


class RandomLb(LoadBalancer[H]):
    """Uniform among the hosts to use (Envoy's RANDOM ignores weights)."""

    def pick(self) -> H | None:
        if not self._hosts:
            return None
        return self._hosts[self.rng.randrange(len(self._hosts))]


def make_lb(policy: LbPolicy, hosts: Sequence[H], rng: random.Random) -> LoadBalancer[H]:
    """The balancer for a cluster's ``lb_policy``. CLUSTER_PROVIDED (ORIGINAL_DST) has none of
    its own; it gets round robin, which is never consulted for such clusters."""
    if policy == "LEAST_REQUEST":
        return LeastRequest(hosts, rng)
    if policy == "RANDOM":
        return RandomLb(hosts, rng)
    return RoundRobin(hosts, rng)


def pick_weighted(weights: Sequence[int], rng: random.Random) -> int | None:
    """Index chosen with probability proportional to its weight (tcp_proxy
    ``weighted_clusters``); None when every weight is 0."""
    total = sum(weights)
    if total <= 0:
        return None
    r = rng.randrange(total)
    for i, w in enumerate(weights):
        if r < w:
            return i
        r -= w
    raise AssertionError("unreachable")
