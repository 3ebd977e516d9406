"""The floor of an HTTP/1.1 proxy in Python: what bench/floor_http.py measures Remora against.

The least a keep-alive reverse proxy can do per request on the stack Remora's hot path uses
(uvloop, httptools, compiled with mypyc like remora.native's modules), so that the cost of the
language and its event loop can be told apart from the cost of Remora's features:

- each downstream connection gets one upstream keep-alive connection of its own (no pool, no
  load balancing, no routing);
- the request is parsed (llhttp through httptools), its head rebuilt with a generated
  ``x-request-id`` and ``x-forwarded-proto``, ``connection`` dropped, and written upstream;
- the response is parsed the same way, its head rebuilt with
  ``x-envoy-upstream-service-time``, and written downstream with its body;
- one access-log line per request (fields like Istio's default format's), buffered and
  written to a file once a second, as nginx's ``buffer=64k flush=1s`` does.

There are no stats, filters, timeouts, retries, header validation beyond llhttp's, or flow
control: a request body is forwarded as it arrives, and a response is forwarded whole. Not a
proxy to use; a measuring stick.

    python http_floor_proxy.py LISTEN_PORT UPSTREAM_PORT ACCESS_LOG   (127.0.0.1 both)
"""

from __future__ import annotations

import asyncio
import random
import sys
import time
from typing import Any

import httptools

_LOG: list[str] = []
_RNG = random.Random()


def _request_id() -> str:
    h = _RNG.getrandbits(128).to_bytes(16, "big").hex()
    return f"{h[:8]}-{h[8:12]}-4{h[13:16]}-a{h[17:20]}-{h[20:]}"


class Upstream(asyncio.Protocol):
    def __init__(self, down: Downstream) -> None:
        self.down = down
        self.transport: Any = None
        self.parser = httptools.HttpResponseParser(self)
        self.head: list[str] = []
        self.body: list[bytes] = []
        self.pending: list[bytes] = []

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        for data in self.pending:
            transport.write(data)
        self.pending = []

    def connection_lost(self, exc: Exception | None) -> None:
        self.down.close()

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self.transport.close()

    def send(self, data: bytes) -> None:
        if self.transport is None:
            self.pending.append(data)
        else:
            self.transport.write(data)

    def on_message_begin(self) -> None:
        self.head = []
        self.body = []

    def on_header(self, name: bytes, value: bytes) -> None:
        k = name.decode("latin-1").lower()
        if k != "connection":
            self.head.append(f"{k}: {value.decode('latin-1')}\r\n")

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        code = self.parser.get_status_code()
        took = int((time.monotonic() - self.down.start) * 1000)
        head = (f"HTTP/1.1 {code} OK\r\n" + "".join(self.head)
                + f"x-envoy-upstream-service-time: {took}\r\n\r\n").encode("latin-1")
        body = b"".join(self.body)
        self.down.respond(head + body, code, len(body), took)


class Downstream(asyncio.Protocol):
    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.transport: Any = None
        self.parser = httptools.HttpRequestParser(self)
        self.up: Upstream | None = None
        self.url = ""
        self.head: list[str] = []
        self.host = "-"
        self.agent = "-"
        self.rid = ""
        self.start = 0.0
        self.peer = "-"
        self.connecting: asyncio.Task[Any] | None = None

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        host, port = transport.get_extra_info("peername")[:2]
        self.peer = f"{host}:{port}"
        up = Upstream(self)
        self.up = up
        loop = asyncio.get_running_loop()
        self.connecting = loop.create_task(
            loop.create_connection(lambda: up, "127.0.0.1", self.upstream_port))
        self.connecting.add_done_callback(self._connected)

    def _connected(self, task: asyncio.Task[Any]) -> None:
        if task.cancelled() or task.exception() is not None:
            self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.up is not None and self.up.transport is not None:
            self.up.transport.close()

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self.transport.write(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n"
                                 b"connection: close\r\n\r\n")
            self.transport.close()

    def on_message_begin(self) -> None:
        self.start = time.monotonic()
        self.head = []
        self.host = self.agent = "-"

    def on_url(self, url: bytes) -> None:
        self.url = url.decode("latin-1")

    def on_header(self, name: bytes, value: bytes) -> None:
        k = name.decode("latin-1").lower()
        v = value.decode("latin-1")
        if k == "host":
            self.host = v
        elif k == "user-agent":
            self.agent = v
        elif k in ("connection", "x-request-id", "x-forwarded-proto"):
            return
        self.head.append(f"{k}: {v}\r\n")

    def on_headers_complete(self) -> None:
        self.rid = _request_id()
        method = self.parser.get_method().decode("latin-1")
        data = (f"{method} {self.url} HTTP/1.1\r\n" + "".join(self.head)
                + f"x-request-id: {self.rid}\r\nx-forwarded-proto: http\r\n\r\n")
        assert self.up is not None
        self.up.send(data.encode("latin-1"))

    def on_body(self, body: bytes) -> None:
        assert self.up is not None
        self.up.send(body)

    def respond(self, data: bytes, code: int, size: int, took: int) -> None:
        self.transport.write(data)
        method = self.parser.get_method().decode("latin-1")
        _LOG.append(f'[{time.strftime("%Y-%m-%dT%H:%M:%S")}] "{method} {self.url} HTTP/1.1" '
                    f'{code} - via_upstream - "-" 0 {size} {took} {took} "-" "{self.agent}" '
                    f'"{self.rid}" "{self.host}" "127.0.0.1:{self.upstream_port}" '
                    f'outbound|8080||upstream - - {self.peer} - default\n')


async def flush_log(path: str) -> None:
    with open(path, "a") as f:
        while True:
            await asyncio.sleep(1)
            if _LOG:
                f.write("".join(_LOG))
                _LOG.clear()
                f.flush()


async def serve(listen: int, upstream: int, log: str) -> None:
    loop = asyncio.get_running_loop()
    await loop.create_server(lambda: Downstream(upstream), "127.0.0.1", listen, backlog=4096)
    print("ready", flush=True)
    await flush_log(log)


def main(argv: list[str]) -> None:
    import gc

    import uvloop

    gc.set_threshold(10_000)        # as remora proxy sets it
    uvloop.install()
    asyncio.run(serve(int(argv[0]), int(argv[1]), argv[2]))


if __name__ == "__main__":
    main(sys.argv[1:])
