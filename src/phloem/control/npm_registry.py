"""A small npm registry for the ``@neon`` and ``@neondatabase`` scopes, on the control API
port under ``/npm/``, so that ``npm install`` of a Neon project works unedited.

``@neon/functions`` and ``@neondatabase/functions`` are not on the public registry; phloem
supplies them (``runtimes/node/packages``, see ``runtimes/node/substitutes.py``). This
registry serves those as real packages: a packument with one version and a ``.tgz`` built
deterministically from phloem's package directory (same files, same bytes, so the
``dist.integrity`` a lockfile records stays valid across platforms and restarts). Every
other package of the two scopes (``@neon/config``, ``@neon/env``, ...) is passed through
to the upstream registry: its packument with the tarball URLs rewritten to come through
here, and its tarballs streamed back. Upstream is ``Settings.npm_upstream``, by default
what ``npm config get registry`` says on the platform's machine, asked on first use.

``phloem link`` writes the two scoped lines into the project's ``.npmrc``:

    @neon:registry=http://127.0.0.1:8788/npm/
    @neondatabase:registry=http://127.0.0.1:8788/npm/

No API key: it serves phloem's own (public) package code and public upstream packages,
read-only, for two scopes; a key in a project's ``.npmrc`` would end up committed.

    app = with_npm_registry(create_api(services), NpmRegistry(settings.npm_upstream))
"""

from __future__ import annotations

import asyncio
import base64
import gzip
import hashlib
import io
import json
import re
import shutil
import subprocess
import tarfile
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from phloem.runtimes.node.substitutes import SUPPLIED, package_dir

PREFIX = "/npm/"
SCOPES = ("@neon", "@neondatabase")
#: npm's own fixed mtime for packed entries (1985-10-26T08:15:00Z): packing is
#: reproducible, so the integrity never changes while the files do not.
NPM_MTIME = 499162500
#: Largest upstream packument and tarball passed through (npm packages of these scopes
#: are far smaller; a cap keeps a bad upstream from filling the platform's memory).
#: Versions each supplied package is also published under, besides its own: the range
#: Neon's published examples pin (``"@neon/functions": "^0.5.0"``, same for
#: ``@neon/ai-sdk-provider``). npm resolves a caret range only within one minor of 0.x, so
#: without these their ``npm install`` fails with "No matching version". Same code, the
#: version field set to each in the packed ``package.json``.
NEON_VERSIONS = ("0.5.0",)
MAX_PACKUMENT_BYTES = 16 * 1024 * 1024
MAX_TARBALL_BYTES = 64 * 1024 * 1024
UPSTREAM_TIMEOUT_S = 30.0

_PART = r"[a-z0-9~-][a-z0-9._~-]*"
PACKUMENT_RE = re.compile(rf"^(@{_PART})/({_PART})$")
TARBALL_RE = re.compile(rf"^(@{_PART})/({_PART})/-/({_PART}\.tgz)$")


class UpstreamUnknown(RuntimeError):
    """No upstream registry is set and ``npm config get registry`` gave none."""


@dataclass(frozen=True)
class Tarball:
    """One packed version of a package phloem supplies."""

    name: str
    version: str
    manifest: dict[str, Any]
    data: bytes

    @property
    def integrity(self) -> str:
        return "sha512-" + base64.b64encode(hashlib.sha512(self.data).digest()).decode()

    @property
    def shasum(self) -> str:
        return hashlib.sha1(self.data, usedforsecurity=False).hexdigest()

    @property
    def filename(self) -> str:
        return f"{self.name.split('/', 1)[1]}-{self.version}.tgz"


def pack_supplied(name: str, short: str, version: str | None = None) -> Tarball:
    """``npm pack`` of phloem's package ``short`` under the npm ``name`` (and ``version``,
    else its own): entries under ``package/``, sorted, fixed times and owners, so the
    same files give the same bytes.

        tb = pack_supplied("@neon/functions", "functions"); tb.integrity  # sha512-...
    """
    root = package_dir(short)
    manifest: dict[str, Any] = json.loads((root / "package.json").read_text())
    manifest["name"] = name
    if version is not None:
        manifest["version"] = version
    files = sorted(set(manifest.get("files") or []) - {"package.json"})
    entries = [("package.json", (json.dumps(manifest, indent=2) + "\n").encode())]
    entries += [(rel, (root / rel).read_bytes()) for rel in files]
    buf = io.BytesIO()
    with gzip.GzipFile(fileobj=buf, mode="wb", mtime=0, compresslevel=9) as gz, \
            tarfile.open(fileobj=gz, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for rel, data in entries:
            info = tarfile.TarInfo(f"package/{rel}")
            info.size, info.mode, info.mtime = len(data), 0o644, NPM_MTIME
            tar.addfile(info, io.BytesIO(data))
    return Tarball(name, str(manifest["version"]), manifest, buf.getvalue())


def _version_key(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", version.split("-")[0]))


def supplied_versions(name: str, short: str) -> list[Tarball]:
    """Every version the registry publishes of ``name``: its own and :data:`NEON_VERSIONS`,
    lowest first."""
    own = pack_supplied(name, short)
    extra = [pack_supplied(name, short, v) for v in NEON_VERSIONS if v != own.version]
    return sorted([own, *extra], key=lambda tb: _version_key(tb.version))


def packument(tbs: list[Tarball], base: str) -> dict[str, Any]:
    """The registry document of one package's versions ``tbs`` (lowest first; the last is
    ``latest``); tarball URLs under ``base`` (ends with ``/npm/``)."""
    name = tbs[-1].name
    versions = {tb.version: {**tb.manifest, "_id": f"{tb.name}@{tb.version}",
                             "dist": {"tarball": f"{base}{tb.name}/-/{tb.filename}",
                                      "integrity": tb.integrity, "shasum": tb.shasum}}
                for tb in tbs}
    return {"_id": name, "name": name, "dist-tags": {"latest": tbs[-1].version},
            "versions": versions}


def npm_config_registry() -> str:
    """What ``npm config get registry`` says on this machine (ends with ``/``)."""
    npm = shutil.which("npm")
    if npm is None:
        raise UpstreamUnknown("npm_upstream: not set and no npm on the platform's PATH to "
                              "ask (npm config get registry); start phloem up with "
                              "PHLOEM_NPM_UPSTREAM=<registry url>")
    try:
        got = subprocess.run([npm, "config", "get", "registry"], capture_output=True,
                             text=True, timeout=60, check=False, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise UpstreamUnknown("npm_upstream: npm config get registry timed out") from None
    url = got.stdout.strip()
    if got.returncode != 0 or not url.startswith(("http://", "https://")):
        raise UpstreamUnknown(f"npm_upstream: npm config get registry gave no URL "
                              f"({(got.stderr or got.stdout).strip()[:200]!r})")
    return url if url.endswith("/") else url + "/"


def _not_found(message: str) -> JSONResponse:
    return JSONResponse({"error": message}, 404)


class NpmRegistry:
    """The ASGI app behind ``/npm/`` (GET only); see the module docstring."""

    def __init__(self, upstream: str | None = None) -> None:
        self._upstream = None if not upstream else upstream.rstrip("/") + "/"
        self._upstream_lock = asyncio.Lock()
        self._packed: dict[str, list[Tarball]] = {}

    def supplied(self, name: str) -> list[Tarball] | None:
        """phloem's own package for ``name``, each version (always for SUPPLIED names)."""
        short = SUPPLIED.get(name)
        if short is None:
            return None
        if name not in self._packed:
            self._packed[name] = supplied_versions(name, short)
        return self._packed[name]

    async def upstream(self) -> str:
        async with self._upstream_lock:
            if self._upstream is None:
                self._upstream = await asyncio.to_thread(npm_config_registry)
            return self._upstream

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        request = Request(scope, receive)
        response = await self._respond(request)
        await response(scope, receive, send)

    async def _respond(self, request: Request) -> Response:
        if request.method not in ("GET", "HEAD"):
            return JSONResponse({"error": f"{request.method}: this registry is read-only"},
                                405, headers={"Allow": "GET, HEAD"})
        rest = request.url.path[len(PREFIX):]
        # Scoped names arrive as @scope%2fname; the server has decoded that to a "/".
        base = f"{request.url.scheme}://{request.url.netloc}{PREFIX}"
        if m := PACKUMENT_RE.match(rest):
            scope, name = m[1], f"{m[1]}/{m[2]}"
            if scope not in SCOPES:
                return _not_found(f"{name}: this registry serves only {', '.join(SCOPES)}")
            return await self._packument(request, name, base)
        if m := TARBALL_RE.match(rest):
            scope, name = m[1], f"{m[1]}/{m[2]}"
            if scope not in SCOPES:
                return _not_found(f"{name}: this registry serves only {', '.join(SCOPES)}")
            own = self.supplied(name)
            if own is not None:
                found = [tb for tb in own if tb.filename == m[3]]
                if not found:
                    return _not_found(f"{name}: no tarball {m[3]} (phloem supplies "
                                      f"{', '.join(tb.filename for tb in own)})")
                return Response(found[0].data, media_type="application/octet-stream")
            return await self._pass_tarball(rest)
        return _not_found(f"{rest}: not a package of {', '.join(SCOPES)}")

    async def _packument(self, request: Request, name: str, base: str) -> Response:
        own = self.supplied(name)
        if own is not None:
            return JSONResponse(packument(own, base))
        try:
            upstream = await self.upstream()
        except UpstreamUnknown as exc:
            return JSONResponse({"error": str(exc)}, 502)
        accept = request.headers.get("accept", "application/json")
        try:
            async with httpx.AsyncClient(timeout=UPSTREAM_TIMEOUT_S) as client, \
                    client.stream("GET", upstream + name.replace("/", "%2f"),
                                  headers={"Accept": accept}) as got:
                content = bytearray()
                async for chunk in got.aiter_bytes():
                    content += chunk
                    if len(content) > MAX_PACKUMENT_BYTES:
                        return JSONResponse({"error": f"{name}: upstream packument is over "
                                                      f"{MAX_PACKUMENT_BYTES} bytes"}, 502)
        except httpx.HTTPError as exc:
            return JSONResponse({"error": f"{name}: upstream registry unreachable: {exc}"},
                                502)
        if got.status_code != 200:
            return JSONResponse({"error": f"{name}: upstream registry answered "
                                          f"{got.status_code}"},
                                got.status_code if got.status_code < 500 else 502)
        try:
            doc = json.loads(content)
        except ValueError:
            return JSONResponse({"error": f"{name}: upstream sent no JSON"}, 502)
        if not isinstance(doc, dict):
            return JSONResponse({"error": f"{name}: upstream sent no packument"}, 502)
        for version in (doc.get("versions") or {}).values():
            dist = version.get("dist") if isinstance(version, dict) else None
            tarball = dist.get("tarball") if isinstance(dist, dict) else None
            if isinstance(tarball, str) and tarball.startswith(upstream) \
                    and isinstance(dist, dict):
                dist["tarball"] = base + tarball[len(upstream):]
        return JSONResponse(doc, media_type=got.headers.get("content-type",
                                                            "application/json"))

    async def _pass_tarball(self, rest: str) -> Response:
        try:
            upstream = await self.upstream()
        except UpstreamUnknown as exc:
            return JSONResponse({"error": str(exc)}, 502)
        client = httpx.AsyncClient(timeout=UPSTREAM_TIMEOUT_S)
        try:
            got = await client.send(client.build_request("GET", upstream + rest),
                                    stream=True)
        except httpx.HTTPError as exc:
            await client.aclose()
            return JSONResponse({"error": f"{rest}: upstream registry unreachable: {exc}"},
                                502)
        length = got.headers.get("content-length")
        if got.status_code != 200 or (length and length.isdigit()
                                      and int(length) > MAX_TARBALL_BYTES):
            status = got.status_code
            await got.aclose()
            await client.aclose()
            if status == 200:
                return JSONResponse({"error": f"{rest}: over {MAX_TARBALL_BYTES} bytes"},
                                    502)
            return JSONResponse({"error": f"{rest}: upstream registry answered {status}"},
                                status if status < 500 else 502)

        async def body() -> AsyncIterator[bytes]:
            sent = 0
            try:
                async for chunk in got.aiter_bytes():
                    sent += len(chunk)
                    if sent > MAX_TARBALL_BYTES:
                        return  # cut short: npm's integrity check refuses it
                    yield chunk
            finally:
                await got.aclose()
                await client.aclose()

        headers = {}
        if length and "content-encoding" not in got.headers:
            headers["content-length"] = length
        return StreamingResponse(body(), media_type="application/octet-stream",
                                 headers=headers)


def with_npm_registry(app: ASGIApp, registry: NpmRegistry) -> ASGIApp:
    """``app`` with ``/npm/`` served by ``registry`` in front of it (so outside the API's
    key check: npm reaches it without a key)."""

    async def dispatch(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"].startswith(PREFIX):
            await registry(scope, receive, send)
        else:
            await app(scope, receive, send)

    return dispatch
