"""Configuration of `remora iptables`: istio-iptables flags and environment, parsed once.

Owns: the flag table (names, short names, env bindings, defaults, exactly those of Istio's
`pilot-agent istio-iptables`), a pflag-compatible command-line parser, the precedence rules
(primary env < secondary env < command line; a bad env value is ignored) and the validation
that turns strings into a typed, frozen :class:`CaptureConfig`.
Must not: read ``os.environ`` (the caller passes the environment in), touch the network
namespace, or run anything. Facts about the host (IPv6, resolv.conf) arrive as
:class:`HostFacts`, worked out by :mod:`remora.capture.host`.

Reference: spec ``capture-istio-iptables.md`` §2–§5 (Istio ``tools/istio-iptables/pkg/cmd``,
``tools/common/config``, ``pkg/flag``).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

from remora.errors import BadInput

FlagKind = Literal["str", "bool", "uint16", "duration"]


@dataclass(frozen=True, slots=True, kw_only=True)
class Flag:
    """One istio-iptables flag as Istio registers it."""

    name: str
    short: str | None
    envs: tuple[str, ...]
    kind: FlagKind
    default: str
    help: str


def _f(name: str, short: str | None, kind: FlagKind, default: str, help: str,
       envs: tuple[str, ...] | None = None) -> Flag:
    # Istio derives the env name mechanically from the long name; -p alone has none.
    if envs is None:
        envs = (name.upper().replace("-", "_"),)
    return Flag(name=name, short=short, envs=envs, kind=kind, default=default, help=help)


FLAGS: tuple[Flag, ...] = (
    _f("envoy-port", "p", "str", "15001",
       "Specify the envoy port to which redirect all TCP traffic", envs=()),
    _f("inbound-capture-port", "z", "str", "15006",
       "Port to which all inbound TCP traffic to the pod/VM should be redirected to"),
    _f("inbound-tunnel-port", "e", "str", "15008",
       "Specify the istio tunnel port for inbound tcp traffic"),
    _f("proxy-uid", "u", "str", "",
       "Specify the UID of the user for which the redirection is not applied"),
    _f("proxy-gid", "g", "str", "",
       "Specify the GID of the user for which the redirection is not applied"),
    _f("istio-inbound-interception-mode", "m", "str", "",
       "The mode used to redirect inbound connections to Envoy, either \"REDIRECT\" or \"TPROXY\""),
    _f("istio-inbound-ports", "b", "str", "",
       "Comma separated list of inbound ports for which traffic is to be redirected to Envoy "
       "(optional). The wildcard character \"*\" can be used to configure redirection for all "
       "ports. An empty list will disable"),
    _f("istio-local-exclude-ports", "d", "str", "",
       "Comma separated list of inbound ports to be excluded from redirection to Envoy "
       "(optional). Only applies when all inbound traffic (i.e. \"*\") is being redirected"),
    _f("istio-exclude-interfaces", "c", "str", "",
       "Comma separated list of NIC (optional). Neither inbound nor outbound traffic will be "
       "captured"),
    _f("istio-service-cidr", "i", "str", "",
       "Comma separated list of IP ranges in CIDR form to redirect to envoy (optional). The "
       "wildcard character \"*\" can be used to redirect all outbound traffic. An empty list "
       "will disable all outbound redirection"),
    _f("istio-service-exclude-cidr", "x", "str", "",
       "Comma separated list of IP ranges in CIDR form to be excluded from redirection. Only "
       "applies when all  outbound traffic (i.e. \"*\") is being redirected"),
    _f("istio-outbound-ports", "q", "str", "",
       "Comma separated list of outbound ports to be explicitly included for redirection to "
       "Envoy"),
    _f("istio-local-outbound-ports-exclude", "o", "str", "",
       "Comma separated list of outbound ports to be excluded from redirection to Envoy"),
    _f("kube-virt-interfaces", "k", "str", "",
       "Comma separated list of virtual interfaces whose inbound traffic (from VM) will be "
       "treated as outbound"),
    _f("istio-inbound-tproxy-mark", "t", "str", "1337", ""),
    _f("istio-inbound-tproxy-route-table", "r", "str", "133", ""),
    _f("dry-run", "n", "bool", "false", "Do not call any external dependencies like iptables"),
    _f("iptables-probe-port", None, "uint16", "15002",
       "Set listen port for failure detection"),
    _f("probe-timeout", None, "duration", "5s", "Failure detection timeout"),
    _f("skip-rule-apply", None, "bool", "false", "Skip iptables apply"),
    _f("run-validation", None, "bool", "false", "Validate iptables"),
    _f("redirect-dns", None, "bool", "false", "Enable capture of dns traffic by istio-agent",
       envs=("REDIRECT_DNS", "ISTIO_META_DNS_CAPTURE")),
    _f("capture-all-dns", None, "bool", "false",
       "Instead of only capturing DNS traffic to DNS server IP, capture all DNS traffic at port "
       "53. This setting is only effective when redirect dns is enabled."),
    _f("drop-invalid", None, "bool", "false", "Enable invalid drop in the iptables rules",
       envs=("DROP_INVALID", "INVALID_DROP")),
    _f("dual-stack", None, "bool", "false", "Enable ipv4/ipv6 redirects for dual-stack.",
       envs=("DUAL_STACK", "ISTIO_DUAL_STACK")),
    _f("network-namespace", None, "str", "",
       "The network namespace that iptables rules should be applied to."),
    _f("cni-mode", None, "bool", "false", "Whether to run as CNI plugin."),
    _f("reconcile", None, "bool", "false",
       "Reconcile pre-existing and incompatible iptables rules instead of failing if drift is "
       "detected."),
    _f("cleanup-only", None, "bool", "false",
       "Perform a forced cleanup without creating new iptables chains or rules."),
    _f("force-apply", None, "bool", "false",
       "Apply iptables changes even if they appear to already be in place."),
    _f("native-nftables", None, "bool", "false", "Use native nftables instead of iptables rules"),
    _f("force-iptables-binary", None, "str", "",
       "Force the use of a specific iptables binary (legacy or nft), bypassing auto-detection."),
    # pilot-agent's persistent logging flags: accepted, as cobra accepts them.
    _f("log_output_level", None, "str", "default:info", "logging output level", envs=()),
    _f("log_as_json", None, "bool", "false", "Whether to format output as JSON", envs=()),
)

_BY_LONG = {f.name: f for f in FLAGS}
_BY_SHORT = {f.short: f for f in FLAGS if f.short}

# Go's strconv.ParseBool.
_TRUE = {"1", "t", "T", "TRUE", "true", "True"}
_FALSE = {"0", "f", "F", "FALSE", "false", "False"}


def parse_go_bool(text: str) -> bool:
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise ValueError(f"invalid boolean {text!r}")


_DURATION_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0,
                   "h": 3600.0}
_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")


def parse_go_duration(text: str) -> float:
    """Parse a Go duration ("5s", "1m30s", "250ms") into seconds."""
    if text in ("0", "+0", "-0"):
        return 0.0
    rest, sign = text, 1.0
    if rest[:1] in "+-":
        sign = -1.0 if rest[0] == "-" else 1.0
        rest = rest[1:]
    total, pos = 0.0, 0
    while pos < len(rest):
        m = _DURATION_PART.match(rest, pos)
        if not m:
            raise ValueError(f"invalid duration {text!r}")
        total += float(m.group(1)) * _DURATION_UNITS[m.group(2)]
        pos = m.end()
    if not rest:
        raise ValueError(f"invalid duration {text!r}")
    return sign * total


def _check_kind(flag: Flag, value: str) -> None:
    if flag.kind == "bool":
        parse_go_bool(value)
    elif flag.kind == "uint16":
        if not value.isdigit() or int(value) > 65535:
            raise ValueError(f"invalid value {value!r}: must be 0-65535")
    elif flag.kind == "duration":
        parse_go_duration(value)


def flag_label(flag: Flag) -> str:
    return f"--{flag.name}" + (f" (-{flag.short})" if flag.short else "")


def parse_flags(argv: Sequence[str], env: Mapping[str, str]) -> dict[str, str]:
    """Return every flag's final string value, applying Istio's precedence.

    Defaults, then each bound env var in order (a secondary name such as
    ``ISTIO_META_DNS_CAPTURE`` is applied after the primary one and wins), then the command
    line. An env value of the wrong type is ignored, as pflag's Set error is ignored by Istio.
    """
    values = {f.name: f.default for f in FLAGS}
    for flag in FLAGS:
        for name in flag.envs:
            if name in env:
                try:
                    _check_kind(flag, env[name])
                except ValueError:
                    continue
                values[flag.name] = env[name]
    i = 0
    args = list(argv)
    while i < len(args):
        arg = args[i]
        i += 1
        if arg == "--":
            break  # the rest is positional, and positionals are ignored
        if arg.startswith("--") and len(arg) > 2:
            name, eq, inline = arg[2:].partition("=")
            found = _BY_LONG.get(name)
            if found is None:
                raise BadInput(f"unknown flag: --{name}")
            flag = found
            if flag.kind == "bool":
                value = inline if eq else "true"
            elif eq:
                value = inline
            else:
                if i >= len(args):
                    raise BadInput(f"flag needs an argument: --{name}")
                value = args[i]
                i += 1
        elif arg.startswith("-") and len(arg) > 1:
            letter, rest = arg[1], arg[2:]
            if letter == "h":
                raise HelpRequested()
            found = _BY_SHORT.get(letter)
            if found is None:
                raise BadInput(f"unknown shorthand flag: '{letter}' in {arg}")
            flag = found
            if flag.kind == "bool":
                if rest.startswith("="):
                    value = rest[1:]
                elif rest:
                    raise BadInput(f"unknown shorthand flag: '{rest[0]}' in {arg}")
                else:
                    value = "true"
            elif rest:
                value = rest[1:] if rest.startswith("=") else rest
            else:
                if i >= len(args):
                    raise BadInput(f"flag needs an argument: '{letter}' in -{letter}")
                value = args[i]
                i += 1
        else:
            continue  # positional arguments are accepted and ignored, as in Istio
        try:
            _check_kind(flag, value)
        except ValueError as exc:
            raise BadInput(f"invalid argument {value!r} for {flag_label(flag)}: {exc}") from None
        values[flag.name] = value
    return values


class HelpRequested(Exception):
    """``-h``/``--help`` was given."""


def usage() -> str:
    lines = ["Usage:", "  remora iptables [flags]", "", "Flags:"]
    for f in FLAGS:
        short = f"-{f.short}, " if f.short else "    "
        kind = "" if f.kind == "bool" else f" {'string' if f.kind == 'str' else f.kind}"
        env = f" (env {', '.join(f.envs)})" if f.envs else ""
        default = f" (default \"{f.default}\")" if f.default not in ("", "false") else ""
        lines.append(f"  {short}--{f.name}{kind}  {f.help}{default}{env}")
    lines += ["", "Environment only:",
              "  ISTIO_OUTBOUND_OWNER_GROUPS, ISTIO_OUTBOUND_OWNER_GROUPS_EXCLUDE,",
              "  ISTIO_OUTBOUND_IPV4_LOOPBACK_CIDR, ENVOY_USER, DRY_RUN_FILE_PATH"]
    return "\n".join(lines)


# --------------------------------------------------------------------------- typed config

IPNet = ipaddress.IPv4Interface | ipaddress.IPv6Interface


@dataclass(frozen=True, slots=True, kw_only=True)
class CidrList:
    """An include/exclude CIDR flag: ``*`` or prefixes split by family, in input order.

    Prefixes keep their host bits (Istio renders ``10.1.2.3/8`` as given), hence interfaces.
    """

    wildcard: bool = False
    v4: tuple[ipaddress.IPv4Interface, ...] = ()
    v6: tuple[ipaddress.IPv6Interface, ...] = ()

    def has_loopback(self, family: int) -> bool:
        nets: tuple[IPNet, ...] = self.v4 if family == 4 else self.v6
        return any(n.ip.is_loopback for n in nets)


@dataclass(frozen=True, slots=True, kw_only=True)
class OwnerGroups:
    """ISTIO_OUTBOUND_OWNER_GROUPS[_EXCLUDE]: capture all groups but ``exclude``, or only
    ``only``."""

    only: tuple[str, ...] | None = None
    exclude: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class HostFacts:
    """What istio-iptables learns from the host rather than from flags."""

    enable_ipv6: bool = False
    host_ip: ipaddress.IPv4Address | ipaddress.IPv6Address | None = None
    dns_servers_v4: tuple[str, ...] = ()
    dns_servers_v6: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class CaptureConfig:
    """Everything the rule builder and the applier need, validated."""

    proxy_port: int = 15001
    inbound_capture_port: int = 15006
    inbound_tunnel_port: int = 15008
    proxy_uids: tuple[str, ...] = ("1337",)
    proxy_gids: tuple[str, ...] = ("1337",)
    tproxy: bool = False
    inbound_ports_all: bool = False
    inbound_ports: tuple[int, ...] = ()
    local_exclude_ports: tuple[int, ...] = ()
    exclude_interfaces: tuple[str, ...] = ()
    outbound_include: CidrList = field(default_factory=CidrList)
    outbound_exclude: CidrList = field(default_factory=CidrList)
    outbound_ports_include: tuple[int, ...] = ()
    outbound_ports_exclude: tuple[int, ...] = ()
    kube_virt_interfaces: tuple[str, ...] = ()
    tproxy_mark: int = 1337
    tproxy_route_table: int = 133
    dry_run: bool = False
    probe_port: int = 15002
    probe_timeout: float = 5.0
    skip_rule_apply: bool = False
    run_validation: bool = False
    redirect_dns: bool = False
    capture_all_dns: bool = False
    drop_invalid: bool = False
    dual_stack: bool = False
    network_namespace: str = ""
    cni_mode: bool = False
    reconcile: bool = False
    cleanup_only: bool = False
    force_apply: bool = False
    native_nftables: bool = False
    force_iptables_binary: Literal["", "legacy", "nft"] = ""
    owner_groups: OwnerGroups = field(default_factory=OwnerGroups)
    ipv4_loopback_cidr: str = "127.0.0.1/32"
    dry_run_file: str = ""
    facts: HostFacts = field(default_factory=HostFacts)

    @property
    def inbound_enabled(self) -> bool:
        return self.inbound_ports_all or bool(self.inbound_ports)

    @property
    def effective_dns(self) -> bool:
        """DNS capture after Istio's "no resolvers found => off" rule (spec §6.2)."""
        if not self.redirect_dns:
            return False
        if self.capture_all_dns:
            return True
        return bool(self.facts.dns_servers_v4 or self.facts.dns_servers_v6)


def split_list(text: str) -> tuple[str, ...]:
    """Istio's list syntax: split on commas, drop empty elements, no trimming."""
    return tuple(p for p in text.split(",") if p)


_NAME_RE = re.compile(r"^[^\s,!\"'\\]+$")


def _port(text: str, label: str) -> int:
    if not text.isdigit() or not 0 < int(text) <= 65535:
        raise BadInput(f"invalid port {text!r} in {label}: must be an integer 1-65535")
    return int(text)


def _ports(text: str, label: str) -> tuple[int, ...]:
    return tuple(_port(p, label) for p in split_list(text))


def _names(text: str, label: str, what: str) -> tuple[str, ...]:
    items = split_list(text)
    for item in items:
        if not _NAME_RE.match(item):
            raise BadInput(f"invalid {what} {item!r} in {label}")
    return items


def parse_cidrs(text: str, label: str) -> CidrList:
    if text == "*":
        return CidrList(wildcard=True)
    v4: list[ipaddress.IPv4Interface] = []
    v6: list[ipaddress.IPv6Interface] = []
    for item in split_list(text):
        if "/" not in item:
            raise BadInput(f"invalid CIDR {item!r} in {label}: want ADDRESS/PREFIXLEN")
        try:
            net = ipaddress.ip_interface(item)
        except ValueError:
            raise BadInput(f"invalid CIDR {item!r} in {label}") from None
        if isinstance(net, ipaddress.IPv4Interface):
            v4.append(net)
        else:
            v6.append(net)
    return CidrList(v4=tuple(v4), v6=tuple(v6))


def _int(text: str, label: str) -> int:
    if not text.isdigit():
        raise BadInput(f"invalid value {text!r} for {label}: must be a non-negative integer")
    return int(text)


def build_config(values: Mapping[str, str], env: Mapping[str, str],
                 facts: HostFacts | None = None, default_uid: str = "1337") -> CaptureConfig:
    """Validate flag values (from :func:`parse_flags`) and env-only settings into a config.

    ``default_uid`` is the UID of ``$ENVOY_USER`` (Istio's fallback: 1337), looked up by the
    caller when ``-u`` is empty.
    """

    def label(name: str) -> str:
        flag = _BY_LONG[name]
        src = next((e for e in reversed(flag.envs) if e in env), None)
        return flag_label(flag) + (f" / ${src}" if src else "")

    uid_text = values["proxy-uid"] or default_uid
    gid_text = values["proxy-gid"] or uid_text
    uids = _names(uid_text, label("proxy-uid"), "uid")
    gids = _names(gid_text, label("proxy-gid"), "gid")
    mode = values["istio-inbound-interception-mode"]
    if mode not in ("", "REDIRECT", "TPROXY"):
        raise BadInput(
            f"invalid interception mode {mode!r} for {label('istio-inbound-interception-mode')}:"
            " want REDIRECT or TPROXY")
    inbound = values["istio-inbound-ports"]
    exclude_cidr = values["istio-service-exclude-cidr"]
    if exclude_cidr == "*":
        raise BadInput("invalid value for OUTBOUND_IP_RANGES_EXCLUDE: '*' is not allowed in "
                       + label("istio-service-exclude-cidr"))
    binary = values["force-iptables-binary"]
    if binary not in ("", "legacy", "nft"):
        raise BadInput(f"invalid value {binary!r} for {label('force-iptables-binary')}: "
                       "want legacy or nft")

    include_groups = env.get("ISTIO_OUTBOUND_OWNER_GROUPS", "*")
    exclude_groups = env.get("ISTIO_OUTBOUND_OWNER_GROUPS_EXCLUDE", "")
    if include_groups in ("*", ""):
        groups = OwnerGroups(exclude=_names(exclude_groups, "$ISTIO_OUTBOUND_OWNER_GROUPS_EXCLUDE",
                                            "group"))
    else:
        only = _names(include_groups, "$ISTIO_OUTBOUND_OWNER_GROUPS", "group")
        if len(only) > 64:
            raise BadInput("$ISTIO_OUTBOUND_OWNER_GROUPS: at most 64 groups can be listed, got "
                           f"{len(only)}")
        groups = OwnerGroups(only=only)

    loopback = env.get("ISTIO_OUTBOUND_IPV4_LOOPBACK_CIDR", "127.0.0.1/32")
    try:
        lo_net = ipaddress.IPv4Network(loopback, strict=False)
    except ValueError:
        raise BadInput(f"invalid $ISTIO_OUTBOUND_IPV4_LOOPBACK_CIDR {loopback!r}") from None
    if not lo_net.network_address.is_loopback or not 8 <= lo_net.prefixlen <= 32 \
            or "/" not in loopback:
        raise BadInput(f"invalid $ISTIO_OUTBOUND_IPV4_LOOPBACK_CIDR {loopback!r}: must be an "
                       "IPv4 loopback CIDR with a mask of 8-32")

    return CaptureConfig(
        proxy_port=_port(values["envoy-port"], label("envoy-port")),
        inbound_capture_port=_port(values["inbound-capture-port"], label("inbound-capture-port")),
        inbound_tunnel_port=_port(values["inbound-tunnel-port"], label("inbound-tunnel-port")),
        proxy_uids=uids,
        proxy_gids=gids,
        tproxy=mode == "TPROXY",
        inbound_ports_all=inbound == "*",
        inbound_ports=() if inbound == "*" else _ports(inbound, label("istio-inbound-ports")),
        local_exclude_ports=_ports(values["istio-local-exclude-ports"],
                                   label("istio-local-exclude-ports")),
        exclude_interfaces=_names(values["istio-exclude-interfaces"],
                                  label("istio-exclude-interfaces"), "interface"),
        outbound_include=parse_cidrs(values["istio-service-cidr"], label("istio-service-cidr")),
        outbound_exclude=parse_cidrs(exclude_cidr, label("istio-service-exclude-cidr")),
        outbound_ports_include=_ports(values["istio-outbound-ports"],
                                      label("istio-outbound-ports")),
        outbound_ports_exclude=_ports(values["istio-local-outbound-ports-exclude"],
                                      label("istio-local-outbound-ports-exclude")),
        kube_virt_interfaces=_names(values["kube-virt-interfaces"], label("kube-virt-interfaces"),
                                    "interface"),
        tproxy_mark=_int(values["istio-inbound-tproxy-mark"], label("istio-inbound-tproxy-mark")),
        tproxy_route_table=_int(values["istio-inbound-tproxy-route-table"],
                                label("istio-inbound-tproxy-route-table")),
        dry_run=parse_go_bool(values["dry-run"]),
        probe_port=int(values["iptables-probe-port"]),
        probe_timeout=parse_go_duration(values["probe-timeout"]),
        skip_rule_apply=parse_go_bool(values["skip-rule-apply"]),
        run_validation=parse_go_bool(values["run-validation"]),
        redirect_dns=parse_go_bool(values["redirect-dns"]),
        capture_all_dns=parse_go_bool(values["capture-all-dns"]),
        drop_invalid=parse_go_bool(values["drop-invalid"]),
        dual_stack=parse_go_bool(values["dual-stack"]),
        network_namespace=values["network-namespace"],
        cni_mode=parse_go_bool(values["cni-mode"]),
        reconcile=parse_go_bool(values["reconcile"]),
        cleanup_only=parse_go_bool(values["cleanup-only"]),
        force_apply=parse_go_bool(values["force-apply"]),
        native_nftables=parse_go_bool(values["native-nftables"]),
        force_iptables_binary=binary,  # type: ignore[arg-type]  # checked above
        owner_groups=groups,
        ipv4_loopback_cidr=loopback,
        dry_run_file=env.get("DRY_RUN_FILE_PATH", ""),
        facts=facts or HostFacts(),
    )
