"""A backup's layout on disk and its manifest.

A backup is one directory, root's and 0700 (it holds the platform's secrets)::

    <backup>/manifest.json   written last: a directory without one is not a backup
    <backup>/data/           the data dir's layout: system/pgdata and branches/<id>/pgdata
                             as base backups, secrets/, credentials.json, artifacts/,
                             deployments/ (active ones), envs/, runtime/, homes/

    manifest = read_manifest(Path("/var/lib/phloem/backups/bk-20261201T170000Z-1a2b"))
    manifest.branches[0].name
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
DATA = "data"
BACKUP_ID_RE = re.compile(r"bk-[0-9]{8}T[0-9]{6}Z-[0-9a-f]{4}")


class BackupError(Exception):
    """A refused backup operation: ``field`` names what was wrong, ``code`` is stable."""

    def __init__(self, status: int, code: str, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.field = status, code, message, field


@dataclass(frozen=True)
class PartStats:
    """One copied part: how, how much, how long."""

    method: str
    files: int
    bytes: int
    ms: float


@dataclass(frozen=True)
class BranchEntry:
    id: str
    name: str
    parent_id: str | None
    #: When its base backup started (UTC, ISO 8601): after the metadata's.
    started_at: str
    copy: PartStats


@dataclass(frozen=True)
class Manifest:
    id: str
    created_at: str
    finished_at: str
    phloem_version: str
    #: The data dir the backup was taken of: absolute links into it are moved on restore.
    data_dir: str
    #: Files of isolates and builds belong to uids from this base (remapped on restore).
    isolate_uid_base: int
    #: "file" (secrets/env.key, in the backup) or "environment" (PHLOEM_SECRET_KEY,
    #: not in the backup: the restored platform needs the same value).
    secret_key: str
    #: reflink when every part was reflinked, copy when every part was copied, else mixed.
    method: str
    size_bytes: int
    duration_ms: float
    metadata: PartStats
    files: dict[str, PartStats]
    branches: list[BranchEntry]
    deployments: list[str]
    warnings: list[str] = field(default_factory=list)
    version: int = FORMAT_VERSION

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Manifest:
        def part(d: dict[str, Any]) -> PartStats:
            return PartStats(**d)

        return cls(**{
            **data,
            "metadata": part(data["metadata"]),
            "files": {k: part(v) for k, v in data["files"].items()},
            "branches": [BranchEntry(**{**b, "copy": part(b["copy"])})
                         for b in data["branches"]],
        })


def write_manifest(backup_dir: Path, manifest: Manifest) -> None:
    """Atomically, fsynced: its presence is what marks the backup complete."""
    tmp = backup_dir / f".{MANIFEST}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(manifest.to_json(), f, indent=2)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, backup_dir / MANIFEST)


def read_manifest(backup_dir: Path) -> Manifest:
    path = backup_dir / MANIFEST
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise BackupError(400, "not_a_backup", f"backup: {backup_dir} has no {MANIFEST}, "
                          "so it is not a complete phloem backup", "backup") from None
    except (OSError, ValueError) as exc:
        raise BackupError(400, "not_a_backup", f"backup: {path} is not readable JSON: "
                          f"{exc}", "backup") from None
    version = data.get("version") if isinstance(data, dict) else None
    if version != FORMAT_VERSION:
        raise BackupError(400, "unsupported_backup", f"backup: {path} has format version "
                          f"{version!r}; this phloem reads version {FORMAT_VERSION}",
                          "backup")
    try:
        return Manifest.from_json(data)
    except (TypeError, KeyError) as exc:
        raise BackupError(400, "not_a_backup", f"backup: {path} is not a phloem manifest: "
                          f"{exc}", "backup") from None
