"""Istio's standard metrics, as the Istio stats filter reports them, and HTTP peer metadata.

Owns: :class:`WorkloadMeta` (who a proxy's workload is, from the bootstrap node metadata), the
``x-envoy-peer-metadata`` / ``x-envoy-peer-metadata-id`` exchange (encode and decode), the
derivation of ``destination_service*`` from a cluster name, and recording
``istio_requests_total``, ``istio_request_duration_milliseconds``, ``istio_request_bytes``,
``istio_response_bytes`` and the four ``istio_tcp_*`` counters into a worker's
:class:`~remora.proxy.stats.Stats` with Istio's label names, order and fallbacks.
Must not: do IO, or decide when a request is finished (the connection manager calls in).

References (behaviour matched, no code taken): istio/proxy
``source/extensions/filters/http/istio_stats/istio_stats.cc`` (tag order and values,
``populatePeerInfo``: "unknown" / "latest" fallbacks, the destination service from cluster
metadata or the Host header, ``connection_security_policy``), ``source/extensions/filters/http/
peer_metadata/filter.cc`` and ``extensions/common/metadata_object.{h,cc}`` (header names,
base64 of a deterministically serialized ``google.protobuf.Struct`` with ``NAME``,
``NAMESPACE``, ``WORKLOAD_NAME``, ``CLUSTER_ID``, ``LABELS``, ``OWNER``); istio.io
"Istio Standard Metrics"; spec ``dataplane-envoy-pilot-agent.md`` §9, §11.5.
"""

from __future__ import annotations

import base64
import binascii
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final, Literal, TypeVar

from google.protobuf import duration_pb2, struct_pb2
from google.protobuf.message import DecodeError

from remora.proxy.http.accesslog import inferred_grpc_status, response_flags_text
from remora.proxy.http.routes import is_grpc_request
from remora.proxy.http.types import HeaderMap, StreamInfo
from remora.proxy.stats import Family, Labels, Stats

Reporter = Literal["source", "destination"]

PEER_METADATA_ID: Final = "x-envoy-peer-metadata-id"
PEER_METADATA: Final = "x-envoy-peer-metadata"

#: Istio registers this custom stat namespace: stats are ``istiocustom.istio_requests_total…``
#: inside Envoy and ``istio_requests_total`` in Prometheus output.
NAMESPACE: Final = "istiocustom"

UNKNOWN: Final = "unknown"
LATEST: Final = "latest"

# Labels in the order the stats filter pushes its tags (istio_stats.cc): reporter, the peer
# block, then the request block. TCP metrics have no response_code / grpc_response_status.
_PEER_LABELS = (
    "reporter", "source_workload", "source_canonical_service", "source_canonical_revision",
    "source_workload_namespace", "source_principal", "source_app", "source_version",
    "source_cluster", "destination_workload", "destination_workload_namespace",
    "destination_principal", "destination_app", "destination_version", "destination_service",
    "destination_canonical_service", "destination_canonical_revision",
    "destination_service_name", "destination_service_namespace", "destination_cluster")
HTTP_LABELS: Final[Labels] = (*_PEER_LABELS, "request_protocol", "response_code",
                       "grpc_response_status", "response_flags", "connection_security_policy")
TCP_LABELS: Final[Labels] = (*_PEER_LABELS, "request_protocol", "response_flags",
                      "connection_security_policy")

REQUESTS_TOTAL: Final = "istio_requests_total"
REQUEST_DURATION: Final = "istio_request_duration_milliseconds"
REQUEST_BYTES: Final = "istio_request_bytes"
RESPONSE_BYTES: Final = "istio_response_bytes"
TCP_OPENED: Final = "istio_tcp_connections_opened_total"
TCP_CLOSED: Final = "istio_tcp_connections_closed_total"
TCP_SENT: Final = "istio_tcp_sent_bytes_total"
TCP_RECEIVED: Final = "istio_tcp_received_bytes_total"
REQUEST_MESSAGES: Final = "istio_request_messages_total"
RESPONSE_MESSAGES: Final = "istio_response_messages_total"
#: gRPC message counts carry the reporter and peer labels only.
MESSAGE_LABELS: Final[Labels] = _PEER_LABELS
#: PluginConfig.tcp_reporting_duration's default (istio_stats.cc).
DEFAULT_REPORTING_DURATION: Final = 5.0

# Label keys Istio reads from LABELS (metadata_object.h), with the qualified fallbacks.
CANONICAL_NAME = "service.istio.io/canonical-name"
CANONICAL_REVISION = "service.istio.io/canonical-revision"
_APP_KEYS = ("app", "app.kubernetes.io/name")
_VERSION_KEYS = ("version", "app.kubernetes.io/version")
_SPECIAL_LABELS = frozenset({CANONICAL_NAME, CANONICAL_REVISION, *_APP_KEYS, *_VERSION_KEYS})


@dataclass(frozen=True, slots=True)
class WorkloadMeta:
    """A workload as the stats filter sees it (``WorkloadMetadataObject``). ``name`` is the
    instance (pod) name; ``principal`` its SPIFFE identity when known; ``service_host`` (a
    Remora addition) the FQDN of the service the workload serves, which Istio reads from the
    inbound cluster's metadata; ``labels`` the other labels, sorted."""

    name: str = ""
    namespace: str = ""
    workload_name: str = ""
    app: str = ""
    version: str = ""
    canonical_service: str = ""
    canonical_revision: str = ""
    cluster_id: str = ""
    mesh_id: str = ""
    owner: str = ""
    principal: str = ""
    service_host: str = ""
    labels: tuple[tuple[str, str], ...] = ()


def _first(labels: Mapping[str, Any], keys: tuple[str, ...]) -> str:
    for k in keys:
        v = labels.get(k)
        if isinstance(v, str) and v:
            return v
    return ""


def _text(d: Mapping[str, Any], key: str) -> str:
    v = d.get(key)
    return v if isinstance(v, str) else ""


def workload_from_node(metadata: Mapping[str, Any], *, principal: str = "",
                       service_host: str = "") -> WorkloadMeta:
    """From the bootstrap ``node.metadata`` (a plain dict, as
    :attr:`remora.proxy.model.Node.metadata` holds it): ``NAME``, ``NAMESPACE``,
    ``WORKLOAD_NAME``, ``LABELS`` (``app``, ``version``, ``service.istio.io/canonical-*``),
    ``CLUSTER_ID``, ``MESH_ID``, ``OWNER``. Missing keys stay ""."""
    raw = metadata.get("LABELS")
    labels: Mapping[str, Any] = raw if isinstance(raw, Mapping) else {}
    return WorkloadMeta(
        name=_text(metadata, "NAME"), namespace=_text(metadata, "NAMESPACE"),
        workload_name=_text(metadata, "WORKLOAD_NAME"),
        app=_first(labels, _APP_KEYS), version=_first(labels, _VERSION_KEYS),
        canonical_service=_text(labels, CANONICAL_NAME),
        canonical_revision=_text(labels, CANONICAL_REVISION),
        cluster_id=_text(metadata, "CLUSTER_ID"), mesh_id=_text(metadata, "MESH_ID"),
        owner=_text(metadata, "OWNER"), principal=principal, service_host=service_host,
        labels=tuple(sorted((k, v) for k, v in labels.items()
                            if isinstance(v, str) and k not in _SPECIAL_LABELS)))


# ----------------------------------------------------------------------------- peer metadata


def metadata_struct(meta: WorkloadMeta) -> struct_pb2.Struct:
    """``convertWorkloadMetadataToStruct``: set fields only; LABELS always present."""
    s = struct_pb2.Struct()
    for key, value in (("NAME", meta.name), ("NAMESPACE", meta.namespace),
                       ("WORKLOAD_NAME", meta.workload_name), ("CLUSTER_ID", meta.cluster_id)):
        if value:
            s.fields[key].string_value = value
    labels = s.fields["LABELS"].struct_value
    for key, value in ((CANONICAL_NAME, meta.canonical_service),
                       (CANONICAL_REVISION, meta.canonical_revision),
                       ("app", meta.app), ("version", meta.version)):
        if value:
            labels.fields[key].string_value = value
    if meta.owner:
        s.fields["OWNER"].string_value = meta.owner
    return s


def encode_peer_metadata(meta: WorkloadMeta, node_id: str = "") -> dict[str, str]:
    """The two headers a sidecar adds to outbound requests (and to responses of requests
    that carried them): ``x-envoy-peer-metadata-id`` (the node id) and
    ``x-envoy-peer-metadata`` (base64 of the deterministically serialized Struct). Compute
    once per workload; the value does not change."""
    data = metadata_struct(meta).SerializeToString(deterministic=True)
    return {PEER_METADATA_ID: node_id, PEER_METADATA: base64.b64encode(data).decode("ascii")}


_B64 = re.compile(r"[A-Za-z0-9+/]*={0,2}")
_CACHE_MAX: Final = 1024
K = TypeVar("K")
V = TypeVar("V")


def _keep(cache: dict[K, V], key: K, value: V) -> None:
    """Remember ``value`` in one of this module's per-input caches, which are bounded (their
    keys come from requests): a full cache starts over."""
    if len(cache) >= _CACHE_MAX:
        cache.clear()
    cache[key] = value


_decoded: dict[str, WorkloadMeta | None] = {}


def decode_peer_metadata_value(value: str) -> WorkloadMeta | None:
    """One ``x-envoy-peer-metadata`` value; garbage (bad base64, not a Struct, no known
    field) gives None. Results are cached per value (peers send the same bytes every time,
    as Istio's per-id cache assumes)."""
    try:
        return _decoded[value]
    except KeyError:
        pass
    meta = _decode(value)
    _keep(_decoded, value, meta)
    return meta


def _decode(value: str) -> WorkloadMeta | None:
    v = value.strip()
    if not v or not _B64.fullmatch(v):
        return None
    try:
        raw = base64.b64decode(v + "=" * (-len(v) % 4))   # Envoy decodes without padding
    except (binascii.Error, ValueError):
        return None
    s = struct_pb2.Struct()
    try:
        s.ParseFromString(raw)
    except (DecodeError, RuntimeError, ValueError):
        return None
    fields = s.fields

    def text(key: str) -> str:
        if key not in fields:
            return ""
        f = fields[key]
        return f.string_value if f.WhichOneof("kind") == "string_value" else ""
    labels: dict[str, str] = {}
    if "LABELS" in fields and fields["LABELS"].WhichOneof("kind") == "struct_value":
        for k, lv in fields["LABELS"].struct_value.fields.items():
            if lv.WhichOneof("kind") == "string_value":
                labels[k] = lv.string_value
    meta = WorkloadMeta(
        name=text("NAME"), namespace=text("NAMESPACE"), workload_name=text("WORKLOAD_NAME"),
        app=_first(labels, _APP_KEYS), version=_first(labels, _VERSION_KEYS),
        canonical_service=labels.get(CANONICAL_NAME, ""),
        canonical_revision=labels.get(CANONICAL_REVISION, ""),
        cluster_id=text("CLUSTER_ID"), mesh_id=text("MESH_ID"), owner=text("OWNER"),
        labels=tuple(sorted((k, v) for k, v in labels.items() if k not in _SPECIAL_LABELS)))
    return None if meta == WorkloadMeta() else meta


def decode_peer_metadata(headers: HeaderMap | Mapping[str, str]) -> WorkloadMeta | None:
    """The peer's metadata from request (inbound) or response (outbound) headers, or None.
    Never raises."""
    try:
        value = headers.get(PEER_METADATA)
        return decode_peer_metadata_value(value) if isinstance(value, str) else None
    except Exception:           # garbage in a header must never fail a request
        return None


def strip_peer_metadata(headers: HeaderMap) -> bool:
    """Remove both headers (the receiving proxy consumes them, as Istio's filter does);
    returns whether the metadata header was present (then the response carries ours)."""
    had = PEER_METADATA in headers
    headers.remove(PEER_METADATA)
    headers.remove(PEER_METADATA_ID)
    return had


# ----------------------------------------------------------------------------- destination


@dataclass(frozen=True, slots=True)
class DestinationService:
    """``destination_service`` (host), ``destination_service_name`` (name) and the service's
    namespace (informational: Istio fills ``destination_service_namespace`` from the peer or
    the local workload, not from here). "" = unknown."""

    host: str = ""
    name: str = ""
    namespace: str = ""


#: Clusters whose name is used as the service name (istio_stats.cc).
PASSTHROUGH_CLUSTERS: Final = frozenset({
    "BlackHoleCluster", "PassthroughCluster", "InboundPassthroughCluster",
    "InboundPassthroughClusterIpv4", "InboundPassthroughClusterIpv6"})

_K8S_SVC = re.compile(r"^([^.]+)\.([^.]+)\.svc(\.|$)")


def service_of_host(host: str) -> DestinationService:
    """A service FQDN as Istio's cluster metadata describes it: ``reviews.default.svc.
    cluster.local`` → name ``reviews``, namespace ``default``; other hosts (ServiceEntry)
    are their own name."""
    m = _K8S_SVC.match(host)
    if m:
        return DestinationService(host=host, name=m.group(1), namespace=m.group(2))
    return DestinationService(host=host, name=host)


# Per-request results kept per input (bounded: the authority comes from the request). The
# workload objects are keyed by identity and checked on a hit (a frozen dataclass's hash
# would cost more than the derivation).
_DEST_CACHE: Final[dict[tuple[str, str, str, int],
                         tuple[WorkloadMeta | None, DestinationService]]] = {}
_LABELS_CACHE: Final[dict[tuple[str, int, int, str, str, str],
                          tuple[WorkloadMeta, WorkloadMeta | None, Labels]]] = {}
_HTTP_LABELS_CACHE: Final[dict[tuple[int, bool, int, str, str, bool],
                               tuple[Labels, Labels]]] = {}


def destination_service(cluster: str, *, authority: str = "", route_name: str = "",
                        local: WorkloadMeta | None = None) -> DestinationService:
    """:func:`derive_destination_service`, remembered per input."""
    key = (cluster, authority, route_name, id(local))
    hit = _DEST_CACHE.get(key)
    if hit is not None and hit[0] is local:
        return hit[1]
    service = derive_destination_service(cluster, authority=authority, route_name=route_name,
                                         local=local)
    _keep(_DEST_CACHE, key, (local, service))
    return service


def derive_destination_service(cluster: str, *, authority: str = "", route_name: str = "",
                               local: WorkloadMeta | None = None) -> DestinationService:
    """Istio's derivation: start from the request's Host (``authority`` as received, port
    included, as Istio's Host-header fallback does), then ``block_all`` / ``allow_any``
    routes and passthrough clusters name themselves, else the cluster's service: an
    ``outbound|port|subset|host`` cluster names its host; an ``inbound|…`` cluster the local
    workload's :attr:`WorkloadMeta.service_host` when known."""
    if route_name == "block_all":
        return DestinationService(host=authority, name="BlackHoleCluster")
    if route_name == "allow_any":
        return DestinationService(host=authority, name="PassthroughCluster")
    if cluster in PASSTHROUGH_CLUSTERS:
        return DestinationService(host=authority, name=cluster)
    parts = cluster.split("|")
    if len(parts) == 4 and parts[0] == "outbound" and parts[3]:
        return service_of_host(parts[3])
    if len(parts) == 4 and parts[0] == "inbound":
        if parts[3]:
            return service_of_host(parts[3])
        if local is not None and local.service_host:
            return service_of_host(local.service_host)
    return DestinationService(host=authority, name=authority)


# ----------------------------------------------------------------------------- recording


def _or(value: str, default: str) -> str:
    return value or default


def _namespace_of(principal: str) -> str:
    """``spiffe://td/ns/<ns>/sa/<sa>`` → ``<ns>`` (Istio prefers the SAN's namespace)."""
    i = principal.find("/ns/")
    if i < 0:
        return ""
    rest = principal[i + 4:]
    return rest.split("/", 1)[0]


_NO_PEER: Final = WorkloadMeta()


def peer_labels(reporter: Reporter, local: WorkloadMeta, peer: WorkloadMeta | None,
                service: DestinationService, *, peer_principal: str = "") -> Labels:
    """:func:`derive_peer_labels`, remembered per input (the peers' metadata objects are
    themselves kept per header value)."""
    key = (reporter, id(local), id(peer), service.host, service.name, peer_principal)
    hit = _LABELS_CACHE.get(key)
    if hit is not None and hit[0] is local and hit[1] is peer:
        return hit[2]
    labels = derive_peer_labels(reporter, local, peer, service, peer_principal=peer_principal)
    _keep(_LABELS_CACHE, key, (local, peer, labels))
    return labels


def derive_peer_labels(reporter: Reporter, local: WorkloadMeta, peer: WorkloadMeta | None,
                       service: DestinationService, *, peer_principal: str = "") -> Labels:
    """reporter … destination_cluster, as ``populatePeerInfo`` pushes them. Local values are
    used as they are (Istio does not replace an empty local label); peer values fall back to
    "unknown" (canonical revision: "latest")."""
    p = peer if peer is not None else _NO_PEER
    peer_ns = _namespace_of(peer_principal) or p.namespace
    if reporter == "destination":
        return (
            "destination",
            _or(p.workload_name, UNKNOWN), _or(p.canonical_service, UNKNOWN),
            _or(p.canonical_revision, LATEST), _or(peer_ns, UNKNOWN),
            _or(peer_principal, UNKNOWN), _or(p.app, UNKNOWN), _or(p.version, UNKNOWN),
            _or(p.cluster_id, UNKNOWN),
            local.workload_name, local.namespace, _or(local.principal, UNKNOWN), local.app,
            local.version, service.host or local.canonical_service, local.canonical_service,
            local.canonical_revision, service.name or local.canonical_service,
            local.namespace, local.cluster_id)
    return (
        "source",
        local.workload_name, local.canonical_service, local.canonical_revision,
        local.namespace, _or(local.principal, UNKNOWN), local.app, local.version,
        local.cluster_id,
        _or(p.workload_name, UNKNOWN), _or(peer_ns, UNKNOWN), _or(peer_principal, UNKNOWN),
        _or(p.app, UNKNOWN), _or(p.version, UNKNOWN), _or(service.host, UNKNOWN),
        _or(p.canonical_service, UNKNOWN), _or(p.canonical_revision, LATEST),
        _or(service.name, UNKNOWN), _or(peer_ns, UNKNOWN), _or(p.cluster_id, UNKNOWN))


def security_policy(reporter: Reporter, mtls: bool) -> str:
    """``mutual_tls`` / ``none`` on destination reports; the client side never knows
    ("unknown")."""
    if reporter == "source":
        return UNKNOWN
    return "mutual_tls" if mtls else "none"


def is_grpc(info: StreamInfo) -> bool:
    """Envoy's ``isGrpcRequestHeaders``: content-type ``application/grpc`` (``+proto`` …)."""
    return info.request is not None and is_grpc_request(info.request)


def _service(value: DestinationService | str) -> DestinationService:
    return service_of_host(value) if isinstance(value, str) else value


def _whole_ms(seconds: float) -> int:
    return math.floor(seconds * 1000 + 1e-6)


class _HttpFamilies:
    """The four families :func:`record_http` updates, looked up once per store."""

    __slots__ = ("duration", "request_bytes", "requests", "response_bytes", "store")

    def __init__(self, store: Stats) -> None:
        self.store = store
        self.requests: Family = store.family(REQUESTS_TOTAL, "counter", HTTP_LABELS,
                                             namespace=NAMESPACE)
        self.duration: Family = store.family(REQUEST_DURATION, "histogram", HTTP_LABELS,
                                             namespace=NAMESPACE)
        self.request_bytes: Family = store.family(REQUEST_BYTES, "histogram", HTTP_LABELS,
                                                  namespace=NAMESPACE)
        self.response_bytes: Family = store.family(RESPONSE_BYTES, "histogram", HTTP_LABELS,
                                                   namespace=NAMESPACE)


# The last store's families (a worker has one store; a family, once made, stays in it).
_last_families: list[_HttpFamilies] = []


def _http_families(store: Stats) -> _HttpFamilies:
    if _last_families and _last_families[0].store is store:
        return _last_families[0]
    fams = _HttpFamilies(store)
    _last_families[:] = [fams]
    return fams


def record_http(store: Stats, *, reporter: Reporter, local: WorkloadMeta,
                peer: WorkloadMeta | None, info: StreamInfo,
                destination_service: DestinationService | str, mtls: bool = False,
                peer_principal: str = "", request_bytes: int | None = None,
                response_bytes: int | None = None) -> Labels:
    """Report one finished HTTP request (call it where access logs are written, once the
    stream is complete): ``istio_requests_total`` +1, the duration (whole ms, only when the
    request completed) and the request/response sizes. Istio measures the sizes on the wire
    (headers included); the body counts of ``info`` are used unless ``request_bytes`` /
    ``response_bytes`` say otherwise. Returns the label values used."""
    grpc = is_grpc(info)
    # istio_stats.cc: Grpc::Common::getGrpcStatus(trailers, headers, info), so a gRPC
    # request answered without grpc-status gets one inferred from the HTTP status
    code = inferred_grpc_status(info) if grpc else None
    grpc_status = "" if code is None else str(code)
    peer_part = peer_labels(reporter, local, peer, _service(destination_service),
                            peer_principal=peer_principal)
    # The same tuple object for the same labels, so that the histograms find their series
    # without hashing it (stats.Family.observe).
    flags = response_flags_text(info.response_flags)
    key = (id(peer_part), grpc, info.response_code, grpc_status, flags, mtls)
    hit = _HTTP_LABELS_CACHE.get(key)
    if hit is not None and hit[0] is peer_part:
        labels = hit[1]
    else:
        labels = (*peer_part, "grpc" if grpc else "http", str(info.response_code), grpc_status,
                  flags, security_policy(reporter, mtls))
        _keep(_HTTP_LABELS_CACHE, key, (peer_part, labels))
    fams = _http_families(store)
    fams.requests.inc(labels)
    if info.duration is not None:
        fams.duration.observe(labels, _whole_ms(info.duration))
    fams.request_bytes.observe(
        labels, info.bytes_received if request_bytes is None else request_bytes)
    fams.response_bytes.observe(
        labels, info.bytes_sent if response_bytes is None else response_bytes)
    return labels


def record_grpc_messages(store: Stats, labels: Labels, *, requests: int,
                         responses: int) -> None:
    """Add a gRPC stream's message-count deltas (``labels``: :func:`peer_labels`). Both
    series are made even for a zero delta, as Istio's ``addCounter`` does."""
    store.family(REQUEST_MESSAGES, "counter", MESSAGE_LABELS, namespace=NAMESPACE).inc(
        labels, requests)
    store.family(RESPONSE_MESSAGES, "counter", MESSAGE_LABELS, namespace=NAMESPACE).inc(
        labels, responses)


@dataclass(frozen=True, slots=True)
class StatsPluginConfig:
    """The ``istio.stats`` filter's ``stats.PluginConfig`` (a TypedStruct value), as far as
    Remora implements it. ``disable_host_header_fallback``: the destination service is not
    taken from the Host header (Istio sets it on inbound listeners and gateways);
    ``reporting_duration``: seconds between a long gRPC stream's reports."""

    disable_host_header_fallback: bool = False
    reporting_duration: float = DEFAULT_REPORTING_DURATION


# PluginConfig fields by either JSON spelling; the unimplemented ones are refused unless they
# hold their default (metric overrides and definitions are CEL; rotation evicts series).
_PLUGIN_FIELDS: Final = {
    "disable_host_header_fallback": "disable_host_header_fallback",
    "disableHostHeaderFallback": "disable_host_header_fallback",
    "tcp_reporting_duration": "tcp_reporting_duration",
    "tcpReportingDuration": "tcp_reporting_duration",
    "reporter": "reporter", "metrics": "metrics", "definitions": "definitions",
    **{k: k for k in ("rotation_interval", "graceful_deletion_interval",
                      "rescoping_duration", "scope_grace_period_duration")},
    "rotationInterval": "rotation_interval",
    "gracefulDeletionInterval": "graceful_deletion_interval",
    "rescopingDuration": "rescoping_duration",
    "scopeGracePeriodDuration": "scope_grace_period_duration",
}


def _duration(raw: object) -> float:
    if not isinstance(raw, str):
        raise ValueError(f"{raw!r} is not a duration such as \"5s\"")
    d = duration_pb2.Duration()
    try:
        d.FromJsonString(raw)
    except ValueError:
        raise ValueError(f"{raw!r} is not a duration such as \"5s\"") from None
    return float(d.seconds) + float(d.nanos) / 1e9


def compile_plugin_config(value: Mapping[str, Any]) -> StatsPluginConfig:
    """Read a PluginConfig. ValueError ("<field>: <why>") for an unknown field, a malformed
    value, or a feature Remora does not implement: metric overrides and definitions (the
    Telemetry API's tag overrides, CEL expressions), the waypoint reporter, scope rotation."""
    fallback_off = False
    every = DEFAULT_REPORTING_DURATION
    for key, raw in value.items():
        name = _PLUGIN_FIELDS.get(key)
        if name is None:
            raise ValueError(f"{key}: unknown field of stats.PluginConfig")
        if name == "disable_host_header_fallback":
            if not isinstance(raw, bool):
                raise ValueError(f"{key}: {raw!r} is not a boolean")
            fallback_off = raw
        elif name == "tcp_reporting_duration":
            try:
                every = _duration(raw)
            except ValueError as exc:
                raise ValueError(f"{key}: {exc}") from None
        elif name == "reporter":
            if raw not in ("UNSPECIFIED", 0):
                raise ValueError(f"{key}: {raw!r} is not implemented (sidecar reporters "
                                 "only)")
        elif name in ("metrics", "definitions"):
            if raw:
                raise ValueError(f"{key}: metric overrides and definitions are not "
                                 "implemented")
        else:
            try:
                if _duration(raw):
                    raise ValueError(f"{raw!r}: scope rotation is not implemented")
            except ValueError as exc:
                raise ValueError(f"{key}: {exc}") from None
    return StatsPluginConfig(disable_host_header_fallback=fallback_off,
                             reporting_duration=every)


def tcp_labels(*, reporter: Reporter, local: WorkloadMeta, peer: WorkloadMeta | None,
               info: StreamInfo, destination_service: DestinationService | str,
               mtls: bool = False, peer_principal: str = "") -> Labels:
    """A TCP connection's labels. Istio computes them once, when the peer is known or at
    close, and keeps them (flags included) for every later report of the connection."""
    return (*peer_labels(reporter, local, peer, _service(destination_service),
                         peer_principal=peer_principal),
            "tcp", response_flags_text(info.response_flags), security_policy(reporter, mtls))


def record_tcp_open(store: Stats, labels: Labels) -> None:
    store.family(TCP_OPENED, "counter", TCP_LABELS, namespace=NAMESPACE).inc(labels)


def record_tcp_bytes(store: Stats, labels: Labels, *, sent: int, received: int) -> None:
    """Add byte deltas (what was transferred since the last report)."""
    store.family(TCP_SENT, "counter", TCP_LABELS, namespace=NAMESPACE).inc(labels, sent)
    store.family(TCP_RECEIVED, "counter", TCP_LABELS, namespace=NAMESPACE).inc(labels, received)


def record_tcp_close(store: Stats, labels: Labels, *, sent: int = 0, received: int = 0) -> None:
    """The last byte deltas and ``istio_tcp_connections_closed_total`` +1."""
    record_tcp_bytes(store, labels, sent=sent, received=received)
    store.family(TCP_CLOSED, "counter", TCP_LABELS, namespace=NAMESPACE).inc(labels)


def record_tcp(store: Stats, *, reporter: Reporter, local: WorkloadMeta,
               peer: WorkloadMeta | None, info: StreamInfo,
               destination_service: DestinationService | str, mtls: bool = False,
               peer_principal: str = "") -> Labels:
    """A closed TCP connection whose peer was never learnt (no TCP metadata exchange, the
    plaintext case): Istio then reports opened, bytes and closed together at close, with
    the final response flags. ``info.bytes_sent`` is what went to downstream
    (``istio_tcp_sent_bytes_total``), ``bytes_received`` what came from it."""
    labels = tcp_labels(reporter=reporter, local=local, peer=peer, info=info,
                        destination_service=destination_service, mtls=mtls,
                        peer_principal=peer_principal)
    record_tcp_open(store, labels)
    record_tcp_close(store, labels, sent=info.bytes_sent, received=info.bytes_received)
    return labels
