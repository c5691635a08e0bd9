"""One isolate: an OS process serving one deployment over HTTP/1.1 on a Unix socket.

The supervisor creates and binds the listening socket itself and hands the process the
descriptor, so the socket file stays root's (0600: no other isolate can connect to it) and
a request that arrives before the app is ready simply waits in the kernel's backlog.

The process talks back over an inherited pipe, one byte per event: ``R`` ready (lifespan
startup done), ``W`` background (``wait_until``) work pending, ``D`` none pending.

How the process comes to exist is a ``Spawner``'s business (as uvicorn swaps loop and
protocol implementations): ``DirectSpawner`` executes the deployment's command (a fresh
interpreter, ~200 ms of imports before the app's own). Runtimes bring faster ones that
serve the *start plan* a spec carries (``IsolateSpec.start``, e.g. a Python zygote's fork,
a Node standby's activation) and hand everything else to the next spawner, ending with the
direct one (see ``phloem.runtimes.registry.spawners``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import signal
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from phloem.gateway.idle import IdleConnections
from phloem.sandbox import LAUNCHER_ENV, Job, SandboxSpec
from phloem.supervisor.cgroups import MemoryLimiter, MemorySlot
from phloem.system.identity import Identity
from phloem.system.limits import FunctionLimits

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
    #: The runtime's start plan (``IsolatePlan.start``): how its own spawner starts this
    #: isolate without running ``command``; spawners that do not know it spawn directly.
    start: object | None = None


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

    async def start(self) -> None:
        """Start what must be warm before the first isolate (and the fallback's)."""
        ...

    async def spawn(self, launch: Launch) -> IsolateProcess: ...

    async def stop(self) -> None:
        """Stop what ``start`` and spawns started (and the fallback's); after the
        isolates, which may die with it."""
        ...


class PipedOutput:
    """stdout/stderr of an isolate process, as the supervisor reads them."""

    _stdout: asyncio.StreamReader
    _stderr: asyncio.StreamReader

    @property
    def stdout(self) -> asyncio.StreamReader:
        return self._stdout

    @property
    def stderr(self) -> asyncio.StreamReader:
        return self._stderr


class DirectProcess(PipedOutput):
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

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        pass

    async def spawn(self, launch: Launch) -> IsolateProcess:
        spec = launch.spec
        command = [*spec.command, "--fd", str(launch.listen_fd),
                   "--ready-fd", str(launch.status_fd)]
        fds = (launch.listen_fd, launch.status_fd)
        if spec.sandbox is not None or not spec.identity.is_self:
            # As root, with or without a sandbox: nothing of the function's (its env above
            # all) may reach a root helper before the drop. The launcher is the parent,
            # and PR_SET_PDEATHSIG, set by it, ends the isolate with it.
            job = Job(argv=command, env=launch.env, cwd=str(spec.cwd),
                      uid=spec.identity.uid, gid=spec.identity.gid, sandbox=spec.sandbox,
                      procs_files=list(launch.memory.procs_files), keep_fds=list(fds),
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
        # The host exits when its parent is no longer the platform.
        env = {**launch.env, "PHLOEM_SUPERVISOR_PID": str(os.getpid())}
        process = await asyncio.create_subprocess_exec(
            *cmd, cwd=spec.cwd, env=env, stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            pass_fds=fds, start_new_session=True,
        )
        return DirectProcess(process)


def cgroup_procs(slot: MemorySlot) -> tuple[bool, list[str]]:
    """Whether a process started before it knew its isolate (a zygote's child, a Node
    standby) can honour ``slot``, and the ``cgroup.procs`` files it joins."""
    files = list(slot.procs_files)
    # Without cgroups: no wrapper to run before exec (the RSS watchdog only needs the pid).
    return bool(files) or slot.wrap([]) == [], files


# -- isolates ----------------------------------------------------------------------------

PF_EXITING = 0x4  # include/linux/sched.h

#: What an upstream connection's reader holds before it stops reading the isolate (it
#: pauses above twice this): a client that stops reading a response must cost the
#: gateway little more than the socket buffers (the gateway only reads from it while the
#: client keeps up).
UPSTREAM_BUFFER = 64 * 1024


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
    exit_reason: str | None = None
    _process: IsolateProcess | None = None
    _memory: MemorySlot | None = None
    #: Open connections to the app that no lease holds (the supervisor's leases take from
    #: and give back to it directly: it is compiled, and this class is not).
    idle: IdleConnections = field(default_factory=IdleConnections)
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
        # At once, before the output is flushed: no request may be sent to a dead process
        # (its pooled connections would only fail, see Lease.release).
        was = self.state
        self.state = "exited"
        self.background = False
        self.idle.close_all()
        # Let the pumps flush what the process printed last, for the failure reason.
        await asyncio.gather(*self._tasks[:2], return_exceptions=True)
        if self._memory is not None:
            self.exit_reason = self._memory.finished()
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

    def connection_broke(self) -> None:
        """A connection to the process ended without a clean answer. If the process is
        dying, stop leasing it now and drop its idle connections: its exit may be noticed
        only later (the exit watch, the launcher's own exit), and every request sent to
        one of them meanwhile would fail."""
        pid = self.pid
        if self.alive and pid is not None and _exiting(pid):
            self.log(self.id, "phloem", "isolate is exiting: no new requests")
            self.state = "stopping"
            self.idle.close_all()

    async def connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, bool]:
        """A connection to the app, from the idle pool when one is there; the flag says
        whether it was reused."""
        self.last_active = time.monotonic()
        pooled = self.idle.take()
        if pooled is not None:
            return pooled[0], pooled[1], True
        reader, writer = await asyncio.open_unix_connection(str(self.socket_path),
                                                            limit=UPSTREAM_BUFFER)
        if self.pid is not None and _exiting(self.pid):
            writer.close()
            raise ConnectionRefusedError(f"isolate {self.id} is exiting")
        return reader, writer, False

    def send_signal(self, sig: int) -> None:
        if self._process is not None:
            self._process.send_signal(sig)

    async def stop(self, grace: float, wait_until_s: float = 0.0) -> None:
        """SIGINT (the app finishes its requests and its ``wait_until`` work, then runs its
        shutdown hooks), SIGKILL after ``grace``. With ``wait_until_s`` (platform
        shutdown), pending ``wait_until`` work gets up to that long before the grace
        starts, as it would on a redeploy: the grace is for shutdown hooks, not for work
        the function was promised."""
        if self.state == "exited":
            return
        self.state = "stopping"
        self.idle.close_all()
        self.send_signal(signal.SIGINT)
        loop = asyncio.get_running_loop()
        budget_end = loop.time() + wait_until_s
        deadline = loop.time() + grace
        waited_for_work = False
        while not self._exited.is_set():
            now = loop.time()
            if self.background and now < budget_end:
                if not waited_for_work:
                    waited_for_work = True
                    self.log(self.id, "phloem", "wait_until work pending at shutdown: "
                             f"waiting up to {budget_end - now:.0f} s for it")
                deadline = max(deadline, now + grace)  # the grace starts when it is done
            elif now >= deadline:
                self.log(self.id, "phloem", f"isolate still running {grace:.0f} s after "
                         "SIGINT; SIGKILL")
                self.send_signal(signal.SIGKILL)
                break
            # Polled: wait_until work may start or end at any moment (the W/D events).
            step = 0.1 if wait_until_s > 0 else deadline - now
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._exited.wait(), step)
        await self._exited.wait()
