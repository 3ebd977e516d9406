"""HTTP routing: connection manager settings, route tables, and the pure functions using them.

Owns: frozen runtime types for ``HttpConnectionManager`` (:class:`HcmConfig`) and
``RouteConfiguration`` (virtual hosts, routes, matchers, actions, retry policies, header
mutations, fault settings), and the decisions Envoy's router makes from them:
:func:`select_virtual_host`, :func:`match_route`, :func:`route_cluster` /
:func:`pick_weighted_cluster`, :func:`apply_request_headers` / :func:`apply_response_headers`,
:func:`rewrite`, :func:`redirect_response`, :func:`resolve_fault` / :func:`fault_decision`,
:func:`final_timeouts`, :func:`stream_duration_limit`.
Must not: import protobuf types (they stay in :mod:`remora.proxy.http.routes_compile`), do IO,
or keep per-request state. Functions that change a request take the :class:`RequestHead` and
change it in place; everything else is read-only.

Names and defaults are Envoy's (``envoy/config/route/v3/route_components.proto``,
``envoy/extensions/filters/network/http_connection_manager/v3``); durations are seconds
(``float``) where ``0.0`` means "disabled", as in Envoy, and ``None`` means "not set here,
inherit" where Envoy distinguishes the two.
"""

from __future__ import annotations

import re
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final, Literal, NamedTuple

from remora.proxy.http.hashing import HashPolicy
from remora.proxy.http.tracing import RouteTracing, TracingConfig
from remora.proxy.http.types import HeaderMap, RequestHead, ResponseHead

if typing.TYPE_CHECKING:
    import ipaddress

    IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class RandomSource(typing.Protocol):
    """What the routing decisions need from a random generator (``random.Random`` fits)."""

    def getrandbits(self, k: int, /) -> int: ...


# ----------------------------------------------------------------------------- Envoy defaults

DEFAULT_ROUTE_TIMEOUT = 15.0            # RouteAction.timeout unset (0 disables)
DEFAULT_RETRY_BASE_INTERVAL = 0.025     # RetryPolicy.retry_back_off.base_interval
DEFAULT_STREAM_IDLE_TIMEOUT = 300.0     # HCM.stream_idle_timeout (5 min)
DEFAULT_HTTP_IDLE_TIMEOUT = 3600.0      # HttpProtocolOptions.idle_timeout (1 h)
DEFAULT_MAX_HEADERS_COUNT = 100         # HttpProtocolOptions.max_headers_count
DEFAULT_MAX_REQUEST_HEADERS_KB = 60     # HCM.max_request_headers_kb
DEFAULT_DRAIN_TIMEOUT = 5.0             # HCM.drain_timeout
DEFAULT_DELAYED_CLOSE_TIMEOUT = 1.0     # HCM.delayed_close_timeout
DEFAULT_MAX_DIRECT_RESPONSE_BODY = 4096  # RouteConfiguration.max_direct_response_body_size_bytes

# Request headers the fault filter reads when header_delay / header_abort are configured
# (``source/extensions/filters/common/fault/fault_config.h``).
FAULT_DELAY_HEADER: Final = "x-envoy-fault-delay-request"
FAULT_DELAY_PERCENT_HEADER: Final = "x-envoy-fault-delay-request-percentage"
FAULT_ABORT_HEADER: Final = "x-envoy-fault-abort-request"
FAULT_ABORT_GRPC_HEADER: Final = "x-envoy-fault-abort-grpc-request"
FAULT_ABORT_PERCENT_HEADER: Final = "x-envoy-fault-abort-request-percentage"
DOWNSTREAM_NODE_HEADER: Final = "x-envoy-downstream-service-node"


# ----------------------------------------------------------------------------- matchers


@dataclass(frozen=True, slots=True, kw_only=True)
class FractionalPercent:
    """``envoy.type.v3.FractionalPercent``; ``denominator`` is 100, 10000 or 1000000."""

    numerator: int = 0
    denominator: int = 100

    def hit(self, random_value: int) -> bool:
        """Envoy's ``ProtobufPercentHelper::evaluateFractionalPercent``: ``r % d < n``."""
        return random_value % self.denominator < self.numerator


ALWAYS = FractionalPercent(numerator=100, denominator=100)

StringMatchKind = Literal["exact", "prefix", "suffix", "contains", "safe_regex"]


@dataclass(frozen=True, slots=True, kw_only=True)
class StringMatcher:
    """``envoy.type.matcher.v3.StringMatcher``. Regexes must match the whole value (RE2
    ``FullMatch``); they are compiled with Python's :mod:`re`, whose syntax covers RE2's
    common subset."""

    kind: StringMatchKind
    value: str = ""
    ignore_case: bool = False
    regex: re.Pattern[str] | None = None
    _folded: str = field(init=False, repr=False, compare=False, default="")

    def __post_init__(self) -> None:
        object.__setattr__(self, "_folded", self.value.lower() if self.ignore_case
                           else self.value)

    def match(self, s: str) -> bool:
        kind = self.kind
        if kind == "safe_regex":
            assert self.regex is not None
            return self.regex.fullmatch(s) is not None
        if self.ignore_case:
            s = s.lower()
        want = self._folded
        if kind == "exact":
            return s == want
        if kind == "prefix":
            return s.startswith(want)
        if kind == "suffix":
            return s.endswith(want)
        return want in s


def request_header_value(head: RequestHead, name: str) -> str | None:
    """A request header as Envoy's header matchers see it: every value of ``name`` joined
    with ``,`` (``HeaderUtility::getAllOfHeaderAsString``), ``None`` when absent. The
    pseudo-headers ``:method``, ``:path`` (with its query), ``:authority`` (also ``host``,
    which Envoy stores as ``:authority``) and ``:scheme`` come from the head's fields."""
    if name[0] == ":" or name == "host":
        if name == ":method":
            return head.method
        if name == ":path":
            return head.path
        if name in (":authority", "host"):
            return head.authority or None
        if name == ":scheme":
            return head.scheme
        return None
    values = head.headers.get_all(name)
    if not values:
        return None
    return values[0] if len(values) == 1 else ",".join(values)


_INT_RE = re.compile(r"\s*[+-]?\d+\s*")

HeaderMatchKind = Literal["present", "string", "range"]


@dataclass(frozen=True, slots=True, kw_only=True)
class HeaderMatcher:
    """``envoy.config.route.v3.HeaderMatcher``. The deprecated ``exact_match`` …
    ``contains_match`` fields compile to ``kind="string"``; no specifier at all means
    "present". A missing header never matches (whatever ``invert``) unless
    ``treat_missing_as_empty``; ``present`` matchers compare presence with ``present``, then
    ``invert`` flips (``HeaderUtility::HeaderData``)."""

    name: str
    kind: HeaderMatchKind = "present"
    string: StringMatcher | None = None
    range_start: int = 0                # [start, end) on the value parsed as int64
    range_end: int = 0
    present: bool = True
    invert: bool = False
    treat_missing_as_empty: bool = False

    def matches(self, head: RequestHead) -> bool:
        value = request_header_value(head, self.name)
        if self.kind == "present":
            return ((value is not None) == self.present) != self.invert
        if value is None:
            if not self.treat_missing_as_empty:
                return False
            value = ""
        if self.kind == "string":
            assert self.string is not None
            hit = self.string.match(value)
        else:
            hit = (_INT_RE.fullmatch(value) is not None
                   and self.range_start <= int(value) < self.range_end)
        return hit != self.invert


@dataclass(frozen=True, slots=True, kw_only=True)
class QueryParameterMatcher:
    """``QueryParameterMatcher``: the parameter's first value; no ``string`` (or
    ``present_match``) means "present" (``ConfigUtility::QueryParameterMatcher``)."""

    name: str
    string: StringMatcher | None = None

    def matches(self, query: Mapping[str, str]) -> bool:
        value = query.get(self.name)
        if value is None:
            return False
        return self.string is None or self.string.match(value)


def parse_query(path: str) -> dict[str, str]:
    """``Http::Utility::QueryParamsMulti::parseQueryString`` keeping the first value of each
    name: after the first ``?`` (up to a ``#``), ``&``-separated, ``name`` alone means an empty
    value; no percent-decoding (Envoy matches the raw text)."""
    q = path.find("?")
    if q < 0:
        return {}
    rest = path[q + 1:]
    h = rest.find("#")
    if h >= 0:
        rest = rest[:h]
    out: dict[str, str] = {}
    for part in rest.split("&"):
        if not part:
            continue
        name, _, value = part.partition("=")
        out.setdefault(name, value)
    return out


def path_without_query(path: str) -> str:
    """``Http::PathUtil::removeQueryAndFragment``: up to the first ``?`` or ``#``."""
    q = path.find("?")
    if q >= 0:
        path = path[:q]
    h = path.find("#")
    return path[:h] if h >= 0 else path


def is_grpc_request(head: RequestHead) -> bool:
    """``Grpc::Common::hasGrpcContentType``: ``application/grpc`` or ``application/grpc+…``
    / ``application/grpc;…``."""
    ct = head.headers.get("content-type")
    if ct is None or not ct.startswith("application/grpc"):
        return False
    return len(ct) == 16 or ct[16] in "+;"


PathMatchKind = Literal["prefix", "path", "safe_regex", "path_separated_prefix"]


@dataclass(frozen=True, slots=True, kw_only=True)
class RouteMatch:
    """``RouteMatch``: the path rule runs on the path without query and fragment; regexes
    must match all of it. ``case_sensitive`` (default true) applies to prefix, path and
    path_separated_prefix. ``grpc`` requires a gRPC content-type."""

    kind: PathMatchKind = "prefix"
    value: str = "/"                      # the prefix, path, or regex text
    regex: re.Pattern[str] | None = None
    case_sensitive: bool = True
    headers: tuple[HeaderMatcher, ...] = ()
    query_parameters: tuple[QueryParameterMatcher, ...] = ()
    grpc: bool = False
    _folded: str = field(init=False, repr=False, compare=False, default="")

    def __post_init__(self) -> None:
        object.__setattr__(self, "_folded", self.value if self.case_sensitive
                           else self.value.lower())

    def path_matches(self, path: str) -> bool:
        """``path`` is already without its query string."""
        kind = self.kind
        if kind == "safe_regex":
            assert self.regex is not None
            return self.regex.fullmatch(path) is not None
        if not self.case_sensitive:
            path = path.lower()
        want = self._folded
        if kind == "prefix":
            return path.startswith(want)
        if kind == "path":
            return path == want
        # path_separated_prefix: the prefix, then the end of the path or a "/".
        n = len(want)
        return path.startswith(want) and (len(path) == n or path[n] == "/")

    def matched_path(self, path: str) -> str:
        """The part of ``path`` (without query) that ``prefix_rewrite`` replaces: the
        configured prefix / path, or all of it for a regex
        (``currentUrlPathAfterRewriteWithMatchedPath``)."""
        if self.kind == "safe_regex":
            return path
        return path[:len(self.value)]


# ----------------------------------------------------------------------------- header mutation

AppendAction = Literal["APPEND_IF_EXISTS_OR_ADD", "ADD_IF_ABSENT", "OVERWRITE_IF_EXISTS_OR_ADD",
                       "OVERWRITE_IF_EXISTS"]


class _Op(NamedTuple):
    kind: str       # "REQ", "RESP" or "FIELD"
    arg: str        # header names (REQ/RESP, "a?b") or the whole operator text (FIELD)
    max_len: int    # the ":N" truncation, 0 = none
    text: str       # the operator as written, for the literal fallback


_OP_RE = re.compile(r"%%|%([A-Z][A-Z0-9_]*)(\(([^)]*)\))?(?::(\d+))?%")


def parse_header_format(value: str) -> tuple[str | _Op, ...]:
    """Split a header value into literals and command operators. Supported: ``%%`` (a
    ``%``), ``%REQ(name?alt)%`` and ``%RESP(name?alt)%`` (with ``:N`` truncation) read from the
    request / response being changed, and any other ``%OPERATOR%`` or ``%OPERATOR(arg)%``
    looked up by its text (``"DOWNSTREAM_REMOTE_ADDRESS"``, ``"UPSTREAM_METADATA([…])"``) in the
    ``fields`` mapping the connection manager passes; operators not in it stay as literal text
    (Envoy would refuse the config; we keep the value visible instead)."""
    parts: list[str | _Op] = []
    pos = 0
    for m in _OP_RE.finditer(value):
        if m.start() > pos:
            parts.append(value[pos:m.start()])
        pos = m.end()
        if m.group(0) == "%%":
            parts.append("%")
            continue
        name, call, arg, trunc = m.group(1), m.group(2), m.group(3), m.group(4)
        max_len = int(trunc) if trunc else 0
        if name in ("REQ", "RESP") and call:
            parts.append(_Op(name, arg.strip().lower(), max_len, m.group(0)))
        else:
            parts.append(_Op("FIELD", name + (call or ""), max_len, m.group(0)))
    if pos < len(value):
        parts.append(value[pos:])
    merged: list[str | _Op] = []
    for p in parts:
        if isinstance(p, str) and merged and isinstance(merged[-1], str):
            merged[-1] = merged[-1] + p
        else:
            merged.append(p)
    return tuple(merged)


@dataclass(frozen=True, slots=True, kw_only=True)
class HeaderValueOption:
    """``HeaderValueOption``: ``key`` lower-case; the value is formatted per request. An empty
    result is not added unless ``keep_empty_value``. Default action ``APPEND_IF_EXISTS_OR_ADD``
    (the deprecated ``append: false`` compiles to ``OVERWRITE_IF_EXISTS_OR_ADD``)."""

    key: str
    value: str
    append_action: AppendAction = "APPEND_IF_EXISTS_OR_ADD"
    keep_empty_value: bool = False
    _parts: tuple[str | _Op, ...] = field(init=False, repr=False, compare=False, default=())

    def __post_init__(self) -> None:
        object.__setattr__(self, "_parts", parse_header_format(self.value))


@dataclass(frozen=True, slots=True, kw_only=True)
class HeaderMutations:
    """One level's ``*_headers_to_add`` and ``*_headers_to_remove``."""

    add: tuple[HeaderValueOption, ...] = ()
    remove: tuple[str, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.add or self.remove)


NO_MUTATIONS = HeaderMutations()


# ----------------------------------------------------------------------------- fault


@dataclass(frozen=True, slots=True, kw_only=True)
class FaultDelay:
    """``FaultDelay``: ``fixed_delay`` seconds, or ``header`` (``header_delay``: the delay in
    ms comes from ``x-envoy-fault-delay-request``). An unset percentage is 0 %."""

    fixed_delay: float = 0.0
    header: bool = False
    percentage: FractionalPercent = field(default_factory=FractionalPercent)


@dataclass(frozen=True, slots=True, kw_only=True)
class FaultAbort:
    """``FaultAbort``: ``http_status`` (200..599), ``grpc_status``, or ``header``
    (``header_abort``: from ``x-envoy-fault-abort-request`` / ``…-grpc-request``)."""

    http_status: int | None = None
    grpc_status: int | None = None
    header: bool = False
    percentage: FractionalPercent = field(default_factory=FractionalPercent)


@dataclass(frozen=True, slots=True, kw_only=True)
class FaultConfig:
    """``envoy.extensions.filters.http.fault.v3.HTTPFault`` (runtime keys not implemented)."""

    delay: FaultDelay | None = None
    abort: FaultAbort | None = None
    upstream_cluster: str = ""
    headers: tuple[HeaderMatcher, ...] = ()
    downstream_nodes: frozenset[str] = frozenset()
    max_active_faults: int | None = None      # None: unlimited


@dataclass(frozen=True, slots=True, kw_only=True)
class FilterDisabled:
    """``typed_per_filter_config`` with ``envoy.config.route.v3.FilterConfig{disabled: true}``:
    the filter does nothing for requests on this route / vhost."""


@dataclass(frozen=True, slots=True, kw_only=True)
class OpaqueFilterConfig:
    """A filter config kept as data: its type URL and its value as proto-JSON (for
    ``/config_dump``). The CORS filter's (it has no fields; its policies are per route) and
    Istio's own filters (TypedStruct values), which the connection manager reads from
    here: ``istio.stats`` (compiled by ``telemetry.compile_plugin_config``), the peer
    metadata exchange, and ``istio.alpn`` (it sets the ALPN of TLS upstream connections;
    Remora has no TLS yet, so it has nothing to act on)."""

    type_url: str
    value: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True, kw_only=True)
class CorsPolicy:
    """``envoy.extensions.filters.http.cors.v3.CorsPolicy``, a CORS filter's
    ``typed_per_filter_config`` (Istio puts a VirtualService's ``corsPolicy`` there). Unset
    fields stay ""/None: Envoy takes each field from the most specific policy that sets it.
    ``filter_enabled`` unset means enabled, ``shadow_enabled`` unset means off."""

    allow_origins: tuple[StringMatcher, ...] = ()
    allow_methods: str = ""
    allow_headers: str = ""
    expose_headers: str = ""
    max_age: str = ""
    allow_credentials: bool | None = None
    allow_private_network_access: bool | None = None
    forward_not_matching_preflights: bool | None = None
    filter_enabled: FractionalPercent = ALWAYS
    shadow_enabled: FractionalPercent | None = None


PerFilterConfig = FaultConfig | FilterDisabled | CorsPolicy | OpaqueFilterConfig


# ----------------------------------------------------------------------------- actions


@dataclass(frozen=True, slots=True, kw_only=True)
class RetryPolicy:
    """``RetryPolicy``. ``num_retries`` defaults to 1 once a policy exists; back-off base
    25 ms and max 10× base (Envoy's defaults); ``per_try_timeout`` 0 means the route's timeout
    bounds every try. ``retry_on`` holds Envoy's condition names (``5xx``, ``gateway-error``,
    ``reset``, ``reset-before-request``, ``connect-failure``, ``retriable-4xx``,
    ``refused-stream``, ``retriable-status-codes``, ``retriable-headers``, ``envoy-ratelimited``
    and the gRPC ones ``cancelled``, ``deadline-exceeded``, ``internal``,
    ``resource-exhausted``, ``unavailable``)."""

    retry_on: frozenset[str] = frozenset()
    num_retries: int = 1
    per_try_timeout: float = 0.0
    per_try_idle_timeout: float = 0.0
    retriable_status_codes: frozenset[int] = frozenset()
    retry_host_predicates: tuple[str, ...] = ()      # extension names, e.g. previous_hosts
    host_selection_retry_max_attempts: int = 1
    back_off_base: float = DEFAULT_RETRY_BASE_INTERVAL
    back_off_max: float = DEFAULT_RETRY_BASE_INTERVAL * 10
    retriable_headers: tuple[HeaderMatcher, ...] = ()          # on the response
    retriable_request_headers: tuple[HeaderMatcher, ...] = ()  # the request must match all

    @property
    def previous_hosts(self) -> bool:
        """``envoy.retry_host_predicates.previous_hosts``: retries avoid hosts already tried."""
        return any(p.endswith("previous_hosts") for p in self.retry_host_predicates)


@dataclass(frozen=True, slots=True, kw_only=True)
class RequestMirrorPolicy:
    """``RequestMirrorPolicy``: shadow a copy to ``cluster`` (or the cluster named by the
    ``cluster_header`` request header) for ``fraction`` of requests (100 % when unset)."""

    cluster: str = ""
    cluster_header: str = ""
    fraction: FractionalPercent = ALWAYS
    trace_sampled: bool | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class ClusterWeight:
    """``WeightedCluster.ClusterWeight``; its header mutations run before the route's, and
    its ``per_filter`` configs are the most specific ones."""

    name: str
    weight: int
    request_headers: HeaderMutations = NO_MUTATIONS
    response_headers: HeaderMutations = NO_MUTATIONS
    host_rewrite_literal: str = ""
    per_filter: dict[str, PerFilterConfig] = field(default_factory=dict)


@dataclass(frozen=True, slots=True, kw_only=True)
class RegexRewrite:
    """``RegexMatchAndSubstitute``: every match in the path (not the query) is replaced;
    ``\\1``..``\\9`` in the substitution are groups, ``\\0`` the whole match (RE2)."""

    regex: re.Pattern[str]
    substitution: str

    def apply(self, s: str) -> str:
        sub = self.substitution

        def expand(m: re.Match[str]) -> str:
            out: list[str] = []
            i = 0
            while i < len(sub):
                ch = sub[i]
                if ch == "\\" and i + 1 < len(sub):
                    nxt = sub[i + 1]
                    if nxt.isdigit():
                        out.append(m.group(int(nxt)) or "")
                        i += 2
                        continue
                    if nxt == "\\":
                        out.append("\\")
                        i += 2
                        continue
                out.append(ch)
                i += 1
            return "".join(out)

        return self.regex.sub(expand, s)


@dataclass(frozen=True, slots=True, kw_only=True)
class UpgradeConfig:
    """HCM or route ``UpgradeConfig`` (``upgrade_type`` lower-case, e.g. ``websocket``)."""

    upgrade_type: str
    enabled: bool = True


@dataclass(frozen=True, slots=True, kw_only=True)
class RouteAction:
    """``RouteAction``: forward upstream. Exactly one of ``cluster``, ``cluster_header``,
    ``weighted_clusters``. ``timeout`` defaults to Envoy's 15 s (0 disables);
    ``idle_timeout`` None inherits the HCM's ``stream_idle_timeout`` (0 disables);
    ``max_stream_duration`` None inherits the HCM's; ``grpc_timeout_header_max`` None means
    the ``grpc-timeout`` header is not used for the stream duration (0: used uncapped);
    ``max_grpc_timeout`` is the deprecated router-timeout variant of the same idea.
    ``retry_policy`` None falls back to the virtual host's (:func:`effective_retry_policy`).
    ``hash_policy``: the request's hash for RING_HASH / MAGLEV clusters (:mod:`hashing`)."""

    cluster: str = ""
    cluster_header: str = ""
    weighted_clusters: tuple[ClusterWeight, ...] = ()
    total_weight: int = 0
    cluster_not_found_response_code: int = 503
    prefix_rewrite: str = ""
    regex_rewrite: RegexRewrite | None = None
    host_rewrite_literal: str = ""
    auto_host_rewrite: bool = False
    host_rewrite_header: str = ""
    append_x_forwarded_host: bool = False
    timeout: float = DEFAULT_ROUTE_TIMEOUT
    idle_timeout: float | None = None
    retry_policy: RetryPolicy | None = None
    request_mirror_policies: tuple[RequestMirrorPolicy, ...] = ()
    max_stream_duration: float | None = None
    grpc_timeout_header_max: float | None = None
    grpc_timeout_header_offset: float = 0.0
    max_grpc_timeout: float | None = None
    grpc_timeout_offset: float = 0.0
    upgrade_configs: tuple[UpgradeConfig, ...] = ()
    hash_policy: tuple[HashPolicy, ...] = ()

    @property
    def uses_stream_duration(self) -> bool:
        """Envoy's ``usingNewTimeouts()``: a ``max_stream_duration`` block is configured."""
        return self.max_stream_duration is not None or self.grpc_timeout_header_max is not None


RedirectCode = Literal[301, 302, 303, 307, 308]


@dataclass(frozen=True, slots=True, kw_only=True)
class RedirectAction:
    """``RedirectAction``; ``scheme_redirect`` is ``"https"`` for ``https_redirect``;
    ``port_redirect`` 0 means unchanged. At most one of ``path_redirect``, ``prefix_rewrite``,
    ``regex_rewrite``."""

    scheme_redirect: str = ""
    host_redirect: str = ""
    port_redirect: int = 0
    path_redirect: str = ""
    prefix_rewrite: str = ""
    regex_rewrite: RegexRewrite | None = None
    response_code: RedirectCode = 301
    strip_query: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class DirectResponseAction:
    """``DirectResponseAction``: answer locally with ``status`` and ``body``."""

    status: int
    body: bytes = b""


Action = RouteAction | RedirectAction | DirectResponseAction


@dataclass(frozen=True, slots=True, kw_only=True)
class Decorator:
    operation: str
    propagate: bool = True


@dataclass(frozen=True, slots=True, kw_only=True)
class Route:
    """``Route``. ``per_filter`` holds ``typed_per_filter_config`` by filter name (the fault
    filter's per-route ``HTTPFault`` is a :class:`FaultConfig`)."""

    name: str = ""
    match: RouteMatch = field(default_factory=RouteMatch)
    action: Action = field(default_factory=RouteAction)
    request_headers: HeaderMutations = NO_MUTATIONS
    response_headers: HeaderMutations = NO_MUTATIONS
    decorator: Decorator | None = None
    metadata: dict[str, Any] = field(default_factory=dict)   # filter_metadata, as JSON
    per_filter: dict[str, PerFilterConfig] = field(default_factory=dict)
    stat_prefix: str = ""
    per_request_buffer_limit_bytes: int | None = None
    tracing: RouteTracing | None = None        # its own sampling and tags

    @property
    def route(self) -> RouteAction | None:
        """The forwarding action, None for a redirect or direct response."""
        return self.action if isinstance(self.action, RouteAction) else None

    @property
    def redirect(self) -> RedirectAction | None:
        return self.action if isinstance(self.action, RedirectAction) else None

    @property
    def direct_response(self) -> DirectResponseAction | None:
        return self.action if isinstance(self.action, DirectResponseAction) else None


@dataclass(frozen=True, slots=True, kw_only=True)
class VirtualHost:
    name: str
    domains: tuple[str, ...] = ("*",)
    routes: tuple[Route, ...] = ()
    request_headers: HeaderMutations = NO_MUTATIONS
    response_headers: HeaderMutations = NO_MUTATIONS
    retry_policy: RetryPolicy | None = None
    include_request_attempt_count: bool = False      # x-envoy-attempt-count upstream
    include_attempt_count_in_response: bool = False  # … and downstream
    request_mirror_policies: tuple[RequestMirrorPolicy, ...] = ()
    per_filter: dict[str, PerFilterConfig] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)
    per_request_buffer_limit_bytes: int | None = None


@dataclass(frozen=True, slots=True)
class VhostIndex:
    """Domain lookup tables built once per :class:`RouteConfiguration` (Envoy's
    ``RouteMatcher``): exact domains, then ``*suffix`` and ``prefix*`` wildcards keyed by the
    length of the fixed part, longest first, then the ``*`` vhost."""

    exact: dict[str, VirtualHost]
    suffixes: tuple[tuple[int, dict[str, VirtualHost]], ...]
    prefixes: tuple[tuple[int, dict[str, VirtualHost]], ...]
    default: VirtualHost | None

    @property
    def only_default(self) -> bool:
        return not (self.exact or self.suffixes or self.prefixes)


def build_vhost_index(vhosts: tuple[VirtualHost, ...], name: str = "") -> VhostIndex:
    """Raises ``ValueError`` for a domain used twice or a second ``*`` (Envoy refuses both)."""
    exact: dict[str, VirtualHost] = {}
    suffixes: dict[int, dict[str, VirtualHost]] = {}
    prefixes: dict[int, dict[str, VirtualHost]] = {}
    default: VirtualHost | None = None
    for vh in vhosts:
        for raw in vh.domains:
            domain = raw.lower()
            if domain == "*":
                if default is not None:
                    raise ValueError(f"only a single wildcard domain is permitted in route "
                                     f"{name!r}")
                default = vh
                continue
            if domain.startswith("*"):
                key, table = domain[1:], suffixes.setdefault(len(domain) - 1, {})
            elif domain.endswith("*"):
                key, table = domain[:-1], prefixes.setdefault(len(domain) - 1, {})
            else:
                key, table = domain, exact
            if key in table:
                raise ValueError(f"duplicate domain {domain!r} in route {name!r}")
            table[key] = vh
    return VhostIndex(
        exact=exact,
        suffixes=tuple(sorted(suffixes.items(), key=lambda kv: -kv[0])),
        prefixes=tuple(sorted(prefixes.items(), key=lambda kv: -kv[0])),
        default=default)


_EMPTY_INDEX = VhostIndex({}, (), (), None)


@dataclass(frozen=True, slots=True, kw_only=True)
class RouteConfiguration:
    """``RouteConfiguration``. ``validate_clusters`` is already resolved to Envoy's default
    when unset (true for an inline config, false for RDS); when true the caller checks
    :func:`referenced_clusters` against the cluster manager. ``config_json`` is the proto as
    JSON for ``/config_dump``."""

    name: str = ""
    virtual_hosts: tuple[VirtualHost, ...] = ()
    request_headers: HeaderMutations = NO_MUTATIONS
    response_headers: HeaderMutations = NO_MUTATIONS
    most_specific_header_mutations_wins: bool = False
    internal_only_headers: tuple[str, ...] = ()
    validate_clusters: bool = True
    max_direct_response_body_size_bytes: int = DEFAULT_MAX_DIRECT_RESPONSE_BODY
    ignore_port_in_host_matching: bool = False
    request_mirror_policies: tuple[RequestMirrorPolicy, ...] = ()
    per_filter: dict[str, PerFilterConfig] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)
    config_json: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)
    index: VhostIndex = field(init=False, compare=False, repr=False, default=_EMPTY_INDEX)

    def __post_init__(self) -> None:
        object.__setattr__(self, "index", build_vhost_index(self.virtual_hosts, self.name))


_NO_VH: Final = VirtualHost(name="")
_NO_RC: Final = RouteConfiguration()


def referenced_clusters(rc: RouteConfiguration) -> set[str]:
    """Cluster names the routes name statically (``cluster_header`` ones are per request)."""
    out: set[str] = set()
    for vh in rc.virtual_hosts:
        for r in vh.routes:
            a = r.action
            if isinstance(a, RouteAction):
                if a.cluster:
                    out.add(a.cluster)
                out.update(w.name for w in a.weighted_clusters)
                out.update(m.cluster for m in a.request_mirror_policies if m.cluster)
    return out


# ----------------------------------------------------------------------------- HCM


@dataclass(frozen=True, slots=True, kw_only=True)
class RouterConfig:
    """``envoy.extensions.filters.http.router.v3.Router``."""

    suppress_envoy_headers: bool = False
    respect_expected_rq_timeout: bool = False
    start_child_span: bool = False
    dynamic_stats: bool = True
    strict_check_headers: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class GrpcStatsConfig:
    """``envoy.extensions.filters.http.grpc_stats.v3.FilterConfig``. ``allowlist``: the
    ``individual_method_stats_allowlist`` as (service, method) pairs, None when not set;
    ``stats_for_all_methods`` unset means false (Envoy's default since 1.18)."""

    emit_filter_state: bool = False
    stats_for_all_methods: bool = False
    allowlist: frozenset[tuple[str, str]] | None = None
    replace_dots_in_grpc_service_name: bool = False


HttpFilterConfig = RouterConfig | FaultConfig | GrpcStatsConfig | OpaqueFilterConfig


@dataclass(frozen=True, slots=True, kw_only=True)
class HttpFilter:
    """One entry of ``http_filters``; ``name`` is what ``typed_per_filter_config`` keys use."""

    name: str
    config: HttpFilterConfig
    disabled: bool = False
    is_optional: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class Http1Options:
    """``Http1ProtocolOptions`` (Envoy defaults)."""

    accept_http_10: bool = False
    default_host_for_http_10: str = ""
    allow_chunked_length: bool = False
    allow_absolute_url: bool = True


@dataclass(frozen=True, slots=True, kw_only=True)
class Http2Options:
    """``Http2ProtocolOptions`` (Envoy's documented defaults: 2^31-1 streams, 256 MiB
    windows, 4 KiB HPACK table)."""

    max_concurrent_streams: int = 2147483647
    initial_stream_window_size: int = 268435456
    initial_connection_window_size: int = 268435456
    hpack_table_size: int = 4096
    allow_connect: bool = False


CodecType = Literal["AUTO", "HTTP1", "HTTP2"]
ServerHeaderTransformation = Literal["OVERWRITE", "APPEND_IF_ABSENT", "PASS_THROUGH"]
HeadersWithUnderscoresAction = Literal["ALLOW", "REJECT_REQUEST", "DROP_HEADER"]
PathWithEscapedSlashesAction = Literal["KEEP_UNCHANGED", "REJECT_REQUEST",
                                       "UNESCAPE_AND_REDIRECT", "UNESCAPE_AND_FORWARD"]
ForwardClientCertDetails = Literal["SANITIZE", "FORWARD_ONLY", "APPEND_FORWARD",
                                   "SANITIZE_SET", "ALWAYS_FORWARD_ONLY"]


@dataclass(frozen=True, slots=True, kw_only=True)
class HcmConfig:
    """``envoy.filters.network.http_connection_manager``. Exactly one of ``route_config``
    (inline, or RDS read from a file) or ``rds_route_config_name`` with ``route_config``
    None (ADS: filled later; until then every request gets 404 ``NR``).

    Timeouts (seconds, 0 disables): ``stream_idle_timeout`` 5 min, ``request_timeout`` and
    ``request_headers_timeout`` off, ``idle_timeout`` (connection, from
    ``common_http_protocol_options``) 1 h, ``max_connection_duration`` and
    ``max_stream_duration`` off, ``drain_timeout`` 5 s, ``delayed_close_timeout`` 1 s."""

    stat_prefix: str
    codec_type: CodecType = "AUTO"
    route_config: RouteConfiguration | None = None
    rds_route_config_name: str = ""
    rds_source: Literal["", "path", "ads"] = ""     # "": inline route_config
    rds_path: str = ""
    http_filters: tuple[HttpFilter, ...] = ()
    server_name: str = "envoy"
    server_header_transformation: ServerHeaderTransformation = "OVERWRITE"
    generate_request_id: bool = True
    preserve_external_request_id: bool = False
    always_set_request_id_in_response: bool = False
    request_id_extension: str = ""                 # type URL, e.g. the UUID extension
    use_remote_address: bool = False
    xff_num_trusted_hops: int = 0
    skip_xff_append: bool = False
    via: str = ""
    add_user_agent: bool = False
    append_x_forwarded_port: bool = False
    internal_address_cidrs: tuple[IPNetwork, ...] | None = None   # None: Envoy's RFC 1918 etc.
    internal_unix_sockets: bool = False
    stream_idle_timeout: float = DEFAULT_STREAM_IDLE_TIMEOUT
    request_timeout: float = 0.0
    request_headers_timeout: float = 0.0
    drain_timeout: float = DEFAULT_DRAIN_TIMEOUT
    delayed_close_timeout: float = DEFAULT_DELAYED_CLOSE_TIMEOUT
    idle_timeout: float = DEFAULT_HTTP_IDLE_TIMEOUT
    max_connection_duration: float = 0.0
    max_stream_duration: float = 0.0
    max_headers_count: int = DEFAULT_MAX_HEADERS_COUNT
    max_requests_per_connection: int = 0           # 0: unlimited
    headers_with_underscores_action: HeadersWithUnderscoresAction = "ALLOW"
    max_request_headers_kb: int = DEFAULT_MAX_REQUEST_HEADERS_KB
    upgrade_configs: tuple[UpgradeConfig, ...] = ()
    normalize_path: bool = False
    merge_slashes: bool = False
    path_with_escaped_slashes_action: PathWithEscapedSlashesAction = "KEEP_UNCHANGED"
    strip_any_host_port: bool = False
    strip_matching_host_port: bool = False
    strip_trailing_host_dot: bool = False
    proxy_100_continue: bool = False
    stream_error_on_invalid_http_message: bool = False
    forward_client_cert_details: ForwardClientCertDetails = "SANITIZE"
    set_current_client_cert_details: dict[str, Any] = field(default_factory=dict)
    tracing: bool = False
    trace: TracingConfig | None = None             # a Zipkin provider (tracing.py)
    http1: Http1Options = field(default_factory=Http1Options)
    http2: Http2Options = field(default_factory=Http2Options)
    access_logs: tuple[Any, ...] = ()

    def filter(self, name: str) -> HttpFilter | None:
        return next((f for f in self.http_filters if f.name == name), None)

    @property
    def router(self) -> RouterConfig:
        last = self.http_filters[-1].config if self.http_filters else None
        return last if isinstance(last, RouterConfig) else RouterConfig()

    def upgrade_enabled(self, upgrade_type: str, route: Route | None = None) -> bool:
        """Envoy: a route's ``upgrade_configs`` entry overrides the HCM's for that type."""
        t = upgrade_type.lower()
        if route is not None and isinstance(route.action, RouteAction):
            for u in route.action.upgrade_configs:
                if u.upgrade_type == t:
                    return u.enabled
        return any(u.upgrade_type == t and u.enabled for u in self.upgrade_configs)


# ----------------------------------------------------------------------------- selection


def host_port_start(host: str) -> int:
    """``HeaderUtility::getPortStart``: index of the ``:`` before a port, or -1. An IPv6
    literal counts only in brackets (RFC 3986 §3.2.2): ``[::1]:80`` → 5, ``[::1]`` → -1."""
    colon = host.rfind(":")
    if colon < 0:
        return -1
    bracket = host.rfind("]")
    if bracket < 0 or bracket < colon:
        return colon
    return -1


def select_virtual_host(rc: RouteConfiguration, authority: str) -> VirtualHost | None:
    """Envoy's ``RouteMatcher::findVirtualHost``. Hostnames compare case-insensitively; with
    ``ignore_port_in_host_matching`` the ``:port`` is cut first, otherwise a port is part of the
    text (``foo:80`` matches only a ``foo:80`` domain or a wildcard covering it). Order: exact,
    the longest ``*suffix`` (``*.foo.com`` never matches ``.foo.com`` itself), the longest
    ``prefix*``, then ``*``. A table with only ``*`` answers even without an authority; else
    an absent authority selects nothing."""
    idx = rc.index
    if idx.only_default:
        return idx.default
    if not authority:
        return None
    host = authority
    if rc.ignore_port_in_host_matching:
        cut = host_port_start(host)
        if cut >= 0:
            host = host[:cut]
    host = host.lower()
    vh = idx.exact.get(host)
    if vh is not None:
        return vh
    n = len(host)
    for length, table in idx.suffixes:
        if length < n:
            vh = table.get(host[n - length:])
            if vh is not None:
                return vh
    for length, table in idx.prefixes:
        if length < n:
            vh = table.get(host[:length])
            if vh is not None:
                return vh
    return idx.default


def match_route(vh: VirtualHost, head: RequestHead) -> Route | None:
    """The first route whose match accepts ``head`` (Envoy checks routes in order)."""
    path = path_without_query(head.path)
    query: dict[str, str] | None = None
    for route in vh.routes:
        m = route.match
        if not m.path_matches(path):
            continue
        if m.grpc and not is_grpc_request(head):
            continue
        if m.headers and not all(h.matches(head) for h in m.headers):
            continue
        if m.query_parameters:
            if query is None:
                query = parse_query(head.path)
            q = query
            if not all(p.matches(q) for p in m.query_parameters):
                continue
        return route
    return None


def pick_cluster_weight(action: RouteAction, rng: RandomSource) -> ClusterWeight:
    """Envoy's ``pickWeightedCluster``: ``random % total_weight`` walks the cumulative
    weights in config order (weight-0 clusters are never picked). The entry carries the
    cluster's own header mutations, host rewrite and per-filter configs."""
    total = action.total_weight or sum(w.weight for w in action.weighted_clusters)
    value = rng.getrandbits(64) % total
    end = 0
    for w in action.weighted_clusters:
        end += w.weight
        if value < end:
            return w
    return action.weighted_clusters[-1]


def pick_weighted_cluster(action: RouteAction, rng: RandomSource) -> str:
    """The name of the cluster :func:`pick_cluster_weight` picks."""
    return pick_cluster_weight(action, rng).name


def route_cluster(action: RouteAction, head: RequestHead,
                  rng: RandomSource) -> tuple[str, ClusterWeight | None]:
    """The upstream cluster for one request, and the weighted entry when one was picked.
    ``""`` means no cluster (an absent ``cluster_header``): Envoy answers
    ``cluster_not_found_response_code`` with flag ``NC``, as for an unknown name."""
    if action.weighted_clusters:
        w = pick_cluster_weight(action, rng)
        return w.name, w
    if action.cluster_header:
        return request_header_value(head, action.cluster_header) or "", None
    return action.cluster, None


def effective_retry_policy(vh: VirtualHost, route: Route) -> RetryPolicy | None:
    """The route's retry policy, else the virtual host's. None: no retries unless the
    request's ``x-envoy-retry-on`` asks (then ``num_retries`` 1)."""
    a = route.action
    if isinstance(a, RouteAction) and a.retry_policy is not None:
        return a.retry_policy
    return vh.retry_policy


# ----------------------------------------------------------------------------- headers


def _format(parts: tuple[str | _Op, ...], request: RequestHead | None,
            response: HeaderMap | None, fields: Mapping[str, str] | None) -> str:
    if len(parts) == 1 and isinstance(parts[0], str):
        return parts[0]
    out: list[str] = []
    for p in parts:
        if isinstance(p, str):
            out.append(p)
            continue
        if p.kind == "FIELD":
            got = fields.get(p.arg) if fields is not None else None
            if got is None:
                out.append(p.text)
                continue
        else:
            got = ""
            for name in p.arg.split("?"):
                v: str | None = None
                if p.kind == "REQ" and request is not None:
                    v = request_header_value(request, name)
                elif p.kind == "RESP" and response is not None:
                    v = response.get(name)
                if v is not None:
                    got = v
                    break
        out.append(got[:p.max_len] if p.max_len else got)
    return "".join(out)


def _evaluate(mut: HeaderMutations, headers: HeaderMap, request: RequestHead | None,
              response: HeaderMap | None, fields: Mapping[str, str] | None) -> None:
    """Envoy's ``HeaderParser::evaluateHeaders``: removals first; then every value is
    formatted and its action decided against the headers as they are, overwrites are applied,
    then additions."""
    for name in mut.remove:
        headers.remove(name)
    if not mut.add:
        return
    to_set: list[tuple[str, str]] = []
    to_add: list[tuple[str, str]] = []
    for opt in mut.add:
        value = _format(opt._parts, request, response, fields)
        if not value and not opt.keep_empty_value:
            continue
        action = opt.append_action
        if action == "APPEND_IF_EXISTS_OR_ADD":
            to_add.append((opt.key, value))
        elif action == "ADD_IF_ABSENT":
            if opt.key not in headers:
                to_add.append((opt.key, value))
        elif action == "OVERWRITE_IF_EXISTS_OR_ADD" or opt.key in headers:
            to_set.append((opt.key, value))
    for k, v in to_set:
        headers.set(k, v)
    for k, v in to_add:
        headers.add(k, v)


def _levels(rc: RouteConfiguration, vh: VirtualHost, route: Route,
            which: Literal["request_headers", "response_headers"]) -> list[HeaderMutations]:
    # (attributes read by name, not getattr(): compiled code reads these directly)
    if which == "request_headers":
        levels = [route.request_headers, vh.request_headers, rc.request_headers]
    else:
        levels = [route.response_headers, vh.response_headers, rc.response_headers]
    # Default: most specific first, so a less specific OVERWRITE has the last word;
    # most_specific_header_mutations_wins reverses it (route applied last).
    if rc.most_specific_header_mutations_wins:
        levels.reverse()
    return levels


def apply_request_headers(rc: RouteConfiguration, vh: VirtualHost, route: Route,
                          head: RequestHead, *, cluster: ClusterWeight | None = None,
                          fields: Mapping[str, str] | None = None) -> None:
    """``request_headers_to_remove/add`` in Envoy's order: the picked weighted cluster's
    first, then route, vhost, route config (reversed with
    ``most_specific_header_mutations_wins``)."""
    if cluster is not None and cluster.request_headers:
        _evaluate(cluster.request_headers, head.headers, head, None, fields)
    for mut in _levels(rc, vh, route, "request_headers"):
        if mut:
            _evaluate(mut, head.headers, head, None, fields)


def apply_response_headers(rc: RouteConfiguration, vh: VirtualHost, route: Route,
                           response: HeaderMap | ResponseHead, *,
                           request: RequestHead | None = None,
                           cluster: ClusterWeight | None = None,
                           fields: Mapping[str, str] | None = None) -> None:
    """``response_headers_to_remove/add`` in the same order as the request side. Envoy also
    applies them to the router's local replies (direct responses, redirects, 503s …)."""
    headers = response.headers if isinstance(response, ResponseHead) else response
    if cluster is not None and cluster.response_headers:
        _evaluate(cluster.response_headers, headers, request, headers, fields)
    for mut in _levels(rc, vh, route, "response_headers"):
        if mut:
            _evaluate(mut, headers, request, headers, fields)


def _rewritten_path(match: RouteMatch, prefix_rewrite: str, regex_rewrite: RegexRewrite | None,
                    path: str) -> str | None:
    """The path (with its query) after ``prefix_rewrite`` or ``regex_rewrite``, or None."""
    if prefix_rewrite:
        just_path = path_without_query(path)
        matched = match.matched_path(just_path)
        return prefix_rewrite + path[len(matched):]
    if regex_rewrite is not None:
        just_path = path_without_query(path)
        return regex_rewrite.apply(just_path) + path[len(just_path):]
    return None


def _set_authority(head: RequestHead, host: str, append_xfh: bool) -> None:
    """``Http::Utility::updateAuthority``: optionally keep the old one in
    ``x-forwarded-host`` (appended, comma-separated)."""
    if append_xfh and head.authority:
        old = head.headers.get("x-forwarded-host")
        head.headers.set("x-forwarded-host",
                         f"{old},{head.authority}" if old else head.authority)
    head.authority = host


def rewrite(route: Route, head: RequestHead, *, cluster: ClusterWeight | None = None,
            insert_original_path: bool = True) -> bool:
    """Path and host rewrites of a forwarding route, in place. The weighted cluster's
    ``host_rewrite_literal`` applies first, then the route's literal or header-based rewrite.
    When the path changes its old value goes to ``x-envoy-original-path`` (unless the router
    suppresses Envoy headers). ``auto_host_rewrite`` needs the chosen upstream host: see
    :func:`auto_host_rewrite`. Returns whether the path changed."""
    a = route.action
    if not isinstance(a, RouteAction):
        return False
    if cluster is not None and cluster.host_rewrite_literal:
        _set_authority(head, cluster.host_rewrite_literal, a.append_x_forwarded_host)
    if a.host_rewrite_literal:
        _set_authority(head, a.host_rewrite_literal, a.append_x_forwarded_host)
    elif a.host_rewrite_header:
        v = request_header_value(head, a.host_rewrite_header)
        if v:
            _set_authority(head, v, a.append_x_forwarded_host)
    new = _rewritten_path(route.match, a.prefix_rewrite, a.regex_rewrite, head.path)
    if new is None or new == head.path:
        return False
    if insert_original_path:
        head.headers.set("x-envoy-original-path", head.path)
    head.path = new
    return True


def auto_host_rewrite(action: RouteAction, head: RequestHead, upstream_hostname: str) -> None:
    """``auto_host_rewrite``: the authority becomes the picked endpoint's hostname (only
    strict/logical DNS endpoints have one)."""
    if action.auto_host_rewrite and upstream_hostname:
        _set_authority(head, upstream_hostname, action.append_x_forwarded_host)


def finalize_request(rc: RouteConfiguration, vh: VirtualHost, route: Route, head: RequestHead,
                     *, cluster: ClusterWeight | None = None,
                     fields: Mapping[str, str] | None = None,
                     insert_original_path: bool = True) -> None:
    """Envoy's ``finalizeRequestHeaders``: header mutations, then path and host rewrites."""
    apply_request_headers(rc, vh, route, head, cluster=cluster, fields=fields)
    rewrite(route, head, cluster=cluster, insert_original_path=insert_original_path)


def redirect_response(redirect: RedirectAction, head: RequestHead,
                      match: RouteMatch | None = None) -> tuple[int, str]:
    """``(status, Location)`` for a redirect route (``Http::Utility::newUri``). The scheme is
    ``scheme_redirect`` or the request's; the host is ``host_redirect`` or the request's,
    whose port is dropped when ``port_redirect`` is set or when the scheme changes away from
    the standard port of the request's ``x-forwarded-proto``; ``port_redirect`` equal to the
    scheme's standard port is omitted. A ``path_redirect`` with its own query replaces the
    request's query and ignores ``strip_query``; ``prefix_rewrite`` / ``regex_rewrite`` edit
    the path like a route rewrite (``match`` gives the matched prefix)."""
    scheme = redirect.scheme_redirect or head.scheme
    port = f":{redirect.port_redirect}" if redirect.port_redirect else ""
    port_text = "" if (scheme, port) in (("http", ":80"), ("https", ":443")) else port
    if redirect.host_redirect:
        host = redirect.host_redirect
    else:
        host = head.authority
        if host:
            if host[0] == "[":
                end = host.rfind("]:")
                cut = end + 1 if end >= 0 else -1
            else:
                cut = host.rfind(":")
            if cut >= 0:
                request_port = host[cut:]
                xfp = head.headers.get("x-forwarded-proto") or head.scheme
                remove = bool(port)
                if scheme != xfp:
                    remove |= xfp == "https" and request_port == ":443"
                    remove |= xfp == "http" and request_port == ":80"
                if remove:
                    host = host[:cut]
    path_has_query = False
    if redirect.path_redirect:
        q = head.path.find("?")
        path_has_query = "?" in redirect.path_redirect
        if path_has_query or q < 0:
            path = redirect.path_redirect
        else:
            path = redirect.path_redirect + head.path[q:]
    else:
        new = _rewritten_path(match or RouteMatch(kind="prefix", value=""),
                              redirect.prefix_rewrite, redirect.regex_rewrite, head.path)
        path = head.path if new is None else new
    if not path.startswith("/"):
        path = "/" + path
    if redirect.strip_query and not path_has_query:
        q = path.find("?")
        if q >= 0:
            path = path[:q]
    return redirect.response_code, f"{scheme}://{host}{port_text}{path}"


# ----------------------------------------------------------------------------- fault


def resolve_per_filter(name: str, rc: RouteConfiguration, vh: VirtualHost, route: Route,
                       cluster: ClusterWeight | None = None) -> PerFilterConfig | None:
    """The most specific ``typed_per_filter_config`` for filter ``name``: weighted cluster,
    route, virtual host, route configuration (``resolveMostSpecificPerFilterConfig``)."""
    for level in (cluster.per_filter if cluster is not None else None, route.per_filter,
                  vh.per_filter, rc.per_filter):
        if level:
            got = level.get(name)
            if got is not None:
                return got
    return None


def resolve_cors(name: str, rc: RouteConfiguration, vh: VirtualHost, route: Route,
                 cluster: ClusterWeight | None = None) -> list[CorsPolicy] | None:
    """The CORS policies that apply to a request, most specific first (Envoy's
    ``getAllPerFilterConfig``, reversed); None when the most specific entry for the filter
    disables it on this route."""
    out: list[CorsPolicy] = []
    for level in (cluster.per_filter if cluster is not None else None, route.per_filter,
                  vh.per_filter, rc.per_filter):
        got = level.get(name) if level else None
        if got is None:
            continue
        if isinstance(got, FilterDisabled) and not out:
            return None
        if isinstance(got, CorsPolicy):
            out.append(got)
    return out


def resolve_fault(filter_: HttpFilter, rc: RouteConfiguration, vh: VirtualHost, route: Route,
                  cluster: ClusterWeight | None = None) -> FaultConfig | None:
    """The fault settings for one request: a per-route ``HTTPFault`` (Istio puts a
    VirtualService's ``fault`` there) replaces the filter's own config entirely."""
    if filter_.disabled:
        return None
    got = resolve_per_filter(filter_.name, rc, vh, route, cluster)
    if isinstance(got, FilterDisabled):
        return None
    if isinstance(got, FaultConfig):
        return got
    return filter_.config if isinstance(filter_.config, FaultConfig) else None


def route_fault(route: Route, hcm: HcmConfig, vh: VirtualHost | None = None,
                rc: RouteConfiguration | None = None,
                cluster: ClusterWeight | None = None) -> FaultConfig | None:
    """:func:`resolve_fault` for the HCM's fault filter (the first with a
    :class:`FaultConfig`); None when the chain has none. Pass ``vh`` / ``rc`` / ``cluster``
    for Envoy's full most-specific lookup (vhost- and route-config-level overrides)."""
    for f in hcm.http_filters:
        if isinstance(f.config, FaultConfig):
            return resolve_fault(f, rc if rc is not None else _NO_RC,
                                 vh if vh is not None else _NO_VH, route, cluster)
    return None


def mirror_selected(policy: RequestMirrorPolicy, rng: RandomSource) -> bool:
    """Whether this request is shadowed (``runtime_fraction.default_value``)."""
    return policy.fraction.hit(rng.getrandbits(64))


def _header_int(head: RequestHead, name: str) -> int | None:
    v = head.headers.get(name)
    if v is None or not v.strip().isdigit():
        return None
    return int(v)


def _percent(base: FractionalPercent, head: RequestHead, header: str | None) -> FractionalPercent:
    """Header-controlled faults may lower (never raise) the configured percentage."""
    if header is None:
        return base
    n = _header_int(head, header)
    if n is None:
        return base
    return FractionalPercent(numerator=min(n, base.numerator), denominator=base.denominator)


def fault_decision(fault: FaultConfig | None, head: RequestHead, rng: RandomSource, *,
                   cluster: str = "", active_faults: int = 0,
                   ) -> tuple[float | None, int | None, int | None]:
    """``(delay_seconds, abort_http_status, abort_grpc_status)`` for one request, per
    ``FaultFilter::decodeHeaders``: nothing when over ``max_active_faults``, when
    ``upstream_cluster`` is not the route's cluster, when ``x-envoy-downstream-service-node``
    is not in ``downstream_nodes``, or when ``headers`` do not all match. Delay and abort are
    drawn independently (Envoy decides the abort after the delay elapses). A gRPC abort
    comes with HTTP status 200 (a trailers-only gRPC reply carrying ``grpc-status``); an HTTP
    abort answers ``fault filter abort`` with flag ``FI``, a delay sets ``DI``."""
    if fault is None or (fault.delay is None and fault.abort is None):
        return None, None, None
    if fault.max_active_faults is not None and active_faults >= fault.max_active_faults:
        return None, None, None
    if fault.upstream_cluster and fault.upstream_cluster != cluster:
        return None, None, None
    if fault.downstream_nodes and (
            head.headers.get(DOWNSTREAM_NODE_HEADER) not in fault.downstream_nodes):
        return None, None, None
    if fault.headers and not all(h.matches(head) for h in fault.headers):
        return None, None, None
    delay: float | None = None
    d = fault.delay
    if d is not None:
        pct = _percent(d.percentage, head, FAULT_DELAY_PERCENT_HEADER if d.header else None)
        if pct.hit(rng.getrandbits(64)):
            if d.header:
                ms = _header_int(head, FAULT_DELAY_HEADER)
                seconds = ms / 1000.0 if ms is not None else 0.0
            else:
                seconds = d.fixed_delay
            delay = seconds if seconds > 0 else None
    status: int | None = None
    grpc: int | None = None
    a = fault.abort
    if a is not None:
        pct = _percent(a.percentage, head, FAULT_ABORT_PERCENT_HEADER if a.header else None)
        if pct.hit(rng.getrandbits(64)):
            if a.header:
                code = _header_int(head, FAULT_ABORT_HEADER)
                if code is not None and 200 <= code < 600:
                    status = code
                else:
                    grpc = _header_int(head, FAULT_ABORT_GRPC_HEADER)
            elif a.http_status is not None:
                status = a.http_status
            else:
                grpc = a.grpc_status
            if grpc is not None:
                status = 200
    return delay, status, grpc


# ----------------------------------------------------------------------------- timeouts

_GRPC_UNITS: Final = {"H": 3600.0, "M": 60.0, "S": 1.0, "m": 1e-3, "u": 1e-6, "n": 1e-9}


def grpc_timeout(head: RequestHead) -> float | None:
    """The ``grpc-timeout`` header in seconds (``Grpc::Common::getGrpcTimeout``: at most 8
    digits and one unit of ``HMSmun``), None when absent or malformed."""
    v = head.headers.get("grpc-timeout")
    if not v or len(v) > 9 or v[-1] not in _GRPC_UNITS or not v[:-1].isdigit():
        return None
    return int(v[:-1]) * _GRPC_UNITS[v[-1]]


@dataclass(slots=True, init=False)
class Timeouts:
    """The router's per-request timeouts, seconds, 0 = none. ``expected`` is the value for
    ``x-envoy-expected-rq-timeout-ms`` (per-try if set, else global; 0 = do not add)."""

    global_: float
    per_try: float
    per_try_idle: float

    # Made per request: written out, since a generated __init__ (or a NamedTuple's __new__)
    # runs interpreted even when this module is compiled.
    def __init__(self, global_: float, per_try: float, per_try_idle: float) -> None:
        self.global_ = global_
        self.per_try = per_try
        self.per_try_idle = per_try_idle

    @property
    def expected(self) -> float:
        return self.per_try or self.global_


def _header_ms(head: RequestHead, name: str) -> float | None:
    v = head.headers.get(name)
    if v is None:
        return None
    head.headers.remove(name)
    v = v.strip()
    return int(v) / 1000.0 if v.isdigit() else None


def final_timeouts(action: RouteAction, retry: RetryPolicy | None, head: RequestHead, *,
                   respect_expected_rq_timeout: bool = False) -> Timeouts:
    """Envoy's ``FilterUtility::finalTimeout``. The route's ``timeout``; for gRPC requests on
    a route with the deprecated ``max_grpc_timeout``, the ``grpc-timeout`` header (minus
    ``grpc_timeout_offset`` when that leaves something) capped by it (0 = uncapped). Then
    ``x-envoy-upstream-rq-timeout-ms`` (or, with ``respect_expected_rq_timeout``,
    ``x-envoy-expected-rq-timeout-ms``) and ``x-envoy-upstream-rq-per-try-timeout-ms`` override
    and are removed from the request. A per-try timeout not below the global one is dropped."""
    global_ = action.timeout
    if (not action.uses_stream_duration and action.max_grpc_timeout is not None
            and is_grpc_request(head)):
        cap = action.max_grpc_timeout
        got = grpc_timeout(head) or 0.0
        if action.grpc_timeout_offset and action.grpc_timeout_offset < got:
            got -= action.grpc_timeout_offset
        if cap and (got == 0 or got > cap):
            got = cap
        global_ = got
    per_try = retry.per_try_timeout if retry is not None else 0.0
    per_try_idle = retry.per_try_idle_timeout if retry is not None else 0.0
    header = "x-envoy-expected-rq-timeout-ms" if respect_expected_rq_timeout \
        else "x-envoy-upstream-rq-timeout-ms"
    got_header = _header_ms(head, header)
    if got_header is not None:
        global_ = got_header
    got_header = _header_ms(head, "x-envoy-upstream-rq-per-try-timeout-ms")
    if got_header is not None:
        per_try = got_header
    if global_ and per_try >= global_:
        per_try = 0.0
    return Timeouts(global_, per_try, per_try_idle)


def stream_duration_limit(action: RouteAction, hcm_max_stream_duration: float,
                          head: RequestHead) -> float | None:
    """The stream's duration limit in seconds (None = none), per the connection manager's
    ``refreshDurationTimeout``: with ``grpc_timeout_header_max`` set and a ``grpc-timeout``
    header, that header capped by it (0 = uncapped) minus ``grpc_timeout_header_offset``;
    otherwise the route's ``max_stream_duration`` (0 disables), else the HCM's. Expiry
    before the response is a local 408 (gRPC: DEADLINE_EXCEEDED), flag ``DT``."""
    got = grpc_timeout(head)
    if got is None or action.grpc_timeout_header_max is None:
        limit = action.max_stream_duration
        if limit is None:
            limit = hcm_max_stream_duration
        return limit or None
    cap = action.grpc_timeout_header_max
    if cap and got > cap:
        got = cap
    if got and action.grpc_timeout_header_offset:
        off = action.grpc_timeout_header_offset
        got = got - off if off < got else 0.0
    return got or None


def stream_idle_timeout(action: RouteAction, hcm: HcmConfig) -> float | None:
    """The route's ``idle_timeout`` replaces the HCM's ``stream_idle_timeout``; 0 = none."""
    t = action.idle_timeout if action.idle_timeout is not None else hcm.stream_idle_timeout
    return t or None
