"""The last steps before a sandboxed process runs anything it was given: capabilities out
of the bounding set, the function's (or the build's) uid and gid for good, checked,
``no_new_privs``, the seccomp filter, and a descriptor limit.

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
