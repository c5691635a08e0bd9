"""One isolate: an OS process serving one deployment over HTTP/1.1 on a Unix socket.

The supervisor creates and binds the listening socket itself and hands the process the
descriptor, so the socket file stays root's (0600: no other isolate can connect to it) and
a request that arrives before the app is ready simply waits in the kernel's backlog.

The process talks back over an inherited pipe, one byte per event: ``R`` ready (lifespan
startup done), ``W`` background (``wait_until``) work pending, ``D`` none pending.

How the process comes to exist is a ``Spawner``'s business (as uvicorn swaps loop and
protocol implementations): ``DirectSpawner`` executes the deployment's command (a fresh
interpreter, ~200 ms of imports before the app's own); ``ZygoteSpawner`` asks a zygote
that has those imports done to fork (``phloem.runtimes.python.zygote``), and falls back to
the direct spawner whenever it cannot.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import os
import secrets
import signal
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from phloem.identity import Identity
from phloem.limits import FunctionLimits
from phloem.runtimes.python import zygote as pyzygote
from phloem.sandbox import LAUNCHER_ENV, Job, SandboxSpec
from phloem.supervisor.cgroups import MemoryLimiter, MemorySlot

log = logging.getLogger("phloem.supervisor")


class IsolateFailed(RuntimeError):
    """The isolate could not start or died; ``reason`` is shown to the caller."""


@dataclass(frozen=True)
class IsolateSpec:
    deployment_id: str
    function_id: str
    slug: str
    branch_id: str
    command: list[str]
    env: dict[str, str]
    cwd: Path
    identity: Identity
    log_path: Path
    limits: FunctionLimits = field(default_factory=FunctionLimits)
    #: The isolate's sandbox (``None``: none can be made here, or sandboxes are off).
    sandbox: SandboxSpec | None = None
    #: RLIMIT_NOFILE inside the sandbox.
    nofile: int = 65536


LogWriter = Callable[[str, str, str], None]  # (isolate id, stream, line)


# -- spawners ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Launch:
    """What one isolate process gets, whichever spawner starts it."""

    spec: IsolateSpec
    env: dict[str, str]
    #: The bound, listening socket and the write end of the status pipe; the spawner
    #: hands both to the process, the caller closes its own copies afterwards.
    listen_fd: int
    status_fd: int
    memory: MemorySlot


class IsolateProcess(Protocol):
    """A started isolate process."""

    #: How it was started, for the log ("spawned", "forked from the zygote").
    how: str

    @property
    def pid(self) -> int: ...

    @property
    def stdout(self) -> asyncio.StreamReader: ...

    @property
    def stderr(self) -> asyncio.StreamReader: ...

    async def wait(self) -> int | None:
        """Wait for the exit; the code as ``Popen.returncode`` has it (``-N`` for signal
        N), ``None`` if it cannot be known."""
        ...

    def send_signal(self, sig: int) -> None:
        """Signal the process unless it has exited (never another that took its pid)."""
        ...


class Spawner(Protocol):
    name: str

    async def spawn(self, launch: Launch) -> IsolateProcess: ...


class _PipedOutput:
    """stdout/stderr of an isolate process, as the supervisor reads them."""

    _stdout: asyncio.StreamReader
    _stderr: asyncio.StreamReader

    @property
    def stdout(self) -> asyncio.StreamReader:
        return self._stdout

    @property
    def stderr(self) -> asyncio.StreamReader:
        return self._stderr


class DirectProcess(_PipedOutput):
    how = "spawned"

    def __init__(self, process: asyncio.subprocess.Process, how: str | None = None) -> None:
        assert process.stdout is not None and process.stderr is not None
        if how is not None:
            self.how = how
        self._process = process
        self._stdout = process.stdout
        self._stderr = process.stderr

    @property
    def pid(self) -> int:
        return self._process.pid

    async def wait(self) -> int | None:
        return await self._process.wait()

    def send_signal(self, sig: int) -> None:
        if self._process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self._process.send_signal(sig)


class DirectSpawner:
    """Execute the deployment's command. As root (in a sandbox or not), through the
    sandbox launcher (``phloem.sandbox.launch``): the function's env reaches only the
    final exec, after the privilege drop. Not as root, everything is the one user: the
    memory slot's wrapper (empty for the RSS watchdog) and the command."""

    name = "direct"

    async def spawn(self, launch: Launch) -> IsolateProcess:
        spec = launch.spec
        command = [*spec.command, "--fd", str(launch.listen_fd),
                   "--ready-fd", str(launch.status_fd)]
        fds = (launch.listen_fd, launch.status_fd)
        if spec.sandbox is not None or not spec.identity.is_self:
            # As root, with or without a sandbox: nothing of the function's (its env above
            # all) may reach a root helper before the drop. The launcher is the parent.
            env = {k: v for k, v in launch.env.items() if k != "PHLOEM_SUPERVISOR_PID"}
            job = Job(argv=command, env=env, cwd=str(spec.cwd),
                      uid=spec.identity.uid, gid=spec.identity.gid, sandbox=spec.sandbox,
                      procs_files=procs_files(launch.memory), keep_fds=list(fds),
                      nofile=spec.nofile)
            argv, job_fd = job.launcher()
            try:
                process = await asyncio.create_subprocess_exec(
                    *argv, cwd="/", env=LAUNCHER_ENV, stdin=asyncio.subprocess.DEVNULL,
                    stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
                    pass_fds=(job_fd, *fds), start_new_session=True)
            finally:
                os.close(job_fd)
            how = "spawned in a sandbox" if spec.sandbox is not None else "spawned"
            return DirectProcess(process, how=how)
        cmd = launch.memory.wrap(command)
        process = await asyncio.create_subprocess_exec(
            *cmd, cwd=spec.cwd, env=launch.env, stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            pass_fds=fds, start_new_session=True,
        )
        return DirectProcess(process)


class ZygoteUnavailable(RuntimeError):
    """The zygote cannot start this isolate (down, refused, not answering)."""


def _wake(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


async def _pipe_reader(fd: int) -> asyncio.StreamReader:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=2**16)  # as asyncio's subprocess pipes
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader),
                                 os.fdopen(fd, "rb", 0))
    return reader


class ZygoteProcess(_PipedOutput):
    """A child of the zygote. It is not ours to ``wait()`` for, so its exit is seen on a
    pidfd (readable once it has exited) and its status comes from the zygote, which
    reaps it; signals go through the pidfd, so a recycled pid is never hit."""

    how = "forked from the zygote"

    def __init__(self, pid: int, pidfd: int, stdout: asyncio.StreamReader,
                 stderr: asyncio.StreamReader, status: asyncio.Future[int | None]) -> None:
        self._pid = pid
        self._pidfd = pidfd
        self._stdout = stdout
        self._stderr = stderr
        self._status = status
        self._exited = False
        self._code: int | None = None

    @property
    def pid(self) -> int:
        return self._pid

    async def wait(self) -> int | None:
        if self._exited:
            return self._code
        loop = asyncio.get_running_loop()
        gone: asyncio.Future[None] = loop.create_future()
        loop.add_reader(self._pidfd, _wake, gone)
        try:
            await gone
        finally:
            loop.remove_reader(self._pidfd)
        try:
            # The zygote reaps on SIGCHLD, at once; a zygote that is gone reports None.
            status = await asyncio.wait_for(asyncio.shield(self._status), 5.0)
        except TimeoutError:
            status = None
        if not self._exited:
            self._exited = True
            os.close(self._pidfd)
            self._code = os.waitstatus_to_exitcode(status) if status is not None else None
        return self._code

    def send_signal(self, sig: int) -> None:
        if not self._exited:
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(self._pidfd, sig)


class ZygoteClient:
    """The supervisor's end of one zygote process (see ``phloem.runtimes.python.zygote``
    for the protocol)."""

    def __init__(self, python: str, runtime_dir: str) -> None:
        self.python = python
        self.runtime_dir = runtime_dir
        self.pid: int | None = None
        self.alive = False
        self._process: asyncio.subprocess.Process | None = None
        self._sock: socket.socket | None = None
        self._hello: asyncio.Future[dict[str, Any]] | None = None
        self._pending: dict[int, asyncio.Future[tuple[dict[str, Any], list[int]]]] = {}
        self._exits: dict[int, asyncio.Future[int | None]] = {}
        self._ids = itertools.count(1)
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self, timeout: float = 30.0) -> None:
        loop = asyncio.get_running_loop()
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        # A minimal env: the zygote's memory is every child's, so it must hold no secret
        # of the platform's either.
        env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8",
               "PYTHONPATH": self.runtime_dir, "PYTHONUNBUFFERED": "1",
               "PYTHONDONTWRITEBYTECODE": "1"}
        try:
            # From the loop's thread: PR_SET_PDEATHSIG follows the thread that forked.
            self._process = await asyncio.create_subprocess_exec(
                self.python, "-s", "-m", "phloem.runtimes.python.zygote",
                "--control-fd", str(theirs.fileno()), "--parent-pid", str(os.getpid()),
                cwd=self.runtime_dir, env=env, stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
                pass_fds=(theirs.fileno(),),
                # A terminal's Ctrl-C must not kill it (and with it every isolate) before
                # the platform has stopped them gracefully.
                start_new_session=True,
            )
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        self.pid = self._process.pid
        self._sock = ours
        ours.setblocking(False)
        self._hello = loop.create_future()
        self.alive = True
        loop.add_reader(ours.fileno(), self._on_readable)
        assert self._process.stderr is not None
        self._tasks = [asyncio.create_task(self._pump_stderr(self._process.stderr)),
                       asyncio.create_task(self._watch_process())]
        try:
            hello = await asyncio.wait_for(asyncio.shield(self._hello), timeout)
        except BaseException:
            await self.stop()
            raise
        log.info("python zygote %s ready (%s modules loaded) for %s", hello.get("pid"),
                 hello.get("modules"), self.runtime_dir)

    async def _pump_stderr(self, stream: asyncio.StreamReader) -> None:
        while line := await stream.readline():
            log.warning("python zygote: %s", line.decode(errors="replace").rstrip())

    async def _watch_process(self) -> None:
        assert self._process is not None
        code = await self._process.wait()
        self._lost(f"exited with code {code}")

    def _on_readable(self) -> None:
        assert self._sock is not None
        while self.alive:
            try:
                # CLOEXEC: a pidfd must not leak into processes the platform executes.
                data, fds, _, _ = socket.recv_fds(self._sock, pyzygote.MAX_MESSAGE, 4,
                                                  socket.MSG_CMSG_CLOEXEC)
            except BlockingIOError:
                return
            except OSError as exc:
                self._lost(f"control socket: {exc}")
                return
            if not data:
                for fd in fds:
                    os.close(fd)
                self._lost("closed its control socket")
                return
            try:
                self._dispatch(json.loads(data), fds)
            except (ValueError, KeyError, TypeError) as exc:
                for fd in fds:
                    os.close(fd)
                log.error("python zygote: bad message %r: %s", data[:200], exc)

    def _dispatch(self, message: dict[str, Any], fds: list[int]) -> None:
        op = message["op"]
        if op == "hello":
            if self._hello is not None and not self._hello.done():
                self._hello.set_result(message)
        elif op in ("spawned", "failed"):
            waiter = self._pending.pop(int(message["id"]), None)
            if waiter is not None and not waiter.done():
                waiter.set_result((message, fds))
                return
        elif op == "exited":
            status = self._exits.pop(message["id"], None) if message["id"] is not None \
                else None
            if status is not None and not status.done():
                status.set_result(int(message["status"]))
        for fd in fds:
            os.close(fd)

    def _lost(self, why: str) -> None:
        if not self.alive:
            return
        self.alive = False
        log.warning("python zygote %s %s; its isolates are gone, new ones start without "
                    "it", self.pid, why)
        if self._sock is not None:
            with contextlib.suppress(ValueError, OSError):
                asyncio.get_running_loop().remove_reader(self._sock.fileno())
            self._sock.close()
        if self._hello is not None and not self._hello.done():
            self._hello.set_exception(ZygoteUnavailable(f"the zygote {why}"))
        for waiter in self._pending.values():
            if not waiter.done():
                waiter.set_exception(ZygoteUnavailable(f"the zygote {why}"))
        self._pending.clear()
        for status in self._exits.values():
            if not status.done():
                status.set_result(None)  # its children died with it, unreaped by it
        self._exits.clear()

    async def _send(self, message: dict[str, Any], fds: list[int]) -> None:
        loop = asyncio.get_running_loop()
        data = json.dumps(message).encode()
        while True:
            if not self.alive or self._sock is None:
                raise ZygoteUnavailable("the zygote is not running")
            try:
                socket.send_fds(self._sock, [data], fds)
                return
            except BlockingIOError:
                writable: asyncio.Future[None] = loop.create_future()
                loop.add_writer(self._sock.fileno(), _wake, writable)
                try:
                    await writable
                finally:
                    loop.remove_writer(self._sock.fileno())
            except OSError as exc:
                self._lost(f"control socket: {exc}")
                raise ZygoteUnavailable(str(exc)) from exc

    async def spawn(self, launch: Launch, entry: str, path: list[str],
                    cgroup_procs: list[str], timeout: float = 10.0) -> ZygoteProcess:
        loop = asyncio.get_running_loop()
        spec = launch.spec
        # The env (the function's secrets) goes in a memfd only the child reads.
        env = dict(launch.env)
        if spec.sandbox is None:  # in its own PID namespace the zygote is not its parent
            env["PHLOEM_SUPERVISOR_PID"] = str(self.pid)
        payload = json.dumps({"env": env,
                              "cwd": str(spec.cwd), "path": path, "entry": entry}).encode()
        spec_fd = os.memfd_create("phloem-isolate-spec", os.MFD_CLOEXEC)
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        spawn_id = next(self._ids)
        reply: asyncio.Future[tuple[dict[str, Any], list[int]]] = loop.create_future()
        self._pending[spawn_id] = reply
        # Registered before asking: the exit can be reported right after the reply.
        status: asyncio.Future[int | None] = loop.create_future()
        self._exits[spawn_id] = status
        keep_readers = False
        try:
            os.write(spec_fd, payload)
            os.lseek(spec_fd, 0, os.SEEK_SET)
            sandbox = spec.sandbox.to_json() if spec.sandbox is not None else None
            await self._send({"op": "spawn", "id": spawn_id, "uid": spec.identity.uid,
                              "gid": spec.identity.gid, "cgroup_procs": cgroup_procs,
                              "sandbox": sandbox, "nofile": spec.nofile},
                             [spec_fd, launch.listen_fd, launch.status_fd, out_w, err_w])
            try:
                message, fds = await asyncio.wait_for(asyncio.shield(reply), timeout)
            except TimeoutError:
                # A zygote that does not answer is not trusted with more isolates.
                self._lost(f"did not answer a spawn request in {timeout:.0f} s")
                raise ZygoteUnavailable("the zygote did not answer") from None
            if message["op"] != "spawned" or len(fds) != 1:
                for fd in fds:
                    os.close(fd)
                raise ZygoteUnavailable(f"the zygote refused: {message.get('error')}")
            keep_readers = True
        finally:
            self._pending.pop(spawn_id, None)
            if not keep_readers:
                self._exits.pop(spawn_id, None)
                os.close(out_r)
                os.close(err_r)
            for fd in (spec_fd, out_w, err_w):
                os.close(fd)
        pidfd = fds[0]
        try:
            stdout = await _pipe_reader(out_r)
            stderr = await _pipe_reader(err_r)
        except BaseException:
            # Not tracked by anyone: it must not live on.
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(pidfd, signal.SIGKILL)
            os.close(pidfd)
            raise
        return ZygoteProcess(int(message["pid"]), pidfd, stdout, stderr, status)

    async def stop(self, timeout: float = 5.0) -> None:
        """Close the control socket: the zygote exits (its children, if any are left,
        die with it)."""
        if self._sock is not None and self.alive:
            self.alive = False
            with contextlib.suppress(ValueError, OSError):
                asyncio.get_running_loop().remove_reader(self._sock.fileno())
            self._sock.close()
        if self._process is not None and self._process.returncode is None:
            try:
                await asyncio.wait_for(self._process.wait(), timeout)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    self._process.kill()
                await self._process.wait()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


HOST_MODULE = "phloem.runtimes.python.host"


def _zygote_key(launch: Launch) -> tuple[tuple[str, str], str, list[str]] | None:
    """(interpreter, runtime dir), entry and ``sys.path`` entries when the launch runs the
    Python host as a non-root user; ``None`` for anything a zygote cannot fork."""
    cmd = launch.spec.command
    if len(cmd) != 5 or cmd[1:4] != ["-m", HOST_MODULE, "--app"]:
        return None
    if launch.spec.identity.uid == 0:
        return None  # the zygote never runs user code as root
    path = [p for p in launch.env.get("PYTHONPATH", "").split(os.pathsep) if p]
    if not path:
        return None
    return (cmd[0], path[-1]), cmd[4], path


def procs_files(slot: MemorySlot) -> list[str]:
    """The ``cgroup.procs`` files a process writes its pid to, to join ``slot``."""
    return list(slot.procs_files)


def cgroup_procs(slot: MemorySlot) -> tuple[bool, list[str]]:
    """Whether a process started before it knew its isolate (a zygote's child, a Node
    standby) can honour ``slot``, and the ``cgroup.procs`` files it joins."""
    files = procs_files(slot)
    # Without cgroups: no wrapper to run before exec (the RSS watchdog only needs the pid).
    return bool(files) or slot.wrap([]) == [], files


class ZygoteSpawner:
    """Fork Python isolates from a zygote per (interpreter, runtime directory); anything
    else, and everything while a zygote is down, goes to ``fallback``. A zygote that died
    is restarted on a later spawn, no sooner than ``retry_s`` after the last attempt
    (doubling up to ten minutes while attempts fail)."""

    name = "zygote"

    def __init__(self, fallback: Spawner | None = None, *, retry_s: float = 1.0,
                 start_timeout_s: float = 30.0) -> None:
        self.fallback: Spawner = fallback or DirectSpawner()
        self.retry_s = retry_s
        self.start_timeout_s = start_timeout_s
        self.zygotes: dict[tuple[str, str], ZygoteClient] = {}
        self._starting: dict[tuple[str, str], asyncio.Task[bool]] = {}
        self._retry_at: dict[tuple[str, str], float] = {}
        self._backoff: dict[tuple[str, str], float] = {}
        self._stopped = False

    async def prestart(self, python: str, runtime_dir: Path | str) -> bool:
        """Start the zygote for isolates running ``python`` with ``runtime_dir`` and wait
        until it is ready; ``False`` (logged) if it could not start."""
        key = (python, str(runtime_dir))
        client = self.zygotes.get(key)
        if client is not None and client.alive:
            return True
        task = self._starting.get(key) or self._start_zygote(key)
        return await asyncio.shield(task)

    def _start_zygote(self, key: tuple[str, str]) -> asyncio.Task[bool]:
        async def start() -> bool:
            client = ZygoteClient(*key)
            try:
                await client.start(self.start_timeout_s)
            except Exception as exc:
                backoff = min(self._backoff.get(key, self.retry_s / 2) * 2, 600.0)
                self._backoff[key] = backoff
                self._retry_at[key] = time.monotonic() + backoff
                log.warning("python zygote for %s could not start (%s); isolates start "
                            "without it", key[1], exc)
                return False
            finally:
                self._starting.pop(key, None)
            if self._stopped:
                await client.stop()
                return False
            self._backoff.pop(key, None)
            self.zygotes[key] = client
            return True

        task = asyncio.create_task(start())
        self._starting[key] = task
        self._retry_at[key] = time.monotonic() + self.retry_s
        return task

    def zygote_for(self, key: tuple[str, str]) -> ZygoteClient | None:
        """The live zygote for ``key``; starts one in the background when there is none
        and a retry is due."""
        client = self.zygotes.get(key)
        if client is not None and client.alive:
            return client
        if (not self._stopped and key not in self._starting
                and time.monotonic() >= self._retry_at.get(key, 0.0)):
            self._start_zygote(key)
        return None

    async def spawn(self, launch: Launch) -> IsolateProcess:
        plan = _zygote_key(launch)
        joinable, procs = cgroup_procs(launch.memory)
        if plan is None or not joinable or self._stopped:
            return await self.fallback.spawn(launch)
        key, entry, path = plan
        client = self.zygote_for(key)
        if client is None:
            return await self.fallback.spawn(launch)
        try:
            return await client.spawn(launch, entry, path, procs)
        except ZygoteUnavailable as exc:
            log.warning("python zygote could not start an isolate of %s (%s); spawning it "
                        "directly", launch.spec.slug, exc)
            return await self.fallback.spawn(launch)

    async def stop(self) -> None:
        """Stop every zygote; call once the isolates are stopped (they die with it)."""
        self._stopped = True
        for task in list(self._starting.values()):
            task.cancel()
        await asyncio.gather(*(z.stop() for z in self.zygotes.values()),
                             return_exceptions=True)
        self.zygotes.clear()
        stop_fallback = getattr(self.fallback, "stop", None)
        if stop_fallback is not None:
            await stop_fallback()


# -- isolates ----------------------------------------------------------------------------

PF_EXITING = 0x4  # include/linux/sched.h


def _exiting(pid: int) -> bool:
    """Has ``pid`` begun to exit? A dying process drops its descriptors first but releases
    the sockets behind them last (deferred to the end of its exit), so its listening socket
    still accepts a connection a moment after the connections it served were closed: the
    new one would only be reset. (The pid cannot be reused before the supervisor has seen
    the exit: it is our child or the zygote's, unreaped until then.)"""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return True
    # After "pid (comm) ": state ppid pgrp session tty_nr tpgid flags ...
    return bool(int(stat.rsplit(b") ", 1)[1].split()[6]) & PF_EXITING)


@dataclass
class Isolate:
    spec: IsolateSpec
    socket_path: Path
    log: LogWriter
    id: str = field(default_factory=lambda: "iso-" + secrets.token_hex(4))
    inflight: int = 0
    open_streams: int = 0
    #: ``wait_until`` work is pending in the process.
    background: bool = False
    state: str = "starting"  # starting -> ready -> stopping -> exited
    started_at: float = field(default_factory=time.monotonic)
    cold_start_s: float | None = None
    last_active: float = field(default_factory=time.monotonic)
    exit_code: int | None = None
    exit_reason: str | None = None
    _process: IsolateProcess | None = None
    _memory: MemorySlot | None = None
    _idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = field(default_factory=list)
    _ready: asyncio.Future[None] | None = None
    _exited: asyncio.Event = field(default_factory=asyncio.Event)
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    @property
    def busy(self) -> bool:
        """Anything that keeps the isolate from being idle."""
        return self.inflight > 0 or self.open_streams > 0 or self.background

    async def start(self, memory: MemoryLimiter, spawner: Spawner | None = None) -> None:
        """Start the process; returns at once. ``wait_ready`` waits for readiness."""
        loop = asyncio.get_running_loop()
        self._ready = loop.create_future()
        with contextlib.suppress(FileNotFoundError):
            self.socket_path.unlink()
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        status_r, status_w = os.pipe()
        try:
            listener.bind(str(self.socket_path))
            os.chmod(self.socket_path, 0o600)
            listener.listen(1024)
            fd = listener.fileno()
            self._memory = memory.prepare(self.id, self.spec.limits.memory_mb * 2**20)
            # PHLOEM_ISOLATE tells isolates apart: in their sandboxes every one is pid 1.
            env = {**self.spec.env, "PHLOEM_WAIT_UNTIL_S": str(self.spec.limits.wait_until_s),
                   "PHLOEM_ISOLATE": self.id}
            if self.spec.sandbox is None:
                # The host exits when its parent is no longer the platform; in a sandbox
                # it is the first process of its PID namespace and PR_SET_PDEATHSIG,
                # set by the launcher or the zygote, does that.
                env["PHLOEM_SUPERVISOR_PID"] = str(os.getpid())
            self._process = await (spawner or DirectSpawner()).spawn(
                Launch(self.spec, env, fd, status_w, self._memory))
            self._memory.started(self._process.pid)
        except BaseException:
            os.close(status_r)
            if self._memory is not None:
                self._memory.finished()
            raise
        finally:
            listener.close()
            os.close(status_w)
        self._tasks = [
            asyncio.create_task(self._pump(self._process.stdout, "stdout")),
            asyncio.create_task(self._pump(self._process.stderr, "stderr")),
            asyncio.create_task(self._watch_status(status_r)),
            asyncio.create_task(self._watch_exit()),
        ]

    async def _pump(self, stream: asyncio.StreamReader, name: str) -> None:
        while True:
            try:
                line = await stream.readline()
            except ValueError:  # a line longer than the buffer: take what is there
                line = await stream.read(65536)
            if not line:
                return
            self.log(self.id, name, line.decode(errors="replace").rstrip("\n"))

    async def _watch_status(self, fd: int) -> None:
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader()
        transport, _ = await loop.connect_read_pipe(
            lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(fd, "rb", 0)
        )
        assert self._ready is not None
        try:
            while True:
                event = await reader.read(1)
                if not event:
                    return
                if event == b"R" and not self._ready.done():
                    self.cold_start_s = time.monotonic() - self.started_at
                    self.state = "ready"
                    self.last_active = time.monotonic()
                    how = self._process.how if self._process else "started"
                    self.log(self.id, "phloem", f"isolate ready in "
                             f"{self.cold_start_s * 1000:.0f} ms ({how})")
                    self._ready.set_result(None)
                elif event == b"W":
                    self.background = True
                elif event == b"D":
                    self.background = False
                    self.last_active = time.monotonic()
        finally:
            transport.close()

    async def _watch_exit(self) -> None:
        assert self._process is not None
        code = await self._process.wait()
        # Let the pumps flush what the process printed last, for the failure reason.
        await asyncio.gather(*self._tasks[:2], return_exceptions=True)
        self.exit_code = code
        if self._memory is not None:
            self.exit_reason = self._memory.finished()
        was = self.state
        self.state = "exited"
        self.background = False
        for _, writer in self._idle:
            writer.close()
        self._idle.clear()
        reason = f": {self.exit_reason}" if self.exit_reason else ""
        exited = "exited" + (f" with code {code}" if code is not None
                             else " (exit status unknown: the zygote is gone)")
        self.log(self.id, "phloem", f"isolate {exited} (was {was}){reason}")
        assert self._ready is not None
        if not self._ready.done():
            self._ready.set_exception(IsolateFailed(
                f"isolate {exited} before it was ready{reason}; see "
                f"'phloem functions logs {self.spec.slug}'"))
        with contextlib.suppress(FileNotFoundError):
            self.socket_path.unlink()
        self._exited.set()

    async def wait_ready(self, timeout: float) -> None:
        assert self._ready is not None
        try:
            await asyncio.wait_for(asyncio.shield(self._ready), timeout)
        except TimeoutError:
            raise IsolateFailed(f"isolate not ready after {timeout:.0f} s") from None

    async def wait_exited(self) -> None:
        await self._exited.wait()

    @property
    def alive(self) -> bool:
        return self.state in ("starting", "ready")

    def take_idle(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter] | None:
        """The most recently used open connection of the idle pool (dead ones on the way
        are closed), or ``None``."""
        while self._idle:
            reader, writer = self._idle.pop()
            if not reader.at_eof() and not writer.is_closing():
                return reader, writer
            writer.close()
        return None

    @property
    def idle_connections(self) -> int:
        return len(self._idle)

    def close_oldest_idle(self, count: int) -> None:
        """Close the ``count`` least recently used idle connections (the pool is a stack:
        its bottom was used longest ago)."""
        for _, writer in self._idle[:count]:
            writer.close()
        del self._idle[:count]

    async def connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, bool]:
        """A connection to the app, from the idle pool when one is there; the flag says
        whether it was reused."""
        self.last_active = time.monotonic()
        pooled = self.take_idle()
        if pooled is not None:
            return pooled[0], pooled[1], True
        reader, writer = await asyncio.open_unix_connection(str(self.socket_path),
                                                            limit=2**20)
        if self.pid is not None and _exiting(self.pid):
            writer.close()
            raise ConnectionRefusedError(f"isolate {self.id} is exiting")
        return reader, writer, False

    def give_back(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                  reusable: bool) -> None:
        self.last_active = time.monotonic()
        if reusable and self.state == "ready" and not writer.is_closing():
            self._idle.append((reader, writer))
        else:
            writer.close()

    def send_signal(self, sig: int) -> None:
        if self._process is not None:
            self._process.send_signal(sig)

    async def stop(self, grace: float) -> None:
        """SIGINT (the app drains and runs its shutdown hooks), SIGKILL after ``grace``."""
        if self.state == "exited":
            return
        self.state = "stopping"
        for _, writer in self._idle:
            writer.close()
        self._idle.clear()
        self.send_signal(signal.SIGINT)
        try:
            await asyncio.wait_for(self._exited.wait(), grace)
        except TimeoutError:
            self.log(self.id, "phloem", f"isolate still running {grace:.0f} s after SIGINT;"
                     " SIGKILL")
            self.send_signal(signal.SIGKILL)
            await self._exited.wait()
