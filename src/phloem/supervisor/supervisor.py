"""Isolate pools per deployment: leases for the gateway, scale-out, idle eviction,
retirement and shutdown.

    supervisor = Supervisor(sockets_dir, log_writer_for)
    await supervisor.start()                 # the idle reaper
    lease = await supervisor.acquire(spec)   # starts an isolate when none is live
    ...
    lease.release(reusable=True)
    await supervisor.retire(old_deployment_id)   # drains, then SIGINT
    await supervisor.stop_all()

Cold start: with no ready isolate, the first request spawns one and every request that
arrives meanwhile waits for that same one (a burst starts one isolate, not N). Scale-out:
when the least-loaded ready isolate already has ``target_inflight`` requests, another is
started in the background (up to ``max_isolates``) and the request is served at once by
the least-loaded one. Open streams (SSE, WebSocket) do not count towards the target, but
they, in-flight requests and pending ``wait_until`` work all keep an isolate from idling.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from phloem.gateway.routing import Limits
from phloem.supervisor.cgroups import FunctionLimiter, MemoryLimiter, choose_limiter
from phloem.supervisor.isolate import (
    DirectSpawner,
    Isolate,
    IsolateFailed,
    IsolateSpec,
    LogWriter,
    Spawner,
)

log = logging.getLogger("phloem.supervisor")

#: Idle upstream connections kept per isolate: a burst of N concurrent requests opens N
#: connections, and without a cap all of them would stay open (file descriptors on both
#: sides, and a task each in the isolate). The idle reaper closes the excess among those
#: that stayed unused since its last round (about a second), least recently used first;
#: not on release: under a steady load of more concurrent requests than the cap, closing
#: on release would reopen connections all the time.
MAX_IDLE_PER_ISOLATE = 64


class Lease:
    """One upstream connection to an isolate, for one exchange (see gateway.routing).
    Slotted, with a written-out __init__ (a dataclass's generated one stays interpreted
    in the compiled build): one is made per request."""

    __slots__ = ("_released", "_stream", "isolate", "limits", "reader", "replay_safe",
                 "reused", "writer")

    def __init__(self, isolate: Isolate, reader: asyncio.StreamReader,
                 writer: asyncio.StreamWriter, limits: Limits | None = None,
                 reused: bool = False) -> None:
        self.isolate = isolate
        self.reader = reader
        self.writer = writer
        self.limits = limits
        #: Taken from the idle pool rather than freshly opened.
        self.reused = reused
        #: Never let the gateway replay a request merely because it is idempotent and got
        #: no answer: isolates keep connections open for an hour, so a connection failing
        #: means the isolate failed, and the request may be what crashed it. The gateway
        #: still replays a request the kernel proves the isolate never read (the
        #: connection was reset or refused the write before any answer; see
        #: gateway.framing.may_replay).
        self.replay_safe = False
        self._released = False
        self._stream = False

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
        isolate = self.isolate
        if self._stream:
            isolate.open_streams -= 1
        else:
            isolate.inflight -= 1
        if not reusable and (self.writer.is_closing() or self.reader.at_eof()
                             or self.reader.exception() is not None):
            # The isolate ended the connection: maybe it died (then stop leasing it now).
            isolate.connection_broke()
        # Back to the isolate's idle pool while it serves (directly: the pool is compiled,
        # the isolate's methods are not, and this runs for every request).
        isolate.last_active = time.monotonic()
        isolate.idle.give_back(self.reader, self.writer,
                               keep=reusable and isolate.state == "ready")


@dataclass
class Pool:
    spec: IsolateSpec
    isolates: list[Isolate] = field(default_factory=list)
    retired: bool = False
    #: What every lease of this pool carries (built once: the spec does not change).
    lease_limits: Limits = field(init=False)

    def __post_init__(self) -> None:
        limits = self.spec.limits
        self.lease_limits = Limits(ttfb_timeout=limits.ttfb_timeout_s,
                                   silence_timeout=limits.silence_timeout_s,
                                   max_body_bytes=limits.max_body_bytes)


def _survey(pool: Pool) -> tuple[Isolate | None, int, Isolate | None]:
    """(least-loaded ready isolate, live isolates, first starting isolate), in one pass
    without building lists: this runs for every request."""
    best: Isolate | None = None
    live = 0
    starting: Isolate | None = None
    for i in pool.isolates:
        state = i.state
        if state == "ready":
            live += 1
            if best is None or i.inflight < best.inflight:
                best = i
        elif state == "starting":
            live += 1
            if starting is None:
                starting = i
    return best, live, starting


Event = Callable[[IsolateSpec, float], None]
Eviction = Callable[[IsolateSpec, str], None]


class Supervisor:
    def __init__(self, sockets_dir: Path, log_writer_for: Callable[[IsolateSpec], LogWriter],
                 *, grace_s: float = 10.0, start_timeout_s: float = 900.0,
                 memory: MemoryLimiter | None = None,
                 spawner: Spawner | None = None,
                 on_cold_start: Event | None = None,
                 on_eviction: Eviction | None = None) -> None:
        self.sockets_dir = sockets_dir
        self.log_writer_for = log_writer_for
        self.grace_s = grace_s
        self.start_timeout_s = start_timeout_s
        self.memory = memory or choose_limiter()
        self.spawner = spawner or DirectSpawner()
        self.on_cold_start = on_cold_start
        self.on_eviction = on_eviction
        self.pools: dict[str, Pool] = {}
        self._stopping = False
        self._tasks: set[asyncio.Task[None]] = set()
        self._reaper: asyncio.Task[None] | None = None
        # Per isolate id: the fewest idle connections since the reaper's last round.
        self._idle_low: dict[str, int] = {}

    def _background(self, coro: object) -> None:
        task = asyncio.ensure_future(coro)  # type: ignore[call-overload]
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def start(self) -> None:
        self._reaper = asyncio.create_task(self._reap_idle())

    def isolates(self) -> list[Isolate]:
        return [i for p in self.pools.values() for i in p.isolates]

    def health(self) -> dict[str, Any]:
        """For ``phloem status``: ``running`` while its loop (the idle reaper) is alive,
        ``stopping`` once :meth:`stop_all` began, else ``down`` with the loop's error."""
        out: dict[str, Any] = {"state": "running", "isolates": len(self.isolates())}
        if self._stopping:
            out["state"] = "stopping"
        elif self._reaper is None or self._reaper.done():
            out["state"] = "down"
            if self._reaper is not None and not self._reaper.cancelled():
                out["error"] = repr(self._reaper.exception())
        return out

    # -- leasing -------------------------------------------------------------
    async def acquire(self, spec: IsolateSpec) -> Lease:
        if self._stopping:
            raise IsolateFailed("the platform is shutting down")
        pool = self.pools.get(spec.deployment_id)
        if pool is None or pool.retired:
            pool = self.pools[spec.deployment_id] = Pool(spec)
        for attempt in range(3):
            isolate = await self._pick(pool)
            isolate.inflight += 1
            try:
                reader, writer, reused = await isolate.connect()
                self._note_idle(isolate)
                break
            except OSError as exc:
                isolate.inflight -= 1
                # Died a moment ago (its exit not yet reaped): never pick it again.
                if isolate.state == "ready":
                    isolate.state = "stopping"
                if attempt == 2:
                    raise IsolateFailed(f"cannot connect to isolate {isolate.id}: {exc}"
                                        ) from exc
        return Lease(isolate, reader, writer, pool.lease_limits, reused)

    def acquire_nowait(self, spec: IsolateSpec) -> Lease | None:
        """A lease on an idle pooled connection to the least-loaded ready isolate, when that
        needs nothing else (no connect, no start, no scale-out), else ``None``: then
        :meth:`acquire` does the rest. Lets the gateway serve a request without a task
        switch (see gateway.routing)."""
        if self._stopping:
            return None
        pool = self.pools.get(spec.deployment_id)
        if pool is None or pool.retired:
            return None
        best, live, starting = _survey(pool)
        if best is None:
            return None
        limits = pool.spec.limits
        if (best.inflight >= limits.target_inflight and live < limits.max_isolates
                and starting is None):
            return None  # acquire() starts another isolate
        pooled = best.idle.take()
        if pooled is None:
            return None
        # (No last_active stamp: a leased isolate is busy, and the release stamps it.)
        best.inflight += 1
        self._note_idle(best)
        return Lease(best, pooled[0], pooled[1], pool.lease_limits, True)

    def _note_idle(self, isolate: Isolate) -> None:
        n = len(isolate.idle)
        low = self._idle_low.get(isolate.id)
        if low is None or n < low:
            self._idle_low[isolate.id] = n

    def _trim_idle_connections(self, isolate: Isolate) -> None:
        """Close idle connections beyond MAX_IDLE_PER_ISOLATE among those unused since the
        last round: the idle pool is a stack, and at least ``low`` connections at its
        bottom (the least recently used) were not touched."""
        n = len(isolate.idle)
        low = self._idle_low.pop(isolate.id, n)
        excess = min(low, n) - MAX_IDLE_PER_ISOLATE
        if excess > 0:
            isolate.idle.close_oldest(excess)

    async def _pick(self, pool: Pool) -> Isolate:
        limits = pool.spec.limits
        while True:
            best, live, starting = _survey(pool)
            if best is not None:
                if (best.inflight >= limits.target_inflight and live < limits.max_isolates
                        and starting is None):
                    await self._spawn(pool)  # serves later requests once ready
                return best
            starting = starting or await self._spawn(pool)
            await starting.wait_ready(self.start_timeout_s)

    async def _spawn(self, pool: Pool) -> Isolate:
        self.sockets_dir.mkdir(parents=True, exist_ok=True)
        isolate = Isolate(pool.spec, Path(), self.log_writer_for(pool.spec))
        isolate.socket_path = self.sockets_dir / f"{isolate.id}.sock"
        pool.isolates.append(isolate)
        try:
            # Below its function's group, with its limits (pids, CPU) as well as memory.
            await isolate.start(FunctionLimiter(self.memory, pool.spec.function_id,
                                                pool.spec.limits), self.spawner)
        except Exception as exc:
            pool.isolates.remove(isolate)
            raise IsolateFailed(f"cannot start isolate: {exc}") from exc
        self._background(self._follow(pool, isolate))
        return isolate

    async def _follow(self, pool: Pool, isolate: Isolate) -> None:
        with contextlib.suppress(IsolateFailed):
            await isolate.wait_ready(self.start_timeout_s)
            if self.on_cold_start is not None and isolate.cold_start_s is not None:
                self.on_cold_start(pool.spec, isolate.cold_start_s)
        await isolate.wait_exited()
        with contextlib.suppress(ValueError):
            pool.isolates.remove(isolate)
        if isolate.exit_reason and self.on_eviction is not None:
            self.on_eviction(pool.spec, "memory")

    # -- scale to zero -------------------------------------------------------
    async def _reap_idle(self) -> None:
        while True:
            await asyncio.sleep(self._reap_interval())
            now = time.monotonic()
            for pool in list(self.pools.values()):
                for isolate in list(pool.isolates):
                    self._trim_idle_connections(isolate)
                    idle_for = now - isolate.last_active
                    if (isolate.state == "ready" and not isolate.busy
                            and idle_for >= pool.spec.limits.idle_timeout_s):
                        isolate.log(isolate.id, "phloem", f"idle for {idle_for:.0f} s: "
                                    "evicting (SIGINT)")
                        if self.on_eviction is not None:
                            self.on_eviction(pool.spec, "idle")
                        isolate.state = "stopping"  # no new leases from now on
                        self._background(isolate.stop(self.grace_s))
            self._idle_low.clear()  # marks of isolates gone meanwhile

    def _reap_interval(self) -> float:
        # Check often enough for the shortest idle limit in use (tests use seconds).
        shortest = min((p.spec.limits.idle_timeout_s for p in self.pools.values()),
                       default=60.0)
        return max(0.05, min(1.0, shortest / 4))

    # -- retirement and shutdown ---------------------------------------------
    async def retire(self, deployment_id: str, drain_s: float = 900.0) -> None:
        """Stop sending new work to a deployment's isolates; stop each once its requests,
        streams and background work are done (or after ``drain_s``)."""
        pool = self.pools.pop(deployment_id, None)
        if pool is None:
            return
        pool.retired = True
        await asyncio.gather(*(self._drain_and_stop(i, drain_s) for i in pool.isolates))

    async def _drain_and_stop(self, isolate: Isolate, drain_s: float) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + drain_s
        while isolate.busy and isolate.alive and loop.time() < deadline:
            await asyncio.sleep(0.05)
        await isolate.stop(self.grace_s)

    async def stop_all(self, *, wait_until: bool = True) -> None:
        """Stop every isolate: SIGINT, SIGKILL after the grace; with ``wait_until``, an
        isolate's pending ``wait_until`` work first gets up to its function's budget."""
        self._stopping = True
        if self._reaper is not None:
            self._reaper.cancel()
        isolates = self.isolates()
        self.pools.clear()
        # wait_until work gets its budget, not just the grace (as on a redeploy).
        busy = [i for i in isolates if i.background and wait_until]
        if busy:
            log.warning("waiting for wait_until work of %d isolate(s), up to %.0f s (the "
                        "functions' wait_until limit); Ctrl-C again to force exit",
                        len(busy), max(i.spec.limits.wait_until_s for i in busy))
        await asyncio.gather(*(i.stop(self.grace_s, i.spec.limits.wait_until_s
                                      if wait_until else 0.0)
                               for i in isolates), return_exceptions=True)
        for task in list(self._tasks):
            task.cancel()
