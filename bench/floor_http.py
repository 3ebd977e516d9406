"""How far Remora's HTTP/1.1 cost is from the floor of a Python proxy, and that floor from nginx.

issue 5's targets put Remora against nginx. This benchmark adds the third point that tells the
language's cost from the features' cost: ``bench/http_floor_proxy.py``, the least a keep-alive
reverse proxy can do per request on the stack Remora's hot path uses (uvloop, httptools,
compiled with mypyc), with no routing, stats, filters, timeouts, retries or pools. In the same
minutes, on loopback, in front of one nginx upstream (``return 200 "ok"``, one worker), it
loads in turn, alternating the order round after round:

- **nginx**: bench_proxy_http's nginx reverse proxy (keep-alive upstream, an access log with
  Istio's fields, ``buffer=64k flush=1s``), one worker;
- **remora**: ``remora proxy`` on bench_proxy_http's static-listener config (Istio's six HTTP
  filters, Istio's access log, one worker), hot path compiled;
- **floor**: the floor proxy compiled with mypyc; **floor (interpreted)**: the same source run
  by the interpreter.

wrk -t1 -c50 keep-alive for ``--seconds`` per target and round; CPU per request from /proc
(the whole process tree: nginx's master and worker) over the middle of each run. It prints
each round, the medians, and each target's rps and CPU per request as ratios against nginx's.

    .venv/bin/python bench/floor_http.py [--rounds 4] [--seconds 5]

About 2 minutes plus a compile. Needs wrk, nginx and a C compiler (./dev bench installs them).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import ab_http as ab  # (free ports, waits, the static config, the upstream's nginx config)
import bench_proxy_http as bh  # (nginx as a reverse proxy)
import bench_proxy_l4 as l4  # (CPU of a process tree)

ROOT = Path(__file__).resolve().parents[1]
FLOOR = Path(__file__).resolve().parent / "http_floor_proxy.py"


def tree_ticks(pid: int) -> int:
    """CPU clock ticks of ``pid``'s process tree (nginx: the master and its worker), as
    bench_proxy_l4 counts them."""
    return round(l4.cpu_seconds(pid) * ab.CLK_TCK)


def compile_floor(into: Path) -> None:
    shutil.copy(FLOOR, into / FLOOR.name)
    built = subprocess.run([sys.executable, "-m", "mypyc", FLOOR.name], cwd=into,
                           capture_output=True, text=True, timeout=900)
    if built.returncode or not list(into.glob("http_floor_proxy.*.so")):
        sys.exit("floor_http: mypyc could not compile the floor proxy:\n"
                 + (built.stdout + built.stderr)[-2000:])
    (into / FLOOR.name).unlink()            # so that the import finds the compiled one


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=5.0, help="wrk run per target")
    args = parser.parse_args()
    missing = [t for t in ("wrk", "nginx") if shutil.which(t) is None]
    if missing:
        sys.exit(f"floor_http: missing {', '.join(missing)} (./dev bench installs them)")
    if args.seconds < 2 or args.rounds < 1:
        sys.exit("floor_http: --seconds must be at least 2 and --rounds at least 1")

    def interrupted(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")
    signal.signal(signal.SIGTERM, interrupted)

    print(f"floor_http: {sys.executable} (Python {sys.version.split()[0]})", flush=True)
    if subprocess.run([sys.executable, "tools/build_native.py"], cwd=ROOT,
                      stdout=subprocess.DEVNULL, timeout=1800).returncode:
        sys.exit("floor_http: could not compile Remora's hot path (tools/build_native.py)")
    procs: list[subprocess.Popen[bytes]] = []
    with tempfile.TemporaryDirectory(prefix="rmr-floor-", dir="/dev/shm") as tmpdir:
        tmp = Path(tmpdir)
        compiled = tmp / "compiled"
        compiled.mkdir()
        print("floor_http: compiling the floor proxy with mypyc", flush=True)
        compile_floor(compiled)
        try:
            def spawn(name: str, argv: list[str], **env: str) -> subprocess.Popen[bytes]:
                with (tmp / f"{name}.out").open("wb") as out:
                    proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT,
                                            start_new_session=True,
                                            env={**os.environ, **env})
                procs.append(proc)
                return proc

            up = ab.free_port()
            (tmp / "upstream.conf").write_text(ab.nginx_conf(tmp, up))
            upstream = spawn("upstream", ["nginx", "-p", str(tmp), "-c",
                                          str(tmp / "upstream.conf")])
            ab.wait_ok(f"http://127.0.0.1:{up}/", upstream, "the upstream nginx")
            targets: dict[str, tuple[int, subprocess.Popen[bytes]]] = {}
            port = ab.free_port()
            (tmp / "nginx.conf").write_text(bh.nginx_proxy_conf(
                tmp, "nginx", (port, ab.free_port()), f"127.0.0.1:{up}", tmp / "nginx.log"))
            targets["nginx"] = port, spawn("nginx", ["nginx", "-p", str(tmp), "-c",
                                                     str(tmp / "nginx.conf")])
            port, admin = ab.free_port(), ab.free_port()
            (tmp / "remora.json").write_text(json.dumps(ab.config(tmp / "remora.log", port,
                                                                  admin, up)))
            targets["remora"] = port, spawn(
                "remora", [sys.executable, "-m", "remora.cli", "proxy", "-c",
                           str(tmp / "remora.json"), "--concurrency", "1", "--uid", "0",
                           "--gid", "0"])
            ab.wait_ok(f"http://127.0.0.1:{admin}/ready", targets["remora"][1], "remora")
            if "compiled (mypyc)" not in (tmp / "remora.out").read_text():
                sys.exit("floor_http: remora proxy does not run a compiled hot path")
            for name, tag, where in (("floor", "floor", compiled),
                                     ("floor (interpreted)", "floor-i", FLOOR.parent)):
                port = ab.free_port()
                targets[name] = port, spawn(
                    tag, [sys.executable, "-c", "import sys, http_floor_proxy as f; "
                          "print(f.__file__, flush=True); f.main(sys.argv[1:])", str(port),
                          str(up), str(tmp / f"{tag}.log")],
                    PYTHONPATH=str(where))
            for name, (port, proc) in targets.items():
                ab.wait_ok(f"http://127.0.0.1:{port}/", proc, name)
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as r:
                    if r.read() != b"ok":
                        sys.exit(f"floor_http: {name} did not relay the upstream's body")
            first = (tmp / "floor.out").read_text().split("\n", 1)[0]
            if not first.endswith(".so"):
                sys.exit(f"floor_http: the floor proxy ran interpreted ({first})")
            results: dict[str, list[tuple[float, float]]] = {n: [] for n in targets}
            names = list(targets)
            for r in range(args.rounds):
                for name in (names if r % 2 == 0 else names[::-1]):
                    port, proc = targets[name]
                    results[name].append(ab.one_run(port, proc.pid, args.seconds, 50,
                                                       ticks=tree_ticks))
                print(f"round {r + 1}: " + "   ".join(
                    f"{n} {results[n][-1][0]:.0f} rps {results[n][-1][1]:.1f} µs/req"
                    for n in names), flush=True)
        finally:
            ab.stop_all(procs)
    rps = {n: statistics.median(x[0] for x in v) for n, v in results.items()}
    cpu = {n: statistics.median(x[1] for x in v) for n, v in results.items()}
    print(f"\nmedians of {args.rounds} rounds, wrk -t1 -c50, one worker each:")
    print(f"{'target':22s} {'rps':>8s} {'vs nginx':>9s} {'CPU/req':>9s} {'vs nginx':>9s}")
    for n in names:
        print(f"{n:22s} {rps[n]:8.0f} {rps[n] / rps['nginx']:8.2f}x {cpu[n]:7.1f}µs "
              f"{cpu[n] / cpu['nginx']:8.2f}x")


if __name__ == "__main__":
    main()
