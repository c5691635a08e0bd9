"""Memory limits with cgroup v2 (``memory.max``, ``memory.swap.max = 0``)."""

from __future__ import annotations

import contextlib
from pathlib import Path

from phloem.supervisor.memory._cgroup import CgroupSlot, writable_dir


class CgroupV2Limiter:
    name = "cgroup-v2"

    def __init__(self, base: Path) -> None:
        self.base = base

    @classmethod
    def probe(cls, root: str) -> CgroupV2Limiter | None:
        top = Path(root)
        controllers = top / "cgroup.controllers"
        if not controllers.exists() or "memory" not in controllers.read_text().split():
            return None
        base = top / "phloem"
        try:
            base.mkdir(exist_ok=True)
            (base / "cgroup.subtree_control").write_text("+memory")
        except OSError:
            return None
        return cls(base) if writable_dir(base) else None

    def prepare(self, isolate_id: str, limit_bytes: int) -> CgroupSlot:
        slot = CgroupSlot(self.base / isolate_id, "memory.max", limit_bytes,
                          "memory.events", "oom_kill")
        swap = slot.directory / "memory.swap.max"
        if swap.exists():
            with contextlib.suppress(OSError):
                swap.write_text("0")
        return slot
