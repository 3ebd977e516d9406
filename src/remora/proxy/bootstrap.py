"""Envoy v3 bootstrap in, the proxy's runtime :class:`~remora.proxy.model.Snapshot` out.

Owns: reading a bootstrap file (YAML or JSON, as Envoy takes it), parsing it into the real
``envoy.config.bootstrap.v3.Bootstrap`` proto (unknown fields are errors there), refusing
every field Remora does not implement with a message naming it (never silently ignored), and
compiling listeners and clusters into frozen runtime types.
Must not: open sockets or start anything. Protobuf types stop here.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import math
from collections.abc import Iterable
from typing import Any, Final

import yaml
from envoy.config.bootstrap.v3 import bootstrap_pb2
from envoy.config.cluster.v3 import cluster_pb2

# The HTTP layer's typed configs (parsed here, compiled by remora.proxy.http.routes_compile).
from envoy.config.trace.v3 import zipkin_pb2  # noqa: F401
from envoy.extensions.access_loggers.file.v3 import file_pb2  # noqa: F401
from envoy.extensions.access_loggers.stream.v3 import stream_pb2  # noqa: F401
from envoy.extensions.filters.http.cors.v3 import cors_pb2  # noqa: F401
from envoy.extensions.filters.http.fault.v3 import fault_pb2  # noqa: F401
from envoy.extensions.filters.http.grpc_stats.v3 import config_pb2  # noqa: F401
from envoy.extensions.filters.http.router.v3 import router_pb2  # noqa: F401

# Importing the typed_config messages registers them for Any resolution.
from envoy.extensions.filters.listener.http_inspector.v3 import (  # noqa: F401
    http_inspector_pb2,
)
from envoy.extensions.filters.listener.original_dst.v3 import original_dst_pb2  # noqa: F401
from envoy.extensions.filters.listener.tls_inspector.v3 import tls_inspector_pb2  # noqa: F401
from envoy.extensions.filters.network.http_connection_manager.v3 import (  # noqa: F401
    http_connection_manager_pb2,
)
from envoy.extensions.filters.network.tcp_proxy.v3 import tcp_proxy_pb2
from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2
from google.protobuf import json_format
from google.protobuf.message import Message
from udpa.type.v1 import typed_struct_pb2  # noqa: F401
from xds.type.v3 import typed_struct_pb2 as xds_typed_struct_pb2  # noqa: F401

from remora.errors import BadInput
from remora.proxy.model import (
    DEFAULT_MAGLEV_TABLE,
    DEFAULT_RING_MAX,
    DEFAULT_RING_MIN,
    Admin,
    Cluster,
    ClusterType,
    DnsLookupFamily,
    FilterChain,
    FilterChainMatch,
    HealthStatus,
    LbEndpoint,
    LbPolicy,
    Listener,
    ListenerFilter,
    ListenerFilterName,
    Locality,
    NetworkFilter,
    Node,
    OutlierDetection,
    SlowStart,
    Snapshot,
    SocketAddress,
    SourceType,
    TcpProxy,
    Thresholds,
    WeightedCluster,
)
from remora.proxy.protocheck import ANY_FIELDS, check_fields
from remora.proxy.protocheck import unpack as _unpack

# Fields Remora implements, per message type. Anything else set in a bootstrap is refused.
SUPPORTED: dict[str, str | frozenset[str]] = {
    "envoy.config.bootstrap.v3.Bootstrap": frozenset({"node", "static_resources", "admin"}),
    "envoy.config.core.v3.Node": frozenset({"id", "cluster", "metadata"}),
    "google.protobuf.Struct": ANY_FIELDS,
    "envoy.config.bootstrap.v3.Bootstrap.StaticResources": frozenset({"listeners", "clusters"}),
    "envoy.config.bootstrap.v3.Admin": frozenset({"address", "access_log_path"}),
    "envoy.config.core.v3.Address": frozenset({"socket_address"}),
    "envoy.config.core.v3.SocketAddress": frozenset({"address", "port_value", "protocol"}),
    "envoy.config.listener.v3.Listener": frozenset({
        "name", "address", "additional_addresses", "filter_chains", "default_filter_chain",
        "use_original_dst", "bind_to_port", "transparent", "traffic_direction",
        "listener_filters", "listener_filters_timeout", "continue_on_listener_filters_timeout"}),
    "envoy.config.listener.v3.AdditionalAddress": frozenset({"address"}),
    "envoy.config.listener.v3.FilterChain": frozenset({"name", "filter_chain_match", "filters"}),
    "envoy.config.listener.v3.FilterChainMatch": frozenset({
        "destination_port", "prefix_ranges", "direct_source_prefix_ranges", "source_type",
        "source_prefix_ranges", "source_ports", "server_names", "transport_protocol",
        "application_protocols"}),
    "envoy.config.core.v3.CidrRange": frozenset({"address_prefix", "prefix_len"}),
    "envoy.config.listener.v3.Filter": frozenset({"name", "typed_config"}),
    "envoy.config.listener.v3.ListenerFilter": frozenset({"name", "typed_config",
                                                          "filter_disabled"}),
    "envoy.config.listener.v3.ListenerFilterChainMatchPredicate": frozenset({
        "destination_port_range", "or_match", "not_match"}),
    "envoy.config.listener.v3.ListenerFilterChainMatchPredicate.MatchSet": frozenset({"rules"}),
    "envoy.type.v3.Int32Range": frozenset({"start", "end"}),
    "envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy": frozenset({
        "stat_prefix", "cluster", "weighted_clusters", "idle_timeout", "max_connect_attempts",
        "access_log", "hash_policy"}),
    "envoy.type.v3.HashPolicy": frozenset({"source_ip"}),
    "envoy.type.v3.HashPolicy.SourceIp": frozenset(),
    "envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy.WeightedCluster": frozenset({
        "clusters"}),
    "envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy.WeightedCluster.ClusterWeight":
        frozenset({"name", "weight"}),
    "envoy.extensions.filters.listener.original_dst.v3.OriginalDst": frozenset(),
    "envoy.extensions.filters.listener.tls_inspector.v3.TlsInspector": frozenset(),
    "envoy.extensions.filters.listener.http_inspector.v3.HttpInspector": frozenset(),
    "envoy.config.cluster.v3.Cluster": frozenset({
        "name", "type", "lb_policy", "connect_timeout", "load_assignment",
        "upstream_bind_config", "circuit_breakers", "alt_stat_name", "eds_cluster_config",
        "cleanup_interval", "dns_refresh_rate", "dns_lookup_family",
        "typed_extension_protocol_options", "outlier_detection", "ring_hash_lb_config",
        "maglev_lb_config", "common_lb_config", "round_robin_lb_config",
        "least_request_lb_config"}),
    "envoy.config.cluster.v3.Cluster.RoundRobinLbConfig": frozenset({"slow_start_config"}),
    "envoy.config.cluster.v3.Cluster.LeastRequestLbConfig": frozenset({
        "choice_count", "active_request_bias", "slow_start_config"}),
    "envoy.config.cluster.v3.Cluster.SlowStartConfig": frozenset({
        "slow_start_window", "aggression", "min_weight_percent"}),
    "envoy.config.core.v3.RuntimeDouble": frozenset({"default_value", "runtime_key"}),
    "envoy.config.cluster.v3.Cluster.CommonLbConfig": frozenset({
        "healthy_panic_threshold", "locality_weighted_lb_config"}),
    "envoy.config.cluster.v3.Cluster.CommonLbConfig.LocalityWeightedLbConfig": frozenset(),
    "envoy.type.v3.Percent": frozenset({"value"}),
    "envoy.config.cluster.v3.Cluster.RingHashLbConfig": frozenset({
        "minimum_ring_size", "maximum_ring_size", "hash_function"}),
    "envoy.config.cluster.v3.Cluster.MaglevLbConfig": frozenset({"table_size"}),
    "envoy.config.cluster.v3.OutlierDetection": frozenset({
        "consecutive_5xx", "consecutive_gateway_failure", "enforcing_consecutive_5xx",
        "enforcing_consecutive_gateway_failure", "interval", "base_ejection_time",
        "max_ejection_time", "max_ejection_percent", "split_external_local_origin_errors",
        "consecutive_local_origin_failure", "enforcing_consecutive_local_origin_failure"}),
    "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": frozenset({
        "explicit_http_config", "use_downstream_protocol_config",
        "common_http_protocol_options"}),
    "envoy.extensions.upstreams.http.v3.HttpProtocolOptions.ExplicitHttpConfig": frozenset({
        "http_protocol_options", "http2_protocol_options"}),
    "envoy.extensions.upstreams.http.v3.HttpProtocolOptions.UseDownstreamHttpConfig":
        frozenset({"http_protocol_options", "http2_protocol_options"}),
    "envoy.config.core.v3.Http1ProtocolOptions": frozenset(),
    "envoy.config.core.v3.Http2ProtocolOptions": frozenset({
        "max_concurrent_streams", "initial_stream_window_size",
        "initial_connection_window_size"}),
    "envoy.config.core.v3.HttpProtocolOptions": frozenset({
        "idle_timeout", "max_requests_per_connection", "max_connection_duration"}),
    "envoy.config.cluster.v3.Cluster.EdsClusterConfig": frozenset({"service_name"}),
    "envoy.config.core.v3.BindConfig": frozenset({"source_address", "extra_source_addresses"}),
    "envoy.config.core.v3.ExtraSourceAddress": frozenset({"address"}),
    "envoy.config.cluster.v3.CircuitBreakers": frozenset({"thresholds"}),
    "envoy.config.cluster.v3.CircuitBreakers.Thresholds": frozenset({
        "priority", "max_connections", "max_pending_requests", "max_requests", "max_retries",
        "track_remaining"}),
    "envoy.config.endpoint.v3.ClusterLoadAssignment": frozenset({"cluster_name",
                                                                 "endpoints", "policy"}),
    "envoy.config.endpoint.v3.ClusterLoadAssignment.Policy": frozenset({
        "overprovisioning_factor"}),
    "envoy.config.endpoint.v3.LocalityLbEndpoints": frozenset({
        "locality", "lb_endpoints", "load_balancing_weight", "priority"}),
    "envoy.config.core.v3.Locality": frozenset({"region", "zone", "sub_zone"}),
    "envoy.config.endpoint.v3.LbEndpoint": frozenset({"endpoint", "health_status",
                                                      "load_balancing_weight"}),
    "envoy.config.endpoint.v3.Endpoint": frozenset({"address", "hostname"}),
    "google.protobuf.Duration": ANY_FIELDS,
    "google.protobuf.UInt32Value": ANY_FIELDS,
    "google.protobuf.UInt64Value": ANY_FIELDS,
    "google.protobuf.BoolValue": ANY_FIELDS,
    "google.protobuf.Any": ANY_FIELDS,
}
LISTENER_FILTERS: dict[str, ListenerFilterName] = {
    "envoy.extensions.filters.listener.original_dst.v3.OriginalDst": "original_dst",
    "envoy.extensions.filters.listener.tls_inspector.v3.TlsInspector": "tls_inspector",
    "envoy.extensions.filters.listener.http_inspector.v3.HttpInspector": "http_inspector",
}
HCM_TYPE = ("envoy.extensions.filters.network.http_connection_manager.v3."
            "HttpConnectionManager")
NETWORK_FILTERS = {"envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy", HCM_TYPE}
# Checked field by field by their own compiler (remora.proxy.http.routes_compile).
DELEGATED = frozenset({HCM_TYPE, "envoy.config.accesslog.v3.AccessLog",
                       "udpa.type.v1.TypedStruct", "xds.type.v3.TypedStruct"})
# Istio's own network filters, carried in a TypedStruct (their protos are not in xds-protos).
ISTIO_NETWORK_FILTERS = {
    "type.googleapis.com/stats.PluginConfig": "istio.stats",
    "type.googleapis.com/envoy.tcp.metadataexchange.config.MetadataExchange":
        "istio.metadata_exchange",
}


def check_supported(msg: Message, path: str) -> None:
    """Refuse any field outside :data:`SUPPORTED`, naming its path."""
    check_fields(msg, path, SUPPORTED, skip_types=DELEGATED)


def load_file(path: str) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
    except OSError as exc:
        raise BadInput(f"cannot read bootstrap {path}: {exc.strerror}") from None
    try:
        data = json.loads(text) if path.endswith(".json") else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        first = str(exc).strip().splitlines()[0]
        kind = "JSON" if path.endswith(".json") else "YAML"
        raise BadInput(f"bootstrap {path} is not valid {kind}: {first}") from None
    if not isinstance(data, dict):
        raise BadInput(f"bootstrap {path} must be a mapping at the top level")
    return data


def parse_bootstrap(data: dict[str, Any], source: str = "bootstrap") -> bootstrap_pb2.Bootstrap:
    msg = bootstrap_pb2.Bootstrap()
    try:
        json_format.ParseDict(data, msg)
    except json_format.ParseError as exc:
        first = str(exc).strip().splitlines()[0]
        raise BadInput(f"{source}: {first}") from None
    check_supported(msg, "bootstrap")
    return msg


# ------------------------------------------------------------------------------- compile


def _addr(msg: Message, path: str) -> SocketAddress:
    return _sockaddr(msg.socket_address, path)


def _sockaddr(sa: Any, path: str) -> SocketAddress:
    if not sa.address:
        raise BadInput(f"{path}: socket_address.address is required")
    if sa.protocol != 0:
        raise BadInput(f"{path}: only TCP socket addresses are implemented")
    return SocketAddress(address=sa.address, port=sa.port_value)


def _seconds(d: Message) -> float:
    return float(d.seconds) + float(d.nanos) / 1e9


def _nets(ranges: Iterable[Message], path: str) -> tuple[Any, ...]:
    out = []
    for r in ranges:
        plen = r.prefix_len.value if r.HasField("prefix_len") else (
            128 if ":" in r.address_prefix else 32)
        try:
            out.append(ipaddress.ip_network(f"{r.address_prefix}/{plen}",
                                            strict=False))
        except ValueError:
            raise BadInput(f"{path}: bad CIDR {r.address_prefix}/{plen}") from None
    return tuple(out)


_SOURCE_TYPES: dict[int, SourceType] = {0: "ANY", 1: "SAME_IP_OR_LOOPBACK", 2: "EXTERNAL"}


def _chain(msg: Message, path: str) -> FilterChain:
    m = msg.filter_chain_match
    match = FilterChainMatch(
        destination_port=m.destination_port.value if m.HasField("destination_port") else None,
        prefix_ranges=_nets(m.prefix_ranges, path),
        direct_source_prefix_ranges=_nets(m.direct_source_prefix_ranges, path),
        source_type=_SOURCE_TYPES[m.source_type],
        source_prefix_ranges=_nets(m.source_prefix_ranges, path),
        source_ports=tuple(m.source_ports),
        server_names=tuple(s.lower() for s in m.server_names),
        transport_protocol=m.transport_protocol,
        application_protocols=tuple(m.application_protocols),
    )
    filters = []
    istio_stats = False
    for i, f in enumerate(msg.filters):
        where = f"{path}.filters[{i}]"
        if not f.HasField("typed_config"):
            raise BadInput(f"{where}: typed_config is required")
        cfg = _unpack(f.typed_config, where)
        if cfg.DESCRIPTOR.full_name in ("udpa.type.v1.TypedStruct", "xds.type.v3.TypedStruct"):
            istio = ISTIO_NETWORK_FILTERS.get(cfg.type_url)
            if istio is None:
                raise BadInput(f"unsupported {where}: TypedStruct of "
                               f"{cfg.type_url}")
            if istio == "istio.stats":
                from remora.proxy.http.telemetry import compile_plugin_config
                try:
                    compile_plugin_config(json_format.MessageToDict(cfg.value))
                except ValueError as exc:
                    raise BadInput(f"{where}.typed_config.value.{exc}") from None
                istio_stats = True
            continue
        if cfg.DESCRIPTOR.full_name not in NETWORK_FILTERS:
            raise BadInput(f"unsupported {where}: {cfg.DESCRIPTOR.full_name}")
        if cfg.DESCRIPTOR.full_name == HCM_TYPE:
            from remora.proxy.http.routes_compile import compile_hcm
            filters.append(NetworkFilter(
                name=f.name or "envoy.filters.network.http_connection_manager",
                config=compile_hcm(cfg, f"{where}.typed_config")))
            continue
        tp = _tcp_proxy(cfg, where)
        if istio_stats:
            tp = dataclasses.replace(tp, istio_stats=True)
        filters.append(NetworkFilter(name=f.name or "envoy.filters.network.tcp_proxy",
                                     config=tp))
    return FilterChain(name=msg.name, match=match, filters=tuple(filters))


def _tcp_proxy(msg: Message, path: str) -> TcpProxy:
    assert isinstance(msg, tcp_proxy_pb2.TcpProxy)
    weighted = tuple(WeightedCluster(name=c.name, weight=c.weight)
                     for c in msg.weighted_clusters.clusters)
    if not msg.cluster and not weighted:
        raise BadInput(f"{path}: tcp_proxy needs cluster or weighted_clusters")
    if not msg.stat_prefix:
        raise BadInput(f"{path}: tcp_proxy.stat_prefix is required")
    idle = _seconds(msg.idle_timeout) if msg.HasField("idle_timeout") else 3600.0
    logs: tuple[Any, ...] = ()
    if len(msg.access_log):
        from remora.proxy.http.accesslog import compile_access_logs
        logs = compile_access_logs(msg.access_log, f"{path}.access_log")
    return TcpProxy(stat_prefix=msg.stat_prefix, cluster=msg.cluster, weighted_clusters=weighted,
                    access_logs=logs,
                    idle_timeout=idle or None,
                    max_connect_attempts=msg.max_connect_attempts.value
                    if msg.HasField("max_connect_attempts") else 1,
                    hash_source_ip=any(h.HasField("source_ip") for h in msg.hash_policy))


def _disabled_ports(pred: Message, path: str) -> tuple[frozenset[int], bool]:
    """Istio's predicates: a port range, an or_match of ranges, or not_match of either."""
    invert = False
    if pred.HasField("not_match"):
        invert = True
        pred = pred.not_match
    ranges = []
    if pred.HasField("destination_port_range"):
        ranges.append(pred.destination_port_range)
    elif pred.HasField("or_match"):
        for rule in pred.or_match.rules:
            if not rule.HasField("destination_port_range"):
                raise BadInput(f"unsupported {path}: only destination_port_range predicates")
            ranges.append(rule.destination_port_range)
    else:
        raise BadInput(f"unsupported {path}: only destination_port_range predicates")
    ports: set[int] = set()
    for r in ranges:
        ports.update(range(r.start, r.end))
    return frozenset(ports), invert


def _listener(msg: Message, path: str) -> Listener:
    name = msg.name
    if not name:
        raise BadInput(f"{path}: name is required")
    lfilters = []
    for i, lf in enumerate(msg.listener_filters):
        where = f"{path}.listener_filters[{i}]"
        if not lf.HasField("typed_config"):
            raise BadInput(f"{where}: typed_config is required")
        kind = LISTENER_FILTERS[_unpack(lf.typed_config, where).DESCRIPTOR.full_name]
        ports, invert = (_disabled_ports(lf.filter_disabled, where)
                         if lf.HasField("filter_disabled") else (frozenset(), False))
        lfilters.append(ListenerFilter(name=kind, disabled_ports=ports,
                                       disabled_invert=invert))
    def flag(field: str, default: bool) -> bool:
        return bool(getattr(msg, field).value) if msg.HasField(field) else default
    timeout = _seconds(msg.listener_filters_timeout) \
        if msg.HasField("listener_filters_timeout") else 15.0
    return Listener(
        name=name,
        address=_addr(msg.address, f"{path}.address"),
        additional_addresses=tuple(_addr(a.address, f"{path}.additional_addresses[{i}]")
                                   for i, a in enumerate(msg.additional_addresses)),
        bind_to_port=flag("bind_to_port", True),
        use_original_dst=flag("use_original_dst", False),
        transparent=flag("transparent", False),
        traffic_direction=("UNSPECIFIED", "INBOUND", "OUTBOUND")[msg.traffic_direction],
        listener_filters=tuple(lfilters),
        listener_filters_timeout=timeout,
        continue_on_listener_filters_timeout=msg.continue_on_listener_filters_timeout,
        filter_chains=tuple(_chain(c, f"{path}.filter_chains[{i}]")
                            for i, c in enumerate(msg.filter_chains)),
        default_filter_chain=_chain(msg.default_filter_chain, f"{path}.default_filter_chain")
        if msg.HasField("default_filter_chain") else None,
    )


C = cluster_pb2.Cluster
_CLUSTER_TYPES: dict[int, ClusterType] = {
    C.STATIC: "STATIC", C.STRICT_DNS: "STRICT_DNS", C.LOGICAL_DNS: "LOGICAL_DNS",
    C.EDS: "EDS", C.ORIGINAL_DST: "ORIGINAL_DST"}
_LB: dict[int, LbPolicy] = {
    C.ROUND_ROBIN: "ROUND_ROBIN", C.LEAST_REQUEST: "LEAST_REQUEST", C.RANDOM: "RANDOM",
    C.RING_HASH: "RING_HASH", C.MAGLEV: "MAGLEV", C.CLUSTER_PROVIDED: "CLUSTER_PROVIDED"}
_DNS_FAMILY: dict[int, DnsLookupFamily] = {
    C.AUTO: "AUTO", C.V4_ONLY: "V4_ONLY", C.V6_ONLY: "V6_ONLY", C.V4_PREFERRED: "V4_PREFERRED",
    C.ALL: "ALL"}
_HEALTH: tuple[HealthStatus, ...] = (
    "UNKNOWN", "HEALTHY", "UNHEALTHY", "DRAINING", "TIMEOUT", "DEGRADED")


_MAX_PRIORITY: Final = 128              # Envoy's LocalityLbEndpoints.priority limit
_MAX_MAGLEV_TABLE: Final = 5000011      # Envoy's limit on the table size (a prime)


def _is_prime(n: int) -> bool:
    if n < 2:
        return False
    i = 2
    while i * i <= n:
        if n % i == 0:
            return False
        i += 1
    return True


def _percent(msg: Any, path: str) -> float:
    """An ``envoy.type.v3.Percent``: 0 to 100."""
    value = float(msg.value)
    if not 0.0 <= value <= 100.0:
        raise BadInput(f"{path}: need a percent from 0 to 100, got {value:g}")
    return value


def _slow_start(msg: Any, path: str) -> SlowStart | None:
    """``slow_start_config`` (Envoy's bounds; a runtime key has no runtime here to read, so
    the default value applies, as in Envoy without that key)."""
    window = _seconds(msg.slow_start_window)
    if window <= 0:
        return None                       # Envoy: no window, no slow start
    aggression = 1.0
    if msg.HasField("aggression"):
        aggression = float(msg.aggression.default_value)
        if not aggression > 0:
            raise BadInput(f"{path}.slow_start_config.aggression: must be above 0")
    minimum = 10.0
    if msg.HasField("min_weight_percent"):
        minimum = _percent(msg.min_weight_percent,
                           f"{path}.slow_start_config.min_weight_percent")
    return SlowStart(window=window, aggression=aggression, min_weight_percent=minimum)


def _lb_config(msg: cluster_pb2.Cluster, lb: LbPolicy, path: str) -> dict[str, Any]:
    """``round_robin_lb_config`` / ``least_request_lb_config``, each only with its policy."""
    out: dict[str, Any] = {}
    which = msg.WhichOneof("lb_config")
    if which in ("round_robin_lb_config", "least_request_lb_config"):
        want = "ROUND_ROBIN" if which == "round_robin_lb_config" else "LEAST_REQUEST"
        if lb != want:
            raise BadInput(f"{path}.{which} needs lb_policy {want}, not {lb}")
        config = getattr(msg, which)
        if config.HasField("slow_start_config"):
            out["slow_start"] = _slow_start(config.slow_start_config, f"{path}.{which}")
    if which == "least_request_lb_config":
        lr = msg.least_request_lb_config
        if lr.HasField("choice_count"):
            if lr.choice_count.value < 2:
                raise BadInput(f"{path}.least_request_lb_config.choice_count: at least 2")
            out["choice_count"] = lr.choice_count.value
        if lr.HasField("active_request_bias"):
            bias = float(lr.active_request_bias.default_value)
            if bias < 0:
                raise BadInput(f"{path}.least_request_lb_config.active_request_bias: must "
                               "not be negative")
            out["active_request_bias"] = bias
    return out


def _priority_lb(msg: cluster_pb2.Cluster, lb: LbPolicy, path: str) -> dict[str, Any]:
    """``common_lb_config.healthy_panic_threshold`` (a percent, rounded to a whole one as
    Envoy does) and ``load_assignment.policy.overprovisioning_factor`` → the model's."""
    out: dict[str, Any] = {}
    common = msg.common_lb_config
    if common.HasField("healthy_panic_threshold"):
        value = _percent(common.healthy_panic_threshold,
                         f"{path}.common_lb_config.healthy_panic_threshold")
        out["healthy_panic_threshold"] = float(math.floor(value + 0.5))
    if common.HasField("locality_weighted_lb_config"):
        if lb not in ("ROUND_ROBIN", "LEAST_REQUEST", "RANDOM"):
            raise BadInput(f"unsupported {path}.common_lb_config.locality_weighted_lb_config "
                           f"with lb_policy {lb}: only ROUND_ROBIN, LEAST_REQUEST and RANDOM "
                           "weigh localities here")
        out["locality_weighted"] = True
    policy = msg.load_assignment.policy
    if policy.HasField("overprovisioning_factor"):
        factor = policy.overprovisioning_factor.value
        if factor < 1:
            raise BadInput(f"{path}.load_assignment.policy.overprovisioning_factor: must be "
                           "above 0")
        out["overprovisioning_factor"] = factor
    return out


def _hash_lb(msg: cluster_pb2.Cluster, path: str) -> dict[str, Any]:
    """``ring_hash_lb_config`` / ``maglev_lb_config`` → the model's sizes (Envoy's rules)."""
    out: dict[str, Any] = {}
    if msg.HasField("ring_hash_lb_config"):
        r = msg.ring_hash_lb_config
        lo = r.minimum_ring_size.value if r.HasField("minimum_ring_size") else DEFAULT_RING_MIN
        hi = r.maximum_ring_size.value if r.HasField("maximum_ring_size") else DEFAULT_RING_MAX
        if not 1 <= lo <= hi <= DEFAULT_RING_MAX:
            raise BadInput(f"{path}.ring_hash_lb_config: need 1 <= minimum_ring_size <= "
                           f"maximum_ring_size <= {DEFAULT_RING_MAX}, got {lo} and {hi}")
        if r.hash_function != C.RingHashLbConfig.XX_HASH:
            raise BadInput(f"unsupported {path}.ring_hash_lb_config.hash_function: only "
                           "XX_HASH is implemented")
        out.update(ring_min_size=lo, ring_max_size=hi)
    if msg.HasField("maglev_lb_config"):
        m = msg.maglev_lb_config
        size = m.table_size.value if m.HasField("table_size") else DEFAULT_MAGLEV_TABLE
        if not _is_prime(size) or size > _MAX_MAGLEV_TABLE:
            raise BadInput(f"{path}.maglev_lb_config.table_size: {size} is not a prime up to "
                           f"{_MAX_MAGLEV_TABLE}")
        out["maglev_table_size"] = size
    return out


def _thresholds(msg: Message) -> Thresholds:
    def get(field: str, default: int) -> int:
        return int(getattr(msg, field).value) if msg.HasField(field) else default
    return Thresholds(max_connections=get("max_connections", 1024),
                      max_pending_requests=get("max_pending_requests", 1024),
                      max_requests=get("max_requests", 1024),
                      max_retries=get("max_retries", 3))


HTTP_PROTOCOL_OPTIONS = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"


def _http_options(msg: cluster_pb2.Cluster, path: str) -> dict[str, Any]:
    """``typed_extension_protocol_options`` → the cluster's HTTP upstream settings."""
    out: dict[str, Any] = {}
    for key, any_msg in msg.typed_extension_protocol_options.items():
        where = f"{path}.typed_extension_protocol_options[{key}]"
        opts = _unpack(any_msg, where)
        if not isinstance(opts, http_protocol_options_pb2.HttpProtocolOptions):
            raise BadInput(f"unsupported {where}: {opts.DESCRIPTOR.full_name}")
        check_supported(opts, where)   # map values are not visited by the bootstrap check
        if opts.HasField("explicit_http_config"):
            out["http_protocol"] = ("HTTP2" if opts.explicit_http_config.HasField(
                "http2_protocol_options") else "HTTP1")
        elif opts.HasField("use_downstream_protocol_config"):
            out["http_protocol"] = "DOWNSTREAM"
        common = opts.common_http_protocol_options
        if common.HasField("idle_timeout"):
            out["http_idle_timeout"] = _seconds(common.idle_timeout) or None
        if common.HasField("max_requests_per_connection"):
            out["max_requests_per_connection"] = common.max_requests_per_connection.value
    return out


def _outlier(msg: Message) -> OutlierDetection:
    d = OutlierDetection()

    def u32(field: str, default: int) -> int:
        return int(getattr(msg, field).value) if msg.HasField(field) else default

    def dur(field: str, default: float) -> float:
        return _seconds(getattr(msg, field)) if msg.HasField(field) else default
    return OutlierDetection(
        consecutive_5xx=u32("consecutive_5xx", d.consecutive_5xx),
        consecutive_gateway_failure=u32("consecutive_gateway_failure",
                                        d.consecutive_gateway_failure),
        enforcing_consecutive_5xx=u32("enforcing_consecutive_5xx", d.enforcing_consecutive_5xx),
        enforcing_consecutive_gateway_failure=u32("enforcing_consecutive_gateway_failure",
                                                  d.enforcing_consecutive_gateway_failure),
        interval=dur("interval", d.interval),
        base_ejection_time=dur("base_ejection_time", d.base_ejection_time),
        max_ejection_time=dur("max_ejection_time", d.max_ejection_time),
        max_ejection_percent=u32("max_ejection_percent", d.max_ejection_percent),
        split_external_local_origin_errors=msg.split_external_local_origin_errors,
        consecutive_local_origin_failure=u32("consecutive_local_origin_failure",
                                             d.consecutive_local_origin_failure),
        enforcing_consecutive_local_origin_failure=u32(
            "enforcing_consecutive_local_origin_failure",
            d.enforcing_consecutive_local_origin_failure),
    )


def _cluster(msg: cluster_pb2.Cluster, path: str) -> Cluster:
    if not msg.name:
        raise BadInput(f"{path}: name is required")
    ctype = _CLUSTER_TYPES.get(msg.type)
    if ctype is None or msg.HasField("cluster_type"):
        raise BadInput(f"unsupported {path}.type: only STATIC, STRICT_DNS, LOGICAL_DNS, EDS "
                       "and ORIGINAL_DST are implemented")
    lb = _LB.get(msg.lb_policy)
    if lb is None:
        raise BadInput(f"unsupported {path}.lb_policy: "
                       f"{cluster_pb2.Cluster.LbPolicy.Name(msg.lb_policy)}")
    if (ctype == "ORIGINAL_DST") != (lb == "CLUSTER_PROVIDED"):
        raise BadInput(f"{path}: ORIGINAL_DST clusters need lb_policy CLUSTER_PROVIDED "
                       "(and only they may use it)")
    endpoints = []
    for i, locality in enumerate(msg.load_assignment.endpoints):
        if locality.priority > _MAX_PRIORITY:
            raise BadInput(f"{path}.load_assignment.endpoints[{i}].priority: at most "
                           f"{_MAX_PRIORITY}, got {locality.priority}")
        loc = Locality(region=locality.locality.region, zone=locality.locality.zone,
                       sub_zone=locality.locality.sub_zone)
        for ep in locality.lb_endpoints:
            endpoints.append(LbEndpoint(
                address=_addr(ep.endpoint.address, f"{path}.load_assignment"),
                weight=ep.load_balancing_weight.value if ep.HasField("load_balancing_weight")
                else 1,
                health_status=_HEALTH[ep.health_status],
                locality=loc, priority=locality.priority, hostname=ep.endpoint.hostname,
                locality_weight=locality.load_balancing_weight.value))
    if ctype == "ORIGINAL_DST" and endpoints:
        raise BadInput(f"{path}: an ORIGINAL_DST cluster takes no load_assignment")
    default, high = Thresholds(), Thresholds()
    for t in msg.circuit_breakers.thresholds:
        if t.priority == 0:
            default = _thresholds(t)
        else:
            high = _thresholds(t)
    bind = msg.upstream_bind_config
    return Cluster(
        name=msg.name, type=ctype,
        lb_policy=lb,
        connect_timeout=_seconds(msg.connect_timeout) if msg.HasField("connect_timeout")
        else 5.0,
        endpoints=tuple(endpoints),
        upstream_bind_source=_sockaddr(bind.source_address, f"{path}.upstream_bind_config")
        if bind.HasField("source_address") else None,
        extra_bind_sources=tuple(_addr(e.address, f"{path}.upstream_bind_config")
                                 for e in bind.extra_source_addresses),
        default_thresholds=default, high_thresholds=high,
        alt_stat_name=msg.alt_stat_name,
        eds_service_name=msg.eds_cluster_config.service_name,
        cleanup_interval=_seconds(msg.cleanup_interval) if msg.HasField("cleanup_interval")
        else 5.0,
        dns_refresh_rate=_seconds(msg.dns_refresh_rate) if msg.HasField("dns_refresh_rate")
        else 5.0,
        dns_lookup_family=_DNS_FAMILY[msg.dns_lookup_family],
        outlier_detection=_outlier(msg.outlier_detection)
        if msg.HasField("outlier_detection") else None,
        **_http_options(msg, path),
        **_hash_lb(msg, path),
        **_priority_lb(msg, lb, path),
        **_lb_config(msg, lb, path),
    )


def _check_references(listeners: Iterable[Listener], clusters: dict[str, Cluster]) -> None:
    for li in listeners:
        for chain in (*li.filter_chains, *([li.default_filter_chain]
                                           if li.default_filter_chain else [])):
            tp = chain.tcp_proxy
            if tp is None:
                continue
            for name in [tp.cluster] if tp.cluster else [w.name for w in tp.weighted_clusters]:
                if name not in clusters:
                    raise BadInput(f"listener {li.name}: tcp_proxy cluster {name!r} is not "
                                   "defined")


def compile_bootstrap(msg: bootstrap_pb2.Bootstrap) -> Snapshot:
    listeners = tuple(_listener(li, f"static_resources.listeners[{i}]")
                      for i, li in enumerate(msg.static_resources.listeners))
    names = [li.name for li in listeners]
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        raise BadInput(f"duplicate listener name {sorted(dup)[0]!r}")
    clusters: dict[str, Cluster] = {}
    for i, c in enumerate(msg.static_resources.clusters):
        cluster = _cluster(c, f"static_resources.clusters[{i}]")
        if cluster.name in clusters:
            raise BadInput(f"duplicate cluster name {cluster.name!r}")
        clusters[cluster.name] = cluster
    _check_references(listeners, clusters)
    admin = Admin(address=_addr(msg.admin.address, "admin.address")) \
        if msg.admin.HasField("address") else Admin()
    as_json = json_format.MessageToDict(msg, preserving_proto_field_name=True)
    return Snapshot(
        listeners=listeners, clusters=clusters, admin=admin,
        node=Node(id=msg.node.id, cluster=msg.node.cluster,
                  metadata=json_format.MessageToDict(msg.node.metadata)),
        bootstrap_json=as_json,
        listener_json={li.name: json_format.MessageToDict(li, preserving_proto_field_name=True)
                       for li in msg.static_resources.listeners},
        cluster_json={c.name: json_format.MessageToDict(c, preserving_proto_field_name=True)
                      for c in msg.static_resources.clusters},
    )


def load_bootstrap(path: str) -> Snapshot:
    """Read, parse, check and compile a bootstrap file."""
    return compile_bootstrap(parse_bootstrap(load_file(path), source=path))


