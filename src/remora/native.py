"""Which modules are compiled to C with mypyc, and whether the compiled ones are current.

Owns: :data:`MODULES` (the proxy's per-request path: codecs, connection manager, pools,
routing, telemetry and what they call per event; not the L4 relay, bound by its system
calls, where compiling gained nothing measurable), :func:`status` and :func:`extension_files`.
The sources stay the typed Python in this tree (checked by ``mypy --strict``); ``./dev build``
(``tools/build_native.py``) compiles them in place, next to each ``.py``, where Python's import
system prefers the extension module. Without a C compiler nothing is built and the same
modules run interpreted (about 1.7x fewer HTTP requests per second).
Must not: import the modules it lists (it is read by the build and at start-up).
"""

from __future__ import annotations

import importlib.machinery
from dataclasses import dataclass
from pathlib import Path

MODULES: tuple[str, ...] = (
    "remora.proxy.model",
    "remora.proxy.stats",
    "remora.proxy.timers",
    "remora.proxy.lb",
    "remora.proxy.upstream",
    "remora.proxy.http.types",
    "remora.proxy.http.hpack_codec",
    "remora.proxy.http.h2codec",
    "remora.proxy.http.h1",
    "remora.proxy.http.hashing",
    "remora.proxy.http.routes",
    "remora.proxy.http.pool",
    "remora.proxy.http.accesslog",
    "remora.proxy.http.telemetry",
    "remora.proxy.http.tracing",
    "remora.proxy.http.hcm",
)

SRC = Path(__file__).resolve().parents[1]


def source(module: str) -> Path:
    return SRC.joinpath(*module.split(".")).with_suffix(".py")


def compiled(module: str) -> Path | None:
    """The extension module built for ``module`` (any ABI suffix of this interpreter)."""
    base = SRC.joinpath(*module.split("."))
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        path = base.with_name(base.name + suffix)
        if path.exists():
            return path
    return None


@dataclass(frozen=True, slots=True)
class Status:
    built: tuple[str, ...]      # compiled and at least as new as their source
    stale: tuple[str, ...]      # compiled, but the source changed since (or not listed)
    missing: tuple[str, ...]    # not compiled: these run interpreted

    @property
    def complete(self) -> bool:
        """Every listed module compiled and current, nothing left over."""
        return not self.stale and not self.missing

    @property
    def summary(self) -> str:
        n = len(MODULES)
        if self.stale:
            return (f"stale compiled modules (older than their source, no longer listed, or "
                    f"built with another module list; run ./dev build): "
                    f"{', '.join(self.stale)}")
        if not self.built:
            return "pure Python (no compiled modules: ./dev build compiles them)"
        if self.missing:
            return f"{len(self.built)} of {n} modules compiled (mypyc); interpreted: " \
                   f"{', '.join(self.missing)}"
        return f"all {n} hot-path modules compiled (mypyc)"


def stamp() -> Path:
    """Written by the build: the module list its shared library (mypyc's group
    ``<hash>__mypyc`` library, which holds every module's code) was compiled from."""
    return SRC / "remora-native-modules.txt"


def write_stamp() -> None:
    stamp().write_text("".join(m + "\n" for m in MODULES))


def extension_files() -> list[Path]:
    """Every extension module under ``remora/`` (the package has none but these)."""
    return sorted({p for suffix in importlib.machinery.EXTENSION_SUFFIXES
                   for p in (SRC / "remora").rglob("*" + suffix)})


def module_of(path: Path) -> str:
    rel = path.relative_to(SRC)
    name = rel.name.split(".", 1)[0]
    return ".".join((*rel.parent.parts, name))


def status() -> Status:
    built: list[str] = []
    stale: list[str] = []
    missing: list[str] = []
    # one left from a build whose list included it: it would shadow the current source
    stale += [m for m in map(module_of, extension_files()) if m not in MODULES]
    shims = [m for m in MODULES if compiled(m) is not None]
    if shims:
        # The compiled modules call each other inside one shared library: built from another
        # list, it would still serve a module since dropped (its shim deleted by hand).
        try:
            listed = stamp().read_text().split()
        except OSError:
            listed = []
        if listed != list(MODULES):
            stale += shims
    for module in MODULES:
        so = compiled(module)
        if so is None:
            missing.append(module)
        elif module in stale:
            continue
        elif so.stat().st_mtime < source(module).stat().st_mtime:
            stale.append(module)
        else:
            built.append(module)
    return Status(tuple(built), tuple(stale), tuple(missing))
