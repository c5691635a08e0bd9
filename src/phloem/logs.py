"""Function logs: one append-only file per function and branch, a line per event.

    2026-11-26T10:00:00.123Z iso-1a2b3c4d stdout hello
"""

from __future__ import annotations

import os
from datetime import UTC, datetime
from pathlib import Path
from typing import TextIO

from phloem.supervisor.isolate import IsolateSpec, LogWriter


class FunctionLogs:
    def __init__(self) -> None:
        self._files: dict[Path, TextIO] = {}

    def writer_for(self, spec: IsolateSpec) -> LogWriter:
        path = spec.log_path

        def write(isolate_id: str, stream: str, line: str) -> None:
            f = self._files.get(path)
            if f is None:
                path.parent.mkdir(parents=True, exist_ok=True)
                os.chmod(path.parent.parent, 0o700)
                f = self._files[path] = open(path, "a", buffering=1)  # noqa: SIM115
            ts = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"
            f.write(f"{ts} {isolate_id} {stream} {line}\n")

        return write

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()


def tail(path: Path, lines: int) -> list[str]:
    if not path.exists():
        return []
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        size = f.tell()
        f.seek(max(0, size - 256 * 1024))
        data = f.read().decode(errors="replace").splitlines()
    return data[-lines:]
