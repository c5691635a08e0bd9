"""Where this process sits in the cgroup hierarchies, and removing cgroup subtrees.

    own_cgroups()          # {"memory": "/process_api/ab12", "pids": "/", "": "/"}  (v1 + v2)
    cgroup_mounts()        # [Mount(path=/sys/fs/cgroup/memory, root="/", v2=False, ...)]
    remove_tree(Path("/sys/fs/cgroup/pids/phloem-1a2b3c4d"))   # SIGKILL, then rmdir

The key ``""`` is the unified (v2) hierarchy.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path


def own_cgroups(pid: int | str = "self") -> dict[str, str]:
    """Controller -> cgroup path of ``pid``, from ``/proc/<pid>/cgroup``."""
    out: dict[str, str] = {}
    try:
        text = Path(f"/proc/{pid}/cgroup").read_text()
    except OSError:
        return out
    for line in text.splitlines():
        _, controllers, path = line.split(":", 2)
        if controllers == "":
            out[""] = path
        for name in controllers.split(","):
            if name:
                out[name.removeprefix("name=")] = path
    return out


@dataclass(frozen=True)
class Mount:
    path: Path
    #: The hierarchy's directory mounted there ("/" unless a container bind-mounted less).
    root: str
    v2: bool
    controllers: frozenset[str]

    def directory(self, cgroup: str) -> Path | None:
        """The directory of ``cgroup`` (a path as in /proc/<pid>/cgroup) in this mount."""
        root = self.root.rstrip("/")
        if cgroup != root and not cgroup.startswith(root + "/"):
            return None  # not visible through this mount
        return self.path / cgroup[len(root):].lstrip("/")


def cgroup_mounts(mountinfo: str = "/proc/self/mountinfo") -> list[Mount]:
    mounts: list[Mount] = []
    try:
        lines = Path(mountinfo).read_text().splitlines()
    except OSError:
        return mounts
    for line in lines:
        fields = line.split()
        sep = fields.index("-")
        fstype, options = fields[sep + 1], fields[sep + 3]
        if fstype not in ("cgroup", "cgroup2"):
            continue
        path = Path(fields[4].replace("\\040", " "))
        mounts.append(Mount(path, fields[3], fstype == "cgroup2",
                            frozenset(options.split(","))))
    return mounts


def procs(directory: Path) -> list[int]:
    try:
        return [int(p) for p in (directory / "cgroup.procs").read_text().split()]
    except (OSError, ValueError):
        return []


def join(procs_file: str | Path, pid: int) -> None:
    """Move ``pid`` (its whole thread group) into the cgroup of ``procs_file``."""
    with open(procs_file, "w") as f:
        f.write(f"{pid}\n")


def writable_dir(path: Path) -> bool:
    """Can we make child cgroups under ``path``?"""
    probe = path / f"probe-{os.getpid()}"
    try:
        probe.mkdir(exist_ok=True)
        os.rmdir(probe)
        return True
    except OSError:
        return False


def is_orphan(pid: int) -> bool:
    """Whether ``pid`` was left behind by a dead supervisor: its parent is init (or the
    process that adopts orphans here, which is pid 1 on these machines)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return False
    return int(stat.rsplit(b") ", 1)[1].split()[1]) == 1


def _subtrees_bottom_up(top: Path) -> list[Path]:
    dirs = [Path(d) for d, _, _ in os.walk(top, topdown=False)]
    return dirs


def remove_tree(top: Path, *, kill: Callable[[int], bool] = lambda pid: True,
                timeout_s: float = 5.0) -> list[Path]:
    """SIGKILL the processes in ``top`` and its descendants for which ``kill(pid)`` is
    true, then rmdir bottom-up. Returns the directories that could not be removed (a
    process spared by ``kill``, or one that did not die within ``timeout_s``)."""
    if not top.is_dir():
        return []
    dirs = _subtrees_bottom_up(top)
    spared: set[Path] = set()
    for d in dirs:
        for pid in procs(d):
            if kill(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            else:
                spared.add(d)
    left: list[Path] = []
    deadline = time.monotonic() + timeout_s
    for d in dirs:
        if any(s.is_relative_to(d) for s in [*spared, *left]):
            left.append(d)
            continue
        while True:
            try:
                os.rmdir(d)
                break
            except FileNotFoundError:
                break
            except OSError:
                # Killed processes leave the group when they have exited.
                if time.monotonic() > deadline:
                    left.append(d)
                    break
                time.sleep(0.02)
    return left
