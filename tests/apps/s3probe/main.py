"""A dependency-free ASGI app that reads a public object from its branch's S3 endpoint
with the variables the storage service injects, from inside its sandbox.

GET /?key=<key> answers {"env": {AWS_* and NEON_STORAGE_*}, "status": <int>, "body": str}
for GET $AWS_ENDPOINT_URL_S3/site/<key> (path-style, as NEON_STORAGE_FORCE_PATH_STYLE says).
Every POST (a trigger's delivery) is recorded: GET /seen lists {path, headers, body}.
"""

import asyncio
import json
import os
import urllib.error
import urllib.request
from urllib.parse import parse_qs

SEEN = []
NAMES = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL_S3", "AWS_REGION",
         "NEON_STORAGE_FORCE_PATH_STYLE")


def fetch(url):
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
    except OSError as exc:
        return 0, f"error: {exc}"


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
    if scope["method"] == "POST" or scope["path"] == "/seen":
        body = b""
        while True:
            msg = await receive()
            body += msg.get("body", b"")
            if not msg.get("more_body"):
                break
        if scope["method"] == "POST":
            SEEN.append({"path": scope["path"], "body": body.decode(),
                         "headers": {k.decode(): v.decode() for k, v in scope["headers"]}})
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": json.dumps(SEEN).encode()})
        return
    key = parse_qs(scope["query_string"].decode()).get("key", ["hello.txt"])[0]
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3", "")
    status, body = await asyncio.to_thread(fetch, f"{endpoint}/site/{key}")
    out = json.dumps({"env": {k: os.environ.get(k) for k in NAMES}, "status": status,
                      "body": body}).encode()
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": out})
