"""The runtime interface: everything that differs between a Python and a Node function.

The deployer, the dev server, the CLI and the project loader ask a :class:`Runtime`
(found by name in :mod:`phloem.runtimes.registry`) and never name one themselves:

    rt = runtime_for("python")                        # the platform's Python, say
    entry = rt.check_entry("main:app")                # InvalidInput("entry", ...) if not
    rt.build(BuildContext(toolbox, source=app, out=dep_dir, entry=entry, log=print))
    plan = rt.isolate(IsolateContext(toolbox, source=app, out=dep_dir, entry=entry,
                                     limits=limits))
    IsolateSpec(command=plan.command, env={**plan.env, ...}, start=plan.start, ...)

A build writes only into its deployment directory (``out``) and the shared caches of its
:class:`Toolbox`; the isolate plan says how to start the function from there: the command
(which a direct spawn runs with ``--fd N --ready-fd M`` appended: the listening socket
and the status pipe on which the host writes ``R`` once ready), the runtime's variables,
what the sandbox must show read-only, and a *start plan* for the fast spawner the runtime
brings (:meth:`Runtime.spawner`), so no spawner has to parse a command line.

A third runtime is one subpackage implementing :class:`Runtime` plus one line in
``phloem.runtimes.registry.RUNTIMES``.
"""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import platformdirs

from phloem.runtimes.build import DIRECT, BuildFailed, BuildRunner, ensure_build_python
from phloem.supervisor.isolate import Spawner
from phloem.system.limits import FunctionLimits
from phloem.system.paths import DataPaths

Log = Callable[[str], None]

__all__ = ["BuildContext", "BuildFailed", "IsolateContext", "IsolatePlan", "KeyedLocks",
           "Log", "Runtime", "Toolbox", "find_isolate_python"]


class KeyedLocks:
    """One lock per key, for builds in concurrent threads that share a cache entry (a
    dependency environment, a toolchain)."""

    def __init__(self) -> None:
        self._guard = threading.Lock()
        self._locks: dict[str, threading.Lock] = {}

    def __call__(self, key: str) -> threading.Lock:
        with self._guard:
            return self._locks.setdefault(key, threading.Lock())


@dataclass
class Toolbox:
    """What runtimes get from whoever runs functions: where they keep what functions share,
    how build steps run, and the Python that unprivileged processes can execute.

    The platform's lives in its data dir (:meth:`for_platform`); ``phloem dev``'s in the
    developer's cache, with builds run directly as the developer (:meth:`for_developer`).
    """

    #: ``<tools>/<family>``: a runtime's toolchain (Node, esbuild) or isolate runtime.
    tools: Path
    #: ``<envs>/<family>``: dependency environments, one per distinct set, shared.
    envs: Path
    #: Runs build steps: in sandboxes as the build user, or directly.
    runner: BuildRunner = DIRECT
    #: The interpreter of phloem's own build steps (the unpacker, pip) and of Python
    #: isolates: one that the build user and the functions' uids can execute.
    python: str = sys.executable
    #: Where pip and the unpacker are copied for sandboxed build steps.
    build_python_dir: Path | None = None
    #: ``phloem dev``: functions run from the developer's working tree, as the developer,
    #: with what the developer has installed (the interpreter's packages, a node_modules).
    developer: bool = False
    locks: KeyedLocks = field(default_factory=KeyedLocks, repr=False)
    _build_python: Path | None = field(default=None, init=False, repr=False)

    @classmethod
    def for_platform(cls, paths: DataPaths, runner: BuildRunner,
                     isolate_python: str | None = None) -> Toolbox:
        """Tools in ``<data dir>/runtime/<family>``, environments in
        ``<data dir>/envs/<family>``; ``isolate_python``: the operator's choice."""
        return cls(tools=paths.runtime_tools, envs=paths.envs, runner=runner,
                   python=find_isolate_python(isolate_python, os.geteuid() == 0),
                   build_python_dir=paths.build_python)

    @classmethod
    def for_developer(cls) -> Toolbox:
        """The user's cache directory; ``PHLOEM_<FAMILY>_TOOLS`` overrides a runtime's
        tools directory (``PHLOEM_NODE_TOOLS`` is also where configs are evaluated)."""
        cache = Path(platformdirs.user_cache_dir("phloem"))
        return cls(tools=cache, envs=cache, developer=True)

    def tools_dir(self, family: str) -> Path:
        if self.developer:
            configured = os.environ.get(f"PHLOEM_{family.upper()}_TOOLS")
            if configured:
                return Path(configured)
        return self.tools / family

    def envs_dir(self, family: str) -> Path:
        # A developer's environments stay next to the tools they were built with.
        if self.developer:
            return self.tools_dir(family) / "dev-deps"
        return self.envs / family

    def build_python(self) -> Path | None:
        """pip and the unpacker for sandboxed build steps (built once); ``None`` when
        steps run directly, with phloem's own interpreter and pip."""
        if not self.runner.sandboxed or self.build_python_dir is None:
            return None
        with self.locks("build-python"):
            if self._build_python is None:
                self._build_python = ensure_build_python(self.build_python_dir)
            return self._build_python


@dataclass(frozen=True)
class BuildContext:
    """One build. ``source`` is the function's code (readable by the build user: the
    unpacked artifact, or the working tree in ``phloem dev``); the build writes only
    below ``out`` (the deployment directory) and into the toolbox's shared caches."""

    toolbox: Toolbox
    source: Path
    out: Path
    #: As deployed (already checked by :meth:`Runtime.check_entry`; may be a default).
    entry: str
    log: Log
    #: False (``--no-bundle``, runtimes that bundle only): ``entry`` is a prebuilt bundle,
    #: run as uploaded.
    bundle: bool = True


@dataclass(frozen=True)
class IsolateContext:
    """A built deployment, to be run as isolates."""

    toolbox: Toolbox
    #: The function's code: the isolate's working directory.
    source: Path
    #: The deployment directory the build wrote into.
    out: Path
    entry: str
    limits: FunctionLimits


@dataclass(frozen=True)
class IsolatePlan:
    """How a runtime starts one isolate of a deployment."""

    #: Runs the host; a direct spawn appends ``--fd N --ready-fd M``.
    command: list[str]
    #: The entry check: imports the app as an isolate would and exits (0: it loads).
    check: list[str]
    #: The runtime's variables; the function's env may override them.
    env: dict[str, str]
    #: What a sandbox must show read-only besides the system directories and the
    #: deployment directory: the interpreter, the host, dependency environments.
    ro: list[str]
    #: For the runtime's own spawner (a zygote, a standby); ``None``: spawned directly.
    start: object | None = None


class Runtime(Protocol):
    """One runtime (see the module docstring). Instances are shared by every platform
    and dev server of the process: state they keep is a cache keyed by directory."""

    #: Names any version of this runtime, and its directories under the toolbox
    #: (``python``, ``node``); functions that ask for it get the platform's version.
    family: str
    #: The exact runtime this phloem runs, stored on deployments (``python3.11``).
    name: str
    #: Exact names a config may ask for, whether or not this machine provides them.
    known_names: tuple[str, ...]
    #: Source files whose functions run on this runtime (``.py``).
    source_suffixes: tuple[str, ...]
    #: A typical entry, for help and error texts (``main:app``).
    entry_example: str
    #: Whether builds bundle the source, so that a prebuilt bundle can be deployed
    #: instead (``BuildContext.bundle`` False).
    bundles: bool
    #: Entry suffixes deployable as they are, without a build step (``bundler: "none"``).
    prebuilt_suffixes: tuple[str, ...]

    def check_entry(self, entry: str) -> str:
        """``entry`` if it is well-formed for this runtime, else ``InvalidInput``."""
        ...

    def default_entry(self, source: Path) -> str | None:
        """The entry to deploy ``source`` (a directory) with when none is given, if it has
        one this runtime recognises (``main.py`` -> ``main:app``)."""
        ...

    def entry_for_source(self, source: str, attr: str | None) -> str:
        """The entry of a config's function: ``source`` is its file relative to the
        project root (posix), ``attr`` what the config names in it (if anything)."""
        ...

    def prepare(self, toolbox: Toolbox, log: Log) -> None:
        """Make the runtime's tools ready (provisioned once); raises ``BuildFailed``."""
        ...

    def build(self, ctx: BuildContext) -> None:
        """Dependencies and bundle into ``ctx.out`` (blocking: run it in a thread);
        raises ``BuildFailed`` with a message for the user."""
        ...

    def isolate(self, ctx: IsolateContext) -> IsolatePlan:
        """How to start an isolate of the deployment a build wrote to ``ctx.out``."""
        ...

    def spawner(self, toolbox: Toolbox, fallback: Spawner) -> Spawner | None:
        """The runtime's fast spawner (started ahead of need, serving the start plans of
        :meth:`isolate`) in front of ``fallback``, which gets everything else; ``None``
        if it has none."""
        ...


def find_isolate_python(configured: str | None, as_root: bool) -> str:
    """The interpreter isolates and build steps run. As root, phloem's own interpreter
    usually lives under ``/root`` where they cannot reach it, so a system Python of the
    same version is used."""
    if configured:
        return configured
    tag = f"{sys.version_info.major}.{sys.version_info.minor}"
    own = os.path.realpath(sys.executable)
    if not as_root or not own.startswith("/root/"):
        return sys.executable
    for candidate in (f"/usr/bin/python{tag}", f"/usr/local/bin/python{tag}"):
        if os.path.exists(candidate):
            return candidate
    raise BuildFailed(
        f"isolate_python: phloem's interpreter {own} is under /root, which isolates cannot "
        f"reach, and no /usr/bin/python{tag} exists; install python{tag} or set "
        "PHLOEM_ISOLATE_PYTHON"
    )
