"""Routing decisions: vhost domains, route matching, clusters, headers, rewrites, redirects,
fault and timeouts, against Envoy's documented behaviour."""

from __future__ import annotations

import random
import re
from typing import Any

import pytest

from remora.proxy.http import routes as rt
from remora.proxy.http.types import HeaderMap, RequestHead, ResponseHead


def req(path: str = "/", authority: str = "foo.com", method: str = "GET",
        headers: list[tuple[str, str]] | None = None, scheme: str = "http") -> RequestHead:
    return RequestHead(method=method, path=path, authority=authority, scheme=scheme,
                       headers=HeaderMap(headers or []))


class FixedRng:
    """getrandbits answers the given values in turn (then repeats the last)."""

    def __init__(self, *values: int) -> None:
        self.values = list(values)

    def getrandbits(self, k: int, /) -> int:
        return self.values.pop(0) if len(self.values) > 1 else self.values[0]


def vh(name: str, *domains: str, routes: tuple[rt.Route, ...] = ()) -> rt.VirtualHost:
    return rt.VirtualHost(name=name, domains=domains, routes=routes)


# ----------------------------------------------------------------------------- domains

DOMAINS = [
    vh("exact", "foo.com"),
    vh("star-dot", "*.foo.com"),
    vh("star-dash", "*-bar.foo.com"),
    vh("prefix-dot", "foo.*"),
    vh("prefix-short", "fo*"),
    vh("with-port", "bar.com:8080"),
    vh("v6-port", "[::1]:80"),
    vh("v6", "[::1]"),
    vh("any", "*"),
]


@pytest.mark.parametrize(("authority", "want"), [
    ("foo.com", "exact"),
    ("FOO.Com", "exact"),                    # case-insensitive
    ("a.foo.com", "star-dot"),
    ("x-bar.foo.com", "star-dash"),          # longest suffix wins
    ("a.b-bar.foo.com", "star-dash"),
    (".foo.com", "any"),                     # *.foo.com needs at least one character
    ("foo.org", "prefix-dot"),
    ("fox", "prefix-short"),
    ("foo.com:80", "prefix-dot"),            # the port is part of the text: no exact hit
    ("bar.com:8080", "with-port"),
    ("bar.com", "any"),
    ("[::1]:80", "v6-port"),
    ("[::1]", "v6"),
    ("[::1]:81", "any"),
    ("other", "any"),
])
def test_domain_precedence_with_ports(authority: str, want: str) -> None:
    rc = rt.RouteConfiguration(name="r", virtual_hosts=tuple(DOMAINS))
    got = rt.select_virtual_host(rc, authority)
    assert got is not None and got.name == want


@pytest.mark.parametrize(("authority", "want"), [
    ("foo.com:8080", "exact"),
    ("foo.com", "exact"),
    ("bar.com:8080", "any"),                 # port stripped: "bar.com:8080" never matches
    ("[::1]:80", "v6"),
    ("[::1]", "v6"),
    ("a.foo.com:15001", "star-dot"),
    ("fox:1", "prefix-short"),
])
def test_domain_ignore_port(authority: str, want: str) -> None:
    rc = rt.RouteConfiguration(name="r", virtual_hosts=tuple(DOMAINS),
                               ignore_port_in_host_matching=True)
    got = rt.select_virtual_host(rc, authority)
    assert got is not None and got.name == want


def test_domain_no_default_and_empty_authority() -> None:
    rc = rt.RouteConfiguration(virtual_hosts=(vh("a", "foo.com"),))
    assert rt.select_virtual_host(rc, "bar.com") is None
    assert rt.select_virtual_host(rc, "") is None
    only_default = rt.RouteConfiguration(virtual_hosts=(vh("d", "*"),))
    got = rt.select_virtual_host(only_default, "")
    assert got is not None and got.name == "d"
    assert rt.select_virtual_host(rt.RouteConfiguration(), "foo") is None


@pytest.mark.parametrize(("host", "want"), [
    ("foo", -1), ("foo:80", 3), ("[::1]:80", 5), ("[::1]", -1), ("::1", 1), ("", -1)])
def test_host_port_start(host: str, want: int) -> None:
    assert rt.host_port_start(host) == want


@pytest.mark.parametrize("domains", [("a.com", "A.com"), ("*", "*"), ("*.a", "*.a"),
                                     ("b*", "b*")])
def test_duplicate_domains_refused(domains: tuple[str, str]) -> None:
    with pytest.raises(ValueError, match="domain"):
        rt.RouteConfiguration(virtual_hosts=(vh("x", domains[0]), vh("y", domains[1])))


def test_index_is_built_once_and_sorted() -> None:
    rc = rt.RouteConfiguration(virtual_hosts=(vh("a", "*.a.com", "*.long.a.com", "x*", "xyz*"),))
    assert [n for n, _ in rc.index.suffixes] == [11, 6]
    assert [n for n, _ in rc.index.prefixes] == [3, 1]


# ----------------------------------------------------------------------------- routes


def route(name: str, match: rt.RouteMatch) -> rt.Route:
    return rt.Route(name=name, match=match, action=rt.RouteAction(cluster=name))


def m(kind: rt.PathMatchKind, value: str, **kw: Any) -> rt.RouteMatch:
    regex = re.compile(value) if kind == "safe_regex" else None
    return rt.RouteMatch(kind=kind, value=value, regex=regex, **kw)


@pytest.mark.parametrize(("match", "path", "hit"), [
    (m("prefix", "/api"), "/api/v1", True),
    (m("prefix", "/api"), "/apix", True),
    (m("prefix", "/api"), "/API/v1", False),
    (m("prefix", "/api", case_sensitive=False), "/API/v1", True),
    (m("prefix", "/a?"), "/a?b=1", False),            # the query is not part of the path
    (m("path", "/exact"), "/exact", True),
    (m("path", "/exact"), "/exact?x=1", True),
    (m("path", "/exact"), "/exact#frag", True),
    (m("path", "/exact"), "/exact/", False),
    (m("path", "/Exact", case_sensitive=False), "/eXACT", True),
    (m("safe_regex", r"/v\d+/.*"), "/v12/items?q", True),
    (m("safe_regex", r"/v\d+"), "/v12/items", False),  # full match only
    (m("safe_regex", r"/V\d+", case_sensitive=False), "/v1", False),  # regex ignores it
    (m("path_separated_prefix", "/api"), "/api", True),
    (m("path_separated_prefix", "/api"), "/api/x", True),
    (m("path_separated_prefix", "/api"), "/api?x", True),
    (m("path_separated_prefix", "/api"), "/apix", False),
    (m("path_separated_prefix", "/API", case_sensitive=False), "/api/x", True),
])
def test_path_matching(match: rt.RouteMatch, path: str, hit: bool) -> None:
    v = vh("v", "*", routes=(route("r", match),))
    assert (rt.match_route(v, req(path)) is not None) is hit


def test_first_match_wins() -> None:
    v = vh("v", "*", routes=(route("a", m("prefix", "/a")), route("b", m("prefix", "/")),
                             route("c", m("prefix", "/a/b"))))
    got = [rt.match_route(v, req(p)) for p in ("/a/b", "/x")]
    assert [r.name if r else None for r in got] == ["a", "b"]


def hm(name: str, kind: rt.HeaderMatchKind = "string", **kw: Any) -> rt.HeaderMatcher:
    return rt.HeaderMatcher(name=name, kind=kind, **kw)


def sm(kind: rt.StringMatchKind, value: str, ignore_case: bool = False) -> rt.StringMatcher:
    regex = re.compile(value) if kind == "safe_regex" else None
    return rt.StringMatcher(kind=kind, value=value, ignore_case=ignore_case, regex=regex)


H = [("x-a", "Hello"), ("x-n", "42"), ("x-m", "1"), ("x-m", "2")]


@pytest.mark.parametrize(("matcher", "hit"), [
    (hm("x-a", string=sm("exact", "Hello")), True),
    (hm("x-a", string=sm("exact", "hello")), False),
    (hm("x-a", string=sm("exact", "hello", ignore_case=True)), True),
    (hm("x-a", string=sm("prefix", "He")), True),
    (hm("x-a", string=sm("suffix", "llo")), True),
    (hm("x-a", string=sm("contains", "ell")), True),
    (hm("x-a", string=sm("contains", "ELL", ignore_case=True)), True),
    (hm("x-a", string=sm("safe_regex", "H.*o")), True),
    (hm("x-a", string=sm("safe_regex", "H.*l")), False),           # full match
    (hm("x-a", string=sm("exact", "Hello"), invert=True), False),
    (hm("x-a", string=sm("exact", "nope"), invert=True), True),
    (hm("x-missing", string=sm("exact", "x"), invert=True), False),  # absent never matches
    (hm("x-missing", string=sm("exact", "x"), invert=True, treat_missing_as_empty=True), True),
    (hm("x-missing", string=sm("exact", ""), treat_missing_as_empty=True), True),
    (hm("x-a", "present"), True),
    (hm("x-missing", "present"), False),
    (hm("x-missing", "present", present=False), True),
    (hm("x-a", "present", present=False), False),
    (hm("x-a", "present", invert=True), False),
    (hm("x-missing", "present", invert=True), True),
    (hm("x-n", "range", range_start=40, range_end=43), True),
    (hm("x-n", "range", range_start=42, range_end=43), True),
    (hm("x-n", "range", range_start=0, range_end=42), False),       # end is exclusive
    (hm("x-n", "range", range_start=0, range_end=42, invert=True), True),
    (hm("x-a", "range", range_start=0, range_end=100), False),      # not a number
    (hm("x-m", string=sm("exact", "1,2")), True),                    # values joined
    (hm(":method", string=sm("exact", "POST")), True),
    (hm(":path", string=sm("exact", "/p?q=1")), True),
    (hm(":authority", string=sm("exact", "foo.com")), True),
    (hm("host", string=sm("exact", "foo.com")), True),
    (hm(":scheme", string=sm("exact", "http")), True),
])
def test_header_matchers(matcher: rt.HeaderMatcher, hit: bool) -> None:
    head = req("/p?q=1", method="POST", headers=H)
    assert matcher.matches(head) is hit
    v = vh("v", "*", routes=(route("r", rt.RouteMatch(headers=(matcher,))),))
    assert (rt.match_route(v, head) is not None) is hit


def test_all_header_matchers_must_match() -> None:
    match = rt.RouteMatch(headers=(hm("x-a", "present"), hm("x-b", "present")))
    v = vh("v", "*", routes=(route("r", match),))
    assert rt.match_route(v, req(headers=[("x-a", "1")])) is None
    assert rt.match_route(v, req(headers=[("x-a", "1"), ("x-b", "")])) is not None


@pytest.mark.parametrize(("path", "want"), [
    ("/p", {}),
    ("/p?", {}),
    ("/p?a=1&b&a=2", {"a": "1", "b": ""}),
    ("/p?a=%20x#frag&b=2", {"a": "%20x"}),
    ("/p?=v&&c=3=4", {"": "v", "c": "3=4"}),
])
def test_parse_query(path: str, want: dict[str, str]) -> None:
    assert rt.parse_query(path) == want


@pytest.mark.parametrize(("matcher", "path", "hit"), [
    (rt.QueryParameterMatcher(name="debug"), "/?debug", True),
    (rt.QueryParameterMatcher(name="debug"), "/?debug=0", True),
    (rt.QueryParameterMatcher(name="debug"), "/?other=1", False),
    (rt.QueryParameterMatcher(name="v", string=sm("exact", "2")), "/?v=2", True),
    (rt.QueryParameterMatcher(name="v", string=sm("exact", "2")), "/?v=1&v=2", False),
    (rt.QueryParameterMatcher(name="v", string=sm("prefix", "ab")), "/x?v=abc", True),
    (rt.QueryParameterMatcher(name="v", string=sm("safe_regex", r"\d+")), "/x?v=12", True),
])
def test_query_matchers(matcher: rt.QueryParameterMatcher, path: str, hit: bool) -> None:
    v = vh("v", "*", routes=(route("r", rt.RouteMatch(query_parameters=(matcher,))),))
    assert (rt.match_route(v, req(path)) is not None) is hit


@pytest.mark.parametrize(("ct", "hit"), [
    ("application/grpc", True), ("application/grpc+proto", True),
    ("application/grpc;x=1", True), ("application/grpc-web", False),
    ("application/json", False), (None, False)])
def test_grpc_match(ct: str | None, hit: bool) -> None:
    v = vh("v", "*", routes=(route("r", rt.RouteMatch(grpc=True)),))
    head = req(headers=[("content-type", ct)] if ct else [])
    assert (rt.match_route(v, head) is not None) is hit


# ----------------------------------------------------------------------------- clusters


def weighted(*pairs: tuple[str, int]) -> rt.RouteAction:
    ws = tuple(rt.ClusterWeight(name=n, weight=w) for n, w in pairs)
    return rt.RouteAction(weighted_clusters=ws, total_weight=sum(w for _, w in pairs))


def test_weighted_pick_walks_cumulative_weights() -> None:
    a = weighted(("a", 90), ("zero", 0), ("b", 10))
    assert rt.pick_weighted_cluster(a, FixedRng(0)) == "a"
    assert rt.pick_weighted_cluster(a, FixedRng(89)) == "a"
    assert rt.pick_weighted_cluster(a, FixedRng(90)) == "b"
    assert rt.pick_weighted_cluster(a, FixedRng(99)) == "b"
    assert rt.pick_weighted_cluster(a, FixedRng(100 + 95)) == "b"   # value mod total


def test_weighted_pick_distribution() -> None:
    a = weighted(("v1", 90), ("v2", 10))
    rng = random.Random(7)
    picks = [rt.pick_weighted_cluster(a, rng) for _ in range(10000)]
    share = picks.count("v2") / len(picks)
    assert 0.09 < share < 0.11


def test_route_cluster_kinds() -> None:
    head = req(headers=[("x-cluster", "from-header")])
    assert rt.route_cluster(rt.RouteAction(cluster="c"), head, FixedRng(0)) == ("c", None)
    assert rt.route_cluster(rt.RouteAction(cluster_header="x-cluster"), head,
                            FixedRng(0)) == ("from-header", None)
    assert rt.route_cluster(rt.RouteAction(cluster_header="x-none"), head,
                            FixedRng(0)) == ("", None)
    name, w = rt.route_cluster(weighted(("a", 1), ("b", 1)), head, FixedRng(1))
    assert name == "b" and w is not None and w.weight == 1


def test_retry_policy_route_then_vhost() -> None:
    vpol = rt.RetryPolicy(retry_on=frozenset({"5xx"}))
    rpol = rt.RetryPolicy(retry_on=frozenset({"reset"}), num_retries=2)
    v = rt.VirtualHost(name="v", retry_policy=vpol)
    assert rt.effective_retry_policy(v, rt.Route(action=rt.RouteAction(
        cluster="c", retry_policy=rpol))) is rpol
    assert rt.effective_retry_policy(v, rt.Route(action=rt.RouteAction(cluster="c"))) is vpol
    assert rt.effective_retry_policy(rt.VirtualHost(name="x"), rt.Route()) is None
    p = rt.RetryPolicy()
    assert (p.num_retries, p.back_off_base, p.back_off_max, p.per_try_timeout) == (
        1, 0.025, 0.25, 0.0)
    assert rt.RetryPolicy(retry_host_predicates=(
        "envoy.retry_host_predicates.previous_hosts",)).previous_hosts


# ----------------------------------------------------------------------------- headers


def add(key: str, value: str, action: rt.AppendAction = "APPEND_IF_EXISTS_OR_ADD",
        keep_empty: bool = False) -> rt.HeaderValueOption:
    return rt.HeaderValueOption(key=key, value=value, append_action=action,
                                keep_empty_value=keep_empty)


def muts(*adds: rt.HeaderValueOption, remove: tuple[str, ...] = ()) -> rt.HeaderMutations:
    return rt.HeaderMutations(add=adds, remove=remove)


@pytest.mark.parametrize(("action", "before", "after"), [
    ("APPEND_IF_EXISTS_OR_ADD", [], ["new"]),
    ("APPEND_IF_EXISTS_OR_ADD", ["old"], ["old", "new"]),
    ("ADD_IF_ABSENT", [], ["new"]),
    ("ADD_IF_ABSENT", ["old"], ["old"]),
    ("OVERWRITE_IF_EXISTS_OR_ADD", [], ["new"]),
    ("OVERWRITE_IF_EXISTS_OR_ADD", ["a", "b"], ["new"]),
    ("OVERWRITE_IF_EXISTS", [], []),
    ("OVERWRITE_IF_EXISTS", ["old"], ["new"]),
])
def test_append_actions(action: rt.AppendAction, before: list[str], after: list[str]) -> None:
    rc = rt.RouteConfiguration()
    r = rt.Route(request_headers=muts(add("x-h", "new", action)))
    head = req(headers=[("x-h", v) for v in before])
    rt.apply_request_headers(rc, rt.VirtualHost(name="v"), r, head)
    assert head.headers.get_all("x-h") == after


def test_remove_before_add_and_empty_values() -> None:
    r = rt.Route(request_headers=muts(add("x-a", "1"), add("x-empty", ""),
                                      add("x-kept", "", keep_empty=True), remove=("x-a",)))
    head = req(headers=[("x-a", "0")])
    rt.apply_request_headers(rt.RouteConfiguration(), rt.VirtualHost(name="v"), r, head)
    assert head.headers.items() == [("x-a", "1"), ("x-kept", "")]


def test_evaluation_sees_headers_before_this_level() -> None:
    # ADD_IF_ABSENT and OVERWRITE_IF_EXISTS decide against the map as it was: two options
    # of one level do not see each other.
    r = rt.Route(request_headers=muts(add("x-a", "1"), add("x-a", "2", "ADD_IF_ABSENT")))
    head = req()
    rt.apply_request_headers(rt.RouteConfiguration(), rt.VirtualHost(name="v"), r, head)
    assert head.headers.get_all("x-a") == ["1", "2"]


@pytest.mark.parametrize(("most_specific_wins", "want"), [(False, "rc"), (True, "route")])
def test_mutation_order_between_levels(most_specific_wins: bool, want: str) -> None:
    def level(v: str) -> rt.HeaderMutations:
        return muts(add("x-level", v, "OVERWRITE_IF_EXISTS_OR_ADD"), add("x-trail", v))
    rc = rt.RouteConfiguration(request_headers=level("rc"), response_headers=level("rc"),
                               most_specific_header_mutations_wins=most_specific_wins)
    v = rt.VirtualHost(name="v", request_headers=level("vh"), response_headers=level("vh"))
    cw = rt.ClusterWeight(name="c", weight=1, request_headers=level("cluster"),
                          response_headers=level("cluster"))
    r = rt.Route(request_headers=level("route"), response_headers=level("route"))
    head = req()
    rt.apply_request_headers(rc, v, r, head, cluster=cw)
    order = ["route", "vh", "rc"] if not most_specific_wins else ["rc", "vh", "route"]
    assert head.headers.get("x-level") == want
    assert head.headers.get_all("x-trail") == ["cluster", *order]
    resp = ResponseHead(status=200)
    rt.apply_response_headers(rc, v, r, resp, request=head, cluster=cw)
    assert resp.headers.get("x-level") == want
    assert resp.headers.get_all("x-trail") == ["cluster", *order]


@pytest.mark.parametrize(("value", "want"), [
    ("plain", "plain"),
    ("%%100", "%100"),
    ("%REQ(x-in)%", "in-value"),
    ("%REQ(x-none?x-in)%", "in-value"),
    ("%REQ(:authority)%-%REQ(:method)%", "foo.com-GET"),
    ("%REQ(x-in):2%", "in"),
    ("%REQ(x-none)%", None),                              # empty: not added
    ("%DOWNSTREAM_REMOTE_ADDRESS%", "10.0.0.1:5555"),
    ("ip=%DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT%", "ip=10.0.0.1"),
    ("%UPSTREAM_METADATA([\"a\"])%", '%UPSTREAM_METADATA(["a"])%'),  # unknown: literal
    ("%START_TIME%", "%START_TIME%"),
])
def test_header_value_formatting(value: str, want: str | None) -> None:
    r = rt.Route(request_headers=muts(add("x-out", value)))
    head = req(headers=[("x-in", "in-value")])
    fields = {"DOWNSTREAM_REMOTE_ADDRESS": "10.0.0.1:5555",
              "DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT": "10.0.0.1"}
    rt.apply_request_headers(rt.RouteConfiguration(), rt.VirtualHost(name="v"), r, head,
                             fields=fields)
    assert head.headers.get("x-out") == want


def test_response_format_reads_response_and_request() -> None:
    r = rt.Route(response_headers=muts(add("x-echo", "%RESP(x-up)%/%REQ(x-in)%")))
    resp = HeaderMap([("x-up", "u")])
    rt.apply_response_headers(rt.RouteConfiguration(), rt.VirtualHost(name="v"), r, resp,
                              request=req(headers=[("x-in", "i")]))
    assert resp.get("x-echo") == "u/i"


# ----------------------------------------------------------------------------- rewrites


def fwd(match: rt.RouteMatch, **kw: Any) -> rt.Route:
    return rt.Route(match=match, action=rt.RouteAction(cluster="c", **kw))


@pytest.mark.parametrize(("route_", "path", "want"), [
    (fwd(m("prefix", "/api/"), prefix_rewrite="/"), "/api/v1?x=1", "/v1?x=1"),
    (fwd(m("prefix", "/api"), prefix_rewrite="/svc"), "/api/v1", "/svc/v1"),
    (fwd(m("prefix", "/API", case_sensitive=False), prefix_rewrite="/x"), "/api/v1", "/x/v1"),
    (fwd(m("path", "/old"), prefix_rewrite="/new"), "/old?q", "/new?q"),
    (fwd(m("path_separated_prefix", "/api"), prefix_rewrite="/v2"), "/api/x", "/v2/x"),
    (fwd(m("safe_regex", "/a/.*"), prefix_rewrite="/all"), "/a/b?c", "/all?c"),
    (fwd(m("prefix", "/"), regex_rewrite=rt.RegexRewrite(
        regex=re.compile(r"^/service/([^/]+)(/.*)$"), substitution=r"\2/instance/\1")),
     "/service/foo/v1/api?x=1", "/v1/api/instance/foo?x=1"),
    (fwd(m("prefix", "/"), regex_rewrite=rt.RegexRewrite(
        regex=re.compile("o"), substitution="0")), "/foo/boo?o=o", "/f00/b00?o=o"),
    (fwd(m("prefix", "/"), regex_rewrite=rt.RegexRewrite(
        regex=re.compile("/x"), substitution=r"[\0]\\")), "/x", "[/x]\\"),
])
def test_path_rewrites(route_: rt.Route, path: str, want: str) -> None:
    head = req(path)
    assert rt.rewrite(route_, head) is True
    assert head.path == want
    assert head.headers.get("x-envoy-original-path") == path


def test_rewrite_without_change_and_suppressed_header() -> None:
    head = req("/a")
    assert rt.rewrite(fwd(m("prefix", "/a"), prefix_rewrite="/a"), head) is False
    assert "x-envoy-original-path" not in head.headers
    head = req("/a/b")
    assert rt.rewrite(fwd(m("prefix", "/a"), prefix_rewrite="/z"), head,
                      insert_original_path=False)
    assert head.path == "/z/b" and "x-envoy-original-path" not in head.headers


def test_host_rewrites() -> None:
    head = req(authority="orig:80")
    rt.rewrite(fwd(m("prefix", "/"), host_rewrite_literal="new.host",
                   append_x_forwarded_host=True), head)
    assert head.authority == "new.host"
    assert head.headers.get("x-forwarded-host") == "orig:80"
    head = req(headers=[("x-host", "h.from.header")])
    rt.rewrite(fwd(m("prefix", "/"), host_rewrite_header="x-host"), head)
    assert head.authority == "h.from.header"
    head = req()
    cw = rt.ClusterWeight(name="c", weight=1, host_rewrite_literal="cw.host")
    rt.rewrite(fwd(m("prefix", "/")), head, cluster=cw)
    assert head.authority == "cw.host"
    head = req()
    action = rt.RouteAction(cluster="c", auto_host_rewrite=True)
    rt.auto_host_rewrite(action, head, "endpoint.example")
    assert head.authority == "endpoint.example"
    rt.auto_host_rewrite(action, head, "")
    assert head.authority == "endpoint.example"


def test_finalize_request_applies_headers_before_rewrite() -> None:
    r = rt.Route(match=m("prefix", "/a"), action=rt.RouteAction(cluster="c", prefix_rewrite="/b"),
                 request_headers=muts(add("x-path", "%REQ(:path)%")))
    head = req("/a/1")
    rt.finalize_request(rt.RouteConfiguration(), rt.VirtualHost(name="v"), r, head)
    assert (head.path, head.headers.get("x-path")) == ("/b/1", "/a/1")


# ----------------------------------------------------------------------------- redirects


@pytest.mark.parametrize(("redirect", "head", "want"), [
    (rt.RedirectAction(), req("/p?q=1", "foo.com"), (301, "http://foo.com/p?q=1")),
    (rt.RedirectAction(scheme_redirect="https"), req("/p", "foo.com"),
     (301, "https://foo.com/p")),
    (rt.RedirectAction(scheme_redirect="https"), req("/p", "foo.com:80"),
     (301, "https://foo.com/p")),                         # standard port of the old scheme
    (rt.RedirectAction(scheme_redirect="https"), req("/p", "foo.com:8080"),
     (301, "https://foo.com:8080/p")),
    (rt.RedirectAction(scheme_redirect="https"), req("/p", "[::1]:80"),
     (301, "https://[::1]/p")),
    (rt.RedirectAction(port_redirect=8443, scheme_redirect="https"), req("/p", "[::1]:80"),
     (301, "https://[::1]:8443/p")),
    (rt.RedirectAction(port_redirect=443, scheme_redirect="https"), req("/p", "foo.com:80"),
     (301, "https://foo.com/p")),                         # standard port omitted
    (rt.RedirectAction(host_redirect="bar.com", response_code=302), req("/p", "foo.com:9"),
     (302, "http://bar.com/p")),
    (rt.RedirectAction(host_redirect="bar.com", port_redirect=81), req("/p"),
     (301, "http://bar.com:81/p")),
    (rt.RedirectAction(path_redirect="/new"), req("/old?q=1"), (301, "http://foo.com/new?q=1")),
    (rt.RedirectAction(path_redirect="/new?x=2", strip_query=True), req("/old?q=1"),
     (301, "http://foo.com/new?x=2")),
    (rt.RedirectAction(path_redirect="/new", strip_query=True), req("/old?q=1"),
     (301, "http://foo.com/new")),
    (rt.RedirectAction(path_redirect="new"), req("/old"), (301, "http://foo.com/new")),
    (rt.RedirectAction(strip_query=True, response_code=308), req("/p?q"),
     (308, "http://foo.com/p")),
    (rt.RedirectAction(regex_rewrite=rt.RegexRewrite(regex=re.compile("^/a/"),
                                                     substitution="/b/")),
     req("/a/x?y"), (301, "http://foo.com/b/x?y")),
])
def test_redirects(redirect: rt.RedirectAction, head: RequestHead,
                   want: tuple[int, str]) -> None:
    assert rt.redirect_response(redirect, head) == want


def test_redirect_prefix_rewrite_uses_the_route_match() -> None:
    redirect = rt.RedirectAction(prefix_rewrite="/v2/")
    got = rt.redirect_response(redirect, req("/v1/x?q"), m("prefix", "/v1/"))
    assert got == (301, "http://foo.com/v2/x?q")


def test_redirect_xfp_https_keeps_80_on_https() -> None:
    # Port stripping follows x-forwarded-proto: http://foo:443 over TLS keeps nothing odd.
    head = req("/p", "foo.com:443", headers=[("x-forwarded-proto", "https")])
    assert rt.redirect_response(rt.RedirectAction(scheme_redirect="http"), head) == (
        301, "http://foo.com/p")
    head = req("/p", "foo.com:80", headers=[("x-forwarded-proto", "https")])
    assert rt.redirect_response(rt.RedirectAction(scheme_redirect="https"), head) == (
        301, "https://foo.com:80/p")


def test_route_action_accessors() -> None:
    assert rt.Route().route is not None
    r = rt.Route(action=rt.RedirectAction())
    assert r.route is None and r.redirect is not None and r.direct_response is None
    d = rt.Route(action=rt.DirectResponseAction(status=502))
    assert d.direct_response is not None and d.direct_response.status == 502


# ----------------------------------------------------------------------------- fault

P100 = rt.FractionalPercent(numerator=100)
P0 = rt.FractionalPercent(numerator=0)


@pytest.mark.parametrize(("fault", "headers", "want"), [
    (None, [], (None, None, None)),
    (rt.FaultConfig(), [], (None, None, None)),
    (rt.FaultConfig(delay=rt.FaultDelay(fixed_delay=1.5, percentage=P100)), [],
     (1.5, None, None)),
    (rt.FaultConfig(delay=rt.FaultDelay(fixed_delay=1.5, percentage=P0)), [],
     (None, None, None)),
    (rt.FaultConfig(abort=rt.FaultAbort(http_status=503, percentage=P100)), [],
     (None, 503, None)),
    (rt.FaultConfig(abort=rt.FaultAbort(http_status=503, percentage=P0)), [],
     (None, None, None)),
    (rt.FaultConfig(abort=rt.FaultAbort(grpc_status=14, percentage=P100)), [],
     (None, 200, 14)),
    (rt.FaultConfig(delay=rt.FaultDelay(fixed_delay=2.0, percentage=P100),
                    abort=rt.FaultAbort(http_status=500, percentage=P100)), [],
     (2.0, 500, None)),
    (rt.FaultConfig(abort=rt.FaultAbort(http_status=503, percentage=P100),
                    headers=(hm("x-fault", "present"),)), [], (None, None, None)),
    (rt.FaultConfig(abort=rt.FaultAbort(http_status=503, percentage=P100),
                    headers=(hm("x-fault", "present"),)), [("x-fault", "1")],
     (None, 503, None)),
    (rt.FaultConfig(abort=rt.FaultAbort(http_status=503, percentage=P100),
                    downstream_nodes=frozenset({"n1"})),
     [("x-envoy-downstream-service-node", "n2")], (None, None, None)),
    (rt.FaultConfig(abort=rt.FaultAbort(http_status=503, percentage=P100),
                    downstream_nodes=frozenset({"n1"})),
     [("x-envoy-downstream-service-node", "n1")], (None, 503, None)),
    # header-controlled faults
    (rt.FaultConfig(delay=rt.FaultDelay(header=True, percentage=P100)), [],
     (None, None, None)),
    (rt.FaultConfig(delay=rt.FaultDelay(header=True, percentage=P100)),
     [("x-envoy-fault-delay-request", "250")], (0.25, None, None)),
    (rt.FaultConfig(delay=rt.FaultDelay(header=True, percentage=P100)),
     [("x-envoy-fault-delay-request", "250"),
      ("x-envoy-fault-delay-request-percentage", "0")], (None, None, None)),
    (rt.FaultConfig(abort=rt.FaultAbort(header=True, percentage=P100)),
     [("x-envoy-fault-abort-request", "429")], (None, 429, None)),
    (rt.FaultConfig(abort=rt.FaultAbort(header=True, percentage=P100)),
     [("x-envoy-fault-abort-request", "700")], (None, None, None)),
    (rt.FaultConfig(abort=rt.FaultAbort(header=True, percentage=P100)),
     [("x-envoy-fault-abort-grpc-request", "4")], (None, 200, 4)),
    (rt.FaultConfig(abort=rt.FaultAbort(header=True, percentage=P0)),
     [("x-envoy-fault-abort-request", "429"),
      ("x-envoy-fault-abort-request-percentage", "100")], (None, None, None)),  # never raised
])
def test_fault_decisions(fault: rt.FaultConfig | None, headers: list[tuple[str, str]],
                         want: tuple[float | None, int | None, int | None]) -> None:
    assert rt.fault_decision(fault, req(headers=headers), random.Random(1)) == want


def test_fault_cluster_and_active_limits() -> None:
    f = rt.FaultConfig(abort=rt.FaultAbort(http_status=503, percentage=P100),
                       upstream_cluster="target", max_active_faults=2)
    rng = random.Random(1)
    assert rt.fault_decision(f, req(), rng, cluster="other") == (None, None, None)
    assert rt.fault_decision(f, req(), rng, cluster="target", active_faults=1)[1] == 503
    assert rt.fault_decision(f, req(), rng, cluster="target", active_faults=2)[1] is None


def test_fault_percentage_is_random_mod_denominator() -> None:
    f = rt.FaultConfig(abort=rt.FaultAbort(
        http_status=500, percentage=rt.FractionalPercent(numerator=1, denominator=1000000)))
    assert rt.fault_decision(f, req(), FixedRng(1000000))[1] == 500     # 0 < 1
    assert rt.fault_decision(f, req(), FixedRng(1))[1] is None
    half = rt.FaultConfig(abort=rt.FaultAbort(
        http_status=500, percentage=rt.FractionalPercent(numerator=50)))
    rng = random.Random(3)
    hits = sum(rt.fault_decision(half, req(), rng)[1] == 500 for _ in range(4000))
    assert 1800 < hits < 2200


def test_fault_resolution_most_specific_wins() -> None:
    base = rt.FaultConfig(abort=rt.FaultAbort(http_status=500, percentage=P100))
    per_route = rt.FaultConfig(abort=rt.FaultAbort(http_status=418, percentage=P100))
    per_vh = rt.FaultConfig(abort=rt.FaultAbort(http_status=419, percentage=P100))
    name = "envoy.filters.http.fault"
    filt = rt.HttpFilter(name=name, config=base)
    rc = rt.RouteConfiguration()
    v = rt.VirtualHost(name="v", per_filter={name: per_vh})
    plain = rt.Route()
    assert rt.resolve_fault(filt, rc, rt.VirtualHost(name="x"), plain) is base
    assert rt.resolve_fault(filt, rc, v, plain) is per_vh
    r = rt.Route(per_filter={name: per_route})
    assert rt.resolve_fault(filt, rc, v, r) is per_route
    cw = rt.ClusterWeight(name="c", weight=1, per_filter={name: rt.FilterDisabled()})
    assert rt.resolve_fault(filt, rc, v, r, cw) is None
    disabled = rt.HttpFilter(name=name, config=base, disabled=True)
    assert rt.resolve_fault(disabled, rc, v, r) is None
    hcm = rt.HcmConfig(stat_prefix="s", http_filters=(
        filt, rt.HttpFilter(name="envoy.filters.http.router", config=rt.RouterConfig())))
    assert rt.route_fault(r, hcm) is per_route
    assert rt.route_fault(plain, hcm, vh=v) is per_vh
    assert rt.route_fault(plain, rt.HcmConfig(stat_prefix="s")) is None


def test_mirror_selected() -> None:
    always = rt.RequestMirrorPolicy(cluster="m")
    never = rt.RequestMirrorPolicy(cluster="m", fraction=P0)
    assert rt.mirror_selected(always, FixedRng(12345))
    assert not rt.mirror_selected(never, FixedRng(0))


# ----------------------------------------------------------------------------- timeouts


@pytest.mark.parametrize(("value", "want"), [
    ("1S", 1.0), ("500m", 0.5), ("2M", 120.0), ("1H", 3600.0), ("1000u", 0.001),
    ("123456789S", None), ("1x", None), ("S", None), ("", None)])
def test_grpc_timeout_header(value: str, want: float | None) -> None:
    got = rt.grpc_timeout(req(headers=[("grpc-timeout", value)]))
    assert got == pytest.approx(want) if want is not None else got is None


def test_final_timeouts_defaults_and_headers() -> None:
    want = rt.Timeouts(15.0, 0.0, 0.0)
    assert rt.final_timeouts(rt.RouteAction(cluster="c"), None, req()) == want
    assert rt.final_timeouts(rt.RouteAction(cluster="c", timeout=0.0), None, req()).global_ == 0
    pol = rt.RetryPolicy(per_try_timeout=2.0, per_try_idle_timeout=1.0)
    t = rt.final_timeouts(rt.RouteAction(cluster="c", timeout=5.0), pol, req())
    assert t == rt.Timeouts(5.0, 2.0, 1.0) and t.expected == 2.0
    # per-try not below the global timeout is dropped
    assert rt.final_timeouts(rt.RouteAction(cluster="c", timeout=1.0), pol, req()).per_try == 0
    head = req(headers=[("x-envoy-upstream-rq-timeout-ms", "250"),
                        ("x-envoy-upstream-rq-per-try-timeout-ms", "100")])
    t = rt.final_timeouts(rt.RouteAction(cluster="c"), None, head)
    assert (t.global_, t.per_try) == (0.25, 0.1)
    assert "x-envoy-upstream-rq-timeout-ms" not in head.headers
    head = req(headers=[("x-envoy-expected-rq-timeout-ms", "300")])
    t = rt.final_timeouts(rt.RouteAction(cluster="c"), None, head,
                          respect_expected_rq_timeout=True)
    assert t.global_ == 0.3


@pytest.mark.parametrize(("cap", "offset", "header", "want"), [
    (0.0, 0.0, "3S", 3.0),        # uncapped: the header
    (0.0, 0.0, None, 0.0),        # no header, no cap: infinite
    (2.0, 0.0, "3S", 2.0),        # capped
    (2.0, 0.0, None, 2.0),        # no header: the cap
    (10.0, 1.0, "3S", 2.0),       # offset applied
    (10.0, 5.0, "3S", 3.0),       # offset would reach zero: not applied
])
def test_final_timeouts_grpc(cap: float, offset: float, header: str | None,
                             want: float) -> None:
    hs = [("content-type", "application/grpc")] + ([("grpc-timeout", header)] if header else [])
    action = rt.RouteAction(cluster="c", max_grpc_timeout=cap, grpc_timeout_offset=offset)
    assert rt.final_timeouts(action, None, req(headers=hs)).global_ == want
    # not a gRPC request: the route timeout
    assert rt.final_timeouts(action, None, req()).global_ == 15.0


@pytest.mark.parametrize(("action", "hcm", "header", "want"), [
    (rt.RouteAction(), 0.0, None, None),
    (rt.RouteAction(), 7.0, None, 7.0),
    (rt.RouteAction(max_stream_duration=3.0), 7.0, None, 3.0),
    (rt.RouteAction(max_stream_duration=0.0), 7.0, None, None),
    (rt.RouteAction(max_stream_duration=3.0), 7.0, "1S", 3.0),   # header not enabled
    (rt.RouteAction(grpc_timeout_header_max=0.0), 0.0, "4S", 4.0),
    (rt.RouteAction(grpc_timeout_header_max=2.0), 0.0, "4S", 2.0),
    (rt.RouteAction(grpc_timeout_header_max=0.0, grpc_timeout_header_offset=1.0), 0.0, "4S",
     3.0),
    (rt.RouteAction(grpc_timeout_header_max=0.0, grpc_timeout_header_offset=5.0), 0.0, "4S",
     None),
])
def test_stream_duration_limit(action: rt.RouteAction, hcm: float, header: str | None,
                               want: float | None) -> None:
    head = req(headers=[("grpc-timeout", header)] if header else [])
    assert rt.stream_duration_limit(action, hcm, head) == want


def test_idle_timeout_and_upgrades() -> None:
    hcm = rt.HcmConfig(stat_prefix="s", upgrade_configs=(rt.UpgradeConfig(
        upgrade_type="websocket"),))
    assert rt.stream_idle_timeout(rt.RouteAction(), hcm) == 300.0
    assert rt.stream_idle_timeout(rt.RouteAction(idle_timeout=0.0), hcm) is None
    assert rt.stream_idle_timeout(rt.RouteAction(idle_timeout=9.0), hcm) == 9.0
    assert hcm.upgrade_enabled("WebSocket") and not hcm.upgrade_enabled("h2c")
    off = rt.Route(action=rt.RouteAction(upgrade_configs=(rt.UpgradeConfig(
        upgrade_type="websocket", enabled=False),)))
    assert not hcm.upgrade_enabled("websocket", off)
    assert hcm.router == rt.RouterConfig()


def test_referenced_clusters() -> None:
    rc = rt.RouteConfiguration(virtual_hosts=(rt.VirtualHost(name="v", routes=(
        rt.Route(action=rt.RouteAction(cluster="a", request_mirror_policies=(
            rt.RequestMirrorPolicy(cluster="m"),))),
        rt.Route(action=weighted(("b", 1), ("c", 1))),
        rt.Route(action=rt.DirectResponseAction(status=200)))),))
    assert rt.referenced_clusters(rc) == {"a", "b", "c", "m"}
