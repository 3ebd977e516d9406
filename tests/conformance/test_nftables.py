"""Istio's nftables goldens (``--native-nftables``), compared the way the corpus README says:
the transaction lines joined with newlines, both sides trimmed, exact equality."""

from __future__ import annotations

from pathlib import Path

import pytest

from remora.capture.nft import build_nft

from .corpus import cases, config_for, expected, load

NFT = cases("nftables")


def test_nftables_corpus_is_complete() -> None:
    assert len(NFT) == 28


@pytest.mark.parametrize("path", NFT, ids=[p.stem for p in NFT])
def test_nftables_transaction(path: Path) -> None:
    case = load(path)
    cfg = config_for(case)
    assert cfg.native_nftables
    assert "\n".join(build_nft(cfg)).strip() == expected(path, case).strip()
