"""Programs that `test_proxy_http` runs inside network namespaces.

* ``serve --listen IP:PORT [--listen …] --name NAME [--mode ok|reset|fail]``: a threaded
  HTTP/1.1 server. ``ok`` answers 200 with a JSON body naming the server and echoing the
  request (path, headers, peer, body size read in 1 MiB chunks); ``GET /bytes/N`` streams N
  bytes; ``reset`` aborts each connection (RST) as soon as a request
  head arrives; ``fail`` answers 503. ``GET /__hits`` answers the number of other requests
  seen (the test asks the server directly, not through a proxy); ``collector`` is a Zipkin
  collector that prints ``spans <body>`` for each POST. Prints ``ready``.
* ``grpc-serve --listen IP:PORT``: a gRPC server (grpcio, generic handlers, raw bytes):
  ``/remora.Echo/Unary`` echoes the request, ``/remora.Echo/Stream`` echoes each message of a
  bidirectional stream. Prints ``ready``.
* ``grpc-call --target IP:PORT --authority NAME [--messages N]``: one unary call and one
  streaming call with N messages; prints a JSON line with what came back.

Every socket has a timeout; every line is flushed at once.
"""

from __future__ import annotations

import argparse
import json
import socket
import struct
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def _endpoint(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host.strip("[]"), int(port)


def _say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, addr: tuple[str, int], name: str, mode: str) -> None:
        super().__init__(addr, _Handler)
        self.name = name
        self.mode = mode
        self.hits = 0
        self.lock = threading.Lock()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True   # headers and body are two writes
    server: _Server

    def log_message(self, format: str, *args: object) -> None:
        pass

    def _answer(self) -> None:
        length = int(self.headers.get("content-length") or 0)
        received = 0
        self._body = b""
        while received < length:     # in chunks: uploads may be GiBs
            chunk = self.rfile.read(min(1 << 20, length - received))
            if not chunk:
                break
            received += len(chunk)
            if self.server.mode == "collector":
                self._body += chunk
        if self.path.startswith("/bytes/"):
            self._stream(int(self.path.split("/")[2]))
            return
        if (self.headers.get("upgrade") or "").lower() == "websocket":
            self._echo_tunnel()
            return
        if self.path == "/__hits":
            data = str(self.server.hits).encode()
            self.send_response(200)
            self.send_header("content-length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
            return
        with self.server.lock:
            self.server.hits += 1
        if self.server.mode == "collector":
            _say("spans " + self._body.decode("utf-8", "replace"))
            self.send_response(202)
            self.send_header("content-length", "0")
            self.end_headers()
            return
        if self.server.mode == "reset":
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                       struct.pack("ii", 1, 0))
            self.connection.close()
            self.close_connection = True
            return
        status = 503 if self.server.mode == "fail" else 200
        data = json.dumps({
            "name": self.server.name, "method": self.command, "path": self.path,
            "headers": {k.lower(): v for k, v in self.headers.items()},
            "peer": self.client_address[0], "body_bytes": received,
        }).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def _echo_tunnel(self) -> None:
        """An upgrade to ``websocket`` (no framing: the tunnel's bytes are echoed back)."""
        self.send_response(101)
        self.send_header("connection", "upgrade")
        self.send_header("upgrade", "websocket")
        self.end_headers()
        self.wfile.flush()
        self.connection.settimeout(20)
        while True:
            data = self.connection.recv(65536)
            if not data:
                break
            self.connection.sendall(data)
        self.close_connection = True

    def _stream(self, n: int) -> None:
        """``GET /bytes/N``: N bytes of body, written 1 MiB at a time."""
        self.send_response(200)
        self.send_header("content-length", str(n))
        self.end_headers()
        chunk = b"x" * (1 << 20)
        left = n
        while left > 0:
            self.wfile.write(chunk[:min(left, len(chunk))])
            left -= min(left, len(chunk))

    do_GET = do_POST = do_PUT = do_HEAD = _answer


def serve(listens: list[str], name: str, mode: str) -> int:
    servers = [_Server(_endpoint(a), name, mode) for a in listens]
    for s in servers:
        threading.Thread(target=s.serve_forever, daemon=True).start()
    _say("ready")
    try:
        sys.stdin.read()     # until the test closes our stdin (or kills us)
    finally:
        for s in servers:
            s.shutdown()
    return 0


def _identity(b: bytes) -> bytes:
    return b


def grpc_serve(listen: str) -> int:
    from concurrent import futures

    import grpc

    def unary(request: bytes, context: object) -> bytes:
        return b"echo:" + request

    def stream(requests: object, context: object) -> object:
        for r in requests:   # type: ignore[attr-defined]
            yield b"echo:" + r

    handler = grpc.method_handlers_generic_handler("remora.Echo", {
        "Unary": grpc.unary_unary_rpc_method_handler(unary, _identity, _identity),
        "Stream": grpc.stream_stream_rpc_method_handler(stream, _identity, _identity),
    })
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    server.add_generic_rpc_handlers((handler,))
    server.add_insecure_port(listen)
    server.start()
    _say("ready")
    try:
        sys.stdin.read()
    finally:
        server.stop(0)
    return 0


def grpc_call(target: str, authority: str, messages: int) -> int:
    import grpc
    options = [("grpc.default_authority", authority)]
    out: dict[str, object] = {}
    with grpc.insecure_channel(target, options=options) as ch:
        unary = ch.unary_unary("/remora.Echo/Unary", request_serializer=_identity,
                               response_deserializer=_identity)
        try:
            out["unary"] = unary(b"hello", timeout=20).decode()
        except grpc.RpcError as exc:
            out["unary_error"] = f"{exc.code()}: {exc.details()}"
        stream = ch.stream_stream("/remora.Echo/Stream", request_serializer=_identity,
                                  response_deserializer=_identity)
        try:
            got = [r.decode() for r in stream(iter([f"m{i}".encode() for i in range(messages)]),
                                              timeout=20)]
            out["stream"] = got
        except grpc.RpcError as exc:
            out["stream_error"] = f"{exc.code()}: {exc.details()}"
    _say(json.dumps(out))
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tests.netns.http_tools")
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve")
    s.add_argument("--listen", action="append", required=True)
    s.add_argument("--name", required=True)
    s.add_argument("--mode", choices=("ok", "reset", "fail", "collector"), default="ok")
    g = sub.add_parser("grpc-serve")
    g.add_argument("--listen", required=True)
    c = sub.add_parser("grpc-call")
    c.add_argument("--target", required=True)
    c.add_argument("--authority", required=True)
    c.add_argument("--messages", type=int, default=5)
    args = p.parse_args(argv)
    if args.cmd == "serve":
        return serve(args.listen, args.name, args.mode)
    if args.cmd == "grpc-serve":
        return grpc_serve(args.listen)
    return grpc_call(args.target, args.authority, args.messages)


if __name__ == "__main__":
    sys.exit(main())
