"""Benchmark: `remora proxy` as an L4 (tcp_proxy) hop, against nginx `stream` and HAProxy.

Three throwaway network namespaces, made here and deleted at the end whatever happens:

    client ns (no capture)                          peer ns (the upstream servers)
      wrk / iperf3 / latency client ──► 10.231.1.2     nginx `return 200 "ok"` on :8080
      nginx stream   127.0.0.1:18080,15201 ──────────►   (1 worker, nothing on disk)
      haproxy tcp    127.0.0.1:28080,25201 ──────────►  iperf3 -s on :5201
      remora static  127.0.0.1:38080,35201 ──────────►
    pod ns (Istio's default capture rules, `remora iptables`)        ▲
      clients connect to the service 10.100.0.7:8080 / :5201         │ 10.231.2.2 / .3
      → nat OUTPUT REDIRECT → remora :15001 (virtualOutbound) → hand-off to 10.100.0.7_PORT
      → tcp_proxy → cluster outbound|PORT||… (two endpoints, LEAST_REQUEST) ────┘

Targets, measured in the same run, each proxy with ONE worker (nginx `worker_processes 1`,
HAProxy `nbthread 1`, `remora proxy --concurrency 1`):
  * direct          client → upstream, no proxy (the baseline for "added" latency);
  * nginx stream    `proxy_pass` to the upstream (stock settings);
  * haproxy tcp     `mode tcp`, one `server` line (stock settings);
  * remora static   a listener with tcp_proxy to a STATIC cluster (the same shape as the two
                    references);
  * remora capture  the real sidecar path: the Istio-shaped bootstrap from
                    examples/sidecar-bootstrap.yaml (plus a :5201 service for iperf3). nginx
                    and HAProxy cannot take this path (they do not read SO_ORIGINAL_DST), so
                    it is compared with remora static and with the references' one hop.
Metrics:
  * rps       wrk, 50 connections, keep-alive, tiny HTTP request/response (the proxies only
              relay bytes); with the proxy's CPU % during the run, and rps per core of proxy
              CPU (fairer when a reference is held back by the shared CPUs, not by itself);
  * conn/s    the same with `Connection: close`: one new connection (accept, upstream
              connect, close) per request. Not an issue target; it shows per-connection cost;
  * Gbit/s    iperf3, one stream, client → upstream;
  * latency   p50/p99 at a fixed 1000 requests/s from a constant-rate client (wrk2 is not in
              Debian): requests are scheduled in advance over 10 keep-alive connections and
              timed from their *intended* send time, so a stall is not hidden (no coordinated
              omission). The same client for every target; "added" = proxied − direct;
  * CPU       utime+stime of the proxy's process tree (/proc/PID/stat, reaped children
              included) over the fixed-rate run, as % of one core per 1000 requests/s;
  * RSS       VmRSS of the proxy's process tree idle after start-up, and after all the load.
Targets from issue 4 (judged on the capture path; the static path is shown alongside): rps
and throughput at least 1.0x nginx stream's, added p50 at 1000 rps at most nginx stream's,
idle RSS with the Istio-shaped config at most 45 MB.

Caveats: client, proxy and upstream share the machine's CPUs (two here), so a fast proxy can be
limited by wrk and the upstream rather than by itself (the proxy's CPU % during the wrk run
tells which), and anything else running on the machine skews every number (the load average
is printed). The capture path also pays the kernel's conntrack/NAT on every packet in the pod
namespace, in the client's and the proxy's system time; Envoy would pay it too. nginx's RSS is
master + worker. Medians over rounds; the targets' order alternates between rounds.

Run: ./dev bench   (or: .venv/bin/python bench/bench_proxy_l4.py [--rounds N], default 3)
Needs root and the Debian packages nginx, libnginx-mod-stream, haproxy, iperf3 and wrk
(`./dev bench` installs them).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import ctypes
import http.client
import json
import os
import platform
import re
import resource
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
REMORA = str(Path(sys.executable).with_name("remora"))
# Every child (the proxies, `remora iptables`) imports remora from this checkout's src/, even
# when the venv's editable install points at another worktree.
CHILD_ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(
    [str(ROOT / "src"), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))])}
STREAM_MODULE = "/usr/lib/nginx/modules/ngx_stream_module.so"
CAPTURE_FLAGS = ["-p", "15001", "-z", "15006", "-u", "1337", "-m", "REDIRECT", "-i", "*",
                 "-x", "", "-b", "*", "-d", "15090,15021,15020"]
# nginx on the capture path: the same rules, with nginx's worker (nobody) as the proxy's uid.
NGINX_CAPTURE_FLAGS = [*CAPTURE_FLAGS[:4], "-u", "65534", *CAPTURE_FLAGS[6:]]

# Addresses (inside the namespaces made here, never on the host).
CLIENT_IP, PEER_C_IP = "10.231.1.1", "10.231.1.2"          # client ns ↔ peer ns
POD_IP, PEER_P_IPS = "10.231.2.1", ("10.231.2.2", "10.231.2.3")  # pod ns ↔ peer ns (2 endpoints)
POD2_IP, PEER_P2_IP = "10.231.3.1", "10.231.3.2"           # nginx's pod ns ↔ peer ns
SERVICE_IP = "10.100.0.7"                                  # the captured service VIP
HTTP_PORT, IPERF_PORT = 8080, 5201
LISTEN = {"nginx stream": (18080, 15201), "haproxy tcp": (28080, 25201),
          "remora static": (38080, 35201)}

# Load. Every run is bounded in time: about 80 s a round over the five targets; three rounds
# by default, so that one round disturbed by something else on the machine does not decide
# the medians.
WRK_CONNECTIONS, WRK_THREADS, WRK_SECONDS, WRK_WARMUP_SECONDS = 50, 1, 3, 1
CLOSE_SECONDS = 2       # Connection: close runs (short: every request leaves a TIME_WAIT)
IPERF_SECONDS, IPERF_OMIT_SECONDS = 2, 1
RATE, RATE_SECONDS, RATE_WARMUP_SECONDS, RATE_CONNECTIONS = 1000, 4.0, 1.0, 10

TARGET_ORDER = ("direct", "nginx stream", "haproxy tcp", "nginx capture", "remora static",
                "remora capture")
REFERENCES = ("nginx stream", "haproxy tcp", "nginx capture")
REMORAS = ("remora static", "remora capture")
HZ = os.sysconf("SC_CLK_TCK")


# ----------------------------------------------------------------------------- small helpers

def run(argv: list[str], *, timeout: float = 30, check: bool = True,
        ) -> subprocess.CompletedProcess[str]:
    res = subprocess.run(argv, text=True, capture_output=True, timeout=timeout, check=False,
                         env=CHILD_ENV)
    if check and res.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} exited with {res.returncode}: "
                           f"{(res.stderr or res.stdout).strip()[-800:]}")
    return res


def in_ns(ns: str, argv: list[str]) -> list[str]:
    return ["ip", "netns", "exec", ns, *argv]


_libc = ctypes.CDLL(None, use_errno=True)
CLONE_NEWNET = 0x40000000


@contextlib.contextmanager
def netns(name: str) -> Iterator[None]:
    """Run this thread in network namespace ``name`` for the block (sockets made inside stay
    there). Python 3.11 has no os.setns, hence libc's."""
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    target = os.open(f"/run/netns/{name}", os.O_RDONLY)
    try:
        if _libc.setns(target, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns {name}: {os.strerror(err)}")
        try:
            yield
        finally:
            if _libc.setns(home, CLONE_NEWNET) != 0:
                err = ctypes.get_errno()
                raise OSError(err, f"setns back: {os.strerror(err)}")
    finally:
        os.close(home)
        os.close(target)


def http_get(ns: str, host: str, port: int, path: str = "/", timeout: float = 2.0,
             ) -> tuple[int, bytes]:
    """GET from inside ``ns`` (http.client: no proxy settings from the environment apply)."""
    with netns(ns):
        conn = http.client.HTTPConnection(host, port, timeout=timeout)
        conn.connect()
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def proc_tree(pid: int) -> list[int]:
    """``pid`` and its live descendants."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def cpu_seconds(pid: int) -> float:
    """utime+stime of ``pid``'s tree, reaped children (cutime+cstime) included."""
    ticks = 0
    for p in proc_tree(pid):
        try:
            with open(f"/proc/{p}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        ticks += sum(int(x) for x in fields[11:15])  # utime stime cutime cstime
    return ticks / HZ


def rss_mb(pid: int) -> float:
    kb = 0
    for p in proc_tree(pid):
        try:
            with open(f"/proc/{p}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        kb += int(line.split()[1])
        except OSError:
            continue
    return kb / 1024


# ----------------------------------------------------------------------------- constant-rate client

def latency_client(host: str, port: int, rate: float, seconds: float, warmup: float,
                   conns: int) -> dict[str, object]:
    """Send ``rate`` HTTP/1.1 requests per second for ``warmup + seconds`` over ``conns``
    keep-alive connections; request i is due at t0 + i/rate on connection i % conns. Latency
    is response time minus *due* time, so a late send (a slow previous response on the same
    connection, or the client being late) counts against the target as wrk2 does it."""
    request = f"GET / HTTP/1.1\r\nHost: {host}\r\n\r\n".encode()
    socks = []
    for _ in range(conns):
        s = socket.create_connection((host, port), timeout=5)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        socks.append(s)
    total = int(rate * (warmup + seconds))
    t0 = time.perf_counter() + 0.2
    measured_from = t0 + warmup
    lat: list[list[float]] = [[] for _ in range(conns)]
    late: list[list[float]] = [[] for _ in range(conns)]
    errors: list[str] = []

    def worker(k: int) -> None:
        # 1 ns timer slack: sleeps end on time instead of up to 50 µs late.
        _libc.prctl(29, 1, 0, 0, 0)  # PR_SET_TIMERSLACK
        s, buf = socks[k], b""
        try:
            for i in range(k, total, conns):
                due = t0 + i / rate
                delay = due - time.perf_counter()
                if delay > 0:
                    time.sleep(delay)
                sent = time.perf_counter()
                s.sendall(request)
                while True:
                    head_end = buf.find(b"\r\n\r\n")
                    if head_end >= 0:
                        m = re.search(rb"(?i)\r\ncontent-length:\s*(\d+)", buf[:head_end])
                        need = head_end + 4 + (int(m.group(1)) if m else 0)
                        if len(buf) >= need:
                            buf = buf[need:]
                            break
                    chunk = s.recv(65536)
                    if not chunk:
                        raise ConnectionError("closed by the server")
                    buf += chunk
                done = time.perf_counter()
                if due >= measured_from:
                    lat[k].append(done - due)
                    late[k].append(sent - due)
        except OSError as exc:
            errors.append(f"connection {k}: {exc}")

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(conns)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    end = time.perf_counter()
    for s in socks:
        s.close()
    all_lat = sorted(x for xs in lat for x in xs)
    all_late = sorted(x for xs in late for x in xs)

    def pct(xs: list[float], q: float) -> float:
        return xs[min(len(xs) - 1, int(q * len(xs)))] * 1e6 if xs else float("nan")

    return {"count": len(all_lat), "sent": total, "errors": errors, "elapsed": end - t0,
            "p50_us": pct(all_lat, 0.50), "p90_us": pct(all_lat, 0.90),
            "p99_us": pct(all_lat, 0.99), "max_us": pct(all_lat, 1.0),
            "send_late_p50_us": pct(all_late, 0.50), "send_late_p99_us": pct(all_late, 0.99)}


# ----------------------------------------------------------------------------- configs

def nginx_upstream_conf(tmp: Path) -> str:
    return f"""
worker_processes 1;
daemon off;
pid {tmp}/upstream.pid;
error_log {tmp}/upstream-error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    keepalive_requests 100000000;
    keepalive_timeout 300s;
    client_body_temp_path {tmp}/up-body;
    proxy_temp_path {tmp}/up-proxy;
    fastcgi_temp_path {tmp}/up-fastcgi;
    uwsgi_temp_path {tmp}/up-uwsgi;
    scgi_temp_path {tmp}/up-scgi;
    server {{
        listen {HTTP_PORT} backlog=4096;
        location / {{ return 200 "ok"; }}
    }}
}}
"""


def nginx_stream_conf(tmp: Path) -> str:
    http, iperf = LISTEN["nginx stream"]
    return f"""
load_module {STREAM_MODULE};
worker_processes 1;
daemon off;
pid {tmp}/stream.pid;
error_log {tmp}/stream-error.log warn;
events {{ worker_connections 4096; }}
stream {{
    server {{ listen 127.0.0.1:{http} backlog=4096; proxy_pass {PEER_C_IP}:{HTTP_PORT}; }}
    server {{ listen 127.0.0.1:{iperf}; proxy_pass {PEER_C_IP}:{IPERF_PORT}; }}
}}
"""


def nginx_capture_conf(tmp: Path) -> str:
    """nginx stream as a sidecar would sit: on 15001 in a pod namespace with Istio's capture
    rules. It cannot read SO_ORIGINAL_DST, so it sends everything to the one upstream (all
    this benchmark's captured traffic goes there anyway); iperf3 is not measured through it."""
    return f"""
load_module {STREAM_MODULE};
user nobody nogroup;
worker_processes 1;
daemon off;
pid {tmp}/capture.pid;
error_log {tmp}/capture-error.log warn;
events {{ worker_connections 4096; }}
stream {{
    server {{ listen 15001 backlog=4096; proxy_pass {PEER_P2_IP}:{HTTP_PORT}; }}
}}
"""


def haproxy_conf() -> str:
    http, iperf = LISTEN["haproxy tcp"]
    return f"""
global
    nbthread 1
    maxconn 4096
defaults
    mode tcp
    timeout connect 5s
    timeout client 60s
    timeout server 60s
listen http
    bind 127.0.0.1:{http}
    server up {PEER_C_IP}:{HTTP_PORT}
listen iperf
    bind 127.0.0.1:{iperf}
    server up {PEER_C_IP}:{IPERF_PORT}
"""


def _tcp_proxy(name: str) -> dict[str, object]:
    return {"name": "envoy.filters.network.tcp_proxy", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy",
        "stat_prefix": name, "cluster": name}}


def _endpoints(ips: tuple[str, ...], port: int) -> list[dict[str, object]]:
    return [{"lb_endpoints": [{"endpoint": {"address": {"socket_address": {
        "address": ip, "port_value": port}}}} for ip in ips]}]


def remora_static_conf() -> dict[str, object]:
    """One listener → tcp_proxy → STATIC cluster per port: what nginx and HAProxy get."""
    listeners, clusters = [], []
    for name, lport, uport in (("http", LISTEN["remora static"][0], HTTP_PORT),
                               ("iperf", LISTEN["remora static"][1], IPERF_PORT)):
        listeners.append({"name": name, "address": {"socket_address": {
            "address": "127.0.0.1", "port_value": lport}},
            "filter_chains": [{"filters": [_tcp_proxy(name)]}]})
        clusters.append({"name": name, "type": "STATIC", "connect_timeout": "5s",
                         "load_assignment": {"cluster_name": name,
                                             "endpoints": _endpoints((PEER_C_IP,), uport)}})
    return {"admin": {"address": {"socket_address": {"address": "127.0.0.1",
                                                     "port_value": 15000}}},
            "static_resources": {"listeners": listeners, "clusters": clusters}}


def remora_istio_conf() -> dict[str, object]:
    """examples/sidecar-bootstrap.yaml with its service's endpoints in the peer namespace, and
    a second service of the same shape on :5201 for iperf3."""
    conf = yaml.safe_load((ROOT / "examples" / "sidecar-bootstrap.yaml").read_text())
    res = conf["static_resources"]
    svc_listener = next(li for li in res["listeners"] if li["name"] == f"{SERVICE_IP}_8080")
    svc_cluster = next(c for c in res["clusters"] if c["name"].startswith("outbound|8080||"))
    svc_cluster["load_assignment"]["endpoints"] = _endpoints(PEER_P_IPS, HTTP_PORT)
    name = "outbound|5201||iperf.default.svc.cluster.local"
    li = copy.deepcopy(svc_listener)
    li["name"] = f"{SERVICE_IP}_{IPERF_PORT}"
    li["address"]["socket_address"]["port_value"] = IPERF_PORT
    li["filter_chains"] = [{"filters": [_tcp_proxy(name)]}]
    cl = copy.deepcopy(svc_cluster)
    cl.update(name=name, alt_stat_name=name + ";")
    cl["eds_cluster_config"]["service_name"] = name
    cl["load_assignment"] = {"cluster_name": name,
                             "endpoints": _endpoints(PEER_P_IPS, IPERF_PORT)}
    res["listeners"].append(li)
    res["clusters"].append(cl)
    return conf  # type: ignore[no-any-return]


# ----------------------------------------------------------------------------- the bench

@dataclass
class Target:
    name: str
    ns: str
    http: tuple[str, int]
    iperf: tuple[str, int]
    pid: int | None = None               # the proxy process (tree root); None for direct
    rss_idle: float | None = None
    rss_after: float | None = None
    rps: list[float] = field(default_factory=list)
    rps_cpu: list[float] = field(default_factory=list)    # proxy % of a core during wrk
    cps: list[float] = field(default_factory=list)        # requests/s, Connection: close
    gbps: list[float] = field(default_factory=list)
    p50: list[float] = field(default_factory=list)
    p99: list[float] = field(default_factory=list)
    cpu_per_krps: list[float] = field(default_factory=list)
    late50: list[float] = field(default_factory=list)     # the client's own send lateness
    late99: list[float] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


class Bench:
    def __init__(self, tmp: Path, tcp_offload: str = "off") -> None:
        tag = f"{os.getpid()}-{secrets.token_hex(2)}"
        self.tmp = tmp
        self.tcp_offload = tcp_offload
        self.client, self.pod, self.peer, self.pod2 = (
            f"rmb-{k}-{tag}" for k in ("cli", "pod", "peer", "pod2"))
        self.namespaces: list[str] = []
        self.procs: list[tuple[str, subprocess.Popen[bytes]]] = []

    # -------------------------------------------------------------- network and processes

    def make_network(self) -> None:
        for ns in (self.client, self.pod, self.peer, self.pod2):
            run(["ip", "netns", "add", ns])
            self.namespaces.append(ns)
            run(["ip", "-n", ns, "link", "set", "lo", "up"])
        # veth pairs made directly inside the namespaces: nothing appears on the host.
        for ns, mine, theirs, my_ip, their_ips in (
                (self.client, "c0", "pc", CLIENT_IP, (PEER_C_IP,)),
                (self.pod, "p0", "pp", POD_IP, PEER_P_IPS),
                (self.pod2, "q0", "pq", POD2_IP, (PEER_P2_IP,))):
            run(["ip", "link", "add", "name", mine, "netns", ns, "type", "veth", "peer",
                 "name", theirs, "netns", self.peer])
            run(["ip", "-n", ns, "addr", "add", f"{my_ip}/24", "dev", mine])
            run(["ip", "-n", ns, "link", "set", mine, "up"])
            for ip in their_ips:
                run(["ip", "-n", self.peer, "addr", "add", f"{ip}/24", "dev", theirs])
            run(["ip", "-n", self.peer, "link", "set", theirs, "up"])
            run(["ip", "-n", ns, "route", "add", "default", "via", their_ips[0]])

    def spawn(self, name: str, ns: str, argv: list[str]) -> subprocess.Popen[bytes]:
        log = open(self.tmp / f"{name.replace(' ', '-')}.log", "wb")  # noqa: SIM115
        proc = subprocess.Popen(in_ns(ns, argv), stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True,
                                env=CHILD_ENV)
        log.close()
        self.procs.append((name, proc))
        return proc

    def log_tail(self, name: str) -> str:
        path = self.tmp / f"{name.replace(' ', '-')}.log"
        try:
            return "\n".join(path.read_text(errors="replace").splitlines()[-15:])
        except OSError:
            return ""

    def wait_port(self, name: str, proc: subprocess.Popen[bytes], ns: str, host: str,
                  port: int, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with {proc.returncode}:\n"
                                   f"{self.log_tail(name)}")
            try:
                with netns(ns), socket.create_connection((host, port), timeout=0.5):
                    return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"{name}: {host}:{port} not listening after {timeout:.0f}s:\n"
                           f"{self.log_tail(name)}")

    def wait_ready(self, name: str, proc: subprocess.Popen[bytes], ns: str,
                   timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with {proc.returncode}:\n"
                                   f"{self.log_tail(name)}")
            with contextlib.suppress(OSError):
                if http_get(ns, "127.0.0.1", 15000, "/ready", timeout=0.5)[0] == 200:
                    return
            time.sleep(0.1)
        raise RuntimeError(f"{name}: /ready not 200 after {timeout:.0f}s:\n"
                           f"{self.log_tail(name)}")

    def cleanup(self) -> None:
        for _, proc in self.procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + 3.0
        for _, proc in self.procs:
            try:
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=5)
            # anything of its group still alive (workers) goes too
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
        for ns in reversed(self.namespaces):
            run(["ip", "netns", "del", ns], check=False)

    # -------------------------------------------------------------- starting the targets

    def start(self) -> dict[str, Target]:
        tmp = self.tmp
        (tmp / "upstream.conf").write_text(nginx_upstream_conf(tmp))
        (tmp / "stream.conf").write_text(nginx_stream_conf(tmp))
        (tmp / "haproxy.cfg").write_text(haproxy_conf())
        (tmp / "capture.conf").write_text(nginx_capture_conf(tmp))
        (tmp / "remora-static.yaml").write_text(yaml.safe_dump(remora_static_conf()))
        (tmp / "remora-istio.yaml").write_text(yaml.safe_dump(remora_istio_conf()))

        up = self.spawn("upstream nginx", self.peer,
                        ["nginx", "-p", str(tmp), "-c", str(tmp / "upstream.conf")])
        ip3 = self.spawn("upstream iperf3", self.peer, ["iperf3", "-s", "-p", str(IPERF_PORT)])
        self.wait_port("upstream nginx", up, self.client, PEER_C_IP, HTTP_PORT)
        self.wait_port("upstream iperf3", ip3, self.client, PEER_C_IP, IPERF_PORT)

        targets = {"direct": Target("direct", self.client, (PEER_C_IP, HTTP_PORT),
                                    (PEER_C_IP, IPERF_PORT))}
        procs = {
            "nginx stream": ["nginx", "-p", str(tmp), "-c", str(tmp / "stream.conf")],
            "haproxy tcp": ["haproxy", "-db", "-f", str(tmp / "haproxy.cfg")],
            "remora static": [REMORA, "proxy", "-c", str(tmp / "remora-static.yaml"),
                              "--concurrency", "1", "--drain-time-s", "1",
                              "--tcp-offload", self.tcp_offload],
        }
        for name, argv in procs.items():
            http, iperf = LISTEN[name]
            proc = self.spawn(name, self.client, argv)
            self.wait_port(name, proc, self.client, "127.0.0.1", http)
            self.wait_port(name, proc, self.client, "127.0.0.1", iperf)
            if name.startswith("remora"):
                self.wait_ready(name, proc, self.client)
            targets[name] = Target(name, self.client, ("127.0.0.1", http),
                                   ("127.0.0.1", iperf), pid=proc.pid)

        # The capture path: Istio's rules in the pod namespace, then the sidecar as uid 1337.
        run(in_ns(self.pod, [REMORA, "iptables", *CAPTURE_FLAGS]), timeout=60)
        proc = self.spawn("remora capture", self.pod,
                          [REMORA, "proxy", "-c", str(tmp / "remora-istio.yaml"),
                           "--concurrency", "1", "--drain-time-s", "1",
                           "--tcp-offload", self.tcp_offload])
        self.wait_ready("remora capture", proc, self.pod)
        targets["remora capture"] = Target("remora capture", self.pod, (SERVICE_IP, HTTP_PORT),
                                           (SERVICE_IP, IPERF_PORT), pid=proc.pid)
        # The same path with nginx stream as the sidecar (fixed upstream, see its config).
        run(in_ns(self.pod2, [REMORA, "iptables", *NGINX_CAPTURE_FLAGS]), timeout=60)
        proc = self.spawn("nginx capture", self.pod2,
                          ["nginx", "-p", str(tmp), "-c", str(tmp / "capture.conf")])
        self.wait_port("nginx capture", proc, self.pod2, SERVICE_IP, HTTP_PORT)
        targets["nginx capture"] = Target("nginx capture", self.pod2, (SERVICE_IP, HTTP_PORT),
                                          ("", 0), pid=proc.pid)

        time.sleep(1.0)  # settle, then idle RSS (before any traffic)
        for t in targets.values():
            if t.pid is not None:
                t.rss_idle = rss_mb(t.pid)
        for t in targets.values():  # every path answers before it is measured
            status, body = http_get(t.ns, *t.http)
            if status != 200 or body != b"ok":
                raise RuntimeError(f"{t.name}: GET / answered {status} {body!r}")
        return targets

    # -------------------------------------------------------------- measurements

    def _wrk(self, t: Target, extra: list[str], seconds: int) -> tuple[float, float]:
        """(requests/s, the proxy's % of one core) of one wrk run after a short warm-up."""
        url = f"http://{t.http[0]}:{t.http[1]}/"
        base = ["wrk", f"-t{WRK_THREADS}", f"-c{WRK_CONNECTIONS}", *extra]
        run(in_ns(t.ns, [*base, f"-d{WRK_WARMUP_SECONDS}s", url]), timeout=30)
        cpu0 = cpu_seconds(t.pid) if t.pid else 0.0
        w0 = time.monotonic()
        out = run(in_ns(t.ns, [*base, f"-d{seconds}s", url]), timeout=60).stdout
        cpu = (cpu_seconds(t.pid) - cpu0) / (time.monotonic() - w0) * 100 if t.pid else 0.0
        m = re.search(r"Requests/sec:\s+([\d.]+)", out)
        if m is None:
            raise RuntimeError(f"{t.name}: wrk printed no rate:\n{out}")
        for pattern in (r"Socket errors:[^\n]*", r"Non-2xx or 3xx responses:[^\n]*"):
            e = re.search(pattern, out)
            if e:
                t.notes.append(f"wrk {' '.join(extra) or 'keep-alive'}: {e.group(0).strip()}")
        return float(m.group(1)), cpu

    def wrk(self, t: Target) -> None:
        rps, cpu = self._wrk(t, [], WRK_SECONDS)
        t.rps.append(rps)
        t.rps_cpu.append(cpu)

    def wrk_close(self, t: Target) -> None:
        """Not an issue target: one new connection per request (per-connection cost)."""
        cps, _ = self._wrk(t, ["-H", "Connection: close"], CLOSE_SECONDS)
        t.cps.append(cps)

    def iperf(self, t: Target) -> None:
        host, port = t.iperf
        if not port:
            return      # not measured through this target
        res = run(in_ns(t.ns, ["iperf3", "-c", host, "-p", str(port), "-t", str(IPERF_SECONDS),
                               "-O", str(IPERF_OMIT_SECONDS), "-J", "--connect-timeout",
                               "5000"]), timeout=IPERF_SECONDS + IPERF_OMIT_SECONDS + 30,
                  check=False)
        try:
            data = json.loads(res.stdout)
            bps = data["end"]["sum_received"]["bits_per_second"]
        except (ValueError, KeyError):
            err = res.stdout[-300:] + res.stderr[-300:]
            t.notes.append(f"iperf3 failed: {err.strip()}")
            return
        t.gbps.append(bps / 1e9)

    def latency(self, t: Target) -> None:
        host, port = t.http
        argv = [sys.executable, __file__, "--latency-client", host, str(port), str(RATE),
                str(RATE_SECONDS), str(RATE_WARMUP_SECONDS), str(RATE_CONNECTIONS)]
        cpu0 = cpu_seconds(t.pid) if t.pid else 0.0
        res = run(in_ns(t.ns, argv), timeout=RATE_SECONDS + RATE_WARMUP_SECONDS + 30)
        cpu = cpu_seconds(t.pid) - cpu0 if t.pid else 0.0
        data = json.loads(res.stdout)
        if data["errors"]:
            t.notes.append(f"latency client: {data['errors'][:3]}")
        t.p50.append(data["p50_us"])
        t.p99.append(data["p99_us"])
        if t.pid:
            # cpu seconds over the run, per 1000 requests sent, as % of one core at 1000 rps
            t.cpu_per_krps.append(cpu / data["sent"] * 1000 * 100)
        t.late50.append(data["send_late_p50_us"])
        t.late99.append(data["send_late_p99_us"])

    def cpu_accounting(self) -> tuple[float, float, float]:
        """(now, CPU seconds the whole machine has been busy, CPU seconds of this benchmark's
        own processes: itself, its finished children, its running servers and proxies)."""
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
        busy = (sum(fields[:8]) - fields[3] - fields[4]) / HZ  # all but idle and iowait
        own = sum(getattr(resource.getrusage(who), attr)
                  for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
                  for attr in ("ru_utime", "ru_stime"))
        own += sum(cpu_seconds(p.pid) for _, p in self.procs if p.poll() is None)
        return time.monotonic(), busy, own

    def foreign_cpu(self, before: tuple[float, float, float]) -> float:
        """% of one CPU used by anything but this benchmark since ``before``."""
        (t0, busy0, own0), (t1, busy1, own1) = before, self.cpu_accounting()
        return max(0.0, (busy1 - busy0) - (own1 - own0)) / max(t1 - t0, 1e-9) * 100

    def capture_stats(self) -> str:
        """Proof that the capture path really went through remora's hand-off."""
        _, body = http_get(self.pod, "127.0.0.1", 15000, "/stats")
        wanted = ("listener.0.0.0.0_15001.downstream_cx_total",
                  f"listener.{SERVICE_IP}_{HTTP_PORT}.downstream_cx_total",
                  f"listener.{SERVICE_IP}_{IPERF_PORT}.downstream_cx_total",
                  "cluster.outbound|8080||svc.default.svc.cluster.local;.upstream_cx_total",
                  "cluster.outbound|5201||iperf.default.svc.cluster.local;.upstream_cx_total",
                  "cluster.PassthroughCluster.upstream_cx_total")
        lines = [ln for ln in body.decode().splitlines()
                 if ln.split(":")[0] in wanted or ln.split(":")[0].endswith(".offloaded")]
        return "; ".join(lines)


# ----------------------------------------------------------------------------- report

def med(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None


def fmt(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def mb(x: float | None) -> str:
    return "-" if x is None else f"{x:.1f}MB"


def ratio(a: float | None, b: float | None) -> str:
    # a ratio of a negative "added" latency (noise below direct) means nothing
    return "-" if a is None or b is None or a < 0 or b <= 0 else f"{a / b:.2f}x"


def verdict(ok: bool | None) -> str:
    return "n/a" if ok is None else ("MEETS" if ok else "MISSES")


def at_least(a: float | None, b: float | None) -> bool | None:
    return None if a is None or b is None else a >= b


def at_most(a: float | None, b: float | None) -> bool | None:
    return None if a is None or b is None else a <= b


Row = dict[str, float | None]


def added(targets: dict[str, Target], name: str, which: str) -> list[float]:
    """Per round: the target's latency percentile minus direct's in the same round."""
    t, d = targets[name], targets["direct"]
    if t.pid is None:
        return []
    return [p - q for p, q in zip(getattr(t, which), getattr(d, which), strict=False)]


def rows_of(targets: dict[str, Target]) -> dict[str, Row]:
    rows: dict[str, Row] = {}
    for name in TARGET_ORDER:
        t = targets[name]
        add50, add99 = added(targets, name, "p50"), added(targets, name, "p99")
        per_core = [r / (c / 100) for r, c in zip(t.rps, t.rps_cpu, strict=False) if c > 0]
        rows[name] = {"rps": med(t.rps), "rps_cpu": med(t.rps_cpu) if t.pid else None,
                      "rps_core": med(per_core) if t.pid else None,
                      "cps": med(t.cps), "gbps": med(t.gbps), "p50": med(t.p50),
                      "p99": med(t.p99), "add50": med(add50), "add99": med(add99),
                      "cpu": med(t.cpu_per_krps), "rss_idle": t.rss_idle,
                      "rss_after": t.rss_after}
    return rows


def report(targets: dict[str, Target], rounds: int, load_before: float,
           foreign: list[float]) -> None:
    rows = rows_of(targets)
    print(f"proxy L4 benchmark: one hop, one worker per proxy, {os.cpu_count()} CPUs shared by "
          f"client, proxy and upstream; {rounds} round(s), medians")
    # The interpreter's build changes remora's figures (README: "The interpreter build matters").
    print(f"  remora runs on Python {platform.python_version()} ({sys.executable}, "
          f"{platform.python_build()[1]})")
    print(f"  anything else busy on this machine skews every number: load average before the "
          f"run {load_before:.2f}; CPU used outside this benchmark's processes, per round "
          f"(kernel threads such as ksoftirqd included, so rarely 0): "
          f"{', '.join(f'{x:.0f}%' for x in foreign)} of one CPU")
    print(f"  rps: wrk -t{WRK_THREADS} -c{WRK_CONNECTIONS} -d{WRK_SECONDS}s keep-alive, 2-byte "
          f"body; conn/s: the same for {CLOSE_SECONDS}s with `Connection: close` (a new "
          f"connection per request; not an issue target); Gbit/s: iperf3, one stream, "
          f"{IPERF_SECONDS}s; latency: "
          f"{RATE} req/s for {RATE_SECONDS:.0f}s over {RATE_CONNECTIONS} connections, timed "
          "from the intended send time")
    print(f"  {'target':<15} {'rps':>7} {'cpu%':>5} {'rps/core':>8} {'conn/s':>7} {'Gbit/s':>7} "
          f"{'p50µs':>6} {'p99µs':>6} {'+p50':>5} {'+p99':>5} {'cpu%@1k':>7} {'RSS idle':>8} "
          f"{'RSS after':>9}")
    for name in TARGET_ORDER:
        r = rows[name]
        print(f"  {name:<15} {fmt(r['rps'], '7.0f')} {fmt(r['rps_cpu'], '5.0f')} "
              f"{fmt(r['rps_core'], '8.0f')} {fmt(r['cps'], '7.0f')} {fmt(r['gbps'], '7.2f')} "
              f"{fmt(r['p50'], '6.0f')} {fmt(r['p99'], '6.0f')} {fmt(r['add50'], '5.0f')} "
              f"{fmt(r['add99'], '5.0f')} {fmt(r['cpu'], '7.1f')} {mb(r['rss_idle']):>8} "
              f"{mb(r['rss_after']):>9}")
    print("  cpu%: the proxy's share of one core during the keep-alive wrk run (near 100: the "
          "proxy is the bottleneck; below: the shared CPUs, client and upstream limit it too); "
          "rps/core: rps per core of proxy CPU, fairer when the proxies' cpu% differ; "
          "+p50/+p99: added over direct (µs); cpu%@1k: % of one core per 1000 req/s at the "
          "fixed rate; RSS: VmRSS of the process tree (nginx: master + worker)")
    late50 = [x for t in targets.values() for x in t.late50]
    late99 = [x for t in targets.values() for x in t.late99]
    print(f"  latency client's own send lateness (all targets): p50 {fmt(med(late50), '.0f')} "
          f"µs, p99 {fmt(med(late99), '.0f')} µs (included in p50/p99, cancels in +p50/+p99)")
    if rounds > 1:
        for name in TARGET_ORDER:
            t = targets[name]
            print(f"  per round {name:<15} rps {[round(x) for x in t.rps]} "
                  f"Gbit/s {[round(x, 2) for x in t.gbps]} p50 {[round(x) for x in t.p50]} "
                  f"p99 {[round(x) for x in t.p99]}")
    for name in TARGET_ORDER:
        for note in dict.fromkeys(targets[name].notes):
            print(f"  note {name}: {note}")

    print("  ratios (remora / reference; for latency, CPU and RSS lower is better):")
    for rm in REMORAS:
        for ref in (*REFERENCES, "direct"):
            a, b = rows[rm], rows[ref]
            parts = [f"rps {ratio(a['rps'], b['rps'])}"]
            if ref != "direct":
                parts.append(f"rps/core {ratio(a['rps_core'], b['rps_core'])}")
            parts += [f"conn/s {ratio(a['cps'], b['cps'])}",
                      f"Gbit/s {ratio(a['gbps'], b['gbps'])}"]
            if ref == "direct":
                parts += [f"p50 {ratio(a['p50'], b['p50'])}", f"p99 {ratio(a['p99'], b['p99'])}"]
            else:
                parts += [f"+p50 {ratio(a['add50'], b['add50'])}",
                          f"+p99 {ratio(a['add99'], b['add99'])}",
                          f"cpu@1k {ratio(a['cpu'], b['cpu'])}",
                          f"RSS idle {ratio(a['rss_idle'], b['rss_idle'])}"]
            print(f"    {rm:<15} vs {ref:<13} " + ", ".join(parts))
    cap, st, ng = rows["remora capture"], rows["remora static"], rows["nginx stream"]
    ngc = rows["nginx capture"]
    print(f"    remora capture vs remora static: rps {ratio(cap['rps'], st['rps'])}, conn/s "
          f"{ratio(cap['cps'], st['cps'])}, Gbit/s {ratio(cap['gbps'], st['gbps'])}, +p50 "
          f"{ratio(cap['add50'], st['add50'])}, cpu@1k {ratio(cap['cpu'], st['cpu'])}")

    print("  targets (issue 4), judged on remora capture [remora static alongside]:")
    print(f"    rps >= 1.0x nginx stream:          {ratio(cap['rps'], ng['rps']):>6} "
          f"{verdict(at_least(cap['rps'], ng['rps']))}  [{ratio(st['rps'], ng['rps'])} "
          f"{verdict(at_least(st['rps'], ng['rps']))}]")
    print(f"      the same hop (capture → proxy → upstream), nginx stream as the sidecar: "
          f"{ratio(cap['rps'], ngc['rps'])} {verdict(at_least(cap['rps'], ngc['rps']))}; "
          f"added p50 {fmt(cap['add50'], '.1f')} vs {fmt(ngc['add50'], '.1f')} µs "
          f"{verdict(at_most(cap['add50'], ngc['add50']))}")
    print(f"    throughput >= 1.0x nginx stream:   {ratio(cap['gbps'], ng['gbps']):>6} "
          f"{verdict(at_least(cap['gbps'], ng['gbps']))}  [{ratio(st['gbps'], ng['gbps'])} "
          f"{verdict(at_least(st['gbps'], ng['gbps']))}]")
    print(f"    added p50 at 1000 rps <= nginx stream's ({fmt(ng['add50'], '.1f')} µs): "
          f"{fmt(cap['add50'], '.1f')} µs {verdict(at_most(cap['add50'], ng['add50']))}  "
          f"[{fmt(st['add50'], '.1f')} µs {verdict(at_most(st['add50'], ng['add50']))}]")
    if rounds > 1:
        spread = {n: [round(x) for x in added(targets, n, "p50")]
                  for n in ("nginx stream", *REMORAS)}
        print(f"      added p50 per round (the spread is the noise): {spread}")
    print(f"    idle RSS with the Istio-shaped config <= 45 MB: {fmt(cap['rss_idle'], '.1f')} MB "
          f"{verdict(at_most(cap['rss_idle'], 45.0))}")


# ----------------------------------------------------------------------------- main

def missing_tools() -> list[str]:
    missing = [t for t in ("nginx", "haproxy", "iperf3", "wrk", "ip") if not shutil.which(t)]
    if not Path(STREAM_MODULE).exists():
        missing.append("libnginx-mod-stream")
    return missing


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3,
                        help="measurement rounds over all targets (medians are printed)")
    parser.add_argument("--latency-client", nargs=6, help=argparse.SUPPRESS,
                        metavar=("HOST", "PORT", "RATE", "SECONDS", "WARMUP", "CONNS"))
    parser.add_argument("--tcp-offload", choices=("auto", "off"), default="off",
                        help="remora's kernel relay (BPF sockmap); off: relay in user space")
    args = parser.parse_args()
    if args.latency_client:
        host, port, rate, seconds, warmup, conns = args.latency_client
        print(json.dumps(latency_client(host, int(port), float(rate), float(seconds),
                                        float(warmup), int(conns))))
        return
    if os.geteuid() != 0:
        sys.exit("bench_proxy_l4: needs root (network namespaces, iptables)")
    if missing_tools():
        sys.exit(f"bench_proxy_l4: missing {', '.join(missing_tools())} (./dev bench "
                 "installs them)")
    # SIGINT and SIGTERM (even if inherited as ignored) end in the cleanup below.
    def interrupted(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")
    signal.signal(signal.SIGINT, interrupted)
    signal.signal(signal.SIGTERM, interrupted)
    started, load_before = time.monotonic(), os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="rmbench-l4-") as tmpdir:
        tmp = Path(tmpdir)
        os.chmod(tmp, 0o755)
        bench = Bench(tmp, args.tcp_offload)
        try:
            bench.make_network()
            targets = bench.start()
            foreign = []
            for rnd in range(args.rounds):
                # alternate the order so no target always runs first or last
                order = TARGET_ORDER if rnd % 2 == 0 else TARGET_ORDER[::-1]
                before = bench.cpu_accounting()
                for step in (bench.wrk, bench.wrk_close, bench.iperf, bench.latency):
                    for name in order:
                        step(targets[name])
                foreign.append(bench.foreign_cpu(before))
            for t in targets.values():
                if t.pid is not None:
                    t.rss_after = rss_mb(t.pid)
            report(targets, args.rounds, load_before, foreign)
            print(f"  capture path counters: {bench.capture_stats()}")
        except Exception:
            for name, _ in bench.procs:
                tail = bench.log_tail(name)
                if tail:
                    print(f"--- {name} log (last lines)\n{tail}", file=sys.stderr)
            raise
        finally:
            bench.cleanup()
    code = run([sys.executable, "-c", "import remora; print(remora.__file__)"]).stdout.strip()
    print(f"  (took {time.monotonic() - started:.0f}s; remora imported from {code})")


if __name__ == "__main__":
    main()
