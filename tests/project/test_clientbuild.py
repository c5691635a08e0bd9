"""A project bundled on the client (it has a ``node_modules``) keeps the rest of what its
``neon.ts`` says: the branch services it declares are planned and applied as when the
platform bundles (``with-realtime-chat`` and ``with-mastra`` lost them and their
functions failed on ``parseEnv``)."""

from __future__ import annotations

from pathlib import Path

from phloem.testing import PlatformProcess
from tests.test_neon import new_branch, write

NEON_TS = """import { defineConfig } from "@phloem/config";
export default defineConfig({
  preview: { aiGateway: true, functions: { cbai: { name: "cbai", source: "src/index.ts" } } },
});
"""


def test_client_build_keeps_declared_services(platform: PlatformProcess,
                                              tmp_path: Path) -> None:
    """~5 s (config plan only: no service is provisioned)."""
    root = write(tmp_path / "proj", {
        "neon.ts": NEON_TS,
        "src/index.ts": "export default { fetch: () => new Response('ok') };\n",
        "node_modules/.package-lock.json": "{}\n",
    })
    branch = new_branch(platform, "cbuild")
    platform.cli("link", "--branch", branch, "--no-env-pull", cwd=root)
    plan = platform.cli_json_in(root, "config", "plan")
    assert [(i["slug"], i["action"]) for i in plan["plan"]] == [("cbai", "create")]
    assert plan["services"] == {"ai": "add"}
