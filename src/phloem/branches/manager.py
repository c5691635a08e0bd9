"""Branch clusters: create ``main`` on first start, start and stop every branch's
PostgreSQL with the platform, hand out connection strings.

Each branch is its own cluster (data dir, socket dir, TCP port on 127.0.0.1) with an owner
role and database; phloem keeps a superuser for itself, reached over the private socket.
"""

from __future__ import annotations

import asyncio
import shutil
from dataclasses import dataclass
from datetime import UTC, datetime

import psycopg
from psycopg import sql

from phloem.branches.ids import new_branch_id
from phloem.control.store import BranchRow, Store
from phloem.identity import Identity
from phloem.paths import DataPaths
from phloem.postgres.binaries import PgBinaries
from phloem.postgres.cluster import Cluster, free_port, random_secret

DEFAULT_DATABASE = "phloemdb"
DEFAULT_ROLE = "phloemdb_owner"
BRANCH_HOST = "127.0.0.1"


@dataclass(frozen=True)
class ConnectionStrings:
    pooled: str
    unpooled: str


class BranchManager:
    def __init__(self, store: Store, paths: DataPaths, bins: PgBinaries, owner: Identity,
                 port_base: int) -> None:
        self.store = store
        self.paths = paths
        self.bins = bins
        self.owner = owner
        self.port_base = port_base
        self._clusters: dict[str, Cluster] = {}

    def cluster(self, branch: BranchRow) -> Cluster:
        found = self._clusters.get(branch.id)
        if found is None:
            found = Cluster(
                self.bins, self.paths.branch_pgdata(branch.id),
                socket_dir=self.paths.pg_socket_dir(branch.id), port=branch.port,
                owner=self.owner, log_file=self.paths.branch_dir(branch.id) / "postgres.log",
                listen_addresses=BRANCH_HOST,
            )
            self._clusters[branch.id] = found
        return found

    def connection_strings(self, branch: BranchRow) -> ConnectionStrings:
        direct = (f"postgresql://{branch.role}:{branch.role_password}@{BRANCH_HOST}:"
                  f"{branch.port}/{branch.database}")
        # The pooled URL goes through PgBouncer once the branches issue lands; until
        # then both are the branch's own cluster.
        return ConnectionStrings(pooled=direct, unpooled=direct)

    async def ensure_main(self) -> BranchRow:
        existing = await self.store.get_branch("main")
        if existing is not None:
            return existing
        return await self.create_root("main")

    async def create_root(self, name: str) -> BranchRow:
        """A branch with no parent: a fresh cluster from initdb."""
        taken = {b.port for b in await self.store.list_branches()}
        row = BranchRow(
            id=new_branch_id(), name=name, parent_id=None,
            port=free_port(BRANCH_HOST, self.port_base, taken),
            database=DEFAULT_DATABASE, role=DEFAULT_ROLE, role_password=random_secret(),
            superuser_password=random_secret(), state="creating",
            created_at=datetime.now(UTC),
        )
        # Record first, so a crash mid-way is found and cleaned up on the next start.
        await self.store.insert_branch(row)
        try:
            await asyncio.to_thread(self._init_cluster, row)
        except BaseException:
            await asyncio.to_thread(shutil.rmtree, self.paths.branch_dir(row.id), True)
            await self.store.delete_branch(row.id)
            raise
        await self.store.set_branch_state(row.id, "ready")
        return await self._get(row.id)

    def _init_cluster(self, row: BranchRow) -> None:
        cluster = self.cluster(row)
        cluster.initialize(row.superuser_password)
        cluster.start()
        with cluster.connect(row.superuser_password) as conn:
            conn.execute(sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(
                sql.Identifier(row.role), sql.Literal(row.role_password)))
            conn.execute(sql.SQL("CREATE DATABASE {} OWNER {}").format(
                sql.Identifier(row.database), sql.Identifier(row.role)))

    async def _get(self, branch_id: str) -> BranchRow:
        row = await self.store.get_branch(branch_id)
        if row is None:
            raise LookupError(branch_id)
        return row

    async def recover(self) -> None:
        """Finish or roll back what a crash interrupted: a branch still 'creating' never
        became usable, so it is removed."""
        for row in await self.store.list_branches():
            if row.state == "creating":
                cluster = self.cluster(row)
                await asyncio.to_thread(cluster.stop, "immediate")
                await asyncio.to_thread(shutil.rmtree, self.paths.branch_dir(row.id), True)
                await self.store.delete_branch(row.id)

    async def start_all(self) -> list[BranchRow]:
        rows = await self.store.list_branches()
        await asyncio.gather(*(asyncio.to_thread(self.cluster(r).start) for r in rows))
        return rows

    async def stop_all(self) -> None:
        await asyncio.gather(
            *(asyncio.to_thread(c.stop) for c in self._clusters.values()),
            return_exceptions=True,
        )

    def check(self, branch: BranchRow) -> bool:
        """True when the branch's database answers a query as its owner."""
        try:
            with psycopg.connect(self.connection_strings(branch).unpooled,
                                 connect_timeout=3) as conn:
                conn.execute("SELECT 1")
            return True
        except psycopg.Error:
            return False
