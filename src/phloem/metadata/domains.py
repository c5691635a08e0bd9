"""Custom domains in the system database (table ``custom_domains``, migration 0011).

Each method is one short transaction, as in :class:`~phloem.metadata.store.Store`.

    domains = DomainStore(pool)
    row = await domains.add("api.example.com", branch_id, "todos", hsts=True)
    await domains.list_domains(branch_id)        # a branch's, or every one
    await domains.remove("api.example.com")      # True if it existed
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

import psycopg
from psycopg.rows import dict_row

__all__ = ["DomainExists", "DomainRow", "DomainSpec", "DomainStore"]

from phloem.metadata.db import PooledStore


class DomainExists(Exception):
    """The host name is registered already (on ``branch_id``)."""

    def __init__(self, hostname: str, branch_id: str) -> None:
        super().__init__(f"{hostname} is registered already (branch {branch_id})")
        self.hostname = hostname
        self.branch_id = branch_id


@dataclass(frozen=True)
class DomainSpec:
    """A domain as declared (neon.ts / phloemfile.py), already validated."""

    hostname: str
    function: str
    hsts: bool = False


@dataclass(frozen=True)
class DomainRow:
    hostname: str
    branch_id: str
    function_slug: str
    hsts: bool
    owner: str | None
    created_at: datetime


class DomainStore(PooledStore):
    async def list_domains(self, branch_id: str | None = None) -> list[DomainRow]:
        if branch_id is None:
            rows = await self._all("SELECT * FROM custom_domains ORDER BY hostname")
        else:
            rows = await self._all("SELECT * FROM custom_domains WHERE branch_id = %s "
                                   "ORDER BY hostname", (branch_id,))
        return [DomainRow(**r) for r in rows]

    async def get(self, hostname: str) -> DomainRow | None:
        rows = await self._all("SELECT * FROM custom_domains WHERE hostname = %s",
                               (hostname,))
        return DomainRow(**rows[0]) if rows else None

    async def add(self, hostname: str, branch_id: str, slug: str, *, hsts: bool = False,
                  owner: str | None = None) -> DomainRow:
        """Register ``hostname``; raises :class:`DomainExists` if any branch has it."""
        try:
            rows = await self._all(
                "INSERT INTO custom_domains (hostname, branch_id, function_slug, hsts, owner) "
                "VALUES (%s, %s, %s, %s, %s) RETURNING *",
                (hostname, branch_id, slug, hsts, owner))
        except psycopg.errors.UniqueViolation:
            held = await self.get(hostname)
            raise DomainExists(hostname, held.branch_id if held else "?") from None
        return DomainRow(**rows[0])

    async def remove(self, hostname: str) -> bool:
        rows = await self._all("DELETE FROM custom_domains WHERE hostname = %s "
                               "RETURNING hostname", (hostname,))
        return bool(rows)

    async def replace(self, branch_id: str, specs: list[DomainSpec],
                      owner: str | None) -> tuple[list[DomainRow], list[DomainRow]]:
        """Make ``owner``'s domains on the branch exactly ``specs`` in one transaction,
        except names another branch holds (left to it). Domains of other owners on this
        branch are kept, and a name one of them holds is taken over. Returns (this
        branch's domains now, the other branches' rows of names that were skipped)."""
        names = [s.hostname for s in specs]
        async with self.pool.connection() as conn, conn.transaction():
            cur = conn.cursor(row_factory=dict_row)
            await cur.execute(b"SELECT * FROM custom_domains WHERE hostname = ANY(%s) "
                              b"AND branch_id <> %s FOR UPDATE", (names, branch_id))
            elsewhere = [DomainRow(**r) for r in await cur.fetchall()]
            taken = {r.hostname for r in elsewhere}
            await cur.execute(b"DELETE FROM custom_domains WHERE branch_id = %s "
                              b"AND owner IS NOT DISTINCT FROM %s AND NOT (hostname = ANY(%s))",
                              (branch_id, owner, names))
            for s in specs:
                if s.hostname in taken:
                    continue
                await cur.execute(
                    b"INSERT INTO custom_domains (hostname, branch_id, function_slug, hsts, "
                    b"owner) VALUES (%s, %s, %s, %s, %s) ON CONFLICT (hostname) DO UPDATE SET "
                    b"function_slug = excluded.function_slug, hsts = excluded.hsts, "
                    b"owner = excluded.owner WHERE custom_domains.branch_id = %s",
                    (s.hostname, branch_id, s.function, s.hsts, owner, branch_id))
        return await self.list_domains(branch_id), elsewhere
