"""Branching on a copy-on-write filesystem really shares blocks with the parent."""

from __future__ import annotations

import errno
import os
import subprocess
from pathlib import Path

import psycopg
import pytest

from phloem.branches.clone.reflink import ReflinkCopier, _clone_range
from phloem.system.xfs import xfs_available, xfs_reflink_mount
from phloem.testing import PlatformProcess, free_port

pytestmark = pytest.mark.skipif(xfs_available() is not None,
                                reason=xfs_available() or "")


def shared_extents(path: Path) -> int:
    out = subprocess.run(["filefrag", "-v", str(path)], capture_output=True, text=True,
                         check=True).stdout
    return sum(1 for line in out.splitlines() if "shared" in line)


def test_branch_on_xfs_uses_reflink_and_shares_extents() -> None:
    with xfs_reflink_mount(size_gb=3) as mnt:
        data_dir = mnt / "phloem"
        data_dir.mkdir(mode=0o711)
        p = PlatformProcess(data_dir, free_port(), free_port())
        p.launch()
        try:
            p.wait_ready()
            main = p.cli("connection-string", "--unpooled").stdout.strip()
            with psycopg.connect(main, autocommit=True) as conn:
                conn.execute("CREATE TABLE big AS SELECT g AS id, md5(g::text) AS v "
                             "FROM generate_series(1, 200000) g")
                relpath = conn.execute("SELECT pg_relation_filepath('big')").fetchone()
            assert relpath is not None
            child = p.cli_json("branches", "create", "--name", "cow")
            assert child["copy_method"] == "reflink"
            child_file = data_dir / "branches" / child["id"] / "pgdata" / relpath[0]
            assert child_file.stat().st_size > 10_000_000
            assert shared_extents(child_file) > 0
            child_url = p.cli("connection-string", "--branch", "cow", "--unpooled"
                              ).stdout.strip()
            with psycopg.connect(child_url) as conn:
                assert conn.execute("SELECT count(*) FROM big").fetchone() == (200000,)
        finally:
            p.cleanup()


@pytest.mark.parametrize("size", [0, 8192, 5 * 65536, 8 * 65536, 8 * 65536 + 8192])
def test_ranged_clone_copies_every_byte_and_shares_blocks(size: int) -> None:
    """Large files are cloned in ranges (so the source's lock is held briefly); the copy
    must be byte-identical whatever the size is relative to the range."""
    with xfs_reflink_mount(size_gb=1) as mnt:
        src, dst = mnt / "src", mnt / "dst"
        data = os.urandom(size)
        src.write_bytes(data)
        copier = ReflinkCopier(range_bytes=65536)
        assert copier.copy_file(src, dst) == size
        assert dst.read_bytes() == data
        if size >= 65536:
            assert shared_extents(dst) > 0


def test_clone_range_past_the_end_is_refused() -> None:
    """The ranged clone relies on the kernel refusing a range beyond the source's end
    (EINVAL) when a relation is truncated while it is copied."""
    with xfs_reflink_mount(size_gb=1) as mnt:
        src, dst = mnt / "src", mnt / "dst"
        src.write_bytes(os.urandom(65536))
        with open(src, "rb") as fsrc, open(dst, "wb") as fdst:
            with pytest.raises(OSError) as info:
                _clone_range(fsrc.fileno(), fdst.fileno(), 131072, 65536)
            assert info.value.errno == errno.EINVAL
