"""Node isolates activated from a standby: a Node process started ahead of need, as root,
with Node booted and the host program loaded, waiting to become one isolate.

    spawner = NodeStandbySpawner(fallback=DirectSpawner())
    process = await spawner.spawn(launch)   # activates the standby, or spawns directly

A cold start then costs the function's own import only, not Node's boot and the host's
load. Activation (host.mjs ``--standby``) joins the isolate's cgroup, binds the isolate's
socket path, drops to the function's uid/gid for good and checks root cannot be regained,
replaces the environment and the working directory, and only then imports the user's
bundle, so no user code ever runs with privileges. One standby is kept per distinct
command (Node binary, V8 flags such as the heap limit, host program); taking it starts the
next one in the background. Launches it cannot serve (root identities, memory limits a
running process cannot join, other runtimes) and every launch while no standby is ready
go to ``fallback``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket

from phloem.supervisor.isolate import (
    DirectProcess,
    DirectSpawner,
    IsolateProcess,
    Launch,
    Spawner,
    cgroup_procs,
)

log = logging.getLogger("phloem.supervisor")

StandbyKey = tuple[str, ...]


class StandbyFailed(RuntimeError):
    pass


class StandbyProcess(DirectProcess):
    how = "activated from a standby"

    def __init__(self, process: asyncio.subprocess.Process, relay: asyncio.Task[None]) -> None:
        super().__init__(process)
        # The event loop keeps only weak references to tasks: without this one the status
        # relay could be collected mid-flight and the isolate would never report ready.
        self._relay = relay


class _Standby:
    """One waiting Node host; its status pipe is read here and relayed after activation."""

    def __init__(self, process: asyncio.subprocess.Process, status: asyncio.StreamReader,
                 transport: asyncio.BaseTransport) -> None:
        self.process = process
        self.status = status
        self._transport = transport

    @classmethod
    async def start(cls, key: StandbyKey, timeout: float) -> _Standby:
        loop = asyncio.get_running_loop()
        status_r, status_w = os.pipe()
        try:
            process = await asyncio.create_subprocess_exec(
                *key, "--standby", "--ready-fd", str(status_w),
                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE, pass_fds=(status_w,),
                start_new_session=True, cwd="/",
                env={"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8",
                     "PHLOEM_SUPERVISOR_PID": str(os.getpid())})
        except BaseException:
            os.close(status_r)
            raise
        finally:
            os.close(status_w)
        reader = asyncio.StreamReader()
        transport, _ = await loop.connect_read_pipe(
            lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(status_r, "rb", 0))
        standby = cls(process, reader, transport)
        try:
            first = await asyncio.wait_for(reader.read(1), timeout)
        except (TimeoutError, OSError):
            first = b""
        if first != b"S":
            assert process.stderr is not None
            standby.kill()
            await process.wait()
            why = (await process.stderr.read(2000)).decode(errors="replace").strip()
            raise StandbyFailed(f"exited with {process.returncode}: {why}" if why
                                else f"not ready within {timeout:.0f} s")
        return standby

    @property
    def alive(self) -> bool:
        return self.process.returncode is None

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            self.process.kill()
        self._transport.close()

    async def activate(self, launch: Launch, bundle: str,
                       cgroup_procs: str | None) -> IsolateProcess:
        with socket.socket(fileno=os.dup(launch.listen_fd)) as listener:
            path = listener.getsockname()
        spec = launch.spec
        message = {"uid": spec.identity.uid, "gid": spec.identity.gid,
                   "cgroupProcs": cgroup_procs, "socket": path, "cwd": str(spec.cwd),
                   "env": launch.env, "bundle": bundle}
        assert self.process.stdin is not None
        try:
            self.process.stdin.write(json.dumps(message).encode() + b"\n")
            await self.process.stdin.drain()
            self.process.stdin.close()
        except (BrokenPipeError, ConnectionResetError) as exc:
            self.kill()
            raise StandbyFailed(f"could not send the activation: {exc}") from None
        out_fd = os.dup(launch.status_fd)
        return StandbyProcess(self.process, asyncio.create_task(self._relay_status(out_fd)))

    async def _relay_status(self, out_fd: int) -> None:
        """Pass the isolate's R/W/D bytes on to the supervisor's status pipe."""
        try:
            while chunk := await self.status.read(64):
                os.write(out_fd, chunk)
        except OSError:
            pass
        finally:
            os.close(out_fd)
            self._transport.close()


def _standby_plan(launch: Launch) -> tuple[StandbyKey, str] | None:
    """(command without the bundle, bundle) for a Node host launch as a non-root user."""
    cmd = launch.spec.command
    if len(cmd) < 4 or cmd[-2] != "--bundle" or not cmd[-3].endswith(".mjs"):
        return None
    if launch.spec.identity.uid == 0:
        return None  # a standby only ever becomes an unprivileged isolate
    return tuple(cmd[:-2]), cmd[-1]


class NodeStandbySpawner:
    name = "node-standby"

    def __init__(self, fallback: Spawner | None = None, *,
                 start_timeout_s: float = 30.0) -> None:
        self.fallback: Spawner = fallback or DirectSpawner()
        self.start_timeout_s = start_timeout_s
        self._ready: dict[StandbyKey, _Standby] = {}
        self._starting: dict[StandbyKey, asyncio.Task[None]] = {}
        self._failures: dict[StandbyKey, int] = {}
        self._stopped = False

    def _replenish(self, key: StandbyKey) -> None:
        if self._stopped or key in self._starting or self._failures.get(key, 0) >= 3:
            return

        async def start() -> None:
            try:
                standby = await _Standby.start(key, self.start_timeout_s)
            except (StandbyFailed, OSError) as exc:
                self._failures[key] = self._failures.get(key, 0) + 1
                log.warning("node standby could not start (%s); isolates are spawned "
                            "directly", exc)
                return
            finally:
                self._starting.pop(key, None)
            if self._stopped:
                standby.kill()
                return
            self._failures.pop(key, None)
            self._ready[key] = standby

        self._starting[key] = asyncio.create_task(start())

    async def spawn(self, launch: Launch) -> IsolateProcess:
        plan = _standby_plan(launch)
        joinable, procs = cgroup_procs(launch.memory)
        if plan is None or not joinable or self._stopped:
            return await self.fallback.spawn(launch)
        key, bundle = plan
        standby = self._ready.pop(key, None)
        self._replenish(key)
        if standby is None or not standby.alive:
            if standby is not None:
                standby.kill()
            return await self.fallback.spawn(launch)
        try:
            return await standby.activate(launch, bundle, procs)
        except StandbyFailed as exc:
            log.warning("node standby could not start an isolate of %s (%s); spawning it "
                        "directly", launch.spec.slug, exc)
            return await self.fallback.spawn(launch)

    async def stop(self) -> None:
        self._stopped = True
        for task in list(self._starting.values()):
            task.cancel()
        for standby in self._ready.values():
            standby.kill()
            with contextlib.suppress(Exception):
                await standby.process.wait()
        self._ready.clear()
