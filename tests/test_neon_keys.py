"""Every neon.ts key works or is refused by name: customDomains, experimental.hooks,
bundler, externalPackages; the project's installed @neon/config evaluates the config; the
branch closure's inputs; a branch's ttl (the sweeper deletes it) and protected flag.

The installed ``@neon/config`` versions here are small fakes written into the test
project's ``node_modules`` (no network): each accepts exactly the keys its version
documents, so what phloem accepts shows which one ran."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest

from phloem.config import BranchInfo
from phloem.project.plan import load_project
from phloem.testing import PlatformProcess, host_of, wait_for
from tests.test_neon import HELLO, new_branch, write

DEFINE = 'import { defineConfig } from "@neon/config/v1";\n'


def fake_neon_config(root: Path, version: str, top: list[str], fn_keys: list[str]) -> None:
    """A ``node_modules/@neon/config`` of ``version`` whose ``defineConfig`` refuses any
    key outside ``top`` (top level, and ``preview.functions``) and ``fn_keys``."""
    pkg = root / "node_modules" / "@neon" / "config"
    source = f"""
const TOP = {json.dumps(top)}, FN = {json.dumps(fn_keys)};
export function defineConfig(config) {{
  for (const key of Object.keys(config)) {{
    if (!TOP.includes(key)) throw new Error(`@neon/config {version}: unknown key ${{key}}`);
  }}
  const fns = config.functions ?? config.preview?.functions ?? {{}};
  for (const [slug, fn] of Object.entries(fns)) {{
    for (const key of Object.keys(fn)) {{
      if (!FN.includes(key)) {{
        throw new Error(`@neon/config {version}: functions.${{slug}}: unknown key ${{key}}`);
      }}
    }}
  }}
  return config;
}}
"""
    write(pkg, {
        "package.json": json.dumps({"name": "@neon/config", "version": version,
                                    "type": "module", "exports": {".": "./v1.js",
                                                                  "./v1": "./v1.js"}}),
        "v1.js": source,
    })


def fake_09(root: Path) -> None:
    fake_neon_config(root, "0.9.3", ["preview", "branch"], ["name", "source", "env", "dev"])


def fake_18(root: Path) -> None:
    fake_neon_config(root, "1.8.0", ["preview", "functions", "branch", "triggers",
                                     "customDomains", "auth", "dataApi", "experimental"],
                     ["name", "source", "env", "dev", "customDomains", "bundler",
                      "externalPackages"])


def fn(extra: str = "") -> str:
    return f'functions: {{ api: {{ name: "api", source: "a.ts"{extra} }} }}'


@pytest.mark.parametrize(("body", "message"), [
    (f'{fn()}, customDomains: ["api.example.com"]',
     "customDomains: customDomains belongs on a function: functions.<slug>.customDomains"),
    (fn(', customDomains: ["not a host"]'),
     "functions.api.customDomains[0]: 'not a host' is not a DNS name"),
    (fn(', customDomains: ["a.example.com", "A.example.com."]'),
     "functions.api.customDomains[1]: a.example.com is listed more than once"),
    (f'{fn()}, experimental: {{ hooks: {{ postDeploy: "x" }} }}',
     "experimental.hooks: lifecycle hooks are not supported"),
    (fn(', bundler: () => "x"'), "functions.api.bundler: a bundler function is not "
                                 "supported"),
    (fn(', bundler: "webpack"'), "functions.api.bundler: must be \"esbuild\""),
    (fn(', bundler: "none"'), "with bundler \"none\" the entry runs as it is, so it must be "
                              "JavaScript"),
    (fn(', externalPackages: ["sharp"]'), "functions.api.externalPackages: not supported "
                                          "yet"),
    (f'{fn()}, regions: ["eu"]', "regions: unknown key"),
    (f'{fn()}, branch: () => ({{ postgres: {{ computeSettings: {{}} }} }})',
     "branch: postgres: compute settings"),
    (f'{fn()}, branch: () => ({{ ttl: "soon" }})', "branch: ttl: must be a duration"),
    (f'{fn()}, branch: () => ({{ ttl: "1d" }})',
     "branch: ttl: the default branch (main) cannot expire"),
])
def test_each_key_works_or_is_refused_by_name(platform: PlatformProcess, tmp_path: Path,
                                              body: str, message: str) -> None:
    root = write(tmp_path / "proj", {"neon.ts": f"{DEFINE}export default defineConfig({{ "
                                                f"{body} }});\n", "a.ts": HELLO})
    # No @neon/config installed: phloem's own stands in and accepts any key, so each
    # refusal here is phloem's.
    platform.cli("link", "--branch", "main", "--no-env-pull", cwd=root)
    out = platform.cli("config", "plan", cwd=root, check=False)
    assert out.returncode != 0
    assert message in out.stderr, out.stderr


def test_installed_neon_config_decides_what_is_accepted(tmp_path: Path) -> None:
    body = 'preview: { functions: { api: { name: "api", source: "a.ts", dev: { port: 8791 }%s } } }'
    root = write(tmp_path / "proj", {"a.ts": HELLO})
    fake_09(root)
    main = BranchInfo(name="main", id="br-main", is_default=True)
    # 0.9.x knows no bundler: its defineConfig refuses it (phloem's own would accept it).
    (root / "neon.ts").write_text(DEFINE + "export default defineConfig({ "
                                  + body % ', bundler: "esbuild"' + " });\n")
    with pytest.raises(ValueError, match=r"@neon/config 0\.9\.3: functions\.api: unknown "
                                         "key bundler"):
        load_project(root).resolve(main)
    (root / "neon.ts").write_text(DEFINE + "export default defineConfig({ " + body % ""
                                  + " });\n")
    assert load_project(root).resolve(main).functions["api"].dev_port == 8791
    # 1.8.x takes bundler and top-level triggers (passed through as declared).
    fake_18(root)
    (root / "neon.ts").write_text(
        DEFINE + "export default defineConfig({ " + body % ', bundler: "esbuild"'
        + ', triggers: { nightly: { function: "api", cron: "0 3 * * *", enabled: true } }'
        + " });\n")
    resolved = load_project(root).resolve(main)
    assert resolved.functions["api"].bundle is True
    assert resolved.triggers == {"nightly": {"function": "api", "cron": "0 3 * * *",
                                             "enabled": True}}


def test_bundler_none_deploys_the_entry_as_is_and_closure_sees_the_branch(
        platform: PlatformProcess, tmp_path: Path) -> None:
    branch = new_branch(platform, "nkeys")
    root = write(tmp_path / "proj", {
        "neon.ts": DEFINE + """export default defineConfig({
  functions: { api: { name: "api", source: "dist/index.mjs", bundler: "none" } },
  branch: (b) => ({ functions: { api: { env: { BRANCH_INPUT: JSON.stringify(b) } } } }),
});
""",
        # A prebuilt entry with a relative import of its own chunk, run where it is.
        "dist/index.mjs": 'import { word } from "./chunk.mjs";\n'
                          "export default { fetch: () => Response.json({ word, url: "
                          "import.meta.url, input: process.env.BRANCH_INPUT }) };\n",
        "dist/chunk.mjs": 'export const word = "unbundled";\n',
    })
    fake_18(root)
    platform.cli("link", "--branch", branch, "--no-env-pull", cwd=root)
    applied = platform.cli_json_in(root, "deploy", "--yes")
    assert [r["ok"] for r in applied["results"]] == [True], applied
    info = platform.cli_json("branches", "get", branch)
    fn_info = platform.cli_json("functions", "get", "api", "--branch", branch)
    with platform.gateway(host_of(fn_info["invocation_url"])) as gw:
        got = gw.get("/").json()
    assert got["word"] == "unbundled" and got["url"].endswith("/dist/index.mjs")
    assert json.loads(got["input"]) == {
        "name": branch, "id": info["id"], "exists": True, "parentId": info["parent_id"],
        "isDefault": False, "isProtected": False, "expiresAt": None}
    deps = platform.cli_json("functions", "deployments", "api", "--branch", branch)
    assert deps[0]["bundle"] is False


def test_ttl_expires_the_branch_with_its_functions(platform: PlatformProcess,
                                                   tmp_path: Path) -> None:
    branch = new_branch(platform, "nttl")
    root = write(tmp_path / "proj", {
        "neon.ts": DEFINE + """export default defineConfig({
  functions: { api: { name: "api", source: "a.ts" } },
  branch: () => (process.env.TTL ? { ttl: process.env.TTL } : {}),
});
""",
        "a.ts": HELLO, "ttl.env": "TTL=1s\n",
    })
    platform.cli("link", "--branch", branch, "--no-env-pull", cwd=root)
    applied = platform.cli_json_in(root, "deploy", "--yes")
    assert [r["ok"] for r in applied["results"]] == [True], applied
    host = host_of(platform.cli_json("functions", "get", "api", "--branch",
                                     branch)["invocation_url"])
    with platform.gateway(host) as gw:
        assert gw.get("/").status_code == 200
    # A ttl of 1 s counts from the branch's creation: it has already passed, so the
    # sweeper deletes the branch, and its function with it.
    plan = platform.cli_json_in(root, "config", "plan", "--env", "ttl.env")
    assert plan["branch_changes"] == {"ttl_s": 1}
    applied = platform.cli_json_in(root, "deploy", "--yes", "--env", "ttl.env")
    assert applied["branch_settings"]["expires_at"] is not None, applied
    with platform.api() as api:
        wait_for(lambda: api.get(f"/branches/{branch}").status_code == 404, timeout=30,
                 what=f"expired branch {branch} deleted")
    with platform.gateway(host) as gw:
        assert gw.get("/").status_code == 404


def test_protected_branch_refuses_delete_reset_and_plain_deploy(
        platform: PlatformProcess, tmp_path: Path) -> None:
    branch = new_branch(platform, "nprot")
    root = write(tmp_path / "proj", {
        "neon.ts": DEFINE + """export default defineConfig({
  functions: { api: { name: "api", source: "a.ts" } },
  branch: () => ({ protected: process.env.PROTECT === "1",
                   ...(process.env.TTL ? { ttl: process.env.TTL } : {}) }),
});
""",
        "a.ts": HELLO, "on.env": "PROTECT=1\n", "off.env": "PROTECT=0\n",
        "both.env": "PROTECT=1\nTTL=1h\n",
    })
    platform.cli("link", "--branch", branch, "--no-env-pull", cwd=root)
    bad = platform.cli("config", "plan", "--env", "both.env", cwd=root, check=False)
    assert "branch: ttl: a protected branch cannot expire" in bad.stderr, bad.stderr
    applied = platform.cli_json_in(root, "deploy", "--yes", "--env", "on.env")
    assert applied["branch_settings"]["protected"] is True, applied
    for args in (("branches", "delete", branch), ("branches", "reset", branch)):
        out = platform.cli(*args, check=False)
        assert out.returncode != 0
        assert f"branch {branch!r} is protected" in out.stderr + out.stdout
    with platform.api() as api:
        r = api.delete(f"/branches/{branch}")
        assert r.status_code == 409 and r.json()["error"]["code"] == "branch_protected"
    out = platform.cli("deploy", "--yes", "--env", "off.env", cwd=root, check=False)
    assert out.returncode != 0
    assert f"branch {branch!r} is protected: deploying to it needs --allow-protected" \
        in out.stderr
    applied = platform.cli_json_in(root, "deploy", "--yes", "--env", "off.env",
                                   "--allow-protected")
    assert applied["branch_settings"]["protected"] is False, applied
    platform.cli("branches", "delete", branch)
    with platform.api() as api, pytest.raises(httpx.HTTPStatusError):
        api.get(f"/branches/{branch}").raise_for_status()
