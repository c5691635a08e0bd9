"""Running build steps: unpacking an artifact, ``pip install``, ``npm install``, esbuild.

A build step handles what a function's author controls (the artifact, ``setup.py`` of any
sdist, npm packages, imports esbuild follows), so as root it never runs as root: a
:class:`SandboxRunner` runs each step through the sandbox launcher as the build user
(``Identity.build``), in a sandbox that shows the system directories, exactly the paths
the step reads (read-only) and exactly its output and download cache (writable). The data
dir, its secrets and other functions' files do not exist in there. Builds keep the host's
network (they fetch from package registries).

Without root (``phloem dev``, a platform run as a user) a :class:`BuildRunner` runs steps
as plain processes of the current user.

A step that fails raises :class:`BuildFailed` (or a subclass) with a message for the user.

    runner = SandboxRunner(Identity.build(base), paths.sandbox_root, paths.build_caches)
    out = runner.output_dir(dep_dir / "bundle")
    proc = runner.run([esbuild, "index.ts", f"--outfile={out}/bundle.mjs"], cwd=app,
                      env=runner.env({"NODE_PATH": str(modules)}),
                      ro=[app, modules, esbuild], rw=[out], timeout=300)
    runner.reclaim(out)       # root owns what the step wrote before touching it
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO

from phloem import sandbox
from phloem.runtimes.distributions import closure, copy_distributions
from phloem.sandbox.root import SYSTEM_DIRS
from phloem.system.identity import Identity, make_dir

#: The launcher's /tmp (and /dev/shm) for a build: pip builds wheels there.
BUILD_TMP_MB = 1024

#: Operator settings of the platform's own environment that builds need to reach package
#: registries the way the machine is configured to (proxies, CAs, mirrors).
PASSTHROUGH = ("http_proxy", "https_proxy", "no_proxy", "all_proxy", "HTTP_PROXY",
               "HTTPS_PROXY", "NO_PROXY", "ALL_PROXY", "SSL_CERT_FILE", "SSL_CERT_DIR",
               "REQUESTS_CA_BUNDLE", "NODE_EXTRA_CA_CERTS")
PASSTHROUGH_PREFIXES = ("PIP_", "npm_config_", "NPM_CONFIG_")
#: pip settings that would send its output elsewhere or refuse to run outside a venv.
NOT_PASSED = ("PIP_TARGET", "PIP_PREFIX", "PIP_ROOT", "PIP_USER", "PIP_CACHE_DIR",
              "PIP_REQUIRE_VIRTUALENV", "PIP_NO_CACHE_DIR", "npm_config_cache",
              "NPM_CONFIG_CACHE", "npm_config_prefix", "NPM_CONFIG_PREFIX")


#: What build steps need from phloem's installation: pip, run as the build user.
BUILD_DISTRIBUTIONS = ("pip",)
#: The artifact unpacker (``phloem/runtimes/unpack.py``) in the build-python directory.
UNPACK_SCRIPT = "unpack.py"


class BuildFailed(RuntimeError):
    """A build could not finish; the message is shown to the user (a deployment's error,
    ``phloem dev``'s output)."""


def in_system_dir(path: str) -> bool:
    """Is ``path`` under a directory every sandbox shows (``/usr``, ``/etc``...)?"""
    return any(path == d or path.startswith(d + "/") for d in SYSTEM_DIRS)


def outside_system(dirs: set[Path] | list[Path]) -> list[str]:
    """Those of ``dirs`` a sandbox does not show anyway, sorted."""
    return sorted({str(d) for d in dirs if not in_system_dir(str(d))})


def tool_mounts(executable: str | Path) -> list[Path]:
    """What a sandbox must show for ``executable`` to run: the installation prefix
    (``<prefix>/bin/<name>``) of the path and of what it links to (a virtualenv's
    python), unless they are in system directories, which every sandbox shows."""
    out = []
    for path in (os.path.abspath(executable), os.path.realpath(executable)):
        prefix = Path(path).parent.parent
        if not in_system_dir(path) and prefix not in out:
            out.append(prefix)
    return out


class BuildRunner:
    """Steps as plain processes of the current user with its environment."""

    sandboxed = False
    identity: Identity | None = None

    def env(self, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        return {**os.environ, **(extra or {})}

    def cache(self, tool: str) -> Path | None:
        """The shared download cache for ``tool``; ``None``: the tool's own default."""
        return None

    def output_dir(self, path: Path, mode: int = 0o755) -> Path:
        """Create ``path`` for a step to write into."""
        return make_dir(path, mode)

    def own(self, path: Path) -> None:
        """Hand files root created in an output dir to the step."""

    def reclaim(self, path: Path) -> None:
        """Make root the owner of everything a step left under ``path``."""

    def run(self, argv: Sequence[str | Path], *, cwd: Path, env: Mapping[str, str],
            ro: Sequence[Path | str] = (), rw: Sequence[Path | str] = (),
            timeout: float, stdin: IO[bytes] | int | None = subprocess.DEVNULL,
            ) -> subprocess.CompletedProcess[str]:
        """Run one step; ``ro``/``rw`` are what it reads and writes (the sandbox shows
        only those). Raises ``subprocess.TimeoutExpired`` after ``timeout`` seconds, when
        everything the step started has been killed."""
        return subprocess.run([str(a) for a in argv], cwd=cwd, env=dict(env), stdin=stdin,
                              capture_output=True, text=True, encoding="utf-8",
                              errors="replace", timeout=timeout, check=False)


class SandboxRunner(BuildRunner):
    """Steps in sandboxes as the build user; needs root. With ``namespaces=False``
    (``--no-sandbox``) steps still run as the build user under ``no_new_privs`` and the
    seccomp filter, only without their own mount and PID namespaces: a build never runs
    as root."""

    sandboxed = True

    def __init__(self, identity: Identity, root_dir: Path, caches: Path,
                 tmp_mb: int = BUILD_TMP_MB, *, namespaces: bool = True) -> None:
        self.identity = identity
        self.namespaces = namespaces
        self.root_dir = root_dir
        self.caches = caches
        self.tmp_mb = tmp_mb
        make_dir(root_dir.parent, 0o711)
        make_dir(root_dir, 0o700)

    def env(self, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        """A build's environment: the basics, the operator's registry settings and
        ``extra``; nothing of the function's own env (builds never see it)."""
        env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": "/tmp", "TMPDIR": "/tmp",
               "LANG": "C.UTF-8"}
        for key, value in os.environ.items():
            if (key in PASSTHROUGH or key.startswith(PASSTHROUGH_PREFIXES)) \
                    and key not in NOT_PASSED:
                env[key] = value
        env.update(extra or {})
        return env

    def cache(self, tool: str) -> Path:
        make_dir(self.caches, 0o711)
        assert self.identity is not None
        return make_dir(self.caches / tool, 0o700, self.identity)

    def output_dir(self, path: Path, mode: int = 0o700) -> Path:
        assert self.identity is not None
        return make_dir(path, mode, self.identity)

    def own(self, path: Path) -> None:
        assert self.identity is not None
        _chown_tree(path, self.identity.uid, self.identity.gid)

    def reclaim(self, path: Path) -> None:
        # Once this returns, nothing the build user left (a link planted where root will
        # write next, a setuid bit, which chown clears) can be used against root.
        _chown_tree(path, 0, 0)

    def run(self, argv: Sequence[str | Path], *, cwd: Path, env: Mapping[str, str],
            ro: Sequence[Path | str] = (), rw: Sequence[Path | str] = (),
            timeout: float, stdin: IO[bytes] | int | None = subprocess.DEVNULL,
            ) -> subprocess.CompletedProcess[str]:
        assert self.identity is not None
        job = sandbox.Job(
            argv=[str(a) for a in argv], env=dict(env), cwd=str(cwd),
            uid=self.identity.uid, gid=self.identity.gid,
            sandbox=sandbox.SandboxSpec(
                root_dir=str(self.root_dir), ro=_shown(ro), rw=_unique(rw),
                tmp_mb=self.tmp_mb, cwd=str(cwd)) if self.namespaces else None)
        launcher, job_fd = job.launcher()
        try:
            return subprocess.run(launcher, pass_fds=(job_fd,), env=sandbox.LAUNCHER_ENV,
                                  stdin=stdin, capture_output=True, text=True,
                                  encoding="utf-8", errors="replace", timeout=timeout,
                                  check=False)
        finally:
            os.close(job_fd)


DIRECT = BuildRunner()


def _unique(paths: Sequence[Path | str]) -> list[str]:
    return list(dict.fromkeys(str(p) for p in paths))


def _shown(paths: Sequence[Path | str]) -> list[str]:
    """``paths`` minus those every sandbox shows anyway."""
    return [p for p in _unique(paths) if not in_system_dir(os.path.abspath(p))]


def _chown_tree(root: Path, uid: int, gid: int) -> None:
    """``chown -hR``: links themselves, never what they point to."""
    os.chown(root, uid, gid, follow_symlinks=False)
    for dirpath, dirs, files in os.walk(root):
        for name in (*dirs, *files):
            os.chown(os.path.join(dirpath, name), uid, gid, follow_symlinks=False)


def failure(proc: subprocess.CompletedProcess[str], limit: int = 4000) -> str:
    """The tail of a failed step's output (the launcher's own errors included)."""
    out = (proc.stderr + proc.stdout).strip()
    return out[-limit:] if out else f"exit code {proc.returncode}"


def mark_complete(directory: Path) -> None:
    """Write ``directory/.complete``, the marker of a finished cache entry, as a new
    file (whatever a step left under that name is removed, never written through)."""
    marker = directory / ".complete"
    if os.path.lexists(marker):
        os.unlink(marker)
    os.close(os.open(marker, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644))


def ensure_build_python(base: Path) -> Path:
    """Build (once per content) and return the directory build steps run Python tools
    from: pip (the isolates' interpreter, e.g. Debian's, may have none) and
    ``unpack.py``. World-readable, so the build user can run them."""
    here = Path(__file__).parent
    return copy_distributions(base, closure(BUILD_DISTRIBUTIONS),
                              {UNPACK_SCRIPT: here / "unpack.py"})
