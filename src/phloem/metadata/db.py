"""The system database: versioned migrations and the connection pool.

Migrations are ``migrations/NNNN_name.sql`` files, or ``NNNN_name.py`` modules for steps
that need Python (sealing values with the platform's key), applied in order, each in its
own transaction together with its row in ``schema_migrations``; an advisory lock keeps two
starts from racing. So a migration is applied exactly once, whole or not at all: a crash
half-way leaves it unrecorded and rolled back, and the next start runs it again.

A Python migration defines ``migrate(conn, box)`` (``conn`` is inside the transaction,
``box`` the platform's :class:`~phloem.metadata.secrets.SecretBox`) and may define ``AFTER_COMMIT``,
statements run once it committed, outside any transaction (``VACUUM``)::

    AFTER_COMMIT = ["VACUUM FULL branches"]

    def migrate(conn: psycopg.Connection[Any], box: SecretBox) -> None:
        conn.execute("ALTER TABLE branches ADD COLUMN note_sealed text")
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

import psycopg
from psycopg.rows import dict_row
from psycopg_pool import AsyncConnectionPool

from phloem.metadata.secrets import SecretBox

_LOCK_ID = 7_343_112
_PACKAGE = "phloem.metadata.migrations"
#: The system database listens on a Unix socket only; the number just names its file.
SYSTEM_PORT = 5432
_NAME_RE = re.compile(r"^(\d{4})_[a-z0-9_]+\.(sql|py)$")

PythonStep = Callable[["psycopg.Connection[Any]", SecretBox], None]


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str | None = None
    step: PythonStep | None = None
    after_commit: list[str] = field(default_factory=list)


def migrations() -> list[Migration]:
    """Every bundled migration, in order."""
    out = []
    for item in resources.files(_PACKAGE).iterdir():
        match = _NAME_RE.match(item.name)
        if match is None:
            continue
        version = int(match.group(1))
        if match.group(2) == "sql":
            out.append(Migration(version, item.name, sql=item.read_text()))
        else:
            module = importlib.import_module(f"{_PACKAGE}.{item.name[:-3]}")
            out.append(Migration(version, item.name, step=module.migrate,
                                 after_commit=list(getattr(module, "AFTER_COMMIT", []))))
    out.sort(key=lambda m: m.version)
    versions = [m.version for m in out]
    if len(set(versions)) != len(versions):
        raise RuntimeError(f"{_PACKAGE}: two migrations share a version: {versions}")
    return out


def migrate(conninfo: str, box: SecretBox) -> list[str]:
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
        for m in migrations():
            if m.version in done:
                continue
            with conn.transaction():
                if m.sql is not None:
                    conn.execute(m.sql.encode())
                if m.step is not None:
                    m.step(conn, box)
                conn.execute(
                    "INSERT INTO schema_migrations (version, name) VALUES (%s, %s)",
                    (m.version, m.name),
                )
            for statement in m.after_commit:
                conn.execute(statement.encode())
            applied.append(m.name)
        conn.execute("SELECT pg_advisory_unlock(%s)", (_LOCK_ID,))
    return applied


async def open_pool(conninfo: str) -> AsyncConnectionPool:
    pool = AsyncConnectionPool(conninfo, min_size=1, max_size=8, open=False,
                               kwargs={"autocommit": True})
    await pool.open(wait=True, timeout=30)
    return pool


class PooledStore:
    """What every store of the system database shares: its pool, and one statement in
    its own transaction with its rows as dicts ([] for a statement that returns none)."""

    def __init__(self, pool: AsyncConnectionPool) -> None:
        self.pool = pool

    async def _all(self, sql: str, params: tuple[Any, ...] = ()) -> list[dict[str, Any]]:
        async with self.pool.connection() as conn, conn.cursor(row_factory=dict_row) as cur:
            await cur.execute(sql.encode(), params)
            return await cur.fetchall() if cur.description else []
