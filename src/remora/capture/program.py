"""The `remora iptables` program: flags in, rules applied (or a dry-run transcript) out.

Owns: the order of the steps of istio-iptables' run (build config, learn host facts,
choose the backend, apply or clean up, configure routes, validate).
Must not: read ``os.environ`` or parse ``argv`` itself (the CLI passes them in), or format
rule text.

Reference: spec ``capture-istio-iptables.md`` §2.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Mapping, Sequence
from typing import TextIO

from remora.capture import host
from remora.capture.apply import (
    RecordingExecutor,
    SubprocessExecutor,
    detect_xtables,
    plain_xtables,
    run_iptables,
)
from remora.capture.config import CaptureConfig, HostFacts, build_config, parse_flags
from remora.errors import EnvironmentFault

log = logging.getLogger(__name__)

CAP_NET_ADMIN = 12


def has_net_admin() -> bool:
    """CAP_NET_ADMIN in the effective set (root without it cannot change rules either)."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("CapEff:"):
                    return bool(int(line.split()[1], 16) >> CAP_NET_ADMIN & 1)
    except OSError:
        pass
    return os.geteuid() == 0


def load_config(argv: Sequence[str], env: Mapping[str, str],
                facts: HostFacts | None = None) -> CaptureConfig:
    """Flags and env to a config; host facts detected unless given (tests inject them)."""
    values = parse_flags(argv, env)
    default_uid = "1337"
    if not values["proxy-uid"]:
        default_uid = host.proxy_uid_default(env.get("ENVOY_USER", "istio-proxy"))
    cfg = build_config(values, env, default_uid=default_uid)
    return dataclasses.replace(cfg, facts=facts or host.detect_facts(cfg))


def run(cfg: CaptureConfig, out: TextIO) -> int:
    if cfg.native_nftables:
        return _run_nft(cfg, out)
    if cfg.dry_run:
        rec = RecordingExecutor(cfg.dry_run_file)
        run_iptables(cfg, rec)
        if not cfg.dry_run_file:
            out.write(rec.transcript)
    elif not cfg.skip_rule_apply:
        if not has_net_admin():
            raise EnvironmentFault("remora iptables must run as root (or with CAP_NET_ADMIN) "
                                   "to change rules; use --dry-run to only print them")
        ex = SubprocessExecutor()
        xt = {4: detect_xtables(ex, 4, cfg.force_iptables_binary)}
        try:
            xt[6] = detect_xtables(ex, 6, cfg.force_iptables_binary)
        except EnvironmentFault as exc:
            if cfg.facts.enable_ipv6:
                raise
            # Istio: without IPv6, a missing ip6tables is only a warning.
            log.warning("ip6tables unavailable (%s); IPv6 is off, continuing", exc)
            xt[6] = plain_xtables(6)
        outcome = run_iptables(cfg, ex, xtables=xt, netlink=host.configure_routes)
        if outcome.cleaned:
            log.info("removed capture rules (%s)", xt[4].binary)
        elif outcome.unchanged:
            log.info("capture rules already in place; nothing changed")
        else:
            log.info("applied capture rules with %s%s", xt[4].restore,
                     " (replacing an earlier rule set)" if outcome.replaced else "")
    if cfg.run_validation:
        from remora.capture.validate import run_validation

        run_validation(cfg)
        log.info("iptables validation passed")
    return 0


def _run_nft(cfg: CaptureConfig, out: TextIO) -> int:
    from remora.capture import nft

    lines = nft.nft_cleanup_lines(cfg) if cfg.cleanup_only else nft.build_nft(cfg)
    script = nft.nft_script(lines)
    if cfg.dry_run:
        if cfg.dry_run_file:
            with open(cfg.dry_run_file, "w", encoding="utf-8") as fh:
                fh.write(script)
        else:
            out.write(script)
        return 0
    if not cfg.skip_rule_apply:
        if not has_net_admin():
            raise EnvironmentFault("remora iptables must run as root (or with CAP_NET_ADMIN)")
        result = SubprocessExecutor().run(["nft", "-f", "-"], stdin=script)
        if result.rc != 0:
            from remora.errors import ApplyFailed

            detail = (result.stderr.strip().splitlines() or [f"exit code {result.rc}"])[0]
            raise ApplyFailed(f"nft refused the transaction, nothing was applied: {detail}")
        host.configure_routes(cfg, cfg.cleanup_only)
    if cfg.run_validation:
        from remora.capture.validate import run_validation

        run_validation(cfg)
    return 0
