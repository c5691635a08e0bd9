"""What a killed platform left in its data dir, found and removed by the next start.

    found = sweep(DataPaths(data_dir))    # with the data dir's lock held, before anything
    log.info("removed: %s", found.summary())

A SIGKILLed ``phloem up`` cannot clean up. Its PostgreSQL and PgBouncer processes are
tied to it (``phloem.system.lifeline``) and shut down by themselves, but that takes a moment
and a platform of an older version did not tie them; its isolates die with their
launchers and zygotes, and their cgroups go in the cgroup sweep
(``phloem.supervisor.cgroups``). This module does the rest, once, at start:

* processes: every ``postgres`` working in a cluster directory of the data dir (a
  postmaster gets a fast shutdown, then an immediate one, then SIGKILL; backends of a dead
  postmaster SIGKILL) and every ``pgbouncer`` running a config of the data dir (SIGINT,
  then SIGKILL). A pid is taken for ours only by what /proc says of it now (program and
  working directory, or config path), never because a pid file names it;
* isolate socket files in ``run/isolates`` (every isolate of the killed run is gone);
* half-made dependency environments and toolchains (``.tmp-*`` next to the finished ones,
  25 MB and more each), the pid-named ones only when that pid is no longer alive (a CLI
  process may be provisioning Node into the same directory).

The data dir's lock says no other platform works in it, so nothing found there is live.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from phloem.system import procfs
from phloem.system.paths import DataPaths

#: A leftover postmaster's fast shutdown (a checkpoint) before an immediate one.
POSTMASTER_GRACE_S = 30.0
POOLER_GRACE_S = 10.0


@dataclass
class Swept:
    """What :func:`sweep` stopped and removed."""

    postgres: list[int] = field(default_factory=list)
    pgbouncer: list[int] = field(default_factory=list)
    sockets: list[Path] = field(default_factory=list)
    partial: list[Path] = field(default_factory=list)

    def summary(self) -> str:
        return (f"{len(self.postgres)} postgres and {len(self.pgbouncer)} pgbouncer "
                f"processes, {len(self.sockets)} isolate sockets, {len(self.partial)} "
                "half-made environments")

    def __bool__(self) -> bool:
        return bool(self.postgres or self.pgbouncer or self.sockets or self.partial)


def sweep(paths: DataPaths) -> Swept:
    """Stop every process and remove every file a killed run of ``paths`` left. Blocks
    (up to ``POSTMASTER_GRACE_S`` and a few seconds for a postmaster that is shutting
    down); call it with the data dir's lock held."""
    found = Swept()
    found.postgres, found.pgbouncer = stop_processes(paths.root)
    found.sockets = _clear_dir(paths.isolate_sockets)
    for base in _staging_dirs(paths):
        found.partial += _remove_partial(base)
    return found


# -- processes ---------------------------------------------------------------------------

def database_processes(root: Path) -> tuple[dict[Path, list[int]], list[int]]:
    """In one pass over /proc: data directory -> live postgres processes working in it
    (for data dirs below ``root``), and live pgbouncer processes whose config file is
    below ``root``."""
    top = root.resolve()
    prefix = str(top) + "/"
    groups: dict[Path, list[int]] = defaultdict(list)
    bouncers = []
    for pid in procfs.pids():
        name = procfs.exe_name(pid)
        if name == "postgres":
            cwd = procfs.cwd_of(pid)
            if cwd is not None and procfs.is_under(cwd, top):
                groups[cwd].append(pid)
        elif name == "pgbouncer":
            argv = procfs.cmdline(pid) or []
            if any(a.startswith(prefix) for a in argv[1:]):
                bouncers.append(pid)
    return dict(groups), bouncers


def stop_processes(root: Path) -> tuple[list[int], list[int]]:
    """Stop every PostgreSQL and PgBouncer process of the data dir ``root``; returns
    their pids (postgres, pgbouncer)."""
    groups, bouncers = database_processes(root)
    return _stop_postgres(groups), _stop_pgbouncers(bouncers)


def _signal(pids: list[int], sig: int) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


def _wait_gone(pids: list[int], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while any(procfs.alive(p) for p in pids):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True


def _stop_postgres(groups: dict[Path, list[int]]) -> list[int]:
    everyone = [pid for pids in groups.values() for pid in pids]
    if not everyone:
        return []
    # A group's postmaster is the pid its postmaster.pid names, if that is in the group;
    # it stops its children itself. Children of a dead postmaster hold its shared memory
    # until they notice: SIGKILL ends them now.
    postmasters = []
    for pgdata, pids in groups.items():
        try:
            named = int((pgdata / "postmaster.pid").read_text().split("\n", 1)[0])
        except (OSError, ValueError):
            continue
        if named in pids:
            postmasters.append(named)
    orphans = [pid for pid in everyone if pid not in postmasters
               and procfs.ppid_of(pid) not in postmasters]
    _signal(orphans, signal.SIGKILL)
    _signal(postmasters, signal.SIGINT)
    if not _wait_gone(everyone, POSTMASTER_GRACE_S):
        _signal(postmasters, signal.SIGQUIT)
        if not _wait_gone(everyone, 5):
            _signal(everyone, signal.SIGKILL)
            _wait_gone(everyone, 5)
    return everyone


def _stop_pgbouncers(pids: list[int]) -> list[int]:
    _signal(pids, signal.SIGINT)
    if not _wait_gone(pids, POOLER_GRACE_S):
        _signal(pids, signal.SIGKILL)
        _wait_gone(pids, 5)
    return pids


# -- files -------------------------------------------------------------------------------

def _remove(entry: Path) -> None:
    if entry.is_dir() and not entry.is_symlink():
        shutil.rmtree(entry, ignore_errors=True)
    else:
        entry.unlink(missing_ok=True)


def _clear_dir(directory: Path) -> list[Path]:
    """Remove everything in ``directory`` (kept itself)."""
    removed = []
    with contextlib.suppress(FileNotFoundError):
        for entry in directory.iterdir():
            _remove(entry)
            removed.append(entry)
    return removed


def _staging_dirs(paths: DataPaths) -> list[Path]:
    """Directories where builds and provisioning stage ``.tmp-*`` before a rename:
    ``envs/<family>``, ``runtime/<family>`` (and ``runtime`` itself for build-python)."""
    out = []
    for top in (paths.envs, paths.runtime_tools):
        with contextlib.suppress(FileNotFoundError):
            out += [d for d in top.iterdir() if d.is_dir() and not d.is_symlink()]
    return out


def _pid_suffix(name: str) -> int | None:
    last = name.rsplit("-", 1)[-1]
    return int(last) if last.isdigit() else None


def _remove_partial(base: Path) -> list[Path]:
    removed = []
    for entry in base.iterdir():
        if not entry.name.startswith(".tmp-"):
            continue
        # "<base>/.tmp-<name>-<pid>" is made by a named process (provisioning, possibly
        # a CLI next to us); mkdtemp's ".tmp-<key>-<random>" only by this data dir's
        # platform, which is not running.
        pid = _pid_suffix(entry.name)
        if pid is not None and pid != os.getpid() and procfs.alive(pid):
            continue
        _remove(entry)
        removed.append(entry)
    return removed


__all__ = ["Swept", "database_processes", "stop_processes", "sweep"]
