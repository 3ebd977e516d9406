"""Envoy's gRPC statistics filter (``envoy.filters.http.grpc_stats``) for one request.

Owns: counting gRPC messages in a request's and a response's body (the length-prefixed
framing: a flag byte, a 4-byte big-endian length, the payload), the cluster stats Envoy's
filter keeps (``cluster.<name>.grpc[.<service>.<method>].{<grpc-status>,success,failure,
total,request_message_count,response_message_count}``), and the message counts it leaves
in the stream's filter state for Istio's stats filter (``istio_request_messages_total``,
``istio_response_messages_total``).
Must not: do IO, or decide when a stream starts or ends (the connection manager calls in).

References (behaviour matched, no code taken): Envoy ``source/extensions/filters/http/
grpc_stats/grpc_stats_filter.cc``, ``source/common/grpc/context_impl.cc`` (stat names),
``source/common/grpc/codec.cc`` (``FrameInspector``: a message counts when its first byte
passes), ``source/common/grpc/common.cc`` (``resolveServiceAndMethod``,
``isGrpcResponseHeaders``).
"""

from __future__ import annotations

from typing import Final

from remora.proxy.http.routes import GrpcStatsConfig
from remora.proxy.http.types import HeaderMap, ResponseHead
from remora.proxy.stats import Stats

_FLAG: Final = 0        # next byte is a message's flag byte
_PAYLOAD: Final = 5     # inside a message's payload (1-4: reading length byte 1-4)


class FrameCounter:
    """Counts gRPC messages across arbitrary chunk boundaries."""

    __slots__ = ("_left", "_length", "_state", "count")

    def __init__(self) -> None:
        self.count = 0
        self._state = _FLAG
        self._length = 0
        self._left = 0

    def inspect(self, data: bytes) -> int:
        """Feed one chunk; returns how many messages began in it."""
        began = 0
        i, n = 0, len(data)
        while i < n:
            state = self._state
            if state == _PAYLOAD:
                take = min(self._left, n - i)
                i += take
                self._left -= take
                if not self._left:
                    self._state = _FLAG
            elif state == _FLAG:
                began += 1
                self._length = 0
                self._state = 1
                i += 1
            else:
                self._length = (self._length << 8) | data[i]
                i += 1
                if state < 4:
                    self._state = state + 1
                elif self._length:
                    self._left = self._length
                    self._state = _PAYLOAD
                else:
                    self._state = _FLAG        # an empty message
        self.count += began
        return began


def service_and_method(path: str) -> tuple[str, str] | None:
    """``/pkg.Service/Method`` → (``pkg.Service``, ``Method``); anything that is not two
    non-empty segments (query and fragment ignored) → None."""
    for sep in "?#":
        path = path.split(sep, 1)[0]
    parts = [p for p in path.split("/") if p]
    return (parts[0], parts[1]) if len(parts) == 2 else None


def is_grpc_response(head: ResponseHead, end_stream: bool) -> bool:
    """A trailers-only response needs only ``grpc-status``; otherwise 200 and a gRPC
    content-type."""
    h = head.headers
    if end_stream:
        return "grpc-status" in h
    if head.status != 200:
        return False
    ct = h.get("content-type")
    return ct is not None and ct.startswith("application/grpc") and (
        len(ct) == 16 or ct[16] in "+;")


class GrpcStream:
    """The filter's state for one gRPC request (made only for requests with a gRPC
    content-type). Cluster stats are kept once :meth:`bind` names the route's cluster
    (Envoy: none for a request without one, such as a direct response)."""

    __slots__ = ("cfg", "grpc_response", "names", "prefix", "reported", "requests",
                 "responses", "stats")

    def __init__(self, cfg: GrpcStatsConfig, path: str) -> None:
        self.cfg = cfg
        self.names = service_and_method(path)
        self.requests = FrameCounter()
        self.responses = FrameCounter()
        self.grpc_response = False
        self.stats: Stats | None = None
        self.prefix = ""
        self.reported = (0, 0)      # message counts Istio's stats filter has reported

    def bind(self, stats: Stats, cluster_stat_name: str) -> None:
        """The request is routed to this cluster (its observability name): stats from now,
        with the messages that came before."""
        names = self.names
        if names is None or self.stats is not None:
            return
        cfg = self.cfg
        service, method = names
        if cfg.stats_for_all_methods:
            if cfg.replace_dots_in_grpc_service_name:
                service = service.replace(".", "_")
            middle = f"{service}.{method}."
        elif cfg.allowlist is not None and names in cfg.allowlist:
            middle = f"{service}.{method}."
        else:
            middle = ""
        self.prefix = f"cluster.{cluster_stat_name}.grpc.{middle}"
        self.stats = stats
        if self.requests.count:
            stats.inc(self.prefix + "request_message_count", self.requests.count)

    def request_data(self, data: bytes) -> None:
        began = self.requests.inspect(data)
        if began and self.stats is not None:
            self.stats.inc(self.prefix + "request_message_count", began)

    def response_headers(self, head: ResponseHead, end_stream: bool) -> None:
        self.grpc_response = is_grpc_response(head, end_stream)
        self._charge(head.headers.get("grpc-status"))

    def response_data(self, data: bytes) -> None:
        if not self.grpc_response:
            return
        began = self.responses.inspect(data)
        if began and self.stats is not None:
            self.stats.inc(self.prefix + "response_message_count", began)

    def response_trailers(self, trailers: HeaderMap) -> None:
        self._charge(trailers.get("grpc-status"))

    def _charge(self, status: str | None) -> None:
        st = self.stats
        if st is None or status is None:
            return
        p = self.prefix
        st.inc(p + status)
        st.inc(p + ("success" if status == "0" else "failure"))
        st.inc(p + "total")

    def message_deltas(self) -> tuple[int, int] | None:
        """Istio's stats filter: the message counts since its last report, or None while
        the filter state does not exist (``emit_filter_state`` off, or no message yet)."""
        req, resp = self.requests.count, self.responses.count
        if not self.cfg.emit_filter_state or not (req or resp):
            return None
        last_req, last_resp = self.reported
        self.reported = (req, resp)
        return req - last_req, resp - last_resp
