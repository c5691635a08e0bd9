"""A dependency-free ASGI app that tries TCP connections and says how each went.

POST / with {"targets": [["127.0.0.1", 8788], ...], "timeout": 2} answers
{"uid": ..., "results": [{"host", "port", "result", "ms"}, ...]} where result is
"connected", "refused", "timeout" or "error: <what>".
"""

import asyncio
import json
import os
import time


async def connect(host, port, timeout):
    started = time.monotonic()
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
        writer.close()
        result = "connected"
    except ConnectionRefusedError:
        result = "refused"
    except TimeoutError:
        result = "timeout"
    except OSError as exc:
        result = f"error: {exc}"
    return {"host": host, "port": port, "result": result,
            "ms": round((time.monotonic() - started) * 1000, 1)}


async def app(scope, receive, send):
    if scope["type"] == "lifespan":
        while True:
            msg = await receive()
            if msg["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif msg["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    if scope["type"] != "http":
        return
    body = b""
    while True:
        msg = await receive()
        body += msg.get("body", b"")
        if not msg.get("more_body"):
            break
    request = json.loads(body or b"{}")
    timeout = float(request.get("timeout", 2))
    results = await asyncio.gather(*(connect(h, int(p), timeout)
                                     for h, p in request.get("targets", [])))
    data = json.dumps({"uid": os.getuid(), "results": results}).encode()
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": data})
