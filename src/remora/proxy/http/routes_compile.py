"""Envoy protos in, :mod:`remora.proxy.http.routes` types out: the HCM and its routes.

Owns: the allowlist of fields Remora implements for ``HttpConnectionManager``,
``RouteConfiguration`` and the HTTP filters it knows (:data:`HTTP_SUPPORTED`, checked by
:func:`check_http_supported`; anything else set is refused with :class:`BadInput` naming its
path), reading RDS from a file (``path_config_source``) the way Envoy does without a management
server, and compiling everything into frozen runtime types. Validation errors (bad regexes,
weights, missing cluster specifiers, duplicate domains) are one-line :class:`BadInput` naming
the field path.
Must not: open sockets or keep state. Protobuf types stop here.

Importing this module registers every typed config it accepts, so ``json_format`` can resolve
their ``Any`` type URLs when a bootstrap or an RDS file is parsed.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
from collections.abc import Iterable, Mapping
from typing import Any, Literal

import yaml
from envoy.config.route.v3 import route_pb2
from envoy.extensions.filters.http.cors.v3 import cors_pb2  # noqa: F401
from envoy.extensions.filters.http.fault.v3 import fault_pb2
from envoy.extensions.filters.http.grpc_stats.v3 import config_pb2 as grpc_stats_pb2  # noqa: F401
from envoy.extensions.filters.http.router.v3 import router_pb2  # noqa: F401
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from envoy.extensions.request_id.uuid.v3 import uuid_pb2  # noqa: F401
from envoy.extensions.retry.host.previous_hosts.v3 import previous_hosts_pb2  # noqa: F401
from envoy.service.discovery.v3 import discovery_pb2
from google.protobuf import json_format, symbol_database
from google.protobuf.message import Message
from udpa.type.v1 import typed_struct_pb2  # noqa: F401
from xds.type.v3 import typed_struct_pb2 as xds_typed_struct_pb2  # noqa: F401

from remora.errors import BadInput
from remora.proxy.http import routes as rt
from remora.proxy.http.accesslog import compile_access_logs
from remora.proxy.http.hashing import HashPolicy
from remora.proxy.http.telemetry import compile_plugin_config
from remora.proxy.http.tracing import compile_route_tracing, compile_tracing
from remora.proxy.protocheck import ANY_FIELDS, check_fields
from remora.proxy.protocheck import unpack as _unpack

_RA = "envoy.config.route.v3.RouteAction"
_HCM = "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
_MUTATION_FIELDS = frozenset({"request_headers_to_add", "request_headers_to_remove",
                              "response_headers_to_add", "response_headers_to_remove"})

# Fields Remora implements, per message type. Anything else set is refused.
HTTP_SUPPORTED: dict[str, str | frozenset[str]] = {
    _HCM: frozenset({
        "codec_type", "stat_prefix", "rds", "route_config", "http_filters", "add_user_agent",
        "tracing", "common_http_protocol_options", "http_protocol_options",
        "http2_protocol_options", "server_name", "server_header_transformation",
        "max_request_headers_kb", "stream_idle_timeout", "request_timeout",
        "request_headers_timeout", "drain_timeout", "delayed_close_timeout", "access_log",
        "use_remote_address", "xff_num_trusted_hops", "internal_address_config",
        "skip_xff_append", "via", "generate_request_id", "preserve_external_request_id",
        "always_set_request_id_in_response", "forward_client_cert_details",
        "set_current_client_cert_details", "proxy_100_continue", "upgrade_configs",
        "normalize_path", "merge_slashes", "path_with_escaped_slashes_action",
        "request_id_extension", "strip_matching_host_port", "strip_any_host_port",
        "stream_error_on_invalid_http_message", "strip_trailing_host_dot",
        "append_x_forwarded_port"}),
    f"{_HCM}.UpgradeConfig": frozenset({"upgrade_type", "enabled"}),
    f"{_HCM}.InternalAddressConfig": frozenset({"unix_sockets", "cidr_ranges"}),
    f"{_HCM}.SetCurrentClientCertDetails": frozenset({"subject", "cert", "chain", "dns",
                                                      "uri"}),
    # Tracing: checked and compiled by remora.proxy.http.tracing.compile_tracing.
    f"{_HCM}.Tracing": ANY_FIELDS,
    "envoy.extensions.filters.network.http_connection_manager.v3.Rds": frozenset({
        "config_source", "route_config_name"}),
    "envoy.extensions.filters.network.http_connection_manager.v3.HttpFilter": frozenset({
        "name", "typed_config", "is_optional", "disabled"}),
    "envoy.extensions.filters.network.http_connection_manager.v3.RequestIDExtension":
        frozenset({"typed_config"}),
    "envoy.extensions.request_id.uuid.v3.UuidRequestIdConfig": frozenset({
        "pack_trace_reason", "use_request_id_for_trace_sampling"}),
    "envoy.config.core.v3.ConfigSource": frozenset({
        "path", "path_config_source", "ads", "initial_fetch_timeout", "resource_api_version"}),
    "envoy.config.core.v3.PathConfigSource": frozenset({"path"}),
    "envoy.config.core.v3.AggregatedConfigSource": frozenset(),
    "envoy.config.core.v3.HttpProtocolOptions": frozenset({
        "idle_timeout", "max_connection_duration", "max_headers_count", "max_stream_duration",
        "headers_with_underscores_action", "max_requests_per_connection"}),
    "envoy.config.core.v3.Http1ProtocolOptions": frozenset({
        "accept_http_10", "default_host_for_http_10", "allow_chunked_length",
        "allow_absolute_url"}),
    "envoy.config.core.v3.Http2ProtocolOptions": frozenset({
        "hpack_table_size", "max_concurrent_streams", "initial_stream_window_size",
        "initial_connection_window_size", "allow_connect"}),
    "envoy.config.core.v3.CidrRange": frozenset({"address_prefix", "prefix_len"}),
    # Routes.
    "envoy.config.route.v3.RouteConfiguration": frozenset({
        "name", "virtual_hosts", "internal_only_headers", "most_specific_header_mutations_wins",
        "validate_clusters", "max_direct_response_body_size_bytes", "request_mirror_policies",
        "ignore_port_in_host_matching", "typed_per_filter_config", "metadata",
        *_MUTATION_FIELDS}),
    "envoy.config.route.v3.VirtualHost": frozenset({
        "name", "domains", "routes", "require_tls", "typed_per_filter_config",
        "include_request_attempt_count", "include_attempt_count_in_response", "retry_policy",
        "per_request_buffer_limit_bytes", "request_mirror_policies", "metadata",
        *_MUTATION_FIELDS}),
    "envoy.config.route.v3.Route": frozenset({
        "name", "match", "route", "redirect", "direct_response", "metadata", "decorator",
        "typed_per_filter_config", "tracing", "per_request_buffer_limit_bytes", "stat_prefix",
        *_MUTATION_FIELDS}),
    "envoy.config.route.v3.Tracing": frozenset({
        "client_sampling", "random_sampling", "overall_sampling", "custom_tags"}),
    "envoy.type.tracing.v3.CustomTag": frozenset({"tag", "literal"}),    # literal tags only
    "envoy.type.tracing.v3.CustomTag.Literal": frozenset({"value"}),
    "envoy.config.route.v3.RouteMatch": frozenset({
        "prefix", "path", "safe_regex", "path_separated_prefix", "case_sensitive", "headers",
        "query_parameters", "grpc"}),
    "envoy.config.route.v3.RouteMatch.GrpcRouteMatchOptions": frozenset(),
    "envoy.config.route.v3.HeaderMatcher": frozenset({
        "name", "exact_match", "safe_regex_match", "range_match", "present_match",
        "prefix_match", "suffix_match", "contains_match", "string_match", "invert_match",
        "treat_missing_header_as_empty"}),
    "envoy.config.route.v3.QueryParameterMatcher": frozenset({"name", "string_match",
                                                              "present_match"}),
    "envoy.type.matcher.v3.StringMatcher": frozenset({
        "exact", "prefix", "suffix", "safe_regex", "contains", "ignore_case"}),
    "envoy.type.matcher.v3.RegexMatcher": frozenset({"regex", "google_re2"}),
    "envoy.type.matcher.v3.RegexMatcher.GoogleRE2": ANY_FIELDS,
    "envoy.type.matcher.v3.RegexMatchAndSubstitute": frozenset({"pattern", "substitution"}),
    "envoy.type.v3.Int64Range": frozenset({"start", "end"}),
    _RA: frozenset({
        "cluster", "cluster_header", "weighted_clusters", "cluster_not_found_response_code",
        "prefix_rewrite", "regex_rewrite", "host_rewrite_literal", "auto_host_rewrite",
        "host_rewrite_header", "append_x_forwarded_host", "timeout", "idle_timeout",
        "retry_policy", "request_mirror_policies", "hash_policy", "max_grpc_timeout",
        "grpc_timeout_offset", "upgrade_configs", "max_stream_duration"}),
    f"{_RA}.HashPolicy": frozenset({"header", "cookie", "connection_properties",
                                    "query_parameter", "terminal"}),
    f"{_RA}.HashPolicy.Header": frozenset({"header_name"}),
    f"{_RA}.HashPolicy.Cookie": frozenset({"name", "ttl", "path", "attributes"}),
    f"{_RA}.HashPolicy.CookieAttribute": frozenset({"name", "value"}),
    f"{_RA}.HashPolicy.ConnectionProperties": frozenset({"source_ip"}),
    f"{_RA}.HashPolicy.QueryParameter": frozenset({"name"}),
    f"{_RA}.RequestMirrorPolicy": frozenset({"cluster", "cluster_header", "runtime_fraction",
                                             "trace_sampled"}),
    f"{_RA}.MaxStreamDuration": frozenset({"max_stream_duration", "grpc_timeout_header_max",
                                           "grpc_timeout_header_offset"}),
    f"{_RA}.UpgradeConfig": frozenset({"upgrade_type", "enabled"}),
    "envoy.config.core.v3.RuntimeFractionalPercent": frozenset({"default_value",
                                                                "runtime_key"}),
    "envoy.type.v3.FractionalPercent": frozenset({"numerator", "denominator"}),
    "envoy.config.route.v3.WeightedCluster": frozenset({"clusters", "total_weight"}),
    "envoy.config.route.v3.WeightedCluster.ClusterWeight": frozenset({
        "name", "weight", "typed_per_filter_config", "host_rewrite_literal",
        *_MUTATION_FIELDS}),
    "envoy.config.route.v3.RetryPolicy": frozenset({
        "retry_on", "num_retries", "per_try_timeout", "per_try_idle_timeout",
        "retry_host_predicate", "host_selection_retry_max_attempts", "retriable_status_codes",
        "retry_back_off", "retriable_headers", "retriable_request_headers"}),
    "envoy.config.route.v3.RetryPolicy.RetryBackOff": frozenset({"base_interval",
                                                                 "max_interval"}),
    "envoy.config.route.v3.RetryPolicy.RetryHostPredicate": frozenset({"name",
                                                                       "typed_config"}),
    "envoy.extensions.retry.host.previous_hosts.v3.PreviousHostsPredicate": frozenset(),
    "envoy.config.route.v3.RedirectAction": frozenset({
        "https_redirect", "scheme_redirect", "host_redirect", "port_redirect", "path_redirect",
        "prefix_rewrite", "regex_rewrite", "response_code", "strip_query"}),
    "envoy.config.route.v3.DirectResponseAction": frozenset({"status", "body"}),
    "envoy.config.core.v3.DataSource": frozenset({"filename", "inline_bytes",
                                                  "inline_string"}),
    "envoy.config.route.v3.Decorator": frozenset({"operation", "propagate"}),
    "envoy.config.route.v3.FilterConfig": frozenset({"config", "is_optional", "disabled"}),
    "envoy.config.core.v3.HeaderValueOption": frozenset({"header", "append", "append_action",
                                                         "keep_empty_value"}),
    "envoy.config.core.v3.HeaderValue": frozenset({"key", "value", "raw_value"}),
    "envoy.config.core.v3.Metadata": frozenset({"filter_metadata"}),
    # HTTP filters.
    "envoy.extensions.filters.http.router.v3.Router": frozenset({
        "dynamic_stats", "start_child_span", "suppress_envoy_headers", "strict_check_headers",
        "respect_expected_rq_timeout"}),
    "envoy.extensions.filters.http.fault.v3.HTTPFault": frozenset({
        "delay", "abort", "upstream_cluster", "headers", "downstream_nodes",
        "max_active_faults"}),
    "envoy.extensions.filters.http.fault.v3.FaultAbort": frozenset({
        "http_status", "grpc_status", "header_abort", "percentage"}),
    "envoy.extensions.filters.http.fault.v3.FaultAbort.HeaderAbort": frozenset(),
    "envoy.extensions.filters.common.fault.v3.FaultDelay": frozenset({
        "fixed_delay", "header_delay", "percentage"}),
    "envoy.extensions.filters.common.fault.v3.FaultDelay.HeaderDelay": frozenset(),
    # The CORS filter has no config of its own (its policies are per route / vhost).
    "envoy.extensions.filters.http.cors.v3.Cors": frozenset(),
    "envoy.extensions.filters.http.cors.v3.CorsPolicy": frozenset({
        "allow_origin_string_match", "allow_methods", "allow_headers", "expose_headers",
        "max_age", "allow_credentials", "filter_enabled", "shadow_enabled",
        "allow_private_network_access", "forward_not_matching_preflights"}),
    # (enable_upstream_stats is refused when true by compile_grpc_stats)
    "envoy.extensions.filters.http.grpc_stats.v3.FilterConfig": frozenset({
        "emit_filter_state", "stats_for_all_methods", "enable_upstream_stats",
        "replace_dots_in_grpc_service_name", "individual_method_stats_allowlist"}),
    "envoy.config.core.v3.GrpcMethodList": ANY_FIELDS,
    "udpa.type.v1.TypedStruct": ANY_FIELDS,
    "xds.type.v3.TypedStruct": ANY_FIELDS,
    "google.protobuf.Struct": ANY_FIELDS,
    "google.protobuf.Duration": ANY_FIELDS,
    "google.protobuf.UInt32Value": ANY_FIELDS,
    "google.protobuf.UInt64Value": ANY_FIELDS,
    "google.protobuf.BoolValue": ANY_FIELDS,
    "google.protobuf.Any": ANY_FIELDS,
}
# Checked by their own compiler (remora.proxy.http.accesslog).
_DELEGATED_FIELDS = {(_HCM, "access_log")}

# TypedStruct type URLs of Istio's own HTTP filters (no proto here: recorded as data).
ISTIO_FILTER_TYPES = frozenset({
    "stats.PluginConfig",                                              # istio.stats
    "io.istio.http.peer_metadata.Config",                              # istio.peer_metadata
    "istio.envoy.config.filter.http.alpn.v2alpha1.FilterConfig",       # istio.alpn
    "io.istio.http.metadata_exchange.Config",                          # istio.metadata_exchange
})
_ROUTER = "envoy.extensions.filters.http.router.v3.Router"
_FAULT = "envoy.extensions.filters.http.fault.v3.HTTPFault"
_GRPC_STATS = "envoy.extensions.filters.http.grpc_stats.v3.FilterConfig"
_NOOP_FILTERS = frozenset({"envoy.extensions.filters.http.cors.v3.Cors"})
_TYPED_STRUCTS = frozenset({"udpa.type.v1.TypedStruct", "xds.type.v3.TypedStruct"})
# Filters that may be named without a typed_config (Envoy then uses their empty config).
_BY_NAME = {
    "envoy.filters.http.router": _ROUTER,
    "envoy.filters.http.fault": _FAULT,
    "envoy.filters.http.cors": "envoy.extensions.filters.http.cors.v3.Cors",
    "envoy.filters.http.grpc_stats": "envoy.extensions.filters.http.grpc_stats.v3.FilterConfig",
}
_ROUTE_CONFIG_TYPE = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration"

# Envoy's retry conditions (router/retry_state_impl.cc, x-envoy-retry-on and -grpc-on).
RETRY_ON = frozenset({
    "5xx", "gateway-error", "reset", "reset-before-request", "connect-failure",
    "envoy-ratelimited", "retriable-4xx", "refused-stream", "retriable-status-codes",
    "retriable-headers", "http3-post-connect-failure", "cancelled", "deadline-exceeded",
    "internal", "resource-exhausted", "unavailable"})


# ----------------------------------------------------------------------------- checking


def check_http_supported(msg: Message, path: str) -> None:
    """Refuse any field outside :data:`HTTP_SUPPORTED`, naming its path. ``Any`` values are
    unpacked and checked; maps (``typed_per_filter_config``, metadata) are checked by their
    compilers; the HCM's ``access_log`` by :mod:`remora.proxy.http.accesslog`."""
    check_fields(msg, path, HTTP_SUPPORTED, skip_fields=_DELEGATED_FIELDS)


# ----------------------------------------------------------------------------- small parts


def _seconds(d: Message) -> float:
    return float(d.seconds) + float(d.nanos) / 1e9


def _dur(msg: Message, name: str, default: float) -> float:
    return _seconds(getattr(msg, name)) if msg.HasField(name) else default


def _opt_dur(msg: Message, name: str) -> float | None:
    return _seconds(getattr(msg, name)) if msg.HasField(name) else None


def _wrapped(msg: Message, name: str, default: Any) -> Any:
    return getattr(msg, name).value if msg.HasField(name) else default


def _regex(pattern: str, path: str, flags: int = 0) -> re.Pattern[str]:
    try:
        return re.compile(pattern, flags)
    except re.error as exc:
        raise BadInput(f"{path}: invalid regex {pattern!r}: {exc}") from None


_DENOMINATORS = (100, 10000, 1000000)


def fractional_percent(msg: Message) -> rt.FractionalPercent:
    return rt.FractionalPercent(numerator=msg.numerator,
                                denominator=_DENOMINATORS[msg.denominator])


def _string_matcher(msg: Message, path: str) -> rt.StringMatcher:
    kind = msg.WhichOneof("match_pattern")
    if kind is None:
        raise BadInput(f"{path}: a match pattern (exact, prefix, suffix, contains, safe_regex) "
                       "is required")
    if kind == "safe_regex":
        if msg.ignore_case:
            raise BadInput(f"{path}.ignore_case: has no effect with safe_regex (Envoy refuses)")
        return rt.StringMatcher(kind="safe_regex", value=msg.safe_regex.regex,
                                regex=_regex(msg.safe_regex.regex, f"{path}.safe_regex"))
    if kind == "custom":
        raise BadInput(f"unsupported field {path}.custom (Remora does not implement it)")
    value = getattr(msg, kind)
    if kind in ("prefix", "suffix", "contains") and not value:
        raise BadInput(f"{path}.{kind}: must not be empty")
    return rt.StringMatcher(kind=kind, value=value, ignore_case=msg.ignore_case)


def header_matcher(msg: Message, path: str) -> rt.HeaderMatcher:
    name = msg.name.lower()
    if not name:
        raise BadInput(f"{path}.name: is required")
    spec = msg.WhichOneof("header_match_specifier")
    common: dict[str, Any] = {"name": name, "invert": msg.invert_match,
                              "treat_missing_as_empty": msg.treat_missing_header_as_empty}
    if spec is None:
        return rt.HeaderMatcher(kind="present", present=True, **common)
    if spec == "present_match":
        return rt.HeaderMatcher(kind="present", present=msg.present_match, **common)
    if spec == "range_match":
        r = msg.range_match
        if r.start >= r.end:
            raise BadInput(f"{path}.range_match: start must be below end")
        return rt.HeaderMatcher(kind="range", range_start=r.start, range_end=r.end, **common)
    if spec == "string_match":
        sm = _string_matcher(msg.string_match, f"{path}.string_match")
    elif spec == "safe_regex_match":
        sm = rt.StringMatcher(kind="safe_regex", value=msg.safe_regex_match.regex,
                              regex=_regex(msg.safe_regex_match.regex,
                                           f"{path}.safe_regex_match"))
    else:   # the deprecated exact_match / prefix_match / suffix_match / contains_match
        kind = spec.removesuffix("_match")
        sm = rt.StringMatcher(kind=kind, value=getattr(msg, spec))
    return rt.HeaderMatcher(kind="string", string=sm, **common)


def _header_matchers(msgs: Iterable[Message], path: str) -> tuple[rt.HeaderMatcher, ...]:
    return tuple(header_matcher(m, f"{path}[{i}]") for i, m in enumerate(msgs))


def _metadata(msg: Message, field: str = "metadata") -> dict[str, Any]:
    if not msg.HasField(field):
        return {}
    d = json_format.MessageToDict(getattr(msg, field), preserving_proto_field_name=True)
    fm: dict[str, Any] = d.get("filter_metadata", {})
    return fm


_APPEND_ACTIONS: tuple[rt.AppendAction, ...] = (
    "APPEND_IF_EXISTS_OR_ADD", "ADD_IF_ABSENT", "OVERWRITE_IF_EXISTS_OR_ADD",
    "OVERWRITE_IF_EXISTS")


def _modifiable(key: str, path: str, request: bool) -> None:
    """Envoy refuses to add or remove pseudo-headers, and ``host`` on requests."""
    if not key:
        raise BadInput(f"{path}: header name must not be empty")
    if key.startswith(":") or (request and key == "host"):
        raise BadInput(f"{path}: ':'-prefixed or host headers may not be modified ({key!r})")


def _mutations(msg: Message, side: str, path: str) -> rt.HeaderMutations:
    """``{side}_headers_to_add`` / ``{side}_headers_to_remove`` of one level."""
    request = side == "request"
    adds = []
    for i, opt in enumerate(getattr(msg, f"{side}_headers_to_add")):
        where = f"{path}.{side}_headers_to_add[{i}]"
        key = opt.header.key.lower()
        _modifiable(key, f"{where}.header.key", request)
        if opt.HasField("append") and opt.append_action != 0:
            raise BadInput(f"{where}: append and append_action are both set")
        if opt.HasField("append"):
            action: rt.AppendAction = ("APPEND_IF_EXISTS_OR_ADD" if opt.append.value
                                       else "OVERWRITE_IF_EXISTS_OR_ADD")
        else:
            action = _APPEND_ACTIONS[opt.append_action]
        value = opt.header.value if not opt.header.raw_value \
            else opt.header.raw_value.decode("latin-1")
        adds.append(rt.HeaderValueOption(key=key, value=value, append_action=action,
                                         keep_empty_value=opt.keep_empty_value))
    removes = []
    for i, name in enumerate(getattr(msg, f"{side}_headers_to_remove")):
        key = name.lower()
        _modifiable(key, f"{path}.{side}_headers_to_remove[{i}]", request)
        removes.append(key)
    if not adds and not removes:
        return rt.NO_MUTATIONS
    return rt.HeaderMutations(add=tuple(adds), remove=tuple(removes))


def _retry_policy(msg: Message, path: str) -> rt.RetryPolicy:
    conditions = frozenset(c.strip() for c in msg.retry_on.split(",") if c.strip())
    unknown = sorted(conditions - RETRY_ON)
    if unknown:
        raise BadInput(f"{path}.retry_on: unknown retry condition {unknown[0]!r}")
    predicates = []
    for i, p in enumerate(msg.retry_host_predicate):
        where = f"{path}.retry_host_predicate[{i}]"
        if p.HasField("typed_config"):
            kind = _unpack(p.typed_config, f"{where}.typed_config").DESCRIPTOR.full_name
            if kind != "envoy.extensions.retry.host.previous_hosts.v3.PreviousHostsPredicate":
                raise BadInput(f"unsupported {where}: {kind}")
            predicates.append("envoy.retry_host_predicates.previous_hosts")
        elif p.name in ("envoy.retry_host_predicates.previous_hosts",
                        "envoy.retry_host_predicate.previous_hosts"):
            predicates.append("envoy.retry_host_predicates.previous_hosts")
        else:
            raise BadInput(f"unsupported {where}: {p.name or 'no typed_config'}")
    base = rt.DEFAULT_RETRY_BASE_INTERVAL
    cap: float | None = None
    if msg.HasField("retry_back_off"):
        bo = msg.retry_back_off
        if not bo.HasField("base_interval") or _seconds(bo.base_interval) <= 0:
            raise BadInput(f"{path}.retry_back_off.base_interval: must be greater than 0")
        base = _seconds(bo.base_interval)
        cap = _opt_dur(bo, "max_interval")
        if cap is not None and cap < base:
            raise BadInput(f"{path}.retry_back_off.max_interval: must be greater than or "
                           "equal to base_interval")
    return rt.RetryPolicy(
        retry_on=conditions,
        num_retries=_wrapped(msg, "num_retries", 1),
        per_try_timeout=_dur(msg, "per_try_timeout", 0.0),
        per_try_idle_timeout=_dur(msg, "per_try_idle_timeout", 0.0),
        retriable_status_codes=frozenset(msg.retriable_status_codes),
        retry_host_predicates=tuple(predicates),
        # Unset (0) means Envoy's default of one host selection attempt.
        host_selection_retry_max_attempts=msg.host_selection_retry_max_attempts or 1,
        back_off_base=base,
        back_off_max=cap if cap is not None else base * 10,
        retriable_headers=_header_matchers(msg.retriable_headers, f"{path}.retriable_headers"),
        retriable_request_headers=_header_matchers(msg.retriable_request_headers,
                                                   f"{path}.retriable_request_headers"),
    )


def _mirrors(msgs: Iterable[Message], path: str) -> tuple[rt.RequestMirrorPolicy, ...]:
    out = []
    for i, m in enumerate(msgs):
        where = f"{path}[{i}]"
        if bool(m.cluster) == bool(m.cluster_header):
            raise BadInput(f"{where}: exactly one of cluster and cluster_header is required")
        out.append(rt.RequestMirrorPolicy(
            cluster=m.cluster, cluster_header=m.cluster_header.lower(),
            fraction=fractional_percent(m.runtime_fraction.default_value)
            if m.HasField("runtime_fraction") else rt.ALWAYS,
            trace_sampled=_wrapped(m, "trace_sampled", None)))
    return tuple(out)


def _hash_policy(m: Message, path: str) -> HashPolicy:
    kind = m.WhichOneof("policy_specifier")
    if kind == "header":
        if not m.header.header_name:
            raise BadInput(f"{path}.header.header_name is required")
        return HashPolicy("header", m.header.header_name.lower(), m.terminal)
    if kind == "cookie":
        c = m.cookie
        if not c.name:
            raise BadInput(f"{path}.cookie.name is required")
        return HashPolicy("cookie", c.name, m.terminal,
                          ttl=_seconds(c.ttl) if c.HasField("ttl") else None, path=c.path,
                          attributes=tuple((a.name, a.value) for a in c.attributes))
    if kind == "connection_properties":
        return HashPolicy("source_ip" if m.connection_properties.source_ip else "none",
                          terminal=m.terminal)
    if kind == "query_parameter":
        if not m.query_parameter.name:
            raise BadInput(f"{path}.query_parameter.name is required")
        return HashPolicy("query_parameter", m.query_parameter.name, m.terminal)
    raise BadInput(f"unsupported {path}: only header, cookie, connection_properties and "
                   "query_parameter hash policies are implemented")


# ----------------------------------------------------------------------------- fault


def compile_fault(msg: fault_pb2.HTTPFault, path: str) -> rt.FaultConfig:
    """``HTTPFault`` (filter level or per route) → :class:`~.routes.FaultConfig`."""
    check_http_supported(msg, path)
    delay = None
    if msg.HasField("delay"):
        d = msg.delay
        kind = d.WhichOneof("fault_delay_secifier")
        if kind is None:
            raise BadInput(f"{path}.delay: fixed_delay or header_delay is required")
        delay = rt.FaultDelay(fixed_delay=_seconds(d.fixed_delay) if kind == "fixed_delay"
                              else 0.0,
                              header=kind == "header_delay",
                              percentage=fractional_percent(d.percentage))
    abort = None
    if msg.HasField("abort"):
        a = msg.abort
        kind = a.WhichOneof("error_type")
        if kind is None:
            raise BadInput(f"{path}.abort: http_status, grpc_status or header_abort is required")
        if kind == "http_status" and not 200 <= a.http_status < 600:
            raise BadInput(f"{path}.abort.http_status: must be in [200, 600)")
        abort = rt.FaultAbort(http_status=a.http_status if kind == "http_status" else None,
                              grpc_status=a.grpc_status if kind == "grpc_status" else None,
                              header=kind == "header_abort",
                              percentage=fractional_percent(a.percentage))
    return rt.FaultConfig(
        delay=delay, abort=abort, upstream_cluster=msg.upstream_cluster,
        headers=_header_matchers(msg.headers, f"{path}.headers"),
        downstream_nodes=frozenset(msg.downstream_nodes),
        max_active_faults=_wrapped(msg, "max_active_faults", None))


def _per_filter(msg: Message, path: str) -> dict[str, rt.PerFilterConfig]:
    """``typed_per_filter_config``: a fault override (``HTTPFault``), a ``FilterConfig``
    wrapper (``disabled`` or a wrapped config), or a CORS policy."""
    out: dict[str, rt.PerFilterConfig] = {}
    for name in sorted(msg.typed_per_filter_config):
        where = f"{path}.typed_per_filter_config[{name!r}]"
        inner = _unpack(msg.typed_per_filter_config[name], where)
        if inner.DESCRIPTOR.full_name == "envoy.config.route.v3.FilterConfig":
            check_http_supported(inner, where)
            if inner.disabled:
                out[name] = rt.FilterDisabled()
                continue
            if not inner.HasField("config"):
                raise BadInput(f"{where}.config: is required unless disabled")
            inner = _unpack(inner.config, f"{where}.config")
        kind = inner.DESCRIPTOR.full_name
        if kind == _FAULT:
            out[name] = compile_fault(inner, where)
        elif kind == "envoy.extensions.filters.http.cors.v3.CorsPolicy":
            out[name] = compile_cors(inner, where)
        else:
            raise BadInput(f"unsupported {where}: {kind} is not implemented")
    return out


# ----------------------------------------------------------------------------- routes


def compile_cors(msg: Message, path: str) -> rt.CorsPolicy:
    check_http_supported(msg, path)
    return rt.CorsPolicy(
        allow_origins=tuple(_string_matcher(m, f"{path}.allow_origin_string_match[{i}]")
                            for i, m in enumerate(msg.allow_origin_string_match)),
        allow_methods=msg.allow_methods, allow_headers=msg.allow_headers,
        expose_headers=msg.expose_headers, max_age=msg.max_age,
        allow_credentials=_wrapped(msg, "allow_credentials", None),
        allow_private_network_access=_wrapped(msg, "allow_private_network_access", None),
        forward_not_matching_preflights=_wrapped(msg, "forward_not_matching_preflights",
                                                 None),
        filter_enabled=fractional_percent(msg.filter_enabled.default_value)
        if msg.HasField("filter_enabled") else rt.ALWAYS,
        shadow_enabled=fractional_percent(msg.shadow_enabled.default_value)
        if msg.HasField("shadow_enabled") else None)


def _route_match(msg: Message, path: str) -> rt.RouteMatch:
    kind = msg.WhichOneof("path_specifier")
    if kind is None:
        raise BadInput(f"{path}: one of prefix, path, safe_regex, path_separated_prefix is "
                       "required")
    case_sensitive = _wrapped(msg, "case_sensitive", True)
    regex = None
    if kind == "safe_regex":
        value = msg.safe_regex.regex
        regex = _regex(value, f"{path}.safe_regex.regex")
    else:
        value = getattr(msg, kind)
        if kind == "path_separated_prefix" and (
                not value or value.endswith("/") or "?" in value or "#" in value):
            raise BadInput(f"{path}.path_separated_prefix: must not be empty, end with '/' or "
                           "contain '?' or '#'")
    return rt.RouteMatch(
        kind=kind, value=value, regex=regex, case_sensitive=case_sensitive,
        headers=_header_matchers(msg.headers, f"{path}.headers"),
        query_parameters=tuple(_query_matcher(q, f"{path}.query_parameters[{i}]")
                               for i, q in enumerate(msg.query_parameters)),
        grpc=msg.HasField("grpc"))


def _query_matcher(msg: Message, path: str) -> rt.QueryParameterMatcher:
    if not msg.name:
        raise BadInput(f"{path}.name: is required")
    if msg.HasField("string_match"):
        return rt.QueryParameterMatcher(
            name=msg.name, string=_string_matcher(msg.string_match, f"{path}.string_match"))
    if msg.HasField("present_match") and not msg.present_match:
        raise BadInput(f"{path}.present_match: false is not meaningful (Envoy needs true)")
    return rt.QueryParameterMatcher(name=msg.name)


def _regex_rewrite(msg: Message, path: str) -> rt.RegexRewrite:
    return rt.RegexRewrite(regex=_regex(msg.pattern.regex, f"{path}.pattern.regex"),
                           substitution=msg.substitution)


_NOT_FOUND_CODES = (503, 404, 500)


def _route_action(msg: Message, path: str, *, route_match: rt.RouteMatch) -> rt.RouteAction:
    spec = msg.WhichOneof("cluster_specifier")
    if spec is None:
        raise BadInput(f"{path}: one of cluster, cluster_header, weighted_clusters is required")
    weighted: tuple[rt.ClusterWeight, ...] = ()
    total = 0
    if spec == "cluster" and not msg.cluster:
        raise BadInput(f"{path}.cluster: must not be empty")
    if spec == "weighted_clusters":
        wc = msg.weighted_clusters
        items = []
        for i, c in enumerate(wc.clusters):
            where = f"{path}.weighted_clusters.clusters[{i}]"
            if not c.name:
                raise BadInput(f"{where}.name: is required")
            items.append(rt.ClusterWeight(
                name=c.name, weight=_wrapped(c, "weight", 0),
                request_headers=_mutations(c, "request", where),
                response_headers=_mutations(c, "response", where),
                host_rewrite_literal=c.host_rewrite_literal,
                per_filter=_per_filter(c, where)))
        weighted = tuple(items)
        total = sum(w.weight for w in weighted)
        if not weighted:
            raise BadInput(f"{path}.weighted_clusters.clusters: at least one is required")
        if total <= 0:
            raise BadInput(f"{path}.weighted_clusters: the sum of weights must be greater "
                           "than 0")
        if wc.HasField("total_weight") and wc.total_weight.value != total:
            raise BadInput(f"{path}.weighted_clusters.total_weight: the weights add up to "
                           f"{total}, not {wc.total_weight.value}")
    if msg.prefix_rewrite and msg.HasField("regex_rewrite"):
        raise BadInput(f"{path}: prefix_rewrite and regex_rewrite cannot both be set")
    if msg.prefix_rewrite and route_match.kind == "path_separated_prefix" and \
            msg.prefix_rewrite.endswith("/"):
        raise BadInput(f"{path}.prefix_rewrite: must not end with '/' on a "
                       "path_separated_prefix route")
    msd = msg.max_stream_duration
    return rt.RouteAction(
        cluster=msg.cluster, cluster_header=msg.cluster_header.lower(),
        weighted_clusters=weighted, total_weight=total,
        cluster_not_found_response_code=_NOT_FOUND_CODES[msg.cluster_not_found_response_code],
        prefix_rewrite=msg.prefix_rewrite,
        regex_rewrite=_regex_rewrite(msg.regex_rewrite, f"{path}.regex_rewrite")
        if msg.HasField("regex_rewrite") else None,
        host_rewrite_literal=msg.host_rewrite_literal,
        auto_host_rewrite=_wrapped(msg, "auto_host_rewrite", False),
        host_rewrite_header=msg.host_rewrite_header.lower(),
        append_x_forwarded_host=msg.append_x_forwarded_host,
        timeout=_dur(msg, "timeout", rt.DEFAULT_ROUTE_TIMEOUT),
        idle_timeout=_opt_dur(msg, "idle_timeout"),
        retry_policy=_retry_policy(msg.retry_policy, f"{path}.retry_policy")
        if msg.HasField("retry_policy") else None,
        request_mirror_policies=_mirrors(msg.request_mirror_policies,
                                         f"{path}.request_mirror_policies"),
        max_stream_duration=_opt_dur(msd, "max_stream_duration"),
        grpc_timeout_header_max=_opt_dur(msd, "grpc_timeout_header_max"),
        grpc_timeout_header_offset=_dur(msd, "grpc_timeout_header_offset", 0.0),
        max_grpc_timeout=_opt_dur(msg, "max_grpc_timeout"),
        grpc_timeout_offset=_dur(msg, "grpc_timeout_offset", 0.0),
        upgrade_configs=tuple(
            rt.UpgradeConfig(upgrade_type=u.upgrade_type.lower(),
                             enabled=_wrapped(u, "enabled", True))
            for u in msg.upgrade_configs),
        hash_policy=tuple(_hash_policy(h, f"{path}.hash_policy[{i}]")
                          for i, h in enumerate(msg.hash_policy)),
    )


_REDIRECT_CODES: tuple[rt.RedirectCode, ...] = (301, 302, 303, 307, 308)


def _redirect(msg: Message, path: str) -> rt.RedirectAction:
    scheme = "https" if msg.https_redirect else msg.scheme_redirect.lower()
    if msg.port_redirect > 65535:
        raise BadInput(f"{path}.port_redirect: must be at most 65535")
    return rt.RedirectAction(
        scheme_redirect=scheme, host_redirect=msg.host_redirect, port_redirect=msg.port_redirect,
        path_redirect=msg.path_redirect, prefix_rewrite=msg.prefix_rewrite,
        regex_rewrite=_regex_rewrite(msg.regex_rewrite, f"{path}.regex_rewrite")
        if msg.HasField("regex_rewrite") else None,
        response_code=_REDIRECT_CODES[msg.response_code], strip_query=msg.strip_query)


def _direct(msg: Message, path: str, max_body: int, base_dir: str) -> rt.DirectResponseAction:
    if not 200 <= msg.status < 600:
        raise BadInput(f"{path}.status: must be in [200, 600)")
    body = b""
    if msg.HasField("body"):
        src = msg.body
        kind = src.WhichOneof("specifier")
        if kind == "inline_string":
            body = src.inline_string.encode()
        elif kind == "inline_bytes":
            body = src.inline_bytes
        elif kind == "filename":
            name = os.path.join(base_dir, src.filename)
            try:
                with open(name, "rb") as fh:
                    body = fh.read()
            except OSError as exc:
                raise BadInput(f"{path}.body.filename: cannot read {name}: "
                               f"{exc.strerror}") from None
    if len(body) > max_body:
        raise BadInput(f"{path}.body: {len(body)} bytes exceed "
                       f"max_direct_response_body_size_bytes ({max_body})")
    return rt.DirectResponseAction(status=msg.status, body=body)


def _route(msg: Message, path: str, max_body: int, base_dir: str) -> rt.Route:
    if not msg.HasField("match"):
        raise BadInput(f"{path}.match: is required")
    match = _route_match(msg.match, f"{path}.match")
    kind = msg.WhichOneof("action")
    action: rt.Action
    if kind == "route":
        action = _route_action(msg.route, f"{path}.route", route_match=match)
    elif kind == "redirect":
        action = _redirect(msg.redirect, f"{path}.redirect")
    elif kind == "direct_response":
        action = _direct(msg.direct_response, f"{path}.direct_response", max_body, base_dir)
    else:
        raise BadInput(f"{path}: one of route, redirect, direct_response is required")
    return rt.Route(
        name=msg.name, match=match, action=action,
        request_headers=_mutations(msg, "request", path),
        response_headers=_mutations(msg, "response", path),
        decorator=rt.Decorator(operation=msg.decorator.operation,
                               propagate=_wrapped(msg.decorator, "propagate", True))
        if msg.HasField("decorator") else None,
        metadata=_metadata(msg), per_filter=_per_filter(msg, path),
        stat_prefix=msg.stat_prefix,
        per_request_buffer_limit_bytes=_wrapped(msg, "per_request_buffer_limit_bytes", None),
        tracing=compile_route_tracing(msg.tracing, f"{path}.tracing")
        if msg.HasField("tracing") else None)


def _virtual_host(msg: Message, path: str, max_body: int, base_dir: str) -> rt.VirtualHost:
    if not msg.name:
        raise BadInput(f"{path}.name: is required")
    if not msg.domains:
        raise BadInput(f"{path}.domains: at least one domain is required")
    if msg.require_tls != 0:
        raise BadInput(f"unsupported field {path}.require_tls (only NONE is implemented)")
    for i, d in enumerate(msg.domains):
        if not d or any(ord(c) < 0x20 or c == "\x7f" for c in d):
            raise BadInput(f"{path}.domains[{i}]: must be non-empty without control "
                           "characters")
    return rt.VirtualHost(
        name=msg.name, domains=tuple(msg.domains),
        routes=tuple(_route(r, f"{path}.routes[{i}]", max_body, base_dir)
                     for i, r in enumerate(msg.routes)),
        request_headers=_mutations(msg, "request", path),
        response_headers=_mutations(msg, "response", path),
        retry_policy=_retry_policy(msg.retry_policy, f"{path}.retry_policy")
        if msg.HasField("retry_policy") else None,
        include_request_attempt_count=msg.include_request_attempt_count,
        include_attempt_count_in_response=msg.include_attempt_count_in_response,
        request_mirror_policies=_mirrors(msg.request_mirror_policies,
                                         f"{path}.request_mirror_policies"),
        per_filter=_per_filter(msg, path), metadata=_metadata(msg),
        per_request_buffer_limit_bytes=_wrapped(msg, "per_request_buffer_limit_bytes", None))


def compile_route_configuration(msg: route_pb2.RouteConfiguration, path: str, *,
                                dynamic: bool = False,
                                base_dir: str = ".") -> rt.RouteConfiguration:
    """``RouteConfiguration`` → :class:`~.routes.RouteConfiguration`. ``dynamic``: it came
    from RDS (then ``validate_clusters`` defaults to false instead of true)."""
    check_http_supported(msg, path)
    max_body = _wrapped(msg, "max_direct_response_body_size_bytes",
                        rt.DEFAULT_MAX_DIRECT_RESPONSE_BODY)
    vhosts = tuple(_virtual_host(v, f"{path}.virtual_hosts[{i}]", max_body, base_dir)
                   for i, v in enumerate(msg.virtual_hosts))
    internal_only = []
    for i, h in enumerate(msg.internal_only_headers):
        _modifiable(h.lower(), f"{path}.internal_only_headers[{i}]", True)
        internal_only.append(h.lower())
    try:
        return rt.RouteConfiguration(
            name=msg.name, virtual_hosts=vhosts,
            request_headers=_mutations(msg, "request", path),
            response_headers=_mutations(msg, "response", path),
            most_specific_header_mutations_wins=msg.most_specific_header_mutations_wins,
            internal_only_headers=tuple(internal_only),
            validate_clusters=_wrapped(msg, "validate_clusters", not dynamic),
            max_direct_response_body_size_bytes=max_body,
            ignore_port_in_host_matching=msg.ignore_port_in_host_matching,
            request_mirror_policies=_mirrors(msg.request_mirror_policies,
                                             f"{path}.request_mirror_policies"),
            per_filter=_per_filter(msg, path), metadata=_metadata(msg),
            config_json=json_format.MessageToDict(msg, preserving_proto_field_name=True))
    except ValueError as exc:
        raise BadInput(f"{path}.virtual_hosts: {exc}") from None


# ----------------------------------------------------------------------------- RDS from a file


def _read_structured(name: str, where: str) -> Any:
    try:
        with open(name, encoding="utf-8") as fh:
            text = fh.read()
    except OSError as exc:
        raise BadInput(f"{where}: cannot read {name}: {exc.strerror}") from None
    try:
        return json.loads(text) if name.endswith(".json") else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        first = str(exc).strip().splitlines()[0]
        raise BadInput(f"{where}: {name} is not valid JSON/YAML: {first}") from None


def load_rds_file(name: str, route_config_name: str, where: str) -> route_pb2.RouteConfiguration:
    """Envoy's filesystem RDS: ``name`` holds a ``DiscoveryResponse`` whose ``resources`` are
    ``RouteConfiguration``\\ s; return the one called ``route_config_name``."""
    data = _read_structured(name, where)
    if not isinstance(data, dict):
        raise BadInput(f"{where}: {name} must hold a DiscoveryResponse mapping")
    resp = discovery_pb2.DiscoveryResponse()
    try:
        json_format.ParseDict(data, resp)
    except json_format.ParseError as exc:
        first = str(exc).strip().splitlines()[0]
        raise BadInput(f"{where}: {name}: {first}") from None
    for i, res in enumerate(resp.resources):
        if res.type_url != _ROUTE_CONFIG_TYPE:
            raise BadInput(f"{where}: {name} resources[{i}] is {res.type_url}, not a "
                           "RouteConfiguration")
        rc = route_pb2.RouteConfiguration()
        res.Unpack(rc)
        if rc.name == route_config_name:
            return rc
    raise BadInput(f"{where}: {name} has no RouteConfiguration named {route_config_name!r}")


# ----------------------------------------------------------------------------- filters


def _http_filter(msg: Message, path: str) -> rt.HttpFilter:
    if not msg.name:
        raise BadInput(f"{path}.name: is required")
    if msg.HasField("typed_config"):
        cfg = _unpack(msg.typed_config, f"{path}.typed_config")
    elif msg.name in _BY_NAME:
        cfg = symbol_database.Default().GetSymbol(_BY_NAME[msg.name])()
    else:
        raise BadInput(f"{path}.typed_config: is required for filter {msg.name!r}")
    kind = cfg.DESCRIPTOR.full_name
    where = f"{path}.typed_config"
    config: rt.HttpFilterConfig
    if kind == _ROUTER:
        check_http_supported(cfg, where)
        config = rt.RouterConfig(
            suppress_envoy_headers=cfg.suppress_envoy_headers,
            respect_expected_rq_timeout=cfg.respect_expected_rq_timeout,
            start_child_span=cfg.start_child_span,
            dynamic_stats=_wrapped(cfg, "dynamic_stats", True),
            strict_check_headers=tuple(h.lower() for h in cfg.strict_check_headers))
    elif kind == _FAULT:
        config = compile_fault(cfg, where)
    elif kind == _GRPC_STATS:
        config = compile_grpc_stats(cfg, where)
    elif kind in _NOOP_FILTERS:
        check_http_supported(cfg, where)
        config = rt.OpaqueFilterConfig(
            type_url=kind, value=json_format.MessageToDict(cfg,
                                                           preserving_proto_field_name=True))
    elif kind in _TYPED_STRUCTS:
        inner = cfg.type_url.split("/")[-1]
        if inner not in ISTIO_FILTER_TYPES:
            raise BadInput(f"unsupported {where}: TypedStruct for {inner or '(no type_url)'} "
                           "is not implemented")
        value = json_format.MessageToDict(cfg.value)
        if inner == "stats.PluginConfig":
            try:
                compile_plugin_config(value)
            except ValueError as exc:
                raise BadInput(f"{where}.value.{exc}") from None
        config = rt.OpaqueFilterConfig(type_url=inner, value=value)
    else:
        raise BadInput(f"unsupported {where}: {kind} is not implemented")
    return rt.HttpFilter(name=msg.name, config=config, disabled=msg.disabled,
                         is_optional=msg.is_optional)


def compile_grpc_stats(cfg: Message, where: str) -> rt.GrpcStatsConfig:
    """The gRPC statistics filter. ``enable_upstream_stats`` (an ``upstream_rq_time``
    histogram per method) is not implemented and refused when true."""
    check_http_supported(cfg, where)
    if cfg.enable_upstream_stats:
        raise BadInput(f"unsupported {where}.enable_upstream_stats: true is not implemented")
    allowlist: frozenset[tuple[str, str]] | None = None
    if cfg.HasField("individual_method_stats_allowlist"):
        services = cfg.individual_method_stats_allowlist.services
        allowlist = frozenset((svc.name, m) for svc in services for m in svc.method_names)
    return rt.GrpcStatsConfig(
        emit_filter_state=cfg.emit_filter_state,
        stats_for_all_methods=_wrapped(cfg, "stats_for_all_methods", False),
        allowlist=allowlist,
        replace_dots_in_grpc_service_name=cfg.replace_dots_in_grpc_service_name)


def _http_filters(msgs: Iterable[Message], path: str) -> tuple[rt.HttpFilter, ...]:
    filters = tuple(_http_filter(f, f"{path}[{i}]") for i, f in enumerate(msgs))
    if not filters:
        # Envoy adds the router when http_filters is empty.
        return (rt.HttpFilter(name="envoy.filters.http.router", config=rt.RouterConfig()),)
    for i, f in enumerate(filters[:-1]):
        if isinstance(f.config, rt.RouterConfig):
            raise BadInput(f"{path}[{i}]: the router is a terminal filter and must be last")
    if not isinstance(filters[-1].config, rt.RouterConfig):
        raise BadInput(f"{path}[{len(filters) - 1}]: the last HTTP filter must be the router "
                       f"(got {filters[-1].name!r})")
    return filters


# ----------------------------------------------------------------------------- HCM

_CODECS: dict[int, rt.CodecType] = {0: "AUTO", 1: "HTTP1", 2: "HTTP2"}
_SERVER_HEADER: tuple[rt.ServerHeaderTransformation, ...] = (
    "OVERWRITE", "APPEND_IF_ABSENT", "PASS_THROUGH")
_FCC: tuple[rt.ForwardClientCertDetails, ...] = (
    "SANITIZE", "FORWARD_ONLY", "APPEND_FORWARD", "SANITIZE_SET", "ALWAYS_FORWARD_ONLY")
_ESCAPED: tuple[rt.PathWithEscapedSlashesAction, ...] = (
    "KEEP_UNCHANGED",     # IMPLEMENTATION_SPECIFIC_DEFAULT is KEEP_UNCHANGED in Envoy
    "KEEP_UNCHANGED", "REJECT_REQUEST", "UNESCAPE_AND_REDIRECT", "UNESCAPE_AND_FORWARD")
_UNDERSCORES: tuple[rt.HeadersWithUnderscoresAction, ...] = (
    "ALLOW", "REJECT_REQUEST", "DROP_HEADER")


def _cidrs(msgs: Iterable[Message], path: str) -> tuple[Any, ...]:
    out = []
    for i, r in enumerate(msgs):
        plen = r.prefix_len.value if r.HasField("prefix_len") else (
            128 if ":" in r.address_prefix else 32)
        try:
            out.append(ipaddress.ip_network(f"{r.address_prefix}/{plen}", strict=False))
        except ValueError:
            raise BadInput(f"{path}[{i}]: bad CIDR {r.address_prefix}/{plen}") from None
    return tuple(out)


RdsSource = Literal["", "path", "ads"]


def _rds(msg: Message, path: str, base_dir: str
         ) -> tuple[rt.RouteConfiguration | None, str, RdsSource, str]:
    """(route config or None, name, source kind, file path) for ``rds``."""
    name = msg.route_config_name
    if not name:
        raise BadInput(f"{path}.route_config_name: is required")
    cs = msg.config_source
    kind = cs.WhichOneof("config_source_specifier")
    if kind == "ads":
        return None, name, "ads", ""
    if kind == "path_config_source":
        file = cs.path_config_source.path
        where = f"{path}.config_source.path_config_source.path"
    elif kind == "path":
        file = cs.path
        where = f"{path}.config_source.path"
    else:
        raise BadInput(f"unsupported {path}.config_source: only ads and path_config_source "
                       "are implemented")
    if not file:
        raise BadInput(f"{where}: is required")
    full = os.path.join(base_dir, file)
    rc_msg = load_rds_file(full, name, where)
    rc = compile_route_configuration(rc_msg, f"{full}[{name}]", dynamic=True,
                                     base_dir=os.path.dirname(full) or ".")
    return rc, name, "path", full


def compile_hcm(msg: hcm_pb2.HttpConnectionManager, path: str, *,
                base_dir: str = ".") -> rt.HcmConfig:
    """``HttpConnectionManager`` → :class:`~.routes.HcmConfig`. ``base_dir`` resolves
    relative RDS and direct-response file names."""
    check_http_supported(msg, path)
    if not msg.stat_prefix:
        raise BadInput(f"{path}.stat_prefix: is required")
    codec = _CODECS.get(msg.codec_type)
    if codec is None:
        raise BadInput(f"unsupported {path}.codec_type: "
                       f"{hcm_pb2.HttpConnectionManager.CodecType.Name(msg.codec_type)}")
    spec = msg.WhichOneof("route_specifier")
    route_config = None
    rds_name = rds_path = ""
    rds_source: RdsSource = ""
    if spec == "route_config":
        route_config = compile_route_configuration(msg.route_config, f"{path}.route_config",
                                                   base_dir=base_dir)
    elif spec == "rds":
        route_config, rds_name, rds_source, rds_path = _rds(msg.rds, f"{path}.rds", base_dir)
    else:
        raise BadInput(f"{path}: route_config or rds is required")
    if msg.max_request_headers_kb.value > 8192:
        raise BadInput(f"{path}.max_request_headers_kb: must be at most 8192")
    common = msg.common_http_protocol_options
    h1 = msg.http_protocol_options
    h2 = msg.http2_protocol_options
    iac = msg.internal_address_config
    access_logs: tuple[Any, ...] = ()
    if msg.access_log:
        access_logs = tuple(compile_access_logs(msg.access_log, f"{path}.access_log"))
    return rt.HcmConfig(
        stat_prefix=msg.stat_prefix, codec_type=codec, route_config=route_config,
        rds_route_config_name=rds_name, rds_source=rds_source,
        rds_path=rds_path,
        http_filters=_http_filters(msg.http_filters, f"{path}.http_filters"),
        server_name=msg.server_name or "envoy",
        server_header_transformation=_SERVER_HEADER[msg.server_header_transformation],
        generate_request_id=_wrapped(msg, "generate_request_id", True),
        preserve_external_request_id=msg.preserve_external_request_id,
        always_set_request_id_in_response=msg.always_set_request_id_in_response,
        request_id_extension=msg.request_id_extension.typed_config.type_url
        if msg.HasField("request_id_extension") else "",
        use_remote_address=_wrapped(msg, "use_remote_address", False),
        xff_num_trusted_hops=msg.xff_num_trusted_hops,
        skip_xff_append=msg.skip_xff_append, via=msg.via,
        add_user_agent=_wrapped(msg, "add_user_agent", False),
        append_x_forwarded_port=msg.append_x_forwarded_port,
        internal_address_cidrs=_cidrs(iac.cidr_ranges,
                                      f"{path}.internal_address_config.cidr_ranges")
        if msg.HasField("internal_address_config") else None,
        internal_unix_sockets=iac.unix_sockets,
        stream_idle_timeout=_dur(msg, "stream_idle_timeout", rt.DEFAULT_STREAM_IDLE_TIMEOUT),
        request_timeout=_dur(msg, "request_timeout", 0.0),
        request_headers_timeout=_dur(msg, "request_headers_timeout", 0.0),
        drain_timeout=_dur(msg, "drain_timeout", rt.DEFAULT_DRAIN_TIMEOUT),
        delayed_close_timeout=_dur(msg, "delayed_close_timeout",
                                   rt.DEFAULT_DELAYED_CLOSE_TIMEOUT),
        idle_timeout=_dur(common, "idle_timeout", rt.DEFAULT_HTTP_IDLE_TIMEOUT),
        max_connection_duration=_dur(common, "max_connection_duration", 0.0),
        max_stream_duration=_dur(common, "max_stream_duration", 0.0),
        max_headers_count=_wrapped(common, "max_headers_count", rt.DEFAULT_MAX_HEADERS_COUNT),
        max_requests_per_connection=_wrapped(common, "max_requests_per_connection", 0),
        headers_with_underscores_action=_UNDERSCORES[common.headers_with_underscores_action],
        max_request_headers_kb=_wrapped(msg, "max_request_headers_kb",
                                        rt.DEFAULT_MAX_REQUEST_HEADERS_KB),
        upgrade_configs=tuple(
            rt.UpgradeConfig(upgrade_type=u.upgrade_type.lower(),
                             enabled=_wrapped(u, "enabled", True))
            for u in msg.upgrade_configs),
        normalize_path=_wrapped(msg, "normalize_path", False),
        merge_slashes=msg.merge_slashes,
        path_with_escaped_slashes_action=_ESCAPED[msg.path_with_escaped_slashes_action],
        strip_any_host_port=msg.strip_any_host_port,
        strip_matching_host_port=msg.strip_matching_host_port,
        strip_trailing_host_dot=msg.strip_trailing_host_dot,
        proxy_100_continue=msg.proxy_100_continue,
        stream_error_on_invalid_http_message=_wrapped(
            msg, "stream_error_on_invalid_http_message", False),
        forward_client_cert_details=_FCC[msg.forward_client_cert_details],
        set_current_client_cert_details=json_format.MessageToDict(
            msg.set_current_client_cert_details, preserving_proto_field_name=True),
        tracing=msg.HasField("tracing"),
        trace=compile_tracing(msg.tracing, f"{path}.tracing")
        if msg.HasField("tracing") else None,
        http1=rt.Http1Options(
            accept_http_10=h1.accept_http_10,
            default_host_for_http_10=h1.default_host_for_http_10,
            allow_chunked_length=h1.allow_chunked_length,
            allow_absolute_url=_wrapped(h1, "allow_absolute_url", True)),
        http2=rt.Http2Options(
            max_concurrent_streams=_wrapped(h2, "max_concurrent_streams", 2147483647),
            initial_stream_window_size=_wrapped(h2, "initial_stream_window_size", 268435456),
            initial_connection_window_size=_wrapped(h2, "initial_connection_window_size",
                                                    268435456),
            hpack_table_size=_wrapped(h2, "hpack_table_size", 4096),
            allow_connect=h2.allow_connect),
        access_logs=access_logs,
    )


def compile_hcm_dict(data: Mapping[str, Any], path: str = "hcm", *,
                     base_dir: str = ".") -> rt.HcmConfig:
    """Parse proto-JSON (as in a bootstrap's ``typed_config``, without ``@type``) and
    compile it; for tests and tools."""
    msg = hcm_pb2.HttpConnectionManager()
    try:
        json_format.ParseDict(dict(data), msg)
    except json_format.ParseError as exc:
        first = str(exc).strip().splitlines()[0]
        raise BadInput(f"{path}: {first}") from None
    return compile_hcm(msg, path, base_dir=base_dir)


__all__ = ["HTTP_SUPPORTED", "check_http_supported", "compile_fault", "compile_hcm",
           "compile_hcm_dict", "compile_route_configuration", "load_rds_file"]
