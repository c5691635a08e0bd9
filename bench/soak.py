"""Soak: minutes of mixed HTTP, SSE and WebSocket traffic at half the measured capacity,
with isolate churn, against a real ``phloem up``; reports errors, the platform's RSS
slope, its descriptor count and the open cgroups over time, each flat within noise or not.

    .venv/bin/python bench/soak.py                    # 10 minutes
    .venv/bin/python bench/soak.py --minutes 1        # a short check
    .venv/bin/python bench/soak.py --rps 2000 --csv /tmp/soak.csv
    scripts/bench soak -- --minutes 2

One ``phloem up`` (as root: sandboxes, cgroups, firewall, as in production) serves one
function, bench/apps/soak, with ``max_isolates=2`` and ``target_inflight=16``. Phases:

1. capacity: this script's own client, closed loop, 4 / 16 / 64 keep-alive connections,
   ``--ramp-s`` each, the HTTP mix below; the best rate is the capacity (the client shares
   the machine, so this is what *this* load generator gets through the gateway; the CPU
   each side used is printed). ``--rps R`` skips it and takes R as the target instead.
2. soak, ``--minutes``: HTTP at half the capacity, paced (open loop: each of 64
   connections sends on a fixed schedule, so a slow response delays only its own
   connection), 90% ``GET /`` and 10% ``GET /work?ms=20``; ``--sse`` SSE streams and
   ``--ws`` WebSockets (an echo a second), each living 5-30 s and then reopened; churn:
   ``kill -9`` of a random isolate every ``--kill-every`` s and a redeploy (same code, a
   new env var) every ``--redeploy-every`` s, so isolates are replaced both ways.
3. quiet: every client closed, the platform idle; the last sample is compared with the
   one taken before the load.

Errors are everything that failed, except what the churn explains, which is counted
apart: a 502 for a request that was in flight at a kill (sent before it, answered after;
any isolate's kill, since a 502 does not say which isolate served it), a stream whose
isolate was killed, a stream whose deployment a redeploy replaced (its isolate is drained
and stopped). A connection reset, a timeout, a stalled stream, a 502 for a request sent
after a kill, or any other status is an error.

Trends: RSS and descriptors of the ``phloem up`` process (it holds the API, the gateway
and the supervisor), and directories in the platform's cgroup trees (the parents listed
in ``<data dir>/run/cgroups.json``), sampled every ``--sample-s``; a least-squares line
through the samples after the first fifth of the run (warm-up) gives the slope. A metric
is *flat within noise* when that line's rise over the fitted window is at most twice the
residuals' standard deviation, or a floor (RSS 2 MiB, 10 descriptors, one isolate's
groups). The quiet samples before and after must also match: the cgroup directories
differ by exactly one isolate's groups per isolate alive.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import csv
import json
import math
import os
import random
import resource
import signal
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import websockets
from _load import percentile
from _procs import cpu_seconds, descendants, exit_on_signals, fd_count, machine, rss_kib
from websockets.exceptions import ConnectionClosed, InvalidStatus

from phloem.testing import PlatformProcess, host_of, platform_process, wait_for

HERE = Path(__file__).resolve().parent
APP = HERE / "apps" / "soak"
LIMITS = ("--limit", "max_isolates=2", "--limit", "target_inflight=16")
HTTP_CONNECTIONS = 64
RAMP_CONNECTIONS = (4, 16, 64)
WORK_SHARE = 0.1  # of requests are GET /work?ms=20
REQUEST_TIMEOUT_S = 10.0
STALL_S = 5.0  # an SSE stream or WebSocket silent this long (1 s heartbeats) has stalled
STREAM_LIFE_S = (5.0, 30.0)
WARMUP_SHARE = 0.2
FLOORS = {"rss_mib": 2.0, "fds": 10.0}  # cgroups: one isolate's groups, set at run time
SPARK = "▁▂▃▄▅▆▇█"


def say(text: str = "") -> None:
    print(text, flush=True)


# -- what happened ---------------------------------------------------------------------------


@dataclass
class Incident:
    """Something that did not go as asked; classified once the run's churn is known."""

    kind: str  # http, sse, ws
    what: str  # "status 502", "connection reset", "stream ended", ...
    t0: float  # sent / opened (time.monotonic())
    t1: float  # failed
    status: int | None = None
    isolate: str | None = None  # for a stream: the isolate that served it
    deployment: str | None = None
    cut: bool = False  # the connection ended after the response head had arrived


@dataclass
class Churn:
    kills: list[tuple[float, str]] = field(default_factory=list)  # (time, isolate id)
    redeploys: list[tuple[float, float, str]] = field(default_factory=list)  # start, end, old
    failed: list[str] = field(default_factory=list)  # churn actions that could not be done

    def kill_in(self, t0: float, t1: float) -> float | None:
        """The time of a kill while a request sent at t0 and answered at t1 was in flight."""
        return next((k for k, _ in self.kills if t0 <= k <= t1), None)

    def explains(self, inc: Incident) -> tuple[str, float] | None:
        """(reason, seconds from the churn event to the failure) when churn explains it."""
        if inc.isolate is not None and inc.what in ("stream ended", "closed"):
            for k, iso in self.kills:
                if iso == inc.isolate and k <= inc.t1:
                    return "its isolate was killed", inc.t1 - k
            for start, _end, old in self.redeploys:
                if old == inc.deployment and start <= inc.t1:
                    return "its deployment was replaced by a redeploy", inc.t1 - start
            return None
        if (inc.status == 502 or inc.cut) and inc.isolate is None:
            kill = self.kill_in(inc.t0, inc.t1)
            if kill is not None:
                return ("502, in flight at a kill" if inc.status == 502 else
                        "cut after its head, in flight at a kill"), inc.t1 - kill
        return None


@dataclass
class Stats:
    http_ok: int = 0
    http_sent: int = 0
    latencies: list[float] = field(default_factory=list)  # seconds, 200s only
    sse_opened: int = 0
    sse_done: int = 0  # lived their whole life and were closed by us
    sse_beats: int = 0
    ws_opened: int = 0
    ws_done: int = 0
    ws_echoes: int = 0
    late_skips: int = 0  # paced sends dropped because a connection fell > 1 s behind
    incidents: list[Incident] = field(default_factory=list)


@dataclass
class Sample:
    t: float  # seconds since the soak started (negative: before it)
    rss_mib: float
    fds: int
    cgroups: int | None
    isolates: int  # in `phloem status` (retired ones still draining are not listed)
    sandboxes: int  # live isolates, retired included: mount namespaces below phloem up
    http_rps: float
    errors_and_churn: int
    fd_kinds: dict[str, int] = field(default_factory=dict)  # only in the quiet samples


# -- clients ---------------------------------------------------------------------------------


class HttpConn:
    """One keep-alive HTTP/1.1 connection to the gateway (reconnects when closed)."""

    def __init__(self, port: int, host: str) -> None:
        self.port, self.host = port, host
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        #: The status of a response whose head arrived and whose body is still due.
        self.partial: int | None = None

    async def get(self, path: str) -> int:
        self.partial = None
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)
        assert self.reader is not None
        self.writer.write(f"GET {path} HTTP/1.1\r\nHost: {self.host}\r\n\r\n".encode())
        head = await self.reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        length, close = 0, False
        for line in lines[1:]:
            name, _, value = line.partition(":")
            name = name.strip().lower()
            if name == "content-length":
                length = int(value)
            elif name == "connection" and value.strip().lower() == "close":
                close = True
        if length:
            self.partial = status
            await self.reader.readexactly(length)
            self.partial = None
        if close:
            self.close()
        return status

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None


def _path() -> str:
    return "/work?ms=20" if random.random() < WORK_SHARE else "/"


async def _one_request(conn: HttpConn, stats: Stats, record: bool) -> bool:
    path = _path()
    t0 = time.monotonic()
    stats.http_sent += 1
    try:
        status = await asyncio.wait_for(conn.get(path), REQUEST_TIMEOUT_S)
    except TimeoutError:
        conn.close()
        stats.incidents.append(Incident("http", f"no response in {REQUEST_TIMEOUT_S:g} s",
                                        t0, time.monotonic()))
        return False
    except (OSError, asyncio.IncompleteReadError, ValueError, IndexError) as exc:
        partial = conn.partial
        conn.close()
        if partial is not None:
            stats.incidents.append(Incident("http", f"response cut after its head (status "
                                            f"{partial})", t0, time.monotonic(), cut=True))
        else:
            stats.incidents.append(Incident("http", f"connection error: {exc!r}"[:120], t0,
                                            time.monotonic()))
        return False
    t1 = time.monotonic()
    if status == 200:
        stats.http_ok += 1
        if record:
            stats.latencies.append(t1 - t0)
        return True
    stats.incidents.append(Incident("http", f"status {status}", t0, t1, status=status))
    return False


async def closed_loop(port: int, host: str, connections: int, seconds: float,
                      stats: Stats) -> float:
    """Requests back to back on ``connections`` connections; returns the rate of 200s."""
    deadline = time.monotonic() + seconds
    ok0 = stats.http_ok

    async def worker() -> None:
        conn = HttpConn(port, host)
        try:
            while time.monotonic() < deadline:
                await _one_request(conn, stats, record=False)
        finally:
            conn.close()

    t0 = time.monotonic()
    await asyncio.gather(*(worker() for _ in range(connections)))
    return (stats.http_ok - ok0) / (time.monotonic() - t0)


async def paced_http(port: int, host: str, rate: float, stop_at: float, stats: Stats) -> None:
    """``rate`` requests/s spread over HTTP_CONNECTIONS connections on fixed schedules."""
    period = HTTP_CONNECTIONS / rate

    async def worker(i: int) -> None:
        conn = HttpConn(port, host)
        due = time.monotonic() + period * i / HTTP_CONNECTIONS  # out of phase
        try:
            while due < stop_at:
                now = time.monotonic()
                if due > now:
                    await asyncio.sleep(due - now)
                elif now - due > 1.0:  # fell behind: the rest of that second is lost
                    skipped = int((now - due) / period)
                    stats.late_skips += skipped
                    due += skipped * period
                await _one_request(conn, stats, record=True)
                due += period
        finally:
            conn.close()

    await asyncio.gather(*(worker(i) for i in range(HTTP_CONNECTIONS)))


async def sse_stream(port: int, host: str, stop_at: float, stats: Stats) -> None:
    """Open a stream, read its heartbeats for 5-30 s, close it; again until ``stop_at``."""
    request = (f"GET /events HTTP/1.1\r\nHost: {host}\r\nAccept: text/event-stream\r\n\r\n"
               .encode())
    while time.monotonic() < stop_at:
        life_end = min(stop_at, time.monotonic() + random.uniform(*STREAM_LIFE_S))
        t0 = time.monotonic()
        writer: asyncio.StreamWriter | None = None
        iso = dep = None
        got_head = False
        try:
            reader, opened = await asyncio.wait_for(
                asyncio.open_connection("127.0.0.1", port), REQUEST_TIMEOUT_S)
            writer = opened
            opened.write(request)
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), REQUEST_TIMEOUT_S)
            status = int(head.split(b" ", 2)[1])
            if status != 200:
                stats.incidents.append(Incident("sse", f"status {status}", t0,
                                                time.monotonic(), status=status))
                await asyncio.sleep(0.2)
                continue
            got_head = True
            buf = b""
            while b"\n\n" not in buf[buf.find(b"data: "):] or b"data: " not in buf:
                chunk = await asyncio.wait_for(reader.read(4096), REQUEST_TIMEOUT_S)
                if not chunk:
                    raise ConnectionError("closed before the first event")
                buf += chunk
            line = buf[buf.find(b"data: ") + 6:].split(b"\n", 1)[0].decode()
            iso, dep = line.split()
            stats.sse_opened += 1
            last = time.monotonic()
            while True:
                now = time.monotonic()
                if now >= life_end:
                    stats.sse_done += 1
                    break
                if now - last > STALL_S:
                    stats.incidents.append(Incident("sse", f"no heartbeat for {STALL_S:g} s",
                                                    t0, now, isolate=iso, deployment=dep))
                    break
                try:
                    chunk = await asyncio.wait_for(reader.read(4096),
                                                   min(life_end - now, STALL_S + 0.1))
                except TimeoutError:
                    continue
                if not chunk or b"\r\n0\r\n\r\n" in chunk or chunk.startswith(b"0\r\n\r\n"):
                    stats.incidents.append(Incident("sse", "stream ended", t0,
                                                    time.monotonic(), isolate=iso,
                                                    deployment=dep))
                    break
                stats.sse_beats += chunk.count(b": ping")
                last = time.monotonic()
        except (OSError, asyncio.IncompleteReadError, TimeoutError, ValueError) as exc:
            if iso is not None:  # the stream was open: it ended under us
                stats.incidents.append(Incident("sse", "stream ended", t0, time.monotonic(),
                                                isolate=iso, deployment=dep))
            else:
                stats.incidents.append(Incident("sse", f"open failed: {exc!r}"[:120], t0,
                                                time.monotonic(), cut=got_head))
            await asyncio.sleep(0.2)
        finally:
            if writer is not None:
                writer.close()


async def ws_stream(port: int, host: str, stop_at: float, stats: Stats) -> None:
    """Open a WebSocket, echo a message a second for 5-30 s, close it; again."""
    uri = f"ws://{host}/ws"
    while time.monotonic() < stop_at:
        life_end = min(stop_at, time.monotonic() + random.uniform(*STREAM_LIFE_S))
        t0 = time.monotonic()
        iso = dep = None
        try:
            async with websockets.connect(uri, host="127.0.0.1", port=port,
                                          open_timeout=REQUEST_TIMEOUT_S, ping_interval=None,
                                          close_timeout=5) as ws:
                hello = str(await asyncio.wait_for(ws.recv(), REQUEST_TIMEOUT_S))
                _, iso, dep = hello.split()
                stats.ws_opened += 1
                n = 0
                while True:
                    now = time.monotonic()
                    if now >= life_end:
                        break
                    await asyncio.sleep(min(1.0, life_end - now))
                    n += 1
                    await ws.send(f"m{n}")
                    try:
                        reply = await asyncio.wait_for(ws.recv(), STALL_S)
                    except TimeoutError:
                        stats.incidents.append(Incident("ws", f"no echo in {STALL_S:g} s", t0,
                                                        time.monotonic(), isolate=iso,
                                                        deployment=dep))
                        break
                    if reply != f"m{n}":
                        stats.incidents.append(Incident("ws", f"wrong echo {reply!r}"[:80], t0,
                                                        time.monotonic(), isolate=iso,
                                                        deployment=dep))
                        break
                    stats.ws_echoes += 1
                if time.monotonic() >= life_end:
                    stats.ws_done += 1
        except InvalidStatus as exc:
            code = exc.response.status_code
            stats.incidents.append(Incident("ws", f"status {code}", t0, time.monotonic(),
                                            status=code))
            await asyncio.sleep(0.2)
        except ConnectionClosed:
            stats.incidents.append(Incident("ws", "closed" if iso else "closed before hello",
                                            t0, time.monotonic(), isolate=iso, deployment=dep))
            await asyncio.sleep(0.2)
        except (OSError, TimeoutError, ValueError) as exc:
            stats.incidents.append(Incident("ws", f"error: {exc!r}"[:120], t0,
                                            time.monotonic(), isolate=iso, deployment=dep))
            await asyncio.sleep(0.2)


# -- the platform ----------------------------------------------------------------------------


@dataclass
class Target:
    p: PlatformProcess
    host: str
    deployment: str
    api: httpx.AsyncClient

    @property
    def pid(self) -> int:
        assert self.p.proc is not None
        return self.p.proc.pid

    async def isolates(self) -> list[dict[str, Any]]:
        """The function's isolates in ``GET /status``; a request that meets a keep-alive
        connection the API is closing is sent again (three tries)."""
        for attempt in range(3):
            try:
                resp = await self.api.get("/status")
                break
            except httpx.TransportError:
                if attempt == 2:
                    raise
                await asyncio.sleep(0.2)
        resp.raise_for_status()
        return [i for i in resp.json()["isolates"] if i["function"] == "soak"]

    def cgroup_parents(self) -> list[Path]:
        record = self.p.data_dir / "run" / "cgroups.json"
        try:
            return [Path(p) for p in json.loads(record.read_text())]
        except (OSError, ValueError):
            return []

    def cgroup_dirs(self) -> int | None:
        """Directories in the platform's cgroup trees (None: it has none, not root)."""
        parents = self.cgroup_parents()
        if not parents:
            return None
        return sum(sum(1 for _ in os.walk(p)) for p in parents if p.is_dir())


async def churn_loop(t: Target, churn: Churn, stop_at: float, kill_every: float,
                     redeploy_every: float) -> None:
    loop_start = time.monotonic()
    next_kill = loop_start + kill_every
    next_redeploy = loop_start + redeploy_every
    round_ = 0
    while True:
        due = min(next_kill, next_redeploy)
        if due >= stop_at - 2:  # leave the last seconds without churn to settle
            return
        await asyncio.sleep(max(0.0, due - time.monotonic()))
        if due == next_redeploy:
            next_redeploy += redeploy_every
            round_ += 1
            start = time.monotonic()
            old = t.deployment
            try:
                fn = await asyncio.to_thread(t.p.deploy, "soak", APP, *LIMITS, "--env",
                                             f"ROUND={round_}")
            except AssertionError as exc:
                churn.failed.append(f"redeploy {round_}: {exc}"[:300])
                continue
            t.deployment = fn["deployment_id"]
            churn.redeploys.append((start, time.monotonic(), old))
        else:
            next_kill += kill_every
            live = [i for i in await t.isolates() if i["state"] == "ready" and i["pid"]]
            if not live:
                churn.failed.append("kill: no ready isolate")
                continue
            victim = random.choice(live)
            churn.kills.append((time.monotonic(), victim["id"]))
            with contextlib.suppress(ProcessLookupError):
                os.kill(victim["pid"], signal.SIGKILL)


async def churn_safely(t: Target, churn: Churn, stop_at: float, kill_every: float,
                       redeploy_every: float) -> None:
    """:func:`churn_loop`; if it fails the load goes on without churn, and the report
    says so (an unexpected error must not throw away a long run's figures)."""
    try:
        await churn_loop(t, churn, stop_at, kill_every, redeploy_every)
    except (httpx.HTTPError, OSError, ValueError, KeyError) as exc:
        churn.failed.append(f"churn stopped: {exc!r}"[:300])


def fd_kinds(pid: int) -> dict[str, int]:
    """``pid``'s descriptors by what they are: socket, pipe, anon_inode:[pidfd], a file's
    directory, ..."""
    kinds: dict[str, int] = {}
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        kind = target.split(":[", 1)[0] if target.startswith(("socket:", "pipe:")) else target
        if kind.startswith("/"):
            kind = str(Path(kind).parent) + "/*"
        kinds[kind] = kinds.get(kind, 0) + 1
    return kinds


def sandboxes(pid: int) -> int:
    """Distinct mount namespaces other than ours below ``pid``: one per live sandboxed
    isolate (a build or entry check counts too while it runs)."""
    ours = os.readlink("/proc/self/ns/mnt")
    found = set()
    for child in descendants(pid):
        with contextlib.suppress(OSError):
            ns = os.readlink(f"/proc/{child}/ns/mnt")
            if ns != ours:
                found.add(ns)
    return len(found)


async def sample(t: Target, stats: Stats, t_zero: float, http_rate: float) -> Sample:
    isolates = await t.isolates()
    return Sample(time.monotonic() - t_zero, rss_kib(t.pid) / 1024, fd_count(t.pid),
                  t.cgroup_dirs(), len(isolates), sandboxes(t.pid), http_rate,
                  len(stats.incidents))


async def sampler(t: Target, stats: Stats, t_zero: float, stop_at: float, every: float,
                  out: list[Sample]) -> None:
    """A sample every ``every`` s while the load runs (none in its last second, when the
    clients are already closing)."""
    sent, at = stats.http_sent, time.monotonic()
    due = at
    while due < stop_at - 1.0:
        await asyncio.sleep(max(0.0, due - time.monotonic()))
        now = time.monotonic()
        rate = (stats.http_sent - sent) / (now - at) if now > at else 0.0
        sent, at = stats.http_sent, now
        try:
            out.append(await sample(t, stats, t_zero, rate))
        except (httpx.HTTPError, OSError, ValueError, KeyError) as exc:
            say(f"   sample at {now - t_zero:.0f} s failed: {exc!r}")
        due += every


async def wait_quiet(t: Target, timeout: float = 60.0) -> None:
    """Until no isolate of the function has a request or stream open."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        isolates = await t.isolates()
        if all(i["inflight"] == 0 and i["open_streams"] == 0 and i["state"] == "ready"
               for i in isolates):
            await asyncio.sleep(1.0)  # let exits, cgroup removal and idle reaping finish
            if [i["id"] for i in await t.isolates()] == [i["id"] for i in isolates]:
                return
        await asyncio.sleep(0.5)
    say(f"   (the platform did not become quiet within {timeout:.0f} s)")


# -- analysis --------------------------------------------------------------------------------


@dataclass
class Trend:
    name: str
    unit: str
    slope_per_min: float
    rise: float  # slope * fitted window
    noise: float  # residual standard deviation
    tolerance: float
    first: float
    last: float
    lo: float
    hi: float
    per_isolate: float | None = None  # the fit's coefficient of the live isolates

    @property
    def flat(self) -> bool:
        return abs(self.rise) <= self.tolerance


def fit(xs: list[float], ys: list[float], zs: list[float] | None = None
        ) -> tuple[float, float | None, float]:
    """Least squares y = a + b x (+ c z when ``zs`` varies independently of ``xs``):
    (b, c or None, residual standard deviation).

        fit([0, 1, 2], [5, 7, 9])                  # (2.0, None, 0.0)
    """
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    dx = [x - mx for x in xs]
    dy = [y - my for y in ys]
    sxx = sum(d * d for d in dx)
    sxy = sum(a * b for a, b in zip(dx, dy, strict=True))
    if zs is not None:
        mz = sum(zs) / n
        dz = [z - mz for z in zs]
        szz = sum(d * d for d in dz)
        sxz = sum(a * b for a, b in zip(dx, dz, strict=True))
        szy = sum(a * b for a, b in zip(dz, dy, strict=True))
        det = sxx * szz - sxz * sxz
        if szz and det > 1e-9 * sxx * szz:
            b = (szz * sxy - sxz * szy) / det
            c = (sxx * szy - sxz * sxy) / det
            resid = [y - b * x - c * z for x, y, z in zip(dx, dy, dz, strict=True)]
            noise = math.sqrt(sum(r * r for r in resid) / (n - 3)) if n > 3 else 0.0
            return b, c, noise
    b = sxy / sxx if sxx else 0.0
    resid = [y - b * x for x, y in zip(dx, dy, strict=True)]
    noise = math.sqrt(sum(r * r for r in resid) / (n - 2)) if n > 2 else 0.0
    return b, None, noise


def trend(name: str, unit: str, samples: list[Sample], get: Callable[[Sample], float],
          floor: float, duration: float, *, per_isolate: bool = True) -> Trend:
    """The line through the samples after the warm-up, against time and (with
    ``per_isolate``) the number of live isolates, which redeploys and kills move: a
    retired isolate draining its streams holds descriptors and groups of its own."""
    kept = [s for s in samples if s.t >= WARMUP_SHARE * duration] or samples
    xs = [s.t / 60 for s in kept]
    ys = [get(s) for s in kept]
    zs = [float(s.sandboxes) for s in kept] if per_isolate else None
    slope, each, noise = fit(xs, ys, zs)
    window = xs[-1] - xs[0] if len(xs) > 1 else 0.0
    every = [get(s) for s in samples]
    return Trend(name, unit, slope, slope * window, noise, max(2 * noise, floor),
                 every[0], every[-1], min(every), max(every), each)


def sparkline(values: list[float], width: int = 60) -> str:
    if not values:
        return ""
    if len(values) > width:  # the mean of each of ``width`` buckets
        step = len(values) / width
        values = [statistics.fmean(values[int(i * step):max(int((i + 1) * step),
                                                          int(i * step) + 1)])
                  for i in range(width)]
    lo, hi = min(values), max(values)
    span = hi - lo or 1.0
    return "".join(SPARK[min(len(SPARK) - 1, int((v - lo) / span * len(SPARK)))]
                   for v in values)


# -- the run ---------------------------------------------------------------------------------


@dataclass
class Run:
    args: argparse.Namespace
    capacity: float | None = None
    rate: float = 0.0
    stats: Stats = field(default_factory=Stats)
    churn: Churn = field(default_factory=Churn)
    samples: list[Sample] = field(default_factory=list)
    before: Sample | None = None
    after: Sample | None = None
    cgroup_hierarchies: int = 0
    cpu: dict[str, float] = field(default_factory=dict)  # share of one core, soak phase

    def cgroup_excess(self, s: Sample) -> float:
        """Directories beyond what the live isolates need: the parent, the function's
        group while it has isolates, one group per isolate, in each hierarchy."""
        need = 1 + (1 + s.sandboxes if s.sandboxes else 0)
        return float((s.cgroups or 0) - self.cgroup_hierarchies * need)


async def measure_capacity(t: Target, run: Run) -> float:
    say(f"## capacity: this client, closed loop, {run.args.ramp_s:g} s per step, "
        f"{1 - WORK_SHARE:.0%} GET / + {WORK_SHARE:.0%} GET /work?ms=20")
    best = 0.0
    ramp = Stats()
    for conns in RAMP_CONNECTIONS:
        gw0, me0, w0 = cpu_seconds(t.pid), time.process_time(), time.monotonic()
        rps = await closed_loop(t.p.gateway_port, t.host, conns, run.args.ramp_s, ramp)
        wall = time.monotonic() - w0
        gw, me = (cpu_seconds(t.pid) - gw0) / wall, (time.process_time() - me0) / wall
        say(f"   {conns:>3} connections  {rps:8,.0f} req/s   CPU: phloem up {gw:.0%}, "
            f"this client {me:.0%} (of one core)")
        best = max(best, rps)
    if ramp.incidents:
        say(f"   {len(ramp.incidents)} failures during the ramp, first: "
            f"{ramp.incidents[0].what}")
    say(f"   capacity {best:,.0f} req/s; load average (1 min) {os.getloadavg()[0]:.2f}")
    return best


async def soak(t: Target, run: Run) -> None:
    args = run.args
    if args.rps:
        run.rate = args.rps
        say(f"## target rate {run.rate:,.0f} req/s (--rps)")
    else:
        run.capacity = await measure_capacity(t, run)
        run.rate = run.capacity / 2
    say()
    await wait_quiet(t)
    t_zero = time.monotonic()
    run.before = await sample(t, run.stats, t_zero, 0.0)
    run.before.fd_kinds = fd_kinds(t.pid)
    run.cgroup_hierarchies = len(t.cgroup_parents())
    duration = args.minutes * 60
    stop_at = t_zero + duration
    say(f"## soak: {args.minutes:g} min; HTTP {run.rate:,.0f} req/s on {HTTP_CONNECTIONS} "
        f"connections; {args.sse} SSE streams and {args.ws} WebSockets, each reopened every "
        f"{STREAM_LIFE_S[0]:g}-{STREAM_LIFE_S[1]:g} s; kill -9 of an isolate every "
        f"{args.kill_every:g} s, a redeploy every {args.redeploy_every:g} s; a sample every "
        f"{args.sample_s:g} s")
    gw0, me0 = cpu_seconds(t.pid), time.process_time()
    tasks: list[Awaitable[None]] = [
        paced_http(t.p.gateway_port, t.host, run.rate, stop_at, run.stats),
        *(sse_stream(t.p.gateway_port, t.host, stop_at, run.stats) for _ in range(args.sse)),
        *(ws_stream(t.p.gateway_port, t.host, stop_at, run.stats) for _ in range(args.ws)),
        churn_safely(t, run.churn, stop_at, args.kill_every, args.redeploy_every),
        sampler(t, run.stats, t_zero, stop_at, args.sample_s, run.samples),
        progress(run, t_zero, stop_at),
    ]
    await asyncio.gather(*tasks)
    wall = time.monotonic() - t_zero
    run.cpu = {"phloem up": (cpu_seconds(t.pid) - gw0) / wall,
               "this client": (time.process_time() - me0) / wall}
    say("## quiet: every client closed, waiting for the platform to be idle")
    await wait_quiet(t)
    run.after = await sample(t, run.stats, t_zero, 0.0)
    run.after.fd_kinds = fd_kinds(t.pid)


async def progress(run: Run, t_zero: float, stop_at: float) -> None:
    """A line a minute (every 10 s in runs under two minutes), so a long run shows life."""
    every = 10.0 if run.args.minutes < 2 else 60.0
    while time.monotonic() + every <= stop_at + 0.5:
        await asyncio.sleep(every)
        s = run.samples[-1] if run.samples else None
        if s is not None:
            cg = "n/a" if s.cgroups is None else str(s.cgroups)
            say(f"   {time.monotonic() - t_zero:5.0f} s  {s.http_rps:7,.0f} req/s  RSS "
                f"{s.rss_mib:6.1f} MiB  fds {s.fds:4d}  cgroup dirs {cg:>3}  isolates "
                f"{s.sandboxes}  failures so far {len(run.stats.incidents)} (churn and "
                f"errors)  kills {len(run.churn.kills)}  redeploys {len(run.churn.redeploys)}")


def report(run: Run) -> int:
    args, st, churn = run.args, run.stats, run.churn
    duration = args.minutes * 60
    say()
    say("## results")
    sent_rate = st.http_sent / duration
    say(f"   HTTP: {st.http_sent:,} requests ({sent_rate:,.0f} req/s sent, "
        f"{sent_rate / run.rate:.0%} of the target {run.rate:,.0f}), {st.http_ok:,} x 200; "
        f"latency of 200s p50 "
        f"{percentile(st.latencies, 50) * 1000:.2f} ms, p99 "
        f"{percentile(st.latencies, 99) * 1000:.2f} ms, max "
        f"{max(st.latencies, default=math.nan) * 1000:.0f} ms"
        + (f"; {st.late_skips:,} sends skipped (a connection > 1 s behind)"
           if st.late_skips else ""))
    say(f"   SSE: {st.sse_opened:,} streams opened, {st.sse_done:,} lived their whole life, "
        f"{st.sse_beats:,} heartbeats")
    say(f"   WebSocket: {st.ws_opened:,} opened, {st.ws_done:,} lived their whole life, "
        f"{st.ws_echoes:,} echoes")
    say(f"   churn: {len(churn.kills)} isolate kills, {len(churn.redeploys)} redeploys"
        + (f"; {len(churn.failed)} not done: {churn.failed[0]}" if churn.failed else ""))
    say("   CPU during the soak (share of one core): "
        + ", ".join(f"{k} {v:.0%}" for k, v in run.cpu.items())
        + f"; load average (1 min) {os.getloadavg()[0]:.2f}")
    explained: dict[tuple[str, str], list[float]] = {}
    errors: dict[tuple[str, str], list[Incident]] = {}
    for inc in st.incidents:
        explanation = churn.explains(inc)
        if explanation:
            explained.setdefault((inc.kind, explanation[0]), []).append(explanation[1])
        else:
            what = inc.what
            if inc.status == 502 and churn.kills:
                since = [inc.t0 - k for k, _ in churn.kills if k <= inc.t0]
                if since and min(since) < 1.0:
                    what += " (sent < 1 s after a kill, not in flight at it)"
            errors.setdefault((inc.kind, what), []).append(inc)
    n_errors = sum(len(v) for v in errors.values())
    say(f"   errors: {n_errors}   (must be 0)  {'met' if n_errors == 0 else 'MISSED'}")
    for (kind, what), incs in sorted(errors.items()):
        say(f"     {len(incs):6,} {kind}: {what}")
    if any("not in flight at it" in what for _, what in errors):
        say("     (a 502 for a request sent after a kill, not in flight at it: the symptom of "
            "item 4 of issue 11, requests written to pooled connections of the dead isolate; "
            "only requests in flight at a crash may fail)")
    say(f"   failures explained by churn (counted apart): "
        f"{sum(len(v) for v in explained.values())}")
    for (kind, why), delays in sorted(explained.items()):
        say(f"     {len(delays):6,} {kind}: {why}; after the event: max "
            f"{max(delays) * 1000:.0f} ms, p50 {percentile(delays, 50) * 1000:.0f} ms")
    if any(k == "http" for k, _ in explained):
        say("     (a 502 in flight at a kill is what a client sees when the isolate serving "
            "its request dies: the gateway answers for it; streams of a killed isolate end, "
            "those of a replaced deployment end when the old isolate is stopped)")

    flat_all = _trends(run, duration)
    _compare_quiet(run)
    if args.csv:
        _write_csv(Path(args.csv), run.samples)
        say(f"   samples written to {args.csv}")
    return 0 if n_errors == 0 and flat_all else 1


def _trends(run: Run, duration: float) -> bool:
    samples = run.samples
    if len(samples) < 3:
        say("   too few samples for trends")
        return False
    say(f"## trends over {duration / 60:g} min ({len(samples)} samples; least squares after "
        f"the first {WARMUP_SHARE:.0%}, against time and the live isolates; flat = rise over "
        f"the fitted window <= max(2 x residual s.d., floor))")
    trends = [trend("phloem up RSS", "MiB", samples, lambda s: s.rss_mib, FLOORS["rss_mib"],
                    duration),
              trend("phloem up descriptors", "", samples, lambda s: s.fds, FLOORS["fds"],
                    duration)]
    has_cgroups = all(s.cgroups is not None for s in samples)
    if has_cgroups:
        one = float(max(1, run.cgroup_hierarchies))  # one isolate's groups
        trends.append(trend("cgroup directories", "", samples, lambda s: s.cgroups or 0,
                            one, duration))
        trends.append(trend("  beyond live isolates", "", samples, run.cgroup_excess, one,
                            duration, per_isolate=False))
    else:
        say("   cgroup directories: n/a (the platform has no cgroup tree: not root?)")
    for tr in trends:
        say(f"   {tr.name:<22} {tr.first:8.1f} -> {tr.last:8.1f} {tr.unit:<3} (min {tr.lo:.1f},"
            f" max {tr.hi:.1f})  slope {tr.slope_per_min:+.3f} {tr.unit}/min, rise "
            f"{tr.rise:+.1f} vs tolerance {tr.tolerance:.1f} (noise {tr.noise:.2f}): "
            f"{'flat within noise' if tr.flat else 'NOT flat'}"
            + ("" if tr.per_isolate is None else
               f"; {tr.per_isolate:+.1f} per live isolate"))
    say("   over time (each row from its minimum to its maximum):")
    rows: list[tuple[str, list[float]]] = [
        ("RSS MiB", [s.rss_mib for s in samples]), ("fds", [float(s.fds) for s in samples])]
    if has_cgroups:
        rows.append(("cgroups", [float(s.cgroups or 0) for s in samples]))
        rows.append(("  excess", [run.cgroup_excess(s) for s in samples]))
    rows += [("isolates", [float(s.sandboxes) for s in samples]),
             ("req/s", [s.http_rps for s in samples[1:]])]
    for label, values in rows:
        say(f"   {label:<9} {min(values):8.1f} {sparkline(values)} {max(values):.1f}")
    return all(tr.flat for tr in trends)


def _compare_quiet(run: Run) -> None:
    b, a = run.before, run.after
    if b is None or a is None:
        return
    say(f"## quiet before vs after: live isolates {b.sandboxes} -> {a.sandboxes}, RSS "
        f"{b.rss_mib:.1f} -> {a.rss_mib:.1f} MiB, descriptors {b.fds} -> {a.fds}, cgroup "
        f"directories {b.cgroups} -> {a.cgroups}")
    changed = {k: a.fd_kinds.get(k, 0) - b.fd_kinds.get(k, 0)
               for k in {*a.fd_kinds, *b.fd_kinds}}
    changed = {k: v for k, v in changed.items() if v}
    if changed:
        say("   descriptors that changed, by kind: " + ", ".join(
            f"{k} {v:+d}" for k, v in sorted(changed.items(), key=lambda kv: -abs(kv[1]))))
    if b.cgroups is not None and a.cgroups is not None and run.cgroup_hierarchies:
        left = [run.cgroup_excess(x) for x in (b, a)]
        say(f"   cgroup directories beyond the live isolates' ({run.cgroup_hierarchies} "
            f"hierarchies): before {left[0]:.0f}, after {left[1]:.0f}   "
            f"{'met' if left[1] <= max(0.0, left[0]) else 'MISSED'}")


def _write_csv(path: Path, samples: list[Sample]) -> None:
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["t_s", "rss_mib", "fds", "cgroup_dirs", "isolates_in_status",
                    "live_isolates", "http_rps", "failures"])
        for s in samples:
            w.writerow([f"{s.t:.1f}", f"{s.rss_mib:.2f}", s.fds,
                        "" if s.cgroups is None else s.cgroups, s.isolates, s.sandboxes,
                        f"{s.http_rps:.0f}", s.errors_and_churn])


# -- main ------------------------------------------------------------------------------------


def _positive(text: str) -> float:
    value = float(text)
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text!r}")
    return value


def _count(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {text!r}")
    return value


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--minutes", type=_positive, default=10.0,
                        help="length of the soak (default 10)")
    parser.add_argument("--rps", type=_positive, default=None,
                        help="HTTP requests/s to hold (default: half the measured capacity)")
    parser.add_argument("--ramp-s", type=_positive, default=3.0,
                        help="seconds per capacity step (default 3)")
    parser.add_argument("--sse", type=_count, default=40, help="SSE streams (default 40)")
    parser.add_argument("--ws", type=_count, default=40, help="WebSockets (default 40)")
    parser.add_argument("--kill-every", type=_positive, default=15.0,
                        help="seconds between isolate kills (default 15)")
    parser.add_argument("--redeploy-every", type=_positive, default=60.0,
                        help="seconds between redeploys (default 60)")
    parser.add_argument("--sample-s", type=_positive, default=None,
                        help="seconds between samples (default: minutes, 2..10)")
    parser.add_argument("--csv", help="write the samples to this CSV file")
    args = parser.parse_args(argv)
    if args.sample_s is None:
        args.sample_s = min(10.0, max(2.0, args.minutes))
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # the platform inherits it
    say(f"phloem soak; {machine()}")
    say(f"load average (1 min) before starting: {os.getloadavg()[0]:.2f}")
    started = time.monotonic()
    with ExitStack() as stack:
        stack.enter_context(exit_on_signals())
        p = stack.enter_context(platform_process())
        fn = p.deploy("soak", APP, *LIMITS)
        host = host_of(fn["invocation_url"])
        with p.gateway(host) as gw:
            wait_for(lambda: gw.get("/").status_code == 200, 60, "the soak app")
        creds = p.credentials
        run = Run(args)

        async def go() -> None:
            # Idle connections dropped after 1 s: the API closes them after 5 s, and a
            # request sent on one it is closing fails.
            async with httpx.AsyncClient(
                    base_url=creds["api_url"] + "/api/v1", timeout=60,
                    limits=httpx.Limits(keepalive_expiry=1.0),
                    headers={"Authorization": f"Bearer {creds['api_key']}"}) as api:
                await soak(Target(p, host, fn["deployment_id"], api), run)

        try:
            import uvloop

            factory: Callable[[], asyncio.AbstractEventLoop] | None = uvloop.new_event_loop
        except ImportError:
            factory = None
        with asyncio.Runner(loop_factory=factory) as runner:
            runner.run(go())
    code = report(run)
    say(f"(whole run: {time.monotonic() - started:.0f} s; load average (1 min) "
        f"{os.getloadavg()[0]:.2f} at the end)")
    return code


if __name__ == "__main__":
    sys.exit(main())
