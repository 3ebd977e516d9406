"""Envoy's admin output formats, as pure functions of the proxy's config, stats and host status.

Owns: the bodies of ``/listeners``, ``/clusters``, ``/config_dump``, ``/stats``,
``/stats/prometheus``, ``/server_info``, ``/logging`` and ``/help`` byte for byte as Envoy
prints them, Envoy's proto-JSON printer (field-number order, one-space indentation, 64-bit
integers as strings, ``<``/``>`` escaped) and the stats tag extraction Prometheus output needs.
Must not: do IO, read the clock or the environment, or know about sockets and HTTP; the
caller passes times in (:mod:`remora.proxy.admin` is the HTTP shell).

References (formats are matched, no code is taken): spec ``dataplane-envoy-pilot-agent.md`` §11
and §13; Envoy ``source/server/admin/{clusters,listeners,config_dump,stats,logs,server_info}_
handler.cc``, ``stats_render.cc``, ``prometheus_stats.cc``, ``admin.cc`` (help text);
protobuf ``json/internal/{unparser,writer}.cc`` (the JSON printer Envoy uses); Istio
``tools/packaging/common/envoy_bootstrap.json`` (``stats_tags``).
"""

from __future__ import annotations

import datetime
import ipaddress
import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from remora import __version__
from remora.proxy.model import (
    Cluster,
    HealthStatus,
    LbEndpoint,
    Locality,
    Snapshot,
    SocketAddress,
    Thresholds,
)
from remora.proxy.state import HOST_GAUGES, HOST_STATS, ClusterStatus, HostStatus, ServerState
from remora.proxy.stats import StatsSnapshot

JsonValue = Any


class AdminError(Exception):
    """A request the admin answers with an error status and a plain-text body."""

    def __init__(self, status: int, body: str) -> None:
        super().__init__(body)
        self.status = status
        self.body = body


# ------------------------------------------------------------------------------ proto-JSON

# Characters protobuf's JSON writer escapes beyond JSON's own: "<", ">" and a set of
# invisible/format code points (protobuf json/internal/writer.cc, MustEscape).
_ESCAPE_RANGES = (
    (0x0000, 0x001F), (0x007F, 0x009F), (0x0600, 0x0603), (0x200B, 0x200F), (0x2028, 0x202E),
    (0x2060, 0x2064), (0x206A, 0x206F), (0x1D173, 0x1D17A), (0xE0020, 0xE007F),
)
_ESCAPE_SINGLE = "<>\ufeff\ufff9\ufffa\ufffb\u00ad\u06dd\u070f\u17b4\u17b5\U000e0001"
_SHORT_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t", '"': '\\"', "\f": "\\f", "\b": "\\b",
                  "\\": "\\\\"}


def _needs_escape_class() -> str:
    parts = ['"', "\\\\"]
    parts += [re.escape(c) for c in _ESCAPE_SINGLE]
    for lo, hi in _ESCAPE_RANGES:
        parts.append(f"{re.escape(chr(lo))}-{re.escape(chr(hi))}")
    return "[" + "".join(parts) + "]"


_NEEDS_ESCAPE = re.compile(_needs_escape_class())


def _u_escape(ch: str) -> str:
    cp = ord(ch)
    if cp < 0x10000:
        return f"\\u{cp:04x}"
    cp -= 0x10000
    return f"\\u{0xD800 + (cp >> 10):04x}\\u{0xDC00 + (cp & 0x3FF):04x}"


def quote(s: str) -> str:
    """A JSON string literal, escaped as protobuf's JSON printer does."""
    if not _NEEDS_ESCAPE.search(s):
        return f'"{s}"'
    return '"' + _NEEDS_ESCAPE.sub(lambda m: _SHORT_ESCAPES.get(m[0]) or _u_escape(m[0]), s) + '"'


def format_double(v: float) -> str:
    """protobuf's ``SimpleDtoa``: ``%.15g`` when that round-trips, else ``%.17g``."""
    if math.isnan(v):
        return '"NaN"'
    if math.isinf(v):
        return '"Infinity"' if v > 0 else '"-Infinity"'
    s = f"{v:.15g}"
    if float(s) != v:
        s = f"{v:.17g}"
    return s


def _scalar(v: JsonValue) -> str:
    if v is None:
        return "null"
    if v is True:
        return "true"
    if v is False:
        return "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return format_double(v)
    if isinstance(v, str):
        return quote(v)
    raise TypeError(f"not JSON: {type(v).__name__}")


def proto_json(value: JsonValue) -> str:
    """Pretty proto-JSON as Envoy prints it (``getJsonStringFromMessage(msg, pretty=true)``):
    one space per level, ``"key": value``, ``{}``/``[]`` when empty, a final newline. Key order
    is the dict's (callers build dicts in field-number order, as the printer sorts fields)."""
    out: list[str] = []
    _write(value, 0, out)
    out.append("\n")
    return "".join(out)


def _write(v: JsonValue, depth: int, out: list[str]) -> None:
    if isinstance(v, dict):
        if not v:
            out.append("{}")
            return
        out.append("{")
        pad = "\n" + " " * (depth + 1)
        first = True
        for key, item in v.items():
            out.append(pad if first else "," + pad)
            first = False
            out.append(quote(key))
            out.append(": ")
            _write(item, depth + 1, out)
        out.append("\n" + " " * depth + "}")
    elif isinstance(v, list | tuple):
        if not v:
            out.append("[]")
            return
        out.append("[")
        pad = "\n" + " " * (depth + 1)
        for i, item in enumerate(v):
            out.append(pad if i == 0 else "," + pad)
            _write(item, depth + 1, out)
        out.append("\n" + " " * depth + "]")
    else:
        out.append(_scalar(v))


def compact_json(value: JsonValue) -> str:
    """No whitespace at all (Envoy's ``Json::Streamer``, used by ``/stats?format=json``)."""
    if isinstance(value, dict):
        return "{" + ",".join(f"{quote(k)}:{compact_json(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list | tuple):
        return "[" + ",".join(compact_json(v) for v in value) + "]"
    return _scalar(value)


def format_timestamp(epoch: float) -> str:
    """``google.protobuf.Timestamp`` in JSON: RFC 3339, UTC, 0/3/6/9 fraction digits."""
    micros = round(epoch * 1_000_000)
    secs, frac = divmod(micros, 1_000_000)
    base = datetime.datetime.fromtimestamp(secs, tz=datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S")
    if frac == 0:
        return base + "Z"
    if frac % 1000 == 0:
        return f"{base}.{frac // 1000:03d}Z"
    return f"{base}.{frac:06d}Z"


def format_duration(seconds: int) -> str:
    return f"{seconds}s"


# ------------------------------------------------------------------------------ addresses


def canonical_ip(address: str) -> str:
    """Envoy prints the address it parsed, so IPs come out in canonical form."""
    try:
        return str(ipaddress.ip_address(address))
    except ValueError:
        return address


def address_text(sa: SocketAddress) -> str:
    """``Address::Instance::asString()``: ``ip:port``, ``[ipv6]:port``."""
    ip = canonical_ip(sa.address)
    return f"[{ip}]:{sa.port}" if ":" in ip else f"{ip}:{sa.port}"


def address_json(sa: SocketAddress) -> dict[str, JsonValue]:
    """``envoy.config.core.v3.Address``; ``port_value`` 0 is a default and is left out."""
    inner: dict[str, JsonValue] = {"address": canonical_ip(sa.address)}
    if sa.port:
        inner["port_value"] = sa.port
    return {"socket_address": inner}


# ------------------------------------------------------------------------------ /listeners


def render_listeners(snapshot: Snapshot) -> str:
    """``GET /listeners``: ``<name>::<address>`` per listen address, listener order."""
    return "".join(f"{li.name}::{address_text(a)}\n"
                   for li in snapshot.listeners for a in li.addresses)


def listeners_json(snapshot: Snapshot) -> dict[str, JsonValue]:
    statuses = []
    for li in snapshot.listeners:
        status: dict[str, JsonValue] = {"name": li.name, "local_address": address_json(li.address)}
        if li.additional_addresses:
            status["additional_local_addresses"] = [address_json(a)
                                                    for a in li.additional_addresses]
        statuses.append(status)
    return {"listener_statuses": statuses} if statuses else {}


def render_listeners_json(snapshot: Snapshot) -> str:
    """``GET /listeners?format=json`` (``envoy.admin.v3.Listeners``)."""
    return proto_json(listeners_json(snapshot))


# ------------------------------------------------------------------------------ /clusters

# Envoy's host health flags in the order ``HostUtility::healthFlagsToString`` prints them.
HEALTH_FLAG_ORDER = ("/failed_active_hc", "/failed_outlier_check", "/failed_eds_health",
                     "/degraded_active_hc", "/degraded_eds_health", "/pending_dynamic_removal",
                     "/pending_active_hc", "/excluded_via_immediate_hc_fail", "/active_hc_timeout",
                     "/eds_status_draining")
_HOST_COUNTERS = tuple(s for s in HOST_STATS if s not in HOST_GAUGES)
_HOST_GAUGES = tuple(s for s in HOST_STATS if s in HOST_GAUGES)


def _hosts(cluster: Cluster, status: ClusterStatus | None) -> list[HostStatus]:
    if status is not None:
        return sorted(status.hosts, key=lambda h: h.priority)
    if cluster.type == "ORIGINAL_DST":
        return []          # hosts appear only once used
    return sorted((HostStatus.of(ep) for ep in cluster.endpoints), key=lambda h: h.priority)


def _statuses(statuses: Iterable[ClusterStatus]) -> dict[str, ClusterStatus]:
    return {s.name: s for s in statuses}


def health_flags_text(flags: Sequence[str]) -> str:
    known = [f for f in HEALTH_FLAG_ORDER if f in flags]
    extra = [f for f in flags if f not in HEALTH_FLAG_ORDER]
    return "".join(known + extra) or "healthy"


def _thresholds_text(name: str, priority: str, t: Thresholds) -> list[str]:
    return [f"{name}::{priority}_priority::max_connections::{t.max_connections}\n",
            f"{name}::{priority}_priority::max_pending_requests::{t.max_pending_requests}\n",
            f"{name}::{priority}_priority::max_requests::{t.max_requests}\n",
            f"{name}::{priority}_priority::max_retries::{t.max_retries}\n"]


def render_clusters(snapshot: Snapshot, statuses: Iterable[ClusterStatus]) -> str:
    """``GET /clusters`` (``ClustersHandler::writeClustersAsText``), clusters in config order.

    A cluster without a status lists its configured endpoints (ORIGINAL_DST: none).
    No outlier detection is implemented, so the four ``outlier::`` lines never appear and both
    success rates are ``-1``."""
    by_name = _statuses(statuses)
    out: list[str] = []
    for name, c in snapshot.clusters.items():
        out.append(f"{name}::observability_name::{c.observability_name}\n")
        out += _thresholds_text(name, "default", c.default_thresholds)
        out += _thresholds_text(name, "high", c.high_thresholds)
        out.append(f"{name}::added_via_api::{'true' if c.added_via_api else 'false'}\n")
        if c.eds_service_name:
            out.append(f"{name}::eds_service_name::{c.eds_service_name}\n")
        for h in _hosts(c, by_name.get(name)):
            a = address_text(h.address)
            for stat in sorted(HOST_STATS):
                out.append(f"{name}::{a}::{stat}::{h.stats.get(stat, 0)}\n")
            out.append(f"{name}::{a}::hostname::{h.hostname}\n")
            out.append(f"{name}::{a}::health_flags::{health_flags_text(h.health_flags)}\n")
            out.append(f"{name}::{a}::weight::{h.weight}\n")
            out.append(f"{name}::{a}::region::{h.region}\n")
            out.append(f"{name}::{a}::zone::{h.zone}\n")
            out.append(f"{name}::{a}::sub_zone::{h.sub_zone}\n")
            out.append(f"{name}::{a}::canary::false\n")
            out.append(f"{name}::{a}::priority::{h.priority}\n")
            out.append(f"{name}::{a}::success_rate::-1\n")
            out.append(f"{name}::{a}::local_origin_success_rate::-1\n")
    return "".join(out)


def _thresholds_json(t: Thresholds, priority: str) -> dict[str, JsonValue]:
    out: dict[str, JsonValue] = {}
    if priority != "DEFAULT":
        out["priority"] = priority
    out["max_connections"] = t.max_connections
    out["max_pending_requests"] = t.max_pending_requests
    out["max_requests"] = t.max_requests
    out["max_retries"] = t.max_retries
    return out


def _health_status_json(flags: Sequence[str]) -> dict[str, JsonValue]:
    """``envoy.admin.v3.HostHealthStatus`` (false booleans are defaults, so absent)."""
    out: dict[str, JsonValue] = {}
    if "/failed_active_hc" in flags:
        out["failed_active_health_check"] = True
    if "/failed_outlier_check" in flags:
        out["failed_outlier_check"] = True
    if "/eds_status_draining" in flags:
        out["eds_health_status"] = "DRAINING"
    elif "/failed_eds_health" in flags:
        out["eds_health_status"] = "UNHEALTHY"
    elif "/degraded_eds_health" in flags:
        out["eds_health_status"] = "DEGRADED"
    else:
        out["eds_health_status"] = "HEALTHY"
    for flag, field in (("/degraded_active_hc", "failed_active_degraded_check"),
                        ("/pending_dynamic_removal", "pending_dynamic_removal"),
                        ("/pending_active_hc", "pending_active_hc"),
                        ("/excluded_via_immediate_hc_fail", "excluded_via_immediate_hc_fail"),
                        ("/active_hc_timeout", "active_hc_timeout")):
        if flag in flags:
            out[field] = True
    return out


def _host_json(h: HostStatus) -> dict[str, JsonValue]:
    stats: list[JsonValue] = []
    for kind, names in (("COUNTER", _HOST_COUNTERS), ("GAUGE", _HOST_GAUGES)):
        for stat in names:
            metric: dict[str, JsonValue] = {}
            if kind == "GAUGE":
                metric["type"] = "GAUGE"
            value = h.stats.get(stat, 0)
            if value:
                metric["value"] = str(value)
            metric["name"] = stat
            stats.append(metric)
    out: dict[str, JsonValue] = {"address": address_json(h.address), "stats": stats,
                                 "health_status": _health_status_json(h.health_flags)}
    if h.weight:
        out["weight"] = h.weight
    if h.hostname:
        out["hostname"] = h.hostname
    if h.priority:
        out["priority"] = h.priority
    locality: dict[str, JsonValue] = {}
    for key in ("region", "zone", "sub_zone"):
        if getattr(h, key):
            locality[key] = getattr(h, key)
    out["locality"] = locality
    return out


def clusters_json(snapshot: Snapshot, statuses: Iterable[ClusterStatus]) -> dict[str, JsonValue]:
    by_name = _statuses(statuses)
    out = []
    for name, c in snapshot.clusters.items():
        status: dict[str, JsonValue] = {"name": name}
        if c.added_via_api:
            status["added_via_api"] = True
        hosts = _hosts(c, by_name.get(name))
        if hosts:
            status["host_statuses"] = [_host_json(h) for h in hosts]
        status["circuit_breakers"] = {"thresholds": [
            _thresholds_json(c.default_thresholds, "DEFAULT"),
            _thresholds_json(c.high_thresholds, "HIGH")]}
        status["observability_name"] = c.observability_name
        if c.eds_service_name:
            status["eds_service_name"] = c.eds_service_name
        out.append(status)
    return {"cluster_statuses": out} if out else {}


def render_clusters_json(snapshot: Snapshot, statuses: Iterable[ClusterStatus]) -> str:
    """``GET /clusters?format=json`` (``envoy.admin.v3.Clusters``), what istioctl
    ``proxy-config endpoint`` reads."""
    return proto_json(clusters_json(snapshot, statuses))


# ------------------------------------------------------------------------------ /config_dump

TYPE_PREFIX = "type.googleapis.com/"
ADMIN = TYPE_PREFIX + "envoy.admin.v3."

# Per config tracker (in the key order Envoy's std::map gives them: bootstrap, clusters,
# endpoint, listeners, route_scopes, routes, secrets): the dump message and its fields, as
# (name, repeated element type or None when singular). Used by ``?resource=``.
_DUMP_FIELDS: dict[str, tuple[tuple[str, str | None], ...]] = {
    "BootstrapConfigDump": (("bootstrap", None), ("last_updated", None)),
    "ClustersConfigDump": (("version_info", None),
                           ("static_clusters", "ClustersConfigDump.StaticCluster"),
                           ("dynamic_active_clusters", "ClustersConfigDump.DynamicCluster"),
                           ("dynamic_warming_clusters", "ClustersConfigDump.DynamicCluster")),
    "EndpointsConfigDump": (("static_endpoint_configs",
                             "EndpointsConfigDump.StaticEndpointConfig"),
                            ("dynamic_endpoint_configs",
                             "EndpointsConfigDump.DynamicEndpointConfig")),
    "ListenersConfigDump": (("version_info", None),
                            ("static_listeners", "ListenersConfigDump.StaticListener"),
                            ("dynamic_listeners", "ListenersConfigDump.DynamicListener")),
    "ScopedRoutesConfigDump": (("inline_scoped_route_configs",
                                "ScopedRoutesConfigDump.InlineScopedRouteConfigs"),
                               ("dynamic_scoped_route_configs",
                                "ScopedRoutesConfigDump.DynamicScopedRouteConfigs")),
    "RoutesConfigDump": (("static_route_configs", "RoutesConfigDump.StaticRouteConfig"),
                         ("dynamic_route_configs", "RoutesConfigDump.DynamicRouteConfig")),
    "SecretsConfigDump": (("static_secrets", "SecretsConfigDump.StaticSecret"),
                          ("dynamic_active_secrets", "SecretsConfigDump.DynamicSecret"),
                          ("dynamic_warming_secrets", "SecretsConfigDump.DynamicSecret")),
}


def _any(type_name: str, body: Mapping[str, JsonValue]) -> dict[str, JsonValue]:
    """An ``Any`` in JSON: ``@type`` first, then the message's fields."""
    return {"@type": TYPE_PREFIX + type_name, **{k: v for k, v in body.items() if k != "@type"}}


def _lb_endpoint_json(ep: LbEndpoint) -> dict[str, JsonValue]:
    endpoint: dict[str, JsonValue] = {"address": address_json(ep.address),
                                      "health_check_config": {}}
    if ep.hostname:
        endpoint["hostname"] = ep.hostname
    health = {"UNHEALTHY": "UNHEALTHY", "DRAINING": "UNHEALTHY", "TIMEOUT": "UNHEALTHY",
              "DEGRADED": "DEGRADED"}.get(ep.health_status, "HEALTHY")
    return {"endpoint": endpoint, "health_status": health, "metadata": {},
            "load_balancing_weight": ep.weight}


def _load_assignment_json(c: Cluster, hosts: Sequence[LbEndpoint]) -> dict[str, JsonValue]:
    """What ``ConfigDumpHandler::dumpEndpointConfigs`` builds for a cluster: its live hosts
    grouped by (priority, locality) in first-seen order."""
    out: dict[str, JsonValue] = {"cluster_name": c.eds_service_name or c.name}
    groups: dict[tuple[int, str, str, str], list[LbEndpoint]] = {}
    for ep in sorted(hosts, key=lambda e: e.priority):
        key = (ep.priority, ep.locality.region, ep.locality.zone, ep.locality.sub_zone)
        groups.setdefault(key, []).append(ep)
    endpoints: list[JsonValue] = []
    for (priority, region, zone, sub_zone), eps in groups.items():
        locality = {k: v for k, v in (("region", region), ("zone", zone),
                                      ("sub_zone", sub_zone)) if v}
        group: dict[str, JsonValue] = {"locality": locality,
                                       "lb_endpoints": [_lb_endpoint_json(e) for e in eps]}
        if eps[0].locality_weight:
            group["load_balancing_weight"] = eps[0].locality_weight
        if priority:
            group["priority"] = priority
        endpoints.append(group)
    if endpoints:
        out["endpoints"] = endpoints
    out["policy"] = {"overprovisioning_factor": c.overprovisioning_factor}
    return out


def _host_endpoints(c: Cluster, status: ClusterStatus | None) -> list[LbEndpoint]:
    if status is None:
        return [] if c.type == "ORIGINAL_DST" else list(c.endpoints)
    out = []
    for h in status.hosts:
        flags = h.health_flags
        health: HealthStatus = (
            "UNHEALTHY" if "/failed_eds_health" in flags
            else "DEGRADED" if "/degraded_eds_health" in flags else "HEALTHY")
        out.append(LbEndpoint(address=h.address, weight=h.weight, health_status=health,
                              locality=Locality(region=h.region, zone=h.zone,
                                                sub_zone=h.sub_zone),
                              priority=h.priority, hostname=h.hostname,
                              locality_weight=h.locality_weight))
    return out


NameMatch = Callable[[str], bool]


def all_names(_: str) -> bool:
    return True


def config_dump(snapshot: Snapshot, *, last_updated: float, include_eds: bool = False,
                statuses: Iterable[ClusterStatus] = (),
                name_match: NameMatch = all_names) -> list[dict[str, JsonValue]]:
    """The ``configs`` of ``GET /config_dump``: one dump message per config tracker, each as
    ``{"@type": ..., fields...}``. Every resource is static (bootstrap) unless its cluster says
    ``added_via_api``; ``last_updated`` is when the snapshot was loaded (epoch seconds)."""
    ts = format_timestamp(last_updated)
    configs: list[dict[str, JsonValue]] = []

    configs.append(_any("envoy.admin.v3.BootstrapConfigDump",
                        {"bootstrap": snapshot.bootstrap_json, "last_updated": ts}))

    static_clusters: list[JsonValue] = []
    dynamic_clusters: list[JsonValue] = []
    for name, c in snapshot.clusters.items():
        if not name_match(name):
            continue
        body = _any("envoy.config.cluster.v3.Cluster",
                    snapshot.cluster_json.get(name, {"name": name}))
        if c.added_via_api:
            entry: dict[str, JsonValue] = {}
            if snapshot.version_info:
                entry["version_info"] = snapshot.version_info
            entry.update({"cluster": body, "last_updated": ts})
            dynamic_clusters.append(entry)
        else:
            static_clusters.append({"cluster": body, "last_updated": ts})
    clusters: dict[str, JsonValue] = {}
    if snapshot.version_info and dynamic_clusters:
        clusters["version_info"] = snapshot.version_info
    if static_clusters:
        clusters["static_clusters"] = static_clusters
    if dynamic_clusters:
        clusters["dynamic_active_clusters"] = dynamic_clusters
    configs.append(_any("envoy.admin.v3.ClustersConfigDump", clusters))

    if include_eds and snapshot.clusters:
        by_name = _statuses(statuses)
        static_eps: list[JsonValue] = []
        dynamic_eps: list[JsonValue] = []
        for name, c in snapshot.clusters.items():
            if not name_match(c.eds_service_name or name):
                continue
            cla = _any("envoy.config.endpoint.v3.ClusterLoadAssignment",
                       _load_assignment_json(c, _host_endpoints(c, by_name.get(name))))
            (dynamic_eps if c.added_via_api else static_eps).append({"endpoint_config": cla})
        endpoints: dict[str, JsonValue] = {}
        if static_eps:
            endpoints["static_endpoint_configs"] = static_eps
        if dynamic_eps:
            endpoints["dynamic_endpoint_configs"] = dynamic_eps
        configs.append(_any("envoy.admin.v3.EndpointsConfigDump", endpoints))

    static_listeners = [
        {"listener": _any("envoy.config.listener.v3.Listener",
                          snapshot.listener_json.get(li.name, {"name": li.name})),
         "last_updated": ts}
        for li in snapshot.listeners if name_match(li.name)]
    configs.append(_any("envoy.admin.v3.ListenersConfigDump",
                        {"static_listeners": static_listeners} if static_listeners else {}))
    configs.append(_any("envoy.admin.v3.ScopedRoutesConfigDump", {}))
    configs.append(_any("envoy.admin.v3.RoutesConfigDump", {}))
    configs.append(_any("envoy.admin.v3.SecretsConfigDump", {}))
    return configs


def select_resource(configs: Sequence[Mapping[str, JsonValue]],
                    resource: str) -> list[dict[str, JsonValue]]:
    """``?resource=<field>``: the elements of the first dump message that has a repeated field
    of that name, each packed as an ``Any`` of its element type (Envoy
    ``ConfigDumpHandler::addResourceToDump``). Raises :class:`AdminError` as Envoy answers."""
    for config in configs:
        type_name = str(config["@type"]).rsplit(".", 1)[-1]
        for field, element in _DUMP_FIELDS.get(type_name, ()):
            if field != resource:
                continue
            if element is None:
                raise AdminError(400, f"{field} is not a repeated field. Use ?mask={field} "
                                      "to get only this field")
            items = config.get(field, [])
            assert isinstance(items, list)
            return [_any("envoy.admin.v3." + element, item) for item in items]
    raise AdminError(404, f"{resource} not found in config dump")


def render_config_dump(configs: Sequence[Mapping[str, JsonValue]]) -> str:
    """``envoy.admin.v3.ConfigDump`` (an empty ``configs`` is a default, hence ``{}``)."""
    return proto_json({"configs": list(configs)} if configs else {})


# ------------------------------------------------------------------------------ /stats

StatsType = Literal["All", "Counters", "Gauges", "Histograms", "TextReadouts"]
STATS_TYPES: tuple[StatsType, ...] = ("All", "Counters", "Histograms", "Gauges", "TextReadouts")


def _selected(stats: StatsSnapshot, *, used_only: bool, pattern: re.Pattern[str] | None,
              type: StatsType = "All") -> dict[str, int]:
    """Counters and gauges by name. "Used" is approximated as non-zero: the stores keep no
    written-since-start flag. Labelled counters and gauges appear under their full stat name
    (``istiocustom.istio_requests_total.reporter.source.…``); histograms are not listed (Envoy
    prints quantile summaries for them, which Remora does not compute)."""
    chosen: dict[str, int] = {}
    if type in ("All", "Counters"):
        chosen.update(stats.counters)
    if type in ("All", "Gauges"):
        chosen.update(stats.gauges)
    for name, fam in stats.families.items():
        if (fam.kind == "counter" and type in ("All", "Counters")) or (
                fam.kind == "gauge" and type in ("All", "Gauges")):
            for labels, value in fam.values.items():
                chosen[fam.stat_name(name, labels)] = value
    return {name: value for name, value in chosen.items()
            if (not used_only or value != 0) and (pattern is None or pattern.search(name))}


def render_stats(stats: StatsSnapshot, *, used_only: bool = False,
                 pattern: re.Pattern[str] | None = None, type: StatsType = "All") -> str:
    """``GET /stats``: ``name: value`` per counter and gauge, sorted by name."""
    chosen = _selected(stats, used_only=used_only, pattern=pattern, type=type)
    return "".join(f"{name}: {chosen[name]}\n" for name in sorted(chosen))


def render_stats_json(stats: StatsSnapshot, *, used_only: bool = False,
                      pattern: re.Pattern[str] | None = None, type: StatsType = "All") -> str:
    """``GET /stats?format=json``: ``{"stats":[{"name":..,"value":..},...]}``, compact."""
    chosen = _selected(stats, used_only=used_only, pattern=pattern, type=type)
    return compact_json({"stats": [{"name": n, "value": chosen[n]} for n in sorted(chosen)]})


# ------------------------------------------------------------------------------ Prometheus


@dataclass(frozen=True, slots=True)
class TagExtractor:
    """One ``stats_tags`` entry: group 1 is cut out of the name, group 2 (else 1) is the value.
    ``fallback``: applied only when no earlier extractor produced a tag of the same name."""

    name: str
    regex: re.Pattern[str]
    prefix: str = ""
    fallback: bool = False


def _regex_prefix(regex: str) -> str:
    """The literal first token an anchored regex requires (``^tcp\\.`` → ``tcp``), which
    decides when Envoy applies the extractor (those without one come first): the word
    characters after ``^`` up to a ``\\.`` or ``(?=\\.)``, or up to a last character."""
    if not regex.startswith("^"):
        return ""
    for i in range(1, len(regex)):
        ch = regex[i]
        if ch.isascii() and (ch.isalnum() or ch == "_"):
            continue
        rest = regex[i:]
        if i > 1 and (i == len(regex) - 1 or rest.startswith(("\\.", "(?=\\.)"))):
            return regex[1:i]
        return ""
    return ""


def tag_extractor(name: str, regex: str, *, fallback: bool = False) -> TagExtractor:
    return TagExtractor(name=name, regex=re.compile(regex), prefix=_regex_prefix(regex),
                        fallback=fallback)


# Istio's sidecar bootstrap ``stats_config.stats_tags`` (``use_all_default_tags: false``), with
# POSIX ``[:digit:]`` written as ``0-9`` for Python's ``re``. The last entry is Envoy's default
# ``cluster_name`` extractor, used only for clusters without Istio's ``;``-terminated
# ``alt_stat_name`` (``cluster.<name>.<stat>``).
ISTIO_STATS_TAGS: tuple[TagExtractor, ...] = (
    tag_extractor("cluster_name", r"^cluster(\.(.+);)"),
    tag_extractor("http_conn_manager_prefix",
                  r"^http\.(((?:[_.0-9\w]*|[_\[\]aAbBcCdDeEfF0-9\w\:]*));\.)"),
    tag_extractor("thread_name", r"^server(\.(.+))\.watchdog"),
    tag_extractor("tcp_prefix", r"^tcp\.((.*?)\.)\w+?$"),
    tag_extractor("response_code", r"_rq(_(\d{3}))$"),
    tag_extractor("response_code_class", r"_rq(_(\dxx))$"),
    tag_extractor("http_conn_manager_listener_prefix",
                  r"^listener(?=\.).*?\.http\.(((?:[_.0-9]*|[_\[\]aAbBcCdDeEfF0-9]*))\.)"),
    tag_extractor("listener_address",
                  r"^listener\.(((?:[_.0-9]*|[_\[\]aAbBcCdDeEfF0-9]*))\.)"),
    tag_extractor("mongo_prefix",
                  r"^mongo\.(.+?)\.(collection|cmd|cx_|op_|delays_|decoding_)(.*?)$"),
    tag_extractor("cache", r"(cache\.(.+?)\.)"),
    tag_extractor("component", r"(component\.(.+?)\.)"),
    tag_extractor("tag", r"(tag\.(.+?);\.)"),
    tag_extractor("wasm_filter", r"(wasm_filter\.(.+?)\.)"),
    tag_extractor("authz_enforce_result", r"rbac(\.(allowed|denied))"),
    tag_extractor("authz_dry_run_action", r"(\.istio_dry_run_(allow|deny)_)"),
    tag_extractor("authz_dry_run_result", r"(\.shadow_(allowed|denied))"),
    tag_extractor("cluster_name", r"^cluster\.((.*?)\.)", fallback=True),
)


def extract_tags(name: str, extractors: Sequence[TagExtractor] = ISTIO_STATS_TAGS,
                 ) -> tuple[str, list[tuple[str, str]]]:
    """(tag-extracted name, tags) as Envoy's ``TagProducerImpl`` makes them: extractors without
    a prefix first, then those whose prefix is the name's first token, each run on the full
    name; the removed spans are cut out at the end."""
    first = name.split(".", 1)[0] if "." in name else None
    ordered = [e for e in extractors if not e.prefix]
    ordered += [e for e in extractors if e.prefix and e.prefix == first]
    tags: list[tuple[str, str]] = []
    cut: list[tuple[int, int]] = []
    for e in ordered:
        if e.fallback and any(t == e.name for t, _ in tags):
            continue
        m = e.regex.search(name)
        if m is None:
            continue
        groups = m.re.groups
        value = m.group(2) if groups >= 2 else m.group(1) if groups >= 1 else m.group(0)
        tags.append((e.name, value or ""))
        if groups >= 1 and m.start(1) >= 0:
            cut.append((m.start(1), m.end(1)))
    if not cut:
        return name, tags
    keep = [True] * len(name)
    for start, end in cut:
        for i in range(start, end):
            keep[i] = False
    return "".join(ch for ch, k in zip(name, keep, strict=True) if k), tags


_PROM_INVALID = re.compile(r"[^a-zA-Z0-9_]")


def prometheus_name(extracted: str) -> str:
    return "envoy_" + _PROM_INVALID.sub("_", extracted)


def _token_key(name: str) -> list[str]:
    # Envoy sorts stat names token by token (SymbolTable::lessThan), not as flat strings.
    return name.split(".")


def _label_value(v: str) -> str:
    """A Prometheus label value: backslash, double quote and newline escaped (text format
    0.0.4; Envoy ``PrometheusStatsFormatter::sanitizeValue``)."""
    if "\\" in v or '"' in v or "\n" in v:
        return v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return v


def _labels_text(names: Sequence[str], values: Sequence[str]) -> str:
    return ",".join(f'{_PROM_INVALID.sub("_", k)}="{_label_value(v)}"'
                    for k, v in zip(names, values, strict=True))


def _prom_number(v: float) -> str:
    """Envoy prints bucket bounds and sums with ``{:.32g}``: fixed notation, no trailing
    zeros (``0.5``, ``3600000``)."""
    if isinstance(v, int):
        return str(v)
    return format(v, ".32g")


# One group of output: (sort key, metric name, lines).
_Group = tuple[list[str], str, list[str]]


def _family_groups(stats: StatsSnapshot, kind: str, *, used_only: bool,
                   pattern: re.Pattern[str] | None) -> list[_Group]:
    """Labelled families of ``kind`` as Envoy prints stats created with explicit tags: the
    group is the tag-extracted name (``istiocustom.istio_requests_total``, sorted among the
    other stats of its type), the metric name drops a registered custom namespace (no
    ``envoy_`` prefix then), series are sorted by full stat name."""
    groups: list[_Group] = []
    for name, fam in stats.families.items():
        if fam.kind != kind:
            continue
        metric = _PROM_INVALID.sub("_", name) if fam.namespace else prometheus_name(name)
        series: list[tuple[list[str], str]] = []
        if kind == "histogram":
            for labels, h in fam.histograms.items():
                full = fam.stat_name(name, labels)
                if (used_only and h.count == 0) or (pattern is not None
                                                    and not pattern.search(full)):
                    continue
                tags = _labels_text(fam.label_names, labels)
                prefix = tags + "," if tags else ""
                lines = [f'{metric}_bucket{{{prefix}le="{_prom_number(b)}"}} {c}\n'
                         for b, c in zip(fam.buckets, h.cumulative(), strict=True)]
                lines.append(f'{metric}_bucket{{{prefix}le="+Inf"}} {h.count}\n')
                lines.append(f"{metric}_sum{{{tags}}} {_prom_number(h.sum)}\n")
                lines.append(f"{metric}_count{{{tags}}} {h.count}\n")
                series.append((_token_key(full), "".join(lines)))
        else:
            for labels, value in fam.values.items():
                full = fam.stat_name(name, labels)
                if (used_only and value == 0) or (pattern is not None
                                                  and not pattern.search(full)):
                    continue
                line = f"{metric}{{{_labels_text(fam.label_names, labels)}}} {value}\n"
                series.append((_token_key(full), line))
        if series:
            series.sort(key=lambda s: s[0])
            key = _token_key(f"{fam.namespace}.{name}" if fam.namespace else name)
            groups.append((key, metric, [text for _, text in series]))
    return groups


def render_prometheus(stats: StatsSnapshot, *, used_only: bool = False,
                      pattern: re.Pattern[str] | None = None,
                      extractors: Sequence[TagExtractor] = ISTIO_STATS_TAGS) -> str:
    """``GET /stats/prometheus`` (text format 0.0.4): counters, then gauges, then histograms;
    per tag-extracted name a ``# TYPE`` line, the series sorted by full stat name, and a blank
    line. Labelled families (Istio's metrics) sort among the plain stats of their type.

    Histograms print Envoy's way: cumulative ``_bucket{…,le="…"}`` per bound, ``le="+Inf"``,
    ``_sum`` and ``_count``. The sum is exact here; Envoy's is computed from its log-linear
    bins (bin midpoints), so it can differ in the decimals."""
    out: list[str] = []
    for kind, values in (("counter", stats.counters), ("gauge", stats.gauges),
                         ("histogram", None)):
        groups: list[_Group] = []
        plain: dict[str, list[tuple[str, list[tuple[str, str]], int]]] = {}
        for name, value in (values or {}).items():
            if used_only and value == 0:
                continue
            if pattern is not None and not pattern.search(name):
                continue
            extracted, tags = extract_tags(name, extractors)
            plain.setdefault(extracted, []).append((name, tags, value))
        for extracted, members in plain.items():
            lines = []
            for _, tags, value in sorted(members, key=lambda s: _token_key(s[0])):
                labels = ",".join(f'{_PROM_INVALID.sub("_", k)}="{v}"' for k, v in tags)
                lines.append(f"{prometheus_name(extracted)}{{{labels}}} {value}\n")
            groups.append((_token_key(extracted), prometheus_name(extracted), lines))
        groups += _family_groups(stats, kind, used_only=used_only, pattern=pattern)
        for _, metric, lines in sorted(groups, key=lambda g: g[0]):
            out.append(f"# TYPE {metric} {kind}\n")
            out += lines
            out.append("\n")
    return "".join(out)


# ------------------------------------------------------------------------------ /server_info

# ``<source sha>/<version>/<Clean|Modified>/<RELEASE|DEBUG>/<TLS library>``, as Envoy's
# ``VersionInfo::version()``; Remora has no build sha to report.
VERSION = f"{'0' * 40}/remora-{__version__}/Clean/RELEASE/OpenSSL"

# ``envoy.admin.v3.CommandLineOptions`` scalar fields by field number with their proto3
# defaults: ``/server_info`` prints every one of them (``always_print_fields_with_no_presence``).
_COMMAND_LINE_FIELDS: tuple[tuple[str, JsonValue], ...] = (
    ("base_id", "0"), ("concurrency", 0), ("config_path", ""), ("config_yaml", ""),
    ("allow_unknown_static_fields", False), ("admin_address_path", ""),
    ("local_address_ip_version", "v4"), ("log_level", ""), ("component_log_level", ""),
    ("log_format", ""), ("log_path", ""), ("service_cluster", ""), ("service_node", ""),
    ("service_zone", ""), ("file_flush_interval", None), ("drain_time", None),
    ("parent_shutdown_time", None), ("mode", "Serve"), ("disable_hot_restart", False),
    ("enable_mutex_tracing", False), ("restart_epoch", 0), ("cpuset_threads", False),
    ("reject_unknown_dynamic_fields", False), ("log_format_escaped", False),
    ("disabled_extensions", []), ("ignore_unknown_dynamic_fields", False),
    ("use_dynamic_base_id", False), ("base_id_path", ""), ("drain_strategy", "Gradual"),
    ("enable_fine_grain_logging", False), ("socket_path", ""), ("socket_mode", 0),
    ("enable_core_dump", False), ("stats_tag", []), ("skip_hot_restart_on_no_parent", False),
    ("skip_hot_restart_parent_stats", False), ("skip_deprecated_logs", False),
)


def command_line_json(options: Mapping[str, object]) -> dict[str, JsonValue]:
    """Known options in field-number order with defaults filled in (messages such as
    ``drain_time`` only when given), unknown ones after them as given."""
    out: dict[str, JsonValue] = {}
    for name, default in _COMMAND_LINE_FIELDS:
        if name in options:
            out[name] = options[name]
        elif default is not None:
            out[name] = default
    for name, value in options.items():
        out.setdefault(name, value)
    return out


def server_info_json(*, state: ServerState, uptime: float, command_line: Mapping[str, object],
                     snapshot: Snapshot, version: str = VERSION,
                     hot_restart_version: str = "disabled") -> dict[str, JsonValue]:
    """``envoy.admin.v3.ServerInfo``, every scalar printed (Envoy passes
    ``always_print_primitive_fields``), uptimes in whole seconds. The node is the bootstrap's,
    with Remora as its user agent."""
    node = snapshot.node
    node_json: dict[str, JsonValue] = {"id": node.id, "cluster": node.cluster}
    if node.metadata:
        node_json["metadata"] = node.metadata
    node_json.update({"user_agent_name": "remora", "user_agent_version": __version__,
                      "extensions": [], "client_features": [], "listening_addresses": [],
                      "dynamic_parameters": {}})
    up = format_duration(int(uptime))
    return {"version": version, "state": state, "uptime_current_epoch": up,
            "uptime_all_epochs": up, "hot_restart_version": hot_restart_version,
            "command_line_options": command_line_json(command_line), "node": node_json}


# ------------------------------------------------------------------------------ /logging

LOG_LEVELS = ("trace", "debug", "info", "warning", "error", "critical", "off")


def render_loggers(loggers: Mapping[str, str]) -> str:
    return "active loggers:\n" + "".join(f"  {n}: {lvl}\n" for n, lvl in loggers.items()) + "\n"


def logging_usage(error: str) -> str:
    """The text Envoy puts before the logger list when ``/logging`` parameters are bad."""
    return (f"error: {error}\n\n"
            "usage: /logging?<name>=<level> (change single level)\n"
            "usage: /logging?paths=name1:level1,name2:level2,... (change multiple levels)\n"
            "usage: /logging?level=<level> (change all levels)\n"
            "levels: " + "".join(f"{lvl} " for lvl in LOG_LEVELS) + "\n")


# ------------------------------------------------------------------------------ /help


@dataclass(frozen=True, slots=True)
class Param:
    name: str
    help: str
    choices: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Endpoint:
    path: str
    help: str
    post: bool = False
    params: tuple[Param, ...] = ()


_FORMAT = Param("format", "File format to use", ("text", "json"))
_USEDONLY = Param("usedonly", "Only include stats that have been written by system since restart")
_FILTER = Param("filter", "Regular expression (Google re2) for filtering stats")

# The endpoints Remora serves, with Envoy's help texts (``admin.cc``, ``stats_handler.cc``).
ENDPOINTS: tuple[Endpoint, ...] = (
    Endpoint("/clusters", "upstream cluster status", params=(_FORMAT,)),
    Endpoint("/config_dump", "dump current Envoy configs (experimental)", params=(
        Param("resource", "The resource to dump"),
        Param("mask", "The mask to apply. When both resource and mask are specified, the mask "
                      "is applied to every element in the desired repeated field so that only "
                      "a subset of fields are returned. The mask is parsed as a "
                      "ProtobufWkt::FieldMask"),
        Param("name_regex", "Dump only the currently loaded configurations whose names match "
                            "the specified regex. Can be used with both resource and mask "
                            "query parameters."),
        Param("include_eds", "Dump currently loaded configuration including EDS. See the "
                             "response definition for more information"))),
    Endpoint("/drain_listeners", "drain listeners", post=True, params=(
        Param("graceful", "When draining listeners, enter a graceful drain period prior to "
                          "closing listeners. This behaviour and duration is configurable via "
                          "server options or CLI"),
        Param("skip_exit", "When draining listeners, do not exit after the drain period. "
                           "This must be used with graceful"),
        Param("inboundonly", "Drains all inbound listeners. traffic_direction field in "
                             "envoy_v3_api_msg_config.listener.v3.Listener is used to "
                             "determine whether a listener is inbound or outbound."))),
    Endpoint("/healthcheck/fail", "cause the server to fail health checks", post=True),
    Endpoint("/healthcheck/ok", "cause the server to pass health checks", post=True),
    Endpoint("/help", "print out list of admin commands"),
    Endpoint("/listeners", "print listener info", params=(_FORMAT,)),
    Endpoint("/logging", "query/change logging levels", post=True, params=(
        Param("paths", "Change multiple logging levels by setting to "
                       "<logger_name1>:<desired_level1>,<logger_name2>:<desired_level2>."),
        Param("level", "desired logging level, this will change all loggers's level",
              ("", *LOG_LEVELS)))),
    Endpoint("/memory", "print current allocation/heap usage"),
    Endpoint("/quitquitquit", "exit the server", post=True),
    Endpoint("/ready", "print server state, return 200 if LIVE, otherwise return 503"),
    Endpoint("/reopen_logs", "reopen access logs", post=True),
    Endpoint("/reset_counters", "reset all counters to zero", post=True),
    Endpoint("/server_info", "print server version/status information"),
    Endpoint("/stats", "print server stats", params=(
        _USEDONLY, _FILTER, Param("format", "Format to use", ("text", "json", "prometheus")),
        Param("type", "Stat types to include.", STATS_TYPES))),
    Endpoint("/stats/prometheus", "print server stats in prometheus format",
             params=(_USEDONLY, _FILTER)),
)


def memory_json(usage: Mapping[str, int]) -> dict[str, JsonValue]:
    """``envoy.admin.v3.Memory``, fields in proto order, uint64 as JSON strings (proto3 JSON),
    every field printed; the tcmalloc-only ones are 0 (no tcmalloc here)."""
    return {name: str(usage.get(name, 0)) for name in (
        "allocated", "heap_size", "pageheap_unmapped", "pageheap_free", "total_thread_cache",
        "total_physical_bytes")}


def render_help(endpoints: Sequence[Endpoint] = ENDPOINTS) -> str:
    """``GET /help`` (``AdminImpl::getHelp``): endpoints sorted by path."""
    out = ["admin commands are:\n"]
    for ep in sorted(endpoints, key=lambda e: e.path):
        out.append(f"  {ep.path}{' (POST)' if ep.post else ''}: {ep.help}\n")
        for p in ep.params:
            choices = f"; One of ({', '.join(p.choices)})" if p.choices else ""
            out.append(f"      {p.name}: {p.help}{choices}\n")
    return "".join(out)
