"""scripts/reliability: runs the tests marked ``reliability`` with the conftest's fixture
and turns their rows into the README's table (a real pytest run on probe tests)."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "reliability"

PROBES = '''
def test_kills(reliability):
    reliability.record(rounds=100, passed=100, figure="502 within 41 ms | max")

def test_broken(reliability):
    reliability.record(rounds=10, passed=9, figure="1 hang")
    raise AssertionError("one round hung")

def test_dies_early(reliability):
    raise AssertionError("before any row")

def test_plain():
    pass
'''


def load_script() -> ModuleType:
    loader = importlib.machinery.SourceFileLoader("reliability_script", str(SCRIPT))
    spec = importlib.util.spec_from_loader("reliability_script", loader)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    loader.exec_module(module)
    return module


def probe_dir(tmp_path: Path, body: str) -> Path:
    """Probe tests beside a copy of tests/conftest.py (the real fixture and marking)."""
    shutil.copy(ROOT / "tests" / "conftest.py", tmp_path / "conftest.py")
    (tmp_path / "test_probe.py").write_text(body)
    return tmp_path


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)


def test_table_marks_failures_and_keeps_the_order(tmp_path: Path) -> None:
    probes = probe_dir(tmp_path, PROBES)
    proc = run("--", str(probes), "-p", "no:cacheprovider")
    assert proc.returncode == 1, proc.stderr
    rows = [ln for ln in proc.stdout.splitlines() if ln.startswith("| `")]
    assert len(rows) == 3, proc.stdout  # test_plain is not marked reliability
    assert rows[0].endswith("test_kills` | 100 | 100 | 502 within 41 ms \\| max |")
    assert rows[1].endswith("test_broken` | 10 | 9 | 1 hang (test FAILED) |")
    assert rows[2].endswith("test_dies_early` | - | - | test FAILED before recording a row |")


def test_write_readme_refuses_a_failed_run(tmp_path: Path) -> None:
    probes = probe_dir(tmp_path, PROBES)
    before = (ROOT / "README.md").read_text()
    proc = run("--write-readme", "--", str(probes), "-p", "no:cacheprovider")
    assert proc.returncode == 1
    assert "README.md not written" in proc.stderr
    assert (ROOT / "README.md").read_text() == before


def test_markers_are_replaced_and_required() -> None:
    script = load_script()
    text = f"intro\n{script.BEGIN}\nold table\n{script.END}\nrest\n"
    assert script.replace_between_markers(text, "new") == (
        f"intro\n{script.BEGIN}\nnew\n{script.END}\nrest\n")
    with pytest.raises(SystemExit, match="markers"):
        script.replace_between_markers("no markers here", "new")
    readme = (ROOT / "README.md").read_text()
    assert readme.count(script.BEGIN) == 1 and readme.count(script.END) == 1


def test_rows_are_grouped_by_file_in_the_order_they_ran(tmp_path: Path) -> None:
    # xdist workers interleave files; the table keeps each file's rows together.
    script = load_script()
    ran = ["tests/b.py::test_one", "tests/a.py::test_two", "tests/b.py::test_three",
           "tests/a.py::test_one"]
    out = tmp_path / "rows.jsonl"
    out.write_text("".join(json.dumps({"test": t, "rounds": 1, "passed": 1, "figure": t})
                           + "\n" for t in ran))
    rows = script.build_rows(out, dict.fromkeys(ran, "passed"))
    assert [r.test for r in rows] == ["tests/a.py::test_two", "tests/a.py::test_one",
                                      "tests/b.py::test_one", "tests/b.py::test_three"]
