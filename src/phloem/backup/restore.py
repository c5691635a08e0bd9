"""Restoring a backup into an empty data dir, offline (no platform runs).

The backup's ``data/`` is copied into a new directory inside the target (so a failed
restore leaves the target as it was, and the target may be a fresh mount point), then:

* the clusters (``system/``, ``branches/<id>/``) are given to the service user;
* files of isolates and builds move with the isolate uid base, when another is chosen;
* links into the old data dir (a deployment's dependency environment) point into the
  new one;

and its entries are moved up into the target. ``phloem up --data-dir <it>`` then starts every
cluster (each recovers from its base backup's WAL, as a fresh branch does), with the same
metadata, secrets key and API key, and serves the deployments that were active.

    result = restore(Path("/srv/backups/bk-20261201T170000Z-1a2b"), Path("/var/lib/new"),
                     service_user="phloem", isolate_uid_base=None, progress=print)
"""

from __future__ import annotations

import os
import secrets
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from phloem.backup.files import (
    TreeStats,
    choose_copier,
    chown_tree,
    copy_entry,
    copy_tree,
    mirror_dir,
)
from phloem.backup.manifest import BACKUP_ID_RE, DATA, BackupError, Manifest, read_manifest
from phloem.metadata.secrets import KEY_ENV
from phloem.system.identity import (
    ISOLATE_UIDS,
    MAX_UID_BASE,
    MIN_UID_BASE,
    Identity,
    IdentityError,
)

Progress = Callable[[str], None]


@dataclass(frozen=True)
class RestoreResult:
    manifest: Manifest
    data_dir: Path
    isolate_uid_base: int
    files: int
    bytes: int
    ms: float
    method: str
    warnings: list[str] = field(default_factory=list)


def backup_path(backups_root: Path, ref: str) -> Path:
    """A backup named by its id (under ``backups_root``) or by a path."""
    if BACKUP_ID_RE.fullmatch(ref):
        return backups_root / ref
    return Path(ref).absolute()


def check_target(data_dir: Path) -> None:
    """The target must be a new or empty directory: a restore never merges into, or
    overwrites, a data dir."""
    if data_dir.is_symlink() or (data_dir.exists() and not data_dir.is_dir()):
        raise BackupError(400, "invalid_input", f"data_dir: {data_dir} exists and is not "
                          "a directory; restore needs an empty or new directory", "data_dir")
    if data_dir.is_dir():
        entries = sorted(os.listdir(data_dir))
        if entries:
            shown = ", ".join(entries[:5]) + (", ..." if len(entries) > 5 else "")
            raise BackupError(409, "data_dir_not_empty", f"data_dir: {data_dir} is not "
                              f"empty ({shown}); restore needs an empty or new directory",
                              "data_dir")


def _uid_mover(old_base: int, new_base: int) -> Callable[[int, int], tuple[int, int]]:
    """Isolate uids (``base + n``) and the build uid (``base - 1``) move with the base."""
    def move(n: int) -> int:
        return n - old_base + new_base if old_base - 1 <= n < old_base + ISOLATE_UIDS else n

    def owner(uid: int, gid: int) -> tuple[int, int]:
        return move(uid), move(gid)

    return owner


def _relinker(old_root: str, new_root: str) -> Callable[[str], str]:
    def relink(target: str) -> str:
        if target == old_root or target.startswith(old_root + "/"):
            return new_root + target[len(old_root):]
        return target

    return relink


def restore(backup_dir: Path, data_dir: Path, *, service_user: str,
            isolate_uid_base: int | None, progress: Progress) -> RestoreResult:
    started = time.monotonic()
    data_dir = data_dir.absolute()
    if not backup_dir.is_dir():
        raise BackupError(404, "backup_not_found", f"backup: {backup_dir} is not a "
                          "directory (give a backup's id or its path)", "backup")
    manifest = read_manifest(backup_dir)
    check_target(data_dir)
    base = manifest.isolate_uid_base if isolate_uid_base is None else isolate_uid_base
    if not MIN_UID_BASE <= base <= MAX_UID_BASE:
        raise BackupError(400, "invalid_input", f"isolate_uid_base: must be between "
                          f"{MIN_UID_BASE} and {MAX_UID_BASE} (got {base})",
                          "isolate_uid_base")
    try:
        service = Identity.service(service_user)
    except IdentityError as exc:
        raise BackupError(400, "invalid_input", str(exc), "service_user") from None
    warnings = list(manifest.warnings)
    if manifest.secret_key == "environment" and not os.environ.get(KEY_ENV):
        warnings.append(f"the backup's secret key came from {KEY_ENV}: start the restored "
                        "platform with the same value, or sealed env values and branch "
                        "passwords cannot be opened")
    src = backup_dir / DATA
    created = not data_dir.exists()
    data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    # Inside the target (which may be a fresh mount point), moved up when complete.
    work = data_dir / f".restoring-{secrets.token_hex(3)}"
    progress(f"restoring {manifest.id} ({len(manifest.branches)} branches, taken "
             f"{manifest.created_at}) into {data_dir}")
    try:
        mirror_dir(os.stat(src), work)
        copier = choose_copier(src, work)
        owner_map = _uid_mover(manifest.isolate_uid_base, base)
        relink = _relinker(manifest.data_dir, str(data_dir))
        total = TreeStats()
        for name in sorted(os.listdir(src)):
            t = time.monotonic()
            stats = (copy_tree(src / name, work / name, copier, owner_map=owner_map,
                               relink=relink)
                     if (src / name).is_dir() and not (src / name).is_symlink()
                     else copy_entry(src / name, work / name, copier, owner_map, relink))
            total.add(stats)
            progress(f"{name}: {stats.files} files, {stats.bytes / 1e6:.1f} MB by "
                     f"{copier.method} in {(time.monotonic() - t) * 1000:.0f} ms")
        homes = work / "homes"  # homes/<uid>: the names move with the uids
        if base != manifest.isolate_uid_base and homes.is_dir():
            for name in os.listdir(homes):
                if name.isdigit() and str(owner_map(int(name), 0)[0]) != name:
                    (homes / name).rename(homes / str(owner_map(int(name), 0)[0]))
        if os.geteuid() == 0:
            # Clusters and poolers run as the service user, whoever that is here.
            if (work / "system").is_dir():
                chown_tree(work / "system", service.uid, service.gid)
            for b in manifest.branches:
                if (work / "branches" / b.id).is_dir():
                    chown_tree(work / "branches" / b.id, service.uid, service.gid)
        for b in manifest.branches:
            if not (work / "branches" / b.id / "pgdata" / "PG_VERSION").is_file():
                raise BackupError(400, "not_a_backup", f"backup: branch {b.name} ({b.id}) "
                                  "has no cluster in the backup", "backup")
            progress(f"branch {b.name} ({b.id}): ready to recover on start")
        for name in os.listdir(work):
            (work / name).rename(data_dir / name)
        work.rmdir()
        mirror_dir(os.stat(src), data_dir)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        if created:
            shutil.rmtree(data_dir, ignore_errors=True)
        raise
    return RestoreResult(manifest=manifest, data_dir=data_dir, isolate_uid_base=base,
                         files=total.files, bytes=total.bytes,
                         ms=round((time.monotonic() - started) * 1000, 1),
                         method=copier.method, warnings=warnings)
