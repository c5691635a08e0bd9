"""Isolate pools per deployment, leases for the gateway, retirement and shutdown.

    supervisor = Supervisor(sockets_dir, log_writer_for)
    lease = await supervisor.acquire(spec)   # starts an isolate when none is live
    ...
    lease.release(reusable=True)
    await supervisor.retire(old_deployment_id)   # drains, then SIGINT
    await supervisor.stop_all()
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from phloem.gateway.routing import Limits
from phloem.supervisor.isolate import Isolate, IsolateFailed, IsolateSpec, LogWriter


@dataclass
class Lease:
    """One upstream connection to an isolate, for one exchange (see gateway.routing)."""

    isolate: Isolate
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    limits: Limits | None = None
    _released: bool = False
    _stream: bool = False

    def mark_stream(self) -> None:
        """The exchange became a long-lived stream (SSE, WebSocket): it no longer counts as
        an in-flight request, but keeps the isolate from being idle until released."""
        if not self._stream and not self._released:
            self._stream = True
            self.isolate.inflight -= 1
            self.isolate.open_streams += 1

    def release(self, *, reusable: bool) -> None:
        if self._released:
            return
        self._released = True
        if self._stream:
            self.isolate.open_streams -= 1
        else:
            self.isolate.inflight -= 1
        self.isolate.give_back(self.reader, self.writer, reusable)


@dataclass
class Pool:
    spec: IsolateSpec
    isolates: list[Isolate] = field(default_factory=list)
    starting: Isolate | None = None
    retired: bool = False


class Supervisor:
    def __init__(self, sockets_dir: Path, log_writer_for: Callable[[IsolateSpec], LogWriter],
                 *, grace_s: float = 10.0, start_timeout_s: float = 900.0,
                 on_cold_start: Callable[[IsolateSpec, float], None] | None = None) -> None:
        self.sockets_dir = sockets_dir
        self.on_cold_start = on_cold_start
        self.log_writer_for = log_writer_for
        self.grace_s = grace_s
        self.start_timeout_s = start_timeout_s
        self.pools: dict[str, Pool] = {}
        self._stopping = False
        self._watchers: set[asyncio.Task[None]] = set()

    def isolates(self) -> list[Isolate]:
        return [i for p in self.pools.values() for i in p.isolates]

    async def acquire(self, spec: IsolateSpec) -> Lease:
        if self._stopping:
            raise IsolateFailed("the platform is shutting down")
        pool = self.pools.get(spec.deployment_id)
        if pool is None or pool.retired:
            pool = self.pools[spec.deployment_id] = Pool(spec)
        isolate = await self._pick(pool)
        isolate.inflight += 1
        try:
            reader, writer = await isolate.connect()
        except OSError as exc:
            isolate.inflight -= 1
            raise IsolateFailed(f"cannot connect to isolate {isolate.id}: {exc}") from exc
        return Lease(isolate, reader, writer)

    async def _pick(self, pool: Pool) -> Isolate:
        live = [i for i in pool.isolates if i.state == "ready"]
        if live:
            return min(live, key=lambda i: i.inflight)
        # Cold start: one isolate per burst; every waiter shares its readiness.
        if pool.starting is None or not pool.starting.alive:
            pool.starting = await self._spawn(pool)
        isolate = pool.starting
        await isolate.wait_ready(self.start_timeout_s)
        if pool.starting is isolate:
            pool.starting = None
            if self.on_cold_start is not None and isolate.cold_start_s is not None:
                self.on_cold_start(pool.spec, isolate.cold_start_s)
        return isolate

    async def _spawn(self, pool: Pool) -> Isolate:
        self.sockets_dir.mkdir(parents=True, exist_ok=True)
        isolate = Isolate(pool.spec, Path(), self.log_writer_for(pool.spec))
        isolate.socket_path = self.sockets_dir / f"{isolate.id}.sock"
        pool.isolates.append(isolate)
        try:
            await isolate.start()
        except Exception as exc:
            pool.isolates.remove(isolate)
            raise IsolateFailed(f"cannot start isolate: {exc}") from exc
        task = asyncio.create_task(self._forget_when_exited(pool, isolate))
        self._watchers.add(task)
        task.add_done_callback(self._watchers.discard)
        return isolate

    async def _forget_when_exited(self, pool: Pool, isolate: Isolate) -> None:
        await isolate._exited.wait()
        with contextlib.suppress(ValueError):
            pool.isolates.remove(isolate)

    async def retire(self, deployment_id: str, drain_s: float = 900.0) -> None:
        """Stop sending new work to a deployment's isolates; stop each once its in-flight
        requests are done (or after ``drain_s``)."""
        pool = self.pools.pop(deployment_id, None)
        if pool is None:
            return
        pool.retired = True
        await asyncio.gather(*(self._drain_and_stop(i, drain_s) for i in pool.isolates))

    async def _drain_and_stop(self, isolate: Isolate, drain_s: float) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + drain_s
        while isolate.inflight > 0 and isolate.alive and loop.time() < deadline:
            await asyncio.sleep(0.05)
        await isolate.stop(self.grace_s)

    async def stop_all(self) -> None:
        self._stopping = True
        isolates = self.isolates()
        self.pools.clear()
        await asyncio.gather(*(i.stop(self.grace_s) for i in isolates),
                             return_exceptions=True)
