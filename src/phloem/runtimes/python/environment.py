"""Where Python isolates get their code from.

* the **runtime**: uvicorn and what it needs, plus phloem's host and helper modules, copied
  from phloem's own installation into ``runtime/python/<key>`` (no network at start-up);
* a **function environment** per distinct ``requirements.txt``: ``pip install --target``
  into ``envs/python/<sha256 of requirements + Python version>``, built once and shared,
  by the build user in a sandbox (``phloem.runtimes.build``) with the pip copied into
  ``runtime/build-python/<key>``.

The interpreter isolates run is the toolbox's (``phloem.runtimes.base.find_isolate_python``).
All are world-readable: they hold public packages, never secrets.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import phloem
from phloem.runtimes.build import (
    DIRECT,
    BuildFailed,
    BuildRunner,
    mark_complete,
    tool_mounts,
)
from phloem.runtimes.distributions import closure, copy_distributions
from phloem.system.fsutil import make_world_readable
from phloem.system.identity import make_dir

RUNTIME_DISTRIBUTIONS = ("uvicorn", "httptools", "uvloop", "websockets")
PIP_TIMEOUT_S = 900

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


class EnvironmentError_(BuildFailed):
    """A build step failed; the message is shown to the user."""


def ensure_runtime(base: Path) -> Path:
    """Build (once per content) and return the runtime directory for isolates."""
    package_root = Path(phloem.__file__).parent
    return copy_distributions(base, closure(RUNTIME_DISTRIBUTIONS),
                              {f"phloem/{rel}": package_root / rel for rel in RUNTIME_MODULES})


#: Requirement lines that name files of the function's source, resolved against it:
#: ``./pkg``, ``/abs``, ``file:``, ``name @ file:...``, ``-r``/``-c`` includes, ``-e``,
#: ``-f`` (find-links).
_SOURCE_REFERENCE = re.compile(
    r"^\s*(?:-[rcef]\b|--(?:requirement|constraint|editable|find-links)\b|\.|/|file:)"
    r"|@\s*file:", re.MULTILINE)


def references_source(requirements: str) -> bool:
    return bool(_SOURCE_REFERENCE.search(requirements))


def _tree_digest(root: Path) -> str:
    h = hashlib.sha256()
    for dirpath, dirs, files in os.walk(root):
        dirs.sort()
        for name in sorted(files):
            p = Path(dirpath) / name
            h.update(str(p.relative_to(root)).encode() + b"\0")
            h.update(os.readlink(p).encode() if p.is_symlink() else p.read_bytes())
    return h.hexdigest()


def requirements_key(requirements: str, source: Path | None = None) -> str:
    """Cache key of an environment: the Python version and the requirements, plus the
    contents of ``source`` when the requirements refer to files in it."""
    tag = f"{sys.version_info.major}.{sys.version_info.minor}"
    h = hashlib.sha256(f"python{tag}\n{requirements}".encode())
    if source is not None and references_source(requirements):
        h.update(b"\0source\0" + _tree_digest(source).encode())
    return h.hexdigest()[:24]


@dataclass(frozen=True)
class Pip:
    """``python -m pip``; with ``path`` (from ``phloem.runtimes.build``'s
    ``ensure_build_python``) the pip found there, not the interpreter's own."""

    python: str
    path: Path | None = None

    def argv(self, *args: str) -> list[str]:
        flags = ["-s"] if self.path is not None else []
        return [self.python, *flags, "-m", "pip", *args]

    def mounts(self) -> list[Path]:
        return [*tool_mounts(self.python), *([self.path] if self.path else [])]


def ensure_function_env(base: Path, requirements: str, log: Callable[[str], None], *,
                        source: Path | None = None, runner: BuildRunner = DIRECT,
                        pip: Pip | None = None) -> Path | None:
    """Install ``requirements`` into a shared, cached target directory. ``None`` when
    there is nothing to install.

    ``source`` (the function's unpacked code) is where paths in the requirements
    resolve; pip then works in a copy of it. ``runner`` runs pip (as the build user in a
    sandbox showing only pip, that copy, the output and the pip cache); ``pip`` says
    which pip (default: phloem's own interpreter's)."""
    if not requirements.strip():
        return None
    key = requirements_key(requirements, source)
    target = base / key
    if (target / ".complete").exists():
        log(f"dependencies: cached environment {target.name}")
        return target
    make_dir(base, 0o755)
    pip = pip or Pip(sys.executable)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{key}-", dir=base))
    try:
        work = tmp
        if source is not None and references_source(requirements):
            work = tmp / "src"
            shutil.copytree(source, work, symlinks=True)
        else:
            (tmp / "requirements.txt").write_text(requirements)
        runner.own(tmp)
        cache = runner.cache("pip")
        extra = {"PYTHONNOUSERSITE": "1"} if runner.sandboxed else {}
        if pip.path is not None:
            extra["PYTHONPATH"] = str(pip.path)
        if cache is not None:
            extra["PIP_CACHE_DIR"] = str(cache)
        log("dependencies: pip install -r requirements.txt")
        try:
            proc = runner.run(
                pip.argv("install", "--disable-pip-version-check", "--no-input", "--quiet",
                         "--target", str(tmp / "site"), "-r", "requirements.txt"),
                cwd=work, env=runner.env(extra), ro=pip.mounts(),
                rw=[tmp, *([cache] if cache else [])], timeout=PIP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            raise EnvironmentError_(f"requirements.txt: pip install took longer than "
                                    f"{PIP_TIMEOUT_S} s") from None
        runner.reclaim(tmp)
        out = (proc.stdout + proc.stderr).strip()
        out = "\n".join(line for line in out.splitlines()
                        if "is ignored: it is neither" not in line)
        if out:
            log(out)
        if proc.returncode != 0:
            raise EnvironmentError_(f"requirements.txt: pip install failed (exit "
                                    f"{proc.returncode}):\n{out[-4000:]}")
        if work != tmp:
            shutil.rmtree(work)
        mark_complete(tmp)
        make_world_readable(tmp)
        shutil.rmtree(target, ignore_errors=True)
        tmp.rename(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
