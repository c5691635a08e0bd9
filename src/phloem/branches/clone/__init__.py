"""Copying a data directory: reflinks (copy-on-write, O(files)) where the filesystem shares
blocks, a plain copy otherwise. Which one ran is probed, never guessed, so the API can
report it truthfully.

    backend = choose_backend(src_dir, dst_parent, owner=(uid, gid))  # or owner=None
    size = backend.copy_file(src, dst)                # bytes copied
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Protocol

from phloem.branches.clone.copy import PlainCopier
from phloem.branches.clone.reflink import ReflinkCopier, reflink_supported


class Copier(Protocol):
    method: str

    def copy_file(self, src: Path, dst: Path) -> int:
        """Copy one regular file, return its size in bytes. Raises FileNotFoundError when
        ``src`` vanished (normal while PostgreSQL runs). The new file is mode 0600 and,
        when the copier was given an owner, already belongs to it."""
        ...


def choose_backend(src_dir: Path, dst_dir: Path,
                   owner: tuple[int, int] | None = None) -> Copier:
    """Reflink when a probe file in ``src_dir`` can be cloned into ``dst_dir``. ``owner``
    (uid, gid): given to every file as it is created (one ``fchown`` on the open file
    instead of a second walk over the tree)."""
    dst_dir.mkdir(parents=True, exist_ok=True)
    fd, probe = tempfile.mkstemp(prefix=".phloem-reflink-probe-", dir=src_dir)
    try:
        os.write(fd, b"phloem reflink probe\n")
        os.close(fd)
        if reflink_supported(Path(probe), dst_dir / Path(probe).name):
            return ReflinkCopier(owner=owner)
    finally:
        os.unlink(probe)
    return PlainCopier(owner=owner)


__all__ = ["Copier", "PlainCopier", "ReflinkCopier", "choose_backend"]
