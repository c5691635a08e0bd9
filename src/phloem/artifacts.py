"""Content-addressed artifact store: ``artifacts/sha256/<2 hex>/<sha256>.tar.gz``.

Writes go to a temporary file that is fsynced and renamed into place, so a reader sees a
whole artifact or none, and the name always matches the content.

    store = ArtifactStore(paths.artifacts)
    sha = store.put(data, expected_sha256=sha)
    store.path(sha)
"""

from __future__ import annotations

import hashlib
import os
import re
import tarfile
from pathlib import Path

SHA256_RE = re.compile(r"[0-9a-f]{64}")  # with fullmatch: "$" would allow a newline
MAX_ARTIFACT_BYTES = 100 * 1024 * 1024


class ArtifactError(ValueError):
    pass


class ArtifactStore:
    def __init__(self, root: Path) -> None:
        self.root = root

    def path(self, sha256: str) -> Path:
        if not SHA256_RE.fullmatch(sha256):
            raise ArtifactError(f"sha256: must be 64 lowercase hex digits (got {sha256!r})")
        return self.root / "sha256" / sha256[:2] / f"{sha256}.tar.gz"

    def exists(self, sha256: str) -> bool:
        return self.path(sha256).is_file()

    def put(self, data: bytes, expected_sha256: str | None = None) -> str:
        if len(data) > MAX_ARTIFACT_BYTES:
            raise ArtifactError(f"artifact: larger than {MAX_ARTIFACT_BYTES} bytes")
        sha = hashlib.sha256(data).hexdigest()
        if expected_sha256 is not None and sha != expected_sha256:
            raise ArtifactError(
                f"sha256: content hashes to {sha}, not {expected_sha256}"
            )
        dest = self.path(sha)
        if dest.exists():
            return sha
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.chmod(self.root, 0o700)
        tmp = dest.with_suffix(f".tmp{os.getpid()}")
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, dest)
        return sha

    def extract(self, sha256: str, dest: Path) -> None:
        """Unpack safely (no absolute paths, links out of tree or devices)."""
        try:
            with tarfile.open(self.path(sha256), "r:gz") as tar:
                tar.extractall(dest, filter="data")
        except (tarfile.TarError, OSError) as exc:
            raise ArtifactError(f"artifact: cannot unpack: {exc}") from exc
