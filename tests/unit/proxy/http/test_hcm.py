"""Playbook tests of the connection manager and router, without sockets.

The real ``_Downstream`` / ``HttpConnectionManager`` / router / pools / codecs run on an event
loop; only the sockets are replaced (``harness``): the app is a :class:`harness.Client`
writing raw bytes, each upstream host a :class:`harness.Server` answering as the test
scripts. Expected statuses, texts, details and flags are Envoy's (spec §9, §10.1).
"""

from __future__ import annotations

import asyncio
import functools
import gc
import random
import uuid
from collections.abc import Callable, Coroutine
from typing import Any

import h2.config
import h2.connection
import h2.events
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from remora.proxy.http.h2codec import H2ClientCodec
from remora.proxy.http.hcm import request_id
from remora.proxy.http.types import (
    Body,
    ConnectionClosed,
    EndStream,
    ResponseHeaders,
    Writable,
)
from remora.proxy.model import OutlierDetection, Thresholds
from tests.unit.proxy.http.harness import (
    FAULT,
    FAULT_TYPE,
    ISTIO_RETRY,
    ROUTER,
    WAIT,
    Client,
    Env,
    Server,
    UpReq,
    Waitable,
    cluster,
    hcm_dict,
    http1_request,
    ok_handler,
    pipe,
    request_head,
    route,
    vhost,
)

SVC = "outbound|8080||svc.default.svc.cluster.local"
A, B = "10.3.0.1:8080", "10.3.0.2:8080"
RESET_BEFORE = "upstream connect error or disconnect/reset before headers."


def run(test: Callable[..., Coroutine[Any, Any, None]]) -> Callable[..., None]:
    @functools.wraps(test)
    def wrapper(*args: Any, **kw: Any) -> None:
        asyncio.run(asyncio.wait_for(test(*args, **kw), 15))
    return wrapper


def make_env(*, routes: list[dict[str, Any]] | None = None, servers: dict[str, Server] | None
             = None, hosts: tuple[str, ...] = (A,), extra_clusters: tuple[Any, ...] = (),
             cluster_kw: dict[str, Any] | None = None, direction: str = "OUTBOUND",
             **hcm: Any) -> Env:
    vhosts = [vhost("svc.default.svc.cluster.local:8080", ["svc", "svc:8080"],
                    routes or [route(SVC)])]
    servers = servers if servers is not None else {h: Server() for h in hosts}
    clusters = (cluster(SVC, hosts, **(cluster_kw or {})), *extra_clusters)
    # Envoy's 1 s delayed close would make every test whose client leaves the closing to the
    # proxy wait that long; the delayed-close tests set their own.
    hcm.setdefault("delayed_close_timeout", "0.05s")
    return Env(hcm_dict(vhosts, **hcm), clusters, servers, direction=direction)


async def settle(pred: Callable[[], Any], rounds: int = 500) -> Any:
    """Yield to the loop until ``pred()`` holds (bounded number of loop turns, no timers)."""
    for _ in range(rounds):
        got = pred()
        if got:
            return got
        await asyncio.sleep(0)
    return pred()


def flags(info: Any) -> set[str]:
    return set(info.response_flags)


# Upstream handlers several tests share.
async def _never(req: UpReq) -> None:
    await asyncio.Future()


async def _busy(req: UpReq) -> None:
    await req.complete()
    req.respond(503, b"busy")


async def _slam(req: UpReq) -> None:
    await req.complete()
    req.abort()


# ============================================================================ the happy path


def test_generated_request_ids_are_random_uuid_v4() -> None:
    """Envoy's UUID request-id: version 4, RFC 4122 variant, 122 random bits (every hex
    digit outside the version and variant positions takes all 16 values)."""
    rng = random.Random(7)
    ids = [request_id(rng) for _ in range(2000)]
    assert len(set(ids)) == len(ids)
    for text in ids:
        u = uuid.UUID(text)
        assert str(u) == text and u.version == 4 and u.variant == uuid.RFC_4122
    digits = [t.replace("-", "") for t in ids]
    for pos in (i for i in range(32) if i != 12):
        seen = {d[pos] for d in digits}
        assert len(seen) == (4 if pos == 16 else 16), pos


@run
async def test_a_finished_request_leaves_no_reference_cycle() -> None:
    """Everything a request allocates is freed by reference counting when it ends: nothing
    per request is left for the cycle collector (whose passes over such leftovers took 13 %
    of the proxy's time under load)."""
    env = make_env()
    c = env.client()
    assert (await c.request("GET", "/", "svc")).status == 200     # connections, pools
    gc.collect()
    gc.disable()
    try:
        for _ in range(20):
            assert (await c.request("GET", "/", "svc")).status == 200
        left = gc.collect()
    finally:
        gc.enable()
    assert left < 20, f"{left} objects in reference cycles after 20 requests"
    await env.close()


@run
async def test_proxied_request_headers_both_ways() -> None:
    """Envoy's request mutations (spec §9): x-request-id generated, x-forwarded-proto set,
    x-envoy-attempt-count (Istio's include_request_attempt_count), no expected-timeout header
    when the route timeout is 0; response: server overwritten, upstream service time."""
    async def handler(req: UpReq) -> None:
        await req.complete()
        req.respond(200, b"hello", [("server", "backend"), ("x-app", "1")])
    env = make_env(servers={A: Server(handler)})
    c = env.client()
    r = await c.request("GET", "/p?q=1", "svc", [("user-agent", "t")])
    assert r.status == 200 and r.body == b"hello"
    assert r.get("server") == "envoy"
    assert r.get("x-app") == "1"
    assert r.get("x-envoy-upstream-service-time", "").isdigit()
    up = env.servers[A].requests[0]
    h = up.headers
    assert up.head.path == "/p?q=1" and up.head.authority == "svc"
    uuid.UUID(h.get("x-request-id"))
    assert h.get("x-forwarded-proto") == "http"
    assert h.get("x-envoy-attempt-count") == "1"
    assert "x-envoy-expected-rq-timeout-ms" not in h
    assert "x-forwarded-for" not in h        # use_remote_address: false
    info = await env.info()
    assert info.response_code == 200 and info.response_code_details == "via_upstream"
    assert not info.response_flags and info.upstream_host == A
    assert info.bytes_sent == 5 and info.attempt_count == 1
    assert env.hcounter("downstream_rq_2xx") == 1
    await env.close()


@run
async def test_envoy_request_stats_by_class_and_code() -> None:
    """The per-request counters and gauges Envoy keeps on the HCM and the cluster, each in
    its own stat: a 200 and a 503 from upstream, a local 404 (no route)."""
    async def handler(req: UpReq) -> None:
        await req.complete()
        req.respond(503 if req.head.path == "/busy" else 200, b"x")
    env = make_env(servers={A: Server(handler)})
    c = env.client()
    assert (await c.request(path="/")).status == 200
    assert (await c.request(path="/busy")).status == 503
    assert (await c.request(host="unknown.example")).status == 404
    await env.info(3)
    h = {n: env.hcounter(f"downstream_rq_{n}") for n in (
        "total", "http1_total", "http2_total", "completed", "1xx", "2xx", "3xx", "4xx", "5xx")}
    assert h == {"total": 3, "http1_total": 3, "http2_total": 0, "completed": 3, "1xx": 0,
                 "2xx": 1, "3xx": 0, "4xx": 1, "5xx": 1}
    u = {n: env.ccounter(SVC, f"upstream_rq_{n}") for n in (
        "total", "completed", "2xx", "3xx", "4xx", "5xx", "200", "503")}
    assert u == {"total": 2, "completed": 2, "2xx": 1, "3xx": 0, "4xx": 0, "5xx": 1,
                 "200": 1, "503": 1}
    gauges = env.stats.gauges
    assert gauges[f"http.{env.config.stat_prefix}.downstream_rq_active"] == 0
    assert gauges[f"cluster.{SVC}.upstream_rq_active"] == 0
    assert not any(n.endswith(("_0xx", "rq_1xx")) and n.startswith("cluster.")
                   for n in env.stats.counters)     # Envoy has no such cluster stats
    await env.close()


@run
async def test_request_id_kept_and_keepalive_reuses_upstream_connection() -> None:
    env = make_env()
    c = env.client()
    r1 = await c.request(headers=[("x-request-id", "abc-1"), ("x-forwarded-proto", "https")])
    r2 = await c.request(path="/two")
    assert (r1.status, r2.status) == (200, 200) and r2.body == b"ok /two"
    srv = env.servers[A]
    assert srv.requests[0].headers.get("x-request-id") == "abc-1"
    assert srv.requests[0].headers.get("x-forwarded-proto") == "https"   # kept if present
    assert srv.requests[1].headers.get("x-request-id") != "abc-1"
    assert len(srv.conns) == 1           # the pooled HTTP/1.1 connection was reused
    await env.close()


@run
async def test_expected_rq_timeout_header_only_with_a_timeout() -> None:
    env = make_env(routes=[route(SVC, timeout="5s")])
    c = env.client()
    assert (await c.request()).status == 200
    assert env.servers[A].requests[0].headers.get("x-envoy-expected-rq-timeout-ms") == "5000"
    await env.close()


@run
async def test_server_name_configurable() -> None:
    env = make_env(server_name="istio-envoy")
    r = await env.client().request()
    assert r.get("server") == "istio-envoy"
    await env.close()


@run
async def test_request_bodies_content_length_and_chunked() -> None:
    async def echo(req: UpReq) -> None:
        await req.complete()
        req.respond(200, bytes(req.body))
    env = make_env(servers={A: Server(echo)})
    c = env.client()
    r = await c.request("POST", "/cl", body=b"x" * 1000)
    assert r.body == b"x" * 1000
    c.send(b"POST /ch HTTP/1.1\r\nhost: svc\r\ntransfer-encoding: chunked\r\n\r\n"
           b"3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n")
    r = await c.response()
    assert r.status == 200 and r.body == b"abcde"
    await env.close()


@run
async def test_chunked_response_with_trailers_streams_through() -> None:
    async def handler(req: UpReq) -> None:
        await req.complete()
        req.send_headers(200, [("content-type", "text/plain")])
        req.send_body(b"part1-")
        req.send_body(b"part2")
        req.send_end([("x-trailer", "t")])
    env = make_env(servers={A: Server(handler)})
    r = await env.client().request(headers=[("te", "trailers")])
    assert r.chunked and r.body == b"part1-part2"
    assert ("x-trailer", "t") in r.trailers
    await env.close()


@run
async def test_pipelined_requests_answered_in_order() -> None:
    release = asyncio.Event()

    async def handler(req: UpReq) -> None:
        await req.complete()
        if req.head.path == "/1":
            await release.wait()
        req.respond(200, req.head.path.encode())
    env = make_env(servers={A: Server(handler)})
    c = env.client()
    c.send(http1_request(path="/1") + http1_request(path="/2") + http1_request(path="/3"))
    await env.servers[A].request(1)
    release.set()
    bodies = [(await c.response()).body for _ in range(3)]
    assert bodies == [b"/1", b"/2", b"/3"]
    await env.close()


# ============================================================================ local replies


@run
async def test_no_route_404_nr() -> None:
    env = make_env()
    c = env.client()
    r = await c.request(host="unknown.example")
    assert r.status == 404 and r.body == b"" and r.get("content-length") == "0"
    assert r.get("server") == "envoy" and r.get("date")
    assert r.get("x-envoy-upstream-service-time") is None    # not on local replies
    info = await env.info()
    assert flags(info) == {"NR"} and info.response_code_details == "route_not_found"
    assert env.hcounter("no_route") == 1
    # The connection goes on.
    assert (await c.request()).status == 200
    await env.close()


@run
async def test_no_healthy_upstream_503_uh() -> None:
    env = make_env(hosts=())
    r = await env.client().request()
    assert r.status == 503 and r.body == b"no healthy upstream"
    assert r.get("content-type") == "text/plain"
    info = await env.info()
    assert flags(info) == {"UH"} and info.response_code_details == "no_healthy_upstream"
    await env.close()


@run
async def test_local_reply_to_head_has_no_body() -> None:
    """Envoy's local reply to HEAD: the headers (content-length of the text) and no body, so
    the next response on the connection is framed right."""
    env = make_env(hosts=())
    c = env.client()
    r = await c.request("HEAD", "/")
    assert r.status == 503 and r.get("content-length") == str(len("no healthy upstream"))
    r2 = await c.request("GET", "/", host="nowhere")
    assert r2.status == 404
    assert c.rest == b""
    await env.close()


@run
async def test_connect_failure_503_uf_without_retry_policy() -> None:
    env = make_env(servers={A: Server(refuse=True)})
    r = await env.client().request()
    assert r.status == 503
    assert r.body.decode() == (f"{RESET_BEFORE} reset reason: connection failure, transport "
                               "failure reason: delayed connect error: 111")
    info = await env.info()
    assert flags(info) == {"UF"}
    assert info.response_code_details == \
        "upstream_reset_before_response_started{connection_failure}"
    assert info.upstream_transport_failure_reason == "delayed connect error: 111"
    await env.close()


@run
async def test_connect_failure_retried_with_istio_defaults_then_uf_urx() -> None:
    """Istio's default policy retries connect-failure twice (3 tries), on other hosts."""
    servers = {A: Server(refuse=True), B: Server(refuse=True)}
    env = make_env(routes=[route(SVC, retry_policy=ISTIO_RETRY)], servers=servers,
                   hosts=(A, B))
    r = await env.client().request()
    assert r.status == 503
    assert r.body.decode().startswith(f"{RESET_BEFORE} retried and the latest reset reason: "
                                      "connection failure")
    info = await env.info()
    assert flags(info) == {"UF", "URX"} and info.attempt_count == 3
    assert servers[A].connects + servers[B].connects == 3
    assert servers[A].connects >= 1 and servers[B].connects >= 1   # previous_hosts
    assert env.ccounter(SVC, "upstream_rq_retry") == 2
    await env.close()


@run
async def test_connect_failure_retried_onto_a_good_host() -> None:
    servers = {A: Server(refuse=True), B: Server()}
    env = make_env(routes=[route(SVC, retry_policy=ISTIO_RETRY)], servers=servers,
                   hosts=(A, B))
    c = env.client()
    for _ in range(4):
        assert (await c.request()).status == 200
    for req in servers[B].requests:
        # Round robin: every other request tried A first and came to B on its 2nd attempt.
        assert req.headers.get("x-envoy-attempt-count") in ("1", "2")
    assert any(r.headers.get("x-envoy-attempt-count") == "2" for r in servers[B].requests)
    assert env.ccounter(SVC, "upstream_rq_retry_success") >= 1
    await env.close()


@run
async def test_upstream_closes_before_headers_503_uc() -> None:
    async def slam(req: UpReq) -> None:
        await req.complete()
        req.close()
    env = make_env(servers={A: Server(slam)})
    r = await env.client().request()
    assert r.status == 503
    assert r.body.decode() == f"{RESET_BEFORE} reset reason: connection termination"
    info = await env.info()
    assert flags(info) == {"UC"}
    assert info.response_code_details == \
        "upstream_reset_before_response_started{connection_termination}"
    await env.close()


@run
async def test_reset_retried_by_a_reset_policy() -> None:
    """A VirtualService with retryOn: reset (the netns 'flaky' service), in memory."""
    servers = {A: Server(_slam), B: Server()}
    policy = {"retry_on": "reset,connect-failure", "num_retries": 3,
              "retry_host_predicate": ISTIO_RETRY["retry_host_predicate"],
              "host_selection_retry_max_attempts": "5"}
    env = make_env(routes=[route(SVC, retry_policy=policy)], servers=servers, hosts=(A, B))
    c = env.client()
    for _ in range(4):
        r = await c.request()
        assert r.status == 200, r
    assert len(servers[A].requests) >= 1
    await env.close()


@run
async def test_retriable_status_codes_503_then_other_host() -> None:
    servers = {A: Server(_busy), B: Server()}
    policy = dict(ISTIO_RETRY, retriable_status_codes=[503])
    env = make_env(routes=[route(SVC, retry_policy=policy)], servers=servers, hosts=(A, B))
    c = env.client()
    assert [(await c.request()).status for _ in range(2)] == [200, 200]
    # Round robin: one of the two requests tried A first and got B on its second attempt.
    assert [r.headers.get("x-envoy-attempt-count") for r in servers[B].requests] \
        in (["1", "2"], ["2", "1"])
    assert sorted(i.attempt_count for i in env.infos) == [1, 2]
    assert not any(i.response_flags for i in env.infos)
    await env.close()


def assert_gauges_settled(env: Any) -> None:
    """No request is active or pending anywhere once every stream has finished."""
    active = {k: v for k, v in env.stats.gauges.items()
              if k.endswith(("rq_active", "rq_pending_active")) and v}
    assert active == {}
    for c in env.clusters.values():
        assert [h.stats["rq_active"] for h in c.hosts if h.stats["rq_active"]] == []


async def _half(req: UpReq) -> None:
    await req.complete()
    req.send_headers(200, [("content-length", "10")])
    req.send_body(b"abc")
    req.abort()


@pytest.mark.parametrize(("servers", "policy", "route_extra", "want"), [
    pytest.param({A: Server(), B: Server()}, ISTIO_RETRY, {}, 200, id="ok"),
    pytest.param({A: Server(refuse=True), B: Server(refuse=True)}, ISTIO_RETRY, {}, 503,
                 id="connect-failure-retried"),
    pytest.param({A: Server(_busy), B: Server(_busy)},
                 dict(ISTIO_RETRY, retriable_status_codes=[503], num_retries=1), {}, 503,
                 id="503-retried"),
    pytest.param({A: Server(_slam), B: Server(_slam)}, {"retry_on": "reset", "num_retries": 2},
                 {}, 503, id="reset-retried"),
    pytest.param({A: Server(_never), B: Server(_never)},
                 {"retry_on": "5xx", "num_retries": 1, "per_try_timeout": "0.02s"}, {}, 504,
                 id="per-try-timeouts"),
    pytest.param({A: Server(_never)}, None, {"timeout": "0.02s"}, 504, id="route-timeout"),
    pytest.param({A: Server(_half)}, None, {}, 200, id="reset-mid-body"),
])
def test_gauges_settle_after_every_outcome(servers: dict[Any, Server],
                                           policy: dict[str, Any] | None,
                                           route_extra: dict[str, Any], want: int) -> None:
    @run
    async def scenario() -> None:
        extra = dict(route_extra)
        if policy is not None:
            extra["retry_policy"] = policy
        env = make_env(routes=[route(SVC, **extra)], servers=servers,
                       hosts=tuple(servers))
        c = env.client()
        for _ in range(3):
            try:
                r = await c.request()
                assert r.status == want
            except Exception:           # the mid-body reset also resets the downstream
                assert want == 200
                c = env.client()
        await env.info(3)
        assert_gauges_settled(env)
        await env.close()
        assert {k: v for k, v in env.stats.gauges.items() if k.endswith("cx_active") and v} \
            == {}
        assert [h.stats["cx_active"] for c in env.clusters.values() for h in c.hosts
                if h.stats["cx_active"]] == []
    scenario()


@run
async def test_gauges_settle_after_a_downstream_disconnect() -> None:
    env = make_env(servers={A: Server(_never)})
    c = env.client()
    c.send(http1_request())
    await env.servers[A].request()
    c.transport.close()
    await env.info()
    assert_gauges_settled(env)
    await env.close()


@run
async def test_gauges_settle_after_a_disconnect_while_pending() -> None:
    """The client leaves while its request waits for an upstream connection; the next
    request is served."""
    srv = Server()
    srv.connect_gate = asyncio.get_running_loop().create_future()
    env = make_env(servers={A: srv})
    c = env.client()
    c.send(http1_request())
    await srv.changed.until(lambda: srv.connects == 1)
    assert env.stats.gauges[f"cluster.{SVC}.upstream_rq_pending_active"] == 1
    c.transport.close()
    await env.info()
    if not srv.connect_gate.done():         # (giving up the wait may cancel the connect)
        srv.connect_gate.set_result(None)
    srv.connect_gate = None
    assert (await env.client().request()).status == 200
    await env.info(2)
    assert_gauges_settled(env)
    await env.close()
    assert {k: v for k, v in env.stats.gauges.items() if k.endswith("cx_active") and v} == {}


@run
async def test_503_not_retried_by_istio_defaults() -> None:
    """Since Istio 1.24 retriable_status_codes is empty: a 503 answer goes back as is."""
    servers = {A: Server(_busy), B: Server(_busy)}
    env = make_env(routes=[route(SVC, retry_policy=ISTIO_RETRY)], servers=servers,
                   hosts=(A, B))
    r = await env.client().request()
    assert r.status == 503 and r.body == b"busy"
    assert len(servers[A].requests) + len(servers[B].requests) == 1
    assert (await env.info()).response_code_details == "via_upstream"
    await env.close()


@run
async def test_retry_replays_a_body_still_streaming() -> None:
    """The first try dies after part of the body went out; the retry gets all of it."""
    got: list[bytes] = []
    tries: list[UpReq] = []
    seen = Waitable()

    async def first_dies(req: UpReq) -> None:
        tries.append(req)
        seen.changed()
        if len(tries) == 1:
            await req.changed.until(lambda: len(req.body) >= 3)
            req.abort()
            return
        await req.complete()
        got.append(bytes(req.body))
        req.respond(200, bytes(req.body))
    servers = {A: Server(first_dies), B: Server(first_dies)}
    policy = {"retry_on": "reset", "num_retries": 2,
              "retry_host_predicate": ISTIO_RETRY["retry_host_predicate"],
              "host_selection_retry_max_attempts": "5"}
    env = make_env(routes=[route(SVC, retry_policy=policy)], servers=servers, hosts=(A, B))
    c = env.client()
    c.send(b"POST / HTTP/1.1\r\nhost: svc\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n")
    # The retry starts while the body is unfinished.
    await seen.until(lambda: len(tries) == 2)
    assert tries[0].conn.server is not tries[1].conn.server    # previous_hosts
    c.send(b"3\r\ndef\r\n0\r\n\r\n")
    r = await c.response()
    assert r.status == 200 and r.body == b"abcdef"
    assert got == [b"abcdef"]
    await env.close()


@run
async def test_per_try_timeout_retried_then_504_ut_urx() -> None:
    servers = {A: Server(_never), B: Server(_never)}
    policy = {"retry_on": "5xx", "num_retries": 1, "per_try_timeout": "0.05s"}
    env = make_env(routes=[route(SVC, retry_policy=policy)], servers=servers, hosts=(A, B))
    r = await env.client().request()
    assert r.status == 504 and r.body == b"upstream request timeout"
    assert servers[A].requests and servers[B].requests
    info = await env.info()
    assert flags(info) == {"UT", "URX"}
    assert info.response_code_details == "upstream_per_try_timeout"
    assert env.ccounter(SVC, "upstream_rq_per_try_timeout") == 2
    # Each abandoned HTTP/1 upstream connection was closed (it cannot be reused mid-message).
    await servers[A].conns[0].changed.until(lambda: servers[A].conns[0].lost)
    await env.close()


@run
async def test_route_timeout_504_ut() -> None:
    env = make_env(routes=[route(SVC, timeout="0.05s")], servers={A: Server(_never)})
    c = env.client()
    r = await c.request()
    assert r.status == 504 and r.body == b"upstream request timeout"
    assert env.servers[A].requests[0].headers.get("x-envoy-expected-rq-timeout-ms") == "50"
    info = await env.info()
    assert flags(info) == {"UT"} and info.response_code_details == "upstream_response_timeout"
    assert env.ccounter(SVC, "upstream_rq_timeout") == 1
    await env.close()


@run
async def test_route_timeout_after_headers_resets_downstream() -> None:
    """The total timeout also covers the body: after the headers went out Envoy can only
    reset (HTTP/1: close the connection)."""
    async def stall(req: UpReq) -> None:
        await req.complete()
        req.send_headers(200, [("content-length", "10")])
        req.send_body(b"12345")
        await asyncio.Future()
    env = make_env(routes=[route(SVC, timeout="0.05s")], servers={A: Server(stall)})
    c = env.client()
    c.send(http1_request())
    await c.closed()
    assert c.end.data.startswith(b"HTTP/1.1 200 OK\r\n")
    info = await env.info()
    assert "UT" in flags(info)
    await env.close()


@run
async def test_circuit_breaker_max_requests_503_uo() -> None:
    gate = asyncio.Event()

    async def held(req: UpReq) -> None:
        await gate.wait()
        await ok_handler(req)
    env = make_env(servers={A: Server(held)},
                   cluster_kw={"default_thresholds": Thresholds(max_requests=1)})
    c1, c2 = env.client(), env.client()
    c1.send(http1_request(path="/first"))
    await env.servers[A].request()
    r2 = await c2.request(path="/second")
    assert r2.status == 503 and r2.get("x-envoy-overloaded") == "true"
    assert r2.body.decode() == f"{RESET_BEFORE} reset reason: overflow"
    info = await env.info()
    assert flags(info) == {"UO"}
    gate.set()
    assert (await c1.response()).status == 200
    assert env.ccounter(SVC, "upstream_rq_pending_overflow") == 1
    await env.close()


@run
async def test_circuit_breaker_max_pending_requests_503_uo() -> None:
    srv = Server()
    srv.connect_gate = asyncio.get_running_loop().create_future()
    env = make_env(servers={A: srv},
                   cluster_kw={"default_thresholds": Thresholds(max_pending_requests=1)})
    c1, c2 = env.client(), env.client()
    c1.send(http1_request(path="/first"))
    await srv.changed.until(lambda: srv.connects == 1)    # waiting for its connection
    r2 = await c2.request(path="/second")
    assert r2.status == 503 and r2.get("x-envoy-overloaded") == "true"
    srv.connect_gate.set_result(None)
    assert (await c1.response()).status == 200
    assert env.ccounter(SVC, "upstream_rq_pending_overflow") == 1
    await env.close()


@run
async def test_circuit_breaker_max_retries_stops_retrying() -> None:
    servers = {A: Server(refuse=True), B: Server()}
    env = make_env(routes=[route(SVC, retry_policy=ISTIO_RETRY)], servers=servers,
                   hosts=(A, B), cluster_kw={"default_thresholds": Thresholds(max_retries=0)})
    c = env.client()
    r = await c.request()
    if r.status == 200:                  # round robin started on B; the next goes to A
        r = await c.request()
    assert r.status == 503
    info = env.infos[-1]
    assert flags(info) == {"UF"}         # no retry happened, so no URX
    assert env.ccounter(SVC, "upstream_rq_retry_overflow") == 1
    await env.close()


@run
async def test_outlier_detection_ejects_a_failing_host() -> None:
    async def busy(req: UpReq) -> None:
        await req.complete()
        req.respond(503)
    servers = {A: Server(busy), B: Server()}
    od = OutlierDetection(consecutive_5xx=2, base_ejection_time=30.0, max_ejection_percent=50)
    env = make_env(servers=servers, hosts=(A, B), cluster_kw={"outlier_detection": od})
    c = env.client()
    statuses = [(await c.request()).status for _ in range(4)]
    assert statuses.count(503) == 2      # round robin: A twice, then it is ejected
    later = [(await c.request()).status for _ in range(4)]
    assert later == [200] * 4
    assert len(servers[A].requests) == 2
    assert env.ccounter(SVC, "outlier_detection.ejections_enforced_total") == 1
    assert env.stats.gauges[f"cluster.{SVC}.outlier_detection.ejections_active"] == 1
    await env.close()


@run
async def test_failover_to_the_next_priority_when_the_local_host_is_ejected() -> None:
    """Istio's locality failover: the local endpoint (P0) takes every request while it is
    healthy; once outlier detection ejects it, P1's endpoint takes them all."""
    servers = {A: Server(_busy), B: Server()}
    od = OutlierDetection(consecutive_5xx=2, base_ejection_time=30.0,
                          max_ejection_percent=100)
    env = make_env(servers=servers, hosts=(A, B),
                   cluster_kw={"outlier_detection": od, "priorities": (0, 1)})
    c = env.client()
    assert [(await c.request()).status for _ in range(2)] == [503, 503]
    assert not servers[B].requests             # P1 idle while P0 is healthy
    assert [(await c.request()).status for _ in range(4)] == [200] * 4
    assert len(servers[A].requests) == 2 and len(servers[B].requests) == 4
    await env.close()


@run
async def test_fault_abort_and_delay() -> None:
    abort = {"abort": {"http_status": 503, "percentage": {"numerator": 100}}}
    delay = {"delay": {"fixed_delay": "0.02s", "percentage": {"numerator": 100}}}
    routes = [
        route(SVC, prefix="/abort", name="abort",
              ) | {"typed_per_filter_config": {"envoy.filters.http.fault": {
                  "@type": FAULT_TYPE, **abort}}},
        route(SVC, prefix="/delay", name="delay",
              ) | {"typed_per_filter_config": {"envoy.filters.http.fault": {
                  "@type": FAULT_TYPE, **delay}}},
    ]
    env = make_env(routes=routes)
    c = env.client()
    r = await c.request(path="/abort")
    assert r.status == 503 and r.body == b"fault filter abort"
    info = await env.info(1)
    assert flags(info) == {"FI"} and info.response_code_details == "fault_filter_abort"
    assert not env.servers[A].requests
    r = await c.request(path="/delay")
    assert r.status == 200
    assert flags(await env.info(2)) == {"DI"}
    await env.close()


@run
async def test_unknown_cluster_503_nc() -> None:
    env = make_env(routes=[route("outbound|8080||nope")])
    r = await env.client().request()
    assert r.status == 503
    info = await env.info()
    assert flags(info) == {"NC"} and info.response_code_details == "cluster_not_found"
    await env.close()


@run
async def test_direct_response_and_redirect() -> None:
    routes = [
        {"name": "block", "match": {"prefix": "/blocked"},
         "direct_response": {"status": 502, "body": {"inline_string": "nope"}}},
        {"name": "moved", "match": {"prefix": "/old"},
         "redirect": {"path_redirect": "/new", "response_code": "MOVED_PERMANENTLY"}},
        route(SVC),
    ]
    env = make_env(routes=routes)
    c = env.client()
    r = await c.request(path="/blocked")
    assert r.status == 502 and r.body == b"nope"
    assert (await env.info(1)).response_code_details == "direct_response"
    r = await c.request(path="/old")
    assert r.status == 301 and r.get("location") == "http://svc/new"
    assert not env.servers[A].requests
    await env.close()


@run
async def test_downstream_disconnect_dc_resets_upstream() -> None:
    env = make_env(servers={A: Server(_never)})
    c = env.client()
    c.send(http1_request())
    up = await env.servers[A].request()
    c.transport.close()
    info = await env.info()
    assert "DC" in flags(info) and info.response_code == 0
    # The HTTP/1 upstream connection under the abandoned request was closed.
    await up.conn.changed.until(lambda: up.conn.lost)
    assert env.stats.gauges[f"http.{env.config.stat_prefix}.downstream_rq_active"] == 0
    await env.close()


# ============================================================================ bad input


async def _bad(env: Env, data: bytes) -> tuple[Any, Client]:
    c = env.client()
    c.send(data)
    r = await c.response()
    await c.closed()
    return r, c


@run
async def test_malformed_request_line_400_and_close() -> None:
    env = make_env()
    r, _ = await _bad(env, b"GET / HTTP/1.1 extra\r\nhost: svc\r\n\r\n")
    assert r.status == 400 and r.body == b"Bad Request"
    assert r.get("connection") == "close"
    info = await env.info()
    assert flags(info) == {"DPE"} and info.response_code_details == "http1.codec_error"
    assert not env.servers[A].requests
    assert env.hcounter("downstream_cx_protocol_error") == 1
    await env.close()


@run
async def test_oversized_headers_431() -> None:
    """Envoy's limits: 60 KiB of headers, 100 header fields."""
    env = make_env()
    big = [("x-big", "a" * (61 * 1024))]
    r, _ = await _bad(env, http1_request(headers=big))
    assert r.status == 431 and r.body == b"Request Header Fields Too Large"
    assert (await env.info(1)).response_code_details == "http1.headers_too_large"
    many = [(f"x-h{i}", "v") for i in range(100)]     # + host = 101 fields
    r, _ = await _bad(env, http1_request(headers=many))
    assert r.status == 431
    assert (await env.info(2)).response_code_details == "http1.too_many_headers"
    # 99 + host is fine.
    ok = await env.client().request(headers=many[:99])
    assert ok.status == 200
    assert not any(req.headers.get("x-big") for req in env.servers[A].requests)
    await env.close()


# ------------------------------------------------------------------ delayed close


@run
async def test_delayed_close_waits_for_the_peer_after_an_early_answer() -> None:
    """A 404 before the request body ended: the connection stays open, reading and dropping
    what the client still sends, until the client closes (Envoy's delayed_close_timeout)."""
    env = make_env(routes=[route(SVC, prefix="/only")], delayed_close_timeout="5s")
    c = env.client()
    c.send(b"POST /elsewhere HTTP/1.1\r\nhost: svc\r\ncontent-length: 100000\r\n\r\n" +
           b"x" * 1000)
    r = await c.response()
    assert r.status == 404 and r.get("connection") == "close"
    c.send(b"x" * 5000)                     # still uploading: read and dropped
    await settle(lambda: False, rounds=50)
    assert not c.end.eof and not c.end.lost
    c.shutdown()                            # the client closes: so does the proxy, at once
    await c.closed(timeout=1.0)
    assert env.hcounter("downstream_cx_delayed_close_timeout") == 0
    await env.close()


@run
async def test_delayed_close_reads_again_what_flow_control_paused() -> None:
    """The upstream stopped reading an upload, so the proxy stopped reading the client; then
    the route timed out. While the close is delayed the client's bytes are read and dropped:
    otherwise they could not drain, and the close would reset anyway."""
    async def stall(req: UpReq) -> None:
        req.conn.transport.pause_reading()      # the upstream app takes nothing more
        await asyncio.Future()
    env = make_env(servers={A: Server(stall)}, routes=[route(SVC, timeout="0.2s")],
                   delayed_close_timeout="5s")
    c = env.client()
    c.send(b"POST / HTTP/1.1\r\nhost: svc\r\ncontent-length: 100000000\r\n\r\n")
    for _ in range(64):
        c.send(b"x" * 65536)
    proxy_side = c.server_side
    assert await settle(lambda: proxy_side.paused), "the upload was never paused"
    r = await c.response()
    assert r.status == 504
    assert await settle(lambda: not proxy_side.paused), "still paused during the delay"
    assert not c.end.eof and not c.end.lost
    c.shutdown()
    await c.closed(timeout=1.0)
    await env.close()


@run
async def test_delayed_close_times_out() -> None:
    env = make_env(delayed_close_timeout="0.05s")
    c = env.client()
    c.send(http1_request(headers=[("x-big", "a" * (61 * 1024))]))
    r = await c.response()
    assert r.status == 431
    await c.closed(timeout=2.0)
    assert env.hcounter("downstream_cx_delayed_close_timeout") == 1
    await env.close()


@pytest.mark.parametrize("delay", ["5s", "0s"])
def test_no_delayed_close_when_nothing_more_can_come(delay: str) -> None:
    """A request read whole and answered with connection: close closes at once, and a
    delayed_close_timeout of 0 turns the delay off."""
    @run
    async def scenario() -> None:
        env = make_env(routes=[route(SVC, prefix="/only")], delayed_close_timeout=delay)
        c = env.client()
        r = await c.request(headers=[("connection", "close")])
        assert r.status == 404
        await c.closed(timeout=1.0)
        if delay == "0s":                   # answered early, yet closed at once
            c = env.client()
            c.send(b"POST / HTTP/1.1\r\nhost: svc\r\ncontent-length: 10\r\n\r\nx")
            assert (await c.response()).status == 404
            await c.closed(timeout=1.0)
        assert env.hcounter("downstream_cx_delayed_close_timeout") == 0
        await env.close()
    scenario()


@run
async def test_smuggling_content_length_with_chunked_400() -> None:
    env = make_env()
    smuggled = (b"POST / HTTP/1.1\r\nhost: svc\r\ncontent-length: 4\r\n"
                b"transfer-encoding: chunked\r\n\r\n0\r\n\r\n"
                b"GET /admin HTTP/1.1\r\nhost: svc\r\n\r\n")
    r, _ = await _bad(env, smuggled)
    assert r.status == 400
    assert (await env.info()).response_code_details == \
        "http1.content_length_and_chunked_not_allowed"
    assert not env.servers[A].requests          # neither request went upstream
    await env.close()


@run
async def test_smuggling_duplicate_content_length_400() -> None:
    env = make_env()
    r, _ = await _bad(env, b"POST / HTTP/1.1\r\nhost: svc\r\ncontent-length: 3\r\n"
                           b"content-length: 30\r\n\r\nabcGET /x HTTP/1.1\r\n\r\n")
    assert r.status == 400
    assert not env.servers[A].requests
    await env.close()


@run
async def test_unknown_transfer_coding_501() -> None:
    env = make_env()
    r, _ = await _bad(env, b"POST / HTTP/1.1\r\nhost: svc\r\ntransfer-encoding: gzip, chunked"
                           b"\r\n\r\n0\r\n\r\n")
    assert r.status == 501 and r.body == b"Not Implemented"
    await env.close()


@run
async def test_good_pipelined_request_answered_before_protocol_error() -> None:
    env = make_env()
    c = env.client()
    c.send(http1_request(path="/good") + b"NOT HTTP AT ALL\r\n\r\n")
    r1 = await c.response()
    r2 = await c.response()
    await c.closed()
    assert (r1.status, r1.body) == (200, b"ok /good")
    assert r1.get("connection") is None           # the good one was not told to close
    assert r2.status == 400 and r2.get("connection") == "close"
    assert len(env.servers[A].requests) == 1
    await env.close()


@run
async def test_slowloris_request_headers_timeout_408() -> None:
    """``request_headers_timeout`` (off by default in Envoy; set here): a head that does not
    complete in time gets 408; another connection is served meanwhile."""
    env = make_env(request_headers_timeout="0.05s")
    slow = env.client()
    slow.send(b"GET / HTTP/1.1\r\nhost: svc\r\nx-a: ")
    fast = env.client()
    assert (await fast.request()).status == 200
    r = await slow.response()
    await slow.closed()
    assert r.status == 408 and r.body == b"request header timeout"
    info = await env.info(2)
    assert info.response_code_details == "request_header_timeout"
    assert env.hcounter("downstream_rq_timeout") == 1
    await env.close()


@run
async def test_headers_timer_starts_with_the_first_byte() -> None:
    """Envoy arms ``request_headers_timeout`` at the first byte of a head: an idle keep-alive
    connection is the idle timeout's business, not a 408."""
    env = make_env(request_headers_timeout="0.05s")
    c = env.client()
    await asyncio.sleep(0.08)            # longer than the timeout, nothing sent: no 408
    assert not c.end.data and not c.end.eof
    assert (await c.request()).status == 200
    await env.close()


@run
async def test_bad_clients_do_not_affect_a_good_one() -> None:
    env = make_env(request_headers_timeout="0.2s")
    good = env.client()
    c1 = env.client()
    c1.send(b"\x00\x01\x02garbage\r\n\r\n")
    c2 = env.client()
    c2.send(http1_request(headers=[("x", "y" * 70000)]))
    c3 = env.client()
    c3.send(b"GET / HTTP/1.1\r\nhost")
    r = await good.request()
    assert r.status == 200
    for c in (c1, c2, c3):
        await c.closed()
    assert (await good.request(path="/again")).body == b"ok /again"
    await env.close()


MALFORMED_PARTS = [
    b"GET / HTTP/1.1\r\n", b"host: svc\r\n", b"\r\n", b"content-length: 5\r\n",
    b"content-length: -1\r\n", b"transfer-encoding: chunked\r\n", b"0\r\n\r\n",
    b"zz\r\n", b"\x00", b"\xff\xfe", b" ", b"\n", b"POST /x HTTP/1.0\r\n",
    b"GET http://svc/abs HTTP/1.1\r\n", b"connection: upgrade\r\nupgrade: websocket\r\n",
    b"expect: 100-continue\r\n", b"a" * 300, b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
    b"x-y: \x7f\r\n", b"GET / HTTP/9.9\r\n", b"hello",
]


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.lists(st.one_of(st.sampled_from(MALFORMED_PARTS), st.binary(max_size=40)),
                max_size=12),
       st.integers(min_value=1, max_value=64), st.booleans())
def test_fuzz_malformed_requests(parts: list[bytes], split: int, eof: bool) -> None:
    """Whatever arrives, the connection ends or answers with well-framed HTTP/1.1, no
    stream dies of an exception, and a neighbouring connection still works."""
    async def body() -> None:
        env = make_env(request_headers_timeout="0.2s")
        c = env.client()
        data = b"".join(parts)
        for i in range(0, len(data), split):
            c.send(data[i:i + split])
        if eof:
            c.shutdown()
        good = env.client()
        assert (await good.request()).status == 200
        # Drain what the bad client gets: every message must parse.
        while True:
            try:
                r = await c.response(timeout=1.0)
            except (ConnectionError, TimeoutError):
                break
            assert 100 <= r.status < 600
        await env.close()
    asyncio.run(asyncio.wait_for(body(), 10))


# ============================================================================ 100-continue


@run
async def test_expect_100_continue_answered_by_envoy_by_default() -> None:
    """``proxy_100_continue: false`` (Envoy's default): Envoy answers 100 itself and drops
    ``Expect`` from the upstream request."""
    env = make_env()
    c = env.client()
    c.send(b"POST / HTTP/1.1\r\nhost: svc\r\ncontent-length: 3\r\nexpect: 100-continue\r\n\r\n")
    r = await c.response()
    assert r.status == 100
    c.send(b"abc")
    r = await c.response()
    assert r.status == 200
    up = env.servers[A].requests[0]
    assert "expect" not in up.headers and bytes(up.body) == b"abc"
    await env.close()


@run
async def test_expect_100_continue_proxied_when_configured() -> None:
    async def handler(req: UpReq) -> None:
        assert req.headers.get("expect") == "100-continue"
        req.informational(100)
        await req.complete()
        req.respond(201, bytes(req.body))
    env = make_env(servers={A: Server(handler)}, proxy_100_continue=True)
    c = env.client()
    c.send(b"POST / HTTP/1.1\r\nhost: svc\r\ncontent-length: 3\r\nexpect: 100-continue\r\n\r\n")
    r = await c.response()
    assert r.status == 100
    c.send(b"xyz")
    r = await c.response()
    assert r.status == 201 and r.body == b"xyz"
    await env.close()


# ============================================================================ upgrades


async def _ws_handler(req: UpReq) -> None:
    """Accept the upgrade, then echo tunnel bytes upper-cased until EOF."""
    assert req.upgrade == "websocket"
    req.send_headers(101, [("upgrade", "websocket")])
    conn = req.conn
    conn._dispatch(conn.codec.resume())      # the codec's contract: early tunnel bytes
    seen = 0
    while True:
        await req.changed.until(
            lambda n=seen: len(req.body) > n or req.ended or req.reset)  # type: ignore[misc]
        if len(req.body) > seen:
            conn.codec.send_body(req.stream, bytes(req.body[seen:]).upper())
            conn.flush()
            seen = len(req.body)
        if req.ended or req.reset:
            break
    conn.transport.close()


WS_REQUEST = (b"GET /chat HTTP/1.1\r\nhost: svc\r\nconnection: Upgrade\r\nupgrade: websocket\r\n"
              b"sec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\nsec-websocket-version: 13\r\n\r\n")


@run
async def test_websocket_upgrade_tunnels_both_ways() -> None:
    env = make_env(servers={A: Server(_ws_handler)})
    c = env.client()
    c.send(WS_REQUEST + b"early")        # tunnel bytes right behind the head
    r = await c.response()
    assert r.status == 101 and r.get("upgrade") == "websocket"
    up = env.servers[A].requests[0]
    assert up.headers.get("upgrade") == "websocket"
    assert up.headers.get("sec-websocket-key") == "dGhlIHNhbXBsZSBub25jZQ=="
    await c.end.until(lambda: c.rest == b"EARLY")
    c.send(b"more")
    await c.end.until(lambda: c.rest == b"EARLYMORE")
    # The client half-closes: the upstream sees EOF, closes, and so does the proxy.
    c.shutdown()
    await c.closed()
    info = await env.info()
    assert up.ended                      # the half-close reached the upstream as EOF
    assert info.response_code == 101 and not info.response_flags
    assert info.bytes_received == len(b"earlymore") and info.bytes_sent == len(b"EARLYMORE")
    await env.close()


@run
async def test_websocket_refused_by_upstream_connection_goes_on() -> None:
    async def refuse(req: UpReq) -> None:
        if not req.upgrade:
            await ok_handler(req)
            return
        req.respond(403, b"no ws")       # answered at once: no EndStream before an answer
    env = make_env(servers={A: Server(refuse)})
    c = env.client()
    c.send(WS_REQUEST)
    r = await c.response()
    assert r.status == 403 and r.body == b"no ws"
    info = await env.info()
    assert info.response_code == 403
    r = await c.request(path="/after")
    assert r.status == 200
    await env.close()


@run
async def test_websocket_on_route_without_upgrade_403() -> None:
    env = make_env(upgrade_configs=[])
    c = env.client()
    c.send(WS_REQUEST)
    r = await c.response()
    assert r.status == 403
    info = await env.info()
    assert info.response_code_details == "upgrade_failed"
    assert env.hcounter("downstream_rq_ws_on_non_ws_route") == 1
    assert not env.servers[A].requests
    await env.close()


# ============================================================================ HTTP/2


class H2Client:
    """A prior-knowledge HTTP/2 client on the real client codec."""

    def __init__(self, env: Env) -> None:
        self.c = env.client()
        self.codec = H2ClientCodec()
        self.heads: dict[int, Any] = {}
        self.bodies: dict[int, bytearray] = {}
        self.ended: dict[int, Any] = {}
        self.pos = 0
        self.consume = True          # give the window back as bytes arrive
        self.unconsumed: dict[int, int] = {}
        self.goaways: list[int] = []         # last_stream of each GOAWAY received
        self.flush()

    def flush(self) -> None:
        out = self.codec.data_to_send()
        if out:
            self.c.send(out)

    def _pump(self) -> None:
        data = bytes(self.c.end.data[self.pos:])
        self.pos = len(self.c.end.data)
        if data:
            for ev in self.codec.receive(data):
                if isinstance(ev, ResponseHeaders):
                    self.heads[ev.stream] = ev.head
                    self.bodies[ev.stream] = bytearray()
                    if ev.end_stream:
                        self.ended[ev.stream] = None
                elif isinstance(ev, Body):
                    self.bodies[ev.stream] += ev.data
                    if self.consume:
                        self.codec.consumed(ev.stream, len(ev.data))
                    else:
                        self.unconsumed[ev.stream] = \
                            self.unconsumed.get(ev.stream, 0) + len(ev.data)
                elif isinstance(ev, EndStream):
                    self.ended[ev.stream] = ev.trailers
                elif isinstance(ev, ConnectionClosed):
                    self.goaways.append(ev.last_stream)
                elif isinstance(ev, Writable):
                    pass
            self.flush()

    def request(self, method: str, path: str, headers: list[tuple[str, str]] = (),  # type: ignore[assignment]
                body: bytes = b"", trailers: list[tuple[str, str]] | None = None) -> int:
        from remora.proxy.http.types import HeaderMap
        sid = self.codec.new_stream()
        self.codec.send_headers(sid, request_head(method, path, "svc", headers),
                                not body and trailers is None)
        if body:
            self.codec.send_body(sid, body)
        if body or trailers is not None:
            self.codec.send_end(sid, HeaderMap(trailers) if trailers else None)
        self.flush()
        return sid

    def give_back(self) -> None:
        self.consume = True
        for sid, n in self.unconsumed.items():
            self.codec.consumed(sid, n)
        self.unconsumed.clear()
        self.flush()

    async def response(self, sid: int) -> tuple[Any, bytes, Any]:
        def done() -> bool:
            self._pump()
            return sid in self.ended
        await self.c.end.until(done)
        return self.heads[sid], bytes(self.bodies[sid]), self.ended[sid]


@run
async def test_http2_gauges_settle_after_resets_both_ways() -> None:
    """On one HTTP/2 connection: a stream served, one the client resets while it waits, one
    the upstream resets: nothing stays active, and the connection still serves."""
    async def handler(req: UpReq) -> None:
        if req.head.path == "/hang":
            await asyncio.Future()
        if req.head.path == "/slam":
            await _slam(req)
            return
        await ok_handler(req)
    env = make_env(servers={A: Server(handler)})
    h = H2Client(env)
    assert (await h.response(h.request("GET", "/a")))[0].status == 200
    sid = h.request("GET", "/hang")
    await env.servers[A].request(2)
    h.codec.reset(sid)
    h.flush()
    await env.info(2)
    assert (await h.response(h.request("GET", "/slam")))[0].status == 503
    assert (await h.response(h.request("GET", "/b")))[0].status == 200
    await env.info(4)
    assert_gauges_settled(env)
    assert env.stats.gauges[f"http.{env.config.stat_prefix}.downstream_rq_active"] == 0
    await env.close()


@run
async def test_http2_prior_knowledge_concurrent_streams() -> None:
    release = asyncio.Event()

    async def handler(req: UpReq) -> None:
        await req.complete()
        if req.head.path == "/slow":
            await release.wait()
        req.respond(200, req.head.path.encode())
    env = make_env(servers={A: Server(handler)})
    h = H2Client(env)
    s1 = h.request("GET", "/slow")
    s3 = h.request("GET", "/fast")
    head3, body3, _ = await h.response(s3)     # not blocked behind /slow
    assert head3.status == 200 and body3 == b"/fast"
    assert head3.headers.get("server") == "envoy"
    release.set()
    _, body1, _ = await h.response(s1)
    assert body1 == b"/slow"
    assert env.hcounter("downstream_cx_http2_total") == 1
    assert {i.protocol for i in env.infos} == {"HTTP/2"}
    await env.close()


@run
async def test_http2_downstream_flow_control_large_bodies() -> None:
    """More than a stream window (256 KiB) each way: the HCM must give the downstream window
    back (``consumed``) as it forwards request bytes, and resume on ``Writable``."""
    size = 1 << 20

    async def echo_len(req: UpReq) -> None:
        await req.complete()
        req.respond(200, b"z" * size, [("x-got", str(len(req.body)))])
    env = make_env(servers={A: Server(echo_len)})
    h = H2Client(env)
    sid = h.request("POST", "/up", [("content-length", str(size))], body=b"y" * size)
    head, body, _ = await h.response(sid)
    assert head.headers.get("x-got") == str(size)
    assert len(body) == size
    await env.close()


@run
async def test_http2_downstream_window_pauses_upstream_until_writable() -> None:
    """A client that does not give its stream window back: the codec holds the response,
    the proxy stops reading the upstream; WINDOW_UPDATE → ``Writable`` → reading resumes."""
    size = 1 << 20
    writable: list[int] = []

    async def big(req: UpReq) -> None:
        await req.complete()
        req.send_headers(200, [("content-length", str(size))])
        for _ in range(size // 16384):
            req.send_body(b"w" * 16384)
        req.send_end()
    env = make_env(servers={A: Server(big)})
    h = H2Client(env)
    h.consume = False
    sid = h.request("GET", "/big")
    srv = env.servers[A]
    await srv.request()
    proxy_side = srv.conns[0].transport.peer
    assert proxy_side is not None

    def window_closed() -> bool:
        h._pump()
        return proxy_side.paused
    assert await settle(window_closed), "upstream not paused by the closed HTTP/2 window"
    assert sum(len(b) for b in h.bodies.values()) < size
    conn = env.clients[0].conn
    assert conn.codec is not None

    class Spy:
        """The codec, with the Writable events it gives the connection manager noted
        (a compiled codec's methods cannot be replaced on the instance)."""

        def __init__(self, inner: Any) -> None:
            self.inner = inner

        def __getattr__(self, name: str) -> Any:
            return getattr(self.inner, name)

        def receive(self, data: bytes) -> list[Any]:
            events: list[Any] = self.inner.receive(data)
            writable.extend(e.stream for e in events if isinstance(e, Writable))
            return events
    conn.codec = Spy(conn.codec)
    h.give_back()
    _, body, _ = await h.response(sid)
    assert len(body) == size
    assert writable and set(writable) == {sid}
    await env.close()


@run
async def test_h2c_upgrade_downstream() -> None:
    env = make_env()
    c = env.client()
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    settings_header = conn.initiate_upgrade_connection().decode()
    c.send(b"GET /up HTTP/1.1\r\nhost: svc\r\nconnection: Upgrade, HTTP2-Settings\r\n"
           b"upgrade: h2c\r\nhttp2-settings: " + settings_header.encode() + b"\r\n\r\n")
    r = await c.response()
    assert r.status == 101 and r.get("upgrade") == "h2c"
    conn.initiate_connection()
    c.send(conn.data_to_send())
    got: dict[str, Any] = {"headers": None, "body": b"", "end": False}

    def pump() -> bool:
        data = c.rest
        c.pos += len(data)
        for ev in conn.receive_data(data):
            if isinstance(ev, h2.events.ResponseReceived) and ev.stream_id == 1:
                got["headers"] = dict(ev.headers)
            elif isinstance(ev, h2.events.DataReceived) and ev.stream_id == 1:
                got["body"] += ev.data
                conn.acknowledge_received_data(ev.flow_controlled_length, 1)
            elif isinstance(ev, h2.events.StreamEnded) and ev.stream_id == 1:
                got["end"] = True
        out = conn.data_to_send()
        if out:
            c.send(out)
        return bool(got["end"])
    await c.end.until(pump)
    assert got["headers"][b":status"] == b"200" and got["body"] == b"ok /up"
    await env.close()


@run
async def test_http2_upstream_grpc_with_trailers() -> None:
    async def grpc(req: UpReq) -> None:
        await req.complete()
        assert req.head.protocol == "HTTP/2" and req.headers.get("te") == "trailers"
        req.send_headers(200, [("content-type", "application/grpc")])
        req.send_body(b"\x00\x00\x00\x00\x02hi")
        req.send_end([("grpc-status", "0"), ("grpc-message", "")])
    env = make_env(servers={A: Server(grpc, protocol="HTTP/2")},
                   cluster_kw={"http_protocol": "HTTP2"})
    h = H2Client(env)
    sid = h.request("POST", "/pkg.Svc/Call", [("content-type", "application/grpc"),
                                              ("te", "trailers")],
                    body=b"\x00\x00\x00\x00\x01x")
    head, body, trailers = await h.response(sid)
    assert head.status == 200 and body == b"\x00\x00\x00\x00\x02hi"
    assert trailers is not None and trailers.get("grpc-status") == "0"
    info = await env.info()
    assert info.grpc_status == 0
    # Two calls share one upstream HTTP/2 connection.
    sid = h.request("POST", "/pkg.Svc/Call", [("content-type", "application/grpc"),
                                              ("te", "trailers")], body=b"\x00\x00\x00\x00\x00")
    await h.response(sid)
    assert len(env.servers[A].conns) == 1
    await env.close()


GRPC_STATS = {"name": "envoy.filters.http.grpc_stats", "typed_config": {
    "@type": "type.googleapis.com/envoy.extensions.filters.http.grpc_stats.v3.FilterConfig",
    "emit_filter_state": True, "stats_for_all_methods": True}}


def istio_stats(**value: Any) -> dict[str, Any]:
    return {"name": "istio.stats", "typed_config": {
        "@type": "type.googleapis.com/udpa.type.v1.TypedStruct",
        "type_url": "type.googleapis.com/stats.PluginConfig", "value": value}}


def grpc_frame(payload: bytes) -> bytes:
    return b"\x00" + len(payload).to_bytes(4, "big") + payload


GRPC_HEADERS = [("content-type", "application/grpc"), ("te", "trailers")]


def message_counts(env: Env) -> tuple[dict[Any, int], dict[Any, int]]:
    fams = env.stats.families
    req, resp = fams.get("istio_request_messages_total"), fams.get("istio_response_messages_total")
    return (dict(req.values) if req else {}, dict(resp.values) if resp else {})


@run
async def test_grpc_stats_count_calls_and_messages_with_istio_labels() -> None:
    """Istio's outbound chain (grpc_stats with emit_filter_state, istio.stats): Envoy's
    per-method cluster stats, and Istio's message counters with the reporter and peer labels
    only."""
    async def streaming(req: UpReq) -> None:
        await req.complete()
        req.send_headers(200, [("content-type", "application/grpc")])
        wire = grpc_frame(b"one") + grpc_frame(b"two") + grpc_frame(b"three")
        req.send_body(wire[:7])                 # messages split across DATA frames
        req.send_body(wire[7:])
        req.send_end([("grpc-status", "0")])

    async def unavailable(req: UpReq) -> None:
        await req.complete()
        req.send_headers(200, [("content-type", "application/grpc"), ("grpc-status", "14")],
                         end=True)
    srv = Server(streaming, protocol="HTTP/2")
    env = make_env(servers={A: srv}, cluster_kw={"http_protocol": "HTTP2"},
                   http_filters=[GRPC_STATS, FAULT, istio_stats(), ROUTER])
    h = H2Client(env)
    sid = h.request("POST", "/pkg.Svc/List", GRPC_HEADERS,
                    body=grpc_frame(b"q1") + grpc_frame(b"q2"))
    head, _, trailers = await h.response(sid)
    assert head.status == 200 and trailers.get("grpc-status") == "0"
    await env.info()
    srv.handler = unavailable
    sid = h.request("POST", "/pkg.Svc/List", GRPC_HEADERS, body=grpc_frame(b"q3"))
    await h.response(sid)
    await env.info(2)
    p = "grpc.pkg.Svc.List."
    assert env.ccounter(SVC, p + "request_message_count") == 3
    assert env.ccounter(SVC, p + "response_message_count") == 3
    assert env.ccounter(SVC, p + "total") == 2
    assert env.ccounter(SVC, p + "success") == 1 and env.ccounter(SVC, p + "0") == 1
    assert env.ccounter(SVC, p + "failure") == 1 and env.ccounter(SVC, p + "14") == 1
    req, resp = message_counts(env)
    fam = env.stats.families["istio_request_messages_total"]
    assert fam.label_names[0] == "reporter" and fam.label_names[-1] == "destination_cluster"
    assert len(fam.label_names) == 20 and fam.namespace == "istiocustom"
    (labels, n), = req.items()
    assert n == 3 and resp == {labels: 3}
    assert labels[0] == "source" and labels[14] == "svc.default.svc.cluster.local"
    # A plain HTTP request leaves every gRPC counter alone.
    r = await env.client().request("GET", "/plain")
    assert r.status == 200
    assert message_counts(env) == (req, resp)
    assert env.ccounter(SVC, p + "total") == 2
    await env.close()


@pytest.mark.parametrize(("fallback_off", "service"), [(False, "svc"), (True, "unknown")])
def test_destination_service_from_host_unless_the_fallback_is_disabled(
        fallback_off: bool, service: str) -> None:
    """Istio's stats filter takes the destination service from the Host header when the
    cluster does not name one (here PassthroughCluster), unless
    ``disable_host_header_fallback`` (Istio's inbound and gateway setting)."""
    @run
    async def scenario() -> None:
        env = make_env(routes=[route("PassthroughCluster")],
                       extra_clusters=(cluster("PassthroughCluster", [A]),),
                       http_filters=[istio_stats(disable_host_header_fallback=fallback_off),
                                     ROUTER])
        assert (await env.client().request("GET", "/", host="svc")).status == 200
        await env.info()
        (labels, n), = env.stats.families["istio_requests_total"].values.items()
        assert n == 1 and labels[14] == service                 # destination_service
        assert labels[17] == "PassthroughCluster"               # destination_service_name
        await env.close()
    scenario()


@run
async def test_grpc_message_counts_reported_while_a_stream_lasts() -> None:
    """Inbound, with the caller's peer metadata: Istio reports a long stream's message
    counts every tcp_reporting_duration, not only at its end."""
    from remora.proxy.http import telemetry
    caller = telemetry.encode_peer_metadata(
        telemetry.WorkloadMeta(name="client-1", namespace="default", workload_name="client",
                               app="client"), "sidecar~10.0.0.5~client-1.default~default")
    go_on = asyncio.Event()

    async def stream(req: UpReq) -> None:
        req.send_headers(200, [("content-type", "application/grpc")])
        req.send_body(grpc_frame(b"first"))
        await go_on.wait()
        req.send_body(grpc_frame(b"second"))
        req.send_end([("grpc-status", "0")])
    exchange = {"name": "istio.metadata_exchange", "typed_config": {
        "@type": "type.googleapis.com/udpa.type.v1.TypedStruct",
        "type_url": "type.googleapis.com/io.istio.http.metadata_exchange.Config", "value": {}}}
    env = make_env(servers={A: Server(stream, protocol="HTTP/2")},
                   cluster_kw={"http_protocol": "HTTP2"},
                   http_filters=[exchange, GRPC_STATS, istio_stats(
                       tcp_reporting_duration="0.02s"), ROUTER], direction="INBOUND")
    h = H2Client(env)
    sid = h.request("POST", "/pkg.Svc/Watch", [*GRPC_HEADERS, *caller.items()],
                    body=grpc_frame(b"watch"))

    async def reported(want: int) -> tuple[dict[Any, int], dict[Any, int]]:
        while True:
            h._pump()
            req, resp = message_counts(env)
            if sum(resp.values()) >= want:
                return req, resp
            await asyncio.sleep(0.01)
    req, resp = await asyncio.wait_for(reported(1), 5)
    assert sid not in h.ended                # still streaming
    (labels, n), = req.items()
    assert n == 1 and resp == {labels: 1}
    assert labels[0] == "destination" and labels[1] == "client"   # source_workload: the peer
    go_on.set()
    await h.response(sid)
    await env.info()
    req, resp = message_counts(env)
    assert req == {labels: 1} and resp == {labels: 2}
    await env.close()


MAX_STREAM_ID = 2**31 - 1


async def goaways(h: H2Client, n: int) -> list[int]:
    def seen() -> bool:
        h._pump()
        return len(h.goaways) >= n
    await h.c.end.until(seen)
    return h.goaways


async def served_then_drained(env: Env) -> H2Client:
    """One HTTP/2 request served, then the drain sequence's two GOAWAYs (the notice, then
    the final one naming that request's stream)."""
    h = H2Client(env)
    sid = h.request("GET", "/")
    assert (await h.response(sid))[0].status == 200
    assert await goaways(h, 2) == [MAX_STREAM_ID, sid]
    return h


@run
async def test_http2_listener_drain_is_envoys_two_step_goaway() -> None:
    """A drain on a busy HTTP/2 connection: first a GOAWAY with the largest stream id (new
    streams still taken, so one racing it is served), after drain_timeout the final GOAWAY
    naming the last stream taken; the connection closes when its streams are done."""
    gate = asyncio.Event()

    async def held(req: UpReq) -> None:
        if req.head.path == "/first":
            await gate.wait()
        await ok_handler(req)
    env = make_env(servers={A: Server(held)}, drain_timeout="0.2s")
    h = H2Client(env)
    first = h.request("GET", "/first")
    await env.servers[A].request(1)
    env.ctx.start_drain()
    assert await goaways(h, 1) == [MAX_STREAM_ID]
    racing = h.request("GET", "/racing")          # sent before the final GOAWAY: served
    head, body, _ = await h.response(racing)
    assert head.status == 200 and body == b"ok /racing"
    assert await goaways(h, 2) == [MAX_STREAM_ID, racing]
    assert not h.c.end.eof and not h.c.end.lost    # a stream is still in flight
    gate.set()
    head, _, _ = await h.response(first)
    assert head.status == 200
    h.c.shutdown()
    await h.c.closed()
    assert env.hcounter("downstream_cx_drain_close") == 1
    await env.close()


@run
async def test_http2_idle_timeout_drains_then_closes_when_the_client_does() -> None:
    """Envoy's idle_timeout on HTTP/2: the drain sequence (both GOAWAYs), then a close that
    waits (delayed_close_timeout) for the client to close its side."""
    env = make_env(common_http_protocol_options={"idle_timeout": "0.05s"},
                   drain_timeout="0.05s", delayed_close_timeout="5s")
    h = await served_then_drained(env)
    assert env.hcounter("downstream_cx_idle_timeout") == 1
    await settle(lambda: False, rounds=50)
    assert not h.c.end.eof and not h.c.end.lost    # the close waits for the client
    h.c.shutdown()
    await h.c.closed(timeout=1.0)
    assert env.hcounter("downstream_cx_delayed_close_timeout") == 0
    await env.close()


@run
async def test_http2_max_requests_per_connection_drains() -> None:
    env = make_env(common_http_protocol_options={"max_requests_per_connection": 1},
                   drain_timeout="0.05s")
    await served_then_drained(env)
    assert env.hcounter("downstream_cx_max_requests_reached") == 1
    await env.close()


TRACING = {"random_sampling": {"value": 100}, "provider": {
    "name": "envoy.tracers.zipkin", "typed_config": {
        "@type": "type.googleapis.com/envoy.config.trace.v3.ZipkinConfig",
        "collector_cluster": "zipkin", "collector_endpoint": "/api/v2/spans",
        "collector_endpoint_version": "HTTP_JSON"}}}


@pytest.mark.parametrize("direction", ["OUTBOUND", "INBOUND"])
def test_route_decorator_operation_crosses_the_hop(direction: str) -> None:
    """Envoy's decorator propagation: outbound, the route's operation goes upstream in
    x-envoy-decorator-operation and one in the response renames our span (and stops here);
    inbound, one in the request renames our span and is removed before the app, and the
    response carries our decorator's operation back."""
    @run
    async def scenario() -> None:
        seen: list[str | None] = []

        async def app(req: UpReq) -> None:
            await req.complete()
            seen.append(req.headers.get("x-envoy-decorator-operation"))
            req.respond(200, b"ok", headers=[("x-envoy-decorator-operation", "server-op")]
                        if direction == "OUTBOUND" else [])
        decorated = {**route(SVC), "decorator": {"operation": "svc.default:8080/*"}}
        env = make_env(routes=[decorated], servers={A: Server(app)}, tracing=TRACING,
                       direction=direction)
        c = env.client()
        if direction == "OUTBOUND":
            r = await c.request()
            assert seen == ["svc.default:8080/*"]
            assert r.get("x-envoy-decorator-operation") is None
            await env.info()
            assert env.hcm.spans[0].name == "server-op"
        else:
            r = await c.request(headers=[("x-envoy-decorator-operation", "client-op")])
            assert seen == [None] and r.get("x-envoy-decorator-operation") is None
            await env.info()
            assert env.hcm.spans[0].name == "client-op"
            r = await c.request()
            assert r.get("x-envoy-decorator-operation") == "svc.default:8080/*"
            await env.info(2)
            assert env.hcm.spans[1].name == "svc.default:8080/*"
        await env.close()
    scenario()


@run
async def test_route_tracing_replaces_the_sampling_and_adds_tags() -> None:
    """A route's own tracing settings replace the connection manager's sampling (100 %
    here): 0 % on this route, unset (100 %) on the other; its literal tags join the span."""
    quiet = {**route(SVC, prefix="/quiet", name="quiet"), "tracing": {
        "random_sampling": {"numerator": 0},
        "custom_tags": [{"tag": "team", "literal": {"value": "payments"}}]}}
    tagged = {**route(SVC, name="tagged"), "tracing": {
        "custom_tags": [{"tag": "team", "literal": {"value": "search"}}]}}
    env = make_env(routes=[quiet, tagged], tracing=TRACING)
    c = env.client()
    assert (await c.request("GET", "/quiet")).status == 200
    assert (await c.request("GET", "/loud")).status == 200
    await env.info(2)
    q, loud = env.hcm.spans
    assert not q.sampled and q.tags == {"team": "payments"}
    assert loud.sampled and loud.tags == {"team": "search"}
    await env.close()


CORS_FILTER = {"name": "envoy.filters.http.cors", "typed_config": {
    "@type": "type.googleapis.com/envoy.extensions.filters.http.cors.v3.Cors"}}


@run
async def test_cors_preflight_answered_and_responses_marked() -> None:
    """A VirtualService corsPolicy as Istio writes it (the route's typed_per_filter_config):
    the preflight is answered by the proxy (200, cors_response) and never reaches the app;
    an allowed cross-origin request gets the CORS response headers, another origin none."""
    policy = {"@type": "type.googleapis.com/envoy.extensions.filters.http.cors.v3.CorsPolicy",
              "allow_origin_string_match": [{"exact": "https://app.example.com"}],
              "allow_methods": "GET,POST", "allow_headers": "x-token", "max_age": "600",
              "expose_headers": "x-trace", "allow_credentials": True}
    env = make_env(routes=[{**route(SVC), "typed_per_filter_config": {
        "envoy.filters.http.cors": policy}}], http_filters=[FAULT, CORS_FILTER, ROUTER])
    c = env.client()
    r = await c.request("OPTIONS", "/api", headers=[
        ("origin", "https://app.example.com"), ("access-control-request-method", "POST")])
    assert r.status == 200 and r.body == b""
    assert r.get("access-control-allow-origin") == "https://app.example.com"
    assert r.get("access-control-allow-methods") == "GET,POST"
    assert r.get("access-control-allow-headers") == "x-token"
    assert r.get("access-control-max-age") == "600"
    assert r.get("access-control-allow-credentials") == "true"
    info = await env.info()
    assert info.response_code_details == "cors_response" and info.upstream_host == ""
    assert not env.servers[A].conns                          # the app never saw it
    r = await c.request("GET", "/api", headers=[("origin", "https://app.example.com")])
    assert r.status == 200 and r.body == b"ok /api"
    assert r.get("access-control-allow-origin") == "https://app.example.com"
    assert r.get("access-control-expose-headers") == "x-trace"
    assert r.get("access-control-allow-methods") is None
    r = await c.request("GET", "/api", headers=[("origin", "https://evil.example")])
    assert r.status == 200 and r.get("access-control-allow-origin") is None
    r = await c.request("GET", "/api")                      # not a CORS request
    assert r.get("access-control-allow-origin") is None
    assert env.hcounter("cors.origin_valid") == 2 and env.hcounter("cors.origin_invalid") == 1
    await env.close()


# ============================================================================ mirroring


@run
async def test_request_mirroring_sends_a_shadow_copy() -> None:
    shadow = "outbound|8080||shadow.default.svc.cluster.local"
    mirror_srv = Server()
    servers = {A: Server(), "10.3.0.9:8080": mirror_srv}
    env = make_env(routes=[route(SVC, request_mirror_policies=[{"cluster": shadow}])],
                   servers=servers, extra_clusters=(cluster(shadow, ["10.3.0.9:8080"]),))
    c = env.client()
    r = await c.request("POST", "/m", body=b"payload")
    assert r.status == 200 and r.body == b"ok /m"
    got = await mirror_srv.request()
    await got.complete()
    assert got.head.authority == "svc-shadow" and bytes(got.body) == b"payload"
    await env.close()


# ============================================================================ harness check


@run
async def test_harness_pipe_backpressure() -> None:
    """The fake transports pause the writer once 64 KiB wait unread (the HCM relies on it)."""
    from tests.unit.proxy.http.harness import Collector
    loop = asyncio.get_running_loop()
    a, b = Collector(), Collector()
    paused: list[bool] = []
    a.pause_writing = lambda: paused.append(True)  # type: ignore[method-assign]
    a.resume_writing = lambda: paused.append(False)  # type: ignore[method-assign]
    ta, tb = pipe(loop, a, b)
    tb.pause_reading()
    ta.write(b"x" * 70000)
    assert paused == [True]
    tb.resume_reading()
    await b.until(lambda: len(b.data) == 70000)
    assert paused == [True, False]


# ============================================================================ more failure paths


@run
async def test_upstream_reset_after_headers_resets_downstream() -> None:
    """After the response started there is nothing to replace it with: Envoy resets the
    downstream (HTTP/1: closes the connection mid-body), flag UC."""
    async def cut(req: UpReq) -> None:
        await req.complete()
        req.send_headers(200, [("content-length", "100")])
        req.send_body(b"partial")
        await asyncio.sleep(0)
        req.close()
    env = make_env(servers={A: Server(cut)})
    c = env.client()
    c.send(http1_request())
    await c.closed()
    assert c.end.data.startswith(b"HTTP/1.1 200 OK") and c.end.data.endswith(b"partial")
    info = await env.info()
    assert "UC" in flags(info)
    assert info.response_code_details == \
        "upstream_reset_after_response_started{connection_termination}"
    await env.close()


@run
async def test_downstream_backpressure_pauses_the_upstream() -> None:
    """A client that stops reading: the downstream socket's buffer fills (pause_writing),
    so the proxy stops reading the upstream; nothing is lost when the client reads again."""
    size = 512 * 1024
    sent = asyncio.Event()

    async def big(req: UpReq) -> None:
        await req.complete()
        req.send_headers(200, [("content-length", str(size))])
        for _ in range(size // 16384):
            req.send_body(b"b" * 16384)
        sent.set()
        req.conn.answered(req)
    env = make_env(servers={A: Server(big)})
    c = env.client()
    c.transport.pause_reading()          # the app does not read
    c.send(http1_request())
    await sent.wait()
    up = env.servers[A].conns[0]
    proxy_side = up.transport.peer
    assert proxy_side is not None
    # Let the queued deliveries run (bounded): the proxy must stop reading the upstream.
    assert await settle(lambda: proxy_side.paused), \
        "upstream reading not paused while the downstream is full"
    assert proxy_side.queued > 0         # upstream bytes left unread, not buffered in Python
    assert len(c.end.data) < size
    c.transport.resume_reading()
    r = await c.response()
    assert len(r.body) == size
    await env.close()


@run
async def test_http2_client_reset_abandons_upstream_request() -> None:
    async def handler(req: UpReq) -> None:
        if req.head.path == "/hang":
            await asyncio.Future()
        await ok_handler(req)
    env = make_env(servers={A: Server(handler)})
    h = H2Client(env)
    sid = h.request("GET", "/hang")
    up = await env.servers[A].request()
    h.codec.reset(sid)
    h.flush()
    info = await env.info()
    # Envoy 1.29+: a client's RST_STREAM is DownstreamRemoteReset, with the codec's details.
    assert flags(info) == {"DR"}
    assert info.response_code_details == "http2.remote_reset"
    assert env.hcounter("downstream_rq_rx_reset") == 1
    await up.conn.changed.until(lambda: up.conn.lost)
    # The HTTP/2 connection itself goes on.
    head, body, _ = await h.response(h.request("GET", "/next"))
    assert head.status == 200 and body == b"ok /next"
    # REFUSED_STREAM from the client: DR too, with Envoy's "refuse" details.
    sid = h.request("GET", "/hang")
    await env.servers[A].request(3)
    h.codec.reset(sid, 7)
    h.flush()
    info = await env.info(3)
    assert flags(info) == {"DR"}
    assert info.response_code_details == "http2.remote_refuse"
    await env.close()


@run
async def test_http2_local_reply() -> None:
    env = make_env(hosts=())
    h = H2Client(env)
    head, body, _ = await h.response(h.request("GET", "/"))
    assert head.status == 503 and body == b"no healthy upstream"
    assert head.headers.get("content-type") == "text/plain"
    assert "connection" not in head.headers
    await env.close()


@run
async def test_head_204_and_connection_close_framing() -> None:
    async def handler(req: UpReq) -> None:
        await req.complete()
        if req.head.method == "HEAD":
            req.send_headers(200, [("content-length", "1234")], end=True)
        elif req.head.path == "/empty":
            req.send_headers(204, [], end=True)
        else:
            await ok_handler(req)
    env = make_env(servers={A: Server(handler)})
    c = env.client()
    r = await c.request("HEAD", "/h")
    assert r.status == 200 and r.get("content-length") == "1234"
    r = await c.request("GET", "/empty")
    assert r.status == 204 and r.get("content-length") is None
    r = await c.request("GET", "/last", headers=[("connection", "close")])
    assert r.status == 200 and r.body == b"ok /last" and r.get("connection") == "close"
    await c.closed()
    assert c.rest == b""
    await env.close()


@run
async def test_http10_request_gets_a_close_delimited_or_sized_answer() -> None:
    env = make_env()
    c = env.client()
    c.send(b"GET /old HTTP/1.0\r\nhost: svc\r\n\r\n")
    r = await c.response()
    await c.closed()
    assert r.status == 200 and r.body == b"ok /old"
    await env.close()


@run
async def test_per_try_timeout_sets_expected_timeout_header() -> None:
    policy = {"retry_on": "5xx", "num_retries": 1, "per_try_timeout": "0.5s"}
    env = make_env(routes=[route(SVC, timeout="2s", retry_policy=policy)])
    assert (await env.client().request()).status == 200
    assert env.servers[A].requests[0].headers.get("x-envoy-expected-rq-timeout-ms") == "500"
    await env.close()


@run
async def test_idle_pooled_connection_closed_by_upstream_is_not_reused() -> None:
    async def close_after(req: UpReq) -> None:
        await req.complete()
        req.respond(200, b"x", [("connection", "close")])
    env = make_env(servers={A: Server(close_after)})
    c = env.client()
    assert (await c.request()).status == 200
    assert (await c.request()).status == 200
    assert len(env.servers[A].conns) == 2
    await env.close()


@run
async def test_client_gone_mid_request_body_is_dc_not_a_protocol_error() -> None:
    """EOF in the middle of a request body: Envoy sees a remote close (HTTP connections are
    not half-closed) and resets the stream as DC, without counting a protocol error."""
    async def wait_body(req: UpReq) -> None:
        await req.complete()
        req.respond(200)
    env = make_env(servers={A: Server(wait_body)})
    c = env.client()
    c.send(b"POST / HTTP/1.1\r\nhost: svc\r\ncontent-length: 10\r\n\r\nabc")
    up = await env.servers[A].request()
    c.shutdown()
    info = await env.info()
    assert flags(info) == {"DC"}
    assert info.response_code_details == "downstream_remote_disconnect"
    assert env.hcounter("downstream_cx_protocol_error") == 0
    await up.conn.changed.until(lambda: up.conn.lost)
    await c.closed()
    await env.close()


@run
async def test_stream_idle_timeout_408_si() -> None:
    """``stream_idle_timeout``: no byte either way for that long → 408 ``stream timeout``,
    flag SI (Envoy default 5 min; Istio sets 0s)."""
    env = make_env(stream_idle_timeout="0.05s", servers={A: Server(_never)})
    c = env.client()
    r = await c.request()
    assert r.status == 408 and r.body == b"stream timeout"
    info = await env.info()
    assert flags(info) == {"SI"} and info.response_code_details == "stream_idle_timeout"
    assert env.hcounter("downstream_rq_idle_timeout") == 1
    await env.close()


@run
async def test_stream_idle_timer_is_reset_by_body_bytes() -> None:
    """A response trickling faster than the idle timeout is not cut."""
    async def trickle(req: UpReq) -> None:
        await req.complete()
        req.send_headers(200, [("content-length", "6")])
        for _ in range(6):
            await asyncio.sleep(0.03)     # the upstream's own pacing, below the 0.1 s limit
            req.send_body(b"x")
        req.send_end()
    env = make_env(stream_idle_timeout="0.1s", servers={A: Server(trickle)})
    r = await env.client().request()
    assert r.status == 200 and r.body == b"xxxxxx"
    await env.close()


@run
async def test_request_timeout_408_while_the_body_is_still_coming() -> None:
    env = make_env(request_timeout="0.05s")
    c = env.client()
    c.send(b"POST / HTTP/1.1\r\nhost: svc\r\ncontent-length: 10\r\n\r\n12345")
    r = await c.response()
    assert r.status == 408 and r.body == b"request timeout"
    info = await env.info()
    assert info.response_code_details == "request_overall_timeout"
    await env.close()


@run
async def test_max_stream_duration_408_dt() -> None:
    env = make_env(common_http_protocol_options={"max_stream_duration": "0.05s"},
                   servers={A: Server(_never)})
    r = await env.client().request()
    assert r.status == 408 and r.body == b"downstream duration timeout"
    info = await env.info()
    assert flags(info) == {"DT"} and info.response_code_details == "duration_timeout"
    await env.close()


@run
async def test_grpc_local_reply_is_trailers_only_grpc_status() -> None:
    """A gRPC request answered locally gets HTTP 200 with grpc-status (503 → 14
    UNAVAILABLE) and grpc-message (only ``%`` and non-printable bytes escaped), as Envoy
    converts it."""
    env = make_env(servers={})      # nothing listens: connection refused
    c = env.client()
    c.send(b"POST /pkg.Svc/M HTTP/1.1\r\nhost: svc\r\ncontent-type: application/grpc\r\n"
           b"te: trailers\r\ncontent-length: 0\r\n\r\n")
    r = await c.response()
    assert r.status == 200
    assert r.get("content-type") == "application/grpc"
    assert r.get("grpc-status") == "14"
    assert r.get("grpc-message") == (
        "upstream connect error or disconnect/reset before headers. reset reason: connection "
        "failure, transport failure reason: delayed connect error: 111")
    info = await env.info()
    assert info.grpc_status == 14 and "UF" in flags(info)
    await env.close()


@run
async def test_drain_closes_idle_connections_and_asks_busy_ones_to_close() -> None:
    """SIGTERM / /drain_listeners: an idle keep-alive connection is closed at once; a request
    in flight is answered with ``connection: close`` and its connection then ends (Envoy's
    connection manager drain), so the drain does not wait out its time."""
    gate = asyncio.Event()

    async def held(req: UpReq) -> None:
        await gate.wait()
        await ok_handler(req)
    env = make_env(servers={A: Server(held)})
    idle, busy = env.client(), env.client()
    gate.set()
    assert (await idle.request()).status == 200           # now idle, kept alive
    gate.clear()
    busy.send(http1_request())
    await env.servers[A].request(2)
    env.ctx.start_drain()
    await idle.closed()
    gate.set()
    r = await busy.response()
    assert r.status == 200 and r.get("connection") == "close"
    await busy.closed()
    await env.close()


@run
async def test_connection_made_during_a_drain_closes_after_its_first_response() -> None:
    """The listeners still accept while they drain (a graceful drain): Envoy answers such a
    connection's first request with connection: close (HTTP/1) or starts the drain
    sequence (HTTP/2), counted in downstream_cx_drain_close."""
    env = make_env(drain_timeout="0.05s")
    env.ctx.start_drain()
    c = env.client()
    r = await c.request()
    assert r.status == 200 and r.get("connection") == "close"
    await c.closed()
    await served_then_drained(env)
    assert env.hcounter("downstream_cx_drain_close") == 2
    await env.close()


@run
async def test_inbound_only_drain_leaves_outbound_connections() -> None:
    env = make_env()
    c = env.client()
    assert (await c.request()).status == 200
    env.ctx.start_drain(inbound_only=True)      # this HCM is outbound
    r = await c.request()
    assert r.status == 200 and r.get("connection") is None
    await env.close()


@run
async def test_upstream_protocol_error_is_upe() -> None:
    """An upstream that answers bytes that are not HTTP: 503 with flag UPE (Envoy's
    UpstreamProtocolError), not a remote reset."""
    async def garbage(req: UpReq) -> None:
        await req.complete()
        assert req.conn.transport is not None
        req.conn.transport.write(b"\x00\x01 this is not HTTP\r\n\r\n")
    env = make_env(servers={A: Server(garbage)})
    r = await env.client().request()
    assert r.status == 503
    info = await env.info()
    assert flags(info) == {"UPE"}
    assert info.response_code_details == \
        "upstream_reset_before_response_started{protocol_error}"
    await env.close()


@run
async def test_http2_refused_stream_is_retried_under_istios_default_policy() -> None:
    """An HTTP/2 upstream answering RST_STREAM(REFUSED_STREAM) did not process the request:
    Istio's default ``refused-stream`` retries it, on the other host."""
    calls: list[str] = []

    async def first_refuses(req: UpReq) -> None:
        if not calls:
            calls.append("refused")
            req.conn.codec.reset(req.stream, 7)      # REFUSED_STREAM
            req.conn.flush()
            return
        calls.append("ok")
        await ok_handler(req)
    env = make_env(hosts=(A, B), servers={A: Server(first_refuses, protocol="HTTP/2"),
                                          B: Server(first_refuses, protocol="HTTP/2")},
                   routes=[route(SVC, retry_policy=ISTIO_RETRY)],
                   cluster_kw={"http_protocol": "HTTP2"})
    r = await env.client().request()
    assert r.status == 200
    assert calls == ["refused", "ok"]
    info = await env.info()
    assert info.attempt_count == 2 and not flags(info)
    assert env.ccounter(SVC, "upstream_rq_retry") == 1
    await env.close()


@run
async def test_http2_goaway_streams_above_last_are_retried() -> None:
    """GOAWAY with last_stream_id below a stream: that stream was never processed and is
    retried (Envoy treats it like REFUSED_STREAM)."""
    calls: list[str] = []

    async def first_goes_away(req: UpReq) -> None:
        if not calls:
            calls.append("goaway")
            req.conn.codec._conn.close_connection(last_stream_id=0)   # before any stream
            req.conn.flush()
            return
        calls.append("ok")
        await ok_handler(req)
    env = make_env(hosts=(A, B), servers={A: Server(first_goes_away, protocol="HTTP/2"),
                                          B: Server(first_goes_away, protocol="HTTP/2")},
                   routes=[route(SVC, retry_policy=ISTIO_RETRY)],
                   cluster_kw={"http_protocol": "HTTP2"})
    r = await env.client().request()
    assert r.status == 200 and calls == ["goaway", "ok"]
    await env.close()


@run
async def test_max_requests_per_connection_closes_after_the_last_one() -> None:
    """``common_http_protocol_options.max_requests_per_connection``: the N-th response says
    ``connection: close`` and the connection ends; earlier ones keep it alive."""
    env = make_env(common_http_protocol_options={"max_requests_per_connection": 2})
    c = env.client()
    first = await c.request()
    assert first.status == 200 and first.get("connection") is None
    second = await c.request()
    assert second.status == 200 and second.get("connection") == "close"
    await c.closed()
    await env.close()


@run
async def test_max_connection_duration_closes_an_idle_connection() -> None:
    """``max_connection_duration``: when it expires the connection drains (closed now if
    idle)."""
    env = make_env(common_http_protocol_options={"max_connection_duration": "0.05s"})
    c = env.client()
    assert (await c.request()).status == 200
    await c.closed()
    await env.close()


@run
async def test_streams_cut_short_leave_the_connections_next_requests_whole() -> None:
    """HTTP/1 requests on one connection run one after another in the connection's own
    task. A stream stopped by the proxy (stream idle timeout: its request path is
    cancelled) or by a route timeout must not spill into the next request on that
    connection, nor end the connection's task."""
    async def by_path(req: UpReq) -> None:
        await req.complete()
        if req.head.path.endswith("/hang"):
            await asyncio.Future()
        req.respond(200, req.head.path.encode())
    env = make_env(stream_idle_timeout="0.1s",
                   routes=[route(SVC, prefix="/slow", timeout="0.05s", name="slow"),
                           route(SVC)],
                   servers={A: Server(by_path)})
    c = env.client()
    for path, status in [("/hang", 408), ("/ok1", 200), ("/slow/hang", 504), ("/ok2", 200),
                         ("/hang", 408), ("/slow/hang", 504), ("/ok3", 200)]:
        r = await c.request(path=path)
        assert r.status == status, (path, r.status, r.body)
        if status == 200:
            assert r.body == path.encode()
    details = [i.response_code_details for i in env.infos]
    assert details == ["stream_idle_timeout", "via_upstream", "upstream_response_timeout",
                       "via_upstream", "stream_idle_timeout", "upstream_response_timeout",
                       "via_upstream"]
    assert not c.runner.done()            # still serving this connection
    assert c.runner.cancelling() == 0     # no cancel left over for a later request
    await env.close()
    assert c.runner.done() and not c.runner.cancelled()


@run
async def test_cancelling_the_connections_task_is_not_taken_for_a_streams_own() -> None:
    """The worker stopping cancels the connection's task while a request runs in it: the
    request ends (DC), and the task ends cancelled instead of going on to the next
    request as if only that stream had been stopped."""
    env = make_env(servers={A: Server(_never)})
    c = env.client()
    c.send(http1_request("GET", "/", "svc") * 2)        # a second request waits its turn
    await env.servers[A].changed.until(lambda: env.servers[A].requests)
    c.runner.cancel()
    await asyncio.wait({c.runner}, timeout=WAIT)
    assert c.runner.cancelled()
    info = await env.info()
    assert "DC" in flags(info)
    assert len(env.servers[A].requests) == 1            # the second one never started
    await env.close()


@run
async def test_http2_stream_reset_in_the_same_read_as_its_headers_is_finished() -> None:
    """HEADERS and RST_STREAM in one read (the "rapid reset" pattern): the reset reaches the
    stream before its request path has started. The stream must still end then (logged with
    DC, gauge back to 0, forgotten by the connection) rather than linger until the
    connection closes: a client repeating this would otherwise pile up streams without
    bound on one connection."""
    env = make_env(servers={A: Server(_never)})
    h = H2Client(env)
    for _ in range(20):
        sid = h.codec.new_stream()
        h.codec.send_headers(sid, request_head("GET", "/", "svc", []), True)
        h.codec.reset(sid)
        h.flush()                                   # HEADERS + RST_STREAM, one write
    await env.info(20)
    assert all(flags(i) == {"DR"} for i in env.infos)
    assert env.stats.gauges[f"http.{env.config.stat_prefix}.downstream_rq_active"] == 0
    assert not h.c.conn.streams
    await env.close()


@run
async def test_http2_rapid_reset_aborts_the_connection_at_envoys_threshold() -> None:
    """Envoy's premature-reset guard (CVE-2023-44487): streams reset with no response within
    a second count as premature; once they are half of the closed streams, counting from
    500 (so at 250 before that), the connection is aborted and
    ``downstream_rq_too_many_premature_resets`` counts it. Another client is unaffected."""
    env = make_env()
    h = H2Client(env)

    def open_and_reset() -> None:
        sid = h.codec.new_stream()
        h.codec.send_headers(sid, request_head("GET", "/", "svc", []), True)
        h.codec.reset(sid)
        h.flush()

    for _ in range(249):
        open_and_reset()
    await env.info(249)
    assert not h.c.conn.closing
    assert env.hcounter("downstream_rq_too_many_premature_resets") == 0
    open_and_reset()                                   # the 250th: half of 500 can't recover
    await h.c.closed()
    assert env.hcounter("downstream_rq_too_many_premature_resets") == 1
    other = H2Client(env)
    head, _, _ = await other.response(other.request("GET", "/"))
    assert head.status == 200
    await env.close()


@run
async def test_http2_answered_streams_keep_the_connection_through_resets() -> None:
    """Streams that got their response are not premature: a client that reset a third of
    its streams still has its connection after 600 streams."""
    env = make_env()
    h = H2Client(env)
    for i in range(600):
        if i % 3:
            await h.response(h.request("GET", "/"))
        else:
            sid = h.codec.new_stream()
            h.codec.send_headers(sid, request_head("GET", "/", "svc", []), True)
            h.codec.reset(sid)
            h.flush()
    await env.info(600)
    assert not h.c.conn.closing
    assert env.hcounter("downstream_rq_too_many_premature_resets") == 0
    await env.close()


@run
async def test_pipelined_requests_behind_one_that_times_out_are_still_served() -> None:
    """Pipelined requests wait their turn in the connection's task: the first one's stream
    idle timeout (408) cancels only it, and the two behind it are answered in order."""
    async def by_path(req: UpReq) -> None:
        await req.complete()
        if req.head.path == "/hang":
            await asyncio.Future()
        req.respond(200, req.head.path.encode())
    env = make_env(stream_idle_timeout="0.1s", servers={A: Server(by_path)})
    c = env.client()
    c.send(http1_request(path="/hang") + http1_request(path="/2") + http1_request(path="/3"))
    got = [await c.response() for _ in range(3)]
    assert [(r.status, r.body) for r in got] == [(408, b"stream timeout"), (200, b"/2"),
                                                 (200, b"/3")]
    await env.info(3)
    assert [i.response_code for i in env.infos] == [408, 200, 200]
    await env.close()


@run
async def test_client_gone_with_requests_still_queued_ends_every_one() -> None:
    """The client sends three pipelined requests and leaves while the first is upstream: the
    first is cut (DC), the two behind it (held by the codec, never started, as in Envoy) are
    dropped without reaching the upstream, and the connection's task ends."""
    env = make_env(servers={A: Server(_never)})
    c = env.client()
    c.send(http1_request(path="/1") + http1_request(path="/2") + http1_request(path="/3"))
    await env.servers[A].request(1)
    c.transport.close()
    await asyncio.wait({c.runner}, timeout=WAIT)
    assert c.runner.done() and not c.runner.cancelled()
    info = await env.info(1)
    assert "DC" in flags(info) and len(env.infos) == 1
    assert len(env.servers[A].requests) == 1
    assert env.stats.gauges[f"http.{env.config.stat_prefix}.downstream_rq_active"] == 0
    await env.close()


# ============================================================================ consistent hashing


@run
async def test_ring_hash_cluster_sticks_by_header_and_by_generated_cookie() -> None:
    """A DestinationRule's consistentHash as Istio writes it: a RING_HASH cluster and the
    route's ``hash_policy``. The same ``x-user`` always reaches the same endpoint; a client
    without the cookie is given one (``Set-Cookie``) and, sending it back, sticks to the
    endpoint its first request went to, from any connection."""
    hosts = tuple(f"10.3.0.{i}:8080" for i in range(1, 6))
    env = make_env(hosts=hosts, cluster_kw={"lb_policy": "RING_HASH"}, routes=[
        route(SVC, prefix="/user", name="user",
              hash_policy=[{"header": {"header_name": "x-user"}}]),
        route(SVC, hash_policy=[{"cookie": {"name": "sticky", "ttl": "3600s", "path": "/"}}])])
    seen = 0

    async def upstream_of(c: Any, path: str, headers: list[tuple[str, str]]) -> tuple[str, Any]:
        nonlocal seen
        r = await c.request(path=path, headers=headers)
        assert r.status == 200
        seen += 1
        return (await env.info(seen)).upstream_host, r

    c = env.client()
    by_user: dict[str, set[str]] = {}
    for user in [f"user{i}" for i in range(8)] * 3:
        by_user.setdefault(user, set()).add((await upstream_of(c, "/user", [("x-user", user)]))[0])
    assert all(len(v) == 1 for v in by_user.values()), by_user
    assert len(set().union(*by_user.values())) >= 3          # different users, different hosts

    first, r = await upstream_of(c, "/", [])
    cookie = r.get("set-cookie")
    assert cookie is not None and cookie.startswith('sticky="') \
        and cookie.endswith('"; Max-Age=3600; Path=/; HttpOnly'), cookie
    value = cookie.split(";", 1)[0]
    for remote in ("10.0.0.6", "10.0.0.7", "10.0.0.8"):
        other = env.client(remote=remote)
        host, r = await upstream_of(other, "/", [("cookie", value)])
        assert host == first and r.get("set-cookie") is None
    # clients that bring no cookie get their own, and spread over the endpoints
    given = {(await upstream_of(env.client(remote=f"10.0.1.{i}"), "/", []))[1].get("set-cookie")
             for i in range(6)}
    assert len(given) == 6
    await env.close()
