"""Backups being taken by the platform, and those on disk, as the API shows them.

One backup runs at a time (a second request gets 409 ``backup_running``); it runs as a
task of the platform's loop and records progress lines a client polls.

    jobs = BackupJobs(platform)
    job = jobs.start()                    # BackupError(409) while another runs
    jobs.describe(job.id).progress
"""

from __future__ import annotations

import asyncio
import logging
import os
from dataclasses import dataclass, field
from datetime import UTC, datetime

from phloem.backup.create import (
    Platform,
    backups_dir,
    check_backups_dir,
    new_backup_id,
    take_backup,
)
from phloem.backup.manifest import (
    BACKUP_ID_RE,
    MANIFEST,
    BackupError,
    Manifest,
    read_manifest,
)

log = logging.getLogger("phloem.backup")


@dataclass
class BackupJob:
    id: str
    created_at: datetime
    state: str = "running"
    progress: list[str] = field(default_factory=list)
    manifest: Manifest | None = None
    error: str | None = None


@dataclass(frozen=True)
class BackupInfo:
    """``state``: running, complete, failed (this run; nothing kept on disk) or
    incomplete (a directory without a manifest: interrupted by a crash)."""

    id: str
    state: str
    path: str
    created_at: str | None
    manifest: Manifest | None
    progress: list[str]
    error: str | None


class BackupJobs:
    def __init__(self, platform: Platform) -> None:
        self.platform = platform
        self.root = backups_dir(platform.paths)
        self._jobs: dict[str, BackupJob] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    def start(self) -> BackupJob:
        running = [j for j in self._jobs.values() if j.state == "running"]
        if running:
            raise BackupError(409, "backup_running", f"backup {running[0].id} is still "
                              "running; one backup runs at a time")
        check_backups_dir(self.platform.paths)
        job = BackupJob(id=new_backup_id(), created_at=datetime.now(UTC))
        self._jobs[job.id] = job
        task = asyncio.create_task(self._run(job))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return job

    async def _run(self, job: BackupJob) -> None:
        def progress(line: str) -> None:
            job.progress.append(line)
            log.info("%s", line)

        try:
            job.manifest = await take_backup(self.platform, job.id, progress)
            job.state = "complete"
        except Exception as exc:
            job.state, job.error = "failed", f"{exc.__class__.__name__}: {exc}"
            progress(f"failed: {job.error}")
            log.exception("backup %s failed", job.id)

    def _info(self, backup_id: str) -> BackupInfo | None:
        job = self._jobs.get(backup_id)
        path = self.root / backup_id
        if job is not None and job.state != "complete":
            created = job.created_at.isoformat(timespec="seconds")
            return BackupInfo(job.id, job.state, str(path), created, None,
                              list(job.progress), job.error)
        if not path.is_dir():
            return None
        progress = list(job.progress) if job else []
        if not (path / MANIFEST).exists():
            return BackupInfo(backup_id, "incomplete", str(path), None, None, progress,
                              "no manifest: the backup was interrupted")
        try:
            manifest = read_manifest(path)
        except BackupError as exc:
            return BackupInfo(backup_id, "incomplete", str(path), None, None, progress,
                              exc.message)
        return BackupInfo(backup_id, "complete", str(path), manifest.created_at, manifest,
                          progress, None)

    def describe(self, backup_id: str) -> BackupInfo:
        if not BACKUP_ID_RE.fullmatch(backup_id):
            raise BackupError(400, "invalid_input", "id: must look like "
                              f"bk-20261201T170000Z-1a2b (got {backup_id!r})", "id")
        info = self._info(backup_id)
        if info is None:
            raise BackupError(404, "backup_not_found", f"backup {backup_id!r} not found "
                              f"in {self.root}")
        return info

    def list(self) -> list[BackupInfo]:
        ids = set(self._jobs)
        if self.root.is_dir():
            ids |= {n for n in os.listdir(self.root) if BACKUP_ID_RE.fullmatch(n)}
        found = (self._info(i) for i in sorted(ids))
        return [i for i in found if i is not None]

