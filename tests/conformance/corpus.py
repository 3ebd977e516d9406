"""Loading Istio's golden corpus (``../shared/conformance/istio-iptables``).

Each case's JSON gives istio-iptables arguments, env-only settings and the Go Config fields
that have no flag (IPv6, DNS servers); those are injected as :class:`HostFacts`, which the
real CLI learns from the namespace and resolv.conf.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from remora.capture.config import CaptureConfig, HostFacts, build_config, parse_flags

ROOT = Path(os.environ.get("REMORA_SHARED", Path(__file__).resolve().parents[3] / "shared"))
CORPUS = ROOT / "conformance" / "istio-iptables"


def cases(sub: str = "") -> list[Path]:
    folder = CORPUS / sub if sub else CORPUS
    return sorted(folder.glob("*.json"))


def load(path: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(path.read_text())
    return data


def config_for(case: dict[str, Any]) -> CaptureConfig:
    env: dict[str, str] = dict(case.get("env") or {})
    cfg_fields = case.get("config") or {}
    facts = HostFacts(
        enable_ipv6=bool(cfg_fields.get("EnableIPv6", False)),
        dns_servers_v4=tuple(cfg_fields.get("DNSServersV4") or ()),
        dns_servers_v6=tuple(cfg_fields.get("DNSServersV6") or ()),
    )
    return build_config(parse_flags(case["args"], env), env, facts=facts)


def expected(path: Path, case: dict[str, Any], key: str = "") -> str:
    name = case["expected_files"][key] if key else case["expected_file"]
    return (path.parent / name).read_text()
