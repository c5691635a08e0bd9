"""Config as code and the developer loop, driven through the CLI as a user would."""

from __future__ import annotations

import json
import subprocess
import uuid
from pathlib import Path

import pytest

from phloem.testing import PHLOEM, PlatformProcess, host_of

pytestmark = pytest.mark.usefixtures("platform")


def run(p: PlatformProcess, cwd: Path, *args: str, check: bool = True
        ) -> subprocess.CompletedProcess[str]:
    return p.cli(*args, check=check, cwd=cwd)


def plan_of(p: PlatformProcess, cwd: Path) -> dict[str, tuple[str, list[str]]]:
    data = p.cli_json_in(cwd, "config", "plan")
    return {i["slug"]: (i["action"], i["reasons"]) for i in data["plan"]}


@pytest.fixture()
def project(platform: PlatformProcess, tmp_path: Path) -> Path:
    """A fresh project linked to a fresh branch (other tests deploy on main)."""
    root = tmp_path / "proj"
    out = run(platform, tmp_path, "init", str(root)).stdout
    assert "phloemfile.py" in out
    branch = f"cfg-{uuid.uuid4().hex[:8]}"
    platform.cli("branches", "create", "--name", branch)
    run(platform, root, "link", "--branch", branch)
    return root


def linked(project: Path) -> str:
    return str(json.loads((project / ".phloem" / "link.json").read_text())["branch"])


def test_plan_apply_is_idempotent_and_diffs(platform: PlatformProcess, project: Path) -> None:
    assert plan_of(platform, project) == {"api": ("create", ["not deployed"])}
    applied = platform.cli_json_in(project, "deploy")
    assert [r["ok"] for r in applied["results"]] == [True]
    assert plan_of(platform, project) == {"api": ("unchanged", [])}
    again = run(platform, project, "config", "apply").stdout
    assert "nothing to do" in again

    branch = linked(project)
    fn = platform.cli_json("functions", "get", "api", "--branch", branch)
    with platform.gateway(host_of(fn["invocation_url"])) as gw:
        assert gw.get("/").json() == {"greeting": "hello", "stage": branch, "branch": branch}

    app = project / "src" / "app.py"
    app.write_text(app.read_text().replace('"greeting"', '"hi"'))
    assert plan_of(platform, project) == {"api": ("update", ["source changed"])}
    cfg = project / "phloemfile.py"
    cfg.write_text(cfg.read_text().replace('"hello"', '"bonjour"'))
    (project / ".env.extra").write_text("EXTRA_FLAG=1\n")
    cfg.write_text(cfg.read_text().replace(
        'env={"GREETING"', 'env={"EXTRA": os.environ.get("EXTRA_FLAG", "0"), "GREETING"'))
    action, reasons = plan_of(platform, project)["api"]
    assert action == "update"
    assert reasons == ["source changed", "env added EXTRA"]
    run(platform, project, "deploy", "--env", str(project / ".env.extra"))
    shown = platform.cli_json("functions", "get", "api", "--list-env", "--show-values",
                              "--branch", branch)
    assert shown["env"] == {"EXTRA": "1", "GREETING": "bonjour", "STAGE": branch}

    cfg.write_text(cfg.read_text().replace('"bonjour"', '"salut"'))
    assert plan_of(platform, project)["api"] == ("update", ["env values changed"])


def test_checkout_creates_branch_with_functions_then_only_switches(
        platform: PlatformProcess, project: Path) -> None:
    run(platform, project, "deploy")
    base = linked(project)
    out = run(platform, project, "checkout", "preview/cfg").stdout
    assert "created and switched to branch preview/cfg" in out
    assert platform.cli_json("branches", "get", "preview/cfg")["parent_id"] == \
        platform.cli_json("branches", "get", base)["id"]
    fn = platform.cli_json("functions", "get", "api", "--branch", "preview/cfg")
    assert fn["status"] == "ready"
    with platform.gateway(host_of(fn["invocation_url"])) as gw:
        assert gw.get("/").json()["stage"] == "preview/cfg"
    # The link moved: commands without --branch now act on preview/cfg.
    assert platform.cli_json_in(project, "config", "status")["branch"] == "preview/cfg"
    env = (project / ".env").read_text()
    assert "PHLOEM_BRANCH=preview/cfg" in env and "DATABASE_URL_UNPOOLED=" in env

    run(platform, project, "checkout", base)
    assert linked(project) == base
    run(platform, project, "checkout", "preview/cfg")
    again = platform.cli_json("functions", "get", "api", "--branch", "preview/cfg")
    assert again["deployment_id"] == fn["deployment_id"]  # not redeployed


def test_env_pull_merges_and_env_run_injects(platform: PlatformProcess, project: Path) -> None:
    (project / ".env").write_text("MY_KEY=keep me\nDATABASE_URL=stale\n# comment\n")
    run(platform, project, "env", "pull")
    lines = (project / ".env").read_text().splitlines()
    assert "MY_KEY=keep me" in lines and "# comment" in lines
    branch = linked(project)
    url = platform.cli("connection-string", "--pooled", "--branch", branch).stdout.strip()
    assert f"DATABASE_URL={url}" in lines
    assert "DATABASE_URL=stale" not in lines
    proc = run(platform, project, "env", "run", "--", "sh", "-c",
               'echo "$PHLOEM_BRANCH $NEON_BRANCH $DATABASE_URL_UNPOOLED"')
    unpooled = platform.cli("connection-string", "--unpooled", "--branch", branch
                            ).stdout.strip()
    assert proc.stdout.split() == [branch, branch, unpooled]
    assert run(platform, project, "env", "run", "--", "sh", "-c", "exit 7",
               check=False).returncode == 7


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (('"api": Function(', '"Bad_Slug": Function('),
         "phloemfile.py: functions.Bad_Slug: must match ^[a-z0-9]{1,20}$"),
        (('source="src/app.py"', 'source="src/nope.py"'),
         "phloemfile.py: functions.api.source: file 'src/nope.py' does not exist"),
        (('entry="app",', 'entry="app", runtime="python2.7",'),
         "phloemfile.py: functions.api.runtime: unknown runtime 'python2.7'"),
        (('env={"GREETING"', 'env={"PHLOEM_X": "1", "GREETING"'),
         "phloemfile.py: functions.api.env.PHLOEM_X: is reserved"),
        (("config = define_config(", "config = 42\nunused = dict("),
         "phloemfile.py: must set config = define_config(...)"),
    ],
)
def test_config_errors_name_file_key_and_rule(platform: PlatformProcess, project: Path,
                                              edit: tuple[str, str], message: str) -> None:
    cfg = project / "phloemfile.py"
    cfg.write_text(cfg.read_text().replace(*edit))
    proc = run(platform, project, "config", "plan", check=False)
    assert proc.returncode != 0
    assert message in " ".join(proc.stderr.split()), proc.stderr
    assert PHLOEM
