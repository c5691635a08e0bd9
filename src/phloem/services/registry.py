"""The platform's branch services: which branches have which on, routing to them, their
variables, and their part of branch create, reset and delete.

    registry = ServiceRegistry.builtin(ServiceStore(pool))
    await registry.start(ctx)
    await registry.declare(branch, {"storage": {"buckets": {"images": {}}}})
    registry.env(branch)            # {"AWS_ACCESS_KEY_ID": ..., ...}
    await registry.acquire("br-quiet-moon-3f9a2c--storage.fn.localhost:8787")
    await registry.copy(parent, child)     # the branch manager calls these three
    await registry.reset(branch, parent)
    await registry.delete(branch)

With ``certificates`` set (``--tls``: the platform's ``Certificates``), a service's host
``<branch_id>--<service>.<domain>`` is ensured when the service is provisioned on a
branch (``declare``, ``copy``, and every one at start through :meth:`ensure_hosts`) and
forgotten when it is removed or its branch deleted.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

from phloem.gateway.acme import Certificates
from phloem.gateway.routing import RouteError, Upstream
from phloem.metadata.services import ServiceStore
from phloem.metadata.store import BranchRow
from phloem.services.ai_gateway.service import AiGatewayService
from phloem.services.auth import AuthService
from phloem.services.base import (
    SERVICES,
    BranchService,
    ServiceContext,
    ServiceUnavailable,
    parse_service_host,
    service_host,
)
from phloem.services.storage.service import StorageService
from phloem.system.validation import InvalidInput

log = logging.getLogger("phloem.services")

#: The services this build of phloem provides: name -> factory.
BUILTIN: dict[str, Callable[[], BranchService]] = {
    "ai": AiGatewayService,
    "auth": AuthService,
    "storage": StorageService,
}

#: What neon.ts calls each service, for messages.
LABELS = {"auth": "Neon Auth (auth)", "ai": "the AI Gateway (aiGateway)",
          "storage": "object storage (buckets)"}


class ServiceError(Exception):
    """A refused service change; ``status``/``code`` go to the API as they are."""

    def __init__(self, status: int, code: str, message: str, field: str = "services") -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.field = status, code, message, field


class ServiceRegistry:
    def __init__(self, services: dict[str, BranchService], store: ServiceStore) -> None:
        self.services = services
        self.store = store
        self._on: dict[str, dict[str, dict[str, Any]]] = {}
        self._ctx: ServiceContext | None = None
        self._locks: dict[str, asyncio.Lock] = {}
        #: Who orders and forgets the hosts' certificates (None: plain HTTP).
        self.certificates: Certificates | None = None

    @classmethod
    def builtin(cls, store: ServiceStore) -> ServiceRegistry:
        return cls({name: make() for name, make in BUILTIN.items()}, store)

    @property
    def ctx(self) -> ServiceContext:
        if self._ctx is None:
            raise RuntimeError("the service registry has not started")
        return self._ctx

    # -- lifecycle -------------------------------------------------------------
    async def start(self, ctx: ServiceContext) -> None:
        self._ctx = ctx
        self._on = await self.store.all()
        for service in self.services.values():
            await service.start(ctx)

    async def stop(self) -> None:
        for service in self.services.values():
            try:
                await service.stop()
            except Exception:
                log.exception("stopping the %s service failed", service.name)

    # -- what a branch has -----------------------------------------------------
    def enabled(self, branch_id: str) -> dict[str, dict[str, Any]]:
        """service -> config for the branch (a copy)."""
        return {k: dict(v) for k, v in self._on.get(branch_id, {}).items()}

    def env(self, branch: BranchRow, function: str = "") -> dict[str, str]:
        """The variables of every service the branch has on, for its functions; a
        service with a ``function_env(branch, config, slug)`` (the AI Gateway: a token
        per function) gives ``function``'s own."""
        out: dict[str, str] = {}
        for name, config in self._on.get(branch.id, {}).items():
            service = self.services.get(name)
            if service is None:
                continue
            per_function = getattr(service, "function_env", None)
            out.update(per_function(branch, config, function) if function and per_function
                       else service.env(branch, config))
        return out

    def hosts(self, branch_id: str) -> list[str]:
        """The host names of the branch's services (isolates resolve them to the gateway)."""
        return [service_host(branch_id, name, self.ctx.domain)
                for name in self._on.get(branch_id, {}) if name in self.services]

    def ensure_hosts(self) -> None:
        """Have a certificate for every provisioned service's host (at start, once the
        certificates' manager runs)."""
        for branch_id in list(self._on):
            for host in self.hosts(branch_id):
                self._certificate(host, True)

    def _certificate(self, host: str, wanted: bool) -> None:
        if self.certificates is None:
            return
        try:
            if wanted:
                self.certificates.ensure(host)
            else:
                self.certificates.forget(host)
        except ValueError as exc:  # a name the CA cannot validate: served the fallback
            log.warning("services: no certificate for %s: %s", host, exc)

    def _lock(self, branch_id: str) -> asyncio.Lock:
        return self._locks.setdefault(branch_id, asyncio.Lock())

    async def declare(self, branch: BranchRow, wanted: dict[str, dict[str, Any]]) -> bool:
        """Make the branch's services exactly ``wanted`` (what its neon.ts declares):
        provision new or changed ones, unprovision the others. All are checked before
        any changes; returns whether anything changed."""
        for name in wanted:
            if name not in SERVICES:
                raise ServiceError(400, "invalid_input", f"services: unknown service "
                                   f"{name!r} (known: {', '.join(SERVICES)})")
            if name not in self.services:
                raise ServiceError(400, "service_unavailable",
                                   f"{LABELS.get(name, name)} is not available on this "
                                   "platform")
        async with self._lock(branch.id):
            current = self._on.get(branch.id, {})
            changed = False
            added: list[str] = []
            for name, config in wanted.items():
                if current.get(name) != config:
                    try:
                        await self.services[name].provision(branch, config)
                    except InvalidInput as exc:  # the service's config rules, by field
                        await self._undo(branch, added)
                        raise ServiceError(400, "invalid_input", exc.message,
                                           exc.field) from None
                    except ValueError as exc:
                        await self._undo(branch, added)
                        raise ServiceError(400, "invalid_input", str(exc),
                                           f"services.{name}") from None
                    except ServiceUnavailable as exc:
                        await self._undo(branch, added)
                        raise ServiceError(
                            503, "service_unavailable",
                            f"{LABELS.get(name, name)} could not be provisioned on branch "
                            f"{branch.name!r}: {exc.reason}", f"services.{name}") from None
                    if name not in current:
                        added.append(name)
                    await self.store.put(branch.id, name, config)
                    self._on.setdefault(branch.id, {})[name] = dict(config)
                    self._certificate(service_host(branch.id, name, self.ctx.domain), True)
                    changed = True
            for name in [n for n in current if n not in wanted]:
                service = self.services.get(name)
                if service is not None:
                    await service.unprovision(branch)
                await self.store.remove(branch.id, name)
                self._on.get(branch.id, {}).pop(name, None)
                self._certificate(service_host(branch.id, name, self.ctx.domain), False)
                changed = True
            return changed

    async def _undo(self, branch: BranchRow, added: list[str]) -> None:
        """A refused ``declare``: the services it had added go again, so the branch keeps
        the set it had (a changed config stays changed: it is whole either way)."""
        for name in reversed(added):
            try:
                await self.services[name].unprovision(branch)
            except Exception:
                log.exception("removing %s from %s after a refused change failed",
                              name, branch.id)
            await self.store.remove(branch.id, name)
            self._on.get(branch.id, {}).pop(name, None)
            self._certificate(service_host(branch.id, name, self.ctx.domain), False)

    # -- routing ---------------------------------------------------------------
    async def acquire(self, host: str) -> Upstream | None:
        """A lease to the service ``host`` names; ``None`` if it names no service."""
        parsed = parse_service_host(host, self.ctx.domain)
        if parsed is None:
            return None
        service = self.services.get(parsed.service)
        if service is None or parsed.service not in self._on.get(parsed.branch_id, {}):
            raise RouteError(404, "unknown_host",
                             f"branch {parsed.branch_id} has no {parsed.service} service")
        return await service.acquire(parsed)

    # -- branch operations (called by the branch manager) ----------------------
    @contextlib.asynccontextmanager
    async def copying(self, parent: BranchRow, child: BranchRow) -> AsyncIterator[None]:
        """Around the whole database copy: services with state beside the database
        (``copying(parent, child)``: storage) may start copying it meanwhile, for
        ``at_consistency`` to finish."""
        async with self._each_hook("copying", parent, child):
            yield

    @contextlib.asynccontextmanager
    async def at_consistency(self, parent: BranchRow, child: BranchRow
                             ) -> AsyncIterator[None]:
        """Around the database copy's ``pg_backup_stop``: services with state beside the
        database (``at_consistency(parent, child)``: storage) freeze it on entering and
        copy it on leaving, so the child's objects match its rows; their ``copy`` then
        finishes the child's part."""
        async with self._each_hook("at_consistency", parent, child):
            yield

    @contextlib.asynccontextmanager
    async def _each_hook(self, hook_name: str, parent: BranchRow, child: BranchRow
                         ) -> AsyncIterator[None]:
        """Enter ``hook_name(parent, child)`` of each of the parent's services that has
        one (an optional hook: most services keep no state beside the database)."""
        async with contextlib.AsyncExitStack() as stack:
            for name in self._on.get(parent.id, {}):
                hook = getattr(self.services.get(name), hook_name, None)
                if hook is not None:
                    await stack.enter_async_context(hook(parent, child))
            yield

    async def copy(self, parent: BranchRow, child: BranchRow) -> None:
        await self.store.copy(parent.id, child.id)
        on = self.enabled(parent.id)
        if on:
            self._on[child.id] = on
        for name in on:
            service = self.services.get(name)
            if service is not None:
                await service.copy(parent, child)
                self._certificate(service_host(child.id, name, self.ctx.domain), True)

    async def reset(self, branch: BranchRow, parent: BranchRow) -> None:
        async with self._lock(branch.id):
            for name in self._on.get(branch.id, {}):
                service = self.services.get(name)
                if service is not None:
                    await service.reset(branch, parent)

    async def delete(self, branch: BranchRow) -> None:
        async with self._lock(branch.id):
            for name in self._on.get(branch.id, {}):
                service = self.services.get(name)
                if service is not None:
                    await service.delete(branch)
                self._certificate(service_host(branch.id, name, self.ctx.domain), False)
            self._on.pop(branch.id, None)
        self._locks.pop(branch.id, None)
