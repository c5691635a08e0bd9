"""Branches end to end: real clusters cloned from a running parent, through the CLI."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import psycopg
import pytest

from phloem.testing import PlatformProcess, host_of, processes_mentioning, wait_for

APPS = Path(__file__).parent.parent / "apps"


def url_of(p: PlatformProcess, branch: str, pooled: bool = False) -> str:
    flag = "--pooled" if pooled else "--unpooled"
    return p.cli("connection-string", "--branch", branch, flag).stdout.strip()


def sql(url: str, query: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    with psycopg.connect(url, autocommit=True, prepare_threshold=None) as conn:
        cur = conn.execute(query.encode(), params)
        return cur.fetchall() if cur.description else []


def create(p: PlatformProcess, *args: str) -> Any:
    return p.cli_json("branches", "create", *args)


def test_child_has_parent_data_and_writes_stay_apart(platform: PlatformProcess) -> None:
    main = url_of(platform, "main")
    sql(main, "CREATE TABLE IF NOT EXISTS notes (id serial PRIMARY KEY, body text)")
    sql(main, "INSERT INTO notes (body) VALUES ('before-1'), ('before-2')")

    child = create(platform, "--name", "preview/login")
    assert child["name"] == "preview/login"
    assert child["parent_id"] == platform.cli_json("branches", "get", "main")["id"]
    assert child["id"].startswith("br-")
    assert child["copy_method"] in ("reflink", "copy")
    assert child["copy_bytes"] > 1_000_000
    assert child["copy_ms"] > 0
    child_url = url_of(platform, "preview/login")
    assert child_url != main

    bodies = [r[0] for r in sql(child_url, "SELECT body FROM notes ORDER BY id")]
    assert "before-1" in bodies and "before-2" in bodies
    sql(child_url, "INSERT INTO notes (body) VALUES ('child-only')")
    sql(main, "INSERT INTO notes (body) VALUES ('parent-after')")
    sibling = create(platform, "--name", "preview/sibling")
    sibling_url = url_of(platform, sibling["id"])

    def has(url: str, body: str) -> bool:
        return bool(sql(url, "SELECT 1 FROM notes WHERE body = %s", (body,)))

    assert not has(main, "child-only")
    assert not has(sibling_url, "child-only")
    assert not has(child_url, "parent-after")
    assert has(sibling_url, "parent-after")

    # Reset: the child equals its parent again, with the same id and credentials.
    reset = platform.cli_json("branches", "reset", "preview/login")
    assert reset["id"] == child["id"]
    assert reset["copy_method"] in ("reflink", "copy")
    assert url_of(platform, "preview/login") == child_url
    assert not has(child_url, "child-only")
    assert has(child_url, "parent-after")
    assert sql(child_url, "SELECT body FROM notes ORDER BY id") == \
        sql(main, "SELECT body FROM notes ORDER BY id")


def test_credentials_differ_per_branch(platform: PlatformProcess) -> None:
    create(platform, "--name", "creds")
    a = psycopg.conninfo.conninfo_to_dict(url_of(platform, "main"))
    b = psycopg.conninfo.conninfo_to_dict(url_of(platform, "creds"))
    assert a["password"] != b["password"]
    assert a["port"] != b["port"]
    # main's password on the child's port is refused, directly and through the pooler.
    for url in (url_of(platform, "creds"), url_of(platform, "creds", pooled=True)):
        target = psycopg.conninfo.conninfo_to_dict(url)
        forged = psycopg.conninfo.make_conninfo(**{**target, "password": a["password"]})
        with pytest.raises(psycopg.OperationalError, match="authentication failed"):
            psycopg.connect(forged, connect_timeout=5).close()


def test_pooled_url_is_pgbouncer_in_transaction_mode(platform: PlatformProcess) -> None:
    pooled, direct = url_of(platform, "main", True), url_of(platform, "main")
    assert pooled != direct
    # Session state does not survive a transaction through a transaction-mode pooler...
    with psycopg.connect(pooled, autocommit=True, prepare_threshold=None) as conn:
        pids = {conn.execute("SELECT pg_backend_pid()").fetchone() for _ in range(3)}
        assert conn.execute("SELECT 1").fetchone() == (1,)
    assert pids
    # ... and prepared statements are off in psycopg for it (prepare_threshold=None).
    with psycopg.connect(pooled, prepare_threshold=None) as conn:
        for _ in range(10):
            assert conn.execute("SELECT %s::int", (7,)).fetchone() == (7,)


def test_writer_on_parent_sees_no_errors_during_branch_creates(
        platform: PlatformProcess) -> None:
    urls = {"pooled": url_of(platform, "main", True), "direct": url_of(platform, "main")}
    sql(urls["direct"], "CREATE TABLE IF NOT EXISTS writes (id bigserial PRIMARY KEY,"
                        " via text, n int)")
    stop = threading.Event()
    acked: dict[str, list[int]] = {"pooled": [], "direct": []}
    errors: list[str] = []

    def writer(via: str) -> None:
        n = 0
        try:
            with psycopg.connect(urls[via], autocommit=True, prepare_threshold=None) as conn:
                while not stop.is_set():
                    conn.execute("INSERT INTO writes (via, n) VALUES (%s, %s)", (via, n))
                    acked[via].append(n)
                    n += 1
        except Exception as exc:
            errors.append(f"{via}: {exc!r}")

    threads = [threading.Thread(target=writer, args=(v,)) for v in urls]
    for t in threads:
        t.start()
    try:
        made = [create(platform, "--name", f"load-{i}") for i in range(5)]
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    assert errors == []
    assert all(len(v) > 10 for v in acked.values()), {k: len(v) for k, v in acked.items()}
    for via, ns in acked.items():
        got = {r[0] for r in sql(urls["direct"], "SELECT n FROM writes WHERE via = %s",
                                 (via,))}
        assert set(ns) <= got
    # Each child holds a consistent prefix of what was written.
    for b in made:
        rows = sql(url_of(platform, b["id"]), "SELECT via, max(n), count(*) FROM writes "
                                              "GROUP BY via")
        for _via, top, count in rows:
            assert count == top + 1
        platform.cli("branches", "delete", b["id"])


def test_delete_rules(platform: PlatformProcess) -> None:
    parent = create(platform, "--name", "del/parent")
    child = create(platform, "--name", "del/child", "--parent", "del/parent")
    refused = platform.cli("branches", "delete", "del/parent", check=False)
    assert refused.returncode != 0
    assert "has children" in refused.stderr and "--recursive" in refused.stderr
    assert platform.cli_json("branches", "get", "del/child")["id"] == child["id"]
    main = platform.cli("branches", "delete", "main", check=False)
    assert main.returncode != 0
    assert "cannot be deleted" in main.stderr

    out = platform.cli_json("branches", "delete", "del/parent", "--recursive")
    assert out["deleted"] == [child["id"], parent["id"]]
    for b in (parent, child):
        assert not (platform.data_dir / "branches" / b["id"]).exists()
        assert processes_mentioning(f"branches/{b['id']}") == []
    gone = platform.cli("branches", "get", "del/child", check=False)
    assert gone.returncode != 0
    assert "not found" in gone.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--parent", "no-such-branch"], "parent branch 'no-such-branch' not found"),
        (["--name", "bad name!"], "name: must match"),
        (["--name", "x" * 65], "name: must match"),
        (["--name", "main"], "a branch named 'main' exists"),
    ],
)
def test_bad_branch_requests(platform: PlatformProcess, args: list[str], message: str) -> None:
    def branches() -> list[dict[str, Any]]:
        # Sizes move as other functions on the shared platform write (an evicted isolate
        # records its shutdown); the set of branches must not.
        return [{k: v for k, v in b.items() if k != "logical_size_bytes"}
                for b in platform.cli_json("branches", "list")]

    before = branches()
    proc = platform.cli("branches", "create", *args, check=False)
    assert proc.returncode != 0
    assert message in proc.stderr
    assert branches() == before


def test_functions_are_branch_scoped(platform: PlatformProcess) -> None:
    on_main = platform.deploy("scoped", APPS / "envprobe", "--env", "GREETING=main")
    child = create(platform, "--name", "scoped-child", "--copy-functions")
    assert child["copied_deployments"]

    def ready_on_child() -> Any:
        fn = platform.cli_json("functions", "get", "scoped", "--branch", "scoped-child")
        return fn if fn["status"] == "ready" else None

    copied = wait_for(ready_on_child, 120, "the copied function to be ready")
    assert copied["invocation_url"] != on_main["invocation_url"]
    assert child["id"] in copied["invocation_url"]
    with platform.gateway(host_of(copied["invocation_url"])) as gw:
        env = gw.get("/").json()["env"]
    assert env["PHLOEM_BRANCH"] == "scoped-child"
    assert env["GREETING"] == "main"
    assert env["DATABASE_URL_UNPOOLED"] == url_of(platform, "scoped-child")

    # Redeploying and deleting on the child never changes what main serves.
    platform.deploy("scoped", APPS / "envprobe", "--env", "GREETING=child",
                    branch="scoped-child")
    with platform.gateway(host_of(copied["invocation_url"])) as gw:
        assert gw.get("/").json()["env"]["GREETING"] == "child"
    platform.cli("functions", "delete", "scoped", "--branch", "scoped-child")
    with platform.gateway(host_of(on_main["invocation_url"])) as gw:
        body = gw.get("/").json()
    assert body["env"]["GREETING"] == "main"
    assert body["env"]["PHLOEM_BRANCH"] == "main"
    assert platform.cli_json("functions", "get", "scoped")["deployment_id"] == \
        on_main["deployment_id"]
