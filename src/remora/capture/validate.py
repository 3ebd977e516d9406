"""`--run-validation`: prove that traffic is really redirected (Istio's istio-validation).

Owns: the probe listeners on the capture ports, the client loop that connects as the proxy
user to 127.0.0.6:<probe port> (``[::6]`` on IPv6 hosts), and the verdict: success when a
listener sees the probe's original destination port; :class:`ValidationFailed` (exit 126)
when that does not happen within ``--probe-timeout``.
Must not: change any rule.

Reference: spec ``capture-istio-iptables.md`` §11 (Istio
``tools/istio-iptables/pkg/validation``).
"""

from __future__ import annotations

import ipaddress
import os
import select
import socket
import time

from remora.capture.config import CaptureConfig
from remora.capture.probe import drop_privileges, original_dst
from remora.errors import EnvironmentFault, ValidationFailed


def _listeners(host: str, ports: tuple[int, ...]) -> list[socket.socket]:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    out = []
    for port in ports:
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        try:
            sock.bind((host, port))
            sock.listen(16)
        except OSError:
            sock.close()  # Istio skips a listener that cannot bind
            continue
        sock.setblocking(False)
        out.append(sock)
    return out


def _probe_as(uid: int | None, gid: int | None, src: str, dst: tuple[str, int]) -> int:
    """Fork a client that drops to the proxy's uid/gid and connects once; returns its pid."""
    pid = os.fork()
    if pid:
        return pid
    code = 1
    try:
        drop_privileges(uid, gid)
        family = socket.AF_INET6 if ":" in src else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.settimeout(1.0)
            s.bind((src, 0))
            s.connect(dst)
            s.recv(16)
        code = 0
    except BaseException:  # the child reports through its exit code only
        code = 1
    finally:
        os._exit(code)


def run_validation(cfg: CaptureConfig) -> None:
    ipv6 = isinstance(cfg.facts.host_ip, ipaddress.IPv6Address)
    host, src, dst = ("::1", "::1", "::6") if ipv6 else ("127.0.0.1", "127.0.0.1", "127.0.0.6")
    servers = _listeners(host, (cfg.proxy_port, cfg.inbound_capture_port))
    if not servers:
        raise EnvironmentFault(f"validation: cannot listen on {host} ports "
                               f"{cfg.proxy_port}, {cfg.inbound_capture_port}")
    uid = int(cfg.proxy_uids[0]) if cfg.proxy_uids and cfg.proxy_uids[0].isdigit() else None
    gid = int(cfg.proxy_gids[0]) if cfg.proxy_gids and cfg.proxy_gids[0].isdigit() else None
    deadline = time.monotonic() + cfg.probe_timeout
    children: list[int] = []
    try:
        next_probe = 0.0
        while (now := time.monotonic()) < deadline:
            if now >= next_probe:  # one attempt a second, as Istio's client loop
                children.append(_probe_as(uid, gid, src, (dst, cfg.probe_port)))
                next_probe = now + 1.0
            ready, _, _ = select.select(servers, [], [], max(0.0, min(next_probe, deadline)
                                                             - time.monotonic()))
            for server in ready:
                try:
                    conn, _ = server.accept()
                except BlockingIOError:
                    continue
                with conn:
                    try:
                        orig = original_dst(conn)
                    except OSError:
                        continue
                    if orig is None:
                        continue
                    conn.sendall(str(orig.port).encode())
                if orig.port == cfg.probe_port:
                    return
    finally:
        for s in servers:
            s.close()
        for pid in children:
            os.waitpid(pid, 0)
    raise ValidationFailed("iptables validation failed; workload is not ready for Istio. "
                           "Ensure that the Istio CNI plugin or istio-init have configured "
                           f"redirection (no connection to {dst}:{cfg.probe_port} was "
                           f"redirected within {cfg.probe_timeout:g}s)")
