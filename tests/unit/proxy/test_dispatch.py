"""Hand-off and Envoy's filter-chain match (spec §2.1 step 5, §2.2)."""

from __future__ import annotations

import ipaddress
from pathlib import Path

from remora.proxy.bootstrap import load_bootstrap
from remora.proxy.dispatch import ConnectionInfo, find_handoff, select_filter_chain
from remora.proxy.model import FilterChain, FilterChainMatch, Listener, SocketAddress

EXAMPLE = Path(__file__).resolve().parents[3] / "examples" / "sidecar-bootstrap.yaml"
ip = ipaddress.ip_address
net = ipaddress.ip_network


def addr(a: str, p: int) -> SocketAddress:
    return SocketAddress(address=a, port=p)


def info(local: str = "10.0.0.2", port: int = 8080, remote: str = "10.0.0.9",
         rport: int = 40000, **kw: object) -> ConnectionInfo:
    return ConnectionInfo(local_ip=ip(local), local_port=port, remote_ip=ip(remote),
                          remote_port=rport, **kw)  # type: ignore[arg-type]


def chain(name: str, **match: object) -> FilterChain:
    return FilterChain(name=name, match=FilterChainMatch(**match))  # type: ignore[arg-type]


def listener(*chains: FilterChain, default: FilterChain | None = None) -> Listener:
    return Listener(name="l", address=addr("0.0.0.0", 15006), filter_chains=chains,
                    default_filter_chain=default)


def test_handoff_exact_then_wildcard_then_none() -> None:
    snap = load_bootstrap(str(EXAMPLE))
    outbound = snap.listener("virtualOutbound")
    assert outbound is not None
    hit = find_handoff(snap.listeners, outbound, addr("10.100.0.7", 8080))
    assert hit is not None and hit.name == "10.100.0.7_8080"
    assert find_handoff(snap.listeners, outbound, addr("10.100.0.8", 8080)) is None
    # The original destination's wildcard is the receiver itself: no hand-off.
    assert find_handoff(snap.listeners, outbound, addr("10.0.0.2", 15001)) is None
    wild = Listener(name="0.0.0.0_9090", address=addr("0.0.0.0", 9090), bind_to_port=False)
    v6 = Listener(name="::_9090", address=addr("::", 9090), bind_to_port=False)
    found = find_handoff((outbound, wild, v6), outbound, addr("10.9.9.9", 9090))
    assert found is wild
    found = find_handoff((outbound, wild, v6), outbound, addr("fd00::9", 9090))
    assert found is v6


def test_istio_inbound_chains() -> None:
    snap = load_bootstrap(str(EXAMPLE))
    inbound = snap.listener("virtualInbound")
    assert inbound is not None
    pick = select_filter_chain(inbound, info(port=8080))
    assert pick is not None and pick.name == "0.0.0.0_8080"
    pick = select_filter_chain(inbound, info(port=9999))
    assert pick is not None and pick.name == "virtualInbound"
    pick = select_filter_chain(inbound, info(port=15006))
    assert pick is not None and pick.name == "virtualInbound-blackhole"


def test_port_bucket_never_backtracks_to_portless_chains() -> None:
    tls_only = chain("tls-8080", destination_port=8080, transport_protocol="tls")
    anything = chain("any")
    li = listener(tls_only, anything)
    assert select_filter_chain(li, info(port=8080)) is None  # NR: no fallback to "any"
    fallback = chain("default")
    li = listener(tls_only, anything, default=fallback)
    assert select_filter_chain(li, info(port=8080)) is fallback
    assert select_filter_chain(li, info(port=8081)) is anything


def test_longest_destination_prefix_wins() -> None:
    wide = chain("wide", prefix_ranges=(net("10.0.0.0/8"),))
    narrow = chain("narrow", prefix_ranges=(net("10.0.0.0/24"),))
    host = chain("host", prefix_ranges=(net("10.0.0.2/32"),))
    none = chain("none")
    li = listener(wide, narrow, none, host)
    assert select_filter_chain(li, info(local="10.0.0.2")) is host
    assert select_filter_chain(li, info(local="10.0.0.3")) is narrow
    assert select_filter_chain(li, info(local="10.9.0.3")) is wide
    assert select_filter_chain(li, info(local="192.168.1.1")) is none


def test_server_names_exact_then_wildcard_then_none() -> None:
    exact = chain("exact", server_names=("www.example.com",))
    wild = chain("wild", server_names=("*.example.com",))
    top = chain("top", server_names=("*.com",))
    plain = chain("plain")
    li = listener(exact, wild, top, plain)
    assert select_filter_chain(li, info(server_name="www.example.com")) is exact
    assert select_filter_chain(li, info(server_name="api.example.com")) is wild
    assert select_filter_chain(li, info(server_name="x.other.com")) is top
    assert select_filter_chain(li, info(server_name="")) is plain


def test_transport_and_alpn_as_istio_permissive() -> None:
    mtls_http = chain("mtls-http", transport_protocol="tls",
                      application_protocols=("istio-http/1.0", "istio-http/1.1", "istio-h2"))
    http = chain("http", transport_protocol="raw_buffer",
                 application_protocols=("http/1.1", "h2c"))
    mtls_tcp = chain("mtls-tcp", transport_protocol="tls",
                     application_protocols=("istio-peer-exchange", "istio"))
    tcp = chain("tcp", transport_protocol="raw_buffer")
    tls_tcp = chain("tls-passthrough", transport_protocol="tls")
    li = listener(mtls_http, http, mtls_tcp, tcp, tls_tcp)
    assert select_filter_chain(li, info(transport_protocol="tls",
                                        application_protocols=("istio-h2",))) is mtls_http
    assert select_filter_chain(li, info(application_protocols=("http/1.1",))) is http
    assert select_filter_chain(li, info(transport_protocol="tls",
                                        application_protocols=("istio-peer-exchange", "istio"))
                               ) is mtls_tcp
    assert select_filter_chain(li, info()) is tcp
    assert select_filter_chain(li, info(transport_protocol="tls",
                                        application_protocols=("h2",))) is tls_tcp


def test_source_type_ip_and_port() -> None:
    local = chain("local", source_type="SAME_IP_OR_LOOPBACK")
    external = chain("external", source_type="EXTERNAL")
    li = listener(local, external)
    assert select_filter_chain(li, info(remote="127.0.0.6")) is local
    assert select_filter_chain(li, info(remote="10.0.0.2")) is local
    assert select_filter_chain(li, info(remote="10.0.0.9")) is external
    src = chain("src", source_prefix_ranges=(net("10.0.0.9/32"),))
    port = chain("port", source_ports=(5555,))
    li = listener(src, port)
    assert select_filter_chain(li, info(remote="10.0.0.9")) is src
    assert select_filter_chain(li, info(remote="10.0.0.8", rport=5555)) is port
    assert select_filter_chain(li, info(remote="10.0.0.8", rport=5556)) is None


def test_handoff_index_first_listener_of_an_address_wins_and_ipv6_text_is_normalised() -> None:
    from remora.proxy.dispatch import HandoffIndex

    a = Listener(name="a", address=addr("10.0.0.7", 80), bind_to_port=False)
    b = Listener(name="b", address=addr("10.0.0.7", 80), bind_to_port=False)
    v6 = Listener(name="v6", address=addr("fd00:0::7", 80), bind_to_port=False)
    recv = Listener(name="recv", address=addr("0.0.0.0", 15001), use_original_dst=True)
    index = HandoffIndex((recv, a, b, v6))
    assert index.find(recv, addr("10.0.0.7", 80)) is a
    assert index.find(recv, addr("fd00::7", 80)) is v6
    assert index.find(recv, addr("10.0.0.8", 80)) is None
