"""Envoy's delayed close on a real socket: a client still sending when `remora proxy` answers
early (431 for a head over 60 KiB) gets the whole answer and a clean end of stream, not a
connection reset from the kernel discarding its unread bytes.

Runs `remora proxy` as a process on loopback, as the current user.
"""

from __future__ import annotations

import re
import socket
from pathlib import Path

import pytest
import yaml

from tests.integration.test_proxy_process import Proxy

pytestmark = pytest.mark.timeout(60)

HCM = ("type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3."
       "HttpConnectionManager")
ROUTER = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"


def bootstrap(tmp: Path, delayed_close: str | None) -> Path:
    hcm: dict[str, object] = {
        "@type": HCM, "stat_prefix": "in",
        "route_config": {"name": "r", "virtual_hosts": [{
            "name": "all", "domains": ["*"],
            "routes": [{"match": {"prefix": "/"}, "route": {"cluster": "c"}}]}]},
        "http_filters": [{"name": "envoy.filters.http.router",
                          "typed_config": {"@type": ROUTER}}]}
    if delayed_close is not None:
        hcm["delayed_close_timeout"] = delayed_close
    data = {
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}}},
        "static_resources": {
            "listeners": [{
                "name": "http",
                "address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}},
                "filter_chains": [{"filters": [{
                    "name": "envoy.filters.network.http_connection_manager",
                    "typed_config": hcm}]}]}],
            "clusters": [{"name": "c", "type": "STATIC"}]}}
    path = tmp / "bootstrap.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def listening_port(proxy: Proxy) -> int:
    ready = proxy.wait_line(r"remora proxy ready: .* listeners=(\S+)")
    return int(re.split(r"[:,]", ready.group(1))[1])


def oversized_then_read(port: int) -> tuple[bytes, str]:
    """Send a 200 KB head in full, then read to the end: (what came, how it ended)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(b"GET / HTTP/1.1\r\nhost: a\r\nx-big: " + b"a" * 200_000 + b"\r\n\r\n")
        got = b""
        try:
            while chunk := s.recv(65536):
                got += chunk
        except ConnectionResetError:
            return got, "reset"
        return got, "eof"


@pytest.mark.parametrize("delayed_close", [None, "0.2s"])
def test_an_early_answer_to_a_client_still_sending_ends_cleanly(
        tmp_path: Path, delayed_close: str | None) -> None:
    proxy = Proxy(bootstrap(tmp_path, delayed_close))
    try:
        got, end = oversized_then_read(listening_port(proxy))
        assert got.startswith(b"HTTP/1.1 431 Request Header Fields Too Large\r\n")
        assert got.endswith(b"\r\n\r\nRequest Header Fields Too Large")
        assert end == "eof"
    finally:
        proxy.close()


def test_without_the_delay_the_kernel_resets(tmp_path: Path) -> None:
    """delayed_close_timeout 0 (Envoy: no delayed close) shows what the delay prevents."""
    proxy = Proxy(bootstrap(tmp_path, "0s"))
    try:
        port = listening_port(proxy)
        ends = {oversized_then_read(port)[1] for _ in range(3)}
        assert "reset" in ends
    finally:
        proxy.close()
