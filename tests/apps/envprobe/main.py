"""A dependency-free ASGI app that reports its environment and what it can read."""

import json
import os
from urllib.parse import parse_qs

KEYS = ("DATABASE_URL", "DATABASE_URL_UNPOOLED", "PHLOEM_BRANCH", "NEON_BRANCH",
        "PHLOEM_FUNCTION", "PHLOEM_DEPLOYMENT", "GREETING")


def can_read(path: str) -> str:
    try:
        if os.path.isdir(path):
            os.listdir(path)
        else:
            with open(path, "rb") as f:
                f.read(1)
        return "readable"
    except PermissionError:
        return "denied"
    except FileNotFoundError:
        return "missing"


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
    query = parse_qs(scope["query_string"].decode())
    if scope["path"] == "/probe":
        body = {p: can_read(p) for p in query.get("path", [])}
    else:
        headers = {k.decode(): v.decode() for k, v in scope["headers"]}
        body = {"env": {k: os.environ.get(k) for k in KEYS}, "pid": os.getpid(),
                "uid": os.getuid(), "headers": headers}
    data = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": data})
