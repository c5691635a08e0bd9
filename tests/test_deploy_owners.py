"""A project deploy deletes only what it created: two projects on one branch, and a
function made by 'phloem functions deploy', driven through the CLI as users would."""

from __future__ import annotations

import json
import os
import pty
import select
import subprocess
import uuid
from pathlib import Path
from typing import Any

import pytest

from phloem.testing import PHLOEM, PlatformProcess, host_of, wait_for

pytestmark = pytest.mark.usefixtures("platform")

#: A dependency-free ASGI app answering its VERSION (prepended per project).
APP = '''
async def app(scope, receive, send):
    if scope["type"] == "lifespan":
        while True:
            msg = await receive()
            if msg["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif msg["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"text/plain")]})
    await send({"type": "http.response.body", "body": VERSION.encode()})
'''


def write_app(root: Path, version: str) -> None:
    root.mkdir(parents=True, exist_ok=True)
    (root / "app.py").write_text(f"VERSION = {version!r}\n{APP}")


def write_project(root: Path, slugs: list[str], version: str = "v1") -> Path:
    write_app(root, version)
    fns = ", ".join(f'"{s}": Function(source="app.py")' for s in slugs)
    (root / "phloemfile.py").write_text(
        "from phloem.config import Function, define_config\n"
        f"config = define_config(functions={{{fns}}})\n")
    return root


def cli(p: PlatformProcess, cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """The CLI with stdin not a terminal (as in CI), whatever runs the tests."""
    return subprocess.run([PHLOEM, *args], env=p.env, cwd=cwd, capture_output=True,
                          text=True, timeout=600, stdin=subprocess.DEVNULL)


def ok(p: PlatformProcess, cwd: Path, *args: str) -> Any:
    proc = cli(p, cwd, *args, "--output", "json")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return json.loads(proc.stdout)


def plan_of(p: PlatformProcess, cwd: Path) -> dict[str, tuple[str, bool]]:
    return {i["slug"]: (i["action"], i["takeover"])
            for i in ok(p, cwd, "config", "plan")["plan"]}


def functions(p: PlatformProcess, branch: str) -> dict[str, dict[str, Any]]:
    return {f["slug"]: f for f in p.cli_json("functions", "list", "--branch", branch)}


def project_id(root: Path) -> str:
    return str(json.loads((root / ".phloem" / "link.json").read_text())["project_id"])


def test_second_project_leaves_the_first_ones_functions(platform: PlatformProcess,
                                                        tmp_path: Path) -> None:
    p = platform
    branch = f"own-{uuid.uuid4().hex[:8]}"
    p.cli("branches", "create", "--name", branch)
    write_app(tmp_path / "solo", "solo")
    p.deploy("ownsolo", tmp_path / "solo", branch=branch)  # no project: never deleted

    first = write_project(tmp_path / "first", ["owna", "ownb"])
    cli(p, first, "link", "--branch", branch, "--no-env-pull")
    assert plan_of(p, first) == {"owna": ("create", False), "ownb": ("create", False),
                                 "ownsolo": ("keep", False)}
    assert all(r["ok"] for r in ok(p, first, "deploy")["results"])
    second = write_project(tmp_path / "second", ["ownc"])
    cli(p, second, "link", "--branch", branch, "--no-env-pull")
    assert project_id(first) != project_id(second)

    # The second project's plan keeps the first's functions; applying it needs no --yes.
    plan = {i["slug"]: i for i in ok(p, second, "config", "plan")["plan"]}
    assert {s: i["action"] for s, i in plan.items()} == {
        "ownc": "create", "owna": "keep", "ownb": "keep", "ownsolo": "keep"}
    assert plan["owna"]["reasons"] == [f"created by another project ({project_id(first)})"]
    assert "never deleted" in plan["ownsolo"]["reasons"][0]
    assert all(r["ok"] for r in ok(p, second, "deploy")["results"])
    live = functions(p, branch)
    assert {s: f["owner"] for s, f in live.items()} == {
        "owna": project_id(first), "ownb": project_id(first),
        "ownc": project_id(second), "ownsolo": None}
    with p.gateway(host_of(live["owna"]["invocation_url"])) as gw:
        assert gw.get("/").text == "v1"

    # The first project drops ownb and changes owna: the plan lists the deletion, and
    # without --yes and a terminal nothing at all is applied.
    write_project(first, ["owna"], "v2")
    assert plan_of(p, first) == {"owna": ("update", False), "ownb": ("delete", False),
                                 "ownc": ("keep", False), "ownsolo": ("keep", False)}
    before = live["owna"]["deployment_id"]
    refused = cli(p, first, "deploy")
    assert refused.returncode == 1
    said = " ".join(refused.stderr.split())
    assert "would delete ownb" in said and "--yes" in said and "Nothing was changed" in said
    live = functions(p, branch)
    assert set(live) == {"owna", "ownb", "ownc", "ownsolo"}
    assert live["owna"]["deployment_id"] == before

    applied = ok(p, first, "deploy", "--yes", "--no-wait")
    assert {r["slug"]: (r["action"], r["status"]) for r in applied["results"]} == {
        "owna": ("update", "building"), "ownb": ("delete", "")}
    assert set(functions(p, branch)) == {"owna", "ownc", "ownsolo"}
    # --no-wait returned while owna was building; it becomes active by itself.
    wait_for(lambda: functions(p, branch)["owna"]["deployment_id"] != before, 120,
             "owna's new deployment to become active")
    with p.gateway(host_of(live["owna"]["invocation_url"])) as gw:
        assert gw.get("/").text == "v2"

    # Declaring another project's function is a takeover: asked for like a deletion.
    write_project(second, ["ownc", "owna"], "v3")
    assert plan_of(p, second)["owna"] == ("update", True)
    taken = cli(p, second, "deploy")
    assert taken.returncode == 1
    assert (f"take over owna from project {project_id(first)}"
            in " ".join(taken.stderr.split()))
    assert functions(p, branch)["owna"]["owner"] == project_id(first)


def test_deletion_is_asked_on_a_terminal(platform: PlatformProcess, tmp_path: Path) -> None:
    """On a terminal the plan is shown and a deletion asked about; 'n' changes nothing."""
    p = platform
    branch = f"ask-{uuid.uuid4().hex[:8]}"
    p.cli("branches", "create", "--name", branch)
    root = write_project(tmp_path / "proj", ["aska", "askb"])
    cli(p, root, "link", "--branch", branch, "--no-env-pull")
    ok(p, root, "deploy")
    write_project(root, ["aska"])

    controller, terminal = pty.openpty()
    try:
        proc = subprocess.Popen([PHLOEM, "deploy"], env=p.env, cwd=root, stdin=terminal,
                                stderr=terminal, stdout=subprocess.PIPE, text=True)
        seen = bytearray()

        def prompted() -> bool:  # the prompt and errors go to the terminal
            if select.select([controller], [], [], 0.2)[0]:
                seen.extend(os.read(controller, 4096))
            return b"[y/N]" in seen or proc.poll() is not None

        wait_for(prompted, 120, "the confirmation prompt")
        os.write(controller, b"n\n")
        stdout, _ = proc.communicate(timeout=60)
        while select.select([controller], [], [], 0)[0]:
            seen.extend(os.read(controller, 4096))
    finally:
        os.close(controller)
        os.close(terminal)
    stderr = " ".join(seen.decode(errors="replace").split())
    assert proc.returncode == 1, stdout + stderr
    assert "would delete askb. Apply it? [y/N]" in stderr and "not confirmed" in stderr
    assert "delete    askb" in stdout  # the plan was shown first
    assert set(functions(p, branch)) == {"aska", "askb"}
