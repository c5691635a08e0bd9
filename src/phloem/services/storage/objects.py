"""A branch's objects on disk, and copying them with the branch.

Layout of ``<branch_dir>/storage`` (one tree per branch, 0700):

    .credentials              the branch's access key id and secret, sealed (never copied)
    .uploads/<upload id>/     multipart uploads in progress (never copied)
    <bucket>/index.sqlite     one row per object: key, blob name, size, ETag, content
                              type, user metadata, stored headers, checksums, mtime
    <bucket>/blobs/<uuid>     the objects' bytes, one file each, never rewritten in place
    <bucket>/tmp/             bodies being received

Why a per-bucket SQLite index and not sidecar files: keys are up to 1024 bytes (longer
than a file name) and may be both ``a`` and ``a/b``, and ListObjectsV2 wants them in
byte order from any start: a ``WITHOUT ROWID`` table keyed by the key answers that from
its b-tree. A write stores its bytes as a new blob, then (under the branch's lock) points
the row at it and unlinks the old blob, so a reader that already opened the old blob
keeps reading it, and the index and the blobs agree whenever the lock is free.

    store = BranchStorage(root, buckets={"images": "private"}, quota_bytes=1 << 30)
    bucket = store.bucket("images")
    async with store.lock:
        bucket.commit("a.png", tmp_path, ObjectMeta(...))
    cloned = preclone_storage([("images", bucket.path)], child_root, copier, stop)
    copy_storage(parent_store, child_root, copier, cloned)   # with parent_store.lock held
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import sqlite3
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from phloem.branches.clone import Copier

_SCHEMA = """
CREATE TABLE IF NOT EXISTS objects (
    key TEXT PRIMARY KEY,
    blob TEXT NOT NULL,
    size INTEGER NOT NULL,
    etag TEXT NOT NULL,
    content_type TEXT NOT NULL,
    metadata TEXT NOT NULL,
    headers TEXT NOT NULL,
    checksums TEXT NOT NULL,
    modified REAL NOT NULL
) WITHOUT ROWID
"""
ACCESS_MODES = ("private", "public_read")
#: Blobs cloned at once by a branch copy.
COPY_THREADS = 8
#: Blobs named to one ``cp`` by the clone ahead (well under the argument length limit).
PRECLONE_BATCH = 1000


@dataclass
class ObjectMeta:
    size: int
    etag: str                     # quoted, as sent in the ETag header
    content_type: str
    metadata: dict[str, str] = field(default_factory=dict)   # x-amz-meta-* without prefix
    headers: dict[str, str] = field(default_factory=dict)    # cache-control, ...
    checksums: dict[str, str] = field(default_factory=dict)
    modified: float = 0.0
    key: str = ""
    blob: str = ""


class Bucket:
    def __init__(self, path: Path, name: str, access: str) -> None:
        self.path, self.name, self.access = path, name, access
        self.blobs = path / "blobs"
        self.tmp = path / "tmp"
        for d in (path, self.blobs, self.tmp):
            d.mkdir(mode=0o700, parents=True, exist_ok=True)
        # Autocommit, default (FULL) synchronous: a 200 means the row is on disk.
        self.db = sqlite3.connect(path / "index.sqlite", isolation_level=None,
                                  check_same_thread=False)
        self.db.execute(_SCHEMA)
        self._sweep()

    def _sweep(self) -> None:
        """Remove what a killed platform left: bodies half received, and blobs written
        whose row never pointed at them (killed between the rename and the insert)."""
        for leftover in self.tmp.iterdir():
            leftover.unlink()
        known = {row[0] for row in self.db.execute("SELECT blob FROM objects")}
        for blob in self.blobs.iterdir():
            if blob.name not in known:
                blob.unlink()

    def close(self) -> None:
        self.db.close()

    def new_tmp(self) -> Path:
        return self.tmp / uuid.uuid4().hex

    def blob_path(self, blob: str) -> Path:
        return self.blobs / blob

    def _row(self, row: tuple[object, ...]) -> ObjectMeta:
        key, blob, size, etag, ctype, meta, headers, sums, modified = row
        return ObjectMeta(int(str(size)), str(etag), str(ctype), json.loads(str(meta)),
                          json.loads(str(headers)), json.loads(str(sums)),
                          float(str(modified)), str(key), str(blob))

    def get(self, key: str) -> ObjectMeta | None:
        row = self.db.execute("SELECT * FROM objects WHERE key = ?", (key,)).fetchone()
        return self._row(row) if row else None

    def open(self, key: str) -> tuple[ObjectMeta, int] | None:
        """The object's metadata and an open descriptor on its bytes (retried when a
        concurrent write replaced the blob between the lookup and the open)."""
        for _ in range(5):
            meta = self.get(key)
            if meta is None:
                return None
            try:
                return meta, os.open(self.blob_path(meta.blob), os.O_RDONLY)
            except FileNotFoundError:
                continue
        return None

    def commit(self, key: str, src: Path, meta: ObjectMeta) -> None:
        """Make ``src`` (a file on this filesystem) the object ``key``; caller holds the
        branch's lock."""
        blob = uuid.uuid4().hex
        os.rename(src, self.blob_path(blob))
        old = self.get(key)
        meta.key, meta.blob = key, blob
        meta.modified = meta.modified or time.time()
        self.db.execute(
            "INSERT OR REPLACE INTO objects VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (key, blob, meta.size, meta.etag, meta.content_type, json.dumps(meta.metadata),
             json.dumps(meta.headers), json.dumps(meta.checksums), meta.modified))
        if old is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.blob_path(old.blob))

    def delete(self, key: str) -> None:
        old = self.get(key)
        if old is not None:
            self.db.execute("DELETE FROM objects WHERE key = ?", (key,))
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.blob_path(old.blob))

    def keys_from(self, start: str, prefix: str) -> Iterator[ObjectMeta]:
        """Objects whose key starts with ``prefix`` and sorts after ``start``, in byte
        order (SQLite compares TEXT with memcmp over UTF-8)."""
        lower = max(start, prefix)
        op = ">" if start >= prefix and start else ">="
        cur = self.db.execute(f"SELECT * FROM objects WHERE key {op} ? ORDER BY key", (lower,))
        for row in cur:
            meta = self._row(row)
            if not meta.key.startswith(prefix):
                return
            yield meta

    def total_bytes(self) -> int:
        return int(self.db.execute("SELECT COALESCE(SUM(size), 0) FROM objects").fetchone()[0])


class BranchStorage:
    """One branch's buckets; ``lock`` serialises writes to the index with copies."""

    def __init__(self, root: Path, buckets: dict[str, str], quota_bytes: int) -> None:
        self.root = root
        self.quota_bytes = quota_bytes
        self.lock = asyncio.Lock()
        #: How CopyObject and branch copies clone blobs (probed by the service).
        self.copier: Copier | None = None
        root.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.uploads = root / ".uploads"
        self.uploads.mkdir(mode=0o700, exist_ok=True)
        for leftover in self.uploads.glob("*/tmp-*"):   # parts half received
            leftover.unlink()
        self._buckets: dict[str, Bucket] = {}
        self.configure(buckets)

    def configure(self, buckets: dict[str, str]) -> None:
        """Declare the buckets (name -> access); a bucket no longer declared is closed
        but its objects stay until the service is removed from the branch."""
        for name in list(self._buckets):
            if name not in buckets:
                self._buckets.pop(name).close()
        for name, access in buckets.items():
            if name in self._buckets:
                self._buckets[name].access = access
            else:
                self._buckets[name] = Bucket(self.root / name, name, access)

    @property
    def buckets(self) -> dict[str, Bucket]:
        return self._buckets

    def bucket(self, name: str) -> Bucket | None:
        return self._buckets.get(name)

    def used_bytes(self) -> int:
        """Bytes held by objects and by uploaded parts of unfinished multipart uploads."""
        used = sum(b.total_bytes() for b in self._buckets.values())
        for part in self.uploads.glob("*/part-*"):
            with contextlib.suppress(FileNotFoundError):
                used += part.stat().st_size
        return used

    def close(self) -> None:
        for b in self._buckets.values():
            b.close()
        self._buckets.clear()


#: Per bucket name: the blobs an unlocked first pass (:func:`preclone_storage`) cloned.
Cloned = dict[str, set[str]]


def _clone_blobs(src_blobs: Path, dst_blobs: Path, names: set[str], copier: Copier) -> int:
    """Clone ``names`` from ``src_blobs`` into ``dst_blobs``; the bytes cloned."""
    if not names:
        return 0
    # A clone is a few syscalls that mostly wait on the filesystem's log: several at
    # once overlap those waits (the ioctl releases the GIL).
    with ThreadPoolExecutor(max_workers=min(COPY_THREADS, len(names))) as pool:
        return sum(pool.map(lambda n: copier.copy_file(src_blobs / n, dst_blobs / n),
                            names))


def _cp_blobs(src_blobs: Path, dst_blobs: Path, sizes: dict[str, int], reflink: bool,
              stop: threading.Event) -> set[str]:
    """Clone the blobs ``sizes`` names with ``cp``: a process of its own, so the clones
    take nothing from the threads of this one (the database copy's runs beside it, and
    threads here would keep taking the GIL from it: tens of ms on a loaded machine). The
    blobs cloned whole (``cp`` skips those that vanished) are returned; others removed."""
    names = sorted(sizes)
    mode = "--reflink=always" if reflink else "--reflink=auto"
    for i in range(0, len(names), PRECLONE_BATCH):
        if stop.is_set():
            break
        subprocess.run(["cp", mode, "-t", str(dst_blobs), "--",
                        *(str(src_blobs / n) for n in names[i:i + PRECLONE_BATCH])],
                       stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL, check=False)
    have = set()
    for name in names:
        try:
            size = os.stat(dst_blobs / name).st_size
        except FileNotFoundError:
            continue
        if size == sizes[name]:
            have.add(name)
        else:   # cut short: the copy under the lock clones it again
            os.unlink(dst_blobs / name)
    return have


def preclone_storage(buckets: list[tuple[str, Path]], dst_root: Path, copier: Copier,
                     stop: threading.Event) -> Cloned:
    """First pass of a branch copy, without the branch's lock (its writes go on): clone
    the blobs each bucket's index names now into ``dst_root``. Blobs are never rewritten
    in place (a write makes a new one), so a clone taken here stays right for as long as
    the index names it; :func:`copy_storage` later brings the copy up to date under the
    lock. ``buckets``: (name, directory) of each, read by the caller in the loop;
    ``copier``: its method says whether the filesystem clones."""
    cloned: Cloned = {}
    dst_root.mkdir(mode=0o700, parents=True, exist_ok=True)
    for name, path in buckets:
        if stop.is_set():
            break
        dst = dst_root / name
        (dst / "blobs").mkdir(mode=0o700, parents=True, exist_ok=True)
        (dst / "tmp").mkdir(mode=0o700, exist_ok=True)
        # A connection of its own: the bucket's is the event loop's, which keeps writing.
        index = sqlite3.connect(f"file:{path / 'index.sqlite'}?mode=ro", uri=True)
        try:
            sizes = dict(index.execute("SELECT blob, size FROM objects").fetchall())
        finally:
            index.close()
        cloned[name] = _cp_blobs(path / "blobs", dst / "blobs", sizes,
                                 copier.method == "reflink", stop)
    return cloned


def copy_storage(src: BranchStorage, dst_root: Path, copier: Copier,
                 cloned: Cloned | None = None) -> int:
    """Copy every declared bucket of ``src`` (index and blobs) into ``dst_root``; the
    caller holds ``src.lock`` so index and blobs agree. Blobs are cloned by ``copier``
    (reflinks share their blocks). ``cloned``: what :func:`preclone_storage` already put
    in ``dst_root``; only the blobs the index names now and it lacks are cloned, and
    those the index no longer names removed. Returns the bytes copied here."""
    copied = 0
    cloned = cloned or {}
    dst_root.mkdir(mode=0o700, parents=True, exist_ok=True)
    for name, bucket in src.buckets.items():
        dst = dst_root / name
        (dst / "blobs").mkdir(mode=0o700, parents=True, exist_ok=True)
        (dst / "tmp").mkdir(mode=0o700, exist_ok=True)
        target = sqlite3.connect(dst / "index.sqlite")
        try:
            # No journal and no syncs here, under the lock: each sync forces the
            # filesystem's log with every clone before it; sync_storage does it once.
            target.execute("PRAGMA journal_mode = OFF")
            target.execute("PRAGMA synchronous = OFF")
            bucket.db.backup(target)
            names = {row[0] for row in target.execute("SELECT blob FROM objects")}
        finally:
            target.close()
        have = cloned.pop(name, set())
        for stale in have - names:
            os.unlink(dst / "blobs" / stale)
        copied += _clone_blobs(bucket.blobs, dst / "blobs", names - have, copier)
    for name in cloned:   # pre-cloned, then no longer declared
        shutil.rmtree(dst_root / name, ignore_errors=True)
    return copied


def sync_storage(root: Path) -> None:
    """Make a copy made by :func:`copy_storage` durable: each index and the directories
    (their entries: the blobs). On XFS the first fsync forces the log, and with it every
    clone made before."""
    def fsync(path: Path) -> None:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    for index in root.glob("*/index.sqlite"):
        fsync(index)
        fsync(index.parent / "blobs")
        fsync(index.parent)
    fsync(root)


def remove_buckets(root: Path) -> None:
    """Remove every bucket and upload under ``root``, keeping its credentials."""
    if not root.exists():
        return
    for entry in root.iterdir():
        if entry.name == ".credentials":
            continue
        if entry.is_dir():
            shutil.rmtree(entry)
        else:
            entry.unlink()
