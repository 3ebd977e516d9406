"""`remora proxy` as a real process on loopback: the ready line, SIGTERM, /quitquitquit, and
the supervision of ``--concurrency`` workers (a worker that dies stops the proxy; every child
is reaped). Runs as the current user (``--uid/--gid`` = ours, so nothing is dropped).

Waits are on log lines and process exits, each with a deadline.
"""

from __future__ import annotations

import json
import os
import re
import select
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.timeout(60)

REMORA = str(Path(sys.executable).with_name("remora"))


FILE_LOG = "type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog"


def bootstrap(tmp: Path) -> Path:
    """A tcp_proxy listener to a cluster without endpoints (each connection is closed, UH),
    logging every connection to ``tmp/access.log``."""
    tcp = "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy"
    log = [{"name": "envoy.access_loggers.file",
            "typed_config": {"@type": FILE_LOG, "path": str(tmp / "access.log")}}]
    data = {
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}}},
        "static_resources": {
            "listeners": [{
                "name": "l1",
                "address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}},
                "filter_chains": [{"filters": [{
                    "name": "envoy.filters.network.tcp_proxy",
                    "typed_config": {"@type": tcp, "stat_prefix": "c", "cluster": "c",
                                     "access_log": log}}]}]}],
            "clusters": [{"name": "c", "type": "STATIC"}]}}
    path = tmp / "bootstrap.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


class Proxy:
    def __init__(self, config: Path, *args: str) -> None:
        self.proc = subprocess.Popen(
            [REMORA, "proxy", "-c", str(config), "--uid", str(os.getuid()), "--gid",
             str(os.getgid()), "--drain-time-s", "0.5", *args],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        assert self.proc.stderr is not None
        self._fd = self.proc.stderr.fileno()
        self._buf = b""
        self.lines: list[str] = []

    def wait_line(self, pattern: str, timeout: float = 20.0) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        rx = re.compile(pattern)
        seen = 0
        while True:
            for line in self.lines[seen:]:
                if m := rx.search(line):
                    return m
            seen = len(self.lines)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"no line matching {pattern!r}: {self.lines}")
            ready, _, _ = select.select([self._fd], [], [], remaining)
            if ready:
                chunk = os.read(self._fd, 65536)
                if not chunk:
                    raise EOFError(f"proxy exited: {self.lines}")
                self._buf += chunk
                *done, self._buf = self._buf.split(b"\n")
                self.lines += [d.decode(errors="replace") for d in done]

    def children(self) -> list[int]:
        path = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children")
        return [int(p) for p in path.read_text().split()]

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)
        if self.proc.stderr is not None:
            self.proc.stderr.close()


@pytest.fixture
def config(tmp_path: Path) -> Path:
    return bootstrap(tmp_path)


@pytest.fixture
def started(request: pytest.FixtureRequest, config: Path) -> Iterator[Proxy]:
    p = Proxy(config, *getattr(request, "param", ()))
    try:
        p.wait_line("remora proxy ready")
        yield p
    finally:
        p.close()


def _gone(pid: int) -> bool:
    return not Path(f"/proc/{pid}").exists()


@pytest.mark.parametrize("started", [(), ("--concurrency", "2")], indirect=True,
                         ids=["one-process", "two-workers"])
def test_sigterm_exits_0_and_reaps_every_worker(started: Proxy) -> None:
    kids = started.children()
    started.proc.send_signal(signal.SIGTERM)
    assert started.proc.wait(15) == 0
    assert all(_gone(k) for k in kids)


@pytest.mark.parametrize("started", [(), ("--concurrency", "2")], indirect=True,
                         ids=["one-process", "two-workers"])
def test_quitquitquit_exits_0(started: Proxy) -> None:
    port = started.wait_line(r"admin address: 127\.0\.0\.1:(\d+)").group(1)
    req = urllib.request.Request(f"http://127.0.0.1:{port}/quitquitquit", method="POST")
    with urllib.request.urlopen(req, timeout=5) as r:
        assert r.status == 200
    assert started.proc.wait(15) == 0


@pytest.mark.parametrize("started", [("--concurrency", "2")], indirect=True)
def test_a_dead_worker_stops_the_proxy_with_exit_1(started: Proxy) -> None:
    kids = started.children()
    assert len(kids) == 2
    os.kill(kids[0], signal.SIGKILL)
    assert started.proc.wait(15) == 1
    started.wait_line(r"worker \d \(pid \d+\) exited")
    assert all(_gone(k) for k in kids)


@pytest.mark.parametrize("started", [("--concurrency", "2")], indirect=True)
def test_stats_are_summed_over_workers(started: Proxy) -> None:
    port = started.wait_line(r"admin address: 127\.0\.0\.1:(\d+)").group(1)
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/stats", timeout=5) as r:
        text = r.read().decode()
    assert "server.concurrency: 2" in text
    assert "cluster.c.membership_total: 0" in text
    assert "listener.127.0.0.1_0.downstream_cx_total: 0" in text


def _admin(started: Proxy) -> str:
    port = started.wait_line(r"admin address: 127\.0\.0\.1:(\d+)").group(1)
    return f"http://127.0.0.1:{port}"


def _post(url: str) -> str:
    req = urllib.request.Request(url, method="POST")
    with urllib.request.urlopen(req, timeout=5) as r:
        return r.read().decode()


def _closed_connection(started: Proxy) -> None:
    """One connection to the listener, closed by the proxy (no endpoints: UH)."""
    port = int(started.wait_line(r"listeners=l1=127\.0\.0\.1:(\d+)").group(1))
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        assert s.recv(1) == b""


@pytest.mark.parametrize("started", [(), ("--concurrency", "2")], indirect=True,
                         ids=["one-process", "two-workers"])
def test_reopen_logs_after_rotation(started: Proxy, tmp_path: Path) -> None:
    """logrotate's move-then-reopen: lines buffered before /reopen_logs go to the moved file,
    later ones to a new file at the configured path (in every worker)."""
    admin = _admin(started)
    _closed_connection(started)
    (tmp_path / "access.log").rename(tmp_path / "access.log.1")
    assert _post(f"{admin}/reopen_logs") == "OK\n"
    _closed_connection(started)
    _post(f"{admin}/quitquitquit")
    assert started.proc.wait(15) == 0
    old = (tmp_path / "access.log.1").read_text().splitlines()
    new = (tmp_path / "access.log").read_text().splitlines()
    assert len(old) == 1 and len(new) == 1, (old, new)
    assert " UH " in old[0] and " UH " in new[0]


@pytest.mark.parametrize("started", [(), ("--concurrency", "2")], indirect=True,
                         ids=["one-process", "two-workers"])
def test_memory_counts_every_process(started: Proxy) -> None:
    with urllib.request.urlopen(f"{_admin(started)}/memory", timeout=5) as r:
        got = json.loads(r.read())
    assert list(got) == ["allocated", "heap_size", "pageheap_unmapped", "pageheap_free",
                         "total_thread_cache", "total_physical_bytes"]
    physical = int(got["total_physical_bytes"])
    pids = [started.proc.pid, *started.children()]
    rss = [int(line.split()[1]) * 1024 for pid in pids
           for line in Path(f"/proc/{pid}/status").read_text().splitlines()
           if line.startswith("VmRSS:")]
    # every process of the proxy is counted (RSS moves a little between the two reads)
    assert 0.8 * sum(rss) < physical < 1.25 * sum(rss)
    assert 0 < int(got["allocated"]) <= physical
