"""Function logs: one append-only file per function and branch, a line per event.

    2026-11-26T10:00:00.123Z iso-1a2b3c4d stdout hello
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TextIO

from phloem.supervisor.isolate import IsolateSpec, LogWriter


class FunctionLogs:
    """Buffered appends (a write per request would cost a syscall on the gateway's hot
    path): readers call :meth:`flush` first, and the platform flushes every 250 ms."""

    def __init__(self, rotate_bytes: int = 10 * 2**20, keep: int = 3) -> None:
        self._files: dict[Path, TextIO] = {}
        self._sizes: dict[Path, int] = {}
        self.rotate_bytes = rotate_bytes
        self.keep = keep
        # The timestamp up to the second, formatted once per second.
        self._second = -1
        self._second_text = ""

    def writer_for(self, spec: IsolateSpec) -> LogWriter:
        path = spec.log_path

        def write(isolate_id: str, stream: str, line: str) -> None:
            self.write(path, isolate_id, stream, line)

        return write

    def write(self, path: Path, source: str, stream: str, line: str) -> None:
        f = self._files.get(path)
        if f is None:
            path.parent.mkdir(parents=True, exist_ok=True)
            os.chmod(path.parent.parent, 0o700)
            f = self._files[path] = open(path, "a", buffering=2**16)  # noqa: SIM115
            self._sizes[path] = path.stat().st_size
        entry = f"{self._timestamp()} {source} {stream} {line}\n"
        f.write(entry)
        size = self._sizes[path] = self._sizes[path] + len(entry)
        if size > self.rotate_bytes:
            self._rotate(path, f)

    def _timestamp(self) -> str:
        """``2026-11-26T10:00:00.123Z`` (UTC, milliseconds truncated)."""
        ms = time.time_ns() // 1_000_000
        second, millis = divmod(ms, 1000)
        if second != self._second:
            self._second = second
            self._second_text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        return f"{self._second_text}.{millis:03d}Z"

    def flush(self) -> None:
        for f in self._files.values():
            f.flush()

    def _rotate(self, path: Path, f: TextIO) -> None:
        """Keep ``keep`` older files: ``x.log.1`` is the newest of them."""
        f.close()
        del self._files[path]
        del self._sizes[path]
        for n in range(self.keep, 0, -1):
            older = path.with_name(f"{path.name}.{n}")
            if n == self.keep:
                older.unlink(missing_ok=True)
            else:
                newer_name = path.with_name(f"{path.name}.{n + 1}")
                if older.exists():
                    older.rename(newer_name)
        path.rename(path.with_name(f"{path.name}.1"))

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()


def tail(path: Path, lines: int, since_s: float | None = None) -> list[str]:
    """The last ``lines`` lines (of the last 1 MiB), only those newer than ``since_s``
    seconds when given (lines start with an ISO timestamp, so they compare as text)."""
    if not path.exists():
        return []
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        size = f.tell()
        f.seek(max(0, size - 2**20))
        data = f.read().decode(errors="replace").splitlines()
    if size > 2**20:
        data = data[1:]  # the first one is probably cut
    if since_s is not None:
        cutoff = (datetime.now(UTC) - timedelta(seconds=since_s)).strftime(
            "%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"
        data = [line for line in data if line[:24] >= cutoff]
    return data[-lines:]


async def follow_file(path: Path, first: str, poll_s: float = 0.2) -> AsyncIterator[str]:
    """Yield ``first``, then whatever is appended to ``path`` (following rotation)."""
    yield first
    position = path.stat().st_size if path.exists() else 0
    inode = path.stat().st_ino if path.exists() else None
    pending = ""
    while True:
        await asyncio.sleep(poll_s)
        try:
            st = path.stat()
        except FileNotFoundError:
            continue
        if st.st_ino != inode or st.st_size < position:  # rotated or truncated
            inode, position = st.st_ino, 0
        if st.st_size == position:
            continue
        with open(path, "rb") as f:
            f.seek(position)
            chunk = f.read()
        position += len(chunk)
        pending += chunk.decode(errors="replace")
        complete, _, pending = pending.rpartition("\n")
        if complete:
            yield complete + "\n"
