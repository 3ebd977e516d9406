"""Text forms of a rule list: iptables-restore input, per-rule commands, cleanup, and
parsing of ``iptables-save`` output.

Owns: the exact layout Istio produces (``* nat`` with a space, tables in alphabetical order,
``-N`` lines first, ``COMMIT``), the historical one-command-per-rule form, the cleanup command
list of ``--cleanup-only``, and the reading of ``iptables-save`` text into tables, chains and
rules for the state check.
Must not: run anything.

Reference: spec ``capture-istio-iptables.md`` §9, §10.3, §10.5 (Istio
``tools/istio-iptables/pkg/builder/iptables_builder_impl.go``).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Literal

from remora.capture.rules import BUILTIN_CHAINS, BUILTIN_TARGETS, Rule


def _is_builtin(name: str) -> bool:
    return name in BUILTIN_CHAINS or name in BUILTIN_TARGETS


def _by_table(rules: Iterable[Rule]) -> dict[str, list[Rule]]:
    tables: dict[str, list[Rule]] = {}
    for rule in rules:
        tables.setdefault(rule.table, []).append(rule)
    return dict(sorted(tables.items()))


def new_chains(rules: Sequence[Rule]) -> list[str]:
    """Chains a table's rules need created: their own chains, then bare jump targets."""
    chains: list[str] = []
    for rule in rules:
        if not _is_builtin(rule.chain) and rule.chain not in chains:
            chains.append(rule.chain)
    for rule in rules:
        target = rule.target
        if target and not _is_builtin(target) and target not in chains:
            chains.append(target)
    return chains


def restore_text(rules: Sequence[Rule]) -> str:
    """The iptables-restore input for one family (empty string when there are no rules)."""
    out: list[str] = []
    for table, table_rules in _by_table(rules).items():
        out.append(f"* {table}")
        out += [f"-N {c}" for c in new_chains(table_rules)]
        out += [r.spec for r in table_rules]
        out.append("COMMIT")
    return "".join(line + "\n" for line in out)


def command_lines(rules: Sequence[Rule]) -> list[str]:
    """The one-command-per-rule form (arguments after the binary name), as Istio's builder
    renders it: every ``-N`` first, in first-use order, then every rule."""
    lines: list[str] = []
    seen: set[tuple[str, str]] = set()
    for rule in rules:
        key = (rule.table, rule.chain)
        if not _is_builtin(rule.chain) and key not in seen:
            seen.add(key)
            lines.append(f"-t {rule.table} -N {rule.chain}")
    lines += [f"-t {r.table} {r.spec}" for r in rules]
    return lines


def cleanup_commands(rules: Sequence[Rule]) -> list[list[str]]:
    """Commands (arguments after the binary) that remove what ``rules`` installed.

    Rules are taken in reverse; those inside a non-built-in chain are skipped (the chain is
    flushed anyway) unless they jump to another such chain, since a chain cannot be deleted
    while referenced. Then every non-built-in chain is flushed and deleted (spec §10.5).
    """
    cmds: list[list[str]] = []
    chains: list[tuple[str, str]] = []
    for rule in reversed(rules):
        own_chain = not _is_builtin(rule.chain)
        target = rule.target
        jumps_to_chain = target is not None and not _is_builtin(target)
        if own_chain and (rule.table, rule.chain) not in chains:
            chains.append((rule.table, rule.chain))
        if own_chain and not jumps_to_chain:
            continue
        cmds.append(list(rule.delete_args()))
    for table, chain in chains:
        cmds.append(["-t", table, "-F", chain])
        cmds.append(["-t", table, "-X", chain])
    return cmds


def cleanup_restore_text(rules: Sequence[Rule]) -> str:
    """:func:`cleanup_commands` as one iptables-restore input (one transaction)."""
    tables: dict[str, list[str]] = {}
    for args in cleanup_commands(rules):
        tables.setdefault(args[1], []).append(" ".join(args[2:]))
    out: list[str] = []
    for table, lines in sorted(tables.items()):
        out += [f"* {table}", *lines, "COMMIT"]
    return "".join(line + "\n" for line in out)


# ------------------------------------------------------------------------- iptables-save


@dataclass(slots=True)
class SavedTable:
    """One table of ``iptables-save`` output."""

    name: str
    chains: dict[str, list[str]] = field(default_factory=dict)  # chain -> rule specs (-A ...)
    policies: dict[str, str] = field(default_factory=dict)


SaveLineKind = Literal["table", "chain", "new", "rule", "other"]


@dataclass(frozen=True, slots=True)
class SaveLine:
    """One meaningful line of ``iptables-save`` text, classified."""

    number: int               # 1-based line number
    kind: SaveLineKind        # *table, :CHAIN POLICY, -N CHAIN, -A CHAIN …, anything else
    table: str                # the table it belongs to ("" before the first *table)
    chain: str = ""
    policy: str = ""          # chain lines: ACCEPT/DROP, or "-" for a user chain
    text: str = ""            # rule lines: "-A CHAIN …" without counters; other: the line


def scan_save(text: str) -> Iterator[SaveLine]:
    """Classify ``iptables-save`` lines; comments, blank lines and ``COMMIT`` are skipped and
    ``iptables-save -c`` counters (``[p:b] -A …``) are removed. Callers decide how strict to
    be about ``other`` lines."""
    table = ""
    for n, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#") or line == "COMMIT":
            continue
        if line.startswith("*"):
            table = line[1:].strip()
            yield SaveLine(n, "table", table)
            continue
        if line.startswith(":"):
            parts = line[1:].split()
            if parts:
                yield SaveLine(n, "chain", table, chain=parts[0],
                               policy=parts[1] if len(parts) > 1 else "")
            else:
                yield SaveLine(n, "other", table, text=line)
            continue
        if line.startswith("[") and "] " in line:
            line = line.split("] ", 1)[1]
        tokens = line.split()
        if len(tokens) >= 2 and tokens[0] in ("-A", "--append"):
            yield SaveLine(n, "rule", table, chain=tokens[1], text=line)
        elif len(tokens) >= 2 and tokens[0] in ("-N", "--new-chain"):
            yield SaveLine(n, "new", table, chain=tokens[1])
        else:
            yield SaveLine(n, "other", table, text=line)


def parse_save(text: str) -> dict[str, SavedTable]:
    """Parse ``iptables-save`` text into tables → chains → rules (``-A chain …`` lines),
    leniently: lines it does not know are skipped.

    Chain declarations (``:NAME POLICY [p:b]``, ``-N NAME``) register a chain even when it has
    no rules.
    """
    tables: dict[str, SavedTable] = {}
    for ln in scan_save(text):
        if not ln.table:
            continue
        current = tables.setdefault(ln.table, SavedTable(name=ln.table))
        if ln.kind in ("chain", "new"):
            current.chains.setdefault(ln.chain, [])
            if ln.policy:
                current.policies[ln.chain] = ln.policy
        elif ln.kind == "rule":
            current.chains.setdefault(ln.chain, []).append(" ".join(ln.text.split()))
    return tables
