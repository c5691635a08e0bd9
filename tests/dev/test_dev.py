"""``phloem dev``: edit a file, get the new response; in-flight requests finish; a broken
edit is reported and the previous version keeps serving."""

from __future__ import annotations

import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

from phloem.testing import PlatformProcess, free_port, wait_for

APP = '''
import asyncio, os
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route

VERSION = "one"

async def index(request):
    return PlainTextResponse(f"{VERSION} {os.environ['PHLOEM_BRANCH']}")

async def slow(request):
    await asyncio.sleep(2)
    return PlainTextResponse(f"slow {VERSION}")

app = Starlette(routes=[Route("/", index), Route("/slow", slow)])
'''


@contextmanager
def dev_server(platform: PlatformProcess, root: Path, port: int) -> Iterator[list[str]]:
    """``phloem dev`` in ``root``; yields the lines it prints (collected as they come)."""
    proc = subprocess.Popen([*platform.cli_args(), "dev", "--port", str(port)], cwd=root,
                            env=platform.env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line.rstrip("\n"))

    threading.Thread(target=read, daemon=True).start()
    try:
        yield lines
    finally:
        proc.terminate()
        proc.wait(20)


def test_dev_reloads_on_edit(platform: PlatformProcess, tmp_path: Path) -> None:
    root = tmp_path / "devproj"
    platform.cli("init", str(root))
    (root / "src" / "app.py").write_text(APP)
    branch = f"dev-{uuid.uuid4().hex[:6]}"
    platform.cli("branches", "create", "--name", branch)
    platform.cli("link", "--branch", branch, cwd=root)
    port = free_port()
    with dev_server(platform, root, port) as lines:
        url = wait_for(lambda: next((ln.split()[1] for ln in lines
                                     if ln.startswith("api ")), None), 60, "the dev URL")
        host = url.split("://", 1)[1]
        assert host.endswith(f":{port}")
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", headers={"Host": host},
                          timeout=30) as client:
            assert client.get("/").text == f"one {branch}"
            slow: list[str] = []
            t = threading.Thread(target=lambda: slow.append(client.get("/slow").text))
            t.start()
            wait_for(lambda: any("/slow" in ln for ln in lines) or t.is_alive(), 5,
                     "the slow request to start")
            edited_at = time.monotonic()
            app = root / "src" / "app.py"
            app.write_text(APP.replace('VERSION = "one"', 'VERSION = "two"'))
            wait_for(lambda: client.get("/").text == f"two {branch}", 20, "the new version")
            assert time.monotonic() - edited_at < 20
            t.join(10)
            assert slow == ["slow one"]  # the in-flight request finished on the old version

            app.write_text(APP.replace('VERSION = "one"', 'VERSION = ('))  # broken
            wait_for(lambda: any("reload failed" in ln for ln in lines), 20,
                     "the build error to be shown")
            assert client.get("/").text == f"two {branch}"
            assert any("/ 200" in ln for ln in lines)  # requests are logged


HONO = '''import { Hono } from "hono";
const app = new Hono();
app.get("/", (c) => c.text(`VERSION ${process.env.NEON_BRANCH}`));
export default app;
'''


def test_dev_serves_and_reloads_a_neon_ts_node_function(platform: PlatformProcess,
                                                         tmp_path: Path) -> None:
    root = tmp_path / "nodedev"
    (root / "src").mkdir(parents=True)
    (root / "neon.ts").write_text(
        'import { defineConfig } from "@neon/config/v1";\n'
        'export default defineConfig({ functions: { web: { name: "web", '
        'source: "src/index.ts" } } });\n')
    (root / "package.json").write_text('{"type": "module", "dependencies": {"hono": "^4"}}')
    (root / "src" / "index.ts").write_text(HONO.replace("VERSION", "one"))
    branch = f"ndev-{uuid.uuid4().hex[:6]}"
    platform.cli("branches", "create", "--name", branch)
    platform.cli("link", "--branch", branch, cwd=root)
    port = free_port()
    with dev_server(platform, root, port) as lines:
        url = wait_for(lambda: next((ln.split()[1] for ln in lines
                                     if ln.startswith("web ")), None), 180, "the dev URL")
        host = url.split("://", 1)[1]
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", headers={"Host": host},
                          timeout=30) as client:
            assert client.get("/").text == f"one {branch}"
            app = root / "src" / "index.ts"
            app.write_text(HONO.replace("VERSION", "two"))
            wait_for(lambda: client.get("/").text == f"two {branch}", 30, "the new version")
            app.write_text(HONO.replace("VERSION", "three").replace("Hono();", "Hono(;"))
            wait_for(lambda: any("build failed" in ln for ln in lines), 30,
                     "the bundle error to be shown")
            assert any("index.ts:2:" in ln for ln in lines)  # esbuild's location
            assert client.get("/").text == f"two {branch}"
