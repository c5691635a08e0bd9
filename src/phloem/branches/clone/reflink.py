"""Copy-on-write file clones with the FICLONE ioctl (XFS with reflink=1, btrfs, ...).

The clone shares every block with its source until either side writes, so a data
directory of any size copies in time proportional to its number of files."""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path

FICLONE = 0x40049409  # _IOW(0x94, 9, int)


def _clone(src: Path, dst: Path) -> int:
    with open(src, "rb") as fsrc:
        size = os.fstat(fsrc.fileno()).st_size
        fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
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

    def copy_file(self, src: Path, dst: Path) -> int:
        return _clone(src, dst)
