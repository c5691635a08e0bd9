"""SSE streams and WebSockets opened and closed through the gateway leave nothing behind:
the objects alive after a batch of them are those alive before it (issue 11: the soak saw
the platform's RSS grow with streams; it plateaus, and this keeps it so).

In-process (the real Gateway, a uvicorn app on a Unix socket, real client sockets), so the
gc can count every object the gateway keeps; under asyncio's loop and uvloop's."""

from __future__ import annotations

import asyncio
import gc
from collections import Counter
from pathlib import Path

import pytest
import websockets

from tests.conftest import Reliability
from tests.gateway.test_gateway import Env, running_env, wait_until

WARMUP = 100  # of each kind, before the count: caches and free lists fill up
BATCH = 400  # of each kind, counted
CONCURRENCY = 20
#: Objects a batch may leave: one kept per stream of either kind is BATCH or more; the
#: noise measured was -123 to +61. (Bytes are no measure here: a set or dict that grew at
#: the peak, such as the loop's task set, keeps its size, 128 KiB one run, 0 the next.)
SLACK_OBJECTS = BATCH // 2


async def _sse(env: Env) -> None:
    reader, writer = await env.raw()
    writer.write(b"GET /sse-quiet HTTP/1.1\r\nHost: app.test\r\n\r\n")
    buf = b""
    while b"data: hi" not in buf:
        chunk = await asyncio.wait_for(reader.read(4096), 5)
        assert chunk, buf
        buf += chunk
    assert buf.startswith(b"HTTP/1.1 200"), buf[:80]
    writer.close()
    await writer.wait_closed()


async def _ws(env: Env) -> None:
    async with websockets.connect("ws://app.test/ws", host="127.0.0.1",
                                  port=env.gateway.port, open_timeout=5) as ws:
        await ws.send("x")
        assert await asyncio.wait_for(ws.recv(), 5) == "x"


async def _batch(env: Env, n: int) -> None:
    gate = asyncio.Semaphore(CONCURRENCY)

    async def one(kind: int) -> None:
        async with gate:
            await (_sse(env) if kind % 2 else _ws(env))

    await asyncio.gather(*(one(i) for i in range(2 * n)))
    # Every stream over on the gateway's side too, its record delivered (and dropped).
    await wait_until(lambda: env.gateway.open_streams == 0 and env.gateway.inflight == 0
                     and env.router.outstanding == 0, 10)
    await asyncio.sleep(0.1)  # the closed connections' last callbacks
    env.records.clear()


def _objects() -> Counter[str]:
    """Objects the gc tracks (containers and instances), by type."""
    gc.collect()
    return Counter(type(o).__qualname__ for o in gc.get_objects())


async def _scenario(env: Env) -> tuple[int, Counter[str]]:
    """(objects, objects by type that grew) a batch left alive."""
    _objects()  # what counting itself allocates the first time is not counted
    await _batch(env, WARMUP)
    before = _objects()
    await _batch(env, BATCH)
    after = _objects()
    return sum(after.values()) - sum(before.values()), after - before


def _check(grew: int, grown: Counter[str]) -> None:
    assert grew < SLACK_OBJECTS, (f"{2 * BATCH} streams left {grew} objects more alive: "
                                  f"{grown.most_common(10)}")


async def test_streams_leave_no_objects(tmp_path: Path) -> None:
    async with running_env(tmp_path) as env:
        _check(*await _scenario(env))


def test_streams_leave_no_objects_under_uvloop(tmp_path: Path,
                                               reliability: Reliability) -> None:
    uvloop = pytest.importorskip("uvloop")

    async def main() -> tuple[int, Counter[str]]:
        async with running_env(tmp_path) as env:
            return await _scenario(env)

    grew, grown = uvloop.run(main())
    reliability.record(rounds=2 * BATCH, passed=2 * BATCH if grew < SLACK_OBJECTS else 0,
                       figure=f"{grew:+d} objects alive after {BATCH} SSE + {BATCH} "
                              "WebSocket streams (uvloop)")
    _check(grew, grown)
