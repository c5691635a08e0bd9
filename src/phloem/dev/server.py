"""``phloem dev``: serve a project's functions from the working tree, through the same
gateway, runtime builds and hosts as a deployment, and reload a function when its files
change, as ``neon dev`` does: each function on its own port of localhost, whatever the
Host header says.

    server = DevServer(root, desired, branch_id="br-…", base_env={...})
    await server.run(ready=lambda: print(server.url("api")))   # http://localhost:8787/

Ports: a function whose ``neon.ts`` sets ``dev.port`` gets exactly that port (taken: a
:class:`DevPortError` naming the function); the others get the first free ports from
``port`` (8787, Neon's default) upward, in declaration order, and the ones that moved past a
taken port are reported. Each function's port is its own gateway (the platform's), so
WebSocket upgrades, SSE and limits behave as deployed.

Each generation of a function is built by its runtime exactly as a deploy builds it
(``Runtime.build``), but directly as the developer with what the developer has installed
(``Toolbox.for_developer``): a Node function is bundled by esbuild from the project's own
``node_modules`` when it has one, else from its ``package.json`` installed into a cache;
a Python function runs on the developer's interpreter with its packages. Every function is
started at once (an error at start-up is printed then, not at the first request). Reload
is blue-green per function: the new generation is built and started from the edited files;
once it is ready the function's port switches to it and the old isolate drains (requests
already in flight finish) and gets SIGINT. If the build or the start fails (a syntax error,
a failing start-up), the error and the function's own output are printed and the old one
keeps serving. Schedule triggers of the served functions fire on their cron as on the
platform (``dev/triggers.py``).

The branch's services (Neon Auth, the AI Gateway, object storage) are reached through local
forwarders (``dev/forward.py``) started with the functions: their variables
(``service_env``, as ``env pull`` gets them) are given to every function with the local
URLs in place of the service names that only sandboxes resolve.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import errno
import os
import shutil
import signal
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import watchfiles

from phloem.control.logs import FunctionLogs
from phloem.control.routes import RoutingTable
from phloem.control.triggers import Delivery
from phloem.dev.forward import ServiceForwarders
from phloem.dev.triggers import DevTriggers
from phloem.gateway.routing import RouteError, Upstream
from phloem.gateway.server import Gateway, GatewayConfig, RequestRecord
from phloem.metadata.triggers import TriggerSpec
from phloem.project.packing import ALWAYS_IGNORED
from phloem.project.plan import DesiredFunction
from phloem.runtimes.base import BuildContext, BuildFailed, IsolateContext, Toolbox
from phloem.runtimes.registry import family_of
from phloem.supervisor import IsolateFailed, IsolateSpec, Supervisor
from phloem.supervisor.cgroups.watchdog import WatchdogLimiter
from phloem.system.identity import Identity
from phloem.system.limits import FunctionLimits

#: Neon's ``neon dev`` starts its search here.
DEFAULT_PORT = 8787
#: How many ports above the start a function without ``dev.port`` may move to.
PORT_SEARCH = 100
#: Lines of a function's own output kept to explain a failed start.
OUTPUT_LINES = 20


class DevPortError(OSError):
    """A port could not be bound; the message names the function and the port."""


@dataclass
class DevFunction:
    desired: DesiredFunction
    spec: IsolateSpec | None = None
    generation: int = 0
    built: bool = False
    #: The served generation started (False until one did).
    ok: bool = False
    port: int = 0
    gateway: Gateway | None = None
    #: What the isolates printed lately, for a start failure's message.
    output: collections.deque[str] = field(
        default_factory=lambda: collections.deque(maxlen=OUTPUT_LINES))


class _FunctionRouter:
    """Routes every request of one function's port to it, whatever its Host."""

    def __init__(self, server: DevServer, slug: str) -> None:
        self.server = server
        self.slug = slug

    async def acquire(self, host: str) -> Upstream:
        return await self.server.acquire_function(self.slug)

    def acquire_nowait(self, host: str) -> Upstream | None:
        spec = self.server.functions[self.slug].spec
        return None if spec is None else self.server.supervisor.acquire_nowait(spec)


class DevServer:
    """Raises ``BuildFailed`` when a runtime's tools cannot be provisioned."""

    def __init__(self, root: Path, functions: dict[str, DesiredFunction], branch_id: str,
                 base_env: dict[str, str], *, host: str = "127.0.0.1",
                 port: int = DEFAULT_PORT, say: Callable[[str], None] = print,
                 triggers: Sequence[TriggerSpec] = (),
                 services: ServiceForwarders | None = None,
                 service_env: dict[str, str] | None = None) -> None:
        self.root = root
        self.services = services
        #: The branch's service variables; local URLs once :meth:`start` ran.
        self.service_env = dict(service_env or {})
        self.branch_id = branch_id
        self.host = host
        self.first_port = port
        self.say = say
        self.base_env = base_env
        self._run_dir = Path(tempfile.mkdtemp(prefix="phloem-dev-"))
        self.toolbox = Toolbox.for_developer()
        self.logs = FunctionLogs()
        self.supervisor = Supervisor(self._run_dir, self._log_writer, grace_s=5,
                                     memory=WatchdogLimiter())
        #: Ports that moved past a taken one: (slug, the first port tried, the port bound).
        self.moved: list[tuple[str, int, int]] = []
        for family in dict.fromkeys(family_of(w.runtime).family for w in functions.values()):
            family_of(family).prepare(self.toolbox, say)
        self.functions: dict[str, DevFunction] = {}
        for slug, want in functions.items():
            self.functions[slug] = DevFunction(want, built=self._build(want, 0))
        #: The served generation of each function, where triggers deliver.
        self.routes = RoutingTable()
        self.triggers = DevTriggers(
            [t for t in triggers if t.function in functions],
            Delivery(self.routes, self.supervisor, self.logs,
                     lambda _branch, slug: f"localhost:{self.port_of(slug)}"),
            branch_id, say)

    def port_of(self, slug: str) -> int:
        return self.functions[slug].port

    def url(self, slug: str) -> str:
        return f"http://localhost:{self.port_of(slug)}/"

    def _out(self, slug: str, gen: int) -> Path:
        return self._run_dir / "builds" / slug / str(gen)

    def _build(self, want: DesiredFunction, gen: int) -> bool:
        """Build generation ``gen`` as a deploy would; a failure is printed."""
        out = self._out(want.slug, gen)
        out.mkdir(parents=True, exist_ok=True)

        def log(line: str) -> None:
            self.say(f"[{want.slug}] {line}")

        try:
            family_of(want.runtime).build(BuildContext(self.toolbox, source=self.root,
                                                       out=out, entry=want.entry, log=log,
                                                       bundle=want.bundle))
        except BuildFailed as exc:
            self.say(f"[{want.slug}] build failed: {exc}")
            return False
        return True

    def function_urls(self) -> dict[str, str]:
        """``NEON_FUNCTION_<SLUG>_BASE_URL`` of every function served here, as ``env pull``
        writes them for a branch, so functions that call each other reach the local ones."""
        return {f"NEON_FUNCTION_{slug.upper()}_BASE_URL": self.url(slug)
                for slug in self.functions}

    def _spec(self, want: DesiredFunction, gen: int) -> IsolateSpec:
        limits = FunctionLimits()
        plan = family_of(want.runtime).isolate(IsolateContext(
            self.toolbox, source=self.root, out=self._out(want.slug, gen), entry=want.entry,
            limits=limits))
        deployment = f"dev-{want.slug}-{gen}"
        # What the function's config declares wins over the local URLs (it may mean to
        # call a deployed function); the branch's variables win over a stale .env.
        env = {**os.environ, **self.function_urls(), **plan.env, **want.env,
               **self.service_env, **self.base_env, "PHLOEM_FUNCTION": want.slug,
               "PHLOEM_DEPLOYMENT": deployment}
        return IsolateSpec(
            deployment_id=deployment, function_id=want.slug, slug=want.slug,
            branch_id=self.branch_id, command=plan.command, env=env, cwd=self.root,
            identity=Identity.current(), log_path=self._run_dir / f"{want.slug}.log",
            limits=limits, start=plan.start)

    def _log_writer(self, spec: IsolateSpec) -> Callable[[str, str, str], None]:
        fn = self.functions.get(spec.slug)

        def write(isolate_id: str, stream: str, line: str) -> None:
            if stream != "phloem":
                if fn is not None:
                    fn.output.append(line)
                self.say(f"[{spec.slug}] {line}")
            elif "exited" in line:
                self.say(f"[{spec.slug}] {line}")

        return write

    def _show_request(self, slug: str) -> Callable[[RequestRecord], None]:
        def show(r: RequestRecord) -> None:
            self.say(f"[{slug}] {r.method} {r.path} {r.status} "
                     f"{r.duration_s * 1000:.1f} ms")

        return show

    def _failure(self, slug: str, exc: IsolateFailed) -> str:
        """Why a function did not start, with what it printed (in dev its output is right
        here, not in ``phloem functions logs``)."""
        reason = str(exc).split("; see 'phloem functions logs", 1)[0]
        output = list(self.functions[slug].output)
        return reason + (":\n" + "\n".join(output[-OUTPUT_LINES:]) if output else "")

    # -- serving ------------------------------------------------------------------
    async def acquire_function(self, slug: str) -> Upstream:
        fn = self.functions[slug]
        if fn.spec is None:
            raise RouteError(503, "not_started", f"{slug} is not started yet")
        if not fn.built and not fn.ok:
            raise RouteError(502, "build_failed", f"{slug} did not build; fix the error "
                             "shown by phloem dev and save")
        try:
            return await self.supervisor.acquire(fn.spec)
        except IsolateFailed as exc:
            raise RouteError(502, "isolate_failed", self._failure(slug, exc)) from exc

    async def _listen(self, slug: str, port: int) -> Gateway:
        gateway = Gateway(_FunctionRouter(self, slug), GatewayConfig(host=self.host, port=port),
                          on_request=self._show_request(slug))
        await gateway.start()
        return gateway

    async def _bind(self) -> None:
        """Give each function its port: ``dev.port`` exactly, else the next free one."""
        taken: set[int] = set()
        for slug, fn in self.functions.items():
            want = fn.desired.dev_port
            if want is None:
                continue
            if want in taken:
                other = next(s for s, f in self.functions.items() if f.port == want)
                raise DevPortError(errno.EADDRINUSE, f"functions.{slug}.dev.port: {want} is "
                                   f"also functions.{other}.dev.port")
            try:
                fn.gateway = await self._listen(slug, want)
            except OSError as exc:
                raise DevPortError(exc.errno, f"functions.{slug}.dev.port: cannot listen "
                                   f"on {self.host}:{want}: {exc.strerror}") from exc
            fn.port = want
            taken.add(want)
        candidate = self.first_port
        for slug, fn in self.functions.items():
            if fn.gateway is not None:
                continue
            first = candidate
            while True:
                if candidate - first > PORT_SEARCH or candidate > 65535:
                    raise DevPortError(errno.EADDRINUSE, f"{slug}: no free port in "
                                       f"{first}-{candidate - 1} on {self.host}")
                if candidate not in taken:
                    try:
                        fn.gateway = await self._listen(slug, candidate)
                        break
                    except OSError as exc:
                        if exc.errno != errno.EADDRINUSE:
                            raise DevPortError(exc.errno, f"{slug}: cannot listen on "
                                               f"{self.host}:{candidate}: "
                                               f"{exc.strerror}") from exc
                candidate += 1
            fn.port = candidate
            taken.add(candidate)
            if first != candidate:
                self.moved.append((slug, first, candidate))
            candidate += 1

    async def _warm(self, slug: str, spec: IsolateSpec) -> bool:
        """Start an isolate of ``spec`` and wait until it is ready; a failure is printed."""
        try:
            lease = await self.supervisor.acquire(spec)
        except IsolateFailed as exc:
            # Its output was printed as it came (by _log_writer); the reason goes last.
            reason = str(exc).split("; see 'phloem functions logs", 1)[0]
            self.say(f"[{slug}] failed to start: {reason}")
            await self.supervisor.retire(spec.deployment_id, drain_s=0)
            return False
        lease.release(reusable=True)
        return True

    def acquire_nowait(self, host: str) -> Upstream | None:
        """No callback-path leases here (gateway.routing): every request is routed by
        :meth:`acquire`."""
        return None

    # -- reload -----------------------------------------------------------------
    async def reload(self, slug: str) -> bool:
        """Start the new version, switch to it when ready, drain the old one."""
        fn = self.functions[slug]
        started = time.monotonic()
        gen = fn.generation + 1
        keeps = "still serving the previous version" if fn.ok else "not serving"
        if not await asyncio.to_thread(self._build, fn.desired, gen):
            self.say(f"[{slug}] reload failed, {keeps}")
            return False
        spec = self._spec(fn.desired, gen)
        fn.output.clear()
        if not await self._warm(slug, spec):
            self.say(f"[{slug}] reload failed, {keeps}")
            return False
        old = fn.spec
        fn.spec, fn.generation, fn.built, fn.ok = spec, gen, True, True
        self.routes.put(self.branch_id, slug, spec)
        self.say(f"[{slug}] reloaded in {(time.monotonic() - started) * 1000:.0f} ms")
        if old is not None:
            asyncio.get_running_loop().create_task(
                self.supervisor.retire(old.deployment_id, drain_s=60))
        return True

    def _watch_filter(self) -> watchfiles.DefaultFilter:
        ignore_dirs = tuple(p.rstrip("/") for p in ALWAYS_IGNORED if p.endswith("/"))
        return watchfiles.DefaultFilter(ignore_dirs=(*watchfiles.DefaultFilter.ignore_dirs,
                                                     *ignore_dirs, "node_modules"))

    async def _watch(self, stop: asyncio.Event) -> None:
        async for changes in watchfiles.awatch(self.root, watch_filter=self._watch_filter(),
                                               stop_event=stop, debounce=50, step=10):
            names = sorted({os.path.relpath(p, self.root) for _, p in changes})
            self.say(f"changed: {', '.join(names[:5])}{' …' if len(names) > 5 else ''}")
            # Any file may be imported by any function: reload them all, concurrently.
            await asyncio.gather(*(self.reload(s) for s in self.functions))

    async def start(self) -> None:
        """Bind every function's port and start every function (without watching files:
        :meth:`run` does that). A function that fails to start is printed and answers
        502 with the reason until an edit fixes it."""
        await self.supervisor.start()
        try:
            if self.services is not None:
                await self.services.start()
                self.service_env = self.services.localize(self.service_env)
            await self._bind()
        except BaseException:
            await self.stop()
            raise
        for slug, fn in self.functions.items():
            fn.spec = self._spec(fn.desired, 0)
            self.routes.put(self.branch_id, slug, fn.spec)

        async def warm(slug: str, fn: DevFunction) -> None:
            assert fn.spec is not None
            fn.ok = fn.built and await self._warm(slug, fn.spec)

        await asyncio.gather(*(warm(s, f) for s, f in self.functions.items()))

    async def stop(self) -> None:
        gateways = [fn.gateway for fn in self.functions.values() if fn.gateway is not None]
        for gateway in gateways:
            await gateway.stop_accepting()
        await asyncio.gather(*(g.drain(5) for g in gateways))
        # A developer's Ctrl-C must not wait minutes for wait_until work (no second
        # Ctrl-C forces `phloem dev`): the grace only.
        await self.supervisor.stop_all(wait_until=False)
        if self.services is not None:
            await self.services.stop()
        shutil.rmtree(self._run_dir, ignore_errors=True)

    async def run(self, ready: Callable[[], None] = lambda: None) -> None:
        await self.start()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        watcher = asyncio.create_task(self._watch(stop))
        firing = asyncio.create_task(self.triggers.run(stop))
        ready()
        try:
            await stop.wait()
        finally:
            self.say("stopping")
            stop.set()
            await firing
            await self.stop()
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher
