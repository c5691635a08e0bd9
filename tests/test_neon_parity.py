"""Neon project shapes through the CLI and a real platform: a bare function default export
deployed, the project's .env and .env.local read when neon.ts is evaluated, a piped
``--env``, and ``env pull``'s target file and function URLs."""

from __future__ import annotations

import shlex
import subprocess
import uuid
from pathlib import Path

from phloem.testing import PHLOEM, PlatformProcess, host_of

NEON_TS = """import { defineConfig } from "@neon/config/v1";
export default defineConfig({
  preview: {
    functions: {
      bot: {
        name: "bot",
        source: "src/bot.ts",
        env: { TOKEN: process.env.BOT_TOKEN!, WHO: process.env.WHO! },
      },
    },
  },
});
"""

# The shape of Neon's HTTP bots: the default export is the handler itself.
BOT = """export default async function handler(request: Request): Promise<Response> {
  const body = await request.text();
  return new Response(`bot ${request.method} ${new URL(request.url).pathname} ${body} ` +
    `${process.env.TOKEN} ${process.env.WHO}`);
}
"""


def env_lines(path: Path) -> dict[str, str]:
    return dict(line.split("=", 1) for line in path.read_text().splitlines() if "=" in line)


def test_bare_function_dotenv_piped_env_and_env_pull(platform: PlatformProcess,
                                                    tmp_path: Path) -> None:
    root = tmp_path / "bot"
    (root / "src").mkdir(parents=True)
    (root / "neon.ts").write_text(NEON_TS)
    (root / "src" / "bot.ts").write_text(BOT)
    (root / ".env").write_text("# mine\nBOT_TOKEN=from-dotenv\nWHO=from-env\nMY_KEY=keep me\n"
                               "NEON_FUNCTION_GONE_BASE_URL=http://gone.example/\n")
    (root / ".env.local").write_text("WHO=from-env-local\n")
    branch = f"par-{uuid.uuid4().hex[:8]}"
    platform.cli("branches", "create", "--name", branch)
    platform.cli("link", "--branch", branch, "--no-env-pull", cwd=root)

    # deploy reads .env, and .env.local over it, when it evaluates neon.ts.
    applied = platform.cli_json_in(root, "deploy")
    assert [r["ok"] for r in applied["results"]] == [True], applied
    fn = platform.cli_json("functions", "get", "bot", "--branch", branch)
    with platform.gateway(host_of(fn["invocation_url"])) as gw:
        r = gw.post("/interactions", content="ping")
        assert (r.status_code, r.text) == (200, "bot POST /interactions ping from-dotenv "
                                                "from-env-local")

    # --env <(echo K=V): a pipe, read once; it wins over the project's dotenv files.
    cmd = shlex.join([PHLOEM, "deploy", "--output", "json"]) + \
        " --env <(echo BOT_TOKEN=from-pipe)"
    proc = subprocess.run(["bash", "-c", cmd], cwd=root, env=platform.env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    shown = platform.cli_json("functions", "get", "bot", "--branch", branch, "--list-env",
                              "--show-values")
    assert shown["env"] == {"TOKEN": "from-pipe", "WHO": "from-env-local"}
    missing = platform.cli("config", "plan", "--env", "nope.env", cwd=root, check=False)
    assert missing.returncode != 0
    assert "--env nope.env: file not found" in missing.stderr

    # env pull: into the existing .env, with each function's base URL; stale ones go.
    url = fn["invocation_url"].rstrip("/") + "/"
    platform.cli("env", "pull", cwd=root)
    pulled = env_lines(root / ".env")
    assert pulled["NEON_FUNCTION_BOT_BASE_URL"] == url
    assert "NEON_FUNCTION_GONE_BASE_URL" not in pulled
    assert pulled["MY_KEY"] == "keep me" and pulled["NEON_BRANCH"] == branch
    assert pulled["DATABASE_URL"].startswith("postgresql://")
    assert "# mine" in (root / ".env").read_text().splitlines()
    assert env_lines(root / ".env.local") == {"WHO": "from-env-local"}

    # Without a .env it writes .env.local (keeping its lines); --file names another.
    (root / ".env").unlink()
    platform.cli("env", "pull", cwd=root)
    local = env_lines(root / ".env.local")
    assert local["WHO"] == "from-env-local"
    assert local["NEON_FUNCTION_BOT_BASE_URL"] == url
    assert not (root / ".env").exists()
    platform.cli("env", "pull", "--file", "preview.env", cwd=root)
    assert env_lines(root / "preview.env")["NEON_FUNCTION_BOT_BASE_URL"] == url
