"""Bundling Node functions on the developer's machine, from the project's own
``node_modules`` (as Neon's CLI does), so a deploy uploads bundles and the platform
installs nothing. ``phloem.project.packing`` reaches it through
:mod:`phloem.runtimes.registry`.

    why_not = blocker(root)                                    # None: bundle here
    bundle_here(root, {"api": "src/index.ts"}, out, tools, print)   # out/api/index.mjs
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Mapping
from pathlib import Path

from phloem.runtimes.node.bundle import BundleError, bundle, native_packages
from phloem.runtimes.node.provision import (
    ProvisionError,
    ensure_esbuild,
    ensure_node,
    node_version,
)
from phloem.runtimes.node.runtime import NODE
from phloem.runtimes.node.substitutes import bundle_aliases


class ClientBundleError(Exception):
    """Bundling here failed; the message names the function and carries esbuild's."""


def bundles_here(runtime: str, bundled: bool) -> bool:
    """Whether a function of ``runtime`` (a deployment's runtime name) is one esbuild
    bundles, so that it can be bundled on the developer's machine."""
    return bundled and (runtime in NODE.known_names or runtime in (NODE.name, NODE.family))


def entry_of(slug: str) -> str:
    """Where a function's client-side bundle is in the artifact: its deployed entry."""
    return f"{slug}/index.mjs"


def blocker(root: Path) -> str | None:
    """Why ``root`` is not bundled on this machine (None: it is): it has no
    ``node_modules``, or one with native addons (the platform keeps those next to the
    bundle, which a prebuilt upload cannot)."""
    modules = root / "node_modules"
    if not modules.is_dir():
        return "no node_modules here"
    natives = native_packages(modules)
    if natives:
        return f"node_modules has native addons ({', '.join(natives[:3])})"
    return None


def _node(tools: Path, progress: Callable[[str], None]) -> Path:
    system = shutil.which("node")
    version = node_version(system) if system else None
    if system and version and int(version.split(".")[0]) >= 20:
        return Path(system)
    return ensure_node(tools, progress)


def bundle_here(root: Path, entries: Mapping[str, str], out: Path, tools: Path,
                progress: Callable[[str], None]) -> None:
    """Bundle each ``slug -> entry`` of ``root`` against ``root/node_modules`` into
    ``out/<slug>/index.mjs``; esbuild and (if the machine's is too old) Node come from
    ``tools``. Raises :class:`ClientBundleError`."""
    modules = root / "node_modules"
    try:
        esbuild = ensure_esbuild(tools, _node(tools, progress), progress)
    except ProvisionError as exc:
        raise ClientBundleError(f"bundling: cannot get esbuild: {exc}") from None
    for slug, entry in sorted(entries.items()):
        try:
            bundle(esbuild, root, entry, out / entry_of(slug), [modules],
                   alias=bundle_aliases([modules]), log=progress)
        except BundleError as exc:
            raise ClientBundleError(f"functions.{slug}: bundling {entry} failed:\n{exc}") \
                from None
