"""The sidecar part of the demo (`remora demo`, after the capture part): the injector's capture
rules with a real `remora proxy` behind them, routing HTTP as Istio's sidecar does.

Owns: one run of that part. It makes a pod namespace and a peer namespace joined by a veth
pair, applies the default capture rules (``remora iptables``, as ``istio-init`` would), starts
two demo apps in the peer (``demoappv10`` and ``demoappv11``, both on port 8080, each behind a
service VIP) and the pod's own app on pod-ip:8080, writes a bootstrap shaped like Istio's
(``virtualOutbound`` handing port 8080 to the ``0.0.0.0_8080`` listener, whose routes pick the
service by ``Host``; ``virtualInbound`` with the inbound HTTP chain to ``inbound|8080||``) and
starts ``remora proxy`` in the pod as uid 1337. Then the app (uid 1000) calls both services,
the peer calls the app, and the result is collected as data: who answered each request and
what it saw, the proxy's access-log lines (Istio's format) and its ``istio_requests_total``.

Must not: leave a namespace or a process behind (everything stops in ``finally`` blocks and
context managers, even on error), or touch the host's own network namespace.
"""

from __future__ import annotations

import contextlib
import encodings.idna  # noqa: F401  (http.client needs it once the caller is uid 1000)
import functools
import http.client
import json
import os
import subprocess
import sys
import tempfile
import threading
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich import box
from rich.console import RenderableType
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from remora import netns
from remora.demo import (
    APP_UID,
    DEMO_PREFIX,
    PROXY_UID,
    injector_flags,
    remora_executable,
)
from remora.errors import EnvironmentFault
from remora.proxy import istio_config as ic

POD_CIDR = "10.78.0.1/24"
PEER_CIDRS = ("10.78.0.2/24", "10.78.0.10/24", "10.78.0.11/24")
APP_PORT = 8080
NS = "default.svc.cluster.local"
#: service name → (VIP the app calls, the endpoint in the peer namespace)
SERVICES = {"demoappv10": ("10.100.1.10", "10.78.0.10"),
            "demoappv11": ("10.100.1.11", "10.78.0.11")}
READY_LINE = "remora proxy ready"
START_TIMEOUT = 30.0


# ----------------------------------------------------------------------------- the bootstrap

def _hcm(stat_prefix: str, route: dict[str, Any], *, inbound: bool) -> dict[str, Any]:
    """The demo's HCM, as Istio configures a sidecar's (spec §4.2-§4.3, §5.3): Istio's HTTP
    filter chain, its access log on stdout, and on the inbound side the ``istio-envoy``
    server name."""
    return ic.http_connection_manager(
        stat_prefix, route_config=route,
        http_filters=ic.http_filters(
            istio_stats={"disable_host_header_fallback": True} if inbound else None),
        access_log=ic.file_access_log(),
        server_name="istio-envoy" if inbound else None,
        server_header_transformation="OVERWRITE" if inbound else None)


def sidecar_bootstrap(pod_ip: str) -> dict[str, Any]:
    """An Envoy bootstrap shaped like the one Istio gives the pod's sidecar (static until
    xDS): the listeners, routes and clusters of spec §3-§6 for the demo's two services."""
    vhosts = [ic.service_vhost(svc, APP_PORT, vip, [{
                  "name": "default", "match": {"prefix": "/"},
                  "route": {"cluster": f"outbound|{APP_PORT}||{svc}.{NS}", "timeout": "0s"}}])
              for svc, (vip, _) in SERVICES.items()]
    vhosts.append(ic.allow_any_vhost())
    outbound_route = {"name": str(APP_PORT), "ignore_port_in_host_matching": True,
                      "virtual_hosts": vhosts}
    inbound_route = {"name": f"inbound|{APP_PORT}||", "virtual_hosts": [{
        "name": f"inbound|http|{APP_PORT}", "domains": ["*"], "routes": [{
            "name": "default", "match": {"prefix": "/"},
            "route": {"cluster": f"inbound|{APP_PORT}||", "timeout": "0s"}}]}]}
    return ic.bootstrap(
        node=ic.sidecar_node(pod_ip, "app"),
        listeners=[
            ic.virtual_outbound(),
            ic.outbound_http_listener(
                APP_PORT, _hcm(f"outbound_0.0.0.0_{APP_PORT}", outbound_route, inbound=False)),
            ic.virtual_inbound(
                [ic.inbound_http_chain(APP_PORT, _hcm(f"inbound_0.0.0.0_{APP_PORT}",
                                                      inbound_route, inbound=True))]),
        ],
        clusters=[
            *(ic.static_cluster(f"outbound|{APP_PORT}||{svc}.{NS}", [(ip, APP_PORT)],
                                connect_timeout="5s", lb_policy="LEAST_REQUEST")
              for svc, (_, ip) in SERVICES.items()),
            ic.original_dst_cluster(f"inbound|{APP_PORT}||", connect_timeout="5s",
                                    inbound=True),
            ic.inbound_passthrough_cluster("5s"),
            *ic.passthrough_clusters("5s"),
        ])


# ----------------------------------------------------------------------------- processes

class _Proc:
    """A process in a namespace whose output lines are collected as they come."""

    def __init__(self, ns: netns.Netns, argv: list[str]) -> None:
        self.proc = netns.popen_in_netns(ns, argv, stdin=subprocess.DEVNULL)
        self.out: list[str] = []
        self.err: list[str] = []
        self._cv = threading.Condition()
        self._threads = [threading.Thread(target=self._read, args=(s, lines), daemon=True)
                         for s, lines in ((self.proc.stdout, self.out),
                                          (self.proc.stderr, self.err))]
        for t in self._threads:
            t.start()

    def _read(self, stream: Any, lines: list[str]) -> None:
        for line in stream:
            with self._cv:
                lines.append(line.rstrip("\n"))
                self._cv.notify_all()
        with self._cv:
            self._cv.notify_all()

    def wait_for(self, pred: Callable[[], bool], timeout: float, what: str) -> None:
        with self._cv:
            if not self._cv.wait_for(lambda: pred() or self.proc.poll() is not None, timeout) \
                    or not pred():
                tail = "\n".join((self.err + self.out)[-15:])
                raise EnvironmentFault(f"{what} did not happen in {timeout:.0f}s:\n{tail}")

    def stop(self) -> None:
        netns.stop_process(self.proc, readers=self._threads)


@contextlib.contextmanager
def _running(ns: netns.Netns, argv: list[str], ready: Callable[[_Proc], bool],
             what: str) -> Iterator[_Proc]:
    p = _Proc(ns, argv)
    try:
        p.wait_for(lambda: ready(p), START_TIMEOUT, what)
        yield p
    finally:
        p.stop()


def _app(ns: netns.Netns, listen: str, name: str) -> contextlib.AbstractContextManager[_Proc]:
    argv = [sys.executable, "-m", "remora.demo_app", "--listen", listen, "--name", name]
    return _running(ns, argv, lambda p: "ready" in p.out, f"the app {name} starting")


# ----------------------------------------------------------------------------- requests

@dataclass(frozen=True, slots=True, kw_only=True)
class Call:
    """One request of the demo and who answered it."""

    name: str
    client: str
    url: str
    host: str
    expected: str            # the app that should answer
    status: int
    answered_by: str
    seen_from: str           # the peer address the app saw
    headers: dict[str, str]  # request headers the app saw (the ones the sidecar sets)

    @property
    def ok(self) -> bool:
        return self.status == 200 and self.answered_by == self.expected


def _get(ip: str, host: str, uid: int | None) -> tuple[int, dict[str, Any]]:
    """GET http://<ip>:8080/ with ``Host: host``, as ``uid`` (in the caller's namespace)."""
    if uid is not None:
        os.setgroups([])
        os.setgid(uid)
        os.setuid(uid)
    conn = http.client.HTTPConnection(ip, APP_PORT, timeout=10)
    try:
        conn.request("GET", "/", headers={"Host": host})
        resp = conn.getresponse()
        body = resp.read()
    finally:
        conn.close()
    try:
        data: dict[str, Any] = json.loads(body)
    except ValueError:
        data = {"app": body.decode(errors="replace")[:60]}
    return resp.status, data


def _call(ns: netns.Netns, ip: str, host: str, uid: int | None, *, name: str, client: str,
          url: str, expected: str) -> Call:
    """One GET made in ``ns`` (as ``uid``), and who answered it."""
    status, data = ns.call(functools.partial(_get, ip, host, uid))
    return Call(name=name, client=client, url=url, host=host, expected=expected,
                status=status, answered_by=str(data.get("app", "")),
                seen_from=str(data.get("peer", "")), headers=dict(data.get("headers", {})))


def _admin(ns: netns.Netns, path: str) -> str:
    def get() -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:15000{path}", timeout=5) as r:
            text: str = r.read().decode()
        return text
    return ns.call(get, timeout=15)


@dataclass(frozen=True, slots=True, kw_only=True)
class SidecarResult:
    pod: str
    peer: str
    pod_ip: str
    command: str
    calls: tuple[Call, ...]
    access_log: tuple[str, ...]
    metrics: tuple[str, ...]     # istio_requests_total series

    @property
    def ok(self) -> bool:
        return (all(c.ok for c in self.calls) and len(self.access_log) >= len(self.calls)
                and bool(self.metrics))


def run_sidecar_demo(*, progress: Callable[[str], None] | None = None) -> SidecarResult:
    """Run the sidecar part once and return what happened; everything it made is gone on
    return."""
    say = progress or (lambda _msg: None)
    if os.geteuid() != 0:
        raise EnvironmentFault("the demo needs root (network namespaces and iptables)")
    remora = remora_executable()
    say("creating a pod namespace and a peer namespace for the sidecar")
    with netns.netns_pair(prefix=f"{DEMO_PREFIX}-sc", a_addresses=[POD_CIDR],
                          b_addresses=list(PEER_CIDRS)) as pair, \
            tempfile.TemporaryDirectory(prefix="remora-demo-") as tmp:
        pod, peer = pair.a.netns, pair.b.netns
        pod_ip = str(pair.a.first(4))
        flags = injector_flags()
        proc = pod.run([remora, "iptables", *flags], check=False, timeout=60)
        if proc.returncode != 0:
            raise EnvironmentFault(
                f"`remora iptables` failed (exit {proc.returncode}): {proc.stderr.strip()}")
        boot = Path(tmp) / "bootstrap.json"
        boot.write_text(json.dumps(sidecar_bootstrap(pod_ip), indent=1))
        boot.chmod(0o644)
        Path(tmp).chmod(0o755)
        command = (f"ip netns exec {pod.name} remora proxy -c {boot.name} --uid {PROXY_UID} "
                   f"--gid {PROXY_UID}")
        say("starting the demo apps and the sidecar: " + command)
        with contextlib.ExitStack() as stack:
            for svc, (_, ip) in SERVICES.items():
                stack.enter_context(_app(peer, f"{ip}:{APP_PORT}", svc))
            stack.enter_context(_app(pod, f"{pod_ip}:{APP_PORT}", "app"))
            sidecar = stack.enter_context(_running(
                pod, [remora, "proxy", "-c", str(boot), "--uid", str(PROXY_UID),
                      "--gid", str(PROXY_UID)],
                lambda p: any(READY_LINE in ln for ln in p.err), "the sidecar starting"))
            calls: list[Call] = []
            for svc, (vip, _) in SERVICES.items():
                say(f"the app calls http://{svc}:{APP_PORT}/")
                calls.append(_call(pod, vip, svc, APP_UID, name=f"app calls {svc}",
                                   client=f"the app, uid {APP_UID}",
                                   url=f"http://{svc}:{APP_PORT}/ (VIP {vip})", expected=svc))
            say(f"the peer calls the app at {pod_ip}:{APP_PORT}")
            calls.append(_call(peer, pod_ip, f"app.{NS}", None,
                               name="peer calls the app (inbound)", client="the peer",
                               url=f"http://{pod_ip}:{APP_PORT}/", expected="app"))
            # Envoy flushes file access logs every second: wait for the lines to come out.
            with contextlib.suppress(EnvironmentFault):
                sidecar.wait_for(lambda: len(_log_lines(sidecar.out)) >= len(calls), 5.0,
                                 "the access log lines")
            metrics = tuple(ln for ln in _admin(pod, "/stats/prometheus").splitlines()
                            if ln.startswith("istio_requests_total{"))
            log_lines = tuple(_log_lines(sidecar.out))
        return SidecarResult(pod=pod.name, peer=peer.name, pod_ip=pod_ip, command=command,
                             calls=tuple(calls), access_log=log_lines, metrics=metrics)


def _log_lines(out: list[str]) -> list[str]:
    return [ln for ln in out if ln.startswith("[")]



# ----------------------------------------------------------------------------- printing

#: istio_requests_total labels shown in the demo's summary of the metric (it has 25).
SHOWN_LABELS = ("reporter", "source_workload", "destination_workload", "destination_service",
                "response_code")


def metric_labels(line: str) -> dict[str, str]:
    """The labels of one Prometheus series line (``name{a="x",…} value``)."""
    inner = line[line.index("{") + 1:line.rindex("}")]
    out: dict[str, str] = {}
    for part in inner.split('",'):
        key, _, value = part.partition('="')
        out[key] = value.rstrip('"')
    return out


def render(result: SidecarResult, *, width: int) -> list[RenderableType]:
    """What the demo prints for this part: the calls, the access log and the metric, as
    tables on a wide console and as short paragraphs on a narrow one."""
    call_rows = [(c, c.answered_by or f"HTTP {c.status}",
                  ", ".join(k for k in c.headers if k != "host") or "—")
                 for c in result.calls]
    series = [([metric_labels(ln).get(k, "") or '""' for k in SHOWN_LABELS],
               ln.rsplit(" ", 1)[1]) for ln in result.metrics]
    metric_title = (f"istio_requests_total on /stats/prometheus ({len(SHOWN_LABELS)} of its "
                    "25 labels)")
    log = Panel(Text("\n".join(result.access_log) or "(no lines)", overflow="fold"),
                title="the sidecar's access log (Istio's format)", title_align="left",
                expand=False)
    if width >= 110:
        calls = Table(title="Through the sidecar", title_justify="left", box=box.SIMPLE_HEAD)
        calls.add_column("request")
        for name in ("answered by", "the app saw it from", "headers the sidecar added"):
            calls.add_column(name, no_wrap=True)
        for c, who, added in call_rows:
            calls.add_row(Text.assemble(c.name, "\n", (c.url, "dim")),
                          Text(who, style="green" if c.ok else "bold red"), c.seen_from, added)
        metrics = Table(title=metric_title, title_justify="left", box=box.SIMPLE_HEAD)
        for label in (*SHOWN_LABELS, "value"):
            metrics.add_column(label, no_wrap=True)
        for values, value in series:
            metrics.add_row(*values, value)
        return [calls, log, metrics]
    lines = Text("Through the sidecar\n", style="italic")
    for i, (c, who, added) in enumerate(call_rows, 1):
        lines.append_text(Text.assemble(
            f"{i}. {c.name} ", (f"({c.url})", "dim"), "\n   answered by ",
            (who, "green" if c.ok else "bold red"),
            f", which saw it from {c.seen_from}\n   added by the sidecar: {added}\n"))
    metric_lines = Text(metric_title + "\n", style="italic")
    for values, value in series:
        metric_lines.append(" ".join(f"{k}={v}" for k, v in zip(SHOWN_LABELS, values,
                                                                strict=True))
                            + f" → {value}\n")
    return [lines, log, metric_lines]
