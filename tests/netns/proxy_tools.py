"""Stdlib-only programs that `test_proxy_l4` runs inside network namespaces.

* ``serve --listen IP:PORT [--bytes N]``: accept one connection, send N bytes (forever without
  ``--bytes``), close. Prints ``ready`` once listening and ``accepted <peer>`` per connection.
* ``read --target IP:PORT [--slow-seconds S] [--progress-at N]``: connect, read until EOF or
  reset (slowly for the first S seconds: 16 KiB per 20 ms, the slow reader), print
  ``connected``, ``progress <n>`` once N bytes arrived, and a final JSON line
  ``{"bytes": n, "end": "eof"|"reset"|"timeout"}``.

Every line is flushed at once; every socket has a timeout. Must not import anything outside
the standard library (they run as plain ``python -m`` in a namespace).
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
import time


def _endpoint(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host.strip("[]"), int(port)


def _say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def serve(listen: str, nbytes: int | None, timeout: float) -> int:
    host, port = _endpoint(listen)
    lsock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    lsock.bind((host, port))
    lsock.listen(8)
    lsock.settimeout(timeout)
    _say("ready")
    conn, peer = lsock.accept()
    _say(f"accepted {peer[0]}:{peer[1]}")
    conn.settimeout(timeout)
    chunk = b"z" * 65536
    sent = 0
    try:
        while nbytes is None or sent < nbytes:
            n = len(chunk) if nbytes is None else min(len(chunk), nbytes - sent)
            conn.sendall(chunk[:n])
            sent += n
    except OSError as exc:
        _say(f"send error {exc}")
    conn.close()
    lsock.close()
    _say(f"sent {sent}")
    return 0


def read(target: str, slow_seconds: float, progress_at: int | None, timeout: float) -> int:
    sock = socket.create_connection(_endpoint(target), timeout=timeout)
    _say("connected")
    got = 0
    end = "eof"
    slow_until = time.monotonic() + slow_seconds
    reported = False
    try:
        while True:
            slow = time.monotonic() < slow_until
            data = sock.recv(16384 if slow else 1 << 20)
            if not data:
                break
            got += len(data)
            if progress_at is not None and not reported and got >= progress_at:
                _say(f"progress {got}")
                reported = True
            if slow:
                time.sleep(0.02)   # this is the slow reader itself, not synchronisation
    except TimeoutError:
        end = "timeout"
    except ConnectionResetError:
        end = "reset"
    finally:
        sock.close()
    _say(json.dumps({"bytes": got, "end": end}))
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tests.netns.proxy_tools")
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve")
    s.add_argument("--listen", required=True)
    s.add_argument("--bytes", type=int)
    s.add_argument("--timeout", type=float, default=60.0)
    r = sub.add_parser("read")
    r.add_argument("--target", required=True)
    r.add_argument("--slow-seconds", type=float, default=0.0)
    r.add_argument("--progress-at", type=int)
    r.add_argument("--timeout", type=float, default=30.0)
    args = p.parse_args(argv)
    if args.cmd == "serve":
        return serve(args.listen, args.bytes, args.timeout)
    return read(args.target, args.slow_seconds, args.progress_at, args.timeout)


if __name__ == "__main__":
    sys.exit(main())
