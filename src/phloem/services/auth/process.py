"""One branch's auth server: a Node process serving Better Auth on a Unix socket.

phloem (root) binds the socket itself, in the branch's directory (0700: only the gateway
can connect), and hands the listening descriptor to ``node server.mjs``, which runs as an
unprivileged system user: it never needs to reach that directory, and it holds nothing
but the branch database's owner password (in its environment, never in argv).

    server = AuthServer(spec)
    await server.start()      # migrates, listens; returns once it accepts connections
    ...                       # connect to spec.socket
    await server.stop()

The process is tied to the platform (``spawn_tied``): it gets SIGTERM when phloem dies,
however it dies. Its stdout and stderr (the development verification and reset links
among them) come to phloem through a pipe and go to ``spec.log_file``, a line at a time
with a timestamp, rotated by size as function logs are (:mod:`phloem.system.logfiles`).
Its last lines are kept: a server that fails to start says why in
:attr:`AuthServerError.reason`.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from phloem.system.identity import Identity
from phloem.system.lifeline import spawn_tied
from phloem.system.logfiles import KEEP, ROTATE_BYTES, RotatingFile, timestamp

#: What server.mjs prints before it exits on an error.
FAILED = "[neon-auth] failed: "
#: Output lines kept in memory for errors, and the longest line kept whole.
RECENT_LINES = 40
MAX_LINE = 64 * 1024


class AuthServerError(RuntimeError):
    """The auth server could not start; the message carries the end of its output,
    ``reason`` one line saying why (for the API's answer)."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class ServerSpec:
    node: Path
    #: The installation: server.mjs and node_modules (see install.ensure_auth_server).
    root: Path
    socket: Path
    log_file: Path
    #: AUTH_DATABASE_URL, AUTH_ORIGIN, AUTH_BASE_PATH, AUTH_TRUSTED_ORIGINS.
    env: Mapping[str, str]
    identity: Identity
    #: ``log_file`` rotates past this size, keeping ``log_keep`` older files.
    log_rotate_bytes: int = ROTATE_BYTES
    log_keep: int = KEEP

    def argv(self, *extra: str) -> list[str]:
        # A bounded heap: one small server per branch with auth on.
        return [str(self.node), "--max-old-space-size=192", str(self.root / "server.mjs"),
                *extra]

    def child_env(self) -> dict[str, str]:
        return {"PATH": "/usr/bin:/bin", "NODE_ENV": "production", "HOME": "/nonexistent",
                **self.env}


class AuthServer:
    def __init__(self, spec: ServerSpec) -> None:
        self.spec = spec
        self._proc: subprocess.Popen[bytes] | None = None
        #: time.monotonic() of the last lease: the service stops idle servers.
        self.last_used = time.monotonic()
        self._log = RotatingFile(spec.log_file, spec.log_rotate_bytes, spec.log_keep)
        self._recent: collections.deque[str] = collections.deque(maxlen=RECENT_LINES)
        #: The task copying the running process's output to the log.
        self._pump: asyncio.Task[None] | None = None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def _bind(self) -> socket.socket:
        path = self.spec.socket
        path.unlink(missing_ok=True)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(str(path))
            os.chmod(path, 0o600)
            sock.listen(512)
        except OSError:
            sock.close()
            raise
        return sock

    async def start(self, timeout: float = 60) -> None:
        """Start the server and wait until it listens (it creates its tables first);
        raise :class:`AuthServerError` with its log's end if it exits or times out."""
        if self.running:
            return
        sock = self._bind()
        ready_r, ready_w = os.pipe()
        try:
            self._proc = self._spawn(self.spec.argv(), sock.fileno(), ready_w)
        finally:
            sock.close()
            os.close(ready_w)
        try:
            await self._wait_ready(ready_r, timeout)
        except BaseException:
            await self.stop()
            raise
        finally:
            os.close(ready_r)
        self.last_used = time.monotonic()

    def _spawn(self, argv: list[str], listen_fd: int | None,
               ready_fd: int | None) -> subprocess.Popen[bytes]:
        env = self.spec.child_env()
        fds = []
        # pass_fds keeps the numbers: the child learns them from its environment.
        if listen_fd is not None and ready_fd is not None:
            env.update(LISTEN_FD=str(listen_fd), READY_FD=str(ready_fd))
            fds = [listen_fd, ready_fd]
        try:
            proc = spawn_tied(
                argv, signal.SIGTERM, env=env, cwd=str(self.spec.root),
                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                close_fds=True, pass_fds=fds, **self.spec.identity.popen_kwargs())
        except OSError as exc:
            raise AuthServerError(f"auth: cannot run {self.spec.node}: {exc}",
                                  f"cannot run {self.spec.node}: {exc}") from exc
        assert proc.stdout is not None
        self._recent.clear()
        self._pump = asyncio.create_task(self._copy_output(proc.stdout),
                                         name=f"auth-log {self.spec.log_file}")
        return proc

    async def _copy_output(self, pipe: IO[bytes]) -> None:
        """The process's output, line by line, to the log and :attr:`_recent`, until it
        closes it (it exits). A line longer than ``MAX_LINE`` is cut there."""
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(limit=MAX_LINE)
        try:
            transport, _ = await loop.connect_read_pipe(
                lambda: asyncio.StreamReaderProtocol(reader), pipe)
        except OSError as exc:  # not seen in practice; closed, it cannot fill and block
            pipe.close()
            self._recent.append(f"(auth: cannot read the server's output: {exc})")
            return
        rest = b""
        try:
            while chunk := await reader.read(MAX_LINE):
                lines = (rest + chunk).split(b"\n")
                rest = lines.pop()
                if len(rest) >= MAX_LINE:
                    lines.append(rest)
                    rest = b""
                for line in lines:
                    self._line(line.decode(errors="replace"))
            if rest:
                self._line(rest.decode(errors="replace"))
        finally:
            transport.close()

    def _line(self, line: str) -> None:
        self._recent.append(line)
        try:
            self._log.write(f"{timestamp()} {line}\n")
        except OSError as exc:  # a full disk must not block the server on its pipe
            self._recent.append(f"(auth.log: {exc})")

    async def _drained(self, timeout: float = 5) -> None:
        """Wait until the output of an exited process is all read (its last lines)."""
        if self._pump is not None:
            with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(asyncio.shield(self._pump), timeout)

    def _error(self, what: str) -> AuthServerError:
        """An :class:`AuthServerError` saying ``what``, with the process's last lines;
        its reason is the error server.mjs printed, else its last line."""
        lines = [ln for ln in self._recent if ln.strip()]
        failed = [ln for ln in lines if ln.startswith(FAILED)]
        reason = (failed[-1][len(FAILED):] if failed else lines[-1] if lines else what)
        reason = reason.strip()[:300]  # (its stack trace is on the lines after it)
        tail = "\n".join(lines[-20:])
        return AuthServerError(f"auth: {what}; see {self.spec.log_file}:\n{tail}",
                               f"{what}: {reason}" if reason != what else what)

    async def _wait_ready(self, ready_r: int, timeout: float) -> None:
        os.set_blocking(ready_r, False)
        deadline = time.monotonic() + timeout
        got = b""
        while b"\n" not in got:
            proc = self._proc
            assert proc is not None
            with contextlib.suppress(BlockingIOError):
                chunk = os.read(ready_r, 64)
                if not chunk and proc.poll() is not None:
                    await self._drained()
                    raise self._error(f"the server exited with {proc.returncode} before "
                                      "it listened")
                got += chunk
            if time.monotonic() > deadline:
                raise self._error(f"the server did not listen within {timeout:.0f} s")
            await asyncio.sleep(0.02)

    async def stop(self, timeout: float = 5) -> None:
        """SIGTERM (it closes its connections and pool), SIGKILL after ``timeout``."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.terminate()
            deadline = time.monotonic() + timeout
            while proc.poll() is None and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await asyncio.to_thread(proc.wait)
        self.spec.socket.unlink(missing_ok=True)
        await self._drained()
        self._log.close()  # reopened by the next start

    async def migrate(self, timeout: float = 120) -> None:
        """Create the schema and tables (``server.mjs --migrate``) without serving."""
        proc = self._spawn(self.spec.argv("--migrate"), None, None)
        deadline = time.monotonic() + timeout
        while proc.poll() is None:
            if time.monotonic() > deadline:
                proc.kill()
                await asyncio.to_thread(proc.wait)
                raise self._error(f"migrating took over {timeout:.0f} s")
            await asyncio.sleep(0.05)
        await self._drained()
        if proc.returncode != 0:
            raise self._error(f"migrating failed (exit {proc.returncode})")
