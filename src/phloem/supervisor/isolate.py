"""One isolate: an OS process serving one deployment over HTTP/1.1 on a Unix socket.

The supervisor creates and binds the listening socket itself and hands the process the
descriptor, so the socket file stays root's (0600: no other isolate can connect to it) and
a request that arrives before the app is ready simply waits in the kernel's backlog. The
process reports readiness by writing one byte to an inherited pipe.
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


LogWriter = Callable[[str, str, str], None]  # (isolate id, stream, line)


@dataclass
class Isolate:
    spec: IsolateSpec
    socket_path: Path
    log: LogWriter
    id: str = field(default_factory=lambda: "iso-" + secrets.token_hex(4))
    inflight: int = 0
    open_streams: int = 0
    state: str = "starting"  # starting -> ready -> stopping -> exited
    started_at: float = field(default_factory=time.monotonic)
    cold_start_s: float | None = None
    last_active: float = field(default_factory=time.monotonic)
    exit_code: int | None = None
    _process: asyncio.subprocess.Process | None = None
    _idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = field(default_factory=list)
    _ready: asyncio.Future[None] | None = None
    _exited: asyncio.Event = field(default_factory=asyncio.Event)
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    async def start(self) -> None:
        """Spawn the process; returns at once. ``wait_ready`` waits for readiness."""
        loop = asyncio.get_running_loop()
        self._ready = loop.create_future()
        with contextlib.suppress(FileNotFoundError):
            self.socket_path.unlink()
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        ready_r, ready_w = os.pipe()
        try:
            listener.bind(str(self.socket_path))
            os.chmod(self.socket_path, 0o600)
            listener.listen(1024)
            fd = listener.fileno()
            cmd = [*self.spec.identity.command_prefix(), *self.spec.command,
                   "--fd", str(fd), "--ready-fd", str(ready_w)]
            env = {**self.spec.env, "PHLOEM_SUPERVISOR_PID": str(os.getpid())}
            self._process = await asyncio.create_subprocess_exec(
                *cmd, cwd=self.spec.cwd, env=env, stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
                pass_fds=(fd, ready_w), start_new_session=True,
            )
        finally:
            listener.close()
            os.close(ready_w)
        assert self._process.stdout and self._process.stderr
        self._tasks = [
            asyncio.create_task(self._pump(self._process.stdout, "stdout")),
            asyncio.create_task(self._pump(self._process.stderr, "stderr")),
            asyncio.create_task(self._watch_ready(ready_r)),
            asyncio.create_task(self._watch_exit()),
        ]

    async def _pump(self, stream: asyncio.StreamReader, name: str) -> None:
        while True:
            line = await stream.readline()
            if not line:
                return
            self.log(self.id, name, line.decode(errors="replace").rstrip("\n"))

    async def _watch_ready(self, fd: int) -> None:
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader()
        transport, _ = await loop.connect_read_pipe(
            lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(fd, "rb", 0)
        )
        try:
            got = await reader.read(1)
        finally:
            transport.close()
        assert self._ready is not None
        if got and not self._ready.done():
            self.cold_start_s = time.monotonic() - self.started_at
            self.state = "ready"
            self.log(self.id, "phloem", f"isolate ready in {self.cold_start_s * 1000:.0f} ms")
            self._ready.set_result(None)

    async def _watch_exit(self) -> None:
        assert self._process is not None
        code = await self._process.wait()
        # Let the pumps flush what the process printed last, for the failure reason.
        await asyncio.gather(*self._tasks[:2], return_exceptions=True)
        self.exit_code = code
        was = self.state
        self.state = "exited"
        for _, writer in self._idle:
            writer.close()
        self._idle.clear()
        self.log(self.id, "phloem", f"isolate exited with code {code} (was {was})")
        assert self._ready is not None
        if not self._ready.done():
            self._ready.set_exception(IsolateFailed(
                f"isolate exited with code {code} before it was ready; see "
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

    @property
    def alive(self) -> bool:
        return self.state in ("starting", "ready")

    async def connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        while self._idle:
            reader, writer = self._idle.pop()
            if not reader.at_eof() and not writer.is_closing():
                return reader, writer
            writer.close()
        return await asyncio.open_unix_connection(str(self.socket_path), limit=2**20)

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
