"""A dependency-free ASGI app that reports its cgroups, starts many processes (to meet
``pids.max``) and leaves a detached process behind (to be found after a platform kill)."""

import json
import os
import subprocess
from urllib.parse import parse_qs


def spawn(n: int) -> dict:
    """Start ``n`` sleeps; say how many started and why the next one did not."""
    children: list[subprocess.Popen] = []
    error = None
    try:
        for _ in range(n):
            children.append(subprocess.Popen(["sleep", "60"]))
    except OSError as exc:
        error = f"{type(exc).__name__}: {exc}"
    for child in children:
        child.kill()
        child.wait()
    return {"started": len(children), "error": error}


async def app(scope, receive, send):
    if scope["type"] == "lifespan":
        while True:
            msg = await receive()
            if msg["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            else:
                await send({"type": "lifespan.shutdown.complete"})
                return
    q = {k: v[0] for k, v in parse_qs(scope["query_string"].decode()).items()}
    if scope["path"] == "/spawn":
        body = spawn(int(q.get("n", "1")))
    elif scope["path"] == "/leave":
        # Detached: survives this isolate unless its cgroup is cleaned up.
        child = subprocess.Popen(["sleep", "600"], start_new_session=True,
                                 stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                 stderr=subprocess.DEVNULL)
        body = {"pid": child.pid}
    else:
        with open("/proc/self/cgroup") as f:
            body = {"pid": os.getpid(), "cgroup": f.read()}
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": json.dumps(body).encode()})
