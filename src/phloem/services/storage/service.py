"""The ``storage`` branch service: every branch with ``buckets`` in its neon.ts gets an
S3-compatible endpoint at ``<branch>--storage.<domain>`` and the variables the AWS SDKs
read.

    registry = ServiceRegistry({"storage": StorageService()}, store)
    # start(ctx) serves one StorageApp for all branches on <data>/run/storage.sock; the
    # gateway reaches it through acquire(); branch create/reset/delete call copy/reset/delete.

The quota per branch is ``$PHLOEM_STORAGE_QUOTA_BYTES`` (default 10 GiB), read at start.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any

from phloem.gateway.routing import RouteError, Upstream
from phloem.metadata.services import ServiceStore
from phloem.metadata.store import BranchRow
from phloem.services.base import ServiceContext, ServiceHost
from phloem.services.storage.app import ObjectListener, StorageApp
from phloem.services.storage.dispatch import dispatch
from phloem.services.storage.state import StorageBranches, parse_buckets
from phloem.services.upstream import AsgiServer, SocketPool, serve_asgi

QUOTA_ENV = "PHLOEM_STORAGE_QUOTA_BYTES"
DEFAULT_QUOTA_BYTES = 10 * 1024**3
REGION = "us-east-1"


def quota_from_env() -> int:
    value = os.environ.get(QUOTA_ENV, str(DEFAULT_QUOTA_BYTES))
    if not value.isdigit() or int(value) == 0:
        raise ValueError(f"{QUOTA_ENV}: must be a positive number of bytes, got {value!r}")
    return int(value)


class StorageService:
    name = "storage"

    def __init__(self) -> None:
        self._ctx: ServiceContext | None = None
        self._branches: StorageBranches | None = None
        self._server: AsgiServer | None = None
        self._pool: SocketPool | None = None
        self._app: StorageApp | None = None
        #: branch id -> the service's config (neon.ts's buckets), as provisioned.
        self._configs: dict[str, dict[str, Any]] = {}

    @property
    def branches(self) -> StorageBranches:
        if self._branches is None:
            raise RuntimeError("the storage service has not started")
        return self._branches

    async def _config_of(self, branch_id: str) -> dict[str, Any] | None:
        return self._configs.get(branch_id)

    async def start(self, ctx: ServiceContext) -> None:
        self._ctx = ctx
        on = await ServiceStore(ctx.pool).all()
        self._configs = {b: s["storage"] for b, s in on.items() if "storage" in s}
        self._branches = StorageBranches(ctx.secret_box,
                                         lambda b: ctx.branch_dir(b, self.name),
                                         self._config_of, quota_from_env())
        socket = ctx.paths.run / "storage.sock"
        self._app = StorageApp(self._branches, ctx.domain, dispatch)
        self._server = await serve_asgi(self._app, socket)
        self._pool = SocketPool(socket)

    def set_object_listener(self, listener: ObjectListener) -> None:
        """Tell ``listener`` of every object created from now on (the platform's
        storage_object_created triggers)."""
        if self._app is None:
            raise RuntimeError("the storage service has not started")
        self._app.listener = listener

    async def stop(self) -> None:
        if self._pool is not None:
            self._pool.close()
        if self._server is not None:
            await self._server.close()
        if self._branches is not None:
            self._branches.close()

    def env(self, branch: BranchRow, config: dict[str, Any]) -> dict[str, str]:
        key = self.branches.credentials(branch.id)
        if key is None or self._ctx is None:
            return {}
        return {"AWS_ACCESS_KEY_ID": key[0], "AWS_SECRET_ACCESS_KEY": key[1],
                "AWS_ENDPOINT_URL_S3": self._ctx.base_url(branch.id, self.name),
                "AWS_REGION": REGION, "NEON_STORAGE_FORCE_PATH_STYLE": "true"}

    async def acquire(self, host: ServiceHost) -> Upstream:
        if self._pool is None or host.branch_id not in self._configs:
            raise RouteError(404, "unknown_host",
                             f"branch {host.branch_id} has no object storage")
        return await self._pool.acquire()

    async def provision(self, branch: BranchRow, config: dict[str, Any]) -> None:
        parse_buckets(config)   # refused before anything is written
        await self.branches.provision(branch.id, config)
        self._configs[branch.id] = dict(config)

    async def unprovision(self, branch: BranchRow) -> None:
        self._configs.pop(branch.id, None)
        await self.branches.delete(branch.id)

    def copying(self, parent: BranchRow, child: BranchRow
                ) -> contextlib.AbstractAsyncContextManager[None]:
        """The parent's objects cloned ahead while the database copy runs."""
        return self.branches.copying(parent.id, child.id)

    def at_consistency(self, parent: BranchRow, child: BranchRow
                       ) -> contextlib.AbstractAsyncContextManager[None]:
        """The parent's objects as of the database copy's ``pg_backup_stop``."""
        return self.branches.frozen(parent.id, child.id)

    async def copy(self, parent: BranchRow, child: BranchRow) -> None:
        if parent.id in self._configs:
            self._configs[child.id] = dict(self._configs[parent.id])
            await self.branches.copy(parent.id, child.id)

    async def reset(self, branch: BranchRow, parent: BranchRow) -> None:
        await self.branches.reset(branch.id, parent.id)

    async def delete(self, branch: BranchRow) -> None:
        self._configs.pop(branch.id, None)
        await self.branches.delete(branch.id)
