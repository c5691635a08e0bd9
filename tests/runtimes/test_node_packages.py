"""phloem's npm packages (@phloem/config, @phloem/env, @phloem/functions): they pack with
npm, install into a project from the tarballs, and work outside phloem too."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from phloem.runtimes.node.substitutes import PACKAGES_DIR, SUPPLIED

SCRIPT = """
import { defineConfig } from "@phloem/config/v1";
import { parseEnv, EnvError } from "@phloem/env";
import { waitUntil, attachDatabasePool } from "@phloem/functions";

const config = defineConfig({ functions: { api: { name: "api", source: "a.ts",
                                                  env: { TOKEN: "x" } } } });
const out = { frozen: Object.isFrozen(config) };
out.env = parseEnv(config, "api");
try { parseEnv(config, "api", {}); } catch (err) {
  out.missing = err instanceof EnvError ? err.issues : String(err);
}
try { defineConfig({ functions: { "No-Slug": { name: "x", source: "y" } } }); } catch (err) {
  out.badSlug = err.message;
}
let closed = false;
attachDatabasePool({ end: async () => { closed = true; } });
let done = false;
waitUntil(new Promise((resolve) => setTimeout(() => { done = true; resolve(); }, 50)));
await new Promise((resolve) => setTimeout(resolve, 200));
out.waited = done;
out.closedOutsidePhloem = closed;
console.log(JSON.stringify(out));
"""


def test_packages_pack_install_and_run(tmp_path: Path) -> None:
    assert set(SUPPLIED.values()) == {p.name for p in PACKAGES_DIR.iterdir()}
    tarballs = []
    for package in sorted(PACKAGES_DIR.iterdir()):
        meta = json.loads((package / "package.json").read_text())
        assert meta["name"] == f"@phloem/{package.name}"
        assert meta["exports"]["./v1"]["types"] == "./v1.d.ts"
        packed = subprocess.run(["npm", "pack", str(package), "--json", "--pack-destination",
                                 str(tmp_path)], capture_output=True, text=True, check=True,
                                timeout=120, cwd=tmp_path)
        info = json.loads(packed.stdout)[0]
        assert {f["path"] for f in info["files"]} >= {"index.js", "index.d.ts", "v1.js",
                                                      "v1.d.ts", "package.json"}
        # One with registry dependencies (ai-sdk-provider: @ai-sdk/openai) installs only
        # online; tests/services/test_ai_gateway.py deploys it with the real AI SDK.
        if not meta.get("dependencies"):
            tarballs.append(str(tmp_path / info["filename"]))
    project = tmp_path / "project"
    project.mkdir()
    (project / "package.json").write_text('{"name": "p", "private": true, "type": "module"}')
    subprocess.run(["npm", "install", "--no-audit", "--no-fund", "--offline", *tarballs],
                   cwd=project, check=True, capture_output=True, timeout=300)
    (project / "main.mjs").write_text(SCRIPT)
    ran = subprocess.run(["node", "main.mjs"], cwd=project, capture_output=True, text=True,
                         timeout=60, env={"PATH": "/usr/local/bin:/usr/bin:/bin",
                                          "DATABASE_URL": "postgresql://a@h/d",
                                          "DATABASE_URL_UNPOOLED": "postgresql://a@h:5/d",
                                          "NEON_BRANCH": "main", "TOKEN": "t"})
    assert ran.returncode == 0, ran.stderr
    out = json.loads(ran.stdout)
    assert out["frozen"] is True
    assert out["env"] == {"postgres": {"databaseUrl": "postgresql://a@h/d",
                                       "databaseUrlUnpooled": "postgresql://a@h:5/d"},
                          "branch": {"name": "main"}, "function": {"TOKEN": "t"}}
    assert out["missing"] == ["DATABASE_URL is missing", "DATABASE_URL_UNPOOLED is missing",
                              'TOKEN is missing (function "api")']
    assert "functions.No-Slug: slug must match" in out["badSlug"]
    assert out["waited"] is True
    assert out["closedOutsidePhloem"] is False  # only the phloem host closes pools
