"""Deployment history and rollback without a rebuild; --no-wait and --no-bundle."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from phloem.testing import PlatformProcess, host_of, platform_process, wait_for
from tests.test_deploy_owners import write_app

pytestmark = pytest.mark.usefixtures("platform")

APPS = Path(__file__).parent / "apps"


def history(p: PlatformProcess, slug: str) -> list[dict[str, Any]]:
    deps: list[dict[str, Any]] = p.cli_json("functions", "deployments", slug)
    return deps


def states(p: PlatformProcess, slug: str) -> list[tuple[str, str]]:
    return [(d["id"], d["state"]) for d in history(p, slug)]


def test_rollback_switches_back_at_once_without_a_rebuild(platform: PlatformProcess,
                                                          tmp_path: Path) -> None:
    p, slug = platform, "rollback"
    src = tmp_path / "app"
    ids = []
    for version in ("v1", "v2"):
        write_app(src, version)
        ids.append(p.deploy(slug, src)["deployment_id"])
    assert states(p, slug) == [(ids[1], "active"), (ids[0], "ready")]
    # Replaced, but kept built: its directory is still there.
    assert (p.data_dir / "deployments" / ids[0]).is_dir()
    built = {d["id"]: (d["finished_at"], d["build_log"]) for d in history(p, slug)}
    host = host_of(p.cli_json("functions", "get", slug)["invocation_url"])

    with p.gateway(host) as gw, p.api() as api:
        assert gw.get("/").text == "v2"
        started = time.monotonic()
        switched = api.post(f"/branches/main/functions/{slug}/rollback")
        first = gw.get("/")  # the very first request after the switch: no retry
        answered_ms = (time.monotonic() - started) * 1000
        assert switched.status_code == 200, switched.text
        body = switched.json()
        assert (body["deployment"]["id"], body["previous_deployment_id"]) == (ids[0], ids[1])
        assert body["deployment"]["state"] == "active"
        assert first.text == "v1"
        print(f"rollback: route switched in {body['switch_ms']:.1f} ms inside the platform; "
              f"first answer with the old code {answered_ms:.0f} ms after the request "
              "(including the old deployment's cold start)")
        # No rebuild: no new deployment, the old one's build untouched.
        after = history(p, slug)
        assert [(d["id"], d["state"]) for d in after] == [(ids[1], "ready"), (ids[0], "active")]
        assert {d["id"]: (d["finished_at"], d["build_log"]) for d in after} == built

        # Forward again with --to, through the CLI.
        out = p.cli("functions", "rollback", slug, "--to", ids[1]).stdout
        assert f"{ids[0]} -> {ids[1]}" in out
        assert gw.get("/").text == "v2"
        again = p.cli("functions", "rollback", slug, "--to", ids[1]).stdout
        assert "already active" in again

        # Errors name the field and the rule.
        unknown = api.post(f"/branches/main/functions/{slug}/rollback",
                           json={"deployment_id": "dep-000000000000"})
        assert unknown.status_code == 404
        assert unknown.json()["error"]["code"] == "deployment_not_found"
        wrong = api.post(f"/branches/main/functions/{slug}/rollback",
                         json={"deployment_id": 7})
        assert wrong.status_code == 400
        assert wrong.json()["error"]["field"] == "deployment_id"
        nofn = api.post("/branches/main/functions/nosuchfn/rollback")
        assert nofn.status_code == 404
        assert nofn.json()["error"]["code"] == "function_not_found"
        listed = api.get("/branches/main/functions/nosuchfn/deployments")
        assert listed.status_code == 404
        newest = api.get(f"/branches/main/functions/{slug}/deployments", params={"limit": 1})
        assert [d["id"] for d in newest.json()] == [ids[1]]
        zero = api.get(f"/branches/main/functions/{slug}/deployments", params={"limit": 0})
        assert zero.status_code == 400 and zero.json()["error"]["field"] == "limit"

        # A failed build is in the history, and no rollback target.
        failed = p.cli("functions", "deploy", slug, "--path", str(APPS / "notasgi"),
                       "--entry", "main:app", check=False)
        assert failed.returncode == 1
        bad = history(p, slug)[0]
        assert bad["state"] == "failed"
        refused = api.post(f"/branches/main/functions/{slug}/rollback",
                           json={"deployment_id": bad["id"]})
        assert refused.status_code == 409
        assert refused.json()["error"] == {
            "code": "deployment_not_ready", "field": "deployment_id",
            "message": f"deployment {bad['id']} is failed, not a rollback target: its "
                       "build failed"}
        assert gw.get("/").text == "v2"

        # Retention: the 3 latest replaced deployments stay built, older ones are pruned.
        for version in ("v3", "v4", "v5"):
            write_app(src, version)
            ids.append(p.deploy(slug, src)["deployment_id"])
        assert gw.get("/").text == "v5"
    wait_for(lambda: dict(states(p, slug)).get(ids[0]) == "pruned", 60,
             "the oldest deployment to be pruned")
    kept = dict(states(p, slug))
    assert [kept[i] for i in ids] == ["pruned", "ready", "ready", "ready", "active"]
    assert not (p.data_dir / "deployments" / ids[0]).exists()
    assert (p.data_dir / "deployments" / ids[1]).is_dir()
    gone = p.cli("functions", "rollback", slug, "--to", ids[0], check=False)
    assert gone.returncode == 1
    assert "is pruned, not a rollback target" in " ".join(gone.stderr.split())


def test_no_wait_returns_while_building(platform: PlatformProcess, tmp_path: Path) -> None:
    p, slug = platform, "nowait"
    src = tmp_path / "slow"
    write_app(src, "slow")
    app = src / "app.py"
    # Importing takes 15 s, so the entry check keeps the build going that long: the three
    # CLI calls below must see it building (5 s was not enough on a loaded machine).
    app.write_text("import time\ntime.sleep(15)\n" + app.read_text())
    accepted = p.deploy(slug, src, "--no-wait")
    assert accepted["deployment"]["status"] == "building"
    dep_id = accepted["deployment"]["id"]
    assert states(p, slug) == [(dep_id, "building")]
    early = p.cli("functions", "rollback", slug, "--to", dep_id, check=False)
    assert early.returncode == 1
    assert "is building, not a rollback target: it is still building" in early.stderr
    none = p.cli("functions", "rollback", slug, check=False)
    assert "has no earlier deployment to roll back to" in none.stderr
    wait_for(lambda: states(p, slug) == [(dep_id, "active")], 120,
             "the deployment to become active")
    with p.gateway(host_of(accepted["invocation_url"])) as gw:
        assert gw.get("/").text == "slow"
    text = p.cli("functions", "deploy", slug, "--path", str(src), "--no-wait").stdout
    assert "building" in text and "phloem functions deployments nowait" in text


def test_no_bundle_runs_a_prebuilt_bundle_as_uploaded(platform: PlatformProcess,
                                                      tmp_path: Path) -> None:
    p = platform
    src = tmp_path / "prebuilt"
    (src / "dist").mkdir(parents=True)
    # Bundling this project would fail: its dependency does not exist, its source
    # imports a module nobody has. --no-bundle runs dist/server.mjs as it is, and that
    # file's own relative import (a chunk) resolves next to it.
    (src / "package.json").write_text(
        '{"type": "module", "dependencies": {"phloem-test-no-such-package": "9.9.9"}}')
    (src / "index.ts").write_text('import "phloem-test-no-such-module";\n')
    (src / "dist" / "chunk.mjs").write_text('export const made = "prebuilt";\n')
    (src / "dist" / "server.mjs").write_text(
        'import { made } from "./chunk.mjs";\n'
        "export default { fetch: () => new Response(made) };\n")
    (src / "single.mjs").write_text(
        'export default { fetch: () => new Response("one file") };\n')

    tree = p.deploy("prebuilt", src, "--entry", "dist/server.mjs", "--no-bundle")
    assert tree["deployment"]["status"] == "ready", tree["deployment"]
    assert tree["deployment"]["bundle"] is False
    assert "--no-bundle: not bundled again" in tree["deployment"]["build_log"]
    one = p.deploy("prebuiltone", src / "single.mjs", "--no-bundle")
    assert one["deployment"]["status"] == "ready", one["deployment"]
    assert history(p, "prebuiltone")[0]["entry"] == "single.mjs"
    with p.gateway(host_of(tree["invocation_url"])) as gw:
        assert gw.get("/").text == "prebuilt"
    with p.gateway(host_of(one["invocation_url"])) as gw:
        assert gw.get("/").text == "one file"

    ts = p.cli("functions", "deploy", "prebuiltts", "--path", str(src), "--entry",
               "index.ts", "--no-bundle", check=False)
    assert ts.returncode == 1
    assert "a prebuilt bundle (--no-bundle) runs as it is, so it must be JavaScript" in (
        " ".join(ts.stderr.split()))
    py = p.cli("functions", "deploy", "prebuiltpy", "--path", str(APPS / "envprobe"),
               "--no-bundle", check=False)
    assert py.returncode == 1
    assert "bundle: --no-bundle: python functions are not bundled" in py.stderr
    with p.api() as api:  # the API's own rule, for clients other than the CLI
        sha = p.deploy("prebuiltpy", APPS / "envprobe")["deployment"]["artifact_sha256"]
        refused = api.post("/branches/main/functions/prebuiltpy/deployments", json={
            "artifact_sha256": sha, "entry": "main:app", "bundle": False})
        assert refused.status_code == 400
        assert refused.json()["error"]["field"] == "bundle"


def test_kept_deployments_survive_a_restart(tmp_path: Path) -> None:
    """A restart keeps the replaced deployments retention keeps (``up
    --keep-deployments 1``), and a rollback to one works after it."""
    with platform_process(["--keep-deployments", "1"]) as p:
        src = tmp_path / "app"
        ids = []
        for version in ("v1", "v2", "v3"):
            write_app(src, version)
            ids.append(p.deploy("survivor", src)["deployment_id"])
        wait_for(lambda: dict(states(p, "survivor")).get(ids[0]) == "pruned", 60,
                 "the deployment beyond the one kept to be pruned")
        assert p.stop() == 0
        p.launch()
        p.wait_ready()
        kept = dict(states(p, "survivor"))
        assert [kept[i] for i in ids] == ["pruned", "ready", "active"]
        assert sorted(d.name for d in (p.data_dir / "deployments").iterdir()) == sorted(
            ids[1:])
        done = p.cli_json("functions", "rollback", "survivor")
        assert done["deployment"]["id"] == ids[1]
        host = host_of(p.cli_json("functions", "get", "survivor")["invocation_url"])
        with p.gateway(host) as gw:
            assert gw.get("/").text == "v2"
