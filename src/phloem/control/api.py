"""The REST API under ``/api/v1`` (OpenAPI at ``/api/v1/openapi.json``).

Every error is JSON ``{"error": {"code": ..., "message": ..., "field": ...}}`` with a
stable ``code``. Every route but ``/health`` needs ``Authorization: Bearer <api key>``;
``/metrics`` also takes the platform's ``metrics_token`` in its place.
"""

from __future__ import annotations

import asyncio
import hmac
import math
from datetime import datetime
from typing import TYPE_CHECKING, Annotated, Any
from urllib.parse import unquote

from fastapi import Depends, FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from phloem import __version__
from phloem.artifacts import ArtifactError
from phloem.branches.manager import BranchError
from phloem.control.backup_api import router as backup_router
from phloem.control.store import BranchRow, DeploymentRow, FunctionRow
from phloem.deployer import DeployRequest, NotFound
from phloem.logs import follow_file, tail
from phloem.validation import InvalidInput

if TYPE_CHECKING:
    from phloem.platform import Platform


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.field = status, code, message, field


def error_body(code: str, message: str, field: str | None = None) -> dict[str, Any]:
    err: dict[str, Any] = {"code": code, "message": message}
    if field is not None:
        err["field"] = field
    return {"error": err}


# -- schemas -----------------------------------------------------------------
class BranchOut(BaseModel):
    id: str
    name: str
    parent_id: str | None
    state: str
    created_at: datetime
    copy_method: str | None = Field(None, description="reflink or copy: how the data "
                                    "was copied at the last create/reset")
    copy_bytes: int | None = None
    copy_ms: float | None = None
    logical_size_bytes: int | None = None
    copied_deployments: list[str] | None = None


class BranchCreateIn(BaseModel):
    name: str | None = Field(None, description="[A-Za-z0-9._/-]{1,64}; default: the id")
    parent: str | None = Field(None, description="parent name or id; default: main")
    copy_functions: bool = Field(False, description="deploy the parent's active "
                                 "functions on the new branch")


class BranchDeleteOut(BaseModel):
    deleted: list[str]


class DeploymentOut(BaseModel):
    id: str
    function_id: str
    status: str = Field(description="building, ready or failed")
    runtime: str
    entry: str
    artifact_sha256: str
    env_keys: list[str]
    env_digest: str | None = Field(None, description="keyed fingerprint of the env "
                                   "values: equal digests mean equal envs")
    limits: dict[str, Any]
    error: str | None
    build_log: str
    created_at: datetime
    finished_at: datetime | None


class FunctionOut(BaseModel):
    id: str
    slug: str
    name: str
    branch_id: str
    branch_name: str
    runtime: str
    invocation_url: str
    status: str = Field(description="status of the active deployment, or of the latest "
                                    "one when none is active")
    deployment_id: str | None
    latest_deployment: DeploymentOut | None
    created_at: datetime
    updated_at: datetime


class DeployIn(BaseModel):
    artifact_sha256: str
    entry: str
    runtime: str | None = None
    name: str | None = None
    env: dict[str, str] = Field(default_factory=dict, description="variables to set; "
                                "others carry over from the previous deployment")
    unset_env: list[str] = Field(default_factory=list, description="variables to remove")
    replace_env: bool = Field(False, description="start from an empty env instead of "
                              "the previous deployment's")
    limits: dict[str, float] = Field(default_factory=dict, description="per-function "
                                     "overrides of the platform's limits, e.g. "
                                     "{\"idle_timeout_s\": 60, \"memory_mb\": 512}")


class EnvDigestIn(BaseModel):
    env: dict[str, str]


class ConnectionOut(BaseModel):
    uri: str
    pooled: bool
    branch_id: str


class ArtifactOut(BaseModel):
    sha256: str
    size: int


def _deployment_out(d: DeploymentRow) -> DeploymentOut:
    return DeploymentOut(
        id=d.id, function_id=d.function_id, status=d.status, runtime=d.runtime,
        entry=d.entry, artifact_sha256=d.artifact_sha256,
        env_keys=sorted(d.env_keys if d.env_keys is not None else d.env),
        env_digest=d.env_digest,
        limits=d.limits or {},
        error=d.error, build_log=d.build_log, created_at=d.created_at,
        finished_at=d.finished_at,
    )


def _branch_out(b: BranchRow, size: int | None = None) -> BranchOut:
    return BranchOut(id=b.id, name=b.name, parent_id=b.parent_id, state=b.state,
                     created_at=b.created_at, copy_method=b.copy_method,
                     copy_bytes=b.copy_bytes, copy_ms=b.copy_ms, logical_size_bytes=size)


class KeepEncodedSlashes:
    """Branch names may contain ``/`` (``preview/login``); clients send it as ``%2F``.
    Starlette routes on the decoded path, where it would split the segment, so the path is
    re-decoded from ``raw_path`` leaving ``%2F`` for :func:`branch_by_ref` to undo."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        raw = scope.get("raw_path")
        if scope["type"] == "http" and raw and b"%2f" in raw.lower():
            raw = raw.split(b"?", 1)[0].replace(b"%2F", b"%252F").replace(b"%2f", b"%252F")
            scope = {**scope, "path": unquote(raw.decode("latin-1"))}
        await self.app(scope, receive, send)


async def branch_by_ref(ref: str, request: Request) -> BranchRow:
    """The branch named by the ``{ref}`` path parameter: an id or a name."""
    platform: Platform = request.app.state.platform
    return await platform.branches.get(ref.replace("%2F", "/"))


BranchRef = Annotated[BranchRow, Depends(branch_by_ref)]


def create_api(platform: Platform) -> FastAPI:
    app = FastAPI(title="phloem", version=__version__, openapi_url="/api/v1/openapi.json",
                  docs_url="/api/v1/docs", redoc_url=None)
    app.state.platform = platform
    app.add_middleware(KeepEncodedSlashes)

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse(error_body(exc.code, exc.message, exc.field), exc.status)

    @app.exception_handler(InvalidInput)
    async def _invalid(_: Request, exc: InvalidInput) -> JSONResponse:
        return JSONResponse(error_body("invalid_input", str(exc), exc.field), 400)

    @app.exception_handler(BranchError)
    async def _branch_error(_: Request, exc: BranchError) -> JSONResponse:
        return JSONResponse(error_body(exc.code, exc.message, exc.field), exc.status)

    @app.exception_handler(NotFound)
    async def _not_found(_: Request, exc: NotFound) -> JSONResponse:
        return JSONResponse(error_body(f"{exc.what}_not_found", str(exc)), 404)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        loc = ".".join(str(p) for p in first.get("loc", ()) if p not in ("body", "path",
                                                                          "query"))
        return JSONResponse(
            error_body("invalid_input", f"{loc or 'request'}: {first.get('msg')}", loc or None),
            400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return JSONResponse(error_body(code, str(exc.detail)), exc.status_code)

    def bearer(request: Request, what: str) -> str:
        header = request.headers.get("authorization", "")
        scheme, _, key = header.partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            raise ApiError(401, "unauthorized", f"missing 'Authorization: Bearer <{what}>'")
        return key.strip()

    async def authorized(request: Request) -> None:
        if not await platform.store.api_key_valid(bearer(request, "api key")):
            raise ApiError(401, "unauthorized", "invalid API key")

    metrics_token = platform.settings.metrics_token

    async def may_scrape(request: Request) -> None:
        """An API key, or the platform's metrics token (compared in constant time)."""
        key = bearer(request, "api key or metrics token")
        if metrics_token and hmac.compare_digest(key.encode(), metrics_token.encode()):
            return
        if not await platform.store.api_key_valid(key):
            raise ApiError(401, "unauthorized", "invalid API key or metrics token")

    auth = [Depends(authorized)]

    async def function_out(branch: BranchRow, fn: FunctionRow) -> FunctionOut:
        deployments = await platform.store.list_deployments(fn.id)
        latest = deployments[0] if deployments else None
        active = next((d for d in deployments if d.id == fn.active_deployment_id), None)
        status = active.status if active else (latest.status if latest else "none")
        return FunctionOut(
            id=fn.id, slug=fn.slug, name=fn.name, branch_id=branch.id,
            branch_name=branch.name, runtime=fn.runtime,
            invocation_url=platform.deployer.invocation_url(branch.id, fn.slug),
            status=status, deployment_id=fn.active_deployment_id,
            latest_deployment=_deployment_out(latest) if latest else None,
            created_at=fn.created_at, updated_at=fn.updated_at,
        )

    @app.get("/api/v1/health")
    async def health() -> dict[str, str]:
        return {"status": "ok", "version": __version__}

    @app.get("/metrics", include_in_schema=False, dependencies=[Depends(may_scrape)])
    async def metrics(request: Request) -> Response:
        """Prometheus exposition; it names every branch and function, so it needs a key."""
        body, content_type = platform.metrics.render(request.headers.get("accept", ""))
        return Response(body, media_type=content_type)

    async def may_see_status(request: Request) -> None:
        """The platform's own key (credentials.json's) is compared in memory, so status
        answers while the system database does not; any other key as usual."""
        key = bearer(request, "api key")
        own = platform.api_key
        if own and hmac.compare_digest(key.encode(), own.encode()):
            return
        await authorized(request)

    @app.get("/api/v1/status", dependencies=[Depends(may_see_status)])
    async def status() -> dict[str, Any]:
        return await platform.status()

    @app.put("/api/v1/artifacts/{sha256}", dependencies=auth, status_code=201)
    async def put_artifact(sha256: str, request: Request) -> ArtifactOut:
        data = await request.body()
        try:
            sha = platform.artifacts.put(data, expected_sha256=sha256)
        except ArtifactError as exc:
            raise ApiError(400, "invalid_artifact", str(exc), "sha256") from exc
        return ArtifactOut(sha256=sha, size=len(data))

    @app.head("/api/v1/artifacts/{sha256}", dependencies=auth)
    async def head_artifact(sha256: str) -> Response:
        try:
            found = platform.artifacts.exists(sha256)
        except ArtifactError:
            found = False
        return Response(status_code=200 if found else 404)

    async def sized(b: BranchRow) -> BranchOut:
        return _branch_out(b, await asyncio.to_thread(platform.branches.logical_size, b))

    @app.get("/api/v1/branches", dependencies=auth)
    async def list_branches() -> list[BranchOut]:
        return [await sized(b) for b in await platform.store.list_branches()]

    @app.get("/api/v1/branches/{ref}", dependencies=auth)
    async def get_branch(branch: BranchRef) -> BranchOut:
        return await sized(branch)

    @app.post("/api/v1/branches", dependencies=auth, status_code=201)
    async def create_branch(body: BranchCreateIn) -> BranchOut:
        row = await platform.branches.create(body.name, body.parent)
        out = await sized(row)
        if body.copy_functions and row.parent_id is not None:
            parent = await platform.branches.get(row.parent_id)
            deps = await platform.deployer.copy_functions(parent, row)
            out.copied_deployments = [d.id for d in deps]
        return out

    @app.post("/api/v1/branches/{ref}/reset", dependencies=auth)
    async def reset_branch(branch: BranchRef) -> BranchOut:
        row = await platform.branches.reset(branch.id, platform.deployer.restart_branch)
        return await sized(row)

    @app.delete("/api/v1/branches/{ref}", dependencies=auth)
    async def delete_branch(branch: BranchRef, recursive: bool = False) -> BranchDeleteOut:
        deleted = await platform.branches.delete(branch.id, recursive,
                                                 platform.deployer.drop_branch)
        return BranchDeleteOut(deleted=deleted)

    @app.get("/api/v1/branches/{ref}/connection", dependencies=auth)
    async def connection_string(branch: BranchRef, pooled: bool = True) -> ConnectionOut:
        urls = platform.branches.connection_strings(branch)
        return ConnectionOut(uri=urls.pooled if pooled else urls.unpooled, pooled=pooled,
                             branch_id=branch.id)

    @app.get("/api/v1/branches/{ref}/functions", dependencies=auth)
    async def list_functions(branch: BranchRef) -> list[FunctionOut]:
        fns = await platform.store.list_functions(branch.id)
        return [await function_out(branch, f) for f in fns]

    @app.get("/api/v1/branches/{ref}/functions/{slug}", dependencies=auth)
    async def get_function(branch: BranchRef, slug: str) -> FunctionOut:
        fn = await platform.store.get_function(branch.id, slug)
        if fn is None:
            raise NotFound("function", slug)
        return await function_out(branch, fn)

    @app.post("/api/v1/branches/{ref}/functions/{slug}/deployments", dependencies=auth,
              status_code=202)
    async def deploy(branch: BranchRef, slug: str, body: DeployIn) -> DeploymentOut:
        dep = await platform.deployer.deploy(branch, DeployRequest(
            slug=slug, artifact_sha256=body.artifact_sha256, entry=body.entry,
            runtime=body.runtime, name=body.name, env=body.env, unset_env=body.unset_env,
            replace_env=body.replace_env, limits=body.limits))
        return _deployment_out(dep)

    @app.delete("/api/v1/branches/{ref}/functions/{slug}", dependencies=auth,
                status_code=204)
    async def delete_function(branch: BranchRef, slug: str) -> Response:
        await platform.deployer.delete(branch, slug)
        return Response(status_code=204)

    @app.get("/api/v1/branches/{ref}/functions/{slug}/logs", dependencies=auth,
             response_class=PlainTextResponse)
    async def function_logs(branch: BranchRef, slug: str, lines: int = 200,
                            since: float | None = None, follow: bool = False) -> Response:
        """The function's log; ``since`` in seconds; ``follow`` streams new lines."""
        if since is not None and not math.isfinite(since):
            raise InvalidInput("since", f"must be a finite number of seconds (got {since})")
        if await platform.store.get_function(branch.id, slug) is None:
            raise NotFound("function", slug)
        path = platform.paths.function_log(branch.id, slug)
        platform.function_logs.flush()
        found = tail(path, max(1, min(lines, 10000)), since)
        text = "".join(line + "\n" for line in found)
        if not follow:
            return PlainTextResponse(text)
        return StreamingResponse(follow_file(path, text), media_type="text/plain")

    @app.get("/api/v1/branches/{ref}/functions/{slug}/env", dependencies=auth)
    async def function_env(branch: BranchRef, slug: str,
                           show_values: bool = False) -> dict[str, Any]:
        """The active deployment's env names (values only with ``show_values``)."""
        fn = await platform.store.get_function(branch.id, slug)
        if fn is None or fn.active_deployment_id is None:
            raise NotFound("function", slug)
        dep = await platform.store.get_deployment(fn.active_deployment_id)
        assert dep is not None
        env = platform.deployer.env_of(dep)
        return {"keys": sorted(env), "values": env if show_values else None}

    @app.post("/api/v1/env-digest", dependencies=auth)
    async def env_digest(body: EnvDigestIn) -> dict[str, str]:
        """Fingerprint an env the way deployments' ``env_digest`` is made, so a client can
        tell whether its env differs without the platform returning any value."""
        return {"digest": platform.deployer.secrets.digest(body.env)}

    @app.get("/api/v1/deployments/{deployment_id}", dependencies=auth)
    async def get_deployment(deployment_id: str) -> DeploymentOut:
        dep = await platform.store.get_deployment(deployment_id)
        if dep is None:
            raise NotFound("deployment", deployment_id)
        return _deployment_out(dep)

    app.include_router(backup_router)
    return app
