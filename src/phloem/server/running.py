"""A started platform: every component that exists only once start-up is done, built in
one place (``Platform._start``) when all of it runs, so none is ever missing; its
``phloem status`` report; and its stop (drain, then each component's stop in the reverse
order of start).

    running = await platform._start()      # Platform.serve does this
    report = await running.status()
    await running.stop()                   # stop accepting, drain, stop the rest
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from psycopg_pool import AsyncConnectionPool

from phloem import __version__
from phloem.branches.manager import BranchManager
from phloem.control.artifacts import ArtifactStore
from phloem.control.deployer import Deployer
from phloem.control.domains import Domains
from phloem.control.domains_status import TlsModeCertificates
from phloem.control.logs import FunctionLogs
from phloem.control.routes import RoutingTable
from phloem.control.serving import ApiServer
from phloem.control.triggers import Delivery, TriggerScheduler
from phloem.firewall import Firewall
from phloem.gateway.acme import Certificates
from phloem.gateway.admission import Admission
from phloem.gateway.server import Gateway
from phloem.metadata.domains import DomainStore
from phloem.metadata.store import BranchRow, Store
from phloem.metadata.triggers import TriggerStore
from phloem.server.health import Bounded, Probes
from phloem.server.https import GatewayTls, tls_dir
from phloem.server.metrics import FunctionLoad, ListenerLoad, Metrics
from phloem.supervisor import Supervisor
from phloem.supervisor.cgroups import CgroupLimiter, WatchdogLimiter
from phloem.system.paths import DataPaths
from phloem.system.settings import Settings


async def _none() -> None:
    return None


@dataclass(eq=False)
class Running:
    """Everything a started platform runs. ``teardown`` holds each component's stop,
    entered as it started: unwinding it stops them in the reverse order."""

    settings: Settings
    paths: DataPaths
    api_key: str
    pool: AsyncConnectionPool
    store: Store
    branches: BranchManager
    firewall: Firewall
    function_logs: FunctionLogs
    metrics: Metrics
    cgroups: CgroupLimiter | WatchdogLimiter
    supervisor: Supervisor
    artifacts: ArtifactStore
    deployer: Deployer
    gateway: Gateway
    api_server: ApiServer
    api_task: asyncio.Task[None]
    #: The listeners' connection admissions (gateway, api), for /metrics.
    admissions: list[Admission]
    teardown: AsyncExitStack
    triggers: TriggerScheduler
    #: The gateway's certificates (None: --tls off), for the status's counts.
    tls: GatewayTls | None = None
    # phloem status: bounded probes, and the branches as last listed.
    _probes: Probes = field(default_factory=Probes)
    _listing: Bounded[list[BranchRow]] = field(default_factory=Bounded)
    _last_branches: list[BranchRow] = field(default_factory=list)

    # -- stop ----------------------------------------------------------------
    async def stop(self) -> None:
        """Stop accepting on both listeners, drain in-flight requests (deadline
        ``drain_timeout_s``), then stop everything else in the reverse order of start."""
        timeout = self.settings.drain_timeout_s
        await self.gateway.stop_accepting()
        self.api_server.should_exit = True
        await self.gateway.drain(timeout)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.api_task, timeout)
        await self.teardown.aclose()

    # -- status --------------------------------------------------------------
    async def status(self) -> dict[str, Any]:
        """Each component's real state, probed now; ``down`` names what is down (the CLI
        exits non-zero then). A stuck database costs at most the probe timeout."""
        s = self.settings
        system, (branch_rows, listed) = await asyncio.gather(self._probe_system_db(),
                                                             self._known_branches())
        branch_status = await asyncio.gather(*(self._branch_status(b) for b in branch_rows))
        isolates = [
            {"id": i.id, "function": i.spec.slug, "branch_id": i.spec.branch_id,
             "deployment_id": i.spec.deployment_id, "state": i.state, "pid": i.pid,
             "inflight": i.inflight, "open_streams": i.open_streams,
             "background": i.background,
             "cold_start_ms": round(i.cold_start_s * 1000, 1) if i.cold_start_s else None}
            for i in self.supervisor.isolates()
        ]
        supervisor: dict[str, Any] = self.supervisor.health()
        supervisor.update(sandbox=self._sandbox_state(), cgroups=self.cgroups.describe())
        components: dict[str, Any] = {
            "system_database": system,
            "api": {"state": self._api_state(), "url": s.api_url},
            "gateway": self._gateway_state(),
            "supervisor": supervisor,
            "firewall": self.firewall.describe(),
            "tls": self._tls_state(),
        }
        down = [name for name, c in components.items() if c["state"] == "down"]
        for b in branch_status:  # one being created, reset or deleted is down by design
            down += [f"branch {b['name']} {part}" for part in ("database", "pooler")
                     if b[part] == "down" and b["state"] == "ready"]
        return {
            "version": __version__,
            "data_dir": str(self.paths.root),
            "healthy": not down,
            "down": down,
            "components": components,
            # From the last answer of the system database when it does not answer now.
            "branches_listed": listed,
            "branches": branch_status,
            "isolates": isolates,
        }

    async def _probe_system_db(self) -> dict[str, Any]:
        conninfo = self.pool.conninfo
        if not isinstance(conninfo, str):  # open_pool passes a string
            return {"state": "down", "error": "no connection string"}
        result = await self._probes.database("system", conninfo)
        return result.describe()

    async def _known_branches(self) -> tuple[list[BranchRow], str]:
        """The branches, and whether they were listed ``now`` or come from the ``cache``
        of the last listing (when the system database does not answer)."""
        rows = await self._listing.run("branches", self.store.list_branches,
                                       self._probes.timeout_s)
        if rows is None:
            return self._last_branches, "cache"
        self._last_branches = rows
        return rows, "now"

    async def _branch_status(self, b: BranchRow) -> dict[str, Any]:
        urls = self.branches.connection_strings(b)
        pooler = self.branches.pooler(b)
        database, pooled = await asyncio.gather(
            self._probes.database(f"branch {b.id}", urls.unpooled),
            self._probes.database(f"pooler {b.id}", urls.pooled) if pooler else _none())
        out: dict[str, Any] = {
            "id": b.id, "name": b.name, "port": b.port, "pooler_port": b.pooler_port,
            "parent_id": b.parent_id, "state": b.state,
            "database": "running" if database.ok else "down",
            "database_probe": database.describe()}
        if pooled is None:
            out["pooler"] = "unavailable"
        else:
            out["pooler"] = "running" if pooled.ok else "down"
            out["pooler_probe"] = pooled.describe()
        return out

    def _api_state(self) -> str:
        """The control API's uvicorn server: ``running`` once it serves, ``stopping``
        once told to exit, ``down`` if its task ended."""
        if self.api_task.done():
            return "down"
        if self.api_server.should_exit:
            return "stopping"
        return "running" if self.api_server.started else "starting"

    def _gateway_state(self) -> dict[str, Any]:
        s, gw = self.settings, self.gateway
        if gw.serving:
            state = "running"
        elif gw.draining:
            state = "draining"
        else:  # stopped accepting without a drain
            return {"state": "down", "address": f"{s.gateway_host}:{s.gateway_port}"}
        return {"state": state, "address": f"{s.gateway_host}:{gw.port}",
                "inflight": gw.inflight, "open_streams": gw.open_streams}

    def _tls_state(self) -> dict[str, Any]:
        """The TLS mode; with ``acme``, how many ensured names (function and service
        hosts, custom domains) have their certificate, wait for it, or failed."""
        if self.tls is None:
            return {"state": "off"}
        out: dict[str, Any] = {"state": self.settings.tls}
        if self.tls.acme is not None:
            out.update(self.tls.acme.counts())
        return out

    def _sandbox_state(self) -> str:
        off = self.deployer.sandbox_off
        return "active" if off is None else f"off: {off}"


# -- custom domains ---------------------------------------------------------------
async def start_domains(pool: AsyncConnectionPool, store: Store, routes: RoutingTable,
                        settings: Settings, tls: GatewayTls | None) -> Domains:
    """Custom domains, routed from the start; their certificates from the ACME manager
    with ``--tls acme``, else as the ``--tls`` mode gives them."""
    certificates: Certificates
    if tls is not None and tls.acme is not None:
        certificates = tls.certificates
    else:
        certificates = TlsModeCertificates(
            settings.tls, tls_dir(settings.data_dir) if tls is not None else None,
            tls.store if tls is not None else None, tls.cert if tls is not None else None)
    domains = Domains(DomainStore(pool), store, routes, settings, certificates)
    await domains.load()
    return domains


# -- schedule triggers ------------------------------------------------------------
async def start_triggers(pool: AsyncConnectionPool, deployer: Deployer,
                         supervisor: Supervisor, logs: FunctionLogs) -> TriggerScheduler:
    """The trigger scheduler, started: it delivers to isolates leased from
    ``supervisor`` (as the gateway does) with the function's Host, and logs each attempt
    in the function's log. Stop it (``stop()``) before the supervisor."""
    def host_of(branch_id: str, slug: str) -> str:
        return urlsplit(deployer.invocation_url(branch_id, slug)).netloc

    scheduler = TriggerScheduler(TriggerStore(pool),
                                 Delivery(deployer.routes, supervisor, logs, host_of))
    await scheduler.start()
    return scheduler


# -- metrics and the access log, wired in before Running exists -----------------------
def function_load(supervisor: Supervisor) -> Callable[[], dict[tuple[str, str], FunctionLoad]]:
    """``Metrics.load``: isolates, in-flight requests and streams per function."""
    def load() -> dict[tuple[str, str], FunctionLoad]:
        out: dict[tuple[str, str], FunctionLoad] = {}
        for i in supervisor.isolates():
            key = (i.spec.branch_id, i.spec.slug)
            cur = out.get(key, FunctionLoad())
            out[key] = FunctionLoad(cur.isolates + 1, cur.inflight + i.inflight,
                                    cur.open_streams + i.open_streams)
        return out
    return load


def listener_load(admissions: list[Admission]) -> Callable[[], dict[str, ListenerLoad]]:
    """``Metrics.connections``: open, cap and refusals per listener."""
    def load() -> dict[str, ListenerLoad]:
        return {a.name: ListenerLoad(a.open, a.config.max_connections, dict(a.refused))
                for a in admissions}
    return load
