"""remora.native: which hot-path modules are compiled, and whether a compiled one is stale."""

from __future__ import annotations

import importlib.machinery
import os
from pathlib import Path

import pytest

from remora import native

SUFFIX = importlib.machinery.EXTENSION_SUFFIXES[0]


def test_every_listed_module_has_its_source() -> None:
    for module in native.MODULES:
        assert native.source(module).is_file(), module


def _tree(tmp: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path, Path]:
    pkg = tmp / "pkg"
    pkg.mkdir()
    a, b, c = (pkg / f"{n}.py" for n in "abc")
    for f in (a, b, c):
        f.write_text("x = 1\n")
        os.utime(f, (1000, 1000))
    monkeypatch.setattr(native, "SRC", tmp)
    monkeypatch.setattr(native, "MODULES", ("pkg.a", "pkg.b", "pkg.c"))
    native.write_stamp()                  # as a build of this list leaves it
    return a, b, c


def test_status_sorts_built_stale_and_missing(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    a, b, _c = _tree(tmp_path, monkeypatch)
    so_a = a.with_name("a" + SUFFIX)
    so_b = b.with_name("b" + SUFFIX)
    so_a.write_bytes(b"")
    so_b.write_bytes(b"")
    os.utime(so_a, (2000, 2000))      # built after its source
    os.utime(so_b, (500, 500))        # built before its source changed
    st = native.status()
    assert st.built == ("pkg.a",)
    assert st.stale == ("pkg.b",)
    assert st.missing == ("pkg.c",)
    assert "older than their source" in st.summary and "pkg.b" in st.summary


def test_a_compiled_module_no_longer_listed_is_stale(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """It would shadow its source (Python imports the extension first)."""
    _tree(tmp_path, monkeypatch)
    monkeypatch.setattr(native, "SRC", tmp_path)
    (tmp_path / "remora").mkdir()
    (tmp_path / "remora" / ("gone" + SUFFIX)).write_bytes(b"")
    st = native.status()
    assert st.stale == ("remora.gone",)


def test_summary_names_the_pure_and_the_complete_cases(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    files = _tree(tmp_path, monkeypatch)
    assert native.status().summary.startswith("pure Python")
    for f in files:
        so = f.with_name(f.stem + SUFFIX)
        so.write_bytes(b"")
        os.utime(so, (3000, 3000))
    st = native.status()
    assert st.built == ("pkg.a", "pkg.b", "pkg.c") and not st.stale and not st.missing
    assert st.summary == "all 3 hot-path modules compiled (mypyc)"


def test_a_build_for_another_module_list_is_stale(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Its shared library holds every module's code: after a module leaves the list (its
    shim deleted by hand), the others would still call its compiled code."""
    files = _tree(tmp_path, monkeypatch)
    for f in files[:2]:
        so = f.with_name(f.stem + SUFFIX)
        so.write_bytes(b"")
        os.utime(so, (3000, 3000))
    monkeypatch.setattr(native, "MODULES", ("pkg.a", "pkg.b"))      # pkg.c left the list
    st = native.status()
    assert st.stale == ("pkg.a", "pkg.b") and "another module list" in st.summary
    native.write_stamp()
    assert native.status().built == ("pkg.a", "pkg.b") and native.status().complete
    native.stamp().unlink()                                         # a build before stamps
    assert native.status().stale == ("pkg.a", "pkg.b")
