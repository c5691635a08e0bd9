"""The compiled request path (phloem.system.native, built by scripts/build_native.py): used
when built from these very sources, never when one differs, off with PHLOEM_NATIVE=0.

Each case runs in a fresh interpreter: which modules serve is decided once per process.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from phloem.system.native import ROOT

PROBE = """
import json, sys
import phloem.system.native as native
from pathlib import Path
if len(sys.argv) > 1:
    native.ROOT = Path(sys.argv[1])
import phloem.server.dispatch, phloem.gateway.fastpath as fastpath
import phloem.gateway
print(json.dumps({"native": phloem.gateway.native, "fastpath": fastpath.__file__,
                  "dispatch": phloem.server.dispatch.__file__}))
"""


def probe(*args: str, **env: str) -> dict[str, object]:
    # Not inherited: scripts/test runs the gateway's tests a second time with it set.
    base = {k: v for k, v in os.environ.items() if k != "PHLOEM_NATIVE"}
    proc = subprocess.run([sys.executable, "-c", PROBE, *args], capture_output=True,
                          text=True, env={**base, **env}, timeout=60)
    assert proc.returncode == 0, proc.stderr
    result: dict[str, object] = json.loads(proc.stdout)
    return result


def built() -> bool:
    return (ROOT / "manifest.json").exists()


def test_the_build_serves_when_its_sources_are_these() -> None:
    if not built():
        # scripts/install builds it wherever a compiler is; CI must run what users run.
        assert not os.environ.get("CI"), f"no compiled request path in {ROOT} under CI"
        pytest.skip(f"not built here ({ROOT}): scripts/install builds it")
    out = probe()
    assert out["native"] is True
    assert str(out["fastpath"]).endswith(".so") and str(out["dispatch"]).endswith(".so")


def test_off_with_phloem_native_0() -> None:
    out = probe(PHLOEM_NATIVE="0")
    assert out["native"] is False
    assert str(out["fastpath"]).endswith("fastpath.py")


def build_copy(tmp_path: Path, edit: Callable[[dict[str, Any]], None] | None = None) -> Path:
    """A copy of the real build, its manifest changed by ``edit``."""
    if not built():
        pytest.skip(f"not built here ({ROOT})")
    root = tmp_path / "native"
    shutil.rmtree(root, ignore_errors=True)
    shutil.copytree(ROOT, root)
    if edit is not None:
        manifest = json.loads((root / "manifest.json").read_text())
        edit(manifest)
        (root / "manifest.json").write_text(json.dumps(manifest))
    return root


def test_a_changed_source_keeps_every_module_python(tmp_path: Path) -> None:
    # One module's recorded digest no longer matches its source (as after an edit): the
    # whole group must stay Python, not only that module.
    def edited(manifest: dict[str, Any]) -> None:
        manifest["modules"]["phloem.gateway.http"]["sha256"] = "0" * 64

    out = probe(str(build_copy(tmp_path, edited)))
    assert out["native"] is False
    assert str(out["fastpath"]).endswith("fastpath.py")
    assert str(out["dispatch"]).endswith("dispatch.py")
    # The copy itself, untouched, serves: the refusal above was the digest's doing.
    assert probe(str(build_copy(tmp_path)))["native"] is True


def test_a_build_by_another_python_is_not_used(tmp_path: Path) -> None:
    def other_python(manifest: dict[str, Any]) -> None:
        manifest["python"] = "3.11.0 (another build)"

    assert probe(str(build_copy(tmp_path, other_python)))["native"] is False


WHY = """
import sys
from pathlib import Path
from phloem.system.native import why_python
print(why_python(Path(sys.argv[1])))
"""


def why(root: Path, **env: str) -> str:
    base = {k: v for k, v in os.environ.items() if k != "PHLOEM_NATIVE"}
    proc = subprocess.run([sys.executable, "-c", WHY, str(root)], capture_output=True,
                          text=True, env={**base, **env}, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


def test_why_python_names_the_reason(tmp_path: Path) -> None:
    # What `phloem up` and bench/runtime.py print when the compiled path does not serve.
    def edited(manifest: dict[str, Any]) -> None:
        manifest["modules"]["phloem.gateway.http"]["sha256"] = "0" * 64

    def other_python(manifest: dict[str, Any]) -> None:
        manifest["python"] = "3.11.0 (another build)"

    assert why(build_copy(tmp_path)) == "None"
    assert why(build_copy(tmp_path), PHLOEM_NATIVE="0") == "PHLOEM_NATIVE=0"
    assert why(build_copy(tmp_path, edited)) == (
        "stale: gateway/http.py changed since the build (scripts/build_native.py "
        "rebuilds it)")
    assert why(build_copy(tmp_path, other_python)) == (
        "built for another Python (scripts/build_native.py rebuilds it)")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert why(empty) == f"not built in {empty} (scripts/build_native.py builds it)"
