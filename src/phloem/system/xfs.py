"""A loop-mounted XFS image with reflink, for tests and benchmarks of copy-on-write
branching (root only).

    with xfs_reflink_mount(size_gb=4) as mnt:
        ...   # mnt is a 0711 directory on a reflink-capable filesystem
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def xfs_available() -> str | None:
    """``None`` when loop-mounted XFS can be used here, else the reason it cannot."""
    if os.geteuid() != 0:
        return "needs root to mount a loop image"
    if shutil.which("mkfs.xfs") is None:
        return "mkfs.xfs is missing (apt-get install xfsprogs)"
    return None


@contextmanager
def xfs_reflink_mount(size_gb: float = 4, base: Path = Path("/tmp")) -> Iterator[Path]:
    reason = xfs_available()
    if reason:
        raise RuntimeError(reason)
    work = Path(tempfile.mkdtemp(prefix="phloem-xfs-", dir=base))
    image, mnt = work / "fs.img", work / "mnt"
    os.chmod(work, 0o711)
    mnt.mkdir()
    with open(image, "wb") as f:
        f.truncate(int(size_gb * 1024**3))
    subprocess.run(["mkfs.xfs", "-q", "-m", "reflink=1", str(image)], check=True)
    subprocess.run(["mount", "-o", "loop", str(image), str(mnt)], check=True)
    try:
        os.chmod(mnt, 0o711)
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)
        shutil.rmtree(work, ignore_errors=True)
