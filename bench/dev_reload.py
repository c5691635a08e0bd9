"""Edit-to-new-response time of ``phloem dev`` beside ``uvicorn --reload`` on the same
Starlette app.

    .venv/bin/python bench/dev_reload.py [--edits 7]

Each edit rewrites the app's module with a new version string; the time is from the write
to the first response carrying it (polled every 2 ms over keep-alive HTTP).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

from phloem.testing import PlatformProcess, free_port, platform_process, wait_for

APP = '''
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route

VERSION = "v0"

async def index(request):
    return PlainTextResponse(VERSION)

app = Starlette(routes=[Route("/", index)])
'''


def measure(client: httpx.Client, app: Path, edits: int) -> list[float]:
    samples = []
    for i in range(1, edits + 1):
        want = f"v{i}"
        time.sleep(0.3)  # let the watcher settle between edits
        t0 = time.perf_counter()
        app.write_text(APP.replace('"v0"', f'"{want}"'))
        deadline = t0 + 30
        while time.perf_counter() < deadline:
            try:
                if client.get("/").text == want:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.002)
        samples.append(time.perf_counter() - t0)
    return samples


def spawn(cmd: list[str], cwd: Path,
          env: dict[str, str]) -> tuple[subprocess.Popen[str], list[str]]:
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)

    threading.Thread(target=read, daemon=True).start()
    return proc, lines


def phloem_dev(p: PlatformProcess, root: Path, edits: int) -> list[float]:
    port = free_port()
    proc, lines = spawn([*p.cli_args(), "dev", "--port", str(port)], root, p.env)
    try:
        url = wait_for(lambda: next((ln.split()[1] for ln in lines if ln.startswith("api ")),
                                    None), 60, "phloem dev")
        with httpx.Client(base_url=f"http://127.0.0.1:{port}",
                          headers={"Host": url.split("://", 1)[1]}, timeout=30) as client:
            wait_for(lambda: client.get("/").status_code == 200, 30, "first response")
            return measure(client, root / "src" / "app.py", edits)
    finally:
        proc.terminate()
        proc.wait(20)


def uvicorn_reload(root: Path, edits: int) -> list[float]:
    port = free_port()
    proc, _ = spawn([sys.executable, "-m", "uvicorn", "src.app:app", "--reload", "--port",
                     str(port), "--log-level", "warning"], root, dict(os.environ))
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
            wait_for(lambda: client.get("/").status_code == 200, 30, "uvicorn")
            return measure(client, root / "src" / "app.py", edits)
    finally:
        proc.terminate()
        proc.wait(20)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--edits", type=int, default=7)
    args = parser.parse_args()
    with platform_process() as p, tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "proj"
        p.cli("init", str(root))
        (root / "src" / "app.py").write_text(APP)
        p.cli("link", "--branch", "main", cwd=root)
        ours = phloem_dev(p, root, args.edits)
        (root / "src" / "app.py").write_text(APP)
        theirs = uvicorn_reload(root, args.edits)
    a, b = statistics.median(ours), statistics.median(theirs)
    print(f"edit -> new response, median of {args.edits}")
    print(f"  phloem dev          {a * 1000:8.1f} ms   (target <= 300 ms)")
    print(f"  uvicorn --reload    {b * 1000:8.1f} ms")
    print(f"  ratio phloem / uvicorn {a / b:8.2f}")


if __name__ == "__main__":
    main()
