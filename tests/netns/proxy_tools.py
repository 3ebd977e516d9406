"""Stdlib-only programs that `test_proxy_l4` runs inside network namespaces.

* ``serve --listen IP:PORT [--bytes N]``: accept one connection, send N bytes (forever without
  ``--bytes``), close. Prints ``ready`` once listening and ``accepted <peer>`` per connection.
* ``read --target IP:PORT [--slow-seconds S] [--progress-at N]``: connect, read until EOF or
  reset (slowly for the first S seconds: 16 KiB per 20 ms, the slow reader), print
  ``connected``, ``progress <n>`` once N bytes arrived, and a final JSON line
  ``{"bytes": n, "end": "eof"|"reset"|"timeout"}``.
* ``echo --listen IP:PORT``: accept one connection, echo until EOF, then send ``bye <n>`` (n:
  bytes echoed) and close; prints ``ready``, then ``{"bytes": n, "end": "eof"|"reset"}``.
* ``ping --target IP:PORT [--rounds N] [--reset] [--hold S]``: connect, N times send 100
  bytes and read them back (10 ms apart), then either reset (``--reset``), wait up to S seconds
  for the proxy to close an idle connection (``--hold``), or half-close and read the ``bye``;
  prints ``connected`` and a final JSON line with what it saw.

Every line is flushed at once; every socket has a timeout. Must not import anything outside
the standard library (they run as plain ``python -m`` in a namespace).
"""

from __future__ import annotations

import argparse
import json
import socket
import struct
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


def echo(listen: str, timeout: float) -> int:
    host, port = _endpoint(listen)
    lsock = socket.socket(socket.AF_INET)
    lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    lsock.bind((host, port))
    lsock.listen(8)
    lsock.settimeout(timeout)
    _say("ready")
    conn, _ = lsock.accept()
    conn.settimeout(timeout)
    n, end = 0, "eof"
    try:
        while data := conn.recv(65536):
            conn.sendall(data)
            n += len(data)
        conn.sendall(b"bye %d" % n)
    except ConnectionResetError:
        end = "reset"
    except OSError as exc:
        end = f"error {exc}"
    conn.close()
    lsock.close()
    _say(json.dumps({"bytes": n, "end": end}))
    return 0


def ping(target: str, rounds: int, reset: bool, hold: float, timeout: float) -> int:
    sock = socket.create_connection(_endpoint(target), timeout=timeout)
    _say("connected")
    out: dict[str, object] = {}
    try:
        for i in range(rounds):
            time.sleep(0.01)     # the pace of a request/response client, not synchronisation
            msg = b"%03d" % i + b"p" * 97
            sock.sendall(msg)
            got = b""
            while len(got) < len(msg):
                chunk = sock.recv(len(msg) - len(got))
                if not chunk:
                    raise EOFError("closed mid-echo")
                got += chunk
            if got != msg:
                raise ValueError(f"echo {got!r} != {msg!r}")
        out["rounds"] = rounds
        if reset:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            out["end"] = "reset sent"
        elif hold:
            t0 = time.monotonic()
            sock.settimeout(hold)
            data = sock.recv(100)
            out["end"] = "eof" if not data else f"data {data!r}"
            out["after"] = round(time.monotonic() - t0, 3)
        else:
            sock.shutdown(socket.SHUT_WR)
            rest = b""
            while chunk := sock.recv(100):
                rest += chunk
            out["end"] = rest.decode()
    except TimeoutError:
        out["end"] = "timeout"
    except (OSError, EOFError, ValueError) as exc:
        out["end"] = f"error {exc}"
    finally:
        sock.close()
    _say(json.dumps(out))
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
    e = sub.add_parser("echo")
    e.add_argument("--listen", required=True)
    e.add_argument("--timeout", type=float, default=30.0)
    g = sub.add_parser("ping")
    g.add_argument("--target", required=True)
    g.add_argument("--rounds", type=int, default=5)
    g.add_argument("--reset", action="store_true")
    g.add_argument("--hold", type=float, default=0.0)
    g.add_argument("--timeout", type=float, default=20.0)
    args = p.parse_args(argv)
    if args.cmd == "echo":
        return echo(args.listen, args.timeout)
    if args.cmd == "ping":
        return ping(args.target, args.rounds, args.reset, args.hold, args.timeout)
    if args.cmd == "serve":
        return serve(args.listen, args.bytes, args.timeout)
    return read(args.target, args.slow_seconds, args.progress_at, args.timeout)


if __name__ == "__main__":
    sys.exit(main())
