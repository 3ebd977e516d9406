"""A route's ``hash_policy``: the request's hash for the RING_HASH and MAGLEV balancers.

Owns: :class:`HashPolicy` (one compiled ``RouteAction.HashPolicy``) and :func:`request_hash`,
which evaluates a route's policies in order, as Envoy's ``HashPolicyImpl::generateHash`` does:
each policy that yields a value is xxHash64'd and folded into the hash so far (the old value
rotated left one bit, then XOR, so two equal rules do not cancel out); a ``terminal`` policy
that leaves a hash stops the evaluation. No policy yielding anything means no hash (the
balancer then picks at random). Also the ``Set-Cookie`` Envoy adds when a cookie policy with a
``ttl`` finds no cookie: the cookie is generated (hex of xxHash64 of the downstream connection's
remote and local addresses, so the connection's later requests get the same one) and hashed as
if it had been sent.
Must not: pick hosts (:mod:`remora.proxy.lb`) or touch the response (the router adds the
``Set-Cookie`` it is given).

Policies: ``header`` (all the field's values, sorted, hashed in turn with each hash as the next
seed; ``:authority``, ``:path`` and ``:method`` read the request line), ``cookie`` (name, ttl,
path, attributes), ``connection_properties.source_ip`` (the downstream IP, without port),
``query_parameter`` (the first value of the parameter). ``filter_state`` and a header's
``regex_rewrite`` are refused when the route is compiled.
Reference: Envoy ``api/envoy/config/route/v3/route_components.proto`` (HashPolicy) and
``source/common/http/hash_policy.cc``, ``source/common/router/router.cc`` (the cookie).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final
from urllib.parse import unquote_plus, unquote_to_bytes

import xxhash

from remora.proxy.http.types import RequestHead

_U64: Final = (1 << 64) - 1


@dataclass(frozen=True, slots=True)
class HashPolicy:
    """``kind``: ``header``, ``cookie``, ``source_ip`` or ``query_parameter``; ``name`` the
    header / cookie / parameter. ``ttl`` (cookies; None: never generate one) in seconds,
    ``path`` and ``attributes`` (``name=value`` pairs) go into a generated cookie."""

    kind: str
    name: str = ""
    terminal: bool = False
    ttl: float | None = None
    path: str = ""
    attributes: tuple[tuple[str, str], ...] = ()


def _cookie(head: RequestHead, name: str) -> str | None:
    for field in head.headers.get_all("cookie"):
        for crumb in field.split(";"):
            key, sep, value = crumb.strip().partition("=")
            if sep and key == name:
                value = value.strip()
                if len(value) >= 2 and value[0] == '"' and value[-1] == '"':
                    value = value[1:-1]
                return value
    return None


def _query(path: str, name: str) -> bytes | None:
    """The first value of parameter ``name``, percent- and ``+``-decoded to its bytes."""
    _, sep, query = path.partition("?")
    if not sep:
        return None
    for pair in query.split("#", 1)[0].split("&"):
        key, _, value = pair.partition("=")
        if unquote_plus(key) == name:
            return unquote_to_bytes(value.encode("latin-1", "replace").replace(b"+", b" "))
    return None


def _header_values(head: RequestHead, name: str) -> list[str]:
    if name == ":authority" or name == "host":
        return [head.authority] if head.authority else head.headers.get_all("host")
    if name == ":path":
        return [head.path] if head.path else []
    if name == ":method":
        return [head.method] if head.method else []
    return head.headers.get_all(name)


def set_cookie_value(name: str, value: str, policy: HashPolicy) -> str:
    """Envoy's ``makeSetCookieValue``: ``name="value"; Max-Age=N; Path=p; a=b; HttpOnly``."""
    out = f'{name}="{value}"'
    if policy.ttl:
        out += f"; Max-Age={int(policy.ttl)}"
    if policy.path:
        out += f"; Path={policy.path}"
    for k, v in policy.attributes:
        out += f"; {k}={v}" if v else f"; {k}"
    return out + "; HttpOnly"


def request_hash(policies: tuple[HashPolicy, ...], head: RequestHead, source_ip: str,
                 source_text: str) -> tuple[int | None, str]:
    """(the request's hash or None, a ``Set-Cookie`` value for the response or ""). ``source_ip``
    is the downstream address's IP; ``source_text`` the connection's remote then local
    ``ip:port``, run together (what a generated cookie is made from)."""
    h: int | None = None
    set_cookie = ""
    for p in policies:
        new: int | None = None
        if p.kind == "header":
            values = sorted(_header_values(head, p.name))
            if values:
                seed = 0
                for v in values:
                    seed = xxhash.xxh64_intdigest(v.encode("latin-1", "replace"), seed=seed)
                new = seed
        elif p.kind == "cookie":
            value = _cookie(head, p.name)
            if value is None and p.ttl is not None:
                value = f"{xxhash.xxh64_intdigest(source_text.encode()):016x}"
                set_cookie = set_cookie_value(p.name, value, p)
            if value:
                new = xxhash.xxh64_intdigest(value.encode("latin-1", "replace"))
        elif p.kind == "source_ip":
            if source_ip:
                new = xxhash.xxh64_intdigest(source_ip.encode())
        elif p.kind == "query_parameter":
            raw = _query(head.path, p.name)
            if raw is not None:
                new = xxhash.xxh64_intdigest(raw)
        if new is not None:
            h = new if h is None else ((((h << 1) | (h >> 63)) & _U64) ^ new)
        if p.terminal and h is not None:
            break
    return h, set_cookie
