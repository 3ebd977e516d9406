"""Envoy's CORS filter: the decisions on requests, preflights and responses."""

from __future__ import annotations

import random

import pytest

from remora.proxy.http import cors
from remora.proxy.http.routes import CorsPolicy, FractionalPercent, StringMatcher
from remora.proxy.http.types import HeaderMap, RequestHead

APP = "https://app.example.com"
POLICY = CorsPolicy(allow_origins=(StringMatcher(kind="exact", value=APP),),
                    allow_methods="GET,POST", allow_headers="x-token",
                    expose_headers="x-trace", max_age="600", allow_credentials=True)


def head(method: str = "GET", **headers: str) -> RequestHead:
    return RequestHead(method, "/", "svc", "http",
                       HeaderMap([(k.replace("_", "-"), v) for k, v in headers.items()]))


def preflight(origin: str = APP, **more: str) -> RequestHead:
    return head("OPTIONS", origin=origin, access_control_request_method="POST", **more)


RNG = random.Random(1)


def test_not_a_cors_request_without_origin_or_policy() -> None:
    assert cors.decide([POLICY], head(), RNG) == cors.NOTHING
    assert cors.decide([POLICY], head(origin=""), RNG) == cors.NOTHING
    assert cors.decide([], head(origin=APP), RNG) == cors.NOTHING


def test_allowed_simple_request_gets_the_response_headers() -> None:
    d = cors.decide([POLICY], head(origin=APP), RNG)
    assert d.preflight is None and d.origin_valid is True and d.request is not None
    h = HeaderMap([("access-control-allow-origin", "stale")])
    d.request.response_headers(h)
    assert h.items() == [("access-control-allow-origin", APP),
                         ("access-control-allow-credentials", "true"),
                         ("access-control-expose-headers", "x-trace")]


def test_disallowed_origin_leaves_the_response_alone() -> None:
    d = cors.decide([POLICY], head(origin="https://evil.example"), RNG)
    assert d.origin_valid is False and d.request is not None and d.preflight is None
    h = HeaderMap()
    d.request.response_headers(h)
    assert h.items() == []


def test_preflight_answered_by_the_filter() -> None:
    d = cors.decide([POLICY], preflight(), RNG)
    assert d.preflight == [("access-control-allow-origin", APP),
                           ("access-control-allow-credentials", "true"),
                           ("access-control-allow-methods", "GET,POST"),
                           ("access-control-allow-headers", "x-token"),
                           ("access-control-max-age", "600")]
    # OPTIONS without Access-Control-Request-Method is an ordinary request
    assert cors.decide([POLICY], head("OPTIONS", origin=APP), RNG).preflight is None


def test_wildcards_echo_the_request_and_private_network_access() -> None:
    p = CorsPolicy(allow_origins=(StringMatcher(kind="exact", value="*"),),
                   allow_methods="*", allow_headers="*", allow_private_network_access=True)
    d = cors.decide([p], preflight("https://any.example",
                                   access_control_request_headers="x-a,x-b",
                                   access_control_request_private_network="true"), RNG)
    assert d.preflight == [("access-control-allow-origin", "https://any.example"),
                           ("access-control-allow-methods", "POST"),
                           ("access-control-allow-headers", "x-a,x-b"),
                           ("access-control-allow-private-network", "true")]


@pytest.mark.parametrize(("forward", "answered"), [(None, False), (True, False),
                                                   (False, True)])
def test_preflight_from_a_disallowed_origin(forward: bool | None, answered: bool) -> None:
    p = CorsPolicy(allow_origins=POLICY.allow_origins, allow_methods="GET",
                   forward_not_matching_preflights=forward)
    d = cors.decide([p], preflight("https://evil.example"), RNG)
    assert (d.preflight is not None) is answered and d.origin_valid is False
    if answered:            # Envoy's 200, without the origin: the browser refuses
        assert d.preflight == [("access-control-allow-methods", "GET")]


def test_fields_come_from_the_most_specific_policy_that_sets_them() -> None:
    route = CorsPolicy(allow_methods="PUT")
    vhost = CorsPolicy(allow_origins=POLICY.allow_origins, allow_methods="GET",
                       max_age="5", allow_credentials=False)
    d = cors.decide([route, vhost], preflight(), RNG)
    assert d.preflight == [("access-control-allow-origin", APP),
                           ("access-control-allow-methods", "PUT"),
                           ("access-control-max-age", "5")]


def test_disabled_and_shadowed_policies() -> None:
    off = FractionalPercent(numerator=0)
    disabled = CorsPolicy(allow_origins=POLICY.allow_origins, filter_enabled=off)
    assert cors.decide([disabled], preflight(), RNG) == cors.NOTHING
    shadow = CorsPolicy(allow_origins=POLICY.allow_origins, filter_enabled=off,
                        shadow_enabled=FractionalPercent(numerator=100))
    d = cors.decide([shadow], preflight(), RNG)           # counted, nothing else
    assert d == cors.CorsDecision(origin_valid=True)
