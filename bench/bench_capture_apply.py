"""Benchmark: applying and cleaning up the injector's default capture rules.

Compares, in one throwaway network namespace and in the same run:
  * restore:  one `iptables-restore --noflush` transaction (what `remora iptables` does), and one
              for cleanup;
  * per-rule: one `iptables` command per rule (`-N` then `-A`/`-I`; deletes one by one), which is
              how istio-iptables applied rules before the restore format (<= 1.23);
  * remora:   the whole `remora iptables` command end to end (Python start-up, backend
              detection, state check, restore, final save), for apply and `--cleanup-only`.
Prints medians and the ratio per-rule / restore. Target: restore at least 5x faster.

Run: ./dev bench   (or: .venv/bin/python bench/bench_capture_apply.py [--rounds N])
"""

from __future__ import annotations

import argparse
import os
import secrets
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from remora.capture.config import HostFacts, build_config, parse_flags
from remora.capture.render import (
    cleanup_commands,
    cleanup_restore_text,
    command_lines,
    restore_text,
)
from remora.capture.rules import build_rules

FLAGS = ["-p", "15001", "-z", "15006", "-u", "1337", "-m", "REDIRECT", "-i", "*", "-x", "",
         "-b", "*", "-d", "15090,15021,15020"]
REMORA = str(Path(sys.executable).with_name("remora"))


def run(argv: list[str], stdin: str | None = None) -> None:
    subprocess.run(argv, input=stdin, text=True, check=True, capture_output=True, timeout=60)


def timed(fn: Callable[[], None]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def inside(rounds: int) -> None:
    rules = build_rules(build_config(parse_flags(FLAGS, {}), {}, facts=HostFacts())).v4
    binary = "iptables-nft" if shutil.which("iptables-nft") else "iptables"
    apply_text, clean_text = restore_text(rules), cleanup_restore_text(rules)
    per_rule = [line.split() for line in command_lines(rules)]
    per_rule_clean = cleanup_commands(rules)
    results: dict[str, list[float]] = {k: [] for k in (
        "restore apply", "restore cleanup", "per-rule apply", "per-rule cleanup",
        "remora apply", "remora cleanup")}
    for _ in range(rounds):
        results["restore apply"].append(timed(
            lambda: run([f"{binary}-restore", "--noflush"], apply_text)))
        results["restore cleanup"].append(timed(
            lambda: run([f"{binary}-restore", "--noflush"], clean_text)))
        results["per-rule apply"].append(timed(
            lambda: [run([binary, *args]) for args in per_rule] and None))
        results["per-rule cleanup"].append(timed(
            lambda: [run([binary, *args]) for args in per_rule_clean] and None))
        results["remora apply"].append(timed(lambda: run([REMORA, "iptables", *FLAGS])))
        results["remora cleanup"].append(timed(
            lambda: run([REMORA, "iptables", *FLAGS, "--cleanup-only"])))
    med = {k: statistics.median(v) * 1000 for k, v in results.items()}
    print(f"capture rules: {len(rules)} rules (injector defaults, IPv4), {binary}, "
          f"{rounds} rounds, median ms")
    for k, v in med.items():
        print(f"  {k:<17} {v:8.2f} ms")
    for what in ("apply", "cleanup"):
        ratio = med[f"per-rule {what}"] / med[f"restore {what}"]
        verdict = "meets" if ratio >= 5 else "MISSES"
        print(f"  {what}: restore is {ratio:.1f}x faster than per-rule commands "
              f"({verdict} the 5x target)")
        e2e = med[f"per-rule {what}"] / med[f"remora {what}"]
        print(f"  {what}: `remora iptables` end to end is {e2e:.2f}x the speed of per-rule "
              "commands (includes Python start-up and backend detection)")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--inside", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.inside:
        inside(args.rounds)
        return
    if os.geteuid() != 0:
        sys.exit("bench_capture_apply: needs root (network namespaces)")
    name = f"rmbench-{os.getpid()}-{secrets.token_hex(2)}"
    host_end, pod_end = f"bh{secrets.token_hex(4)}", f"bp{secrets.token_hex(4)}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        for cmd in (["ip", "link", "add", host_end, "type", "veth", "peer", "name", pod_end],
                    ["ip", "link", "set", pod_end, "netns", name],
                    ["ip", "-n", name, "link", "set", "lo", "up"],
                    ["ip", "-n", name, "addr", "add", "10.232.0.2/24", "dev", pod_end],
                    ["ip", "-n", name, "link", "set", pod_end, "up"]):
            subprocess.run(cmd, check=True)
        subprocess.run(["ip", "netns", "exec", name, sys.executable, __file__, "--inside",
                        "--rounds", str(args.rounds)], check=True, timeout=600)
    finally:
        subprocess.run(["ip", "link", "del", host_end], capture_output=True)
        subprocess.run(["ip", "netns", "del", name], check=True)


if __name__ == "__main__":
    main()
