"""Istio's own golden files for istio-iptables, compared the way the corpus README says."""

from __future__ import annotations

from pathlib import Path

import pytest

from remora.capture.apply import RecordingExecutor, run_iptables
from remora.capture.render import command_lines, restore_text
from remora.capture.rules import Rule

from .corpus import cases, config_for, expected, load

MAIN = cases()
CNI = cases("cni-plugin")
BUILDER = cases("builder")


def test_corpus_is_complete() -> None:
    # The issue names 27 main cases and the cni-plugin and builder folders.
    assert len(MAIN) == 27
    assert len(CNI) == 9
    assert len(BUILDER) == 6


@pytest.mark.parametrize("path", MAIN, ids=[p.stem for p in MAIN])
def test_main_transcript(path: Path) -> None:
    case = load(path)
    rec = RecordingExecutor()
    run_iptables(config_for(case), rec)
    assert "\n".join(rec.lines).strip() == expected(path, case).strip()


def _table_map(text: str) -> dict[str, str]:
    blocks: dict[str, str] = {}
    for block in text.split("COMMIT"):
        lines = [ln for ln in block.strip().splitlines()
                 if ln and ln not in ("iptables-save", "ip6tables-save")]
        if lines:
            blocks[lines[0]] = "\n".join(lines)
    return blocks


@pytest.mark.parametrize("path", CNI, ids=[p.stem for p in CNI])
def test_cni_plugin(path: Path) -> None:
    case = load(path)
    rec = RecordingExecutor()
    run_iptables(config_for(case), rec)
    assert _table_map(rec.transcript) == _table_map(expected(path, case))


def _ops(raw: list[dict[str, object]], family: str) -> list[Rule]:
    return [Rule(table=str(o["table"]), chain=str(o["chain"]),
                 params=tuple(str(p) for p in o["params"]),  # type: ignore[attr-defined]
                 position=int(o["position"]) if o.get("position") else None)  # type: ignore[call-overload]
            for o in raw if o["family"] == family]


@pytest.mark.parametrize("path", BUILDER, ids=[p.stem for p in BUILDER])
def test_builder(path: Path) -> None:
    case = load(path)
    files = case["expected_files"]
    if "commands" in files:
        variants = [_ops(case["ops"], "v4")]
        if case.get("ops_v6_variant"):
            variants.append(_ops(case["ops_v6_variant"], "v6"))
        for ops in variants:
            assert "\n".join(command_lines(ops)).strip() == expected(path, case, "commands").strip()
            assert restore_text(ops).strip() == expected(path, case, "restore").strip()
    else:
        for fam in ("v4", "v6"):
            ops = _ops(case["ops"], fam)
            assert ("\n".join(command_lines(ops)).strip()
                    == expected(path, case, f"commands_{fam}").strip())
            assert restore_text(ops).strip() == expected(path, case, f"restore_{fam}").strip()
