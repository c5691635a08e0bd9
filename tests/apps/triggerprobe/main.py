"""A dependency-free ASGI app that records every POST it gets (path, headers, body) and
answers them; ``GET /seen`` lists them. ``POST /flaky`` answers 500 to the first attempt
of each invocation (by its X-Neon-Invocation-Id), 200 after; ``POST /slow`` answers
after 3 s."""

import asyncio
import json

SEEN = []
FAILED = set()


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
    status, out = 200, b"ok"
    if scope["method"] == "GET" and scope["path"] == "/seen":
        out = json.dumps(SEEN).encode()
    else:
        headers = {k.decode().lower(): v.decode() for k, v in scope["headers"]}
        SEEN.append({"method": scope["method"], "path": scope["path"], "headers": headers,
                     "body": body.decode("utf-8", "replace")})
        invocation = headers.get("x-neon-invocation-id", "")
        if scope["path"] == "/slow":
            await asyncio.sleep(3)
        if scope["path"] == "/flaky" and invocation not in FAILED:
            FAILED.add(invocation)
            status, out = 500, b"first attempt fails"
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": out})
