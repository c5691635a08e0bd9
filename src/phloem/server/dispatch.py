"""The gateway's router: Host header -> active deployment -> leased isolate connection.

    ``br-quiet-moon-3f9a2c-todos.fn.localhost:8787`` -> branch ``br-quiet-moon-3f9a2c``,
    function ``todos``.
"""

from __future__ import annotations

import functools
import re
from typing import Protocol

from phloem.control.routes import RoutingTable
from phloem.gateway.routing import RouteError, Upstream
from phloem.services.registry import ServiceRegistry
from phloem.supervisor import IsolateFailed, Supervisor

_LABEL_RE = re.compile(r"^(br-[a-z]+-[a-z]+-[0-9a-f]{6})-([a-z0-9]{1,20})$")


@functools.lru_cache(maxsize=4096)
def parse_host(host: str, domain: str) -> tuple[str, str] | None:
    """``(branch_id, slug)`` for a function host name, else ``None``. Cached: the router
    and the request observer both ask for every request."""
    name = host.strip().lower()
    if name.startswith("["):
        return None
    name = name.rsplit(":", 1)[0] if ":" in name else name
    suffix = "." + domain.lower()
    if not name.endswith(suffix):
        return None
    m = _LABEL_RE.match(name[: -len(suffix)])
    return (m.group(1), m.group(2)) if m else None


class HasRoutes(Protocol):
    """Whoever owns the routing table (the deployer); the router only reads it."""

    @property
    def routes(self) -> RoutingTable: ...


class PlatformRouter:
    def __init__(self, owner: HasRoutes, supervisor: Supervisor, domain: str,
                 services: ServiceRegistry | None = None) -> None:
        self.routes = owner.routes
        self.supervisor = supervisor
        self.domain = domain
        #: Branch services answer at ``<branch_id>--<service>.<domain>``.
        self.services = services

    async def acquire(self, host: str) -> Upstream:
        key = parse_host(host, self.domain)
        spec = self.routes.get(key) if key else None
        if spec is None and key is None and self.services is not None:
            lease = await self.services.acquire(host)
            if lease is not None:
                return lease
        if spec is None:
            raise RouteError(404, "unknown_host",
                             f"no function is deployed at host {host!r}")
        try:
            return await self.supervisor.acquire(spec)
        except IsolateFailed as exc:
            raise RouteError(502, "isolate_failed", str(exc)) from exc

    def acquire_nowait(self, host: str) -> Upstream | None:
        """The gateway's fast path (see gateway.routing): an idle pooled connection to a
        ready isolate of the host's deployment, or ``None`` (then :meth:`acquire`)."""
        key = parse_host(host, self.domain)
        spec = self.routes.get(key) if key is not None else None
        return self.supervisor.acquire_nowait(spec) if spec is not None else None
