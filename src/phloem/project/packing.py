"""Pack a function's source directory into a reproducible tar.gz.

The same files give the same bytes (sorted entries, zeroed times and owners), so the
artifact's sha256 identifies the source and unchanged code is never uploaded twice.
``.gitignore`` files are honoured, along with a few always-ignored paths.

    data, sha256 = pack_directory(Path("examples/hello-python"))

A Node project with its own ``node_modules`` is bundled here instead, as Neon's CLI does:
each function's entry with phloem's esbuild (the same command, aliases and pinned version
as a build on the platform) into ``<slug>/index.mjs``, and only those bundles are packed
and deployed as prebuilt. The platform then needs no registry to install anything.

    why_not = registry.client_bundle_blocker(root)   # None: bundle here
    data, sha256 = bundle_on_client(root, {"api": "src/index.ts"}, print)
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import tarfile
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pathspec

from phloem.project.neon import tools_dir
from phloem.runtimes.registry import ClientBundleError, bundle_here, client_entry

ALWAYS_IGNORED = [".git/", "__pycache__/", "*.pyc", ".venv/", "venv/", ".mypy_cache/",
                  ".pytest_cache/", ".ruff_cache/", ".DS_Store", ".env", ".env.*",
                  ".phloem/", "node_modules/"]


class PackError(ValueError):
    pass


def _spec_for(directory: Path, extra: list[str]) -> pathspec.PathSpec[Any]:
    lines = [*ALWAYS_IGNORED, *extra]
    gitignore = directory / ".gitignore"
    if gitignore.is_file():
        lines += gitignore.read_text().splitlines()
    return pathspec.PathSpec.from_lines("gitignore", lines)


def list_files(directory: Path, ignore: list[str] | None = None) -> list[str]:
    spec = _spec_for(directory, ignore or [])
    out: list[str] = []
    for dirpath, dirnames, filenames in os.walk(directory):
        rel_dir = os.path.relpath(dirpath, directory)
        rel_dir = "" if rel_dir == "." else rel_dir + "/"
        dirnames[:] = sorted(d for d in dirnames if not spec.match_file(rel_dir + d + "/"))
        for name in sorted(filenames):
            rel = rel_dir + name
            if not spec.match_file(rel) and not os.path.islink(os.path.join(dirpath, name)):
                out.append(rel)
    return sorted(out)


def pack_path(path: Path, max_bytes: int = 100 * 1024 * 1024) -> tuple[bytes, str]:
    """A directory as :func:`pack_directory` packs it, or one file (a prebuilt bundle)
    alone, under its own name."""
    if path.is_file():
        return _pack(path.parent, [path.name], max_bytes)
    return pack_directory(path, max_bytes)


def pack_directory(directory: Path, max_bytes: int = 100 * 1024 * 1024,
                   ignore: list[str] | None = None) -> tuple[bytes, str]:
    """``ignore``: more gitignore-style patterns (e.g. the project's config file)."""
    if not directory.is_dir():
        raise PackError(f"path: {directory} is not a directory")
    return _pack(directory, list_files(directory, ignore), max_bytes)


def _pack(directory: Path, files: list[str], max_bytes: int) -> tuple[bytes, str]:
    buf = io.BytesIO()
    with gzip.GzipFile(fileobj=buf, mode="wb", mtime=0, compresslevel=6) as gz, \
            tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for rel in files:
            path = directory / rel
            info = tarfile.TarInfo(rel)
            info.size = path.stat().st_size
            info.mode = 0o755 if os.access(path, os.X_OK) else 0o644
            info.mtime = 0
            with open(path, "rb") as f:
                tar.addfile(info, f)
            if buf.tell() > max_bytes:
                raise PackError(f"path: {directory} packs to more than {max_bytes} bytes")
    data = buf.getvalue()
    return data, hashlib.sha256(data).hexdigest()


def bundle_on_client(root: Path, entries: Mapping[str, str],
                     progress: Callable[[str], None],
                     max_bytes: int = 100 * 1024 * 1024) -> tuple[bytes, str]:
    """Bundle each ``slug -> entry`` of ``root`` here (``registry.bundle_here``) and pack
    the bundles alone; raises :class:`PackError` with esbuild's messages."""
    with tempfile.TemporaryDirectory(prefix="phloem-bundle-") as tmp:
        out = Path(tmp)
        try:
            bundle_here(root, entries, out, tools_dir(), progress)
        except ClientBundleError as exc:
            raise PackError(str(exc)) from None
        return _pack(out, [client_entry(slug) for slug in sorted(entries)], max_bytes)
