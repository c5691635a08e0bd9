"""Copy a *running* cluster into a new data directory, the way ``pg_basebackup`` does, but
with reflinks and in one superuser session on the parent:

1. a temporary physical replication slot reserving WAL at once, so no checkpoint recycles
   segments the child needs;
2. ``pg_backup_start(label, fast => true)``;
3. copy the data directory minus what ``pg_basebackup`` leaves out (postmaster files,
   contents of pg_wal, pg_replslot and other runtime dirs, temp files, main forks of
   unlogged relations), ``global/pg_control`` last; files that vanish are skipped;
4. ``pg_backup_stop()``; write its ``backup_label``; copy WAL from the start to the stop
   segment; the slot goes with the session. ``at_stop`` (a context manager) is entered
   just before ``pg_backup_stop`` and left just after: the child's database is the
   parent's as of that moment, so state kept beside the database (a branch's objects) is
   frozen on entering and copied on leaving to match it.

The child then recovers to consistency on its first start. The parent serves throughout.

    stats = clone_running_cluster(conn, parent_pgdata, child_pgdata, owner=(uid, gid))
"""

from __future__ import annotations

import errno
import os
import re
import secrets
import shutil
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, ExitStack, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg

from phloem.branches.clone import Copier, choose_backend
from phloem.system.fsutil import tree_size

# Directories copied empty (their contents are runtime state).
EMPTY_DIRS = {"pg_wal", "pg_replslot", "pg_stat_tmp", "pg_dynshmem", "pg_notify",
              "pg_serial", "pg_snapshots", "pg_subtrans"}
SKIP_FILES = {"postmaster.pid", "postmaster.opts", "pg_internal.init", "backup_label",
              "tablespace_map", "backup_label.old", "current_logfiles"}
# Kept free after a plain copy, so the parent's WAL still has room.
RESERVE_BYTES = 64 * 1024 * 1024
_RELFILE_RE = re.compile(r"^(\d+)(?:_(fsm|vm|init))?(?:\.\d+)?$")
_WALFILE_RE = re.compile(r"^[0-9A-F]{24}$")


class BranchCopyError(RuntimeError):
    pass


@dataclass(frozen=True)
class CloneStats:
    method: str
    files: int
    bytes: int
    copy_ms: float
    backup_ms: float


def _unlogged_main_forks(dirpath: str, filenames: list[str]) -> set[str]:
    """Files of unlogged relations other than their init forks (recovery recreates them
    from the init fork)."""
    inits = {m.group(1) for f in filenames
             if (m := _RELFILE_RE.match(f)) and m.group(2) == "init"}
    if not inits:
        return set()
    return {f for f in filenames
            if (m := _RELFILE_RE.match(f)) and m.group(1) in inits and m.group(2) != "init"}


def _mkdir(path: Path, owner: tuple[int, int] | None) -> None:
    path.mkdir(mode=0o700, exist_ok=True)
    if owner is not None:
        os.chown(path, *owner)


def _write(path: Path, text: str, owner: tuple[int, int] | None) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with open(fd, "w") as f:
        if owner is not None:
            os.fchown(fd, *owner)
        f.write(text)


def _copy_tree(src: Path, dst: Path, copier: Copier,
               owner: tuple[int, int] | None) -> tuple[int, int]:
    files = nbytes = 0
    pg_control = None
    for dirpath, dirnames, filenames in os.walk(src):
        rel = os.path.relpath(dirpath, src)
        target = dst if rel == "." else dst / rel
        _mkdir(target, owner)
        if rel in EMPTY_DIRS:
            if rel == "pg_wal":
                _mkdir(target / "archive_status", owner)
            dirnames[:] = []
            continue
        dirnames[:] = [d for d in dirnames if not d.startswith("pgsql_tmp")]
        skip = _unlogged_main_forks(dirpath, filenames) if rel.startswith("base") else set()
        for name in filenames:
            if name in SKIP_FILES or name in skip or name.startswith(("pgsql_tmp",
                                                                      ".phloem-")):
                continue
            if rel == "global" and name == "pg_control":
                pg_control = (Path(dirpath) / name, target / name)
                continue
            try:
                nbytes += copier.copy_file(Path(dirpath) / name, target / name)
                files += 1
            except FileNotFoundError:
                continue  # dropped or truncated away while we copied: normal
    if pg_control is None:
        raise BranchCopyError(f"{src} has no global/pg_control; not a data directory")
    nbytes += copier.copy_file(*pg_control)
    return files + 1, nbytes




def _wal_segments(pg_wal: Path, first: str, last: str) -> list[str]:
    # Segment names sort by (timeline, log, seg); compare log+seg, any timeline.
    names = sorted(n for n in os.listdir(pg_wal) if _WALFILE_RE.match(n))
    return [n for n in names if first[8:] <= n[8:] <= last[8:]]


def clone_running_cluster(conn: psycopg.Connection[Any], parent_pgdata: Path,
                          child_pgdata: Path,
                          owner: tuple[int, int] | None = None,
                          at_stop: Callable[[], AbstractContextManager[None]] = nullcontext,
                          ) -> CloneStats:
    """``conn``: an autocommit superuser connection to the parent. ``owner`` (uid, gid):
    who gets every file and directory of the copy as it is made (None: whoever runs
    this). ``at_stop``: around ``pg_backup_stop`` (see the module's docstring); an error
    it raises fails the copy."""
    started = time.monotonic()
    row = conn.execute("SELECT count(*) FROM pg_tablespace WHERE spcname NOT IN "
                       "('pg_default', 'pg_global')").fetchone()
    if row and row[0]:
        raise BranchCopyError("the parent cluster has tablespaces; clusters with "
                              "tablespaces cannot be branched")
    if child_pgdata.exists() and any(child_pgdata.iterdir()):
        raise BranchCopyError(f"{child_pgdata} is not empty")
    child_pgdata.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    _mkdir(child_pgdata, owner)
    copier = choose_backend(parent_pgdata, child_pgdata, owner)
    if copier.method == "copy":
        # A plain copy needs the parent's size again. Running out of space half-way
        # would also starve the parent's own WAL, so refuse up front.
        need = tree_size(parent_pgdata) + RESERVE_BYTES
        free = shutil.disk_usage(child_pgdata).free
        if free < need:
            raise OSError(errno.ENOSPC, f"a plain copy needs {need / 1e6:.0f} MB (the "
                          f"parent's size plus {RESERVE_BYTES / 1e6:.0f} MB), "
                          f"{free / 1e6:.0f} MB are free")
    slot = f"phloem_clone_{secrets.token_hex(4)}"
    conn.execute("SELECT pg_create_physical_replication_slot(%s, true, true)", (slot,))
    try:
        start_lsn = conn.execute("SELECT pg_backup_start(%s, true)",
                                 (f"phloem branch {slot}",)).fetchone()
        assert start_lsn is not None
        backup_ms = (time.monotonic() - started) * 1000
        copy_started = time.monotonic()
        with ExitStack() as around_stop:
            try:
                files, nbytes = _copy_tree(parent_pgdata, child_pgdata, copier, owner)
                around_stop.enter_context(at_stop())
            except BaseException:
                conn.execute("SELECT pg_backup_stop(false)")  # the copy is abandoned
                raise
            stop = conn.execute("SELECT lsn, labelfile, spcmapfile FROM pg_backup_stop(false)"
                                ).fetchone()
        assert stop is not None
        stop_lsn, labelfile, spcmapfile = stop
        _write(child_pgdata / "backup_label", labelfile, owner)
        if spcmapfile:
            _write(child_pgdata / "tablespace_map", spcmapfile, owner)
        names = conn.execute("SELECT pg_walfile_name(%s), pg_walfile_name(%s)",
                             (start_lsn[0], stop_lsn)).fetchone()
        assert names is not None
        wal_src, wal_dst = parent_pgdata / "pg_wal", child_pgdata / "pg_wal"
        segments = _wal_segments(wal_src, names[0], names[1])
        if not segments or segments[-1][8:] < names[1][8:]:
            raise BranchCopyError(f"WAL from {names[0]} to {names[1]} is not all in "
                                  f"{wal_src}")
        for name in segments:
            nbytes += copier.copy_file(wal_src / name, wal_dst / name)
            files += 1
        for name in os.listdir(wal_src):
            if name.endswith(".history"):
                copier.copy_file(wal_src / name, wal_dst / name)
        copy_ms = (time.monotonic() - copy_started) * 1000
    finally:
        conn.execute("SELECT pg_drop_replication_slot(%s) FROM pg_replication_slots "
                     "WHERE slot_name = %s", (slot, slot))
    return CloneStats(method=copier.method, files=files, bytes=nbytes, copy_ms=copy_ms,
                      backup_ms=backup_ms)
