"""Load balancers: which host of a cluster gets the next connection. Pure: no IO.

Owns: Envoy's ROUND_ROBIN (weighted by earliest-deadline-first when weights differ), its
LEAST_REQUEST (power of two choices on active requests when all weights are equal, else EDF
with weights divided by ``active + 1``), RANDOM (uniform, weights ignored), the consistent
hashing balancers RING_HASH (a ketama ring of xxHash64 points, ``<address>_<i>``, as many per
host as its share of ``minimum_ring_size``) and MAGLEV (the Maglev paper's lookup table, with
Envoy's weighted fill), which pick by the request's hash (:mod:`remora.proxy.http.hashing`);
priority levels (:class:`PriorityLb`: each level's health with the overprovisioning factor,
the load spread over the levels, failover, and each level's "panic", when too few of its hosts
are healthy and all of them are used); locality weighting within a level
(:class:`LocalityWeighted`); slow start (a new host's weight ramping up over a
window, ROUND_ROBIN and LEAST_REQUEST); and weighted choice among clusters.
Must not: know about sockets, clusters' configs or stats; randomness comes from an injected
``random.Random`` and time (slow start's only) from an injected clock, so tests are
repeatable and workers differ.

References: Envoy docs ``arch_overview/upstream/load_balancing/load_balancers.rst``,
``priority.rst``, ``overprovisioning.rst``, ``panic_threshold.rst`` and ``slow_start.rst``;
``source/common/upstream/load_balancer_impl.cc`` (behaviour, not code). ``ring_hash_lb.cc`` and
``maglev_lb.cc`` for the two tables and what a retry (``attempt``) does to the choice.
Simplifications: degraded hosts are not picked by locality (Envoy weighs their localities as
it does the healthy ones'); locality weighting with ROUND_ROBIN, LEAST_REQUEST and RANDOM only
(Envoy's hashing balancers fold it into their tables); RING_HASH hashes with XX_HASH
only (MURMUR_HASH_2 is refused at start-up) and keys hosts by address (not
``use_hostname_for_hashing``).
"""

from __future__ import annotations

import heapq
import math
import random
from bisect import bisect_left
from collections.abc import Callable, Sequence
from typing import Final, Generic, Protocol, TypeVar

import xxhash

from remora.proxy.model import (
    DEFAULT_ACTIVE_REQUEST_BIAS,
    DEFAULT_CHOICE_COUNT,
    DEFAULT_MAGLEV_TABLE,
    DEFAULT_OVERPROVISIONING,
    DEFAULT_PANIC_THRESHOLD,
    DEFAULT_RING_MAX,
    DEFAULT_RING_MIN,
    LbPolicy,
    SlowStart,
)

_U64: Final = (1 << 64) - 1


class LbHost(Protocol):
    """What a balancer reads of a host."""

    @property
    def weight(self) -> int: ...

    @property
    def healthy(self) -> bool: ...

    @property
    def degraded(self) -> bool:
        """Available, but only for what the healthy hosts cannot take (EDS DEGRADED)."""
        ...

    @property
    def active_requests(self) -> int: ...

    @property
    def priority(self) -> int: ...

    @property
    def locality(self) -> tuple[str, str, str]:
        """(region, zone, sub_zone)."""
        ...

    @property
    def locality_weight(self) -> int:
        """Its locality's ``load_balancing_weight`` (0: unset)."""
        ...

    @property
    def created(self) -> float:
        """When the host joined its cluster (the balancer's clock): slow start's origin."""
        ...

    @property
    def address_text(self) -> str:
        """The address as Envoy prints it (``10.0.0.1:8080``, ``[::1]:8080``): RING_HASH's
        and MAGLEV's key for the host."""
        ...


H = TypeVar("H", bound=LbHost)
T = TypeVar("T")


def hosts_to_use(hosts: Sequence[H], panic_threshold: float = DEFAULT_PANIC_THRESHOLD,
                 ) -> tuple[list[H], bool]:
    """The hosts to balance over and whether the cluster is in panic (then: all hosts)."""
    healthy = [h for h in hosts if h.healthy]
    if hosts and 100.0 * len(healthy) < panic_threshold * len(hosts):
        return list(hosts), True
    return healthy, False


def slow_start_factor(slow: SlowStart, age: float) -> float:
    """Envoy's slow-start scale of a host's weight ``age`` seconds after it joined: from
    ``min_weight_percent`` up to 1 over the window, ``time ** (1 / aggression)``; 1 after."""
    if age >= slow.window:
        return 1.0
    time_factor = max(age, 1.0) / slow.window
    ramp: float = math.pow(time_factor, 1.0 / slow.aggression)
    return max(slow.min_weight_percent / 100.0, ramp)


class _Edf(Generic[T]):
    """Earliest-deadline-first: each entry (a host, a locality) is due again ``1/weight``
    after it was picked; the smallest deadline wins, ties in insertion order."""

    def __init__(self, hosts: Sequence[T], weight: Callable[[T], float]) -> None:
        self._weight = weight
        self._now = 0.0
        self._seq = 0
        self._heap: list[tuple[float, int, int]] = []
        self._hosts = list(hosts)
        for i, h in enumerate(self._hosts):
            self._push(i, h)

    def _push(self, index: int, host: T) -> None:
        w = self._weight(host)
        heapq.heappush(self._heap, (self._now + 1.0 / w if w > 0 else float("inf"), self._seq,
                                    index))
        self._seq += 1

    def pick(self) -> T | None:
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

    def assign(self, hosts: Sequence[H], panic: bool) -> None:
        """Balance over exactly ``hosts`` (the caller has decided on panic: a priority level)."""
        self._hosts, self.panic = list(hosts), panic
        self._rebuild()

    def assign_level(self, level: Sequence[H], panic: bool) -> None:
        """Balance over a priority level: all its hosts in panic, else its healthy ones."""
        self.assign(level if panic else [h for h in level if h.healthy], panic)

    def _rebuild(self) -> None:
        """Recompute per-set state after :meth:`update`."""

    @property
    def hosts(self) -> list[H]:
        return self._hosts

    def pick(self, hash_key: int | None = None, attempt: int = 0) -> H | None:
        """The next host. ``hash_key``: the request's hash (hash policies), which only the
        consistent-hashing balancers read; ``attempt`` > 0 asks them for another host, for a
        retry whose host predicate refused the last one."""
        raise NotImplementedError


def _equal_weights(hosts: Sequence[LbHost]) -> bool:
    return len({h.weight for h in hosts}) <= 1


class _SlowStarting(LoadBalancer[H]):
    """A balancer whose weights may ramp up (slow start): while any host is inside its
    window, picks go through EDF with each host's weight scaled by
    :func:`slow_start_factor`, recomputed each time the host is scheduled again (as Envoy's
    EDF scheduler does); once every window has passed, the plain method comes back."""

    def __init__(self, hosts: Sequence[H], rng: random.Random,
                 panic_threshold: float = DEFAULT_PANIC_THRESHOLD, *,
                 slow_start: SlowStart | None = None,
                 clock: Callable[[], float] | None = None) -> None:
        self.slow_start = slow_start
        self.clock = clock
        self._slow_until = -math.inf         # the last host's window ends then
        super().__init__(hosts, rng, panic_threshold)

    def _slow_window(self) -> bool:
        """Note when the last window ends; whether one is still open."""
        slow, clock = self.slow_start, self.clock
        if slow is None or clock is None or not self._hosts:
            self._slow_until = -math.inf
            return False
        until = max(h.created for h in self._hosts) + slow.window
        self._slow_until = until if clock() < until else -math.inf
        return self._slow_until != -math.inf

    def _scale(self, host: H) -> float:
        slow, clock = self.slow_start, self.clock
        if slow is None or clock is None:
            return 1.0
        return slow_start_factor(slow, clock() - host.created)

    def _slow_over(self) -> None:
        """Once every window has passed since the EDF was built for them: rebuild plainly."""
        assert self.clock is not None
        if self.clock() >= self._slow_until:
            self._rebuild()


class RoundRobin(_SlowStarting[H]):
    """Rotation from a random start (so workers do not all begin with the same host); EDF
    on the static weights when they differ, or while a host is slow-starting."""

    def _rebuild(self) -> None:
        n = len(self._hosts)
        self._index = self.rng.randrange(n) if n else 0
        self._edf: _Edf[H] | None = None
        if self._slow_window():
            self._edf = _Edf(self._hosts, lambda h: h.weight * self._scale(h))
        elif not _equal_weights(self._hosts):
            self._edf = _Edf(self._hosts, lambda h: float(h.weight))
        if self._edf is not None:
            for _ in range(self.rng.randrange(n)):     # a random start here too
                self._edf.pick()

    def pick(self, hash_key: int | None = None, attempt: int = 0) -> H | None:
        if not self._hosts:
            return None
        if self._slow_until != -math.inf:
            self._slow_over()
        if self._edf is not None:
            return self._edf.pick()
        host = self._hosts[self._index % len(self._hosts)]
        self._index += 1
        return host


class LeastRequest(_SlowStarting[H]):
    """Power of ``choice_count`` choices on active requests (equal weights); otherwise EDF with
    each host's weight (slow start's scale included) divided by ``(active + 1) **
    active_request_bias``, recomputed when the host is scheduled again."""

    def __init__(self, hosts: Sequence[H], rng: random.Random,
                 panic_threshold: float = DEFAULT_PANIC_THRESHOLD, *,
                 choice_count: int = DEFAULT_CHOICE_COUNT,
                 active_request_bias: float = DEFAULT_ACTIVE_REQUEST_BIAS,
                 slow_start: SlowStart | None = None,
                 clock: Callable[[], float] | None = None) -> None:
        self.choice_count = max(1, choice_count)
        self.bias = active_request_bias
        super().__init__(hosts, rng, panic_threshold, slow_start=slow_start, clock=clock)

    def _rebuild(self) -> None:
        self._edf: _Edf[H] | None = None
        if self._slow_window() or not _equal_weights(self._hosts):
            bias = self.bias
            self._edf = _Edf(self._hosts, lambda h: h.weight * self._scale(h)
                             / float(h.active_requests + 1) ** bias)

    def pick(self, hash_key: int | None = None, attempt: int = 0) -> H | None:
        hosts = self._hosts
        if not hosts:
            return None
        if self._slow_until != -math.inf:
            self._slow_over()
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

    def pick(self, hash_key: int | None = None, attempt: int = 0) -> H | None:
        if not self._hosts:
            return None
        return self._hosts[self.rng.randrange(len(self._hosts))]


class RingHash(LoadBalancer[H]):
    """Envoy's ketama ring: each host gets points ``xxHash64("<address>_<i>")`` in proportion
    to its weight, scaled so the lightest host has a whole number of them and the ring holds
    at least ``min_size`` (at most ``max_size``); a hash picks the first point at or after it
    (wrapping). Without a hash (no policy matched) a random one is used, as Envoy does."""

    def __init__(self, hosts: Sequence[H], rng: random.Random,
                 panic_threshold: float = DEFAULT_PANIC_THRESHOLD, *,
                 min_size: int = DEFAULT_RING_MIN, max_size: int = DEFAULT_RING_MAX) -> None:
        self.min_size = min_size
        self.max_size = max_size
        super().__init__(hosts, rng, panic_threshold)

    def _rebuild(self) -> None:
        hosts = self._hosts
        points: list[tuple[int, int]] = []
        if hosts:
            total = float(sum(h.weight for h in hosts))
            shares = [h.weight / total for h in hosts]
            least = min(shares)
            scale = min(math.ceil(least * self.min_size) / least, float(self.max_size))
            done = 0.0
            target = 0.0
            for index, host in enumerate(hosts):
                key = host.address_text
                target += scale * shares[index]
                i = 0
                while done < target:
                    points.append((xxhash.xxh64_intdigest(f"{key}_{i}".encode()), index))
                    i += 1
                    done += 1.0
            points.sort()
        self._points = [p[0] for p in points]
        self._owners = [hosts[p[1]] for p in points]

    @property
    def ring_size(self) -> int:
        return len(self._points)

    def pick(self, hash_key: int | None = None, attempt: int = 0) -> H | None:
        n = len(self._points)
        if not n:
            return None
        h = self.rng.getrandbits(64) if hash_key is None else hash_key
        i = bisect_left(self._points, h)
        if i == n:
            i = 0
        if attempt > 0:
            # a retry's predicate refused the host: as if its point were not there
            i = (i + attempt) % n
        return self._owners[i]


class Maglev(LoadBalancer[H]):
    """The Maglev lookup table (``table_size`` slots, a prime): each host walks its own
    permutation of the slots (offset ``xxHash64(address) % M``, step ``xxHash64(address,
    seed=1) % (M - 1) + 1``) and the hosts take turns claiming their next free slot, a host of
    a third of the largest weight taking a turn every third round; a hash picks slot
    ``hash % M``. Without a hash a random one is used."""

    def __init__(self, hosts: Sequence[H], rng: random.Random,
                 panic_threshold: float = DEFAULT_PANIC_THRESHOLD, *,
                 table_size: int = DEFAULT_MAGLEV_TABLE) -> None:
        self.table_size = table_size
        super().__init__(hosts, rng, panic_threshold)

    def _rebuild(self) -> None:
        hosts = self._hosts
        m = self.table_size
        slots: list[int] = []
        if hosts:
            n = len(hosts)
            offsets = [xxhash.xxh64_intdigest(h.address_text.encode()) % m for h in hosts]
            skips = [xxhash.xxh64_intdigest(h.address_text.encode(), seed=1) % (m - 1) + 1
                     for h in hosts]
            weights = [h.weight for h in hosts]
            most = max(weights)
            nexts = [0] * n
            due = [0] * n               # in units of the largest weight
            slots = [-1] * m
            filled = 0
            rnd = 1
            while filled < m:
                for i in range(n):
                    if rnd * weights[i] < due[i]:
                        continue
                    due[i] += most
                    c = (offsets[i] + skips[i] * nexts[i]) % m
                    while slots[c] >= 0:
                        nexts[i] += 1
                        c = (offsets[i] + skips[i] * nexts[i]) % m
                    slots[c] = i
                    nexts[i] += 1
                    filled += 1
                    if filled == m:
                        break
                rnd += 1
        self._slots = slots

    def slot_counts(self) -> list[int]:
        """How many slots each host (in :attr:`hosts` order) holds."""
        counts = [0] * len(self._hosts)
        for i in self._slots:
            counts[i] += 1
        return counts

    def pick(self, hash_key: int | None = None, attempt: int = 0) -> H | None:
        if not self._slots:
            return None
        h = self.rng.getrandbits(64) if hash_key is None else hash_key
        if attempt > 0:
            # a retry: flip most of the hash's bits so the retry lands far from the refused slot
            h ^= (_U64 - attempt + 1)
        return self._hosts[self._slots[h % self.table_size]]


class LocalityWeighted(LoadBalancer[H]):
    """One priority level under ``locality_weighted_lb_config`` (Istio's localityLbSetting
    ``distribute``): a locality is picked first, by EDF over its effective weight
    ``load_balancing_weight * min(1, overprovisioning * healthy / hosts)`` (a locality without
    a weight takes nothing), then a host by the cluster's policy among its healthy hosts. A
    level in panic, or with no locality left to pick, balances over its hosts as without
    locality weighting."""

    def __init__(self, make: Callable[[], LoadBalancer[H]], rng: random.Random,
                 overprovisioning: int = DEFAULT_OVERPROVISIONING) -> None:
        self._make = make
        self.overprovisioning = overprovisioning
        self._fallback = make()
        self._localities: list[LoadBalancer[H]] = []
        self._weights: list[float] = []
        self._edf: _Edf[int] | None = None
        super().__init__([], rng)

    def assign_level(self, level: Sequence[H], panic: bool) -> None:
        self._fallback.assign_level(level, panic)
        self._hosts, self.panic = self._fallback.hosts, panic
        self._localities, self._weights, self._edf = [], [], None
        if panic:
            return
        groups: dict[tuple[str, str, str], list[H]] = {}
        for h in level:
            groups.setdefault(h.locality, []).append(h)
        for hosts in groups.values():
            healthy = [h for h in hosts if h.healthy]
            share = min(1.0, self.overprovisioning / 100.0 * len(healthy) / len(hosts))
            weight = hosts[0].locality_weight * share
            if weight > 0:
                lb = self._make()
                lb.assign(healthy, False)
                self._localities.append(lb)
                self._weights.append(weight)
        if self._localities:
            weights = self._weights
            self._edf = _Edf(list(range(len(weights))), lambda i: weights[i])

    def pick(self, hash_key: int | None = None, attempt: int = 0) -> H | None:
        edf = self._edf
        if edf is None:
            return self._fallback.pick(hash_key, attempt)
        index = edf.pick()
        assert index is not None
        return self._localities[index].pick(hash_key, attempt)


def _spread(loads: list[int], shares: Sequence[int], total: int, nth: int) -> tuple[int, int]:
    """Envoy's ``distributeLoad``: each level in turn takes ``share * 100 // nth`` of what is
    left of ``total``; (the first level with a share or -1, what is left)."""
    first = -1
    for i, share in enumerate(shares):
        if first < 0 and share > 0:
            first = i
        loads[i] = min(total, share * 100 // nth)
        total -= loads[i]
    return first, total


def priority_loads(levels: Sequence[Sequence[LbHost]],
                   overprovisioning: int = DEFAULT_OVERPROVISIONING,
                   panic_threshold: float = DEFAULT_PANIC_THRESHOLD,
                   ) -> tuple[list[int], list[int], list[bool]]:
    """Envoy's shares of the traffic for each priority level (index = priority; a level may
    be empty), in whole percents adding up to 100: to its healthy hosts, to its degraded hosts,
    and whether the level panics.

    A level's health is ``min(100, overprovisioning * healthy // hosts)`` (140 %: a level
    with at least 5/7, about 71.4 %, of its hosts healthy takes all it is given), its degraded
    availability the same of its degraded hosts; all of them, summed and capped at 100, are the
    normalized total availability (NTA). Each level in turn takes ``health * 100 // NTA`` of
    what is left for its healthy hosts; what is still left goes the same way to the degraded
    hosts, and a rounding remainder to the first level with health (else with degraded hosts).
    While NTA is 100 no level panics; below it, a level with fewer than ``panic_threshold``
    percent of its hosts healthy or degraded panics (all its hosts are used), and when every
    level panics the traffic is spread by the levels' host counts instead. With nothing
    available anywhere and a threshold of 0, P0 is given everything and has nothing to pick
    ("no healthy upstream")."""
    n = len(levels)
    healthy = [sum(1 for h in hosts if h.healthy) for hosts in levels]
    degraded = [sum(1 for h in hosts if h.degraded) for hosts in levels]
    health = [min(100, overprovisioning * ok // len(hosts)) if hosts else 0
              for hosts, ok in zip(levels, healthy, strict=True)]
    degraded_health = [min(100, overprovisioning * d // len(hosts)) if hosts else 0
                       for hosts, d in zip(levels, degraded, strict=True)]
    nta = min(100, sum(health) + sum(degraded_health))
    loads = [0] * n
    degraded_loads = [0] * n
    panics = [False] * n
    if nta > 0:
        first, left = _spread(loads, health, 100, nta)
        first_degraded, left = _spread(degraded_loads, degraded_health, left, nta)
        if left:
            if first >= 0:
                loads[first] += left
            else:
                degraded_loads[first_degraded] += left
    elif panic_threshold <= 0:
        loads[0] = 100
        return loads, degraded_loads, panics
    if nta == 100:
        return loads, degraded_loads, panics
    for i, hosts in enumerate(levels):
        available = healthy[i] + degraded[i]
        panics[i] = 100.0 * available < panic_threshold * len(hosts) if hosts \
            else panic_threshold > 0
    if all(panics):
        total_hosts = sum(len(hosts) for hosts in levels)
        degraded_loads = [0] * n
        if not total_hosts:
            return [100] + [0] * (n - 1), degraded_loads, panics
        left = 100
        first = -1
        for i, hosts in enumerate(levels):
            if first < 0 and hosts:
                first = i
            loads[i] = 100 * len(hosts) // total_hosts
            left -= loads[i]
        loads[first] += left
    return loads, degraded_loads, panics


class PriorityLb(Generic[H]):
    """A cluster's balancer: its hosts by priority level, one balancer of the cluster's policy
    per level for its healthy hosts and one for its degraded hosts, the one for each pick
    chosen by :func:`priority_loads`' shares (by the request's hash for the hashing policies,
    as Envoy does, else at random)."""

    def __init__(self, make: Callable[[], LoadBalancer[H]], rng: random.Random, *,
                 panic_threshold: float = DEFAULT_PANIC_THRESHOLD,
                 overprovisioning: int = DEFAULT_OVERPROVISIONING,
                 by_hash: bool = False,
                 make_degraded: Callable[[], LoadBalancer[H]] | None = None) -> None:
        self._make = make
        self._make_degraded = make_degraded or make     # the policy alone, no localities
        self.rng = rng
        self.panic_threshold = panic_threshold
        self.overprovisioning = overprovisioning
        self.by_hash = by_hash
        self.levels: list[LoadBalancer[H]] = [make()]
        self.degraded_levels: list[LoadBalancer[H]] = []
        self.loads: list[int] = [100]
        self.degraded_loads: list[int] = [0]
        self.panics: list[bool] = [False]
        self.picked_in_panic = False        # the last pick's level was in panic
        self._choose = False                # more than one level or degraded traffic

    def update(self, hosts: Sequence[H]) -> None:
        groups: list[list[H]] = [[]]
        for h in hosts:
            while len(groups) <= h.priority:
                groups.append([])
            groups[h.priority].append(h)
        self.loads, self.degraded_loads, self.panics = priority_loads(
            groups, self.overprovisioning, self.panic_threshold)
        while len(self.levels) < len(groups):
            self.levels.append(self._make())
        del self.levels[len(groups):]
        self.degraded_levels = []
        for lb, group, panic, share in zip(self.levels, groups, self.panics,
                                           self.degraded_loads, strict=True):
            lb.assign_level(group, panic)
            degraded = self._make_degraded()
            if share:
                degraded.assign(group if panic else [h for h in group if h.degraded], panic)
            self.degraded_levels.append(degraded)
        self._choose = len(groups) > 1 or any(self.degraded_loads)
        self.picked_in_panic = self.panics[0]   # (one level: what every pick will be)

    @property
    def hosts(self) -> list[H]:
        """The hosts picks can land on, every level's."""
        out = [h for lb, load in zip(self.levels, self.loads, strict=True) if load
               for h in lb.hosts]
        return out + [h for lb, load in zip(self.degraded_levels, self.degraded_loads,
                                             strict=True) if load
                      for h in lb.hosts if h not in out]

    @property
    def panic(self) -> bool:
        return any(p for p, load in zip(self.panics, self.loads, strict=True) if load)

    def pick(self, hash_key: int | None = None, attempt: int = 0) -> H | None:
        """As :meth:`LoadBalancer.pick`, on the level (healthy or degraded hosts) the shares
        choose."""
        if not self._choose:
            return self.levels[0].pick(hash_key, attempt)
        h = hash_key if self.by_hash and hash_key is not None else self.rng.getrandbits(64)
        point = h % 100 + 1
        reached = 0
        for i, load in enumerate(self.loads):
            reached += load
            if point <= reached:
                self.picked_in_panic = self.panics[i]
                return self.levels[i].pick(hash_key, attempt)
        for i, load in enumerate(self.degraded_loads):
            reached += load
            if point <= reached:
                self.picked_in_panic = self.panics[i]
                return self.degraded_levels[i].pick(hash_key, attempt)
        self.picked_in_panic = self.panics[0]
        return self.levels[0].pick(hash_key, attempt)


def make_lb(policy: LbPolicy, hosts: Sequence[H], rng: random.Random, *,
            ring_min: int = DEFAULT_RING_MIN, ring_max: int = DEFAULT_RING_MAX,
            maglev_table: int = DEFAULT_MAGLEV_TABLE,
            panic_threshold: float = DEFAULT_PANIC_THRESHOLD,
            overprovisioning: int = DEFAULT_OVERPROVISIONING,
            locality_weighted: bool = False,
            slow_start: SlowStart | None = None,
            clock: Callable[[], float] | None = None,
            choice_count: int = DEFAULT_CHOICE_COUNT,
            active_request_bias: float = DEFAULT_ACTIVE_REQUEST_BIAS) -> PriorityLb[H]:
    """The balancer for a cluster's ``lb_policy``, over its priority levels. CLUSTER_PROVIDED
    (ORIGINAL_DST) has none of its own; it gets round robin, which is never consulted for such
    clusters."""
    def make() -> LoadBalancer[H]:
        if policy == "LEAST_REQUEST":
            return LeastRequest([], rng, choice_count=choice_count,
                                active_request_bias=active_request_bias,
                                slow_start=slow_start, clock=clock)
        if policy == "RANDOM":
            return RandomLb([], rng)
        if policy == "RING_HASH":
            return RingHash([], rng, min_size=ring_min, max_size=ring_max)
        if policy == "MAGLEV":
            return Maglev([], rng, table_size=maglev_table)
        return RoundRobin([], rng, slow_start=slow_start, clock=clock)

    def make_level() -> LoadBalancer[H]:
        return LocalityWeighted(make, rng, overprovisioning)
    lb = PriorityLb(make_level if locality_weighted else make, rng, make_degraded=make,
                    panic_threshold=panic_threshold, overprovisioning=overprovisioning,
                    by_hash=policy in ("RING_HASH", "MAGLEV"))
    lb.update(hosts)
    return lb


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
