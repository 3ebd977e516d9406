"""The admin API on 127.0.0.1:15000: a small HTTP/1.1 server and Envoy's admin endpoints.

Owns: the admin listening socket and its connections (asyncio streams), a bounded HTTP/1.1
request parser (sans-IO: bytes in, :class:`Request` or :class:`HttpError` out), the routing
of Envoy's admin paths (POST-only rules, 404 with the help text) and the calls into
:class:`~remora.proxy.state.ProxyControl`. Bodies come from :mod:`remora.proxy.admin_format`.
Must not: bind anything but the address it is given, format output itself, or let a peer's
bytes take the process down: a malformed request costs its connection (after a 4xx), never
the server.

References: Envoy ``docs/root/operations/admin.rst``, ``source/server/admin/admin.cc``
(routing, ``Method <M> not allowed, POST required.``, ``invalid path.``), the handlers named
in :mod:`remora.proxy.admin_format`; RFC 9112 for the message syntax.
"""

from __future__ import annotations

import asyncio
import email.utils
import http
import itertools
import logging
import re
import socket
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from urllib.parse import unquote

from remora.errors import EnvironmentFault
from remora.proxy import admin_format as fmt
from remora.proxy.model import Snapshot, SocketAddress
from remora.proxy.state import ProxyControl

log = logging.getLogger(__name__)

TEXT = "text/plain; charset=UTF-8"
JSON = "application/json"


@dataclass(frozen=True, slots=True, kw_only=True)
class Limits:
    """What one peer may cost. Envoy's HTTP defaults: 60 KiB of request headers, 100 headers."""

    max_head_bytes: int = 60 * 1024
    max_headers: int = 100
    max_body_bytes: int = 64 * 1024
    max_connections: int = 64
    idle_timeout: float = 60.0        # between requests on a kept-alive connection
    request_timeout: float = 10.0     # from a request's first byte to its last
    write_timeout: float = 30.0


# ------------------------------------------------------------------------------ HTTP/1.1


class HttpError(Exception):
    """The peer's request cannot be served; answered with ``status`` and the connection
    closed."""

    def __init__(self, status: int, detail: str = "") -> None:
        super().__init__(detail or http.HTTPStatus(status).phrase)
        self.status = status


@dataclass(frozen=True, slots=True, kw_only=True)
class Request:
    method: str
    target: str                        # origin-form: path[?query]
    version: str                       # "HTTP/1.0" | "HTTP/1.1"
    headers: tuple[tuple[str, str], ...] = ()
    content_length: int = 0
    chunked: bool = False
    keep_alive: bool = True

    @property
    def path(self) -> str:
        return self.target.split("?", 1)[0]

    @property
    def query(self) -> str:
        return self.target.split("?", 1)[1] if "?" in self.target else ""


_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_VERSION = re.compile(rb"HTTP/1\.[01]")
_TARGET_BAD = re.compile(rb"[\x00-\x20\x7f-\xff]")
_VALUE_BAD = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
_ABSOLUTE = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*://[^/?#]*")


def find_head_end(buf: bytes | bytearray) -> tuple[int, int] | None:
    """(end of the head, start of what follows) or None. Bare LF line ends are accepted."""
    crlf = buf.find(b"\r\n\r\n")
    lf = buf.find(b"\n\n")
    if crlf < 0 and lf < 0:
        return None
    if lf < 0 or (0 <= crlf < lf):
        return crlf, crlf + 4
    return lf, lf + 2


def parse_head(head: bytes, limits: Limits = Limits()) -> Request:
    """A request line and header fields (without the empty line). Raises :class:`HttpError`."""
    if len(head) > limits.max_head_bytes:
        raise HttpError(431)
    lines = [ln[:-1] if ln.endswith(b"\r") else ln for ln in head.split(b"\n")]
    parts = lines[0].split(b" ")
    if len(parts) != 3 or not _TOKEN.fullmatch(parts[0]) or not parts[1] \
            or _TARGET_BAD.search(parts[1]):
        raise HttpError(400, "bad request line")
    if not _VERSION.fullmatch(parts[2]):
        raise HttpError(505 if parts[2].startswith(b"HTTP/") else 400, "bad HTTP version")
    method, raw_target, version = (p.decode("ascii") for p in parts)
    if len(lines) - 1 > limits.max_headers:
        raise HttpError(431, "too many headers")
    headers: list[tuple[str, str]] = []
    for line in lines[1:]:
        name, sep, value = line.partition(b":")
        if not sep or not _TOKEN.fullmatch(name):
            raise HttpError(400, "bad header field")
        value = value.strip(b" \t")
        if _VALUE_BAD.search(value):
            raise HttpError(400, "bad header value")
        headers.append((name.decode("ascii").lower(), value.decode("latin-1")))
    lengths = {v for k, v in headers if k == "content-length"}
    codings = [c.strip().lower() for k, v in headers if k == "transfer-encoding"
               for c in v.split(",") if c.strip()]
    content_length = 0
    if codings:
        if lengths:
            raise HttpError(400, "both Content-Length and Transfer-Encoding")
        if codings[-1] != "chunked" or codings.count("chunked") != 1:
            raise HttpError(501, "unsupported transfer coding")
    elif lengths:
        if len(lengths) != 1 or not re.fullmatch(r"[0-9]+", next(iter(lengths))):
            raise HttpError(400, "bad Content-Length")
        content_length = int(next(iter(lengths)))
    connection = {t.strip().lower() for k, v in headers if k == "connection"
                  for t in v.split(",")}
    keep_alive = ("close" not in connection) if version == "HTTP/1.1" \
        else ("keep-alive" in connection)
    target = raw_target
    if not target.startswith("/"):
        m = _ABSOLUTE.match(target)
        if m is None:
            raise HttpError(400, "bad request target")
        target = target[m.end():] or "/"
        if not target.startswith("/"):
            target = "/" + target
    target = target.split("#", 1)[0]
    return Request(method=method, target=target, version=version, headers=tuple(headers),
                   content_length=content_length, chunked=bool(codings), keep_alive=keep_alive)


def parse_query(query: str, *, decode: bool = True) -> dict[str, str]:
    """Envoy's query parsing: ``&``-separated, ``key[=value]``, the first of a repeated key
    wins; ``%XX`` is decoded unless ``decode`` is false (``/logging`` does not decode)."""
    params: dict[str, str] = {}
    for item in query.split("&"):
        if not item:
            continue
        key, _, value = item.partition("=")
        if decode:
            key, value = unquote(key), unquote(value)
        params.setdefault(key, value)
    return params


def _nonempty(params: Mapping[str, str], key: str) -> str | None:
    """Envoy's ``Utility::queryParam``: a present but empty value counts as absent."""
    value = params.get(key)
    return value if value else None


@dataclass(slots=True)
class Response:
    status: int
    body: str = ""
    content_type: str = TEXT
    after: Callable[[], None] | None = None     # run once the response is written

    def encode(self, *, version: str = "HTTP/1.1", head_only: bool = False,
               close: bool = False, date: str | None = None) -> bytes:
        body = self.body.encode("utf-8")
        lines = [
            f"{version} {self.status} {http.HTTPStatus(self.status).phrase}",
            f"content-type: {self.content_type}",
            "cache-control: no-cache, max-age=0",
            "x-content-type-options: nosniff",
            f"date: {date or email.utils.formatdate(usegmt=True)}",
            f"content-length: {len(body)}",
        ]
        if close:
            lines.append("connection: close")
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        return head if head_only else head + body


# ------------------------------------------------------------------------------ routing

Handler = Callable[["AdminApi", Request, dict[str, str]], Response]
_POST_ONLY = frozenset(ep.path for ep in fmt.ENDPOINTS if ep.post)


class AdminApi:
    """Envoy's admin paths over a :class:`ProxyControl`. No sockets: ``handle`` takes a
    parsed request and returns the response (tests drive it directly)."""

    def __init__(self, control: ProxyControl, *, clock: Callable[[], float] = time.time,
                 version: str = fmt.VERSION) -> None:
        self.control = control
        self.clock = clock
        self.version = version
        self._loaded: tuple[Snapshot | None, float] = (None, 0.0)

    def loaded_at(self, snapshot: Snapshot) -> float:
        """When a snapshot was first seen here: ``last_updated`` in ``/config_dump``."""
        if self._loaded[0] is not snapshot:
            self._loaded = (snapshot, self.clock())
        return self._loaded[1]

    def handle(self, request: Request) -> Response:
        path = request.path
        handler = _ROUTES.get(path)
        if handler is None:
            return Response(404, "invalid path. " + fmt.render_help())
        if path in _POST_ONLY and request.method != "POST":
            log.error('admin path "%s" mutates state, method=%s rather than POST', path,
                      request.method)
            return Response(405, f"Method {request.method} not allowed, POST required.")
        decode = path != "/logging"
        try:
            return handler(self, request, parse_query(request.query, decode=decode))
        except fmt.AdminError as exc:
            return Response(exc.status, exc.body)

    # -- read-only

    def clusters(self, _: Request, params: dict[str, str]) -> Response:
        snap, statuses = self.control.snapshot, self.control.cluster_status()
        if _nonempty(params, "format") == "json":
            return Response(200, fmt.render_clusters_json(snap, statuses), JSON)
        return Response(200, fmt.render_clusters(snap, statuses))

    def listeners(self, _: Request, params: dict[str, str]) -> Response:
        snap = self.control.snapshot
        if _nonempty(params, "format") == "json":
            return Response(200, fmt.render_listeners_json(snap), JSON)
        return Response(200, fmt.render_listeners(snap))

    def config_dump(self, _: Request, params: dict[str, str]) -> Response:
        if _nonempty(params, "mask") is not None:
            raise fmt.AdminError(400, "remora: the mask parameter is not implemented\n")
        name_match: fmt.NameMatch = fmt.all_names
        name_regex = _nonempty(params, "name_regex")
        if name_regex is not None:
            try:
                compiled = re.compile(name_regex)
            except re.error as exc:
                raise fmt.AdminError(400, "INVALID_ARGUMENT: Error while parsing name_regex "
                                          f"from {name_regex}: {exc}") from None

            def name_match(name: str) -> bool:
                return compiled.fullmatch(name) is not None
        snap = self.control.snapshot
        include_eds = "include_eds" in params
        configs = fmt.config_dump(
            snap, last_updated=self.loaded_at(snap), include_eds=include_eds,
            statuses=self.control.cluster_status() if include_eds else (),
            name_match=name_match)
        resource = _nonempty(params, "resource")
        if resource is not None:
            configs = fmt.select_resource(configs, resource)
        return Response(200, fmt.render_config_dump(configs), JSON)

    def _stats_params(self, params: dict[str, str]) -> tuple[bool, re.Pattern[str] | None,
                                                             fmt.StatsType, str]:
        """Envoy's ``StatsParams::parse`` (same checks, same messages)."""
        pattern = None
        if "filter" in params:
            try:
                pattern = re.compile(params["filter"])
            except re.error:
                raise fmt.AdminError(400, "Invalid re2 regex") from None
        buckets = _nonempty(params, "histogram_buckets")
        if buckets is not None and buckets not in ("cumulative", "disjoint", "detailed", "none"):
            raise fmt.AdminError(
                400, "usage: /stats?histogram_buckets=(cumulative|disjoint|none)\n")
        stats_type = next((t for t in fmt.STATS_TYPES if t == params.get("type", "All")), None)
        if stats_type is None:
            raise fmt.AdminError(400, "invalid &type= param")
        out_format = _nonempty(params, "format") or "text"
        if out_format in ("html", "active-html"):
            raise fmt.AdminError(400, "HTML output was disabled by building with "
                                      "--define=admin_html=disabled")
        if out_format not in ("text", "json", "prometheus"):
            raise fmt.AdminError(400, "usage: /stats?format=(html|active-html|json|prometheus|"
                                      "text)\n\n")
        return "usedonly" in params, pattern, stats_type, out_format

    def stats(self, _: Request, params: dict[str, str]) -> Response:
        used_only, pattern, stats_type, out_format = self._stats_params(params)
        snap = self.control.stats()
        if out_format == "prometheus":
            return Response(200, fmt.render_prometheus(snap, used_only=used_only,
                                                       pattern=pattern))
        if out_format == "json":
            return Response(200, fmt.render_stats_json(snap, used_only=used_only,
                                                       pattern=pattern, type=stats_type), JSON)
        return Response(200, fmt.render_stats(snap, used_only=used_only, pattern=pattern,
                                              type=stats_type))

    def prometheus(self, _: Request, params: dict[str, str]) -> Response:
        used_only, pattern, _type, _format = self._stats_params(params)
        return Response(200, fmt.render_prometheus(self.control.stats(), used_only=used_only,
                                                   pattern=pattern))

    def ready(self, _: Request, __: dict[str, str]) -> Response:
        state = self.control.state()
        return Response(200 if state == "LIVE" else 503, state + "\n")

    def server_info(self, _: Request, __: dict[str, str]) -> Response:
        info = fmt.server_info_json(state=self.control.state(), uptime=self.control.uptime(),
                                    command_line=self.control.command_line(),
                                    snapshot=self.control.snapshot, version=self.version)
        return Response(200, fmt.proto_json(info), JSON)

    def help(self, _: Request, __: dict[str, str]) -> Response:
        return Response(200, fmt.render_help())

    def memory(self, _: Request, __: dict[str, str]) -> Response:
        return Response(200, fmt.proto_json(fmt.memory_json(self.control.memory())), JSON)

    # -- mutating (POST only)

    def quit(self, _: Request, __: dict[str, str]) -> Response:
        return Response(200, "OK\n", after=self.control.quit)

    def healthcheck_fail(self, _: Request, __: dict[str, str]) -> Response:
        self.control.healthcheck(True)
        return Response(200, "OK\n")

    def healthcheck_ok(self, _: Request, __: dict[str, str]) -> Response:
        self.control.healthcheck(False)
        return Response(200, "OK\n")

    def drain_listeners(self, _: Request, params: dict[str, str]) -> Response:
        self.control.drain_listeners(inbound_only="inboundonly" in params,
                                     graceful="graceful" in params,
                                     skip_exit="skip_exit" in params)
        return Response(200, "OK\n")

    def reset_counters(self, _: Request, __: dict[str, str]) -> Response:
        self.control.reset_counters()
        return Response(200, "OK\n")

    def reopen_logs(self, _: Request, __: dict[str, str]) -> Response:
        self.control.reopen_logs()
        return Response(200, "OK\n")

    def logging(self, _: Request, params: dict[str, str]) -> Response:
        """``LogsHandler::handlerLogging``: change levels if asked (all or nothing), then list
        the loggers; bad input is a 400 with the usage text before the list."""
        prefix, status = "", 200
        if params:
            error = self._change_log_levels(params)
            if error is not None:
                prefix, status = fmt.logging_usage(error), 400
        return Response(status, prefix + fmt.render_loggers(self.control.loggers()))

    def _change_log_levels(self, params: dict[str, str]) -> str | None:
        if len(params) != 1:
            return "invalid number of parameters"
        key, value = next(iter(params.items()))
        if key == "level":
            if value not in fmt.LOG_LEVELS:
                return "unknown logger level"
            self.control.set_log_level(None, value)
            return None
        changes: dict[str, str] = {}
        if key == "paths":
            for pair in value.split(","):
                if not pair.strip():
                    continue
                pieces = [p for p in pair.split(":", 1) if p.strip()]
                name, level = [*pieces, "", ""][:2]
                if not name or not level:
                    return "empty logger name or empty logger level"
                if level not in fmt.LOG_LEVELS:
                    return "unknown logger level"
                changes[name] = level
        else:
            if value not in fmt.LOG_LEVELS:
                return "unknown logger level"
            changes[key] = value
        known = self.control.loggers()
        if any(name not in known for name in changes):
            return "unknown logger name"
        try:
            for name, level in changes.items():
                self.control.set_log_level(name, level)
        except KeyError:
            return "unknown logger name"
        except ValueError:
            return "unknown logger level"
        return None


_ROUTES: dict[str, Handler] = {
    "/clusters": AdminApi.clusters,
    "/config_dump": AdminApi.config_dump,
    "/drain_listeners": AdminApi.drain_listeners,
    "/healthcheck/fail": AdminApi.healthcheck_fail,
    "/healthcheck/ok": AdminApi.healthcheck_ok,
    "/help": AdminApi.help,
    "/listeners": AdminApi.listeners,
    "/logging": AdminApi.logging,
    "/memory": AdminApi.memory,
    "/quitquitquit": AdminApi.quit,
    "/ready": AdminApi.ready,
    "/reopen_logs": AdminApi.reopen_logs,
    "/reset_counters": AdminApi.reset_counters,
    "/server_info": AdminApi.server_info,
    "/stats": AdminApi.stats,
    "/stats/prometheus": AdminApi.prometheus,
}
assert set(_ROUTES) == {ep.path for ep in fmt.ENDPOINTS}


# ------------------------------------------------------------------------------ the server


class _PeerGone(Exception):
    """The peer closed (or went quiet) between requests: close without a response."""


@dataclass(slots=True)
class _Conn:
    id: int
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    buf: bytearray = field(default_factory=bytearray)


class AdminServer(asyncio.AbstractServer):
    """The listening admin socket and its connections; ``close()`` also closes the open
    connections (kept-alive ones would otherwise outlive the listener)."""

    def __init__(self, api: AdminApi, limits: Limits) -> None:
        self.api = api
        self.limits = limits
        self._server: asyncio.Server | None = None
        self._conns: dict[int, _Conn] = {}
        self._ids = itertools.count(1)

    async def _start(self, address: SocketAddress) -> None:
        try:
            self._server = await asyncio.start_server(
                self._on_connection, host=address.address, port=address.port,
                reuse_address=True, limit=self.limits.max_head_bytes + 1024)
        except OSError as exc:
            raise EnvironmentFault(f"cannot listen on admin address {address}: "
                                   f"{exc.strerror or exc}") from exc

    @property
    def server(self) -> asyncio.Server:
        assert self._server is not None
        return self._server

    @property
    def sockets(self) -> tuple[socket.socket, ...]:
        return tuple(self.server.sockets)

    def bound_address(self) -> SocketAddress:
        host, port = self.sockets[0].getsockname()[:2]
        return SocketAddress(address=host, port=port)

    def close(self) -> None:
        self.server.close()
        for conn in list(self._conns.values()):
            conn.writer.close()

    def get_loop(self) -> asyncio.AbstractEventLoop:
        return self.server.get_loop()

    def is_serving(self) -> bool:
        return self.server.is_serving()

    async def start_serving(self) -> None:
        await self.server.start_serving()

    async def serve_forever(self) -> None:
        await self.server.serve_forever()

    async def wait_closed(self) -> None:
        await self.server.wait_closed()

    # -- one connection

    async def _on_connection(self, reader: asyncio.StreamReader,
                             writer: asyncio.StreamWriter) -> None:
        conn = _Conn(id=next(self._ids), reader=reader, writer=writer)
        if len(self._conns) >= self.limits.max_connections:
            log.warning("[C%d] admin: too many connections, closing", conn.id)
            writer.write(Response(503, "Service Unavailable").encode(close=True))
            await self._close(conn)
            return
        self._conns[conn.id] = conn
        try:
            await self._serve(conn)
        except (_PeerGone, ConnectionError, TimeoutError, asyncio.IncompleteReadError):
            pass
        except Exception:  # a bug here must cost one connection, not the admin server
            log.exception("[C%d] admin: connection failed", conn.id)
        finally:
            self._conns.pop(conn.id, None)
            await self._close(conn)

    async def _close(self, conn: _Conn) -> None:
        conn.writer.close()
        try:
            async with asyncio.timeout(self.limits.write_timeout):
                await conn.writer.wait_closed()
        except (ConnectionError, TimeoutError):
            pass

    async def _serve(self, conn: _Conn) -> None:
        while self.is_serving():
            try:
                request = await self._read_request(conn)
            except HttpError as exc:
                log.debug("[C%d] admin: bad request: %s", conn.id, exc)
                body = http.HTTPStatus(exc.status).phrase
                await self._send(conn, Response(exc.status, body).encode(close=True))
                return
            try:
                response = self.api.handle(request)
            except Exception:
                log.exception("[C%d] admin: %s %s failed", conn.id, request.method,
                              request.path)
                response = Response(500, "Internal Server Error\n")
                request = Request(method=request.method, target=request.target,
                                  version=request.version, keep_alive=False)
            close = not request.keep_alive or not self.is_serving()
            await self._send(conn, response.encode(version=request.version,
                                                   head_only=request.method == "HEAD",
                                                   close=close))
            if response.after is not None:
                try:
                    response.after()
                except Exception:
                    log.exception("[C%d] admin: %s failed after responding", conn.id,
                                  request.path)
            if close:
                return

    async def _send(self, conn: _Conn, data: bytes) -> None:
        conn.writer.write(data)
        async with asyncio.timeout(self.limits.write_timeout):
            await conn.writer.drain()

    async def _read_more(self, conn: _Conn, timeout: float) -> bytes:
        async with asyncio.timeout(timeout):
            return await conn.reader.read(65536)

    async def _read_request(self, conn: _Conn) -> Request:
        lim = self.limits
        deadline: float | None = None
        loop = asyncio.get_running_loop()
        while True:
            while conn.buf[:2] == b"\r\n" or conn.buf[:1] == b"\n":   # RFC 9112 §2.2
                del conn.buf[:2 if conn.buf[:1] == b"\r" else 1]
            found = find_head_end(conn.buf)
            if found is not None:
                head_end, rest = found
                if head_end > lim.max_head_bytes:
                    raise HttpError(431)
                head = bytes(conn.buf[:head_end])
                del conn.buf[:rest]
                request = parse_head(head, lim)
                break
            if len(conn.buf) > lim.max_head_bytes:
                raise HttpError(431)
            if conn.buf and deadline is None:
                deadline = loop.time() + lim.request_timeout
            try:
                chunk = await self._read_more(
                    conn, lim.idle_timeout if deadline is None else deadline - loop.time())
            except TimeoutError:
                if deadline is None:
                    raise _PeerGone from None
                raise HttpError(408) from None
            if not chunk:
                raise _PeerGone
            conn.buf += chunk
        deadline = deadline or loop.time() + lim.request_timeout
        if request.chunked:
            await self._discard_chunked(conn, deadline)
        elif request.content_length:
            if request.content_length > lim.max_body_bytes:
                raise HttpError(413)
            await self._read_exactly(conn, request.content_length, deadline)
            del conn.buf[:request.content_length]
        return request

    async def _read_exactly(self, conn: _Conn, n: int, deadline: float) -> None:
        loop = asyncio.get_running_loop()
        while len(conn.buf) < n:
            try:
                chunk = await self._read_more(conn, deadline - loop.time())
            except TimeoutError:
                raise HttpError(408) from None
            if not chunk:
                raise _PeerGone
            conn.buf += chunk

    async def _read_line(self, conn: _Conn, deadline: float) -> bytes:
        loop = asyncio.get_running_loop()
        while (i := conn.buf.find(b"\n")) < 0:
            if len(conn.buf) > 4096:
                raise HttpError(400, "chunk line too long")
            try:
                chunk = await self._read_more(conn, deadline - loop.time())
            except TimeoutError:
                raise HttpError(408) from None
            if not chunk:
                raise _PeerGone
            conn.buf += chunk
        line = bytes(conn.buf[:i]).rstrip(b"\r")
        del conn.buf[:i + 1]
        return line

    async def _discard_chunked(self, conn: _Conn, deadline: float) -> None:
        """Read a chunked body (RFC 9112 §7.1) and drop it; admin requests carry no body
        that matters, but it must be consumed to find the next request."""
        total = 0
        while True:
            size_text = (await self._read_line(conn, deadline)).split(b";", 1)[0].strip()
            if not size_text or not re.fullmatch(rb"[0-9A-Fa-f]{1,8}", size_text):
                raise HttpError(400, "bad chunk size")
            size = int(size_text, 16)
            total += size
            if total > self.limits.max_body_bytes:
                raise HttpError(413)
            if size == 0:
                while await self._read_line(conn, deadline):   # trailer fields
                    pass
                return
            await self._read_exactly(conn, size, deadline)
            del conn.buf[:size]
            if await self._read_line(conn, deadline):
                raise HttpError(400, "bad chunk end")


async def start_admin(control: ProxyControl, address: SocketAddress, *,
                      limits: Limits = Limits(),
                      clock: Callable[[], float] = time.time) -> AdminServer:
    """Listen on ``address`` (Istio: 127.0.0.1:15000; port 0 picks a free port) and serve
    Envoy's admin API over ``control`` until the returned server is closed."""
    server = AdminServer(AdminApi(control, clock=clock), limits)
    await server._start(address)
    log.info("admin address: %s", fmt.address_text(server.bound_address()))
    return server
