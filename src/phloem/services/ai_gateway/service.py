"""The AI Gateway as a branch service (``preview.aiGateway: true`` in neon.ts).

One :class:`~phloem.services.ai_gateway.app.GatewayApp` serves every branch on one Unix
socket; the platform's gateway routes ``<branch_id>--ai.<domain>`` to it. Each branch
with the service on has a secret of its own (sealed in the system database); its
functions get ``NEON_AI_GATEWAY_BASE_URL`` and ``NEON_AI_GATEWAY_TOKEN``, an HMAC of that
secret naming the function (see :mod:`~phloem.services.ai_gateway.tokens`).

Branch operations: a child gets a new secret and no usage (a parent's token is refused
on it); a reset keeps the branch's own secret and usage (they are not data the parent
has); unprovision removes the secret and keeps what was counted; delete removes both.

    BUILTIN = {"ai": AiGatewayService}          # phloem.services.registry
"""

from __future__ import annotations

import logging
from typing import Any

from phloem.gateway.routing import RouteError, Upstream
from phloem.metadata.ai_gateway import AiGatewayStore
from phloem.metadata.store import BranchRow
from phloem.services.ai_gateway.app import GatewayApp, ProviderConn, UsageEvent
from phloem.services.ai_gateway.tokens import make_token, new_secret
from phloem.services.base import ServiceContext, ServiceHost
from phloem.services.upstream import AsgiServer, SocketPool, serve_asgi

logger = logging.getLogger("phloem.ai_gateway")

SOCKET_NAME = "ai-gateway.sock"


class AiGatewayService:
    name = "ai"

    def __init__(self) -> None:
        self._ctx: ServiceContext | None = None
        self._store: AiGatewayStore | None = None
        #: branch id -> secret; the app reads this very dict.
        self._secrets: dict[str, bytes] = {}
        self._app: GatewayApp | None = None
        self._server: AsgiServer | None = None
        self._sockets: SocketPool | None = None

    @property
    def ctx(self) -> ServiceContext:
        if self._ctx is None:
            raise RuntimeError("the AI Gateway has not started")
        return self._ctx

    @property
    def store(self) -> AiGatewayStore:
        if self._store is None:
            raise RuntimeError("the AI Gateway has not started")
        return self._store

    async def start(self, ctx: ServiceContext) -> None:
        self._ctx = ctx
        self._store = AiGatewayStore(ctx.pool, ctx.secret_box)
        self._secrets.update(await self._store.secrets())
        configured = ctx.settings.ai_providers if ctx.settings is not None else ()
        providers = {p.kind: ProviderConn(p.kind, p.url, p.key()) for p in configured}
        self._app = GatewayApp(providers, self._secrets, self._record, ctx.domain)
        path = ctx.paths.run / SOCKET_NAME
        self._server = await serve_asgi(self._app, path)
        self._sockets = SocketPool(path)
        kinds = ", ".join(f"{p.kind} -> {p.url}" for p in providers.values()) or "none"
        logger.info("ai gateway: upstreams %s", kinds)

    async def stop(self) -> None:
        if self._sockets is not None:
            self._sockets.close()
        if self._server is not None:
            await self._server.close()
        if self._app is not None:
            await self._app.aclose()

    async def _record(self, event: UsageEvent) -> None:
        await self.store.add_usage(event.branch_id, event.function_slug, event.provider,
                                   event.model, event.input_tokens, event.output_tokens,
                                   error=event.error)

    def env(self, branch: BranchRow, config: dict[str, Any]) -> dict[str, str]:
        """The branch-wide token (usage counted under function '')."""
        return self.function_env(branch, config, "")

    def function_env(self, branch: BranchRow, config: dict[str, Any],
                     function_slug: str) -> dict[str, str]:
        """The variables of one function: its own token, so usage is counted per
        function on a word phloem can trust (a header would be the caller's)."""
        secret = self._secrets.get(branch.id)
        if secret is None:
            raise RuntimeError(f"the AI Gateway is not provisioned on branch {branch.id}")
        return {"NEON_AI_GATEWAY_BASE_URL": self.ctx.base_url(branch.id, self.name),
                "NEON_AI_GATEWAY_TOKEN": make_token(secret, function_slug)}

    async def acquire(self, host: ServiceHost) -> Upstream:
        """A connection to the one socket every branch shares (the app reads Host)."""
        if host.branch_id not in self._secrets or self._sockets is None:
            raise RouteError(404, "unknown_host",
                             f"branch {host.branch_id} has no AI Gateway")
        return await self._sockets.acquire()

    async def _new_secret(self, branch_id: str) -> None:
        secret = new_secret()
        await self.store.put_secret(branch_id, secret)
        self._secrets[branch_id] = secret

    async def provision(self, branch: BranchRow, config: dict[str, Any]) -> None:
        if branch.id not in self._secrets:  # a changed config keeps the tokens
            await self._new_secret(branch.id)

    async def unprovision(self, branch: BranchRow) -> None:
        self._secrets.pop(branch.id, None)
        await self.store.remove(branch.id, usage=False)

    async def copy(self, parent: BranchRow, child: BranchRow) -> None:
        await self._new_secret(child.id)

    async def reset(self, branch: BranchRow, parent: BranchRow) -> None:
        """Nothing: the branch keeps its secret (its functions' tokens) and usage."""

    async def delete(self, branch: BranchRow) -> None:
        self._secrets.pop(branch.id, None)
        await self.store.remove(branch.id, usage=True)
