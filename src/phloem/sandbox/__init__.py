"""Sandboxes for function code and builds: one process tree per isolate or build step in
its own mount, PID and IPC namespaces, with a minimal read-only root, a private ``/tmp``,
no capabilities, ``no_new_privs``, a seccomp filter and a descriptor limit, running as an
unprivileged uid. Needs root (the platform's default as a server); elsewhere everything
already runs as the one user and ``available()`` says why there is no sandbox.

Executed processes go through the launcher (``phloem.sandbox.launch``):

    job = Job(argv=[python, "-m", "app"], env=env, cwd=app_dir, uid=uid, gid=gid,
              sandbox=SandboxSpec(root_dir=..., ro=[app_dir], cwd=app_dir))
    argv, job_fd = job.launcher()      # run argv with pass_fds=(job_fd, *job.keep_fds)

A zygote's forked child enters the same sandbox in-process (``root.enter`` and
``lockdown.lock_down``).
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from phloem.sandbox.lockdown import Credentials
from phloem.sandbox.root import SandboxSpec

LAUNCHER = Path(__file__).with_name("launch.py")
#: Exit code of a launcher (or zygote child) that could not set the sandbox up.
SETUP_FAILED = 71


def available() -> str | None:
    """``None`` when sandboxes can be made here, else why not. The first call as root
    makes one (a container without ``CAP_SYS_ADMIN`` or a kernel without the features
    would refuse) and remembers the answer."""
    if sys.platform != "linux":
        return "sandboxes need Linux"
    if os.geteuid() != 0:
        return "not running as root (everything runs as the current user)"
    return _probe()


@functools.cache
def _probe() -> str | None:
    root = tempfile.mkdtemp(prefix="phloem-sandbox-probe-")
    try:
        job = Job(argv=["/bin/true"], env={}, cwd="/", uid=65534, gid=65534,
                  sandbox=SandboxSpec(root_dir=root, tmp_mb=1))
        argv, fd = job.launcher()
        try:
            proc = subprocess.run(argv, pass_fds=(fd,), env=LAUNCHER_ENV, cwd="/",
                                  capture_output=True, text=True, timeout=30, check=False)
        finally:
            os.close(fd)
    except (OSError, subprocess.SubprocessError) as exc:
        return f"the sandbox launcher could not run: {exc}"
    finally:
        os.rmdir(root)
    if proc.returncode != 0:
        why = (proc.stderr.strip() or f"exit code {proc.returncode}")[-300:]
        return f"this kernel or container refused one: {why}"
    return None


@dataclass(frozen=True)
class Job:
    """One command for the launcher."""

    argv: list[str]
    env: dict[str, str]
    cwd: str
    uid: int | None
    gid: int | None
    sandbox: SandboxSpec | None
    #: cgroup.procs files the process joins before it starts.
    procs_files: list[str] = field(default_factory=list)
    #: Descriptors that stay open in the process (listening socket, status pipe).
    keep_fds: list[int] = field(default_factory=list)
    nofile: int | None = None
    seccomp: bool = True
    #: Node standby: stays root (with only ``keep_caps``) until activated through stdin.
    standby: bool = False
    keep_caps: tuple[int, ...] = ()

    def payload(self) -> bytes:
        return json.dumps({
            "argv": self.argv, "env": self.env, "cwd": self.cwd, "uid": self.uid,
            "gid": self.gid, "sandbox": self.sandbox.to_json() if self.sandbox else None,
            "procs_files": self.procs_files, "keep_fds": self.keep_fds,
            "nofile": self.nofile, "seccomp": self.seccomp, "standby": self.standby,
            "keep_caps": list(self.keep_caps), "parent_pid": os.getpid(),
        }).encode()

    def launcher(self, python: str | None = None) -> tuple[list[str], int]:
        """The launcher's argv and the descriptor holding this job (the caller passes it
        to the process and closes it after the spawn)."""
        fd = os.memfd_create("phloem-sandbox-job", 0)
        try:
            os.write(fd, self.payload())
            os.lseek(fd, 0, os.SEEK_SET)
        except BaseException:
            os.close(fd)
            raise
        return [python or sys.executable, "-I", "-S", str(LAUNCHER), "--job-fd", str(fd)], fd


#: The environment of the launcher itself (nothing of the function's).
LAUNCHER_ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8"}

__all__ = ["LAUNCHER_ENV", "SETUP_FAILED", "Credentials", "Job", "SandboxSpec", "available"]
