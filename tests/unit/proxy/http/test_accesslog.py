"""Access log formats, compiling access log protos, filters and the buffered writer."""

from __future__ import annotations

import calendar
import json
import os
import socket
from pathlib import Path
from typing import Any

import pytest
from envoy.config.accesslog.v3 import accesslog_pb2
from google.protobuf import json_format

from remora.errors import BadInput
from remora.proxy.http import accesslog as al
from remora.proxy.http.types import HeaderMap, RequestHead, ResponseHead, StreamInfo

T0 = calendar.timegm((2024, 5, 1, 12, 0, 0)) + 0.123   # 2024-05-01T12:00:00.123Z

FILE = "type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog"
STDOUT = "type.googleapis.com/envoy.extensions.access_loggers.stream.v3.StdoutAccessLog"


def http_info(**kw: Any) -> StreamInfo:
    req = RequestHead(method="GET", path="/reviews/0", authority="reviews:9080",
                      headers=HeaderMap([("user-agent", "curl/8.5.0"),
                                         ("x-request-id", "6f1e...-uuid")]))
    resp = ResponseHead(status=200, headers=HeaderMap([("x-envoy-upstream-service-time", "4")]))
    base: dict[str, Any] = dict(
        start_time=T0, protocol="HTTP/1.1", request=req, response=resp, response_code=200,
        response_code_details="via_upstream", bytes_received=0, bytes_sent=358,
        duration=0.005, response_duration=0.004, upstream_host="10.244.0.15:9080",
        upstream_cluster="outbound|9080||reviews.default.svc.cluster.local",
        upstream_local_address="10.244.0.12:47312",
        downstream_local_address="10.96.100.2:9080",
        downstream_remote_address="10.244.0.12:54120", route_name="default", attempt_count=1)
    base.update(kw)
    return StreamInfo(**base)


def tcp_info() -> StreamInfo:
    return StreamInfo(start_time=calendar.timegm((2024, 5, 1, 12, 0, 1)), bytes_received=517,
                      bytes_sent=4210, duration=0.160, upstream_host="93.184.216.34:443",
                      upstream_cluster="PassthroughCluster",
                      upstream_local_address="10.244.0.12:40002",
                      downstream_local_address="93.184.216.34:443",
                      downstream_remote_address="10.244.0.12:40000")


def fmt(text: str, info: StreamInfo) -> str:
    return al.compile_text_format(text).format(info)


# ----------------------------------------------------------------------------- Istio text


def test_istio_text_format_constant() -> None:
    assert al.ISTIO_TEXT_FORMAT.endswith("%ROUTE_NAME%\n")
    assert al.ISTIO_TEXT_FORMAT.count("\n") == 1


def test_istio_text_spec_lines() -> None:
    f = al.compile_text_format(al.ISTIO_TEXT_FORMAT)
    outbound = http_info()
    assert f.format(outbound) == (
        '[2024-05-01T12:00:00.123Z] "GET /reviews/0 HTTP/1.1" 200 - via_upstream - "-" 0 358 '
        '5 4 "-" "curl/8.5.0" "6f1e...-uuid" "reviews:9080" "10.244.0.15:9080" '
        "outbound|9080||reviews.default.svc.cluster.local 10.244.0.12:47312 10.96.100.2:9080 "
        "10.244.0.12:54120 - default\n")
    inbound = http_info(
        start_time=T0 + 0.002, duration=0.003,
        response=ResponseHead(status=200, headers=HeaderMap(
            [("x-envoy-upstream-service-time", "2")])),
        upstream_cluster="inbound|9080||", upstream_local_address="127.0.0.6:41233",
        downstream_local_address="10.244.0.15:9080",
        downstream_remote_address="10.244.0.12:47312",
        requested_server_name="outbound_.9080_._.reviews.default.svc.cluster.local")
    assert f.format(inbound) == (
        '[2024-05-01T12:00:00.125Z] "GET /reviews/0 HTTP/1.1" 200 - via_upstream - "-" 0 358 '
        '3 2 "-" "curl/8.5.0" "6f1e...-uuid" "reviews:9080" "10.244.0.15:9080" '
        "inbound|9080|| 127.0.0.6:41233 10.244.0.15:9080 10.244.0.12:47312 "
        "outbound_.9080_._.reviews.default.svc.cluster.local default\n")
    assert f.format(tcp_info()) == (
        '[2024-05-01T12:00:01.000Z] "- - -" 0 - - - "-" 517 4210 160 - "-" "-" "-" "-" '
        '"93.184.216.34:443" PassthroughCluster 10.244.0.12:40002 93.184.216.34:443 '
        "10.244.0.12:40000 - -\n")


def test_envoy_default_format() -> None:
    line = al.compile_text_format(al.ENVOY_DEFAULT_FORMAT).format(http_info())
    assert line == ('[2024-05-01T12:00:00.123Z] "GET /reviews/0 HTTP/1.1" 200 - 0 358 5 4 "-" '
                    '"curl/8.5.0" "6f1e...-uuid" "reviews:9080" "10.244.0.15:9080"\n')


# ----------------------------------------------------------------------------- operators


def test_every_simple_operator() -> None:
    info = http_info(
        response_flags={"URX", "UF"}, connection_termination_details="ct",
        upstream_transport_failure_reason="delayed connect error: 111",
        upstream_cluster_stat="outbound|9080||reviews;", requested_server_name="sni.example",
        grpc_status=14, downstream_remote_address="[fd00::1]:54120")
    cases = {
        "PROTOCOL": "HTTP/1.1", "RESPONSE_CODE": "200", "RESPONSE_FLAGS": "UF,URX",
        "RESPONSE_FLAGS_LONG": "UpstreamConnectionFailureUpstreamRetryLimitExceeded",
        "RESPONSE_CODE_DETAILS": "via_upstream", "CONNECTION_TERMINATION_DETAILS": "ct",
        "UPSTREAM_TRANSPORT_FAILURE_REASON": "delayed connect error: 111",
        "BYTES_RECEIVED": "0", "BYTES_SENT": "358", "DURATION": "5", "RESPONSE_DURATION": "4",
        "UPSTREAM_HOST": "10.244.0.15:9080", "UPSTREAM_CLUSTER": "outbound|9080||reviews;",
        "UPSTREAM_CLUSTER_RAW": "outbound|9080||reviews.default.svc.cluster.local",
        "UPSTREAM_LOCAL_ADDRESS": "10.244.0.12:47312",
        "UPSTREAM_LOCAL_ADDRESS_WITHOUT_PORT": "10.244.0.12",
        "UPSTREAM_REMOTE_ADDRESS": "10.244.0.15:9080",
        "UPSTREAM_REMOTE_ADDRESS_WITHOUT_PORT": "10.244.0.15",
        "DOWNSTREAM_LOCAL_ADDRESS": "10.96.100.2:9080",
        "DOWNSTREAM_LOCAL_ADDRESS_WITHOUT_PORT": "10.96.100.2",
        "DOWNSTREAM_LOCAL_PORT": "9080",
        "DOWNSTREAM_REMOTE_ADDRESS": "[fd00::1]:54120",
        "DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT": "fd00::1",
        "DOWNSTREAM_REMOTE_PORT": "54120",
        "REQUESTED_SERVER_NAME": "sni.example", "ROUTE_NAME": "default",
        "UPSTREAM_REQUEST_ATTEMPT_COUNT": "1", "GRPC_STATUS": "Unavailable",
        "GRPC_STATUS(SNAKE_STRING)": "UNAVAILABLE", "GRPC_STATUS(NUMBER)": "14",
        "GRPC_STATUS_NUMBER": "14", "HOSTNAME": socket.gethostname(),
    }
    assert info.request is not None
    info.request.headers.add("content-type", "application/grpc")
    assert set(al.OPERATORS) >= {k.split("(")[0] for k in cases}
    for op, expected in cases.items():
        assert fmt(f"%{op}%", info) == expected, op


def test_grpc_status_only_for_grpc_requests_and_inferred_from_http() -> None:
    """Envoy's GrpcStatusFormatter: "-" for a request that is not gRPC; without a
    grpc-status, the status mapped from the HTTP one (httpToGrpcStatus)."""
    assert fmt("%GRPC_STATUS%", http_info(grpc_status=14)) == "-"       # not a gRPC request

    def grpc(**kw: Any) -> StreamInfo:
        info = http_info(**kw)
        assert info.request is not None
        info.request.headers.add("content-type", "application/grpc+proto")
        return info
    assert fmt("%GRPC_STATUS%", grpc(response_code=503)) == "Unavailable"
    assert fmt("%GRPC_STATUS(NUMBER)%", grpc(response_code=200)) == "2"     # Unknown
    assert fmt("%GRPC_STATUS%", grpc(response_code=0)) == "-"              # no response


def test_unset_values_print_dash() -> None:
    info = StreamInfo(start_time=T0)
    for op in ("PROTOCOL", "RESPONSE_FLAGS", "RESPONSE_FLAGS_LONG", "RESPONSE_CODE_DETAILS",
               "DURATION", "RESPONSE_DURATION", "UPSTREAM_HOST", "UPSTREAM_CLUSTER",
               "UPSTREAM_CLUSTER_RAW", "DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT",
               "DOWNSTREAM_LOCAL_PORT", "ROUTE_NAME", "GRPC_STATUS", "REQ(:METHOD)",
               "RESP(:STATUS)", "TRAILER(GRPC-STATUS)"):
        assert fmt(f"%{op}%", info) == "-", op
    # numbers Envoy always has
    assert fmt("%RESPONSE_CODE% %BYTES_SENT% %UPSTREAM_REQUEST_ATTEMPT_COUNT%", info) == "0 0 0"
    omit = al.compile_text_format("[%ROUTE_NAME%]", omit_empty_values=True)
    assert omit.format(info) == "[]"


def test_duration_is_whole_milliseconds_truncated() -> None:
    assert fmt("%DURATION%", http_info(duration=1.001)) == "1001"
    assert fmt("%DURATION%", http_info(duration=0.0059)) == "5"
    assert fmt("%DURATION%", http_info(duration=0.0)) == "0"


def test_req_pseudo_headers_fallback_and_truncation() -> None:
    info = http_info()
    info.request.headers.add("x-envoy-original-path", "/orig?x=1")  # type: ignore[union-attr]
    assert fmt("%REQ(:METHOD)% %REQ(:SCHEME)% %REQ(HOST)% %REQ(:AUTHORITY)%", info) == \
        "GET http reviews:9080 reviews:9080"
    assert fmt("%REQ(X-ENVOY-ORIGINAL-PATH?:PATH)%", info) == "/orig?x=1"
    assert fmt("%REQ(X-MISSING?:PATH)%", info) == "/reviews/0"
    assert fmt("%REQ(X-MISSING?X-ALSO-MISSING)%", info) == "-"
    assert fmt("%REQ(USER-AGENT):4%", info) == "curl"
    assert fmt("%REQ(user-agent):100%", info) == "curl/8.5.0"
    assert fmt("%REQ_WITHOUT_QUERY(X-ENVOY-ORIGINAL-PATH?:PATH)%", info) == "/orig"
    assert fmt("%RESP(:STATUS)% %RESP(X-ENVOY-UPSTREAM-SERVICE-TIME)%", info) == "200 4"
    info.response_trailers = HeaderMap([("grpc-status", "0")])
    assert fmt("%TRAILER(GRPC-STATUS)%", info) == "0"


def test_escaping_and_literals() -> None:
    assert fmt("100%% %RESPONSE_CODE%%%", http_info()) == "100% 200%"
    assert fmt("plain text, no operators", http_info()) == "plain text, no operators"
    assert fmt("", http_info()) == ""


@pytest.mark.parametrize(("text", "needle"), [
    ("%NOT_AN_OPERATOR%", "NOT_AN_OPERATOR"),
    ("%DYNAMIC_METADATA(istio)%", "DYNAMIC_METADATA"),
    ("100% done", "position 3"),
    ("%REQ%", "needs a header name"),
    ("%REQ(A?B?C)%", "one alternative"),
    ("%PROTOCOL(x)%", "takes no argument"),
    ("%GRPC_STATUS(WEIRD)%", "CAMEL_STRING"),
    ("%START_TIME", "position 0"),
])
def test_bad_formats_are_refused(text: str, needle: str) -> None:
    with pytest.raises(al.FormatError, match=needle) as err:
        al.compile_text_format(text)
    assert isinstance(err.value, ValueError) and isinstance(err.value, BadInput)


def test_start_time_formats() -> None:
    info = http_info(start_time=T0 + 0.000456)            # .123456
    assert fmt("%START_TIME%", info) == "2024-05-01T12:00:00.123Z"
    assert fmt("%START_TIME(%Y/%m/%d %H:%M:%S)%", info) == "2024/05/01 12:00:00"
    assert fmt("%START_TIME(%s)%", info) == str(int(T0))
    assert fmt("%START_TIME(%3f)%", info) == "123"
    assert fmt("%START_TIME(%6f|%f)%", info) == "123456|123456000"
    assert fmt("%START_TIME(%H:%M:%E3S)%", info) == "12:00:00.123"
    assert fmt("%START_TIME(%E*S)%", info) == "00.123456"
    assert fmt("%START_TIME(%%Y)%", info) == "%Y"
    # a later second is re-rendered (the default formatter caches per second)
    assert fmt("%START_TIME%", http_info(start_time=T0 + 1.5)) == "2024-05-01T12:00:01.623Z"


def test_response_flags_order() -> None:
    flags = {"DF", "URX", "UF", "UH", "LH", "NC", "DC"}
    assert al.response_flags_text(flags) == "LH,UH,UF,DC,URX,NC,DF"
    assert al.response_flags_text(set()) == "-"
    assert al.response_flags_text({"ZZ", "UO"}) == "UO,ZZ"
    assert list(al.RESPONSE_FLAG_ORDER) == [
        "LH", "UH", "UT", "LR", "UR", "UF", "UC", "UO", "NR", "DI", "FI", "RL", "UAEX",
        "RLSE", "DC", "URX", "SI", "IH", "DPE", "UMSDR", "RFCF", "NFCF", "DT", "UPE", "NC",
        "OM", "DF", "DO", "DR", "UDO"]
    assert al.response_flags_text({"DR", "DC", "UDO"}) == "DC,DR,UDO"
    assert al.RESPONSE_FLAGS_LONG["DR"] == "DownstreamRemoteReset"


# ----------------------------------------------------------------------------- JSON


def test_istio_json_format_keys_and_types() -> None:
    f = al.compile_json_format(al.ISTIO_JSON_FORMAT)
    line = f.format(http_info())
    assert line.endswith("}\n") and "\n" not in line[:-1]
    data = json.loads(line)
    assert list(data) == sorted(data)                    # Envoy sorts keys
    assert set(data) == {
        "start_time", "route_name", "method", "path", "protocol", "response_code",
        "response_flags", "response_code_details", "connection_termination_details",
        "bytes_received", "bytes_sent", "duration", "upstream_service_time",
        "x_forwarded_for", "user_agent", "request_id", "authority", "upstream_host",
        "upstream_cluster", "upstream_local_address", "downstream_local_address",
        "downstream_remote_address", "requested_server_name",
        "upstream_transport_failure_reason"}
    assert data["response_code"] == 200 and data["bytes_received"] == 0
    assert data["bytes_sent"] == 358 and data["duration"] == 5
    assert data["upstream_service_time"] == "4"          # header values stay strings
    assert data["response_flags"] == "-"
    assert data["x_forwarded_for"] is None and data["requested_server_name"] is None
    assert data["start_time"] == "2024-05-01T12:00:00.123Z"
    assert data["upstream_cluster"] == "outbound|9080||reviews.default.svc.cluster.local"
    assert line.startswith('{"authority":"reviews:9080","bytes_received":0,')
    tcp = json.loads(f.format(tcp_info()))
    assert tcp["method"] is None and tcp["protocol"] is None and tcp["response_code"] == 0


def test_json_mixed_nested_untyped_and_omit() -> None:
    spec = {"a": "code=%RESPONSE_CODE% sni=%REQUESTED_SERVER_NAME%", "n": {"d": "%DURATION%"},
            "k": 7, "b": True, "missing": "%ROUTE_NAME%"}
    info = http_info(route_name="")
    typed = json.loads(al.compile_json_format(spec).format(info))
    assert typed == {"a": "code=200 sni=-", "n": {"d": 5}, "k": 7, "b": True, "missing": None}
    untyped = json.loads(al.compile_json_format(spec, typed=False).format(info))
    assert untyped["n"] == {"d": "5"} and untyped["missing"] == "-"
    omitted = json.loads(al.compile_json_format(spec, omit_empty_values=True).format(info))
    assert "missing" not in omitted and omitted["a"] == "code=200 sni="
    esc = json.loads(al.compile_json_format({"ua": "%REQ(USER-AGENT)%"}).format(
        http_info(request=RequestHead("GET", "/", headers=HeaderMap([("user-agent", 'a"b\\')])))))
    assert esc == {"ua": 'a"b\\'}
    with pytest.raises(al.FormatError, match=r"json_format\.bad"):
        al.compile_json_format({"bad": [1, 2]})


# ----------------------------------------------------------------------------- protos


def access_log(d: dict[str, Any]) -> accesslog_pb2.AccessLog:
    msg = accesslog_pb2.AccessLog()
    json_format.ParseDict(d, msg)
    return msg


def test_compile_file_logger_text_source(tmp_path: Path) -> None:
    path = str(tmp_path / "a.log")
    (cfg,) = al.compile_access_logs([access_log({
        "name": "envoy.access_loggers.file",
        "typed_config": {"@type": FILE, "path": path, "log_format": {
            "text_format_source": {"inline_string": "%RESPONSE_CODE% %ROUTE_NAME%\n"},
            "omit_empty_values": True}}})], "hcm.access_log")
    assert cfg.destination == "file" and cfg.path == path and cfg.name.endswith("file")
    assert cfg.render(http_info(route_name="")) == "200 \n"


def test_compile_defaults_json_and_deprecated_forms(tmp_path: Path) -> None:
    path = str(tmp_path / "a.log")
    cfgs = al.compile_access_logs([
        access_log({"typed_config": {"@type": FILE, "path": path}}),
        access_log({"typed_config": {"@type": FILE, "path": path, "format": "%PROTOCOL%\n"}}),
        access_log({"typed_config": {"@type": FILE, "path": path,
                                     "json_format": {"c": "%RESPONSE_CODE%"}}}),
        access_log({"typed_config": {"@type": STDOUT, "log_format": {
            "json_format": al.ISTIO_JSON_FORMAT,
            "formatters": [{"name": "envoy.formatter.req_without_query", "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.formatter.req_without_query.v3"
                         ".ReqWithoutQuery"}}]}}}),
        access_log({"typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.access_loggers.stream.v3"
                     ".StderrAccessLog"}}),
    ], "x")
    info = http_info()
    assert cfgs[0].render(info) == al.compile_text_format(al.ENVOY_DEFAULT_FORMAT).format(info)
    assert cfgs[1].render(info) == "HTTP/1.1\n"
    assert cfgs[2].render(info) == '{"c":"200"}\n'         # deprecated json_format: strings
    assert cfgs[3].destination == "stdout" and cfgs[3].path == "/dev/stdout"
    assert json.loads(cfgs[3].render(info) or "")["response_code"] == 200
    assert cfgs[4].destination == "stderr"


def test_compile_filters() -> None:
    (cfg,) = al.compile_access_logs([access_log({
        "filter": {"or_filter": {"filters": [
            {"status_code_filter": {"comparison": {"op": "GE", "value": {
                "default_value": 500, "runtime_key": "k"}}}},
            {"and_filter": {"filters": [{"response_flag_filter": {"flags": ["NR"]}},
                                        {"not_health_check_filter": {}}]}},
        ]}},
        "typed_config": {"@type": STDOUT}})], "x")
    assert cfg.render(http_info()) is None
    assert cfg.render(http_info(response_code=503)) is not None
    assert cfg.render(http_info(response_flags={"NR"})) is not None
    (dur,) = al.compile_access_logs([access_log({
        "filter": {"duration_filter": {"comparison": {"op": "LE", "value": {
            "default_value": 4, "runtime_key": "k"}}}},
        "typed_config": {"@type": STDOUT}})], "x")
    assert dur.render(http_info()) is None and dur.render(http_info(duration=0.004))
    (anyflag,) = al.compile_access_logs([access_log({
        "filter": {"response_flag_filter": {}}, "typed_config": {"@type": STDOUT}})], "x")
    assert anyflag.render(http_info()) is None and anyflag.render(http_info(response_flags={"UF"}))


def _one(filter_: dict[str, Any]) -> al.AccessLogConfig:
    (cfg,) = al.compile_access_logs([access_log({"filter": filter_,
                                                 "typed_config": {"@type": STDOUT}})], "x")
    return cfg


def test_header_filter_matches_request_headers() -> None:
    cfg = _one({"header_filter": {"header": {"name": "x-debug", "string_match": {
        "exact": "1"}}}})
    assert cfg.render(http_info()) is None
    with_header = http_info()
    assert with_header.request is not None
    with_header.request.headers.add("x-debug", "1")
    assert cfg.render(with_header) is not None
    method = _one({"header_filter": {"header": {"name": ":method", "string_match": {
        "exact": "GET"}}}})
    assert method.render(http_info()) is not None and method.render(tcp_info()) is None


def test_grpc_status_filter_with_envoys_inference_from_http() -> None:
    unavailable = _one({"grpc_status_filter": {"statuses": ["UNAVAILABLE", "INTERNAL"]}})
    assert unavailable.render(http_info(grpc_status=14)) is not None
    assert unavailable.render(http_info(grpc_status=0)) is None
    # no grpc-status: inferred from the HTTP status (503 → UNAVAILABLE, 200 → UNKNOWN)
    assert unavailable.render(http_info(response_code=503, grpc_status=None)) is not None
    assert unavailable.render(http_info(response_code=200, grpc_status=None)) is None
    not_ok = _one({"grpc_status_filter": {"statuses": ["OK"], "exclude": True}})
    assert not_ok.render(http_info(grpc_status=0)) is None
    assert not_ok.render(http_info(response_code=200, grpc_status=None)) is not None


def test_runtime_filter_samples_on_the_request_id() -> None:
    half = _one({"runtime_filter": {"runtime_key": "log.sample", "percent_sampled": {
        "numerator": 50, "denominator": "HUNDRED"}}})

    def with_id(rid: str) -> StreamInfo:
        info = http_info()
        assert info.request is not None
        info.request.headers.set("x-request-id", rid)
        return info
    # Envoy: the first 8 hex digits of the UUID, modulo the denominator
    assert half.render(with_id("00000031-0000-4000-8000-000000000000")) is not None  # 49
    assert half.render(with_id("00000032-0000-4000-8000-000000000000")) is None      # 50
    assert half.render(with_id("00000095-ffff-4000-8000-000000000000")) is not None  # 149
    none = _one({"runtime_filter": {"runtime_key": "k"}})            # no percent: 0 %
    assert none.render(with_id("00000000-0000-4000-8000-000000000000")) is None
    every = _one({"runtime_filter": {"runtime_key": "k", "use_independent_randomness": True,
                                     "percent_sampled": {"numerator": 100}}})
    assert every.render(with_id("00000063-0000-4000-8000-000000000000")) is not None


@pytest.mark.parametrize(("entry", "needle"), [
    ({"typed_config": {"@type": FILE, "path": "/tmp/x", "typed_json_format": {}}},
     r"field hcm.access_log\[0\].typed_config.typed_json_format \(Remora"),
    ({"typed_config": {"@type": FILE, "path": "/tmp/x", "log_format": {
        "text_format": "%NOPE%"}}}, r"hcm.access_log\[0\].typed_config.log_format: .*%NOPE%"),
    ({"typed_config": {"@type": FILE}}, r"hcm.access_log\[0\].typed_config.path is required"),
    ({"filter": {"traceable_filter": {}}, "typed_config": {"@type": STDOUT}},
     r"hcm.access_log\[0\].filter.traceable_filter"),
    ({"filter": {"runtime_filter": {"runtime_key": ""}}, "typed_config": {"@type": STDOUT}},
     r"hcm.access_log\[0\].filter.runtime_filter.runtime_key: is required"),
    ({"filter": {"header_filter": {"header": {"name": "x", "string_match": {
        "safe_regex": {"regex": "(["}}}}}, "typed_config": {"@type": STDOUT}},
     r"filter\.header_filter\.header\.string_match\.safe_regex"),
    ({"filter": {"response_flag_filter": {"flags": ["UF", "XX"]}},
      "typed_config": {"@type": STDOUT}}, "unknown response flag XX"),
    ({"typed_config": {"@type": "type.googleapis.com/envoy.extensions.access_loggers.grpc.v3"
                                ".HttpGrpcAccessLogConfig"}}, "HttpGrpcAccessLogConfig"),
    ({"name": "x"}, "typed_config is required"),
    ({"typed_config": {"@type": STDOUT, "log_format": {"text_format": "x", "formatters": [
        {"name": "f", "typed_config": {"@type": "type.googleapis.com/google.protobuf.Empty"}}]}}},
     "formatters"),
])
def test_compile_errors_name_paths(entry: dict[str, Any], needle: str) -> None:
    if "HttpGrpc" in str(entry):
        import envoy.extensions.access_loggers.grpc.v3.als_pb2  # noqa: F401
    with pytest.raises(BadInput, match=needle) as err:
        al.compile_access_logs([access_log(entry)], "hcm.access_log")
    assert "\n" not in str(err.value)


# ----------------------------------------------------------------------------- writer


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_writer_flush_policy(tmp_path: Path) -> None:
    path = tmp_path / "access.log"
    clock = FakeClock()
    w = al.AccessLogWriter(str(path), clock=clock)
    w.write("one\n")
    w.write("two\n")
    assert path.read_bytes() == b"" and w.buffered == 8      # buffered, not yet written
    clock.now += 0.999
    w.tick()
    assert path.read_bytes() == b""
    clock.now += 0.001                                         # 1 s since the last flush
    w.tick()
    assert path.read_bytes() == b"one\ntwo\n" and w.buffered == 0
    w.write("x" * (64 * 1024))                                 # past 64 KiB: flushed at once
    assert path.stat().st_size == 8 + 64 * 1024
    w.write("three\n")
    clock.now += 5                                             # a write after the interval
    w.write("four\n")
    assert path.read_bytes().endswith(b"three\nfour\n")
    w.write("five\n")
    w.close()                                                  # close flushes
    assert path.read_bytes().endswith(b"five\n")
    w.write("ignored\n")
    assert path.read_bytes().endswith(b"five\n")


def test_writer_reopen_after_rotation_and_when_the_path_cannot_be_opened(
        tmp_path: Path) -> None:
    logs = tmp_path / "logs"
    logs.mkdir()
    path = logs / "access.log"
    writers = al.AccessLogWriters(clock=FakeClock())
    w = writers.get("file", str(path))
    w.write("before\n")
    path.rename(logs / "access.log.1")
    assert writers.reopen() == []
    w.write("after\n")
    w.flush()
    assert (logs / "access.log.1").read_text() == "before\n"     # flushed to the old file
    assert path.read_text() == "after\n"
    # the directory gone: the old file is kept, nothing is lost
    (logs / "access.log.1").unlink()
    path.rename(tmp_path / "kept.log")
    logs.rmdir()
    w.write("still\n")
    assert writers.reopen() == [str(path)] and w.write_errors == 1
    w.write("more\n")
    w.close()
    assert (tmp_path / "kept.log").read_text() == "after\nstill\nmore\n"
    out = al.AccessLogWriters().get("stdout", "/dev/stdout")
    assert out.reopen()                                           # stdout: left as it is


def test_writers_share_a_path_and_loggers_log(tmp_path: Path) -> None:
    path = str(tmp_path / "shared.log")
    clock = FakeClock()
    writers = al.AccessLogWriters(clock=clock)
    cfgs = al.compile_access_logs([
        access_log({"typed_config": {"@type": FILE, "path": path,
                                     "format": "A %RESPONSE_CODE%\n"}}),
        access_log({"typed_config": {"@type": FILE, "path": path,
                                     "format": "B %RESPONSE_CODE%\n"}}),
    ], "x")
    loggers = al.open_access_logs(cfgs, writers)
    assert loggers[0].writer is loggers[1].writer and len(writers.writers) == 1
    al.log_all(loggers, http_info())
    writers.flush()
    assert Path(path).read_text() == "A 200\nB 200\n"
    writers.close()
    assert writers.writers == {}


def test_writer_timer_rearms_until_closed(tmp_path: Path) -> None:
    class Loop:
        def __init__(self) -> None:
            self.pending: list[Any] = []

        def call_later(self, delay: float, cb: Any) -> Any:
            loop = self

            class Handle:
                def cancel(self) -> None:
                    loop.pending.remove(entry)
            entry = (delay, cb)
            self.pending.append(entry)
            return Handle()

    path = tmp_path / "t.log"
    clock = FakeClock()
    w = al.AccessLogWriter(str(path), clock=clock)
    loop = Loop()
    w.arm(loop)
    w.arm(loop)                                               # idempotent
    assert len(loop.pending) == 1 and loop.pending[0][0] == 1.0
    w.write("a\n")
    clock.now += 1
    _, cb = loop.pending.pop()
    cb()
    assert path.read_bytes() == b"a\n" and len(loop.pending) == 1
    w.close()
    assert loop.pending == []


def test_writer_stdout_and_bad_path(capfd: pytest.CaptureFixture[str]) -> None:
    w = al.AccessLogWriter("/dev/stdout", destination="stdout")
    w.write("to stdout\n")
    w.flush()
    w.close()
    assert capfd.readouterr().out == "to stdout\n"
    os.write(1, b"")                                           # fd 1 stays open
    with pytest.raises(BadInput, match=r"cannot open access log /nonexistent/dir/x\.log"):
        al.AccessLogWriter("/nonexistent/dir/x.log")
