"""`remora <command>`: parses the command line and environment, calls one function, maps
errors to exit codes. Nothing else.

Exit codes: 0 success; 1 bad input, environment or apply failure (as istio-iptables);
2 usage error of `remora` itself (unknown command) and bad input to `remora trace`
(unparseable rules, unknown namespace, malformed address); 126 iptables validation failed.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from collections.abc import Sequence
from typing import Literal, NoReturn

from remora.errors import BadInput, RemoraError


class UsageError(BadInput):
    """A malformed command line or input of a `remora` command other than iptables."""

    exit_code = 2

COMMANDS = {
    "iptables": "write the pod's capture rules (Istio: pilot-agent istio-iptables)",
    "trace": "show where a connection goes through the capture rules, and why",
    "demo": "run the capture demo, then the sidecar behind it, in throwaway namespaces",
    "proxy": "run the sidecar proxy from an Envoy bootstrap (Istio: envoy)",
}


def _usage() -> str:
    lines = ["Usage: remora <command> [flags]", "", "Commands:"]
    lines += [f"  {name:<10} {text}" for name, text in COMMANDS.items()]
    return "\n".join(lines)


def _setup_logging(argv: Sequence[str]) -> None:
    level = logging.INFO
    for arg in argv:
        if arg.startswith("--log_output_level="):
            text = arg.split("=", 1)[1].rsplit(":", 1)[-1].lower()
            level = {"debug": logging.DEBUG, "info": logging.INFO, "warn": logging.WARNING,
                     "error": logging.ERROR, "none": logging.CRITICAL + 1}.get(text, level)
    logging.basicConfig(level=level, format="%(levelname)s\t%(message)s", stream=sys.stderr)


def cmd_iptables(argv: Sequence[str]) -> int:
    from remora.capture.config import HelpRequested, usage
    from remora.capture.program import load_config, run

    if "--help" in argv:
        print(usage())
        return 0
    try:
        cfg = load_config(argv, os.environ)
    except HelpRequested:
        print(usage())
        return 0
    return run(cfg, sys.stdout)


class _Parser(argparse.ArgumentParser):
    """argparse that reports a usage error as one line (exit code 2, via BadInput)."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{self.prog}: {message}")


def cmd_trace(argv: Sequence[str]) -> int:
    from remora.capture.trace_cmd import TraceOptions, run_trace

    args = list(argv)
    mode: Literal["trace", "explain", "matrix"] = "trace"
    if args and args[0] == "explain":
        mode = "explain"
        args.pop(0)
    elif args and args[0] == "matrix":
        mode = "matrix"
        args.pop(0)
    p = _Parser(prog="remora trace", description="Show where a connection goes through the "
                "capture rules of a network namespace, and why.")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--netns", help="a named network namespace (ip netns)")
    src.add_argument("--pid", type=int, help="the network namespace of this process")
    src.add_argument("--iptables-args", metavar="FLAGS",
                     help="the rules istio-iptables would write for these flags")
    src.add_argument("--save-file", metavar="FILE", help="iptables-save output")
    way = p.add_mutually_exclusive_group()
    way.add_argument("--outbound", dest="direction", action="store_const", const="outbound")
    way.add_argument("--inbound", dest="direction", action="store_const", const="inbound")
    p.add_argument("--dst", metavar="IP:PORT")
    p.add_argument("--src", metavar="IP[:PORT]")
    p.add_argument("--proto", choices=("tcp", "udp"), default="tcp")
    p.add_argument("--uid", type=int)
    p.add_argument("--gid", type=int)
    p.add_argument("--iface", metavar="NAME",
                   help="output (outbound) or input (inbound) interface")
    p.add_argument("--pod-ip", metavar="IP",
                   help="the namespace's own address (default: read from a live namespace, "
                   "else 10.0.0.2 / fd00::2)")
    p.add_argument("--dns-server", action="append", default=[], metavar="IP",
                   help="resolv.conf nameserver for --iptables-args with --redirect-dns")
    p.add_argument("--matrix", action="store_true", help="verdicts for the usual cases")
    p.add_argument("--explain", action="store_true", help="what each rule is for")
    p.add_argument("--json", action="store_true")
    p.add_argument("-v", "--verbose", action="store_true", help="show rules that did not match")
    ns = p.parse_args(args)
    if ns.matrix:
        mode = "matrix"
    if ns.explain:
        mode = "explain"
    opts = TraceOptions(netns=ns.netns, pid=ns.pid, iptables_args=ns.iptables_args,
                        save_file=ns.save_file, mode=mode, direction=ns.direction, dst=ns.dst,
                        src=ns.src, proto=ns.proto, uid=ns.uid, gid=ns.gid, iface=ns.iface,
                        pod_ip=ns.pod_ip, dns_servers=ns.dns_server, json=ns.json,
                        verbose=ns.verbose)
    try:
        return run_trace(opts, sys.stdout)
    except BadInput as exc:
        raise UsageError(str(exc)) from None


def cmd_demo(argv: Sequence[str]) -> int:
    from remora.demo import run_demo

    return run_demo()


def cmd_proxy(argv: Sequence[str]) -> int:
    from remora.proxy.app import ProxyOptions, run_proxy
    from remora.proxy.control import LEVELS, ROOT_LOGGER

    p = _Parser(prog="remora proxy", description="Run the sidecar proxy (Envoy's role) from "
                "an Envoy v3 bootstrap.")
    p.add_argument("-c", "--config-path", required=True, metavar="FILE",
                   help="Envoy v3 bootstrap, YAML or JSON")
    p.add_argument("--concurrency", type=int, default=1, metavar="N",
                   help="worker processes sharing the listeners (default 1)")
    p.add_argument("--uid", type=int, default=1337, help="user to run as after binding")
    p.add_argument("--gid", type=int, default=1337, help="group to run as after binding")
    p.add_argument("--drain-time-s", type=float, default=600.0, metavar="SECONDS",
                   help="how long open connections may finish on shutdown (Envoy: 600)")
    p.add_argument("-l", "--log-level", default="info", choices=sorted(LEVELS),
                   type=str.lower)
    p.add_argument("--tcp-offload", choices=("auto", "off"), default="off",
                   help="relay plain tcp_proxy connections in the kernel with a BPF sockmap "
                   "(auto: when it can be loaded; default off: less proxy CPU, but more "
                   "latency per request on a busy machine)")
    p.add_argument("--base-id", type=int, default=0, help="accepted and ignored (no hot "
                   "restart)")
    ns = p.parse_args(list(argv))
    if ns.concurrency < 1:
        raise UsageError("remora proxy: --concurrency must be at least 1")
    if ns.drain_time_s < 0:
        raise UsageError("remora proxy: --drain-time-s must not be negative")
    logging.getLogger(ROOT_LOGGER).setLevel(LEVELS[ns.log_level])
    opts = ProxyOptions(config_path=ns.config_path, concurrency=ns.concurrency, uid=ns.uid,
                        gid=ns.gid, drain_time_s=ns.drain_time_s, log_level=ns.log_level,
                        base_id=ns.base_id, tcp_offload=ns.tcp_offload)
    return run_proxy(opts)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0 if args else 2
    command, rest = args[0], args[1:]
    handler = {"iptables": cmd_iptables, "trace": cmd_trace, "demo": cmd_demo,
               "proxy": cmd_proxy}.get(command)
    if handler is None:
        print(f"Error: unknown command {command!r} for \"remora\"", file=sys.stderr)
        return 2
    _setup_logging(rest)
    # Die quietly when the reader of our output goes away (`remora trace … | head`).
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    try:
        return handler(rest)
    except RemoraError as exc:
        print(f"Error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
