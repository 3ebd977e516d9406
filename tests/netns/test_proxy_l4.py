"""`remora proxy` as uid 1337 in a pod namespace with Istio's default capture rules (applied by
the real `remora iptables`), an app on :8080, and a peer namespace holding the two endpoints of
the service 10.100.0.7:8080 plus an "outside" host for passthrough traffic.

    pod  10.78.0.1  ── veth ──  peer 10.78.0.2 (+ 10.1.0.2, 10.1.0.3, 10.1.0.9 on lo)
    app: probe server on :8080 (reports who connected)
    proxy: virtualOutbound 15001, virtualInbound 15006, 10.100.0.7_8080 → {10.1.0.2, 10.1.0.3}:8080

Stats are read from the proxy's admin API (127.0.0.1:15000 inside the pod). Every wait is on a
line a process prints, an accept a probe server reports, or a socket; every test is bounded.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import select
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from remora import netns
from remora.capture.probe import ConnectResult, Endpoint, ListenSpec, ProbeServer, connect
from tests.conftest import require_root
from tests.netns.conftest import PREFIX, Mode, flags, remora_bin, remora_iptables

pytestmark = [pytest.mark.privileged, pytest.mark.timeout(120)]

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples" / "sidecar-bootstrap.yaml"
POD, PEER = "10.78.0.1", "10.78.0.2"
EP1, EP2, OUTSIDE = "10.1.0.2", "10.1.0.3", "10.1.0.9"
VIP = "10.100.0.7"
APP_PORT = 8080
SVC_CLUSTER = "outbound|8080||svc.default.svc.cluster.local"
APP_UID = 1000


# ------------------------------------------------------------------------------ bootstrap


def bootstrap(mode: str = "ALLOW_ANY") -> dict[str, Any]:
    """examples/sidecar-bootstrap.yaml with this test's endpoints (REGISTRY_ONLY: the
    outbound catch-all chain goes to BlackHoleCluster, as Istio configures it; TPROXY: both
    virtual listeners are transparent, as Istio's TPROXY interception mode makes them)."""
    data: dict[str, Any] = yaml.safe_load(EXAMPLE.read_text())
    res = data["static_resources"]
    for c in res["clusters"]:
        if c["name"] == SVC_CLUSTER:
            eps = c["load_assignment"]["endpoints"][0]["lb_endpoints"]
            for ep, ip in zip(eps, (EP1, EP2), strict=True):
                ep["endpoint"]["address"]["socket_address"]["address"] = ip
    data["node"]["id"] = f"sidecar~{POD}~app-1.default~default.svc.cluster.local"
    if mode == "REGISTRY_ONLY":
        vo = next(li for li in res["listeners"] if li["name"] == "virtualOutbound")
        catchall = vo["filter_chains"][1]["filters"][0]["typed_config"]
        catchall["stat_prefix"] = catchall["cluster"] = "BlackHoleCluster"
    if mode == "IDLE":        # the passthrough tcp_proxy closes idle connections after 1 s
        vo = next(li for li in res["listeners"] if li["name"] == "virtualOutbound")
        for chain in vo["filter_chains"]:
            tp = chain["filters"][0]["typed_config"]
            if tp.get("stat_prefix") == "PassthroughCluster":
                tp["idle_timeout"] = "1s"
    if mode == "TPROXY":
        for li in res["listeners"]:
            if li["name"] in ("virtualOutbound", "virtualInbound"):
                li["transparent"] = True
    return data


# ------------------------------------------------------------------------------ processes


class ProxyProcess:
    """`ip netns exec <pod> remora proxy …`; waits for its ready log line."""

    def __init__(self, ns: netns.Netns, config: Path, *args: str) -> None:
        self.ns = ns
        argv = [remora_bin(), "proxy", "-c", str(config), "--drain-time-s", "1", *args]
        self.proc = netns.popen_in_netns(ns, argv, stdin=subprocess.DEVNULL,
                                         stdout=subprocess.DEVNULL)
        self.lines: list[str] = []
        self._ready = threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line.rstrip("\n"))
            if "remora proxy ready" in line:
                self._ready.set()
        self._ready.set()   # EOF: the process is gone

    @property
    def pid(self) -> int:
        return self.proc.pid    # `ip netns exec` execs the command: same pid

    def wait_ready(self, timeout: float = 30.0) -> None:
        if not self._ready.wait(timeout) or self.proc.poll() is not None:
            self.stop()
            raise AssertionError("proxy not ready:\n" + "\n".join(self.lines))

    def stop(self, timeout: float = 15.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait()
        self._reader.join(5)
        if self.proc.stderr is not None:
            self.proc.stderr.close()
        return code

    def status(self, field: str) -> str:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return line.split(":", 1)[1].strip()
        raise KeyError(field)

    def rss_kb(self) -> int:
        return int(self.status("VmRSS").split()[0])

    def children(self) -> list[int]:
        path = Path(f"/proc/{self.pid}/task/{self.pid}/children")
        return [int(p) for p in path.read_text().split()] if path.exists() else []


class Tool:
    """`python -m tests.netns.proxy_tools …` inside a namespace (as root)."""

    def __init__(self, ns: netns.Netns, *args: str) -> None:
        env = dict(os.environ, PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1")
        self.proc = netns.popen_in_netns(
            ns, [sys.executable, "-m", "tests.netns.proxy_tools", *args], env=env,
            stdin=subprocess.DEVNULL)
        assert self.proc.stdout is not None
        self._fd = self.proc.stdout.fileno()
        self._buf = b""

    def line(self, timeout: float = 20.0) -> str:
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buf:
            remaining = deadline - time.monotonic()
            ready, _, _ = select.select([self._fd], [], [], max(0.0, remaining))
            if not ready:
                raise TimeoutError(f"no line within {timeout}s")
            chunk = os.read(self._fd, 65536)
            if not chunk:
                err = self.proc.stderr.read() if self.proc.stderr else ""
                raise EOFError(f"tool exited: {err}")
            self._buf += chunk
        line, _, self._buf = self._buf.partition(b"\n")
        return line.decode()

    def expect(self, prefix: str, timeout: float = 20.0) -> str:
        line = self.line(timeout)
        assert line.startswith(prefix), line
        return line

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)
        for s in (self.proc.stdout, self.proc.stderr):
            if s is not None:
                s.close()


# ------------------------------------------------------------------------------ environment


@dataclass
class Env:
    pair: netns.NetnsPair
    app: ProbeServer
    endpoints: ProbeServer
    outside: ProbeServer
    tmp: Path

    @property
    def pod(self) -> netns.Netns:
        return self.pair.a.netns

    @property
    def peer(self) -> netns.Netns:
        return self.pair.b.netns

    @contextlib.contextmanager
    def proxy(self, mode: str = "ALLOW_ANY", *args: str) -> Iterator[ProxyProcess]:
        config = self.tmp / f"bootstrap-{mode}.yaml"
        config.write_text(yaml.safe_dump(bootstrap(mode)))
        p = ProxyProcess(self.pod, config, *args)
        try:
            p.wait_ready()
            yield p
        finally:
            p.stop()

    def stats(self) -> dict[str, int]:
        text = admin_get(self.pod, "/stats")
        out: dict[str, int] = {}
        for line in text.splitlines():
            name, sep, value = line.rpartition(": ")
            if sep and value.lstrip("-").isdigit():
                out[name] = int(value)
        return out

    def from_app(self, host: str, port: int, **kw: Any) -> ConnectResult:
        return connect(self.pod, Endpoint(host=ipaddress.ip_address(host), port=port),
                       uid=APP_UID, gid=APP_UID, **kw)


def admin_get(ns: netns.Netns, path: str) -> str:
    def get() -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:15000{path}", timeout=5) as r:
            body: bytes = r.read()
        return body.decode()
    return ns.call(get, timeout=15)


@contextlib.contextmanager
def make_env(tmp: Path, mode: Mode = "REDIRECT") -> Iterator[Env]:
    """Pod and peer namespaces, the capture rules for ``mode``, the app and the peer's
    servers; all removed on exit."""
    require_root()
    with netns.netns_pair(prefix=PREFIX, a_role="l4pod", b_role="l4peer",
                          a_addresses=[f"{POD}/24"], b_addresses=[f"{PEER}/24"]) as pair:
        pod, peer = pair.a.netns, pair.b.netns
        for ip in (EP1, EP2, OUTSIDE):
            peer.run(["ip", "addr", "add", f"{ip}/32", "dev", "lo"])
        pod.run(["ip", "route", "add", "10.100.0.0/16", "via", PEER])
        remora_iptables(pod, *flags(mode))
        app = ProbeServer.start(pod, [ListenSpec(host=ipaddress.ip_address(POD),
                                                 port=APP_PORT)], label="app", lifetime=900)
        with app:
            endpoints = ProbeServer.start(
                peer, [ListenSpec(host=ipaddress.ip_address(ip), port=APP_PORT)
                       for ip in (EP1, EP2)], label="endpoint", lifetime=900)
            with endpoints:
                outside = ProbeServer.start(peer, [ListenSpec(
                    host=ipaddress.ip_address(OUTSIDE), port=9000)], label="outside",
                    lifetime=900)
                with outside:
                    yield Env(pair=pair, app=app, endpoints=endpoints, outside=outside,
                              tmp=tmp)


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    with make_env(tmp_path_factory.mktemp("l4")) as e:
        yield e


# ------------------------------------------------------------------------------ tests


def test_proxy_runs_as_1337(env: Env) -> None:
    with env.proxy() as p:
        assert p.status("Uid").split() == ["1337"] * 4
        assert p.status("Gid").split() == ["1337"] * 4
        assert p.status("Groups") == ""
        info = json.loads(admin_get(env.pod, "/server_info"))
        assert info["state"] == "LIVE"


def test_inbound_reaches_the_app_from_127_0_0_6(env: Env) -> None:
    with env.proxy():
        result = connect(env.peer, Endpoint(host=ipaddress.ip_address(POD), port=APP_PORT))
        assert result.ok and result.reply is not None, result
        got = result.reply
        assert got.server == "app"
        assert str(got.peer.host) == "127.0.0.6"           # Envoy's inbound source
        assert got.local == Endpoint(host=ipaddress.ip_address(POD), port=APP_PORT)
        stats = env.stats()
        assert stats["cluster.inbound|8080||;.upstream_cx_total"] == 1
        assert stats["tcp.inbound|8080||.downstream_cx_total"] == 1
        assert stats["listener.0.0.0.0_15006.downstream_cx_total"] == 1
        assert stats.get("cluster.InboundPassthroughCluster.upstream_cx_total", 0) == 0


def test_outbound_to_the_service_is_balanced_over_both_endpoints(env: Env) -> None:
    n = 20
    with env.proxy():
        seen: Counter[str] = Counter()
        for _ in range(n):
            result = env.from_app(VIP, APP_PORT)
            assert result.ok and result.reply is not None, result
            assert result.reply.server == "endpoint"
            assert str(result.reply.peer.host) == POD        # the proxy's own egress
            seen[str(result.reply.local.host)] += 1
        assert set(seen) == {EP1, EP2}, seen
        assert min(seen.values()) >= 3, seen
        stats = env.stats()
        assert stats[f"cluster.{SVC_CLUSTER};.upstream_cx_total"] == n
        assert stats[f"tcp.{SVC_CLUSTER}.downstream_cx_total"] == n
        assert stats["listener.10.100.0.7_8080.downstream_cx_total"] == n
        assert stats.get("cluster.PassthroughCluster.upstream_cx_total", 0) == 0
        clusters = admin_get(env.pod, "/clusters")
        for ep in (EP1, EP2):
            assert f"{SVC_CLUSTER}::{ep}:8080::cx_total::{seen[ep]}" in clusters


def test_unknown_destination_passes_through_under_allow_any(env: Env) -> None:
    with env.proxy():
        result = env.from_app(OUTSIDE, 9000)
        assert result.ok and result.reply is not None, result
        assert result.reply.server == "outside"
        assert result.reply.local == Endpoint(host=ipaddress.ip_address(OUTSIDE), port=9000)
        stats = env.stats()
        assert stats["cluster.PassthroughCluster.upstream_cx_total"] == 1
        assert stats["tcp.PassthroughCluster.downstream_cx_total"] == 1
        assert stats["listener.0.0.0.0_15001.downstream_cx_total"] == 1
        assert stats.get("cluster.BlackHoleCluster.upstream_cx_none_healthy", 0) == 0


def test_unknown_destination_is_closed_under_registry_only(env: Env) -> None:
    with env.proxy("REGISTRY_ONLY"):
        before = len(env.outside.poll())
        result = env.from_app(OUTSIDE, 9000)
        assert result.reply is None, result                  # accepted, then closed
        assert len(env.outside.poll()) == before
        ok = env.from_app(VIP, APP_PORT)                     # the known service still works
        assert ok.ok and ok.reply is not None and ok.reply.server == "endpoint"
        stats = env.stats()
        assert stats["cluster.BlackHoleCluster.upstream_cx_none_healthy"] == 1
        assert stats["tcp.BlackHoleCluster.downstream_cx_total"] == 1
        assert stats.get("cluster.PassthroughCluster.upstream_cx_total", 0) == 0


def test_a_direct_connection_to_15001_goes_to_the_black_hole(env: Env) -> None:
    with env.proxy():
        result = env.from_app("127.0.0.1", 15001)
        assert result.reply is None, result
        stats = env.stats()
        assert stats["tcp.BlackHoleCluster.downstream_cx_total"] == 1
        assert stats.get("cluster.PassthroughCluster.upstream_cx_total", 0) == 0


def test_killing_the_upstream_mid_stream_closes_the_downstream(env: Env) -> None:
    with env.proxy():
        server = Tool(env.peer, "serve", "--listen", f"{OUTSIDE}:9100")
        client: Tool | None = None
        try:
            server.expect("ready")
            client = Tool(env.pod, "read", "--target", f"{OUTSIDE}:9100",
                          "--progress-at", str(1 << 20), "--timeout", "20")
            client.expect("connected")
            client.expect("progress")
            server.kill()
            result = json.loads(client.line(timeout=15))
            assert result["end"] in ("eof", "reset"), result
            assert result["bytes"] >= 1 << 20
        finally:
            server.kill()
            if client is not None:
                client.kill()


@pytest.mark.parametrize("offload", ["off", "auto"])
def test_a_slow_reader_does_not_grow_the_proxy_memory(env: Env, offload: str) -> None:
    """Both relays: user space pauses reading; the kernel relay hands a direction back to
    user space once its receiver is 1 MiB behind (else the kernel would queue without bound)."""
    total = 200 * 1024 * 1024
    with env.proxy("ALLOW_ANY", "--tcp-offload", offload) as p:
        baseline = p.rss_kb()
        server = Tool(env.peer, "serve", "--listen", f"{OUTSIDE}:9200", "--bytes", str(total))
        client: Tool | None = None
        try:
            server.expect("ready")
            client = Tool(env.pod, "read", "--target", f"{OUTSIDE}:9200",
                          "--slow-seconds", "4", "--timeout", "60")
            client.expect("connected")
            peak = baseline
            deadline = time.monotonic() + 90
            result = None
            while result is None:
                assert time.monotonic() < deadline, "transfer did not finish"
                peak = max(peak, p.rss_kb())
                ready, _, _ = select.select([client.proc.stdout], [], [], 0.05)
                if ready:
                    result = json.loads(client.line(timeout=5))
            assert result == {"bytes": total, "end": "eof"}
            grown_mb = (peak - baseline) / 1024
            assert grown_mb < 32, f"proxy RSS grew by {grown_mb:.1f} MB for a 200 MB transfer"
            stats = env.stats()
            assert stats["tcp.PassthroughCluster.downstream_cx_tx_bytes_total"] == total
            assert stats["cluster.PassthroughCluster.upstream_flow_control_paused_reading_total"] \
                >= 1
        finally:
            server.kill()
            if client is not None:
                client.kill()


def _echo_session(env: Env, port: int, *ping: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """An echo server outside, a ping client in the pod (through the passthrough tcp_proxy);
    both final JSON lines."""
    server = Tool(env.peer, "echo", "--listen", f"{OUTSIDE}:{port}")
    client: Tool | None = None
    try:
        server.expect("ready")
        client = Tool(env.pod, "ping", "--target", f"{OUTSIDE}:{port}", *ping)
        client.expect("connected")
        seen = json.loads(client.line(timeout=20))
        return seen, json.loads(server.line(timeout=20))
    finally:
        server.kill()
        if client is not None:
            client.kill()


def test_plain_tcp_is_relayed_by_the_kernel_after_dropping_to_1337(env: Env) -> None:
    """--tcp-offload auto: the BPF sockmap is loaded as root, then used by the uid-1337 worker
    for plain IPv4 tcp_proxy connections; the client's half-close reaches the server and the
    reply still comes back; the byte counters are exact. off (the default): user space."""
    with env.proxy("ALLOW_ANY", "--tcp-offload", "auto") as p:
        assert any("tcp offload on" in line for line in p.lines), p.lines
        seen, served = _echo_session(env, 9400, "--rounds", "20")
        assert seen == {"rounds": 20, "end": "bye 2000"}, seen
        assert served == {"bytes": 2000, "end": "eof"}, served
        stats = env.stats()
        assert stats["tcp.PassthroughCluster.offloaded"] == 1
        assert stats["tcp.PassthroughCluster.downstream_cx_rx_bytes_total"] == 2000
        assert stats["tcp.PassthroughCluster.downstream_cx_tx_bytes_total"] == 2008
        assert stats["cluster.PassthroughCluster.upstream_cx_rx_bytes_total"] == 2008
    with env.proxy() as p:
        assert any("tcp offload off" in line for line in p.lines), p.lines
        seen, served = _echo_session(env, 9401, "--rounds", "3")
        assert seen == {"rounds": 3, "end": "bye 300"}, seen
        stats = env.stats()
        assert "tcp.PassthroughCluster.offloaded" not in stats
        assert stats["tcp.PassthroughCluster.downstream_cx_tx_bytes_total"] == 307


def test_kernel_relayed_reset_and_idle_timeout(env: Env) -> None:
    """With the kernel relaying: a client's reset closes the upstream; an idle connection is
    closed by idle_timeout (1 s here) although no byte went through user space."""
    with env.proxy("ALLOW_ANY", "--tcp-offload", "auto") as p:
        seen, served = _echo_session(env, 9402, "--rounds", "5", "--reset")
        assert seen == {"rounds": 5, "end": "reset sent"}, seen
        assert served["bytes"] == 500 and served["end"] in ("eof", "reset"), served
        assert env.stats()["tcp.PassthroughCluster.offloaded"] == 1
    with env.proxy("IDLE", "--tcp-offload", "auto") as p:
        seen, served = _echo_session(env, 9403, "--rounds", "5", "--hold", "10")
        assert seen["end"] == "eof" and 0.9 <= seen["after"] < 3, seen
        assert served["bytes"] == 500, served
        stats = env.stats()
        assert stats["tcp.PassthroughCluster.offloaded"] == 1
        assert stats["tcp.PassthroughCluster.idle_timeout"] == 1
    assert p.proc.returncode == 0


def test_concurrency_two_workers_merge_stats_and_stop_cleanly(env: Env) -> None:
    n = 10
    with env.proxy("ALLOW_ANY", "--concurrency", "2") as p:
        workers = p.children()
        assert len(workers) == 2
        for pid in workers:
            uid_line = Path(f"/proc/{pid}/status").read_text().split("Uid:")[1].split("\n")[0]
            assert uid_line.split() == ["1337"] * 4
        for _ in range(n):
            result = env.from_app(VIP, APP_PORT)
            assert result.ok and result.reply is not None, result
        stats = env.stats()
        assert stats[f"cluster.{SVC_CLUSTER};.upstream_cx_total"] == n
        assert stats["listener.10.100.0.7_8080.downstream_cx_total"] == n
        assert stats[f"cluster.{SVC_CLUSTER};.membership_total"] == 2
        assert stats["server.concurrency"] == 2
    assert p.proc.returncode == 0
    for pid in workers:
        assert not Path(f"/proc/{pid}").exists()


def test_sigterm_drains_open_connections_then_exits(env: Env) -> None:
    with env.proxy() as p:
        server = Tool(env.peer, "serve", "--listen", f"{OUTSIDE}:9300")
        client: Tool | None = None
        try:
            server.expect("ready")
            client = Tool(env.pod, "read", "--target", f"{OUTSIDE}:9300",
                          "--progress-at", "65536", "--timeout", "20")
            client.expect("connected")
            client.expect("progress")
            t0 = time.monotonic()
            p.proc.send_signal(signal.SIGTERM)
            result = json.loads(client.line(timeout=15))     # closed at the drain deadline
            assert result["end"] in ("eof", "reset"), result
            assert time.monotonic() - t0 >= 0.8              # --drain-time-s 1
            assert p.proc.wait(15) == 0
            assert any("draining 1 connections" in line for line in p.lines), p.lines
        finally:
            server.kill()
            if client is not None:
                client.kill()


def test_bad_bootstrap_is_one_line_and_exit_1(env: Env, tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("static_resources: {listeners: [{name: x, bogus_field: 1}]}\n")
    proc = env.pod.run([remora_bin(), "proxy", "-c", str(bad)], check=False, timeout=30)
    assert proc.returncode == 1
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("Error: "), proc.stderr


def test_tproxy_mode_transparent_listeners(tmp_path: Path) -> None:
    """TPROXY interception: inbound arrives un-NATed on the transparent 15006 listener (the
    original destination is the socket's own name); outbound is still REDIRECTed to 15001."""
    with make_env(tmp_path, "TPROXY") as tenv, tenv.proxy("TPROXY"):
        result = connect(tenv.peer, Endpoint(host=ipaddress.ip_address(POD), port=APP_PORT))
        assert result.ok and result.reply is not None, result
        assert result.reply.server == "app"
        assert str(result.reply.peer.host) == "127.0.0.6"
        out = tenv.from_app(VIP, APP_PORT)
        assert out.ok and out.reply is not None and out.reply.server == "endpoint", out
        stats = tenv.stats()
        assert stats["cluster.inbound|8080||;.upstream_cx_total"] == 1
        assert stats[f"cluster.{SVC_CLUSTER};.upstream_cx_total"] == 1
