"""phloem backup create|list|restore: a backup of a running platform with two branches,
rows and a deployed function with an env secret on each, restored offline into an empty
data dir, brings back every branch, row, deployment, secret and the API key, and the
functions answer."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest

from phloem.backup.files import StreamCopier, copy_tree
from phloem.backup.manifest import (
    BackupError,
    BranchEntry,
    Manifest,
    PartStats,
    write_manifest,
)
from phloem.backup.restore import _relinker, _uid_mover, restore
from phloem.system.xfs import xfs_available, xfs_reflink_mount
from phloem.testing import (
    PHLOEM,
    PlatformProcess,
    free_port,
    host_of,
    new_data_dir,
    pick_isolate_uid_base,
)

APPS = Path(__file__).parent / "apps"


def _rows(p: PlatformProcess, branch: str) -> list[str]:
    url = p.cli("connection-string", "--branch", branch, "--unpooled").stdout.strip()
    with psycopg.connect(url, connect_timeout=10) as conn:
        return [r[0] for r in conn.execute("SELECT note FROM notes ORDER BY id")]


def _insert(p: PlatformProcess, branch: str, *notes: str) -> None:
    url = p.cli("connection-string", "--branch", branch, "--unpooled").stdout.strip()
    with psycopg.connect(url, connect_timeout=10, autocommit=True) as conn:
        conn.execute("CREATE TABLE IF NOT EXISTS notes (id serial PRIMARY KEY, note text)")
        for note in notes:
            conn.execute("INSERT INTO notes (note) VALUES (%s)", (note,))


def _write_until(p: PlatformProcess, branch: str,
                 finished: Callable[[], bool]) -> tuple[int, list[str]]:
    """Insert rows into ``branch`` every few ms until ``finished()`` (at most 120 s)."""
    url = p.cli("connection-string", "--branch", branch, "--unpooled").stdout.strip()
    written, failed = 0, []
    with psycopg.connect(url, connect_timeout=10, autocommit=True) as conn:
        conn.execute("CREATE TABLE load (id serial PRIMARY KEY, at timestamptz DEFAULT now())")
        deadline = time.monotonic() + 120
        # One batch at least: on a quiet machine the backup may be done before the
        # connection is.
        while True:
            for _ in range(10):
                try:
                    conn.execute("INSERT INTO load DEFAULT VALUES")
                    written += 1
                except psycopg.Error as exc:
                    failed.append(repr(exc))
            if finished():
                break
            assert time.monotonic() < deadline, "the backup did not finish in 120 s"
    return written, failed


def _restore(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PHLOEM_")}
    return subprocess.run([PHLOEM, "backup", "restore", *args], env={**env, "NO_COLOR": "1"},
                          capture_output=True, text=True, timeout=600, check=False)


def _state(p: PlatformProcess) -> dict[str, Any]:
    """What a restore must bring back, as the API and the branches' databases show it."""
    branches = {b["name"]: b["id"] for b in p.cli_json("branches", "list")}
    out: dict[str, Any] = {"branches": branches}
    for name in branches:
        fn = p.cli_json("functions", "get", "probe", "--branch", name)
        env = p.cli_json("functions", "get", "probe", "--branch", name, "--list-env",
                         "--show-values")["env"]
        with p.gateway(host_of(fn["invocation_url"])) as gw:
            answer = gw.get("/").json()["env"]["GREETING"]
        out[name] = {"rows": _rows(p, name), "deployment": fn["deployment_id"],
                     # the gateway's port is the new platform's
                     "host": host_of(fn["invocation_url"]).split(":")[0], "env": env,
                     "answer": answer}
    return out


@contextmanager
def _source_platform() -> Iterator[tuple[PlatformProcess, str]]:
    """A running platform, on a reflink filesystem (loop-mounted XFS) where one can be
    mounted here: its backup is then taken by reflink, while the restore into /tmp is a
    plain copy, so one run covers both. Elsewhere both are plain copies."""
    with ExitStack() as stack:
        if xfs_available() is None:
            mnt = stack.enter_context(xfs_reflink_mount(size_gb=3))
            data_dir, method = mnt / "phloem", "reflink"
            data_dir.mkdir(mode=0o711)
        else:
            data_dir, method = new_data_dir(), "copy"
        p = PlatformProcess(data_dir, free_port(), free_port())
        stack.callback(p.cleanup)  # before the unmount
        p.launch()
        p.wait_ready()
        yield p, method


def test_backup_restore_brings_back_the_platform() -> None:
    with _source_platform() as (p, method):
        _insert(p, "main", "m1", "m2")
        p.cli_json("branches", "create", "--name", "kid", "--parent", "main")
        _insert(p, "kid", "k1")
        _insert(p, "main", "m3")  # after the branch: main only
        p.deploy("probe", APPS / "envprobe", "--env", "GREETING=main-secret-7f3a")
        p.deploy("probe", APPS / "envprobe", "--env", "GREETING=kid-secret-91c2",
                 branch="kid")
        before = _state(p)
        assert (before["main"]["rows"], before["main"]["answer"]) == (
            ["m1", "m2", "m3"], "main-secret-7f3a")
        assert (before["kid"]["rows"], before["kid"]["answer"]) == (
            ["m1", "m2", "k1"], "kid-secret-91c2")
        api_key = p.credentials["api_key"]

        # Through the API, one at a time, while main takes writes: none fails.
        with p.api() as api:
            first = api.post("/backups")
            assert first.status_code == 202 and first.json()["state"] == "running"
            second = api.post("/backups")
            assert (second.status_code, second.json()["error"]["code"]) == (
                409, "backup_running")
            written, failed = _write_until(p, "main", lambda: api.get(
                f"/backups/{first.json()['id']}").json()["state"] != "running")
            assert api.get(f"/backups/{first.json()['id']}").json()["state"] == "complete"
        assert failed == [] and written > 0

        done = json.loads(p.cli("backup", "create", "--output", "json").stdout)
        assert (done["state"], done["method"]) == ("complete", method), done
        assert sorted(b["name"] for b in done["branches"]) == ["kid", "main"]
        assert sorted(done["deployments"]) == sorted(
            [before["main"]["deployment"], before["kid"]["deployment"]])
        assert any(line.startswith("branch 2/2") for line in done["progress"])
        backup_dir = Path(done["path"])
        assert backup_dir.parent == p.data_dir / "backups"
        assert (backup_dir.stat().st_mode & 0o777) == 0o700  # it holds secrets
        anonymous = httpx.post(f"http://127.0.0.1:{p.api_port}/api/v1/backups", timeout=30)
        assert (anonymous.status_code, anonymous.json()["error"]["code"]) == (
            401, "unauthorized")
        with p.api() as api:
            bad = api.get("/backups/..%2Fsecrets")
            assert (bad.status_code, bad.json()["error"]["field"]) == (400, "backup_id")
            assert api.get("/backups/bk-20200101T000000Z-abcd").status_code == 404
        listed = p.cli_json("backup", "list")
        assert [(b["id"], b["state"]) for b in listed] == [
            (first.json()["id"], "complete"), (done["id"], "complete")]
        # Writes after the backup are not in it.
        _insert(p, "main", "after-backup")
        p.stop()

        # Refused: a target that is not empty, naming the field and the rule.
        busy = new_data_dir()
        (busy / "keep.txt").write_text("mine")
        refused = _restore(done["id"], "--backups-dir", str(p.data_dir / "backups"),
                           "--data-dir", str(busy))
        assert refused.returncode != 0
        assert "data_dir:" in refused.stderr and "not empty" in refused.stderr, refused
        assert sorted(os.listdir(busy)) == ["keep.txt"]

        # Onto another isolate uid base: functions' files move to it.
        target, base = new_data_dir(), pick_isolate_uid_base()
        restored = _restore(done["id"], "--backups-dir", str(p.data_dir / "backups"),
                            "--data-dir", str(target), "--isolate-uid-base", str(base))
        assert restored.returncode == 0, restored.stderr + restored.stdout
        assert "restored " + done["id"] in restored.stdout
        if os.geteuid() == 0:
            owners = {(d / "app").stat().st_gid for d in (target / "deployments").iterdir()}
            assert len(owners) == 2 and all(base < g < base + 2**20 for g in owners), owners

        q = PlatformProcess(target, free_port(), free_port(), isolate_uid_base=base)
        try:
            q.launch()
            q.wait_ready()
            assert q.credentials["api_key"] == api_key
            r = httpx.get(f"http://127.0.0.1:{q.api_port}/api/v1/branches", timeout=30,
                          headers={"Authorization": f"Bearer {api_key}"})
            assert r.status_code == 200
            after = _state(q)
            assert after == before
        finally:
            q.cleanup()
            shutil.rmtree(busy, ignore_errors=True)


def test_restore_refuses_what_is_not_a_backup(tmp_path: Path) -> None:
    missing = _restore(str(tmp_path / "nope"), "--data-dir", str(tmp_path / "new"))
    assert missing.returncode != 0
    assert "backup:" in missing.stderr and "not a directory" in missing.stderr
    (tmp_path / "empty").mkdir()
    bare = _restore(str(tmp_path / "empty"), "--data-dir", str(tmp_path / "new"))
    assert bare.returncode != 0
    assert "backup:" in bare.stderr and "manifest.json" in bare.stderr
    assert not (tmp_path / "new").exists()


def test_copy_tree_keeps_owners_modes_and_moves_links(tmp_path: Path) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    (src / "deployments" / "dep-1" / "app").mkdir(parents=True)
    (src / "envs" / "python" / "abc").mkdir(parents=True)
    (src / "envs" / "python" / ".tmp-half").mkdir()
    code = src / "deployments" / "dep-1" / "app" / "main.py"
    code.write_text("app = 1\n")
    os.chmod(code, 0o640)
    (src / "deployments" / "dep-1" / "env").symlink_to(src / "envs" / "python" / "abc")
    (src / "deployments" / "dep-1" / "rel").symlink_to("app/main.py")
    old_base, new_base = 1_500_000, 3_600_000
    if os.geteuid() == 0:
        os.chown(code, old_base + 7, old_base + 7)
    stats = copy_tree(src, dst, StreamCopier(),  # as between two filesystems
                      skip=lambda rel: rel.name.startswith(".tmp"),
                      owner_map=_uid_mover(old_base, new_base),
                      relink=_relinker(str(src), "/var/lib/new"))
    copied = dst / "deployments" / "dep-1" / "app" / "main.py"
    assert copied.read_text() == "app = 1\n"
    assert copied.stat().st_mode & 0o777 == 0o640
    if os.geteuid() == 0:
        assert (copied.stat().st_uid, copied.stat().st_gid) == (new_base + 7, new_base + 7)
    assert os.readlink(dst / "deployments" / "dep-1" / "env") == "/var/lib/new/envs/python/abc"
    assert os.readlink(dst / "deployments" / "dep-1" / "rel") == "app/main.py"
    assert not (dst / "envs" / "python" / ".tmp-half").exists()
    assert stats.files == 3


def _small_backup(root: Path, old_base: int,
                  branches: list[BranchEntry] | None = None) -> Path:
    """A backup with no branches, made by hand: the restore's file work, checked fast."""
    backup = root / "bk-20261201T000000Z-0000"
    data = backup / "data"
    (data / "homes" / str(old_base + 3)).mkdir(parents=True)
    (data / "homes" / str(old_base + 3) / ".profile").write_text("x")
    (data / "deployments" / "dep-1" / "app").mkdir(parents=True)
    (data / "deployments" / "dep-1" / "env").symlink_to("/srv/old/envs/python/k")
    if os.geteuid() == 0:
        os.chown(data / "homes" / str(old_base + 3), old_base + 3, old_base + 3)
    part = PartStats("copy", 0, 0, 0.0)
    write_manifest(backup, Manifest(
        id=backup.name, created_at="2026-12-01T00:00:00+00:00",
        finished_at="2026-12-01T00:00:01+00:00", phloem_version="0", data_dir="/srv/old",
        isolate_uid_base=old_base, secret_key="file", method="copy", size_bytes=0,
        duration_ms=0.0, metadata=part, files={}, branches=branches or [],
        deployments=["dep-1"]))
    return backup


def test_restore_moves_uids_homes_and_links(tmp_path: Path) -> None:
    old_base, new_base = 1_500_000, 5_700_000
    backup = _small_backup(tmp_path, old_base)
    target = tmp_path / "restored"
    result = restore(backup, target, service_user="phloem", isolate_uid_base=new_base,
                     progress=lambda _: None)
    assert result.data_dir == target and result.isolate_uid_base == new_base
    assert sorted(os.listdir(target / "homes")) == [str(new_base + 3)]
    if os.geteuid() == 0:
        assert (target / "homes" / str(new_base + 3)).stat().st_uid == new_base + 3
    assert os.readlink(target / "deployments" / "dep-1" / "env") == \
        f"{target}/envs/python/k"
    assert [n for n in os.listdir(target) if "restoring" in n] == []
    # A second restore into it is refused, naming the field; nothing is touched.
    with pytest.raises(BackupError) as refused:
        restore(backup, target, service_user="phloem", isolate_uid_base=None,
                progress=lambda _: None)
    assert refused.value.field == "data_dir" and "not empty" in refused.value.message
    with pytest.raises(BackupError) as bad_base:
        restore(backup, tmp_path / "other", service_user="phloem", isolate_uid_base=5,
                progress=lambda _: None)
    assert bad_base.value.field == "isolate_uid_base"


def test_failed_restore_leaves_the_target_as_it_was(tmp_path: Path) -> None:
    lost = BranchEntry(id="br-lost-one-000000", name="lost", parent_id=None,
                       started_at="2026-12-01T00:00:00+00:00",
                       copy=PartStats("copy", 0, 0, 0.0))
    backup = _small_backup(tmp_path, 1_500_000, [lost])
    for target, existed in ((tmp_path / "new", False), (tmp_path / "empty", True)):
        if existed:
            target.mkdir()
        with pytest.raises(BackupError) as failed:
            restore(backup, target, service_user="phloem", isolate_uid_base=None,
                    progress=lambda _: None)
        assert failed.value.field == "backup" and "lost" in failed.value.message
        assert target.exists() == existed
        assert not existed or os.listdir(target) == []
