"""Where Python isolates get their code from.

* the **runtime**: uvicorn and what it needs, plus phloem's host and helper modules, copied
  from phloem's own installation into ``runtime/python/<key>`` (no network at start-up);
* a **function environment** per distinct ``requirements.txt``: ``pip install --target``
  into ``envs/python/<sha256 of requirements + Python version>``, built once and shared;
* the **interpreter**: phloem's own when isolates can execute it, else a system Python of
  the same major.minor (as root, isolates cannot reach a virtualenv under ``/root``).

All three are world-readable: they hold public packages, never secrets.
"""

from __future__ import annotations

import hashlib
import importlib.metadata as md
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement

import phloem
from phloem.fsutil import make_world_readable

RUNTIME_DISTRIBUTIONS = ("uvicorn", "httptools", "uvloop", "websockets")

# phloem files an isolate imports; each must import only the standard library and uvicorn.
RUNTIME_MODULES = (
    "__init__.py",
    "functions.py",
    "runtimes/__init__.py",
    "runtimes/python/__init__.py",
    "runtimes/python/host.py",
    "runtimes/python/zygote.py",
    # The zygote's children enter their sandbox themselves.
    "sandbox/__init__.py",
    "sandbox/_linux.py",
    "sandbox/lockdown.py",
    "sandbox/root.py",
    "sandbox/seccomp.py",
)


class EnvironmentError_(RuntimeError):
    """A build step failed; the message is shown to the user."""


def _closure(names: tuple[str, ...]) -> list[md.Distribution]:
    env = {k: str(v) for k, v in default_environment().items()}
    env["extra"] = ""
    seen: dict[str, md.Distribution] = {}
    todo = list(names)
    while todo:
        name = re.sub(r"[-_.]+", "-", todo.pop()).lower()
        if name in seen:
            continue
        try:
            dist = md.distribution(name)
        except md.PackageNotFoundError:
            continue  # optional on this platform (e.g. uvloop on Windows)
        seen[name] = dist
        for req_text in dist.requires or []:
            req = Requirement(req_text)
            if req.marker is None or req.marker.evaluate(env):
                todo.append(req.name)
    return list(seen.values())


def ensure_runtime(base: Path) -> Path:
    """Build (once per content) and return the runtime directory for isolates."""
    package_root = Path(phloem.__file__).parent
    dists = _closure(RUNTIME_DISTRIBUTIONS)
    h = hashlib.sha256(phloem.__version__.encode())
    for rel in RUNTIME_MODULES:
        h.update(rel.encode() + (package_root / rel).read_bytes())
    for d in sorted(dists, key=lambda d: d.metadata["Name"]):
        h.update(f"{d.metadata['Name']}=={d.version}".encode())
    target = base / h.hexdigest()[:16]
    if target.exists():
        return target
    tmp = base / f".tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for dist in dists:
        for f in dist.files or []:
            src = Path(str(dist.locate_file(f)))
            dest = Path(str(f))
            if dest.is_absolute() or ".." in dest.parts or "__pycache__" in dest.parts:
                continue
            if src.is_file():
                (tmp / dest).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src, tmp / dest)
    for rel in RUNTIME_MODULES:
        (tmp / "phloem" / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(package_root / rel, tmp / "phloem" / rel)
    make_world_readable(tmp)
    base.mkdir(parents=True, exist_ok=True)
    os.chmod(base, 0o755)
    try:
        tmp.rename(target)
    except OSError:  # built meanwhile by another process
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def requirements_key(requirements: str) -> str:
    tag = f"{sys.version_info.major}.{sys.version_info.minor}"
    return hashlib.sha256(f"python{tag}\n{requirements}".encode()).hexdigest()[:24]


def ensure_function_env(base: Path, requirements: str,
                        log: Callable[[str], None]) -> Path | None:
    """Install ``requirements`` into a shared, cached target directory. ``None`` when
    there is nothing to install."""
    if not requirements.strip():
        return None
    target = base / requirements_key(requirements)
    if (target / ".complete").exists():
        log(f"dependencies: cached environment {target.name}")
        return target
    base.mkdir(parents=True, exist_ok=True)
    os.chmod(base, 0o755)
    tmp = base / f".tmp-{target.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    req_file = tmp / "requirements.txt"
    req_file.write_text(requirements)
    log("dependencies: pip install -r requirements.txt")
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--disable-pip-version-check",
         "--no-input", "--quiet", "--target", str(tmp / "site"), "-r", str(req_file)],
        capture_output=True, text=True, check=False, timeout=900,
    )
    out = (proc.stdout + proc.stderr).strip()
    out = "\n".join(line for line in out.splitlines() if "is ignored: it is neither" not in line)
    if out:
        log(out)
    if proc.returncode != 0:
        shutil.rmtree(tmp, ignore_errors=True)
        raise EnvironmentError_(f"requirements.txt: pip install failed (exit "
                                f"{proc.returncode}):\n{out[-4000:]}")
    (tmp / ".complete").write_text("")
    make_world_readable(tmp)
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    return target


def env_site(env_dir: Path | None) -> list[str]:
    return [str(env_dir / "site")] if env_dir is not None else []


def find_isolate_python(configured: str | None, as_root: bool) -> str:
    """The interpreter isolates run. As root, phloem's own interpreter usually lives under
    ``/root`` where isolates cannot reach it, so a system Python of the same version is
    used."""
    if configured:
        return configured
    tag = f"{sys.version_info.major}.{sys.version_info.minor}"
    own = os.path.realpath(sys.executable)
    if not as_root or not own.startswith("/root/"):
        return sys.executable
    for candidate in (f"/usr/bin/python{tag}", f"/usr/local/bin/python{tag}"):
        if os.path.exists(candidate):
            return candidate
    raise EnvironmentError_(
        f"isolate_python: phloem's interpreter {own} is under /root, which isolates cannot "
        f"reach, and no /usr/bin/python{tag} exists; install python{tag} or set "
        "PHLOEM_ISOLATE_PYTHON"
    )
