"""``phloem dev``: serve a project's functions from the working tree, through the same
gateway and runtime hosts (Python, Node) as a deployment, and reload a function when its
files change.

    server = DevServer(project, branch_id="br-…", env_by_slug={...}, port=8789)
    await server.run()

Reload is blue-green per function: a new isolate starts from the edited files; once it is
ready the function's route switches to it and the old isolate drains (requests already in
flight finish) and gets SIGINT. If the new one fails to start (a syntax error, a failing
start-up), the error is printed and the old one keeps serving. Node functions are bundled
with esbuild first (from the project's own ``node_modules`` when it has one, as phloem's
substitutes for ``@neon/functions`` and friends otherwise); a bundle error is printed the
same way.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import watchfiles

from phloem.dispatch import parse_host
from phloem.gateway.routing import RouteError, Upstream
from phloem.gateway.server import Gateway, GatewayConfig, RequestRecord
from phloem.identity import Identity
from phloem.logs import FunctionLogs
from phloem.packing import ALWAYS_IGNORED
from phloem.project import DesiredFunction
from phloem.runtimes.node.bundle import (
    BundleError,
    bundle,
    install_dependencies,
    native_packages,
)
from phloem.runtimes.node.provision import NODE_RUNTIME, ProvisionError, ensure_toolchain
from phloem.runtimes.node.substitutes import bundle_aliases, install_substitutes
from phloem.supervisor import IsolateFailed, IsolateSpec, Supervisor
from phloem.supervisor.cgroups.watchdog import WatchdogLimiter


class NodeBuilder:
    """Bundles Node functions of the working tree into ``out_dir/<slug>/<generation>/``."""

    def __init__(self, root: Path, out_dir: Path, say: Callable[[str], None]) -> None:
        from phloem.neon import tools_dir

        self.root, self.out_dir, self.say = root, out_dir, say
        self.tools = tools_dir()
        # node_modules -> (its mtime, packages with native addons): walking a large
        # node_modules on every save would dominate the rebuild. npm install renames a new
        # node_modules/.package-lock.json into place, which changes the directory's mtime.
        self._natives: dict[Path, tuple[int, list[str]]] = {}
        try:
            self.node, self.esbuild, self.host = ensure_toolchain(self.tools, say)
        except ProvisionError as exc:
            raise BundleError(str(exc)) from None

    def bundle_path(self, slug: str, generation: int) -> Path:
        return self.out_dir / slug / str(generation) / "bundle.mjs"

    def build(self, want: DesiredFunction, generation: int) -> Path:
        own = self.root / "node_modules"
        node_paths: list[Path] = []
        if own.is_dir():
            node_paths.append(own)
        else:
            installed = install_dependencies(self.root, self.tools / "dev-deps", self.node,
                                             self.say, substitutes=install_substitutes())
            node_paths += [installed] if installed else []
        out = self.bundle_path(want.slug, generation)
        bundle(self.esbuild, self.root, want.entry, out, node_paths,
               external=[n for p in node_paths for n in self._native_packages(p)],
               alias=bundle_aliases(node_paths), log=self.say)
        return out

    def _native_packages(self, node_modules: Path) -> list[str]:
        mtime = node_modules.stat().st_mtime_ns
        cached = self._natives.get(node_modules)
        if cached is None or cached[0] != mtime:
            cached = self._natives[node_modules] = (mtime, native_packages(node_modules))
        return cached[1]


@dataclass
class DevFunction:
    desired: DesiredFunction
    spec: IsolateSpec
    generation: int = 0


class DevServer:
    def __init__(self, root: Path, functions: dict[str, DesiredFunction], branch_id: str,
                 base_env: dict[str, str], *, host: str = "127.0.0.1", port: int = 8789,
                 domain: str = "fn.localhost", say: Callable[[str], None] = print) -> None:
        self.root = root
        self.branch_id = branch_id
        self.domain = domain
        self.say = say
        self._run_dir = Path(tempfile.mkdtemp(prefix="phloem-dev-"))
        self.logs = FunctionLogs()
        self.supervisor = Supervisor(self._run_dir, self._log_writer, grace_s=5,
                                     memory=WatchdogLimiter())
        self.node: NodeBuilder | None = None
        if any(want.runtime == NODE_RUNTIME for want in functions.values()):
            self.node = NodeBuilder(root, self._run_dir / "bundles", say)
            for want in functions.values():
                if want.runtime == NODE_RUNTIME:
                    self._build_node(want, 0)
        self.functions = {slug: DevFunction(want, self._spec(want, base_env, 0))
                          for slug, want in functions.items()}
        self.gateway = Gateway(self, GatewayConfig(host=host, port=port),
                               on_request=self._show_request)

    def url(self, slug: str) -> str:
        return f"http://{self.branch_id}-{slug}.{self.domain}:{self.gateway.port}"

    def _build_node(self, want: DesiredFunction, gen: int) -> bool:
        assert self.node is not None
        try:
            self.node.build(want, gen)
        except BundleError as exc:
            self.say(f"[{want.slug}] build failed: {exc}")
            return False
        return True

    def _command(self, want: DesiredFunction, gen: int) -> list[str]:
        if want.runtime == NODE_RUNTIME:
            assert self.node is not None
            return [str(self.node.node), str(self.node.host), "--bundle",
                    str(self.node.bundle_path(want.slug, gen))]
        return [sys.executable, "-m", "phloem.runtimes.python.host", "--app", want.entry]

    def _spec(self, want: DesiredFunction, base_env: dict[str, str], gen: int) -> IsolateSpec:
        env = {**os.environ, **want.env, **base_env, "PHLOEM_FUNCTION": want.slug,
               "PHLOEM_DEPLOYMENT": f"dev-{want.slug}-{gen}",
               "PYTHONPATH": os.pathsep.join([str(self.root),
                                              os.environ.get("PYTHONPATH", "")]).rstrip(":"),
               "PYTHONUNBUFFERED": "1"}
        return IsolateSpec(
            deployment_id=f"dev-{want.slug}-{gen}", function_id=want.slug, slug=want.slug,
            branch_id=self.branch_id,
            command=self._command(want, gen), env=env, cwd=self.root, identity=Identity.current(),
            log_path=self._run_dir / f"{want.slug}.log")

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
        if fn.desired.runtime == NODE_RUNTIME and not await asyncio.to_thread(
                self._build_node, fn.desired, gen):
            self.say(f"[{slug}] reload failed, still serving the previous version")
            return False
        spec = replace(fn.spec, deployment_id=f"dev-{slug}-{gen}",
                       command=self._command(fn.desired, gen),
                       env={**fn.spec.env, "PHLOEM_DEPLOYMENT": f"dev-{slug}-{gen}"})
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

    async def run(self, ready: Callable[[], None] = lambda: None) -> None:
        await self.supervisor.start()
        await self.gateway.start()
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
            await self.gateway.stop_accepting()
            await self.gateway.drain(5)
            await self.supervisor.stop_all()
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher
            shutil.rmtree(self._run_dir, ignore_errors=True)
