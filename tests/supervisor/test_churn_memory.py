"""Isolate churn leaves nothing behind in ``phloem up``: after rounds of keep-alive HTTP
requests, an SSE stream and a WebSocket, each ended by a ``kill -9`` of the isolate or by
a redeploy, the objects the platform holds are those it held rounds earlier (issue 11: the
soak, bench/soak.py, saw RSS rise with kills and redeploys; a leaked isolate, pool, lease,
relay or upstream connection per round would show here as a count growing with rounds).

The platform is ``phloem up`` run by tests/supervisor/counted_up.py, which answers on a
Unix socket with its gc objects by type and its allocated blocks (out of band: no route,
no request through the gateway or the API is counted). Counts are taken at rest (one
isolate, ready, no client connected), after rounds of the same kind.

Its own platform: other tests' isolates must not move the counts."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import websockets

from phloem.testing import (
    PlatformProcess,
    free_port,
    host_of,
    new_data_dir,
    wait_for,
)
from tests.conftest import Reliability

#: The soak's own app: ``GET /``, SSE ``/events``, WebSocket echo ``/ws``.
APP = Path(__file__).resolve().parent.parent.parent / "bench" / "apps" / "soak"
COUNTED_UP = Path(__file__).resolve().parent / "counted_up.py"
WARMUP = 5  # rounds before the first count: caches and free lists fill up
ROUNDS = 16  # rounds between the two counts (both counts follow a kill: same kind)
REDEPLOY_EVERY = 4  # every 4th round is a redeploy, the others a kill -9
BURST = 4  # concurrent keep-alive requests, three times per round
#: Classes one leaked isolate, deployment or exchange would add, and how many more of
#: each the second count may show: at rest there is one isolate of one deployment and
#: no exchange, so those counts are exact (a leak per redeploy adds 4 here); upstream
#: connections and their tasks vary with what stays pooled (a leak per round adds 16).
WATCHED = {"Isolate": 1, "Pool": 1, "IsolateSpec": 1, "CgroupSlot": 1, "ZygoteProcess": 1,
           "Lease": 1, "_Relay": ROUNDS // 2, "_Connection": ROUNDS // 2,
           "UnixTransport": ROUNDS // 2, "StreamReader": ROUNDS // 2,
           "StreamWriter": ROUNDS // 2, "Task": ROUNDS // 2, "Future": ROUNDS // 2}
#: All objects / allocated blocks (strings and bytes too) a round may leave on average
#: (measured over 16 rounds: +3 to +98 objects (a database pool connection opened: ~90),
#: +250 to +394 blocks).
OBJECTS_PER_ROUND = 16
BLOCKS_PER_ROUND = 60


@dataclass
class CountedPlatform(PlatformProcess):
    count_socket: str = ""

    @property
    def env(self) -> dict[str, str]:
        return {**super().env, "PHLOEM_TEST_COUNT_SOCKET": self.count_socket}

    def args(self) -> list[str]:
        return [sys.executable, str(COUNTED_UP), *super().args()[1:]]

    def counts(self) -> dict[str, Any]:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(60)
            s.connect(self.count_socket)
            data = b""
            while chunk := s.recv(65536):
                data += chunk
        reply: dict[str, Any] = json.loads(data)
        return reply


@contextmanager
def counted_platform() -> Iterator[CountedPlatform]:
    data_dir = new_data_dir()
    p = CountedPlatform(data_dir, free_port(), free_port(),
                        count_socket=str(data_dir.parent / f"{data_dir.name}.count.sock"))
    p.launch()
    try:
        p.wait_ready()
        yield p
    finally:
        p.cleanup()
        Path(p.count_socket).unlink(missing_ok=True)


async def _traffic(port: int, host: str) -> None:
    """Keep-alive bursts (several pooled upstream connections), an SSE stream's first
    event, a WebSocket echo; every client connection closed at the end."""
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30,
                                 headers={"Host": host}) as client:
        for _ in range(3):
            responses = await asyncio.gather(*(client.get("/work?ms=20")
                                               for _ in range(BURST)))
            assert all(r.status_code == 200 for r in responses), responses
        async with client.stream("GET", "/events") as resp:
            assert resp.status_code == 200
            async for line in resp.aiter_lines():
                if line.startswith("data:"):
                    break
    async with websockets.connect(f"ws://{host}/ws", host="127.0.0.1", port=port,
                                  open_timeout=30) as ws:
        assert str(await asyncio.wait_for(ws.recv(), 30)).startswith("hello ")
        await ws.send("x")
        assert await asyncio.wait_for(ws.recv(), 30) == "x"


def test_churn_leaves_no_objects(reliability: Reliability) -> None:
    started = time.monotonic()
    limits = ("--limit", "max_isolates=1")
    with counted_platform() as p:
        fn = p.deploy("soak", APP, *limits)
        host = host_of(fn["invocation_url"])
        with p.api() as api, p.gateway(host, timeout=30) as gw:

            def at_rest() -> dict[str, Any]:
                """The one isolate, ready, serving; the retired or killed one gone."""
                def one_ready() -> dict[str, Any] | None:
                    isolates = [i for i in api.get("/status").json()["isolates"]
                                if i["function"] == "soak"]
                    if len(isolates) == 1 and isolates[0]["state"] == "ready":
                        isolate: dict[str, Any] = isolates[0]
                        return isolate
                    return None
                assert gw.get("/").status_code == 200
                found: dict[str, Any] = wait_for(one_ready, 30, "one ready isolate")
                return found

            current = at_rest()
            marks: dict[int, dict[str, Any]] = {}
            for n in range(1, WARMUP + ROUNDS + 1):
                asyncio.run(_traffic(p.gateway_port, host))
                if n % REDEPLOY_EVERY == 0:
                    p.deploy("soak", APP, *limits, "--env", f"ROUND={n}")
                else:
                    os.kill(current["pid"], signal.SIGKILL)
                replacement = at_rest()
                assert replacement["id"] != current["id"]
                current = replacement
                if n == 1:
                    p.counts()  # what counting allocates the first time is not counted
                if n in (WARMUP, WARMUP + ROUNDS):
                    marks[n] = p.counts()
    before, after = marks[WARMUP], marks[WARMUP + ROUNDS]
    grown = {k: after["objects"].get(k, 0) - before["objects"].get(k, 0)
             for k in set(before["objects"]) | set(after["objects"])}
    objects = sum(grown.values())
    blocks = after["blocks"] - before["blocks"]
    watched = {k: grown.get(k, 0) for k in WATCHED}
    failed = [k for k, v in watched.items() if v > WATCHED[k]]
    ok = (not failed and objects < OBJECTS_PER_ROUND * ROUNDS
          and blocks < BLOCKS_PER_ROUND * ROUNDS)
    kills = ROUNDS - ROUNDS // REDEPLOY_EVERY
    reliability.record(
        rounds=ROUNDS, passed=ROUNDS if ok else 0,
        figure=f"{objects:+d} objects, {blocks:+d} blocks in phloem up over {kills} kill -9 "
               f"+ {ROUNDS - kills} redeploys with HTTP, SSE and WebSocket traffic "
               f"({time.monotonic() - started:.0f} s)")
    top = sorted(((v, k) for k, v in grown.items() if v > 0), reverse=True)[:15]
    assert not failed, f"grew with churn: {watched}; most grown: {top}"
    assert objects < OBJECTS_PER_ROUND * ROUNDS, f"{objects:+d} objects; {top}"
    assert blocks < BLOCKS_PER_ROUND * ROUNDS, f"{blocks:+d} allocated blocks; {top}"
