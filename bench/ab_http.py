"""Paired A/B of `remora proxy`'s HTTP cost: this checkout against a base commit, on demand.

A change to the HTTP hot path is worth a few percent, less than the spread between two runs of
bench_proxy_http.py minutes apart (every proxy's figures, nginx's too, move by 10 % or more on
a shared 2-core machine). This measures both builds in the same minutes instead: the base
commit is checked out in a temporary git worktree and compiled like this one
(tools/build_native.py), both run bench_proxy_http's static-listener config (Istio's HTTP
filters and access log, one worker) in front of one nginx upstream, and wrk -c50 keep-alive
loads each in turn, alternating which goes first, round after round. CPU per request comes
from the proxy's /proc accounting over the middle of each run. Loopback only (127.0.0.1);
the worktree, the processes and the temporary files are removed at the end.

    .venv/bin/python bench/ab_http.py --base COMMIT [--rounds 6] [--seconds 5] [--h2]

``--h2`` loads the proxies with h2load (HTTP/2 cleartext, prior knowledge, -m10) instead;
the proxies still speak HTTP/1.1 to the upstream.

It prints each round and the means, and how many rounds the checkout beat the base. Both
proxies must report their hot path compiled: a compiled build against an interpreted one
would measure mypyc, not the change.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_proxy_http as bh  # (the static config and its filters)
from remora.proxy.istio_config import socket_address

ROOT = Path(__file__).resolve().parents[1]
CLK_TCK = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def config(log: Path, listen: int, admin: int, upstream: int) -> dict[str, Any]:
    """bench_proxy_http's "remora static" config, on loopback ports."""
    conf = bh.remora_static_conf(log)
    conf["admin"]["address"] = socket_address("127.0.0.1", admin)
    res = conf["static_resources"]
    res["listeners"][0]["address"] = socket_address("127.0.0.1", listen)
    res["clusters"][0]["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"][
        "address"] = socket_address("127.0.0.1", upstream)
    return conf


def nginx_conf(tmp: Path, port: int) -> str:
    """bench_proxy_http's upstream (`return 200 "ok"`, one worker), on one loopback port."""
    return bh._nginx_head(tmp, "upstream") + f"""
http {{
    access_log off;
    keepalive_requests 100000000;
    keepalive_timeout 300s;
{bh._nginx_temp(tmp, "upstream")}
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location / {{ return 200 "ok"; }}
    }}
}}
"""


def wait_ok(url: str, proc: subprocess.Popen[bytes], what: str, timeout: float = 60) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            sys.exit(f"ab_http: {what} exited with {proc.returncode} before answering")
        try:
            with urllib.request.urlopen(url, timeout=1) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.1)     # (polling a process that is starting: nothing to wait on)
    sys.exit(f"ab_http: {what} did not answer {url} within {timeout:.0f}s")


def stop_all(procs: list[subprocess.Popen[bytes]]) -> None:
    """SIGTERM each process group still running (last started first); SIGKILL after 10 s."""
    for p in reversed(procs):
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGTERM)
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()


def cpu_ticks(pid: int) -> int:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])       # utime + stime


def load_argv(h2: bool, connections: int, seconds: float, url: str) -> list[str]:
    """wrk (HTTP/1.1 keep-alive), or h2load as bench_proxy_http runs it (HTTP/2 cleartext,
    prior knowledge, 10 streams per connection)."""
    if h2:
        return ["h2load", "-t1", f"-c{connections}", "-m10", f"-D{seconds:g}", url]
    return ["wrk", "-t1", f"-c{connections}", f"-d{seconds:g}s", url]


def load_rps(h2: bool, out: str) -> float:
    if h2:
        got = bh.parse_h2load(out)
        if "rps" not in got or "failed" not in got or any(
                got[k] for k in ("failed", "errored", "timeout")):
            sys.exit(f"ab_http: h2load failed:\n{out}")
        return got["rps"]
    return float(next(ln for ln in out.splitlines() if ln.startswith("Requests/sec")).split()[1])


def one_run(port: int, pid: int, seconds: float, connections: int,
            h2: bool = False, ticks: Callable[[int], int] = cpu_ticks) -> tuple[float, float]:
    """(rps, µs of proxy CPU per request): the load for ``seconds``, CPU over its middle
    (``ticks``: the CPU clock ticks to count, by default the process's own)."""
    url = f"http://127.0.0.1:{port}/"
    subprocess.run(load_argv(h2, connections, 1, url), check=True, capture_output=True,
                   timeout=30)                                            # warm-up
    load = subprocess.Popen(load_argv(h2, connections, seconds, url), stdout=subprocess.PIPE,
                            text=True)
    window = seconds - 1.0
    time.sleep(0.5)             # (a timed window inside the run, not synchronisation)
    a = ticks(pid)
    time.sleep(window)
    b = ticks(pid)
    out, _ = load.communicate(timeout=seconds + 30)
    rps = load_rps(h2, out)
    return rps, (b - a) / CLK_TCK * 1e6 / (rps * window)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--base", required=True, help="the commit to compare against")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--seconds", type=float, default=5.0, help="wrk run per target")
    parser.add_argument("--connections", type=int,
                        help="concurrent connections (default 50, or 10 with --h2)")
    parser.add_argument("--h2", action="store_true",
                        help="HTTP/2 to the proxy with h2load -m10 instead of wrk")
    args = parser.parse_args()
    if args.connections is None:
        args.connections = 10 if args.h2 else 50
    missing = [t for t in ("h2load" if args.h2 else "wrk", "nginx", "git")
               if shutil.which(t) is None]
    if missing:
        sys.exit(f"ab_http: missing {', '.join(missing)} (./dev bench installs them)")
    if args.seconds < 2:
        sys.exit("ab_http: --seconds must be at least 2")

    def interrupted(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")
    signal.signal(signal.SIGTERM, interrupted)

    procs: list[subprocess.Popen[bytes]] = []
    results: dict[str, list[tuple[float, float]]] = {"base": [], "new": []}
    with tempfile.TemporaryDirectory(prefix="rmr-ab-", dir="/dev/shm") as tmpdir:
        tmp = Path(tmpdir)
        tree = tmp / "base"
        try:
            add = subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach",
                                  str(tree), args.base], capture_output=True, text=True,
                                 timeout=120)
            if add.returncode:
                why = (add.stderr.strip().splitlines() or ["git worktree add failed"])[-1]
                sys.exit(f"ab_http: cannot check out {args.base!r}: {why}")
            for where in (ROOT, tree):
                print(f"ab_http: compiling the hot path in {where}", flush=True)
                if not (where / "tools" / "build_native.py").exists() or subprocess.run(
                        [sys.executable, "tools/build_native.py"], cwd=where,
                        stdout=subprocess.DEVNULL, timeout=1800).returncode:
                    sys.exit(f"ab_http: could not compile the hot path in {where} (a base "
                             "from before tools/build_native.py has nothing to compare)")
            up = free_port()
            (tmp / "nginx.conf").write_text(nginx_conf(tmp, up))
            nginx = subprocess.Popen(["nginx", "-p", str(tmp), "-c", str(tmp / "nginx.conf")],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     start_new_session=True)
            procs.append(nginx)
            wait_ok(f"http://127.0.0.1:{up}/", nginx, "nginx")
            side: dict[str, tuple[int, int]] = {}       # name -> (listener port, pid)
            for name, src in (("base", tree / "src"), ("new", ROOT / "src")):
                listen, admin = free_port(), free_port()
                conf = tmp / f"{name}.json"
                conf.write_text(json.dumps(config(tmp / f"access-{name}.log", listen, admin,
                                                  up)))
                out = tmp / f"{name}.out"
                with out.open("wb") as f:
                    proc = subprocess.Popen(
                        [sys.executable, "-m", "remora.cli", "proxy", "-c", str(conf),
                         "--concurrency", "1", "--uid", "0", "--gid", "0"],
                        stdout=f, stderr=subprocess.STDOUT, start_new_session=True,
                        env={**os.environ, "PYTHONPATH": str(src)})
                procs.append(proc)
                wait_ok(f"http://127.0.0.1:{admin}/ready", proc, f"the {name} proxy")
                if "compiled (mypyc)" not in out.read_text():
                    sys.exit(f"ab_http: the {name} proxy does not run a compiled hot path:\n"
                             + out.read_text())
                side[name] = (listen, proc.pid)
            for r in range(args.rounds):
                order = ("base", "new") if r % 2 == 0 else ("new", "base")
                for name in order:
                    port, pid = side[name]
                    results[name].append(one_run(port, pid, args.seconds, args.connections,
                                                 args.h2))
                b, n = results["base"][-1], results["new"][-1]
                print(f"round {r + 1}: base {b[0]:8.0f} rps {b[1]:6.2f} µs/req   "
                      f"new {n[0]:8.0f} rps {n[1]:6.2f} µs/req", flush=True)
        finally:
            stop_all(procs)
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force",
                            str(tree)], capture_output=True, timeout=60)
            subprocess.run(["git", "-C", str(ROOT), "worktree", "prune"],
                           capture_output=True, timeout=60)
    base, new = results["base"], results["new"]
    b_rps, n_rps = statistics.mean(x[0] for x in base), statistics.mean(x[0] for x in new)
    b_cpu, n_cpu = statistics.mean(x[1] for x in base), statistics.mean(x[1] for x in new)
    wins = sum(n[0] > b[0] for b, n in zip(base, new, strict=True))
    print(f"means over {args.rounds} rounds: base {b_rps:.0f} rps, {b_cpu:.2f} µs of CPU per "
          f"request; new {n_rps:.0f} rps, {n_cpu:.2f} µs")
    print(f"new / base: rps {n_rps / b_rps:.3f}x, CPU per request {n_cpu / b_cpu:.3f}x; "
          f"new ahead in {wins} of {args.rounds} rounds")


if __name__ == "__main__":
    main()
