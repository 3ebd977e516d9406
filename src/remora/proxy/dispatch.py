"""Which listener and which filter chain get a connection. Pure: no sockets.

Owns: the hand-off of a connection accepted by a ``use_original_dst`` listener to the listener
of its original destination (exact ``IP:port`` first, then the wildcard of the same family
and port), and Envoy's filter-chain match: destination port, destination IP (longest prefix),
server name, transport protocol, application protocols, direct source IP, source type, source
IP, source port — at each level the most specific bucket that matches, never backtracking; if
nothing is left, ``default_filter_chain`` or nothing (the connection is closed, flag ``NR``).
Must not: own sockets, read the clock or log.

Reference: spec ``dataplane-envoy-pilot-agent.md`` §2.1 step 5, §2.2 (Envoy
``connection_handler_impl.cc``, ``filter_chain_manager_impl.cc``, ``listener_components.proto``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from remora.proxy.model import (
    FilterChain,
    FilterChainMatch,
    IPAddress,
    IPNetwork,
    Listener,
    SocketAddress,
)


@dataclass(frozen=True, slots=True, kw_only=True)
class ConnectionInfo:
    """What the listener filters learned about a connection."""

    local_ip: IPAddress          # the (restored) destination
    local_port: int
    remote_ip: IPAddress
    remote_port: int
    direct_remote_ip: IPAddress | None = None
    server_name: str = ""
    transport_protocol: str = "raw_buffer"
    application_protocols: tuple[str, ...] = ()


class HandoffIndex:
    """Listeners by address, built once per listener set: the hand-off is two dict lookups
    per connection instead of a scan that parses every listener's address."""

    __slots__ = ("exact", "wildcard")

    def __init__(self, listeners: Sequence[Listener]) -> None:
        self.exact: dict[tuple[object, int], Listener] = {}
        self.wildcard: dict[tuple[int, int], Listener] = {}
        for li in listeners:
            for addr in li.addresses:
                ip = addr.ip
                key = (ip if ip is not None else addr.address, addr.port)
                self.exact.setdefault(key, li)   # the first listener of an address wins
                if addr.is_wildcard and ip is not None:
                    self.wildcard.setdefault((ip.version, addr.port), li)

    def find(self, receiver: Listener, original_dst: SocketAddress) -> Listener | None:
        """The listener that should take over a connection whose original destination is
        ``original_dst``, or None to keep it on ``receiver``."""
        ip = original_dst.ip
        found = self.exact.get((ip if ip is not None else original_dst.address,
                                original_dst.port))
        if found is None and ip is not None:
            found = self.wildcard.get((ip.version, original_dst.port))
        return None if found is None or found is receiver else found


def find_handoff(listeners: Sequence[Listener], receiver: Listener,
                 original_dst: SocketAddress) -> Listener | None:
    """:meth:`HandoffIndex.find` for a one-off lookup."""
    return HandoffIndex(listeners).find(receiver, original_dst)


def _by_prefix(chains: list[FilterChain], ranges: Callable[[FilterChainMatch], tuple[
        IPNetwork, ...]], ip: IPAddress | None) -> list[FilterChain]:
    """Chains whose ranges contain ``ip`` with the longest prefix; else chains without
    ranges (which stand for 0.0.0.0/0 and ::/0, the least specific)."""
    best, best_len = [], -1
    for chain in chains:
        nets = ranges(chain.match)
        if not nets:
            continue
        lengths = [n.prefixlen for n in nets if ip is not None and ip.version == n.version
                   and ip in n]
        if not lengths:
            continue
        length = max(lengths)
        if length > best_len:
            best, best_len = [chain], length
        elif length == best_len:
            best.append(chain)
    if best:
        return best
    return [c for c in chains if not ranges(c.match)]


def _by_server_name(chains: list[FilterChain], sni: str) -> list[FilterChain]:
    if sni:
        sni = sni.lower()
        exact = [c for c in chains if sni in c.match.server_names]
        if exact:
            return exact
        # Wildcards "*.example.com", most specific (longest) suffix first.
        labels = sni.split(".")
        for i in range(1, len(labels)):
            pattern = "*." + ".".join(labels[i:])
            hit = [c for c in chains if pattern in c.match.server_names]
            if hit:
                return hit
    return [c for c in chains if not c.match.server_names]


def _source_type(info: ConnectionInfo) -> str:
    local = info.remote_ip.is_loopback or info.remote_ip == info.local_ip
    return "SAME_IP_OR_LOOPBACK" if local else "EXTERNAL"


def select_filter_chain(listener: Listener, info: ConnectionInfo) -> FilterChain | None:
    chains = list(listener.filter_chains)
    # 1. destination port: chains naming this port, else only the port-less ones.
    named = [c for c in chains if c.match.destination_port == info.local_port]
    chains = named or [c for c in chains if c.match.destination_port is None]
    # 2. destination IP.
    chains = _by_prefix(chains, lambda m: m.prefix_ranges, info.local_ip)
    # 3. server name.
    chains = _by_server_name(chains, info.server_name)
    # 4. transport protocol.
    chains = [c for c in chains if c.match.transport_protocol == info.transport_protocol] or \
        [c for c in chains if not c.match.transport_protocol]
    # 5. application protocols: the first of the connection's that some chain lists.
    for proto in info.application_protocols:
        hit = [c for c in chains if proto in c.match.application_protocols]
        if hit:
            chains = hit
            break
    else:
        chains = [c for c in chains if not c.match.application_protocols]
    # 6. direct source IP.
    chains = _by_prefix(chains, lambda m: m.direct_source_prefix_ranges,
                        info.direct_remote_ip or info.remote_ip)
    # 7. source type: the specific type before ANY.
    kind = _source_type(info)
    chains = [c for c in chains if c.match.source_type == kind] or \
        [c for c in chains if c.match.source_type == "ANY"]
    # 8. source IP.
    chains = _by_prefix(chains, lambda m: m.source_prefix_ranges, info.remote_ip)
    # 9. source port.
    chains = [c for c in chains if info.remote_port in c.match.source_ports] or \
        [c for c in chains if not c.match.source_ports]
    if chains:
        return chains[0]
    return listener.default_filter_chain
