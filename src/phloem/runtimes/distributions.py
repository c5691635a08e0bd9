"""Copies of installed distributions (and of phloem's own files) into directories that
unprivileged processes use: the Python isolates' runtime, the build steps' pip.

    dists = closure(("uvicorn",))                     # uvicorn and what it requires here
    target = copy_distributions(base, dists, {"phloem/x.py": source_path})

A directory is named by the hash of what it holds, so it is built once per content and
shared; everything in it is world-readable (public packages, never secrets).
"""

from __future__ import annotations

import hashlib
import importlib.metadata as md
import os
import re
import shutil
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement

import phloem
from phloem.system.fsutil import make_world_readable


def closure(names: tuple[str, ...]) -> list[md.Distribution]:
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


def copy_distributions(base: Path, dists: list[md.Distribution],
                        files: dict[str, Path]) -> Path:
    """``base/<hash of the contents>/`` holding ``dists`` and ``files`` (destination ->
    source), built once and world-readable."""
    h = hashlib.sha256(phloem.__version__.encode())
    for rel, src in sorted(files.items()):
        h.update(rel.encode() + src.read_bytes())
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
    for rel, src in files.items():
        (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, tmp / rel)
    make_world_readable(tmp)
    base.mkdir(parents=True, exist_ok=True)
    os.chmod(base, 0o755)
    try:
        tmp.rename(target)
    except OSError:  # built meanwhile by another process
        shutil.rmtree(tmp, ignore_errors=True)
    return target
