"""``phloem dev``: edit a file, get the new response; in-flight requests finish; a broken
edit is reported and the previous version keeps serving."""

from __future__ import annotations

import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
from websockets.sync.client import connect as ws_connect

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
def dev_server(platform: PlatformProcess, root: Path, port: int | None
               ) -> Iterator[list[str]]:
    """``phloem dev`` in ``root``; yields the lines it prints (collected as they come)."""
    args = ["--port", str(port)] if port is not None else []
    proc = subprocess.Popen([*platform.cli_args(), "dev", *args], cwd=root,
                            env={k: v for k, v in platform.env.items()
                                 if k != "PHLOEM_DEV_PORT"}, stdout=subprocess.PIPE,
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


def url_of(lines: list[str], slug: str, timeout: float) -> str:
    """The URL ``phloem dev`` printed for ``slug`` (``slug  http://localhost:PORT/``)."""
    return str(wait_for(lambda: next((ln.split()[1] for ln in lines
                                      if ln.split()[:1] == [slug]), None),
                        timeout, f"the dev URL of {slug}"))


def test_dev_reloads_on_edit(platform: PlatformProcess, tmp_path: Path) -> None:
    root = tmp_path / "devproj"
    platform.cli("init", str(root))
    (root / "src" / "app.py").write_text(APP)
    branch = f"dev-{uuid.uuid4().hex[:6]}"
    platform.cli("branches", "create", "--name", branch)
    platform.cli("link", "--branch", branch, cwd=root)
    port = free_port()
    with dev_server(platform, root, port) as lines:
        url = url_of(lines, "api", 60)
        assert url == f"http://localhost:{port}/"
        # As `neon dev`: the function's own port, no Host header to set.
        with httpx.Client(base_url=url, timeout=30) as client:
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
        url = url_of(lines, "web", 180)
        with httpx.Client(base_url=url, timeout=30) as client:
            assert client.get("/").text == f"one {branch}"
            app = root / "src" / "index.ts"
            app.write_text(HONO.replace("VERSION", "two"))
            wait_for(lambda: client.get("/").text == f"two {branch}", 30, "the new version")
            app.write_text(HONO.replace("VERSION", "three").replace("Hono();", "Hono(;"))
            wait_for(lambda: any("build failed" in ln for ln in lines), 30,
                     "the bundle error to be shown")
            assert any("index.ts:2:" in ln for ln in lines)  # esbuild's location
            assert client.get("/").text == f"two {branch}"


# A WebSocket echo written against node:http's upgrade event only (no package to install):
# the handshake and unmasking of short text frames, which is all the test sends.
WS_ECHO = r'''import { createHash } from "node:crypto";
const GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";
export default {
  fetch: () => new Response("chat over plain http"),
  upgrade(req: any, socket: any) {
    const accept = createHash("sha1").update(req.headers["sec-websocket-key"] + GUID)
      .digest("base64");
    socket.write("HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n" +
      `Connection: Upgrade\r\nSec-WebSocket-Accept: ${accept}\r\n\r\n`);
    let buf = Buffer.alloc(0);
    socket.on("data", (data: Buffer) => {
      buf = Buffer.concat([buf, data]);
      while (buf.length >= 6) {
        const op = buf[0] & 0x0f, len = buf[1] & 0x7f;
        if (len > 125) return socket.destroy();
        if (buf.length < 6 + len) return;
        const mask = buf.subarray(2, 6);
        const text = Buffer.from(buf.subarray(6, 6 + len)).map((b, i) => b ^ mask[i % 4]);
        buf = buf.subarray(6 + len);
        if (op === 8) return socket.end(Buffer.from([0x88, 0]));
        const out = Buffer.from(`echo ${text.toString()}`);
        socket.write(Buffer.concat([Buffer.from([0x81, out.length]), out]));
      }
    });
  },
};
'''

NEON_TS = '''import { defineConfig } from "@neon/config/v1";
export default defineConfig({
  preview: {
    functions: {
      web: { name: "web", source: "src/web.ts", dev: { port: WEB_PORT },
             env: { GREETING: process.env.GREETING!, WHO: process.env.WHO! } },
      chat: { name: "chat", source: "src/chat.ts", dev: { port: CHAT_PORT } },
      bare: { name: "bare", source: "src/bare.ts" },
      broken: { name: "broken", source: "src/broken.ts" },
    },
  },
});
'''


def test_dev_serves_like_neon_dev(platform: PlatformProcess, tmp_path: Path) -> None:
    """One port per function (dev.port exactly, the others from --port up, a taken one
    skipped and said), no Host header needed, a real WebSocket 101, a bare function
    export, .env/.env.local read by neon.ts, and a failing function's error shown."""
    root = tmp_path / "multi"
    web_port, chat_port, first = free_port(), free_port(), free_port()
    files = {
        "neon.ts": NEON_TS.replace("WEB_PORT", str(web_port)).replace("CHAT_PORT",
                                                                      str(chat_port)),
        "src/web.ts": "export default { fetch: () => new Response(`${process.env.GREETING} "
                      "${process.env.WHO} ${process.env.NEON_BRANCH}`) };\n",
        "src/chat.ts": WS_ECHO,
        "src/bare.ts": "export default async function handler(request: Request) {\n"
                       "  return new Response(`bare ${new URL(request.url).pathname} "
                       "${process.env.NEON_FUNCTION_WEB_BASE_URL}`);\n}\n",
        "src/broken.ts": "throw new Error('broken at start-up: BOT_TOKEN is missing');\n"
                         "export default { fetch: () => new Response('never') };\n",
        ".env": "GREETING=from-dotenv\nWHO=from-env\n",
        ".env.local": "WHO=from-env-local\n",
    }
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    branch = f"mdev-{uuid.uuid4().hex[:6]}"
    platform.cli("branches", "create", "--name", branch)
    platform.cli("link", "--branch", branch, cwd=root)
    started = time.monotonic()
    # `first` is taken: the first function without dev.port moves past it, and says so.
    with socket.create_server(("127.0.0.1", first)), \
            dev_server(platform, root, first) as lines:
        assert url_of(lines, "web", 180) == f"http://localhost:{web_port}/"
        assert url_of(lines, "chat", 5) == f"http://localhost:{chat_port}/"
        bare, broken = url_of(lines, "bare", 5), url_of(lines, "broken", 5)
        bare_port = int(bare.rsplit(":", 1)[1].rstrip("/"))
        assert bare_port > first
        assert f"port {first} is in use: bare serves on {bare_port}" in lines
        assert int(broken.rsplit(":", 1)[1].rstrip("/")) > bare_port
        print(f"\nfour functions served {time.monotonic() - started:.1f} s after start")

        # No Host header to set: each function answers on its own port.
        with httpx.Client(timeout=30) as client:
            assert client.get(f"http://localhost:{web_port}/").text == \
                f"from-dotenv from-env-local {branch}"
            assert client.get(f"{bare}hook").text == \
                f"bare /hook http://localhost:{web_port}/"
            assert client.get(f"http://localhost:{chat_port}/").text == \
                "chat over plain http"
            failed = client.get(broken)
            assert failed.status_code == 502
            assert "broken at start-up: BOT_TOKEN is missing" in failed.text
            assert "functions logs" not in failed.text
        # The start-up error was printed in the dev terminal when dev started.
        assert any("broken at start-up: BOT_TOKEN is missing" in ln for ln in lines)
        assert any(ln.startswith("[broken] failed to start: ") for ln in lines)

        with ws_connect(f"ws://localhost:{chat_port}/ws", open_timeout=30) as ws:
            assert ws.response is not None and ws.response.status_code == 101
            ws.send("hi")
            assert ws.recv(timeout=10) == "echo hi"


def test_dev_default_port_is_8787_when_free(platform: PlatformProcess,
                                            tmp_path: Path) -> None:
    root = tmp_path / "default"
    (root / "src").mkdir(parents=True)
    (root / "neon.ts").write_text(
        'import { defineConfig } from "@neon/config/v1";\n'
        'export default defineConfig({ preview: { functions: { api: { name: "api", '
        'source: "src/index.ts" } } } });\n')
    (root / "src" / "index.ts").write_text(
        "export default { fetch: () => new Response('on the default port') };\n")
    branch = f"ddev-{uuid.uuid4().hex[:6]}"
    platform.cli("branches", "create", "--name", branch)
    platform.cli("link", "--branch", branch, cwd=root)
    try:  # whether 8787 is free now (another platform on this machine may hold it)
        with socket.create_server(("127.0.0.1", 8787)):
            free = True
    except OSError:
        free = False
    with dev_server(platform, root, None) as lines:
        url = url_of(lines, "api", 120)
        if free:
            assert url == "http://localhost:8787/"
        else:
            assert any(ln.startswith("port 8787 is in use: api serves on ") for ln in lines)
            assert int(url.rsplit(":", 1)[1].rstrip("/")) > 8787
        assert httpx.get(url, timeout=30).text == "on the default port"


def test_dev_port_is_exact_and_checked(platform: PlatformProcess, tmp_path: Path) -> None:
    root = tmp_path / "exact"
    (root / "src").mkdir(parents=True)
    (root / "src" / "index.ts").write_text(
        "export default { fetch: () => new Response('x') };\n")
    config = ('import { defineConfig } from "@neon/config/v1";\n'
              'export default defineConfig({ preview: { functions: { web: { name: "web", '
              'source: "src/index.ts", dev: DEV } } } });\n')
    branch = f"xdev-{uuid.uuid4().hex[:6]}"
    platform.cli("branches", "create", "--name", branch)
    (root / "neon.ts").write_text(config.replace("DEV", '{ port: "8790" }'))
    platform.cli("link", "--branch", branch, "--no-env-pull", cwd=root)
    bad = platform.cli("config", "plan", cwd=root, check=False)
    assert bad.returncode != 0
    assert "functions.web.dev.port: must be an integer from 1 to 65535 (got '8790')" \
        in bad.stderr
    (root / "neon.ts").write_text(config.replace("DEV", "{ host: 1 }"))
    bad = platform.cli("config", "plan", cwd=root, check=False)
    assert "functions.web.dev.host: unknown key (known: port)" in bad.stderr

    held = free_port()
    (root / "neon.ts").write_text(config.replace("DEV", f"{{ port: {held} }}"))
    with socket.create_server(("127.0.0.1", held)):  # taken: dev.port never moves
        proc = platform.cli("dev", cwd=root, check=False, timeout=180)
    assert proc.returncode != 0
    assert f"functions.web.dev.port: cannot listen on 127.0.0.1:{held}" in \
        " ".join((proc.stdout + proc.stderr).split())
