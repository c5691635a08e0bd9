"""The smallest useful ASGI app: every request gets 200 with a 12-byte body. Used by
bench/runtime.py for throughput, added latency and cold start."""

from __future__ import annotations

from typing import Any

BODY = b"hello world\n"  # 12 bytes
START = {
    "type": "http.response.start",
    "status": 200,
    "headers": [(b"content-type", b"text/plain"), (b"content-length", b"12")],
}
BODY_EVENT = {"type": "http.response.body", "body": BODY}


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    await send(START)
    await send(BODY_EVENT)
