"""cgroup v2: one tree with ``memory``, ``pids`` and ``cpu`` enabled down to the isolates
(``memory.max`` with ``memory.swap.max = 0``, ``pids.max``, ``cpu.max``).

v2 lets no process live in a group that enables controllers for its children. The
platform's own group (systemd: the service's group, delegated with ``Delegate=yes``) must
enable them for ``phloem-<hash>/``; if it holds processes (it holds this one), they are
moved into a leaf ``<own>/platform/`` first, as systemd's delegation rules ask. Where that
fails (a group we may not write), v2 is not used.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

from phloem.supervisor.cgroups.hierarchy import (
    Mount,
    cgroup_mounts,
    join,
    own_cgroups,
    procs,
    writable_dir,
)
from phloem.supervisor.cgroups.tree import CgroupError, CgroupLimiter, write
from phloem.system.limits import FunctionLimits

CONTROLLERS = ("memory", "pids", "cpu")
CPU_PERIOD_US = 100_000
PLATFORM_LEAF = "platform"


def cpu_max(millicores: int, period_us: int = CPU_PERIOD_US) -> str:
    """The ``cpu.max`` line for ``millicores`` thousandths of a CPU ("max": no quota)."""
    if millicores <= 0:
        return f"max {period_us}"
    return f"{max(1000, millicores * period_us // 1000)} {period_us}"


def _words(path: Path) -> set[str]:
    try:
        return set(path.read_text().split())
    except OSError:
        return set()


def enable(directory: Path, controllers: list[str]) -> None:
    """Enable ``controllers`` for the children of ``directory``."""
    missing = [c for c in controllers if c not in _words(directory / "cgroup.subtree_control")]
    if missing:
        write(directory / "cgroup.subtree_control", " ".join(f"+{c}" for c in missing))


class CgroupV2Limiter(CgroupLimiter):
    name = "cgroup-v2"
    oom_file = "memory.events"

    def __init__(self, parent: Path, controllers: list[str], *, own: Path | None = None,
                 defaults: FunctionLimits | None = None) -> None:
        self.controllers = controllers
        super().__init__({c: parent for c in controllers},
                         own=None if own is None else {c: own for c in controllers},
                         defaults=defaults)

    def _made_inner(self, directory: Path) -> None:
        enable(directory, self.controllers)

    def _limit_files(self, limit_bytes: int, limits: FunctionLimits
                     ) -> dict[str, dict[str, str]]:
        # Only for the controllers enabled (self.parents has no others).
        return {"memory": {"memory.max": str(limit_bytes), "memory.swap.max": "0"},
                "pids": {"pids.max": str(limits.pids_max)},
                "cpu": {"cpu.max": cpu_max(limits.cpu_millicores)}}

    @classmethod
    def probe(cls, parent_name: str, *, mounts: list[Mount] | None = None,
              own: dict[str, str] | None = None,
              defaults: FunctionLimits | None = None) -> CgroupV2Limiter | None:
        mounts = cgroup_mounts() if mounts is None else mounts
        own = own_cgroups() if own is None else own
        mount = next((m for m in mounts if m.v2), None)
        if mount is None or "" not in own:
            return None
        here = mount.directory(own[""])
        if here is None:
            return None
        controllers = [c for c in CONTROLLERS if c in _words(here / "cgroup.controllers")]
        if "memory" not in controllers:
            return None
        try:
            delegate(here, controllers)
            parent = here / parent_name
            parent.mkdir(exist_ok=True)
            enable(parent, controllers)
        except (OSError, CgroupError):  # fall back to v1 or the watchdog
            return None
        if not writable_dir(parent):
            return None
        return cls(parent, controllers, own=here, defaults=defaults)


def delegate(own: Path, controllers: list[str]) -> None:
    """Enable ``controllers`` below ``own``, first moving its processes into the leaf
    ``own/platform`` when it has any (a group with processes cannot enable them; the
    root group can)."""
    try:
        enable(own, controllers)
        return
    except CgroupError:  # EBUSY: processes inside
        if not procs(own):
            raise
    leaf = own / PLATFORM_LEAF
    leaf.mkdir(exist_ok=True)
    for pid in procs(own):
        with contextlib.suppress(ProcessLookupError):
            join(leaf / "cgroup.procs", pid)
    enable(own, controllers)
