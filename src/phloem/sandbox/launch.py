"""The sandbox launcher: a small root program between the platform and every sandboxed
process it executes (a spawned isolate, a Node standby, a build step).

The platform runs it as ``python -I -S launch.py --job-fd N`` with a clean environment and
hands it the job on a descriptor: the command, its environment and working directory, the
uid/gid it runs as, the cgroups it joins, the sandbox. Nothing the function supplied is in
the launcher's own environment, argv or working directory: the function's env reaches only
the final ``execve``, which happens after the privilege drop, so an ``LD_PRELOAD`` or a
``PYTHONSTARTUP`` in it never runs as root.

The launcher makes a PID namespace for the child (the child is its first process, so
everything the function starts dies with it), waits for it, forwards signals to it and
exits as it did. In standby mode it also takes the activation on stdin: it joins the
child to the isolate's cgroups and mounts the function's files into the child's mount
namespace (``root.inject``), then passes the rest on to the child's stdin, whose end it
keeps open as the child's lifeline.
"""

from __future__ import annotations

import json
import os
import select
import signal
import sys
from typing import Any, NoReturn

if __name__ == "__main__" and __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(
        os.path.abspath(__file__)))))

from phloem.sandbox import _linux as k
from phloem.sandbox.lockdown import (
    Credentials,
    close_fds_except,
    join_cgroups,
    lock_down,
    move_to_cgroups,
)
from phloem.sandbox.root import SandboxSpec, enter, inject

SETUP_FAILED = 71
MAX_JOB = 32 * 2**20
FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT,
             signal.SIGUSR1, signal.SIGUSR2)


def _fail(message: str) -> NoReturn:
    os.write(2, f"phloem sandbox: {message}\n".encode(errors="replace"))
    os._exit(SETUP_FAILED)


def _read_line(fd: int, limit: int = MAX_JOB) -> bytes:
    data = bytearray()
    while not data.endswith(b"\n"):
        chunk = os.read(fd, 65536)
        if not chunk:
            break
        data += chunk
        if len(data) > limit:
            raise ValueError("activation too large")
    return bytes(data)


def _child(job: dict[str, Any], launcher_pidfd: int, stdin_r: int | None) -> NoReturn:
    try:
        if stdin_r is not None:
            os.dup2(stdin_r, 0)
        join_cgroups([str(path) for path in job.get("procs_files") or []])
        sandbox = job.get("sandbox")
        if sandbox is not None:
            k.unshare(k.CLONE_NEWNS | k.CLONE_NEWIPC)
            enter(SandboxSpec.from_json(sandbox))
        os.chdir(job["cwd"])
        keep = {int(fd) for fd in job.get("keep_fds") or []}
        close_fds_except(keep | {launcher_pidfd})  # the pidfd is close-on-exec
        for fd in keep:
            os.set_inheritable(fd, True)
        creds = None if job.get("uid") is None else Credentials(int(job["uid"]),
                                                                 int(job["gid"]))
        lock_down(creds, keep_caps=tuple(job.get("keep_caps") or ()),
                  nofile=job.get("nofile"), filter_syscalls=bool(job.get("seccomp", True)))
        # After the credential change, which clears it.
        k.prctl(k.PR_SET_PDEATHSIG, signal.SIGKILL)
        if select.select([launcher_pidfd], [], [], 0)[0]:
            os._exit(1)  # the launcher died meanwhile
        argv = [str(a) for a in job["argv"]]
        env = {str(key): str(value) for key, value in job["env"].items()}
    except BaseException as exc:
        _fail(f"cannot start {job.get('argv', ['?'])[0]}: {exc}")
    try:
        os.execve(argv[0], argv, env)
    except OSError as exc:
        _fail(f"exec {argv[0]}: {exc}")


def _activate(child: int, child_pidfd: int, stdin_w: int) -> bool:
    """Standby: wait for the activation on stdin (or the child's exit); apply it."""
    ready, _, _ = select.select([0, child_pidfd], [], [])
    if child_pidfd in ready and 0 not in ready:
        return False
    line = _read_line(0)
    if not line:
        return False  # the platform dropped the standby
    activation = json.loads(line)
    move_to_cgroups(child, [str(p) for p in activation.get("procs_files") or []])
    for path in activation.get("inject") or []:
        inject(child, str(path), read_only=True)
    forward = str(activation.get("forward", "")).encode()
    view = memoryview(forward)
    while view:
        view = view[os.write(stdin_w, view):]
    return True


def main() -> NoReturn:
    args = sys.argv[1:]
    try:
        job_fd = int(args[args.index("--job-fd") + 1])
        with os.fdopen(job_fd, "rb") as f:
            job: dict[str, Any] = json.loads(f.read(MAX_JOB))
    except (ValueError, IndexError, OSError) as exc:
        _fail(f"no valid job: {exc}")
    k.prctl(k.PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != int(job.get("parent_pid", os.getppid())):
        os._exit(1)
    standby = bool(job.get("standby"))
    stdin_r = stdin_w = None
    if standby:
        stdin_r, stdin_w = os.pipe()
    launcher_pidfd = os.pidfd_open(os.getpid())
    if job.get("sandbox") is not None:
        k.unshare(k.CLONE_NEWPID)
    child = os.fork()
    if child == 0:
        if stdin_w is not None:
            os.close(stdin_w)
        _child(job, launcher_pidfd, stdin_r)
    os.close(launcher_pidfd)
    if stdin_r is not None:
        os.close(stdin_r)
    for sig in FORWARDED:
        signal.signal(sig, lambda signum, _frame: os.kill(child, signum))
    child_pidfd = os.pidfd_open(child)
    if standby:
        assert stdin_w is not None
        try:
            if not _activate(child, child_pidfd, stdin_w):
                os.kill(child, signal.SIGKILL)
        except Exception as exc:
            os.kill(child, signal.SIGKILL)
            os.waitpid(child, 0)
            _fail(f"activation failed: {exc}")
    _, status = os.waitpid(child, 0)
    code = os.waitstatus_to_exitcode(status)
    if code < 0:
        signal.signal(-code, signal.SIG_DFL)
        os.kill(os.getpid(), -code)
        code = 128 - code
    os._exit(code)


if __name__ == "__main__":
    main()
