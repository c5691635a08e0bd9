"""The Python zygote: one root process per (isolate interpreter, runtime directory) that has
already imported uvicorn, uvloop, httptools, websockets and asyncio, and forks a child for
each isolate instead of starting a fresh interpreter (most of a cold start is imports).

    python -s -m phloem.runtimes.python.zygote --control-fd 3 --parent-pid 1234

It runs inside the runtime directory like the host, so it imports only the standard
library, uvicorn's closure and ``phloem.runtimes.python.host``/``phloem.functions``. It
runs as root (children must be able to setuid) but never runs user code: only the forked
child imports the app, after it has joined its memory cgroup and irrevocably dropped to
the function's uid.

Protocol, on a ``SOCK_SEQPACKET`` socket (one JSON object per message, descriptors with
``SCM_RIGHTS``):

* supervisor -> zygote: ``{"op": "spawn", "id", "uid", "gid", "cgroup_procs"}`` with the
  descriptors ``SPAWN_FDS`` (spec memfd, listening socket, status pipe, stdout, stderr);
* zygote -> supervisor: ``{"op": "hello", "pid", "modules"}`` once preloaded;
  ``{"op": "spawned", "id", "pid"}`` with a pidfd of the child; ``{"op": "failed", "id",
  "error"}``; ``{"op": "exited", "id", "pid", "status"}`` (a raw wait status) when a child
  has been reaped.

The app's env (which holds its database passwords and secrets), cwd, ``sys.path`` and
entry travel in a memfd that only the child reads, so the zygote's memory, which every
later child inherits, never holds one function's secrets.

The zygote is single-threaded and never runs an event loop, so ``fork`` is safe; it reaps
children on SIGCHLD (through the signal wakeup fd, in its ``poll`` loop). It dies with the
platform (``PR_SET_PDEATHSIG``, and it exits when the control socket closes), and its
children die with it.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import gc
import importlib
import importlib.machinery
import io
import json
import locale
import os
import select
import signal
import socket
import sys
import time
import traceback
from dataclasses import dataclass
from typing import Any, NoReturn

from phloem.runtimes.python import host
from phloem.sandbox import _linux as kernel
from phloem.sandbox.lockdown import (
    Credentials,
    close_fds_except,
    drop_privileges,
    join_cgroups,
    lock_down,
)
from phloem.sandbox.root import SandboxSpec, enter

MAX_MESSAGE = 64 * 1024
MAX_SPEC_BYTES = 16 * 2**20
#: Descriptors sent with a spawn request, in this order.
SPAWN_FDS = ("spec", "listen", "status", "stdout", "stderr")
#: Interpreter settings from the environment that a forked child honours (the rest, such
#: as PYTHONHASHSEED or PYTHONWARNINGS, only apply at interpreter start-up).
FORK_SAFE_ENV = frozenset({
    "PYTHONPATH", "PYTHONUNBUFFERED", "PYTHONDONTWRITEBYTECODE", "PYTHONIOENCODING",
    "PYTHONNOUSERSITE", "PYTHONUSERBASE", "PYTHONBREAKPOINT",
})
#: Exit code of a child that could not become an isolate (as a shell's "cannot execute").
SETUP_FAILED = 126

#: Standard library modules common in apps (psycopg, Starlette) that uvicorn itself does
#: not import; most of the standard library an app uses is already loaded by uvicorn.
COMMON_STDLIB = ("decimal", "http.cookies", "zoneinfo")


class ProtocolError(Exception):
    pass


def preload() -> None:
    """Import what ``host.serve`` makes uvicorn import: its configuration tables name the
    protocol, lifespan and loop implementations, so this follows uvicorn's versions."""
    for name in ("uvicorn", "uvicorn.server", "phloem.functions"):
        importlib.import_module(name)
    import uvicorn.config as config
    from uvicorn.importer import import_from_string

    loops = getattr(config, "LOOP_FACTORIES", None) or getattr(config, "LOOP_SETUPS", {})
    refs = [config.HTTP_PROTOCOLS.get("httptools"), config.WS_PROTOCOLS.get("auto"),
            config.LIFESPAN.get("auto"), config.LIFESPAN.get("off"), loops.get("uvloop"),
            loops.get("asyncio")]
    for ref in refs:
        try:
            if isinstance(ref, str):
                import_from_string(ref)
        except Exception:  # optional here (no uvloop...): a child imports what it uses
            pass
    for name in COMMON_STDLIB:
        with contextlib.suppress(ImportError):
            importlib.import_module(name)


def loaded_top_level() -> frozenset[str]:
    """Top-level names of the modules loaded from files: a child cannot get another copy
    of these from its own ``sys.path`` (built-in and frozen ones cannot be shadowed)."""
    names = set()
    for name, module in list(sys.modules.items()):
        spec = getattr(module, "__spec__", None)
        if spec is not None and spec.has_location and name != "__main__":
            names.add(name.partition(".")[0])
    return frozenset(names)


def dists_by_top_level(directory: str) -> dict[str, str]:
    """For the runtime directory: top-level import name -> its ``*.dist-info`` directory
    name (which carries the version), from each distribution's RECORD."""
    found: dict[str, str] = {}
    try:
        entries = os.listdir(directory)
    except OSError:
        return found
    for entry in entries:
        if not entry.endswith(".dist-info"):
            continue
        try:
            with open(os.path.join(directory, entry, "RECORD")) as f:
                for line in f:
                    first = line.split(",", 1)[0].split("/", 1)[0]
                    name = _module_name(first)
                    if name and not first.endswith((".dist-info", ".data")):
                        found.setdefault(name, entry)
        except OSError:
            continue
    return found


def _module_name(filename: str) -> str | None:
    if filename.endswith(".py"):
        return filename[:-3]
    if filename.endswith(".pyc"):
        return filename[:-4]
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        if filename.endswith(suffix):
            return filename[: -len(suffix)]
    if "." not in filename:
        return filename  # a package directory
    return None


def shadowed(entries: list[str], preloaded: frozenset[str],
             runtime_dists: dict[str, str]) -> list[str]:
    """Modules the zygote has loaded that ``entries`` (searched before the runtime) would
    provide in a fresh interpreter, e.g. another uvicorn in the function's requirements.
    The same distribution and version (same ``*.dist-info`` name) does not count."""
    found = []
    for directory in entries:
        try:
            names = os.listdir(directory)
        except OSError:
            continue
        listed = set(names)
        for filename in names:
            name = _module_name(filename)
            if name is None or name not in preloaded:
                continue
            path = os.path.join(directory, filename)
            if filename == name and not os.path.isfile(os.path.join(path, "__init__.py")):
                continue  # a plain directory or namespace portion loses to a package
            if runtime_dists.get(name) in listed:
                continue
            found.append(f"{name} ({path})")
    return found


# -- the zygote ----------------------------------------------------------------------------

@dataclass(frozen=True)
class Job:
    """What a freshly forked child needs to become an isolate."""

    id: int
    uid: int
    gid: int
    cgroup_procs: list[str]
    sandbox: SandboxSpec | None
    nofile: int | None
    #: A pidfd of the zygote: readable once it has exited.
    zygote_pidfd: int
    fds: dict[str, int]
    base_path: list[str]
    preloaded: frozenset[str]
    runtime_dists: dict[str, str]


def _send(sock: socket.socket, message: dict[str, Any], fds: list[int] | None = None) -> None:
    socket.send_fds(sock, [json.dumps(message).encode()], fds or [])


class Zygote:
    def __init__(self, control: socket.socket, base_path: list[str],
                 runtime_dists: dict[str, str]) -> None:
        self.control = control
        self.base_path = base_path
        self.runtime_dists = runtime_dists
        self.preloaded = loaded_top_level()
        self.children: dict[int, int] = {}  # pid -> spawn id
        self.pidfd = os.pidfd_open(os.getpid())
        # To put pid_for_children back after each child got a PID namespace of its own.
        self.pid_ns = os.open("/proc/self/ns/pid", os.O_RDONLY | os.O_CLOEXEC)

    def serve(self) -> Job | None:
        """Answer spawn requests until the control socket closes (``None``). In a forked
        child this returns its ``Job`` instead, having closed everything of the zygote."""
        wake_r, wake_w = os.pipe()
        os.set_blocking(wake_r, False)
        os.set_blocking(wake_w, False)
        # SIGCHLD must have a handler for the wakeup fd to be written; the poll loop reaps.
        signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)
        signal.signal(signal.SIGCHLD, lambda _signum, _frame: None)
        poller = select.poll()
        poller.register(self.control.fileno(), select.POLLIN)
        poller.register(wake_r, select.POLLIN)
        _send(self.control, {"op": "hello", "pid": os.getpid(),
                             "modules": len(sys.modules)})
        while True:
            for fd, _ in poller.poll():
                if fd == wake_r:
                    while True:
                        try:
                            if not os.read(wake_r, 512):
                                break
                        except BlockingIOError:
                            break
                    continue
                try:
                    job = self._handle()
                except EOFError:
                    return None
                if job is not None:  # in the child: leave nothing of the zygote open
                    signal.set_wakeup_fd(-1)
                    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
                    os.close(wake_r)
                    os.close(wake_w)
                    self.control.close()
                    return job
            self._reap()

    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            spawn_id = self.children.pop(pid, None)
            _send(self.control, {"op": "exited", "id": spawn_id, "pid": pid,
                                 "status": status})

    def _handle(self) -> Job | None:
        try:
            data, fds, flags, _ = socket.recv_fds(self.control, MAX_MESSAGE, len(SPAWN_FDS) + 1,
                                                  socket.MSG_CMSG_CLOEXEC)
        except ConnectionResetError:
            raise EOFError from None
        if not data and not fds:
            raise EOFError
        spawn_id = -1
        try:
            try:
                request = json.loads(data)
                spawn_id = int(request["id"])
                if request.get("op") != "spawn":
                    raise ProtocolError(f"unknown op {request.get('op')!r}")
                if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
                    raise ProtocolError("message or descriptors truncated")
                if len(fds) != len(SPAWN_FDS):
                    raise ProtocolError(f"expected {len(SPAWN_FDS)} descriptors, got "
                                        f"{len(fds)}")
                uid, gid = int(request["uid"]), int(request["gid"])
                if uid == 0:
                    raise ProtocolError("refusing to start an isolate as root")
                procs = request.get("cgroup_procs") or []
                if not isinstance(procs, list) or not all(isinstance(p, str) for p in procs):
                    raise ProtocolError("cgroup_procs must be a list of paths")
                raw_sandbox = request.get("sandbox")
                sandbox = (SandboxSpec.from_json(raw_sandbox) if raw_sandbox is not None
                           else None)
                nofile = request.get("nofile")
                if nofile is not None and not isinstance(nofile, int):
                    raise ProtocolError("nofile must be an integer")
            except (ValueError, KeyError, TypeError, ProtocolError) as exc:
                _send(self.control, {"op": "failed", "id": spawn_id, "error": str(exc)})
                return None
            pid = -1
            try:
                if sandbox is not None:
                    # The child is the first process of a PID namespace of its own.
                    kernel.unshare(kernel.CLONE_NEWPID)
                try:
                    pid = os.fork()
                finally:
                    if sandbox is not None and pid != 0:
                        kernel.setns(self.pid_ns, kernel.CLONE_NEWPID)
            except OSError as exc:
                _send(self.control, {"op": "failed", "id": spawn_id,
                                     "error": f"fork: {exc}"})
                return None
            if pid == 0:
                fds_by_name = dict(zip(SPAWN_FDS, fds, strict=True))
                fds = []  # the child owns them now; the finally below must not close them
                return Job(spawn_id, uid, gid, procs, sandbox, nofile,
                           self.pidfd, fds_by_name, self.base_path, self.preloaded,
                           self.runtime_dists)
            # A pidfd taken before this loop can reap the child names exactly that
            # process: the supervisor never signals a recycled pid.
            try:
                pidfd = os.pidfd_open(pid)
            except OSError as exc:  # no pidfds (Linux < 5.3): the supervisor spawns
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                _send(self.control, {"op": "failed", "id": spawn_id,
                                     "error": f"pidfd_open: {exc}"})
                return None
            self.children[pid] = spawn_id
            try:
                _send(self.control, {"op": "spawned", "id": spawn_id, "pid": pid}, [pidfd])
            finally:
                os.close(pidfd)
            return None
        finally:
            for fd in fds:
                os.close(fd)


# -- the child -----------------------------------------------------------------------------

def _fatal(message: str) -> NoReturn:
    """Report on the isolate's stderr (the function's log) and exit, running nothing
    else of the zygote's: this is reached before privileges are known to be dropped."""
    with_trace = f"phloem zygote: {message}\n{traceback.format_exc()}"
    with contextlib.suppress(OSError):
        os.write(2, with_trace.encode(errors="replace"))
    os._exit(SETUP_FAILED)


def _enter(job: Job) -> dict[str, Any]:
    """The privileged part, as root: own session, the given stdio, nothing else open,
    the memory cgroup, then the function's uid for good. Returns the spec."""
    fds = job.fds
    os.setsid()  # as start_new_session: a terminal's Ctrl-C is the platform's alone
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    os.dup2(fds["stdout"], 1)
    os.dup2(fds["stderr"], 2)
    close_fds_except({0, 1, 2, fds["spec"], fds["listen"], fds["status"], job.zygote_pidfd})
    # Before anything is allocated for the app and while still root; one thread, so on
    # cgroup v1 without the global lock's grace period.
    join_cgroups(job.cgroup_procs)
    if job.sandbox is not None:
        kernel.unshare(kernel.CLONE_NEWNS | kernel.CLONE_NEWIPC)
        enter(job.sandbox)
        lock_down(Credentials(job.uid, job.gid), nofile=job.nofile)
    else:
        drop_privileges(job.uid, job.gid)
    # Changing credentials made the process non-dumpable, which makes /proc/self root's;
    # a spawned isolate is dumpable again after exec. Nothing in this memory is secret:
    # the zygote never saw any function's spec.
    kernel.prctl(kernel.PR_SET_DUMPABLE, 1)
    # After the credential change, which clears it. The parent is the zygote.
    kernel.prctl(kernel.PR_SET_PDEATHSIG, signal.SIGKILL)
    if select.select([job.zygote_pidfd], [], [], 0)[0]:
        os._exit(1)  # the zygote died meanwhile
    os.close(job.zygote_pidfd)
    with os.fdopen(fds["spec"], "rb") as f:
        spec: dict[str, Any] = json.loads(f.read(MAX_SPEC_BYTES))
    for key, kind in (("env", dict), ("cwd", str), ("path", list), ("entry", str)):
        if not isinstance(spec.get(key), kind):
            raise ProtocolError(f"spec: {key} missing")
    return spec


def _reopen_stdio(env: dict[str, str]) -> None:
    """stdout/stderr as a fresh interpreter with this env would set them up."""
    unbuffered = bool(env.get("PYTHONUNBUFFERED"))
    encoding, _, errors = env.get("PYTHONIOENCODING", "").partition(":")
    for fd, name, default_errors in ((1, "stdout", "strict"), (2, "stderr",
                                                               "backslashreplace")):
        getattr(sys, name).flush()
        raw = io.FileIO(fd, "w", closefd=False)
        buffered: Any = raw if unbuffered else io.BufferedWriter(raw)
        # Python's own rules: -u writes through; otherwise stderr is line-buffered and
        # stdout only on a terminal.
        stream = io.TextIOWrapper(buffered, encoding=encoding or "utf-8",
                                  errors=errors or default_errors,
                                  write_through=unbuffered,
                                  line_buffering=not unbuffered and (
                                      name == "stderr" or os.isatty(fd)))
        setattr(sys, name, stream)
        setattr(sys, f"__{name}__", stream)


def _user_site(env: dict[str, str]) -> str | None:
    """The user site directory a fresh interpreter would add (the zygote runs with -s)."""
    if env.get("PYTHONNOUSERSITE") or "HOME" not in env:
        return None
    base = env.get("PYTHONUSERBASE") or os.path.join(env["HOME"], ".local")
    ver = f"{sys.version_info.major}.{sys.version_info.minor}"
    path = os.path.join(base, "lib", f"python{ver}", "site-packages")
    return path if os.path.isdir(path) else None


def become_isolate(job: Job) -> int:
    """In the forked child: set up as a spawned host would be, then run the app exactly as
    ``host.main`` does. Returns the exit code (the interpreter then exits normally)."""
    try:
        spec = _enter(job)
    except BaseException as exc:
        _fatal(f"cannot start the isolate: {exc}")
    env: dict[str, str] = {str(k): str(v) for k, v in spec["env"].items()}
    entries = [str(p) for p in spec["path"]]
    cwd = str(spec["cwd"])
    os.environ.clear()
    os.environ.update(env)
    os.chdir(cwd)
    # As ``python -m`` with PYTHONPATH: cwd, the entries, then the interpreter's own.
    path = [cwd, *entries]
    path += [p for p in job.base_path if p not in path]
    user_site = _user_site(env)
    if user_site is not None:
        path.append(user_site)
    sys.path[:] = path
    importlib.invalidate_caches()
    sys.dont_write_bytecode = bool(env.get("PYTHONDONTWRITEBYTECODE"))
    _reopen_stdio(env)
    with contextlib.suppress(locale.Error):
        locale.setlocale(locale.LC_CTYPE, "")
    time.tzset()
    listen, status = job.fds["listen"], job.fds["status"]
    sys.argv[:] = [host.__file__, "--app", spec["entry"], "--fd", str(listen),
                   "--ready-fd", str(status)]
    clash = shadowed([cwd, *(p for p in entries if p not in job.base_path)], job.preloaded,
                     job.runtime_dists)
    clash += [f"{k}={v!r}" for k, v in sorted(env.items())
              if k.startswith("PYTHON") and v and k not in FORK_SAFE_ENV]
    if clash:
        _exec_host(spec["entry"], job, env, clash)
    return host.run(spec["entry"], listen, status)


def _exec_host(entry: str, job: Job, env: dict[str, str], clash: list[str]) -> NoReturn:
    """The function brings its own copy of a module the zygote has loaded, or sets an
    interpreter option: start a fresh interpreter (already unprivileged, in its cgroup)
    so the app gets exactly what it asked for."""
    print(f"phloem: {', '.join(clash)} needs a fresh interpreter rather than the "
          "zygote's (slower cold start)", file=sys.stderr, flush=True)
    listen, status = job.fds["listen"], job.fds["status"]
    os.set_inheritable(listen, True)
    os.set_inheritable(status, True)
    try:
        os.execve(sys.executable, [sys.executable, "-m", "phloem.runtimes.python.host",
                                   "--app", entry, "--fd", str(listen),
                                   "--ready-fd", str(status)], env)
    except OSError as exc:
        os.write(2, f"phloem zygote: exec {sys.executable}: {exc}\n".encode())
        os._exit(SETUP_FAILED)


# -- entry point ---------------------------------------------------------------------------

def _die_with_parent(parent: int) -> None:
    kernel.prctl(kernel.PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:
        os._exit(1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="phloem-python-zygote")
    parser.add_argument("--control-fd", type=int, required=True)
    parser.add_argument("--parent-pid", type=int, required=True)
    args = parser.parse_args(argv)
    _die_with_parent(args.parent_pid)
    control = socket.socket(fileno=args.control_fd)
    os.set_blocking(control.fileno(), True)
    # ``python -m`` put the zygote's cwd first and PYTHONPATH next (both the runtime
    # directory); a child gets its own cwd and entries in front of the rest.
    own = os.environ.get("PYTHONPATH", "").split(os.pathsep)
    base_path = [p for p in sys.path[1:] if p not in own] if sys.path else []
    runtime = own[-1] if own and own[-1] else os.getcwd()
    base_path = [runtime, *base_path]
    preload()
    # Keep the preloaded objects out of the children's collections: they are never
    # garbage, and a collection touching them would copy their pages into every child.
    gc.freeze()
    try:
        job = Zygote(control, base_path, dists_by_top_level(runtime)).serve()
    except OSError as exc:
        if exc.errno in (errno.EPIPE, errno.ECONNRESET):
            return 0  # the platform went away
        raise
    if job is None:
        return 0
    return become_isolate(job)


if __name__ == "__main__":
    sys.exit(main())
