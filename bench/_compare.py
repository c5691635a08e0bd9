"""Interleaved wrk comparisons for bench/runtime.py: every way of serving one upstream
(direct, nginx, HAProxy, phloem, ...) is run once per round, the order rotating each round
so none always runs first on a noisy machine; every run is printed with the proxy's CPU
per request (and the share of the machine's time the hypervisor stole, when any: a run
with steal was slowed from outside, and one with STEAL_REDO% or more is run again), then
the medians and the ratios of phloem to each other proxy.

    ways = [Way("nginx", "http://127.0.0.1:8081/", cpu=tree_cpu(nginx_pid)),
            Way("phloem", "http://127.0.0.1:8080/", host="x", cpu=own_cpu(gateway_pid))]
    table = interleaved(ways, connections=32, duration=10, rounds=3, say=print)
    table.median_rps("phloem"), table.ratio("phloem", "nginx")  # median of per-round ratios
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field

from _load import WrkResult, run_wrk
from _procs import CLOCK_TICKS, cpu_seconds, tree_cpu_ticks


@dataclass
class Way:
    name: str
    url: str
    host: str | None = None
    #: CPU seconds so far of the process(es) doing this way's own work (the proxy's); None
    #: for a direct way.
    cpu: Callable[[], float] | None = None


@dataclass
class Run:
    result: WrkResult
    cpu_us: float  # CPU of the way's processes per request (nan if none)


@dataclass
class Table:
    """The runs of one configuration, per way, in round order."""

    connections: int
    runs: dict[str, list[Run]] = field(default_factory=dict)

    def rps(self, way: str) -> list[float]:
        return [r.result.rps for r in self.runs[way]]

    def median_rps(self, way: str) -> float:
        return statistics.median(self.rps(way))

    def ratios(self, a: str, b: str) -> list[float]:
        """``a``'s rate over ``b``'s, per round (runs of a round are seconds apart)."""
        return [x / y for x, y in zip(self.rps(a), self.rps(b), strict=True)]

    def ratio(self, a: str, b: str) -> float:
        return statistics.median(self.ratios(a, b))


def floor_ratios(table: Table) -> str:
    """phloem's ratio to the Python floor (bench/apps/forwarder.py, the way named
    "forwarder") and the floor's to nginx, for a summary row."""
    text = (f"{table.ratio('phloem', 'forwarder'):.2f}x the Python floor (which is "
            f"{table.ratio('forwarder', 'nginx'):.2f}x nginx)")
    if "pooled" in table.runs:
        text += (f", {table.ratio('phloem', 'pooled'):.2f}x the pooling floor (which is "
                 f"{table.ratio('pooled', 'nginx'):.2f}x nginx)")
    return text


def report_floor(table: Table, say: Callable[[str], None]) -> None:
    """Print the floor's ratio to nginx per round and as their median, after a
    :func:`report` of phloem that named ``"forwarder": math.nan``."""
    report(table, subject="forwarder", against={"nginx": math.nan}, say=say, medians=False)
    if "pooled" in table.runs:
        report(table, subject="pooled", against={"nginx": math.nan, "forwarder": math.nan},
               say=say, medians=False)


def tree_cpu(pid: int) -> Callable[[], float]:
    """CPU seconds of ``pid`` and its children (nginx's master and worker)."""
    return lambda: tree_cpu_ticks([pid]) / CLOCK_TICKS


def own_cpu(pid: int) -> Callable[[], float]:
    """CPU seconds of ``pid`` alone (phloem's gateway, not its isolates)."""
    return lambda: cpu_seconds(pid)


def _cpu_seconds(way: Way) -> float:
    return way.cpu() if way.cpu else math.nan


def machine_cpu() -> list[int]:
    """The machine's CPU time so far, in ticks: /proc/stat's user, nice, system, idle,
    iowait, irq, softirq and steal."""
    with open("/proc/stat") as f:
        return [int(x) for x in f.readline().split()[1:9]]


def steal_percent(before: list[int], after: list[int]) -> float:
    """The share of the machine's time between two :func:`machine_cpu` readings that the
    hypervisor gave to other guests (0 on bare metal)."""
    spent = [b - a for a, b in zip(before, after, strict=True)]
    total = sum(spent)
    return 100.0 * spent[7] / total if total else 0.0


def steal_note(stolen: float) -> str:
    """What a run's line says of the steal it saw: nothing below 1%."""
    return f"   steal {stolen:.0f}%" if stolen >= 1 else ""


#: A run during which the hypervisor gave at least this share (%) of the machine to other
#: guests is run again, up to STEAL_RETRIES times (the last attempt counts whatever its
#: steal); every attempt is printed.
STEAL_REDO = 5.0
STEAL_RETRIES = 2


def interleaved(ways: list[Way], *, connections: int, duration: float, rounds: int,
                say: Callable[[str], None], indent: str = "   ") -> Table:
    """``rounds`` rounds of one wrk run per way (order rotated each round), each printed;
    a run slowed from outside (steal >= STEAL_REDO) is run again."""
    table = Table(connections, {w.name: [] for w in ways})
    for i in range(rounds):
        shift = i % len(ways)
        for way in ways[shift:] + ways[:shift]:
            for attempt in range(STEAL_RETRIES + 1):
                cpu0, machine0 = _cpu_seconds(way), machine_cpu()
                r = run_wrk(way.url, connections=connections, duration=duration,
                            host=way.host)
                cpu_us = (_cpu_seconds(way) - cpu0) / max(r.requests, 1) * 1e6
                stolen = steal_percent(machine0, machine_cpu())
                again = stolen >= STEAL_REDO and attempt < STEAL_RETRIES
                cpu = f"   {cpu_us:5.1f} us CPU/req" if way.cpu else ""
                note = f"   ({r.errors})" if r.errors else ""
                say(f"{indent}run {i + 1}  {connections:>4} conns  {way.name:<14} "
                    f"{r.rps:>9,.0f} req/s   p50 {r.p50_ms:6.2f} ms   p99 {r.p99_ms:6.2f} ms"
                    f"{cpu}{steal_note(stolen)}{note}{'   -> run again' if again else ''}")
                if not again:
                    table.runs[way.name].append(Run(r, cpu_us))
                    break
    return table


def report(table: Table, *, subject: str, against: dict[str, float],
           say: Callable[[str], None], indent: str = "   ", medians: bool = True,
           ) -> dict[str, bool]:
    """Print the medians (unless ``medians`` is false) and ``subject``'s ratio to each way
    in ``against`` (way -> the target ratio, nan for none) per round and as the median of
    the rounds; returns way -> whether the median met its target."""
    c = table.connections
    if medians:
        rates = "   ".join(f"{w} {table.median_rps(w):,.0f}" for w in table.runs)
        say(f"{indent}median {c:>4} conns  {rates}  (req/s)")
    met = {}
    for other, target in against.items():
        per = table.ratios(subject, other)
        median = table.ratio(subject, other)
        runs = " / ".join(f"{x:.2f}" for x in per)
        line = f"{indent}{c:>4} conns  {subject}/{other} per run {runs}; median {median:.2f}x"
        if not math.isnan(target):
            ok = median >= target
            met[other] = ok
            hits = sum(x >= target for x in per)
            line += (f"   target >= {target:g}x: {'met' if ok else 'MISSED'} "
                     f"(met in {hits} of {len(per)} runs)")
        say(line)
    return met
