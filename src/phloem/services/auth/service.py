"""Neon Auth (``auth: true`` in neon.ts): a Better Auth server per branch.

Each branch with auth on gets its own server, answering at its own origin
``http://<branch>--auth.<domain>:<port>`` under ``/<database>/auth`` (Neon's layout), with
its tables in schema ``neon_auth`` of the branch's own database. So users, sessions and
signing keys are copied by a branch create and restored by a reset exactly like the
data, and nothing here copies anything. Each branch is its own JWT issuer (its origin):
a child's tokens carry the parent's keys but fail the parent's issuer check.

    service = AuthService()
    await service.start(ctx)
    service.env(branch, {})   # NEON_AUTH_BASE_URL, NEON_AUTH_JWKS_URL
    await service.provision(branch, {})           # schema and tables, server started
    lease = await service.acquire(branch.id, host)  # the gateway's connection

What runs: ``node server.mjs`` (Better Auth, kysely, pg; installed once with ``npm ci``
from the lockfile shipped here, see ``install.py``), one process per branch, as the
unprivileged system user ``phloem-auth``, on a socket phloem binds in the branch's
directory. It starts on the first request (or at provision) and stops after
``idle_timeout`` seconds without one, and at unprovision, reset and delete. It runs on
the Node 24 phloem provisions for functions.

Email and password sign-up and sign-in, sessions (cookie ``__Secure-neon-auth.*`` as
``@neondatabase/auth`` expects, or ``Authorization: Bearer <session token>``), JWTs at
``/token`` and in ``set-auth-jwt``, JWKS at ``/.well-known/jwks.json``. No mail is sent:
verification and password-reset links are written to the branch's ``auth.log``. OAuth
providers are not offered.

Config (``branch_services.config``): ``{"trusted_origins": ["https://app.example", ...]}``
(optional): origins besides the branch's own (and ``http://localhost:*``, for local
development) allowed to send credentials, as Neon's "trusted domains".
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from phloem.gateway.routing import RouteError, Upstream
from phloem.metadata.services import ServiceStore
from phloem.metadata.store import BranchRow
from phloem.runtimes.node.provision import ProvisionError, ensure_node
from phloem.services.auth.install import ensure_auth_server
from phloem.services.auth.process import AuthServer, AuthServerError, ServerSpec
from phloem.services.base import ServiceContext, ServiceHost, ServiceUnavailable
from phloem.services.upstream import SocketPool
from phloem.system.identity import Identity, IdentityError
from phloem.system.validation import InvalidInput

log = logging.getLogger("phloem.services.auth")

NAME = "auth"
#: The system user auth servers run as (created when phloem runs as root).
AUTH_USER = "phloem-auth"
#: Origins trusted on every branch: local development servers (``next dev``).
DEV_ORIGINS = ("http://localhost:*", "http://127.0.0.1:*")
CONFIG_KEYS = frozenset({"trusted_origins"})


def base_path(branch: BranchRow) -> str:
    """Where Better Auth serves on the branch's origin: ``/<database>/auth``, as Neon."""
    return f"/{branch.database}/auth"


def check_config(config: dict[str, Any]) -> list[str]:
    """The trusted origins of a valid config; :class:`InvalidInput` naming the field
    otherwise (the API answers it with a 400)."""
    unknown = sorted(set(config) - CONFIG_KEYS)
    if unknown:
        raise InvalidInput(f"services.auth.{unknown[0]}",
                           "unknown setting (allowed: trusted_origins)")
    origins = config.get("trusted_origins", [])
    if not isinstance(origins, list):
        raise InvalidInput("services.auth.trusted_origins", "must be a list of origins")
    for i, origin in enumerate(origins):
        parts = urlsplit(origin) if isinstance(origin, str) else None
        if (parts is None or parts.scheme not in ("http", "https") or not parts.hostname
                or parts.path not in ("", "/") or parts.query or parts.fragment
                or parts.username is not None):
            raise InvalidInput(f"services.auth.trusted_origins[{i}]",
                               f"must be an origin such as https://app.example.com, "
                               f"got {origin!r}")
    return [o.rstrip("/") for o in origins]


class AuthService:
    name = NAME

    def __init__(self, idle_timeout: float = 600) -> None:
        self.idle_timeout = idle_timeout
        self._ctx: ServiceContext | None = None
        self._servers: dict[str, AuthServer] = {}
        self._pools: dict[str, SocketPool] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._install_lock = asyncio.Lock()
        self._installed: tuple[Path, Path, Identity] | None = None
        self._reaper: asyncio.Task[None] | None = None

    @property
    def ctx(self) -> ServiceContext:
        if self._ctx is None:
            raise RuntimeError("AuthService: start() was not called")
        return self._ctx

    # -- lifecycle -------------------------------------------------------------------
    async def start(self, ctx: ServiceContext) -> None:
        self._ctx = ctx
        self._reaper = asyncio.create_task(self._reap(), name="auth-idle")

    async def stop(self) -> None:
        if self._reaper is not None:
            self._reaper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reaper
        for pool in self._pools.values():
            pool.close()
        servers, self._servers, self._pools = list(self._servers.values()), {}, {}
        await asyncio.gather(*(s.stop() for s in servers), return_exceptions=True)

    async def _reap(self) -> None:
        # Idle servers go; the next request starts one again (about a second).
        while True:
            await asyncio.sleep(max(1.0, min(30.0, self.idle_timeout / 4)))
            now = time.monotonic()
            for branch_id, server in list(self._servers.items()):
                if server.running and now - server.last_used > self.idle_timeout:
                    async with self._lock(branch_id):
                        # Still this branch's server, still idle (a lease may have come).
                        if (self._servers.get(branch_id) is server
                                and now - server.last_used > self.idle_timeout):
                            log.info("auth: stopping the idle server of %s", branch_id)
                            self._pools[branch_id].close()
                            await server.stop()

    def _lock(self, branch_id: str) -> asyncio.Lock:
        return self._locks.setdefault(branch_id, asyncio.Lock())

    # -- what functions see ----------------------------------------------------------
    def env(self, branch: BranchRow, config: dict[str, Any]) -> dict[str, str]:
        base = self.ctx.base_url(branch.id, NAME) + base_path(branch)
        return {"NEON_AUTH_BASE_URL": base,
                "NEON_AUTH_JWKS_URL": f"{base}/.well-known/jwks.json"}

    # -- the gateway -----------------------------------------------------------------
    async def acquire(self, host: ServiceHost) -> Upstream:
        server = self._servers.get(host.branch_id)
        pool = self._pools.get(host.branch_id)
        if server is None or pool is None or not server.running:
            server, pool = await self._ensure_running(host.branch_id)
        server.last_used = time.monotonic()
        return await pool.acquire()

    async def _ensure_running(self, branch_id: str) -> tuple[AuthServer, SocketPool]:
        async with self._lock(branch_id):
            server = self._servers.get(branch_id)
            if server is None:
                branch = await self.ctx.store.get_branch(branch_id)
                # Once per branch and platform start (or after a provision): not hot.
                config = (await ServiceStore(self.ctx.pool).all()).get(
                    branch_id, {}).get(NAME)
                if branch is None or config is None:
                    raise RouteError(404, "service_not_found",
                                     f"branch {branch_id!r} has no auth service")
                server = await self._new_server(branch, config)
            if not server.running:
                try:
                    await server.start()
                except AuthServerError as exc:
                    log.error("%s", exc)
                    raise RouteError(502, "auth_unavailable",
                                     f"the auth server of {branch_id} did not start; "
                                     f"see {server.spec.log_file}") from exc
            return server, self._pools[branch_id]

    async def _tools(self) -> tuple[Path, Path, Identity]:
        """(node, the installed server, its user): provisioned at the first need."""
        async with self._install_lock:
            if self._installed is None:
                tools = self.ctx.paths.runtime_tools
                node = await asyncio.to_thread(ensure_node, tools / "node", log.info)
                root = await asyncio.to_thread(ensure_auth_server, tools / "auth", node,
                                               log.info)
                user = await asyncio.to_thread(Identity.service, AUTH_USER)
                self._installed = (node, root, user)
            return self._installed

    async def _new_server(self, branch: BranchRow, config: dict[str, Any]) -> AuthServer:
        trusted = check_config(config)
        node, root, user = await self._tools()
        directory = self.ctx.branch_dir(branch.id, NAME)
        # Direct, not through the pooler: one small pool per server, queries qualified.
        url: str = self.ctx.connection_strings(branch).unpooled
        spec = ServerSpec(
            node=node, root=root, socket=directory / "http.sock",
            log_file=directory / "auth.log", identity=user,
            env={"AUTH_DATABASE_URL": url,
                 "AUTH_ORIGIN": self.ctx.base_url(branch.id, NAME),
                 "AUTH_BASE_PATH": base_path(branch),
                 "AUTH_TRUSTED_ORIGINS": json.dumps([*DEV_ORIGINS, *trusted])})
        server = AuthServer(spec)
        self._servers[branch.id] = server
        self._pools[branch.id] = SocketPool(spec.socket)
        return server

    async def _forget(self, branch_id: str) -> None:
        async with self._lock(branch_id):
            server = self._servers.pop(branch_id, None)
            pool = self._pools.pop(branch_id, None)
            if pool is not None:
                pool.close()
            if server is not None:
                await server.stop()

    # -- branch events ---------------------------------------------------------------
    async def provision(self, branch: BranchRow, config: dict[str, Any]) -> None:
        """Create ``neon_auth`` and its tables now (the server is started, which
        migrates first); a changed config restarts a running server. When the server
        cannot start (or Node or Better Auth cannot be installed), nothing of it is left
        running and :class:`ServiceUnavailable` says why."""
        check_config(config)
        await self._forget(branch.id)
        try:
            async with self._lock(branch.id):
                server = await self._new_server(branch, config)
                await server.start()
        except (AuthServerError, ProvisionError, IdentityError, OSError) as exc:
            log.error("auth: provisioning %s failed: %s", branch.id, exc)
            await self._forget(branch.id)
            reason = exc.reason if isinstance(exc, AuthServerError) else (
                str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
            raise ServiceUnavailable(NAME, reason) from exc

    async def unprovision(self, branch: BranchRow) -> None:
        # The neon_auth schema stays: its users are the developer's data.
        await self._forget(branch.id)

    async def copy(self, parent: BranchRow, child: BranchRow) -> None:
        """Nothing to copy: users, sessions and keys are in the database the branch
        create just copied. The child's server starts on its first request."""

    async def reset(self, branch: BranchRow, parent: BranchRow) -> None:
        # The database under the server was replaced: start afresh on the next request.
        await self._forget(branch.id)

    async def delete(self, branch: BranchRow) -> None:
        await self._forget(branch.id)
