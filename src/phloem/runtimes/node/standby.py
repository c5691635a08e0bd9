"""Node isolates activated from a standby: a Node process started ahead of need, as root,
with Node booted and the host program loaded, waiting to become one isolate.

    spawner = NodeStandbySpawner(fallback=DirectSpawner())
    process = await spawner.spawn(launch)   # activates a standby, or the fallback spawns

A cold start then costs the function's own import only, not Node's boot and the host's
load. A standby inherits a listening socket of its own from the start. With a sandbox it
runs under the sandbox launcher, in a root that shows the Node runtime but no function,
with only the setuid/setgid capabilities, ``no_new_privs`` and the seccomp filter; on
activation the launcher joins it to the isolate's cgroups and mounts the function's
deployment into its mount namespace. Then (host.mjs ``--standby``) it drops to the
function's uid/gid for good and checks root cannot be regained, only then reads the
function's env, and imports the user's bundle, so no user code and no byte of the
function's runs with privileges. The socket file is renamed to the isolate's path. One
standby is kept per distinct command (Node binary, V8 flags such as the heap limit, host
program, sandbox); taking it starts the next one in the background. What to start comes
from the :class:`StandbyStart` the Node runtime puts on the spec (never from parsing the
command line). Launches it cannot serve (no such plan, root identities, memory limits a
running process cannot join) and every launch while no standby is ready go to
``fallback``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import secrets
import socket
from dataclasses import dataclass, replace
from pathlib import Path

from phloem.sandbox import LAUNCHER_ENV, Job, SandboxSpec
from phloem.sandbox.lockdown import CAP_SETGID, CAP_SETUID, move_to_cgroups
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


@dataclass(frozen=True)
class StandbyStart:
    """How a standby becomes one Node isolate: a standby started with ``command`` (the
    host without a bundle) imports ``bundle``. ``private`` are the read-only paths of
    the isolate's sandbox that are the function's own (its deployment): a standby, made
    before it knows its function, shows none of them; they are mounted at activation."""

    command: tuple[str, ...]
    bundle: str
    private: tuple[str, ...]


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
                 transport: asyncio.BaseTransport, socket_path: Path,
                 sandbox: SandboxSpec | None) -> None:
        self.process = process
        self.status = status
        self._transport = transport
        self.socket_path = socket_path
        self.sandbox = sandbox

    @classmethod
    async def start(cls, key: StandbyKey, sandbox: SandboxSpec | None, socket_dir: Path,
                    timeout: float) -> _Standby:
        loop = asyncio.get_running_loop()
        socket_dir.mkdir(parents=True, exist_ok=True)
        path = socket_dir / f"standby-{secrets.token_hex(6)}.sock"
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        status_r, status_w = os.pipe()
        job_fd = -1
        try:
            listener.bind(str(path))
            os.chmod(path, 0o600)
            listener.listen(1024)
            fds: tuple[int, ...] = (listener.fileno(), status_w)
            command = [*key, "--standby", "--fd", str(fds[0]), "--ready-fd", str(fds[1])]
            env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8"}
            if sandbox is not None:
                job = Job(argv=command, env=env, cwd="/", uid=None, gid=None,
                          sandbox=sandbox, keep_fds=list(fds), standby=True,
                          keep_caps=(CAP_SETUID, CAP_SETGID))
                command, job_fd = job.launcher()
                env, fds = LAUNCHER_ENV, (*fds, job_fd)
            else:
                env["PHLOEM_SUPERVISOR_PID"] = str(os.getpid())
            process = await asyncio.create_subprocess_exec(
                *command, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE, pass_fds=fds, start_new_session=True,
                cwd="/", env=env)
        except BaseException:
            os.close(status_r)
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            raise
        finally:
            listener.close()
            os.close(status_w)
            if job_fd >= 0:
                os.close(job_fd)
        reader = asyncio.StreamReader()
        transport, _ = await loop.connect_read_pipe(
            lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(status_r, "rb", 0))
        standby = cls(process, reader, transport, path, sandbox)
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
        with contextlib.suppress(FileNotFoundError):
            self.socket_path.unlink()

    async def activate(self, launch: Launch, bundle: str,
                       procs_files: list[str]) -> IsolateProcess:
        spec = launch.spec
        with socket.socket(fileno=os.dup(launch.listen_fd)) as listener:
            isolate_path = listener.getsockname()
        # The isolate's own (unused) socket file gives way to the standby's.
        os.replace(self.socket_path, isolate_path)
        who = json.dumps({"uid": spec.identity.uid, "gid": spec.identity.gid,
                          "cwd": str(spec.cwd), "bundle": bundle})
        lines = f"{who}\n{json.dumps({'env': launch.env})}\n"
        if self.sandbox is not None:
            shown = set(self.sandbox.ro)
            inject = [p for p in (spec.sandbox.ro if spec.sandbox else []) if p not in shown]
            message = json.dumps({"procs_files": procs_files, "inject": inject,
                                  "forward": lines}) + "\n"
        else:
            pid = self.process.pid
            await asyncio.to_thread(move_to_cgroups, pid, procs_files)
            message = lines
        assert self.process.stdin is not None
        try:
            self.process.stdin.write(message.encode())
            await self.process.stdin.drain()
        except (BrokenPipeError, ConnectionResetError) as exc:
            self.kill()
            raise StandbyFailed(f"could not send the activation: {exc}") from None
        # stdin stays open: its end tells the isolate that the platform is gone.
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


def _standby_plan(launch: Launch) -> tuple[StandbyKey, str, SandboxSpec | None] | None:
    """(key, bundle, the standby's sandbox) for a launch with a :class:`StandbyStart` as
    a non-root user. The standby's sandbox is the isolate's without its own paths."""
    start = launch.spec.start
    if not isinstance(start, StandbyStart):
        return None
    if launch.spec.identity.uid == 0:
        return None  # a standby only ever becomes an unprivileged isolate
    sandbox = launch.spec.sandbox
    if sandbox is not None:
        sandbox = replace(sandbox, ro=[p for p in sandbox.ro if p not in start.private],
                          cwd="/")
        key = (*start.command, json.dumps(sandbox.to_json(), sort_keys=True))
        return key, start.bundle, sandbox
    return start.command, start.bundle, None


class NodeStandbySpawner:
    name = "node-standby"

    def __init__(self, fallback: Spawner | None = None, *, socket_dir: Path | None = None,
                 start_timeout_s: float = 30.0) -> None:
        self.fallback: Spawner = fallback or DirectSpawner()
        #: Where standbys' sockets are made (the isolates' socket directory).
        self.socket_dir = socket_dir
        self.start_timeout_s = start_timeout_s
        self._ready: dict[StandbyKey, _Standby] = {}
        self._starting: dict[StandbyKey, asyncio.Task[None]] = {}
        self._failures: dict[StandbyKey, int] = {}
        self._stopped = False

    def _replenish(self, key: StandbyKey, sandbox: SandboxSpec | None,
                   socket_dir: Path) -> None:
        if self._stopped or key in self._starting or self._failures.get(key, 0) >= 3:
            return
        command = key[:-1] if sandbox is not None else key

        async def start() -> None:
            try:
                standby = await _Standby.start(command, sandbox, socket_dir,
                                               self.start_timeout_s)
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

    async def start(self) -> None:
        # Standbys start on the first launch of each command (the heap limit is per
        # function), then one is kept ready.
        await self.fallback.start()

    async def spawn(self, launch: Launch) -> IsolateProcess:
        plan = _standby_plan(launch)
        joinable, procs = cgroup_procs(launch.memory)
        if plan is None or not joinable or self._stopped:
            return await self.fallback.spawn(launch)
        key, bundle, sandbox = plan
        with socket.socket(fileno=os.dup(launch.listen_fd)) as listener:
            socket_dir = self.socket_dir or Path(listener.getsockname()).parent
        standby = self._ready.pop(key, None)
        self._replenish(key, sandbox, socket_dir)
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
        await self.fallback.stop()
