"""Function logs: one append-only file per function and branch, a line per event.

    2026-11-26T10:00:00.123Z iso-1a2b3c4d stdout hello
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TextIO

from phloem.gateway.record import RequestRecord
from phloem.supervisor.isolate import IsolateSpec, LogWriter
from phloem.system.logfiles import KEEP, ROTATE_BYTES, rotate

# A timestamp's milliseconds, zero-padded (one lookup instead of a format per request).
_MILLIS = tuple(f"{ms:03d}" for ms in range(1000))


class _Log:
    """One log file: its lines not yet written, and its size counting them."""

    __slots__ = ("file", "pending", "size")

    def __init__(self, file: TextIO, size: int) -> None:
        self.file = file
        self.size = size
        self.pending: list[str] = []


class FunctionLogs:
    """Buffered appends (a write per request would cost a syscall on the gateway's hot
    path, and even a buffered file write costs more than a list append): lines are kept in
    a list per file and written together. Readers call :meth:`flush` first, and the
    platform flushes every 250 ms."""

    #: Lines kept per file before they are written without waiting for a flush.
    MAX_PENDING = 512

    def __init__(self, rotate_bytes: int = ROTATE_BYTES, keep: int = KEEP) -> None:
        self._logs: dict[Path, _Log] = {}
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
        log = self._logs.get(path) or self._open(path)
        self._append(path, log, f"{self._timestamp()} {source} {stream} {line}\n")

    def access(self, path: Path, record: RequestRecord) -> None:
        """The gateway's line for one finished request (once per request on the gateway's
        path: one format, no intermediate strings), as
        ``write(path, "gateway", "access", "GET /x 200 1.2ms rid=...")`` would write it.

            logs.access(spec.log_path, record)
        """
        log = self._logs.get(path) or self._open(path)
        now = time.time()
        second = int(now)
        if second != self._second:
            self._second = second
            self._second_text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        # One f-string of str and int parts (the compiled build joins them directly; a
        # %-format and its %.1f cost more than the rest of this method). The duration in
        # tenths of a millisecond, rounded half up.
        tenths = int(record.duration_s * 10000.0 + 0.5)
        entry = (f"{self._second_text}.{_MILLIS[int((now - second) * 1000)]}Z gateway "
                 f"access {record.method} {record.path} {record.status} {tenths // 10}."
                 f"{tenths % 10}ms rid={record.request_id}\n")
        if record.error:
            entry = f"{entry[:-1]} {record.error}\n"
        self._append(path, log, entry)

    def _open(self, path: Path) -> _Log:
        # The log's own directory is private; never a mode change above it: `phloem dev`
        # keeps its logs in a temporary directory, and changing the mode of that
        # directory's parent (/tmp) locked every other user out of /tmp.
        if not path.parent.is_dir():
            path.parent.mkdir(mode=0o700, parents=True)
        f = open(path, "a", buffering=2**16)  # noqa: SIM115
        log = self._logs[path] = _Log(f, path.stat().st_size)
        return log

    def _append(self, path: Path, log: _Log, entry: str) -> None:
        pending = log.pending
        pending.append(entry)
        log.size += len(entry)
        if log.size > self.rotate_bytes:
            self._rotate(path, log)
        elif len(pending) >= self.MAX_PENDING:
            _write_pending(log)

    def _timestamp(self) -> str:
        """``2026-11-26T10:00:00.123Z`` (UTC, milliseconds truncated)."""
        ms = time.time_ns() // 1_000_000
        second, millis = divmod(ms, 1000)
        if second != self._second:
            self._second = second
            self._second_text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        return f"{self._second_text}.{millis:03d}Z"

    def flush(self) -> None:
        for log in self._logs.values():
            _write_pending(log)
            log.file.flush()

    def _rotate(self, path: Path, log: _Log) -> None:
        """Keep ``keep`` older files: ``x.log.1`` is the newest of them."""
        _write_pending(log)
        log.file.close()
        del self._logs[path]
        rotate(path, self.keep)

    def close(self) -> None:
        for log in self._logs.values():
            _write_pending(log)
            log.file.close()
        self._logs.clear()


def _write_pending(log: _Log) -> None:
    if log.pending:
        log.file.write("".join(log.pending))
        log.pending.clear()
