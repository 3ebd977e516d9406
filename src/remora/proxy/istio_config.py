"""Envoy bootstrap pieces shaped like the ones istiod gives a sidecar, as the plain dicts a
bootstrap file holds (what ``remora proxy -c`` reads, as JSON or YAML).

Owns: the shape of those dicts, one builder a piece: the node, the ``virtualOutbound`` and
``virtualInbound`` listeners, Istio's ``0.0.0.0_<port>`` outbound HTTP listener
(http_inspector, then an http_connection_manager with RDS or an inline route table, Istio's
HTTP filters and access log, TCP passthrough by default), the inbound HTTP filter chain,
``<VIP>_<port>`` TCP listeners, and the passthrough, blackhole, inbound and static clusters.
What the demo (:mod:`remora.demo_sidecar`), the benchmarks and the tests really set
differently is a parameter; an optional field left ``None`` (or ``False``) is left out of the
dict, so Envoy's default applies and each caller gets exactly the fields it asks for.
Must not: read or write files, open sockets or start anything: it builds data only. Parsing
and checking these dicts is :mod:`remora.proxy.bootstrap`'s job.

References (shapes copied, field names are Envoy's v3 API), spec
``dataplane-envoy-pilot-agent.md``: §3 virtualOutbound, §4.1-§4.2 the per-port outbound
listeners, §4.3 the HCM settings, §5.1-§5.3 virtualInbound and its HTTP chain, §5.5-§5.6 the
inbound clusters and 127.0.0.6, §7.3-§7.5 virtual hosts and retries, §10.2 the access log
(Istio ``pilot/pkg/networking/core/listener_builder.go``, ``listener.go``,
``listener_inbound.go``, ``httproute.go``, ``cluster_builder.go``).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, Literal, get_args

from remora.proxy.http.accesslog import ISTIO_TEXT_FORMAT

#: A JSON object of an Envoy bootstrap (or of an RDS file), as the file holds it.
Json = dict[str, Any]

HCM_TYPE = ("type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3."
            "HttpConnectionManager")
TCP_PROXY_TYPE = "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy"
TYPED_STRUCT_TYPE = "type.googleapis.com/udpa.type.v1.TypedStruct"
ROUTE_CONFIGURATION_TYPE = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration"

#: The pod's DNS domain in the services' FQDNs and the node id.
CLUSTER_DOMAIN = "default.svc.cluster.local"
#: Where Istio binds inbound connections to the app from (pilot's InboundPassthroughBindIpv4).
INBOUND_PASSTHROUGH_BIND = "127.0.0.6"

#: The HTTP filters these builders know, in the order of Istio's sidecar HTTP filter chain
#: (outbound and inbound, ``buildHTTPConnectionManager``; spec §4.2, §5.3), minus the ones
#: Remora lacks (authn, authz, RBAC, istio.alpn).
HttpFilterName = Literal[
    "istio.metadata_exchange",
    "envoy.filters.http.grpc_stats",
    "envoy.filters.http.fault",
    "envoy.filters.http.cors",
    "istio.stats",
    "envoy.filters.http.router",
]

#: Istio's sidecar HTTP filter chain: every filter above, in that order.
ISTIO_HTTP_FILTERS: tuple[HttpFilterName, ...] = get_args(HttpFilterName)

#: Istio's default outbound retry policy (pilot/pkg/networking/core/route/retry/retry.go;
#: spec §7.5).
ISTIO_RETRY_POLICY: Json = {
    "retry_on": "connect-failure,refused-stream,unavailable,cancelled,retriable-status-codes",
    "num_retries": 2, "retry_host_predicate": [
        {"name": "envoy.retry_host_predicates.previous_hosts", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.retry.host.previous_hosts.v3."
                     "PreviousHostsPredicate"}}],
    "host_selection_retry_max_attempts": "5"}


# ----------------------------------------------------------------------------- small pieces

def socket_address(ip: str, port: int) -> Json:
    """An ``envoy.config.core.v3.Address`` holding a socket address."""
    return {"socket_address": {"address": ip, "port_value": port}}


def sidecar_node(ip: str, workload: str) -> Json:
    """The node pilot-agent names for pod ``<workload>-1`` of namespace ``default``."""
    return {"id": f"sidecar~{ip}~{workload}-1.default~{CLUSTER_DOMAIN}",
            "cluster": f"{workload}.default",
            "metadata": {"NAME": f"{workload}-1", "NAMESPACE": "default",
                         "WORKLOAD_NAME": workload, "CLUSTER_ID": "Kubernetes",
                         "LABELS": {"app": workload, "version": "v1"}}}


def bootstrap(*, node: Json, listeners: list[Json], clusters: list[Json],
              admin_port: int = 15000) -> Json:
    """A bootstrap with static listeners and clusters and the admin API on 127.0.0.1."""
    return {"node": node, "admin": {"address": socket_address("127.0.0.1", admin_port)},
            "static_resources": {"listeners": listeners, "clusters": clusters}}


def file_access_log(path: str = "/dev/stdout", text_format: str = ISTIO_TEXT_FORMAT
                    ) -> list[Json]:
    """An HCM's or tcp_proxy's ``access_log``: one file logger, Istio's text format by
    default (pilot/pkg/model/telemetry_logging.go; spec §10.2)."""
    return [{"name": "envoy.access_loggers.file", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog",
        "path": path, "log_format": {"text_format_source": {"inline_string": text_format}}}}]


def istio_stats_filter(config: Json | None = None) -> Json:
    """The ``istio.stats`` filter (HTTP or network), with its ``stats.PluginConfig``."""
    return {"name": "istio.stats", "typed_config": {
        "@type": TYPED_STRUCT_TYPE, "type_url": "type.googleapis.com/stats.PluginConfig",
        "value": {} if config is None else config}}


def http_filters(names: Iterable[HttpFilterName] = ISTIO_HTTP_FILTERS, *,
                 istio_stats: Json | None = None) -> list[Json]:
    """An HCM's ``http_filters``, in the order given; ``istio_stats`` is the istio.stats
    filter's PluginConfig (``{}`` when None)."""
    return [_http_filter(name, istio_stats) for name in names]


def _http_filter(name: HttpFilterName, istio_stats: Json | None) -> Json:
    match name:
        case "istio.metadata_exchange":
            return {"name": name, "typed_config": {
                "@type": TYPED_STRUCT_TYPE,
                "type_url": "type.googleapis.com/io.istio.http.metadata_exchange.Config",
                "value": {}}}
        case "envoy.filters.http.grpc_stats":
            return {"name": name, "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.grpc_stats.v3."
                         "FilterConfig", "emit_filter_state": True,
                "stats_for_all_methods": True}}
        case "envoy.filters.http.fault":
            return {"name": name, "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.fault.v3."
                         "HTTPFault"}}
        case "envoy.filters.http.cors":
            return {"name": name, "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.cors.v3.Cors"}}
        case "istio.stats":
            return istio_stats_filter(istio_stats)
        case "envoy.filters.http.router":
            return {"name": name, "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3."
                         "Router"}}


# ----------------------------------------------------------------------------- routes

def service_vhost(service: str, port: int, vip: str, routes: list[Json], *,
                  fqdn_dot: bool = True, include_request_attempt_count: bool = True) -> Json:
    """The ``<fqdn>:<port>`` virtual host of a service in namespace ``default``: matched by
    its FQDN (and, with ``fqdn_dot``, the FQDN with a final dot, Istio ≥1.27), its short
    names and its VIP (``generateVirtualHostDomains``; spec §7.3)."""
    fqdn = f"{service}.{CLUSTER_DOMAIN}"
    vhost: Json = {"name": f"{fqdn}:{port}",
                   "domains": [fqdn, *([f"{fqdn}."] if fqdn_dot else []), service,
                               f"{service}.default.svc", f"{service}.default", vip],
                   "routes": routes}
    if include_request_attempt_count:
        vhost["include_request_attempt_count"] = True
    return vhost


def allow_any_vhost() -> Json:
    """``allow_any``: any other host through to PassthroughCluster (outboundTrafficPolicy
    ALLOW_ANY, Istio's default)."""
    return {"name": "allow_any", "domains": ["*"], "routes": [{
        "name": "allow_any", "match": {"prefix": "/"},
        "route": {"cluster": "PassthroughCluster", "timeout": "0s"}}]}


def rds_file(route_configs: Iterable[Json]) -> Json:
    """What an RDS file holds (see :func:`rds_from_file`): the route configurations."""
    return {"version_info": "1", "resources": [
        {"@type": ROUTE_CONFIGURATION_TYPE, **rc} for rc in route_configs]}


# ----------------------------------------------------------------------------- the HCM

def rds_from_file(route_config_name: str, path: str) -> Json:
    """An HCM's ``rds``: the route configuration ``route_config_name`` from an RDS file."""
    return {"route_config_name": route_config_name,
            "config_source": {"path_config_source": {"path": path}}}


def http_connection_manager(
        stat_prefix: str, *,
        rds: Json | None = None,
        route_config: Json | None = None,
        http_filters: list[Json],
        access_log: list[Json],
        websocket: bool = False,
        tracing: Json | None = None,
        server_name: str | None = None,
        server_header_transformation: str | None = None,
        use_remote_address: bool | None = False,
        normalize_path: bool | None = True,
        stream_idle_timeout: str | None = "0s") -> Json:
    """The ``envoy.filters.network.http_connection_manager`` network filter. Routes come from
    ``rds`` (see :func:`rds_from_file`) or an inline ``route_config``, exactly one. The last
    three default to what Istio sets (spec §4.3); None leaves a field out, as every other
    None does."""
    if (rds is None) == (route_config is None):
        raise ValueError("http_connection_manager takes exactly one of rds and route_config")
    cfg: Json = {"@type": HCM_TYPE, "stat_prefix": stat_prefix}
    if rds is not None:
        cfg["rds"] = rds
    if route_config is not None:
        cfg["route_config"] = route_config
    cfg["http_filters"] = http_filters
    cfg["access_log"] = access_log
    optional: Json = {
        "upgrade_configs": [{"upgrade_type": "websocket"}] if websocket else None,
        "tracing": tracing, "server_name": server_name,
        "server_header_transformation": server_header_transformation,
        "use_remote_address": use_remote_address, "normalize_path": normalize_path,
        "stream_idle_timeout": stream_idle_timeout}
    cfg.update((k, v) for k, v in optional.items() if v is not None)
    return {"name": "envoy.filters.network.http_connection_manager", "typed_config": cfg}


# ----------------------------------------------------------------------------- listeners

def tcp_proxy_chain(name: str, cluster: str, match: Json | None = None) -> Json:
    """A filter chain holding one tcp_proxy to ``cluster`` (its stat prefix too)."""
    chain: Json = {"name": name, "filters": [{
        "name": "envoy.filters.network.tcp_proxy",
        "typed_config": {"@type": TCP_PROXY_TYPE, "stat_prefix": cluster,
                         "cluster": cluster}}]}
    if match is not None:
        chain["filter_chain_match"] = match
    return chain


def _protocol_detection(listener: Json, timeout: str | None) -> Json:
    """Istio's protocol detection settings: ``listener_filters_timeout``
    (meshConfig.protocolDetectionTimeout, 0s: none) and
    ``continue_on_listener_filters_timeout`` (spec §4.1, §5.1)."""
    if timeout is not None:
        listener["listener_filters_timeout"] = timeout
        listener["continue_on_listener_filters_timeout"] = True
    return listener


def virtual_outbound(port: int = 15001) -> Json:
    """``virtualOutbound``: what iptables redirects outbound connections to; each goes on to
    the listener of its original destination, or through to PassthroughCluster."""
    return {"name": "virtualOutbound", "address": socket_address("0.0.0.0", port),
            "use_original_dst": True, "traffic_direction": "OUTBOUND",
            "filter_chains": [
                tcp_proxy_chain("virtualOutbound-blackhole", "BlackHoleCluster",
                                {"destination_port": port}),
                tcp_proxy_chain("virtualOutbound-catchall-tcp", "PassthroughCluster")]}


def outbound_http_listener(port: int, hcm: Json, *,
                           listener_filters_timeout: str | None = "0s") -> Json:
    """Istio's ``0.0.0.0_<port>`` outbound listener (not bound: virtualOutbound hands it
    connections): http_inspector picks the ``hcm`` chain for HTTP/1.1 and h2c, anything
    else goes through to PassthroughCluster. ``hcm`` is from
    :func:`http_connection_manager`; ``listener_filters_timeout`` None leaves Istio's
    protocol-detection fields out."""
    return _protocol_detection({
        "name": f"0.0.0.0_{port}", "address": socket_address("0.0.0.0", port),
        "bind_to_port": False, "traffic_direction": "OUTBOUND",
        "listener_filters": [{"name": "envoy.filters.listener.http_inspector", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.listener.http_inspector.v3."
                     "HttpInspector"}}],
        "filter_chains": [{
            "filter_chain_match": {"application_protocols": ["http/1.1", "h2c"],
                                   "transport_protocol": "raw_buffer"},
            "filters": [hcm]}],
        "default_filter_chain": tcp_proxy_chain("PassthroughFilterChain",
                                                "PassthroughCluster")},
        listener_filters_timeout)


def outbound_tcp_listener(vip: str, port: int, cluster: str, *,
                          access_log: list[Json]) -> Json:
    """Istio's ``<VIP>_<port>`` outbound TCP listener: istio.stats, then tcp_proxy to the
    service's cluster with an access log."""
    return {
        "name": f"{vip}_{port}", "address": socket_address(vip, port), "bind_to_port": False,
        "traffic_direction": "OUTBOUND", "listener_filters_timeout": "0s",
        "filter_chains": [{"filters": [
            istio_stats_filter(),
            {"name": "envoy.filters.network.tcp_proxy", "typed_config": {
                "@type": TCP_PROXY_TYPE, "stat_prefix": cluster, "cluster": cluster,
                "access_log": access_log}}]}],
    }


def inbound_http_chain(port: int, hcm: Json) -> Json:
    """virtualInbound's ``0.0.0.0_<port>`` chain: connections to the app's ``port`` through
    the inbound ``hcm`` (from :func:`http_connection_manager`)."""
    return {"name": f"0.0.0.0_{port}", "filter_chain_match": {"destination_port": port},
            "filters": [hcm]}


def virtual_inbound(chains: Sequence[Json], *, port: int = 15006,
                    catchall: str | None = "virtualInbound",
                    listener_filters_timeout: str | None = "0s") -> Json:
    """``virtualInbound``: original_dst, then a blackhole chain for its own port, the
    ``chains`` (e.g. :func:`inbound_http_chain`) and, unless ``catchall`` is None, a chain of
    that name through to InboundPassthroughCluster for every other port (Istio names its
    TCP passthrough chain ``virtualInbound``: spec §5.2)."""
    filter_chains = [tcp_proxy_chain("virtualInbound-blackhole", "BlackHoleCluster",
                                     {"destination_port": port}), *chains]
    if catchall is not None:
        filter_chains.append(tcp_proxy_chain(catchall, "InboundPassthroughCluster"))
    return _protocol_detection({
        "name": "virtualInbound", "address": socket_address("0.0.0.0", port),
        "traffic_direction": "INBOUND",
        "listener_filters": [{"name": "envoy.filters.listener.original_dst", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.listener.original_dst.v3."
                     "OriginalDst"}}],
        "filter_chains": filter_chains}, listener_filters_timeout)


# ----------------------------------------------------------------------------- clusters

def load_assignment(cluster: str, endpoints: Iterable[tuple[str, int]]) -> Json:
    """A cluster's ``load_assignment``: one locality holding ``endpoints`` (ip, port)."""
    return {"cluster_name": cluster, "endpoints": [{"lb_endpoints": [
        {"endpoint": {"address": socket_address(ip, port)}} for ip, port in endpoints]}]}


def static_cluster(name: str, endpoints: Iterable[tuple[str, int]], *, connect_timeout: str,
                   lb_policy: str | None = None) -> Json:
    """A STATIC cluster of ``endpoints`` (ip, port)."""
    cluster: Json = {"name": name, "type": "STATIC", "connect_timeout": connect_timeout}
    if lb_policy is not None:
        cluster["lb_policy"] = lb_policy
    cluster["load_assignment"] = load_assignment(name, endpoints)
    return cluster


def original_dst_cluster(name: str, *, connect_timeout: str, inbound: bool = False,
                         alt_stat_name: bool = False,
                         protocol_options: Json | None = None) -> Json:
    """An ORIGINAL_DST cluster (each connection goes where it was headed). ``inbound``: bound
    to 127.0.0.6 as Istio's inbound clusters are (the app sees the proxy, not the peer);
    ``alt_stat_name``: stats under ``<name>;`` as istiod names them;
    ``protocol_options``: ``typed_extension_protocol_options`` (e.g. :func:`upstream_http2`)."""
    cluster: Json = {"name": name}
    if alt_stat_name:
        cluster["alt_stat_name"] = name + ";"
    cluster.update(type="ORIGINAL_DST", lb_policy="CLUSTER_PROVIDED",
                   connect_timeout=connect_timeout)
    if inbound:
        cluster["upstream_bind_config"] = {
            "source_address": {"address": INBOUND_PASSTHROUGH_BIND, "port_value": 0}}
    if protocol_options is not None:
        cluster["typed_extension_protocol_options"] = protocol_options
    return cluster


def passthrough_clusters(connect_timeout: str) -> list[Json]:
    """PassthroughCluster (outbound, to the original destination) and BlackHoleCluster."""
    return [original_dst_cluster("PassthroughCluster", connect_timeout=connect_timeout),
            {"name": "BlackHoleCluster", "type": "STATIC", "connect_timeout": connect_timeout}]


def inbound_passthrough_cluster(connect_timeout: str) -> Json:
    """InboundPassthroughCluster: virtualInbound's catch-all, to the app from 127.0.0.6."""
    return original_dst_cluster("InboundPassthroughCluster", connect_timeout=connect_timeout,
                                inbound=True)


def upstream_http2() -> Json:
    """``typed_extension_protocol_options`` for a cluster that speaks HTTP/2 upstream."""
    return {"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
        "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
        "explicit_http_config": {"http2_protocol_options": {}}}}
