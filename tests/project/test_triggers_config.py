"""Schedule triggers declared in a project (phloemfile.py's ``triggers=``, neon.ts's
``triggers``), sent by ``phloem deploy`` and handled with ``phloem triggers``."""

from __future__ import annotations

import shutil
import uuid
from pathlib import Path
from typing import Any

from phloem.project.plan import read_link
from phloem.testing import PlatformProcess, wait_for

PROBE = Path(__file__).parent.parent / "apps" / "triggerprobe" / "main.py"
HELLO = 'export default { fetch: () => new Response("hi") };\n'


def new_branch(platform: PlatformProcess, prefix: str) -> str:
    name = f"{prefix}-{uuid.uuid4().hex[:8]}"
    platform.cli("branches", "create", "--name", name)
    return name


def finished(platform: PlatformProcess, branch: str, name: str, run_id: str) -> Any:
    def done() -> Any:
        runs = platform.cli_json("triggers", "history", name, "--branch", branch)
        run = next((r for r in runs if r["id"] == run_id), None)
        return run if run and run["status"] != "running" else None
    return wait_for(done, 30, f"run {run_id} to finish")


def ours(platform: PlatformProcess, branch: str, owner_root: Path) -> list[Any]:
    """The branch's triggers this project made (a new branch also inherits main's,
    disabled, whatever other tests left there)."""
    owner = read_link(owner_root)["project_id"]
    return [t for t in platform.cli_json("triggers", "list", "--branch", branch)
            if t["owner"] == owner]


def write_phloemfile(root: Path, triggers: str) -> None:
    (root / "phloemfile.py").write_text(
        "from phloem.config import Function, Trigger, define_config\n"
        "config = define_config(\n"
        "    functions={'probe': Function(source='main.py')},\n"
        f"    triggers={{{triggers}}},\n)\n")


def test_phloemfile_triggers_deploy_run_disable_and_go(platform: PlatformProcess,
                                                      tmp_path: Path) -> None:
    """~15 s (a branch, a Python deploy, three CLI round trips)."""
    branch = new_branch(platform, "trig")
    root = tmp_path / "proj"
    root.mkdir()
    shutil.copy(PROBE, root / "main.py")
    write_phloemfile(root, "'nightly': Trigger(function='probe', cron='0 3 * * *', "
                           "function_path='/nightly')")
    platform.cli("link", "--branch", branch, "--no-env-pull", cwd=root)
    applied = platform.cli_json_in(root, "deploy")
    assert applied["triggers"] == ["nightly"], applied
    listed = ours(platform, branch, root)
    assert [(t["name"], t["function"], t["cron"], t["functionPath"], t["enabled"])
            for t in listed] == [("nightly", "probe", "0 3 * * *", "/nightly", True)]
    run = platform.cli_json("triggers", "run", "nightly", "--branch", branch)
    done = finished(platform, branch, "nightly", run["id"])
    assert (done["status"], done["http_status"], done["reason"]) == ("succeeded", 200,
                                                                     "manual")
    off = platform.cli_json("triggers", "disable", "nightly", "--branch", branch)
    assert off["enabled"] is False
    assert ours(platform, branch, root)[0]["enabled"] is False
    # Dropped from the config: the next deploy removes it (this project made it).
    write_phloemfile(root, "")
    assert platform.cli_json_in(root, "deploy")["triggers"] == []
    assert ours(platform, branch, root) == []
    missing = platform.cli("triggers", "history", "nightly", "--branch", branch,
                           check=False)
    assert missing.returncode != 0 and "trigger" in missing.stderr


def test_phloemfile_trigger_of_an_undeclared_function_is_refused(
        platform: PlatformProcess, tmp_path: Path) -> None:
    """~1 s: refused before anything is deployed, naming the field."""
    root = tmp_path / "proj"
    root.mkdir()
    shutil.copy(PROBE, root / "main.py")
    write_phloemfile(root, "'x': Trigger(function='other', cron='* * * * *')")
    platform.cli("link", "--branch", "main", "--no-env-pull", cwd=root)
    out = platform.cli("deploy", cwd=root, check=False)
    assert out.returncode != 0
    assert "triggers.x.function: 'other' is not a function of this project" in out.stderr


def test_neon_ts_schedule_triggers_deploy(platform: PlatformProcess, tmp_path: Path) -> None:
    """~20 s (a Node bundle and deploy): neon.ts's own shape, as @neon/config 1.8 has it;
    a trigger that is not a schedule (object storage) is refused by name."""
    branch = new_branch(platform, "trign")
    root = tmp_path / "proj"
    (root / "src").mkdir(parents=True)
    (root / "src" / "hello.ts").write_text(HELLO)
    neon_ts = ('import { defineConfig } from "@neon/config";\n'
               "export default defineConfig({\n"
               '  functions: { hello: { name: "hello", source: "src/hello.ts" } },\n'
               "  triggers: {\n"
               '    everyFive: { function: "hello", cron: "*/5 * * * *", '
               'functionPath: "/tick", enabled: false },\n'
               "  },\n});\n")
    (root / "neon.ts").write_text(neon_ts)
    platform.cli("link", "--branch", branch, "--no-env-pull", cwd=root)
    applied = platform.cli_json_in(root, "deploy")
    assert [r["ok"] for r in applied["results"]] == [True], applied
    assert applied["triggers"] == ["everyFive"]
    (t,) = ours(platform, branch, root)
    assert (t["function"], t["cron"], t["functionPath"], t["enabled"]) == \
        ("hello", "*/5 * * * *", "/tick", False)
    run = platform.cli_json("triggers", "run", "everyFive", "--branch", branch)
    assert finished(platform, branch, "everyFive", run["id"])["status"] == "succeeded"

    (root / "neon.ts").write_text(neon_ts.replace(
        "  },\n});", '    uploads: { function: "hello", bucket: "files" },\n  },\n});'))
    refused = platform.cli("deploy", cwd=root, check=False)
    assert refused.returncode != 0
    assert "object storage triggers (triggers.uploads)" in refused.stderr
