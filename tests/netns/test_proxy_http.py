"""`remora proxy` speaking HTTP in pod namespaces with Istio's capture rules.

    pod A 10.81.0.1 (client pod)          ── veth ──   pod B 10.81.0.2 (server pod)
      capture: every port                                capture: inbound except :8080
      sidecar A (uid 1337): outbound                     sidecar B (uid 1337): inbound :9090
        0.0.0.0_8080 HTTP, RDS "8080"                      0.0.0.0_9090 → inbound|9090|| (h2)
        0.0.0.0_9090 HTTP, RDS "9090" (gRPC, h2)         HTTP servers on lo :8080
      the app runs as uid 1000                             10.3.0.10 demoappv10, .11 demoappv11
                                                           .20 resets, .21 ok (flaky service)
                                                           .30 answers 503, .31 ok (outliers)
                                                         gRPC server on 10.81.0.2:9090

Services are VIPs in 10.100.0.0/16 (routed towards pod B, never reached: sidecar A picks an
endpoint). Requests go from the app as uid 1000 to a VIP with a ``Host`` header, so the one
``0.0.0.0_8080`` listener tells services apart by host, as Istio's outbound listener does.
Waits are on lines the processes print or on sockets; nothing sleeps.
"""

from __future__ import annotations

import contextlib
import encodings.idna  # noqa: F401  (http.client needs it after the drop to uid 1000)
import http.client
import json
import os
import sys
import threading
import urllib.request
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from remora import netns
from remora.proxy import istio_config as ic
from tests.conftest import require_root
from tests.netns.conftest import PREFIX, remora_bin, remora_iptables

pytestmark = [pytest.mark.privileged, pytest.mark.timeout(180)]

REPO = Path(__file__).resolve().parents[2]
POD_A, POD_B = "10.81.0.1", "10.81.0.2"
APP_UID = 1000
NS = ic.CLUSTER_DOMAIN
SERVICES = {            # name → (VIP, endpoints)
    "demoappv10": ("10.100.1.10", ["10.3.0.10"]),
    "demoappv11": ("10.100.1.11", ["10.3.0.11"]),
    "flaky": ("10.100.1.20", ["10.3.0.20", "10.3.0.21"]),
    "outlier": ("10.100.1.30", ["10.3.0.30", "10.3.0.31"]),
}
GRPC_VIP = "10.100.2.9"
# Istio's sidecar HTTP filters as these sidecars have them: without cors, istio.stats before
# fault.
HTTP_FILTERS: tuple[ic.HttpFilterName, ...] = (
    "istio.metadata_exchange", "envoy.filters.http.grpc_stats", "istio.stats",
    "envoy.filters.http.fault", "envoy.filters.http.router")
# The sidecars' access log: stdout, Istio's default format (spec §10.2,
# pilot/pkg/model/telemetry_logging.go).
ACCESS_LOG = ic.file_access_log()
ZIPKIN = "10.3.0.40"
# Istio's Zipkin tracer settings (meshConfig.defaultConfig.tracing.zipkin), 100 % sampling.
TRACING = {"random_sampling": {"value": 100}, "provider": {
    "name": "envoy.tracers.zipkin", "typed_config": {
        "@type": "type.googleapis.com/envoy.config.trace.v3.ZipkinConfig",
        "collector_cluster": "zipkin", "collector_endpoint": "/api/v2/spans",
        "collector_endpoint_version": "HTTP_JSON", "trace_id_128bit": True,
        "shared_span_context": False}}}


def _outbound_http_listener(port: int, rds_path: str) -> dict[str, Any]:
    """Istio's ``0.0.0.0_<port>`` outbound HTTP listener (spec §4.2)."""
    return ic.outbound_http_listener(port, ic.http_connection_manager(
        f"outbound_0.0.0.0_{port}", rds=ic.rds_from_file(str(port), rds_path),
        http_filters=ic.http_filters(HTTP_FILTERS), access_log=ACCESS_LOG, websocket=True,
        tracing=TRACING))


TCP_VIP = "10.100.3.3"
TCP_CLUSTER = f"outbound|7070||tcpecho.{NS}"


def _cluster(name: str, ips: list[str], port: int, **extra: Any) -> dict[str, Any]:
    return {**ic.static_cluster(name, [(ip, port) for ip in ips], connect_timeout="2s",
                                lb_policy="ROUND_ROBIN"), **extra}


def _vhost(svc: str, port: int, route: dict[str, Any]) -> dict[str, Any]:
    return ic.service_vhost(svc, port, SERVICES[svc][0] if svc in SERVICES else GRPC_VIP,
                            [route])


def _default_route(cluster: str, **extra: Any) -> dict[str, Any]:
    return {"name": "default", "match": {"prefix": "/"},
            "route": {"cluster": cluster, "timeout": "0s", "retry_policy": ic.ISTIO_RETRY_POLICY,
                      **extra}}


def route_configs() -> dict[str, Any]:
    oc = {svc: f"outbound|8080||{svc}.{NS}" for svc in SERVICES}
    vhosts = [
        _vhost("demoappv10", 8080, _default_route(oc["demoappv10"])),
        _vhost("demoappv11", 8080, _default_route(oc["demoappv11"])),
        # A VirtualService: 90 % to v10, 10 % to v11.
        {"name": f"split.{NS}:8080", "domains": ["split", f"split.{NS}"],
         "routes": [{"name": "split", "match": {"prefix": "/"}, "route": {
             "weighted_clusters": {"clusters": [
                 {"name": oc["demoappv10"], "weight": 90},
                 {"name": oc["demoappv11"], "weight": 10}]},
             "timeout": "0s"}}]},
        # A VirtualService with retries {attempts: 3, retryOn: reset,connect-failure}.
        _vhost("flaky", 8080, {"name": "flaky", "match": {"prefix": "/"}, "route": {
            "cluster": oc["flaky"], "timeout": "0s", "retry_policy": {
                "retry_on": "reset,connect-failure", "num_retries": 3,
                "retry_host_predicate": ic.ISTIO_RETRY_POLICY["retry_host_predicate"],
                "host_selection_retry_max_attempts": "5"}}}),
        _vhost("outlier", 8080, _default_route(oc["outlier"])),
        ic.allow_any_vhost(),
    ]
    grpc_vhosts = [_vhost("grpc", 9090, _default_route(f"outbound|9090||grpc.{NS}"))]
    return ic.rds_file(
        {"name": name, "virtual_hosts": vh, "validate_clusters": False,
         "ignore_port_in_host_matching": True}
        for name, vh in (("8080", vhosts), ("9090", grpc_vhosts)))


def bootstrap_a(rds_path: str) -> dict[str, Any]:
    clusters = ic.passthrough_clusters("2s")
    for svc, (_, ips) in SERVICES.items():
        extra: dict[str, Any] = {}
        if svc == "outlier":
            extra["outlier_detection"] = {"consecutive_5xx": 1, "interval": "1s",
                                          "base_ejection_time": "60s",
                                          "max_ejection_percent": 50}
        clusters.append(_cluster(f"outbound|8080||{svc}.{NS}", ips, 8080, **extra))
    clusters.append(_cluster(f"outbound|9090||grpc.{NS}", [POD_B], 9090,
                             typed_extension_protocol_options=ic.upstream_http2()))
    clusters.append(_cluster("zipkin", [ZIPKIN], 8080))
    clusters.append(_cluster(TCP_CLUSTER, ["10.3.0.10"], 8080))   # demoappv10's server
    return ic.bootstrap(
        node=ic.sidecar_node(POD_A, "client"),
        listeners=[ic.virtual_outbound(), _outbound_http_listener(8080, rds_path),
                   _outbound_http_listener(9090, rds_path),
                   # Istio's <VIP>_<port> TCP listener: istio.stats, then tcp_proxy with an
                   # access log (spec §4.2).
                   ic.outbound_tcp_listener(TCP_VIP, 7070, TCP_CLUSTER, access_log=ACCESS_LOG)],
        clusters=clusters)


def bootstrap_b() -> dict[str, Any]:
    """Pod B's sidecar: virtualInbound with Istio's inbound HTTP chain for :9090 (§5.3)."""
    inbound = "inbound|9090||"
    hcm = ic.http_connection_manager(
        "inbound_0.0.0.0_9090",
        route_config={"name": inbound, "validate_clusters": False, "virtual_hosts": [{
            "name": "inbound|http|9090", "domains": ["*"], "routes": [{
                "name": "default", "match": {"prefix": "/"},
                "route": {"cluster": inbound, "timeout": "0s"},
                "decorator": {"operation": f"grpc.{NS}:9090/*"}}]}]},
        http_filters=ic.http_filters(HTTP_FILTERS), access_log=ACCESS_LOG,
        server_name="istio-envoy", server_header_transformation="OVERWRITE",
        normalize_path=None, stream_idle_timeout=None)
    return ic.bootstrap(
        node=ic.sidecar_node(POD_B, "grpc"),
        # No catch-all chain: the tests send pod B's sidecar nothing but :9090.
        listeners=[ic.virtual_inbound([ic.inbound_http_chain(9090, hcm)], catchall=None)],
        clusters=[*ic.passthrough_clusters("2s"),
                  ic.original_dst_cluster(inbound, connect_timeout="2s", inbound=True,
                                          protocol_options=ic.upstream_http2())])


# ------------------------------------------------------------------------------ processes


class Proc:
    """A long-running process in a namespace that prints ``ready`` (or the proxy's ready
    line on stderr) before it serves."""

    def __init__(self, ns: netns.Netns, argv: list[str], *, ready: str, on_stderr: bool = False,
                 env: dict[str, str] | None = None) -> None:
        self.proc = netns.popen_in_netns(ns, argv, env=env)
        self.lines: list[str] = []
        self._ready = threading.Event()
        self._new_line = threading.Condition()
        stream = self.proc.stderr if on_stderr else self.proc.stdout
        self._t = threading.Thread(target=self._read, args=(stream, ready), daemon=True)
        self._t.start()
        other = self.proc.stdout if on_stderr else self.proc.stderr
        self._t2 = threading.Thread(target=self._drain, args=(other,), daemon=True)
        self._t2.start()

    def _read(self, stream: Any, ready: str) -> None:
        for line in stream:
            with self._new_line:
                self.lines.append(line.rstrip("\n"))
                self._new_line.notify_all()
            if ready in line:
                self._ready.set()
        self._ready.set()

    def _drain(self, stream: Any) -> None:
        for line in stream:
            with self._new_line:
                self.lines.append(line.rstrip("\n"))
                self._new_line.notify_all()

    def wait_line(self, needle: str, timeout: float = 10.0) -> str:
        """The first line (printed so far or later) containing ``needle``."""
        def found() -> str | None:
            return next((ln for ln in self.lines if needle in ln), None)
        with self._new_line:
            if not self._new_line.wait_for(lambda: found() is not None, timeout):
                raise AssertionError(f"no line with {needle!r}:\n" +
                                     "\n".join(self.lines[-20:]))
        line = found()
        assert line is not None
        return line

    def wait_ready(self, timeout: float = 30.0) -> None:
        if not self._ready.wait(timeout) or self.proc.poll() is not None:
            self.stop()
            raise AssertionError("not ready:\n" + "\n".join(self.lines[-40:]))

    def stop(self) -> None:
        netns.stop_process(self.proc, readers=[self._t])


def _tool_env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1")


@dataclass
class Mesh:
    a: netns.Netns
    b: netns.Netns
    collector: Proc
    sidecar_a: Proc
    sidecar_b: Proc
    tmp: Path

    def admin(self, ns: netns.Netns, path: str) -> str:
        def get() -> str:
            with urllib.request.urlopen(f"http://127.0.0.1:15000{path}", timeout=5) as r:
                body: bytes = r.read()
            return body.decode()
        return ns.call(get, timeout=15)

    def stats(self, ns: netns.Netns) -> dict[str, int]:
        out: dict[str, int] = {}
        for line in self.admin(ns, "/stats").splitlines():
            name, sep, value = line.rpartition(": ")
            if sep and value.lstrip("-").isdigit():
                out[name] = int(value)
        return out

    def requests(self, host: str, vip: str, n: int, path: str = "/",
                 ) -> list[tuple[int, dict[str, Any] | None, dict[str, str]]]:
        """``n`` keep-alive GETs from the app (uid 1000) to ``vip``:8080 with ``Host: host``:
        (status, JSON body or None, response headers) each."""
        def run() -> list[tuple[int, dict[str, Any] | None, dict[str, str]]]:
            os.setgroups([])
            os.setgid(APP_UID)
            os.setuid(APP_UID)
            out = []
            conn = http.client.HTTPConnection(vip, 8080, timeout=10)
            for _ in range(n):
                conn.request("GET", path, headers={"Host": host})
                r = conn.getresponse()
                body = r.read()
                try:
                    data = json.loads(body) if body.startswith(b"{") else None
                except ValueError:
                    data = None
                out.append((r.status, data, {k.lower(): v for k, v in r.getheaders()}))
                if r.getheader("connection", "").lower() == "close":
                    conn.close()
                    conn = http.client.HTTPConnection(vip, 8080, timeout=10)
            conn.close()
            return out
        return self.a.call(run, timeout=60)

    def hits(self, ip: str) -> int:
        def get() -> int:
            c = http.client.HTTPConnection(ip, 8080, timeout=5)
            c.request("GET", "/__hits")
            n = int(c.getresponse().read())
            c.close()
            return n
        return self.b.call(get, timeout=15)


@contextlib.contextmanager
def make_mesh(tmp: Path) -> Iterator[Mesh]:
    require_root()
    with netns.netns_pair(prefix=PREFIX, a_role="httpa", b_role="httpb",
                          a_addresses=[f"{POD_A}/24"], b_addresses=[f"{POD_B}/24"]) as pair:
        a, b = pair.a.netns, pair.b.netns
        for ip in [ip for _, ips in SERVICES.values() for ip in ips] + [ZIPKIN]:
            b.run(["ip", "addr", "add", f"{ip}/32", "dev", "lo"])
        remora_iptables(a, "-p", "15001", "-z", "15006", "-u", "1337", "-m", "REDIRECT",
                        "-i", "*", "-x", "", "-b", "*", "-d", "15090,15021,15020")
        remora_iptables(b, "-p", "15001", "-z", "15006", "-u", "1337", "-m", "REDIRECT",
                        "-i", "*", "-x", "", "-b", "*", "-d", "15090,15021,15020,8080")
        rds = tmp / "rds.yaml"
        rds.write_text(yaml.safe_dump(route_configs()))
        (tmp / "a.yaml").write_text(yaml.safe_dump(bootstrap_a(str(rds))))
        (tmp / "b.yaml").write_text(yaml.safe_dump(bootstrap_b()))
        procs: list[Proc] = []
        try:
            py = [sys.executable, "-m", "tests.netns.http_tools"]
            for name, mode, ips in (("demoappv10", "ok", ["10.3.0.10"]),
                                    ("demoappv11", "ok", ["10.3.0.11"]),
                                    ("flaky-reset", "reset", ["10.3.0.20"]),
                                    ("flaky-ok", "ok", ["10.3.0.21"]),
                                    ("outlier-bad", "fail", ["10.3.0.30"]),
                                    ("outlier-ok", "ok", ["10.3.0.31"]),
                                    ("zipkin", "collector", [ZIPKIN])):
                args = [a for ip in ips for a in ("--listen", f"{ip}:8080")]
                p = Proc(b, [*py, "serve", *args, "--name", name, "--mode", mode],
                         ready="ready", env=_tool_env())
                procs.append(p)
            g = Proc(b, [*py, "grpc-serve", "--listen", f"{POD_B}:9090"], ready="ready",
                     env=_tool_env())
            procs.append(g)
            for p in procs:
                p.wait_ready()
            side_a = Proc(a, [remora_bin(), "proxy", "-c", str(tmp / "a.yaml"),
                              "--drain-time-s", "1"], ready="remora proxy ready",
                          on_stderr=True)
            procs.append(side_a)
            side_b = Proc(b, [remora_bin(), "proxy", "-c", str(tmp / "b.yaml"),
                              "--drain-time-s", "1"], ready="remora proxy ready",
                          on_stderr=True)
            procs.append(side_b)
            side_a.wait_ready()
            side_b.wait_ready()
            collector = next(p for p in procs if "collector" in p.proc.args)
            yield Mesh(a=a, b=b, collector=collector, sidecar_a=side_a, sidecar_b=side_b,
                       tmp=tmp)
        finally:
            for p in reversed(procs):
                p.stop()


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    with make_mesh(tmp_path_factory.mktemp("http")) as m:
        yield m


# ------------------------------------------------------------------------------ tests


def test_one_listener_routes_by_host(mesh: Mesh) -> None:
    """demoappv10 and demoappv11 share port 8080: the Host header picks the service."""
    for host, want in (("demoappv10:8080", "demoappv10"), ("demoappv11:8080", "demoappv11"),
                       (f"demoappv10.{NS}", "demoappv10"), ("demoappv11", "demoappv11")):
        vip = SERVICES[want][0]
        [(status, body, headers)] = mesh.requests(host, vip, 1)
        assert status == 200, (host, status)
        assert body is not None and body["name"] == want, (host, body)
        # What Envoy adds on the way (spec §9).
        sent = body["headers"]
        assert sent["x-forwarded-proto"] == "http"
        assert len(sent["x-request-id"]) == 36
        assert sent["x-envoy-attempt-count"] == "1"
        assert "x-envoy-upstream-service-time" in headers
        assert headers["server"] == "envoy"


def test_host_routing_is_independent_of_the_vip(mesh: Mesh) -> None:
    """The route comes from Host, not from the address dialled (one wildcard listener)."""
    [(status, body, _)] = mesh.requests("demoappv11", SERVICES["demoappv10"][0], 1)
    assert status == 200 and body is not None and body["name"] == "demoappv11"


def test_weighted_split_90_10(mesh: Mesh) -> None:
    got = mesh.requests("split", "10.100.1.99", 1000)
    names = Counter(b["name"] for s, b, _ in got if s == 200 and b is not None)
    assert sum(names.values()) == 1000
    # Binomial(1000, 0.1): sd ≈ 9.5; ±50 is over 5 sd.
    assert abs(names["demoappv11"] - 100) <= 50, names


def test_retry_recovers_from_an_endpoint_that_resets(mesh: Mesh) -> None:
    before = mesh.hits("10.3.0.20")
    got = mesh.requests("flaky", SERVICES["flaky"][0], 20)
    assert all(s == 200 for s, _, _ in got), [s for s, _, _ in got]
    assert {b["name"] for _, b, _ in got if b} == {"flaky-ok"}
    assert mesh.hits("10.3.0.20") > before, "the resetting endpoint was never tried"
    stats = mesh.stats(mesh.a)
    assert stats[f"cluster.outbound|8080||flaky.{NS}.upstream_rq_retry"] >= 1
    assert stats[f"cluster.outbound|8080||flaky.{NS}.upstream_rq_retry_success"] >= 1


def test_ejected_endpoint_stops_receiving_traffic(mesh: Mesh) -> None:
    got = mesh.requests("outlier", SERVICES["outlier"][0], 30)
    statuses = [s for s, _, _ in got]
    assert statuses.count(503) <= 1, statuses       # the one before the ejection
    bad_hits = mesh.hits("10.3.0.30")
    assert bad_hits == 1
    more = mesh.requests("outlier", SERVICES["outlier"][0], 20)
    assert all(s == 200 for s, _, _ in more)
    assert mesh.hits("10.3.0.30") == bad_hits, "an ejected endpoint received traffic"
    clusters = mesh.admin(mesh.a, "/clusters")
    assert (f"outbound|8080||outlier.{NS}::10.3.0.30:8080::health_flags::"
            "/failed_outlier_check") in clusters


def test_grpc_unary_and_streaming_through_two_sidecars(mesh: Mesh) -> None:
    argv = ["setpriv", f"--reuid={APP_UID}", f"--regid={APP_UID}", "--clear-groups",
            sys.executable, "-m", "tests.netns.http_tools", "grpc-call",
            "--target", f"{GRPC_VIP}:9090", "--authority", f"grpc.{NS}:9090",
            "--messages", "5"]
    proc = mesh.a.run(argv, timeout=60, check=False, env=_tool_env())
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out.get("unary") == "echo:hello", out
    assert out.get("stream") == [f"echo:m{i}" for i in range(5)], out
    # Both sidecars carried it: outbound on A, inbound on B.
    sa, sb = mesh.stats(mesh.a), mesh.stats(mesh.b)
    assert sa[f"cluster.outbound|9090||grpc.{NS}.upstream_rq_total"] >= 2
    assert sb["cluster.inbound|9090||.upstream_rq_total"] >= 2


def test_unknown_host_passes_through_allow_any(mesh: Mesh) -> None:
    """No service vhost: the allow_any catch-all sends it to PassthroughCluster, which
    connects to the original destination (here the demoappv10 endpoint itself)."""
    [(status, body, _)] = mesh.requests("nobody.example", "10.3.0.10", 1)
    assert status == 200 and body is not None and body["name"] == "demoappv10"


def test_access_log_in_istio_format(mesh: Mesh) -> None:
    """The outbound sidecar writes Istio's default text format (flushed within 1 s)."""
    [(status, body, _)] = mesh.requests("demoappv11", SERVICES["demoappv11"][0], 1,
                                        path="/logged?x=1")
    assert status == 200 and body is not None
    rid = body["headers"]["x-request-id"]
    line = mesh.sidecar_a.wait_line(rid)
    cluster = f"outbound|8080||demoappv11.{NS}"
    assert line.startswith("[20") and line.endswith(" default"), line
    assert '] "GET /logged?x=1 HTTP/1.1" 200 - via_upstream - "-" 0 ' in line, line
    assert f'"{rid}" "demoappv11" "10.3.0.11:8080" {cluster} ' in line, line
    assert f" {SERVICES['demoappv11'][0]}:8080 {POD_A}:" in line, line


def _grpc_messages(text: str, reporter: str) -> tuple[int, int]:
    """istio_request/response_messages_total between the client and grpc workloads."""
    got = []
    for metric in ("istio_request_messages_total", "istio_response_messages_total"):
        got.append(sum(int(float(ln.rsplit(" ", 1)[1])) for ln in text.splitlines()
                       if ln.startswith(metric + "{") and f'reporter="{reporter}"' in ln
                       and 'source_workload="client"' in ln
                       and 'destination_workload="grpc"' in ln))
    return got[0], got[1]


def test_istio_metrics_name_both_workloads(mesh: Mesh) -> None:
    """Peer metadata crossed both sidecars: the server side reports the client workload and
    the client side the server workload, with Istio's label names; both count the calls'
    gRPC messages (grpc_stats, then istio.stats)."""
    argv = ["setpriv", f"--reuid={APP_UID}", f"--regid={APP_UID}", "--clear-groups",
            sys.executable, "-m", "tests.netns.http_tools", "grpc-call",
            "--target", f"{GRPC_VIP}:9090", "--authority", f"grpc.{NS}:9090",
            "--messages", "3"]
    before = (_grpc_messages(mesh.admin(mesh.a, "/stats/prometheus"), "source"),
              _grpc_messages(mesh.admin(mesh.b, "/stats/prometheus"), "destination"))
    assert mesh.a.run(argv, timeout=60, check=False, env=_tool_env()).returncode == 0
    b = mesh.admin(mesh.b, "/stats/prometheus")
    a = mesh.admin(mesh.a, "/stats/prometheus")
    # one unary call (1 message each way) and a stream of 3 echoed messages
    for side, text, reporter in ((0, a, "source"), (1, b, "destination")):
        req, resp = _grpc_messages(text, reporter)
        assert (req - before[side][0], resp - before[side][1]) == (4, 4), (reporter, text)
    dest = [ln for ln in b.splitlines() if ln.startswith("istio_requests_total{")]
    assert dest, b[:2000]
    assert any('reporter="destination"' in ln and 'source_workload="client"' in ln
               and 'destination_workload="grpc"' in ln and 'request_protocol="grpc"' in ln
               and 'response_code="200"' in ln and 'grpc_response_status="0"' in ln
               for ln in dest), dest
    src = [ln for ln in a.splitlines() if ln.startswith("istio_requests_total{")]
    assert any('reporter="source"' in ln and 'source_workload="client"' in ln
               and 'destination_workload="grpc"' in ln
               and f'destination_service="grpc.{NS}"' in ln for ln in src), src
    assert "# TYPE istio_request_duration_milliseconds histogram" in a


GIB = 1 << 30


def _hwm_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise KeyError("VmHWM")


def test_1gib_download_and_upload_do_not_grow_memory(mesh: Mesh) -> None:
    """Flow control both ways: 1 GiB each way through the outbound sidecar, and the
    sidecar's peak RSS stays within a few buffers (Envoy's 1 MiB per-connection limit)."""
    pid = mesh.sidecar_a.proc.pid
    # Warm up (first request allocates pools, codecs, log buffers) before the baseline.
    mesh.requests("demoappv10", SERVICES["demoappv10"][0], 5)
    before = _hwm_kb(pid)
    vip = SERVICES["demoappv10"][0]

    def transfer() -> tuple[int, int]:
        os.setgroups([])
        os.setgid(APP_UID)
        os.setuid(APP_UID)
        conn = http.client.HTTPConnection(vip, 8080, timeout=60)
        conn.request("GET", f"/bytes/{GIB}", headers={"Host": "demoappv10"})
        r = conn.getresponse()
        got = 0
        while True:
            chunk = r.read(1 << 20)
            if not chunk:
                break
            got += len(chunk)
        block = b"u" * (1 << 20)

        def body() -> Iterator[bytes]:
            for _ in range(GIB // len(block)):
                yield block
        conn.request("POST", "/sink", body=body(),
                      headers={"Host": "demoappv10", "Content-Length": str(GIB)})
        r = conn.getresponse()
        sent = json.loads(r.read())["body_bytes"]
        conn.close()
        return got, sent

    got, sent = mesh.a.call(transfer, timeout=170)
    assert got == GIB and sent == GIB
    grown_mb = (_hwm_kb(pid) - before) / 1024
    assert grown_mb < 48, f"peak RSS grew by {grown_mb:.1f} MB for 2 GiB relayed"


def test_websocket_upgrade_is_tunnelled(mesh: Mesh) -> None:
    """Istio's HCM has ``upgrade_configs: [websocket]``: the 101 and the tunnel pass."""
    vip = SERVICES["demoappv10"][0]

    def run() -> tuple[bytes, bytes]:
        import socket
        os.setgroups([])
        os.setgid(APP_UID)
        os.setuid(APP_UID)
        s = socket.create_connection((vip, 8080), timeout=10)
        s.sendall(b"GET /chat HTTP/1.1\r\nHost: demoappv10\r\nConnection: Upgrade\r\n"
                  b"Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\n"
                  b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n")
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = s.recv(4096)
            if not chunk:
                break
            head += chunk
        head, _, rest = head.partition(b"\r\n\r\n")
        s.sendall(b"hello over the tunnel")
        echoed = rest
        while len(echoed) < len(b"hello over the tunnel"):
            chunk = s.recv(4096)
            if not chunk:
                break
            echoed += chunk
        s.close()
        return head, echoed
    head, echoed = mesh.a.call(run, timeout=30)
    assert head.startswith(b"HTTP/1.1 101"), head
    assert b"upgrade: websocket" in head.lower()
    assert echoed == b"hello over the tunnel"


def test_trace_context_propagated_and_span_reported(mesh: Mesh) -> None:
    """B3 headers go upstream (a new 128-bit trace here, and a caller's trace kept), and the
    outbound sidecar reports a CLIENT span to the Zipkin collector."""
    [(status, body, _)] = mesh.requests("demoappv10", SERVICES["demoappv10"][0], 1,
                                        path="/traced")
    assert status == 200 and body is not None
    sent = body["headers"]
    trace, span = sent["x-b3-traceid"], sent["x-b3-spanid"]
    assert len(trace) == 32 and len(span) == 16 and sent["x-b3-sampled"] == "1"
    assert "x-b3-parentspanid" not in sent
    line = mesh.collector.wait_line(trace, timeout=15)   # the reporter flushes every 5 s
    spans = json.loads(line.split(" ", 1)[1])
    mine = next(s for s in spans if s["traceId"] == trace)
    assert mine["id"] == span and mine["kind"] == "CLIENT"
    assert mine["name"] == "egress"
    assert mine["tags"]["http.url"] == "http://demoappv10/traced"
    assert mine["tags"]["http.status_code"] == "200"
    assert mine["tags"]["upstream_cluster.name"] == f"outbound|8080||demoappv10.{NS}"
    assert mine["localEndpoint"]["serviceName"] == "client.default"


def test_tcp_service_reports_istio_tcp_metrics_and_logs(mesh: Mesh) -> None:
    """A TCP service (tcp_proxy after istio.stats): ``istio_tcp_*`` with Istio's labels and
    a ``"- - -"`` access log line."""
    req = b"GET /tcp HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"

    def run() -> bytes:
        import socket
        os.setgroups([])
        os.setgid(APP_UID)
        os.setuid(APP_UID)
        s = socket.create_connection((TCP_VIP, 7070), timeout=10)
        s.sendall(req)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
        s.close()
        return data
    data = mesh.a.call(run, timeout=30)
    assert data.startswith(b"HTTP/1.0 200") or data.startswith(b"HTTP/1.1 200"), data[:80]
    line = mesh.sidecar_a.wait_line(f"{TCP_CLUSTER} ")
    assert f'"- - -" 0 - - - "-" {len(req)} {len(data)} ' in line, line
    assert f" {TCP_VIP}:7070 {POD_A}:" in line and '"10.3.0.10:8080"' in line, line
    prom = mesh.admin(mesh.a, "/stats/prometheus")
    opened = [ln for ln in prom.splitlines()
              if ln.startswith("istio_tcp_connections_opened_total{")]
    assert any('reporter="source"' in ln and 'source_workload="client"' in ln
               and f'destination_service="tcpecho.{NS}"' in ln
               and 'destination_service_name="tcpecho"' in ln for ln in opened), opened
    recv = [ln for ln in prom.splitlines()
            if ln.startswith("istio_tcp_received_bytes_total{") and "tcpecho" in ln]
    assert recv and recv[0].rsplit(" ", 1)[1] == str(len(req)), recv
