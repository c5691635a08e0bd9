"""A branch's lifetime: its ``ttl`` (it expires and is deleted with its functions) and
``protected`` flag (delete and reset refused), as a neon.ts ``branch`` closure sets them.

    lifetime = BranchLifetime(manager, before_delete=deployer.drop_branch)
    row = await lifetime.set(ref, ttl_s=7 * 86400, protected=None)  # expires 7 d after creation
    lifetime.start()      # the sweeper: deletes branches whose expires_at has passed
    await lifetime.stop()

``expires_at`` is the branch's creation time plus ``ttl``, as on Neon, where the ttl counts
from when the branch was made; setting the same ttl again changes nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from datetime import timedelta

from phloem.branches.manager import BranchError, BranchHook, BranchManager
from phloem.metadata.store import BranchRow

log = logging.getLogger("phloem.branches")

#: How often the sweeper looks for expired branches (one indexed query).
SWEEP_INTERVAL_S = 1.0
#: Longest ttl accepted: a year.
MAX_TTL_S = 366 * 86400


class BranchLifetime:
    def __init__(self, manager: BranchManager, before_delete: BranchHook,
                 interval_s: float = SWEEP_INTERVAL_S) -> None:
        self.manager = manager
        self.before_delete = before_delete
        self.interval_s = interval_s
        self._task: asyncio.Task[None] | None = None
        self._stopping = asyncio.Event()
        #: Expired branches whose deletion was refused, warned about once each.
        self._warned: set[str] = set()

    async def set(self, ref: str, ttl_s: int | None, protected: bool | None,
                  clear_ttl: bool = False) -> BranchRow:
        """Set what is given (None: left as it is; ``clear_ttl``: never expires)."""
        row = await self.manager.get(ref)
        fields: dict[str, object] = {}
        will_protect = row.protected if protected is None else protected
        if ttl_s is not None:
            if isinstance(ttl_s, bool) or not 1 <= ttl_s <= MAX_TTL_S:
                raise BranchError(400, "invalid_input", f"ttl_s: must be from 1 to "
                                  f"{MAX_TTL_S} seconds (got {ttl_s!r})", field="ttl_s")
            if row.parent_id is None:
                raise BranchError(409, "cannot_expire_root", f"branch {row.name!r} is the "
                                  "root branch and cannot expire", field="ttl_s")
            if will_protect:
                raise BranchError(409, "branch_protected", f"branch {row.name!r} is "
                                  "protected and cannot expire", field="ttl_s")
            fields["expires_at"] = row.created_at + timedelta(seconds=ttl_s)
        elif clear_ttl:
            fields["expires_at"] = None
        if protected is not None:
            if protected and row.expires_at is not None and "expires_at" not in fields:
                raise BranchError(409, "branch_expires", f"branch {row.name!r} expires at "
                                  f"{row.expires_at.isoformat()}; a protected branch cannot "
                                  "expire (clear its ttl first)", field="protected")
            fields["protected"] = protected
        if fields:
            await self.manager.store.update_branch(row.id, **fields)
        return await self.manager.get(row.id)

    # -- the sweeper -----------------------------------------------------------------
    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._loop())

    async def stop(self) -> None:
        if self._task is not None:
            self._stopping.set()  # a deletion under way finishes first
            with contextlib.suppress(Exception):
                await self._task
            self._task = None

    async def sweep(self) -> list[str]:
        """Delete every expired branch (with its children and functions); returns the
        deleted ids. A refused one (a protected child) is logged and left."""
        deleted: list[str] = []
        for branch_id in await self.manager.store.expired_branch_ids():
            try:
                gone = await self.manager.delete(branch_id, True, self.before_delete)
            except BranchError as exc:
                # Not found: deleted by its parent's expiry. Refused ones are retried each
                # sweep (a protected child may be unprotected) but warned about once.
                if exc.code != "branch_not_found" and branch_id not in self._warned:
                    self._warned.add(branch_id)
                    log.warning("branch %s expired but was not deleted: %s", branch_id,
                                exc.message)
                continue
            log.info("branch %s expired: deleted %s", branch_id, ", ".join(gone))
            deleted += gone
        return deleted

    async def _loop(self) -> None:
        while not self._stopping.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), self.interval_s)
            if self._stopping.is_set():
                return
            try:
                await self.sweep()
            except Exception:  # the system database down: the next sweep retries
                log.exception("branch expiry sweep failed")
