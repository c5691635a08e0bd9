"""kill -9 of an isolate under concurrent keep-alive load, 100 rounds: only the requests in
flight at the kill fail, each with a 502 within a second; no request hangs; the first
request after the kill is served by a restarted isolate.

"In flight at the kill" is told apart by time: a request the client started after the
killed process was seen exiting (``/proc``) could never have reached it, so it must
succeed; a request started before may fail, with a 502, within a second of the kill.
Every round also has one request that is surely in flight (``/hang``, seen by the app)
and so must get its 502. The load (CLIENTS keep-alive connections, each sending requests
back to back) keeps a pool of upstream connections to the isolate open, which is what
stale pooled connections used to turn into 502s for requests after the kill.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from phloem.testing import PlatformProcess, host_of
from tests.conftest import Reliability

APP = Path(__file__).parent.parent / "apps" / "upstream"
ROUNDS = 100
CLIENTS = 24
DEADLINE = 5.0  # a request taking longer has hung
PF_EXITING = 0x4
CUT = -2


class Cut(Exception):
    """The response was cut off after its head: the isolate died while writing it (its
    head had already gone to the client, so it cannot become a 502)."""


@dataclass
class Result:
    started: float
    ended: float
    #: 0: the connection failed without a response; -1: hung past DEADLINE; CUT: the
    #: response head came, then the connection closed mid-body.
    status: int
    isolate: str | None = None
    hanging: int = 0


@dataclass
class Load:
    port: int
    host: str
    results: list[Result] = field(default_factory=list)
    total: int = 0
    stop: bool = False

    async def client(self) -> None:
        conn: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        while not self.stop:
            started = time.monotonic()
            try:
                if conn is None:
                    conn = await asyncio.open_connection("127.0.0.1", self.port)
                status, close, body = await asyncio.wait_for(
                    request(*conn, self.host, "/info"), DEADLINE)
            except TimeoutError:
                self.results.append(Result(started, time.monotonic(), -1))
                close = True
            except Cut:
                self.results.append(Result(started, time.monotonic(), CUT))
                close = True
            except (OSError, asyncio.IncompleteReadError):
                self.results.append(Result(started, time.monotonic(), 0))
                close = True
            except Exception as exc:  # the test's own fault: stop the round at once
                self.results.append(Result(started, time.monotonic(), 0, repr(exc)))
                raise
            else:
                info = json.loads(body) if status == 200 else {}
                self.results.append(Result(started, time.monotonic(), status,
                                           info.get("isolate"), info.get("hanging", 0)))
            self.total += 1
            if close and conn is not None:
                conn[1].close()
                conn = None
        if conn is not None:
            conn[1].close()


async def request(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, host: str,
                  path: str) -> tuple[int, bool, bytes]:
    """One keep-alive GET: (status, whether the connection must close, body)."""
    writer.write(f"GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
    head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").lower()
    status = int(head.split(None, 2)[1])
    length = int(head.split("content-length:", 1)[1].split("\r\n", 1)[0])
    try:
        body = await reader.readexactly(length)
    except asyncio.IncompleteReadError:
        raise Cut(status) from None
    return status, "connection: close" in head, body


def exiting(pid: int) -> bool:
    """Has ``pid`` begun to exit (or gone)? Its sockets close as it exits."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return True
    fields = stat.rsplit(b") ", 1)[1].split()
    return fields[0] in (b"Z", b"X") or bool(int(fields[6]) & PF_EXITING)


async def wait_async(predicate: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.002)
    return value


@dataclass
class Kills:
    """The rounds so far, and the judgement of every finished request."""

    load: Load
    pid_of: Any
    kills: list[Kill] = field(default_factory=list)
    checked: int = 0  # load.results before this index are judged
    worst_502: float = 0.0
    in_flight_502: int = 0
    cut: int = 0

    async def round(self) -> None:
        load = self.load
        since = self.kills[-1].dead_at if self.kills else 0.0
        serving: str = await wait_async(
            lambda: next((r.isolate for r in reversed(load.results)
                          if r.status == 200 and r.started >= since), None),
            30, "a response")
        pid = await asyncio.to_thread(self.pid_of, serving)
        assert pid is not None, f"{serving} is not ready in the status"
        hang = asyncio.create_task(one_request(load.port, load.host, "/hang"))
        # Surely in flight: the app counts it.
        await wait_async(lambda: hang.done() or any(
            r.hanging and r.isolate == serving for r in load.results[-CLIENTS:]),
            10, "the /hang request to reach the app")
        killed_at = time.monotonic()
        os.kill(pid, signal.SIGKILL)
        await wait_async(lambda: exiting(pid), 5, "the isolate to exit")
        kill = Kill(serving, killed_at, time.monotonic())
        self.kills.append(kill)
        hang_status, hang_ended = await hang
        self.worst_502 = max(self.worst_502, hang_ended - killed_at)
        if hang_status != 502 or hang_ended - killed_at > 1.0:
            kill.problems.append(f"/hang in flight: {hang_status} after "
                                 f"{hang_ended - killed_at:.3f} s")
        # The first request started after the exit, and one started after that.
        first: Result = await wait_async(lambda: min(
            (r for r in load.results if r.started >= kill.dead_at),
            key=lambda r: r.started, default=None), 10, "a request after the kill")
        await wait_async(lambda: any(r.started > first.started for r in load.results),
                         10, "more requests")
        if first.status != 200 or first.isolate == serving:
            kill.problems.append(f"first request after the kill: {first.status} "
                                 f"from {first.isolate}")
        self.judge()
        load.results = load.results[-CLIENTS:]  # what later rounds still look at
        self.checked = len(load.results)

    def judge(self) -> None:
        """Judge each finished request by the last kill before its end."""
        for r in self.load.results[self.checked:]:
            kill = next((k for k in reversed(self.kills) if k.killed_at <= r.ended), None)
            if r.status == 200:
                if kill is not None and r.started >= kill.dead_at and r.isolate == kill.isolate:
                    kill.problems.append("served by the killed isolate after its exit")
            elif kill is None:
                raise AssertionError(f"status {r.status} before any kill")
            elif r.status in (502, CUT) and r.started < kill.dead_at:
                if r.status == CUT:
                    self.cut += 1
                else:
                    self.in_flight_502 += 1
                    self.worst_502 = max(self.worst_502, r.ended - kill.killed_at)
                if r.ended - kill.killed_at > 1.0:
                    kill.problems.append(f"{r.status} after {r.ended - kill.killed_at:.3f} s")
            else:
                when = "before" if r.started < kill.dead_at else "after"
                kill.problems.append(f"status {r.status} for a request started {when} "
                                     "the exit")
        self.checked = len(self.load.results)


async def test_isolate_kill_under_load(platform: PlatformProcess,
                                       reliability: Reliability) -> None:
    fn = platform.deploy("killed", APP, "--limit", "max_isolates=1")
    assert fn["status"] == "ready", fn
    api = platform.api()

    def pid_of(isolate: str) -> int | None:
        for i in api.get("/status").json()["isolates"]:
            if i["id"] == isolate and i["state"] == "ready":
                return int(i["pid"])
        return None

    load = Load(platform.gateway_port, host_of(fn["invocation_url"]))
    run = Kills(load, pid_of)
    clients = [asyncio.create_task(load.client()) for _ in range(CLIENTS)]
    began = time.monotonic()
    try:
        for _ in range(ROUNDS):
            await run.round()
    finally:
        load.stop = True
        await asyncio.wait_for(asyncio.gather(*clients, return_exceptions=True), 30)
        api.close()
    run.judge()
    elapsed = time.monotonic() - began
    passed = sum(1 for k in run.kills if not k.problems)
    reliability.record(
        rounds=ROUNDS, passed=passed,
        figure=f"502 in {run.worst_502 * 1000:.0f} ms max; {run.in_flight_502} more "
               f"in-flight 502s besides the {ROUNDS} /hang ones, {run.cut} cut mid-body; "
               f"{load.total} requests "
               f"from {CLIENTS} keep-alive clients; {elapsed:.0f} s")
    failures = [f"round {n}: {k.problems}" for n, k in enumerate(run.kills) if k.problems]
    assert not failures, "\n".join(failures[:20])
    assert passed == ROUNDS


@dataclass
class Kill:
    isolate: str
    killed_at: float
    dead_at: float  # the process was seen exiting
    problems: list[str] = field(default_factory=list)


async def one_request(port: int, host: str, path: str) -> tuple[int, float]:
    """(status, when it ended) of one request on its own connection; -1 if it hung."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        status, _, _ = await asyncio.wait_for(request(reader, writer, host, path), DEADLINE)
    except TimeoutError:
        status = -1
    except (OSError, asyncio.IncompleteReadError):
        status = 0
    finally:
        writer.close()
    return status, time.monotonic()
