"""One isolate: an OS process serving one deployment over HTTP/1.1 on a Unix socket.

The supervisor creates and binds the listening socket itself and hands the process the
descriptor, so the socket file stays root's (0600: no other isolate can connect to it) and
a request that arrives before the app is ready simply waits in the kernel's backlog.

The process talks back over an inherited pipe, one byte per event: ``R`` ready (lifespan
startup done), ``W`` background (``wait_until``) work pending, ``D`` none pending.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import signal
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from phloem.identity import Identity
from phloem.limits import FunctionLimits
from phloem.supervisor.memory import MemoryLimiter, MemorySlot


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


LogWriter = Callable[[str, str, str], None]  # (isolate id, stream, line)


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
    _process: asyncio.subprocess.Process | None = None
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

    async def start(self, memory: MemoryLimiter) -> None:
        """Spawn the process; returns at once. ``wait_ready`` waits for readiness."""
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
            cmd = self._memory.wrap([*self.spec.identity.command_prefix(), *self.spec.command,
                                     "--fd", str(fd), "--ready-fd", str(status_w)])
            env = {**self.spec.env, "PHLOEM_SUPERVISOR_PID": str(os.getpid()),
                   "PHLOEM_WAIT_UNTIL_S": str(self.spec.limits.wait_until_s)}
            self._process = await asyncio.create_subprocess_exec(
                *cmd, cwd=self.spec.cwd, env=env, stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
                pass_fds=(fd, status_w), start_new_session=True,
            )
            self._memory.started(self._process.pid)
        except BaseException:
            os.close(status_r)
            if self._memory is not None:
                self._memory.finished()
            raise
        finally:
            listener.close()
            os.close(status_w)
        assert self._process.stdout and self._process.stderr
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
                    self.log(self.id, "phloem",
                             f"isolate ready in {self.cold_start_s * 1000:.0f} ms")
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
        self.log(self.id, "phloem", f"isolate exited with code {code} (was {was}){reason}")
        assert self._ready is not None
        if not self._ready.done():
            self._ready.set_exception(IsolateFailed(
                f"isolate exited with code {code} before it was ready{reason}; see "
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

    async def connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, bool]:
        """A connection to the app, from the idle pool when one is there; the flag says
        whether it was reused."""
        self.last_active = time.monotonic()
        while self._idle:
            reader, writer = self._idle.pop()
            if not reader.at_eof() and not writer.is_closing():
                return reader, writer, True
            writer.close()
        reader, writer = await asyncio.open_unix_connection(str(self.socket_path),
                                                            limit=2**20)
        return reader, writer, False

    def give_back(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                  reusable: bool) -> None:
        self.last_active = time.monotonic()
        if reusable and self.state == "ready" and not writer.is_closing():
            self._idle.append((reader, writer))
        else:
            writer.close()

    def send_signal(self, sig: int) -> None:
        if self._process is not None and self._process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
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
