"""Memory limits per isolate, behind one small interface:

* ``cgroup_v2``: a child cgroup with ``memory.max`` (unified hierarchy);
* ``cgroup_v1``: a child of the v1 memory controller with ``memory.limit_in_bytes``
  (as on these machines);
* ``watchdog``: where no cgroup can be made (not root, read-only cgroupfs), an RSS poll
  that SIGKILLs an isolate over its limit.

Never ``RLIMIT_AS``: it counts reserved address space, which breaks Node's WebAssembly.

    limiter = choose_limiter()
    slot = limiter.prepare(isolate_id, limit_bytes)   # before spawn
    cmd = slot.wrap(cmd)                              # joins the cgroup before exec
    slot.started(pid); ...; reason = slot.finished()  # "memory limit" if it was OOM-killed
"""

from __future__ import annotations

import os
from typing import Protocol

from phloem.supervisor.memory.cgroup_v1 import CgroupV1Limiter
from phloem.supervisor.memory.cgroup_v2 import CgroupV2Limiter
from phloem.supervisor.memory.watchdog import WatchdogLimiter


class MemorySlot(Protocol):
    def wrap(self, command: list[str]) -> list[str]:
        """The command, made to join the limit before it execs (run as root)."""
        ...

    def started(self, pid: int) -> None: ...

    def finished(self) -> str | None:
        """Clean up; say why the process died if the limit killed it."""
        ...


class MemoryLimiter(Protocol):
    name: str

    def prepare(self, isolate_id: str, limit_bytes: int) -> MemorySlot: ...


def choose_limiter(root: str = "/sys/fs/cgroup") -> MemoryLimiter:
    if os.geteuid() == 0:
        for candidate in (CgroupV2Limiter.probe(root), CgroupV1Limiter.probe(root)):
            if candidate is not None:
                return candidate
    return WatchdogLimiter()


__all__ = ["MemoryLimiter", "MemorySlot", "choose_limiter"]
