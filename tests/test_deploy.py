"""Deploying Python functions and calling them through the gateway, as a user does:
the CLI against a running ``phloem up``, HTTP through the gateway, SQL on the branch."""

from __future__ import annotations

import os
import time
from pathlib import Path

import httpx
import psycopg
import pytest

from phloem.testing import EXAMPLE, PlatformProcess, copy_example, host_of, wait_for

APPS = Path(__file__).parent / "apps"


@pytest.fixture(scope="module")
def todos(platform: PlatformProcess) -> dict[str, str]:
    fn = platform.deploy("todos", EXAMPLE, "--entry", "main:app", "--name", "todo api")
    assert fn["status"] == "ready", fn
    return fn


def test_deploy_reports_function(platform: PlatformProcess, todos: dict[str, str]) -> None:
    fn = platform.cli_json("functions", "get", "todos")
    branch = platform.cli_json("functions", "list")[0]["branch_id"]
    assert fn["slug"] == "todos"
    assert fn["name"] == "todo api"
    assert fn["status"] == "ready"
    assert fn["branch_id"] == branch
    assert fn["invocation_url"] == (f"http://{branch}-todos.fn.localhost:"
                                    f"{platform.gateway_port}")
    assert fn["deployment_id"].startswith("dep-")
    assert fn["created_at"]


def test_todos_round_trip_lands_in_branch_database(platform: PlatformProcess,
                                                    todos: dict[str, str]) -> None:
    with platform.gateway(host_of(todos["invocation_url"])) as gw:
        hello = gw.get("/")
        assert hello.status_code == 200
        assert hello.text.startswith("hello from phloem (branch main)")
        created = [gw.post("/todos", json={"title": f"task {i}"}) for i in range(3)]
        assert [r.status_code for r in created] == [201, 201, 201]
        listed = gw.get("/todos").json()
        assert [t["title"] for t in listed][-3:] == ["task 0", "task 1", "task 2"]
        assert gw.post("/todos", json={}).status_code == 400
    # The rows are in the branch's own cluster, not the system database.
    url = platform.cli("connection-string", "--unpooled").stdout.strip()
    assert ":5432/" not in url
    with psycopg.connect(url) as conn:
        titles = [r[0] for r in conn.execute("SELECT title FROM todos ORDER BY id")]
    assert titles[-3:] == ["task 0", "task 1", "task 2"]


def test_concurrent_requests_share_one_isolate(platform: PlatformProcess,
                                               todos: dict[str, str]) -> None:
    import concurrent.futures

    with platform.gateway(host_of(todos["invocation_url"])) as gw:
        gw.get("/")
        with concurrent.futures.ThreadPoolExecutor(16) as pool:
            codes = list(pool.map(lambda _: gw.get("/todos").status_code, range(64)))
    assert codes == [200] * 64
    isolates = [i for i in platform.cli_json("status")["isolates"] if i["function"] == "todos"]
    assert len(isolates) == 1


def test_injected_environment(platform: PlatformProcess) -> None:
    fn = platform.deploy("envprobe", APPS / "envprobe", "--env", "GREETING=hi there")
    assert fn["status"] == "ready"
    with platform.gateway(host_of(fn["invocation_url"])) as gw:
        body = gw.get("/", headers={"X-Request-Id": "req-123"}).json()
    env = body["env"]
    url = platform.cli("connection-string", "--unpooled").stdout.strip()
    assert env["DATABASE_URL_UNPOOLED"] == url
    assert env["DATABASE_URL"].startswith("postgresql://")
    assert env["PHLOEM_BRANCH"] == env["NEON_BRANCH"] == "main"
    assert env["PHLOEM_FUNCTION"] == "envprobe"
    assert env["PHLOEM_DEPLOYMENT"] == fn["deployment_id"]
    assert env["GREETING"] == "hi there"
    assert body["headers"]["x-request-id"] == "req-123"
    assert body["headers"]["x-forwarded-host"] == host_of(fn["invocation_url"])
    assert body["headers"]["x-forwarded-for"] == "127.0.0.1"


def test_forwarded_for_is_the_peer_unless_it_is_a_trusted_proxy(
        platform: PlatformProcess) -> None:
    """The shared platform trusts 127.0.0.2 (tests/conftest.py), not 127.0.0.1."""
    fn = platform.deploy("envprobe", APPS / "envprobe")
    host = host_of(fn["invocation_url"])
    spoofed = {"X-Forwarded-For": "6.6.6.6", "X-Forwarded-Proto": "https",
               "X-Forwarded-Host": "bank.example", "X-Real-IP": "6.6.6.6"}

    def seen_from(local_address: str) -> dict[str, str]:
        transport = httpx.HTTPTransport(local_address=local_address)
        with httpx.Client(transport=transport, timeout=120) as client:
            r = client.get(f"http://127.0.0.1:{platform.gateway_port}/",
                           headers={"Host": host, **spoofed})
        assert r.status_code == 200
        headers: dict[str, str] = r.json()["headers"]
        return {k: v for k, v in headers.items()
                if k.startswith("x-forwarded-") or k == "x-real-ip"}

    assert seen_from("127.0.0.1") == {"x-forwarded-for": "127.0.0.1",
                                      "x-forwarded-proto": "http",
                                      "x-forwarded-host": host}
    assert seen_from("127.0.0.2") == {"x-forwarded-for": "6.6.6.6, 127.0.0.2",
                                      "x-forwarded-proto": "https",
                                      "x-forwarded-host": "bank.example",
                                      "x-real-ip": "6.6.6.6"}


@pytest.mark.skipif(os.geteuid() != 0, reason="privilege separation needs root")
def test_isolates_cannot_read_platform_secrets(platform: PlatformProcess,
                                               todos: dict[str, str]) -> None:
    fn = platform.deploy("envprobe", APPS / "envprobe")
    with platform.gateway(host_of(fn["invocation_url"])) as gw:
        body = gw.get("/").json()
        assert body["uid"] != 0
        dd = platform.data_dir
        todos_app = dd / "deployments" / todos["deployment_id"] / "app" / "main.py"
        own_app = dd / "deployments" / fn["deployment_id"] / "app" / "main.py"
        paths = [dd / "credentials.json", dd / "secrets", dd / "system" / "pgdata",
                 dd / "branches" / todos["branch_id"] / "pgdata", dd / "artifacts",
                 dd / "logs", todos_app, own_app]
        probe = gw.get("/probe", params=[("path", str(p)) for p in paths]).json()
    assert probe.pop(str(own_app)) == "readable"
    # In its sandbox the rest of the data dir is not even there.
    assert set(probe.values()) == {"missing"}, probe


def test_redeploy_serves_new_version(platform: PlatformProcess, tmp_path: Path) -> None:
    src = copy_example(tmp_path / "app")
    first = platform.deploy("redeploy", src)
    host = host_of(first["invocation_url"])
    with platform.gateway(host) as gw:
        assert gw.get("/").text.startswith("hello from phloem")
        main = src / "main.py"
        main.write_text(main.read_text().replace('"hello from phloem"', '"version two"'))
        second = platform.deploy("redeploy", src)
        assert second["deployment_id"] != first["deployment_id"]
        assert gw.get("/").text.startswith("version two")
    # The old isolate drains and gets SIGINT: its lifespan shutdown runs.
    url = platform.cli("connection-string", "--unpooled").stdout.strip()

    def shutdown_seen() -> bool:
        with psycopg.connect(url) as conn:
            row = conn.execute("SELECT count(*) FROM lifecycle_events WHERE event = 'shutdown'"
                               ).fetchone()
            return bool(row and row[0] >= 1)

    wait_for(shutdown_seen, 30, "the old isolate's lifespan shutdown")


def test_failed_deploy_keeps_previous_serving(platform: PlatformProcess) -> None:
    good = platform.deploy("keeper", APPS / "envprobe")
    bad = platform.cli("functions", "deploy", "keeper", "--path", str(APPS / "notasgi"),
                       check=False)
    assert bad.returncode != 0
    assert "is not an ASGI app" in bad.stderr
    fn = platform.cli_json("functions", "get", "keeper")
    assert fn["deployment_id"] == good["deployment_id"]
    assert fn["latest_deployment"]["status"] == "failed"
    with platform.gateway(host_of(good["invocation_url"])) as gw:
        assert gw.get("/").status_code == 200


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["Bad_Slug", "--path", str(APPS / "envprobe")], "slug: must match ^[a-z0-9]{1,20}$"),
        (["waytoolongslugforthisplatform", "--path", str(APPS / "envprobe")], "slug:"),
        (["noentry", "--path", str(APPS / "noentry")], "entry: required"),
        (["badentry", "--path", str(APPS / "envprobe"), "--entry", "main"],
         "entry: must look like 'module:attr'"),
        (["missing", "--path", str(APPS / "envprobe"), "--entry", "nosuch:app"],
         "entry: module 'nosuch' not found"),
        (["noattr", "--path", str(APPS / "envprobe"), "--entry", "main:nope"],
         "has no attribute 'nope'"),
        (["wsgi", "--path", str(APPS / "wsgi")], "WSGI apps such as Flask are not supported"),
        (["nobranch", "--path", str(APPS / "envprobe"), "--branch", "nope"],
         "branch 'nope' not found"),
        (["badenv", "--path", str(APPS / "envprobe"), "--env", "PHLOEM_X=1"],
         "env.PHLOEM_X: is reserved"),
        (["badenv", "--path", str(APPS / "envprobe"), "--env", "1X=1"], "env.1X: names"),
        (["badrt", "--path", str(APPS / "envprobe"), "--runtime", "python2.7"],
         "runtime: 'python2.7' is not available"),
    ],
)
def test_bad_input_is_refused(platform: PlatformProcess, args: list[str], message: str) -> None:
    proc = platform.cli("functions", "deploy", *args, check=False)
    assert proc.returncode != 0
    assert message in " ".join(proc.stderr.split()), proc.stderr


def test_unknown_host_is_404_naming_it(platform: PlatformProcess) -> None:
    with platform.gateway("br-no-such-abcdef-ghost.fn.localhost") as gw:
        resp = gw.get("/")
    assert resp.status_code == 404
    err = resp.json()["error"]
    assert err["code"] == "unknown_host"
    assert "br-no-such-abcdef-ghost.fn.localhost" in err["message"]


def test_isolate_that_fails_to_start_gives_502_and_logs_reason(
        platform: PlatformProcess) -> None:
    fn = platform.deploy("badstart", APPS / "badstart")
    assert fn["status"] == "ready"  # it imports fine; it fails at start-up
    started = time.monotonic()
    with platform.gateway(host_of(fn["invocation_url"])) as gw:
        resp = gw.get("/")
    assert resp.status_code == 502
    assert resp.json()["error"]["code"] == "isolate_failed"
    assert time.monotonic() - started < 30
    logs = platform.cli("functions", "logs", "badstart").stdout
    assert "database is on fire" in logs


def test_delete_function(platform: PlatformProcess) -> None:
    fn = platform.deploy("doomed", APPS / "envprobe")
    host = host_of(fn["invocation_url"])
    with platform.gateway(host) as gw:
        assert gw.get("/").status_code == 200
        assert platform.cli_json("functions", "delete", "doomed") == {
            "deleted": "doomed", "branch": "main"}
        assert gw.get("/").status_code == 404
    gone = platform.cli("functions", "get", "doomed", check=False)
    assert gone.returncode != 0
    assert "function 'doomed' not found" in gone.stderr
