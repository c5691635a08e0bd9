"""Reading function logs (written by :class:`~phloem.control.logs.FunctionLogs`): the last
lines of a log, and a log followed as it grows, across rotation.

    lines = tail(spec.log_path, 100, since_s=60)
    async for text in follow_file(spec.log_path, "".join(lines)):
        ...
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path


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
