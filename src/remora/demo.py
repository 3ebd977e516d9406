"""The capture demo (`remora demo`): Istio's sidecar traffic interception, shown with real sockets.

Owns: one run of the demo. It creates a throwaway pod namespace joined to a peer namespace by a
veth pair, applies the injector's default capture rules exactly as the ``istio-init`` container
would (``ip netns exec <pod> remora iptables -p 15001 -z 15006 -u 1337 -m REDIRECT -i '*' -x ""
-b '*' -d 15090,15021,15020``, as a subprocess), shows them (``iptables -t nat -S``), starts
probe listeners (the proxy's 15001 and 15006, a health port 15021 and an app on pod-ip:8080 in
the pod; a server on :80 in the peer), makes a few real connections and reports where each one
arrived. `run_capture_demo` returns the result as data (rows to assert on); `run_demo` prints it.

Must not: leave a namespace or a process behind (everything is torn down in ``finally``/context
managers, even on error or Ctrl-C), program rules itself (it runs the CLI like the init container
does), or touch the host's own network namespace.
"""

from __future__ import annotations

import ipaddress
import os
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from rich import box
from rich.console import Console
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from remora import netns
from remora.capture.probe import ConnectResult, Endpoint, ListenSpec, ProbeServer, connect
from remora.errors import EnvironmentFault, RemoraError

__all__ = [
    "DEMO_PREFIX",
    "DemoResult",
    "DemoRow",
    "demo_rows",
    "injector_flags",
    "remora_executable",
    "render_lines",
    "render_table",
    "run_capture_demo",
    "run_demo",
]

Mode = Literal["REDIRECT", "TPROXY"]

#: Name prefix of the demo's namespaces (``remora-demo-pod-<pid>-<hex>``).
DEMO_PREFIX = "remora-demo"

POD_CIDR = "10.77.0.1/24"
PEER_CIDR = "10.77.0.2/24"
PROXY_UID = 1337
APP_UID = 1000
OUTBOUND_PORT = 15001
INBOUND_PORT = 15006
HEALTH_PORT = 15021
APP_PORT = 8080
PEER_PORT = 80
PASSTHROUGH_SRC = ipaddress.IPv4Address("127.0.0.6")


def injector_flags(mode: Mode = "REDIRECT") -> list[str]:
    """The flags Istio's sidecar injector gives ``istio-iptables`` by default (spec §1)."""
    return ["-p", str(OUTBOUND_PORT), "-z", str(INBOUND_PORT), "-u", str(PROXY_UID),
            "-m", mode, "-i", "*", "-x", "", "-b", "*", "-d", "15090,15021,15020"]  # fmt: skip


def remora_executable() -> str:
    """The ``remora`` console script installed next to this interpreter (else on PATH)."""
    beside = Path(sys.executable).with_name("remora")
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which("remora")
    if found is None:
        raise EnvironmentFault(
            f"cannot find the `remora` command next to {sys.executable} or on PATH "
            "(install the project: pip install -e .)"
        )
    return found


@dataclass(frozen=True, slots=True, kw_only=True)
class DemoRow:
    """One connection of the demo and where it ended up."""

    name: str
    client: str
    target: str
    expected: str
    arrived: str
    original_dst: str | None
    verdict: str

    @property
    def ok(self) -> bool:
        return self.arrived == self.expected


@dataclass(frozen=True, slots=True, kw_only=True)
class DemoResult:
    mode: Mode
    pod: str
    peer: str
    pod_ip: str
    peer_ip: str
    command: str
    rules_command: str
    rules: str
    rows: tuple[DemoRow, ...]

    @property
    def ok(self) -> bool:
        return all(row.ok for row in self.rows)


@dataclass(frozen=True, slots=True, kw_only=True)
class _Case:
    name: str
    client: str
    from_pod: bool
    target: Endpoint
    expected: str
    uid: int | None = None
    gid: int | None = None
    source: ipaddress.IPv4Address | None = None


def _verdict(result: ConnectResult) -> tuple[str, str | None, str]:
    """(arrived, original dst, verdict) for one connection."""
    if not result.ok:
        return f"not connected ({result.error})", None, "not connected"
    reply = result.reply
    if reply is None:
        return "unknown listener", None, "direct"
    arrived = f"{reply.server}:{reply.listener_port}"
    od = None if reply.original_dst is None else str(reply.original_dst)
    if reply.server == "pod" and reply.listener_port == INBOUND_PORT:
        return arrived, od, "captured (inbound)"
    if reply.server == "pod" and reply.listener_port == OUTBOUND_PORT:
        return arrived, od, "captured (outbound)"
    # not redirected: the original destination is where it arrived, nothing to recover
    return arrived, None, "direct"


def run_capture_demo(
    *, mode: Mode = "REDIRECT", progress: Callable[[str], None] | None = None
) -> DemoResult:
    """Run the demo once and return what happened; everything it made is gone on return."""
    say = progress or (lambda _msg: None)
    if os.geteuid() != 0:
        raise EnvironmentFault("the demo needs root (network namespaces and iptables)")
    remora = remora_executable()
    netns.remove_stale(DEMO_PREFIX)
    say("creating a pod namespace and a peer namespace joined by a veth pair")
    with netns.netns_pair(
        prefix=DEMO_PREFIX, a_addresses=[POD_CIDR], b_addresses=[PEER_CIDR]
    ) as pair:
        pod, peer = pair.a.netns, pair.b.netns
        pod_ip, peer_ip = pair.a.first(4), pair.b.first(4)
        flags = injector_flags(mode)
        command = " ".join(
            ["ip netns exec", pod.name, "remora iptables", *(f"'{f}'" if f in ("*", "") else f
                                                             for f in flags)]
        )  # fmt: skip
        say(f"applying the injector's default rules: {command}")
        proc = pod.run([remora, "iptables", *flags], check=False, timeout=60)
        if proc.returncode != 0:
            raise EnvironmentFault(
                f"`remora iptables` failed (exit {proc.returncode}): {proc.stderr.strip()}"
            )
        tables = ("mangle", "nat") if mode == "TPROXY" else ("nat",)
        rules = "".join(pod.run(["iptables", "-t", t, "-S"]).stdout for t in tables)
        rules_command = " ; ".join(f"iptables -t {t} -S" for t in tables)

        say("starting probe listeners")
        pod_listeners = [
            ListenSpec.any(OUTBOUND_PORT),
            ListenSpec.any(INBOUND_PORT, transparent=mode == "TPROXY"),
            ListenSpec.any(HEALTH_PORT),
            ListenSpec(host=pod_ip, port=APP_PORT),
        ]

        def ep(host: ipaddress.IPv4Address | ipaddress.IPv6Address, port: int) -> Endpoint:
            return Endpoint(host=host, port=port)

        cases = [
            _Case(name="inbound request to the app", client="the peer", from_pod=False,
                  target=ep(pod_ip, APP_PORT), expected=f"pod:{INBOUND_PORT}"),
            _Case(name="app calls a service", client=f"the app, uid {APP_UID}",
                  from_pod=True, uid=APP_UID, gid=APP_UID, target=ep(peer_ip, PEER_PORT),
                  expected=f"pod:{OUTBOUND_PORT}"),
            _Case(name="proxy calls the upstream", client=f"the proxy, uid {PROXY_UID}",
                  from_pod=True, uid=PROXY_UID, gid=PROXY_UID, target=ep(peer_ip, PEER_PORT),
                  expected=f"peer:{PEER_PORT}"),
            _Case(name="health check (excluded port)", client="the peer", from_pod=False,
                  target=ep(pod_ip, HEALTH_PORT), expected=f"pod:{HEALTH_PORT}"),
            _Case(name="proxy hands inbound to the app",
                  client=f"the proxy, uid {PROXY_UID}, source {PASSTHROUGH_SRC}",
                  from_pod=True, uid=PROXY_UID, gid=PROXY_UID, source=PASSTHROUGH_SRC,
                  target=ep(pod_ip, APP_PORT), expected=f"pod:{APP_PORT}"),
        ]  # fmt: skip
        rows: list[DemoRow] = []
        with (
            ProbeServer.start(pod, pod_listeners, label="pod", lifetime=60),
            ProbeServer.start(peer, [ListenSpec.any(PEER_PORT)], label="peer", lifetime=60),
        ):
            for case in cases:
                say(f"connecting: {case.name}")
                result = connect(
                    pod if case.from_pod else peer,
                    case.target,
                    uid=case.uid,
                    gid=case.gid,
                    source=case.source,
                    timeout=3.0,
                )
                arrived, od, verdict = _verdict(result)
                rows.append(
                    DemoRow(
                        name=case.name,
                        client=case.client,
                        target=str(case.target),
                        expected=case.expected,
                        arrived=arrived,
                        original_dst=od,
                        verdict=verdict,
                    )
                )
        return DemoResult(
            mode=mode,
            pod=pod.name,
            peer=peer.name,
            pod_ip=str(pod_ip),
            peer_ip=str(peer_ip),
            command=command,
            rules_command=rules_command,
            rules=rules,
            rows=tuple(rows),
        )


def demo_rows(*, mode: Mode = "REDIRECT") -> list[DemoRow]:
    """Just the rows of one demo run (for tests)."""
    return list(run_capture_demo(mode=mode).rows)


def render_table(rows: tuple[DemoRow, ...] | list[DemoRow]) -> Table:
    table = Table(title="Where each connection arrived", title_justify="left", box=box.SIMPLE_HEAD)
    table.add_column("connection", ratio=1)
    table.add_column("to", no_wrap=True)
    table.add_column("arrived at", no_wrap=True)
    table.add_column("original dst", no_wrap=True)
    table.add_column("verdict", no_wrap=True)
    for row in rows:
        style = "green" if row.ok else "bold red"
        mark = "✓" if row.ok else f"✗ expected {row.expected}"
        table.add_row(
            Text.assemble(row.name, "\n", (f"from {row.client}", "dim")),
            row.target,
            Text(row.arrived, style=style),
            row.original_dst or "—",
            Text.assemble(row.verdict, " ", (mark, style)),
        )
    return table


def render_lines(rows: tuple[DemoRow, ...] | list[DemoRow]) -> Text:
    """The same as `render_table`, one short paragraph per connection, for narrow consoles."""
    out = Text("Where each connection arrived\n", style="italic")
    for i, row in enumerate(rows, 1):
        style = "green" if row.ok else "bold red"
        mark = "✓" if row.ok else f"✗ expected {row.expected}"
        od = f", original dst {row.original_dst}" if row.original_dst else ""
        out.append_text(
            Text.assemble(
                f"{i}. {row.name} ",
                (f"(from {row.client})", "dim"),
                "\n",
                f"   to {row.target} → arrived at ",
                (row.arrived, style),
                od,
                "\n",
                f"   {row.verdict} ",
                (mark, style),
                "\n",
            )
        )
    return out


def run_demo(console: Console | None = None) -> int:
    """Run the demo and print it; 0 if every connection went where Istio's rules send it."""
    out = console or Console()
    try:
        result = run_capture_demo(progress=lambda msg: out.print(f"[dim]• {msg}[/dim]"))
    except RemoraError as exc:
        out.print(f"[bold red]Error:[/bold red] {exc}")
        return exc.exit_code
    except OSError as exc:  # includes TimeoutError from a probe that never answered
        out.print(f"[bold red]Error:[/bold red] {exc}")
        return 1
    out.print(
        f"pod [bold]{result.pod}[/bold] ({result.pod_ip}) ⇄ peer [bold]{result.peer}[/bold] "
        f"({result.peer_ip})"
    )
    out.print(f"applied: [bold]{result.command}[/bold]")
    out.print(
        Panel(
            Text(result.rules.rstrip()),
            title=f"{result.rules_command} (in the pod)",
            title_align="left",
            expand=False,
        )
    )
    out.print(render_table(result.rows) if out.width >= 110 else render_lines(result.rows))
    if not result.ok:
        bad = sum(not row.ok for row in result.rows)
        out.print(
            f"[bold red]{bad} connection(s) did not go where Istio's rules send them.[/bold red]"
        )
        return 1
    out.print(
        f"[green]All {len(result.rows)} connections went where Istio's rules send them.[/green]"
    )
    out.print("[dim]Namespaces and listeners removed.[/dim]")
    return _run_sidecar_part(out)


def _run_sidecar_part(out: Console) -> int:
    """The demo's second part: the same rules with `remora proxy` behind them."""
    from remora.demo_sidecar import render, run_sidecar_demo

    out.print()
    out.print("[bold]Now with the sidecar behind those rules[/bold]")
    try:
        result = run_sidecar_demo(progress=lambda msg: out.print(f"[dim]• {msg}[/dim]"))
    except RemoraError as exc:
        out.print(f"[bold red]Error:[/bold red] {exc}")
        return exc.exit_code
    except OSError as exc:
        out.print(f"[bold red]Error:[/bold red] {exc}")
        return 1
    for part in render(result, width=out.width):
        out.print(part)
    if not result.ok:
        out.print("[bold red]The sidecar did not route every request as Istio's would.[/bold red]")
        return 1
    out.print(
        f"[green]The sidecar routed all {len(result.calls)} requests as Istio's would: by Host "
        "outbound, to the app from 127.0.0.6 inbound.[/green]"
    )
    out.print("[dim]Namespaces, apps and the sidecar stopped and removed.[/dim]")
    return 0
