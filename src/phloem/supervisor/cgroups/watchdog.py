"""The fallback: poll an isolate's resident set size and SIGKILL it over the limit."""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from pathlib import Path
from typing import Any

from phloem.system.limits import FunctionLimits


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


class WatchdogSlot:
    interval_s = 0.25

    def __init__(self, limit_bytes: int) -> None:
        self.limit_bytes = limit_bytes
        self.killed = False
        self._stop = threading.Event()

    @property
    def procs_files(self) -> list[str]:
        return []  # no groups to join

    def wrap(self, command: list[str]) -> list[str]:
        return command

    def started(self, pid: int) -> None:
        threading.Thread(target=self._watch, args=(pid,), daemon=True,
                         name=f"rss-watchdog-{pid}").start()

    def _watch(self, pid: int) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                if rss_bytes(pid) > self.limit_bytes:
                    self.killed = True
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                    return
            except (OSError, ValueError):
                return

    def finished(self) -> str | None:
        self._stop.set()
        if self.killed:
            return f"memory limit of {self.limit_bytes // 2**20} MiB exceeded (RSS watchdog)"
        return None


class WatchdogLimiter:
    """No groups: memory only, by polling; no process or CPU limit."""

    name = "rss-watchdog"

    def prepare(self, isolate_id: str, limit_bytes: int, *, function_id: str | None = None,
                limits: FunctionLimits | None = None) -> WatchdogSlot:
        return WatchdogSlot(limit_bytes)

    def describe(self) -> dict[str, Any]:
        return {"backend": self.name, "parent": None, "hierarchies": {}}

    def sweep(self, record: Path | None = None, old_roots: list[Path] | None = None
              ) -> list[Path]:
        return []

    def close(self, record: Path | None = None) -> list[Path]:
        return []
