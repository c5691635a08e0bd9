"""What the platform-kill tests share (test_platform_kill_writes.py, _deploys.py,
_branch_creates.py: one kind each, so pytest-xdist's ``--dist loadfile`` runs them on
different workers). ``Killer.kill_and_restart`` SIGKILLs ``phloem up``, starts it again and
checks that nothing of the killed run remains: no process (by pid and start time), isolate
cgroup, isolate socket file or half-made environment. Each module gets its own platform:
the module-scoped ``killer`` fixture of tests/faults/conftest.py."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from phloem.project.client import Client
from phloem.system import procfs
from phloem.testing import PlatformProcess, host_of, wait_for

#: Per kind. About 6 s a round here (a restart is 2-5 s of it on a shared 2-core
#: machine); PHLOEM_KILL_ROUNDS changes it (fewer for a quick CI, more for a soak).
ROUNDS = int(os.environ.get("PHLOEM_KILL_ROUNDS", "10"))
#: A kill's moment is random in [0, window), the window twice a warm-up's time; a round cut
#: before its answer widens it, so a machine that slowed down after the warm-up (other
#: test workers) still gets both cut and finished operations.
GROW = 1.5


# -- what a running platform has, and what a killed one may not leave ---------------------

@dataclass
class Footprint:
    #: (pid, start time) of every process of the platform: its own, its databases and
    #: poolers, isolates, builds (by data dir in command line, environment or cwd).
    processes: set[tuple[int, int]]
    sockets: set[str]
    cgroups: list[Path]


def processes_of(data_dir: Path) -> set[tuple[int, int]]:
    text = str(data_dir)
    found = set()
    for pid in procfs.pids():
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
            env = Path(f"/proc/{pid}/environ").read_bytes().decode(errors="replace")
        except OSError:
            continue
        started = procfs.start_time(pid)
        if started is not None and procfs.alive(pid) and (
                text in cmd or text in env or procfs.is_under(procfs.cwd_of(pid), data_dir)):
            found.add((pid, started))
    return found


def isolate_cgroups(parents: list[Path]) -> list[Path]:
    return [iso for parent in parents if parent.is_dir()
            for fn in parent.glob("fn-*") for iso in fn.iterdir() if iso.is_dir()]


def partial_environments(data_dir: Path) -> list[Path]:
    return [e for top in ("envs", "runtime") if (data_dir / top).is_dir()
            for d in (data_dir / top).iterdir() if d.is_dir()
            for e in d.iterdir() if e.name.startswith(".tmp-")]


def api(p: PlatformProcess) -> closing[Client]:
    return closing(Client.from_environment(p.data_dir))


class Killer:
    def __init__(self, p: PlatformProcess) -> None:
        self.p = p
        with api(p) as client:
            cgroups = client.status()["components"]["supervisor"]["cgroups"]
        self.cgroup_parents = [Path(h) for h in cgroups.get("hierarchies", {}).values()]
        self.restart_s: list[float] = []
        self.databases_down_s: list[float] = []
        self.seen = {"processes": 0, "sockets": 0, "cgroups": 0}

    def footprint(self) -> Footprint:
        sockets = self.p.data_dir / "run" / "isolates"
        return Footprint(processes_of(self.p.data_dir),
                         set(os.listdir(sockets)) if sockets.is_dir() else set(),
                         isolate_cgroups(self.cgroup_parents))

    def kill_and_restart(self, databases_die: bool = False) -> Footprint:
        """SIGKILL the platform (its footprint taken the moment before), start it again,
        and check that nothing of the killed run is left. ``databases_die``: first wait
        for its PostgreSQL and PgBouncer processes to end by themselves (they are tied to
        the platform), before any new start could stop them."""
        p = self.p
        assert p.proc is not None and p.running
        before = self.footprint()
        databases = [(pid, t) for pid, t in before.processes
                     if procfs.exe_name(pid) in ("postgres", "pgbouncer")]
        os.kill(p.proc.pid, signal.SIGKILL)
        killed = time.monotonic()
        p.proc.wait()
        if databases_die:
            assert databases
            wait_for(lambda: not any(procfs.start_time(pid) == t and procfs.alive(pid)
                                     for pid, t in databases), 30,
                     "the killed platform's databases and poolers to stop by themselves",
                     interval=0.01)
            self.databases_down_s.append(time.monotonic() - killed)
        started = time.monotonic()
        p.launch()
        p.wait_ready()
        self.restart_s.append(time.monotonic() - started)
        self.seen["processes"] += len(before.processes)
        self.seen["sockets"] += len(before.sockets)
        self.seen["cgroups"] += len(before.cgroups)
        alive = [(pid, t) for pid, t in before.processes if procfs.start_time(pid) == t
                 and procfs.alive(pid)]
        assert alive == [], [procfs.cmdline(pid) for pid, _ in alive]
        sockets = self.p.data_dir / "run" / "isolates"
        assert before.sockets.isdisjoint(os.listdir(sockets))
        assert [d for d in before.cgroups if d.exists()] == []
        assert partial_environments(p.data_dir) == []
        # Only active deployments and the replaced ones kept for rollbacks have a
        # directory (none of a build or prune cut short), and each active one has one.
        with api(p) as client:
            active: set[str | None] = set()
            kept = set()
            for b in client.list_branches():
                for f in client.list_functions(b["name"]):
                    active.add(f["deployment_id"])
                    kept |= {d["id"] for d in client.list_deployments(b["name"], f["slug"])
                             if d["state"] in ("active", "ready")}
        active.discard(None)
        assert active <= kept
        assert set(os.listdir(p.data_dir / "deployments")) == kept
        return before


def serve(p: PlatformProcess, slug: str, branch: str = "main") -> httpx.Response:
    """A request to the function, which starts an isolate (a socket file and a cgroup)."""
    with api(p) as client:
        fn = client.get_function(branch, slug)
    with p.gateway(host_of(fn["invocation_url"]), timeout=60) as gw:
        return gw.get("/")


def timed(fn: Callable[[], Any]) -> float:
    started = time.monotonic()
    fn()
    return time.monotonic() - started


def in_background(fn: Callable[[], Any]) -> tuple[threading.Thread, dict[str, Any]]:
    """Run ``fn`` in a thread; ``result["value"]`` once it returned (acknowledged), or
    ``result["error"]``."""
    result: dict[str, Any] = {}

    def run() -> None:
        try:
            result["value"] = fn()
        except Exception as exc:
            result["error"] = exc

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, result


def figure(k: Killer, what: str) -> str:
    return (f"{what}; restart {max(k.restart_s):.1f} s max; killed run's footprint "
            f"{k.seen['processes']} processes, {k.seen['sockets']} sockets, "
            f"{k.seen['cgroups']} cgroups: 0 left")
