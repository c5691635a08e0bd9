"""What a killed platform leaves, on real processes and files: a cluster whose pid file
names a recycled pid, a postmaster's orphaned backends, the start sweep's files, and
PostgreSQL tied to the process that started it."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from phloem.postgres import Cluster, install_binaries
from phloem.server.leftovers import database_processes, stop_processes, sweep
from phloem.system import procfs
from phloem.system.identity import Identity
from phloem.system.paths import DataPaths
from phloem.testing import free_port, wait_for

PASSWORD = "leftover-pw"


@pytest.fixture(scope="module")
def root() -> Iterator[Path]:
    # Not pytest's tmp_path: it sits under a 0700 directory the service user cannot cross.
    root = Path(tempfile.mkdtemp(prefix="phloem-leftovers-", dir="/tmp"))
    os.chmod(root, 0o711)
    try:
        yield root
    finally:
        stop_processes(root)
        shutil.rmtree(root, ignore_errors=True)


def make_cluster(root: Path, name: str) -> Cluster:
    owner = Identity.service("phloem")
    bins = install_binaries(root / "pginstall")
    cluster = Cluster(bins, root / name / "pgdata", socket_dir=root / "run" / name,
                      port=free_port(), owner=owner, log_file=root / name / "postgres.log")
    cluster.initialize(PASSWORD)
    return cluster


def query(cluster: Cluster) -> int:
    with cluster.connect(PASSWORD) as conn:
        row = conn.execute("SELECT 1").fetchone()
    assert row is not None
    return int(row[0])


def test_recycled_pid_and_orphaned_backends(root: Path) -> None:
    cluster = make_cluster(root, "recycled")
    cluster.start()
    try:
        with cluster.connect(PASSWORD):  # a backend that outlives its postmaster
            old = cluster.postmaster_pid()
            assert old is not None and query(cluster) == 1
            os.kill(old, signal.SIGKILL)
            wait_for(lambda: not cluster.is_running(), 10, "the killed postmaster to go")
            # Its pid file names a pid that now belongs to an unrelated process.
            stranger = subprocess.Popen(["sleep", "600"])
            try:
                lines = (cluster.pgdata / "postmaster.pid").read_text().split("\n")
                (cluster.pgdata / "postmaster.pid").write_text(
                    "\n".join([str(stranger.pid), *lines[1:]]))
                assert not cluster.is_running()  # not taken for a postmaster
                cluster.start()
                assert stranger.poll() is None  # never signalled
                assert cluster.postmaster_pid() not in (old, stranger.pid)
                assert query(cluster) == 1  # crash recovery done, serving
            finally:
                stranger.kill()
                stranger.wait()
    finally:
        cluster.stop()
    assert database_processes(root)[0].get(cluster.pgdata.resolve()) is None


TIED = """
import sys, time
from pathlib import Path
from phloem.system.identity import Identity
from phloem.postgres import Cluster
from phloem.postgres.binaries import PgBinaries
bins, pgdata, port, uid, gid = sys.argv[1:]
c = Cluster(PgBinaries(Path(bins)), Path(pgdata), socket_dir=Path(pgdata).parent / "run",
            port=int(port), owner=Identity(int(uid), int(gid)),
            log_file=Path(pgdata).parent / "postgres.log")
c.start()
print(c.postmaster_pid(), flush=True)
time.sleep(600)
"""


def test_postgres_ends_with_the_process_that_started_it(root: Path) -> None:
    cluster = make_cluster(root, "tied")
    platform = subprocess.Popen(
        [sys.executable, "-c", TIED, str(cluster.bins.bin_dir), str(cluster.pgdata),
         str(cluster.port), str(cluster.owner.uid), str(cluster.owner.gid)],
        stdout=subprocess.PIPE, text=True)
    assert platform.stdout is not None
    postmaster = int(platform.stdout.readline())
    assert procfs.exe_name(postmaster) == "postgres"
    platform.kill()  # SIGKILL: no chance to stop anything
    platform.wait()
    wait_for(lambda: not database_processes(root)[0].get(cluster.pgdata.resolve()), 30,
             "the postmaster and its children to shut down by themselves")
    # A fast shutdown, not a crash: the next start needs no recovery.
    assert not (cluster.pgdata / "postmaster.pid").exists()
    assert "database system is shut down" in cluster.log_file.read_text()


def test_sweep_removes_sockets_and_half_made_environments(tmp_path: Path) -> None:
    paths = DataPaths(tmp_path)
    sockets = paths.isolate_sockets
    sockets.mkdir(parents=True)
    (sockets / "iso-1a2b3c4d.sock").touch()
    envs = paths.envs / "python"
    (envs / "0123abcd").mkdir(parents=True)  # a finished environment stays
    (envs / ".tmp-0123abcd-k2j4_x9q" / "site").mkdir(parents=True)
    tools = paths.runtime_tools / "node"
    tools.mkdir(parents=True)
    dead = subprocess.Popen(["true"])
    dead.wait()
    (tools / f".tmp-node-{dead.pid}").mkdir()
    live = tools / f".tmp-node-{os.getppid()}"  # a live process may still be at work
    live.mkdir()
    (paths.build_python / f".tmp-{dead.pid}").mkdir(parents=True)

    found = sweep(paths)
    assert sorted(p.name for p in found.sockets) == ["iso-1a2b3c4d.sock"]
    assert os.listdir(sockets) == []
    assert os.listdir(envs) == ["0123abcd"]
    assert os.listdir(tools) == [live.name]
    assert os.listdir(paths.build_python) == []
    assert len(found.partial) == 3 and found.postgres == [] and found.pgbouncer == []
