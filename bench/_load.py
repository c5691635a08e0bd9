"""Load generators for the benchmarks: wrk (closed loop, throughput) and h2load with
``--rps`` (fixed request rate, per-request latencies from its ``--log-file``).

    r = run_wrk("http://127.0.0.1:8080/", connections=32, duration=10, host="x")
    r.rps, r.errors
    lat = run_h2load("http://127.0.0.1:8080/", rate=3000, clients=32, duration=10, host="x")
    lat.p50_ms, lat.p99_ms
"""

from __future__ import annotations

import math
import re
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3}


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (``q`` in 0..100) of unsorted ``values``."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


@dataclass
class WrkResult:
    rps: float
    requests: int
    p50_ms: float
    p99_ms: float
    errors: str  # "" when there were no socket errors and no non-2xx/3xx responses
    output: str


def run_wrk(url: str, *, connections: int, duration: float, host: str | None = None,
            threads: int = 1) -> WrkResult:
    args = ["wrk", f"-t{threads}", f"-c{connections}", f"-d{max(1, round(duration))}s",
            "--latency", "--timeout", "10s"]
    if host:
        args += ["-H", f"Host: {host}"]
    proc = subprocess.run([*args, url], capture_output=True, text=True,
                          timeout=duration + 60)
    out = proc.stdout
    if proc.returncode != 0 or "Requests/sec:" not in out:
        raise RuntimeError(f"wrk failed ({proc.returncode}):\n{out}\n{proc.stderr}")
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    requests = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    pct: dict[str, float] = {}
    for q, value, unit in re.findall(r"^\s+(50|99)%\s+([\d.]+)(us|ms|s)\s*$", out, re.M):
        pct[q] = float(value) * _UNITS[unit]
    errors = []
    if m := re.search(r"Socket errors: (.*)", out):
        errors.append("socket errors: " + m.group(1).strip())
    if m := re.search(r"Non-2xx or 3xx responses: (\d+)", out):
        errors.append(f"{m.group(1)} non-2xx/3xx responses")
    return WrkResult(rps, requests, pct.get("50", math.nan), pct.get("99", math.nan),
                     "; ".join(errors), out)


@dataclass
class LatencyResult:
    rate: float  # requests per second achieved in the measured window
    requests: int
    failed: int  # non-2xx statuses plus h2load's failed/errored count
    p50_ms: float
    p99_ms: float
    output: str


def run_h2load(url: str, *, rate: float, clients: int, duration: float, host: str | None = None,
               warmup: float = 2.0) -> LatencyResult:
    """HTTP/1.1 at ``rate`` requests/s spread over ``clients`` keep-alive connections
    (``--rps`` per client), for ``warmup`` + ``duration`` seconds; statistics cover the
    last ``duration`` seconds. Connections start 1 ms apart (``-r 1 --rate-period 1ms``)
    so their request timers are out of phase: started together, all of them fire at once
    and the "fixed rate" arrives in bursts of ``clients`` requests, which measures queueing
    rather than the path. h2load sends a connection's next request only when the previous
    one is answered, so the rate holds only while the server keeps up (the achieved rate
    is reported to check)."""
    per_client = max(1, round(rate / clients))
    total = per_client * clients * (duration + warmup)
    with tempfile.TemporaryDirectory(prefix="phloem-bench-h2load-") as tmp:
        log = Path(tmp) / "requests.log"
        args = ["h2load", "--h1", "-t1", f"-c{clients}", "-r1", "--rate-period=1ms",
                f"--rps={per_client}", f"-n{round(total)}", f"--log-file={log}"]
        if host:
            # Not "Host:": h2load --h1 would send it beside its own Host from the URL.
            args += ["-H", f":authority: {host}"]
        try:
            proc = subprocess.run([*args, url], capture_output=True, text=True,
                                  timeout=3 * (duration + warmup) + 10)
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"h2load did not finish within {3 * (duration + warmup) + 10:.0f}"
                               f" s: {url} cannot sustain {rate:.0f} req/s") from None
        out = proc.stdout
        if proc.returncode != 0 or "requests:" not in out:
            raise RuntimeError(f"h2load failed ({proc.returncode}):\n{out}\n{proc.stderr}")
        rows = [line.split("\t") for line in log.read_text().splitlines() if line.strip()]
    # Columns: start (us since the epoch), status, duration (us).
    first = min(int(r[0]) for r in rows)
    kept = [r for r in rows if int(r[0]) - first >= warmup * 1e6]
    starts = [int(r[0]) for r in kept]
    times = [int(r[2]) / 1000 for r in kept]
    span = (max(starts) - min(starts)) / 1e6 if len(starts) > 1 else 0.0
    failed = sum(1 for r in rows if not 200 <= int(r[1]) < 300)
    if m := re.search(r"requests: .*?(\d+) failed", out):
        failed = max(failed, int(m.group(1)))
    return LatencyResult(len(kept) / span if span else math.nan, len(kept), failed,
                         percentile(times, 50), percentile(times, 99), out)
