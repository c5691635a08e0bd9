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
