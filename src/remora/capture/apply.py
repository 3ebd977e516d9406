"""Applying capture rules to the current network namespace: the only module that runs
iptables, ip6tables, nft or talks netlink for `remora iptables`.

Owns: the executor seam (a real subprocess runner and Istio's recording dry-run stub), the
choice of legacy vs nft binaries, the state check, the atomic apply (one
``iptables-restore --noflush`` per family), replacement of a different earlier rule set,
``--cleanup-only``, the TPROXY ``ip rule``/``ip route`` and the ``::6`` address on ``lo``.
Must not: decide which rules exist (see :mod:`remora.capture.rules`) or format text (see
:mod:`remora.capture.render`).

Reference: spec ``capture-istio-iptables.md`` §9.3, §10 (Istio
``tools/istio-iptables/pkg/capture/run.go``, ``pkg/dependencies``).
"""

from __future__ import annotations

import logging
import re
import shutil
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol

from remora.capture.config import CaptureConfig
from remora.capture.render import (
    cleanup_commands,
    cleanup_restore_text,
    parse_save,
    restore_text,
)
from remora.capture.rules import OUTBOUND_MARK, Rule, RuleSet, build_rules
from remora.errors import ApplyFailed, EnvironmentFault

log = logging.getLogger(__name__)

Family = Literal[4, 6]


@dataclass(frozen=True, slots=True)
class Result:
    rc: int
    stdout: str = ""
    stderr: str = ""


class Executor(Protocol):
    def run(self, argv: Sequence[str], stdin: str | None = None) -> Result: ...


class SubprocessExecutor:
    """Runs commands for real; a missing binary is an environment fault."""

    def __init__(self, timeout: float = 60.0) -> None:
        self.timeout = timeout

    def run(self, argv: Sequence[str], stdin: str | None = None) -> Result:
        try:
            proc = subprocess.run(list(argv), input=stdin, capture_output=True, text=True,
                                  timeout=self.timeout, check=False)
        except FileNotFoundError:
            raise EnvironmentFault(f"{argv[0]}: command not found (install iptables / nftables"
                                   " / iproute2)") from None
        except subprocess.TimeoutExpired:
            raise EnvironmentFault(f"{argv[0]} did not finish within {self.timeout:g}s") from None
        return Result(proc.returncode, proc.stdout, proc.stderr)


class RecordingExecutor:
    """Istio's dry-run stub: records each call as one line, runs nothing.

    A restore call is recorded as the lines of its stdin; anything else as ``argv`` joined by
    spaces. ``-save`` calls return nothing, so the state check always sees a clean namespace.
    When ``path`` is set the whole transcript is rewritten there after every call, as Istio
    does with ``DRY_RUN_FILE_PATH``.
    """

    def __init__(self, path: str = "") -> None:
        self.path = path
        self.lines: list[str] = []

    def run(self, argv: Sequence[str], stdin: str | None = None) -> Result:
        if stdin is not None:
            self.lines.extend(stdin.splitlines())
        else:
            self.lines.append(" ".join(argv))
        if self.path:
            with open(self.path, "w", encoding="utf-8") as fh:
                fh.write("".join(line + "\n" for line in self.lines))
        return Result(0)

    @property
    def transcript(self) -> str:
        return "".join(line + "\n" for line in self.lines)


# ---------------------------------------------------------------------- binary selection


@dataclass(frozen=True, slots=True, kw_only=True)
class Xtables:
    """One family's iptables triple: ``X``, ``X-save``, ``X-restore``."""

    family: Family
    binary: str
    variant: Literal["legacy", "nft", ""] = ""
    version: tuple[int, ...] = ()

    @property
    def save(self) -> str:
        return f"{self.binary}-save"

    @property
    def restore(self) -> str:
        return f"{self.binary}-restore"

    @property
    def wait(self) -> tuple[str, ...]:
        # Legacy iptables >= 1.6.2 serialises writers with a lock; nft never locks.
        return ("--wait=30",) if self.variant == "legacy" and self.version >= (1, 6, 2) else ()


_VERSION_RE = re.compile(r"v(\d+(?:\.\d+)+)")


def plain_xtables(family: Family) -> Xtables:
    return Xtables(family=family, binary="iptables" if family == 4 else "ip6tables")


def detect_xtables(ex: Executor, family: Family, force: str = "") -> Xtables:
    """Choose legacy or nft binaries as Istio does (spec §10.1).

    Two deliberate differences: "existing rules" means the save output holds a rule (``-A``),
    not merely three lines; and legacy is only probed when it holds rules or nft is unusable,
    so the empty legacy nat table a probe leaves behind never flips the choice to legacy.
    """
    base = "iptables" if family == 4 else "ip6tables"
    if force:
        found = _probe_xtables(ex, family, f"{base}-{force}") \
            if shutil.which(f"{base}-{force}") else None
        if found is None:
            raise EnvironmentFault(f"{base}-{force} is not usable here (forced by "
                                   "--force-iptables-binary)")
        return found[0]
    legacy, nft = f"{base}-legacy", f"{base}-nft"
    # Legacy wins only when it already holds rules; look before probing, because the probe
    # itself would create legacy tables (and iptables-nft then warns about them forever).
    if shutil.which(legacy) and _has_rules(ex, legacy):
        found = _probe_xtables(ex, family, legacy)
        if found is not None:
            return found[0]
    for binary in (nft, legacy):
        if shutil.which(binary):
            found = _probe_xtables(ex, family, binary)
            if found is not None:
                return found[0]
    if shutil.which(base) is None:
        raise EnvironmentFault(f"{base}: command not found (install the iptables package)")
    return Xtables(family=family, binary=base)


def _has_rules(ex: Executor, binary: str) -> bool:
    saved = ex.run([f"{binary}-save"])
    return saved.rc == 0 and any(line.startswith("-A ") for line in saved.stdout.splitlines())


def _probe_xtables(ex: Executor, family: Family, binary: str) -> tuple[Xtables, bool] | None:
    saved = ex.run([f"{binary}-save"])
    if saved.rc != 0:
        return None
    has_rules = any(line.startswith("-A ") for line in saved.stdout.splitlines())
    ver = ex.run([f"{binary}-save", "--version"])
    if ver.rc != 0 or "unrecognized option" in ver.stderr:
        variant: Literal["legacy", "nft"] = "legacy"
        version: tuple[int, ...] = (0, 0, 0)
    else:
        m = _VERSION_RE.search(ver.stdout + ver.stderr)
        if not m:
            return None
        version = tuple(int(p) for p in m.group(1).split("."))
        variant = "nft" if "nf_tables" in ver.stdout + ver.stderr else "legacy"
    x = Xtables(family=family, binary=binary, variant=variant, version=version)
    probe = ["-t", "nat", "-A", "INPUT", "-p", "255", "-j", "RETURN"]
    added = ex.run([binary, *x.wait, *probe])
    if added.rc != 0 or "does not exist" in added.stderr:
        return None
    ex.run([binary, *x.wait, "-t", "nat", "-D", *probe[3:]])
    return x, has_rules


# -------------------------------------------------------------------------- state check

# Shapes of the rules istio-iptables puts in built-in chains, as iptables-save prints them,
# so a rule set written with other flags can be found and replaced. Anything else in a
# built-in chain belongs to someone else and is left alone.
_OURS_IN_BUILTIN = (
    re.compile(r"-j ISTIO_[A-Z_]+$"),
    re.compile(r"^-A (PREROUTING|OUTPUT) -[io] \S+ -j RETURN$"),
    re.compile(r"^-A PREROUTING -p tcp -m mark --mark \S+ -j CONNMARK --save-mark\b"),
    re.compile(r"^-A OUTPUT -o lo -p tcp -m mark --mark \S+ -j RETURN$"),
    re.compile(r"^-A OUTPUT ! -d \S+ -o lo -p tcp -m owner --[ug]id-owner \S+ "
               rf"-j MARK --set-xmark 0x{OUTBOUND_MARK:x}/0xffffffff$"),
    re.compile(r"^-A OUTPUT -p tcp -m connmark --mark \S+ -j CONNMARK --restore-mark\b"),
)
_TABLES = ("filter", "mangle", "nat", "raw")
_BUILTIN = ("PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING")


@dataclass(slots=True)
class FamilyState:
    """What our rules look like in one family right now."""

    chains: dict[tuple[str, str], int] = field(default_factory=dict)  # ISTIO_* chain -> rules
    builtin: list[tuple[str, str]] = field(default_factory=list)  # (table, saved rule) ours

    @property
    def empty(self) -> bool:
        return not self.chains and not self.builtin


def read_state(ex: Executor, x: Xtables) -> FamilyState:
    saved = ex.run([x.save])
    state = FamilyState()
    if saved.rc != 0:
        return state
    for name, table in parse_save(saved.stdout).items():
        if name not in _TABLES:
            continue
        for chain, rules in table.chains.items():
            if chain.startswith("ISTIO"):
                state.chains[(name, chain)] = len(rules)
            elif chain in _BUILTIN:
                state.builtin += [(name, r) for r in rules
                                  if any(p.search(r) for p in _OURS_IN_BUILTIN)]
    return state


def in_place(ex: Executor, x: Xtables, rules: Sequence[Rule], state: FamilyState) -> bool:
    """True when exactly ``rules`` are installed: same ISTIO chains with the same rule counts,
    the same number of our rules in built-in chains, and every rule found by ``-C``."""
    want: dict[tuple[str, str], int] = {}
    builtin = 0
    for r in rules:
        if r.chain.startswith("ISTIO"):
            want[(r.table, r.chain)] = want.get((r.table, r.chain), 0) + 1
        else:
            builtin += 1
        if r.target and r.target.startswith("ISTIO"):
            want.setdefault((r.table, r.target), 0)
    if want != state.chains or builtin != len(state.builtin):
        return False
    for r in rules:
        check = ex.run([x.binary, *x.wait, "-t", r.table, "-C", r.chain, *r.params])
        if check.rc != 0:
            return False
    return True


def replacement_prefix(state: FamilyState) -> dict[str, list[str]]:
    """Restore lines, per table, that take out an earlier rule set before the new one goes in:
    flush every ISTIO chain, delete our jumps and marks from built-in chains, delete the
    chains. Chains are re-created by the new text's ``-N`` lines."""
    out: dict[str, list[str]] = {}
    for table, chain in state.chains:
        out.setdefault(table, []).append(f"-F {chain}")
    for table, rule in state.builtin:
        out.setdefault(table, []).append("-D" + rule[2:])
    for table, chain in state.chains:
        out.setdefault(table, []).append(f"-X {chain}")
    return out


def merge_restore(prefix: dict[str, list[str]], text: str) -> str:
    """Put ``prefix`` lines at the head of each table block of restore ``text``."""
    lines: list[str] = []
    seen: set[str] = set()
    for line in text.splitlines():
        lines.append(line)
        if line.startswith("* "):
            table = line[2:]
            seen.add(table)
            lines += prefix.get(table, [])
    for table, extra in sorted(prefix.items()):
        if table not in seen:
            lines += [f"* {table}", *extra, "COMMIT"]
    return "".join(line + "\n" for line in lines)


# ------------------------------------------------------------------------------- apply


_LINE_RE = re.compile(r"line:? (\d+)")


def _restore(ex: Executor, x: Xtables, text: str) -> None:
    result = ex.run([x.restore, "--noflush", *x.wait], stdin=text)
    if result.rc == 0:
        return
    msg = (result.stderr or result.stdout).strip().splitlines()
    detail = msg[-1] if msg else f"exit code {result.rc}"
    m = _LINE_RE.search(result.stderr)
    if m:
        lines = text.splitlines()
        n = int(m.group(1))
        if 0 < n <= len(lines):
            detail += f": {lines[n - 1]!r}"
    raise ApplyFailed(f"{x.restore} refused the rules, nothing was applied: {detail}")


@dataclass(slots=True)
class Outcome:
    """What a run did, for logging and tests."""

    applied: dict[int, str] = field(default_factory=dict)  # family -> restore text sent
    replaced: bool = False
    unchanged: bool = False
    cleaned: bool = False


def run_iptables(cfg: CaptureConfig, ex: Executor, *,
                 xtables: dict[int, Xtables] | None = None,
                 netlink: Callable[[CaptureConfig, bool], None] | None = None) -> Outcome:
    """The iptables program of istio-iptables (spec §9.3, §10), through ``ex``.

    With the recording executor this produces Istio's dry-run transcript exactly. For real
    runs, differences from Istio (documented in README): a namespace holding a rule set from
    other flags is replaced in the same atomic restore instead of failing on ``-N``, and
    ``--cleanup-only`` also removes the TPROXY ``ip rule``/``ip route`` (via ``netlink``).
    """
    rules = build_rules(cfg)
    ipv6 = cfg.facts.enable_ipv6
    families: tuple[Family, ...] = (4, 6) if ipv6 else (4,)
    xt: dict[int, Xtables] = xtables or {4: plain_xtables(4), 6: plain_xtables(6)}
    outcome = Outcome()
    # The state check reads both families, always (Istio's transcript starts with both).
    states: dict[int, FamilyState] = {fam: read_state(ex, xt[fam]) for fam in (4, 6)}
    if cfg.cleanup_only:
        for fam in families:
            _cleanup(cfg, ex, xt[fam], rules.family(fam), states[fam])
        outcome.cleaned = True
    else:
        outcome = _apply(cfg, ex, xt, rules, families, states)
    for fam in families:
        ex.run([xt[fam].save])
    if netlink is not None and not cfg.dry_run:
        netlink(cfg, cfg.cleanup_only)
    return outcome


def _cleanup(cfg: CaptureConfig, ex: Executor, x: Xtables, rules: Sequence[Rule],
             state: FamilyState) -> None:
    """Remove what ``rules`` installed.

    Dry-run records Istio's per-command deletes. For real, everything goes in one restore
    transaction; if that is refused (part of the rule set is already gone) the per-command
    deletes run with errors ignored, as Istio runs them.
    """
    if not cfg.dry_run:
        if state.empty:
            return
        done = ex.run([x.restore, "--noflush", *x.wait], stdin=cleanup_restore_text(rules))
        if done.rc == 0:
            return
        log.info("partial rule set found; removing rule by rule")
    for args in cleanup_commands(rules):
        ex.run([x.binary, *x.wait, *args])


def _apply(cfg: CaptureConfig, ex: Executor, xt: dict[int, Xtables], rules: RuleSet,
           families: tuple[Family, ...], states: dict[int, FamilyState]) -> Outcome:
    outcome = Outcome()
    texts: dict[int, str] = {}
    for fam in families:
        state = states[fam]
        text = restore_text(rules.family(fam))
        if state.empty:
            texts[fam] = text
        elif not cfg.force_apply and in_place(ex, xt[fam], rules.family(fam), state):
            continue
        else:
            texts[fam] = merge_restore(replacement_prefix(state), text)
            outcome.replaced = True
    if not texts:
        outcome.unchanged = True
        return outcome
    # Legacy iptables commits table by table; test the whole input first so a refusal in a
    # later table cannot leave an earlier one applied. (nft commits one transaction.)
    for key, text in texts.items():
        if xt[key].variant == "legacy" and not cfg.dry_run:
            test = ex.run([xt[key].restore, "--noflush", "--test", *xt[key].wait], stdin=text)
            if test.rc != 0:
                _restore(ex, xt[key], text)  # reports the refused line
    for fam in families:
        if fam in texts:
            _restore(ex, xt[fam], texts[fam])
            outcome.applied[fam] = texts[fam]
    return outcome
