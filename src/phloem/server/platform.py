"""The whole platform in one process: system database, branch clusters, supervisor,
gateway and control API, with one lifecycle in the shape of uvicorn's ``Server``.

    code = Platform(settings).run()        # phloem up: signals, start, serve, stop

    platform = Platform(settings)          # in a loop (phloem.testing.running_platform)
    serving = asyncio.create_task(platform.serve(on_ready))
    ...
    platform.request_stop()                # what the first SIGINT/SIGTERM does
    await platform.wait_stopped()          # drained and stopped; ``await serving`` -> 0

Start order: data dir -> what a killed run left (``phloem.server.leftovers``) -> binaries ->
system cluster -> migrations -> API key -> branch clusters (then watched: one that dies is
restarted) -> network rules -> runtimes' spawners -> supervisor -> gateway + API. Each
component's stop is entered as it starts; stop (or a start-up that fails half-way) runs
them in reverse: stop accepting, drain in-flight requests with a deadline, stop isolates
(SIGINT, then SIGKILL after the grace period), the spawners, remove the network rules,
stop clusters. What exists only once started lives in :class:`phloem.server.running.Running`,
built in one place, so a ``Platform`` is never half-built.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import json
import logging
import os
import shutil
import signal
import socket
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any, NoReturn
from urllib.parse import urlsplit

import uvicorn
from psycopg_pool import AsyncConnectionPool
from rich.markup import escape

from phloem import __version__
from phloem.branches.lifetime import BranchLifetime
from phloem.branches.manager import BranchManager
from phloem.control.api import create_api
from phloem.control.artifacts import ArtifactStore
from phloem.control.deployer import Deployer
from phloem.control.logs import FunctionLogs
from phloem.control.npm_registry import NpmRegistry, with_npm_registry
from phloem.control.services import ApiServices
from phloem.control.serving import ApiServer
from phloem.firewall import ACTIVE, Firewall, choose_firewall
from phloem.gateway.admission import Admission, AdmissionConfig, fd_limit, plan_connections
from phloem.gateway.server import Gateway, GatewayConfig
from phloem.gateway.tls import TlsError
from phloem.metadata import db
from phloem.metadata.db import SYSTEM_PORT
from phloem.metadata.secrets import SecretBox, SecretError
from phloem.metadata.services import ServiceStore
from phloem.metadata.store import BranchRow, FunctionRow, Store
from phloem.postgres import Cluster, install_binaries
from phloem.postgres.cluster import random_secret
from phloem.runtimes.base import BuildFailed, Toolbox
from phloem.runtimes.build import DIRECT, SandboxRunner
from phloem.runtimes.registry import spawners
from phloem.sandbox import available as sandbox_unavailable
from phloem.server import leftovers
from phloem.server.dispatch import PlatformRouter, RequestObserver
from phloem.server.https import GatewayTls, gateway_tls
from phloem.server.lifecycle import (
    FORCED_EXIT_STATUS,
    GC_INTERVAL_S,
    capture_signals,
    collect_garbage_every,
    err,
    freeze_startup_heap,
    install_uvloop,
    keep_large_blocks_on_heap,
    out,
    raise_fd_limit,
)
from phloem.server.metrics import Metrics
from phloem.server.running import (
    Running,
    function_load,
    listener_load,
    start_domains,
    start_triggers,
)
from phloem.services.base import ServiceContext
from phloem.services.registry import ServiceRegistry
from phloem.services.storage.service import StorageService
from phloem.supervisor import Supervisor
from phloem.supervisor.cgroups import (
    CgroupLimiter,
    WatchdogLimiter,
    choose_limiter,
    old_roots,
    parent_name,
)
from phloem.supervisor.isolate import DirectSpawner, Spawner
from phloem.system.identity import MAX_UID_BASE, MIN_UID_BASE, Identity, make_dir
from phloem.system.native import why_python
from phloem.system.paths import DataPaths
from phloem.system.settings import Settings

log = logging.getLogger("phloem")

SYSTEM_DB = "phloem"
MAX_BODY_CEILING = 1024 * 1024 * 1024  # per-function limits may raise bodies up to 1 GiB
#: Called once the platform serves, before the readiness line (``phloem up --deploy``).
ReadyHook = Callable[[Running], Awaitable[None]]


class PlatformError(RuntimeError):
    """Start-up cannot go on; the message says what to fix."""


def _check_port_free(what: str, host_field: str, host: str, port: int) -> None:
    """Bind ``host:port`` once, so that a port in use, a privileged one or an address this
    machine does not have is refused by name before anything starts."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EACCES:
                raise PlatformError(
                    f"{what}: port {port} is below 1024 and needs root or "
                    "CAP_NET_BIND_SERVICE (contrib/systemd/phloem.service grants it); or "
                    "choose a port from 1024 up") from None
            if exc.errno in (errno.EADDRNOTAVAIL, errno.EAFNOSUPPORT) or \
                    isinstance(exc, socket.gaierror):
                raise PlatformError(
                    f"{host_field}: {host} is not an address of this machine (give one of "
                    "its addresses, or 0.0.0.0 / :: for all of them)") from None
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


async def _flush_logs(logs: FunctionLogs) -> None:
    while True:
        await asyncio.sleep(0.25)
        logs.flush()


async def _close_logs(flusher: asyncio.Task[None], logs: FunctionLogs) -> None:
    flusher.cancel()
    logs.close()


async def _close_gateway(gateway: Gateway, timeout: float) -> None:
    if not gateway.draining:  # else Running.stop drained it already
        await gateway.stop_accepting()
        await gateway.drain(timeout)


async def _close_api(server: ApiServer, task: asyncio.Task[None], timeout: float) -> None:
    server.should_exit = True
    with contextlib.suppress(Exception):  # done already after Running.stop
        await asyncio.wait_for(task, timeout)


class Platform:
    """One platform: :meth:`run` in a process of its own, or :meth:`serve` in a loop.
    Its parts exist only while it runs, as :attr:`running`."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.paths = DataPaths(settings.data_dir)
        self._stop_requested = asyncio.Event()
        self._stopped = asyncio.Event()
        self._running: Running | None = None
        #: What a forced exit does first (SIGKILL the isolates), once there are any.
        self._on_force: list[Callable[[], None]] = []
        #: The gateway's certificates (None: plain HTTP).
        self._tls: GatewayTls | None = None

    @property
    def running(self) -> Running:
        """The started platform's parts (from ``on_ready`` on)."""
        if self._running is None:
            raise PlatformError("the platform has not started")
        return self._running

    # -- lifecycle -------------------------------------------------------------
    def run(self, on_ready: ReadyHook | None = None) -> int:
        """Serve in this process until SIGINT or SIGTERM; the exit status: 0 once
        stopped, 1 if start-up failed (said on stderr). A second signal SIGKILLs the
        isolates and exits 130 at once."""
        install_uvloop()
        return asyncio.run(self.serve(on_ready, own_process=True))

    async def serve(self, on_ready: ReadyHook | None = None, *,
                    own_process: bool = False) -> int:
        """Start, call ``on_ready``, print the readiness line, serve until
        :meth:`request_stop`, stop; 0, or 1 if start-up failed. ``own_process``: this
        process is the platform's (``phloem up``): raise the descriptor limit, keep TLS
        reads off mmap (see keep_large_blocks_on_heap), take
        SIGINT/SIGTERM (a second one forces exit), tune the heap once started."""
        try:
            if not own_process:
                return await self._serve(on_ready, own_process=False)
            raise_fd_limit()
            keep_large_blocks_on_heap()
            with capture_signals(on_stop=self._first_signal, on_force=self.force_exit):
                return await self._serve(on_ready, own_process=True)
        finally:
            self._stopped.set()

    def request_stop(self) -> None:
        """Stop gracefully: during start-up, undo it; once serving, drain and stop."""
        self._stop_requested.set()

    async def wait_stopped(self) -> None:
        """Until :meth:`serve` has returned (stopped, or failed to start)."""
        await self._stopped.wait()

    def force_exit(self) -> NoReturn:
        """SIGKILL every isolate and exit the process at once (databases end with it:
        ``phloem.system.lifeline``)."""
        err.print("[red]forced exit[/]")
        for hook in self._on_force:
            hook()
        os._exit(FORCED_EXIT_STATUS)

    def _first_signal(self) -> None:
        err.print("[yellow]stopping: draining requests, stopping isolates and "
                  "databases (press Ctrl-C again to force)[/]")
        self.request_stop()

    async def _serve(self, on_ready: ReadyHook | None, *, own_process: bool) -> int:
        try:
            with err.status("starting phloem"):
                running = await self._start_unless_stopped()
        except (PlatformError, SecretError) as exc:  # SecretError: a wrong PHLOEM_SECRET_KEY
            err.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False)
            return 1
        self._running = running
        collector: asyncio.Task[None] | None = None
        try:
            await self._announce(running)
            if on_ready is not None:
                await on_ready(running)
            if own_process:
                freeze_startup_heap()
                collector = asyncio.create_task(collect_garbage_every(GC_INTERVAL_S))
            out.print("ready. Press Ctrl-C to stop.")
            await self._stop_requested.wait()
        finally:
            if collector is not None:
                collector.cancel()
            await running.stop()
        out.print("phloem stopped")
        return 0

    async def _announce(self, running: Running) -> None:
        s = self.settings
        out.print(f"[bold green]phloem {__version__} is up[/]  data dir {s.data_dir}")
        out.print(f"  api      {s.api_url}/api/v1   (key in {s.data_dir / 'credentials.json'})")
        if s.api_listen is not None:
            # With ACME the certificate names the API: that name is what clients verify.
            where = (f"{s.remote_api_name}:{s.api_listen_address[1]}"
                     if s.tls == "acme" and s.api_listen_address else s.api_listen)
            out.print(f"  api      {'https' if self._tls else 'http'}://{where}/api/v1   "
                      "(remote: phloem keys create, then phloem login)"
                      + ("" if self._tls else "  [yellow]plain HTTP: keys cross the network "
                         "in clear; use --tls[/]"))
        gw = running.gateway
        if self._tls is None:
            out.print(f"  gateway  {s.gateway_host}:{gw.port}")
        else:
            out.print(f"  gateway  https {s.gateway_host}:{gw.port}  (TLS {s.tls}; http "
                      f"{s.gateway_host}:{gw.http_port} redirects to https)")
        if self._tls is not None and self._tls.ca is not None:
            out.print(f"  tls CA   {self._tls.ca}   (curl --cacert {self._tls.ca} "
                      f"https://...)")
        if (reason := why_python()) is not None:
            out.print(f"  [yellow]request path runs as Python: {escape(reason)}; it costs "
                      "about 3x the CPU per request[/]", highlight=False)
        out.print(f"  firewall {escape(running.firewall.state)}", highlight=False)
        for b in await running.store.list_branches():
            out.print(f"  branch   {b.name} ({b.id})  postgres 127.0.0.1:{b.port}")

    async def _start_unless_stopped(self) -> Running:
        """Start; a stop requested meanwhile cancels start-up, which stops what it
        started."""
        start = asyncio.create_task(self._start())
        stop_wait = asyncio.create_task(self._stop_requested.wait())
        try:
            await asyncio.wait({start, stop_wait}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop_wait.cancel()
        if not start.done():
            start.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await start
            raise PlatformError("interrupted during start-up")
        return start.result()

    # -- start -----------------------------------------------------------------
    async def _start(self) -> Running:
        teardown = AsyncExitStack()
        try:
            return await self._build(teardown)
        except BaseException:
            await teardown.aclose()
            raise

    async def _build(self, teardown: AsyncExitStack) -> Running:
        """Start every component in order, entering its stop in ``teardown`` as soon as
        there is something to stop (so a failure half-way stops exactly that)."""
        s, paths = self.settings, self.paths
        push = teardown.push_async_callback
        if not MIN_UID_BASE <= s.isolate_uid_base <= MAX_UID_BASE:
            raise PlatformError(f"isolate_uid_base: must be between {MIN_UID_BASE} and "
                                f"{MAX_UID_BASE} (got {s.isolate_uid_base})")
        # With TLS, --http-port (default: the gateway port) only redirects to https.
        _check_port_free("http_port" if s.tls_on and s.http_port is not None
                         else "gateway_port", "gateway_host", s.gateway_host, s.plain_port)
        if s.tls_on:
            _check_port_free("https_port", "gateway_host", s.gateway_host, s.https_port)
        _check_port_free("api_port", "api_host", s.api_host, s.api_port)
        if s.api_listen_address is not None:
            _check_port_free("api_listen", "api_listen", *s.api_listen_address)
        self._prepare_data_dir(teardown)
        try:
            self._tls = await asyncio.to_thread(gateway_tls, s)
        except TlsError as exc:
            raise PlatformError(str(exc)) from None
        # What a killed run left (its databases and poolers, isolate sockets, half-made
        # environments) goes before anything of this run starts.
        swept = await asyncio.to_thread(leftovers.sweep, paths)
        if swept:
            log.warning("the previous run of %s did not stop cleanly; stopped or removed "
                        "what it left: %s", paths.root, swept.summary())
        service = await asyncio.to_thread(Identity.service, s.service_user)
        bins = await asyncio.to_thread(install_binaries, paths.pginstall)
        secret_box = SecretBox.from_data_dir(paths.secrets)
        system = Cluster(bins, paths.system_pgdata, socket_dir=paths.pg_socket_dir("system"),
                         port=SYSTEM_PORT, owner=service,
                         log_file=paths.system_pgdata.parent / "postgres.log")
        push(asyncio.to_thread, system.stop)  # idempotent: also a half-started one
        pool = await self._start_system_db(system, secret_box)
        push(pool.close)
        store = Store(pool, secret_box)
        api_key = await self._ensure_api_key(store)

        branches = BranchManager(store, paths, bins, service, s.pg_port_base)
        push(branches.stop_all)  # stops watching first: before the system cluster stops
        await branches.recover()
        await branches.start_all()
        await branches.ensure_main()
        branches.watch_also("system database", system)
        branches.start_watching()
        firewall = choose_firewall(s)
        push(firewall.stop)
        await self._start_firewall(firewall, store)

        # Isolates write to the logs until they have stopped.
        function_logs = FunctionLogs()
        push(_close_logs, asyncio.create_task(_flush_logs(function_logs)), function_logs)
        metrics = Metrics()
        sandbox_off = (await asyncio.to_thread(sandbox_unavailable) if s.sandbox
                       else "turned off (--no-sandbox)")
        if sandbox_off is not None and s.sandbox and os.geteuid() == 0:
            log.warning("isolates and builds run WITHOUT sandboxes: %s", sandbox_off)
        # As root, build steps run as the build user through the launcher (in a sandbox
        # unless --no-sandbox); else directly (docs/architecture.md, Builds).
        runner = DIRECT if os.geteuid() != 0 else SandboxRunner(
            Identity.build(s.isolate_uid_base), paths.sandbox_root,
            paths.build_caches, namespaces=sandbox_off is None)
        try:
            toolbox = Toolbox.for_platform(paths, runner, s.isolate_python)
        except BuildFailed as exc:
            raise PlatformError(str(exc)) from None
        make_dir(paths.isolate_sockets, 0o711)
        # The isolates' groups go after the spawners stop (removing a group kills what
        # is still in it), so their stop is entered first; they are chosen below.
        groups: list[CgroupLimiter | WatchdogLimiter] = []

        async def close_groups() -> None:
            for limiter in groups:
                await asyncio.to_thread(limiter.close, paths.run / "cgroups.json")

        push(close_groups)
        # Each runtime's fast spawner (Python: a zygote with uvicorn already imported;
        # Node: standby processes), each spawning directly when its shortcut is down;
        # started from this thread so they die with the platform. Stopped after the
        # isolates: they die with their zygote.
        spawner: Spawner | None = None
        if s.zygote:
            spawner = await asyncio.to_thread(spawners, toolbox, DirectSpawner())
            push(spawner.stop)
            await spawner.start()
        # Isolates' groups go below ours; a killed run's leftovers go first.
        cgroups = choose_limiter(parent_name=parent_name(paths.root),
                                 defaults=s.function_limits)
        groups.append(cgroups)
        cgroups.sweep(paths.run / "cgroups.json", old_roots())
        supervisor = Supervisor(
            paths.isolate_sockets, function_logs.writer_for,
            grace_s=s.eviction_grace_s, start_timeout_s=s.isolate_start_timeout_s,
            memory=cgroups, spawner=spawner,
            on_cold_start=lambda spec, secs: metrics.observe_cold_start(
                spec.branch_id, spec.slug, secs),
            on_eviction=lambda spec, reason: metrics.observe_eviction(
                spec.branch_id, spec.slug, reason))
        push(supervisor.stop_all)
        self._on_force.append(lambda: _kill_isolates(supervisor))
        await supervisor.start()
        metrics.load = function_load(supervisor)
        artifacts = ArtifactStore(paths.artifacts)
        await asyncio.to_thread(artifacts.sweep)  # uploads a killed run left
        deployer = Deployer(s, paths, store, artifacts, branches, supervisor, toolbox,
                            secret_box, sandbox_off)
        teardown.callback(deployer.close)
        # Expired branches (a neon.ts ttl) are deleted with their functions.
        lifetime = BranchLifetime(branches, deployer.drop_branch)
        lifetime.start()
        push(lifetime.stop)

        def host(fn: FunctionRow) -> str:
            return urlsplit(deployer.invocation_url(fn.branch_id, fn.slug)).hostname or ""

        async def allow(branch: BranchRow, fn: FunctionRow) -> None:
            await firewall.allow_function(self._isolate_uid(fn), _branch_ports(branch))

        async def live(branch: BranchRow, fn: FunctionRow) -> None:
            # --tls acme: a certificate for a name that maps to a live function only, so
            # a deploy whose build fails orders nothing.
            if self._tls is not None:
                self._tls.certificates.ensure(host(fn))  # a valid name (gateway_tls)

        async def forget(fn: FunctionRow) -> None:
            await firewall.forget_function(self._isolate_uid(fn))
            if self._tls is not None:
                self._tls.certificates.forget(host(fn))

        deployer.on_function_deployed = allow
        deployer.on_function_live = live
        deployer.on_function_deleted = forget
        # Branch services: before the routes load (their variables are in the specs),
        # stopped after the gateway.
        branch_services = ServiceRegistry.builtin(ServiceStore(pool))
        await branch_services.start(ServiceContext(
            paths=paths, pool=pool, store=store, domain=s.domain, scheme=s.public_scheme,
            port=s.url_port, secret_box=secret_box,
            connection_strings=branches.connection_strings, settings=s))
        push(branch_services.stop)
        branch_services.certificates = self._tls.certificates if self._tls else None
        branches.state_hooks = branch_services
        deployer.services = branch_services
        await deployer.load_routes()
        await self._remove_unserved_deployments(store)

        domains = await start_domains(pool, store, deployer.routes, s, self._tls)
        deployer.on_branch_dropped = domains.drop_branch
        router = PlatformRouter(deployer.routes, supervisor, s.domain, hsts=s.tls_on,
                                services=branch_services)
        # Client connections may not take the descriptors isolates' connections, spawns
        # and databases need (phloem.gateway.admission.plan_connections).
        plan = plan_connections(fd_limit(), s.max_connections, s.api_max_connections)
        if plan.warning:
            log.warning("warning: %s", plan.warning)
        gateway = Gateway(
            router,
            GatewayConfig(host=s.gateway_host, port=s.serving_port, proto=s.public_scheme,
                          tls=self._tls.context if self._tls else None,
                          http_port=s.plain_port if s.tls_on else None,
                          redirect_port=s.url_port,
                          acme_challenge=self._tls.acme.challenge
                          if self._tls and self._tls.acme else None,
                          trusted_proxies=s.trusted_proxies,
                          proxy_protocol=s.proxy_protocol,
                          head_timeout=s.head_timeout_s, max_connections=plan.gateway,
                          max_connections_per_peer=s.max_connections_per_peer,
                          ttfb_timeout=s.function_limits.ttfb_timeout_s,
                          silence_timeout=s.function_limits.silence_timeout_s,
                          # The gateway's own limit is a ceiling; lower ones come per lease.
                          max_body_bytes=max(s.function_limits.max_body_bytes,
                                             MAX_BODY_CEILING)),
            on_request=RequestObserver(s.domain, deployer.routes, metrics,
                                       function_logs))
        push(_close_gateway, gateway, s.drain_timeout_s)
        await gateway.start()
        if self._tls is not None and self._tls.acme is not None:
            # HTTP-01 needs the plain listener; live functions' names are ensured (a
            # stored certificate that is still good is kept: no new order).
            push(self._tls.acme.stop)
            await self._tls.acme.start()
            for fn in await store.list_functions():
                if fn.active_deployment_id is not None:
                    self._tls.certificates.ensure(host(fn))
            if s.api_listen is not None:
                self._tls.certificates.ensure(s.remote_api_name)  # checked in gateway_tls
            branch_services.ensure_hosts()
        admissions = [gateway.admission]
        if s.tls_on:
            admissions.append(gateway.redirect_admission)
        metrics.connections = listener_load(admissions)
        # Schedule triggers deliver through the supervisor: stopped before it.
        triggers = await start_triggers(pool, deployer, supervisor, function_logs)
        push(triggers.stop)
        storage = branch_services.services.get("storage")
        if isinstance(storage, StorageService):   # storage_object_created triggers
            storage.set_object_listener(triggers.object_created)

        # The API: its status route reports on `running`, tied below before it serves.
        running: Running

        async def status() -> dict[str, Any]:
            return await running.status()

        services = ApiServices(settings=s, paths=paths, api_key=api_key, store=store,
                               branches=branches, deployer=deployer, artifacts=artifacts,
                               function_logs=function_logs, metrics=metrics, status=status,
                               triggers=triggers, branch_services=branch_services,
                               domains=domains)
        # No WebSocket routes: an upgrade is served as plain HTTP (and stays counted).
        # /npm/ (the @neon and @neondatabase scopes for npm) is in front of the key check.
        app = with_npm_registry(create_api(services), NpmRegistry(s.npm_upstream))
        config = uvicorn.Config(app, host=s.api_host, port=s.api_port,
                                log_level="warning", access_log=False, lifespan="off",
                                ws="none")
        admission = Admission("api", AdmissionConfig(
            max_connections=plan.api, max_per_peer=s.max_connections_per_peer,
            head_timeout_s=s.head_timeout_s))
        admissions.append(admission)
        api_server = ApiServer(config, admission)
        api_task = asyncio.create_task(api_server.serve())
        push(_close_api, api_server, api_task, s.drain_timeout_s)
        running = Running(
            settings=s, paths=paths, api_key=api_key, pool=pool, store=store,
            branches=branches, firewall=firewall, function_logs=function_logs,
            metrics=metrics, cgroups=cgroups, supervisor=supervisor, artifacts=artifacts,
            deployer=deployer, gateway=gateway, api_server=api_server, api_task=api_task,
            admissions=admissions, teardown=teardown, triggers=triggers, tls=self._tls)
        while not api_server.started:
            if api_task.done():
                api_task.result()
                raise PlatformError(f"api_port: could not serve on {s.api_host}:{s.api_port}")
            await asyncio.sleep(0.01)
        if s.api_listen_address is not None:
            await self._serve_remote_api(config.app, admission, push)
        return running

    async def _serve_remote_api(self, app: Any, admission: Admission,
                                push: Callable[..., Any]) -> None:
        """``--api-listen``: the same API (same keys, scopes, admission) on a second
        address, over TLS with the gateway's certificates unless ``--tls off``."""
        s = self.settings
        assert s.api_listen_address is not None
        host, port = s.api_listen_address
        config = uvicorn.Config(app, host=host, port=port, log_level="warning",
                                access_log=False, lifespan="off", ws="none")
        server = ApiServer(config, admission, self._tls.context if self._tls else None)
        task = asyncio.create_task(server.serve())
        push(_close_api, server, task, s.drain_timeout_s)
        while not server.started:
            if task.done():
                task.result()
                raise PlatformError(f"api_listen: could not serve on {host}:{port}")
            await asyncio.sleep(0.01)

    async def _start_firewall(self, firewall: Firewall, store: Store) -> None:
        """Network rules before any isolate or build runs, with every function already
        recorded allowed its branch's ports (docs/architecture.md, "Network rules")."""
        s = self.settings
        ports = {b.id: _branch_ports(b) for b in await store.list_branches()}
        functions = {self._isolate_uid(fn): ports[fn.branch_id]
                     for fn in await store.list_functions() if fn.branch_id in ports}
        await firewall.start(sorted({s.plain_port, s.serving_port}), functions)
        if firewall.state != ACTIVE and s.firewall and os.geteuid() == 0:
            log.warning("warning: no network rules for isolates and builds (%s); they can "
                        "connect to every local port: the control API, other branches' "
                        "databases", firewall.state)

    async def _remove_unserved_deployments(self, store: Store) -> None:
        """Deployment directories only active and kept (rollback target) deployments
        need: a build or a prune that a killed run left half-done leaves one behind (no
        build runs yet here)."""
        kept = await store.kept_deployment_ids()
        root = self.paths.deployments
        stale = [d for d in (root.iterdir() if root.is_dir() else [])
                 if d.name not in kept]
        for d in stale:
            await asyncio.to_thread(shutil.rmtree, d, True)
        if stale:
            log.warning("removed %d deployment directories of unfinished builds or "
                        "pruned deployments", len(stale))

    def _isolate_uid(self, fn: FunctionRow) -> int:
        return Identity.isolate(self.settings.isolate_uid_base, fn.number).uid

    def _prepare_data_dir(self, teardown: AsyncExitStack) -> None:
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
        lock = open(self.paths.lock, "w")  # noqa: SIM115  (held until the very end)
        teardown.callback(lock.close)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise PlatformError(f"data_dir: another phloem is running on {root}") from None

    async def _start_system_db(self, cluster: Cluster,
                               secret_box: SecretBox) -> AsyncConnectionPool:
        secret_file = self.paths.secrets / "system.json"
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
        await asyncio.to_thread(db.migrate, conninfo, secret_box)
        return await db.open_pool(conninfo)

    async def _ensure_api_key(self, store: Store) -> str:
        creds = self.paths.credentials
        key: str | None = None
        if creds.exists():
            key = json.loads(creds.read_text()).get("api_key", "") or None
            if key is not None and not await store.api_key_valid(key):
                key = None
        if key is None:
            key = await store.create_api_key("created by phloem up")
        _write_private(creds, {"api_url": self.settings.api_url, "api_key": key})
        return key


def _kill_isolates(supervisor: Supervisor) -> None:
    for isolate in supervisor.isolates():
        isolate.send_signal(signal.SIGKILL)
