"""The data directory's layout, in one place.

Modes matter: when phloem runs as root, the service user (PostgreSQL) and isolates (one
uid per function) must reach only what is theirs. The root of the data dir is 0711 so
they can traverse to the paths they are given but list nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class DataPaths:
    root: Path

    @property
    def credentials(self) -> Path:
        return self.root / "credentials.json"

    @property
    def secrets(self) -> Path:
        return self.root / "secrets"

    @property
    def pginstall(self) -> Path:
        return self.root / "pginstall"

    @property
    def system_pgdata(self) -> Path:
        return self.root / "system" / "pgdata"

    @property
    def run(self) -> Path:
        return self.root / "run"

    @property
    def pg_sockets(self) -> Path:
        """``<cluster>/``: each cluster's Unix socket directory."""
        return self.run / "pg"

    def pg_socket_dir(self, cluster: str) -> Path:
        return self.pg_sockets / cluster

    @property
    def isolate_sockets(self) -> Path:
        return self.run / "isolates"

    @property
    def sandbox_root(self) -> Path:
        """An empty directory (root's, 0700) on which sandboxes build their root."""
        return self.run / "sandbox"

    def branch_dir(self, branch_id: str) -> Path:
        return self.root / "branches" / branch_id

    def branch_pgdata(self, branch_id: str) -> Path:
        return self.branch_dir(branch_id) / "pgdata"

    @property
    def artifacts(self) -> Path:
        return self.root / "artifacts"

    @property
    def deployments(self) -> Path:
        return self.root / "deployments"

    def deployment_dir(self, deployment_id: str) -> Path:
        return self.deployments / deployment_id

    @property
    def runtime_tools(self) -> Path:
        """``<family>/``: each runtime's toolchain or isolate runtime (world-readable)."""
        return self.root / "runtime"

    @property
    def build_python(self) -> Path:
        """pip (and the unpack step) for build steps, readable by the build user."""
        return self.runtime_tools / "build-python"

    @property
    def envs(self) -> Path:
        """``<family>/<key>``: dependency environments shared by deployments."""
        return self.root / "envs"

    @property
    def build_caches(self) -> Path:
        """Download caches shared by all builds (``pip``, ``npm``), the build user's."""
        return self.root / "cache"

    def home(self, uid: int) -> Path:
        return self.root / "homes" / str(uid)

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    def function_log(self, branch_id: str, slug: str) -> Path:
        return self.logs / branch_id / f"{slug}.log"

    @property
    def lock(self) -> Path:
        return self.run / "phloem.lock"
