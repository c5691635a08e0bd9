"""A default seccomp filter for function code: a deny list in the spirit of container
runtimes' defaults, as a classic BPF program built here (no libseccomp binding needed).

Denied with ``EPERM``: what manages the machine or the kernel (mount and the new mount API,
``pivot_root``, ``chroot``, swap, reboot, kexec, modules, ``bpf``, ``perf_event_open``,
keyrings, clock setting, ``acct``, ``quotactl``, ``syslog``, ``iopl``), what inspects or
reaches into other processes (``ptrace``, ``process_vm_*``, ``kcmp``, ``pidfd_getfd``),
namespace changes (``unshare``, ``setns``, ``clone`` with a namespace flag), and the calls
behind known kernel exploits (``userfaultfd``, ``open_by_handle_at``, ``fanotify_init``).
``clone3`` and ``io_uring_*`` get ``ENOSYS``: their arguments cannot be inspected by a
filter, and glibc and libuv fall back to ``clone``/plain I/O when they are missing.
Another architecture's calls (x32 on x86_64, a foreign ``arch``) kill the process.

    install()        # after no_new_privs; lasts for the process and everything it runs
"""

from __future__ import annotations

import ctypes
import errno
import struct

from phloem.sandbox import _linux

_ARCH = {"x86_64": 0xC000003E, "aarch64": 0xC00000B7}
_X32_BIT = 0x40000000

# name: (x86_64, aarch64); None where the architecture does not have the call.
_DENY: dict[str, tuple[int | None, int | None]] = {
    "mount": (165, 40), "umount2": (166, 39), "pivot_root": (155, 41), "chroot": (161, 51),
    "swapon": (167, 224), "swapoff": (168, 225), "reboot": (169, 142),
    "kexec_load": (246, 104), "kexec_file_load": (320, 294), "init_module": (175, 105),
    "finit_module": (313, 273), "delete_module": (176, 106), "bpf": (321, 280),
    "perf_event_open": (298, 241), "ptrace": (101, 117), "process_vm_readv": (310, 270),
    "process_vm_writev": (311, 271), "keyctl": (250, 219), "add_key": (248, 217),
    "request_key": (249, 218), "unshare": (272, 97), "setns": (308, 268),
    "userfaultfd": (323, 282), "open_by_handle_at": (304, 265),
    "name_to_handle_at": (303, 264), "acct": (163, 89), "settimeofday": (164, 170),
    "clock_settime": (227, 112), "clock_adjtime": (305, 266), "adjtimex": (159, 171),
    "mount_setattr": (442, 442), "move_mount": (429, 429), "fsopen": (430, 430),
    "fsconfig": (431, 431), "fsmount": (432, 432), "fspick": (433, 433),
    "open_tree": (428, 428), "quotactl": (179, 60), "quotactl_fd": (443, 443),
    "lookup_dcookie": (212, 18), "iopl": (172, None), "ioperm": (173, None),
    "syslog": (103, 116), "vhangup": (153, 58), "kcmp": (312, 272),
    "nfsservctl": (180, 42), "sysfs": (139, None), "uselib": (134, None),
    "ustat": (136, None), "_sysctl": (156, None), "create_module": (174, None),
    "get_kernel_syms": (177, None), "query_module": (178, None),
    "fanotify_init": (300, 262), "pidfd_getfd": (438, 438),
}
_MISSING: dict[str, tuple[int, int]] = {
    "clone3": (435, 435), "io_uring_setup": (425, 425), "io_uring_enter": (426, 426),
    "io_uring_register": (427, 427),
}
_CLONE = (56, 220)
_NAMESPACE_FLAGS = (_linux.CLONE_NEWNS | _linux.CLONE_NEWCGROUP | _linux.CLONE_NEWUTS
                    | _linux.CLONE_NEWIPC | _linux.CLONE_NEWUSER | _linux.CLONE_NEWPID
                    | _linux.CLONE_NEWNET | _linux.CLONE_NEWTIME)

_LD_W_ABS = 0x20
_JEQ = 0x15
_JGE = 0x35
_JSET = 0x45
_RET = 0x06
_ALLOW = 0x7FFF0000
_KILL_PROCESS = 0x80000000
_ERRNO = 0x00050000
_OFFSET_NR, _OFFSET_ARCH, _OFFSET_ARG0 = 0, 4, 16


class SeccompUnsupported(OSError):
    pass


def _insn(code: int, jt: int, jf: int, k: int) -> bytes:
    return struct.pack("HBBI", code, jt, jf, k)


def program(machine: str = _linux.MACHINE) -> bytes:
    """The filter as packed ``struct sock_filter`` instructions."""
    if machine not in _ARCH:
        raise SeccompUnsupported(errno.ENOSYS, f"no seccomp filter for {machine}")
    column = 0 if machine == "x86_64" else 1
    deny = sorted({nr for nrs in _DENY.values() if (nr := nrs[column]) is not None})
    missing = sorted(nrs[column] for nrs in _MISSING.values())
    out = [_insn(_LD_W_ABS, 0, 0, _OFFSET_ARCH),
           _insn(_JEQ, 1, 0, _ARCH[machine]),
           _insn(_RET, 0, 0, _KILL_PROCESS),
           _insn(_LD_W_ABS, 0, 0, _OFFSET_NR)]
    if machine == "x86_64":
        out += [_insn(_JGE, 0, 1, _X32_BIT), _insn(_RET, 0, 0, _KILL_PROCESS)]
    for nr in deny:
        out += [_insn(_JEQ, 0, 1, nr), _insn(_RET, 0, 0, _ERRNO | errno.EPERM)]
    for nr in missing:
        out += [_insn(_JEQ, 0, 1, nr), _insn(_RET, 0, 0, _ERRNO | errno.ENOSYS)]
    # clone: allowed unless it asks for a namespace (flags are its first argument on
    # both architectures; the low 32 bits hold them all).
    out += [_insn(_JEQ, 0, 3, _CLONE[column]),
            _insn(_LD_W_ABS, 0, 0, _OFFSET_ARG0),
            _insn(_JSET, 0, 1, _NAMESPACE_FLAGS),
            _insn(_RET, 0, 0, _ERRNO | errno.EPERM),
            _insn(_RET, 0, 0, _ALLOW)]
    return b"".join(out)


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def install() -> None:
    """Load the filter into this process (needs no_new_privs or CAP_SYS_ADMIN)."""
    code = program()
    buf = ctypes.create_string_buffer(code, len(code))
    prog = _SockFprog(len(code) // 8, ctypes.cast(buf, ctypes.c_void_p))
    _linux.prctl(_linux.PR_SET_SECCOMP, _linux.SECCOMP_MODE_FILTER,
                 ctypes.cast(ctypes.pointer(prog), ctypes.c_void_p))
