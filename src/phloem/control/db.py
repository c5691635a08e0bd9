"""The system database: versioned SQL migrations and the connection pool.

Migrations are ``migrations/NNNN_name.sql`` files applied in order, each in its own
transaction, recorded in ``schema_migrations``; an advisory lock keeps two starts from
racing.
"""

from __future__ import annotations

from importlib import resources

import psycopg
from psycopg_pool import AsyncConnectionPool

_LOCK_ID = 7_343_112


def migration_files() -> list[tuple[int, str, str]]:
    """``(version, name, sql)`` for every bundled migration, in order."""
    out = []
    for item in resources.files("phloem.control.migrations").iterdir():
        if item.name.endswith(".sql"):
            version = int(item.name.split("_", 1)[0])
            out.append((version, item.name, item.read_text()))
    return sorted(out)


def migrate(conninfo: str) -> list[str]:
    """Apply pending migrations; return the names applied."""
    applied: list[str] = []
    with psycopg.connect(conninfo, autocommit=True) as conn:
        conn.execute("SELECT pg_advisory_lock(%s)", (_LOCK_ID,))
        conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations ("
            " version integer PRIMARY KEY, name text NOT NULL,"
            " applied_at timestamptz NOT NULL DEFAULT now())"
        )
        done = {row[0] for row in conn.execute("SELECT version FROM schema_migrations")}
        for version, name, sql in migration_files():
            if version in done:
                continue
            with conn.transaction():
                conn.execute(sql.encode())
                conn.execute(
                    "INSERT INTO schema_migrations (version, name) VALUES (%s, %s)",
                    (version, name),
                )
            applied.append(name)
        conn.execute("SELECT pg_advisory_unlock(%s)", (_LOCK_ID,))
    return applied


async def open_pool(conninfo: str) -> AsyncConnectionPool:
    pool = AsyncConnectionPool(conninfo, min_size=1, max_size=8, open=False,
                               kwargs={"autocommit": True})
    await pool.open(wait=True, timeout=30)
    return pool
