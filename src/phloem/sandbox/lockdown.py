"""The last steps before a sandboxed process runs anything it was given: its cgroups,
capabilities out of the bounding set, the function's (or the build's) uid and gid for
good, checked, ``no_new_privs``, the seccomp filter, and a descriptor limit.

    join_cgroups(["/sys/fs/cgroup/memory/phloem/iso-1/cgroup.procs"])   # still root
    lock_down(Credentials(uid=1_500_003, gid=1_500_003), nofile=4096)
"""

from __future__ import annotations

import os
import resource
from dataclasses import dataclass

from phloem.sandbox import _linux as k
from phloem.sandbox import seccomp

CAP_SETGID = 6
CAP_SETUID = 7


@dataclass(frozen=True)
class Credentials:
    uid: int
    gid: int


def _single_threaded() -> bool:
    try:
        return len(os.listdir("/proc/self/task")) == 1
    except OSError:
        return False


def join_cgroups(procs_files: list[str]) -> None:
    """Move the calling process into each cgroup whose ``cgroup.procs`` file is given.

    On cgroup v1 a single-threaded process (a zygote's child, the launcher's child)
    writes ``0`` to the group's ``tasks`` file instead: moving only the calling thread
    skips the kernel's global threadgroup write lock, whose RCU grace period made each
    join cost ~10-15 ms (the largest step of a cold start; 0.4 ms this way). cgroup v2
    moves threads only inside threaded subtrees and has no ``tasks``: there, and for a
    process with more threads, ``cgroup.procs`` takes the whole process.
    """
    single = _single_threaded()
    for path in procs_files:
        if single:
            try:
                fd = os.open(os.path.join(os.path.dirname(path), "tasks"),
                             os.O_WRONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                pass
            else:
                try:
                    os.write(fd, b"0")  # "the calling thread", whatever its pid here
                finally:
                    os.close(fd)
                continue
        with open(path, "w") as f:
            f.write("0")  # "the writing process"


def move_to_cgroups(pid: int, procs_files: list[str]) -> None:
    """Move another process (every thread of it) into each group of ``procs_files``: a
    Node standby, which joins its isolate's groups only once it is activated."""
    for path in procs_files:
        with open(path, "w") as f:
            f.write(str(pid))


def close_fds_except(keep: set[int]) -> None:
    """Close every descriptor above stderr but ``keep``: nothing of the parent's (a
    zygote's control socket, the platform's files) stays open in what runs next."""
    low = 3
    for fd in sorted(f for f in keep if f >= 3):
        os.closerange(low, fd)
        low = fd + 1
    os.closerange(low, max(os.sysconf("SC_OPEN_MAX"), low))


def drop_privileges(uid: int, gid: int) -> None:
    """Become ``uid``/``gid`` with no supplementary groups, and verify there is no way
    back (ids, ``setuid(0)``, capabilities)."""
    if os.geteuid() == 0:
        os.setgroups([])
        os.setresgid(gid, gid, gid)
        os.setresuid(uid, uid, uid)
    elif os.geteuid() != uid:
        raise PermissionError(f"cannot become uid {uid} without root")
    if os.getresuid() != (uid, uid, uid) or os.getresgid() != (gid, gid, gid):
        raise PermissionError(f"ids are {os.getresuid()}/{os.getresgid()}, not {uid}/{gid}")
    if uid == 0:
        return
    for regain in (os.setuid, os.setgid):
        try:
            regain(0)
        except PermissionError:
            continue
        raise PermissionError(f"{regain.__name__}(0) succeeded after dropping privileges")
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("CapPrm:", "CapEff:")) and int(line.split()[1], 16):
                raise PermissionError(f"capabilities left: {line.strip()}")


def lock_down(creds: Credentials | None, *, keep_caps: tuple[int, ...] = (),
              nofile: int | None = None, filter_syscalls: bool = True) -> None:
    """``creds`` None keeps the current ids (a Node standby, which drops them itself once
    activated and so keeps ``keep_caps`` = setuid/setgid until then)."""
    if os.geteuid() == 0:
        for cap in range(k.last_cap() + 1):
            if cap not in keep_caps:
                k.prctl(k.PR_CAPBSET_DROP, cap)
    if nofile is not None:
        # Never above the hard limit we were given (raising it may be refused even to
        # root, e.g. in a container).
        hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        if hard != resource.RLIM_INFINITY:
            nofile = min(nofile, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))
    if creds is not None:
        drop_privileges(creds.uid, creds.gid)
    k.prctl(k.PR_SET_NO_NEW_PRIVS, 1)
    if filter_syscalls:
        seccomp.install()
