"""Runtime limits: platform defaults (docs/architecture.md, "Limits and metrics"),
overridable per function at deploy time (``phloem functions deploy --limit
idle_timeout_s=30``).

    defaults = FunctionLimits()                       # the platform's
    effective = defaults.merged({"memory_mb": 256})   # one deployment's
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from phloem.system.validation import InvalidInput


@dataclass(frozen=True)
class FunctionLimits:
    #: Time to first byte: 504 after this many seconds without a response head.
    ttfb_timeout_s: float = 900.0
    #: A streaming response or WebSocket silent this long is closed.
    silence_timeout_s: float = 900.0
    #: Budget of ``wait_until`` work after the response; then it is cancelled.
    wait_until_s: float = 900.0
    #: An isolate with no requests, streams or background work this long gets SIGINT.
    idle_timeout_s: float = 300.0
    #: Memory per isolate (cgroup limit, else an RSS watchdog); over it: killed, 502s.
    memory_mb: int = 2048
    #: Processes and threads per isolate (cgroup ``pids.max``): a fork bomb hits EAGAIN.
    pids_max: int = 512
    #: CPU per isolate in thousandths of a CPU (cgroup CPU quota); 0: no quota.
    cpu_millicores: int = 0
    #: Size of an isolate's private /tmp (and of its /dev/shm) in its sandbox, MiB.
    tmp_mb: int = 256
    #: Open descriptors per isolate process (RLIMIT_NOFILE; never above the platform's).
    nofile: int = 65536
    #: In-flight requests per isolate above which another isolate starts.
    target_inflight: int = 64
    #: Most isolates per function.
    max_isolates: int = os.cpu_count() or 1
    #: Largest request body (413 above it).
    max_body_bytes: int = 100 * 1024 * 1024

    def merged(self, overrides: dict[str, Any]) -> FunctionLimits:
        return replace(self, **check_limits(overrides))

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


_MINIMUM: dict[str, float] = {
    "ttfb_timeout_s": 0.1, "silence_timeout_s": 0.1, "wait_until_s": 0.1,
    "idle_timeout_s": 0.1, "memory_mb": 16, "target_inflight": 1, "max_isolates": 1,
    "max_body_bytes": 1, "pids_max": 16, "cpu_millicores": 10, "tmp_mb": 1, "nofile": 64,
}
#: Upper bounds where the kernel (or sense) has one.
_MAXIMUM: dict[str, float] = {"pids_max": 65536, "cpu_millicores": 1_000_000,
                               "tmp_mb": 1 << 20, "nofile": 1 << 20}
#: Limits for which 0 means "unlimited".
_ZERO_IS_UNLIMITED = {"cpu_millicores"}


def _rule(key: str) -> str:
    low, high = _MINIMUM[key], _MAXIMUM.get(key)
    rule = f"between {low} and {high}" if high is not None else f"at least {low}"
    return f"0 (no limit) or {rule}" if key in _ZERO_IS_UNLIMITED else rule


def check_limits(overrides: dict[str, Any]) -> dict[str, Any]:
    """Validate override names and values; returns them converted to their types."""
    types = {f.name: f.type for f in fields(FunctionLimits)}
    out: dict[str, Any] = {}
    for key, value in overrides.items():
        if key not in types:
            raise InvalidInput(f"limits.{key}", f"unknown limit; known: {', '.join(types)}")
        kind = int if types[key] in (int, "int") else float
        try:
            number = kind(value)
        except (TypeError, ValueError):
            what = "an integer" if kind is int else "a number"
            raise InvalidInput(f"limits.{key}", f"must be {what} (got {value!r})") from None
        if not math.isfinite(number):
            raise InvalidInput(f"limits.{key}", f"must be a finite number (got {value!r})")
        unlimited = number == 0 and key in _ZERO_IS_UNLIMITED
        in_range = _MINIMUM[key] <= number <= _MAXIMUM.get(key, float("inf"))
        if isinstance(value, bool) or not (unlimited or in_range):
            raise InvalidInput(f"limits.{key}", f"must be {_rule(key)} (got {value!r})")
        out[key] = number
    return out
