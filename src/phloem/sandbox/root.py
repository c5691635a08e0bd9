"""The file system an isolate or a build sees: a fresh root on a small tmpfs with the
system directories read-only, the paths it was given (read-only or writable) at the same
absolute paths as outside, a private ``/tmp`` and ``/dev/shm`` of bounded size, a minimal
``/dev`` and a ``/proc`` of its own PID namespace. Nothing else of the host is reachable:
not the data dir, other functions' files, the control plane's sockets or other ``/tmp``s.

Run as root, in a process that has just left the host's mount namespace
(``unshare(CLONE_NEWNS)``) and is the first process of a new PID namespace:

    spec = SandboxSpec(root_dir="/var/lib/phloem/run/sandbox", ro=[app_dir], cwd=app_dir)
    enter(spec)      # pivot_root into the new root; the old one is detached
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from typing import Any

from phloem.sandbox import _linux as k

#: System directories shown read-only (symlinks, as on merged-/usr systems, are copied).
SYSTEM_DIRS = ("/usr", "/etc", "/lib", "/lib64", "/lib32", "/libx32", "/bin", "/sbin")
DEVICES = ("null", "zero", "full", "random", "urandom", "tty")


@dataclass(frozen=True)
class SandboxSpec:
    #: An empty host directory (root's, 0700) on which the new root is built.
    root_dir: str
    #: Host paths (files or directories) visible read-only at the same path.
    ro: list[str] = field(default_factory=list)
    #: Host paths visible read-write at the same path (a build's output, its cache).
    rw: list[str] = field(default_factory=list)
    #: Size of the private /tmp and /dev/shm, each.
    tmp_mb: int = 256
    cwd: str = "/"
    #: Extra ``/etc/hosts`` entries, name -> address (a branch's service host names,
    #: which no resolver knows, point at the gateway).
    hosts: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> SandboxSpec:
        return cls(root_dir=str(data["root_dir"]), ro=[str(p) for p in data.get("ro", [])],
                   rw=[str(p) for p in data.get("rw", [])], tmp_mb=int(data["tmp_mb"]),
                   cwd=str(data.get("cwd", "/")),
                   hosts={str(k): str(v) for k, v in (data.get("hosts") or {}).items()})


def _inside(root: str, path: str) -> str:
    return os.path.join(root, path.lstrip("/"))


def _make_mountpoint(target: str, is_dir: bool) -> str:
    """Create the empty file or directory something is mounted on."""
    if is_dir:
        os.makedirs(target, exist_ok=True)
    else:
        os.makedirs(os.path.dirname(target), exist_ok=True)
        if not os.path.exists(target):
            with open(target, "w"):
                pass
    return target


def _mountpoint(root: str, source: str) -> str:
    """The mountpoint for a bind of ``source`` under ``root``."""
    return _make_mountpoint(_inside(root, source), os.path.isdir(source))


def _bind(root: str, source: str, *, read_only: bool) -> None:
    target = _mountpoint(root, source)
    k.mount(source, target, None, k.MS_BIND | k.MS_REC)
    flags = k.MS_REMOUNT | k.MS_BIND | k.MS_NOSUID | k.MS_NODEV
    k.mount(None, target, None, flags | (k.MS_RDONLY if read_only else 0))


def _tmpfs(target: str, options: str, flags: int = k.MS_NOSUID | k.MS_NODEV) -> None:
    os.makedirs(target, exist_ok=True)
    k.mount("tmpfs", target, "tmpfs", flags, options)


def _resolv_conf() -> list[str]:
    """/etc/resolv.conf is often a link into /run, which the sandbox does not show."""
    path = "/etc/resolv.conf"
    if os.path.islink(path):
        real = os.path.realpath(path)
        if os.path.exists(real) and not real.startswith("/etc/"):
            return [real]
    return []


def _hosts_file(root: str, extra: dict[str, str]) -> None:
    """Show the host's /etc/hosts plus ``extra``, read-only, at /etc/hosts."""
    try:
        with open("/etc/hosts") as f:
            base = f.read()
    except OSError:
        base = "127.0.0.1\tlocalhost\n"
    lines = [base.rstrip("\n"), "# phloem: this branch's services"]
    lines += [f"{address}\t{name}" for name, address in sorted(extra.items())]
    source = _inside(root, "/.hosts")
    with open(source, "w") as f:
        f.write("\n".join(lines) + "\n")
    target = _make_mountpoint(_inside(root, "/etc/hosts"), False)
    k.mount(source, target, None, k.MS_BIND)
    k.mount(None, target, None, k.MS_REMOUNT | k.MS_BIND | k.MS_RDONLY | k.MS_NOSUID
            | k.MS_NODEV)


def enter(spec: SandboxSpec) -> None:
    root = spec.root_dir
    # Nothing mounted from here on may propagate back to the host.
    k.mount(None, "/", None, k.MS_REC | k.MS_PRIVATE)
    k.mount("tmpfs", root, "tmpfs", k.MS_NOSUID | k.MS_NODEV, "mode=0755,size=4m")
    # /tmp first: paths given below it (a test's data dir) are bound on top.
    size = max(1, spec.tmp_mb)
    _tmpfs(_inside(root, "/tmp"), f"mode=1777,size={size}m")
    # /var/tmp is the same tmpfs, bound rather than linked: a link to "/tmp" would be
    # followed to the host's /tmp while the paths below are made (a data dir under
    # /var/tmp got its mountpoints there and was missing inside).
    var_tmp = _inside(root, "/var/tmp")
    os.makedirs(var_tmp, exist_ok=True)
    k.mount(_inside(root, "/tmp"), var_tmp, None, k.MS_BIND)
    for path in SYSTEM_DIRS:
        if os.path.islink(path):
            os.symlink(os.readlink(path), _inside(root, path))
        elif os.path.isdir(path):
            _bind(root, path, read_only=True)
    for path in [*_resolv_conf(), *spec.ro]:
        if os.path.exists(path):
            _bind(root, path, read_only=True)
    for path in spec.rw:
        _bind(root, path, read_only=False)
    if spec.hosts:
        _hosts_file(root, spec.hosts)
    dev = _inside(root, "/dev")
    _tmpfs(dev, "mode=0755,size=64k", k.MS_NOSUID)
    for name in DEVICES:
        if os.path.exists(f"/dev/{name}"):
            target = _mountpoint(root, f"/dev/{name}")
            k.mount(f"/dev/{name}", target, None, k.MS_BIND)
    for name, to in (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"),
                     ("stdout", "/proc/self/fd/1"), ("stderr", "/proc/self/fd/2")):
        os.symlink(to, os.path.join(dev, name))
    _tmpfs(os.path.join(dev, "shm"), f"mode=1777,size={size}m",
           k.MS_NOSUID | k.MS_NODEV | k.MS_NOEXEC)
    proc = _inside(root, "/proc")
    os.makedirs(proc, exist_ok=True)
    k.mount("proc", proc, "proc", k.MS_NOSUID | k.MS_NODEV | k.MS_NOEXEC)
    old = os.path.join(root, ".old-root")
    os.makedirs(old, exist_ok=True)
    k.pivot_root(root, old)
    os.chdir("/")
    k.umount("/.old-root", k.MNT_DETACH)
    os.rmdir("/.old-root")
    os.chdir(spec.cwd)


def inject(pid: int, source: str, *, read_only: bool = True) -> None:
    """Show host path ``source`` at the same path inside the mount namespace of ``pid``
    (a standby that learns its function only when activated). Call from a
    single-threaded root process still in the host's mount namespace."""
    tree = k.open_tree_clone(source)
    own = os.open("/proc/self/ns/mnt", os.O_RDONLY | os.O_CLOEXEC)
    theirs = os.open(f"/proc/{pid}/ns/mnt", os.O_RDONLY | os.O_CLOEXEC)
    cwd = os.open(".", os.O_RDONLY | os.O_CLOEXEC | os.O_DIRECTORY)
    try:
        if read_only:
            k.set_read_only(tree)
        is_dir = os.path.isdir(source)
        k.setns(theirs, k.CLONE_NEWNS)
        try:
            k.move_mount(tree, _make_mountpoint(source, is_dir))
        finally:
            k.setns(own, k.CLONE_NEWNS)
            os.fchdir(cwd)
    finally:
        for fd in (tree, own, theirs, cwd):
            os.close(fd)
