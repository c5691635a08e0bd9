"""A raw ASGI app for the upstream fault and backpressure tests: quick answers, answers
that never come (until the isolate dies), large deterministic bodies, and a handler that
never reads the request body it was sent."""

import asyncio
import contextlib
import hashlib
import json
import os
from urllib.parse import parse_qs

BLOCK = 64 * 1024
_hanging = 0  # /hang requests being served now
_release: list[asyncio.Event] = []


def _released() -> asyncio.Event:
    """What /ignore-body requests wait for (made in the loop that serves them)."""
    if not _release:
        _release.append(asyncio.Event())
    return _release[0]


def isolate() -> str:
    # Each isolate is pid 1 in its own sandbox: its id tells them apart.
    return os.environ.get("PHLOEM_ISOLATE", f"pid-{os.getpid()}")


def block(i: int) -> bytes:
    """Block ``i`` of a large body: deterministic, so the client can check every byte."""
    seed = hashlib.sha256(i.to_bytes(8, "big")).digest()
    return (seed * (BLOCK // len(seed) + 1))[:BLOCK]


async def app(scope, receive, send):
    global _hanging
    if scope["type"] == "lifespan":
        while True:
            msg = await receive()
            if msg["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            else:
                await send({"type": "lifespan.shutdown.complete"})
                return
    q = {k: v[0] for k, v in parse_qs(scope["query_string"].decode()).items()}
    path = scope["path"]
    if scope["type"] == "websocket":
        # /flood: ``blocks`` binary messages of 64 KiB (as /big's body), then close.
        await receive()  # websocket.connect
        await send({"type": "websocket.accept"})
        for i in range(int(q.get("blocks", "160"))):
            await send({"type": "websocket.send", "bytes": block(i)})
        await send({"type": "websocket.close", "code": 1000})
        return
    if path == "/info":
        body = json.dumps({"isolate": isolate(), "hanging": _hanging}).encode()
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})
    elif path == "/hang":
        # In flight until the isolate is killed (or the client gives up); /info tells.
        _hanging += 1
        try:
            await asyncio.sleep(float(q.get("s", "3600")))
        finally:
            _hanging -= 1
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-length", b"4")]})
        await send({"type": "http.response.body", "body": b"late"})
    elif path == "/big":
        # ``blocks`` blocks of 64 KiB; chunked unless ``length`` is given.
        n = int(q.get("blocks", "160"))
        headers = [(b"content-type", b"application/octet-stream")]
        if q.get("length"):
            headers.append((b"content-length", str(n * BLOCK).encode()))
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        for i in range(n):
            await send({"type": "http.response.body", "body": block(i), "more_body": True})
        await send({"type": "http.response.body", "body": b""})
    elif path == "/sized":
        # ``n`` bytes of block 0 in one message (Content-Length).
        body = block(0)[: int(q.get("n", "1024"))]
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})
    elif path == "/ignore-body":
        # Never reads the request body: its sender can only be held back. Answers after
        # ``s`` seconds or when /release is asked.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(_released().wait(), float(q.get("s", "3600")))
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ignored"})
    elif path == "/release":
        _released().set()
        _release.clear()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"released"})
    elif path == "/echo-size":
        size = 0
        while True:
            msg = await receive()
            size += len(msg.get("body", b""))
            if not msg.get("more_body"):
                break
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": str(size).encode()})
    else:
        await send({"type": "http.response.start", "status": 404, "headers": []})
        await send({"type": "http.response.body", "body": b"not found"})
