"""Which branch services each branch has on, in the system database.

Each method is one short transaction, as in :class:`~phloem.metadata.store.Store`.

    services = ServiceStore(pool)
    await services.put("br-quiet-moon-3f9a2c", "storage", {"buckets": {"images": {}}})
    await services.all()       # {"br-quiet-moon-3f9a2c": {"storage": {"buckets": ...}}}
    await services.copy("br-quiet-moon-3f9a2c", "br-green-lake-1b2c3d")
"""

from __future__ import annotations

from typing import Any

from psycopg.types.json import Jsonb
from psycopg_pool import AsyncConnectionPool


class ServiceStore:
    def __init__(self, pool: AsyncConnectionPool[Any]) -> None:
        self.pool = pool

    async def all(self) -> dict[str, dict[str, dict[str, Any]]]:
        """branch id -> service -> config, for every branch."""
        async with self.pool.connection() as conn:
            rows = await (await conn.execute(
                "SELECT branch_id, service, config FROM branch_services")).fetchall()
        out: dict[str, dict[str, dict[str, Any]]] = {}
        for branch_id, service, config in rows:
            out.setdefault(branch_id, {})[service] = dict(config)
        return out

    async def put(self, branch_id: str, service: str, config: dict[str, Any]) -> None:
        async with self.pool.connection() as conn:
            await conn.execute(
                "INSERT INTO branch_services (branch_id, service, config) VALUES (%s, %s, %s) "
                "ON CONFLICT (branch_id, service) DO UPDATE SET config = EXCLUDED.config, "
                "updated_at = now()", (branch_id, service, Jsonb(config)))

    async def remove(self, branch_id: str, service: str) -> bool:
        async with self.pool.connection() as conn:
            cur = await conn.execute(
                "DELETE FROM branch_services WHERE branch_id = %s AND service = %s",
                (branch_id, service))
            return bool(cur.rowcount > 0)

    async def copy(self, parent_id: str, child_id: str) -> None:
        """The child gets the parent's services with their configs."""
        async with self.pool.connection() as conn:
            await conn.execute(
                "INSERT INTO branch_services (branch_id, service, config) "
                "SELECT %s, service, config FROM branch_services WHERE branch_id = %s "
                "ON CONFLICT (branch_id, service) DO NOTHING", (child_id, parent_id))
