"""``neon.ts``: the config file of a Node project, in Neon's shape, read by phloem.

    # neon.ts
    import { defineConfig } from "@neon/config/v1";     // or @phloem/config
    export default defineConfig({
      functions: { todos: { name: "todo api", source: "src/index.ts" } },
      branch: (branch) => ({ functions: { todos: { env: { MODE: branch.name } } } }),
    });

It is code, so phloem runs it: esbuild bundles it (TypeScript, and whatever it imports)
and Node evaluates it for the branch being planned, calling the ``branch`` closure with
that branch. ``@neon/config`` and ``@neondatabase/config`` are the project's own when it
has installed them (``node_modules/@neon/config``), so exactly what that version's
``defineConfig`` accepts is accepted; when it has not, and for ``@phloem/config`` always,
they resolve to phloem's own ``defineConfig``, so evaluating needs no ``npm install``. The process
environment is the CLI's (after ``--env FILE``), so ``process.env.X`` in the config works.

    raw = evaluate(Path("neon.ts"), {"name": "main", "id": "br-…", "exists": True, ...})
    raw["functions"], raw["tuning"], raw["unsupported"], raw["refused"], raw["triggers"]

A config that enables a service phloem does not have (Neon Auth, the Data API, object
storage and its triggers, the AI Gateway) is refused by the caller with the services named:
the function's ``parseEnv`` would demand their variables at start-up; keys phloem does not
honour (``experimental.hooks``, a top-level ``customDomains``) are refused by name with the
reason. A function's ``customDomains`` (and the branch closure's) are custom domains
(``phloem.project.domains``).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import platformdirs

from phloem.runtimes.node.provision import (
    ProvisionError,
    ensure_esbuild,
    ensure_node,
    node_version,
)
from phloem.runtimes.node.substitutes import package_dir

NEON_CONFIG_FILES = ("neon.ts", "neon.mts", "neon.js", "neon.mjs")
EVALUATOR = Path(__file__).parent.parent / "runtimes" / "node" / "evalconfig.mjs"
#: Config packages that resolve to phloem's defineConfig while evaluating: the first two
#: only when the project has not installed them.
CONFIG_ALIASES = ("@neon/config", "@neondatabase/config", "@phloem/config")
#: Always phloem's: not on the registry.
OWN_CONFIG = "@phloem/config"


class NeonConfigError(ValueError):
    """The config could not be bundled or evaluated; the message says why."""


def find_neon_config(root: Path) -> Path | None:
    for name in NEON_CONFIG_FILES:
        if (root / name).is_file():
            return root / name
    return None


def tools_dir() -> Path:
    """Where the CLI keeps Node and esbuild for evaluating configs: ``PHLOEM_NODE_TOOLS``,
    else the user's cache directory."""
    configured = os.environ.get("PHLOEM_NODE_TOOLS")
    if configured:
        return Path(configured)
    return Path(platformdirs.user_cache_dir("phloem")) / "node"


def _node(progress: Any) -> Path:
    # Any Node from 20 on evaluates a config; prefer the machine's over a download.
    system = shutil.which("node")
    if system:
        version = node_version(system)
        if version and int(version.split(".")[0]) >= 20:
            return Path(system)
    return ensure_node(tools_dir(), progress)


def config_aliases(root: Path) -> list[str]:
    """The config package names phloem's ``defineConfig`` stands in for in ``root``: those
    the project has not installed in a ``node_modules`` of ``root`` or above."""
    installed = {name for name in CONFIG_ALIASES if name != OWN_CONFIG and any(
        (d / "node_modules" / name / "package.json").is_file()
        for d in (root, *root.parents))}
    return [name for name in CONFIG_ALIASES if name not in installed]


def evaluate(config_path: Path, target: dict[str, Any],
             progress: Any = None, timeout: float = 60) -> dict[str, Any]:
    """Bundle and run ``config_path`` for the branch ``target`` (``name``, ``id``,
    ``exists``, ``parentId``, ``isDefault``, ``isProtected``, ``expiresAt``); returns the
    evaluator's JSON (see evalconfig.mjs)."""
    say = progress or (lambda _line: None)
    root = config_path.parent
    try:
        node = _node(say)
        esbuild = ensure_esbuild(tools_dir(), node, say)
    except ProvisionError as exc:
        raise NeonConfigError(f"cannot get Node/esbuild to evaluate it: {exc}") from None
    with tempfile.TemporaryDirectory(prefix="phloem-neon-") as tmp:
        out = Path(tmp) / "neon.config.mjs"
        cmd = [str(esbuild), config_path.name, "--bundle", "--platform=node",
               "--format=esm", "--target=node20", f"--outfile={out}", "--log-level=error",
               "--color=false", "--packages=bundle"]
        cmd += [f"--alias:{name}={package_dir('config')}" for name in config_aliases(root)]
        env = {k: v for k, v in os.environ.items() if k != "NODE_PATH"}
        try:
            built = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True,
                                   timeout=timeout, check=False, stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            raise NeonConfigError(f"bundling it took longer than {timeout:.0f} s") from None
        if built.returncode != 0:
            raise NeonConfigError("esbuild could not bundle it:\n"
                                  + (built.stderr + built.stdout).strip())
        try:
            ran = subprocess.run([str(node), str(EVALUATOR), str(out), json.dumps(target)],
                                 cwd=root, env=env, capture_output=True, text=True,
                                 timeout=timeout, check=False, stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            raise NeonConfigError(f"evaluating it took longer than {timeout:.0f} s "
                                  "(does it wait on something?)") from None
    if ran.returncode != 0:
        raise NeonConfigError((ran.stderr or ran.stdout).strip()
                              or f"node exited with {ran.returncode}")
    try:
        data: dict[str, Any] = json.loads(ran.stdout)
    except ValueError:
        raise NeonConfigError(f"the evaluator printed no JSON: {ran.stdout[:300]!r}") from None
    return data
