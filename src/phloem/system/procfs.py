"""What ``/proc`` says about a process, for telling our own leftovers from recycled pids.

    for pid in pids():
        if exe_name(pid) == "postgres" and cwd_of(pid) == pgdata: ...

A pid read from a pid file may by now belong to any other process: before signalling it,
check that it is the program we think it is, working where we think it works. Every
function answers ``None`` (or ``False``) for a process that is gone, a zombie, or not
ours to inspect.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path


def pids() -> Iterator[int]:
    """Every pid in /proc except our own."""
    me = os.getpid()
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != me:
            yield int(entry)


def _stat_fields(pid: int) -> list[str] | None:
    """The fields of /proc/<pid>/stat after ``(comm)``: state, ppid, pgrp, ..."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(") ", 1)[-1].split()


def alive(pid: int) -> bool:
    """Running (not a zombie waiting for its reaper, not gone)."""
    fields = _stat_fields(pid)
    return fields is not None and fields[0] not in ("Z", "X")


def ppid_of(pid: int) -> int | None:
    fields = _stat_fields(pid)
    return int(fields[1]) if fields is not None else None


def start_time(pid: int) -> int | None:
    """Start time in clock ticks since boot: with the pid, a process's identity."""
    fields = _stat_fields(pid)
    return int(fields[19]) if fields is not None and len(fields) > 19 else None


def cmdline(pid: int) -> list[str] | None:
    """argv of a live process, or None."""
    if not alive(pid):
        return None
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    return [a.decode(errors="replace") for a in raw.split(b"\0") if a]


def exe_name(pid: int) -> str | None:
    """The file name of the program a live process runs (from /proc/<pid>/exe; argv[0]
    where that cannot be read). PostgreSQL backends rewrite their argv, not their exe."""
    if not alive(pid):
        return None
    with contextlib.suppress(OSError):
        return os.path.basename(os.readlink(f"/proc/{pid}/exe").removesuffix(" (deleted)"))
    argv = cmdline(pid)
    return os.path.basename(argv[0]) if argv else None


def cwd_of(pid: int) -> Path | None:
    if not alive(pid):
        return None
    try:
        return Path(os.readlink(f"/proc/{pid}/cwd").removesuffix(" (deleted)"))
    except OSError:
        return None


def is_under(path: Path | None, top: Path) -> bool:
    return path is not None and (path == top or path.is_relative_to(top))


__all__ = ["alive", "cmdline", "cwd_of", "exe_name", "is_under", "pids", "ppid_of",
           "start_time"]
