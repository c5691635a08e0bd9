"""Taking a backup of a running platform: the metadata and every branch as base backups
(the same path branch creates take, so every cluster keeps serving), plus the files that
make them usable (secrets, credentials, artifacts, built deployments, environments).

Order, and what it guarantees (docs/architecture.md, "Backups"):

1. Branch creates, resets and deletes wait until step 5 is done (the branch manager's
   lock), so the set of branches cannot change under it.
2. The directories of the deployments active now are copied.
3. The system database (metadata): its base backup is the backup's moment for metadata.
4. Directories of deployments that became active meanwhile are copied.
5. Each branch's cluster, one after the other (a few ms to seconds each, later than 3:
   rows written after the metadata's moment are in the branch, which restore keeps).
   Branch operations may go on from here.
6. Secrets, credentials, artifacts (content-addressed, never removed: every artifact the
   metadata names is there), dependency environments (never removed either), runtimes,
   homes.
7. ``manifest.json``, last.

    manifest = await take_backup(platform, new_backup_id(), progress=print)
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import shutil
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Protocol

import psycopg

from phloem import __version__
from phloem.backup.files import (
    TreeStats,
    choose_copier,
    copy_entry,
    copy_tree,
    is_temporary,
    mirror_dir,
)
from phloem.backup.manifest import (
    DATA,
    BackupError,
    BranchEntry,
    Manifest,
    PartStats,
    write_manifest,
)
from phloem.branches.basebackup import clone_running_cluster
from phloem.branches.manager import BranchManager
from phloem.metadata.db import SYSTEM_PORT
from phloem.metadata.secrets import KEY_ENV
from phloem.metadata.store import BranchRow, Store
from phloem.postgres.cluster import SUPERUSER
from phloem.system.identity import make_dir
from phloem.system.paths import DataPaths
from phloem.system.settings import Settings

Progress = Callable[[str], None]


class BackupSource(Protocol):
    """What a backup reads of the running platform (the API's
    ``phloem.control.services.ApiServices`` has it)."""

    @property
    def paths(self) -> DataPaths: ...
    @property
    def store(self) -> Store: ...
    @property
    def branches(self) -> BranchManager: ...
    @property
    def settings(self) -> Settings: ...

#: Top-level entries of the data dir not copied as files: runtime state (run), what
#: start-up reinstalls (pginstall), download caches, logs, backups themselves, and the
#: parts copied their own way (system, branches, deployments).
NOT_COPIED = frozenset({"run", "pginstall", "pginstall.tmp", "cache", "logs", "backups",
                        "system", "branches", "deployments"})
#: Runtime files in a branch directory besides its cluster (PgBouncer's config and auth
#: file are kept: start-up needs the auth file).
BRANCH_DIR_SKIP = frozenset({"pgdata", "pgdata.old", "postgres.log", "pgbouncer.log"})


def new_backup_id() -> str:
    """``bk-<UTC time>-<4 hex>``: sorts by time, unique enough for one platform."""
    return f"bk-{datetime.now(UTC):%Y%m%dT%H%M%SZ}-{secrets.token_hex(2)}"


def backups_dir(paths: DataPaths) -> Path:
    return paths.root / "backups"


def check_backups_dir(paths: DataPaths) -> Path:
    """Create ``<data>/backups`` (root's, 0700) and check it is on the data dir's
    filesystem: base backups are copied the way branches are, within one filesystem (a
    finished backup can be copied anywhere)."""
    root = backups_dir(paths)
    make_dir(root, 0o700)
    if os.stat(root).st_dev != os.stat(paths.root).st_dev:
        raise BackupError(409, "backups_dir_elsewhere", f"backups: {root} is on another "
                          "filesystem than the data dir; backups are written on the data "
                          "dir's filesystem (copy a finished one elsewhere)", "backups")
    return root


def _system_connection(paths: DataPaths) -> psycopg.Connection[tuple[object, ...]]:

    password = json.loads((paths.secrets / "system.json").read_text())["superuser_password"]
    return psycopg.connect(host=str(paths.pg_socket_dir("system")), port=SYSTEM_PORT,
                           user=SUPERUSER, password=password, dbname="postgres",
                           autocommit=True)


def _backup_system(paths: DataPaths, data: Path) -> PartStats:
    make_dir(data / "system", 0o700)
    with _system_connection(paths) as conn:
        stats = clone_running_cluster(conn, paths.system_pgdata, data / "system" / "pgdata")
    return PartStats(stats.method, stats.files, stats.bytes,
                     round(stats.backup_ms + stats.copy_ms, 1))


def _backup_branch(platform: BackupSource, branch: BranchRow, data: Path) -> PartStats:
    paths = platform.paths
    src_dir = paths.branch_dir(branch.id)
    dst_dir = data / "branches" / branch.id
    mirror_dir(os.stat(src_dir), dst_dir)
    cluster = platform.branches.cluster(branch)
    with cluster.connect(branch.superuser_password) as conn:
        stats = clone_running_cluster(conn, cluster.pgdata, dst_dir / "pgdata")
    files = TreeStats(stats.files, stats.bytes)
    copier = choose_copier(src_dir, dst_dir)
    for entry in sorted(os.listdir(src_dir)):
        if entry in BRANCH_DIR_SKIP or is_temporary(entry):
            continue
        files.add(copy_tree(src_dir / entry, dst_dir / entry, copier,
                            skip=lambda rel: rel.name.endswith(".pid"))
                  if (src_dir / entry).is_dir()
                  else copy_entry(src_dir / entry, dst_dir / entry, copier))
    return PartStats(stats.method, files.files, files.bytes,
                     round(stats.backup_ms + stats.copy_ms, 1))


def _copy_deployments(paths: DataPaths, data: Path, ids: list[str],
                      out: TreeStats) -> str:
    """Copy the directories of deployments ``ids`` (built code, links to environments)
    not copied yet; returns the copy method."""
    src_root = paths.root / "deployments"
    if not src_root.is_dir():
        return "copy"
    dst_root = data / "deployments"
    mirror_dir(os.stat(src_root), dst_root)
    copier = choose_copier(src_root, dst_root)
    for dep_id in ids:
        if not (dst_root / dep_id).exists():
            out.add(copy_tree(src_root / dep_id, dst_root / dep_id, copier))
    return copier.method


def _temporary_near_top(rel: Path) -> bool:
    # Half-made entries sit at most three levels down (envs/<family>/.tmp-*,
    # artifacts/sha256/<xx>/<sha>.tar.tmp<pid>); deeper, such a name is a user's file.
    return len(rel.parts) <= 3 and is_temporary(rel.name)


def _copy_files(paths: DataPaths, data: Path) -> dict[str, PartStats]:
    """Every top-level entry of the data dir but :data:`NOT_COPIED`, one part each."""
    parts: dict[str, PartStats] = {}
    for name in sorted(os.listdir(paths.root)):
        if name in NOT_COPIED or is_temporary(name):
            continue
        src = paths.root / name
        started = time.monotonic()
        copier = choose_copier(src if src.is_dir() else paths.root, data)
        stats = (copy_tree(src, data / name, copier,
                           skip=_temporary_near_top)
                 if src.is_dir() and not src.is_symlink()
                 else copy_entry(src, data / name, copier))
        parts[name] = stats.part(copier.method, started)
    return parts


async def _active_deployments(store: Store) -> list[str]:
    return [fn.active_deployment_id for fn in await store.list_functions()
            if fn.active_deployment_id is not None]


def _method(parts: list[PartStats]) -> str:
    methods = {p.method for p in parts if p.files}
    return methods.pop() if len(methods) == 1 else ("mixed" if methods else "copy")


def _ms(since: float) -> float:
    return round((time.monotonic() - since) * 1000, 1)


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


async def take_backup(platform: BackupSource, backup_id: str, progress: Progress) -> Manifest:
    """Write the backup ``<data>/backups/<backup_id>``; on failure nothing is left."""
    backup_dir = check_backups_dir(platform.paths) / backup_id
    backup_dir.mkdir(mode=0o700)
    try:
        return await _take(platform, backup_id, backup_dir, progress)
    except BaseException:
        # Not in a thread: this also runs when the platform's loop cancels the task.
        shutil.rmtree(backup_dir, ignore_errors=True)
        raise


async def _take(platform: BackupSource, backup_id: str, backup_dir: Path,
                progress: Progress) -> Manifest:
    paths, store = platform.paths, platform.store
    created_at = datetime.now(UTC)
    started = time.monotonic()
    data = backup_dir / DATA
    mirror_dir(os.stat(paths.root), data)
    warnings: list[str] = []
    # The manager's lock serialises branch operations: creates, resets and deletes wait
    # until every branch is copied, so metadata and clusters name the same branches.
    async with platform.branches._lock:
        branches = await store.list_branches()
        progress(f"backup {backup_id}: {len(branches)} branches; branch operations wait "
                 "until it is done")
        t = time.monotonic()
        before = await _active_deployments(store)
        dep_stats = TreeStats()
        await asyncio.to_thread(_copy_deployments, paths, data, before, dep_stats)

        metadata = await asyncio.to_thread(_backup_system, paths, data)
        progress(f"metadata: {_mb(metadata.bytes)} by {metadata.method} in "
                 f"{metadata.ms:.0f} ms")
        after = await _active_deployments(store)
        method = await asyncio.to_thread(_copy_deployments, paths, data,
                                         [d for d in after if d not in before], dep_stats)
        deployments = sorted(d for d in set(before) | set(after)
                             if (data / "deployments" / d).is_dir())
        for dep_id in after:
            if dep_id not in deployments:
                warnings.append(f"deployment {dep_id}: its directory was removed while "
                                "the backup ran (a newer deploy replaced it); its function "
                                "may need a redeploy after a restore")
        files = {"deployments": dep_stats.part(method, t)}

        entries = []
        if branches:
            mirror_dir(os.stat(paths.root / "branches"), data / "branches")
        for i, b in enumerate(branches, 1):
            at = datetime.now(UTC).isoformat(timespec="milliseconds")
            stats = await asyncio.to_thread(_backup_branch, platform, b, data)
            entries.append(BranchEntry(id=b.id, name=b.name, parent_id=b.parent_id,
                                       started_at=at, copy=stats))
            progress(f"branch {i}/{len(branches)} {b.name} ({b.id}): {_mb(stats.bytes)} "
                     f"by {stats.method} in {stats.ms:.0f} ms")
    # Outside the lock: artifacts and environments are never removed, so what the metadata
    # and the deployments name is still there; secrets and credentials do not change.
    files.update(await asyncio.to_thread(_copy_files, paths, data))
    progress("files: " + ", ".join(f"{k} {_mb(v.bytes)}" for k, v in files.items()))
    secret_key = "environment" if os.environ.get(KEY_ENV) else "file"
    if secret_key == "environment":
        warnings.append(f"the secret key comes from {KEY_ENV} and is not in the backup: "
                        "the restored platform needs the same value")
    parts = [metadata, *files.values(), *(e.copy for e in entries)]
    manifest = Manifest(
        id=backup_id, created_at=created_at.isoformat(timespec="seconds"),
        finished_at=datetime.now(UTC).isoformat(timespec="seconds"),
        phloem_version=__version__,
        data_dir=str(paths.root), isolate_uid_base=platform.settings.isolate_uid_base,
        secret_key=secret_key, method=_method(parts),
        size_bytes=sum(p.bytes for p in parts), duration_ms=_ms(started),
        metadata=metadata, files=files, branches=entries, deployments=deployments,
        warnings=warnings)
    await asyncio.to_thread(write_manifest, backup_dir, manifest)
    progress(f"done: {_mb(manifest.size_bytes)} by {manifest.method} in "
             f"{manifest.duration_ms / 1000:.1f} s -> {backup_dir}")
    return manifest
