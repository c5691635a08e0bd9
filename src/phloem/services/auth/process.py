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
among them) go to ``spec.log_file``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from phloem.system.identity import Identity
from phloem.system.lifeline import spawn_tied


class AuthServerError(RuntimeError):
    """The auth server could not start; the message carries the end of its log."""


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

    def argv(self, *extra: str) -> list[str]:
        # A bounded heap: one small server per branch with auth on.
        return [str(self.node), "--max-old-space-size=192", str(self.root / "server.mjs"),
                *extra]

    def child_env(self) -> dict[str, str]:
        return {"PATH": "/usr/bin:/bin", "NODE_ENV": "production", "HOME": "/nonexistent",
                **self.env}


def _log_tail(path: Path, limit: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-limit:]
    except OSError:
        return ""


class AuthServer:
    def __init__(self, spec: ServerSpec) -> None:
        self.spec = spec
        self._proc: subprocess.Popen[bytes] | None = None
        #: time.monotonic() of the last lease: the service stops idle servers.
        self.last_used = time.monotonic()

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
        log = os.open(self.spec.log_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        env = self.spec.child_env()
        fds = []
        # pass_fds keeps the numbers: the child learns them from its environment.
        if listen_fd is not None and ready_fd is not None:
            env.update(LISTEN_FD=str(listen_fd), READY_FD=str(ready_fd))
            fds = [listen_fd, ready_fd]
        try:
            return spawn_tied(
                argv, signal.SIGTERM, env=env, cwd=str(self.spec.root),
                stdin=subprocess.DEVNULL, stdout=log, stderr=log, close_fds=True,
                pass_fds=fds, **self.spec.identity.popen_kwargs())
        except OSError as exc:
            raise AuthServerError(f"auth: cannot run {self.spec.node}: {exc}") from exc
        finally:
            os.close(log)

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
                    raise AuthServerError(
                        f"auth: the server exited with {proc.returncode} before it "
                        f"listened:\n{_log_tail(self.spec.log_file)}")
                got += chunk
            if time.monotonic() > deadline:
                raise AuthServerError(f"auth: the server did not listen within "
                                      f"{timeout:.0f} s:\n{_log_tail(self.spec.log_file)}")
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

    async def migrate(self, timeout: float = 120) -> None:
        """Create the schema and tables (``server.mjs --migrate``) without serving."""
        proc = self._spawn(self.spec.argv("--migrate"), None, None)
        deadline = time.monotonic() + timeout
        while proc.poll() is None:
            if time.monotonic() > deadline:
                proc.kill()
                await asyncio.to_thread(proc.wait)
                raise AuthServerError(f"auth: migrating took over {timeout:.0f} s")
            await asyncio.sleep(0.05)
        if proc.returncode != 0:
            raise AuthServerError(f"auth: migrating failed (exit {proc.returncode}):\n"
                                  f"{_log_tail(self.spec.log_file)}")
