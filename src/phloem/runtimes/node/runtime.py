"""The Node.js runtime (``nodejs24``): npm dependencies and esbuild into one ES module,
served by ``host.mjs`` (``@hono/node-server``); isolates activated from standbys.

    rt = NODE
    rt.build(ctx)        # <out>/bundle/bundle.mjs (+ node_modules of native addons)
    rt.isolate(ctx)      # node --max-old-space-size=N host.mjs --bundle ...; a StandbyStart

Dependencies: a source with its own ``node_modules`` (a developer's working tree: phloem
never packs one) is bundled against it; otherwise ``package.json`` is installed into the
shared environment for its key. Deploys and ``phloem dev`` build alike.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

from phloem.runtimes.base import (
    BuildContext,
    BuildFailed,
    IsolateContext,
    IsolatePlan,
    Log,
    Toolbox,
)
from phloem.runtimes.build import outside_system
from phloem.runtimes.node.bundle import (
    ENTRY_CANDIDATES,
    bundle,
    find_entry,
    install_dependencies,
    native_packages,
)
from phloem.runtimes.node.provision import NODE_RUNTIME, ensure_toolchain
from phloem.runtimes.node.standby import NodeStandbySpawner, StandbyStart
from phloem.runtimes.node.substitutes import bundle_aliases, install_substitutes
from phloem.supervisor.isolate import Spawner
from phloem.system.validation import InvalidInput

SOURCE_SUFFIXES = (".ts", ".mts", ".cts", ".tsx", ".js", ".mjs", ".cjs", ".jsx")
#: What a prebuilt bundle may be: Node runs it without a loader.
PREBUILT_SUFFIXES = (".js", ".mjs", ".cjs")
#: Where a build leaves the bundle, relative to the deployment directory.
BUNDLE = Path("bundle") / "bundle.mjs"

Toolchain = tuple[Path, Path, Path]  # node, esbuild, host.mjs


class NodeRuntime:
    family: str = "node"
    name: str = NODE_RUNTIME
    known_names: tuple[str, ...] = (NODE_RUNTIME,)
    source_suffixes: tuple[str, ...] = SOURCE_SUFFIXES
    entry_example: str = "src/index.ts"
    bundles: bool = True
    prebuilt_suffixes: tuple[str, ...] = PREBUILT_SUFFIXES

    def __init__(self) -> None:
        self._toolchains: dict[Path, Toolchain] = {}
        # node_modules -> (its mtime, packages with native addons): walking a large
        # node_modules on every dev rebuild would dominate it. npm install renames a new
        # node_modules/.package-lock.json into place, which changes the directory's mtime.
        self._natives: dict[Path, tuple[int, list[str]]] = {}
        self._lock = threading.Lock()

    # -- entries ----------------------------------------------------------------------
    def check_entry(self, entry: str) -> str:
        """A file of the function's source ('': the first of ENTRY_CANDIDATES)."""
        if entry and (entry.startswith("/") or ".." in Path(entry).parts
                      or not entry.endswith(SOURCE_SUFFIXES)):
            raise InvalidInput("entry", f"must be a .ts/.js/.mjs file inside the source, "
                                        f"e.g. 'src/index.ts' (got {entry!r})")
        return entry

    def default_entry(self, source: Path) -> str | None:
        return next((c for c in ENTRY_CANDIDATES if (source / c).is_file()), None)

    def entry_for_source(self, source: str, attr: str | None) -> str:
        return source  # the module's default export is the app

    # -- builds -----------------------------------------------------------------------
    def toolchain(self, toolbox: Toolbox, log: Log | None = None) -> Toolchain:
        """Node 24, esbuild and the host program, provisioned once per tools dir."""
        tools = toolbox.tools_dir(self.family)
        with toolbox.locks("node-toolchain"):
            if tools not in self._toolchains:
                self._toolchains[tools] = ensure_toolchain(tools, log or (lambda _: None))
            return self._toolchains[tools]

    def prepare(self, toolbox: Toolbox, log: Log) -> None:
        self.toolchain(toolbox, log)

    def build(self, ctx: BuildContext) -> None:
        tb = ctx.toolbox
        node, esbuild, _ = self.toolchain(tb, ctx.log)
        entry = ctx.entry or find_entry(ctx.source)
        if not ctx.bundle:
            _use_prebuilt(ctx, entry)
            return
        ctx.log(f"bundling {entry} with esbuild")
        own = ctx.source / "node_modules"
        if own.is_dir():
            node_paths = [own]
        else:
            modules = install_dependencies(ctx.source, tb.envs_dir(self.family), node,
                                           ctx.log, substitutes=install_substitutes(),
                                           runner=tb.runner)
            node_paths = [modules] if modules else []
        bundle(esbuild, ctx.source, entry, ctx.out / BUNDLE, node_paths,
               external=[n for p in node_paths for n in self._native_packages(p)],
               alias=bundle_aliases([own, *node_paths]), log=ctx.log, runner=tb.runner)

    def _native_packages(self, node_modules: Path) -> list[str]:
        mtime = node_modules.stat().st_mtime_ns
        with self._lock:
            cached = self._natives.get(node_modules)
        if cached is None or cached[0] != mtime:
            cached = (mtime, native_packages(node_modules))
            with self._lock:
                self._natives[node_modules] = cached
        return cached[1]

    # -- isolates ---------------------------------------------------------------------
    def isolate(self, ctx: IsolateContext) -> IsolatePlan:
        node, _, host = self.toolchain(ctx.toolbox)
        # V8 collects before the isolate reaches its memory limit instead of growing its
        # heap towards the machine's size and being killed.
        heap_mb = max(64, int(ctx.limits.memory_mb * 0.75))
        head = [str(node), f"--max-old-space-size={heap_mb}", str(host)]
        bundle_file = str(ctx.out / BUNDLE)
        command = [*head, "--bundle", bundle_file]
        return IsolatePlan(
            command=command, check=[*command, "--check"], env={},
            ro=outside_system({node.resolve().parent, host.parent}),
            start=StandbyStart(command=tuple(head), bundle=bundle_file,
                               private=(str(ctx.out),)))

    def spawner(self, toolbox: Toolbox, fallback: Spawner) -> Spawner | None:
        return NodeStandbySpawner(fallback)


def _use_prebuilt(ctx: BuildContext, entry: str) -> None:
    """``--no-bundle``: the entry is the bundle, run as uploaded (no npm install, no
    esbuild). The bundle path links to it, so Node resolves the file's own relative
    imports (chunks) and its module format (``.mjs``, ``.cjs``, ``package.json`` type)
    from where it really is."""
    if not entry.endswith(PREBUILT_SUFFIXES):
        raise BuildFailed(f"entry: a prebuilt bundle (--no-bundle) runs as it is, so it "
                          f"must be JavaScript ({', '.join(PREBUILT_SUFFIXES)}); got {entry!r}")
    target = ctx.source / entry
    if not target.is_file():
        raise BuildFailed(f"entry: {entry!r} is not a file of the uploaded source")
    link = ctx.out / BUNDLE
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(os.path.relpath(target, link.parent))
    ctx.log(f"using {entry} as the bundle (--no-bundle: not bundled again)")


NODE = NodeRuntime()
