"""Compile Remora's hot-path modules (remora.native.MODULES) to C extensions with mypyc, in
place next to their sources; or remove them.

    python tools/build_native.py            build when a compiled module is missing or stale
    python tools/build_native.py --force    build all of them again
    python tools/build_native.py --clean    remove them (the same modules then run interpreted)
    python tools/build_native.py --check    exit 1 unless every module is compiled and current

Needs mypy (mypyc ships with it), setuptools and a C compiler with the Python headers
(Debian: gcc, python3-dev). Intermediate files go to build/native/. Exit codes: 0 done,
1 build failed or --check found missing/stale modules, 2 usage.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
BUILD = ROOT / "build" / "native"
sys.path.insert(0, str(SRC))

from remora import native  # noqa: E402  (the module list lives with the package)

# Run with cwd=src so mypyc names the modules remora.…; mypy finds pyproject.toml's settings
# in the parent directory. setuptools must not see that pyproject.toml (it would build the
# whole project), hence cwd=src and an explicit script.
SETUP = """
import sys
from setuptools import setup
from mypyc.build import mypycify
paths, target = sys.argv[1].split(","), sys.argv[2]
setup(name="remora-native", ext_modules=mypycify(paths, opt_level="3", target_dir=target),
      script_args=["build_ext", "--inplace", "--parallel", str(__import__("os").cpu_count()),
                   "--build-temp", target + "/temp"])
"""


def group_libraries() -> list[Path]:
    """mypyc's shared runtime library of a build: ``<hash>__mypyc.<suffix>`` at the top."""
    return sorted(SRC.glob("*__mypyc*" + sysconfig.get_config_var("EXT_SUFFIX")))


def clean(quiet: bool = False) -> int:
    removed = 0
    for so in native.extension_files():     # listed or not (a module may have left the list)
        so.unlink()
        removed += 1
    for lib in group_libraries():
        lib.unlink()
        removed += 1
    native.stamp().unlink(missing_ok=True)
    if not quiet:
        print(f"removed {removed} compiled file(s): the hot-path modules run interpreted")
    return 0


def build() -> int:
    if shutil.which(sysconfig.get_config_var("CC").split()[0] or "cc") is None:
        print("Error: no C compiler (Debian: apt install gcc python3-dev)", file=sys.stderr)
        return 1
    include = sysconfig.get_paths()["include"]
    if not Path(include, "Python.h").exists():
        print(f"Error: no Python.h in {include} (Debian: apt install python3-dev)",
              file=sys.stderr)
        return 1
    clean(quiet=True)
    BUILD.mkdir(parents=True, exist_ok=True)
    paths = [str(native.source(m).relative_to(SRC)) for m in native.MODULES]
    print(f"compiling {len(paths)} modules with mypyc (about a minute per core)...",
          flush=True)
    log = BUILD / "build.log"
    with log.open("w") as out:
        proc = subprocess.run([sys.executable, "-c", SETUP, ",".join(paths), str(BUILD)],
                              cwd=SRC, stdout=out, stderr=subprocess.STDOUT, check=False,
                              env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"})
    if proc.returncode != 0:
        clean(quiet=True)
        tail = log.read_text(errors="replace").splitlines()[-15:]
        print("\n".join(tail), file=sys.stderr)
        print(f"Error: mypyc build failed (full log: {log}); nothing compiled is left in "
              "place, the modules run interpreted", file=sys.stderr)
        return 1
    # An incremental build copies unchanged shims with their old times: stamp them all now
    # (remora.native.status compares each one's time with its source's).
    for module in native.MODULES:
        so = native.compiled(module)
        if so is not None:
            os.utime(so)
    native.write_stamp()
    st = native.status()
    print(st.summary)
    return 0 if st.complete else 1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="build_native.py", description=__doc__.split("\n")[0])
    g = p.add_mutually_exclusive_group()
    g.add_argument("--force", action="store_true", help="rebuild everything")
    g.add_argument("--clean", action="store_true", help="remove the compiled modules")
    g.add_argument("--check", action="store_true",
                   help="exit 1 unless every module is compiled and current")
    ns = p.parse_args(argv)
    if ns.clean:
        return clean()
    st = native.status()
    if ns.check:
        print(st.summary)
        return 0 if st.complete else 1
    if not ns.force and st.complete:
        print(st.summary)
        return 0
    return build()


if __name__ == "__main__":
    sys.exit(main())
