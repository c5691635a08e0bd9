"""Cold starts on two platforms side by side, for bench/runtime.py (Python and Node): the
default one, whose isolates run in sandboxes, and one started with ``--no-sandbox``, with
equal settings and interleaved runs (their order alternating), beside a bare baseline.

    cold = compare(platforms, runs=20, slug="cold", app=MINIMAL, body=b"hello world\\n",
                   bare=bare_start, bare_label="bare uvicorn", say=print)
    cold.ways["sandbox"].p50_ms, cold.ways["no sandbox"].p50_ms, cold.ways["bare"].p50_ms

Before each timed request both platforms are left alone until the retired isolate has
exited and their process trees are idle (a Node standby replaced, a deploy's work done),
so neither measures the other's background work. One unmeasured warm-up start each makes
the zygote / standby path the one measured from the first run. Which way each start went
is read back from the function logs ("isolate ready in N ms (forked from the zygote)"),
and after each start the platform's process tree is checked for a process in a mount
namespace of its own (a sandbox), so a reader sees that the comparison is like for like.
"""

from __future__ import annotations

import statistics
import time
from collections import Counter
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from _procs import descendants, http_get, in_other_mount_ns, wait_quiet

from phloem.testing import PlatformProcess, host_of

SANDBOX = "sandbox"
UNBOXED = "no sandbox"
BARE = "bare"


@dataclass
class Way:
    seconds: list[float] = field(default_factory=list)

    @property
    def p50_ms(self) -> float:
        return statistics.median(self.seconds) * 1000

    def line(self, label: str) -> str:
        return (f"{label:<18} p50 {self.p50_ms:7.1f} ms   min {min(self.seconds) * 1000:7.1f}"
                f"   max {max(self.seconds) * 1000:7.1f}")


@dataclass
class Platform:
    label: str
    p: PlatformProcess
    #: Runs after which a process below the platform was in its own mount namespace.
    sandboxed_runs: int = 0
    #: Waits for the previous isolate's exit that timed out.
    stragglers: int = 0
    #: The last deployment made (``functions deploy --output json``).
    last_deploy: dict[str, Any] = field(default_factory=dict)

    @property
    def pid(self) -> int:
        assert self.p.proc is not None
        return self.p.proc.pid


@dataclass
class ColdResult:
    runs: int
    ways: dict[str, Way]
    #: platform label -> how its measured starts went, from its function log ("forked
    #: from the zygote": n).
    hows: dict[str, Counter[str]]
    #: platform label -> the log's isolate spawn -> ready times (ms) of those starts.
    ready_ms: dict[str, list[float]]

    @property
    def ratio(self) -> float | None:
        """p50 with a sandbox / p50 without."""
        if UNBOXED not in self.ways:
            return None
        return self.ways[SANDBOX].p50_ms / self.ways[UNBOXED].p50_ms


def _wait_for_exit(pid: int, before: int, timeout: float = 5.0) -> bool:
    """Wait until the platform has fewer processes below it than ``before`` (the retired
    isolate has exited); False if it still had not after ``timeout``."""
    deadline = time.monotonic() + timeout
    while len(descendants(pid)) >= before:
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.01)
    return True


def _start(target: Platform, everyone: list[Platform], slug: str, app: Path, run: int,
           body: bytes) -> float:
    """Deploy a new deployment (no isolate of it is live), let both platforms settle,
    then time one request -> full response."""
    before = len(descendants(target.pid))
    fn = target.last_deploy = target.p.deploy(slug, app, "--env", f"RUN={run}")
    if run > 0 and not _wait_for_exit(target.pid, before):
        target.stragglers += 1
    wait_quiet([pl.pid for pl in everyone])
    host = host_of(fn["invocation_url"])
    t0 = time.perf_counter()
    status, got = http_get(port=target.p.gateway_port, host=host)
    elapsed = time.perf_counter() - t0
    if status != 200 or got != body:
        raise RuntimeError(f"cold request to {target.label} answered {status} {got[:200]!r}")
    if in_other_mount_ns(target.pid):
        target.sandboxed_runs += 1
    return elapsed


def _from_log(p: PlatformProcess, slug: str) -> tuple[Counter[str], list[float]]:
    """(how the starts went, their spawn -> ready ms) from the function's log lines
    ``isolate ready in 12 ms (forked from the zygote)``."""
    out = p.cli("functions", "logs", slug, "--lines", "10000", check=False).stdout
    hows: Counter[str] = Counter()
    ready = []
    for line in out.splitlines():
        if "isolate ready in " not in line:
            continue
        rest = line.split("isolate ready in ", 1)[1]
        with suppress(IndexError, ValueError):
            ready.append(float(rest.split()[0]))
        hows[rest.partition("(")[2].rstrip(")") or "unknown"] += 1
    return hows, ready


def compare(platforms: list[Platform], *, runs: int, slug: str, app: Path, body: bytes,
            bare: Callable[[int], float], bare_label: str,
            say: Callable[[str], None]) -> ColdResult:
    """``platforms``: the sandboxed one first, then (optionally) the ``--no-sandbox`` one.
    ``bare(run)`` starts the baseline and returns spawn -> first response in seconds."""
    for pl in platforms:  # the warm-up: zygote / standby in place, the function built
        _start(pl, platforms, slug, app, 0, body)
    warm_up = {pl.label: _from_log(pl.p, slug) for pl in platforms}
    ways = {pl.label: Way() for pl in platforms}
    ways[BARE] = Way()
    for pl in platforms:
        pl.sandboxed_runs = 0
    for run in range(1, runs + 1):  # interleaved, so drift hits all alike
        order = platforms if run % 2 else platforms[::-1]
        for pl in order:
            ways[pl.label].seconds.append(_start(pl, platforms, slug, app, run, body))
        wait_quiet([pl.pid for pl in platforms])
        ways[BARE].seconds.append(bare(run))
    hows: dict[str, Counter[str]] = {}
    ready: dict[str, list[float]] = {}
    for pl in platforms:
        all_hows, all_ready = _from_log(pl.p, slug)
        hows[pl.label] = all_hows - warm_up[pl.label][0]
        ready[pl.label] = all_ready[len(warm_up[pl.label][1]):]
    result = ColdResult(runs, ways, hows, ready)
    _report(result, platforms, bare_label, say)
    return result


def _report(r: ColdResult, platforms: list[Platform], bare_label: str,
            say: Callable[[str], None]) -> None:
    for pl in platforms:
        say("   " + r.ways[pl.label].line(f"phloem {pl.label}"))
    say("   " + r.ways[BARE].line(bare_label))
    logged = ", ".join(f"{label} {statistics.median(ms):.0f} ms over {len(ms)}"
                       for label, ms in r.ready_ms.items() if ms)
    if logged:
        say(f"   (phloem's own log, isolate spawn -> ready p50: {logged}; the rest is "
            "routing, the request and the reply)")
    how = "; ".join(f"{label}: " + ", ".join(f"{n} {way}" for way, n in c.most_common())
                    for label, c in r.hows.items())
    say(f"   measured starts by way (function logs; after 1 unmeasured warm-up start "
        f"each): {how}")
    seen = ", ".join(f"{pl.label} {pl.sandboxed_runs}/{r.runs}" for pl in platforms)
    say(f"   runs after which the platform had a process in a mount namespace of its own "
        f"(sandboxed): {seen}")
    late = [f"{pl.label} {pl.stragglers}" for pl in platforms if pl.stragglers]
    if late:
        say(f"   (the previous isolate had not exited within 5 s before some runs: "
            f"{', '.join(late)})")


def summary_rows(c: ColdResult, what: str, bare: str, target: str) -> list[str]:
    """Summary rows of one cold-start comparison: the sandbox, then --no-sandbox."""
    bare_ms = c.ways[BARE].p50_ms
    name = f"{what}cold start p50, request -> response (ms), median of {c.runs}"
    ph = c.ways[SANDBOX].p50_ms
    against = f"; {c.ratio:.2f}x no sandbox" if c.ratio is not None else ""
    rows = [f"| {name}, sandbox | {ph:.0f} | | {bare_ms:.0f} | {ph / bare_ms:.2f}x {bare}"
            f"{against} | {target} |"]
    if UNBOXED in c.ways:
        un = c.ways[UNBOXED].p50_ms
        rows.append(f"| {name}, `--no-sandbox` | {un:.0f} | | {bare_ms:.0f} | "
                    f"{un / bare_ms:.2f}x {bare} | |")
    return rows
