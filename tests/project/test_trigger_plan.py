"""``config plan`` shows the schedule triggers a deploy would add, change or remove (the
platform's replace rules: other projects' are kept), and ``config status`` lists them."""

from __future__ import annotations

from pathlib import Path

from phloem.project.trigger_plan import plan_triggers
from phloem.testing import PlatformProcess
from tests.project.test_triggers_config import HELLO, new_branch


def live(name: str, owner: str | None, **kw: object) -> dict[str, object]:
    return {"name": name, "function": "api", "cron": "0 3 * * *", "functionPath": "/",
            "enabled": True, "owner": owner, **kw}


def test_plan_triggers_rules() -> None:
    declared = {"same": {"function": "api", "cron": "0  3 * * *"},
                "moved": {"function": "api", "cron": "*/5 * * * *", "functionPath": "/t"},
                "theirs": {"function": "api", "cron": "0 3 * * *"},
                "new": {"function": "api", "cron": "0 4 * * *", "enabled": False}}
    got = plan_triggers(declared, [live("same", "prj-a"), live("moved", "prj-a"),
                                   live("theirs", "prj-b"), live("gone", "prj-a"),
                                   live("other", "prj-b"), live("manual", None)], "prj-a")
    assert [(c.name, c.action) for c in got] == [
        ("moved", "change"), ("new", "add"), ("same", "unchanged"), ("theirs", "change"),
        ("gone", "remove"), ("manual", "keep"), ("other", "keep")]
    by = {c.name: c.reasons for c in got}
    assert by["moved"] == ["cron '0 3 * * *' -> '*/5 * * * *'", "functionPath '/' -> '/t'"]
    assert by["theirs"] == ["takes it over from project prj-b"]
    assert by["new"] == ["api/ at 0 4 * * * UTC, disabled"]
    # A project without an id yet has created nothing: nothing is removed.
    assert [c.action for c in plan_triggers({}, [live("gone", "prj-a")], None)] == ["keep"]


def test_config_plan_and_status_show_triggers(platform: PlatformProcess,
                                              tmp_path: Path) -> None:
    """~20 s (a Node deploy and six CLI round trips)."""
    branch = new_branch(platform, "trigplan")
    root = tmp_path / "proj"
    (root / "src").mkdir(parents=True)
    (root / "src" / "hello.ts").write_text(HELLO)
    neon_ts = ('import { defineConfig } from "@neon/config";\n'
               "export default defineConfig({\n"
               '  functions: { hello: { name: "hello", source: "src/hello.ts" } },\n'
               '  triggers: { nightly: { function: "hello", cron: "0 3 * * *" } },\n});\n')
    (root / "neon.ts").write_text(neon_ts)
    platform.cli("link", "--branch", branch, "--no-env-pull", cwd=root)

    def trigger_plan() -> list[tuple[str, str, list[str]]]:
        plan = platform.cli_json_in(root, "config", "plan")
        return [(t["name"], t["action"], t["reasons"]) for t in plan["triggers"]
                if t["action"] != "keep"]  # main's, inherited disabled: not this project's

    assert trigger_plan() == [("nightly", "add", ["hello/ at 0 3 * * * UTC"])]
    text = platform.cli("config", "plan", cwd=root).stdout
    assert "triggers:" in text and "add       nightly" in text
    platform.cli_json_in(root, "deploy", "--yes")
    status = platform.cli_json("config", "status", "--branch", branch)
    assert {"name": "nightly", "function": "hello", "cron": "0 3 * * *",
            "functionPath": "/", "enabled": True} in [
        {k: v for k, v in t.items() if k != "owner"} for t in status["triggers"]]
    assert trigger_plan() == [("nightly", "unchanged", [])]

    platform.cli("triggers", "disable", "nightly", "--branch", branch)
    assert trigger_plan() == [("nightly", "change", ["enabled False -> True"])]
    (root / "neon.ts").write_text(neon_ts.replace(
        '  triggers: { nightly: { function: "hello", cron: "0 3 * * *" } },\n', ""))
    assert trigger_plan() == [("nightly", "remove", ["no longer declared"])]
