"""HeaderMap against a plain model of its documented behaviour."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from remora.proxy.http.types import HeaderMap

NAMES = st.sampled_from(["a", "b", "x-envoy-attempt-count", "Host", "X-Request-Id", "1"])
FIELDS = st.lists(st.tuples(NAMES, st.text(max_size=3)), max_size=8)


def model_set(items: list[tuple[str, str]], name: str, value: str) -> list[tuple[str, str]]:
    """Every ``name`` field replaced by one, in the first one's place, else appended."""
    name = name.lower()
    out: list[tuple[str, str]] = []
    done = False
    for k, v in items:
        if k != name:
            out.append((k, v))
        elif not done:
            out.append((k, value))
            done = True
    return out if done else [*out, (name, value)]


@given(FIELDS, NAMES, st.text(max_size=3))
def test_set_replaces_every_field_of_the_name_by_one(items: list[tuple[str, str]], name: str,
                                                      value: str) -> None:
    h = HeaderMap(items)
    before = list(h.items())
    h.set(name, value)
    assert h.items() == model_set(before, name, value)
    assert h.get(name.lower()) == value and h.get_all(name.lower()) == [value]


@given(FIELDS, NAMES)
def test_remove_and_contains(items: list[tuple[str, str]], name: str) -> None:
    h = HeaderMap(items)
    low = name.lower()
    assert (low in h) == any(k == low for k, _ in h.items())
    h.remove(name)
    assert low not in h and h.get(low) is None
    assert h.items() == [(k.lower(), v) for k, v in items if k.lower() != low]


def test_names_are_lowered_past_the_lowering_cache_bound() -> None:
    # lower_name caches what it lowered up to a bound; names beyond it must still be lowered
    # (and the cache must not grow without limit from, say, config churn)
    from remora.proxy.http import types
    h = HeaderMap()
    for i in range(types._LOWERED_MAX + 50):
        h.add(f"X-Extra-{i}", "v")
        h.set(f"X-Other-{i}", "w")
    assert len(types._LOWERED) <= types._LOWERED_MAX
    names = [k for k, _ in h.items()]
    last = types._LOWERED_MAX + 49
    assert names[-2:] == [f"x-extra-{last}", f"x-other-{last}"]
    assert all(n.islower() for n in names)
