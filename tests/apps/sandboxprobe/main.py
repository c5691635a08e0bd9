"""A dependency-free ASGI app that reports what its sandbox lets it see and do."""

import ctypes
import errno
import json
import os
import resource
from urllib.parse import parse_qs

libc = ctypes.CDLL(None, use_errno=True)


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


def write(path: str, size: int) -> str:
    try:
        with open(path, "wb") as f:
            chunk = b"x" * 2**20
            for _ in range(size // 2**20):
                f.write(chunk)
            f.write(b"x" * (size % 2**20))
        return "written"
    except OSError as exc:
        return errno.errorcode.get(exc.errno or 0, str(exc))


def call(result: int) -> str:
    return "ok" if result == 0 else errno.errorcode.get(ctypes.get_errno(), "?")


def status() -> dict[str, str]:
    with open("/proc/self/status") as f:
        return {k: v.strip() for k, _, v in (line.partition(":") for line in f)}


def attempts() -> dict[str, str]:
    clone_newns, clone_newuser = 0x00020000, 0x10000000
    out = {"unshare_user": call(libc.unshare(clone_newuser)),
           "unshare_mount": call(libc.unshare(clone_newns)),
           "mount_tmpfs": call(libc.mount(b"tmpfs", b"/tmp", b"tmpfs", 0, None)),
           "ptrace_traceme": call(libc.ptrace(0, 0, None, None))}
    try:
        os.setuid(0)
        out["setuid0"] = "ok"
    except PermissionError:
        out["setuid0"] = "EPERM"
    return out


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
        body: object = {p: can_read(p) for p in query.get("path", [])}
    elif scope["path"] == "/write":
        body = write(query["path"][0], int(query.get("bytes", ["1"])[0]))
    elif scope["path"] == "/attempts":
        body = attempts()
    else:
        st = status()
        body = {"uid": os.getuid(), "pid": os.getpid(), "home": os.environ.get("HOME"),
                "pids": sorted(int(p) for p in os.listdir("/proc") if p.isdigit()),
                "root": sorted(os.listdir("/")), "cwd": os.getcwd(),
                "nofile": list(resource.getrlimit(resource.RLIMIT_NOFILE)),
                **{k: st[k] for k in ("NoNewPrivs", "Seccomp", "CapBnd", "CapEff", "CapPrm")}}
    data = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": data})
