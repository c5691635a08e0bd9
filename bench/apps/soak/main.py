"""The soak bench's app (bench/soak.py), raw ASGI, one isolate's view of mixed traffic:

* ``GET /``: 200, 3 bytes; ``GET /work?ms=N``: the same after N ms (so requests are in
  flight when an isolate is killed);
* ``GET /events``: SSE, first ``data: <isolate> <deployment>``, then ``: ping`` every
  second until the client leaves;
* WebSocket ``/ws``: first message ``hello <isolate> <deployment>``, then echoes text.

The isolate and deployment ids let the client tell a stream ended by churn (its isolate
killed, its deployment replaced) from one that failed on its own.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

WHO = f"{os.environ.get('PHLOEM_ISOLATE', '?')} {os.environ.get('PHLOEM_DEPLOYMENT', '?')}"
OK_START = {"type": "http.response.start", "status": 200,
            "headers": [(b"content-type", b"text/plain"), (b"content-length", b"3")]}
OK_BODY = {"type": "http.response.body", "body": b"ok\n"}
SSE_START = {"type": "http.response.start", "status": 200,
             "headers": [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]}
PING = {"type": "http.response.body", "body": b": ping\n\n", "more_body": True}


async def _lifespan(receive: Any, send: Any) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


async def _events(receive: Any, send: Any) -> None:
    async def beats() -> None:
        await send(SSE_START)
        await send({"type": "http.response.body", "body": f"data: {WHO}\n\n".encode(),
                    "more_body": True})
        while True:
            await asyncio.sleep(1.0)
            await send(PING)

    task = asyncio.ensure_future(beats())
    try:
        while (await receive())["type"] != "http.disconnect":
            pass
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def _websocket(receive: Any, send: Any) -> None:
    await receive()  # websocket.connect
    await send({"type": "websocket.accept"})
    await send({"type": "websocket.send", "text": f"hello {WHO}"})
    while True:
        message = await receive()
        if message["type"] == "websocket.disconnect":
            return
        await send({"type": "websocket.send", "text": message.get("text") or ""})


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    kind = scope["type"]
    if kind == "lifespan":
        await _lifespan(receive, send)
    elif kind == "websocket":
        await _websocket(receive, send)
    elif scope["path"] == "/events":
        await _events(receive, send)
    else:
        if scope["path"] == "/work":
            query = dict(p.split("=", 1) for p in scope["query_string"].decode().split("&")
                         if "=" in p)
            await asyncio.sleep(int(query.get("ms", "0")) / 1000)
        await send(OK_START)
        await send(OK_BODY)
