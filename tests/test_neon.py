"""Node projects configured by neon.ts, and Neon's helper packages, through the CLI and a
real platform: plan/apply, branch closures, refused services, phloem's @neon/functions."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import uuid
from pathlib import Path

import psycopg
import pytest

from phloem.testing import PlatformProcess, host_of, wait_for

EXAMPLES = Path(__file__).parent.parent / "examples"
APPS = Path(__file__).parent / "apps"


def new_branch(platform: PlatformProcess, prefix: str) -> str:
    name = f"{prefix}-{uuid.uuid4().hex[:8]}"
    platform.cli("branches", "create", "--name", name)
    return name


def write(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


HELLO = 'export default { fetch: () => new Response(`hi ${process.env.GREETING ?? ""}`) };\n'


def test_neon_ts_plan_apply_and_branch_closure(platform: PlatformProcess,
                                              tmp_path: Path) -> None:
    branch = new_branch(platform, "neon")
    root = write(tmp_path / "proj", {
        "neon.ts": """
import { defineConfig } from "@neondatabase/config/v1";
export default defineConfig({
  preview: {
    functions: {
      hello: {
        name: "hello fn",
        source: "src/hello.ts",
        env: { GREETING: process.env.GREETING_FROM_CLI! },
      },
    },
  },
  branch: (b) => ({
    preview: { functions: { hello: { limits: { max_isolates: 2 }, env: { WHO: b.name } } } },
  }),
});
""",
        "src/hello.ts": HELLO,
        ".env.deploy": "GREETING_FROM_CLI=from-dotenv\n",
    })
    platform.cli("link", "--branch", branch, cwd=root)
    plan = platform.cli_json_in(root, "config", "plan", "--env", ".env.deploy")
    assert [(i["slug"], i["action"]) for i in plan["plan"]] == [("hello", "create")]
    applied = platform.cli_json_in(root, "deploy", "--env", ".env.deploy")
    assert [r["ok"] for r in applied["results"]] == [True], applied
    fn = platform.cli_json("functions", "get", "hello", "--branch", branch, "--list-env",
                           "--show-values")
    assert fn["name"] == "hello fn" and fn["runtime"] == "nodejs24"
    assert fn["env"] == {"GREETING": "from-dotenv", "WHO": branch}
    with platform.gateway(host_of(fn["invocation_url"])) as gw:
        assert gw.get("/").text == "hi from-dotenv"
    again = platform.cli_json_in(root, "config", "plan", "--env", ".env.deploy")
    assert [(i["slug"], i["action"]) for i in again["plan"]] == [("hello", "unchanged")]

    # Without the variable the config reads, evaluation fails naming the key.
    bad = platform.cli("config", "plan", cwd=root, check=False)
    assert bad.returncode != 0
    assert "functions.hello.env.GREETING: must be a string" in bad.stderr


@pytest.mark.parametrize(("snippet", "named"), [
    ("dataApi: { enabled: true, authProvider: 'external', jwksUrl: 'https://x/jwks' },",
     "the Data API (dataApi)"),
])
def test_neon_ts_with_services_phloem_lacks_is_refused(platform: PlatformProcess,
                                                       tmp_path: Path, snippet: str,
                                                       named: str) -> None:
    root = write(tmp_path / "proj", {
        "neon.ts": 'import { defineConfig } from "@neon/config/v1";\n'
                   f'export default defineConfig({{ {snippet} '
                   'functions: { hello: { name: "h", source: "src/hello.ts" } } });\n',
        "src/hello.ts": HELLO,
    })
    platform.cli("link", "--branch", "main", cwd=root)
    out = platform.cli("deploy", cwd=root, check=False)
    assert out.returncode != 0
    assert "enables a service phloem does not provide" in out.stderr
    assert named in out.stderr


@pytest.mark.parametrize(("neon_ts", "message"), [
    ('export default defineConfig({ functions: { "Bad-Slug": { name: "x", source: "a.ts" } } });',
     "functions.Bad-Slug: slug must match"),
    ('export default defineConfig({ functions: { ok: { name: "x", source: "missing.ts" } } });',
     "functions.ok.source: file 'missing.ts' does not exist"),
    ('export default defineConfig({ functions: { ok: { name: "x", source: "a.ts", '
     'limits: { max_isolates: 0 } } } });',
     "functions.ok.limits.max_isolates: must be at least 1"),
    ('export default defineConfig({ functions: { ok: { name: "x", source: "a.ts" } }, '
     'branch: () => { throw new Error("nope"); } });',
     'branch: the closure raised for branch "main": nope'),
    ('export default defineConfig({ functions: { ok: { name: "x", source: "a.ts" } }, '
     'branch: () => ({ functions: { other: {} } }) });',
     "branch: functions.other: no such function is declared"),
    ('export default defineConfig({ functions: { ok: { name: "x", source: "a.ts", '
     'env: { NEON_TOKEN: "t" } } } });', "functions.ok.env.NEON_TOKEN"),
    ('export default defineConfig({ functions: { ok: { name: "x", source: "a.ts" } }, '
     'branch: () => ({ functions: { ok: { runtime: "nodejs18" } } }) });',
     "functions.ok.runtime: unknown runtime 'nodejs18' (known: nodejs24)"),
    ('const x: number = ;', "esbuild could not bundle it"),
])
def test_bad_neon_ts_names_the_field(platform: PlatformProcess, tmp_path: Path,
                                     neon_ts: str, message: str) -> None:
    root = write(tmp_path / "proj", {
        "neon.ts": 'import { defineConfig } from "@neon/config/v1";\n' + neon_ts,
        "a.ts": HELLO,
    })
    platform.cli("link", "--branch", "main", cwd=root)
    out = platform.cli("config", "plan", cwd=root, check=False)
    assert out.returncode != 0
    assert message in out.stderr, out.stderr


def test_neon_functions_substitute_wait_until_and_pool(platform: PlatformProcess) -> None:
    # @neondatabase/functions is declared (npm has no such package) and @neon/functions
    # only imported: both are phloem's.
    fn = platform.deploy("neonfns", APPS / "node-neon-functions", "--limit", "idle_timeout_s=2")
    assert fn["status"] == "ready", fn
    with platform.gateway(host_of(fn["invocation_url"])) as gw:
        first = gw.get("/").json()
        assert first["finished"] == 0
        assert gw.get("/later", params={"ms": "300"}).status_code == 202
        assert gw.get("/later", params={"ms": "300", "via": "neon"}).status_code == 202
        wait_for(lambda: gw.get("/").json()["finished"] == 2, 30, "both waitUntil jobs")

    def logs() -> str:
        return platform.cli("functions", "logs", "neonfns").stdout

    # Idle eviction (idle_timeout_s=2) drains the isolate, then closes the attached pool.
    wait_for(lambda: "attached pool closed" in logs(), 60, "the attached pool to close")
    assert "background work done (2)" in logs()


@pytest.fixture(scope="module")
def todos_project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """examples/hono-todos with its dev dependencies installed (drizzle-kit), as a user has
    it after `npm install`."""
    root = tmp_path_factory.mktemp("hono-todos") / "app"
    shutil.copytree(EXAMPLES / "hono-todos", root,
                    ignore=shutil.ignore_patterns("node_modules", ".env", ".phloem"))
    subprocess.run(["npm", "install", "--no-audit", "--no-fund", "--ignore-scripts"],
                   cwd=root, check=True, capture_output=True, timeout=600)
    return root


def test_hono_todos_example(platform: PlatformProcess, todos_project: Path) -> None:
    root = todos_project
    branch = new_branch(platform, "todos")
    platform.cli("link", "--branch", branch, cwd=root)
    # The branch has main's data, where other tests keep a different `todos` table; start
    # from a database without this app's tables but with someone else's, which drizzle-kit
    # must leave alone (the example's tablesFilter).
    url = platform.cli("connection-string", "--branch", branch, "--unpooled").stdout.strip()
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("DROP TABLE IF EXISTS todos, todo_events")
        conn.execute("CREATE TABLE IF NOT EXISTS other_app_rows (id int)")
    # The schema goes in with drizzle-kit over the direct URL, as in Neon's example.
    push = platform.cli("env", "run", "--", "npx", "drizzle-kit", "push", "--force",
                        cwd=root, check=False)
    with psycopg.connect(url) as conn:
        tables = {r[0] for r in conn.execute(
            "SELECT tablename FROM pg_tables WHERE schemaname = 'public'")}
    assert push.returncode == 0 and {"todos", "todo_events", "other_app_rows"} <= tables, \
        (push.stdout + push.stderr, tables)
    applied = platform.cli_json_in(root, "deploy")
    assert [(r["slug"], r["ok"]) for r in applied["results"]] == [("todos", True)], applied
    fn = platform.cli_json("functions", "get", "todos", "--branch", branch)
    with platform.gateway(host_of(fn["invocation_url"])) as gw:
        assert gw.get("/").text == f"todos on {branch}"
        made = gw.post("/todos", json={"text": "branch me"})
        assert made.status_code == 201, platform.cli("functions", "logs", "todos", "--branch",
                                                     branch, "--lines", "60").stdout
        assert made.headers["x-todos-banner"] == f"preview {branch}"
        assert gw.post("/todos", json={"text": ""}).status_code == 400
        assert [t["text"] for t in gw.get("/todos").json()] == ["branch me"]
        todo_id = made.json()["id"]
        assert gw.patch(f"/todos/{todo_id}", json={"done": True}).json()["done"] is True
        # waitUntil's insert lands after the response.
        wait_for(lambda: [e["kind"] for e in gw.get("/events").json()] == ["created"], 30,
                 "the waitUntil event row")

    # A child made by checkout has the parent's rows and its own deployment; its writes
    # stay in the child.
    child = f"{branch}/preview"
    out = platform.cli("checkout", child, "--no-env-pull", cwd=root).stdout
    assert "created and switched" in out
    child_fn = platform.cli_json("functions", "get", "todos", "--branch", child)
    assert child_fn["status"] == "ready"
    with platform.gateway(host_of(child_fn["invocation_url"])) as gw:
        assert [t["text"] for t in gw.get("/todos").json()] == ["branch me"]
        assert gw.post("/todos", json={"text": "child only"}).status_code == 201
        assert len(gw.get("/todos").json()) == 2
    with platform.gateway(host_of(fn["invocation_url"])) as gw:
        assert [t["text"] for t in gw.get("/todos").json()] == ["branch me"]
    link = json.loads((root / ".phloem" / "link.json").read_text())
    assert link["branch"] == child


def test_init_hono_template_deploys(platform: PlatformProcess, tmp_path: Path) -> None:
    root = tmp_path / "hono-app"
    out = platform.cli("init", str(root), "--template", "hono").stdout
    assert "neon.ts" in out and "src/index.ts" in out
    again = platform.cli("init", str(root), "--template", "python", check=False)
    assert again.returncode != 0 and "neon.ts exists" in again.stderr
    branch = new_branch(platform, "hono")
    platform.cli("link", "--branch", branch, cwd=root)
    applied = platform.cli_json_in(root, "deploy")
    assert [(r["slug"], r["ok"]) for r in applied["results"]] == [("api", True)], applied
    fn = platform.cli_json("functions", "get", "api", "--branch", branch)
    with platform.gateway(host_of(fn["invocation_url"])) as gw:
        assert gw.get("/").json() == {"greeting": "hello", "stage": branch, "branch": branch}
        assert gw.get("/db").json()["database"] == "phloemdb"
    unknown = platform.cli("init", str(tmp_path / "x"), "--template", "rust", check=False)
    assert unknown.returncode != 0 and "available: python, hono" in unknown.stderr


@pytest.mark.parametrize(("example", "slug"), [
    ("hono-todos", "todos"), ("realtime-chat", "chat"), ("realtime-sse", "events"),
    ("agent-cors", "agent")])
def test_examples_neon_ts_plans(platform: PlatformProcess, tmp_path: Path, example: str,
                                slug: str) -> None:
    root = tmp_path / example
    shutil.copytree(EXAMPLES / example, root,
                    ignore=shutil.ignore_patterns("node_modules", ".env", ".phloem"))
    platform.cli("link", "--branch", new_branch(platform, "plan"), cwd=root)
    plan = platform.cli_json_in(root, "config", "plan")
    assert [(i["slug"], i["action"]) for i in plan["plan"]
            if i["slug"] == slug] == [(slug, "create")]


def test_realtime_sse_example_deploys_from_neon_ts(platform: PlatformProcess,
                                                   tmp_path: Path) -> None:
    root = tmp_path / "sse"
    shutil.copytree(EXAMPLES / "realtime-sse", root,
                    ignore=shutil.ignore_patterns("node_modules", ".env", ".phloem"))
    (root / ".env.deploy").write_text("SSE_PING_INTERVAL_S=0.3\n")
    branch = new_branch(platform, "sse")
    platform.cli("link", "--branch", branch, cwd=root)
    applied = platform.cli_json_in(root, "deploy", "--env", ".env.deploy")
    assert [(r["slug"], r["ok"]) for r in applied["results"]] == [("events", True)], applied
    fn = platform.cli_json("functions", "get", "events", "--branch", branch, "--list-env",
                           "--show-values")
    assert fn["env"] == {"SSE_PING_INTERVAL_S": "0.3"}
    with platform.gateway(host_of(fn["invocation_url"])) as gw, \
            gw.stream("GET", "/events", headers={"Accept": "text/event-stream"}) as stream:
        assert stream.headers["content-type"].startswith("text/event-stream")
        lines = stream.iter_lines()
        deadline = time.monotonic() + 20
        while next(lines) != ": ping":
            assert time.monotonic() < deadline
