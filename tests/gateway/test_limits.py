"""Gateway limits against real sockets: time to first byte, stream silence, per-lease
overrides, the stream counters and the ``mark_stream`` hook."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
import websockets

from phloem.gateway.routing import Limits
from phloem.gateway.server import GatewayConfig, RequestRecord
from tests.gateway.test_gateway import (
    MAX_BODY,
    Env,
    read_eof,
    read_response,
    running_env,
    wait_until,
)

# Short limits so the tests run in seconds; routes may override them with Limits.
LIMITS = GatewayConfig(port=0, max_body_bytes=MAX_BODY, ttfb_timeout=1.0, silence_timeout=1.0)


@pytest.fixture(params=["callbacks", "task"])
async def env(tmp_path: Path, request: pytest.FixtureRequest) -> AsyncIterator[Env]:
    """With and without the router's ``acquire_nowait`` (see running_env)."""
    async with running_env(tmp_path, LIMITS, nowait=request.param == "callbacks") as env:
        yield env


def now() -> float:
    return asyncio.get_running_loop().time()


async def record_for(env: Env, path: str) -> RequestRecord:
    """The record is written just after the response, so wait for it."""
    await wait_until(lambda: any(r.path == path for r in env.records))
    return env.record_for(path)


def alias(env: Env, name: str, limits: Limits | None) -> None:
    """Route ``name`` to the test app with a lease carrying ``limits``."""
    env.router.routes[name] = env.router.routes["app.test"]
    env.router.limits[name] = limits


async def open_sse(
    env: Env, path: str, host: str = "app.test"
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A raw-socket SSE request, once its first event arrived (keep the writer referenced:
    a collected StreamWriter closes its socket)."""
    reader, writer = await env.raw()
    writer.write(b"GET %s HTTP/1.1\r\nHost: %s\r\n\r\n" % (path.encode(), host.encode()))
    head = await asyncio.wait_for(reader.readuntil(b"data: hi\n\n"), 5)
    assert head.startswith(b"HTTP/1.1 200")
    return reader, writer


# -- time to first byte ----------------------------------------------------------------------


async def test_slow_first_byte_gets_504_and_the_app_sees_the_disconnect(env: Env) -> None:
    reader, writer = await env.raw()
    started = now()
    writer.write(b"GET /hang HTTP/1.1\r\nHost: app.test\r\n\r\n")
    await wait_until(lambda: env.gateway.inflight == 1)
    response = await read_response(reader)
    assert response.status == 504
    assert response.json()["error"]["code"] == "upstream_timeout"
    assert 0.9 <= now() - started < 3
    # The upstream connection was closed, which the app sees as its client going away.
    await asyncio.wait_for(env.state.disconnected.wait(), 5)
    await wait_until(lambda: env.router.outstanding == 0)
    assert env.router.releases == [False]
    record = await record_for(env, "/hang")
    assert (record.status, record.error, record.stream) == (504, "upstream_timeout", False)
    assert env.gateway.inflight == 0
    # The client connection carries on; the app serves it over a fresh upstream connection.
    writer.write(b"GET /echo HTTP/1.1\r\nHost: app.test\r\n\r\n")
    assert (await read_response(reader)).status == 200
    assert env.router.connects == 2
    writer.close()


async def test_time_to_first_byte_ends_with_the_response_head(env: Env) -> None:
    """A slow body after a prompt head is limited by silence only, not by the TTFB."""
    reader, writer = await open_sse(env, "/sse-heartbeat")
    deadline = now() + 1.5  # past the TTFB limit, which no longer applies
    while now() < deadline:
        assert await asyncio.wait_for(reader.read(65536), 1.0)
    assert env.gateway.open_streams == 1
    writer.close()


# -- stream silence --------------------------------------------------------------------------


async def test_silent_sse_stream_is_closed(env: Env) -> None:
    reader, writer = await open_sse(env, "/sse-quiet")
    quiet_since = now()
    assert (env.gateway.open_streams, env.gateway.inflight) == (1, 0)
    assert await read_eof(reader, timeout=5)
    assert now() - quiet_since >= 0.9
    await asyncio.wait_for(env.state.disconnected.wait(), 5)
    record = await record_for(env, "/sse-quiet")
    assert (record.status, record.error, record.stream) == (200, "stream_silence", True)
    await wait_until(lambda: env.router.outstanding == 0)
    assert env.router.releases == [False]
    assert (env.gateway.open_streams, env.gateway.inflight) == (0, 0)
    writer.close()


async def test_sse_heartbeats_keep_the_stream_open(env: Env) -> None:
    reader, writer = await env.raw()
    writer.write(b"GET /sse-heartbeat HTTP/1.1\r\nHost: app.test\r\n\r\n")
    await asyncio.wait_for(reader.readuntil(b"data: hi\n\n"), 5)
    until = now() + 2.5
    pings = 0
    while now() < until:
        data = await asyncio.wait_for(reader.read(65536), 1.0)
        assert data, "the gateway closed a stream that sends heartbeats"
        pings += data.count(b": ping")
    assert pings >= 5
    assert env.gateway.open_streams == 1
    writer.close()
    await asyncio.wait_for(env.state.disconnected.wait(), 5)
    record = await record_for(env, "/sse-heartbeat")
    assert (record.status, record.error, record.stream) == (499, None, True)
    await wait_until(lambda: env.gateway.open_streams == 0)


async def test_idle_websocket_is_closed(env: Env) -> None:
    async with websockets.connect(
        "ws://app.test/ws",
        host="127.0.0.1",
        port=env.gateway.port,
        open_timeout=5,
        ping_interval=None,
    ) as ws:
        await ws.send("hello")
        assert await asyncio.wait_for(ws.recv(), 5) == "hello"
        quiet_since = now()
        assert env.gateway.open_streams == 1
        await asyncio.wait_for(ws.wait_closed(), 5)
        assert now() - quiet_since >= 0.9
        assert ws.close_code == 1006  # closed without a close frame
    record = await record_for(env, "/ws")
    assert (record.status, record.error, record.stream) == (101, "stream_silence", True)
    await wait_until(lambda: env.router.outstanding == 0)
    assert env.gateway.open_streams == 0


async def test_websocket_pings_keep_the_tunnel_open(env: Env) -> None:
    async with websockets.connect(
        "ws://app.test/ws",
        host="127.0.0.1",
        port=env.gateway.port,
        open_timeout=5,
        ping_interval=0.3,
    ) as ws:
        await asyncio.sleep(2.5)  # the duration under test: 2.5 limits' worth of pings only
        await ws.send("still here")
        assert await asyncio.wait_for(ws.recv(), 5) == "still here"
        assert ws.latency > 0  # pongs did come back through the gateway
    await wait_until(lambda: env.gateway.open_streams == 0)


# -- per-lease limits ------------------------------------------------------------------------


async def test_lease_limits_can_be_stricter(env: Env) -> None:
    alias(env, "strict.test", Limits(ttfb_timeout=0.3, silence_timeout=0.3))
    started = now()
    r = await env.client.get("/hang", headers={"Host": "strict.test"})
    assert r.status_code == 504
    assert "0.3" in r.json()["error"]["message"]
    assert now() - started < 0.9  # the gateway's own limit is 1 s

    reader, writer = await open_sse(env, "/sse-quiet", host="strict.test")
    quiet_since = now()
    assert await read_eof(reader, timeout=5)
    assert 0.25 <= now() - quiet_since < 0.9
    writer.close()


async def test_lease_limits_can_be_more_lenient(env: Env) -> None:
    alias(env, "lenient.test", Limits(ttfb_timeout=30, silence_timeout=30))
    started = now()
    default = asyncio.create_task(env.client.get("/slow"))
    lenient = asyncio.create_task(env.client.get("/slow", headers={"Host": "lenient.test"}))
    _, quiet = await open_sse(env, "/sse-quiet", host="lenient.test")
    r = await asyncio.wait_for(default, 5)
    assert r.status_code == 504  # the gateway's 1 s
    # Well past the gateway's limits, the lenient route still waits and streams.
    await asyncio.sleep(max(0.0, started + 1.5 - now()))
    assert not lenient.done()
    assert env.gateway.open_streams == 1
    env.state.slow_release.set()
    r = await asyncio.wait_for(lenient, 5)
    assert (r.status_code, r.content) == (200, b"done")
    quiet.close()


async def test_lease_body_limit(env: Env) -> None:
    alias(env, "small.test", Limits(max_body_bytes=10))
    small = {"Host": "small.test"}
    r = await env.client.post("/echo", content=b"x" * 11, headers=small)
    assert r.status_code == 413
    assert r.json()["error"] == {
        "code": "body_too_large",
        "message": "request body exceeds 10 bytes",
    }
    assert env.router.releases == [True]  # the leased connection was not touched
    r = await env.client.post("/echo", content=b"x" * 10, headers=small)
    assert r.json()["body"] == "x" * 10

    reader, writer = await env.raw()
    writer.write(
        b"POST /echo HTTP/1.1\r\nHost: small.test\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"10\r\n" + b"y" * 16 + b"\r\n0\r\n\r\n"
    )
    assert (await read_response(reader)).status == 413
    writer.close()

    # The gateway's own limit is checked before routing: a lease cannot raise it.
    alias(env, "big.test", Limits(max_body_bytes=MAX_BODY * 10))
    acquires = env.router.acquires
    r = await env.client.post("/echo", content=b"x" * (MAX_BODY + 1), headers={"Host": "big.test"})
    assert r.status_code == 413
    assert env.router.acquires == acquires


# -- counters and the stream hook ------------------------------------------------------------


async def test_counters_and_the_stream_hook(env: Env) -> None:
    gateway = env.gateway
    env.router.limits["app.test"] = None  # a lease with mark_stream (and no limits)
    assert (gateway.inflight, gateway.open_streams) == (0, 0)

    slow = asyncio.create_task(env.client.get("/slow"))
    await asyncio.wait_for(env.state.slow_started.wait(), 5)
    assert (gateway.inflight, gateway.open_streams) == (1, 0)
    env.state.slow_release.set()
    assert (await asyncio.wait_for(slow, 5)).status_code == 200
    await wait_until(lambda: gateway.inflight == 0)
    assert env.router.stream_marks == []

    async with env.client.stream("GET", "/sse") as r:
        chunks = r.aiter_text()
        assert "data: one" in await asyncio.wait_for(chunks.__anext__(), 5)
        assert (gateway.inflight, gateway.open_streams) == (0, 1)
        assert env.router.stream_marks == ["app.test"]
        env.state.sse_go.set()
        async for _ in chunks:
            pass
    await wait_until(lambda: gateway.open_streams == 0)

    async with websockets.connect(
        "ws://app.test/ws", host="127.0.0.1", port=gateway.port, open_timeout=5
    ) as ws:
        await ws.send("hi")
        assert await asyncio.wait_for(ws.recv(), 5) == "hi"
        assert (gateway.inflight, gateway.open_streams) == (0, 1)
    await wait_until(lambda: gateway.open_streams == 0 and gateway.inflight == 0)
    assert env.router.stream_marks == ["app.test", "app.test"]
    await wait_until(lambda: len(env.records) == 3)
    # What users see per host: the records (metrics and logs are built from them).
    assert [(r.host, r.path, r.status, r.stream) for r in env.records] == [
        ("app.test", "/slow", 200, False),
        ("app.test", "/sse", 200, True),
        ("app.test", "/ws", 101, True),
    ]


# -- under uvloop ----------------------------------------------------------------------------

UVLOOP_SCENARIOS = [
    test_slow_first_byte_gets_504_and_the_app_sees_the_disconnect,
    test_silent_sse_stream_is_closed,
    test_idle_websocket_is_closed,
    test_lease_limits_can_be_stricter,
    test_counters_and_the_stream_hook,
]


@pytest.mark.parametrize("scenario", UVLOOP_SCENARIOS, ids=lambda f: f.__name__[5:])
def test_under_uvloop(scenario: Callable[[Env], Awaitable[None]], tmp_path: Path) -> None:
    uvloop = pytest.importorskip("uvloop")

    async def main() -> None:
        async with running_env(tmp_path, LIMITS) as env:
            await scenario(env)

    uvloop.run(main())
