"""Small filesystem helpers shared by the pieces that lay out the data dir."""

from __future__ import annotations

import os
from pathlib import Path


def make_world_readable(root: Path) -> None:
    """Directories 0755, files 0644 (0755 when executable): for trees that unprivileged
    isolates and the service user must read (binaries, runtimes, environments)."""
    for dirpath, _dirs, files in os.walk(root):
        os.chmod(dirpath, 0o755)
        for name in files:
            path = os.path.join(dirpath, name)
            if not os.path.islink(path):
                os.chmod(path, 0o755 if os.access(path, os.X_OK) else 0o644)


def tree_size(root: Path) -> int:
    """Logical size in bytes of the regular files under ``root``; files that vanish
    meanwhile (a running PostgreSQL removes some) are skipped."""
    total = 0
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            try:
                total += os.lstat(os.path.join(dirpath, name)).st_size
            except FileNotFoundError:
                continue
    return total
