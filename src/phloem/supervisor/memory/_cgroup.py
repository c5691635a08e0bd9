"""What the v1 and v2 cgroup limiters share: a directory per isolate that the process
joins itself (``echo $$ > cgroup.procs``) before exec'ing the real command, so not a
byte is allocated outside the limit."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

JOIN_AND_EXEC = 'echo $$ > "$1" && shift && exec "$@"'


class CgroupSlot:
    def __init__(self, directory: Path, limit_file: str, limit_bytes: int,
                 oom_file: str, oom_key: str) -> None:
        self.directory = directory
        self.oom_file = oom_file
        self.oom_key = oom_key
        directory.mkdir(exist_ok=True)
        (directory / limit_file).write_text(str(limit_bytes))
        self.limit_bytes = limit_bytes

    def wrap(self, command: list[str]) -> list[str]:
        return ["/bin/sh", "-c", JOIN_AND_EXEC, "sh", str(self.directory / "cgroup.procs"),
                *command]

    def started(self, pid: int) -> None:
        pass

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
        with contextlib.suppress(OSError):
            os.rmdir(self.directory)
        if killed:
            return f"memory limit of {self.limit_bytes // 2**20} MiB exceeded"
        return None


def writable_dir(path: Path) -> bool:
    """Can we make child cgroups under ``path``?"""
    probe = path / f"probe-{os.getpid()}"
    try:
        probe.mkdir(exist_ok=True)
        os.rmdir(probe)
        return True
    except OSError:
        return False
