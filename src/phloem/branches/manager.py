"""Branches: one PostgreSQL cluster (plus one PgBouncer) per branch.

``main`` is made by initdb on first start; every other branch is a copy-on-write clone of
its running parent (see :mod:`phloem.branches.basebackup`). A new cluster starts
*private*: its ``pg_hba.conf`` admits only phloem's superuser over the private Unix socket
until its passwords have been rotated (so the parent's credentials never open the child),
then the normal rules are loaded. Reset re-clones from the parent keeping the branch id,
ports and credentials.

Branch operations are serialised by one lock: they are rare, and it keeps ports, names
and parent/child checks simple and race-free.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import re
import shutil
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

import psycopg
from psycopg import sql

from phloem.branches.basebackup import BranchCopyError, CloneStats, clone_running_cluster
from phloem.branches.ids import new_branch_id
from phloem.branches.pooler import Pooler, find_pgbouncer, scram_secrets
from phloem.metadata.store import BranchRow, Store
from phloem.postgres.binaries import PgBinaries
from phloem.postgres.cluster import SUPERUSER, Cluster, free_port, random_secret
from phloem.system.fsutil import tree_size
from phloem.system.identity import Identity
from phloem.system.paths import DataPaths

log = logging.getLogger("phloem.branches")

DEFAULT_DATABASE = "phloemdb"
#: How often the watch looks for a branch's PostgreSQL or PgBouncer that died.
WATCH_INTERVAL_S = 0.2
#: Longest wait between restarts of one that keeps failing to start.
MAX_RESTART_BACKOFF_S = 30.0
DEFAULT_ROLE = "phloemdb_owner"
BRANCH_HOST = "127.0.0.1"
BRANCH_NAME_RE = re.compile(r"[A-Za-z0-9._/-]{1,64}")

HBA_OPEN = """# phloem: password (SCRAM) for everyone, local socket and loopback only
local   all          all                    scram-sha-256
host    all          all    127.0.0.1/32    scram-sha-256
host    all          all    ::1/128         scram-sha-256
local   replication  all                    scram-sha-256
host    replication  all    127.0.0.1/32    scram-sha-256
"""
HBA_PRIVATE = f"""# phloem: branch being prepared; only phloem's superuser, only the private socket
local   all          {SUPERUSER}            scram-sha-256
"""


class BranchError(Exception):
    """A refused branch operation; ``code`` and ``status`` go to the API as they are."""

    def __init__(self, status: int, code: str, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.field = status, code, message, field


@dataclass(frozen=True)
class ConnectionStrings:
    pooled: str
    unpooled: str


#: Called around branch operations by the platform (to stop/restart isolates).
BranchHook = Callable[[BranchRow], Awaitable[None]]


class BranchStateHooks(Protocol):
    """State a branch carries besides its database (the branch services of
    ``phloem.services``), copied, reset and deleted with it."""

    def copying(self, parent: BranchRow, child: BranchRow
                ) -> contextlib.AbstractAsyncContextManager[None]:
        """Around the whole database copy (entered before it starts, left after it, also
        when it fails): state beside the database may start copying meanwhile."""
        ...

    def at_consistency(self, parent: BranchRow, child: BranchRow
                       ) -> contextlib.AbstractAsyncContextManager[None]:
        """Around the database copy's ``pg_backup_stop`` (its consistency point): entered
        just before, left just after; what is copied there matches the database copy."""
        ...

    async def copy(self, parent: BranchRow, child: BranchRow) -> None:
        """After the database copy, before the child is ready; raising undoes the create."""

    async def reset(self, branch: BranchRow, parent: BranchRow) -> None:
        """After the database re-clone, before the branch is ready again."""

    async def delete(self, branch: BranchRow) -> None:
        """Before the branch's files go."""


class BranchManager:
    def __init__(self, store: Store, paths: DataPaths, bins: PgBinaries, owner: Identity,
                 port_base: int) -> None:
        self.store = store
        self.paths = paths
        self.bins = bins
        self.owner = owner
        self.port_base = port_base
        self.pgbouncer = find_pgbouncer()
        self._clusters: dict[str, Cluster] = {}
        self._poolers: dict[str, Pooler] = {}
        self._lock = asyncio.Lock()
        #: Branches an operation is stopping or starting on purpose: the watch leaves
        #: them alone.
        self._busy: set[str] = set()
        self._watch: asyncio.Task[None] | None = None
        self._stopping = asyncio.Event()
        self._others: dict[str, Cluster] = {}
        #: Restarts done by the watch, per branch id (or watch_also name).
        self.restarts: dict[str, int] = {}
        #: Set by the platform: the branch services' part of create, reset and delete.
        self.state_hooks: BranchStateHooks | None = None

    @contextlib.contextmanager
    def _busy_with(self, *branch_ids: str) -> Iterator[None]:
        self._busy.update(branch_ids)
        try:
            yield
        finally:
            self._busy.difference_update(branch_ids)

    # -- objects per branch ----------------------------------------------------
    def cluster(self, branch: BranchRow) -> Cluster:
        found = self._clusters.get(branch.id)
        if found is None:
            found = Cluster(
                self.bins, self.paths.branch_pgdata(branch.id),
                socket_dir=self.paths.pg_socket_dir(branch.id), port=branch.port,
                owner=self.owner, log_file=self.paths.branch_dir(branch.id) / "postgres.log",
                listen_addresses=BRANCH_HOST,
                # A fresh clone looks crashed, so its first start fsyncs every file;
                # one syncfs() does the same job in milliseconds.
                # A clone recovers as a hot standby and is promoted (see _clone_into),
                # whatever a copied postgresql.auto.conf says.
                extra_settings={"recovery_init_sync_method": "syncfs", "hot_standby": "on"},
            )
            self._clusters[branch.id] = found
        return found

    def pooler(self, branch: BranchRow) -> Pooler | None:
        if self.pgbouncer is None or branch.pooler_port is None:
            return None
        found = self._poolers.get(branch.id)
        if found is None:
            found = Pooler(
                binary=self.pgbouncer, run_dir=self.paths.branch_dir(branch.id) / "pgbouncer",
                owner=self.owner, listen_host=BRANCH_HOST, port=branch.pooler_port,
                backend_host=BRANCH_HOST, backend_port=branch.port, database=branch.database,
                log_file=self.paths.branch_dir(branch.id) / "pgbouncer.log",
            )
            self._poolers[branch.id] = found
        return found

    def connection_strings(self, branch: BranchRow) -> ConnectionStrings:
        auth = f"{branch.role}:{branch.role_password}"
        direct = f"postgresql://{auth}@{BRANCH_HOST}:{branch.port}/{branch.database}"
        if self.pooler(branch) is None:
            return ConnectionStrings(pooled=direct, unpooled=direct)
        pooled = f"postgresql://{auth}@{BRANCH_HOST}:{branch.pooler_port}/{branch.database}"
        return ConnectionStrings(pooled=pooled, unpooled=direct)

    async def get(self, ref: str) -> BranchRow:
        row = await self.store.get_branch(ref)
        if row is None:
            raise BranchError(404, "branch_not_found", f"branch {ref!r} not found")
        return row

    async def _taken_ports(self) -> set[int]:
        taken: set[int] = set()
        for b in await self.store.list_branches():
            taken.add(b.port)
            if b.pooler_port is not None:
                taken.add(b.pooler_port)
        return taken

    # -- start-up and shutdown -------------------------------------------------
    async def ensure_main(self) -> BranchRow:
        existing = await self.store.get_branch("main")
        if existing is not None:
            return existing
        async with self._lock:
            return await self._create_root("main")

    async def _create_root(self, name: str) -> BranchRow:
        """A branch with no parent: a fresh cluster from initdb."""
        taken = await self._taken_ports()
        port = free_port(BRANCH_HOST, self.port_base, taken)
        pooler_port = free_port(BRANCH_HOST, port + 1, taken | {port})
        row = BranchRow(
            id=new_branch_id(), name=name, parent_id=None, port=port,
            pooler_port=pooler_port if self.pgbouncer else None,
            database=DEFAULT_DATABASE, role=DEFAULT_ROLE, role_password=random_secret(),
            superuser_password=random_secret(), state="creating",
            created_at=datetime.now(UTC),
        )
        # Recorded first, so a crash half-way is found and rolled back on the next start.
        await self.store.insert_branch(row)
        with self._busy_with(row.id):
            try:
                await asyncio.to_thread(self._init_root_cluster, row)
                await asyncio.to_thread(self._open, row)
            except BaseException:
                await self._remove_files(row)
                await self.store.delete_branch(row.id)
                raise
            await self.store.set_branch_state(row.id, "ready")
        return await self.get(row.id)

    def _init_root_cluster(self, row: BranchRow) -> None:
        cluster = self.cluster(row)
        cluster.initialize(row.superuser_password)
        (cluster.pgdata / "pg_hba.conf").write_text(HBA_OPEN)
        cluster.start()
        with cluster.connect(row.superuser_password) as conn:
            conn.execute(sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(
                sql.Identifier(row.role), sql.Literal(row.role_password)))
            conn.execute(sql.SQL("CREATE DATABASE {} OWNER {}").format(
                sql.Identifier(row.database), sql.Identifier(row.role)))

    async def recover(self) -> None:
        """Finish or roll back what a crash interrupted."""
        for row in await self.store.list_branches():
            if row.state == "creating":
                # Never became usable: remove.
                await self._remove_files(row)
                await self.store.delete_branch(row.id)
            elif row.state == "resetting":
                # Roll back to the data the branch had before the reset.
                old = self._old_pgdata(row)
                if old.exists():
                    await asyncio.to_thread(self.cluster(row).stop, "immediate")
                    await asyncio.to_thread(shutil.rmtree, self.paths.branch_pgdata(row.id),
                                            True)
                    old.rename(self.paths.branch_pgdata(row.id))
                await self.store.set_branch_state(row.id, "ready")
            elif row.state == "deleting":
                await self._remove_files(row)
                await self.store.delete_branch(row.id)

    async def start_all(self) -> list[BranchRow]:
        rows = await self.store.list_branches()
        await asyncio.to_thread(self._remove_stale_sockets, {r.id for r in rows})
        await asyncio.gather(*(asyncio.to_thread(self._start, r) for r in rows))
        return rows

    def _remove_stale_sockets(self, ids: set[str]) -> None:
        """Socket directories of branches that no longer exist (a run killed while it
        removed one). Clusters clean their own at a clean shutdown."""
        with contextlib.suppress(FileNotFoundError):
            for d in self.paths.pg_sockets.iterdir():
                if d.name not in ids and d.name != "system":
                    shutil.rmtree(d, ignore_errors=True)

    # -- crashes -------------------------------------------------------------------
    def watch_also(self, name: str, cluster: Cluster) -> None:
        """Restart ``cluster`` too when it dies (the system database); ``name`` labels
        it in the log. Stopping it stays the caller's, after :meth:`stop_all`."""
        self._others[name] = cluster

    def start_watching(self) -> None:
        """Restart a branch's PostgreSQL (crash recovery) or PgBouncer that dies while
        the platform runs; stopped by :meth:`stop_all`. PgBouncer keeps its clients'
        connections and opens new server connections once the cluster is back, so
        functions recover without a redeploy (only transactions in flight fail)."""
        if self._watch is None:
            self._watch = asyncio.create_task(self._watch_loop())

    async def _watch_loop(self) -> None:
        retry_at: dict[str, float] = {}
        failures: dict[str, int] = {}
        while not self._stopping.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), WATCH_INTERVAL_S)
            if self._stopping.is_set():
                return
            now = time.monotonic()
            targets = [*((b, f"branch {b}") for b in self._clusters),
                       *((name, name) for name in self._others)]
            for key, label in targets:
                if key in self._busy or retry_at.get(key, 0) > now:
                    continue
                # Looked up again: an earlier restart may have given a delete its turn.
                cluster = self._clusters.get(key) or self._others.get(key)
                if cluster is None:
                    continue
                pooler = self._poolers.get(key)
                db_down = not cluster.is_running()
                pooler_down = pooler is not None and not pooler.is_running()
                if not (db_down or pooler_down):
                    failures.pop(key, None)
                    continue
                try:
                    await self._restart(key, label, cluster, pooler, db_down, pooler_down)
                except Exception as exc:
                    n = failures[key] = failures.get(key, 0) + 1
                    delay = min(MAX_RESTART_BACKOFF_S, 0.5 * 2 ** n)
                    retry_at[key] = time.monotonic() + delay
                    log.error("%s: restart failed (attempt %d, next in %.0f s): %s",
                              label, n, delay, exc)

    async def _restart(self, key: str, label: str, cluster: Cluster, pooler: Pooler | None,
                       db_down: bool, pooler_down: bool) -> None:
        with self._busy_with(key):
            started = time.monotonic()
            if db_down:
                log.warning("%s: PostgreSQL exited unexpectedly; restarting it "
                            "(crash recovery)", label)
                await asyncio.to_thread(cluster.start)
            if pooler is not None and (pooler_down or not pooler.is_running()):
                log.warning("%s: PgBouncer exited unexpectedly; restarting it", label)
                await asyncio.to_thread(pooler.start)
            self.restarts[key] = self.restarts.get(key, 0) + 1
            log.warning("%s: back in %.0f ms", label, (time.monotonic() - started) * 1000)

    def _start(self, row: BranchRow) -> None:
        self.cluster(row).start()
        pooler = self.pooler(row)
        if pooler is not None:
            pooler.start()

    async def stop_all(self) -> None:
        if self._watch is not None:
            # Not cancelled: a restart under way finishes first, then the clusters stop.
            self._stopping.set()
            with contextlib.suppress(Exception):
                await self._watch
            self._watch = None

        def stop_one(branch_id: str) -> None:
            pooler = self._poolers.get(branch_id)
            if pooler is not None:
                pooler.stop()
            cluster = self._clusters.get(branch_id)
            if cluster is not None:
                cluster.stop()

        ids = set(self._clusters) | set(self._poolers)
        await asyncio.gather(*(asyncio.to_thread(stop_one, i) for i in ids),
                             return_exceptions=True)

    # -- opening a cluster to clients -----------------------------------------
    def _open(self, row: BranchRow) -> None:
        """Normal access rules, then the pooler with the current password secrets."""
        cluster = self.cluster(row)
        (cluster.pgdata / "pg_hba.conf").write_text(HBA_OPEN)
        with cluster.connect(row.superuser_password) as conn:
            conn.execute("SELECT pg_reload_conf()")
            secrets_ = scram_secrets(conn, [row.role]) if self.pgbouncer else {}
        deadline = time.monotonic() + 30
        direct = self.connection_strings(row).unpooled
        while True:  # the reload is asynchronous: wait until the owner gets in over TCP
            try:
                with psycopg.connect(direct, connect_timeout=5):
                    break
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.005)
        pooler = self.pooler(row)
        if pooler is not None:
            pooler.write_config(secrets_)
            # A restart, not a reload: PgBouncer keeps the SCRAM keys of earlier client
            # logins for its server logins, and they go stale when passwords (or their
            # salts, after a reset) change.
            pooler.start()

    # -- children ----------------------------------------------------------------
    async def create(self, name: str | None, parent_ref: str | None,
                     progress: Callable[[str], None] = lambda _: None) -> BranchRow:
        if name is not None and not BRANCH_NAME_RE.fullmatch(name):
            raise BranchError(400, "invalid_input", "name: must match [A-Za-z0-9._/-]{1,64} "
                              f"(got {name!r})", "name")
        async with self._lock:
            parent = await self.store.get_branch(parent_ref or "main")
            if parent is None:
                raise BranchError(404, "parent_not_found",
                                  f"parent branch {parent_ref!r} not found", "parent")
            if parent.state != "ready":
                raise BranchError(409, "parent_not_ready",
                                  f"parent branch {parent.name!r} is {parent.state}")
            branch_id = new_branch_id()
            name = name or branch_id
            if await self.store.get_branch(name) is not None:
                raise BranchError(409, "branch_exists", f"a branch named {name!r} exists",
                                  "name")
            taken = await self._taken_ports()
            port = free_port(BRANCH_HOST, self.port_base, taken)
            pooler_port = free_port(BRANCH_HOST, port + 1, taken | {port})
            row = BranchRow(
                id=branch_id, name=name, parent_id=parent.id, port=port,
                pooler_port=pooler_port if self.pgbouncer else None,
                database=parent.database, role=parent.role, role_password=random_secret(),
                superuser_password=random_secret(), state="creating",
                created_at=datetime.now(UTC),
            )
            await self.store.insert_branch(row)
            with self._busy_with(row.id):
                try:
                    at_stop: Callable[[], contextlib.AbstractContextManager[None]] = \
                        contextlib.nullcontext
                    async with contextlib.AsyncExitStack() as around_copy:
                        if self.state_hooks is not None:
                            await around_copy.enter_async_context(
                                self.state_hooks.copying(parent, row))
                            at_stop = _in_loop(self.state_hooks.at_consistency(parent, row),
                                               asyncio.get_running_loop())
                        stats = await asyncio.to_thread(self._clone_into, parent, row,
                                                        progress, at_stop)
                    if self.state_hooks is not None:
                        await self.state_hooks.copy(parent, row)
                except BaseException as exc:
                    await self._remove_files(row)
                    await self.store.delete_branch(row.id)
                    raise _as_branch_error(exc) from exc
                await self.store.update_branch(row.id, state="ready",
                                               copy_method=stats.method,
                                               copy_bytes=stats.bytes, copy_ms=stats.copy_ms)
            return await self.get(row.id)

    def _clone_into(self, parent: BranchRow, child: BranchRow,
                    progress: Callable[[str], None],
                    at_stop: Callable[[], contextlib.AbstractContextManager[None]]
                    = contextlib.nullcontext) -> CloneStats:
        """Copy ``parent``'s running cluster into ``child``'s data dir, start it privately,
        give it its own passwords, open it."""
        parent_cluster = self.cluster(parent)
        child_cluster = self.cluster(child)
        branch_dir = self.paths.branch_dir(child.id)
        branch_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.owner.own(branch_dir, 0o700)
        progress(f"copying {parent.name} ({parent.id})")
        owner = None if self.owner.is_self else (self.owner.uid, self.owner.gid)
        with parent_cluster.connect(parent.superuser_password) as conn:
            stats = clone_running_cluster(conn, parent_cluster.pgdata, child_cluster.pgdata,
                                          owner, at_stop)
        (child_cluster.pgdata / "pg_hba.conf").write_text(HBA_PRIVATE)
        self.owner.own(child_cluster.pgdata / "pg_hba.conf", 0o600)
        # Recover as a standby, then promote: the end of crash recovery would make the
        # child write every page it redid (a burst on the disk the parent shares) before
        # it opens; a promotion leaves that to a spread checkpoint. The child then runs
        # on a timeline of its own.
        (child_cluster.pgdata / "standby.signal").touch()
        self.owner.own(child_cluster.pgdata / "standby.signal", 0o600)
        progress(f"copied {stats.bytes / 1e6:.1f} MB by {stats.method} in "
                 f"{stats.copy_ms:.0f} ms; recovering")
        child_cluster.start(standby=True)
        child_cluster.promote(parent.superuser_password)
        # Still the parent's passwords inside: replace them before anyone can connect.
        with child_cluster.connect(parent.superuser_password) as conn:
            conn.execute(sql.SQL("ALTER ROLE {} PASSWORD {}").format(
                sql.Identifier(SUPERUSER), sql.Literal(child.superuser_password)))
            conn.execute(sql.SQL("ALTER ROLE {} PASSWORD {}").format(
                sql.Identifier(child.role), sql.Literal(child.role_password)))
            subs = conn.execute(
                "SELECT s.subname, d.datname FROM pg_subscription s "
                "JOIN pg_database d ON d.oid = s.subdbid").fetchall()
        for subname, datname in subs:
            # A branch must not pull changes its parent subscribed to.
            with child_cluster.connect(child.superuser_password, datname) as conn:
                conn.execute(sql.SQL("ALTER SUBSCRIPTION {} DISABLE").format(
                    sql.Identifier(subname)))
        self._open(child)
        progress("open")
        return stats

    # -- reset -------------------------------------------------------------------
    def _old_pgdata(self, row: BranchRow) -> Path:
        return self.paths.branch_dir(row.id) / "pgdata.old"

    async def reset(self, ref: str, before_swap: BranchHook,
                    progress: Callable[[str], None] = lambda _: None) -> BranchRow:
        """Re-clone from the parent, keeping id, name, ports and credentials."""
        async with self._lock:
            row = await self.get(ref)
            if row.parent_id is None:
                raise BranchError(409, "no_parent", f"branch {row.name!r} has no parent to "
                                  "reset from")
            _refuse_protected(row, "reset")
            parent = await self.get(row.parent_id)
            with self._busy_with(row.id):
                return await self._reset(row, parent, before_swap, progress)

    async def _reset(self, row: BranchRow, parent: BranchRow, before_swap: BranchHook,
                     progress: Callable[[str], None]) -> BranchRow:
        await self.store.set_branch_state(row.id, "resetting")
        await before_swap(row)
        old = self._old_pgdata(row)
        try:
            await asyncio.to_thread(self.cluster(row).stop)
            await asyncio.to_thread(shutil.rmtree, old, True)
            self.paths.branch_pgdata(row.id).rename(old)
            stats = await asyncio.to_thread(self._clone_into, parent, row, progress)
            if self.state_hooks is not None:
                await self.state_hooks.reset(row, parent)
        except BaseException as exc:
            # Roll back to the data the branch had.
            await asyncio.to_thread(self.cluster(row).stop, "immediate")
            if old.exists():
                await asyncio.to_thread(shutil.rmtree, self.paths.branch_pgdata(row.id),
                                        True)
                old.rename(self.paths.branch_pgdata(row.id))
                await asyncio.to_thread(self._start, row)
            await self.store.set_branch_state(row.id, "ready")
            raise _as_branch_error(exc) from exc
        await asyncio.to_thread(shutil.rmtree, old, True)
        await self.store.update_branch(row.id, state="ready", copy_method=stats.method,
                                       copy_bytes=stats.bytes, copy_ms=stats.copy_ms)
        return await self.get(row.id)

    # -- delete ------------------------------------------------------------------
    async def delete(self, ref: str, recursive: bool, before_delete: BranchHook) -> list[str]:
        """Delete a branch (and, with ``recursive``, its descendants, deepest first).
        Returns the deleted ids."""
        async with self._lock:
            row = await self.get(ref)
            if row.name == "main" or row.parent_id is None:
                raise BranchError(409, "cannot_delete_root",
                                  f"branch {row.name!r} is the root branch and cannot be "
                                  "deleted")
            order = await self._descendants(row)
            for b in order:
                _refuse_protected(b, "deleted")
            if len(order) > 1 and not recursive:
                names = ", ".join(repr(b.name) for b in order[:-1])
                raise BranchError(409, "branch_has_children",
                                  f"branch {row.name!r} has children ({names}); delete them "
                                  "first or pass --recursive")
            for b in order:
                with self._busy_with(b.id):
                    await self.store.set_branch_state(b.id, "deleting")
                    await before_delete(b)
                    if self.state_hooks is not None:
                        await self.state_hooks.delete(b)
                    await self._remove_files(b)
                    await self.store.delete_branch(b.id)
            return [b.id for b in order]

    async def _descendants(self, row: BranchRow) -> list[BranchRow]:
        """``row`` and everything below it, children before parents."""
        out: list[BranchRow] = []
        for child in await self.store.child_branches(row.id):
            out += await self._descendants(child)
        out.append(row)
        return out

    async def _remove_files(self, row: BranchRow) -> None:
        def remove() -> None:
            pooler = self.pooler(row)
            if pooler is not None:
                pooler.stop()
            self.cluster(row).stop("immediate")
            shutil.rmtree(self.paths.branch_dir(row.id), ignore_errors=True)
            shutil.rmtree(self.paths.pg_socket_dir(row.id), ignore_errors=True)

        await asyncio.to_thread(remove)
        self._clusters.pop(row.id, None)
        self._poolers.pop(row.id, None)

    # -- inspection --------------------------------------------------------------
    def logical_size(self, row: BranchRow) -> int:
        return tree_size(self.paths.branch_pgdata(row.id))

    def check(self, branch: BranchRow, pooled: bool = False) -> bool:
        """True when the branch's database answers a query as its owner."""
        urls = self.connection_strings(branch)
        try:
            with psycopg.connect(urls.pooled if pooled else urls.unpooled,
                                 connect_timeout=3, prepare_threshold=None) as conn:
                conn.execute("SELECT 1")
            return True
        except psycopg.Error:
            return False


def _in_loop(hook: contextlib.AbstractAsyncContextManager[None],
             loop: asyncio.AbstractEventLoop
             ) -> Callable[[], contextlib.AbstractContextManager[None]]:
    """``hook`` entered and left in ``loop`` from the clone's thread (which waits)."""

    def run(coro: Coroutine[Any, Any, Any]) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, loop).result()

    @contextlib.contextmanager
    def around() -> Iterator[None]:
        run(hook.__aenter__())
        try:
            yield
        except BaseException as exc:
            if not run(hook.__aexit__(type(exc), exc, exc.__traceback__)):
                raise
        else:
            run(hook.__aexit__(None, None, None))

    return around


def _refuse_protected(row: BranchRow, verb: str) -> None:
    if row.protected:
        raise BranchError(409, "branch_protected",
                          f"branch {row.name!r} is protected and cannot be {verb}; "
                          "unprotect it first (protected: false in its neon.ts branch "
                          "settings, then phloem deploy --allow-protected)")


def _as_branch_error(exc: BaseException) -> BaseException:
    if isinstance(exc, BranchError):
        return exc
    if (isinstance(exc, OSError) and exc.errno == errno.ENOSPC) or isinstance(
            exc, psycopg.errors.DiskFull):
        return BranchError(507, "insufficient_storage",
                           f"not enough disk space to copy the branch: {exc}")
    if isinstance(exc, BranchCopyError):
        return BranchError(409, "branch_copy_refused", str(exc))
    if isinstance(exc, Exception):
        return BranchError(500, "branch_copy_failed", f"branch copy failed: {exc}")
    return exc


__all__ = ["BranchError", "BranchManager", "ConnectionStrings"]
