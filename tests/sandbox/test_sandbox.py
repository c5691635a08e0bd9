"""Isolates in their sandboxes, seen from inside (a probe app) and from outside: what a
function can see, what it can do, and that nothing it supplies runs with privileges.

The probe apps and the attacks are the ones of the sandbox issue: another function's code,
requirements, packages, ``/tmp`` and ``/proc``; the data dir; ``LD_PRELOAD``,
``NODE_OPTIONS`` and ``PYTHONSTARTUP`` in the function's env.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from phloem import sandbox
from phloem.testing import PlatformProcess, host_of, platform_process

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or sandbox.available() is not None,
    reason=f"sandboxes need root: {sandbox.available()}")

APPS = Path(__file__).resolve().parent.parent / "apps"
PROBE = APPS / "sandboxprobe"
HELLO = Path(__file__).resolve().parents[2] / "examples" / "hello-python"


def get(p: PlatformProcess, fn: dict[str, Any], route: str, **params: str | list[str]) -> Any:
    with p.gateway(host_of(fn["invocation_url"])) as gw:
        resp = gw.get(route, params=params)
        assert resp.status_code == 200, (resp.text, logs(p, fn["slug"]))
        return resp.json()


def logs(p: PlatformProcess, slug: str) -> str:
    return p.cli("functions", "logs", slug, "--lines", "2000").stdout


def host_pids(p: PlatformProcess, slug: str) -> list[int]:
    return [int(i["pid"]) for i in p.cli_json("status")["isolates"] if i["function"] == slug]


def test_isolate_runs_locked_down(platform: PlatformProcess) -> None:
    fn = platform.deploy("sbxlock", PROBE)
    assert platform.cli_json("status")["components"]["supervisor"]["sandbox"] == "active"
    seen = get(platform, fn, "/")
    assert seen["uid"] >= 1_500_000
    assert seen["NoNewPrivs"] == "1"
    assert seen["Seccomp"] == "2"  # a filter is installed
    assert seen["CapBnd"] == seen["CapEff"] == seen["CapPrm"] == "0000000000000000"
    # The first process of its own PID namespace, alone in it.
    assert seen["pid"] == 1 and seen["pids"] == [1]
    assert seen["home"] == "/tmp"
    assert not {"root", "home", "work", "opt", "srv", "mnt"} & set(seen["root"])
    # Namespaces, mounts, ptrace and root are out of reach.
    assert get(platform, fn, "/attempts") == {
        "unshare_user": "EPERM", "unshare_mount": "EPERM", "mount_tmpfs": "EPERM",
        "ptrace_traceme": "EPERM", "setuid0": "EPERM"}


def test_isolates_cannot_see_each_other_or_the_data_dir(platform: PlatformProcess) -> None:
    hello = platform.deploy("sbxhello", HELLO)
    probe = platform.deploy("sbxspy", PROBE)
    other = platform.deploy("sbxother", PROBE)
    dd = platform.data_dir
    assert get(platform, other, "/write", path="/tmp/other-secret") == "written"
    with platform.gateway(host_of(hello["invocation_url"])) as gw:
        assert gw.get("/").status_code == 200  # an isolate of it is running
    [hello_pid] = host_pids(platform, "sbxhello")
    hello_dep = dd / "deployments" / hello["deployment_id"]
    envs = [str(e) for e in (dd / "envs" / "python").iterdir() if not e.name.startswith(".")]
    assert envs, "hello-python's requirements made no environment"
    paths = [str(hello_dep / "app" / "main.py"), str(hello_dep / "app" / "requirements.txt"),
             str(dd / "deployments" / other["deployment_id"]), *envs,
             "/tmp/other-secret", f"/proc/{hello_pid}/environ",
             str(dd / "credentials.json"), str(dd / "secrets"), str(dd / "system"),
             str(dd / "artifacts"), str(dd / "logs"), str(dd / "run"), str(dd / "homes")]
    seen = get(platform, probe, "/probe", path=paths)
    assert set(seen.values()) == {"missing"}, seen
    own = dd / "deployments" / probe["deployment_id"] / "app" / "main.py"
    assert get(platform, probe, "/probe", path=str(own)) == {str(own): "readable"}
    # Its code is read-only, its /tmp is private and bounded.
    assert get(platform, probe, "/write", path=str(own)) in ("EROFS", "EACCES")
    big = str(257 * 2**20)  # the default /tmp is 256 MiB
    assert get(platform, probe, "/write", path="/tmp/big", bytes=big) == "ENOSPC"


def test_tmp_size_and_descriptors_are_limits_per_function(platform: PlatformProcess) -> None:
    fn = platform.deploy("sbxsmall", PROBE, "--limit", "tmp_mb=8", "--limit", "nofile=256")
    assert get(platform, fn, "/write", path="/tmp/a", bytes=str(7 * 2**20)) == "written"
    assert get(platform, fn, "/write", path="/tmp/b", bytes=str(2 * 2**20)) == "ENOSPC"
    assert get(platform, fn, "/")["nofile"] == [256, 256]
    bad = platform.cli("functions", "deploy", "sbxsmall", "--path", str(PROBE), "--limit",
                       "tmp_mb=0", check=False)
    assert bad.returncode != 0 and "limits.tmp_mb" in bad.stderr


PRELOAD_C = r"""
#include <stdio.h>
#include <unistd.h>
__attribute__((constructor)) static void record(void) {
    char exe[512] = {0};
    readlink("/proc/self/exe", exe, sizeof exe - 1);
    dprintf(2, "HOSTILE-RECORD preload uid=%u exe=%s\n", (unsigned)getuid(), exe);
}
"""
RECORD = re.compile(r"HOSTILE-RECORD (\w+) uid=(\d+)")


def _hostile_sources(tmp: Path, base: Path) -> Path:
    shutil.copytree(base, tmp)
    (tmp / "evil.c").write_text(PRELOAD_C)
    subprocess.run(["gcc", "-shared", "-fPIC", "-o", str(tmp / "evil.so"), str(tmp / "evil.c")],
                   check=True)
    (tmp / "evil.c").unlink()
    (tmp / "startup.py").write_text(
        "import os, sys\nprint(f'HOSTILE-RECORD startup uid={os.getuid()}', file=sys.stderr)\n")
    (tmp / "evil.cjs").write_text(
        "process.stderr.write(`HOSTILE-RECORD node_options uid=${process.getuid()}\\n`);\n")
    return tmp


@pytest.mark.skipif(shutil.which("gcc") is None, reason="needs gcc to build the library")
@pytest.mark.parametrize("sandboxes", [["--sandbox"], ["--no-sandbox"]], ids=["sandbox", "none"])
def test_function_env_never_runs_as_root(tmp_path: Path, sandboxes: list[str]) -> None:
    hostile_env = ["--env", "LD_PRELOAD=./evil.so", "--env", "PYTHONSTARTUP=./startup.py",
                   "--env", "NODE_OPTIONS=--require ./evil.cjs"]
    python_app = _hostile_sources(tmp_path / "py", PROBE)
    node_app = _hostile_sources(tmp_path / "node", APPS / "node-plain")
    # Without the zygote every Python isolate is executed (as the old direct path did,
    # through root helpers); a Node function's first start is executed too, later ones
    # are activated standbys.
    with platform_process(["--no-zygote", *sandboxes]) as p:
        records: list[tuple[str, int]] = []
        for slug, app, path in (("hostilepy", python_app, "/"),
                                ("hostilenode", node_app, "/")):
            for run in range(3):
                fn = p.deploy(slug, app, *hostile_env, "--env", f"RUN={run}")
                assert fn["status"] == "ready", fn
                with p.gateway(host_of(fn["invocation_url"])) as gw:
                    assert gw.get(path).status_code == 200
            text = logs(p, slug)
            found = [(kind, int(u)) for kind, u in RECORD.findall(text)]
            assert found, f"no hostile record in the logs of {slug}:\n{text[-3000:]}"
            records += found
        assert all(uid != 0 for _, uid in records), records
        kinds = {kind for kind, _ in records}
        # The library ran (as the function), so the test would have seen a root run.
        assert "preload" in kinds and "node_options" in kinds, records
