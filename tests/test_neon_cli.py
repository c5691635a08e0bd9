"""Neon's own CLI (the npm package ``neon``, pinned) against a running platform's
``/api/v2``: projects, branches, connection strings through psql, functions, and the
error a command phloem cannot serve gets.

The package is installed once into ``~/.cache/phloem-test/neon-<version>`` (reused
between runs) with the machine's npm; the CLI runs as a subprocess with ``NEON_API_HOST``
and ``NEON_API_KEY``, analytics and the update check off.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest

from phloem.testing import PlatformProcess, host_of, platform_process

NEON_VERSION = "6.2.3"
CACHE = Path(os.environ.get("PHLOEM_TEST_CACHE", Path.home() / ".cache" / "phloem-test"))


@pytest.fixture(scope="session")
def neon_cli() -> Path:
    """The pinned ``neon`` package's cli.js, installed once (a lock-free rename makes a
    half-finished install invisible to the next run)."""
    home = CACHE / f"neon-{NEON_VERSION}"
    cli = home / "node_modules" / "neon" / "dist" / "cli.js"
    if cli.is_file():
        return cli
    npm = shutil.which("npm")
    assert npm is not None, "npm is needed to install Neon's CLI for these tests"
    tmp = CACHE / f".tmp-neon-{NEON_VERSION}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    subprocess.run([npm, "install", "--prefix", str(tmp), "--ignore-scripts", "--no-audit",
                    "--no-fund", f"neon@{NEON_VERSION}"], check=True, capture_output=True,
                   timeout=600)
    try:
        tmp.rename(home)
    except OSError:  # another run finished first
        shutil.rmtree(tmp, ignore_errors=True)
    assert cli.is_file()
    return cli


class Neon:
    """Runs ``neon`` against one platform."""

    def __init__(self, cli: Path, platform: PlatformProcess, home: Path) -> None:
        self.cli = cli
        self.platform = platform
        creds = platform.credentials
        node = shutil.which("node")
        assert node is not None
        self.node = node
        self.env = {
            "PATH": os.environ["PATH"], "HOME": str(home),
            "NEON_API_HOST": creds["api_url"] + "/api/v2", "NEON_API_KEY": creds["api_key"],
            "NO_UPDATE_NOTIFIER": "1", "CI": "1", "NO_COLOR": "1",
            # The deploy command polls the function; the default 2 s only slows tests.
            "NEON_FUNCTIONS_POLL_INTERVAL_MS": "200",
        }

    def run(self, *args: str, cwd: Path | None = None,
            check: bool = True) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run([self.node, str(self.cli), "--no-analytics", *args],
                              env=self.env, capture_output=True, text=True, timeout=300,
                              cwd=cwd, stdin=subprocess.DEVNULL)
        if check and proc.returncode != 0:
            raise AssertionError(f"neon {' '.join(args)} exited {proc.returncode}:\n"
                                 f"{proc.stdout}\n{proc.stderr}")
        return proc

    def json(self, *args: str, cwd: Path | None = None) -> Any:
        return json.loads(self.run(*args, "--output", "json", cwd=cwd).stdout)


@pytest.fixture
def neon(neon_cli: Path, platform: PlatformProcess,
         tmp_path: Path) -> Iterator[Neon]:
    home = tmp_path / "home"
    home.mkdir()
    yield Neon(neon_cli, platform, home)


def test_projects_list_and_get_is_this_platform(neon: Neon) -> None:
    listed = neon.json("projects", "list")
    assert len(listed["projects"]) == 1 and listed["shared_with_you"] == []
    project = listed["projects"][0]
    got = neon.json("projects", "get", project["id"])
    assert got["id"] == project["id"] and got["name"] == "phloem"
    # The id is in the system database, so a restart keeps it (test_project_id_survives).
    with neon.platform.system_db() as conn:
        row = conn.execute("SELECT id FROM neon_project").fetchone()
    assert row == (project["id"],)
    other = neon.run("projects", "get", "not-this-one", check=False)
    assert other.returncode == 1 and "not found" in other.stderr
    assert "    at " not in other.stderr  # a message, not a stack trace


def _project_id(p: PlatformProcess) -> str:
    creds = p.credentials
    r = httpx.get(creds["api_url"] + "/api/v2/projects", timeout=60,
                  headers={"Authorization": f"Bearer {creds['api_key']}"})
    r.raise_for_status()
    (project,) = r.json()["projects"]
    return str(project["id"])


def test_project_id_survives_a_restart() -> None:
    """.neon files name the project: its id must not change when the platform restarts."""
    with platform_process() as p:
        first = _project_id(p)
        assert p.stop() == 0
        p.launch()
        p.wait_ready()
        assert _project_id(p) == first


def _direct_and_pooled(url: str) -> tuple[str | None, str]:
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute("SELECT inet_client_addr()::text, current_database()").fetchone()
    assert row is not None
    return row[0], row[1]


def test_branches_and_connection_strings_through_psql(neon: Neon) -> None:
    created = neon.json("branches", "create", "--name", "neoncli-br")
    branch = created["branch"]
    assert branch["name"] == "neoncli-br" and branch["default"] is False
    try:
        # The same branch on both faces.
        ids = {b["name"]: b["id"] for b in neon.platform.cli_json("branches", "list")}
        assert ids["neoncli-br"] == branch["id"]
        listed = neon.json("branches", "list")
        assert {b["id"] for b in listed} == set(ids.values())
        assert [b["name"] for b in listed if b["default"]] == ["main"]
        assert neon.json("branches", "get", "neoncli-br")["id"] == branch["id"]
        assert [d["name"] for d in neon.json("databases", "list", "--branch",
                                             "neoncli-br")] == ["phloemdb"]

        direct = neon.run("connection-string", "neoncli-br", "--ssl", "omit").stdout.strip()
        pooled = neon.run("connection-string", "neoncli-br", "--ssl", "omit",
                          "--pooled").stdout.strip()
        assert direct != pooled and "-pooler" in pooled
        psql = shutil.which("psql")
        assert psql is not None
        for url in (direct, pooled):
            out = subprocess.run([psql, url, "-Atc", "SELECT current_database()"],
                                 capture_output=True, text=True, timeout=60, check=True)
            assert out.stdout.strip() == "phloemdb"
        # Direct is the postmaster's socket; pooled reaches it through PgBouncer (TCP).
        assert _direct_and_pooled(direct) == (None, "phloemdb")
        assert _direct_and_pooled(pooled) == ("127.0.0.1/32", "phloemdb")
        # Neon's default (sslmode=require, channel_binding=require) needs TLS, which
        # branch databases do not serve: libpq says so.
        tls = neon.run("connection-string", "neoncli-br").stdout.strip()
        refused = subprocess.run([psql, tls, "-c", "SELECT 1"], capture_output=True,
                                 text=True, timeout=60)
        assert refused.returncode != 0 and "SSL" in refused.stderr
    finally:
        neon.run("branches", "delete", "neoncli-br")
    names = [b["name"] for b in neon.platform.cli_json("branches", "list")]
    assert "neoncli-br" not in names


FUNCTION_TS = """\
export default {
  async fetch(request: Request): Promise<Response> {
    const url = new URL(request.url);
    return Response.json({ greeting: process.env.GREETING ?? null, path: url.pathname,
                           branch: process.env.NEON_BRANCH });
  },
};
"""


def test_functions_deploy_get_list_delete(neon: Neon, tmp_path: Path) -> None:
    src = tmp_path / "hello"
    src.mkdir()
    (src / "index.ts").write_text(FUNCTION_TS)
    deployed = neon.json("functions", "deploy", "neonhello", "--src", str(src),
                         "--env", "GREETING=hi")
    assert deployed["status"] == "completed" and deployed["id"] == 1, deployed
    try:
        fn = neon.json("functions", "get", "neonhello")
        assert fn["active_deployment"]["environment"] == ["GREETING"]
        with neon.platform.gateway(host_of(fn["invocation_url"])) as gw:
            assert gw.get("/hi").json() == {"greeting": "hi", "path": "/hi",
                                            "branch": "main"}
        # The same function on phloem's face; a second deploy is number 2.
        mine = neon.platform.cli_json("functions", "get", "neonhello")
        assert mine["invocation_url"] == fn["invocation_url"]
        again = neon.json("functions", "deploy", "neonhello", "--src", str(src),
                          "--env", "GREETING=again")
        assert again["id"] == 2 and again["status"] == "completed"
        # main is shared with other tests: look for this one among what is there.
        listed = {f["slug"]: f for f in neon.json("functions", "list")}
        assert listed["neonhello"]["current_deployment"]["id"] == 2
        with neon.platform.gateway(host_of(fn["invocation_url"])) as gw:
            assert gw.get("/").json()["greeting"] == "again"
    finally:
        neon.run("functions", "delete", "neonhello")
    gone = neon.run("functions", "get", "neonhello", check=False)
    assert gone.returncode == 1 and "not found" in gone.stderr
    assert neon.platform.cli_json("functions", "list") == [] or all(
        f["slug"] != "neonhello" for f in neon.platform.cli_json("functions", "list"))


def test_unsupported_command_says_so(neon: Neon) -> None:
    proc = neon.run("operations", "list", check=False)
    assert proc.returncode == 1
    assert "not supported by phloem" in proc.stderr, proc.stderr
    assert "    at " not in proc.stderr + proc.stdout  # no stack trace
    creds = neon.platform.credentials
    r = httpx.get(creds["api_url"] + "/api/v2/no/such/route",
                  headers={"Authorization": f"Bearer {creds['api_key']}"})
    assert r.status_code == 400
    assert r.json() == {"code": "NOT_SUPPORTED", "message": r.json()["message"]}
    assert "not supported by phloem" in r.json()["message"]
    assert httpx.get(creds["api_url"] + "/api/v2", headers={
        "Authorization": f"Bearer {creds['api_key']}"}).json()["code"] == "NOT_SUPPORTED"
    refused = httpx.get(creds["api_url"] + "/api/v2/projects")
    assert refused.status_code == 401
    assert refused.json() == {"code": "unauthorized",
                              "message": "missing 'Authorization: Bearer <api key>'"}
    project = neon.json("projects", "list")["projects"][0]["id"]
    bad = httpx.post(f"{creds['api_url']}/api/v2/projects/{project}/branches/main/functions"
                     "/x/deployments", json={"zip": "no"},
                     headers={"Authorization": f"Bearer {creds['api_key']}"})
    assert bad.status_code == 400 and bad.json()["code"] == "invalid_input"
    assert "multipart/form-data" in bad.json()["message"]



def test_rename_reset_set_default_roles_and_me(neon: Neon) -> None:
    made = neon.json("branches", "create", "--name", "neoncli-d1")["branch"]
    try:
        assert neon.json("branches", "rename", "neoncli-d1", "neoncli-d2")["name"] == \
            "neoncli-d2"
        names = {b["name"] for b in neon.platform.cli_json("branches", "list")}
        assert "neoncli-d2" in names and "neoncli-d1" not in names
        # Reset to the parent: a table made on the branch is gone, the id stays.
        url = neon.run("connection-string", "neoncli-d2", "--ssl", "omit").stdout.strip()
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("CREATE TABLE neoncli_reset_probe (id int)")
        reset = neon.json("branches", "reset", "neoncli-d2", "--parent")
        assert reset["id"] == made["id"]
        with psycopg.connect(url, autocommit=True) as conn:
            assert conn.execute("SELECT to_regclass('neoncli_reset_probe')").fetchone() == \
                (None,)
        point_in_time = neon.run("branches", "restore", "neoncli-d2", "^self@0/1",
                                 check=False)
        assert point_in_time.returncode == 1
        assert "not supported by phloem" in point_in_time.stderr
        # set-default moves the default; branches made without --parent come from it.
        neon.run("branches", "set-default", "neoncli-d2")
        try:
            listed = neon.json("branches", "list")
            assert [b["name"] for b in listed if b["default"]] == ["neoncli-d2"]
            child = neon.json("branches", "create", "--name", "neoncli-d3")["branch"]
            assert child["parent_id"] == made["id"]
            neon.run("branches", "delete", "neoncli-d3")
        finally:
            neon.run("branches", "set-default", "main")
        assert [r["name"] for r in neon.json("roles", "list", "--branch", "neoncli-d2")] == \
            ["phloemdb_owner"]
        root = neon.run("branches", "rename", "main", "other", check=False)
        assert root.returncode == 1 and "root branch" in root.stderr
    finally:
        neon.run("branches", "delete", made["id"])
    me = neon.json("me")
    assert me["id"] == "phloem" and me["login"] == "phloem"


NEON_TS = """\
import { defineConfig } from "@neon/config";

export default defineConfig({
  functions: {
    hello: { name: "hello", source: "src/index.ts", env: { GREETING: "from neon.ts" } },
  },
});
"""


def _dotenv(path: Path) -> dict[str, str]:
    return dict(line.split("=", 1) for line in path.read_text().splitlines()
                if "=" in line and not line.startswith("#"))


def test_link_checkout_deploy_env_pull_with_a_neon_ts(neon: Neon, neon_cli: Path,
                                                      tmp_path: Path) -> None:
    """A Neon project (neon.ts declaring a function) driven by Neon's CLI only."""
    root = tmp_path / "app"
    (root / "src").mkdir(parents=True)
    (root / "neon.ts").write_text(NEON_TS)
    (root / "src" / "index.ts").write_text(FUNCTION_TS)
    (root / "package.json").write_text('{"name": "app", "private": true, "type": "module"}')
    # neon.ts imports @neon/config: the one the CLI installed (as `npm install` would).
    (root / "node_modules" / "@neon").mkdir(parents=True)
    (root / "node_modules" / "@neon" / "config").symlink_to(
        neon_cli.parents[2] / "@neon" / "config")

    neon.run("link", "-y", cwd=root)
    context = json.loads((root / ".neon").read_text())
    assert context["branch"] == "main"
    assert context["projectId"] == neon.json("projects", "list")["projects"][0]["id"]
    pulled = _dotenv(root / ".env.local")
    with psycopg.connect(pulled["DATABASE_URL_UNPOOLED"]) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)

    neon.run("branches", "create", "--name", "neoncli-app")
    try:
        neon.run("checkout", "neoncli-app", cwd=root)
        assert json.loads((root / ".neon").read_text())["branch"] == "neoncli-app"
        neon.run("config", "status", cwd=root)
        assert "+ function hello" in neon.run("config", "plan", cwd=root).stdout
        neon.run("deploy", cwd=root)
        fn = neon.platform.cli_json("functions", "get", "hello", "--branch", "neoncli-app")
        with neon.platform.gateway(host_of(fn["invocation_url"])) as gw:
            assert gw.get("/x").json() == {"greeting": "from neon.ts", "path": "/x",
                                           "branch": "neoncli-app"}
        (root / ".env.local").unlink()
        neon.run("env", "pull", cwd=root)
        pulled = _dotenv(root / ".env.local")
        assert pulled["NEON_BRANCH"] == "neoncli-app"
        mine = neon.platform.cli("connection-string", "--branch", "neoncli-app",
                                 "--unpooled").stdout.strip()
        assert pulled["DATABASE_URL_UNPOOLED"] == mine
        live = neon.run("env", "pull", "-s", "functions", "--file", ".env.fn", cwd=root)
        assert live.returncode == 0
        assert _dotenv(root / ".env.fn")["NEON_FUNCTION_HELLO_BASE_URL"] == \
            fn["invocation_url"]
    finally:
        neon.platform.cli("branches", "delete", "neoncli-app")
