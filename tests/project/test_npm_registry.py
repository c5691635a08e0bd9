"""A Neon-style project installs with a plain ``npm install`` after ``phloem link``: the
platform's ``/npm/`` registry serves ``@neon/functions`` (phloem's package, packed
reproducibly) and passes ``@neon/config`` through to the machine's upstream registry;
``phloem deploy`` then bundles on this machine from ``node_modules``.

The platform test's passthrough needs the upstream the machine's npm uses (``npm config
get registry``); where it cannot be reached that project declares ``@neon/functions``
alone (said in the test's output). The passthrough is also tested without a network,
against a local upstream serving a package made by ``npm pack``."""

from __future__ import annotations

import base64
import hashlib
import http.server
import io
import json
import os
import shutil
import subprocess
import tarfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
import uvicorn
from starlette.types import Receive, Scope, Send

from phloem.control.npm_registry import (
    NpmRegistry,
    pack_supplied,
    packument,
    supplied_versions,
    with_npm_registry,
)
from phloem.project.npmrc import npmrc_text
from phloem.runtimes.node.substitutes import package_dir
from phloem.testing import PlatformProcess, free_port, host_of, wait_for
from tests.test_neon import new_branch, write

NPM = shutil.which("npm")
pytestmark = pytest.mark.skipif(NPM is None, reason="npm is not installed")

INDEX = """import { waitUntil } from "@neon/functions";
export default {
  fetch() {
    waitUntil(Promise.resolve());
    return new Response(`npm-ok ${typeof waitUntil}`);
  },
};
"""
NEON_TS = """import { defineConfig } from "@neon/config/v1";
export default defineConfig({ functions: { npmfn: { name: "npmfn", source: "src/index.ts" } } });
"""


def upstream_has_neon_config() -> bool:
    """Can the machine's npm fetch @neon/config from its upstream (bounded)?"""
    assert NPM is not None
    try:
        got = subprocess.run([NPM, "view", "@neon/config", "version"], capture_output=True,
                             text=True, timeout=60, check=False, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        return False
    return got.returncode == 0 and got.stdout.strip() != ""


def test_npmrc_keeps_user_lines_and_is_idempotent() -> None:
    mine = "save-exact=true\n@neon:registry=https://elsewhere.example/\n@other:registry=x\n"
    once = npmrc_text(mine, "http://127.0.0.1:9")
    assert once.splitlines() == ["save-exact=true", "@neon:registry=http://127.0.0.1:9/npm/",
                                 "@other:registry=x",
                                 "@neondatabase:registry=http://127.0.0.1:9/npm/"]
    assert npmrc_text(once, "http://127.0.0.1:9") == once


def test_supplied_tarball_is_reproducible() -> None:
    a, b = pack_supplied("@neon/functions", "functions"), pack_supplied("@neon/functions",
                                                                         "functions")
    assert a.data == b.data and a.integrity == b.integrity
    with tarfile.open(fileobj=io.BytesIO(a.data)) as tar:
        names = tar.getnames()
        manifest = json.loads(tar.extractfile("package/package.json").read())  # type: ignore[union-attr]
    assert "package/index.js" in names and manifest["name"] == "@neon/functions"


def test_supplied_packument_has_own_and_neon_versions() -> None:
    """``^0.5.0`` (Neon's examples) and ``^0.1.0`` (ours) both resolve, each tarball
    carrying its version."""
    tbs = supplied_versions("@neon/ai-sdk-provider", "ai-sdk-provider")
    doc = packument(tbs, "http://x/npm/")
    assert set(doc["versions"]) == {"0.1.0", "0.5.0"} and doc["dist-tags"]["latest"] == "0.5.0"
    for version, meta in doc["versions"].items():
        assert meta["dist"]["tarball"] == \
            f"http://x/npm/@neon/ai-sdk-provider/-/ai-sdk-provider-{version}.tgz"
        tb = next(tb for tb in tbs if tb.version == version)
        with tarfile.open(fileobj=io.BytesIO(tb.data)) as tar:
            inner = json.loads(tar.extractfile("package/package.json").read())  # type: ignore[union-attr]
        assert (inner["name"], inner["version"]) == ("@neon/ai-sdk-provider", version)
        assert meta["dist"]["integrity"] == integrity(tb.data)


def integrity(data: bytes) -> str:
    return "sha512-" + base64.b64encode(hashlib.sha512(data).digest()).decode()


@contextmanager
def local_upstream(tgz: bytes, name: str, version: str) -> Iterator[tuple[str, list[str]]]:
    """A registry of one package on 127.0.0.1: its packument and its tarball; yields its
    URL and the paths requested."""
    port, seen = free_port(), []
    base = f"http://127.0.0.1:{port}/"
    tarball = f"{name}/-/{name.split('/')[1]}-{version}.tgz"
    doc = {"name": name, "dist-tags": {"latest": version}, "versions": {version: {
        "name": name, "version": version,
        "dist": {"tarball": base + tarball, "integrity": integrity(tgz),
                 "shasum": hashlib.sha1(tgz, usedforsecurity=False).hexdigest()}}}}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            seen.append(self.path)
            found = {f"/{name.replace('/', '%2f')}": (json.dumps(doc).encode(),
                                                      "application/json"),
                     f"/{tarball}": (tgz, "application/octet-stream")}.get(self.path)
            body, kind = found or (b'{"error":"not found"}', "application/json")
            self.send_response(200 if found else 404)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield base, seen
    finally:
        server.shutdown()
        server.server_close()


@contextmanager
def registry_alone(upstream: str) -> Iterator[str]:
    """The platform's /npm/ registry served alone (in front of an app answering 418);
    yields its API URL."""
    async def teapot(scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 418, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(
        with_npm_registry(teapot, NpmRegistry(upstream)), host="127.0.0.1", port=port,
        log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        wait_for(lambda: server.started, 30, "the registry to serve")
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(30)


def test_passthrough_against_a_local_upstream(tmp_path: Path) -> None:
    """No network: @neon/localdep (made by npm pack) comes from a local upstream through
    the registry, byte for byte; @neon/functions from phloem. ~5 s."""
    assert NPM is not None
    pkg = write(tmp_path / "localdep", {
        "package.json": json.dumps({"name": "@neon/localdep", "version": "1.2.3",
                                    "type": "module", "main": "index.js"}),
        "index.js": "export const where = 'local upstream';\n"})
    packed = subprocess.run([NPM, "pack", "--json", "--pack-destination", str(tmp_path)],
                            cwd=pkg, capture_output=True, text=True, timeout=120, check=True)
    tgz = (tmp_path / json.loads(packed.stdout)[0]["filename"]).read_bytes()
    root = write(tmp_path / "proj", {"package.json": json.dumps({
        "name": "p", "version": "1.0.0", "private": True,
        "dependencies": {"@neon/localdep": "^1.2.0", "@neon/functions": "^0.5.0"}})})
    with local_upstream(tgz, "@neon/localdep", "1.2.3") as (upstream, seen), \
            registry_alone(upstream) as api_url:
        (root / ".npmrc").write_text(npmrc_text("", api_url))
        doc = httpx.get(f"{api_url}/npm/@neon%2flocaldep", timeout=30).json()
        assert doc["versions"]["1.2.3"]["dist"]["tarball"] == \
            f"{api_url}/npm/@neon/localdep/-/localdep-1.2.3.tgz"
        installed = subprocess.run(
            [NPM, "install", "--no-audit", "--no-fund", "--ignore-scripts"],
            cwd=root, capture_output=True, text=True, timeout=300, check=False,
            stdin=subprocess.DEVNULL,
            env={**os.environ, "npm_config_cache": str(tmp_path / "cache")})
        assert installed.returncode == 0, installed.stdout + installed.stderr
        assert "/@neon/localdep/-/localdep-1.2.3.tgz" in seen
    lock = json.loads((root / "package-lock.json").read_text())["packages"]
    assert lock["node_modules/@neon/localdep"]["integrity"] == integrity(tgz)
    assert (root / "node_modules/@neon/localdep/index.js").read_text() == \
        "export const where = 'local upstream';\n"
    # ^0.5.0 is what Neon's examples pin: the same code published under that version.
    assert lock["node_modules/@neon/functions"]["version"] == "0.5.0"
    assert lock["node_modules/@neon/functions"]["integrity"] == \
        pack_supplied("@neon/functions", "functions", "0.5.0").integrity


def test_link_npm_install_and_client_bundled_deploy(platform: PlatformProcess,
                                                   tmp_path: Path) -> None:
    assert NPM is not None
    passthrough = upstream_has_neon_config()
    if not passthrough:
        print("upstream registry unreachable: @neon/config passthrough not tested")
    deps = {"@neon/functions": "^0.1.0"}
    if passthrough:
        deps["@neon/config"] = "^1.8.0"
    root = write(tmp_path / "proj", {
        "package.json": json.dumps({"name": "npm-proj", "version": "1.0.0", "private": True,
                                    "type": "module", "dependencies": deps}),
        ".npmrc": "fund=false\n",
        "src/index.ts": INDEX,
        "neon.ts": NEON_TS if passthrough else NEON_TS.replace("@neon/config/v1",
                                                               "@phloem/config"),
    })
    api_url = platform.credentials["api_url"]
    branch = new_branch(platform, "npm")

    platform.cli("link", "--branch", branch, "--no-env-pull", cwd=root)
    npmrc = (root / ".npmrc").read_text()
    assert npmrc.splitlines() == ["fund=false", f"@neon:registry={api_url}/npm/",
                                  f"@neondatabase:registry={api_url}/npm/"]
    again = platform.cli("link", "--branch", branch, "--no-env-pull", cwd=root)
    assert "unchanged:" in again.stdout and (root / ".npmrc").read_text() == npmrc

    # A fresh npm cache: every package comes through the registry now, none from before.
    installed = subprocess.run(
        [NPM, "install", "--no-audit", "--ignore-scripts"], cwd=root, capture_output=True,
        text=True, timeout=300, check=False, stdin=subprocess.DEVNULL,
        env={**platform.env, "npm_config_cache": str(tmp_path / "npm-cache")})
    assert installed.returncode == 0, installed.stdout + installed.stderr

    ours = root / "node_modules" / "@neon" / "functions"
    assert json.loads((ours / "package.json").read_text())["name"] == "@neon/functions"
    assert (ours / "index.js").read_bytes() == (package_dir("functions")
                                                / "index.js").read_bytes()
    lock = json.loads((root / "package-lock.json").read_text())
    locked = lock["packages"]["node_modules/@neon/functions"]["integrity"]
    with httpx.Client(base_url=f"{api_url}/npm/", timeout=60) as registry:
        doc = registry.get("@neon%2ffunctions").json()  # no API key: npm sends none
        locked_version = lock["packages"]["node_modules/@neon/functions"]["version"]
        dist = doc["versions"][locked_version]["dist"]
        tgz = registry.get(dist["tarball"].removeprefix(f"{api_url}/npm/")).content
        assert dist["integrity"] == locked == "sha512-" + base64.b64encode(
            hashlib.sha512(tgz).digest()).decode()
        assert registry.get("@acme%2fx").status_code == 404
        if passthrough:
            config = registry.get("@neon%2fconfig").json()
            tarballs = [v["dist"]["tarball"] for v in config["versions"].values()]
            assert all(t.startswith(f"{api_url}/npm/@neon/config/-/") for t in tarballs)
            version = json.loads((root / "node_modules" / "@neon" / "config"
                                  / "package.json").read_text())["version"]
            assert version.startswith("1.")

    out = platform.cli("deploy", "--yes", cwd=root)
    assert "bundled here: esbuild from node_modules, 1 function(s)" in out.stdout, out.stdout
    fn = platform.cli_json("functions", "get", "npmfn", "--branch", branch)
    dep = platform.cli_json("functions", "deployments", "npmfn", "--branch", branch)[0]
    assert dep["entry"] == "npmfn/index.mjs" and dep["bundle"] is False
    with platform.gateway(host_of(fn["invocation_url"])) as gw:
        got = gw.get("/")
    assert (got.status_code, got.text) == (200, "npm-ok function")
    plan = platform.cli_json_in(root, "config", "plan")
    assert [(i["slug"], i["action"]) for i in plan["plan"]
            if i["action"] != "keep"] == [("npmfn", "unchanged")]
