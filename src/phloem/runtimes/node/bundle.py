"""Bundling a ``nodejs24`` function: npm dependencies, then esbuild into one ES module.

* :func:`find_entry` picks the entry when none is given: ``index.ts``, ``index.mjs``,
  ``index.js``, then the same under ``src/``.
* :func:`install_dependencies` runs ``npm install --omit=dev --ignore-scripts`` for a
  project whose ``package.json`` has dependencies, in a build directory keyed by the hash of
  ``package.json`` and the lockfile (``cache_dir/<key>/node_modules``), built once and
  shared by every deployment with the same dependencies. Install scripts never run.
* :func:`bundle` runs esbuild (``--bundle --platform=node --format=esm --target=node24``)
  with the installed ``node_modules`` on esbuild's ``NODE_PATH``, and a banner giving the
  bundle a ``require`` (``createRequire(import.meta.url)``), so CommonJS dependencies that
  ``require`` Node built-ins work inside an ES module.

Native addons (packages shipping ``.node`` binaries) cannot be bundled: esbuild has no
loader for them. Mark such packages ``external`` (:func:`native_packages` finds them in a
``node_modules``): the bundle keeps ``import``/``require`` of them, and the ``node_modules``
holding them is copied next to the bundle, where Node resolves them at run time. Since
install scripts do not run, only addons with prebuilt binaries in their npm packages (the
usual ``@scope/pkg-linux-x64`` optional dependencies) work; ones that compile with node-gyp
at install time do not.

Limits: ``file:`` and workspace dependencies are not supported (only ``package.json`` and
the lockfile are copied into the build directory), except phloem's own ``substitutes``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from phloem.runtimes.build import (
    DIRECT,
    BuildFailed,
    BuildRunner,
    failure,
    mark_complete,
    tool_mounts,
)
from phloem.runtimes.node.provision import (
    NODE_MAJOR,
    NPM_QUIET,
    ProvisionError,
    npm_package_dir,
    run_npm,
)
from phloem.system.fsutil import make_world_readable
from phloem.system.identity import make_dir

ENTRY_CANDIDATES = ("index.ts", "index.mjs", "index.js",
                    "src/index.ts", "src/index.mjs", "src/index.js")
LOCKFILES = ("npm-shrinkwrap.json", "package-lock.json")
NPM_TIMEOUT_S = 900

#: Gives the ES module bundle a CommonJS ``require`` for dependencies that need one
#: (esbuild's ``__require`` shim calls it for ``require("node:fs")`` and the like).
BANNER = ('import { createRequire as __phloemCreateRequire } from "node:module"; '
          "const require = __phloemCreateRequire(import.meta.url);")

Log = Callable[[str], None]


class BundleError(BuildFailed):
    """The function could not be bundled; the message is esbuild's (or npm's) output."""


class DependencyError(BundleError):
    """``npm install`` of the function's dependencies failed."""


def find_entry(app_dir: Path) -> str:
    """The entry file, relative to ``app_dir`` (posix separators)."""
    for candidate in ENTRY_CANDIDATES:
        if (app_dir / candidate).is_file():
            return candidate
    raise BundleError("entry: none given and none of " + ", ".join(ENTRY_CANDIDATES)
                      + " exists in the function's source")


def read_package_json(app_dir: Path) -> dict[str, Any] | None:
    path = app_dir / "package.json"
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise DependencyError(f"package.json: not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise DependencyError("package.json: must be a JSON object")
    return data


def _runtime_dependencies(package: Mapping[str, Any]) -> dict[str, str]:
    deps: dict[str, str] = {}
    for field in ("dependencies", "optionalDependencies"):
        value = package.get(field) or {}
        if not isinstance(value, dict):
            raise DependencyError(f"package.json: {field} must be an object")
        deps.update({str(k): str(v) for k, v in value.items()})
    return deps


def _tree_digest(root: Path) -> str:
    h = hashlib.sha256()
    for dirpath, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d != "node_modules")
        for name in sorted(files):
            p = Path(dirpath) / name
            h.update(str(p.relative_to(root)).encode() + b"\0" + p.read_bytes())
    return h.hexdigest()


def dependencies_key(app_dir: Path, substitutes: Mapping[str, Path] | None = None) -> str:
    """Cache key of a project's dependency install: Node major, ``package.json``, the
    lockfile and the substituted packages' contents."""
    h = hashlib.sha256(f"node{NODE_MAJOR}\n".encode())
    for name in ("package.json", *LOCKFILES):
        p = app_dir / name
        h.update(name.encode() + b"\0" + (p.read_bytes() if p.is_file() else b"-") + b"\0")
    for name, path in sorted((substitutes or {}).items()):
        h.update(f"{name}={_tree_digest(path)}\n".encode())
    return h.hexdigest()[:24]


def install_dependencies(app_dir: Path, cache_dir: Path, node: Path | None = None,
                         log: Log | None = None,
                         substitutes: Mapping[str, Path] | None = None,
                         runner: BuildRunner = DIRECT) -> Path | None:
    """``npm install`` the runtime dependencies of ``app_dir/package.json`` into
    ``cache_dir/<key>/node_modules`` (once per key) and return that ``node_modules``;
    ``None`` when the project declares no dependencies.

    ``substitutes`` maps package names to local package directories installed instead of
    the registry's (for names npm does not have, e.g. phloem's ``@neon/functions``).
    ``node`` (Node 24) is put first on npm's PATH so ``engines`` are judged against it.
    ``runner`` runs npm (as the build user in a sandbox showing node, npm, the
    substitutes, the build directory and npm's cache; ``node`` is required then).
    """
    say = log or (lambda _line: None)
    package = read_package_json(app_dir)
    if package is None:
        return None
    deps = _runtime_dependencies(package)
    if not deps:
        return None
    used = {k: v for k, v in (substitutes or {}).items() if k in deps}
    key = dependencies_key(app_dir, used)
    target = cache_dir / key
    if (target / ".complete").exists():
        say(f"dependencies: cached node_modules {key}")
        return target / "node_modules"
    make_dir(cache_dir, 0o755)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{key}-", dir=cache_dir))
    try:
        if used:
            for field in ("dependencies", "optionalDependencies"):
                section = package.get(field)
                if isinstance(section, dict):
                    for name, path in used.items():
                        if name in section:
                            section[name] = f"file:{path.resolve()}"
            (tmp / "package.json").write_text(json.dumps(package, indent=2))
        else:
            shutil.copyfile(app_dir / "package.json", tmp / "package.json")
        for name in LOCKFILES:
            if (app_dir / name).is_file():
                lock = (app_dir / name).read_text()
                (tmp / name).write_text(lock_without(lock, used) if used else lock)
        say(f"dependencies: npm install ({len(deps)} packages in package.json)")
        args = ["install", "--omit=dev", "--no-audit", "--no-fund", "--ignore-scripts",
                "--install-links"]
        if runner.sandboxed:
            _sandboxed_npm(runner, args, tmp, node, [p.resolve() for p in used.values()])
        else:
            try:
                run_npm(args, tmp, node, "package.json")
            except ProvisionError as exc:
                raise DependencyError(str(exc)) from None
        runner.reclaim(tmp)
        (tmp / "node_modules").mkdir(exist_ok=True)
        mark_complete(tmp)
        make_world_readable(tmp)
        try:
            tmp.rename(target)
        except OSError:
            if not (target / ".complete").exists():
                shutil.rmtree(target, ignore_errors=True)
                tmp.rename(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target / "node_modules"


def lock_without(lock: str, names: Mapping[str, Path]) -> str:
    """``lock`` (a ``package-lock.json``) without its entries for the substituted
    ``names``: a project installed through ``phloem link``'s registry locks
    ``@neon/functions`` at the registry's version, which npm would fetch from the public
    registry (404) instead of the ``file:`` package.json now names. Unparsable: as is.

        lock_without(text, {"@neon/functions": path})
    """
    try:
        doc = json.loads(lock)
    except ValueError:
        return lock
    if not isinstance(doc, dict):
        return lock
    packages = doc.get("packages")
    if isinstance(packages, dict):
        for key in list(packages):
            if any(key == f"node_modules/{n}" or key.endswith(f"/node_modules/{n}")
                   for n in names):
                del packages[key]
    old = doc.get("dependencies")  # lockfile v1
    if isinstance(old, dict):
        for n in names:
            old.pop(n, None)
    return json.dumps(doc, indent=2) + "\n"


def _sandboxed_npm(runner: BuildRunner, args: list[str], work: Path, node: Path | None,
                   reads: list[Path], timeout: float = NPM_TIMEOUT_S) -> None:
    """``node npm-cli.js args`` in ``work`` as a build step (see ``run_npm``)."""
    if node is None:
        raise DependencyError("package.json: a sandboxed npm install needs the node binary")
    npm = npm_package_dir()
    cache = runner.cache("npm")
    runner.own(work)
    env = runner.env({**NPM_QUIET, "npm_config_cache": str(cache),
                      "PATH": f"{node.parent}:/usr/local/bin:/usr/bin:/bin"})
    try:
        proc = runner.run([node, npm / "bin" / "npm-cli.js", *args], cwd=work, env=env,
                          ro=[*tool_mounts(node), npm, *reads],
                          rw=[work, *([cache] if cache else [])], timeout=timeout)
    except subprocess.TimeoutExpired:
        raise DependencyError(f"package.json: npm {args[0]} timed out after "
                              f"{timeout:.0f} s") from None
    if proc.returncode != 0:
        raise DependencyError(f"package.json: npm {args[0]} failed (exit "
                              f"{proc.returncode}):\n{failure(proc)}")


def _packages(node_modules: Path) -> list[tuple[str, Path]]:
    found: list[tuple[str, Path]] = []
    if not node_modules.is_dir():
        return found
    for child in sorted(node_modules.iterdir()):
        if child.name.startswith("."):
            continue
        if child.name.startswith("@") and child.is_dir():
            found.extend((f"{child.name}/{sub.name}", sub) for sub in sorted(child.iterdir())
                         if sub.is_dir())
        elif child.is_dir():
            found.append((child.name, child))
    return found


def native_packages(node_modules: Path) -> list[str]:
    """Top-level packages in ``node_modules`` that ship native addons (``*.node`` files),
    to be passed to :func:`bundle` as ``external``."""
    names = []
    for name, path in _packages(node_modules):
        for _dirpath, _dirs, files in os.walk(path):
            if any(f.endswith(".node") for f in files):
                names.append(name)
                break
    return names


def _package_dir(name: str, roots: Sequence[Path]) -> Path | None:
    for root in roots:
        if (root / name / "package.json").is_file():
            return root
    return None


def bundle(esbuild: Path, app_dir: Path, entry: str, out_file: Path,
           node_paths: Sequence[Path] = (), *, external: Sequence[str] = (),
           alias: Mapping[str, str] | None = None, log: Log | None = None,
           timeout: float = 300, runner: BuildRunner = DIRECT) -> None:
    """Bundle ``app_dir/entry`` and what it imports into the ES module ``out_file``.

    ``node_paths``: extra ``node_modules`` directories to resolve packages from (the
    output of :func:`install_dependencies`). ``external``: packages left out of the bundle
    (native addons); the ``node_modules`` that holds them is copied next to ``out_file``.
    ``alias``: esbuild ``--alias`` substitutions (``{"@neon/functions": "/path"}``).
    Raises :class:`BundleError` with esbuild's messages (file:line:column) on failure;
    warnings go to ``log``. ``runner`` runs esbuild (as the build user in a sandbox that
    shows only the source, ``node_paths``, the aliased packages and the output
    directory, so an import of anything else, e.g. the platform's secrets, cannot be
    resolved and never reaches the bundle).
    """
    if not (app_dir / entry).is_file():
        raise BundleError(f"entry: {entry} does not exist in the function's source")
    runner.output_dir(out_file.parent)
    cmd = [str(esbuild), entry, "--bundle", "--platform=node", "--format=esm",
           f"--target=node{NODE_MAJOR}", f"--outfile={out_file}", f"--banner:js={BANNER}",
           "--log-level=warning", "--color=false", "--legal-comments=none",
           "--log-limit=20", "--charset=utf8"]
    cmd += [f"--external:{name}" for name in external]
    cmd += [f"--alias:{name}={target}" for name, target in (alias or {}).items()]
    env = {k: v for k, v in runner.env().items() if k != "NODE_PATH"}
    if node_paths:
        env["NODE_PATH"] = os.pathsep.join(str(p) for p in node_paths)
    # What esbuild may read: the source, the dependencies, the substituted packages.
    reads = [app_dir, *node_paths, *(Path(p) for p in (alias or {}).values()),
             *tool_mounts(esbuild)]
    try:
        proc = runner.run(cmd, cwd=app_dir, env=env, ro=reads, rw=[out_file.parent],
                          timeout=timeout)
    except subprocess.TimeoutExpired:
        raise BundleError(f"esbuild: timed out after {timeout:.0f} s") from None
    except OSError as exc:
        raise BundleError(f"esbuild: could not run {esbuild}: {exc}") from None
    finally:
        runner.reclaim(out_file.parent)
    output = (proc.stderr + proc.stdout).strip()
    if proc.returncode != 0:
        message = output or f"esbuild failed with exit code {proc.returncode}"
        if 'No loader is configured for ".node" files' in message:
            message += ("\n\nnative addons (.node files) cannot be bundled: mark the "
                        "package external so it is installed next to the bundle instead")
        raise BundleError(message)
    if output and log is not None:
        log(output)
    if external:
        roots = [app_dir / "node_modules", *node_paths]
        for name in external:
            root = _package_dir(name, roots)
            if root is not None:
                dest = out_file.parent / "node_modules"
                if not dest.exists():
                    shutil.copytree(root, dest, symlinks=True)
                break
