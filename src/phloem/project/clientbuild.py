"""Where a project's Node functions are bundled: on this machine when the project has
its own ``node_modules`` (as Neon's CLI does), else on the platform (which installs the
dependencies from ``package.json`` and bundles them there).

    built = prepare(client, project, "main", progress=print)
    built.where         # "client" | "platform"
    built.why           # e.g. "esbuild from node_modules, 2 function(s)" / "no node_modules here"
    artifact = built.artifact or pack_project(project)

A client build deploys each function's bundle as prebuilt (``bundle`` false, entry
``<slug>/index.mjs``); :func:`prepare` makes the project's resolver give those for the
branch, so the plan compares (and the apply deploys) what was built.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

from phloem.config import BranchInfo
from phloem.project.client import Client
from phloem.project.packing import bundle_entry, bundle_on_client, client_bundle_blocker
from phloem.project.plan import PlanItem, Project, Resolved, branch_info
from phloem.runtimes.node.runtime import NODE
from phloem.runtimes.registry import answers_to


@dataclass(frozen=True)
class ClientBuild:
    #: ``client`` (bundled here) or ``platform`` (the source is uploaded and built there).
    where: str
    why: str
    artifact: tuple[bytes, str] | None = None


def prepare(client: Client, project: Project, branch: str, new_branch: bool = False,
            progress: Callable[[str], None] = lambda _line: None) -> ClientBuild:
    """Bundle ``project``'s functions here if it can be (see the module docstring)."""
    blocker = client_bundle_blocker(project.root)
    if blocker is not None:
        return ClientBuild("platform", blocker)
    info = branch_info(client.get_branch(branch), exists=not new_branch)
    resolved = project.resolve(info)
    functions = resolved.functions
    others = sorted(slug for slug, fn in functions.items()
                    if not fn.bundle or not answers_to(NODE, fn.runtime))
    if not functions or others:
        _answer(project, info, resolved)  # the plan evaluates the config once, not twice
        return ClientBuild("platform", "not all functions are Node functions esbuild "
                                       f"bundles ({', '.join(others) or 'none declared'})")
    artifact = bundle_on_client(project.root, {s: f.entry for s, f in functions.items()},
                                progress)
    # replace(): the rest of what the config said (services, domain notes) stays.
    _answer(project, info, replace(resolved, functions={
        slug: replace(fn, entry=bundle_entry(slug), bundle=False)
        for slug, fn in functions.items()}))
    return ClientBuild("client", f"esbuild from node_modules, {len(functions)} "
                                 "function(s)", artifact)


def _answer(project: Project, info: BranchInfo, resolved: Resolved) -> None:
    """Make ``project`` resolve ``info`` to ``resolved`` from now on."""
    original = project.resolver

    def resolver(b: BranchInfo) -> Resolved:
        return resolved if b == info else original(b)

    project.resolver = resolver


#: What the plan says of a bundle flag that changed only because of where it was built.
_BUNDLE_REASONS = {"bundler esbuild -> none": "bundled here now (was on the platform)",
                   "bundler none -> esbuild": "bundled on the platform now (was here)"}


def explain(items: list[PlanItem], built: ClientBuild) -> None:
    """Word the plan's bundle-flag change as the move between client and platform that it
    is (the flag is how a client bundle is deployed, not a neon.ts ``bundler``)."""
    if built.where != "client":
        return
    for item in items:
        item.reasons = [_BUNDLE_REASONS.get(r, r) for r in item.reasons]
