"""Benchmark: `remora proxy` as an HTTP hop (http_connection_manager, routing, istio.stats,
an Istio-format access log), one hop and two (outbound sidecar → inbound sidecar), against
nginx and HAProxy as HTTP reverse proxies with access logs on.

Three throwaway network namespaces (rmr-bh-*), made here and deleted at the end whatever
happens; nothing is sent outside them:

    cli ns 10.232.1.1 (no capture)                       srv ns (the server pod)
      wrk / h2load / latency client ─────────────────►  10.232.1.2 / 10.232.2.2
      nginx        127.0.0.1:18080 (h2c :18081) ─────►    upstream nginx, 1 worker,
      haproxy      127.0.0.1:28080 (h2c :28081) ─────►    `return 200 "ok"` on
      remora static 127.0.0.1:38080 (h1 and h2c) ────►    :8081 (h1), :8082 (h2c) and
      nginx x2     127.0.0.1:19080 (h2c :19081)           :8080 (the pod's app port,
                     → nginx 127.0.0.1:19090 ────────►    captured: → sidecar B :15006
    poda ns 10.232.2.1 (the client pod, Istio's capture)   → 127.0.0.6 → 10.232.2.2:8080)
      the app (wrk, h2load, latency client, as root) → a service VIP
      → nat OUTPUT REDIRECT → sidecar A :15001 (virtualOutbound) → 0.0.0.0_8080
      (http_inspector, HCM, RDS "8080" from a file: 22 services' vhosts + allow_any)
        10.100.0.7:8080 "upstream" → outbound|8080||upstream… → 10.232.2.2:8081  (one hop)
        10.100.0.8:8080 "server"   → outbound|8080||server…   → 10.232.2.2:8080  (two hops:
            captured in srv → sidecar B virtualInbound :15006 → inbound HCM chain for :8080
            → inbound|8080|| (ORIGINAL_DST, from 127.0.0.6) → the app on 10.232.2.2:8080)

Targets, each proxy with ONE worker (nginx `worker_processes 1`, HAProxy `nbthread 1`,
`remora proxy --concurrency 1`), every one logging each request to a file on tmpfs:
  * direct          client → upstream :8081, no proxy (the baseline for "added" latency);
  * nginx           `proxy_pass` to an upstream block with `keepalive 64`,
                    `proxy_http_version 1.1`, `proxy_set_header Connection ""`, and Host,
                    X-Forwarded-Proto, X-Request-Id set (what Envoy adds); an access log with
                    Istio's fields, `buffer=64k flush=1s` (Envoy's file log flush policy);
  * haproxy         `mode http`, `option httplog`, `log stdout format raw` (a write per
                    request: HAProxy has no buffered file log), X-Forwarded-Proto and a uuid
                    X-Request-Id set; server connections reused (http-reuse safe, stock);
  * remora static   a listener → HCM (route_config, istio.metadata_exchange, grpc_stats,
                    fault, cors, istio.stats, router; Istio's access log format) → a STATIC
                    cluster: the same shape as the two references;
  * remora capture  the sidecar path, one hop: app in the client pod → iptables capture →
                    sidecar A (Istio-shaped outbound config, routing by Host) → upstream;
  * nginx x2        two nginx (the config above) chained on the client side: the references'
                    two-hop equivalent;
  * remora mesh     the mesh path, two hops: sidecar A → (capture in the server pod) →
                    sidecar B's inbound HCM chain → the app. Plain text between sidecars (no
                    mTLS: Remora has no TLS yet; Istio would add it), HTTP/1.1 on every hop.
Metrics:
  * rps       wrk -t1 -c50, keep-alive, `GET /` → 2-byte body; with the proxy's CPU % during
              the run, and rps per core of proxy CPU (fairer when a proxy is held back by the
              shared CPUs rather than by itself);
  * h2 rps    h2load -c10 -m10 (HTTP/2 cleartext, prior knowledge) to each proxy, which
              talks HTTP/1.1 to the upstream; "direct" is the upstream's own h2c port;
  * latency   p50/p99 at a fixed 1000 requests/s from bench_proxy_l4's constant-rate client
              (no coordinated omission: timed from the intended send time), 10 keep-alive
              connections; "added" = proxied − direct;
  * CPU       utime+stime of the proxies' process trees over the fixed-rate run, as % of one
              core per 1000 requests/s (two hops: both proxies);
  * RSS       VmRSS of the proxies' process trees idle after start-up and after all the load.
  * At the end: access-log lines per request on every target (each proxy really logs each
    request), and sidecar counters/istio_requests_total proving both mesh hops were taken.
Targets (issue), judged on remora capture vs nginx (one hop) and remora mesh vs nginx x2 (two
hops), remora static alongside: rps at least 1.0x nginx's; added p50 at 1000 rps at most 1.2x
nginx's; CPU per 1000 rps at most 1.2x nginx's.

Caveats: clients, proxies and upstream share the machine's CPUs (two here), so a fast proxy
can be limited by wrk and the upstream rather than by itself (the proxy's CPU % tells), and
anything else running on the machine skews every number (the load average and the CPU used
outside this benchmark are printed). The capture paths also pay conntrack/NAT in the pod
namespaces (Envoy would too). nginx's RSS is master + worker. Medians over rounds; the
targets' order alternates between rounds.

Run: ./dev bench   (or: .venv/bin/python bench/bench_proxy_http.py [--rounds N] [--quick];
default 3 rounds, about 5 minutes; --quick: 1 short round, about 1 minute)
Needs root and the Debian packages nginx, haproxy, wrk and nghttp2-client (h2load);
`./dev bench` installs them.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import platform
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

# The configs come from this checkout's remora, as the proxies do (bench_proxy_l4's
# CHILD_ENV), whichever worktree the venv's editable install points at.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import bench_proxy_l4 as l4
from bench_proxy_l4 import (
    CAPTURE_FLAGS,
    REMORA,
    at_least,
    at_most,
    cpu_seconds,
    fmt,
    http_get,
    in_ns,
    latency_client,
    mb,
    med,
    netns,
    ratio,
    rss_mb,
    run,
    verdict,
)
from remora.proxy import istio_config as ic

# Addresses (inside the namespaces made here, never on the host).
CLI_IP, SRV_C_IP = "10.232.1.1", "10.232.1.2"     # cli ns ↔ srv ns
POD_IP, SRV_P_IP = "10.232.2.1", "10.232.2.2"     # client pod ↔ server pod (the pod IP)
VIP_ONE, VIP_MESH = "10.100.0.7", "10.100.0.8"    # services seen from the client pod
APP_PORT, PLAIN_PORT, H2_PORT = 8080, 8081, 8082  # upstream: captured app port, plain, h2c
SRV_CAPTURE_FLAGS = ["-p", "15001", "-z", "15006", "-u", "1337", "-m", "REDIRECT", "-i", "*",
                     "-x", "", "-b", "*", "-d", f"15090,15021,15020,{PLAIN_PORT},{H2_PORT}"]
NS_SUFFIX = ic.CLUSTER_DOMAIN
DECOYS = 20  # other services' vhosts and clusters in the outbound route table

TARGET_ORDER = ("direct", "nginx", "haproxy", "remora static", "remora capture", "nginx x2",
                "remora mesh")
ONE_HOP_REFS = ("nginx", "haproxy")
LOG_TRUNCATE_ABOVE = 8 << 20  # bytes; access logs are emptied between runs past this


@dataclass
class Load:
    wrk_connections: int = 50
    wrk_seconds: int = 3
    wrk_warmup: int = 1
    rate: int = 1000
    rate_seconds: float = 3.0
    rate_warmup: float = 1.0
    rate_connections: int = 10
    h2_seconds: int = 3
    h2_warmup: int = 1
    h2_clients: int = 10
    h2_streams: int = 10

    @classmethod
    def quick(cls) -> Load:
        return cls(wrk_seconds=2, rate_seconds=2.0, h2_seconds=2)


# ----------------------------------------------------------------------------- configs

def _nginx_head(tmp: Path, name: str) -> str:
    return f"""
worker_processes 1;
daemon off;
pid {tmp}/{name}.pid;
error_log {tmp}/{name}-error.log warn;
events {{ worker_connections 4096; }}
"""


def _nginx_temp(tmp: Path, name: str) -> str:
    return "".join(f"    {k}_temp_path {tmp}/{name}-{k};\n"
                   for k in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))


def nginx_upstream_conf(tmp: Path) -> str:
    return _nginx_head(tmp, "upstream") + f"""
http {{
    access_log off;
    keepalive_requests 100000000;
    keepalive_timeout 300s;
{_nginx_temp(tmp, "upstream")}
    server {{
        listen {APP_PORT} backlog=4096;
        listen {PLAIN_PORT} backlog=4096;
        location / {{ return 200 "ok"; }}
    }}
    server {{
        listen {H2_PORT} http2 backlog=4096;
        location / {{ return 200 "ok"; }}
    }}
}}
"""


# nginx's rendering of Istio's default access-log fields (about the same line length).
NGINX_LOG_FORMAT = (
    "'[$time_iso8601] \"$request_method $request_uri $server_protocol\" $status - "
    "via_upstream - \"-\" $request_length $bytes_sent $request_time "
    "$upstream_response_time \"$http_x_forwarded_for\" \"$http_user_agent\" \"$request_id\" "
    "\"$host\" \"$upstream_addr\" outbound|8080||upstream - $server_addr:$server_port "
    "$remote_addr:$remote_port - default'")


def nginx_proxy_conf(tmp: Path, name: str, listens: tuple[int, int], upstream: str,
                     log: Path) -> str:
    h1, h2 = listens
    return _nginx_head(tmp, name) + f"""
http {{
    log_format istio {NGINX_LOG_FORMAT};
    access_log {log} istio buffer=64k flush=1s;
    keepalive_requests 100000000;
    keepalive_timeout 300s;
{_nginx_temp(tmp, name)}
    upstream up {{
        server {upstream};
        keepalive 64;
        keepalive_requests 100000000;
        keepalive_timeout 300s;
    }}
    server {{
        listen 127.0.0.1:{h1} backlog=4096;
        listen 127.0.0.1:{h2} http2 backlog=4096;
        location / {{
            proxy_pass http://up;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $http_host;
            proxy_set_header X-Forwarded-Proto $scheme;
            proxy_set_header X-Request-Id $request_id;
        }}
    }}
}}
"""


def haproxy_conf() -> str:
    return f"""
global
    nbthread 1
    maxconn 4096
    log stdout format raw local0
defaults
    mode http
    log global
    option httplog
    timeout connect 5s
    timeout client 60s
    timeout server 60s
    timeout http-keep-alive 300s
frontend fe
    bind 127.0.0.1:28080
    bind 127.0.0.1:28081 proto h2
    unique-id-format %[uuid()]
    unique-id-header X-Request-Id
    http-request set-header X-Forwarded-Proto http
    default_backend be
backend be
    server up {SRV_C_IP}:{PLAIN_PORT}
"""


def _eds_cluster(name: str, ip: str, port: int) -> dict[str, Any]:
    """An Istio outbound cluster (EDS, endpoints given inline as in the example bootstrap)."""
    return {"name": name, "alt_stat_name": name + ";", "type": "EDS",
            "eds_cluster_config": {"service_name": name}, "connect_timeout": "10s",
            "lb_policy": "LEAST_REQUEST",
            "circuit_breakers": {"thresholds": [{
                "max_connections": 4294967295, "max_pending_requests": 4294967295,
                "max_requests": 4294967295, "max_retries": 4294967295}]},
            "load_assignment": ic.load_assignment(name, [(ip, port)])}


def _services() -> list[tuple[str, str, str, int]]:
    """(name, VIP, endpoint IP, endpoint port): the two measured services and decoys whose
    endpoints are never dialled."""
    out = [("upstream", VIP_ONE, SRV_P_IP, PLAIN_PORT), ("server", VIP_MESH, SRV_P_IP, APP_PORT)]
    out += [(f"decoy{i}", f"10.100.1.{i + 1}", f"10.232.9.{i + 1}", 8080)
            for i in range(DECOYS)]
    return out


def route_configs() -> dict[str, Any]:
    vhosts = [ic.service_vhost(svc, 8080, vip, [{
                  "name": "default", "match": {"prefix": "/"}, "route": {
                      "cluster": f"outbound|8080||{svc}.{NS_SUFFIX}", "timeout": "0s",
                      "retry_policy": ic.ISTIO_RETRY_POLICY, "max_grpc_timeout": "0s"}}])
              for svc, vip, _, _ in _services()]
    vhosts.append(ic.allow_any_vhost())
    return ic.rds_file([{"name": "8080", "virtual_hosts": vhosts, "validate_clusters": False,
                         "ignore_port_in_host_matching": True}])


def sidecar_a_conf(rds: Path, log: Path) -> dict[str, Any]:
    """The client pod's sidecar: Istio's outbound 0.0.0.0_8080 HTTP listener (RDS by file)."""
    hcm = ic.http_connection_manager(
        "outbound_0.0.0.0_8080", rds=ic.rds_from_file("8080", str(rds)),
        http_filters=ic.http_filters(), access_log=ic.file_access_log(str(log)),
        websocket=True)
    return ic.bootstrap(
        node=ic.sidecar_node(POD_IP, "client"),
        listeners=[ic.virtual_outbound(), ic.outbound_http_listener(8080, hcm)],
        clusters=[*ic.passthrough_clusters("10s"),
                  *(_eds_cluster(f"outbound|8080||{svc}.{NS_SUFFIX}", ip, port)
                    for svc, _, ip, port in _services())])


def sidecar_b_conf(log: Path) -> dict[str, Any]:
    """The server pod's sidecar: virtualInbound with Istio's inbound HTTP chain for :8080."""
    inbound = f"inbound|{APP_PORT}||"
    hcm = ic.http_connection_manager(
        f"inbound_0.0.0.0_{APP_PORT}",
        route_config={"name": inbound, "validate_clusters": False, "virtual_hosts": [{
            "name": f"inbound|http|{APP_PORT}", "domains": ["*"], "routes": [{
                "name": "default", "match": {"prefix": "/"},
                "route": {"cluster": inbound, "timeout": "0s", "max_grpc_timeout": "0s"},
                "decorator": {"operation": f"server.{NS_SUFFIX}:{APP_PORT}/*"}}]}]},
        http_filters=ic.http_filters(), access_log=ic.file_access_log(str(log)),
        server_name="istio-envoy")
    return ic.bootstrap(
        node=ic.sidecar_node(SRV_P_IP, "server"),
        listeners=[ic.virtual_outbound(),
                   ic.virtual_inbound([ic.inbound_http_chain(APP_PORT, hcm)])],
        clusters=[*ic.passthrough_clusters("10s"),
                  ic.original_dst_cluster(inbound, connect_timeout="10s", inbound=True,
                                          alt_stat_name=True),
                  ic.inbound_passthrough_cluster("10s")])


def remora_static_conf(log: Path) -> dict[str, Any]:
    """One listener → HCM (the sidecar's filters and access log) → a STATIC cluster: what
    nginx and HAProxy get."""
    hcm = ic.http_connection_manager(
        "static_http",
        route_config={"name": "static", "virtual_hosts": [{
            "name": "upstream", "domains": ["*"], "routes": [{
                "name": "default", "match": {"prefix": "/"},
                "route": {"cluster": "upstream", "timeout": "0s"}}]}]},
        http_filters=ic.http_filters(), access_log=ic.file_access_log(str(log)))
    return ic.bootstrap(
        node=ic.sidecar_node(CLI_IP, "static"),
        listeners=[{"name": "static_http", "address": ic.socket_address("127.0.0.1", 38080),
                    "filter_chains": [{"filters": [hcm]}]}],
        clusters=[ic.static_cluster("upstream", [(SRV_C_IP, PLAIN_PORT)],
                                    connect_timeout="5s")])


# ----------------------------------------------------------------------------- the bench

def parse_h2load(text: str) -> dict[str, float]:
    """h2load's summary: ``rps``, the request counts (``total`` … ``timeout``) and the status
    classes (``2xx`` … ``5xx``); what it did not print is missing."""
    got: dict[str, float] = {}
    m = re.search(r"finished in [\d.]+\w*, ([\d.]+) req/s", text)
    if m:
        got["rps"] = float(m.group(1))
    m = re.search(r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, "
                  r"(\d+) failed, (\d+) errored, (\d+) timeout", text)
    if m:
        got.update(zip(("total", "started", "done", "succeeded", "failed", "errored",
                        "timeout"), (float(x) for x in m.groups()), strict=True))
    m = re.search(r"status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx", text)
    if m:
        got.update(zip(("2xx", "3xx", "4xx", "5xx"), (float(x) for x in m.groups()),
                       strict=True))
    return got


@dataclass
class Target:
    name: str
    ns: str
    http: tuple[str, int]
    h2: tuple[str, int] | None
    hops: int
    pids: list[int] = field(default_factory=list)   # proxy process-tree roots; [] for direct
    logs: list[Path] = field(default_factory=list)  # access logs (one per hop)
    rss_idle: float | None = None
    rss_after: float | None = None
    rps: list[float] = field(default_factory=list)
    rps_cpu: list[float] = field(default_factory=list)    # proxies' % of a core during wrk
    h2rps: list[float] = field(default_factory=list)
    h2cpu: list[float] = field(default_factory=list)
    p50: list[float] = field(default_factory=list)
    p99: list[float] = field(default_factory=list)
    cpu_per_krps: list[float] = field(default_factory=list)
    late50: list[float] = field(default_factory=list)
    late99: list[float] = field(default_factory=list)
    log_lines: list[int] = field(default_factory=list)    # per hop, for LOG_CHECK requests
    notes: list[str] = field(default_factory=list)

    def cpu(self) -> float:
        return sum(cpu_seconds(p) for p in self.pids)

    def rss(self) -> float:
        return sum(rss_mb(p) for p in self.pids)


LOG_CHECK = 100  # requests sent through every target at the end to count access-log lines


class Bench(l4.Bench):
    """bench_proxy_l4's process and namespace handling (spawn, waits, cleanup, CPU
    accounting) with this benchmark's namespaces, targets and measurements."""

    def __init__(self, tmp: Path, load: Load) -> None:
        super().__init__(tmp)
        tag = f"{os.getpid()}-{secrets.token_hex(2)}"
        self.client, self.pod, self.server = (f"rmr-bh-{k}-{tag}" for k in ("cli", "poda", "srv"))
        self.load = load

    # -------------------------------------------------------------- network and processes

    def make_network(self) -> None:
        for ns in (self.client, self.pod, self.server):
            run(["ip", "netns", "add", ns])
            self.namespaces.append(ns)
            run(["ip", "-n", ns, "link", "set", "lo", "up"])
        # veth pairs made directly inside the namespaces: nothing appears on the host.
        for ns, mine, theirs, my_ip, their_ip in (
                (self.client, "c0", "sc", CLI_IP, SRV_C_IP),
                (self.pod, "p0", "sp", POD_IP, SRV_P_IP)):
            run(["ip", "link", "add", "name", mine, "netns", ns, "type", "veth", "peer",
                 "name", theirs, "netns", self.server])
            run(["ip", "-n", ns, "addr", "add", f"{my_ip}/24", "dev", mine])
            run(["ip", "-n", ns, "link", "set", mine, "up"])
            run(["ip", "-n", self.server, "addr", "add", f"{their_ip}/24", "dev", theirs])
            run(["ip", "-n", self.server, "link", "set", theirs, "up"])
            run(["ip", "-n", ns, "route", "add", "default", "via", their_ip])

    def spawn(self, name: str, ns: str, argv: list[str]) -> subprocess.Popen[bytes]:
        # Append mode: HAProxy's access log is its stdout, emptied between runs (truncating a
        # file written at an offset would leave a hole; O_APPEND writes at the new end).
        log = open(self.tmp / f"{name.replace(' ', '-')}.log", "ab")  # noqa: SIM115
        # l4's CHILD_ENV (where it has one): children import remora from this checkout.
        proc = subprocess.Popen(in_ns(ns, argv), stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True,
                                env=getattr(l4, "CHILD_ENV", None))
        log.close()
        self.procs.append((name, proc))
        return proc

    def access_log(self, name: str) -> Path:
        """A file on tmpfs the proxy (possibly as uid 1337 after the drop) can append to."""
        path = self.tmp / f"access-{name.replace(' ', '-')}.log"
        path.touch()
        os.chown(path, 1337, 1337)
        return path

    def start(self) -> dict[str, Target]:
        tmp = self.tmp
        logs = {n: self.access_log(n) for n in ("nginx", "remora static", "nginx x2 front",
                                                "nginx x2 back", "sidecar a", "sidecar b")}
        confs = {
            "upstream.conf": nginx_upstream_conf(tmp),
            "nginx.conf": nginx_proxy_conf(tmp, "nginx", (18080, 18081),
                                           f"{SRV_C_IP}:{PLAIN_PORT}", logs["nginx"]),
            "nginx2-front.conf": nginx_proxy_conf(tmp, "nginx2-front", (19080, 19081),
                                                  "127.0.0.1:19090", logs["nginx x2 front"]),
            "nginx2-back.conf": nginx_proxy_conf(tmp, "nginx2-back", (19090, 19091),
                                                 f"{SRV_C_IP}:{PLAIN_PORT}",
                                                 logs["nginx x2 back"]),
            "haproxy.cfg": haproxy_conf(),
            "remora-static.yaml": yaml.safe_dump(remora_static_conf(logs["remora static"])),
            "rds.yaml": yaml.safe_dump(route_configs()),
            "sidecar-a.yaml": yaml.safe_dump(sidecar_a_conf(tmp / "rds.yaml",
                                                            logs["sidecar a"])),
            "sidecar-b.yaml": yaml.safe_dump(sidecar_b_conf(logs["sidecar b"])),
        }
        for fname, text in confs.items():
            (tmp / fname).write_text(text)

        def nginx(conf: str) -> list[str]:
            return ["nginx", "-p", str(tmp), "-c", str(tmp / conf)]

        def remora(conf: str) -> list[str]:
            return [REMORA, "proxy", "-c", str(tmp / conf), "--concurrency", "1",
                    "--drain-time-s", "1"]

        up = self.spawn("upstream nginx", self.server, nginx("upstream.conf"))
        for port in (PLAIN_PORT, H2_PORT):
            self.wait_port("upstream nginx", up, self.client, SRV_C_IP, port)
        self.wait_port("upstream nginx", up, self.server, "127.0.0.1", APP_PORT)

        targets = {"direct": Target("direct", self.client, (SRV_C_IP, PLAIN_PORT),
                                    (SRV_C_IP, H2_PORT), hops=0)}
        haproxy_log = self.tmp / "haproxy.log"  # its stdout (spawn's log)
        for name, argv, ports, log in (
                ("nginx", nginx("nginx.conf"), (18080, 18081), logs["nginx"]),
                ("haproxy", ["haproxy", "-db", "-f", str(tmp / "haproxy.cfg")],
                 (28080, 28081), haproxy_log),
                ("remora static", remora("remora-static.yaml"), (38080,),
                 logs["remora static"])):
            proc = self.spawn(name, self.client, argv)
            for port in ports:
                self.wait_port(name, proc, self.client, "127.0.0.1", port)
            if name.startswith("remora"):
                self.wait_ready(name, proc, self.client)
            targets[name] = Target(name, self.client, ("127.0.0.1", ports[0]),
                                   ("127.0.0.1", ports[-1]), hops=1, pids=[proc.pid],
                                   logs=[log])
        back = self.spawn("nginx x2 back", self.client, nginx("nginx2-back.conf"))
        self.wait_port("nginx x2 back", back, self.client, "127.0.0.1", 19090)
        front = self.spawn("nginx x2 front", self.client, nginx("nginx2-front.conf"))
        for port in (19080, 19081):
            self.wait_port("nginx x2 front", front, self.client, "127.0.0.1", port)

        # The mesh: Istio's capture rules in both pods, then the sidecars (uid 1337).
        run(in_ns(self.pod, [REMORA, "iptables", *CAPTURE_FLAGS]), timeout=60)
        run(in_ns(self.server, [REMORA, "iptables", *SRV_CAPTURE_FLAGS]), timeout=60)
        side_b = self.spawn("sidecar b", self.server, remora("sidecar-b.yaml"))
        side_a = self.spawn("sidecar a", self.pod, remora("sidecar-a.yaml"))
        self.wait_ready("sidecar b", side_b, self.server)
        self.wait_ready("sidecar a", side_a, self.pod)
        targets["remora capture"] = Target(
            "remora capture", self.pod, (VIP_ONE, 8080), (VIP_ONE, 8080), hops=1,
            pids=[side_a.pid], logs=[logs["sidecar a"]])
        targets["nginx x2"] = Target(
            "nginx x2", self.client, ("127.0.0.1", 19080), ("127.0.0.1", 19081), hops=2,
            pids=[front.pid, back.pid], logs=[logs["nginx x2 front"], logs["nginx x2 back"]])
        targets["remora mesh"] = Target(
            "remora mesh", self.pod, (VIP_MESH, 8080), (VIP_MESH, 8080), hops=2,
            pids=[side_a.pid, side_b.pid], logs=[logs["sidecar a"], logs["sidecar b"]])

        time.sleep(1.0)  # settle, then idle RSS (before any traffic)
        for t in targets.values():
            if t.pids:
                t.rss_idle = t.rss()
        for t in targets.values():  # every path answers before it is measured
            status, body = http_get(t.ns, *t.http)
            if status != 200 or body != b"ok":
                raise RuntimeError(f"{t.name}: GET / answered {status} {body!r}")
        inbound = self.stats(self.server).get(
            f"cluster.inbound|{APP_PORT}||;.upstream_rq_total", 0)
        if inbound < 1:
            raise RuntimeError("remora mesh: the request did not go through sidecar B "
                               f"(inbound upstream_rq_total {inbound})")
        for t in targets.values():
            self.check_h2(t)
        return targets

    # -------------------------------------------------------------- measurements

    def stats(self, ns: str) -> dict[str, int]:
        _, body = http_get(ns, "127.0.0.1", 15000, "/stats", timeout=5)
        out: dict[str, int] = {}
        for line in body.decode().splitlines():
            name, sep, value = line.rpartition(": ")
            if sep and value.lstrip("-").isdigit():
                out[name] = int(value)
        return out

    def _h2load(self, t: Target, argv: list[str], timeout: float) -> dict[str, float]:
        assert t.h2 is not None
        url = f"http://{t.h2[0]}:{t.h2[1]}/"
        out = run(in_ns(t.ns, ["h2load", *argv, url]), timeout=timeout, check=False)
        text = out.stdout + out.stderr
        got = parse_h2load(text)
        if "rps" not in got or "2xx" not in got:
            t.notes.append(f"h2load: no result: {text.strip()[-300:]}")
        return got

    def check_h2(self, t: Target) -> None:
        """HTTP/2 prior knowledge works on this target, or its h2 column stays empty."""
        if t.h2 is None:
            return
        got = self._h2load(t, ["-n", "20", "-c", "1", "-m", "1"], timeout=30)
        if got.get("2xx") != 20:
            t.notes.append(f"h2c (prior knowledge) check failed, h2 not measured: {got}")
            t.h2 = None

    def wrk(self, t: Target) -> None:
        ld = self.load
        url = f"http://{t.http[0]}:{t.http[1]}/"
        base = ["wrk", "-t1", f"-c{ld.wrk_connections}"]
        run(in_ns(t.ns, [*base, f"-d{ld.wrk_warmup}s", url]), timeout=30)
        cpu0, w0 = t.cpu(), time.monotonic()
        out = run(in_ns(t.ns, [*base, f"-d{ld.wrk_seconds}s", url]), timeout=60).stdout
        cpu = (t.cpu() - cpu0) / (time.monotonic() - w0) * 100
        m = re.search(r"Requests/sec:\s+([\d.]+)", out)
        if m is None:
            raise RuntimeError(f"{t.name}: wrk printed no rate:\n{out}")
        for pattern in (r"Socket errors:[^\n]*", r"Non-2xx or 3xx responses:[^\n]*"):
            e = re.search(pattern, out)
            if e:
                t.notes.append(f"wrk: {e.group(0).strip()}")
        t.rps.append(float(m.group(1)))
        if t.pids:
            t.rps_cpu.append(cpu)

    def h2load(self, t: Target) -> None:
        if t.h2 is None:
            return
        ld = self.load
        cpu0, w0 = t.cpu(), time.monotonic()
        got = self._h2load(t, ["-t1", f"-c{ld.h2_clients}", f"-m{ld.h2_streams}",
                               f"-D{ld.h2_seconds}", f"--warm-up-time={ld.h2_warmup}"],
                           timeout=ld.h2_seconds + ld.h2_warmup + 30)
        cpu = (t.cpu() - cpu0) / (time.monotonic() - w0) * 100
        if "rps" not in got:
            return
        bad = {k: int(got[k]) for k in ("failed", "errored", "timeout", "3xx", "4xx", "5xx")
               if got.get(k)}
        if bad:
            t.notes.append(f"h2load: {bad} (of {got.get('total', 0):.0f} requests)")
        t.h2rps.append(got["rps"])
        if t.pids:
            t.h2cpu.append(cpu)

    def latency(self, t: Target) -> None:
        ld = self.load
        host, port = t.http
        argv = [sys.executable, __file__, "--latency-client", host, str(port), str(ld.rate),
                str(ld.rate_seconds), str(ld.rate_warmup), str(ld.rate_connections)]
        cpu0 = t.cpu()
        res = run(in_ns(t.ns, argv), timeout=ld.rate_seconds + ld.rate_warmup + 30)
        cpu = t.cpu() - cpu0
        data = json.loads(res.stdout)
        if data["errors"]:
            t.notes.append(f"latency client: {data['errors'][:3]}")
        t.p50.append(data["p50_us"])
        t.p99.append(data["p99_us"])
        if t.pids:
            # CPU seconds over the run per 1000 requests sent = % of one core at 1000 rps
            t.cpu_per_krps.append(cpu / data["sent"] * 1000 * 100)
        t.late50.append(data["send_late_p50_us"])
        t.late99.append(data["send_late_p99_us"])

    def trim_logs(self, targets: dict[str, Target]) -> None:
        """Keep the tmpfs small: empty big access logs (every writer appends)."""
        for t in targets.values():
            for path in t.logs:
                with contextlib.suppress(OSError):
                    if path.stat().st_size > LOG_TRUNCATE_ABOVE:
                        os.truncate(path, 0)

    def check_logs(self, targets: dict[str, Target]) -> None:
        """Per target: LOG_CHECK keep-alive requests, then the request lines each hop's
        access log gained (buffered logs flush within 1 s; waits up to 5 s)."""
        for t in targets.values():
            if not t.logs:
                continue
            for p in t.logs:
                os.truncate(p, 0)
            get_many(t.ns, *t.http, LOG_CHECK)
            deadline = time.monotonic() + 5.0
            while True:
                t.log_lines = [count_requests(p) for p in t.logs]
                if min(t.log_lines) >= LOG_CHECK or time.monotonic() > deadline:
                    break
                time.sleep(0.1)

    def mesh_proof(self) -> list[str]:
        """Counters showing both mesh hops and Istio's metrics on each side."""
        a, b = self.stats(self.pod), self.stats(self.server)
        out = []
        for label, stats, keys in (
                ("sidecar A", a, (f"cluster.outbound|8080||upstream.{NS_SUFFIX};."
                                  "upstream_rq_total",
                                  f"cluster.outbound|8080||server.{NS_SUFFIX};."
                                  "upstream_rq_total",
                                  "http.outbound_0.0.0.0_8080.downstream_rq_total",
                                  # wrk's empty probe connection, one per wrk run: no
                                  # bytes, so http_inspector → the default (TCP) chain
                                  "cluster.PassthroughCluster.upstream_cx_total")),
                ("sidecar B", b, (f"cluster.inbound|{APP_PORT}||;.upstream_rq_total",
                                  f"http.inbound_0.0.0.0_{APP_PORT}.downstream_rq_total"))):
            out.append(f"{label}: " + ", ".join(f"{k} {stats.get(k, '-')}" for k in keys))
        for label, ns in (("sidecar A", self.pod), ("sidecar B", self.server)):
            _, body = http_get(ns, "127.0.0.1", 15000, "/stats/prometheus", timeout=5)
            series = [ln for ln in body.decode().splitlines()
                      if ln.startswith("istio_requests_total{")]
            total = sum(float(ln.rsplit(" ", 1)[1]) for ln in series)
            reporters = sorted({m.group(1) for ln in series
                                if (m := re.search(r'reporter="(\w+)"', ln))})
            out.append(f"{label}: istio_requests_total {len(series)} series, sum {total:.0f}, "
                       f"reporter {reporters}")
        return out


def get_many(ns: str, host: str, port: int, n: int) -> None:
    """``n`` keep-alive GETs from inside ``ns`` (each must answer 200)."""
    with netns(ns):
        conn = http.client.HTTPConnection(host, port, timeout=5)
        conn.connect()
    try:
        for _ in range(n):
            conn.request("GET", "/logcheck")
            resp = conn.getresponse()
            resp.read()
            if resp.status != 200:
                raise RuntimeError(f"{host}:{port} answered {resp.status}")
    finally:
        conn.close()


def count_requests(path: Path) -> int:
    try:
        return path.read_bytes().count(b"GET /logcheck")
    except OSError:
        return 0


# ----------------------------------------------------------------------------- report

Row = dict[str, float | None]


def added(targets: dict[str, Target], name: str, which: str) -> list[float]:
    t, d = targets[name], targets["direct"]
    if not t.pids:
        return []
    return [p - q for p, q in zip(getattr(t, which), getattr(d, which), strict=False)]


def rows_of(targets: dict[str, Target]) -> dict[str, Row]:
    rows: dict[str, Row] = {}
    for name in TARGET_ORDER:
        t = targets[name]
        per_core = [r / (c / 100) for r, c in zip(t.rps, t.rps_cpu, strict=False) if c > 0]
        rows[name] = {"rps": med(t.rps), "rps_cpu": med(t.rps_cpu),
                      "rps_core": med(per_core), "h2": med(t.h2rps), "h2cpu": med(t.h2cpu),
                      "p50": med(t.p50), "p99": med(t.p99),
                      "add50": med(added(targets, name, "p50")),
                      "add99": med(added(targets, name, "p99")),
                      "cpu": med(t.cpu_per_krps), "rss_idle": t.rss_idle,
                      "rss_after": t.rss_after}
    return rows


def report(targets: dict[str, Target], load: Load, rounds: int, load_before: float,
           foreign: list[float]) -> None:
    rows = rows_of(targets)
    print(f"proxy HTTP benchmark: one worker per proxy, {os.cpu_count()} CPUs shared by "
          f"clients, proxies and upstream; {rounds} round(s), medians; access logs on")
    # The interpreter's build changes remora's figures (README: "The interpreter build matters").
    print(f"  remora runs on Python {platform.python_version()} ({sys.executable}, "
          f"{platform.python_build()[1]})")
    print(f"  anything else busy on this machine skews every number: load average before the "
          f"run {load_before:.2f}; CPU used outside this benchmark's processes, per round "
          f"(kernel threads included, so rarely 0): "
          f"{', '.join(f'{x:.0f}%' for x in foreign)} of one CPU")
    print(f"  rps: wrk -t1 -c{load.wrk_connections} -d{load.wrk_seconds}s keep-alive, 2-byte "
          f"body; h2: h2load -c{load.h2_clients} -m{load.h2_streams} -D{load.h2_seconds} "
          f"(h2c prior knowledge; HTTP/1.1 upstream); latency: {load.rate} req/s for "
          f"{load.rate_seconds:.0f}s over {load.rate_connections} connections, timed from the "
          "intended send time")
    print(f"  {'target':<15} {'hops':>4} {'rps':>7} {'cpu%':>5} {'rps/core':>8} {'h2 rps':>7} "
          f"{'h2cpu%':>6} {'p50µs':>6} {'p99µs':>6} {'+p50':>5} {'+p99':>5} {'cpu%@1k':>7} "
          f"{'RSS idle':>8} {'RSS after':>9}")
    for name in TARGET_ORDER:
        r, t = rows[name], targets[name]
        print(f"  {name:<15} {t.hops:>4} {fmt(r['rps'], '7.0f')} {fmt(r['rps_cpu'], '5.0f')} "
              f"{fmt(r['rps_core'], '8.0f')} {fmt(r['h2'], '7.0f')} {fmt(r['h2cpu'], '6.0f')} "
              f"{fmt(r['p50'], '6.0f')} {fmt(r['p99'], '6.0f')} {fmt(r['add50'], '5.0f')} "
              f"{fmt(r['add99'], '5.0f')} {fmt(r['cpu'], '7.1f')} {mb(r['rss_idle']):>8} "
              f"{mb(r['rss_after']):>9}")
    print("  cpu%/h2cpu%: the proxies' share of one core during the wrk/h2load run (two hops: "
          "both proxies; near 100 per proxy: the proxy is the bottleneck); rps/core: rps per "
          "core of proxy CPU; +p50/+p99: added over direct (µs); cpu%@1k: % of one core per "
          "1000 req/s at the fixed rate; RSS: VmRSS of the process trees (nginx: master + "
          "worker; two hops: both proxies; remora capture and remora mesh share sidecar A)")
    late50 = [x for t in targets.values() for x in t.late50]
    late99 = [x for t in targets.values() for x in t.late99]
    print(f"  latency client's own send lateness (all targets): p50 {fmt(med(late50), '.0f')} "
          f"µs, p99 {fmt(med(late99), '.0f')} µs (included in p50/p99, cancels in +p50/+p99)")
    logs = ", ".join(f"{n} {'+'.join(str(x) for x in targets[n].log_lines)}"
                     for n in TARGET_ORDER if targets[n].logs)
    print(f"  access-log lines for {LOG_CHECK} requests (per hop): {logs}")
    if rounds > 1:
        for name in TARGET_ORDER:
            t = targets[name]
            print(f"  per round {name:<15} rps {[round(x) for x in t.rps]} "
                  f"h2 {[round(x) for x in t.h2rps]} p50 {[round(x) for x in t.p50]} "
                  f"p99 {[round(x) for x in t.p99]}")
    for name in TARGET_ORDER:
        for note in dict.fromkeys(targets[name].notes):
            print(f"  note {name}: {note}")

    print("  ratios (remora / reference; for latency, CPU and RSS lower is better):")
    pairs = [(rm, ref) for rm in ("remora static", "remora capture")
             for ref in ONE_HOP_REFS] + [("remora mesh", "nginx x2")]
    for rm, ref in pairs:
        a, b = rows[rm], rows[ref]
        print(f"    {rm:<15} vs {ref:<9} rps {ratio(a['rps'], b['rps'])}, rps/core "
              f"{ratio(a['rps_core'], b['rps_core'])}, h2 rps {ratio(a['h2'], b['h2'])}, +p50 "
              f"{ratio(a['add50'], b['add50'])}, +p99 {ratio(a['add99'], b['add99'])}, "
              f"cpu@1k {ratio(a['cpu'], b['cpu'])}, RSS idle "
              f"{ratio(a['rss_idle'], b['rss_idle'])}")
    mesh, cap = rows["remora mesh"], rows["remora capture"]
    print(f"    remora mesh vs remora capture (the second hop): rps "
          f"{ratio(mesh['rps'], cap['rps'])}, +p50 {ratio(mesh['add50'], cap['add50'])}, "
          f"cpu@1k {ratio(mesh['cpu'], cap['cpu'])}")

    print("  targets (issue): one hop judged on remora capture vs nginx [remora static "
          "alongside]; two hops on remora mesh vs nginx x2:")
    for label, rm, ref, alt in (("one hop ", "remora capture", "nginx", "remora static"),
                                ("two hops", "remora mesh", "nginx x2", None)):
        a, b = rows[rm], rows[ref]
        c = rows[alt] if alt else None

        def side(key: str, limit: float, most: bool, c: Row | None = c, b: Row = b) -> str:
            if c is None:
                return ""
            bound = None if b[key] is None else b[key] * limit
            ok = at_most(c[key], bound) if most else at_least(c[key], bound)
            return f"  [{ratio(c[key], b[key])} {verdict(ok)}]"

        rps_ok = at_least(a["rps"], b["rps"])
        add_bound = None if b["add50"] is None else b["add50"] * 1.2
        cpu_bound = None if b["cpu"] is None else b["cpu"] * 1.2
        print(f"    {label} rps >= 1.0x {ref}'s:                 {ratio(a['rps'], b['rps']):>6} "
              f"{verdict(rps_ok)}{side('rps', 1.0, False)}")
        print(f"    {label} added p50 at 1000 rps <= 1.2x {ref}'s "
              f"({fmt(b['add50'], '.0f')} µs): {fmt(a['add50'], '.0f')} µs "
              f"{ratio(a['add50'], b['add50'])} {verdict(at_most(a['add50'], add_bound))}"
              f"{side('add50', 1.2, True)}")
        print(f"    {label} CPU per 1000 rps <= 1.2x {ref}'s:    {ratio(a['cpu'], b['cpu']):>6} "
              f"{verdict(at_most(a['cpu'], cpu_bound))}{side('cpu', 1.2, True)}")
    if rounds > 1:
        spread = {n: [round(x) for x in added(targets, n, "p50")]
                  for n in ("nginx", "remora static", "remora capture", "nginx x2",
                            "remora mesh")}
        print(f"    added p50 per round (the spread is the noise): {spread}")
    print("    HTTP/2 (no issue target): h2 rps remora capture / nginx "
          f"{ratio(cap['h2'], rows['nginx']['h2'])}, remora static / nginx "
          f"{ratio(rows['remora static']['h2'], rows['nginx']['h2'])}")


# ----------------------------------------------------------------------------- main

def missing_tools() -> list[str]:
    return [t for t in ("nginx", "haproxy", "wrk", "h2load", "ip") if not shutil.which(t)]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=None,
                        help="measurement rounds over all targets (medians; default 3)")
    parser.add_argument("--quick", action="store_true",
                        help="one round of shorter runs (about a minute)")
    parser.add_argument("--latency-client", nargs=6, help=argparse.SUPPRESS,
                        metavar=("HOST", "PORT", "RATE", "SECONDS", "WARMUP", "CONNS"))
    args = parser.parse_args()
    if args.latency_client:
        host, port, rate, seconds, warmup, conns = args.latency_client
        print(json.dumps(latency_client(host, int(port), float(rate), float(seconds),
                                        float(warmup), int(conns))))
        return
    if os.geteuid() != 0:
        sys.exit("bench_proxy_http: needs root (network namespaces, iptables)")
    if missing_tools():
        sys.exit(f"bench_proxy_http: missing {', '.join(missing_tools())} (./dev bench "
                 "installs them; h2load is in nghttp2-client)")
    load = Load.quick() if args.quick else Load()
    rounds = args.rounds if args.rounds is not None else (1 if args.quick else 3)

    def interrupted(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")
    signal.signal(signal.SIGINT, interrupted)
    signal.signal(signal.SIGTERM, interrupted)
    started, load_before = time.monotonic(), os.getloadavg()[0]
    shm = "/dev/shm" if os.path.isdir("/dev/shm") else None  # access logs on tmpfs
    with tempfile.TemporaryDirectory(prefix="rmr-bh-", dir=shm) as tmpdir:
        tmp = Path(tmpdir)
        os.chmod(tmp, 0o755)
        bench = Bench(tmp, load)
        try:
            bench.make_network()
            targets = bench.start()
            foreign = []
            for rnd in range(rounds):
                order = TARGET_ORDER if rnd % 2 == 0 else TARGET_ORDER[::-1]
                before = bench.cpu_accounting()
                for step in (bench.wrk, bench.h2load, bench.latency):
                    for name in order:
                        step(targets[name])
                        bench.trim_logs(targets)
                foreign.append(bench.foreign_cpu(before))
            for t in targets.values():
                if t.pids:
                    t.rss_after = t.rss()
            bench.check_logs(targets)
            report(targets, load, rounds, load_before, foreign)
            for line in bench.mesh_proof():
                print(f"  {line}")
        except Exception:
            for name, _ in bench.procs:
                tail = bench.log_tail(name)
                if tail:
                    print(f"--- {name} log (last lines)\n{tail}", file=sys.stderr)
            raise
        finally:
            bench.cleanup()
    print(f"  (took {time.monotonic() - started:.0f}s)")


if __name__ == "__main__":
    main()
