"""Content-addressed artifact store: ``artifacts/sha256/<2 hex>/<sha256>.tar.gz``.

Uploads stream into a temporary file under ``artifacts/tmp/`` (same filesystem), hashed
as they arrive; the file is fsynced and renamed into place only when the content hashes
to its name, so a reader sees a whole artifact or none, and the name always matches the
content. A failed upload (bad hash, too large, disk full) removes its temporary file.
Every method does blocking file I/O: the API calls them from a worker thread.

    store = ArtifactStore(paths.artifacts)
    upload = store.begin(expected_sha256=sha)
    try:
        for chunk in chunks:
            upload.write(chunk)
        sha = upload.commit()
    finally:
        upload.abort()            # no-op after a commit
    store.path(sha)
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
import shutil
import tarfile
import tempfile
import threading
from pathlib import Path

SHA256_RE = re.compile(r"[0-9a-f]{64}")  # with fullmatch: "$" would allow a newline
#: Largest artifact (a packed project); ``pack_directory`` refuses more on the client.
MAX_ARTIFACT_BYTES = 100 * 1024 * 1024
#: errnos that mean "no room": the API answers 507 for them.
NO_SPACE_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


class ArtifactError(ValueError):
    pass


class ArtifactTooLarge(ArtifactError):
    pass


class HashMismatch(ArtifactError):
    pass


class NoSpace(ArtifactError):
    """The artifact store's filesystem is full (or the quota is used up)."""


class Upload:
    """One artifact being written: ``write`` chunks, then ``commit`` or ``abort``."""

    def __init__(self, store: ArtifactStore, expected_sha256: str | None,
                 max_bytes: int) -> None:
        self.store = store
        self.expected = expected_sha256
        self.max_bytes = max_bytes
        self.size = 0
        self._hash = hashlib.sha256()
        self._done = False
        # A cancelled request may abort while a worker thread still writes a chunk.
        self._lock = threading.Lock()
        try:
            store.tmp.mkdir(parents=True, exist_ok=True)
            os.chmod(store.root, 0o700)
            fd, name = tempfile.mkstemp(dir=store.tmp, prefix="upload-", suffix=".part")
        except OSError as exc:
            raise _storage_error(exc) from None
        self.tmp_path = Path(name)
        self._file = os.fdopen(fd, "wb")

    def write(self, chunk: bytes) -> None:
        with self._lock:
            self._write(chunk)

    def _write(self, chunk: bytes) -> None:
        if self._done:
            raise ArtifactError("artifact: upload already finished")
        self.size += len(chunk)
        if self.size > self.max_bytes:
            raise ArtifactTooLarge(f"artifact: larger than {self.max_bytes} bytes")
        self._hash.update(chunk)
        try:
            self._file.write(chunk)
        except OSError as exc:
            raise _storage_error(exc) from None

    def commit(self) -> str:
        """Check the hash, make the content durable and move it into place."""
        with self._lock:
            return self._commit()

    def _commit(self) -> str:
        if self._done:
            raise ArtifactError("artifact: upload already finished")
        sha = self._hash.hexdigest()
        dest = self.store.path(sha)
        try:
            if self.expected is not None and sha != self.expected:
                raise HashMismatch(f"sha256: content hashes to {sha}, not {self.expected}")
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            if not dest.exists():
                dest.parent.mkdir(parents=True, exist_ok=True)
                os.replace(self.tmp_path, dest)
                _fsync_dir(dest.parent)
        except OSError as exc:
            raise _storage_error(exc) from None
        finally:
            self._abort()
        return sha

    def abort(self) -> None:
        """Drop the temporary file (after a commit, only what a lost rename race left)."""
        with self._lock:
            self._abort()

    def _abort(self) -> None:
        if self._done:
            return
        self._done = True
        with contextlib.suppress(OSError):  # flushing what is left can hit a full disk
            self._file.close()
        self.tmp_path.unlink(missing_ok=True)


class ArtifactStore:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.tmp = root / "tmp"

    def path(self, sha256: str) -> Path:
        if not SHA256_RE.fullmatch(sha256):
            raise ArtifactError(f"sha256: must be 64 lowercase hex digits (got {sha256!r})")
        return self.root / "sha256" / sha256[:2] / f"{sha256}.tar.gz"

    def exists(self, sha256: str) -> bool:
        return self.path(sha256).is_file()

    def sweep(self) -> None:
        """Remove uploads a killed platform left half-written (at start, before serving)."""
        shutil.rmtree(self.tmp, ignore_errors=True)

    def begin(self, expected_sha256: str | None = None,
              max_bytes: int = MAX_ARTIFACT_BYTES) -> Upload:
        if expected_sha256 is not None:
            self.path(expected_sha256)  # a malformed name fails before any byte is stored
        return Upload(self, expected_sha256, max_bytes)

    def put(self, data: bytes, expected_sha256: str | None = None) -> str:
        """Store ``data`` in one call (tests, small artifacts)."""
        upload = self.begin(expected_sha256)
        try:
            upload.write(data)
            return upload.commit()
        finally:
            upload.abort()

    def extract(self, sha256: str, dest: Path) -> None:
        """Unpack safely (no absolute paths, links out of tree or devices)."""
        try:
            with tarfile.open(self.path(sha256), "r:gz") as tar:
                tar.extractall(dest, filter="data")
        except (tarfile.TarError, OSError) as exc:
            raise ArtifactError(f"artifact: cannot unpack: {exc}") from exc


def _storage_error(exc: OSError) -> Exception:
    if exc.errno in NO_SPACE_ERRNOS:
        return NoSpace(f"artifact store: no space left on the device ({exc.strerror}); "
                       "free space in the data dir's artifacts directory")
    return exc


def _fsync_dir(path: Path) -> None:
    # The rename is durable only once the directory entry is.
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
