"""Bounded health probes for ``phloem status``: does a PostgreSQL (or a PgBouncer in
front of one) answer a query *now*?

    probes = Probes(timeout_s=2.0)
    result = await probes.database("system", conninfo)
    result.ok, result.ms, result.error      # False, 2000.4, "no answer within 2 s"

A server that accepts connections but never answers (stopped with SIGSTOP, hung on a
full disk) must read as down within the timeout, and a status request must never hang
on it. Cancelling a psycopg query that the server does not answer waits up to 10 s more
(psycopg sends a cancel request and waits for it), so a probe that outlives the timeout
is left running in the background instead of being cancelled, and the next probe of the
same target waits on that one: at most one probe per target is ever outstanding.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import psycopg

#: How long ``phloem status`` waits for a database's answer before calling it down.
PROBE_TIMEOUT_S = 2.0
#: A probe left in the background gives up after this long (the server is stuck for good).
ABANDON_AFTER_S = 60.0

T = TypeVar("T")


@dataclass(frozen=True)
class ProbeResult:
    ok: bool
    ms: float
    error: str | None = None

    def describe(self) -> dict[str, Any]:
        """What ``phloem status`` shows: state, probe time and, when down, why."""
        out: dict[str, Any] = {"state": "running" if self.ok else "down",
                               "probe_ms": round(self.ms, 1)}
        if self.error is not None:
            out["error"] = self.error
        return out


class Bounded(Generic[T]):
    """Run ``make()`` at most once at a time per key and wait at most ``timeout_s`` for
    it; what is still running is kept (not cancelled) for the next caller."""

    def __init__(self) -> None:
        self._running: dict[str, asyncio.Task[T]] = {}

    async def run(self, key: str, make: Callable[[], Awaitable[T]],
                  timeout_s: float) -> T | None:
        """The result, or ``None`` when it did not finish within ``timeout_s`` (or was
        given up after ``ABANDON_AFTER_S``)."""
        task = self._running.get(key)
        if task is None or task.done():
            task = asyncio.ensure_future(_bounded(make(), ABANDON_AFTER_S))
            # Retrieved here, so an abandoned probe that nobody awaits logs nothing.
            task.add_done_callback(lambda t: t.cancelled() or t.exception())
            self._running[key] = task
        done, _ = await asyncio.wait({task}, timeout=timeout_s)
        if not done:
            return None
        if self._running.get(key) is task:
            del self._running[key]
        if task.cancelled() or task.exception() is not None:
            return None
        return task.result()


async def _bounded(work: Awaitable[T], limit_s: float) -> T:
    async with asyncio.timeout(limit_s):
        return await work


class Probes:
    """One ``SELECT 1`` per target, bounded by ``timeout_s`` (see the module's doc)."""

    def __init__(self, timeout_s: float = PROBE_TIMEOUT_S) -> None:
        self.timeout_s = timeout_s
        self._queries: Bounded[ProbeResult] = Bounded()

    async def database(self, key: str, conninfo: str) -> ProbeResult:
        started = time.monotonic()
        result = await self._queries.run(key, lambda: self._query(conninfo), self.timeout_s)
        if result is None:
            return ProbeResult(False, (time.monotonic() - started) * 1000,
                               f"no answer within {self.timeout_s:g} s")
        return result

    async def _query(self, conninfo: str) -> ProbeResult:
        started = time.monotonic()
        try:
            # libpq's connect_timeout is whole seconds, at least 2: the outer bound is ours.
            conn = await psycopg.AsyncConnection.connect(
                conninfo, connect_timeout=max(2, math.ceil(self.timeout_s)),
                autocommit=True, prepare_threshold=None)
            try:
                await conn.execute("SELECT 1")
            finally:
                await conn.close()
        except (psycopg.Error, OSError) as exc:
            message = str(exc).strip().splitlines()
            return ProbeResult(False, (time.monotonic() - started) * 1000,
                               message[0] if message else type(exc).__name__)
        return ProbeResult(True, (time.monotonic() - started) * 1000)


__all__ = ["PROBE_TIMEOUT_S", "Bounded", "ProbeResult", "Probes"]
