"""The proxy's own runtime configuration: immutable, compiled from Envoy protos.

Owns: the frozen dataclasses every part of `remora proxy` reads (listeners, filter chains and
their matches, network filters, clusters, endpoints, circuit breakers) and the snapshot that
groups them. A new snapshot replaces the old one whole (one attribute swap), so a connection
always sees one consistent config.
Must not: import protobuf types (they stay in :mod:`remora.proxy.bootstrap`) or do IO.

Names and defaults are Envoy's (``envoy/config/listener/v3``, ``envoy/config/cluster/v3``).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import Any, Literal

from remora.proxy.http.routes import HcmConfig

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

# Envoy's defaults.
DEFAULT_CONNECT_TIMEOUT = 5.0                    # cluster.connect_timeout
DEFAULT_TCP_IDLE_TIMEOUT = 3600.0                # tcp_proxy.idle_timeout (1 h)
DEFAULT_LISTENER_FILTERS_TIMEOUT = 15.0          # listener.listener_filters_timeout
DEFAULT_ORIGINAL_DST_CLEANUP = 5.0               # cluster.cleanup_interval
UINT32_MAX = 4294967295


@dataclass(frozen=True, slots=True, kw_only=True)
class SocketAddress:
    """``socket_address {address, port_value}``; ``ip`` is parsed when the address is an IP."""

    address: str
    port: int

    @property
    def ip(self) -> IPAddress | None:
        try:
            return ipaddress.ip_address(self.address)
        except ValueError:
            return None

    @property
    def family(self) -> int:
        ip = self.ip
        return ip.version if ip is not None else 4

    @property
    def is_wildcard(self) -> bool:
        return self.address in ("0.0.0.0", "::")

    def __str__(self) -> str:
        """Envoy's rendering: ``ip:port`` or ``[ipv6]:port``."""
        if ":" in self.address:
            return f"[{self.address}]:{self.port}"
        return f"{self.address}:{self.port}"

    def sockaddr(self) -> tuple[str, int]:
        return (self.address, self.port)


SourceType = Literal["ANY", "SAME_IP_OR_LOOPBACK", "EXTERNAL"]


@dataclass(frozen=True, slots=True, kw_only=True)
class FilterChainMatch:
    """``FilterChainMatch``: every field empty means "matches anything" at its level."""

    destination_port: int | None = None
    prefix_ranges: tuple[IPNetwork, ...] = ()
    direct_source_prefix_ranges: tuple[IPNetwork, ...] = ()
    source_type: SourceType = "ANY"
    source_prefix_ranges: tuple[IPNetwork, ...] = ()
    source_ports: tuple[int, ...] = ()
    server_names: tuple[str, ...] = ()
    transport_protocol: str = ""
    application_protocols: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class WeightedCluster:
    name: str
    weight: int


@dataclass(frozen=True, slots=True, kw_only=True)
class TcpProxy:
    """``envoy.filters.network.tcp_proxy``: to one cluster or weighted clusters."""

    stat_prefix: str
    cluster: str = ""
    weighted_clusters: tuple[WeightedCluster, ...] = ()
    idle_timeout: float | None = DEFAULT_TCP_IDLE_TIMEOUT   # None or 0: disabled
    max_connect_attempts: int = 1
    access_logs: tuple[Any, ...] = ()     # remora.proxy.http.accesslog.AccessLogConfig
    istio_stats: bool = False             # an ``istio.stats`` network filter precedes it
    hash_source_ip: bool = False          # hash_policy source_ip: RING_HASH / MAGLEV key


NetworkFilterConfig = TcpProxy | HcmConfig


@dataclass(frozen=True, slots=True, kw_only=True)
class NetworkFilter:
    name: str                       # e.g. "envoy.filters.network.tcp_proxy"
    config: NetworkFilterConfig


@dataclass(frozen=True, slots=True, kw_only=True)
class FilterChain:
    name: str = ""
    match: FilterChainMatch = field(default_factory=FilterChainMatch)
    filters: tuple[NetworkFilter, ...] = ()

    @property
    def tcp_proxy(self) -> TcpProxy | None:
        for f in self.filters:
            if isinstance(f.config, TcpProxy):
                return f.config
        return None

    @property
    def hcm(self) -> HcmConfig | None:
        for f in self.filters:
            if isinstance(f.config, HcmConfig):
                return f.config
        return None


ListenerFilterName = Literal["original_dst", "tls_inspector", "http_inspector"]


@dataclass(frozen=True, slots=True, kw_only=True)
class ListenerFilter:
    """A listener filter; ``disabled_ports`` is Istio's ``filter_disabled`` port predicate
    (a destination port in it skips this filter), ``disabled_invert`` flips it."""

    name: ListenerFilterName
    disabled_ports: frozenset[int] = frozenset()
    disabled_invert: bool = False

    def enabled_for(self, port: int) -> bool:
        hit = port in self.disabled_ports
        return hit if self.disabled_invert else not hit


TrafficDirection = Literal["UNSPECIFIED", "INBOUND", "OUTBOUND"]


@dataclass(frozen=True, slots=True, kw_only=True)
class Listener:
    name: str
    address: SocketAddress
    additional_addresses: tuple[SocketAddress, ...] = ()
    bind_to_port: bool = True
    use_original_dst: bool = False
    transparent: bool = False
    traffic_direction: TrafficDirection = "UNSPECIFIED"
    listener_filters: tuple[ListenerFilter, ...] = ()
    listener_filters_timeout: float = DEFAULT_LISTENER_FILTERS_TIMEOUT   # 0: no timeout
    continue_on_listener_filters_timeout: bool = False
    filter_chains: tuple[FilterChain, ...] = ()
    default_filter_chain: FilterChain | None = None

    @property
    def addresses(self) -> tuple[SocketAddress, ...]:
        return (self.address, *self.additional_addresses)

    def effective_listener_filters(self) -> tuple[ListenerFilter, ...]:
        """``use_original_dst`` implicitly prepends the original_dst filter (Envoy
        ``ListenerImpl::buildOriginalDstListenerFilter``)."""
        if self.use_original_dst and not any(f.name == "original_dst"
                                             for f in self.listener_filters):
            return (ListenerFilter(name="original_dst"), *self.listener_filters)
        return self.listener_filters


ClusterType = Literal["STATIC", "STRICT_DNS", "LOGICAL_DNS", "EDS", "ORIGINAL_DST"]
LbPolicy = Literal["ROUND_ROBIN", "LEAST_REQUEST", "RANDOM", "RING_HASH", "MAGLEV",
                   "CLUSTER_PROVIDED"]
DnsLookupFamily = Literal["AUTO", "V4_ONLY", "V6_ONLY", "V4_PREFERRED", "ALL"]
HealthStatus = Literal["UNKNOWN", "HEALTHY", "UNHEALTHY", "DRAINING", "TIMEOUT", "DEGRADED"]


@dataclass(frozen=True, slots=True, kw_only=True)
class Locality:
    region: str = ""
    zone: str = ""
    sub_zone: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class LbEndpoint:
    address: SocketAddress
    weight: int = 1
    health_status: HealthStatus = "UNKNOWN"
    locality: Locality = field(default_factory=Locality)
    priority: int = 0
    hostname: str = ""
    # its LocalityLbEndpoints' load_balancing_weight (0: unset), read only with
    # common_lb_config.locality_weighted_lb_config
    locality_weight: int = 0

    @property
    def healthy(self) -> bool:
        """Takes traffic (degraded endpoints too, when the healthy ones cannot take it all)."""
        return self.health_status in ("UNKNOWN", "HEALTHY", "DEGRADED")

    @property
    def health_flags(self) -> tuple[str, ...]:
        """Envoy's flags for its EDS health: ``/failed_eds_health`` (UNHEALTHY, DRAINING,
        TIMEOUT), ``/degraded_eds_health`` (DEGRADED), none (UNKNOWN, HEALTHY)."""
        if self.health_status == "DEGRADED":
            return (DEGRADED_FLAG,)
        return () if self.healthy else (FAILED_EDS_FLAG,)


@dataclass(frozen=True, slots=True, kw_only=True)
class Thresholds:
    """One priority's circuit breaker limits (Envoy defaults 1024/1024/1024/3)."""

    max_connections: int = 1024
    max_pending_requests: int = 1024
    max_requests: int = 1024
    max_retries: int = 3


@dataclass(frozen=True, slots=True, kw_only=True)
class SlowStart:
    """``slow_start_config`` of ROUND_ROBIN / LEAST_REQUEST (Istio's ``warmupDurationSecs``):
    for ``window`` seconds after a host joins, its weight is scaled by
    ``max(min_weight_percent / 100, (max(age, 1) / window) ** (1 / aggression))``."""

    window: float
    aggression: float = 1.0
    min_weight_percent: float = 10.0


@dataclass(frozen=True, slots=True, kw_only=True)
class OutlierDetection:
    """``cluster.outlier_detection`` (Envoy defaults). Ejection time grows with the number of
    times a host was ejected: ``base_ejection_time * n``, capped at ``max_ejection_time``."""

    consecutive_5xx: int = 5
    consecutive_gateway_failure: int = 5
    enforcing_consecutive_5xx: int = 100          # percent
    enforcing_consecutive_gateway_failure: int = 0
    interval: float = 10.0
    base_ejection_time: float = 30.0
    max_ejection_time: float = 300.0
    max_ejection_percent: int = 10
    split_external_local_origin_errors: bool = False
    consecutive_local_origin_failure: int = 5
    enforcing_consecutive_local_origin_failure: int = 100


UpstreamHttpProtocol = Literal["HTTP1", "HTTP2", "DOWNSTREAM"]

DEFAULT_RING_MIN = 1024                 # Envoy RingHashLbConfig.minimum_ring_size
DEFAULT_RING_MAX = 8 * 1024 * 1024      # Envoy RingHashLbConfig.maximum_ring_size (and its cap)
FAILED_EDS_FLAG = "/failed_eds_health"
DEGRADED_FLAG = "/degraded_eds_health"
DEFAULT_MAGLEV_TABLE = 65537            # Envoy MaglevLbConfig.table_size
DEFAULT_PANIC_THRESHOLD = 50.0          # percent: Envoy common_lb_config.healthy_panic_threshold
DEFAULT_OVERPROVISIONING = 140          # percent: Envoy ClusterLoadAssignment.Policy's factor
DEFAULT_CHOICE_COUNT = 2                # Envoy LeastRequestLbConfig.choice_count
DEFAULT_ACTIVE_REQUEST_BIAS = 1.0       # Envoy LeastRequestLbConfig.active_request_bias


@dataclass(frozen=True, slots=True, kw_only=True)
class Cluster:
    name: str
    type: ClusterType = "STATIC"
    lb_policy: LbPolicy = "ROUND_ROBIN"
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT
    endpoints: tuple[LbEndpoint, ...] = ()
    upstream_bind_source: SocketAddress | None = None          # upstream_bind_config
    extra_bind_sources: tuple[SocketAddress, ...] = ()         # one per other IP family
    default_thresholds: Thresholds = field(default_factory=Thresholds)
    high_thresholds: Thresholds = field(default_factory=Thresholds)
    alt_stat_name: str = ""
    eds_service_name: str = ""
    cleanup_interval: float = DEFAULT_ORIGINAL_DST_CLEANUP
    dns_refresh_rate: float = 5.0
    dns_lookup_family: DnsLookupFamily = "AUTO"
    added_via_api: bool = False
    # HTTP: envoy.extensions.upstreams.http.v3.HttpProtocolOptions (explicit HTTP/1.1 by
    # default, as Envoy), the pool's idle timeout (1 h) and requests per connection (0: no cap).
    http_protocol: UpstreamHttpProtocol = "HTTP1"
    http_idle_timeout: float | None = 3600.0
    max_requests_per_connection: int = 0
    outlier_detection: OutlierDetection | None = None
    # RING_HASH (ring_hash_lb_config: Envoy's defaults) and MAGLEV (maglev_lb_config)
    ring_min_size: int = DEFAULT_RING_MIN
    ring_max_size: int = DEFAULT_RING_MAX
    maglev_table_size: int = DEFAULT_MAGLEV_TABLE
    # priority levels (lb.priority_loads): common_lb_config.healthy_panic_threshold and
    # load_assignment.policy.overprovisioning_factor
    healthy_panic_threshold: float = DEFAULT_PANIC_THRESHOLD
    overprovisioning_factor: int = DEFAULT_OVERPROVISIONING
    locality_weighted: bool = False           # common_lb_config.locality_weighted_lb_config
    # round_robin_lb_config / least_request_lb_config
    slow_start: SlowStart | None = None
    choice_count: int = DEFAULT_CHOICE_COUNT
    active_request_bias: float = DEFAULT_ACTIVE_REQUEST_BIAS

    @property
    def observability_name(self) -> str:
        return self.alt_stat_name or self.name

    def bind_source_for(self, family: int) -> SocketAddress | None:
        for src in (self.upstream_bind_source, *self.extra_bind_sources):
            if src is not None and src.family == family:
                return src
        return None


@dataclass(frozen=True, slots=True, kw_only=True)
class Admin:
    address: SocketAddress = field(default_factory=lambda: SocketAddress(address="127.0.0.1",
                                                                         port=15000))


@dataclass(frozen=True, slots=True, kw_only=True)
class Node:
    id: str = ""
    cluster: str = ""
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True, kw_only=True)
class Snapshot:
    """One whole configuration. ``bootstrap_json`` is the bootstrap as proto-JSON, for
    ``/config_dump``; ``listener_json``/``cluster_json`` likewise per resource name."""

    listeners: tuple[Listener, ...]
    clusters: dict[str, Cluster]
    admin: Admin = field(default_factory=Admin)
    node: Node = field(default_factory=Node)
    version_info: str = ""
    bootstrap_json: dict[str, Any] = field(default_factory=dict)
    listener_json: dict[str, dict[str, Any]] = field(default_factory=dict)
    cluster_json: dict[str, dict[str, Any]] = field(default_factory=dict)

    def listener(self, name: str) -> Listener | None:
        return next((li for li in self.listeners if li.name == name), None)
