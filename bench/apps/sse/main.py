"""``GET /events``: an SSE stream that keeps every stream open and sends a ``: ping`` comment every
second, on a fixed schedule per stream (start + k seconds), so the gap a client sees
between heartbeats is 1 s plus whatever delay the path adds. Used by bench/runtime.py."""

from __future__ import annotations

import asyncio
from typing import Any

START = {
    "type": "http.response.start",
    "status": 200,
    "headers": [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")],
}
PING = {"type": "http.response.body", "body": b": ping\n\n", "more_body": True}
INTERVAL = 1.0


async def _disconnected(receive: Any) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def _heartbeats(send: Any) -> None:
    loop = asyncio.get_running_loop()
    await send(START)
    await send({"type": "http.response.body", "body": b": open\n\n", "more_body": True})
    due = loop.time()
    while True:
        due += INTERVAL
        await asyncio.sleep(max(0.0, due - loop.time()))
        await send(PING)


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    if scope["path"] != "/events":  # a health check
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-length", b"3")]})
        await send({"type": "http.response.body", "body": b"ok\n"})
        return
    beats = asyncio.ensure_future(_heartbeats(send))
    try:
        await _disconnected(receive)  # the heartbeats never end on their own
    finally:
        beats.cancel()
        await asyncio.gather(beats, return_exceptions=True)
