"""The whole platform in one process: system database, branch clusters, supervisor,
gateway and control API, with an explicit lifecycle.

    async with running_platform(Settings(data_dir=Path("/tmp/p"))) as platform:
        await platform.wait_stopped()      # until platform.request_stop() (signals do that)

Start order: data dir -> what a killed run left (``phloem.leftovers``) -> binaries ->
system cluster -> migrations -> API key -> branch clusters (then watched: one that dies is
restarted) -> network rules -> runtimes' spawners -> supervisor -> gateway + API. Stop is
the reverse: stop accepting, drain in-flight requests with a deadline, stop isolates
(SIGINT, then SIGKILL after the grace period), remove the network rules, stop clusters.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import logging
import os
import shutil
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import IO, Any

import uvicorn
from psycopg_pool import AsyncConnectionPool

from phloem import __version__
from phloem.branches.manager import BranchManager
from phloem.control.api import create_api
from phloem.control.artifacts import ArtifactStore
from phloem.control.deployer import Deployer
from phloem.control.logs import FunctionLogs
from phloem.control.serving import ApiServer
from phloem.firewall import ACTIVE, Firewall, NoFirewall, choose_firewall
from phloem.gateway.admission import Admission, AdmissionConfig, fd_limit, plan_connections
from phloem.gateway.server import Gateway, GatewayConfig, RequestRecord
from phloem.metadata import db
from phloem.metadata.secrets import SecretBox
from phloem.metadata.store import BranchRow, FunctionRow, Store
from phloem.postgres import Cluster, install_binaries
from phloem.postgres.cluster import random_secret
from phloem.runtimes.base import BuildFailed, Toolbox
from phloem.runtimes.build import DIRECT, SandboxRunner
from phloem.runtimes.registry import spawners
from phloem.sandbox import available as sandbox_unavailable
from phloem.server import leftovers
from phloem.server.dispatch import PlatformRouter, parse_host
from phloem.server.health import Bounded, Probes
from phloem.server.metrics import FunctionLoad, ListenerLoad, Metrics
from phloem.supervisor import Supervisor
from phloem.supervisor.cgroups import choose_limiter, old_roots, parent_name
from phloem.supervisor.isolate import DirectSpawner, Spawner
from phloem.system.identity import ISOLATE_UIDS, Identity, make_dir
from phloem.system.paths import DataPaths
from phloem.system.settings import Settings

log = logging.getLogger("phloem")

SYSTEM_DB = "phloem"
SYSTEM_PORT = 5432  # Unix socket only; the number just names the socket file
MAX_BODY_CEILING = 1024 * 1024 * 1024  # per-function limits may raise bodies up to 1 GiB
#: Isolate uids run to base + ISOLATE_UIDS - 1, builds use base - 1: all valid, unused
#: by regular accounts (below 65536), and never (uid_t)-1.
MIN_UID_BASE = 65_537
MAX_UID_BASE = 2**32 - 1 - ISOLATE_UIDS


class PlatformError(RuntimeError):
    """Start-up cannot go on; the message says what to fix."""


def _check_port_free(what: str, host: str, port: int) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as exc:
            raise PlatformError(
                f"{what}: {host}:{port} is already in use ({exc.strerror}); stop what is "
                f"listening there or choose another port"
            ) from None


def _branch_ports(branch: BranchRow) -> list[int]:
    """The local ports a branch's isolates may reach of their own: PostgreSQL, PgBouncer."""
    return [p for p in (branch.port, branch.pooler_port) if p is not None]


def _write_private(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=2)
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)


async def _none() -> None:
    return None


class Platform:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.paths = DataPaths(settings.data_dir)
        self._stop_requested = asyncio.Event()
        self._stopped = asyncio.Event()
        self._lock_file: IO[str] | None = None
        self._system: Cluster | None = None
        self._pool: AsyncConnectionPool | None = None
        self._api_server: ApiServer | None = None
        self._api_task: asyncio.Task[None] | None = None
        self.gateway: Gateway | None = None
        self.function_logs = FunctionLogs()
        self.metrics = Metrics(load=self._function_load, connections=self._listener_load)
        self._admissions: list[Admission] = []
        self.api_key: str | None = None
        self.spawner: Spawner | None = None
        self._flusher: asyncio.Task[None] | None = None
        self.firewall: Firewall = NoFirewall("not started")
        # phloem status: bounded probes, and the branches as last listed.
        self._probes = Probes()
        self._listing: Bounded[list[BranchRow]] = Bounded()
        self._last_branches: list[BranchRow] = []

    # -- start ---------------------------------------------------------------
    async def start(self) -> None:
        s = self.settings
        if not MIN_UID_BASE <= s.isolate_uid_base <= MAX_UID_BASE:
            raise PlatformError(f"isolate_uid_base: must be between {MIN_UID_BASE} and "
                                f"{MAX_UID_BASE} (got {s.isolate_uid_base})")
        _check_port_free("gateway_port", s.gateway_host, s.gateway_port)
        _check_port_free("api_port", s.api_host, s.api_port)
        self._prepare_data_dir()
        # What a killed run left (its databases and poolers, isolate sockets, half-made
        # environments) goes before anything of this run starts.
        swept = await asyncio.to_thread(leftovers.sweep, self.paths)
        if swept:
            log.warning("the previous run of %s did not stop cleanly; stopped or removed "
                        "what it left: %s", self.paths.root, swept.summary())
        self.service = await asyncio.to_thread(Identity.service, s.service_user)
        bins = await asyncio.to_thread(install_binaries, self.paths.pginstall)
        self.secret_box = SecretBox.from_data_dir(self.paths.secrets)
        await self._start_system_db(bins)
        assert self._pool is not None
        self.store = Store(self._pool, self.secret_box)
        await self._ensure_api_key()

        self.branches = BranchManager(self.store, self.paths, bins, self.service,
                                      s.pg_port_base)
        await self.branches.recover()
        await self.branches.start_all()
        await self.branches.ensure_main()
        assert self._system is not None
        self.branches.watch_also("system database", self._system)
        self.branches.start_watching()
        await self._start_firewall()

        sandbox_off = (await asyncio.to_thread(sandbox_unavailable) if s.sandbox
                       else "turned off (--no-sandbox)")
        if sandbox_off is not None and s.sandbox and os.geteuid() == 0:
            log.warning("isolates and builds run WITHOUT sandboxes: %s", sandbox_off)
        # As root, build steps run as the build user through the launcher (in a sandbox
        # unless --no-sandbox); else directly (docs/architecture.md, Builds).
        runner = DIRECT if os.geteuid() != 0 else SandboxRunner(
            Identity.build(s.isolate_uid_base), self.paths.sandbox_root,
            self.paths.build_caches, namespaces=sandbox_off is None)
        try:
            toolbox = Toolbox.for_platform(self.paths, runner, s.isolate_python)
        except BuildFailed as exc:
            raise PlatformError(str(exc)) from None
        make_dir(self.paths.isolate_sockets, 0o711)
        # Each runtime's fast spawner (Python: a zygote with uvicorn already imported;
        # Node: standby processes), each spawning directly when its shortcut is down;
        # started from this thread so they die with the platform.
        if s.zygote:
            self.spawner = await asyncio.to_thread(spawners, toolbox, DirectSpawner())
            await self.spawner.start()
        # Isolates' groups go below ours; a killed run's leftovers go first.
        self.cgroups = choose_limiter(parent_name=parent_name(self.paths.root),
                                      defaults=s.function_limits)
        self.cgroups.sweep(self.paths.run / "cgroups.json", old_roots())
        self.supervisor = Supervisor(
            self.paths.isolate_sockets, self.function_logs.writer_for,
            grace_s=s.eviction_grace_s, start_timeout_s=s.isolate_start_timeout_s,
            memory=self.cgroups, spawner=self.spawner,
            on_cold_start=lambda spec, secs: self.metrics.observe_cold_start(
                spec.branch_id, spec.slug, secs),
            on_eviction=lambda spec, reason: self.metrics.observe_eviction(
                spec.branch_id, spec.slug, reason))
        await self.supervisor.start()
        self.artifacts = ArtifactStore(self.paths.artifacts)
        await asyncio.to_thread(self.artifacts.sweep)  # uploads a killed run left
        self.deployer = Deployer(s, self.paths, self.store, self.artifacts, self.branches,
                                 self.supervisor, toolbox, self.secret_box, sandbox_off)
        self.deployer.on_function_deployed = self._allow_function
        self.deployer.on_function_deleted = self._forget_function
        await self.deployer.load_routes()
        await self._remove_unserved_deployments()

        router = PlatformRouter(self.deployer, self.supervisor, s.domain)
        # Client connections may not take the descriptors isolates' connections, spawns
        # and databases need (phloem.admission.plan_connections).
        plan = plan_connections(fd_limit(), s.max_connections, s.api_max_connections)
        if plan.warning:
            log.warning("warning: %s", plan.warning)
        self._connection_plan = plan
        self.gateway = Gateway(
            router,
            GatewayConfig(host=s.gateway_host, port=s.gateway_port, proto=s.public_scheme,
                          trusted_proxies=s.trusted_proxies,
                          head_timeout=s.head_timeout_s, max_connections=plan.gateway,
                          max_connections_per_peer=s.max_connections_per_peer,
                          ttfb_timeout=s.function_limits.ttfb_timeout_s,
                          silence_timeout=s.function_limits.silence_timeout_s,
                          # The gateway's own limit is a ceiling; lower ones come per lease.
                          max_body_bytes=max(s.function_limits.max_body_bytes,
                                             MAX_BODY_CEILING)),
            on_request=self._observe_request)
        await self.gateway.start()
        self._admissions.append(self.gateway.admission)
        await self._start_api()
        self._flusher = asyncio.create_task(self._flush_logs())

    async def _start_firewall(self) -> None:
        """Network rules before any isolate or build runs, with every function already
        recorded allowed its branch's ports (docs/architecture.md, "Network rules")."""
        s = self.settings
        ports = {b.id: _branch_ports(b) for b in await self.store.list_branches()}
        functions = {self._isolate_uid(fn): ports[fn.branch_id]
                     for fn in await self.store.list_functions() if fn.branch_id in ports}
        self.firewall = choose_firewall(s)
        await self.firewall.start([s.gateway_port], functions)
        if self.firewall.state != ACTIVE and s.firewall and os.geteuid() == 0:
            log.warning("warning: no network rules for isolates and builds (%s); they can "
                        "connect to every local port: the control API, other branches' "
                        "databases", self.firewall.state)

    async def _remove_unserved_deployments(self) -> None:
        """Deployment directories only an active deployment needs: a build or a retire
        that a killed run left half-done leaves one behind (no build runs yet here)."""
        active = {fn.active_deployment_id for fn in await self.store.list_functions()}
        root = self.paths.deployments
        stale = [d for d in (root.iterdir() if root.is_dir() else [])
                 if d.name not in active]
        for d in stale:
            await asyncio.to_thread(shutil.rmtree, d, True)
        if stale:
            log.warning("removed %d deployment directories of unfinished builds or "
                        "retired deployments", len(stale))

    def _isolate_uid(self, fn: FunctionRow) -> int:
        return Identity.isolate(self.settings.isolate_uid_base, fn.number).uid

    async def _allow_function(self, branch: BranchRow, fn: FunctionRow) -> None:
        await self.firewall.allow_function(self._isolate_uid(fn), _branch_ports(branch))

    async def _forget_function(self, fn: FunctionRow) -> None:
        await self.firewall.forget_function(self._isolate_uid(fn))

    def _prepare_data_dir(self) -> None:
        root = self.paths.root
        try:
            make_dir(root, 0o711)
            make_dir(self.paths.run, 0o711)
            make_dir(self.paths.secrets, 0o700)
            make_dir(self.paths.logs, 0o700)
        except OSError as exc:
            raise PlatformError(f"data_dir: cannot prepare {root}: {exc}") from None
        if os.geteuid() == 0:
            # The service user and isolates must be able to traverse to the data dir.
            parent = root.parent
            while parent != parent.parent:
                mode = parent.stat().st_mode
                if not mode & 0o001:
                    raise PlatformError(
                        f"data_dir: {root} is below {parent} (mode {oct(mode & 0o777)}), "
                        "which unprivileged users cannot traverse; choose a data dir "
                        "outside it (e.g. /var/lib/phloem)"
                    )
                parent = parent.parent
        self._lock_file = open(self.paths.lock, "w")  # noqa: SIM115
        try:
            fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise PlatformError(f"data_dir: another phloem is running on {root}") from None

    async def _start_system_db(self, bins: Any) -> None:
        secret_file = self.paths.secrets / "system.json"
        pgdata = self.paths.system_pgdata
        cluster = self._system = Cluster(
            bins, pgdata, socket_dir=self.paths.pg_socket_dir("system"), port=SYSTEM_PORT,
            owner=self.service, log_file=pgdata.parent / "postgres.log",
        )
        if not cluster.initialized:
            password = random_secret()
            await asyncio.to_thread(cluster.initialize, password)
            _write_private(secret_file, {"superuser_password": password})
        password = json.loads(secret_file.read_text())["superuser_password"]
        await asyncio.to_thread(cluster.start)
        with cluster.connect(password) as conn:
            exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s",
                                  (SYSTEM_DB,)).fetchone()
            if not exists:
                conn.execute(f"CREATE DATABASE {SYSTEM_DB}")
        conninfo = cluster.admin_conninfo(password, SYSTEM_DB)
        await asyncio.to_thread(db.migrate, conninfo, self.secret_box)
        self._pool = await db.open_pool(conninfo)

    async def _ensure_api_key(self) -> None:
        creds = self.paths.credentials
        if creds.exists():
            key = json.loads(creds.read_text()).get("api_key", "")
            if key and await self.store.api_key_valid(key):
                self.api_key = key
        if self.api_key is None:
            self.api_key = await self.store.create_api_key("created by phloem up")
        _write_private(creds, {"api_url": self.settings.api_url, "api_key": self.api_key})

    async def _start_api(self) -> None:
        s = self.settings
        # No WebSocket routes: an upgrade is served as plain HTTP (and stays counted).
        config = uvicorn.Config(create_api(self), host=s.api_host, port=s.api_port,
                                log_level="warning", access_log=False, lifespan="off",
                                ws="none")
        admission = Admission("api", AdmissionConfig(
            max_connections=self._connection_plan.api,
            max_per_peer=s.max_connections_per_peer, head_timeout_s=s.head_timeout_s))
        self._admissions.append(admission)
        self._api_server = ApiServer(config, admission)
        self._api_task = asyncio.create_task(self._api_server.serve())
        while not self._api_server.started:
            if self._api_task.done():
                self._api_task.result()
                raise PlatformError(f"api_port: could not serve on {s.api_host}:{s.api_port}")
            await asyncio.sleep(0.01)

    async def _flush_logs(self) -> None:
        while True:
            await asyncio.sleep(0.25)
            self.function_logs.flush()

    # -- metrics ---------------------------------------------------------------
    def _observe_request(self, record: RequestRecord) -> None:
        # Runs for every request on the gateway's path: keep it to lookups and one format.
        # Only label with routes that exist: any client can send any Host.
        key = parse_host(record.host, self.settings.domain)
        if key is None:
            return
        spec = self.deployer.routes.get(key)
        if spec is None:
            return
        self.metrics.observe_request(record, key[0], key[1])
        line = (f"{record.method} {record.path} {record.status} "
                f"{record.duration_s * 1000:.1f}ms rid={record.request_id}")
        if record.error:
            line = f"{line} {record.error}"
        self.function_logs.write(spec.log_path, "gateway", "access", line)

    def _listener_load(self) -> dict[str, ListenerLoad]:
        return {a.name: ListenerLoad(a.open, a.config.max_connections, dict(a.refused))
                for a in self._admissions}

    def _function_load(self) -> dict[tuple[str, str], FunctionLoad]:
        load: dict[tuple[str, str], FunctionLoad] = {}
        if not hasattr(self, "supervisor"):
            return load
        for i in self.supervisor.isolates():
            key = (i.spec.branch_id, i.spec.slug)
            cur = load.get(key, FunctionLoad())
            load[key] = FunctionLoad(cur.isolates + 1, cur.inflight + i.inflight,
                                     cur.open_streams + i.open_streams)
        return load

    # -- run -----------------------------------------------------------------
    def request_stop(self) -> None:
        self._stop_requested.set()

    async def wait_stop_requested(self) -> None:
        await self._stop_requested.wait()

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
        ] if hasattr(self, "supervisor") else []
        supervisor: dict[str, Any] = (self.supervisor.health() if hasattr(self, "supervisor")
                                      else {"state": "down", "isolates": 0})
        if hasattr(self, "supervisor"):
            supervisor.update(sandbox=self._sandbox_state(), cgroups=self.cgroups.describe())
        components: dict[str, Any] = {
            "system_database": system,
            "api": {"state": self._api_state(), "url": s.api_url},
            "gateway": self._gateway_state(),
            "supervisor": supervisor,
            "firewall": self.firewall.describe(),
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
        conninfo = self._pool.conninfo if self._pool is not None else None
        if not isinstance(conninfo, str):  # not started (open_pool passes a string)
            return {"state": "down", "error": "not started"}
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
        server, task = self._api_server, self._api_task
        if server is None or task is None or task.done():
            return "down"
        if server.should_exit:
            return "stopping"
        return "running" if server.started else "starting"

    def _gateway_state(self) -> dict[str, Any]:
        s, gw = self.settings, self.gateway
        out: dict[str, Any] = {"address": f"{s.gateway_host}:{s.gateway_port}"}
        if gw is None:
            return {"state": "down", **out}
        if gw.serving:
            state = "running"
        elif gw.draining:
            state = "draining"
        else:  # never started, or stopped accepting without a drain
            return {"state": "down", **out}
        return {"state": state, "address": f"{s.gateway_host}:{gw.port}",
                "inflight": gw.inflight, "open_streams": gw.open_streams}

    def _sandbox_state(self) -> str:
        off = self.deployer.sandbox_off if self.deployer is not None else "not started"
        return "active" if off is None else f"off: {off}"

    # -- stop ----------------------------------------------------------------
    async def stop(self) -> None:
        s = self.settings
        if self.gateway is not None:
            await self.gateway.stop_accepting()
        if self._api_server is not None:
            self._api_server.should_exit = True
        if self.gateway is not None:
            await self.gateway.drain(s.drain_timeout_s)
        if self._api_task is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._api_task, s.drain_timeout_s)
        if hasattr(self, "deployer"):
            self.deployer.close()
        if hasattr(self, "supervisor"):
            await self.supervisor.stop_all()
        if self.spawner is not None:  # after the isolates: they die with their zygote
            await self.spawner.stop()
        if hasattr(self, "cgroups"):
            await asyncio.to_thread(self.cgroups.close, self.paths.run / "cgroups.json")
        await self.firewall.stop()
        if self._flusher is not None:
            self._flusher.cancel()
        self.function_logs.close()
        if self._pool is not None:
            await self._pool.close()
            self._pool = None
        if hasattr(self, "branches"):
            await self.branches.stop_all()
        if self._system is not None:
            await asyncio.to_thread(self._system.stop)
        if self._lock_file is not None:
            self._lock_file.close()
            self._lock_file = None
        self._stopped.set()


@contextlib.asynccontextmanager
async def running_platform(settings: Settings) -> AsyncIterator[Platform]:
    """Start the platform, yield it, stop it (also when start-up fails half-way)."""
    platform = Platform(settings)
    try:
        await platform.start()
        yield platform
    finally:
        await platform.stop()
