"""Branching on a copy-on-write filesystem really shares blocks with the parent."""

from __future__ import annotations

import subprocess
from pathlib import Path

import psycopg
import pytest

from phloem.testing import PlatformProcess, free_port
from phloem.xfs import xfs_available, xfs_reflink_mount

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
