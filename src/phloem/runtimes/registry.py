"""The runtimes this phloem offers, by name: the one place that lists them.

    rt = runtime_for("nodejs24")          # exactly what deployments ask for and store
    rt = family_of("python3.13")          # which runtime a name means (any version)
    rt, entry = choose(Path("."), runtime=None, entry=None)   # the CLI's defaults
    spawner = spawners(toolbox, DirectSpawner())              # each runtime's fast spawner

Names a runtime answers to: its exact ``name`` (``python3.11``, stored on deployments),
its ``family`` (``python``, ``node``: the version this platform runs) and, for configs
and the CLI, which may run on another machine than the platform, its ``known_names``.
Functions that name no runtime get the first one listed.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path

from phloem.runtimes.base import Runtime, Toolbox
from phloem.runtimes.node import clientside
from phloem.runtimes.node.runtime import NODE
from phloem.runtimes.python.runtime import PYTHON
from phloem.supervisor.isolate import Spawner
from phloem.system.validation import InvalidInput

#: One line per runtime; the first is the default.
RUNTIMES: tuple[Runtime, ...] = (
    PYTHON,
    NODE,
)


def available() -> list[str]:
    return [rt.name for rt in RUNTIMES]


def runtime_for(name: str | None) -> Runtime:
    """The runtime this machine runs for ``name`` (exact, or a family; ``None``: the
    default), else ``InvalidInput("runtime", ...)`` naming the available ones."""
    if name is None:
        return RUNTIMES[0]
    for rt in RUNTIMES:
        if name in (rt.name, rt.family):
            return rt
    raise InvalidInput("runtime", f"{name!r} is not available here (available: "
                                  f"{', '.join(available())})")


def answers_to(rt: Runtime, name: str) -> bool:
    """Is ``name`` one of ``rt``'s, in any version phloem knows of?"""
    return name in (rt.name, rt.family, *rt.known_names)


def family_of(name: str) -> Runtime:
    """The runtime ``name`` belongs to, also in a version this machine does not run (the
    platform decides whether it does), else ``InvalidInput("runtime", ...)``."""
    for rt in RUNTIMES:
        if answers_to(rt, name):
            return rt
    known = [n for rt in RUNTIMES for n in dict.fromkeys((rt.family, *rt.known_names))]
    raise InvalidInput("runtime", f"{name!r} is not available (known: {', '.join(known)})")


def satisfies(deployed: str, wanted: str) -> bool:
    """Does a deployment on runtime ``deployed`` run what a config asking for ``wanted``
    wants? An exact name must match; a family matches any of its versions."""
    if deployed == wanted:
        return True
    rt = next((r for r in RUNTIMES if r.family == wanted), None)
    return rt is not None and answers_to(rt, deployed)


def runtime_for_source(path: str | Path) -> Runtime | None:
    """The runtime whose functions are written in files like ``path`` (by suffix)."""
    suffix = Path(path).suffix
    return next((rt for rt in RUNTIMES if suffix in rt.source_suffixes), None)


def source_suffixes() -> str:
    """For messages: ``.py (python), .ts, .js... (node)``."""
    return "; ".join(f"{', '.join(rt.source_suffixes)} ({rt.family})" for rt in RUNTIMES)


def _accepts_entry(rt: Runtime, entry: str) -> bool:
    try:
        rt.check_entry(entry)
    except InvalidInput:
        return False
    return True


def choose(source: Path, runtime: str | None, entry: str | None) -> tuple[Runtime, str]:
    """The runtime and entry to deploy the directory ``source`` with: the runtime named
    (any version: the platform checks it runs it), else the first whose entry rules
    ``entry`` follows, else the first that finds a default entry in ``source``; the
    entry given (checked) or that runtime's default. Raises ``InvalidInput``."""
    if runtime is not None:
        rt = family_of(runtime)
    elif entry is not None:
        rt = next((r for r in RUNTIMES if _accepts_entry(r, entry)), RUNTIMES[0])
    else:
        for rt in RUNTIMES:
            found = rt.default_entry(source)
            if found is not None:
                return rt, found
        examples = ", ".join(f"'{r.entry_example}' for {r.family}" for r in RUNTIMES)
        raise InvalidInput("entry", f"required: pass --entry (e.g. {examples}); no runtime "
                                    f"found a default entry in {source}")
    if entry is not None:
        return rt, rt.check_entry(entry)
    found = rt.default_entry(source)
    if found is None:
        raise InvalidInput("entry", f"required: pass --entry, e.g. '{rt.entry_example}' "
                                    f"({source} has no default entry for {rt.name})")
    return rt, found


def spawners(toolbox: Toolbox, fallback: Spawner) -> Spawner:
    """Every runtime's fast spawner in front of the next, in registry order, ending in
    ``fallback``: each serves its own start plans and hands the rest on."""
    spawner = fallback
    for rt in reversed(RUNTIMES):
        spawner = rt.spawner(toolbox, spawner) or spawner
    return spawner


# -- bundling on the developer's machine (Node's esbuild bundles are the only ones) ------
ClientBundleError = clientside.ClientBundleError


def bundles_here(runtime: str, bundled: bool) -> bool:
    """Whether a function of ``runtime`` can be bundled on the developer's machine."""
    return clientside.bundles_here(runtime, bundled)


def client_bundle_blocker(root: Path) -> str | None:
    """Why ``root``'s functions are not bundled here (None: they are)."""
    return clientside.blocker(root)


def client_entry(slug: str) -> str:
    """A client-side bundle's entry in the artifact."""
    return clientside.entry_of(slug)


def bundle_here(root: Path, entries: Mapping[str, str], out: Path, tools: Path,
                progress: Callable[[str], None]) -> None:
    """Bundle ``slug -> entry`` of ``root`` into ``out/<slug>/index.mjs``."""
    clientside.bundle_here(root, entries, out, tools, progress)
