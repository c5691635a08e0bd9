"""Memory limits with the cgroup v1 memory controller (``memory.limit_in_bytes``)."""

from __future__ import annotations

import contextlib
from pathlib import Path

from phloem.supervisor.memory._cgroup import CgroupSlot, writable_dir


class CgroupV1Limiter:
    name = "cgroup-v1"

    def __init__(self, base: Path) -> None:
        self.base = base

    @classmethod
    def probe(cls, root: str) -> CgroupV1Limiter | None:
        controller = Path(root) / "memory"
        if not (controller / "memory.limit_in_bytes").exists():
            return None
        base = controller / "phloem"
        try:
            base.mkdir(exist_ok=True)
        except OSError:
            return None
        return cls(base) if writable_dir(base) else None

    def prepare(self, isolate_id: str, limit_bytes: int) -> CgroupSlot:
        slot = CgroupSlot(self.base / isolate_id, "memory.limit_in_bytes", limit_bytes,
                          "memory.oom_control", "oom_kill")
        # Swap would hide the limit: cap memory+swap too where the kernel accounts it.
        memsw = slot.directory / "memory.memsw.limit_in_bytes"
        if memsw.exists():
            with contextlib.suppress(OSError):
                memsw.write_text(str(limit_bytes))
        return slot
