"""Cgroups on the real cgroupfs: isolates below the platform's own group, per function,
with pids.max holding; groups removed when an isolate goes, at stop, and (a killed run's
leftovers) at the next start. Plus the v2 file layout on a fake tree, since this machine
has no v2 controllers to test with."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from phloem.supervisor.cgroups import choose_limiter, parent_name
from phloem.supervisor.cgroups.hierarchy import Mount, cgroup_mounts, own_cgroups
from phloem.supervisor.cgroups.tree import CgroupError
from phloem.supervisor.cgroups.v1 import CgroupV1Limiter, platform_shares
from phloem.supervisor.cgroups.v2 import CgroupV2Limiter
from phloem.system.limits import FunctionLimits
from phloem.system.validation import InvalidInput
from phloem.testing import PlatformProcess, host_of, platform_process, wait_for

APP = Path(__file__).parent.parent / "apps" / "cgroups"
OLD_ROOT = Path("/sys/fs/cgroup/memory/phloem")


def _cgroups_usable() -> bool:
    if os.geteuid() != 0:
        return False
    limiter = choose_limiter(parent_name=f"phloem-probe{os.getpid()}")
    limiter.close()
    return limiter.name.startswith("cgroup")


real = pytest.mark.skipif(not _cgroups_usable(), reason="needs root and a writable cgroupfs")


def deploy(p: PlatformProcess, slug: str, *limits: str) -> dict[str, Any]:
    fn = p.deploy(slug, APP, *[a for lim in limits for a in ("--limit", lim)])
    assert fn["status"] == "ready", fn
    return fn


def only_isolate(p: PlatformProcess, slug: str) -> dict[str, Any]:
    [isolate] = [i for i in p.cli_json("status")["isolates"] if i["function"] == slug]
    return isolate


def host_pids(dirs: dict[str, Path]) -> set[int]:
    return {int(pid) for d in dirs.values()
            for pid in (d / "cgroup.procs").read_text().split()}


def hierarchies_of(p: PlatformProcess) -> dict[str, str]:
    hierarchies: dict[str, str] = p.cli_json("status")["components"]["supervisor"][
        "cgroups"]["hierarchies"]
    return hierarchies


def isolate_dirs(p: PlatformProcess, cgroup_text: str,
                 hierarchies: dict[str, str] | None = None) -> dict[str, Path]:
    """Controller -> the directory of an isolate whose /proc/<pid>/cgroup is given,
    for the hierarchies the platform reports."""
    hierarchies = hierarchies or hierarchies_of(p)
    paths: dict[str, str] = {}
    for line in cgroup_text.splitlines():
        _, controllers, path = line.split(":", 2)
        for c in controllers.split(",") if controllers else ["memory", "pids", "cpu"]:
            paths.setdefault(c, path)
    out = {}
    for controller, parent in hierarchies.items():
        mount = next(m for m in cgroup_mounts() if Path(parent).is_relative_to(m.path)
                     and (m.v2 or controller in m.controllers))
        d = mount.directory(paths[controller])
        assert d is not None
        out[controller] = d
    return out


@real
def test_isolate_is_below_the_platforms_own_cgroup(platform: PlatformProcess) -> None:
    fn = deploy(platform, "cgwhere")
    with platform.gateway(host_of(fn["invocation_url"])) as gw:
        info = gw.get("/").json()
    assert platform.proc is not None
    own = own_cgroups(platform.proc.pid)
    assert own == own_cgroups()  # the platform runs in the test runner's groups
    isolate = only_isolate(platform, "cgwhere")
    mine = own_cgroups(isolate["pid"])  # the host's view (the app may be in a PID namespace)
    assert own_cgroups() != mine
    cgroups = platform.cli_json("status")["components"]["supervisor"]["cgroups"]
    assert cgroups["backend"] in ("cgroup-v1", "cgroup-v2")
    name = parent_name(platform.data_dir)
    for controller in cgroups["hierarchies"]:
        key = "" if cgroups["backend"] == "cgroup-v2" else controller
        base = own[key].rstrip("/")
        # <own>/phloem-<hash>/fn-<function id>/<isolate id>
        assert mine[key] == f"{base}/{name}/{fn['id']}/{isolate['id']}", controller
    dirs = isolate_dirs(platform, info["cgroup"])
    assert str(dirs["memory"].parent.parent) == cgroups["parent"]
    if "pids" in dirs:
        assert (dirs["pids"] / "pids.max").read_text().strip() == "512"  # the default


@real
def test_pids_max_stops_a_fork_loop(platform: PlatformProcess) -> None:
    fn = deploy(platform, "cgforks", "pids_max=32")
    with platform.gateway(host_of(fn["invocation_url"])) as gw:
        info = gw.get("/").json()
        isolate = only_isolate(platform, "cgforks")
        dirs = isolate_dirs(platform, info["cgroup"])
        assert (dirs["pids"] / "pids.max").read_text().strip() == "32"
        result = gw.get("/spawn", params={"n": "100"}).json()
        # Threads count too: fewer than 32 sleeps start, then fork fails with EAGAIN.
        assert result["started"] < 32, result
        assert result["error"] is not None
        assert "Resource temporarily unavailable" in result["error"], result
        after = gw.get("/")
        assert after.status_code == 200
        assert only_isolate(platform, "cgforks")["id"] == isolate["id"]  # still the same


@real
def test_isolate_groups_are_removed_when_it_stops(platform: PlatformProcess) -> None:
    fn = deploy(platform, "cgidle", "idle_timeout_s=5")
    hierarchies = hierarchies_of(platform)  # before: the isolate goes 5 s after requests
    with platform.gateway(host_of(fn["invocation_url"])) as gw:
        info = gw.get("/").json()
        gw.get("/leave")  # a child the isolate leaves running
        dirs = isolate_dirs(platform, info["cgroup"], hierarchies)
        pids = host_pids(dirs)
    assert len(pids) >= 2
    wait_for(lambda: not any(d.exists() for d in dirs.values()), 30,
             "the isolate's groups to be removed")
    # Its function's groups went with its last isolate; the child was killed.
    assert not any(d.parent.exists() for d in dirs.values())
    wait_for(lambda: not any(_alive(pid) for pid in pids), 10,
             "the isolate's processes to be gone")


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _orphan_in(group: Path) -> int:
    """A process whose parent is gone (adopted by pid 1), in ``group``."""
    out = subprocess.run(
        ["sh", "-c", f'echo $$ > {group}/cgroup.procs; sleep 600 >/dev/null 2>&1 & '
         'echo $!'], capture_output=True, text=True, check=True)
    return int(out.stdout)


@real
def test_killed_platforms_leftovers_are_removed_at_next_start() -> None:
    # Groups as versions before the platform parent left them: an orphaned isolate (and
    # a live one of another platform, which must survive).
    old = OLD_ROOT / f"iso-test{os.getpid()}"
    live_group = OLD_ROOT / f"iso-live{os.getpid()}"
    old.mkdir(parents=True, exist_ok=True)
    live_group.mkdir(exist_ok=True)
    orphan = _orphan_in(old)
    long_ago = time.time() - 3600
    for d in (old, live_group):
        os.utime(d, (long_ago, long_ago))
    live = subprocess.Popen(["sh", "-c", f"echo $$ > {live_group}/cgroup.procs; "
                             "exec sleep 600"])
    wait_for(lambda: str(live.pid) in (live_group / "cgroup.procs").read_text(), 10,
             "the live process to join its group")
    try:
        with platform_process() as p:
            fn = deploy(p, "cgkilled")
            with p.gateway(host_of(fn["invocation_url"])) as gw:
                info = gw.get("/").json()
                gw.get("/leave")
            dirs = isolate_dirs(p, info["cgroup"])
            pids = host_pids(dirs)
            parents = {c: Path(h) for c, h in p.cli_json("status")["components"][
                "supervisor"]["cgroups"]["hierarchies"].items()}
            assert p.proc is not None
            p.proc.send_signal(signal.SIGKILL)
            p.proc.wait(30)
            # The groups stay (without a sandbox, with the detached child in them; in a
            # sandbox's PID namespace the child died with the isolate).
            assert all(d.is_dir() for d in dirs.values())

            p.launch()
            p.wait_ready()
            assert not any(_alive(pid) for pid in pids)
            assert not any(d.exists() for d in dirs.values())
            assert not _alive(orphan) and not old.exists()
            assert _alive(live.pid) and live_group.is_dir()

            p.stop()
            assert not any(d.exists() for d in parents.values())  # removed at stop
    finally:
        live.kill()
        live.wait()
        for d in (old, live_group):
            wait_for(lambda d=d: _rmdir(d), 10, f"{d} to be removed")  # type: ignore[misc]


def _rmdir(d: Path) -> bool:
    try:
        d.rmdir()
    except FileNotFoundError:
        return True
    except OSError:
        return False
    return True


# -- without a platform ----------------------------------------------------------------

def test_limits_name_the_field_and_rule() -> None:
    assert FunctionLimits().pids_max == 512 and FunctionLimits().cpu_millicores == 0
    assert FunctionLimits().merged({"cpu_millicores": "0", "pids_max": "64"}).pids_max == 64
    with pytest.raises(InvalidInput, match=r"limits.pids_max: must be between 16 and 65536"):
        FunctionLimits().merged({"pids_max": 8})
    with pytest.raises(InvalidInput, match=r"limits.cpu_millicores: must be 0 \(no limit\) "
                                           r"or between 10 and 1000000"):
        FunctionLimits().merged({"cpu_millicores": 5})


def test_v2_layout_on_a_fake_tree(tmp_path: Path) -> None:
    """The files a v2 limiter writes (no v2 controllers on this machine to test with)."""
    own = tmp_path / "service"
    own.mkdir()
    (own / "cgroup.controllers").write_text("cpuset cpu io memory pids\n")
    (own / "cgroup.subtree_control").write_text("")
    (own / "cgroup.procs").write_text("")
    mount = Mount(tmp_path, "/", True, frozenset({"rw"}))
    limiter = CgroupV2Limiter.probe("phloem-test", mounts=[mount], own={"": "/service"})
    assert limiter is not None
    parent = own / "phloem-test"
    assert (own / "cgroup.subtree_control").read_text() == "+memory +pids +cpu"
    assert (parent / "cgroup.subtree_control").read_text() == "+memory +pids +cpu"
    slot = limiter.prepare("iso-1", 64 * 2**20, function_id="fn-abc",
                           limits=FunctionLimits(pids_max=40, cpu_millicores=250))
    leaf = parent / "fn-abc" / "iso-1"
    assert slot.procs_files == [str(leaf / "cgroup.procs")]
    assert (parent / "fn-abc" / "cgroup.subtree_control").read_text() == "+memory +pids +cpu"
    assert (leaf / "memory.max").read_text() == str(64 * 2**20)
    assert (leaf / "pids.max").read_text() == "40"
    assert (leaf / "cpu.max").read_text() == "25000 100000"
    unlimited = limiter.prepare("iso-2", 2**30, function_id="fn-abc")
    assert (Path(unlimited.procs_files[0]).parent / "cpu.max").read_text() == "max 100000"
    assert limiter.describe()["parent"] == str(parent)
    with pytest.raises(CgroupError, match="cannot name a cgroup"):
        limiter.prepare("iso-3", 2**30, function_id="../escape")


def test_v1_platform_parent_weighs_a_process_per_cpu(tmp_path: Path) -> None:
    """All isolates together get a plain process's cpu.shares per CPU (at the default
    1024 they weighed as one process; see platform_shares), set again when the parent is
    made anew; isolate groups keep the default."""
    mounts = []
    for controller in ("memory", "pids", "cpu"):
        (tmp_path / controller).mkdir()
        mounts.append(Mount(tmp_path / controller, "/", False, frozenset({controller})))
    own = {"memory": "/", "pids": "/", "cpu": "/"}
    limiter = CgroupV1Limiter.probe("phloem-test", mounts=mounts, own=own)
    assert limiter is not None
    parent = tmp_path / "cpu" / "phloem-test"
    assert (parent / "cpu.shares").read_text() == str(1024 * (os.cpu_count() or 1))
    assert platform_shares(4) == 4096
    assert not (tmp_path / "memory" / "phloem-test" / "cpu.shares").exists()
    (parent / "cpu.shares").unlink()
    parent.rmdir()
    limiter.prepare("iso-1", 64 * 2**20, function_id="fn-abc")
    assert (parent / "cpu.shares").read_text() == str(platform_shares())
    assert not (parent / "fn-abc" / "cpu.shares").exists()
    assert (parent / "fn-abc" / "iso-1" / "cpu.cfs_quota_us").read_text() == "-1"


def test_v2_without_memory_is_not_used(tmp_path: Path) -> None:
    (tmp_path / "cgroup.controllers").write_text("hugetlb\n")
    mount = Mount(tmp_path, "/", True, frozenset({"rw"}))
    assert CgroupV2Limiter.probe("phloem-test", mounts=[mount], own={"": "/"}) is None


@real
def test_wrap_joins_every_hierarchy() -> None:
    limiter = choose_limiter(parent_name=f"phloem-wrap{os.getpid()}")
    try:
        slot = limiter.prepare("iso-wrap", 64 * 2**20, function_id="fn-wrap")
        out = subprocess.run(slot.wrap(["cat", "/proc/self/cgroup"]), capture_output=True,
                             text=True, check=True).stdout
        joined = [line for line in out.splitlines() if "/fn-wrap/iso-wrap" in line]
        assert len(joined) == len(set(limiter.describe()["hierarchies"].values())), out
        cpu = limiter.describe()["hierarchies"].get("cpu")
        if limiter.name == "cgroup-v1" and cpu:
            assert Path(cpu, "cpu.shares").read_text().strip() == str(platform_shares())
        assert slot.finished() is None
        assert not any(Path(f).parent.exists() for f in slot.procs_files)
    finally:
        assert limiter.close() == []
