"""`remora <command>`: parses the command line and environment, calls one function, maps
errors to exit codes. Nothing else.

Exit codes: 0 success; 1 bad input, environment or apply failure (as istio-iptables);
2 usage error of `remora` itself (unknown command); 126 iptables validation failed.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Sequence

from remora.errors import RemoraError

COMMANDS = {
    "iptables": "write the pod's capture rules (Istio: pilot-agent istio-iptables)",
    "demo": "run the capture demo in a throwaway network namespace",
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


def cmd_demo(argv: Sequence[str]) -> int:
    from remora.demo import run_demo

    return run_demo()


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0 if args else 2
    command, rest = args[0], args[1:]
    handler = {"iptables": cmd_iptables, "demo": cmd_demo}.get(command)
    if handler is None:
        print(f"Error: unknown command {command!r} for \"remora\"", file=sys.stderr)
        return 2
    _setup_logging(rest)
    try:
        return handler(rest)
    except RemoraError as exc:
        print(f"Error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
