"""Branches across restarts, crashes and full disks, each on a platform of its own."""

from __future__ import annotations

import base64
import os
import shutil
import signal
import subprocess
import tempfile
import threading
from pathlib import Path

import psycopg
import pytest

from phloem.metadata.secrets import SecretBox
from phloem.metadata.store import branch_secret_context
from phloem.testing import (
    EXAMPLE,
    PlatformProcess,
    free_port,
    host_of,
    platform_process,
    processes_mentioning,
    wait_for,
)


def url_of(p: PlatformProcess, branch: str, pooled: bool = False) -> str:
    flag = "--pooled" if pooled else "--unpooled"
    return p.cli("connection-string", "--branch", branch, flag).stdout.strip()


def count(url: str, table: str) -> int:
    with psycopg.connect(url, prepare_threshold=None) as conn:
        row = conn.execute(f"SELECT count(*) FROM {table}".encode()).fetchone()
    assert row is not None
    return int(row[0])


def test_branches_survive_restart_and_reset_restarts_functions() -> None:
    with platform_process() as p:
        fn_main = p.deploy("todos", EXAMPLE)
        with p.gateway(host_of(fn_main["invocation_url"])) as gw:
            assert gw.post("/todos", json={"title": "from main"}).status_code == 201
        child = p.cli_json("branches", "create", "--name", "dev", "--copy-functions")
        fn = wait_for(lambda: (f := p.cli_json("functions", "get", "todos", "--branch",
                                               "dev"))["status"] == "ready" and f,
                      120, "the copied function")
        host = host_of(fn["invocation_url"])
        with p.gateway(host) as gw:
            assert [t["title"] for t in gw.get("/todos").json()] == ["from main"]
            assert gw.post("/todos", json={"title": "only on dev"}).status_code == 201
        urls = (url_of(p, "dev"), url_of(p, "dev", pooled=True))

        assert p.stop() == 0
        assert processes_mentioning(str(p.data_dir)) == []
        p.launch()
        p.wait_ready()

        assert url_of(p, "dev") == urls[0]
        for url in urls:
            assert count(url, "todos") == 2
        with p.gateway(host) as gw:
            assert len(gw.get("/todos").json()) == 2
            reset = p.cli_json("branches", "reset", "dev")
            assert reset["id"] == child["id"]
            # Its isolates were restarted against the reset data.
            assert [t["title"] for t in gw.get("/todos").json()] == ["from main"]


def test_crash_during_create_leaves_no_half_made_branch() -> None:
    with platform_process() as p:
        main = url_of(p, "main")
        with psycopg.connect(main, autocommit=True) as conn:
            conn.execute("CREATE TABLE filler AS SELECT g, md5(g::text) v "
                         "FROM generate_series(1, 300000) g")
        branches_dir = p.data_dir / "branches"
        before = set(os.listdir(branches_dir))
        creator = subprocess.Popen(
            [*p.cli_args(), "branches", "create", "--name", "doomed"], env=p.env,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for(lambda: set(os.listdir(branches_dir)) - before, 60,
                 "the new branch's directory", interval=0.002)
        assert p.proc is not None
        os.kill(p.proc.pid, signal.SIGKILL)
        p.proc.wait()
        creator.wait(60)

        p.launch()
        p.wait_ready()
        names = {b["name"]: b for b in p.cli_json("branches", "list")}
        if "doomed" in names:  # it finished before the kill: then it must be whole
            assert names["doomed"]["state"] == "ready"
            assert count(url_of(p, "doomed"), "filler") == 300000
        else:
            assert set(os.listdir(branches_dir)) == before
        assert all(b["state"] == "ready" for b in names.values())


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small tmpfs needs root")
def test_disk_full_during_copy_is_a_clear_error_and_leaves_nothing() -> None:
    base = Path(tempfile.mkdtemp(prefix="phloem-full-", dir="/tmp"))
    os.chmod(base, 0o711)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=400m,mode=0711", "tmpfs", str(base)],
                   check=True)
    try:
        p = PlatformProcess(base / "data", free_port(), free_port())
        (base / "data").mkdir(mode=0o711)
        p.launch()
        try:
            p.wait_ready()
            main = url_of(p, "main")
            with psycopg.connect(main, autocommit=True) as conn:
                conn.execute("CREATE TABLE big AS SELECT g, md5(g::text) v "
                             "FROM generate_series(1, 100000) g")
            # Leave 24 MB free: enough for the parent to go on, too little for a copy.
            with open(base / "ballast", "wb") as f:
                f.truncate(0)
                os.posix_fallocate(f.fileno(), 0, shutil.disk_usage(base).free - 24 * 2**20)
            free = shutil.disk_usage(base).free
            size = sum(f.stat().st_size for f in (p.data_dir / "branches").rglob("*")
                       if f.is_file())
            assert size > free, (size, free)  # the copy cannot fit
            before = sorted(os.listdir(p.data_dir / "branches"))
            proc = p.cli("branches", "create", "--name", "toobig", check=False)
            assert proc.returncode != 0
            assert "not enough disk space" in proc.stderr
            assert sorted(os.listdir(p.data_dir / "branches")) == before
            assert "toobig" not in {b["name"] for b in p.cli_json("branches", "list")}
            assert count(main, "big") == 100000  # the parent is untouched
        finally:
            p.cleanup()
    finally:
        subprocess.run(["umount", "-l", str(base)], check=False)
        shutil.rmtree(base, ignore_errors=True)


def test_parent_keeps_serving_while_child_is_reset() -> None:
    with platform_process() as p:
        main = url_of(p, "main", pooled=True)
        with psycopg.connect(main, autocommit=True, prepare_threshold=None) as conn:
            conn.execute("CREATE TABLE ticks (n int)")
        p.cli_json("branches", "create", "--name", "r")
        errors: list[str] = []
        stop = threading.Event()

        def tick() -> None:
            n = 0
            try:
                with psycopg.connect(main, autocommit=True, prepare_threshold=None) as conn:
                    while not stop.is_set():
                        conn.execute("INSERT INTO ticks VALUES (%s)", (n,))
                        n += 1
            except Exception as exc:
                errors.append(repr(exc))

        t = threading.Thread(target=tick)
        t.start()
        try:
            for _ in range(3):
                p.cli_json("branches", "reset", "r")
        finally:
            stop.set()
            t.join(30)
        assert errors == []
        assert count(url_of(p, "r"), "ticks") <= count(main, "ticks")


def test_plaintext_passwords_of_an_older_platform_are_sealed_at_start() -> None:
    """A system database written before migration 5 (passwords in plaintext columns) is
    converted at the next start; the branches then open, reset and clone as before."""
    with platform_process(["--deploy", str(EXAMPLE)]) as p:
        fn = p.cli_json("functions", "get", "hellopython")
        child = p.cli_json("branches", "create", "--name", "old-child")
        urls = {b: (url_of(p, b), url_of(p, b, pooled=True)) for b in ("main", "old-child")}
        box = SecretBox.from_data_dir(p.data_dir / "secrets")
        plain: dict[str, tuple[str, str]] = {}
        # Rewrite the table as the platform before migration 5 had it.
        with p.system_db() as conn, conn.transaction():
            for branch_id, role_sealed, superuser_sealed in conn.execute(
                    "SELECT id, role_password_sealed, superuser_password_sealed "
                    "FROM branches").fetchall():
                plain[branch_id] = (
                    box.open_text(role_sealed,
                                  branch_secret_context(branch_id, "role_password")),
                    box.open_text(superuser_sealed,
                                  branch_secret_context(branch_id, "superuser_password")))
            conn.execute("ALTER TABLE branches ADD COLUMN role_password text,"
                         " ADD COLUMN superuser_password text")
            for branch_id, (role, superuser) in plain.items():
                conn.execute("UPDATE branches SET role_password = %s, superuser_password = %s"
                             " WHERE id = %s", (role, superuser, branch_id))
            conn.execute("ALTER TABLE branches DROP COLUMN role_password_sealed,"
                         " DROP COLUMN superuser_password_sealed,"
                         " ALTER COLUMN role_password SET NOT NULL,"
                         " ALTER COLUMN superuser_password SET NOT NULL")
            conn.execute("DELETE FROM schema_migrations WHERE version = 5")
        assert p.stop() == 0

        p.launch()
        p.wait_ready()
        passwords = [pw for pair in plain.values() for pw in pair]
        with p.system_db() as conn:
            assert conn.execute("SELECT name FROM schema_migrations WHERE version = 5"
                                ).fetchone() == ("0005_sealed_branch_passwords.py",)
            columns = {r[0] for r in conn.execute(
                "SELECT column_name FROM information_schema.columns "
                "WHERE table_name = 'branches'")}
            assert {"role_password_sealed", "superuser_password_sealed"} <= columns
            assert not {"role_password", "superuser_password"} & columns
            table = repr(conn.execute("SELECT * FROM branches").fetchall())
            conn.execute("CHECKPOINT")
            (table_file,) = conn.execute("SELECT pg_relation_filepath('branches')").fetchone()
        assert [pw for pw in passwords if pw in table] == []
        # VACUUM FULL rewrote the table: no dead tuple version holds them either.
        data = (p.data_dir / "system" / "pgdata" / table_file).read_bytes()
        assert [pw for pw in passwords if pw.encode() in data] == []

        # The same credentials still open every branch, directly and pooled.
        for name, pair in urls.items():
            assert (url_of(p, name), url_of(p, name, pooled=True)) == pair
            for url in pair:
                with psycopg.connect(url, prepare_threshold=None) as conn:
                    assert conn.execute("SELECT 1").fetchone() == (1,)
        with p.gateway(host_of(fn["invocation_url"])) as gw:
            assert gw.get("/todos").status_code == 200  # the isolate's DATABASE_URL works
        # main's isolate has written its startup event: main stays as it is now.
        events = count(urls["main"][0], "lifecycle_events")
        assert p.cli_json("branches", "reset", "old-child")["id"] == child["id"]
        assert count(urls["old-child"][0], "lifecycle_events") == events
        grandchild = p.cli_json("branches", "create", "--name", "new-child",
                                "--parent", "old-child")
        assert grandchild["parent_id"] == child["id"]
        assert count(url_of(p, "new-child"), "lifecycle_events") == events

        # Another key cannot open them: a clear refusal, not a half-started platform.
        assert p.stop() == 0
        wrong = base64.urlsafe_b64encode(os.urandom(32)).decode()
        proc = subprocess.run(p.args(), env={**p.env, "PHLOEM_SECRET_KEY": wrong},
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode != 0
        assert "cannot be opened: wrong PHLOEM_SECRET_KEY or tampered data" in " ".join(
            (proc.stderr + proc.stdout).split())
        assert processes_mentioning(str(p.data_dir)) == []
