"""``lockdown.join_cgroups``: a process moves itself into real cgroups (the memory
controller's hierarchy, v1 or v2), wholly, whether it has one thread (v1: through
``tasks``, without the global lock's grace period) or more (through ``cgroup.procs``)."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from phloem.sandbox import LAUNCHER_ENV, Job
from phloem.sandbox.lockdown import join_cgroups
from phloem.testing import wait_for

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="moving into cgroups needs root")


def memory_hierarchy() -> Path | None:
    """Where the memory controller is mounted (a v1 ``memory`` or the v2 hierarchy)."""
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split()
        dash = fields.index("-")
        fstype, options = fields[dash + 1], fields[dash + 3]
        if fstype == "cgroup" and "memory" in options.split(","):
            return Path(fields[4])
        if fstype == "cgroup2" and "memory" in Path(fields[4], "cgroup.controllers") \
                .read_text().split():
            return Path(fields[4])
    return None


@pytest.fixture
def group() -> Iterator[Path]:
    base = memory_hierarchy()
    if base is None:
        pytest.skip("no memory cgroup hierarchy mounted")
    path = base / f"phloem-test-join-{os.getpid()}"
    try:
        path.mkdir()
    except OSError as exc:
        pytest.skip(f"cannot make a cgroup under {base}: {exc}")
    try:
        yield path
    finally:
        # Empty once the children are reaped; v1 may take a moment to let go.
        def removed() -> bool:
            with contextlib.suppress(FileNotFoundError):
                os.rmdir(path)
            return not path.exists()

        wait_for(removed, 10, f"{path} to be removable")


def memory_cgroup(proc_cgroup: str, hierarchy: Path) -> str:
    """The memory controller's cgroup path in a ``/proc/<pid>/cgroup`` text."""
    v2 = (hierarchy / "cgroup.controllers").exists()
    for line in proc_cgroup.splitlines():
        _, controllers, where = line.split(":", 2)
        if (controllers == "") if v2 else ("memory" in controllers.split(",")):
            return where
    raise AssertionError(f"no memory cgroup in {proc_cgroup!r}")


def cgroup_of(pid: int, tid: int, hierarchy: Path) -> str:
    return memory_cgroup(Path(f"/proc/{pid}/task/{tid}/cgroup").read_text(), hierarchy)


def joined_child(group: Path, threads: int) -> Iterator[int]:
    """Fork a child with ``threads`` threads that joins ``group``; yields its pid while it
    waits, then lets it exit and reaps it."""
    ready_r, ready_w = os.pipe()
    go_r, go_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover (the child)
        code = 1
        try:
            os.close(ready_r)
            os.close(go_w)
            release = threading.Event()
            extra = [threading.Thread(target=release.wait) for _ in range(threads - 1)]
            for t in extra:
                t.start()
            join_cgroups([str(group / "cgroup.procs")])
            os.write(ready_w, b"j")
            os.read(go_r, 1)
            release.set()
            code = 0
        finally:
            os._exit(code)
    os.close(ready_w)
    os.close(go_r)
    try:
        assert os.read(ready_r, 1) == b"j", "the child could not join"
        yield pid
    finally:
        os.close(go_w)
        os.close(ready_r)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0


@pytest.mark.parametrize("threads", [1, 3])
def test_the_whole_process_joins(group: Path, threads: int) -> None:
    hierarchy = group.parent
    want = "/" + group.name
    for pid in joined_child(group, threads):
        tids = [int(t) for t in os.listdir(f"/proc/{pid}/task")]
        assert len(tids) == threads
        assert {cgroup_of(pid, tid, hierarchy) for tid in tids} == {want}
        assert str(pid) in (group / "cgroup.procs").read_text().split()
        assert cgroup_of(os.getpid(), os.getpid(), hierarchy) != want  # only the child


def test_a_missing_group_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        join_cgroups([str(tmp_path / "no-such-group" / "cgroup.procs")])


def test_the_launcher_starts_its_command_in_the_cgroups(group: Path) -> None:
    """The launcher's child joins before it executes anything (and so does all it runs)."""
    script = "print(open('/proc/self/cgroup').read())"
    job = Job(argv=[sys.executable, "-c", script], env={}, cwd="/", uid=None, gid=None,
              sandbox=None, procs_files=[str(group / "cgroup.procs")])
    argv, fd = job.launcher()
    try:
        out = subprocess.run(argv, env=LAUNCHER_ENV, pass_fds=(fd,), capture_output=True,
                             text=True, timeout=60)
    finally:
        os.close(fd)
    assert out.returncode == 0, out.stderr
    assert memory_cgroup(out.stdout.strip(), group.parent) == "/" + group.name
