"""The auth server's files: ``server.mjs`` with Better Auth, kysely and pg, installed once.

``npm ci`` from the lockfile next to this file (exact versions and integrity hashes; no
install scripts, no dev dependencies) into ``<tools>/server-<key>/``, where the key hashes
the lockfile and ``server.mjs``: a new phloem with another lockfile or server installs
beside the old one, and an unchanged one costs nothing. npm's own cache makes a second
install on the same machine (another data dir, a test platform) take seconds.

    root = ensure_auth_server(paths.runtime_tools / "auth", node, progress=log.info)
    # root / "server.mjs", root / "node_modules" / "better-auth" / ...

The tree is made world-readable: the server runs as an unprivileged system user.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

from phloem.runtimes.node.provision import ProvisionError, run_npm
from phloem.system.fsutil import make_world_readable

HERE = Path(__file__).parent
#: The files that define an installation; their hash names its directory.
SOURCES = ("package.json", "package-lock.json", "server.mjs")


def install_key() -> str:
    h = hashlib.sha256()
    for name in SOURCES:
        h.update(name.encode() + b"\0" + (HERE / name).read_bytes() + b"\0")
    return h.hexdigest()[:16]


def ensure_auth_server(tools_dir: Path, node: Path | None,
                       progress: Callable[[str], None] | None = None) -> Path:
    """The directory holding ``server.mjs`` and its ``node_modules``; installs it with
    ``npm ci`` (run on ``node``) the first time. Raises :class:`ProvisionError` with
    npm's output when the install fails."""
    target = tools_dir / f"server-{install_key()}"
    if (target / ".complete").exists():
        return target
    tools_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(tools_dir, 0o755)
    tmp = tools_dir / f".tmp-server-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    started = time.monotonic()
    try:
        for name in SOURCES:
            shutil.copyfile(HERE / name, tmp / name)
        if progress is not None:
            progress("auth: installing Better Auth with npm ci (once)")
        run_npm(["ci", "--omit=dev", "--ignore-scripts", "--no-audit", "--no-fund"], tmp,
                node, "auth server", timeout=600)
        if not (tmp / "node_modules" / "better-auth" / "package.json").is_file():
            raise ProvisionError(f"auth server: npm ci did not install better-auth in {tmp}")
        (tmp / ".complete").write_text("")
        make_world_readable(tmp)
        try:
            tmp.rename(target)
        except OSError:
            if not (target / ".complete").exists():  # else a concurrent install won
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if progress is not None:
        progress(f"auth: Better Auth ready in {target} ({time.monotonic() - started:.1f} s)")
    return target
