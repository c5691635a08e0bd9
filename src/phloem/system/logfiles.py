"""Log files that rotate by size: ``x.log`` grows to ``rotate_bytes``, then becomes
``x.log.1`` (the newest of the ``keep`` older files; ``x.log.<keep>`` is dropped). Function
logs (``phloem.control.logs.FunctionLogs``) and the services' own logs (the auth server's
``auth.log``) rotate the same way, with the same defaults.

    log = RotatingFile(directory / "auth.log")
    log.write("2026-11-26T10:00:00.123Z [neon-auth] verification link {...}\\n")
    log.close()
"""

from __future__ import annotations

import os
import time
from pathlib import Path

#: A log file's size before it rotates, and how many older files are kept.
ROTATE_BYTES = 10 * 2**20
KEEP = 3


def rotate(path: Path, keep: int) -> None:
    """``path`` becomes ``path.1``, ``path.1`` becomes ``path.2`` ... up to ``keep``
    (the oldest goes). The caller has closed ``path`` and opens it afresh after."""
    for n in range(keep, 0, -1):
        older = path.with_name(f"{path.name}.{n}")
        if n == keep:
            older.unlink(missing_ok=True)
        elif older.exists():
            older.rename(path.with_name(f"{path.name}.{n + 1}"))
    path.rename(path.with_name(f"{path.name}.1"))


def timestamp() -> str:
    """``2026-11-26T10:00:00.123Z`` (UTC, milliseconds truncated), as log lines start."""
    ms = time.time_ns() // 1_000_000
    second, millis = divmod(ms, 1000)
    return f"{time.strftime('%Y-%m-%dT%H:%M:%S', time.gmtime(second))}.{millis:03d}Z"


class RotatingFile:
    """Appends (unbuffered: each write reaches the file, for readers that tail it) and
    rotates once the file passes ``rotate_bytes``; created with ``mode``."""

    def __init__(self, path: Path, rotate_bytes: int = ROTATE_BYTES, keep: int = KEEP,
                 mode: int = 0o600) -> None:
        if rotate_bytes < 1 or keep < 1:
            raise ValueError(f"{path}: rotate_bytes and keep must be at least 1")
        self.path, self.rotate_bytes, self.keep, self.mode = path, rotate_bytes, keep, mode
        self._fd: int | None = None
        self._size = 0

    def write(self, text: str) -> None:
        if self._fd is None:
            self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, self.mode)
            self._size = os.fstat(self._fd).st_size
        data = text.encode(errors="replace")
        while data:  # a short write is rare on a regular file, but possible
            n = os.write(self._fd, data)
            data = data[n:]
            self._size += n
        if self._size > self.rotate_bytes:
            self.close()
            rotate(self.path, self.keep)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
