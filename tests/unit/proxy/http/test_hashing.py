"""Route hash policies: what each policy hashes, how several combine, and the cookie Envoy
generates; and the RING_HASH cluster they steer, through the connection manager."""

from __future__ import annotations

import xxhash

from remora.proxy.http.hashing import HashPolicy, request_hash
from remora.proxy.http.types import HeaderMap, RequestHead

SRC = ("10.0.0.5", "10.0.0.5:50000" + "10.100.1.10:8080")


def head(path: str = "/", headers: list[tuple[str, str]] | None = None,
         authority: str = "svc") -> RequestHead:
    return RequestHead("GET", path, authority, "http", HeaderMap(headers or []), "HTTP/1.1")


def x(value: str, seed: int = 0) -> int:
    return xxhash.xxh64_intdigest(value.encode(), seed=seed)


def rot(h: int) -> int:
    return ((h << 1) | (h >> 63)) & (2**64 - 1)


def test_header_hash_is_xxhash64_of_the_value_and_order_free_over_several() -> None:
    p = (HashPolicy("header", "x-user"),)
    assert request_hash(p, head(headers=[("x-user", "alice")]), *SRC) == (x("alice"), "")
    assert request_hash(p, head(), *SRC) == (None, "")
    both = request_hash(p, head(headers=[("x-user", "b"), ("x-user", "a")]), *SRC)[0]
    assert both == x("b", seed=x("a"))          # sorted, each hash the next one's seed
    assert request_hash(p, head(headers=[("x-user", "a"), ("x-user", "b")]), *SRC)[0] == both
    authority = (HashPolicy("header", ":authority"),)
    assert request_hash(authority, head(authority="svc:8080"), *SRC)[0] == x("svc:8080")


def test_cookie_query_and_source_ip() -> None:
    cookie = (HashPolicy("cookie", "sid"),)
    h = head(headers=[("cookie", 'a=1; sid="abc"; b=2')])
    assert request_hash(cookie, h, *SRC) == (x("abc"), "")
    assert request_hash(cookie, head(), *SRC) == (None, "")       # no ttl: nothing generated
    query = (HashPolicy("query_parameter", "user id"),)
    assert request_hash(query, head("/p?x=1&user+id=b%C3%A9&user+id=z"), *SRC)[0] == x("bé")
    assert request_hash(query, head("/p?x=1"), *SRC)[0] is None
    ip = (HashPolicy("source_ip"),)
    assert request_hash(ip, head(), *SRC)[0] == x("10.0.0.5")


def test_missing_cookie_with_ttl_is_generated_per_connection() -> None:
    p = (HashPolicy("cookie", "sticky", ttl=3600.0, path="/app",
                    attributes=(("SameSite", "Strict"), ("Secure", ""))),)
    h, set_cookie = request_hash(p, head(), *SRC)
    value = f"{x(SRC[1]):016x}"
    assert set_cookie == (f'sticky="{value}"; Max-Age=3600; Path=/app; SameSite=Strict; '
                          "Secure; HttpOnly")
    assert h == x(value)
    # the client sends it back: same hash, nothing more to set
    again = head(headers=[("cookie", f'sticky="{value}"')])
    assert request_hash(p, again, *SRC) == (h, "")
    session = (HashPolicy("cookie", "s", ttl=0.0),)
    assert request_hash(session, head(), *SRC)[1] == f's="{value}"; HttpOnly'


def test_policies_combine_and_terminal_stops() -> None:
    hdr = HashPolicy("header", "x-a")
    both = (hdr, HashPolicy("header", "x-b"))
    h = head(headers=[("x-a", "1"), ("x-b", "2")])
    assert request_hash(both, h, *SRC)[0] == rot(x("1")) ^ x("2")
    twice = (hdr, hdr)                                   # equal rules do not cancel out
    assert request_hash(twice, h, *SRC)[0] == rot(x("1")) ^ x("1") != 0
    stop = (HashPolicy("header", "x-a", terminal=True), HashPolicy("header", "x-b"))
    assert request_hash(stop, h, *SRC)[0] == x("1")
    # a terminal policy that yields nothing does not stop the next one
    assert request_hash(stop, head(headers=[("x-b", "2")]), *SRC)[0] == x("2")
