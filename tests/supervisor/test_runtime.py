"""The runtime through the real gateway and supervisor: cold starts, scale-out, eviction,
limits, streams, background work and faults. One platform, one deployment per case, each
with the limits it needs (per-function ``--limit`` overrides)."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx
import psycopg
import websockets

from phloem.testing import PlatformProcess, host_of, wait_for

APP = Path(__file__).parent.parent / "apps" / "runtime"


def deploy(p: PlatformProcess, slug: str, *limits: str, env: str = "") -> dict[str, Any]:
    args = [a for lim in limits for a in ("--limit", lim)]
    if env:
        args += ["--env", env]
    fn = p.deploy(slug, APP, *args)
    assert fn["status"] == "ready", fn
    return fn


def isolates(p: PlatformProcess, slug: str) -> list[dict[str, Any]]:
    return [i for i in p.cli_json("status")["isolates"] if i["function"] == slug]


def events(p: PlatformProcess, like: str) -> list[tuple[str, str, str]]:
    url = p.cli("connection-string", "--unpooled").stdout.strip()
    with psycopg.connect(url) as conn:
        try:
            return [tuple(r) for r in conn.execute(  # type: ignore[misc]
                "SELECT event, deployment, isolate FROM runtime_events WHERE event LIKE %s",
                (like,))]
        except psycopg.errors.UndefinedTable:
            return []


def gw_async(p: PlatformProcess, fn: dict[str, Any], timeout: float = 60) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=f"http://127.0.0.1:{p.gateway_port}",
                             headers={"Host": host_of(fn["invocation_url"])}, timeout=timeout,
                             limits=httpx.Limits(max_connections=200))


async def test_cold_start_burst_starts_one_isolate(platform: PlatformProcess) -> None:
    fn = deploy(platform, "burst")
    async with gw_async(platform, fn) as gw:
        responses = await asyncio.gather(*(gw.get("/slow", params={"s": "0.2"})
                                           for _ in range(50)))
    assert [r.status_code for r in responses] == [200] * 50
    served_by = {r.json()["isolate"] for r in responses}
    assert served_by == {i["id"] for i in isolates(platform, "burst")}
    assert len(served_by) == 1


async def test_scale_out_above_target_inflight(platform: PlatformProcess) -> None:
    fn = deploy(platform, "scaled", "target_inflight=4", "max_isolates=2")
    async with gw_async(platform, fn) as gw:
        assert (await gw.get("/info")).status_code == 200
        slow = [asyncio.create_task(gw.get("/slow", params={"s": "3"})) for _ in range(12)]
        await asyncio.to_thread(wait_for, lambda: len(isolates(platform, "scaled")) == 2, 30,
                                "a second isolate")
        results = await asyncio.gather(*slow)
        assert [r.status_code for r in results] == [200] * 12
        # Never more than max_isolates.
        assert len(isolates(platform, "scaled")) == 2


def test_idle_eviction_sends_sigint(platform: PlatformProcess) -> None:
    fn = deploy(platform, "evicted", "idle_timeout_s=1.5")
    with platform.gateway(host_of(fn["invocation_url"])) as gw:
        first = gw.get("/info").json()["isolate"]
    wait_for(lambda: isolates(platform, "evicted") == [], 30, "the idle isolate to go")
    shutdowns = [e for e in events(platform, "shutdown") if e[1] == fn["deployment_id"]]
    assert [e[2] for e in shutdowns] == [first]  # its lifespan shutdown ran: SIGINT, not KILL
    logs = platform.cli("functions", "logs", "evicted").stdout
    assert "evicting (SIGINT)" in logs
    with platform.gateway(host_of(fn["invocation_url"])) as gw:  # and it comes back
        assert gw.get("/info").json()["isolate"] != first


def test_open_stream_keeps_isolate_from_eviction(platform: PlatformProcess) -> None:
    fn = deploy(platform, "streaming", "idle_timeout_s=1")
    with platform.gateway(host_of(fn["invocation_url"])) as gw, \
            gw.stream("GET", "/heartbeat-sse", params={"n": "12", "interval": "0.25"}) as r:
        started = time.monotonic()
        body = b"".join(r.iter_bytes())
    assert time.monotonic() - started > 2.5  # longer than the idle limit
    assert body.endswith(b"data: end\n\n")
    assert body.count(b": ping") == 12


def test_time_to_first_byte_limit_gives_504(platform: PlatformProcess) -> None:
    fn = deploy(platform, "ttfb", "ttfb_timeout_s=3")
    with platform.gateway(host_of(fn["invocation_url"])) as gw:
        started = time.monotonic()
        resp = gw.get("/slow", params={"s": "20"})
        elapsed = time.monotonic() - started
        assert resp.status_code == 504
        assert resp.json()["error"]["code"] == "upstream_timeout"
        assert 2.9 < elapsed < 10
        assert gw.get("/slow", params={"s": "0.1"}).status_code == 200  # isolate kept
    assert len(isolates(platform, "ttfb")) == 1


def test_silent_stream_is_closed_heartbeat_stream_is_not(platform: PlatformProcess) -> None:
    fn = deploy(platform, "silence", "silence_timeout_s=1.5")
    with platform.gateway(host_of(fn["invocation_url"])) as gw:
        started = time.monotonic()
        with gw.stream("GET", "/silent-sse") as r:
            try:
                body = b"".join(r.iter_bytes())
            except httpx.RemoteProtocolError:
                body = b"(cut)"
        assert 1.4 < time.monotonic() - started < 10
        assert b"data: end" not in body
        with gw.stream("GET", "/heartbeat-sse", params={"n": "16", "interval": "0.25"}) as r:
            started = time.monotonic()
            body = b"".join(r.iter_bytes())
        assert time.monotonic() - started > 3.5
        assert body.endswith(b"data: end\n\n")


def test_wait_until_work_finishes_after_response(platform: PlatformProcess) -> None:
    fn = deploy(platform, "background", "idle_timeout_s=1")
    with platform.gateway(host_of(fn["invocation_url"])) as gw:
        started = time.monotonic()
        resp = gw.get("/wait", params={"s": "2.5", "tag": "done-late"})
        assert resp.status_code == 202
        assert time.monotonic() - started < 2
    # Idle limit 1 s, work 2.5 s: the isolate must stay until the work is done.
    wait_for(lambda: events(platform, "background:done-late"), 30, "the background work")
    assert events(platform, "background:done-late")[0][1] == fn["deployment_id"]


def test_kill_mid_request_gives_502_quickly(platform: PlatformProcess) -> None:
    fn = deploy(platform, "crashy")
    with platform.gateway(host_of(fn["invocation_url"])) as gw:
        first = gw.get("/info").json()["isolate"]
        # The isolate is pid 1 in its sandbox; the platform knows its pid out here.
        [pid] = [i["pid"] for i in isolates(platform, "crashy") if i["id"] == first]
        proc = subprocess.Popen(
            ["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "-H",
             f"Host: {host_of(fn['invocation_url'])}",
             f"http://127.0.0.1:{platform.gateway_port}/slow?s=30"],
            stdout=subprocess.PIPE, text=True)
        wait_for(lambda: isolates(platform, "crashy")[0]["inflight"] == 1, 10,
                 "the request to be in flight")
        killed = time.monotonic()
        os.kill(pid, signal.SIGKILL)
        out, _ = proc.communicate(timeout=10)
        assert out == "502"
        assert time.monotonic() - killed < 2
        assert gw.get("/info").json()["isolate"] != first  # a fresh isolate


def test_memory_blowup_is_contained(platform: PlatformProcess) -> None:
    fn = deploy(platform, "hungry", "memory_mb=120")
    with platform.gateway(host_of(fn["invocation_url"])) as gw:
        first = gw.get("/info").json()["isolate"]
        assert gw.get("/alloc", params={"mb": "20"}).status_code == 200
        resp = gw.get("/alloc", params={"mb": "400"})
        assert resp.status_code == 502
        after = gw.get("/info")
        assert after.status_code == 200, after.text
        assert after.json()["isolate"] != first
    logs = platform.cli("functions", "logs", "hungry").stdout
    assert "memory limit of 120 MiB exceeded" in logs


def test_redeploy_keeps_open_stream_until_it_ends(platform: PlatformProcess) -> None:
    first = deploy(platform, "redeploysse")
    host = host_of(first["invocation_url"])
    with platform.gateway(host) as gw, \
            gw.stream("GET", "/sse", params={"n": "16", "interval": "0.25"}) as r:
        chunks = r.iter_bytes()
        assert next(chunks).startswith(b"data: 0")
        second = deploy(platform, "redeploysse", env="VERSION=2")
        with platform.gateway(host) as gw2:
            assert gw2.get("/info").json()["deployment"] == second["deployment_id"]
        body = b"".join(chunks)
    assert body.count(b"data: ") == 16  # 1..15 and end
    assert body.endswith(b"data: end\n\n")


async def test_websocket_through_gateway(platform: PlatformProcess) -> None:
    fn = deploy(platform, "sockets")
    # The URI names the function (it becomes the Host header); the socket goes to 127.0.0.1.
    uri = f"ws://{host_of(fn['invocation_url'])}/ws"
    async with websockets.connect(uri, host="127.0.0.1", port=platform.gateway_port) as ws:
        for text in ("one", "two"):
            await ws.send(text)
            assert await asyncio.wait_for(ws.recv(), 10) == f"echo:{text}"
        status = await asyncio.to_thread(isolates, platform, "sockets")
        assert status[0]["open_streams"] == 1
        assert status[0]["inflight"] == 0


def test_logs_carry_request_ids_since_and_follow(platform: PlatformProcess) -> None:
    fn = deploy(platform, "logged")
    with platform.gateway(host_of(fn["invocation_url"])) as gw:
        assert gw.get("/print", params={"msg": "hello-logs"},
                      headers={"X-Request-Id": "rid-42"}).status_code == 200
    logs = platform.cli("functions", "logs", "logged").stdout
    assert "[rid=rid-42] hello-logs" in logs
    assert "GET /print 200" in logs and "rid=rid-42" in logs
    printed_at = time.monotonic()
    assert "hello-logs" in platform.cli("functions", "logs", "logged", "--since",
                                        "1h").stdout
    follower = subprocess.Popen(
        [*platform.cli_args(), "functions", "logs", "logged", "--follow", "--lines", "1"],
        env=platform.env, stdout=subprocess.PIPE, text=True)
    try:
        assert follower.stdout is not None
        follower.stdout.readline()  # the backlog line
        with platform.gateway(host_of(fn["invocation_url"])) as gw:
            gw.get("/print", params={"msg": "followed-line"})
        deadline = time.monotonic() + 15
        seen = ""
        while "followed-line" not in seen and time.monotonic() < deadline:
            seen += follower.stdout.readline()
        assert "followed-line" in seen
    finally:
        follower.send_signal(signal.SIGINT)
        follower.wait(10)
    # Lines older than the window are left out (the clock, not a guess, decides).
    time.sleep(max(0.0, 1.5 - (time.monotonic() - printed_at)))
    recent = platform.cli("functions", "logs", "logged", "--since", "1s").stdout
    assert "hello-logs" not in recent
