"""Envoy's CORS filter (``envoy.filters.http.cors``) for one request.

Owns: reading a request against the CORS policies of its route (most specific first, each
field from the first policy that sets it), answering a preflight request, and the headers a
response to an allowed cross-origin request gets.
Must not: do IO, or know about connections (the connection manager calls in and sends).

Reference (behaviour matched, no code taken): Envoy ``source/extensions/filters/http/cors/
cors_filter.cc`` (``decodeHeaders``: a request with a non-empty ``Origin`` is a CORS request;
an ``OPTIONS`` with ``Access-Control-Request-Method`` is a preflight, answered 200 by the
filter unless its origin is not allowed and ``forward_not_matching_preflights`` (default
true) lets it through; ``encodeHeaders``: the allowed origin, credentials and exposed
headers), the CORS policy's ``filter_enabled`` / ``shadow_enabled`` runtime fractions.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from remora.proxy.http.routes import CorsPolicy, RandomSource, StringMatcher
from remora.proxy.http.types import HeaderMap, RequestHead

ALLOW_ORIGIN = "access-control-allow-origin"
ALLOW_CREDENTIALS = "access-control-allow-credentials"
ALLOW_METHODS = "access-control-allow-methods"
ALLOW_HEADERS = "access-control-allow-headers"
EXPOSE_HEADERS = "access-control-expose-headers"
MAX_AGE = "access-control-max-age"
ALLOW_PRIVATE_NETWORK = "access-control-allow-private-network"


def _text(policies: Sequence[CorsPolicy], field: str) -> str:
    for p in policies:
        value: str = getattr(p, field)
        if value:
            return value
    return ""


def _flag(policies: Sequence[CorsPolicy], field: str, default: bool) -> bool:
    for p in policies:
        value: bool | None = getattr(p, field)
        if value is not None:
            return value
    return default


def _origins(policies: Sequence[CorsPolicy]) -> tuple[StringMatcher, ...]:
    for p in policies:
        if p.allow_origins:
            return p.allow_origins
    return ()


@dataclass(slots=True)
class CorsRequest:
    """A CORS request's state for its response: ``origin`` is the request's origin when
    allowed, "" when not (then the response is left alone)."""

    policies: Sequence[CorsPolicy]
    origin: str

    def response_headers(self, headers: HeaderMap) -> None:
        """Envoy's ``encodeHeaders`` (its own preflight answer included)."""
        if not self.origin:
            return
        headers.set(ALLOW_ORIGIN, self.origin)
        if _flag(self.policies, "allow_credentials", False):
            headers.set(ALLOW_CREDENTIALS, "true")
        expose = _text(self.policies, "expose_headers")
        if expose:
            headers.set(EXPOSE_HEADERS, expose)


@dataclass(slots=True)
class CorsDecision:
    """What the filter made of a request: ``request`` for the response (None: not a CORS
    request, or the policy is only shadowed); ``preflight``: the headers of the 200 the
    filter answers with itself (None: the request goes on); ``origin_valid``: the
    ``cors.origin_valid`` / ``cors.origin_invalid`` stat to count (None: neither)."""

    request: CorsRequest | None = None
    preflight: list[tuple[str, str]] | None = None
    origin_valid: bool | None = None


NOTHING = CorsDecision()


def decide(policies: Sequence[CorsPolicy], head: RequestHead, rng: RandomSource,
           ) -> CorsDecision:
    """Envoy's ``decodeHeaders`` for a request routed with these policies."""
    if not policies:
        return NOTHING
    first = policies[0]
    enabled = first.filter_enabled.hit(rng.getrandbits(64))
    shadow = first.shadow_enabled is not None and first.shadow_enabled.hit(
        rng.getrandbits(64))
    if not enabled and not shadow:
        return NOTHING
    h = head.headers
    origin = h.get("origin")
    if not origin:
        return NOTHING
    allowed = any(m.match("*") or m.match(origin) for m in _origins(policies))
    if shadow and not enabled:
        return CorsDecision(origin_valid=allowed)
    request = CorsRequest(policies, origin if allowed else "")
    asked_method = h.get("access-control-request-method")
    if head.method != "OPTIONS" or not asked_method:
        return CorsDecision(request=request, origin_valid=allowed)
    if not allowed and _flag(policies, "forward_not_matching_preflights", True):
        return CorsDecision(request=request, origin_valid=allowed)
    out: list[tuple[str, str]] = []
    if allowed:
        out.append((ALLOW_ORIGIN, origin))
    if _flag(policies, "allow_credentials", False):
        out.append((ALLOW_CREDENTIALS, "true"))
    methods = _text(policies, "allow_methods")
    if methods:
        out.append((ALLOW_METHODS, asked_method if methods == "*" else methods))
    allow_headers = _text(policies, "allow_headers")
    if allow_headers:
        out.append((ALLOW_HEADERS, h.get("access-control-request-headers") or ""
                    if allow_headers == "*" else allow_headers))
    max_age = _text(policies, "max_age")
    if max_age:
        out.append((MAX_AGE, max_age))
    if _flag(policies, "allow_private_network_access", False) \
            and h.get("access-control-request-private-network") == "true":
        out.append((ALLOW_PRIVATE_NETWORK, "true"))
    return CorsDecision(request=request, preflight=out, origin_valid=allowed)
