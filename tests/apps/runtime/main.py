"""A raw ASGI app exercising the runtime: slow answers, streams, WebSockets, background
work, memory blow-ups, and lifecycle events recorded in the branch database."""

import asyncio
import json
import os
from urllib.parse import parse_qs

import psycopg

from phloem.functions import wait_until

DB = os.environ["DATABASE_URL_UNPOOLED"]
_hoard: list[bytes] = []


def isolate() -> str:
    """Which isolate this is: each is pid 1 in its own sandbox, its id tells them apart.
    Read per call: the deploy's import check runs the module without it."""
    return os.environ["PHLOEM_ISOLATE"]


async def record(event: str) -> None:
    async with await psycopg.AsyncConnection.connect(DB, autocommit=True) as conn:
        await conn.execute("CREATE TABLE IF NOT EXISTS runtime_events (event text,"
                           " deployment text, isolate text, at timestamptz DEFAULT now())")
        await conn.execute("INSERT INTO runtime_events (event, deployment, isolate)"
                           " VALUES (%s, %s, %s)",
                           (event, os.environ["PHLOEM_DEPLOYMENT"], isolate()))


async def send_text(send, status: int, text: str, ctype: bytes = b"text/plain") -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", ctype)]})
    await send({"type": "http.response.body", "body": text.encode()})


async def app(scope, receive, send):
    if scope["type"] == "lifespan":
        while True:
            msg = await receive()
            if msg["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            else:
                await record("shutdown")
                await send({"type": "lifespan.shutdown.complete"})
                return
    if scope["type"] == "websocket":
        await receive()  # websocket.connect
        await send({"type": "websocket.accept"})
        while True:
            msg = await receive()
            if msg["type"] == "websocket.disconnect":
                return
            await send({"type": "websocket.send", "text": "echo:" + msg.get("text", "")})
    q = {k: v[0] for k, v in parse_qs(scope["query_string"].decode()).items()}
    path = scope["path"]
    if path == "/slow":
        await asyncio.sleep(float(q.get("s", "1")))
        await send_text(send, 200, json.dumps({"isolate": isolate()}), b"application/json")
    elif path == "/info":
        await send_text(send, 200, json.dumps({
            "isolate": isolate(), "deployment": os.environ["PHLOEM_DEPLOYMENT"]}),
            b"application/json")
    elif path == "/print":
        print(q.get("msg", "hello"), flush=True)
        await send_text(send, 200, "printed")
    elif path == "/wait":
        async def later() -> None:
            await asyncio.sleep(float(q.get("s", "1")))
            await record("background:" + q.get("tag", ""))

        wait_until(later())
        await send_text(send, 202, "accepted")
    elif path == "/alloc":
        for _ in range(int(q.get("mb", "10"))):
            _hoard.append(os.urandom(1024 * 1024))
        await send_text(send, 200, f"holding {len(_hoard)} MB")
    elif path.endswith("sse"):
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/event-stream"),
                                (b"cache-control", b"no-cache")]})
        n, interval = int(q.get("n", "5")), float(q.get("interval", "0.2"))
        if path == "/sse":
            for i in range(n):
                await send({"type": "http.response.body", "body": f"data: {i}\n\n".encode(),
                            "more_body": True})
                await asyncio.sleep(interval)
        elif path == "/silent-sse":
            await send({"type": "http.response.body", "body": b"data: hi\n\n",
                        "more_body": True})
            await asyncio.sleep(3600)
        elif path == "/heartbeat-sse":
            for _ in range(n):
                await send({"type": "http.response.body", "body": b": ping\n\n",
                            "more_body": True})
                await asyncio.sleep(interval)
        await send({"type": "http.response.body", "body": b"data: end\n\n"})
    else:
        await send_text(send, 404, "not found")
