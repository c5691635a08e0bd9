"""Metadata access: branches, functions, deployments and API keys in the system database.

Every method is one short transaction; callers never hold a connection across awaits on
other services. Branch database passwords are sealed here on the way in and opened on
the way out (:class:`~phloem.metadata.secrets.SecretBox`): a :class:`BranchRow` holds them in the
clear, the ``branches`` table never does.

    store = Store(pool, SecretBox.from_data_dir(paths.secrets))
    row = await store.get_branch("main")
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from psycopg.rows import dict_row
from psycopg.types.json import Jsonb
from psycopg_pool import AsyncConnectionPool

from phloem.metadata.secrets import SecretBox

#: BranchRow fields stored sealed, each in a ``<name>_sealed`` column.
BRANCH_SECRETS = ("role_password", "superuser_password")


@dataclass(frozen=True)
class BranchRow:
    id: str
    name: str
    parent_id: str | None
    port: int
    database: str
    role: str
    role_password: str = field(repr=False)
    superuser_password: str = field(repr=False)
    state: str
    created_at: datetime
    pooler_port: int | None = None
    copy_method: str | None = None
    copy_bytes: int | None = None
    copy_ms: float | None = None
    updated_at: datetime | None = None
    #: When the platform deletes it (a neon.ts ``ttl``); None: never.
    expires_at: datetime | None = None
    #: Delete and reset are refused; a project deploy needs --allow-protected.
    protected: bool = False


@dataclass(frozen=True)
class FunctionRow:
    id: str
    number: int
    branch_id: str
    slug: str
    name: str
    runtime: str
    active_deployment_id: str | None
    created_at: datetime
    updated_at: datetime
    #: The project (link file ``project_id``) that created it; None: no project.
    owner: str | None = None


@dataclass(frozen=True)
class DeploymentRow:
    id: str
    function_id: str
    artifact_sha256: str
    runtime: str
    entry: str
    env: dict[str, str]
    status: str
    error: str | None
    build_log: str
    created_at: datetime
    finished_at: datetime | None
    limits: dict[str, Any] | None = None
    env_sealed: str | None = None
    env_keys: list[str] | None = None
    env_digest: str | None = None
    #: False: the entry is a prebuilt bundle, run as uploaded.
    bundle: bool = True
    activated_at: datetime | None = None
    #: When retention removed its built files (no rollback to it from then on).
    pruned_at: datetime | None = None


def branch_secret_context(branch_id: str, column: str) -> str:
    """Associated data of a sealed branch secret: a token opens only for this branch and
    this column."""
    return f"branch:{branch_id}:{column}"


def new_id(prefix: str, nbytes: int = 6) -> str:
    return f"{prefix}-{secrets.token_hex(nbytes)}"


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


class Store:
    def __init__(self, pool: AsyncConnectionPool, box: SecretBox) -> None:
        self.pool = pool
        self.box = box

    async def _all(self, sql: str, params: tuple[Any, ...] = ()) -> list[dict[str, Any]]:
        async with self.pool.connection() as conn, conn.cursor(row_factory=dict_row) as cur:
            await cur.execute(sql.encode(), params)
            return await cur.fetchall()

    async def _one(self, sql: str, params: tuple[Any, ...] = ()) -> dict[str, Any] | None:
        rows = await self._all(sql, params)
        return rows[0] if rows else None

    async def _exec(self, sql: str, params: tuple[Any, ...] = ()) -> int:
        async with self.pool.connection() as conn:
            cur = await conn.execute(sql.encode(), params)
            return cur.rowcount

    # -- API keys ------------------------------------------------------------
    async def create_api_key(self, name: str) -> str:
        key = "phk_" + secrets.token_urlsafe(32)
        await self._exec(
            "INSERT INTO api_keys (id, key_hash, name) VALUES (%s, %s, %s)",
            (new_id("key"), hash_key(key), name),
        )
        return key

    async def api_key_valid(self, key: str) -> bool:
        """Whether the key exists and is neither revoked nor expired."""
        return await self._one(
            "SELECT 1 AS ok FROM api_keys WHERE key_hash = %s AND revoked_at IS NULL"
            " AND (expires_at IS NULL OR expires_at > now())", (hash_key(key),)
        ) is not None

    # -- branches ------------------------------------------------------------
    def _seal(self, branch_id: str, column: str, value: str) -> str:
        return self.box.seal_text(value, branch_secret_context(branch_id, column))

    def _branch(self, row: dict[str, Any]) -> BranchRow:
        for column in BRANCH_SECRETS:
            row[column] = self.box.open_text(row.pop(f"{column}_sealed"),
                                             branch_secret_context(row["id"], column))
        return BranchRow(**row)

    async def list_branches(self) -> list[BranchRow]:
        rows = await self._all("SELECT * FROM branches ORDER BY created_at")
        return [self._branch(r) for r in rows]

    async def get_branch(self, ref: str) -> BranchRow | None:
        """By id or by name."""
        if not _storable(ref):
            return None
        row = await self._one("SELECT * FROM branches WHERE id = %s OR name = %s", (ref, ref))
        return self._branch(row) if row else None

    async def insert_branch(self, row: BranchRow) -> None:
        await self._exec(
            "INSERT INTO branches (id, name, parent_id, port, pooler_port, database, role,"
            " role_password_sealed, superuser_password_sealed, state)"
            " VALUES (%s,%s,%s,%s,%s,%s,%s,%s,%s,%s)",
            (row.id, row.name, row.parent_id, row.port, row.pooler_port, row.database,
             row.role, self._seal(row.id, "role_password", row.role_password),
             self._seal(row.id, "superuser_password", row.superuser_password), row.state),
        )

    async def set_branch_state(self, branch_id: str, state: str) -> None:
        await self._exec("UPDATE branches SET state = %s, updated_at = now() WHERE id = %s",
                         (state, branch_id))

    async def update_branch(self, branch_id: str, **fields: Any) -> None:
        allowed = {"state", "pooler_port", "copy_method", "copy_bytes", "copy_ms",
                   "role_password", "superuser_password", "expires_at", "protected"}
        if not fields or not set(fields) <= allowed:
            raise ValueError(f"cannot update {sorted(set(fields) - allowed)}")
        for column in BRANCH_SECRETS:
            if column in fields:
                fields[f"{column}_sealed"] = self._seal(branch_id, column, fields.pop(column))
        sets = ", ".join(f"{k} = %s" for k in fields)
        await self._exec(f"UPDATE branches SET {sets}, updated_at = now() WHERE id = %s",
                         (*fields.values(), branch_id))

    async def child_branches(self, branch_id: str) -> list[BranchRow]:
        rows = await self._all("SELECT * FROM branches WHERE parent_id = %s ORDER BY "
                               "created_at", (branch_id,))
        return [self._branch(r) for r in rows]

    async def expired_branch_ids(self) -> list[str]:
        """Branches whose ``expires_at`` has passed, oldest expiry first."""
        rows = await self._all("SELECT id FROM branches WHERE expires_at <= now() AND "
                               "state = 'ready' ORDER BY expires_at")
        return [r["id"] for r in rows]

    async def delete_branch(self, branch_id: str) -> None:
        await self._exec("DELETE FROM branches WHERE id = %s", (branch_id,))

    # -- functions -----------------------------------------------------------
    async def list_functions(self, branch_id: str | None = None) -> list[FunctionRow]:
        if branch_id is None:
            rows = await self._all("SELECT * FROM functions ORDER BY created_at")
        else:
            rows = await self._all(
                "SELECT * FROM functions WHERE branch_id = %s ORDER BY slug", (branch_id,)
            )
        return [FunctionRow(**r) for r in rows]

    async def get_function(self, branch_id: str, slug: str) -> FunctionRow | None:
        if not (_storable(branch_id) and _storable(slug)):
            return None
        row = await self._one(
            "SELECT * FROM functions WHERE branch_id = %s AND slug = %s", (branch_id, slug)
        )
        return FunctionRow(**row) if row else None

    async def function_branch_id(self, function_id: str) -> str | None:
        """The branch the function (by id) is on; None: no such function."""
        row = await self._one("SELECT branch_id FROM functions WHERE id = %s",
                              (function_id,))
        return str(row["branch_id"]) if row else None

    async def upsert_function(self, branch_id: str, slug: str, name: str,
                              runtime: str, owner: str | None = None) -> FunctionRow:
        """``owner``: the deploying project, which takes the function over; None keeps
        the owner it has (a deploy without a project changes no ownership)."""
        row = await self._one(
            "INSERT INTO functions (id, branch_id, slug, name, runtime, owner)"
            " VALUES (%s,%s,%s,%s,%s,%s)"
            " ON CONFLICT (branch_id, slug) DO UPDATE SET name = EXCLUDED.name,"
            " runtime = EXCLUDED.runtime, owner = COALESCE(EXCLUDED.owner, functions.owner),"
            " updated_at = now() RETURNING *",
            (new_id("fn"), branch_id, slug, name, runtime, owner),
        )
        assert row is not None
        return FunctionRow(**row)

    async def set_active_deployment(self, function_id: str, deployment_id: str, *,
                                    build_log: str | None = None) -> None:
        """Make the deployment the function's active one (one statement: both rows or
        neither), stamping its ``activated_at``; with ``build_log``, its build is also
        finished as ``ready`` in that statement."""
        finish = (", status = 'ready', error = NULL, build_log = %s, finished_at = now()"
                  if build_log is not None else "")
        await self._exec(
            f"WITH d AS (UPDATE deployments SET activated_at = now(){finish} WHERE id = %s)"
            " UPDATE functions SET active_deployment_id = %s, updated_at = now() WHERE id = %s",
            (*([build_log] if build_log is not None else []), deployment_id, deployment_id,
             function_id),
        )

    async def delete_function(self, function_id: str) -> None:
        await self._exec("DELETE FROM functions WHERE id = %s", (function_id,))

    # -- deployments ---------------------------------------------------------
    async def insert_deployment(self, deployment_id: str, function_id: str,
                                artifact_sha256: str, runtime: str, entry: str, *,
                                env_sealed: str, env_keys: list[str], env_digest: str,
                                limits: dict[str, Any] | None = None,
                                bundle: bool = True) -> DeploymentRow:
        row = await self._one(
            "INSERT INTO deployments (id, function_id, artifact_sha256, runtime, entry,"
            " env_sealed, env_keys, env_digest, limits, bundle, status)"
            " VALUES (%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,'building') RETURNING *",
            (deployment_id, function_id, artifact_sha256, runtime, entry, env_sealed,
             sorted(env_keys), env_digest, Jsonb(limits or {}), bundle),
        )
        assert row is not None
        return DeploymentRow(**row)

    async def finish_deployment(self, deployment_id: str, status: str, error: str | None,
                                build_log: str) -> None:
        await self._exec(
            "UPDATE deployments SET status = %s, error = %s, build_log = %s,"
            " finished_at = now() WHERE id = %s",
            (status, error, build_log, deployment_id),
        )

    async def get_deployment(self, deployment_id: str) -> DeploymentRow | None:
        if not _storable(deployment_id):
            return None
        row = await self._one("SELECT * FROM deployments WHERE id = %s", (deployment_id,))
        return DeploymentRow(**row) if row else None

    async def list_deployments(self, function_id: str) -> list[DeploymentRow]:
        rows = await self._all(
            "SELECT * FROM deployments WHERE function_id = %s ORDER BY created_at DESC",
            (function_id,),
        )
        return [DeploymentRow(**r) for r in rows]

    async def mark_pruned(self, deployment_ids: list[str]) -> None:
        """Retention is removing these deployments' files: no rollback to them."""
        if deployment_ids:
            await self._exec("UPDATE deployments SET pruned_at = now() WHERE id = ANY(%s)",
                             (deployment_ids,))

    async def kept_deployment_ids(self) -> set[str]:
        """Deployments whose built files are kept: every active one, and every ready one
        retention has not removed (rollback targets)."""
        rows = await self._all(
            "SELECT active_deployment_id AS id FROM functions"
            " WHERE active_deployment_id IS NOT NULL UNION"
            " SELECT id FROM deployments WHERE status = 'ready' AND pruned_at IS NULL")
        return {r["id"] for r in rows}

    async def fail_unfinished_deployments(self) -> int:
        """Builds interrupted by a crash never finish; say so instead of 'building'."""
        return await self._exec(
            "UPDATE deployments SET status = 'failed', error = 'interrupted by a platform"
            " restart', finished_at = now() WHERE status = 'building'"
        )


def _storable(text: str) -> bool:
    """PostgreSQL text cannot hold NUL: such a reference names nothing (and would make
    the driver raise instead of finding no row)."""
    return "\x00" not in text
