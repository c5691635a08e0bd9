"""Python isolates forked from a zygote: the supervisor's end of
``phloem.runtimes.python.zygote`` (a process per interpreter and runtime directory with
uvicorn and the rest of a host's start-up already imported, started by the platform as
root, never holding any function's code or env).

    spawner = ZygoteSpawner(fallback=DirectSpawner(), warm=[(python, runtime_dir)])
    await spawner.start()                    # the zygotes of ``warm``, ready
    process = await spawner.spawn(launch)    # forked, or spawned by the fallback

A launch is forked when its spec carries a :class:`ZygoteStart` (written by the Python
runtime from what it built, never read back from the command line or the env, which the
function controls) and runs as an unprivileged uid; anything else, and everything while
its zygote is down, goes to the fallback.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import os
import signal
import socket
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from phloem.runtimes.python import zygote as pyzygote
from phloem.supervisor.isolate import (
    DirectSpawner,
    IsolateProcess,
    Launch,
    PipedOutput,
    Spawner,
    cgroup_procs,
)

log = logging.getLogger("phloem.supervisor")


@dataclass(frozen=True)
class ZygoteStart:
    """How a zygote starts one Python isolate: the zygote for ``(interpreter,
    runtime_dir)`` forks a child that serves ``entry`` with ``path`` in front of
    ``sys.path`` (as ``PYTHONPATH`` would put it for a spawned host)."""

    interpreter: str
    runtime_dir: str
    entry: str
    path: tuple[str, ...]

    @property
    def key(self) -> tuple[str, str]:
        return (self.interpreter, self.runtime_dir)


class ZygoteUnavailable(RuntimeError):
    """The zygote cannot start this isolate (down, refused, not answering)."""


def _wake(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


class _PipeProtocol(asyncio.StreamReaderProtocol):
    """A read pipe's protocol that lets its transport close at EOF. uvloop (which
    ``phloem up`` runs on) keeps a transport open when ``eof_received`` returns true, as
    ``StreamReaderProtocol``'s does, and nothing else closes these: each exited isolate
    left its stdout and stderr pipes open in the platform. (asyncio's own pipe transport
    closes at EOF whatever this returns.)"""

    def eof_received(self) -> bool:
        super().eof_received()
        return False


async def _pipe_reader(fd: int) -> asyncio.StreamReader:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=2**16)  # as asyncio's subprocess pipes
    await loop.connect_read_pipe(lambda: _PipeProtocol(reader), os.fdopen(fd, "rb", 0))
    return reader


class ZygoteProcess(PipedOutput):
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


class ZygoteSpawner:
    """Fork Python isolates from a zygote per (interpreter, runtime directory); anything
    else, and everything while a zygote is down, goes to ``fallback``. A zygote that died
    is restarted on a later spawn, no sooner than ``retry_s`` after the last attempt
    (doubling up to ten minutes while attempts fail)."""

    name = "zygote"

    def __init__(self, fallback: Spawner | None = None, *,
                 warm: Iterable[tuple[str, Path | str]] = (), retry_s: float = 1.0,
                 start_timeout_s: float = 30.0) -> None:
        self.fallback: Spawner = fallback or DirectSpawner()
        #: (interpreter, runtime dir) of the zygotes :meth:`start` starts.
        self.warm = [(python, str(runtime_dir)) for python, runtime_dir in warm]
        self.retry_s = retry_s
        self.start_timeout_s = start_timeout_s
        self.zygotes: dict[tuple[str, str], ZygoteClient] = {}
        self._starting: dict[tuple[str, str], asyncio.Task[bool]] = {}
        self._retry_at: dict[tuple[str, str], float] = {}
        self._backoff: dict[tuple[str, str], float] = {}
        self._stopped = False

    async def start(self) -> None:
        for python, runtime_dir in self.warm:
            await self.prestart(python, runtime_dir)
        await self.fallback.start()

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

    def keys(self) -> set[tuple[str, str]]:
        """(interpreter, runtime dir) of every zygote running or starting."""
        return {k for k, z in self.zygotes.items() if z.alive} | set(self._starting)

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
        start = launch.spec.start
        joinable, procs = cgroup_procs(launch.memory)
        # The zygote never runs user code as root.
        if (not isinstance(start, ZygoteStart) or launch.spec.identity.uid == 0
                or not joinable or self._stopped):
            return await self.fallback.spawn(launch)
        client = self.zygote_for(start.key)
        if client is None:
            return await self.fallback.spawn(launch)
        try:
            return await client.spawn(launch, start.entry, list(start.path), procs)
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
        await self.fallback.stop()
