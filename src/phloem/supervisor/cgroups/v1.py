"""cgroup v1: one tree per controller hierarchy (memory, and pids and cpu where mounted);
an isolate joins the group of each.

* memory: ``memory.limit_in_bytes`` (and ``memory.memsw.limit_in_bytes``: swap would hide
  the limit), OOM kills counted in ``memory.oom_control``;
* pids: ``pids.max``;
* cpu: ``cpu.cfs_quota_us`` per ``cpu.cfs_period_us`` (-1: no quota); the platform
  parent's ``cpu.shares`` is a plain process's weight per CPU (:func:`platform_shares`).
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from phloem.supervisor.cgroups.hierarchy import Mount, cgroup_mounts, own_cgroups, writable_dir
from phloem.supervisor.cgroups.tree import CgroupError, CgroupLimiter, write
from phloem.system.limits import FunctionLimits

CONTROLLERS = ("memory", "pids", "cpu")
CFS_PERIOD_US = 100_000
#: ``cpu.shares`` of a group (and of each plain process) unless set.
DEFAULT_SHARES = 1024


def platform_shares(cpus: int | None = None) -> int:
    """The platform parent's ``cpu.shares``: a plain process's weight per CPU.

    A v1 group competes with the other tasks of its parent (here: every process and
    autogroup of the machine) as one task of its ``cpu.shares``, so at the default all
    isolates of the platform together weighed as much as a single process. Under
    contention a Node isolate then served 0.5x the rate of the same host.mjs run as a plain
    process behind the same nginx (bench/node_paths.py); at this weight the isolates
    together can claim each CPU as a busy plain process could.
    """
    return DEFAULT_SHARES * max(1, cpus if cpus is not None else os.cpu_count() or 1)


def cpu_quota_us(millicores: int, period_us: int = CFS_PERIOD_US) -> int:
    """The CFS quota for ``millicores`` thousandths of a CPU; -1 for none."""
    return -1 if millicores <= 0 else max(1000, millicores * period_us // 1000)


class CgroupV1Limiter(CgroupLimiter):
    name = "cgroup-v1"
    oom_file = "memory.oom_control"

    def _made_inner(self, directory: Path) -> None:
        if directory == self.parents.get("cpu"):
            # Not a limit: an isolate still runs where the weight cannot be set.
            with contextlib.suppress(CgroupError):
                write(directory / "cpu.shares", str(platform_shares()))

    def _limit_files(self, limit_bytes: int, limits: FunctionLimits
                     ) -> dict[str, dict[str, str]]:
        return {"memory": {"memory.limit_in_bytes": str(limit_bytes),
                           "memory.memsw.limit_in_bytes": str(limit_bytes)},
                "pids": {"pids.max": str(limits.pids_max)},
                "cpu": {"cpu.cfs_period_us": str(CFS_PERIOD_US),
                        "cpu.cfs_quota_us": str(cpu_quota_us(limits.cpu_millicores))}}

    @classmethod
    def probe(cls, parent_name: str, *, mounts: list[Mount] | None = None,
              own: dict[str, str] | None = None,
              defaults: FunctionLimits | None = None) -> CgroupV1Limiter | None:
        """The limiter with a parent named ``parent_name`` below this process's own group
        in each v1 hierarchy that has one of CONTROLLERS; ``None`` without memory."""
        mounts = cgroup_mounts() if mounts is None else mounts
        own = own_cgroups() if own is None else own
        parents: dict[str, Path] = {}
        owns: dict[str, Path] = {}
        for controller in CONTROLLERS:
            for mount in mounts:
                if mount.v2 or controller not in mount.controllers or controller not in own:
                    continue
                here = mount.directory(own[controller])
                if here is None or not here.is_dir():
                    continue
                parent = here / parent_name
                try:
                    parent.mkdir(exist_ok=True)
                except OSError:
                    continue
                if writable_dir(parent):
                    parents[controller], owns[controller] = parent, here
                    break
        if "memory" not in parents:
            for parent in parents.values():
                parent.rmdir()
            return None
        limiter = cls(parents, own=owns, defaults=defaults)
        if "cpu" in parents:
            limiter._made_inner(parents["cpu"])
        return limiter
