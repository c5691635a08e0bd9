"""Schedule triggers and their delivery history in the system database.

Each method is one short transaction, as in :class:`~phloem.metadata.store.Store`.

    triggers = TriggerStore(pool)
    await triggers.replace(branch_id, [TriggerSpec("nightly", "jobs", "0 3 * * *")])
    run_id = await triggers.start_run(row.id, scheduled_for, "schedule")
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

from phloem.metadata.db import PooledStore
from phloem.metadata.store import new_id

#: A run's states: ``running`` (attempts under way or waiting to retry), then
#: ``succeeded`` (a 2xx answer) or ``failed`` (attempts exhausted).
RUN_STATES = ("running", "succeeded", "failed")


@dataclass(frozen=True)
class TriggerSpec:
    """A trigger as declared (neon.ts / phloemfile.py), already validated."""

    name: str
    function: str
    cron: str
    function_path: str = "/"
    enabled: bool = True
    #: ``schedule`` (``cron``) or ``storage_object_created`` (``bucket``, ``prefix``).
    kind: str = "schedule"
    bucket: str | None = None
    prefix: str = ""


@dataclass(frozen=True)
class TriggerRow:
    id: str
    branch_id: str
    name: str
    function_slug: str
    cron: str
    function_path: str
    enabled: bool
    owner: str | None
    created_at: datetime
    updated_at: datetime
    kind: str = "schedule"
    bucket: str | None = None
    key_prefix: str = ""


@dataclass(frozen=True)
class RunRow:
    id: str
    trigger_id: str
    scheduled_for: datetime
    reason: str
    status: str
    attempts: int
    http_status: int | None
    error: str | None
    started_at: datetime
    finished_at: datetime | None
    #: A storage run's object (bucket, key, size, etag, content_type, event_time).
    event: dict[str, Any] | None = None


class TriggerStore(PooledStore):
    async def list_triggers(self, branch_id: str | None = None) -> list[TriggerRow]:
        if branch_id is None:
            rows = await self._all("SELECT * FROM triggers ORDER BY branch_id, name")
        else:
            rows = await self._all("SELECT * FROM triggers WHERE branch_id = %s ORDER BY name",
                                   (branch_id,))
        return [TriggerRow(**r) for r in rows]

    async def get(self, branch_id: str, name: str) -> TriggerRow | None:
        rows = await self._all("SELECT * FROM triggers WHERE branch_id = %s AND name = %s",
                               (branch_id, name))
        return TriggerRow(**rows[0]) if rows else None

    async def replace(self, branch_id: str, specs: list[TriggerSpec],
                      owner: str | None = None) -> list[TriggerRow]:
        """Make ``owner``'s triggers on the branch exactly ``specs`` in one transaction:
        new ones are added, changed ones updated (keeping their id and history), the
        owner's others deleted; other projects' triggers are kept (as their functions
        are). A name another owner declared is taken over."""
        async with self.pool.connection() as conn, conn.transaction():
            cur = conn.cursor(row_factory=dict_row)
            names = [s.name for s in specs]
            await cur.execute(b"DELETE FROM triggers WHERE branch_id = %s "
                              b"AND owner IS NOT DISTINCT FROM %s AND NOT (name = ANY(%s))",
                              (branch_id, owner, names))
            for s in specs:
                await cur.execute(
                    b"INSERT INTO triggers (id, branch_id, name, function_slug, cron, "
                    b"function_path, enabled, owner, kind, bucket, key_prefix) "
                    b"VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s) "
                    b"ON CONFLICT (branch_id, name) DO UPDATE SET "
                    b"function_slug = excluded.function_slug, cron = excluded.cron, "
                    b"function_path = excluded.function_path, enabled = excluded.enabled, "
                    b"owner = excluded.owner, kind = excluded.kind, "
                    b"bucket = excluded.bucket, key_prefix = excluded.key_prefix, "
                    b"updated_at = now()",
                    (new_id("trg"), branch_id, s.name, s.function, s.cron, s.function_path,
                     s.enabled, owner, s.kind, s.bucket, s.prefix))
        return await self.list_triggers(branch_id)

    async def copy_disabled(self, parent_id: str, child_id: str) -> list[TriggerRow]:
        """A new child branch's triggers: its parent's, every one disabled (a copy of
        production must not start sending production's scheduled work twice)."""
        parent = await self.list_triggers(parent_id)
        async with self.pool.connection() as conn, conn.transaction():
            for t in parent:
                await conn.execute(
                    b"INSERT INTO triggers (id, branch_id, name, function_slug, cron, "
                    b"function_path, enabled, owner, kind, bucket, key_prefix) "
                    b"VALUES (%s, %s, %s, %s, %s, %s, false, %s, %s, %s, %s) "
                    b"ON CONFLICT (branch_id, name) DO NOTHING",
                    (new_id("trg"), child_id, t.name, t.function_slug, t.cron,
                     t.function_path, t.owner, t.kind, t.bucket, t.key_prefix))
        return await self.list_triggers(child_id)

    async def set_enabled(self, trigger_id: str, enabled: bool) -> None:
        await self._all("UPDATE triggers SET enabled = %s, updated_at = now() WHERE id = %s",
                        (enabled, trigger_id))

    # -- runs ---------------------------------------------------------------------
    async def start_run(self, run_id: str, trigger_id: str, scheduled_for: datetime,
                        reason: str, event: dict[str, Any] | None = None) -> None:
        await self._all("INSERT INTO trigger_runs (id, trigger_id, scheduled_for, reason, "
                        "status, event) VALUES (%s, %s, %s, %s, 'running', %s)",
                        (run_id, trigger_id, scheduled_for, reason,
                         Jsonb(event) if event is not None else None))

    async def record_attempt(self, run_id: str, attempts: int, http_status: int | None,
                             error: str | None, status: str) -> None:
        finished = status != "running"
        await self._all("UPDATE trigger_runs SET attempts = %s, http_status = %s, "
                        "error = %s, status = %s, "
                        "finished_at = CASE WHEN %s THEN now() ELSE NULL END WHERE id = %s",
                        (attempts, http_status, error, status, finished, run_id))

    async def prune_runs(self, trigger_id: str, keep: int) -> None:
        """Keep the trigger's ``keep`` newest runs (a every-minute trigger makes 1,440 a
        day)."""
        await self._all("DELETE FROM trigger_runs WHERE trigger_id = %s AND id NOT IN "
                        "(SELECT id FROM trigger_runs WHERE trigger_id = %s "
                        "ORDER BY started_at DESC LIMIT %s)", (trigger_id, trigger_id, keep))

    async def get_run(self, run_id: str) -> RunRow | None:
        rows = await self._all("SELECT * FROM trigger_runs WHERE id = %s", (run_id,))
        return RunRow(**rows[0]) if rows else None

    async def history(self, trigger_id: str, limit: int = 50) -> list[RunRow]:
        rows = await self._all("SELECT * FROM trigger_runs WHERE trigger_id = %s "
                               "ORDER BY started_at DESC LIMIT %s", (trigger_id, limit))
        return [RunRow(**r) for r in rows]

    async def unfinished_runs(self) -> list[tuple[RunRow, TriggerRow]]:
        """Runs a stopped platform left ``running``: delivered again at start
        (at-least-once)."""
        rows = await self._all(
            "SELECT r.*, t.branch_id, t.name, t.function_slug, t.cron, t.function_path, "
            "t.enabled, t.owner, t.created_at AS t_created, t.updated_at AS t_updated, "
            "t.kind, t.bucket, t.key_prefix "
            "FROM trigger_runs r JOIN triggers t ON t.id = r.trigger_id "
            "WHERE r.status = 'running' ORDER BY r.started_at")
        out = []
        for r in rows:
            trig = TriggerRow(id=r["trigger_id"], branch_id=r.pop("branch_id"),
                              name=r.pop("name"), function_slug=r.pop("function_slug"),
                              cron=r.pop("cron"), function_path=r.pop("function_path"),
                              enabled=r.pop("enabled"), owner=r.pop("owner"),
                              created_at=r.pop("t_created"), updated_at=r.pop("t_updated"),
                              kind=r.pop("kind"), bucket=r.pop("bucket"),
                              key_prefix=r.pop("key_prefix"))
            out.append((RunRow(**r), trig))
        return out
