"""Resource limits per isolate (memory, processes, CPU), behind one small interface:

* ``cgroup_v2``: a group per isolate in the unified hierarchy (``memory.max``,
  ``pids.max``, ``cpu.max``);
* ``cgroup_v1``: a group per isolate in each of the memory, pids and cpu hierarchies
  (``memory.limit_in_bytes``, ``pids.max``, ``cpu.cfs_quota_us``), as on these machines;
* ``watchdog``: where no cgroup can be made (not root, read-only cgroupfs), an RSS poll
  that SIGKILLs an isolate over its memory limit (no process or CPU limit).

The groups sit below the platform process's own cgroup (see ``tree``), so an operator
caps phloem as a whole by capping its service (contrib/systemd/phloem.service).
Never ``RLIMIT_AS``: it counts reserved address space, which breaks Node's WebAssembly.

    limiter = choose_limiter(parent_name="phloem-1a2b3c4d")
    limiter.sweep(record)                             # at start: a killed run's leftovers
    slot = limiter.prepare(isolate_id, limit_bytes,   # before spawn
                           function_id=spec.function_id, limits=spec.limits)
    cmd = slot.wrap(cmd)            # joins every group before exec (or: slot.procs_files)
    slot.started(pid); ...; reason = slot.finished()  # "memory limit" if it was OOM-killed
    limiter.close(record)                             # at stop
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Protocol

from phloem.supervisor.cgroups.slot import CgroupSlot
from phloem.supervisor.cgroups.tree import CgroupError, CgroupLimiter
from phloem.supervisor.cgroups.v1 import CgroupV1Limiter
from phloem.supervisor.cgroups.v2 import CgroupV2Limiter
from phloem.supervisor.cgroups.watchdog import WatchdogLimiter, WatchdogSlot
from phloem.system.limits import FunctionLimits


class MemorySlot(Protocol):
    @property
    def procs_files(self) -> list[str]:
        """Every ``cgroup.procs`` a process writes its own pid into to join the groups
        (empty for the watchdog)."""
        ...

    def wrap(self, command: list[str]) -> list[str]:
        """The command, made to join the limits before it execs (run as root)."""
        ...

    def started(self, pid: int) -> None: ...

    def finished(self) -> str | None:
        """Clean up; say why the process died if the limit killed it."""
        ...


class MemoryLimiter(Protocol):
    name: str

    def prepare(self, isolate_id: str, limit_bytes: int, *, function_id: str | None = None,
                limits: FunctionLimits | None = None) -> MemorySlot: ...


def parent_name(data_dir: Path) -> str:
    """The platform parent's name: one per data dir, so two platforms never share one."""
    digest = hashlib.sha256(str(data_dir.absolute()).encode()).hexdigest()
    return f"phloem-{digest[:8]}"


#: Where versions before the platform parent kept their groups (shared by all platforms).
def old_roots(root: str = "/sys/fs/cgroup") -> list[Path]:
    return [Path(root) / "memory" / "phloem", Path(root) / "phloem",
            Path(root) / "unified" / "phloem"]


def choose_limiter(root: str = "/sys/fs/cgroup", *, parent_name: str = "phloem-standalone",
                   defaults: FunctionLimits | None = None
                   ) -> CgroupLimiter | WatchdogLimiter:
    """The best limiter this process can use: cgroup v2, v1, else the RSS watchdog.
    ``root`` is kept for callers of old; the hierarchies come from /proc/self/mountinfo."""
    del root
    if os.geteuid() == 0:
        for probe in (CgroupV2Limiter.probe, CgroupV1Limiter.probe):
            found = probe(parent_name, defaults=defaults)
            if found is not None:
                return found
    return WatchdogLimiter()


class FunctionLimiter:
    """``limiter`` for one function: isolates go below its group with its limits, for
    callers that pass only the isolate id and memory limit."""

    def __init__(self, limiter: MemoryLimiter, function_id: str,
                 limits: FunctionLimits) -> None:
        self.limiter = limiter
        self.name = limiter.name
        self.function_id = function_id
        self.limits = limits

    def prepare(self, isolate_id: str, limit_bytes: int, *, function_id: str | None = None,
                limits: FunctionLimits | None = None) -> MemorySlot:
        return self.limiter.prepare(isolate_id, limit_bytes,
                                    function_id=function_id or self.function_id,
                                    limits=limits or self.limits)


__all__ = ["CgroupError", "CgroupLimiter", "CgroupSlot", "CgroupV1Limiter", "CgroupV2Limiter",
           "FunctionLimiter", "MemoryLimiter", "MemorySlot", "WatchdogLimiter", "WatchdogSlot",
           "choose_limiter", "old_roots", "parent_name"]
