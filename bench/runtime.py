"""Runtime benchmarks of phloem's request path, each beside its baselines, on two
upstreams: the minimal ASGI app (raw ASGI, 12-byte body, bench/apps/minimal) on uvicorn as
phloem's isolates run it ("python"), and a server that answers at once (bench/apps/fixed:
the same 12 bytes written from ``data_received``, in uvicorn's server) so that the proxy
in front is what is measured ("fixed"):

1. throughput (wrk -t1, 32 and 256 connections), per upstream: direct to it on TCP,
   through nginx (1 worker, keepalive upstream on a Unix socket), through HAProxy (1
   process, 1 thread, ``http-reuse always``, same socket), through phloem's gateway (1
   isolate on a Unix socket) and through bench/apps/forwarder.py (the floor of a Python
   proxy: uvloop + httptools and nothing else, same socket); 3 rounds, the order rotating
   per round, every run printed with the proxy's CPU per request, then medians and
   phloem/nginx, phloem/haproxy, phloem/forwarder and forwarder/nginx. nginx and HAProxy
   write an access line per request (nginx to a file, buffered; HAProxy to an in-memory
   ring), as phloem's gateway does (the forwarder writes none: it is the floor);
2. added latency: p50/p99 through each proxy minus direct, at a fixed rate of half the
   direct maximum (h2load --rps; again at half phloem's maximum when phloem cannot sustain
   that) on the python upstream, and unloaded (wrk, one connection) on both, 3 rounds;
3. cold start: request -> full response with no live isolate (a new deployment each run),
   on the default platform (isolates in sandboxes) and, interleaved with equal settings, on
   a second one started with ``--no-sandbox``, beside bare uvicorn spawn -> first response
   on a Unix socket (bench/_cold.py);
4. streams: 1,000 / 5,000 / 10,000 concurrent SSE clients (bench/apps/sse, a ``: ping``
   every second) through the gateway: gateway RSS per stream and heartbeat lag;
5. node: the minimal app as a Hono function, the same bundle through phloem, through
   nginx (to @hono/node-server on a Unix socket) and on @hono/node-server directly
   (throughput, 3 rounds), and its cold start, sandbox vs ``--no-sandbox`` as in 3, vs a
   bare node spawn (bench/_node.py);
6. tls: phloem ``--tls files`` vs nginx terminating TLS with the same certificate in front
   of the fixed upstream: https throughput at 32 and 256 connections and new TLS
   connections per second, 3 rounds interleaved (bench/_tls.py).

    .venv/bin/python bench/runtime.py                   # everything, about 20 minutes
    .venv/bin/python bench/runtime.py --quick           # a look in 1-3 minutes
    .venv/bin/python bench/runtime.py --only throughput --duration 20
    scripts/bench runtime

``--quick`` (68 s at load 5-8; 2.5-3 minutes at load 11-16) keeps each comparison side
by side with its ratios but measures it once: sections 1, 2 and 4 only, with 1 s load
runs after a 1 s warm-up, one round (no medians), both upstreams and both connection
counts; added latency at one fixed rate and unloaded; 1,000 streams only (RSS per stream
from the idle gateway), 2 s measured. No cold starts and no node section (their time goes
to deploys, not to measuring), so one platform; no tls section. ``--only node`` /
``--only cold`` / ``--only tls`` and ``--rounds`` bring parts back (node without its cold
starts unless ``--cold-runs N``).
Every run ends with the time each section took.

Needs wrk, nginx, HAProxy and h2load (``apt-get install -y wrk nginx-light haproxy
nghttp2-client``, or ``scripts/install --bench``); it checks and says which command
installs what is missing. Load generators are bounded for small machines (wrk -t1, h2load
-t1). It ends with a markdown table for the README.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import math
import os
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import _cold
import _node
import _tls
from _compare import (
    Table,
    Way,
    floor_ratios,
    interleaved,
    own_cpu,
    report,
    report_floor,
    tree_cpu,
)
from _load import percentile, run_h2load, run_wrk
from _procs import (
    Reaper,
    busiest_descendant,
    cpu_seconds,
    exit_on_signals,
    fd_count,
    free_port,
    http_get,
    machine,
    missing_tools,
    rss_kib,
    spawn_uvicorn,
    start_forwarder,
    start_haproxy,
    start_nginx,
    wait_answering,
)
from _sse import StreamFleet

from phloem.gateway import native as gateway_native
from phloem.gateway.admission import plan_connections
from phloem.system.native import why_python
from phloem.testing import PlatformProcess, host_of, platform_process

HERE = Path(__file__).resolve().parent
MINIMAL = HERE / "apps" / "minimal"
FIXED = HERE / "apps" / "fixed"
SSE = HERE / "apps" / "sse"
SECTIONS = ("throughput", "latency", "cold", "streams", "node", "tls")
#: Left out of --quick unless named with --only: their time goes to deploys and cold starts
#: (node: its deploy, provisioning and npm, 84 s of 101 at load 12; tls: a platform of its
#: own and nginx with TLS), not to side-by-side runs.
QUICK_SKIPS = ("cold", "node", "tls")
CONNECTIONS = (32, 256)
LATENCY_CLIENTS = 32
ROUNDS = 3  # runs per configuration, interleaved; the median is the figure
#: upstream -> what it is
UPSTREAMS = {
    "python": "the minimal ASGI app on uvicorn (uvloop, httptools), as phloem's isolates",
    "fixed": "bench/apps/fixed: a fixed response written from data_received, in uvicorn's "
             "server",
}
PROXIES = ("nginx", "haproxy", "phloem")

# Targets (DESIGN.md section 4, the runtime brief and issue 12, item 6).
T_NGINX = 1.0  # phloem / nginx, both upstreams, 32 and 256 connections
T_HAPROXY = 0.85  # phloem / haproxy, likewise
T_ADDED_P50_MS = 1.0  # at a fixed rate
T_UNLOADED_P50_MS = 0.1  # added by phloem, one connection
T_COLD_MS = 50.0
T_COLD_RATIO = 0.4  # phloem / bare uvicorn
T_COLD_SANDBOX_MS = 30.0  # issue 10: with the sandbox
T_RSS_KIB = 30.0  # per stream
T_LAG_P99_MS = 250.0  # at 10,000 streams


def say(text: str = "") -> None:
    print(text, flush=True)


def verdict(ok: bool) -> str:
    return "met" if ok else "MISSED"


def load_note() -> str:
    return f"load average (1 min) {os.getloadavg()[0]:.2f}"


@dataclass
class Results:
    """What the summary table is built from (only the sections that ran)."""

    tables: dict[tuple[str, int], Table] = field(default_factory=dict)  # (upstream, conns)
    latency: list[LatencyPoint] = field(default_factory=list)
    #: upstream -> way -> (p50, p99) ms of wrk -c1, one per round
    single: dict[str, dict[str, list[tuple[float, float]]]] = field(default_factory=dict)
    cold: _cold.ColdResult | None = None
    streams: list[StreamRow] = field(default_factory=list)
    streams_note: str = ""
    base_rss_kib: int = 0  # the gateway's, with no stream open
    node: _node.NodeResults | None = None
    tls: _tls.TlsResults | None = None


@dataclass
class LatencyPoint:
    rate: float
    why: str
    ways: dict[str, tuple[float, float]] = field(default_factory=dict)  # way -> p50, p99 ms
    saturated: bool = False  # phloem did not sustain the rate


@dataclass
class StreamRow:
    count: int
    gateway_rss_kib: int
    isolate_rss_kib: int
    gateway_fds: int
    lag_p50_ms: float
    lag_p99_ms: float
    lag_max_ms: float
    silent: int
    lost: int
    open_s: float
    cpu: dict[str, float]


# -- the platform and the baselines ----------------------------------------------------------


@dataclass
class Bench:
    args: argparse.Namespace
    reaper: Reaper
    tmp: Path
    p: PlatformProcess
    #: The same platform started with --no-sandbox (for the cold starts).
    unboxed: PlatformProcess | None = None
    results: Results = field(default_factory=Results)
    _ways: dict[str, list[Way]] = field(default_factory=dict)  # upstream -> its ways
    # upstream -> its forwarders: one upstream connection per client, and pooled
    _floor: dict[str, list[Way]] = field(default_factory=dict)

    @property
    def gateway_pid(self) -> int:
        assert self.p.proc is not None
        return self.p.proc.pid

    def spawn_upstream(self, upstream: str, *, port: int | None = None,
                       uds: str | None = None) -> None:
        """One process of ``upstream`` on TCP ``port`` or Unix socket ``uds``, answering."""
        if upstream == "python":
            spawn_uvicorn(self.reaper, MINIMAL, port=port, uds=uds)
            return
        where = ["--uds", uds] if uds else ["--port", str(port)]
        proc = self.reaper.spawn([sys.executable, "main.py", *where], cwd=FIXED,
                                 stdin=subprocess.DEVNULL)
        wait_answering(proc, port=port, uds=uds, what="the fixed-response server")

    def deploy(self, slug: str, app: Path) -> str:
        """``app`` deployed on phloem with one isolate (as each baseline has one upstream
        process); its Host."""
        fn = self.p.deploy(slug, app, "--limit", "max_isolates=1")
        host = host_of(fn["invocation_url"])
        status, body = http_get(port=self.p.gateway_port, host=host)
        if status != 200 or body != b"hello world\n":
            raise RuntimeError(f"phloem answered {status} {body[:80]!r} for {slug}")
        return host

    def ways(self, upstream: str) -> list[Way]:
        """direct, nginx, haproxy and phloem in front of ``upstream`` (started once): the
        direct server on TCP (wrk cannot use Unix sockets); nginx and HAProxy (run one at
        a time) to one more process of it on a Unix socket; phloem to its isolate."""
        if upstream not in self._ways:
            direct = free_port()
            sock = str(self.tmp / f"{upstream}.sock")
            # Side by side: on a loaded machine each start or deploy takes seconds.
            with ThreadPoolExecutor(3) as pool:
                deployed = pool.submit(self.deploy,
                                       {"python": "minimal", "fixed": "fixed"}[upstream],
                                       {"python": MINIMAL, "fixed": FIXED}[upstream])
                for started in [pool.submit(self.spawn_upstream, upstream, port=direct),
                                pool.submit(self.spawn_upstream, upstream, uds=sock)]:
                    started.result()
                nginx_port, haproxy_port = free_port(), free_port()
                nginx = start_nginx(self.reaper, self.tmp, nginx_port, sock)
                haproxy = start_haproxy(self.reaper, self.tmp, haproxy_port, sock)
                forwarder_port, pooled_port = free_port(), free_port()
                forwarder = start_forwarder(self.reaper, forwarder_port, sock)
                pooled = start_forwarder(self.reaper, pooled_port, sock, pool=True)
                host = deployed.result()
            self._ways[upstream] = [
                Way("direct", f"http://127.0.0.1:{direct}/"),
                Way("nginx", f"http://127.0.0.1:{nginx_port}/", cpu=tree_cpu(nginx.pid)),
                Way("haproxy", f"http://127.0.0.1:{haproxy_port}/",
                    cpu=own_cpu(haproxy.pid)),
                Way("phloem", f"http://127.0.0.1:{self.p.gateway_port}/", host,
                    cpu=own_cpu(self.gateway_pid)),
            ]
            self._floor[upstream] = [
                Way("forwarder", f"http://127.0.0.1:{forwarder_port}/",
                    cpu=own_cpu(forwarder.pid)),
                Way("pooled", f"http://127.0.0.1:{pooled_port}/", cpu=own_cpu(pooled.pid))]
        return self._ways[upstream]

    def floor(self, upstream: str) -> list[Way]:
        """bench/apps/forwarder.py in front of ``upstream`` (see :meth:`ways`), plain and
        ``--pool``: the floors of a Python proxy, measured in the throughput section only."""
        self.ways(upstream)
        return self._floor[upstream]

    def cold_platforms(self) -> list[_cold.Platform]:
        """The sandboxed platform, then the --no-sandbox one if it runs."""
        out = [_cold.Platform(_cold.SANDBOX, self.p)]
        if self.unboxed is not None:
            out.append(_cold.Platform(_cold.UNBOXED, self.unboxed))
        return out


def _warm(ways: list[Way], quick: bool) -> None:
    for w in ways:  # every path (and phloem's isolate and pooled connections) first
        run_wrk(w.url, connections=256, duration=1 if quick else 2, host=w.host)


# -- 1. throughput -----------------------------------------------------------------------------


def throughput(b: Bench) -> None:
    d, rounds = b.args.duration, b.args.rounds
    say(f"## 1. throughput: wrk -t1, {d:g} s per run, {rounds} rounds per configuration, the "
        f"order rotating ({load_note()})")
    say("   direct = the upstream on TCP; nginx = 1 worker, keepalive 1024 (idle upstream "
        "connections kept); haproxy = 1 process, 1 thread (nbthread 1), http-reuse always;")
    say("   phloem = the gateway (1 process) -> 1 isolate (max_isolates=1); nginx and haproxy "
        "-> 1 upstream process on a Unix socket; all keep-alive both sides;")
    say("   forwarder = bench/apps/forwarder.py, the floor of a Python proxy (uvloop + "
        "httptools, 1 process, one upstream connection per client; no routing, pooling, "
        "limits, logs or metrics), to the same socket; pooled = the same with --pool "
        "(shared upstream connections, a response parser to free them: the least a "
        "proxy in front of functions does);")
    say("   CPU/req = the proxy's CPU time over the run / its requests (10 ms clock ticks)")
    with ThreadPoolExecutor(len(UPSTREAMS)) as pool:  # every upstream's servers at once
        list(pool.map(b.ways, UPSTREAMS))
    for upstream, what in UPSTREAMS.items():
        say(f"   -- {upstream} upstream: {what}")
        ways = [*b.ways(upstream), *b.floor(upstream)]
        _warm(ways, b.args.quick)
        for conns in CONNECTIONS:
            table = interleaved(ways, connections=conns, duration=d, rounds=rounds, say=say)
            b.results.tables[(upstream, conns)] = table
            report(table, subject="phloem",
                   against={"nginx": T_NGINX, "haproxy": T_HAPROXY, "direct": math.nan,
                            "forwarder": math.nan, "pooled": math.nan},
                   say=say)
            report_floor(table, say)
    say()


# -- 2. added latency --------------------------------------------------------------------------


def latency(b: Bench) -> None:
    d = b.args.duration
    ways = b.ways("python")
    say(f"## 2. added latency: h2load --h1 -t1, {LATENCY_CLIENTS} keep-alive connections at a "
        f"fixed rate, {d:g} s measured after {1 if b.args.quick else 2} s, python upstream")
    maxima = {}
    for w in ways:  # what each path sustains, from section 1 if it ran
        known = b.results.tables.get(("python", 32))
        maxima[w.name] = (known.median_rps(w.name) if known else
                          run_wrk(w.url, connections=32, duration=min(d, 3), host=w.host).rps)
    say("   max req/s at 32 connections: "
        + ", ".join(f"{way} {rps:,.0f}" for way, rps in maxima.items()))
    point = _latency_point(b, ways, maxima, maxima["direct"] / 2, "half the direct maximum")
    if point.saturated:
        say(f"   phloem cannot sustain {point.rate:,.0f} req/s; again at half phloem's own "
            "maximum:")
        _latency_point(b, ways, maxima, maxima["phloem"] / 2, "half phloem's maximum")
    unloaded(b)
    say()


def unloaded(b: Bench) -> None:
    """The path alone, without queueing: one connection, one request at a time."""
    d, rounds = min(b.args.duration, 5), b.args.rounds
    say(f"   unloaded: wrk -c1 (one request at a time), {d:g} s each, {rounds} rounds, the "
        "order rotating:")
    for upstream in UPSTREAMS:
        ways = b.ways(upstream)
        single: dict[str, list[tuple[float, float]]] = {w.name: [] for w in ways}
        for i in range(rounds):
            for w in ways[i % len(ways):] + ways[:i % len(ways)]:
                r = run_wrk(w.url, connections=1, duration=d, host=w.host)
                single[w.name].append((r.p50_ms, r.p99_ms))
                say(f"   run {i + 1}  {upstream:<6} {w.name:<8} p50 {r.p50_ms:6.3f} ms   "
                    f"p99 {r.p99_ms:7.3f} ms   ({r.rps:,.0f} req/s)")
        b.results.single[upstream] = single
        for name in PROXIES:
            added = _added(single, name)
            say(f"   {upstream:<6} added by {name:<8} p50 per run "
                + " / ".join(f"{x:+.3f}" for x in added)
                + f" ms; median {statistics.median(added):+.3f} ms")
        added = _added(single, "phloem")
        hits = sum(x <= T_UNLOADED_P50_MS for x in added)
        say(f"   {upstream:<6} target added p50 (phloem) <= {T_UNLOADED_P50_MS:g} ms unloaded: "
            f"{verdict(statistics.median(added) <= T_UNLOADED_P50_MS)} "
            f"(met in {hits} of {len(added)} runs)")


def _added(single: dict[str, list[tuple[float, float]]], way: str) -> list[float]:
    """p50 through ``way`` minus direct's, per round."""
    return [x[0] - d[0] for x, d in zip(single[way], single["direct"], strict=True)]


def _latency_point(b: Bench, ways: list[Way], maxima: dict[str, float], rate: float,
                   why: str) -> LatencyPoint:
    say(f"   at {rate:,.0f} req/s ({why}):")
    point = LatencyPoint(rate, why)
    for w in ways:
        if rate > 0.9 * maxima[w.name]:
            say(f"   {w.name:<7} not measured: {rate:,.0f} req/s is beyond 90% of its maximum "
                f"({maxima[w.name]:,.0f})")
            if w.name == "phloem":
                point.saturated = True
            continue
        r = run_h2load(w.url, rate=rate, clients=LATENCY_CLIENTS, duration=b.args.duration,
                       host=w.host, warmup=1.0 if b.args.quick else 2.0)
        point.ways[w.name] = (r.p50_ms, r.p99_ms)
        note = f"   ({r.failed} failed)" if r.failed else ""
        note += "   (rate not sustained)" if r.rate < 0.95 * rate else ""
        say(f"   {w.name:<7} p50 {r.p50_ms:6.3f} ms   p99 {r.p99_ms:7.3f} ms   "
            f"achieved {r.rate:,.0f} req/s over {r.requests:,} requests{note}")
    if "direct" in point.ways:
        d50, d99 = point.ways["direct"]
        for name in PROXIES:
            if name in point.ways:
                p50, p99 = point.ways[name]
                say(f"   added by {name:<7} p50 {p50 - d50:+6.3f} ms   p99 {p99 - d99:+7.3f} ms")
        if "phloem" in point.ways:
            added = point.ways["phloem"][0] - d50
            say(f"   target added p50 <= {T_ADDED_P50_MS:g} ms: "
                f"{verdict(added <= T_ADDED_P50_MS)}")
    b.results.latency.append(point)
    return point


# -- 3. cold start -----------------------------------------------------------------------------


def bare_uvicorn_cold(b: Bench, run: int) -> float:
    sock = str(b.tmp / f"cold-{run}.sock")
    t0 = time.perf_counter()
    proc = b.reaper.spawn([sys.executable, "-m", "uvicorn", "main:app", "--uds", sock,
                           "--loop", "uvloop", "--http", "httptools", "--no-access-log",
                           "--log-level", "warning"], cwd=MINIMAL, stdin=subprocess.DEVNULL)
    try:
        status, _ = wait_answering(proc, uds=sock, what="uvicorn", poll_s=0.001)
        elapsed = time.perf_counter() - t0
        if status != 200:
            raise RuntimeError(f"bare uvicorn answered {status}")
    finally:
        b.reaper.stop(proc, signal.SIGINT)
    return elapsed


def cold(b: Bench) -> None:
    runs = b.args.cold_runs
    say(f"## 3. cold start: median of {runs}, request sent -> full response received "
        f"({load_note()})")
    say("   phloem: a new deployment each run (--env RUN=i), so no isolate is live; the "
        "previous one has exited")
    say("   (as phloem starts isolates now: a fork from its zygote when one is running, else "
        "a fresh interpreter)")
    say("   sandbox = the default platform; no sandbox = a second one started with "
        "--no-sandbox; runs interleaved, order alternating")
    say(f"   bare uvicorn: spawn ({sys.executable}) -> first response on a Unix socket")
    r = _cold.compare(b.cold_platforms(), runs=runs, slug="cold", app=MINIMAL,
                      body=b"hello world\n", bare=lambda run: bare_uvicorn_cold(b, run),
                      bare_label="bare uvicorn", say=say)
    b.results.cold = r
    p50, b50 = r.ways[_cold.SANDBOX].p50_ms, r.ways[_cold.BARE].p50_ms
    ratio = p50 / b50
    against = f"ratio sandbox / no sandbox {r.ratio:.2f}; " if r.ratio is not None else ""
    say(f"   {against}phloem (sandbox) / bare uvicorn {ratio:.2f}")
    say(f"   targets (sandbox): p50 <= {T_COLD_SANDBOX_MS:g} ms: "
        f"{verdict(p50 <= T_COLD_SANDBOX_MS)}; p50 <= {T_COLD_MS:g} ms: "
        f"{verdict(p50 <= T_COLD_MS)}; <= {T_COLD_RATIO}x bare uvicorn: "
        f"{verdict(ratio <= T_COLD_RATIO)}")
    say()


# -- 4. streams --------------------------------------------------------------------------------


def _nofile_limit(pid: int) -> int:
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            return int(line.split()[3])
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def streams(b: Bench) -> None:
    wanted = [1000] if b.args.quick else [1000, 5000, 10000]
    # Long enough to catch the gateway's full GCs (--quick: a look, 2 s).
    window = max(2.0 if b.args.quick else 3.0, b.args.duration)
    fn = b.p.deploy("sse", SSE, "--limit", "max_isolates=1")
    host = host_of(fn["invocation_url"])
    limit = _nofile_limit(b.gateway_pid)
    base_fds = fd_count(b.gateway_pid)
    # The gateway holds 2 fds per stream, and its admission takes at most its planned
    # share of the limit (phloem.gateway.admission.plan_connections) as client connections.
    fits = min((limit - base_fds - 200) // 2, plan_connections(limit).gateway - 16)
    counts = sorted({min(n, fits) for n in wanted})
    say(f"## 4. streams: SSE through the gateway to one isolate, ': ping' every 1 s; "
        f"{window:g} s measured per level")
    say(f"   RLIMIT_NOFILE {limit} (the hard limit here; the platform inherits it), gateway "
        f"has {base_fds} fds idle, needs 2 per stream and admits "
        f"{plan_connections(limit).gateway:,} clients: at most {fits:,} streams fit")
    if counts != wanted:
        b.results.streams_note = (f"capped at {counts[-1]:,} streams by RLIMIT_NOFILE {limit}"
                                  " (2 fds per stream in the gateway, which admits at most"
                                  f" {plan_connections(limit).gateway:,} clients)")
        say(f"   counts reduced from {wanted} to {counts}: {b.results.streams_note}")
    # The client's own cyclic GC would pause all 10,000 streams at once and count as lag.
    gc.disable()
    try:
        rows = _run(_streams(b, host, counts, window))
    finally:
        gc.enable()
    b.results.streams = rows
    base_rss = b.results.base_rss_kib
    say(f"   gateway RSS with no stream open: {base_rss / 1024:.1f} MiB")
    for r in rows:
        cpu = "  ".join(f"{k} {v:.0%}" for k, v in r.cpu.items())
        trouble = ""
        if r.silent or r.lost:
            trouble = f"   ({r.silent} silent, {r.lost} closed)"
        iso_rss = f"{r.isolate_rss_kib / 1024:7.1f} MiB" if r.isolate_rss_kib else "n/a"
        say(f"   {r.count:>6,} streams  gateway RSS {r.gateway_rss_kib / 1024:7.1f} MiB  "
            f"fds {r.gateway_fds:>6,}  isolate RSS {iso_rss}  "
            f"opened in {r.open_s:5.1f} s{trouble}")
        say(f"   {'':>14}lag p50 {r.lag_p50_ms:6.1f} ms  p99 {r.lag_p99_ms:6.1f} ms  "
            f"max {r.lag_max_ms:6.1f} ms   CPU {cpu}")
    previous_count, previous_rss = 0, base_rss
    for r in rows:
        slope = (r.gateway_rss_kib - previous_rss) / (r.count - previous_count)
        say(f"   RSS per stream {previous_count:>6,} -> {r.count:>6,}: {slope:6.1f} KiB")
        previous_count, previous_rss = r.count, r.gateway_rss_kib
    per = _per_stream_kib(rows, base_rss)
    say(f"   RSS per stream (slope {_slope_from(rows):,} -> {rows[-1].count:,}): {per:.1f} KiB"
        f"   target <= {T_RSS_KIB:g} KiB: {verdict(per <= T_RSS_KIB)}")
    top = rows[-1]
    say(f"   heartbeat lag p99 at {top.count:,} streams: {top.lag_p99_ms:.1f} ms   target <= "
        f"{T_LAG_P99_MS:g} ms at 10,000: {verdict(top.lag_p99_ms <= T_LAG_P99_MS)}"
        + ("" if top.count >= 10000 else f" (measured at {top.count:,})"))
    say()


def _slope_from(rows: list[StreamRow]) -> int:
    """The stream count the RSS slope starts at: the first level's, or 0 (the idle
    gateway) when only one level ran (--quick)."""
    return rows[0].count if len(rows) >= 2 else 0


def _per_stream_kib(rows: list[StreamRow], base_rss_kib: int) -> float:
    first = (rows[0].count, rows[0].gateway_rss_kib) if len(rows) >= 2 else (0, base_rss_kib)
    last = rows[-1]
    return (last.gateway_rss_kib - first[1]) / (last.count - first[0])


async def _streams(b: Bench, host: str, counts: list[int],
                   window: float) -> list[StreamRow]:
    loop = asyncio.get_running_loop()
    gw = b.gateway_pid
    rows: list[StreamRow] = []
    async with StreamFleet(b.p.gateway_port, host, "/events") as fleet:
        await fleet.grow_to(1)  # starts the isolate
        await asyncio.sleep(1.0)
        b.results.base_rss_kib = rss_kib(gw)
        iso: int | None = None
        for count in counts:
            t_open = loop.time()
            await fleet.grow_to(count)
            open_s = loop.time() - t_open
            iso = iso or busiest_descendant(gw)
            await asyncio.sleep(2.5)  # every new stream past its first heartbeat
            fleet.take_gaps()
            fleet.record(True)
            pids = {"gateway": gw, "bench client": None, **({"isolate": iso} if iso else {})}
            cpu0 = {k: _cpu(pid) for k, pid in pids.items()}
            t0 = loop.time()
            await asyncio.sleep(window)
            spent = loop.time() - t0
            fleet.record(False)
            gaps = fleet.take_gaps()
            cpu = {k: (_cpu(pid) - cpu0[k]) / spent for k, pid in pids.items()}
            lags = [(g - 1.0) * 1000 for g in gaps]
            rows.append(StreamRow(
                count=count, gateway_rss_kib=rss_kib(gw),
                isolate_rss_kib=rss_kib(iso) if iso else 0, gateway_fds=fd_count(gw),
                lag_p50_ms=percentile(lags, 50), lag_p99_ms=percentile(lags, 99),
                lag_max_ms=max(lags) if lags else math.nan,
                silent=fleet.silent_since(time.monotonic() - 1.5), lost=fleet.lost,
                open_s=open_s, cpu=cpu))
    return rows


def _cpu(pid: int | None) -> float:
    if pid is None:
        return time.process_time()
    return cpu_seconds(pid)


def _run(coro: object) -> list[StreamRow]:
    try:
        import uvloop

        factory: Callable[[], asyncio.AbstractEventLoop] | None = uvloop.new_event_loop
    except ImportError:
        factory = None
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(coro)  # type: ignore[arg-type]


# -- summary -----------------------------------------------------------------------------------


def summary(r: Results, args: argparse.Namespace) -> None:
    rounds = args.rounds
    say("## summary (markdown)")
    say()
    say(f"machine: {machine()}; wrk/h2load -t1 on the same machine, {args.duration:g} s runs")
    say()
    say("| benchmark | phloem | nginx / HAProxy | direct / bare | phloem ratio | target |")
    say("|---|---|---|---|---|---|")
    for (upstream, conns), t in r.tables.items():
        ph, ng, ha, di = (t.median_rps(w) for w in ("phloem", "nginx", "haproxy", "direct"))
        runs = "; ".join(f"{w} " + " / ".join(f"{x:,.0f}" for x in t.rps(w))
                         for w in ("phloem", "nginx", "haproxy", "forwarder", "pooled")
                         if w in t.runs)
        say(f"| throughput, {upstream} upstream, {conns} connections, median of {rounds} "
            f"(req/s; runs: {runs}) | {ph:,.0f} | {ng:,.0f} / {ha:,.0f} | {di:,.0f} | "
            f"{t.ratio('phloem', 'nginx'):.2f}x nginx, {t.ratio('phloem', 'haproxy'):.2f}x "
            f"HAProxy, {t.ratio('phloem', 'direct'):.2f}x direct, "
            f"{floor_ratios(t)} | >= {T_NGINX:g}x nginx, "
            f">= {T_HAPROXY:g}x HAProxy |")
    for point in r.latency:
        if "direct" not in point.ways:
            continue
        d50, d99 = point.ways["direct"]
        for q, i, d_q in (("p50", 0, d50), ("p99", 1, d99)):
            cells = [f"{point.ways[w][i] - d_q:+.2f}" if w in point.ways else "saturated"
                     for w in PROXIES]
            say(f"| added latency {q} at {point.rate:,.0f} req/s, 32 connections, python "
                f"upstream (ms) | {cells[2]} | {cells[0]} / {cells[1]} | {d_q:.2f} ({q}) | | "
                f"{'<= 1 ms' if q == 'p50' else ''} |")
    for upstream, single in r.single.items():
        added = {w: statistics.median(_added(single, w)) for w in PROXIES}
        d50 = statistics.median(x[0] for x in single["direct"])
        say(f"| added latency p50, unloaded (1 connection), {upstream} upstream, median of "
            f"{rounds} (ms) | {added['phloem']:+.3f} | {added['nginx']:+.3f} / "
            f"{added['haproxy']:+.3f} | {d50:.3f} (p50) | | <= {T_UNLOADED_P50_MS:g} ms |")
    if r.cold:
        for row in _cold.summary_rows(r.cold, "", "bare uvicorn",
                             f"<= {T_COLD_SANDBOX_MS:g} ms; <= {T_COLD_MS:g} ms, "
                             f"<= {T_COLD_RATIO}x bare"):
            say(row)
    if r.streams:
        say(f"| gateway RSS per SSE stream, {_slope_from(r.streams):,} -> "
            f"{r.streams[-1].count:,} (KiB) | {_per_stream_kib(r.streams, r.base_rss_kib):.1f}"
            " | | | | <= 30 KiB |")
        top = r.streams[-1]
        note = f" ({r.streams_note})" if r.streams_note else ""
        say(f"| heartbeat lag p99 at {top.count:,} streams (ms){note} | {top.lag_p99_ms:.0f} | "
            f"| | | <= 250 ms at 10,000 |")
    if r.node:
        for row in _node.summary_rows(r.node, CONNECTIONS, rounds):
            say(row)
    if r.tls:
        for row in _tls.summary_rows(r.tls, rounds):
            say(row)
    say()


def node(b: Bench) -> None:
    b.results.node = _node.node(b, CONNECTIONS, b.args.rounds, say)


def tls(b: Bench) -> None:
    b.results.tls = _tls.tls(b, b.args.rounds, say)


# -- main --------------------------------------------------------------------------------------


def _raise_nofile() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--duration", type=float, default=None,
                        help="seconds per load run (default 10, 1 with --quick)")
    parser.add_argument("--quick", action="store_true",
                        help="a look in about 2 minutes, still side by side with ratios: "
                             "throughput, latency and streams only (no cold starts, no node or "
                             "tls section unless named with --only), 1 s load runs after a 1 s "
                             "warm-up, one round, 1,000 streams only, 2 s measured")
    parser.add_argument("--only", choices=SECTIONS, action="append",
                        help="run only this section (repeatable)")
    parser.add_argument("--rounds", type=int, default=None,
                        help=f"runs per configuration, interleaved; the median is the figure "
                             f"(default {ROUNDS}, 1 with --quick)")
    parser.add_argument("--cold-runs", type=int, default=None,
                        help="cold starts to take the median of (default 20; with --quick 0, "
                             "or 5 when --only cold is given)")
    args = parser.parse_args(argv)
    args.duration = args.duration or (1.0 if args.quick else 10.0)
    args.rounds = args.rounds or (1 if args.quick else ROUNDS)
    if args.cold_runs is None:
        args.cold_runs = 20 if not args.quick else 5 if "cold" in (args.only or []) else 0
    sections = args.only or [s for s in SECTIONS if not (args.quick and s in QUICK_SKIPS)]

    tools = sorted({t for s in sections for t in {"throughput": ["wrk", "nginx", "haproxy"],
                                                    "node": ["wrk", "nginx"],
                                                    "tls": ["wrk", "nginx"],
                                                    "latency": ["wrk", "nginx", "haproxy",
                                                                "h2load"]
                                                    }.get(s, [])})
    if missing := missing_tools(tools):
        say("missing tools (run as root, after apt-get update):")
        for line in missing:
            say(line)
        return 2

    _raise_nofile()  # before the platform starts: it inherits the limit
    say(f"phloem runtime benchmarks; {machine()}")
    # The platform process loads the compiled request path on the same terms as this one.
    reason = why_python()
    say("request path: " + ("compiled (mypyc; PHLOEM_NATIVE=0 for Python)" if gateway_native
                            else f"Python ({reason})"))
    if not gateway_native and os.environ.get("PHLOEM_NATIVE") != "0" and \
            {"throughput", "latency", "node", "tls"} & set(sections):
        # A stale build would make every figure below the Python path's, unannounced.
        say("refusing to measure a request path that is not what users run; rebuild it "
            "(.venv/bin/python scripts/build_native.py) or set PHLOEM_NATIVE=0 to measure "
            "the Python path on purpose")
        return 2
    load = os.getloadavg()[0]
    say(f"load average (1 min) before starting: {load:.2f}"
        + ("  -- other work is running: expect noisy numbers" if load > 0.5 else ""))
    cold_starts = bool({"cold", "node"} & set(sections)) and args.cold_runs > 0
    if cold_starts and os.geteuid() != 0:
        say("not root: neither platform can make sandboxes, so 'sandbox' and 'no sandbox' "
            "below run alike")
    say()
    started = time.monotonic()
    took: dict[str, float] = {}  # section -> seconds, printed at the end of every run
    with ExitStack() as stack:
        stack.enter_context(exit_on_signals())
        # Unwound in reverse: the platform stops, then every server, then the temp dir goes.
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="phloem-bench-")))
        reaper = stack.enter_context(Reaper())
        # Every bench client is one peer (127.0.0.1): the per-peer cap (1024 by default)
        # would refuse the streams section's thousands; 0 lifts it.
        p = stack.enter_context(platform_process(["--max-connections-per-peer", "0"]))
        b = Bench(args, reaper, tmp, p)
        if cold_starts:
            # The same bench without sandboxing, beside it with equal settings.
            b.unboxed = stack.enter_context(platform_process(["--no-sandbox"]))
        took["setup (platforms)"] = time.monotonic() - started
        steps: dict[str, Callable[[Bench], None]] = {
            "throughput": throughput, "latency": latency, "cold": cold, "streams": streams,
            "node": node, "tls": tls}
        for name in SECTIONS:
            if name in sections:
                t0 = time.monotonic()
                steps[name](b)
                took[name] = time.monotonic() - t0
                say(f"   ({name}: {took[name]:.0f} s)")
                say()
        results = b.results
        t0 = time.monotonic()
    took["teardown"] = time.monotonic() - t0
    summary(results, args)
    say("section times: " + ", ".join(f"{k} {v:.0f} s" for k, v in took.items()))
    say(f"(whole run: {time.monotonic() - started:.0f} s; {load_note()} at the end)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
