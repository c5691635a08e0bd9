"""Copying trees of the data dir into a backup and back, keeping what the platform's
privilege split depends on: each file's owner and mode, symbolic links as links.

Regular files go through the branch copier (``phloem.branches.clone``): reflinks where
the filesystem shares blocks, ``copy_file_range`` otherwise, a user-space copy between
filesystems (:func:`choose_copier`). Files that vanish while
they are copied are skipped (the platform keeps running during a backup); sockets, FIFOs
and devices are never copied.

    stats = copy_tree(src, dst, choose_copier(src, dst))
    stats = copy_tree(src, dst, copier, owner_map=remap, relink=move_link)
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from phloem.backup.manifest import PartStats
from phloem.branches.clone import Copier, choose_backend

#: (uid, gid) -> (uid, gid) for the copy.
OwnerMap = Callable[[int, int], tuple[int, int]]
#: A link's target -> the copy's target.
Relink = Callable[[str], str]
#: A path relative to the tree's root -> True to leave it out (and below it).
Skip = Callable[[Path], bool]


class StreamCopier:
    """A plain copy through user space, for copies between filesystems: there
    ``copy_file_range`` fails with EXDEV (a backup restored from another disk)."""

    method = "copy"

    def copy_file(self, src: Path, dst: Path) -> int:
        with open(src, "rb") as fsrc:
            fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with open(fd, "wb") as fdst:
                shutil.copyfileobj(fsrc, fdst, 1 << 20)
                return fdst.tell()


def choose_copier(src_dir: Path, dst_dir: Path) -> Copier:
    """Reflink or ``copy_file_range`` within one filesystem (probed, as for branches),
    :class:`StreamCopier` between two."""
    dst_dir.mkdir(parents=True, exist_ok=True)
    if os.stat(src_dir).st_dev != os.stat(dst_dir).st_dev:
        return StreamCopier()
    try:
        return choose_backend(src_dir, dst_dir)
    except OSError:  # the probe writes into src_dir: a backup may be read-only
        return StreamCopier()


def _same_owner(uid: int, gid: int) -> tuple[int, int]:
    return uid, gid


def _keep(target: str) -> str:
    return target


def _none(_: Path) -> bool:
    return False


_TEMPORARY_RE = re.compile(r"^\.tmp|^\.phloem-|\.tmp[0-9]+$")


def is_temporary(name: str) -> bool:
    """Half-made entries the platform renames into place when done (``.tmp-*``
    environments, ``<sha>.tar.tmp<pid>`` artifacts) and reflink probes."""
    return _TEMPORARY_RE.search(name) is not None


@dataclass
class TreeStats:
    files: int = 0
    bytes: int = 0

    def add(self, other: TreeStats) -> None:
        self.files += other.files
        self.bytes += other.bytes

    def part(self, method: str, started: float) -> PartStats:
        return PartStats(method=method, files=self.files, bytes=self.bytes,
                         ms=round((time.monotonic() - started) * 1000, 1))


def _as_root() -> bool:
    return os.geteuid() == 0


def mirror_dir(src: os.stat_result, dst: Path, owner_map: OwnerMap = _same_owner) -> None:
    """Create ``dst`` (if missing) with the mode and (as root) the owner of ``src``."""
    dst.mkdir(mode=0o700, exist_ok=True)
    if _as_root():
        os.chown(dst, *owner_map(src.st_uid, src.st_gid))
    os.chmod(dst, stat.S_IMODE(src.st_mode) & 0o1777)


def copy_entry(src: Path, dst: Path, copier: Copier, owner_map: OwnerMap = _same_owner,
               relink: Relink = _keep) -> TreeStats:
    """One file or link (a directory: its whole tree)."""
    try:
        st = os.lstat(src)
    except FileNotFoundError:
        return TreeStats()
    if stat.S_ISDIR(st.st_mode):
        return copy_tree(src, dst, copier, owner_map=owner_map, relink=relink)
    out = TreeStats()
    _copy_one(src, dst, st, copier, owner_map, relink, out)
    return out


def _copy_one(src: Path, dst: Path, st: os.stat_result, copier: Copier,
              owner_map: OwnerMap, relink: Relink, out: TreeStats) -> None:
    if stat.S_ISLNK(st.st_mode):
        try:
            target = os.readlink(src)
        except FileNotFoundError:
            return
        os.symlink(relink(target), dst)
        if _as_root():
            os.lchown(dst, *owner_map(st.st_uid, st.st_gid))
        out.files += 1
        return
    if not stat.S_ISREG(st.st_mode):
        return  # sockets, FIFOs, devices: runtime state
    try:
        out.bytes += copier.copy_file(src, dst)
    except FileNotFoundError:
        return  # removed while we copied: the platform runs on
    if _as_root():
        os.chown(dst, *owner_map(st.st_uid, st.st_gid))
    # chown clears set-id bits; none are restored (nothing of the data dir needs them).
    os.chmod(dst, stat.S_IMODE(st.st_mode) & 0o777)
    out.files += 1


def copy_tree(src: Path, dst: Path, copier: Copier, *, skip: Skip = _none,
              owner_map: OwnerMap = _same_owner, relink: Relink = _keep) -> TreeStats:
    """Copy the tree at ``src`` to ``dst`` (created; its parent must exist)."""
    out = TreeStats()
    try:
        mirror_dir(os.lstat(src), dst, owner_map)
    except FileNotFoundError:
        return out
    for dirpath, dirnames, filenames in os.walk(src):
        rel = Path(os.path.relpath(dirpath, src))
        target = dst / rel
        keep_dirs = []
        for name in dirnames:
            path = Path(dirpath) / name
            if skip(rel / name):
                continue
            try:
                st = os.lstat(path)
            except FileNotFoundError:
                continue
            if stat.S_ISDIR(st.st_mode):
                mirror_dir(st, target / name, owner_map)
                keep_dirs.append(name)
            else:  # a link to a directory: copied as the link it is
                _copy_one(path, target / name, st, copier, owner_map, relink, out)
        dirnames[:] = keep_dirs
        for name in filenames:
            if skip(rel / name):
                continue
            path = Path(dirpath) / name
            try:
                st = os.lstat(path)
            except FileNotFoundError:
                continue
            _copy_one(path, target / name, st, copier, owner_map, relink, out)
    return out


def chown_tree(root: Path, uid: int, gid: int) -> None:
    """Give ``root`` and everything below it to ``uid:gid`` (links themselves)."""
    os.lchown(root, uid, gid)
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            os.lchown(os.path.join(dirpath, name), uid, gid)
