"""Node functions deployed through the platform: plain fetch modules and a TypeScript Hono
app with npm dependencies, bundled by esbuild, served by Node 24 isolates."""

from __future__ import annotations

from pathlib import Path

from phloem.testing import PlatformProcess, host_of

APPS = Path(__file__).parent / "apps"


def test_plain_fetch_module(platform: PlatformProcess) -> None:
    fn = platform.deploy("nodeplain", APPS / "node-plain")
    assert fn["status"] == "ready", fn
    assert fn["runtime"] == "nodejs24"
    with platform.gateway(host_of(fn["invocation_url"])) as gw:
        body = gw.get("/hello", headers={"X-Request-Id": "node-rid"}).json()
        assert body == {"path": "/hello", "branch": "main", "hasDb": True,
                        "requestId": "node-rid"}
        assert gw.post("/", content=b"ping").text == "echo ping"


def test_typescript_hono_app_with_npm_dependency(platform: PlatformProcess) -> None:
    fn = platform.deploy("nodehono", APPS / "node-hono")
    assert fn["status"] == "ready", fn
    with platform.gateway(host_of(fn["invocation_url"])) as gw:
        assert gw.get("/").text == "hono on main"
        assert gw.post("/todos", json={"title": "bundle me"}).status_code == 201
        assert gw.get("/todos").json() == [{"id": 1, "title": "bundle me"}]


def test_broken_bundle_fails_and_previous_keeps_serving(platform: PlatformProcess,
                                                        tmp_path: Path) -> None:
    good = platform.deploy("nodekeep", APPS / "node-plain")
    bad = platform.cli("functions", "deploy", "nodekeep", "--path", str(APPS / "node-broken"),
                       check=False)
    assert bad.returncode != 0
    assert "index.ts:4:2" in bad.stderr and "Expected" in bad.stderr  # esbuild
    fn = platform.cli_json("functions", "get", "nodekeep")
    assert fn["deployment_id"] == good["deployment_id"]
    with platform.gateway(host_of(good["invocation_url"])) as gw:
        assert gw.get("/").status_code == 200


def test_node_isolates_from_a_standby_hold_no_privileges(platform: PlatformProcess) -> None:
    """The second start of a Node function is activated from a standby process that ran
    as root until activation: it must hold exactly what a directly spawned isolate
    holds."""
    dd = platform.data_dir
    secrets = [dd / "credentials.json", dd / "secrets", dd / "system" / "pgdata",
               dd / "artifacts", dd / "logs"]
    seen = []
    for run in range(3):  # the first start may be direct; a standby is ready after it
        fn = platform.deploy("nodeprobe", APPS / "node-probe", "--env", f"RUN={run}",
                             "--limit", "memory_mb=512")
        with platform.gateway(host_of(fn["invocation_url"])) as gw:
            body = gw.get("/", params=[("path", str(p)) for p in secrets]).json()
        seen.append(body)
        assert body["uid"] == body["euid"] != 0
        assert body["groups"] in ([], [body["gid"]])
        assert body["capEff"] == "0000000000000000"
        assert body["regained"] is False
        # In its sandbox the data dir's secrets are not even there.
        assert set(body["probe"].values()) == {"ENOENT"}, body["probe"]
        assert body["cwd"] == str(dd / "deployments" / fn["deployment_id"] / "app")
        assert "RUN" in body["envKeys"] and "DATABASE_URL" in body["envKeys"]
        assert "PHLOEM_API_KEY" not in body["envKeys"]
        # --max-old-space-size = 0.75 x memory_mb, plus the young generation (the default
        # on this machine would be several GiB).
        assert 384 <= body["heapLimitMb"] <= 640
    assert len({b["uid"] for b in seen}) == 1
    logs = platform.cli("functions", "logs", "nodeprobe", "--lines", "500").stdout
    assert "(activated from a standby)" in logs, logs
