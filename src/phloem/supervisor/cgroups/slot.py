"""One isolate's cgroups: a directory per hierarchy (v1: memory, pids, cpu; v2: one) that
the process joins itself (``echo $$ > cgroup.procs`` in each) before exec'ing the real
command, so not a byte is allocated outside the limits.

    slot.procs_files      # every cgroup.procs a process writes its pid into to join
    slot.wrap(command)    # ["/bin/sh", "-c", <join all, then exec>, ...]
    slot.started(pid)     # also joins the pid everywhere (a spawner may join memory only)
    slot.finished()       # SIGKILLs what is left in the groups, removes them
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Callable
from pathlib import Path

from phloem.supervisor.cgroups.hierarchy import join, procs, remove_tree

# Joins each cgroup.procs named before "--", then execs the rest.
JOIN_AND_EXEC = ('while [ "$1" != -- ]; do echo $$ > "$1" || exit 125; shift; done; '
                 'shift; exec "$@"')


class CgroupSlot:
    def __init__(self, directories: list[Path], limit_bytes: int, oom_file: str,
                 oom_key: str, on_removed: Callable[[], None] | None = None) -> None:
        #: The memory cgroup first: ``directory`` is the one a single-path joiner uses.
        self.directories = directories
        self.directory = directories[0]
        self.limit_bytes = limit_bytes
        self.oom_file = oom_file
        self.oom_key = oom_key
        self._on_removed = on_removed

    @property
    def procs_files(self) -> list[str]:
        return [str(d / "cgroup.procs") for d in self.directories]

    def wrap(self, command: list[str]) -> list[str]:
        return ["/bin/sh", "-c", JOIN_AND_EXEC, "sh", *self.procs_files, "--", *command]

    def started(self, pid: int) -> None:
        # A safety net for spawners that join only ``directory``: the pids and CPU limits
        # apply from here on (a process already in a group is not moved).
        for procs_file in self.procs_files[1:]:
            with contextlib.suppress(ProcessLookupError, FileNotFoundError):
                join(procs_file, pid)

    def oom_kills(self) -> int:
        try:
            for line in (self.directory / self.oom_file).read_text().splitlines():
                key, _, value = line.partition(" ")
                if key == self.oom_key:
                    return int(value)
        except (OSError, ValueError):
            pass
        return 0

    def finished(self) -> str | None:
        killed = self.oom_kills() > 0
        self.remove()
        if killed:
            return f"memory limit of {self.limit_bytes // 2**20} MiB exceeded"
        return None

    def remove(self) -> None:
        """Kill what the isolate left running (its children), remove its groups; where a
        killed process has not exited yet, finish in a thread instead of blocking."""
        busy = False
        for d in self.directories:
            for pid in procs(d):
                busy = True
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            if not busy:
                try:
                    os.rmdir(d)
                except FileNotFoundError:
                    pass
                except OSError:
                    busy = True
        if busy:
            threading.Thread(target=self._remove_all, daemon=True,
                             name=f"cgroup-remove-{self.directory.name}").start()
        elif self._on_removed is not None:
            self._on_removed()

    def _remove_all(self) -> None:
        for d in self.directories:
            remove_tree(d)
        if self._on_removed is not None:
            self._on_removed()
