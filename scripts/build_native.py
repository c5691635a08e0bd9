"""Compile the request path's modules (the gateway's, and the router, access log and
metrics it calls per request) with mypyc, part of mypy, so their per-request work runs as
C: the gateway's own cost per request is about half, measured by ``bench/gateway_micro.py``.
scripts/install runs this; nothing else needs to.

    .venv/bin/python scripts/build_native.py          # build if sources changed
    .venv/bin/python scripts/build_native.py --force  # build again anyway

The extension modules go to ``<venv>/lib/phloem-native`` with a manifest of the sources'
SHA-256, never beside the sources: :mod:`phloem.system.native` loads them only while every
compiled source is unchanged (an edited module runs as Python until the next build), and
``PHLOEM_NATIVE=0`` turns them off. A machine without a C compiler or Python's headers
keeps the pure-Python gateway: this prints why and exits 0.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from phloem.system.native import ROOT, digest, verified_files

REPO = Path(__file__).resolve().parent.parent
SRC = REPO / "src"
PACKAGE = SRC / "phloem"
#: The gateway's modules but its package file (which installs the finder) and the ACME
#: client (off the request path), and what the gateway calls for every request. Their
#: packages' __init__ call phloem.system.native.install().
MODULES = sorted([
    *(p for p in (PACKAGE / "gateway").glob("*.py") if p.name != "__init__.py"),
    PACKAGE / "control" / "logs.py",
    PACKAGE / "control" / "routes.py",
    PACKAGE / "server" / "dispatch.py",
    PACKAGE / "server" / "metrics.py",
    PACKAGE / "supervisor" / "supervisor.py",
])
#: The name of the library the modules share (a top-level module beside them).
GROUP = "phloem_native"


def module_name(path: Path) -> str:
    return ".".join(path.relative_to(SRC).with_suffix("").parts)


def manifest(files: dict[str, str]) -> dict[str, object]:
    """What phloem.system.native checks: this Python, each module's source and its digest,
    and the built extension of each module (``files``, relative to ROOT)."""
    return {
        "python": sys.version,
        "modules": {module_name(p): {"source": str(p.relative_to(PACKAGE)),
                                     "sha256": digest(p), "file": files[module_name(p)]}
                    for p in MODULES},
        "group": f"{GROUP}__mypyc",
        "group_file": files[f"{GROUP}__mypyc"],
    }


def current() -> bool:
    """The build in ROOT is the one phloem would load, and of exactly MODULES."""
    files = verified_files()
    return files is not None and set(files) == {module_name(p) for p in MODULES} | {
        f"{GROUP}__mypyc"}


SETUP = """\
import sys
from setuptools import setup
from mypyc.build import mypycify
setup(name="phloem-native", script_args=["build_ext", "--build-lib", sys.argv[1],
      "--build-temp", sys.argv[2]],
      ext_modules=mypycify(sys.argv[4:], opt_level="3", group_name="{group}",
                           target_dir=sys.argv[3]))
"""


def build() -> str | None:
    """Compile MODULES into ROOT; the reason on failure."""
    with tempfile.TemporaryDirectory(prefix="phloem-native-") as tmp:
        work = Path(tmp)
        (work / "setup.py").write_text(SETUP.format(group=GROUP))
        lib = work / "lib"
        # mypy names each module from the packages above its file, and keeps its cache
        # in the working directory.
        proc = subprocess.run(
            [sys.executable, str(work / "setup.py"), str(lib), str(work / "temp"),
             str(work / "c"), *map(str, MODULES)],
            cwd=work, capture_output=True, text=True)
        if proc.returncode != 0:
            lines = (proc.stdout + proc.stderr).strip().splitlines()
            return next((line for line in lines if ": error:" in line), lines[-1])
        staged = ROOT.with_name(ROOT.name + ".new")
        shutil.rmtree(staged, ignore_errors=True)
        shutil.copytree(lib, staged)
        files = {".".join(f.relative_to(staged).parts).split(".cpython")[0]:
                 str(f.relative_to(staged)) for f in staged.rglob("*.so")}
        missing = {module_name(p) for p in MODULES} - set(files)
        if missing:
            return f"not built: {', '.join(sorted(missing))}"
        (staged / "manifest.json").write_text(json.dumps(manifest(files), indent=1))
        shutil.rmtree(ROOT, ignore_errors=True)
        staged.rename(ROOT)
    return None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--force", action="store_true", help="build even if up to date")
    args = parser.parse_args()
    if not args.force and current():
        print(f"--> compiled request path up to date ({ROOT})")
        return 0
    try:
        import mypyc  # noqa: F401
    except ImportError:
        print("--> compiled request path skipped: mypyc (mypy) is not installed; "
              "it runs as Python")
        return 0
    print(f"--> compiling the request path with mypyc ({len(MODULES)} modules, "
          "a minute or two)")
    started = time.monotonic()
    reason = build()
    if reason is None:
        print(f"--> compiled {len(MODULES)} modules in {time.monotonic() - started:.0f} s "
              f"({ROOT})")
    else:
        shutil.rmtree(ROOT, ignore_errors=True)
        print(f"--> compiled request path skipped ({reason}); it runs as Python")
    return 0


if __name__ == "__main__":
    sys.exit(main())
