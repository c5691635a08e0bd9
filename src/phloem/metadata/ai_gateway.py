"""The AI Gateway's rows in the system database: each branch's sealed gateway secret and
its usage counters (migration 0014). Each method is one short transaction, as in
:class:`~phloem.metadata.store.Store`.

    ai = AiGatewayStore(pool, box)
    await ai.put_secret(branch_id, os.urandom(32))
    await ai.add_usage(branch_id, "chat", "openai", "gpt-4o-mini", 12, 40, error=False)
    rows = await ai.usage(branch_id)
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from datetime import datetime

from psycopg_pool import AsyncConnectionPool

from phloem.metadata.db import PooledStore
from phloem.metadata.secrets import SecretBox


def secret_context(branch_id: str) -> str:
    """A sealed gateway secret opens only for its own branch."""
    return f"branch:{branch_id}:ai_gateway_secret"


@dataclass(frozen=True)
class UsageRow:
    branch_id: str
    #: The calling function's slug; '' for the branch-wide token.
    function_slug: str
    provider: str
    model: str
    requests: int
    errors: int
    input_tokens: int
    output_tokens: int
    first_at: datetime
    last_at: datetime


class AiGatewayStore(PooledStore):
    def __init__(self, pool: AsyncConnectionPool, box: SecretBox) -> None:
        super().__init__(pool)
        self.box = box

    async def secrets(self) -> dict[str, bytes]:
        """Every branch's secret, opened (the gateway keeps them in memory)."""
        rows = await self._all("SELECT branch_id, secret_sealed FROM ai_gateway_branches")
        return {r["branch_id"]: self._open(r["branch_id"], r["secret_sealed"]) for r in rows}

    async def put_secret(self, branch_id: str, secret: bytes) -> None:
        """Set the branch's secret (a new one replaces the old: its tokens stop working)."""
        sealed = self.box.seal_text(base64.urlsafe_b64encode(secret).decode(),
                                    secret_context(branch_id))
        await self._all("INSERT INTO ai_gateway_branches (branch_id, secret_sealed) "
                        "VALUES (%s, %s) ON CONFLICT (branch_id) DO UPDATE SET "
                        "secret_sealed = excluded.secret_sealed", (branch_id, sealed))

    async def remove(self, branch_id: str, *, usage: bool) -> None:
        """The branch's secret goes (its tokens stop working), and with ``usage`` its
        counters (they go with the branch row anyway)."""
        await self._all("DELETE FROM ai_gateway_branches WHERE branch_id = %s", (branch_id,))
        if usage:
            await self._all("DELETE FROM ai_usage WHERE branch_id = %s", (branch_id,))

    def _open(self, branch_id: str, sealed: str) -> bytes:
        return base64.urlsafe_b64decode(self.box.open_text(sealed, secret_context(branch_id)))

    async def add_usage(self, branch_id: str, function_slug: str, provider: str, model: str,
                        input_tokens: int, output_tokens: int, *, error: bool) -> None:
        """Count one request (a no-op for a branch deleted meanwhile)."""
        await self._all(
            "INSERT INTO ai_usage (branch_id, function_slug, provider, model, requests, "
            "errors, input_tokens, output_tokens) SELECT %s, %s, %s, %s, 1, %s, %s, %s "
            "WHERE EXISTS (SELECT 1 FROM branches WHERE id = %s) "
            "ON CONFLICT (branch_id, function_slug, provider, model) DO UPDATE SET "
            "requests = ai_usage.requests + 1, errors = ai_usage.errors + excluded.errors, "
            "input_tokens = ai_usage.input_tokens + excluded.input_tokens, "
            "output_tokens = ai_usage.output_tokens + excluded.output_tokens, "
            "last_at = now()",
            (branch_id, function_slug, provider, model, int(error), input_tokens,
             output_tokens, branch_id))

    async def usage(self, branch_id: str | None = None) -> list[UsageRow]:
        """Counters of one branch, or of all, by branch, function, provider, model."""
        where, params = ("WHERE branch_id = %s", (branch_id,)) if branch_id else ("", ())
        rows = await self._all(f"SELECT * FROM ai_usage {where} ORDER BY branch_id, "
                               "function_slug, provider, model", params)
        return [UsageRow(**r) for r in rows]
