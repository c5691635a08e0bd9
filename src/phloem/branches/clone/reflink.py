"""Copy-on-write file clones with the FICLONE/FICLONERANGE ioctls (XFS with reflink=1,
btrfs, ...).

The clone shares every block with its source until either side writes, so a data
directory of any size copies in time proportional to its number of files and extents.

A clone locks both files for its whole duration (on XFS the I/O and mmap locks: the
source's readers and writers wait). That is nothing on a freshly written file, but a
running parent's tables fragment once they share blocks with a child (every first write
to a shared block is copied-on-write into a new extent), and cloning a 1 GB relation
segment with tens of thousands of extents then takes about a second, during which the
parent's backends block on that file. Large files are therefore cloned in ranges of
``RANGE_BYTES``, so the lock is held for milliseconds at a time."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import struct
from pathlib import Path

FICLONE = 0x40049409  # _IOW(0x94, 9, int)
FICLONERANGE = 0x4020940D  # _IOW(0x94, 13, struct file_clone_range)
_CLONE_RANGE = struct.Struct("=qQQQ")  # src_fd, src_offset, src_length, dest_offset
# A multiple of every block and page size in play (4 KiB blocks, 8 KiB PostgreSQL pages),
# so no page is split across two clones.
RANGE_BYTES = 16 * 1024 * 1024


def _clone_range(src_fd: int, dst_fd: int, offset: int, length: int) -> None:
    """Clone ``length`` bytes at ``offset`` (0: up to the source's end of file)."""
    fcntl.ioctl(dst_fd, FICLONERANGE, _CLONE_RANGE.pack(src_fd, offset, length, offset))


def _clone_ranges(src_fd: int, dst_fd: int, range_bytes: int) -> None:
    offset = 0
    while True:
        size = os.fstat(src_fd).st_size
        if size - offset <= range_bytes:
            break
        try:
            _clone_range(src_fd, dst_fd, offset, range_bytes)
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
            break  # the source shrank under us: finish with a clone to its end
        offset += range_bytes
    try:
        _clone_range(src_fd, dst_fd, offset, 0)
    except OSError as exc:
        if exc.errno != errno.EINVAL or offset < os.fstat(src_fd).st_size:
            raise
        # Truncated below ``offset`` meanwhile (VACUUM): keep the copy as long as the
        # source; WAL replay redoes the truncation anyway.
        os.ftruncate(dst_fd, os.fstat(src_fd).st_size)


def _clone(src: Path, dst: Path, range_bytes: int = RANGE_BYTES,
           owner: tuple[int, int] | None = None) -> int:
    with open(src, "rb") as fsrc:
        size = os.fstat(fsrc.fileno()).st_size
        fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            if owner is not None:
                os.fchown(fd, *owner)
            if range_bytes and size > range_bytes:
                _clone_ranges(fsrc.fileno(), fd, range_bytes)
                size = os.fstat(fd).st_size
            else:
                fcntl.ioctl(fd, FICLONE, fsrc.fileno())
        except OSError:
            os.close(fd)
            os.unlink(dst)
            raise
        os.close(fd)
    return size


def reflink_supported(src: Path, dst: Path) -> bool:
    try:
        _clone(src, dst)
    except OSError:
        return False
    with contextlib.suppress(FileNotFoundError):
        os.unlink(dst)
    return True


class ReflinkCopier:
    method = "reflink"

    def __init__(self, range_bytes: int = RANGE_BYTES,
                 owner: tuple[int, int] | None = None) -> None:
        self.range_bytes = range_bytes
        self.owner = owner

    def copy_file(self, src: Path, dst: Path) -> int:
        return _clone(src, dst, self.range_bytes, self.owner)
