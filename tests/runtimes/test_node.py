"""The Node runtime pieces with real Node 24, real esbuild and real npm packages: bundles
served by the isolate host on a Unix socket the test binds itself (as the supervisor does),
driven with httpx and websockets over that socket.

The tools (Node 24, esbuild, the host) are provisioned once per session into
``$PHLOEM_TEST_NODE_TOOLS`` when set (a cache kept between runs), else a temporary dir.
"""

from __future__ import annotations

import json
import os
import queue
import shutil
import signal
import socket
import statistics
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from websockets.sync.client import unix_connect

from phloem.runtimes.node import provision
from phloem.runtimes.node.bundle import (
    BundleError,
    bundle,
    find_entry,
    install_dependencies,
    native_packages,
)
from phloem.runtimes.node.substitutes import install_substitutes, package_dir

# --------------------------------------------------------------------------- fixtures


@dataclass(frozen=True)
class Tools:
    base: Path
    node: Path
    esbuild: Path
    host: Path
    deps_cache: Path


@pytest.fixture(scope="session")
def tools(tmp_path_factory: pytest.TempPathFactory) -> Tools:
    configured = os.environ.get("PHLOEM_TEST_NODE_TOOLS")
    base = Path(configured) if configured else tmp_path_factory.mktemp("node-tools")
    started = time.monotonic()
    lines: list[str] = []
    node, esbuild, host = provision.ensure_toolchain(base, lines.append)
    took = time.monotonic() - started
    print(f"\nnode toolchain ready in {took:.1f} s: {node} ({'; '.join(lines) or 'cached'})")
    return Tools(base, node, esbuild, host, base / "deps-cache")


@pytest.fixture
def workdir() -> Iterator[Path]:
    # Short paths: a Unix socket path must fit in 108 bytes.
    path = Path(tempfile.mkdtemp(prefix="phl-node-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def write_app(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


def build(tools: Tools, app: Path, out_dir: Path, entry: str | None = None) -> Path:
    node_modules = install_dependencies(app, tools.deps_cache, tools.node)
    out = out_dir / "bundle.mjs"
    bundle(tools.esbuild, app, entry or find_entry(app), out,
           [node_modules] if node_modules else [])
    return out


class Host:
    """The Node host serving ``bundle`` on a Unix socket bound here and passed as a fd,
    with the status pipe read in a thread."""

    def __init__(self, tools: Tools, bundle_path: Path, workdir: Path,
                 env: dict[str, str] | None = None) -> None:
        self.socket_path = workdir / "fn.sock"
        self.events: queue.Queue[bytes] = queue.Queue()
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(str(self.socket_path))
        listener.listen(128)
        status_r, status_w = os.pipe()
        self.started = time.monotonic()
        self.stdout_path = workdir / "stdout.log"
        self.stderr_path = workdir / "stderr.log"
        with self.stdout_path.open("wb") as out, self.stderr_path.open("wb") as err:
            self.process = subprocess.Popen(
                [str(tools.node), str(tools.host), "--bundle", str(bundle_path),
                 "--fd", str(listener.fileno()), "--ready-fd", str(status_w)],
                pass_fds=(listener.fileno(), status_w), stdin=subprocess.DEVNULL,
                stdout=out, stderr=err, cwd=workdir,
                env={**os.environ, "PHLOEM_SUPERVISOR_PID": str(os.getpid()),
                     **(env or {})},
            )
        listener.close()
        os.close(status_w)
        threading.Thread(target=self._read_status, args=(status_r,), daemon=True).start()

    def _read_status(self, fd: int) -> None:
        with os.fdopen(fd, "rb", 0) as pipe:
            while byte := pipe.read(1):
                self.events.put(byte)

    def wait_event(self, expected: bytes, timeout: float = 30) -> float:
        """Wait for the next status byte; it must be ``expected``. Returns seconds since
        spawn."""
        try:
            got = self.events.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"no {expected!r} on the status pipe after {timeout} s; "
                                 f"stderr: {self.stderr()}") from None
        assert got == expected, (got, self.stderr())
        return time.monotonic() - self.started

    def client(self, timeout: float = 30) -> httpx.Client:
        return httpx.Client(transport=httpx.HTTPTransport(uds=str(self.socket_path)),
                            base_url="http://fn.localhost", timeout=timeout)

    def stdout(self) -> str:
        return self.stdout_path.read_text()

    def stderr(self) -> str:
        return self.stderr_path.read_text()

    def stop(self, timeout: float = 20) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise AssertionError(f"host did not exit {timeout} s after SIGINT; "
                                 f"stderr: {self.stderr()}") from None


def check(tools: Tools, bundle_path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(tools.node), str(tools.host), "--bundle", str(bundle_path),
                           "--check"], capture_output=True, text=True, timeout=60,
                          check=False)


# ---------------------------------------------------------------------------- the apps

PLAIN = {"index.mjs": "export default { fetch(req) { return new Response('hi') } }\n"}

HONO_PACKAGE = json.dumps({"name": "hono-app", "private": True, "type": "module",
                           "dependencies": {"hono": provision.HONO_VERSION}})

HONO_TS = """\
import { Hono } from "hono";
import { streamSSE } from "hono/streaming";
import { writeFileSync } from "node:fs";

type Todo = { id: number; title: string };
const todos: Todo[] = [{ id: 1, title: "bundle me" }];
const sleep = (ms: number) => new Promise<void>((r) => setTimeout(r, ms));
const MARK = process.env.MARK_DIR as string;

const app = new Hono();
app.get("/", (c) => {
  console.log("GET / line one\\nline two");
  return c.json({ todos, node: process.version });
});
app.post("/echo", (c) => new Response(c.req.raw.body, {
  headers: { "content-type": c.req.header("content-type") ?? "application/octet-stream" },
}));
app.get("/sse", (c) => streamSSE(c, async (stream) => {
  for (let i = 0; i < 3; i++) {
    await stream.writeSSE({ data: `tick ${i}` });
    await sleep(300);
  }
}));
app.get("/later", (c) => {
  c.executionCtx.waitUntil(sleep(500).then(() => writeFileSync(`${MARK}/later`, "done")));
  return c.text("accepted", 202);
});
app.get("/slow", async (c) => {
  await sleep(Number(c.req.query("ms") ?? "1000"));
  return c.text("slow done");
});
app.get("/hang", (c) => {
  c.req.raw.signal.addEventListener("abort", () => writeFileSync(`${MARK}/aborted`, "yes"));
  return new Promise<Response>(() => {});
});
app.get("/shim", (c) => {
  (globalThis as any).__phloem_waitUntil(sleep(100));
  return c.text("ok");
});

export default app;
"""

WS_PACKAGE = json.dumps({"name": "ws-app", "private": True, "type": "module",
                         "dependencies": {"ws": "8.18.3"}})

WS_APP = """\
import { WebSocketServer } from "ws";
import { writeFileSync } from "node:fs";

const wss = new WebSocketServer({ noServer: true });
const MARK = process.env.MARK_DIR;

process.on("SIGINT", async () => {
  // Neon-style drain: close the sockets, wait a little, leave a trace.
  for (const ws of wss.clients) ws.close(1001, "going away");
  await new Promise((r) => setTimeout(r, 300));
  writeFileSync(`${MARK}/sigint`, `handled ${wss.clients.size}`);
});

export default {
  fetch(request) {
    return new Response(`plain http on the ws app: ${new URL(request.url).pathname}`);
  },
  upgrade(req, socket, head) {
    wss.handleUpgrade(req, socket, head, (ws) => {
      ws.on("message", (data, isBinary) => ws.send(data, { binary: isBinary }));
    });
  },
};
"""

# ------------------------------------------------------------------------------- tests


def test_toolchain_is_node_24(tools: Tools) -> None:
    assert (provision.node_version(tools.node) or "").startswith("24.")
    version = subprocess.run([str(tools.esbuild), "--version"], capture_output=True,
                             text=True, check=True).stdout.strip()
    assert version == provision.ESBUILD_VERSION
    assert tools.host.stat().st_mode & 0o444 == 0o444
    # Cached: a second call provisions nothing and reports nothing.
    lines: list[str] = []
    assert provision.ensure_toolchain(tools.base, lines.append)[2] == tools.host
    assert lines == []


def test_node_integrity_mismatch_leaves_nothing(tools: Tools, workdir: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    bad = {cpu: "sha512-" + "A" * 86 + "==" for cpu in provision.NODE_INTEGRITY}
    monkeypatch.setattr(provision, "NODE_INTEGRITY", bad)
    with pytest.raises(provision.ProvisionError, match="integrity mismatch"):
        provision.ensure_node(workdir / "tools", lambda _line: None, use_system=False)
    assert sorted(p.name for p in (workdir / "tools").iterdir()) == []


def test_find_entry(workdir: Path) -> None:
    with pytest.raises(BundleError, match=r"index\.ts, index\.mjs"):
        find_entry(workdir)
    write_app(workdir, {"src/index.js": "", "src/index.ts": ""})
    assert find_entry(workdir) == "src/index.ts"
    write_app(workdir, {"index.js": ""})
    assert find_entry(workdir) == "index.js"
    write_app(workdir, {"index.mjs": ""})
    assert find_entry(workdir) == "index.mjs"
    write_app(workdir, {"index.ts": ""})
    assert find_entry(workdir) == "index.ts"


def test_plain_object_export(tools: Tools, workdir: Path) -> None:
    app = write_app(workdir / "app", PLAIN)
    out = build(tools, app, workdir / "out")
    assert check(tools, out).returncode == 0
    host = Host(tools, out, workdir)
    try:
        ready = host.wait_event(b"R")
        print(f"\nplain bundle ready in {ready * 1000:.0f} ms")
        with host.client() as c:
            r = c.get("/")
            assert (r.status_code, r.text) == (200, "hi")
            # A WebSocket handshake to a module without upgrade: refused plainly.
            r = c.get("/", headers={"Connection": "Upgrade", "Upgrade": "websocket",
                                    "Sec-WebSocket-Version": "13",
                                    "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ=="})
            assert r.status_code == 501
            assert "no upgrade export" in r.text
    finally:
        assert host.stop() == 0


def test_function_default_export_is_the_fetch_handler(tools: Tools, workdir: Path) -> None:
    # The shape of Neon's bots: `export default async function handler(request)`.
    app = write_app(workdir / "app", {"index.ts": """\
export default async function handler(request: Request, env: unknown, ctx: any) {
  const body = await request.text();
  const waits = typeof ctx?.waitUntil === "function";
  return new Response(`bare ${request.method} ${new URL(request.url).pathname} ${body} ${waits}`);
}
"""})
    out = build(tools, app, workdir / "out")
    assert check(tools, out).returncode == 0
    host = Host(tools, out, workdir)
    try:
        host.wait_event(b"R")
        with host.client() as c:
            r = c.post("/hook", content="ping")
            assert (r.status_code, r.text) == (200, "bare POST /hook ping true")
    finally:
        assert host.stop() == 0


def test_fetch_errors_are_500_and_logged(tools: Tools, workdir: Path) -> None:
    app = write_app(workdir / "app", {"index.js": """\
export default {
  async fetch(request) {
    const path = new URL(request.url).pathname;
    if (path === "/throw") throw new Error("kaboom in fetch");
    if (path === "/none") return undefined;
    return new Response("fine");
  },
};
"""})
    host = Host(tools, build(tools, app, workdir / "out"), workdir)
    try:
        host.wait_event(b"R")
        with host.client() as c:
            assert c.get("/throw").status_code == 500
            assert c.get("/none").status_code == 500
            assert c.get("/").text == "fine"  # the isolate lives on
    finally:
        assert host.stop() == 0
    assert "kaboom in fetch" in host.stderr()
    assert "fetch() must return a Response" in host.stderr()


def test_hono_typescript_app(tools: Tools, workdir: Path) -> None:
    app = write_app(workdir / "app", {"package.json": HONO_PACKAGE, "index.ts": HONO_TS})
    out = build(tools, app, workdir / "out")
    marks = workdir / "marks"
    marks.mkdir()
    host = Host(tools, out, workdir, env={"MARK_DIR": str(marks)})
    try:
        host.wait_event(b"R")
        with host.client() as c:
            r = c.get("/", headers={"X-Request-Id": "req-42"})
            assert r.status_code == 200
            assert r.json()["todos"] == [{"id": 1, "title": "bundle me"}]
            assert r.json()["node"].startswith("v24.")

            # Streaming request body echoed back as a stream.
            def chunks() -> Iterator[bytes]:
                for i in range(50):
                    yield f"chunk {i:03d} ".encode() * 100

            expected = b"".join(chunks())
            r = c.post("/echo", content=chunks(), headers={"content-type": "text/x-test"})
            assert r.status_code == 200
            assert r.content == expected
            assert r.headers["content-type"] == "text/x-test"

            # SSE events arrive one by one, not at the end.
            arrivals: list[tuple[float, str]] = []
            t0 = time.monotonic()
            with c.stream("GET", "/sse") as resp:
                assert resp.headers["content-type"].startswith("text/event-stream")
                for line in resp.iter_lines():
                    if line.startswith("data: "):
                        arrivals.append((time.monotonic() - t0, line[6:]))
            assert [d for _, d in arrivals] == ["tick 0", "tick 1", "tick 2"]
            assert arrivals[2][0] - arrivals[0][0] > 0.4  # 2 x 300 ms apart at the source

            # waitUntil: W while pending, D once done, work finishes after the response.
            r = c.get("/later")
            assert (r.status_code, r.text) == (202, "accepted")
            host.wait_event(b"W")
            assert not (marks / "later").exists()
            host.wait_event(b"D", timeout=10)
            assert (marks / "later").read_text() == "done"

            # The global used by the @neon/functions shim.
            assert c.get("/shim").text == "ok"
            host.wait_event(b"W")
            host.wait_event(b"D", timeout=10)

        # Client disconnect aborts the Request's signal.
        with host.client(timeout=1) as c, pytest.raises(httpx.ReadTimeout):
            c.get("/hang")
        deadline = time.monotonic() + 10
        while not (marks / "aborted").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert (marks / "aborted").read_text() == "yes"
    finally:
        assert host.stop() == 0
    assert "[rid=req-42] GET / line one\n[rid=req-42] line two\n" in host.stdout()


def test_sigint_drains_in_flight_requests(tools: Tools, workdir: Path) -> None:
    app = write_app(workdir / "app", {"package.json": HONO_PACKAGE, "index.ts": HONO_TS})
    out = build(tools, app, workdir / "out")
    (workdir / "marks").mkdir()
    host = Host(tools, out, workdir, env={"MARK_DIR": str(workdir / "marks")})
    host.wait_event(b"R")
    result: dict[str, httpx.Response] = {}

    def slow() -> None:
        with host.client() as c:
            result["r"] = c.get("/slow", params={"ms": "1000"})

    t = threading.Thread(target=slow)
    t.start()
    with host.client() as c:
        assert c.get("/later").status_code == 202  # wait_until work, 500 ms
    host.wait_event(b"W")
    time.sleep(0.2)
    assert host.stop() == 0
    t.join(10)
    # The in-flight request was answered and the wait_until work finished before exit.
    assert (result["r"].status_code, result["r"].text) == (200, "slow done")
    assert (workdir / "marks" / "later").read_text() == "done"


def test_wait_until_budget(tools: Tools, workdir: Path) -> None:
    app = write_app(workdir / "app", {"index.js": """\
export default {
  fetch(request, env, ctx) {
    ctx.waitUntil(new Promise(() => {}));  // never settles
    ctx.waitUntil(Promise.reject(new Error("background oops")));
    return new Response("queued");
  },
};
"""})
    host = Host(tools, build(tools, app, workdir / "out"), workdir,
                env={"PHLOEM_WAIT_UNTIL_S": "0.5"})
    try:
        host.wait_event(b"R")
        with host.client() as c:
            assert c.get("/").text == "queued"
        host.wait_event(b"W")
        took = time.monotonic()
        host.wait_event(b"D", timeout=10)
        assert 0.2 < time.monotonic() - took < 5
    finally:
        assert host.stop() == 0
    assert "wait_until work cancelled after its 0.5 s budget" in host.stderr()
    assert "background oops" in host.stderr()


def test_bundle_syntax_error(tools: Tools, workdir: Path) -> None:
    app = write_app(workdir / "app", {
        "index.ts": "import { f } from './lib';\nexport default { fetch: f };\n",
        "lib.ts": "export function f(req: Request) {\n  return new Response('x'\n}\n",
    })
    with pytest.raises(BundleError) as info:
        build(tools, app, workdir / "out")
    message = str(info.value)
    assert "ERROR" in message
    assert "lib.ts:3:0" in message, message
    assert not (workdir / "out" / "bundle.mjs").exists()


def test_unresolvable_import_names_the_package(tools: Tools, workdir: Path) -> None:
    app = write_app(workdir / "app", {"index.js": "import x from 'no-such-pkg-phl';\n"
                                                  "export default x;\n"})
    with pytest.raises(BundleError, match='Could not resolve "no-such-pkg-phl"'):
        build(tools, app, workdir / "out")


def test_check_rejects_a_module_without_fetch(tools: Tools, workdir: Path) -> None:
    app = write_app(workdir / "app", {"index.js": "export default { get() {} };\n"})
    out = build(tools, app, workdir / "out")
    proc = check(tools, out)
    assert proc.returncode == 3
    assert "entry: default export has no fetch(request) method" in proc.stderr
    app2 = write_app(workdir / "app2", {"index.js": "export const fetch = 1;\n"})
    proc = check(tools, build(tools, app2, workdir / "out2"))
    assert proc.returncode == 3
    assert "no default export" in proc.stderr
    app3 = write_app(workdir / "app3", {"index.js": "throw new Error('boom at import');\n"
                                                    "export default {};\n"})
    proc = check(tools, build(tools, app3, workdir / "out3"))
    assert proc.returncode == 3
    assert "boom at import" in proc.stderr


def test_check_exits_despite_open_handles(tools: Tools, workdir: Path) -> None:
    app = write_app(workdir / "app", {"index.js": "setInterval(() => {}, 1000);\n"
                                                  "export default { fetch() {} };\n"})
    proc = check(tools, build(tools, app, workdir / "out"))
    assert proc.returncode == 0, proc.stderr


def test_websocket_upgrade_and_sigint_handler(tools: Tools, workdir: Path) -> None:
    app = write_app(workdir / "app", {"package.json": WS_PACKAGE, "index.mjs": WS_APP})
    out = build(tools, app, workdir / "out")
    marks = workdir / "marks"
    marks.mkdir()
    host = Host(tools, out, workdir, env={"MARK_DIR": str(marks)})
    host.wait_event(b"R")
    with host.client() as c:
        assert c.get("/x").text == "plain http on the ws app: /x"
    with unix_connect(str(host.socket_path), "ws://fn.localhost/chat") as ws:
        ws.send("hello")
        assert ws.recv(timeout=10) == "hello"
        ws.send(b"\x00\x01binary")
        assert ws.recv(timeout=10) == b"\x00\x01binary"
        host.process.send_signal(signal.SIGINT)
        # The function's handler closes the socket with 1001 ...
        with pytest.raises(Exception) as closed:
            ws.recv(timeout=10)
        assert "1001" in str(closed.value)
    # ... and the host waits for the handler's promise before it exits.
    assert host.process.wait(20) == 0
    assert (marks / "sigint").read_text().startswith("handled")


def test_external_packages_are_kept_next_to_the_bundle(tools: Tools, workdir: Path) -> None:
    app = write_app(workdir / "app", {
        "index.mjs": "import { hello } from 'extpkg';\n"
                     "export default { fetch() { return new Response(hello()) } };\n",
        "node_modules/extpkg/package.json": json.dumps(
            {"name": "extpkg", "version": "1.0.0", "main": "index.js"}),
        "node_modules/extpkg/index.js": "exports.hello = () => 'from extpkg';\n",
        "node_modules/extpkg/build/Release/addon.node": "not really an addon",
    })
    assert native_packages(app / "node_modules") == ["extpkg"]
    out = workdir / "out" / "bundle.mjs"
    bundle(tools.esbuild, app, "index.mjs", out, external=native_packages(app / "node_modules"))
    assert "from extpkg" not in out.read_text()
    assert (workdir / "out" / "node_modules" / "extpkg" / "index.js").is_file()
    assert check(tools, out).returncode == 0
    host = Host(tools, out, workdir)
    try:
        host.wait_event(b"R")
        with host.client() as c:
            assert c.get("/").text == "from extpkg"
    finally:
        assert host.stop() == 0


def test_substituted_package_locked_at_the_registrys_version(tools: Tools,
                                                             workdir: Path) -> None:
    """A lockfile written by ``npm install`` through ``phloem link``'s registry pins
    ``@neon/functions`` 0.5.0 (not on the public registry): the platform installs ours
    (offline: a file: package), not the locked one. ~3 s."""
    lock = {"name": "app", "lockfileVersion": 3, "requires": True, "packages": {
        "": {"dependencies": {"@neon/functions": "^0.5.0"}},
        "node_modules/@neon/functions": {
            "version": "0.5.0", "license": "Apache-2.0",
            "integrity": "sha512-" + "A" * 86 + "=="}}}
    app = write_app(workdir / "locked", {
        "package.json": json.dumps({"name": "app", "dependencies": {
            "@neon/functions": "^0.5.0"}}),
        "package-lock.json": json.dumps(lock)})
    modules = install_dependencies(app, tools.deps_cache, tools.node,
                                   substitutes=install_substitutes())
    assert modules is not None
    assert (modules / "@neon/functions/index.js").read_bytes() == \
        (package_dir("functions") / "index.js").read_bytes()


def test_dependency_install_is_cached_and_errors_are_npms(tools: Tools,
                                                          workdir: Path) -> None:
    app = write_app(workdir / "app", {"package.json": HONO_PACKAGE})
    first = install_dependencies(app, tools.deps_cache, tools.node)
    lines: list[str] = []
    assert install_dependencies(app, tools.deps_cache, tools.node, lines.append) == first
    assert lines and "cached" in lines[0]
    assert first is not None and (first / "hono" / "package.json").is_file()
    assert install_dependencies(write_app(workdir / "nodeps", {"package.json": "{}"}),
                                tools.deps_cache) is None
    bad = write_app(workdir / "bad", {"package.json": json.dumps(
        {"dependencies": {"hono": "0.0.0-does-not-exist"}})})
    with pytest.raises(BundleError, match="npm install failed"):
        install_dependencies(bad, tools.deps_cache, tools.node)


def test_cold_start(tools: Tools, workdir: Path) -> None:
    """Spawn to ``R`` for a minimal bundle (reported; generous bound for loaded CI)."""
    out = build(tools, write_app(workdir / "app", PLAIN), workdir / "out")
    times = []
    for i in range(7):
        run = workdir / f"run{i}"
        run.mkdir()
        host = Host(tools, out, run)
        try:
            times.append(host.wait_event(b"R"))
        finally:
            assert host.stop() == 0
    p50 = statistics.median(times)
    print(f"\nnode host cold start (spawn -> R): p50 {p50 * 1000:.0f} ms, "
          f"min {min(times) * 1000:.0f} ms, max {max(times) * 1000:.0f} ms")
    assert p50 < 3.0
