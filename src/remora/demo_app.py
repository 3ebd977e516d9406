"""A tiny HTTP app for the demo (`python -m remora.demo_app --listen IP:PORT --name NAME`).

Owns: answering every request with ``200`` and one JSON line naming the app, the peer address
the request came from, and the request headers a sidecar adds (so the demo can show what the
proxy did). Prints ``ready`` once it listens; exits by itself after ``--lifetime`` seconds so a
demo that dies cannot leave it behind.
Must not: be used for anything but the demo (no TLS, no body handling beyond draining it).
"""

from __future__ import annotations

import argparse
import json
import socketserver
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

#: Request headers the answer echoes (the ones Istio's sidecar sets or passes on).
SHOWN_HEADERS = ("host", "x-request-id", "x-forwarded-proto", "x-envoy-attempt-count",
                 "x-envoy-expected-rq-timeout-ms", "x-envoy-peer-metadata-id")


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    app_name = ""

    def server_bind(self) -> None:
        # HTTPServer's own looks its address up in DNS (socket.getfqdn), which in a pod
        # namespace with no resolver takes the resolver's whole timeout
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name, self.server_port = str(host), int(port)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format: str, *args: object) -> None:
        pass

    def _answer(self) -> None:
        length = int(self.headers.get("content-length") or 0)
        if length:
            self.rfile.read(length)
        body = json.dumps({
            "app": self.server.app_name,
            "peer": f"{self.client_address[0]}:{self.client_address[1]}",
            "headers": {k: v for k in SHOWN_HEADERS if (v := self.headers.get(k)) is not None},
        }).encode() + b"\n"
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = _answer


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m remora.demo_app")
    p.add_argument("--listen", required=True, help="IP:PORT")
    p.add_argument("--name", required=True)
    p.add_argument("--lifetime", type=float, default=120.0)
    args = p.parse_args(argv)
    host, _, port = args.listen.rpartition(":")
    server = _Server((host, int(port)), _Handler)
    server.app_name = args.name
    timer = threading.Timer(args.lifetime, server.shutdown)
    timer.daemon = True
    timer.start()
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    server.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
