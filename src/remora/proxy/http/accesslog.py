"""Envoy access logs: substitution format strings, the file and stdout/stderr loggers, filters.

Owns: parsing Envoy's command-operator format strings (``%REQ(:METHOD)%``, ``%DURATION%`` …)
once into a compiled :class:`Formatter` (text or JSON), compiling ``envoy.config.accesslog.v3.
AccessLog`` protos into frozen :class:`AccessLogConfig` values (unknown or unimplemented fields
are refused with :class:`~remora.errors.BadInput` naming their path), the simple access log
filters, and :class:`AccessLogWriter`, the buffered per-worker sink Envoy's
``AccessLogFileImpl`` is (flushed every second and when 64 KiB are buffered).
Must not: know about sockets, routes or the connection manager; it renders a finished
:class:`~remora.proxy.http.types.StreamInfo` and appends bytes to a file descriptor.

References (behaviour matched, no code taken): Envoy ``docs/root/configuration/observability/
access_log/usage.rst`` (command operators, default format, JSON typing), ``source/common/
formatter/{substitution_formatter,stream_info_formatter}.cc``, ``source/common/stream_info/
utility.cc`` (``ResponseFlagUtils``), ``source/common/access_log/access_log_manager_impl.cc``
(flush policy), ``source/common/access_log/access_log_impl.cc`` (filters); Istio
``pilot/pkg/networking/core/envoyfilter/../accesslog.go`` (``EnvoyTextLogFormat``,
``EnvoyJSONLogFormatIstio``); spec ``dataplane-envoy-pilot-agent.md`` §10.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import re
import socket
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal

from envoy.config.accesslog.v3 import accesslog_pb2

# Importing the typed_config messages registers them for Any resolution.
from envoy.extensions.access_loggers.file.v3 import file_pb2
from envoy.extensions.access_loggers.stream.v3 import stream_pb2
from envoy.extensions.formatter.req_without_query.v3 import req_without_query_pb2
from google.protobuf import json_format as pb_json
from google.protobuf.message import Message

from remora.errors import BadInput
from remora.proxy.http.routes import FractionalPercent, HeaderMatcher, is_grpc_request
from remora.proxy.http.types import HeaderMap, StreamInfo
from remora.proxy.protocheck import ANY_FIELDS, check_fields
from remora.proxy.protocheck import unpack as _unpack

# ----------------------------------------------------------------------------- constants

#: ``ResponseFlagUtils`` order: several flags print joined with "," in this order.
RESPONSE_FLAG_ORDER: tuple[str, ...] = (
    "LH", "UH", "UT", "LR", "UR", "UF", "UC", "UO", "NR", "DI", "FI", "RL", "UAEX", "RLSE",
    "DC", "URX", "SI", "IH", "DPE", "UMSDR", "RFCF", "NFCF", "DT", "UPE", "NC", "OM", "DF", "DO",
    "DR", "UDO")

#: ``%RESPONSE_FLAGS_LONG%`` names (Envoy ``stream_info/utility.h``, the ``*_LONG`` strings).
RESPONSE_FLAGS_LONG: dict[str, str] = {
    "LH": "FailedLocalHealthCheck", "UH": "NoHealthyUpstream", "UT": "UpstreamRequestTimeout",
    "LR": "LocalReset", "UR": "UpstreamRemoteReset", "UF": "UpstreamConnectionFailure",
    "UC": "UpstreamConnectionTermination", "UO": "UpstreamOverflow", "NR": "NoRouteFound",
    "DI": "DelayInjected", "FI": "FaultInjected", "RL": "RateLimited",
    "UAEX": "UnauthorizedExternalService", "RLSE": "RateLimitServiceError",
    "DC": "DownstreamConnectionTermination", "URX": "UpstreamRetryLimitExceeded",
    "SI": "StreamIdleTimeout", "IH": "InvalidEnvoyRequestHeaders",
    "DPE": "DownstreamProtocolError", "UMSDR": "UpstreamMaxStreamDurationReached",
    "RFCF": "ResponseFromCacheFilter", "NFCF": "NoFilterConfigFound", "DT": "DurationTimeout",
    "UPE": "UpstreamProtocolError", "NC": "NoClusterFound", "OM": "OverloadManagerTerminated",
    "DF": "DnsResolutionFailed", "DO": "DropOverload", "DR": "DownstreamRemoteReset",
    "UDO": "UnconditionalDropOverload",
}
_FLAG_RANK = {f: i for i, f in enumerate(RESPONSE_FLAG_ORDER)}

#: Envoy's default access log format (``usage.rst``, "Default format string"): used when a
#: file or stream logger has no format.
ENVOY_DEFAULT_FORMAT = (
    '[%START_TIME%] "%REQ(:METHOD)% %REQ(X-ENVOY-ORIGINAL-PATH?:PATH)% %PROTOCOL%" '
    "%RESPONSE_CODE% %RESPONSE_FLAGS% %BYTES_RECEIVED% %BYTES_SENT% %DURATION% "
    '%RESP(X-ENVOY-UPSTREAM-SERVICE-TIME)% "%REQ(X-FORWARDED-FOR)%" "%REQ(USER-AGENT)%" '
    '"%REQ(X-REQUEST-ID)%" "%REQ(:AUTHORITY)%" "%UPSTREAM_HOST%"\n')

#: Istio's ``EnvoyTextLogFormat`` (``meshConfig.accessLogFile`` with the TEXT encoding), spec
#: §10.2.
ISTIO_TEXT_FORMAT = (
    '[%START_TIME%] "%REQ(:METHOD)% %REQ(X-ENVOY-ORIGINAL-PATH?:PATH)% %PROTOCOL%" '
    "%RESPONSE_CODE% %RESPONSE_FLAGS% %RESPONSE_CODE_DETAILS% %CONNECTION_TERMINATION_DETAILS% "
    '"%UPSTREAM_TRANSPORT_FAILURE_REASON%" %BYTES_RECEIVED% %BYTES_SENT% %DURATION% '
    '%RESP(X-ENVOY-UPSTREAM-SERVICE-TIME)% "%REQ(X-FORWARDED-FOR)%" "%REQ(USER-AGENT)%" '
    '"%REQ(X-REQUEST-ID)%" "%REQ(:AUTHORITY)%" "%UPSTREAM_HOST%" %UPSTREAM_CLUSTER_RAW% '
    "%UPSTREAM_LOCAL_ADDRESS% %DOWNSTREAM_LOCAL_ADDRESS% %DOWNSTREAM_REMOTE_ADDRESS% "
    "%REQUESTED_SERVER_NAME% %ROUTE_NAME%\n")

#: Istio's ``EnvoyJSONLogFormatIstio`` (the JSON encoding). ``upstream_cluster`` uses the raw
#: cluster name like the text format does (older Istio releases used ``%UPSTREAM_CLUSTER%``).
ISTIO_JSON_FORMAT: dict[str, str] = {
    "start_time": "%START_TIME%",
    "route_name": "%ROUTE_NAME%",
    "method": "%REQ(:METHOD)%",
    "path": "%REQ(X-ENVOY-ORIGINAL-PATH?:PATH)%",
    "protocol": "%PROTOCOL%",
    "response_code": "%RESPONSE_CODE%",
    "response_flags": "%RESPONSE_FLAGS%",
    "response_code_details": "%RESPONSE_CODE_DETAILS%",
    "connection_termination_details": "%CONNECTION_TERMINATION_DETAILS%",
    "bytes_received": "%BYTES_RECEIVED%",
    "bytes_sent": "%BYTES_SENT%",
    "duration": "%DURATION%",
    "upstream_service_time": "%RESP(X-ENVOY-UPSTREAM-SERVICE-TIME)%",
    "x_forwarded_for": "%REQ(X-FORWARDED-FOR)%",
    "user_agent": "%REQ(USER-AGENT)%",
    "request_id": "%REQ(X-REQUEST-ID)%",
    "authority": "%REQ(:AUTHORITY)%",
    "upstream_host": "%UPSTREAM_HOST%",
    "upstream_cluster": "%UPSTREAM_CLUSTER_RAW%",
    "upstream_local_address": "%UPSTREAM_LOCAL_ADDRESS%",
    "downstream_local_address": "%DOWNSTREAM_LOCAL_ADDRESS%",
    "downstream_remote_address": "%DOWNSTREAM_REMOTE_ADDRESS%",
    "requested_server_name": "%REQUESTED_SERVER_NAME%",
    "upstream_transport_failure_reason": "%UPSTREAM_TRANSPORT_FAILURE_REASON%",
}

#: What an unset value prints as in text (``DefaultUnspecifiedValueString``).
UNSET: Final = "-"

#: gRPC status names for ``%GRPC_STATUS(CAMEL_STRING|SNAKE_STRING)%``.
_GRPC_CAMEL = ("OK", "Canceled", "Unknown", "InvalidArgument", "DeadlineExceeded", "NotFound",
               "AlreadyExists", "PermissionDenied", "ResourceExhausted", "FailedPrecondition",
               "Aborted", "OutOfRange", "Unimplemented", "Internal", "Unavailable", "DataLoss",
               "Unauthenticated")
_GRPC_SNAKE = ("OK", "CANCELLED", "UNKNOWN", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED",
               "NOT_FOUND", "ALREADY_EXISTS", "PERMISSION_DENIED", "RESOURCE_EXHAUSTED",
               "FAILED_PRECONDITION", "ABORTED", "OUT_OF_RANGE", "UNIMPLEMENTED", "INTERNAL",
               "UNAVAILABLE", "DATA_LOSS", "UNAUTHENTICATED")


class FormatError(BadInput, ValueError):
    """A format string Envoy would reject (unknown operator, bad syntax)."""


# ----------------------------------------------------------------------------- operators

# A provider renders one operator: a str, an int (numeric operators, typed in JSON), or None
# when the value is unset.
Value = str | int | None


def response_flags_text(flags: set[str]) -> str:
    """``%RESPONSE_FLAGS%``: short names in Envoy's order joined by ",", ``-`` when none.
    Names Envoy does not know go last, sorted."""
    if not flags:           # (most requests: typed as a set, compiled this is a size read)
        return UNSET
    if len(flags) == 1:
        for f in flags:
            return f
    return ",".join(sorted(flags, key=lambda f: (_FLAG_RANK.get(f, len(_FLAG_RANK)), f)))


def _ms(seconds: float | None) -> int | None:
    # Envoy casts durations to whole milliseconds (truncation); the epsilon keeps 0.005 s
    # from printing as 4 after float rounding.
    if seconds is None:
        return None
    return math.floor(seconds * 1000 + 1e-6)


def _without_port(addr: str) -> str | None:
    if not addr:
        return None
    if addr.startswith("["):
        end = addr.find("]")
        return addr[1:end] if end > 0 else addr
    host, sep, _ = addr.rpartition(":")
    return host if sep else addr


def _port(addr: str) -> int | None:
    if not addr:
        return None
    _, sep, port = addr.rpartition(":")
    return int(port) if sep and port.isdigit() else None


# Providers are small classes, not closures: compiled (remora.native), a call through the
# base class's ``get`` is a direct C call, where calling a closure goes through Python's
# calling convention (about 450 instructions each, 24 operators per line of Istio's format).
class Provider:
    """Computes one operator's value from a finished stream."""

    __slots__ = ()

    def get(self, info: StreamInfo) -> Value:
        raise NotImplementedError


# StreamInfo fields behind the operators that take no argument (Final: compiled, they are
# constants, not module lookups).
_PROTOCOL: Final = 0
_RESPONSE_CODE: Final = 1
_RESPONSE_FLAGS: Final = 2
_RESPONSE_FLAGS_LONG: Final = 3
_RESPONSE_CODE_DETAILS: Final = 4
_CONNECTION_TERMINATION_DETAILS: Final = 5
_UPSTREAM_TRANSPORT_FAILURE_REASON: Final = 6
_BYTES_RECEIVED: Final = 7
_BYTES_SENT: Final = 8
_DURATION: Final = 9
_RESPONSE_DURATION: Final = 10
_UPSTREAM_HOST: Final = 11
_UPSTREAM_CLUSTER: Final = 12
_UPSTREAM_CLUSTER_RAW: Final = 13
_UPSTREAM_LOCAL_ADDRESS: Final = 14
_UPSTREAM_LOCAL_ADDRESS_WITHOUT_PORT: Final = 15
_UPSTREAM_REMOTE_ADDRESS_WITHOUT_PORT: Final = 16
_DOWNSTREAM_LOCAL_ADDRESS: Final = 17
_DOWNSTREAM_LOCAL_ADDRESS_WITHOUT_PORT: Final = 18
_DOWNSTREAM_LOCAL_PORT: Final = 19
_DOWNSTREAM_REMOTE_ADDRESS: Final = 20
_DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT: Final = 21
_DOWNSTREAM_REMOTE_PORT: Final = 22
_REQUESTED_SERVER_NAME: Final = 23
_ROUTE_NAME: Final = 24
_UPSTREAM_REQUEST_ATTEMPT_COUNT: Final = 25
_GRPC_STATUS_NUMBER: Final = 26

# Operators without an argument: name -> field. Numeric ones return ints (typed in JSON).
_SIMPLE: dict[str, int] = {
    "PROTOCOL": _PROTOCOL,
    "RESPONSE_CODE": _RESPONSE_CODE,
    "RESPONSE_FLAGS": _RESPONSE_FLAGS,
    "RESPONSE_FLAGS_LONG": _RESPONSE_FLAGS_LONG,
    "RESPONSE_CODE_DETAILS": _RESPONSE_CODE_DETAILS,
    "CONNECTION_TERMINATION_DETAILS": _CONNECTION_TERMINATION_DETAILS,
    "UPSTREAM_TRANSPORT_FAILURE_REASON": _UPSTREAM_TRANSPORT_FAILURE_REASON,
    "BYTES_RECEIVED": _BYTES_RECEIVED,
    "BYTES_SENT": _BYTES_SENT,
    "DURATION": _DURATION,
    "RESPONSE_DURATION": _RESPONSE_DURATION,
    "UPSTREAM_HOST": _UPSTREAM_HOST,
    "UPSTREAM_CLUSTER": _UPSTREAM_CLUSTER,
    "UPSTREAM_CLUSTER_RAW": _UPSTREAM_CLUSTER_RAW,
    "UPSTREAM_LOCAL_ADDRESS": _UPSTREAM_LOCAL_ADDRESS,
    "UPSTREAM_LOCAL_ADDRESS_WITHOUT_PORT": _UPSTREAM_LOCAL_ADDRESS_WITHOUT_PORT,
    "UPSTREAM_REMOTE_ADDRESS": _UPSTREAM_HOST,
    "UPSTREAM_REMOTE_ADDRESS_WITHOUT_PORT": _UPSTREAM_REMOTE_ADDRESS_WITHOUT_PORT,
    "DOWNSTREAM_LOCAL_ADDRESS": _DOWNSTREAM_LOCAL_ADDRESS,
    "DOWNSTREAM_LOCAL_ADDRESS_WITHOUT_PORT": _DOWNSTREAM_LOCAL_ADDRESS_WITHOUT_PORT,
    "DOWNSTREAM_LOCAL_PORT": _DOWNSTREAM_LOCAL_PORT,
    "DOWNSTREAM_REMOTE_ADDRESS": _DOWNSTREAM_REMOTE_ADDRESS,
    "DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT": _DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT,
    "DOWNSTREAM_REMOTE_PORT": _DOWNSTREAM_REMOTE_PORT,
    "REQUESTED_SERVER_NAME": _REQUESTED_SERVER_NAME,
    "ROUTE_NAME": _ROUTE_NAME,
    "UPSTREAM_REQUEST_ATTEMPT_COUNT": _UPSTREAM_REQUEST_ATTEMPT_COUNT,
    "GRPC_STATUS_NUMBER": _GRPC_STATUS_NUMBER,
}


class _Field(Provider):
    """An operator without an argument: one StreamInfo field (see :data:`_SIMPLE`)."""

    __slots__ = ("field",)

    def __init__(self, field: int) -> None:
        self.field = field

    def get(self, info: StreamInfo) -> Value:
        f = self.field
        if f < _BYTES_RECEIVED:
            if f == _PROTOCOL:
                return info.protocol or None
            if f == _RESPONSE_CODE:
                return info.response_code
            if f == _RESPONSE_FLAGS:
                return response_flags_text(info.response_flags)
            if f == _RESPONSE_FLAGS_LONG:
                if not info.response_flags:
                    return UNSET
                return "".join(RESPONSE_FLAGS_LONG.get(x, x)
                               for x in response_flags_text(info.response_flags).split(","))
            if f == _RESPONSE_CODE_DETAILS:
                return info.response_code_details or None
            if f == _CONNECTION_TERMINATION_DETAILS:
                return info.connection_termination_details or None
            return info.upstream_transport_failure_reason or None
        if f < _DOWNSTREAM_LOCAL_ADDRESS:
            if f == _BYTES_RECEIVED:
                return info.bytes_received
            if f == _BYTES_SENT:
                return info.bytes_sent
            if f == _DURATION:
                return _ms(info.duration)
            if f == _RESPONSE_DURATION:
                return _ms(info.response_duration)
            if f == _UPSTREAM_HOST:
                return info.upstream_host or None
            if f == _UPSTREAM_CLUSTER:
                return info.upstream_cluster_stat or info.upstream_cluster or None
            if f == _UPSTREAM_CLUSTER_RAW:
                return info.upstream_cluster or None
            if f == _UPSTREAM_LOCAL_ADDRESS:
                return info.upstream_local_address or None
            if f == _UPSTREAM_LOCAL_ADDRESS_WITHOUT_PORT:
                return _without_port(info.upstream_local_address)
            return _without_port(info.upstream_host)
        if f == _DOWNSTREAM_LOCAL_ADDRESS:
            return info.downstream_local_address or None
        if f == _DOWNSTREAM_LOCAL_ADDRESS_WITHOUT_PORT:
            return _without_port(info.downstream_local_address)
        if f == _DOWNSTREAM_LOCAL_PORT:
            return _port(info.downstream_local_address)
        if f == _DOWNSTREAM_REMOTE_ADDRESS:
            return info.downstream_remote_address or None
        if f == _DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT:
            return _without_port(info.downstream_remote_address)
        if f == _DOWNSTREAM_REMOTE_PORT:
            return _port(info.downstream_remote_address)
        if f == _REQUESTED_SERVER_NAME:
            return info.requested_server_name or None
        if f == _ROUTE_NAME:
            return info.route_name or None
        if f == _UPSTREAM_REQUEST_ATTEMPT_COUNT:
            return info.attempt_count
        return info.grpc_status


# Where a header operator looks (REQ's pseudo-headers read the head's fields).
_IN_REQUEST: Final = 0
_IN_RESPONSE: Final = 1
_IN_TRAILERS: Final = 2
_PSEUDO_NONE: Final = 0
_PSEUDO_METHOD: Final = 1
_PSEUDO_PATH: Final = 2
_PSEUDO_AUTHORITY: Final = 3
_PSEUDO_SCHEME: Final = 4
_PSEUDO_STATUS: Final = 5


def _pseudo(where: int, name: str) -> int:
    if where == _IN_REQUEST:
        if name == ":method":
            return _PSEUDO_METHOD
        if name == ":path":
            return _PSEUDO_PATH
        if name in (":authority", "host"):   # the HTTP/1 codec folds Host into the authority
            return _PSEUDO_AUTHORITY
        if name == ":scheme":
            return _PSEUDO_SCHEME
    elif where == _IN_RESPONSE and name == ":status":
        return _PSEUDO_STATUS
    return _PSEUDO_NONE


def _lookup(info: StreamInfo, where: int, name: str, pseudo: int) -> str | None:
    if where == _IN_REQUEST:
        req = info.request
        if req is None:
            return None
        if pseudo == _PSEUDO_NONE:
            return req.headers.get(name)
        if pseudo == _PSEUDO_METHOD:
            return req.method
        if pseudo == _PSEUDO_PATH:
            return req.path
        if pseudo == _PSEUDO_AUTHORITY:
            return req.authority or None
        return req.scheme
    if where == _IN_RESPONSE:
        resp = info.response
        if resp is None:
            return None
        if pseudo == _PSEUDO_STATUS:
            return str(resp.status)
        return resp.headers.get(name)
    t: HeaderMap | None = info.response_trailers
    return t.get(name) if t is not None else None


class _Header(Provider):
    """``REQ(X?Y)`` / ``RESP`` / ``TRAILER`` / ``REQ_WITHOUT_QUERY``: header ``X``, else the
    alternative ``Y``."""

    __slots__ = ("alt", "alt_pseudo", "main", "main_pseudo", "strip_query", "where")

    def __init__(self, where: int, main: str, alt: str | None, strip_query: bool) -> None:
        self.where = where
        self.main = main
        self.main_pseudo = _pseudo(where, main)
        self.alt = alt
        self.alt_pseudo = _pseudo(where, alt) if alt is not None else _PSEUDO_NONE
        self.strip_query = strip_query

    def get(self, info: StreamInfo) -> Value:
        v = _lookup(info, self.where, self.main, self.main_pseudo)
        if v is None and self.alt is not None:
            v = _lookup(info, self.where, self.alt, self.alt_pseudo)
        if self.strip_query and v is not None:
            v = v.split("?", 1)[0]
        return v


def _header_op(op: str, arg: str | None, where: int, strip_query: bool = False) -> Provider:
    if not arg:
        raise FormatError(f"access log format: %{op}% needs a header name, as in %{op}(X)%")
    names = arg.split("?")
    if len(names) > 2 or not all(names):
        raise FormatError(f"access log format: %{op}({arg})% takes X or X?Y "
                          "(one alternative header)")
    return _Header(where, names[0].lower(), names[1].lower() if len(names) == 2 else None,
                   strip_query)


_STRFTIME_SPECIAL = re.compile(r"%(?:([1-9]?)f|s|E([0-9]|\*)S|%)")


_MILLIS: Final = tuple(f".{ms:03d}Z" for ms in range(1000))   # START_TIME's default ending


class _StartTime(Provider):
    """``START_TIME``: ``%Y-%m-%dT%H:%M:%E3SZ`` in UTC (``2024-05-01T12:00:00.123Z``); the
    text up to the seconds is kept while the second lasts."""

    __slots__ = ("prefix", "second")

    def __init__(self) -> None:
        self.second = -1
        self.prefix = ""

    def get(self, info: StreamInfo) -> Value:
        us = int(info.start_time * 1_000_000 + 0.5)     # (round() is a builtins lookup)
        sec, frac = divmod(us, 1_000_000)
        if sec != self.second:
            self.second = sec
            self.prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sec))
        return self.prefix + _MILLIS[frac // 1000]


class _FormattedTime(Provider):
    """``START_TIME(fmt)``: strftime plus Envoy's ``%f`` / ``%1f``…``%9f`` (fraction digits,
    9 by default), ``%s`` (epoch seconds) and absl's ``%E#S`` / ``%E*S`` (seconds with a
    fraction). Segments: ("t", strftime text), ("f", digits), ("s", 0), ("S", digits; -1 = *)."""

    __slots__ = ("segments",)

    def __init__(self, segments: tuple[tuple[str, str | int], ...]) -> None:
        self.segments = segments

    def get(self, info: StreamInfo) -> Value:
        us = round(info.start_time * 1_000_000)
        sec, frac_us = divmod(us, 1_000_000)
        nanos = f"{frac_us * 1000:09d}"
        tm = time.gmtime(sec)
        out = []
        for kind, v in self.segments:
            if kind == "t":
                out.append(time.strftime(str(v), tm))
            elif kind == "s":
                out.append(str(sec))
            elif kind == "f":
                out.append(nanos[:int(v)])
            else:
                secs = f"{tm.tm_sec:02d}"
                if v == -1:
                    trimmed = nanos.rstrip("0")
                    out.append(f"{secs}.{trimmed}" if trimmed else secs)
                else:
                    out.append(f"{secs}.{nanos[:int(v)]}" if v else secs)
        return "".join(out)


def _time_op(arg: str | None) -> Provider:
    """``START_TIME`` / ``START_TIME(fmt)``, in UTC."""
    if not arg:
        return _StartTime()
    segments: list[tuple[str, str | int]] = []
    pos = 0
    chunk = ""
    while pos < len(arg):
        m = _STRFTIME_SPECIAL.match(arg, pos) if arg[pos] == "%" else None
        if m is None:
            if arg[pos] == "%" and pos + 1 < len(arg):
                chunk += arg[pos:pos + 2]
                pos += 2
            else:
                chunk += arg[pos]
                pos += 1
            continue
        token = m.group(0)
        if token == "%%":
            chunk += "%%"
        else:
            if chunk:
                segments.append(("t", chunk))
                chunk = ""
            if token == "%s":
                segments.append(("s", 0))
            elif token.endswith("f"):
                segments.append(("f", int(m.group(1) or 9)))
            else:
                digits = m.group(2)
                segments.append(("S", -1 if digits == "*" else int(digits)))
        pos = m.end()
    if chunk:
        segments.append(("t", chunk))
    return _FormattedTime(tuple(segments))


class _GrpcStatus(Provider):
    """``GRPC_STATUS(CAMEL_STRING|SNAKE_STRING|NUMBER)``."""

    __slots__ = ("names", "number")

    def __init__(self, names: tuple[str, ...], number: bool) -> None:
        self.names = names
        self.number = number

    def get(self, info: StreamInfo) -> Value:
        # Envoy's GrpcStatusFormatter: gRPC requests only, the status inferred from the HTTP
        # one when the response carried none
        if info.request is None or not is_grpc_request(info.request):
            return None
        code = inferred_grpc_status(info)
        if code is None:
            return None
        if self.number:
            return code
        return self.names[code] if 0 <= code < len(self.names) else str(code)


def _grpc_op(arg: str | None) -> Provider:
    style = arg or "CAMEL_STRING"
    if style not in ("CAMEL_STRING", "SNAKE_STRING", "NUMBER"):
        raise FormatError(f"access log format: GRPC_STATUS({arg}) must be CAMEL_STRING, "
                          "SNAKE_STRING or NUMBER")
    return _GrpcStatus(_GRPC_CAMEL if style == "CAMEL_STRING" else _GRPC_SNAKE,
                       style == "NUMBER")


class _Constant(Provider):
    __slots__ = ("value",)

    def __init__(self, value: str | None) -> None:
        self.value = value

    def get(self, info: StreamInfo) -> Value:
        return self.value


_WITH_ARG = ("REQ", "RESP", "TRAILER", "REQ_WITHOUT_QUERY", "START_TIME", "GRPC_STATUS")
OPERATORS: frozenset[str] = frozenset((*_SIMPLE, *_WITH_ARG, "HOSTNAME"))


def _provider(op: str, arg: str | None) -> Provider:
    if op in _SIMPLE:
        if arg is not None:
            raise FormatError(f"access log format: %{op}% takes no argument, got ({arg})")
        return _Field(_SIMPLE[op])
    if op == "HOSTNAME":
        # Envoy reads the host name once, when the format is built.
        return _Constant(socket.gethostname() or None)
    if op == "REQ":
        return _header_op(op, arg, _IN_REQUEST)
    if op == "REQ_WITHOUT_QUERY":
        return _header_op(op, arg, _IN_REQUEST, strip_query=True)
    if op == "RESP":
        return _header_op(op, arg, _IN_RESPONSE)
    if op == "TRAILER":
        return _header_op(op, arg, _IN_TRAILERS)
    if op == "START_TIME":
        return _time_op(arg)
    if op == "GRPC_STATUS":
        return _grpc_op(arg)
    raise FormatError(f"access log format: unknown command operator %{op}% "
                      "(not implemented by Remora)")


# Envoy's command grammar: %NAME%, %NAME(arg)%, %NAME(arg):N%; the argument holds no ")".
_COMMAND = re.compile(r"%([A-Z0-9_]+)(?:\(([^)]*)\))?(?::([0-9]+))?%")


@dataclass(frozen=True, slots=True)
class Operator:
    """One command operator in a template."""

    name: str
    arg: str | None
    max_length: int | None
    provider: Provider

    def value(self, info: StreamInfo) -> Value:
        v = self.provider.get(info)
        if self.max_length is not None and isinstance(v, str):
            v = v[:self.max_length]
        return v


Piece = str | Operator


def parse_template(text: str) -> tuple[Piece, ...]:
    """Literal text and operators, in order (``%%`` is a literal ``%``)."""
    pieces: list[Piece] = []
    literal: list[str] = []
    pos = 0
    n = len(text)
    while pos < n:
        pct = text.find("%", pos)
        if pct < 0:
            literal.append(text[pos:])
            break
        literal.append(text[pos:pct])
        if text.startswith("%%", pct):
            literal.append("%")
            pos = pct + 2
            continue
        m = _COMMAND.match(text, pct)
        if m is None:
            raise FormatError(f"access log format {text!r}: no valid command operator at "
                              f"position {pct}")
        name, arg, length = m.group(1), m.group(2), m.group(3)
        if literal:
            joined = "".join(literal)
            if joined:
                pieces.append(joined)
            literal = []
        pieces.append(Operator(name=name, arg=arg,
                               max_length=int(length) if length is not None else None,
                               provider=_provider(name, arg)))
        pos = m.end()
    joined = "".join(literal)
    if joined:
        pieces.append(joined)
    return tuple(pieces)


def _render_text(pieces: Sequence[Piece], info: StreamInfo, unset: str) -> str:
    out: list[str] = []
    for p in pieces:
        if isinstance(p, str):
            out.append(p)
        else:
            v = p.value(info)
            out.append(unset if v is None else v if isinstance(v, str) else str(v))
    return "".join(out)


# ----------------------------------------------------------------------------- formatters


class TextFormatter:
    """A compiled text format. ``omit_empty_values``: unset prints as "" instead of "-".

    Rendering copies ``template`` (the literals, with a placeholder where each operator goes)
    and fills the operators' slots, instead of walking every piece and telling literals from
    operators per line."""

    __slots__ = ("omit_empty_values", "pieces", "slots", "template", "unset")

    def __init__(self, pieces: tuple[Piece, ...], omit_empty_values: bool = False) -> None:
        self.pieces = pieces
        self.omit_empty_values = omit_empty_values
        self.unset = "" if omit_empty_values else UNSET
        self.template = [p if isinstance(p, str) else "" for p in pieces]
        self.slots = tuple((i, p) for i, p in enumerate(pieces) if isinstance(p, Operator))

    def __eq__(self, other: object) -> bool:
        return (isinstance(other, TextFormatter) and self.pieces == other.pieces
                and self.omit_empty_values == other.omit_empty_values)

    def __hash__(self) -> int:
        return hash((self.pieces, self.omit_empty_values))

    def __repr__(self) -> str:
        return f"TextFormatter(pieces={self.pieces!r}, omit_empty_values={self.omit_empty_values})"

    def format(self, info: StreamInfo) -> str:
        out = self.template.copy()
        unset = self.unset
        for i, op in self.slots:
            v = op.value(info)
            out[i] = unset if v is None else v if isinstance(v, str) else str(v)
        return "".join(out)


# A JSON template node: a literal (non-string) value, a nested object, or a template.
JsonNode = Any


@dataclass(frozen=True, slots=True)
class JsonFormatter:
    """A compiled ``json_format``: one compact JSON object per line, keys sorted (Envoy always
    sorts them; ``json_format_options.sort_properties`` no longer changes anything).

    ``typed`` (``log_format.json_format``, ``typed_json_format``): a value that is exactly one
    operator keeps its type (``"response_code": 200``, ``"duration": 5``) and is ``null`` when
    unset; a value mixing text and operators is a string with ``-`` for unset parts. Untyped
    (the deprecated ``FileAccessLog.json_format``): every value is a string, unset ``-``.
    ``omit_empty_values``: keys whose value is ``null`` are left out."""

    fields: tuple[tuple[str, JsonNode], ...]
    typed: bool = True
    omit_empty_values: bool = False

    def value(self, info: StreamInfo) -> dict[str, Any]:
        return self._object(self.fields, info)

    def _object(self, fields: tuple[tuple[str, JsonNode], ...],
                info: StreamInfo) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, node in fields:
            if isinstance(node, tuple) and node and node[0] == "obj":
                out[key] = self._object(node[1], info)
                continue
            if isinstance(node, tuple) and node and node[0] == "tpl":
                pieces: tuple[Piece, ...] = node[1]
                if self.typed and len(pieces) == 1 and isinstance(pieces[0], Operator):
                    v: Any = pieces[0].value(info)
                elif not self.typed and len(pieces) == 1 and isinstance(pieces[0], Operator):
                    got = pieces[0].value(info)
                    v = (None if self.omit_empty_values else UNSET) if got is None else str(got)
                else:
                    v = _render_text(pieces, info, "" if self.omit_empty_values else UNSET)
            else:
                v = node
            if v is None and self.omit_empty_values:
                continue
            out[key] = v
        return out

    def format(self, info: StreamInfo) -> str:
        return json.dumps(self.value(info), ensure_ascii=False, separators=(",", ":"),
                          sort_keys=True) + "\n"


Formatter = TextFormatter | JsonFormatter


def compile_text_format(text: str, *, omit_empty_values: bool = False) -> TextFormatter:
    """Parse a format string once (raises :class:`FormatError`)."""
    return TextFormatter(pieces=parse_template(text), omit_empty_values=omit_empty_values)


def _json_fields(spec: Mapping[str, Any], where: str) -> tuple[tuple[str, JsonNode], ...]:
    out: list[tuple[str, JsonNode]] = []
    for key, value in spec.items():
        if isinstance(value, str):
            out.append((key, ("tpl", parse_template(value))))
        elif isinstance(value, Mapping):
            out.append((key, ("obj", _json_fields(value, f"{where}.{key}"))))
        elif value is None or isinstance(value, bool | int | float):
            out.append((key, value))
        else:
            raise FormatError(f"access log json_format {where}.{key}: only strings, numbers, "
                              "booleans and nested objects are supported")
    return tuple(out)


def compile_json_format(spec: Mapping[str, Any], *, typed: bool = True,
                        omit_empty_values: bool = False) -> JsonFormatter:
    return JsonFormatter(fields=_json_fields(spec, "json_format"), typed=typed,
                         omit_empty_values=omit_empty_values)


# ----------------------------------------------------------------------------- filters


@dataclass(frozen=True, slots=True)
class Comparison:
    """``ComparisonFilter``: ``op`` is EQ, GE, LE or NE; the runtime key is not consulted
    (Remora has no runtime), its ``default_value`` is used."""

    op: Literal["EQ", "GE", "LE", "NE"]
    value: int

    def test(self, x: int) -> bool:
        if self.op == "EQ":
            return x == self.value
        if self.op == "GE":
            return x >= self.value
        if self.op == "LE":
            return x <= self.value
        return x != self.value


#: Envoy's ``Grpc::Utility::httpToGrpcStatus`` (gRPC's "HTTP to gRPC status code mapping");
#: any other HTTP status is UNKNOWN (2).
HTTP_TO_GRPC_STATUS: Final[dict[int, int]] = {
    400: 13, 401: 16, 403: 7, 404: 12, 429: 14, 502: 14, 503: 14, 504: 14}


def inferred_grpc_status(info: StreamInfo) -> int | None:
    """Envoy's ``Grpc::Common::getGrpcStatus(trailers, headers, info)``: the ``grpc-status``
    sent, else one inferred from the HTTP status (``httpToGrpcStatus``), else None (no
    response)."""
    if info.grpc_status is not None:
        return info.grpc_status
    if info.response_code:
        return HTTP_TO_GRPC_STATUS.get(info.response_code, 2)
    return None


def grpc_status_of(info: StreamInfo) -> int:
    """The access log's gRPC status filter: :func:`inferred_grpc_status`, UNKNOWN without
    a response."""
    code = inferred_grpc_status(info)
    return 2 if code is None else code


def _request_id_integer(info: StreamInfo) -> int | None:
    """The UUID request-id extension's ``getInteger``: the first 8 hex digits of
    ``x-request-id``."""
    rid = info.request.headers.get("x-request-id") if info.request is not None else None
    if rid is None or len(rid) < 8:
        return None
    try:
        return int(rid[:8], 16)
    except ValueError:
        return None


LogFilterKind = Literal["status_code", "duration", "response_flag", "not_health_check",
                        "header", "grpc_status", "runtime", "and", "or"]


@dataclass(frozen=True, slots=True)
class LogFilter:
    """An access log filter tree: ``status_code``, ``duration`` (ms), ``response_flag``
    (``flags`` empty: any flag), ``not_health_check`` (Remora marks no request as a health
    check, so it always passes), ``header`` (a request header matcher), ``grpc_status``
    (``statuses``, or all but them with ``exclude``), ``runtime`` (``percent`` of requests,
    sampled on the request id unless ``independent``), ``and`` / ``or`` over ``children``."""

    kind: LogFilterKind
    comparison: Comparison | None = None
    flags: frozenset[str] = frozenset()
    children: tuple[LogFilter, ...] = ()
    header: HeaderMatcher | None = None
    statuses: frozenset[int] = frozenset()
    exclude: bool = False
    percent: FractionalPercent | None = None
    independent: bool = False

    def allows(self, info: StreamInfo) -> bool:
        k = self.kind
        if k == "status_code":
            assert self.comparison is not None
            return self.comparison.test(info.response_code)
        if k == "duration":
            assert self.comparison is not None
            ms = _ms(info.duration)
            return ms is not None and self.comparison.test(ms)
        if k == "response_flag":
            if not self.flags:
                return bool(info.response_flags)
            return not self.flags.isdisjoint(info.response_flags)
        if k == "not_health_check":
            return True
        if k == "header":
            assert self.header is not None
            return info.request is not None and self.header.matches(info.request)
        if k == "grpc_status":
            return (grpc_status_of(info) in self.statuses) != self.exclude
        if k == "runtime":
            assert self.percent is not None
            value = None if self.independent else _request_id_integer(info)
            return self.percent.hit(random.getrandbits(64) if value is None else value)
        if k == "and":
            return all(c.allows(info) for c in self.children)
        return any(c.allows(info) for c in self.children)


# ----------------------------------------------------------------------------- config

Destination = Literal["file", "stdout", "stderr"]


@dataclass(frozen=True, slots=True)
class AccessLogConfig:
    """One compiled access logger: where lines go and how they are rendered.
    ``destination`` "stdout"/"stderr" are the stream loggers (``path`` is then
    ``/dev/stdout`` or ``/dev/stderr``, for display)."""

    name: str
    destination: Destination
    path: str
    formatter: Formatter
    filter: LogFilter | None = None

    def render(self, info: StreamInfo) -> str | None:
        """The line to log, or None when the filter drops the request."""
        if self.filter is not None and not self.filter.allows(info):
            return None
        return self.formatter.format(info)


ANY = ANY_FIELDS
# Fields implemented, per message; everything else is refused with its path. Public so the
# bootstrap checker can accept ``access_log`` lists with the same table.
SUPPORTED_FIELDS: dict[str, str | frozenset[str]] = {
    "envoy.config.accesslog.v3.AccessLog": frozenset({"name", "filter", "typed_config"}),
    "envoy.config.accesslog.v3.AccessLogFilter": frozenset({
        "status_code_filter", "duration_filter", "not_health_check_filter",
        "response_flag_filter", "and_filter", "or_filter", "header_filter",
        "grpc_status_filter", "runtime_filter"}),
    "envoy.config.accesslog.v3.HeaderFilter": frozenset({"header"}),
    "envoy.config.accesslog.v3.GrpcStatusFilter": frozenset({"statuses", "exclude"}),
    "envoy.config.accesslog.v3.RuntimeFilter": frozenset({
        "runtime_key", "percent_sampled", "use_independent_randomness"}),
    "envoy.type.v3.FractionalPercent": frozenset({"numerator", "denominator"}),
    "envoy.config.accesslog.v3.StatusCodeFilter": frozenset({"comparison"}),
    "envoy.config.accesslog.v3.DurationFilter": frozenset({"comparison"}),
    "envoy.config.accesslog.v3.ComparisonFilter": frozenset({"op", "value"}),
    "envoy.config.core.v3.RuntimeUInt32": frozenset({"default_value", "runtime_key"}),
    "envoy.config.accesslog.v3.NotHealthCheckFilter": frozenset(),
    "envoy.config.accesslog.v3.ResponseFlagFilter": frozenset({"flags"}),
    "envoy.config.accesslog.v3.AndFilter": frozenset({"filters"}),
    "envoy.config.accesslog.v3.OrFilter": frozenset({"filters"}),
    "envoy.extensions.access_loggers.file.v3.FileAccessLog": frozenset({
        "path", "format", "json_format", "log_format"}),
    "envoy.extensions.access_loggers.stream.v3.StdoutAccessLog": frozenset({"log_format"}),
    "envoy.extensions.access_loggers.stream.v3.StderrAccessLog": frozenset({"log_format"}),
    "envoy.config.core.v3.SubstitutionFormatString": frozenset({
        "text_format", "json_format", "text_format_source", "omit_empty_values",
        "content_type", "formatters", "json_format_options"}),
    "envoy.config.core.v3.JsonFormatOptions": frozenset({"sort_properties"}),
    "envoy.config.core.v3.DataSource": frozenset({
        "filename", "inline_bytes", "inline_string", "environment_variable"}),
    "envoy.config.core.v3.TypedExtensionConfig": frozenset({"name", "typed_config"}),
    "envoy.extensions.formatter.req_without_query.v3.ReqWithoutQuery": frozenset(),
    "google.protobuf.Struct": ANY,
    "google.protobuf.Any": ANY,
}
_LOGGER_TYPES = {
    file_pb2.FileAccessLog.DESCRIPTOR.full_name: "file",
    stream_pb2.StdoutAccessLog.DESCRIPTOR.full_name: "stdout",
    stream_pb2.StderrAccessLog.DESCRIPTOR.full_name: "stderr",
}
_REQ_WITHOUT_QUERY = req_without_query_pb2.ReqWithoutQuery.DESCRIPTOR.full_name


def _check(msg: Message, path: str) -> None:
    """Refuse any field Remora does not implement, naming its path (a header filter's
    matcher is checked with the route matchers, by :func:`_filter`)."""
    check_fields(msg, path, SUPPORTED_FIELDS,
                 skip_types=("envoy.config.route.v3.HeaderMatcher",))


_OPS: tuple[Literal["EQ", "GE", "LE", "NE"], ...] = ("EQ", "GE", "LE", "NE")


def _comparison(msg: Any, path: str) -> Comparison:
    if msg.op >= len(_OPS):
        raise BadInput(f"{path}.op: unknown comparison {msg.op}")
    return Comparison(op=_OPS[msg.op], value=int(msg.value.default_value))


def _filter(msg: Any, path: str) -> LogFilter:
    which = msg.WhichOneof("filter_specifier")
    if which == "status_code_filter":
        return LogFilter(kind="status_code", comparison=_comparison(
            msg.status_code_filter.comparison, f"{path}.status_code_filter.comparison"))
    if which == "duration_filter":
        return LogFilter(kind="duration", comparison=_comparison(
            msg.duration_filter.comparison, f"{path}.duration_filter.comparison"))
    if which == "not_health_check_filter":
        return LogFilter(kind="not_health_check")
    if which == "response_flag_filter":
        flags = frozenset(msg.response_flag_filter.flags)
        bad = sorted(flags - set(RESPONSE_FLAG_ORDER))
        if bad:
            raise BadInput(f"{path}.response_flag_filter.flags: unknown response flag {bad[0]}")
        return LogFilter(kind="response_flag", flags=flags)
    if which == "header_filter":
        from remora.proxy.http.routes_compile import check_http_supported, header_matcher
        check_http_supported(msg.header_filter.header, f"{path}.header_filter.header")
        return LogFilter(kind="header", header=header_matcher(
            msg.header_filter.header, f"{path}.header_filter.header"))
    if which == "grpc_status_filter":
        g = msg.grpc_status_filter
        return LogFilter(kind="grpc_status", statuses=frozenset(g.statuses), exclude=g.exclude)
    if which == "runtime_filter":
        from remora.proxy.http.routes_compile import fractional_percent
        r = msg.runtime_filter
        if not r.runtime_key:
            raise BadInput(f"{path}.runtime_filter.runtime_key: is required")
        # (no runtime layers here: the key never overrides the default percentage)
        percent = fractional_percent(r.percent_sampled) if r.HasField("percent_sampled") \
            else FractionalPercent(numerator=0)
        return LogFilter(kind="runtime", percent=percent,
                         independent=r.use_independent_randomness)
    if which in ("and_filter", "or_filter"):
        sub = getattr(msg, which).filters
        if len(sub) < 2:
            raise BadInput(f"{path}.{which}.filters: needs at least 2 filters")
        return LogFilter(kind="and" if which == "and_filter" else "or",
                         children=tuple(_filter(f, f"{path}.{which}.filters[{i}]")
                                        for i, f in enumerate(sub)))
    raise BadInput(f"{path}: an access log filter needs one filter specifier")


def _data_source(ds: Any, path: str) -> str:
    which = ds.WhichOneof("specifier")
    if which == "inline_string":
        return str(ds.inline_string)
    if which == "inline_bytes":
        return bytes(ds.inline_bytes).decode("utf-8", "replace")
    if which == "filename":
        try:
            with open(ds.filename, encoding="utf-8") as fh:
                return fh.read()
        except OSError as exc:
            raise BadInput(f"{path}.filename: cannot read {ds.filename}: {exc.strerror}") \
                from None
    if which == "environment_variable":
        value = os.environ.get(ds.environment_variable)
        if value is None:
            raise BadInput(f"{path}.environment_variable: {ds.environment_variable} is not set")
        return value
    raise BadInput(f"{path}: a data source needs one specifier")


def _struct(msg: Message) -> dict[str, Any]:
    out: dict[str, Any] = pb_json.MessageToDict(msg)
    return out


def _substitution(sfs: Any, path: str) -> Formatter:
    """``SubstitutionFormatString``: text (inline or from a data source) or typed JSON."""
    for i, ext in enumerate(sfs.formatters):
        if not ext.HasField("typed_config") or \
                ext.typed_config.type_url.split("/")[-1] != _REQ_WITHOUT_QUERY:
            raise BadInput(f"unsupported {path}.formatters[{i}]: only "
                           "envoy.formatter.req_without_query is implemented")
    omit = bool(sfs.omit_empty_values)
    which = sfs.WhichOneof("format")
    try:
        if which == "json_format":
            return compile_json_format(_struct(sfs.json_format), omit_empty_values=omit)
        if which == "text_format":
            return compile_text_format(sfs.text_format, omit_empty_values=omit)
        if which == "text_format_source":
            return compile_text_format(
                _data_source(sfs.text_format_source, f"{path}.text_format_source"),
                omit_empty_values=omit)
    except FormatError as exc:
        raise FormatError(f"{path}: {exc}") from None
    raise BadInput(f"{path}: log_format needs text_format_source, text_format or json_format")


def _logger_formatter(cfg: Any, kind: str, path: str) -> Formatter:
    which = cfg.WhichOneof("access_log_format")
    try:
        if which == "log_format":
            return _substitution(cfg.log_format, f"{path}.log_format")
        if which == "format":
            return compile_text_format(cfg.format or ENVOY_DEFAULT_FORMAT)
        if which == "json_format":
            return compile_json_format(_struct(cfg.json_format), typed=False)
    except FormatError as exc:
        if str(exc).startswith(path):
            raise
        raise FormatError(f"{path}: {exc}") from None
    return compile_text_format(ENVOY_DEFAULT_FORMAT)


def compile_access_logs(msgs: Sequence[accesslog_pb2.AccessLog],
                        path: str) -> tuple[AccessLogConfig, ...]:
    """Compile the ``access_log`` list found at ``path`` (e.g. ``…filters[0].typed_config.
    access_log``). Raises :class:`BadInput` naming the offending field."""
    out = []
    for i, msg in enumerate(msgs):
        where = f"{path}[{i}]"
        _check(msg, where)
        if not msg.HasField("typed_config"):
            raise BadInput(f"{where}: typed_config is required")
        cfg = _unpack(msg.typed_config, f"{where}.typed_config")
        kind = _LOGGER_TYPES.get(cfg.DESCRIPTOR.full_name)
        if kind is None:
            raise BadInput(f"unsupported {where}.typed_config: {cfg.DESCRIPTOR.full_name} "
                           "(only the file and stdout/stderr access loggers are implemented)")
        tc = f"{where}.typed_config"
        destination: Destination
        if kind == "file":
            if not cfg.path:
                raise BadInput(f"{tc}.path is required")
            destination, file_path = "file", str(cfg.path)
        elif kind == "stdout":
            destination, file_path = "stdout", "/dev/stdout"
        else:
            destination, file_path = "stderr", "/dev/stderr"
        out.append(AccessLogConfig(
            name=msg.name or f"envoy.access_loggers.{'file' if kind == 'file' else 'stream'}",
            destination=destination, path=file_path,
            formatter=_logger_formatter(cfg, kind, tc),
            filter=_filter(msg.filter, f"{where}.filter") if msg.HasField("filter") else None))
    return tuple(out)


# ----------------------------------------------------------------------------- the sink

FLUSH_INTERVAL = 1.0            # Envoy --file-flush-interval-msec, as pilot-agent sets it
FLUSH_SIZE = 64 * 1024          # Envoy flushes early once this much is buffered
MAX_BUFFER = 16 * 1024 * 1024   # beyond this, a blocked sink drops lines (and counts them)


class AccessLogWriter:
    """One open log destination of a worker, shared by every logger writing there.

    Lines are buffered and written with ``os.write`` (``O_APPEND`` for files, so several
    worker processes can share one file) when 1 s has passed since the last flush, when the
    buffer exceeds 64 KiB, on :meth:`flush` and on :meth:`close`. A timer (:meth:`arm`) makes
    the 1 s flush happen without new lines. A write that would block keeps the rest for the
    next flush; past 16 MiB pending, new lines are dropped and counted in ``dropped``.
    ``clock`` is injectable so tests need no sleeps."""

    __slots__ = ("_buf", "_clock", "_fd", "_last", "_owns_fd", "_size", "_timer",
                 "closed", "dropped", "flush_interval", "flush_size", "path", "write_errors")

    def __init__(self, path: str, *, destination: Destination = "file",
                 clock: Callable[[], float] = time.monotonic,
                 flush_interval: float = FLUSH_INTERVAL, flush_size: int = FLUSH_SIZE) -> None:
        self.path = path
        self.flush_interval = flush_interval
        self.flush_size = flush_size
        self._clock = clock
        self._buf: list[bytes] = []
        self._size = 0
        self._last = clock()
        self._timer: Any = None
        self.closed = False
        self.dropped = 0
        self.write_errors = 0
        if destination == "stdout":
            self._fd, self._owns_fd = 1, False
        elif destination == "stderr":
            self._fd, self._owns_fd = 2, False
        else:
            try:
                self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC,
                                   0o644)
            except OSError as exc:
                raise BadInput(f"cannot open access log {path}: {exc.strerror}") from None
            self._owns_fd = True

    @property
    def buffered(self) -> int:
        return self._size

    def write(self, line: str) -> None:
        if self.closed:
            return
        data = line.encode("utf-8", "surrogateescape")
        if self._size + len(data) > MAX_BUFFER:
            self.dropped += 1
            return
        self._buf.append(data)
        self._size += len(data)
        if self._size >= self.flush_size or self._clock() - self._last >= self.flush_interval:
            self.flush()

    def tick(self) -> None:
        """Flush if the interval has passed (what the timer calls)."""
        if self._size and self._clock() - self._last >= self.flush_interval:
            self.flush()

    def flush(self) -> None:
        self._last = self._clock()
        if not self._size:
            return
        data = b"".join(self._buf)
        self._buf.clear()
        self._size = 0
        view = memoryview(data)
        while view:
            try:
                n = os.write(self._fd, view)
            except BlockingIOError:
                rest = bytes(view)
                self._buf.append(rest)
                self._size = len(rest)
                return
            except InterruptedError:
                continue
            except OSError:
                self.write_errors += 1
                return
            view = view[n:]

    def reopen(self) -> bool:
        """``POST /reopen_logs`` (after log rotation): flush to the old file, then write to a
        file opened anew at :attr:`path`. If it cannot be opened the old one is kept (False).
        stdout and stderr are left as they are."""
        if self.closed or not self._owns_fd:
            return True
        self.flush()
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC,
                         0o644)
        except OSError:
            self.write_errors += 1
            return False
        old, self._fd = self._fd, fd
        with contextlib.suppress(OSError):
            os.close(old)
        return True

    def arm(self, loop: Any) -> None:
        """Flush every ``flush_interval`` on ``loop`` (anything with asyncio's ``call_later``)
        until closed."""
        def fire() -> None:
            self._timer = None
            if self.closed:
                return
            self.tick()
            self._timer = loop.call_later(self.flush_interval, fire)
        if self._timer is None and not self.closed:
            self._timer = loop.call_later(self.flush_interval, fire)

    def close(self) -> None:
        if self.closed:
            return
        self.flush()
        self.closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._owns_fd:
            with contextlib.suppress(OSError):
                os.close(self._fd)


class AccessLogWriters:
    """A worker's open destinations, one :class:`AccessLogWriter` per path however many
    loggers use it."""

    def __init__(self, *, clock: Callable[[], float] = time.monotonic,
                 flush_interval: float = FLUSH_INTERVAL, flush_size: int = FLUSH_SIZE) -> None:
        self._clock = clock
        self._interval = flush_interval
        self._size = flush_size
        self.writers: dict[tuple[Destination, str], AccessLogWriter] = {}

    def get(self, destination: Destination, path: str) -> AccessLogWriter:
        key = (destination, path)
        w = self.writers.get(key)
        if w is None or w.closed:
            w = self.writers[key] = AccessLogWriter(
                path, destination=destination, clock=self._clock,
                flush_interval=self._interval, flush_size=self._size)
        return w

    def arm(self, loop: Any) -> None:
        for w in self.writers.values():
            w.arm(loop)

    def flush(self) -> None:
        for w in self.writers.values():
            w.flush()

    def reopen(self) -> list[str]:
        """Reopen every file destination; the paths that could not be reopened."""
        return [w.path for w in self.writers.values() if not w.reopen()]

    def close(self) -> None:
        for w in self.writers.values():
            w.close()
        self.writers.clear()


@dataclass(frozen=True, slots=True)
class AccessLogger:
    """A compiled logger bound to its worker's writer."""

    config: AccessLogConfig
    writer: AccessLogWriter

    def log(self, info: StreamInfo) -> None:
        line = self.config.render(info)
        if line is not None:
            self.writer.write(line)


def open_access_logs(configs: Iterable[AccessLogConfig],
                     writers: AccessLogWriters) -> tuple[AccessLogger, ...]:
    """Bind configs to this worker's writers (same path → same writer)."""
    return tuple(AccessLogger(c, writers.get(c.destination, c.path)) for c in configs)


def log_all(loggers: Iterable[AccessLogger], info: StreamInfo) -> None:
    """Envoy logs a request to every configured logger once it is complete."""
    for lg in loggers:
        lg.log(info)
