"""API keys in the system database: scopes, branch restriction, expiry, revocation and
last use. The secret (``phk_...``) exists only in the answer to its creation; the table
holds its sha256.

    keys = ApiKeys(pool)
    made = await keys.create("ci", ["read", "deploy"], branch_ids=None, expires_at=None)
    print(made.secret)                       # shown once
    row = await keys.find(made.secret)       # by hash; None: no such key
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from phloem.metadata.db import PooledStore
from phloem.metadata.store import hash_key, new_id

#: What a key may be allowed to do (docs/architecture.md, "Scoped API keys").
SCOPES = ("read", "deploy", "branches", "admin", "metrics")
#: Prefix of every key's secret.
KEY_PREFIX = "phk_"


@dataclass(frozen=True)
class KeyRow:
    id: str
    name: str
    scopes: list[str]
    #: The branches it is limited to (ids); None: every branch.
    branch_ids: list[str] | None
    created_at: datetime
    expires_at: datetime | None
    revoked_at: datetime | None
    last_used_at: datetime | None

    def state(self, now: datetime) -> str:
        """``active``, ``expired`` or ``revoked``."""
        if self.revoked_at is not None:
            return "revoked"
        if self.expires_at is not None and self.expires_at <= now:
            return "expired"
        return "active"


@dataclass(frozen=True)
class NewKey:
    row: KeyRow
    #: The only time the secret exists outside its holder: never stored, never logged.
    secret: str


_COLUMNS = "id, name, scopes, branch_ids, created_at, expires_at, revoked_at, last_used_at"


class ApiKeys(PooledStore):
    async def _rows(self, sql: str, params: tuple[Any, ...]) -> list[KeyRow]:
        return [KeyRow(**r) for r in await self._all(sql, params)]

    async def create(self, name: str, scopes: list[str], branch_ids: list[str] | None,
                     expires_at: datetime | None) -> NewKey:
        secret = KEY_PREFIX + secrets.token_urlsafe(32)
        rows = await self._rows(
            f"INSERT INTO api_keys (id, key_hash, name, scopes, branch_ids, expires_at)"
            f" VALUES (%s, %s, %s, %s, %s, %s) RETURNING {_COLUMNS}",
            (new_id("key"), hash_key(secret), name, sorted(set(scopes)), branch_ids,
             expires_at))
        return NewKey(rows[0], secret)

    async def find(self, secret: str) -> KeyRow | None:
        """The key whose secret this is (revoked and expired ones included)."""
        if "\x00" in secret:
            return None
        rows = await self._rows(f"SELECT {_COLUMNS} FROM api_keys WHERE key_hash = %s",
                                (hash_key(secret),))
        return rows[0] if rows else None

    async def get(self, key_id: str) -> KeyRow | None:
        if "\x00" in key_id:
            return None
        rows = await self._rows(f"SELECT {_COLUMNS} FROM api_keys WHERE id = %s", (key_id,))
        return rows[0] if rows else None

    async def list(self) -> list[KeyRow]:
        return await self._rows(f"SELECT {_COLUMNS} FROM api_keys ORDER BY created_at", ())

    async def revoke(self, key_id: str) -> KeyRow | None:
        """Revoke it (from now on 401); None: no such key. Revoking twice keeps the first
        time."""
        rows = await self._rows(
            f"UPDATE api_keys SET revoked_at = COALESCE(revoked_at, now()) WHERE id = %s"
            f" RETURNING {_COLUMNS}", (key_id,))
        return rows[0] if rows else None

    async def touch(self, key_id: str, when: datetime) -> None:
        async with self.pool.connection() as conn:
            await conn.execute(b"UPDATE api_keys SET last_used_at = %s WHERE id = %s",
                               (when, key_id))
