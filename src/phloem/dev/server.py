"""``phloem dev``: serve a project's functions from the working tree, through the same
gateway, runtime builds and hosts as a deployment, and reload a function when its files
change.

    server = DevServer(project, branch_id="br-…", env_by_slug={...}, port=8789)
    await server.run()

Each generation of a function is built by its runtime exactly as a deploy builds it
(``Runtime.build``), but directly as the developer with what the developer has installed
(``Toolbox.for_developer``): a Node function is bundled by esbuild from the project's own
``node_modules`` when it has one, else from its ``package.json`` installed into a cache;
a Python function runs on the developer's interpreter with its packages. Reload is
blue-green per function: the new generation is built and started from the edited files;
once it is ready the function's route switches to it and the old isolate drains
(requests already in flight finish) and gets SIGINT. If the build or the start fails (a
syntax error, a failing start-up), the error is printed and the old one keeps serving.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import watchfiles

from phloem.control.logs import FunctionLogs
from phloem.gateway.routing import RouteError, Upstream
from phloem.gateway.server import Gateway, GatewayConfig, RequestRecord
from phloem.project.packing import ALWAYS_IGNORED
from phloem.project.plan import DesiredFunction
from phloem.runtimes.base import BuildContext, BuildFailed, IsolateContext, Toolbox
from phloem.runtimes.registry import family_of
from phloem.server.dispatch import parse_host
from phloem.supervisor import IsolateFailed, IsolateSpec, Supervisor
from phloem.supervisor.cgroups.watchdog import WatchdogLimiter
from phloem.system.identity import Identity
from phloem.system.limits import FunctionLimits


@dataclass
class DevFunction:
    desired: DesiredFunction
    spec: IsolateSpec
    generation: int = 0


class DevServer:
    """Raises ``BuildFailed`` when a runtime's tools cannot be provisioned."""

    def __init__(self, root: Path, functions: dict[str, DesiredFunction], branch_id: str,
                 base_env: dict[str, str], *, host: str = "127.0.0.1", port: int = 8789,
                 domain: str = "fn.localhost", say: Callable[[str], None] = print) -> None:
        self.root = root
        self.branch_id = branch_id
        self.domain = domain
        self.say = say
        self.base_env = base_env
        self._run_dir = Path(tempfile.mkdtemp(prefix="phloem-dev-"))
        self.toolbox = Toolbox.for_developer()
        self.logs = FunctionLogs()
        self.supervisor = Supervisor(self._run_dir, self._log_writer, grace_s=5,
                                     memory=WatchdogLimiter())
        for family in dict.fromkeys(family_of(w.runtime).family for w in functions.values()):
            family_of(family).prepare(self.toolbox, say)
        self.functions: dict[str, DevFunction] = {}
        for slug, want in functions.items():
            self._build(want, 0)
            self.functions[slug] = DevFunction(want, self._spec(want, 0))
        self.gateway = Gateway(self, GatewayConfig(host=host, port=port),
                               on_request=self._show_request)

    def url(self, slug: str) -> str:
        return f"http://{self.branch_id}-{slug}.{self.domain}:{self.gateway.port}"

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
                                                       out=out, entry=want.entry, log=log))
        except BuildFailed as exc:
            self.say(f"[{want.slug}] build failed: {exc}")
            return False
        return True

    def _spec(self, want: DesiredFunction, gen: int) -> IsolateSpec:
        limits = FunctionLimits()
        plan = family_of(want.runtime).isolate(IsolateContext(
            self.toolbox, source=self.root, out=self._out(want.slug, gen), entry=want.entry,
            limits=limits))
        deployment = f"dev-{want.slug}-{gen}"
        env = {**os.environ, **plan.env, **want.env, **self.base_env,
               "PHLOEM_FUNCTION": want.slug, "PHLOEM_DEPLOYMENT": deployment}
        return IsolateSpec(
            deployment_id=deployment, function_id=want.slug, slug=want.slug,
            branch_id=self.branch_id, command=plan.command, env=env, cwd=self.root,
            identity=Identity.current(), log_path=self._run_dir / f"{want.slug}.log",
            limits=limits, start=plan.start)

    def _log_writer(self, spec: IsolateSpec) -> Callable[[str, str, str], None]:
        def write(isolate_id: str, stream: str, line: str) -> None:
            if stream != "phloem" or "exited" in line:
                self.say(f"[{spec.slug}] {line}")

        return write

    def _show_request(self, r: RequestRecord) -> None:
        key = parse_host(r.host, self.domain)
        slug = key[1] if key else "?"
        self.say(f"[{slug}] {r.method} {r.path} {r.status} {r.duration_s * 1000:.1f} ms")

    # -- Router for the gateway -----------------------------------------------
    async def acquire(self, host: str) -> Upstream:
        key = parse_host(host, self.domain)
        fn = self.functions.get(key[1]) if key and key[0] == self.branch_id else None
        if fn is None:
            raise RouteError(404, "unknown_host", f"no function is served at host {host!r}")
        try:
            return await self.supervisor.acquire(fn.spec)
        except IsolateFailed as exc:
            raise RouteError(502, "isolate_failed", str(exc)) from exc

    # -- reload -----------------------------------------------------------------
    async def reload(self, slug: str) -> bool:
        """Start the new version, switch to it when ready, drain the old one."""
        fn = self.functions[slug]
        started = time.monotonic()
        gen = fn.generation + 1
        if not await asyncio.to_thread(self._build, fn.desired, gen):
            self.say(f"[{slug}] reload failed, still serving the previous version")
            return False
        spec = self._spec(fn.desired, gen)
        try:
            lease = await self.supervisor.acquire(spec)  # warms the new isolate
        except IsolateFailed as exc:
            self.say(f"[{slug}] reload failed, still serving the previous version: {exc}")
            await self.supervisor.retire(spec.deployment_id, drain_s=0)
            return False
        lease.release(reusable=True)
        old = fn.spec.deployment_id
        fn.spec, fn.generation = spec, gen
        self.say(f"[{slug}] reloaded in {(time.monotonic() - started) * 1000:.0f} ms")
        asyncio.get_running_loop().create_task(self.supervisor.retire(old, drain_s=60))
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
        """Serve (without watching files: :meth:`run` does that)."""
        await self.supervisor.start()
        await self.gateway.start()

    async def stop(self) -> None:
        await self.gateway.stop_accepting()
        await self.gateway.drain(5)
        # A developer's Ctrl-C must not wait minutes for wait_until work (no second
        # Ctrl-C forces `phloem dev`): the grace only.
        await self.supervisor.stop_all(wait_until=False)
        shutil.rmtree(self._run_dir, ignore_errors=True)

    async def run(self, ready: Callable[[], None] = lambda: None) -> None:
        await self.start()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        watcher = asyncio.create_task(self._watch(stop))
        ready()
        try:
            await stop.wait()
        finally:
            self.say("stopping")
            await self.stop()
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher
