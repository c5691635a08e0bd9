"""The REST API under ``/api/v1`` (OpenAPI at ``/api/v1/openapi.json``).

Every error is JSON ``{"error": {"code": ..., "message": ..., "field": ...}}`` with a
stable ``code``, and every status a route can answer is declared in the OpenAPI document.
Every route but ``/health`` and the document itself needs ``Authorization: Bearer <api
key>``; ``/metrics`` also takes the platform's ``metrics_token`` in its place. The key is
checked by :class:`RequestGuard` before a byte of the body is read, and bodies are capped
(:data:`MAX_JSON_BODY_BYTES`, artifacts :data:`~phloem.control.artifacts.MAX_ARTIFACT_BYTES`):
anyone who can reach the port can otherwise make the platform buffer what it sends.

    app = create_api(services)      # served by uvicorn in the platform's event loop

The routes see the platform only through :class:`~phloem.control.services.ApiServices`.
"""

from __future__ import annotations

import asyncio
import math
from datetime import datetime
from typing import Annotated, Any
from urllib.parse import unquote

from fastapi import Depends, FastAPI, Path, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.routing import Match
from starlette.types import ASGIApp, Receive, Scope, Send

from phloem import __version__
from phloem.branches.lifetime import BranchLifetime
from phloem.branches.manager import BranchError
from phloem.control import neon_v2
from phloem.control.ai_api import make_router as make_ai_router
from phloem.control.artifacts import (
    MAX_ARTIFACT_BYTES,
    ArtifactError,
    ArtifactTooLarge,
    HashMismatch,
    NoSpace,
)
from phloem.control.backup_api import router as backup_router
from phloem.control.branch_services_api import make_router as make_services_router
from phloem.control.deployer import DEPLOYMENT_STATES, Conflict, DeployRequest, NotFound
from phloem.control.domains_api import make_router as make_domains_router
from phloem.control.errors import ApiError, error_body
from phloem.control.guard import (
    MAX_JSON_BODY_BYTES,
    PUBLIC_PATHS,
    RequestGuard,
)
from phloem.control.keys_api import make_router as make_keys_router
from phloem.control.log_reader import follow_file, tail
from phloem.control.scopes import (
    BRANCHES,
    DEPLOY,
    METRICS,
    PUBLIC_ROUTE,
    READ,
    KeyAuthority,
    check_declared,
    document_scopes,
    grant_of,
    needs,
    requirement,
    route_table,
)
from phloem.control.services import ApiServices
from phloem.control.triggers_api import make_router as make_triggers_router
from phloem.metadata.keys import ApiKeys
from phloem.metadata.store import BranchRow, DeploymentRow, FunctionRow
from phloem.system.validation import OWNER_RE, InvalidInput

STRICT_INPUT = ConfigDict(strict=True, extra="forbid")


def _integral_number(value: object) -> object:
    """JSON has one number type: ``1594.0`` is the integer 1594 (JSON Schema agrees), so
    strict mode must not refuse it; ``1594.5``, ``"1594"`` and ``true`` stay refused."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


#: Goes after an int's bounds, so they reach the schema: Annotated[int, Field(ge=1), INTEGRAL]
INTEGRAL = BeforeValidator(_integral_number)


class ErrorDetail(BaseModel):
    code: str = Field(description="stable, machine-readable, e.g. branch_not_found")
    message: str
    field: str | None = Field(None, description="the input at fault, when one is")


class ErrorOut(BaseModel):
    error: ErrorDetail


#: What each error status means on this API (the OpenAPI document's descriptions).
ERROR_MEANINGS = {
    400: "invalid input (`invalid_input`, `field` names it and the message the rule)",
    401: "no valid API key (`unauthorized`: missing, unknown, expired or revoked); "
         "checked before the body is read",
    403: "the key lacks the scope this route needs (`forbidden_scope`, named in the "
         "message) or is limited to other branches (`forbidden_branch`)",
    404: "what the path names does not exist (`<what>_not_found`)",
    409: "conflicts with the current state (e.g. `branch_exists`, `sha256_mismatch`)",
    413: "the body is over this route's cap (`payload_too_large`)",
    507: "no space left to store it (`insufficient_storage`); nothing was changed",
}


def errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """``responses=`` for a route that may answer ``statuses`` with an :class:`ErrorOut`."""
    return {s: {"model": ErrorOut, "description": ERROR_MEANINGS[s]} for s in statuses}


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
    expires_at: datetime | None = Field(None, description="when the platform deletes it "
                                        "with its functions (a neon.ts ttl); null: never")
    protected: bool = Field(False, description="delete and reset are refused")


class BranchCreateIn(BaseModel):
    model_config = STRICT_INPUT

    name: str | None = Field(None, pattern=r"^[A-Za-z0-9._/-]{1,64}$",
                             description="default: the id")
    parent: str | None = Field(None, description="parent name or id; default: main")
    copy_functions: bool = Field(False, description="deploy the parent's active "
                                 "functions on the new branch")


class BranchLifetimeIn(BaseModel):
    model_config = STRICT_INPUT

    ttl_s: Annotated[int, Field(ge=1, le=366 * 86400), INTEGRAL] | None = Field(
        None, description="expires this many seconds after it was created; null: left as "
        "it is")
    clear_ttl: bool = Field(False, description="never expires")
    protected: bool | None = Field(None, description="null: left as it is")


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
    bundle: bool = Field(True, description="false: the entry was deployed as a prebuilt "
                         "bundle (--no-bundle), run as uploaded")
    activated_at: datetime | None = Field(None, description="when it last became the "
                                          "active deployment (a deploy or a rollback)")


class DeploymentStateOut(DeploymentOut):
    state: str = Field(description="active (serving), ready (replaced, kept built: a "
                       "rollback target), pruned (replaced, built files removed), building "
                       "or failed", json_schema_extra={"enum": list(DEPLOYMENT_STATES)})


class RollbackIn(BaseModel):
    model_config = STRICT_INPUT

    deployment_id: str | None = Field(None, min_length=1, max_length=100, description="the "
                                      "deployment to switch to [default: the newest ready "
                                      "one older than the active one]")


class RollbackOut(BaseModel):
    slug: str
    deployment: DeploymentStateOut = Field(description="now active")
    previous_deployment_id: str | None = Field(description="the one it replaced (null: "
                                               "it was already active)")
    switch_ms: float = Field(description="from the request to the route pointing at it")


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
    owner: str | None = Field(None, description="the project (its link file's project_id) "
                              "that created it with `phloem deploy`; null: made by "
                              "`phloem functions deploy`. A project deploy deletes only "
                              "functions it owns")


class DeployIn(BaseModel):
    model_config = STRICT_INPUT

    artifact_sha256: str = Field(pattern=r"^[0-9a-f]{64}$", description="the sha256 of an "
                                 "artifact uploaded with PUT /api/v1/artifacts/{sha256}")
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
    owner: str | None = Field(None, pattern=OWNER_RE.pattern, description="the deploying "
                              "project's id: it becomes the function's owner (unset: the "
                              "owner stays as it is)")
    bundle: bool = Field(True, description="false: `entry` is a prebuilt bundle, run as "
                         "uploaded (node); nothing is installed or bundled")


class EnvDigestIn(BaseModel):
    model_config = STRICT_INPUT

    env: dict[str, str]


class ConnectionOut(BaseModel):
    uri: str
    pooled: bool
    branch_id: str


class ArtifactOut(BaseModel):
    sha256: str
    size: int


class EnvOut(BaseModel):
    keys: list[str]
    values: dict[str, str] | None = Field(description="only with show_values=true")


class DigestOut(BaseModel):
    digest: str


class HealthOut(BaseModel):
    status: str
    version: str


def _deployment_out(d: DeploymentRow) -> DeploymentOut:
    return DeploymentOut(
        id=d.id, function_id=d.function_id, status=d.status, runtime=d.runtime,
        entry=d.entry, artifact_sha256=d.artifact_sha256,
        env_keys=sorted(d.env_keys if d.env_keys is not None else d.env),
        env_digest=d.env_digest,
        limits=d.limits or {},
        error=d.error, build_log=d.build_log, created_at=d.created_at,
        finished_at=d.finished_at, bundle=d.bundle, activated_at=d.activated_at,
    )


def _branch_out(b: BranchRow, size: int | None = None) -> BranchOut:
    return BranchOut(id=b.id, name=b.name, parent_id=b.parent_id, state=b.state,
                     created_at=b.created_at, copy_method=b.copy_method,
                     copy_bytes=b.copy_bytes, copy_ms=b.copy_ms, logical_size_bytes=size,
                     expires_at=b.expires_at, protected=b.protected)


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
    services: ApiServices = request.app.state.services
    return await services.branches.get(ref.replace("%2F", "/"))


BranchRef = Annotated[BranchRow, Depends(branch_by_ref)]


Sha256 = Annotated[str, Path(pattern=r"^[0-9a-f]{64}$", description="64 lowercase hex")]
Slug = Annotated[str, Path(pattern=r"^[a-z0-9]{1,20}$")]
#: The artifact route reads its body itself (streaming): describe it by hand.
ARTIFACT_BODY: dict[str, Any] = {"requestBody": {
    "required": True,
    "description": f"the artifact (a .tar.gz), at most {MAX_ARTIFACT_BYTES} bytes (413 "
                   "beyond); its sha256 must be the one in the path (409 otherwise)",
    "content": {"application/octet-stream": {"schema": {"type": "string",
                                                        "format": "binary"}}}}}
#: Upload chunks go to the worker thread in batches of this size: few thread hops, and
#: never more than this much of an upload in memory.
UPLOAD_BATCH_BYTES = 1024 * 1024


def create_api(services: ApiServices) -> FastAPI:
    app = FastAPI(title="phloem", version=__version__, openapi_url="/api/v1/openapi.json",
                  docs_url="/api/v1/docs", redoc_url=None)
    app.state.services = services
    # The platform's own key (credentials.json's) is compared in memory, so status and
    # the rest answer a 401/200 while the system database does not; others are looked up.
    app.state.keys = KeyAuthority(services.api_key, ApiKeys(services.store.pool),
                                  services.store)
    # Nothing runs for a request the guard refuses; it sees paths as the routes do.
    app.add_middleware(RequestGuard, authority=app.state.keys,
                       requirement=lambda scope: requirement(app.state.route_table, scope),
                       metrics_token=services.settings.metrics_token)
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
        first: dict[str, Any] = (dict(exc.errors()[0]) if exc.errors()
                                 else {"loc": (), "msg": "invalid request"})
        loc = ".".join(str(p) for p in first.get("loc", ()) if p not in ("body", "path",
                                                                          "query"))
        rule = first.get("msg")
        if first.get("type") == "string_pattern_mismatch":  # say it as the checks do
            rule = f"must match {first['ctx']['pattern']} (got {first.get('input')!r})"
        return JSONResponse(error_body("invalid_input", f"{loc or 'request'}: {rule}",
                                       loc or None), 400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed",
                413: "payload_too_large"}.get(exc.status_code, "http_error")
        headers = dict(exc.headers or {})
        if exc.status_code == 405:
            # Starlette names the methods of the first route matching the path only.
            headers["Allow"] = ", ".join(allowed_methods(app, request.scope))
        return JSONResponse(error_body(code, str(exc.detail)), exc.status_code,
                            headers=headers)

    app.openapi = lambda: _openapi_document(app)  # type: ignore[method-assign]

    async def function_out(branch: BranchRow, fn: FunctionRow) -> FunctionOut:
        deployments = await services.store.list_deployments(fn.id)
        latest = deployments[0] if deployments else None
        active = next((d for d in deployments if d.id == fn.active_deployment_id), None)
        status = active.status if active else (latest.status if latest else "none")
        return FunctionOut(
            id=fn.id, slug=fn.slug, name=fn.name, branch_id=branch.id,
            branch_name=branch.name, runtime=fn.runtime,
            invocation_url=services.deployer.invocation_url(branch.id, fn.slug),
            status=status, deployment_id=fn.active_deployment_id,
            latest_deployment=_deployment_out(latest) if latest else None,
            created_at=fn.created_at, updated_at=fn.updated_at, owner=fn.owner,
        )

    @app.get("/api/v1/health", openapi_extra=PUBLIC_ROUTE)
    async def health() -> HealthOut:
        return HealthOut(status="ok", version=__version__)

    @app.get("/metrics", include_in_schema=False, openapi_extra=METRICS)
    async def metrics(request: Request) -> Response:
        """Prometheus exposition; it names every branch and function, so it needs a key
        (or the metrics token: :class:`RequestGuard`)."""
        body, content_type = services.metrics.render(request.headers.get("accept", ""))
        return Response(body, media_type=content_type)

    @app.get("/api/v1/status", openapi_extra=READ)
    async def status() -> dict[str, Any]:
        return await services.status()

    @app.put("/api/v1/artifacts/{sha256}", status_code=201,
             responses=errors(400, 409, 413, 507),
             openapi_extra={**ARTIFACT_BODY, **needs("deploy", any_branch=True)})
    async def put_artifact(sha256: Sha256, request: Request) -> ArtifactOut:
        """Upload an artifact (a packed project) named by its sha256. It streams to a
        temporary file from a worker thread (the gateway shares this event loop), hashed
        on the way, and is renamed into place only when it hashes to its name."""
        try:
            return await receive_artifact(services, sha256, request)
        except HashMismatch as exc:
            raise ApiError(409, "sha256_mismatch", str(exc), "sha256") from None
        except ArtifactTooLarge as exc:
            raise ApiError(413, "payload_too_large", str(exc)) from None
        except NoSpace as exc:
            raise ApiError(507, "insufficient_storage", str(exc)) from None
        except ClientDisconnect:
            # Nobody will read this answer; it keeps the log free of a traceback.
            raise ApiError(400, "incomplete_body", "the client left before the whole "
                           "artifact arrived; nothing was stored") from None
        except ArtifactError as exc:
            raise ApiError(400, "invalid_artifact", str(exc), "sha256") from None

    @app.head("/api/v1/artifacts/{sha256}", responses={
        200: {"description": "the artifact is stored"},
        404: {"description": "no such artifact (no body: this is HEAD)"},
        **errors(400)}, openapi_extra=needs("read", any_branch=True))
    async def head_artifact(sha256: Sha256) -> Response:
        found = await asyncio.to_thread(services.artifacts.exists, sha256)
        return Response(status_code=200 if found else 404)

    async def sized(b: BranchRow) -> BranchOut:
        return _branch_out(b, await asyncio.to_thread(services.branches.logical_size, b))

    @app.get("/api/v1/branches", openapi_extra=needs("read", any_branch=True))
    async def list_branches(request: Request) -> list[BranchOut]:
        grant = grant_of(request)  # a key limited to some branches sees only those
        return [await sized(b) for b in await services.store.list_branches()
                if grant.sees(b.id)]

    @app.get("/api/v1/branches/{ref}", responses=errors(404), openapi_extra=READ)
    async def get_branch(branch: BranchRef) -> BranchOut:
        return await sized(branch)

    @app.post("/api/v1/branches", status_code=201, responses=errors(400, 404, 409, 507),
              openapi_extra=BRANCHES)
    async def create_branch(body: BranchCreateIn) -> BranchOut:
        row = await services.branches.create(body.name, body.parent)
        if row.parent_id is not None:  # a child inherits its parent's triggers, disabled
            await services.triggers.store.copy_disabled(row.parent_id, row.id)
        out = await sized(row)
        if body.copy_functions and row.parent_id is not None:
            parent = await services.branches.get(row.parent_id)
            deps = await services.deployer.copy_functions(parent, row)
            out.copied_deployments = [d.id for d in deps]
        return out

    @app.patch("/api/v1/branches/{ref}", responses=errors(400, 404, 409),
               openapi_extra=BRANCHES)
    async def set_branch_lifetime(branch: BranchRef, body: BranchLifetimeIn) -> BranchOut:
        lifetime = BranchLifetime(services.branches, services.deployer.drop_branch)
        ttl_s = int(body.ttl_s) if body.ttl_s is not None else None
        row = await lifetime.set(branch.id, ttl_s, body.protected, body.clear_ttl)
        return await sized(row)

    @app.post("/api/v1/branches/{ref}/reset", responses=errors(404, 409, 507),
              openapi_extra=BRANCHES)
    async def reset_branch(branch: BranchRef) -> BranchOut:
        row = await services.branches.reset(branch.id, services.deployer.restart_branch)
        return await sized(row)

    @app.delete("/api/v1/branches/{ref}", responses=errors(400, 404, 409),
                openapi_extra=BRANCHES)
    async def delete_branch(branch: BranchRef, recursive: bool = False) -> BranchDeleteOut:
        deleted = await services.branches.delete(branch.id, recursive,
                                                 services.deployer.drop_branch)
        return BranchDeleteOut(deleted=deleted)

    # A database password writes as much as a deploy does.
    @app.get("/api/v1/branches/{ref}/connection", responses=errors(400, 404),
             openapi_extra=DEPLOY)
    async def connection_string(branch: BranchRef, pooled: bool = True) -> ConnectionOut:
        urls = services.branches.connection_strings(branch)
        return ConnectionOut(uri=urls.pooled if pooled else urls.unpooled, pooled=pooled,
                             branch_id=branch.id)

    @app.get("/api/v1/branches/{ref}/functions", responses=errors(404), openapi_extra=READ)
    async def list_functions(branch: BranchRef) -> list[FunctionOut]:
        fns = await services.store.list_functions(branch.id)
        return [await function_out(branch, f) for f in fns]

    @app.get("/api/v1/branches/{ref}/functions/{slug}", responses=errors(404),
             openapi_extra=READ)
    async def get_function(branch: BranchRef, slug: str) -> FunctionOut:
        fn = await services.store.get_function(branch.id, slug)
        if fn is None:
            raise NotFound("function", slug)
        return await function_out(branch, fn)

    @app.post("/api/v1/branches/{ref}/functions/{slug}/deployments", status_code=202,
              responses=errors(400, 404), openapi_extra=DEPLOY)
    async def deploy(branch: BranchRef, slug: Slug, body: DeployIn) -> DeploymentOut:
        dep = await services.deployer.deploy(branch, DeployRequest(
            slug=slug, artifact_sha256=body.artifact_sha256, entry=body.entry,
            runtime=body.runtime, name=body.name, env=body.env, unset_env=body.unset_env,
            replace_env=body.replace_env, limits=body.limits, owner=body.owner,
            bundle=body.bundle))
        return _deployment_out(dep)

    def with_state(fn: FunctionRow, d: DeploymentRow) -> DeploymentStateOut:
        return DeploymentStateOut(**_deployment_out(d).model_dump(),
                                  state=services.deployer.state_of(fn, d))

    @app.get("/api/v1/branches/{ref}/functions/{slug}/deployments",
             responses=errors(400, 404), openapi_extra=READ)
    async def list_deployments(
        branch: BranchRef, slug: str,
        limit: Annotated[int, Query(ge=1, le=1000, description="at most this many, the "
                                    "newest")] = 100,
    ) -> list[DeploymentStateOut]:
        """The function's deployments, newest first, each with its state now."""
        fn = await services.store.get_function(branch.id, slug)
        if fn is None:
            raise NotFound("function", slug)
        deps = await services.store.list_deployments(fn.id)
        return [with_state(fn, d) for d in deps[:limit]]

    @app.post("/api/v1/branches/{ref}/functions/{slug}/rollback",
              responses=errors(400, 404, 409), openapi_extra=DEPLOY)
    async def rollback(branch: BranchRef, slug: str,
                       body: RollbackIn | None = None) -> RollbackOut:
        """Switch the function back to an earlier deployment in one step, without a
        build (its artifact, build, env and limits as they were). 404: no such function,
        or no such deployment of it; 409: the target is not ready (building, failed,
        pruned) or there is no earlier one."""
        try:
            done = await services.deployer.rollback(branch, slug,
                                                    body.deployment_id if body else None)
        except Conflict as exc:
            raise ApiError(409, exc.code, exc.message, exc.field) from None
        return RollbackOut(slug=slug, deployment=with_state(done.function, done.deployment),
                           previous_deployment_id=done.previous_id,
                           switch_ms=round(done.switch_ms, 3))

    @app.delete("/api/v1/branches/{ref}/functions/{slug}", status_code=204,
                responses=errors(404), openapi_extra=DEPLOY)
    async def delete_function(branch: BranchRef, slug: str) -> Response:
        await services.deployer.delete(branch, slug)
        return Response(status_code=204)

    @app.get("/api/v1/branches/{ref}/functions/{slug}/logs", response_class=PlainTextResponse,
             responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}},
                        **errors(400, 404)}, openapi_extra=READ)
    async def function_logs(branch: BranchRef, slug: str, lines: int = 200,
                            since: float | None = None, follow: bool = False) -> Response:
        """The function's log; ``since`` in seconds; ``follow`` streams new lines."""
        if since is not None and not math.isfinite(since):
            raise InvalidInput("since", f"must be a finite number of seconds (got {since})")
        if await services.store.get_function(branch.id, slug) is None:
            raise NotFound("function", slug)
        path = services.paths.function_log(branch.id, slug)
        services.function_logs.flush()
        found = tail(path, max(1, min(lines, 10000)), since)
        text = "".join(line + "\n" for line in found)
        if not follow:
            return PlainTextResponse(text)
        return StreamingResponse(follow_file(path, text), media_type="text/plain")

    @app.get("/api/v1/branches/{ref}/functions/{slug}/env", responses=errors(400, 404),
             openapi_extra=READ)
    async def function_env(branch: BranchRef, slug: str, request: Request,
                           show_values: bool = False) -> EnvOut:
        """The active deployment's env names (values only with ``show_values``, which
        needs the ``deploy`` scope: values are secrets)."""
        if show_values and not grant_of(request).allows("deploy"):
            raise ApiError(403, "forbidden_scope", "show_values=true needs an api key "
                           "with scope 'deploy'", "show_values")
        fn = await services.store.get_function(branch.id, slug)
        if fn is None or fn.active_deployment_id is None:
            raise NotFound("function", slug)
        dep = await services.store.get_deployment(fn.active_deployment_id)
        assert dep is not None
        env = services.deployer.env_of(dep)
        return EnvOut(keys=sorted(env), values=env if show_values else None)

    @app.post("/api/v1/env-digest", responses=errors(400),
              openapi_extra=needs("read", any_branch=True))
    async def env_digest(body: EnvDigestIn) -> DigestOut:
        """Fingerprint an env the way deployments' ``env_digest`` is made, so a client can
        tell whether its env differs without the platform returning any value."""
        return DigestOut(digest=services.deployer.secrets.digest(body.env))

    @app.get("/api/v1/deployments/{deployment_id}", responses=errors(404),
             openapi_extra=needs("read", any_branch=True))
    async def get_deployment(deployment_id: str, request: Request) -> DeploymentOut:
        dep = await services.store.get_deployment(deployment_id)
        branch_id = await services.store.function_branch_id(dep.function_id) if dep else None
        if dep is None or branch_id is None or not grant_of(request).sees(branch_id):
            raise NotFound("deployment", deployment_id)
        return _deployment_out(dep)

    app.include_router(backup_router)
    app.include_router(make_triggers_router(errors))
    app.include_router(make_ai_router(errors))
    app.include_router(make_services_router(errors))
    app.include_router(make_domains_router(errors))
    app.include_router(make_keys_router(errors))
    app.include_router(neon_v2.router, include_in_schema=False)
    app.state.route_table = route_table(app.router.routes)
    check_declared(app.state.route_table)
    return app


async def receive_artifact(services: ApiServices, sha256: str, request: Request) -> ArtifactOut:
    upload = await asyncio.to_thread(services.artifacts.begin, sha256)
    try:
        batch: list[bytes] = []
        pending = 0
        async for chunk in request.stream():
            batch.append(chunk)
            pending += len(chunk)
            if pending >= UPLOAD_BATCH_BYTES:
                await asyncio.to_thread(upload.write, b"".join(batch))
                batch, pending = [], 0
        if batch:
            await asyncio.to_thread(upload.write, b"".join(batch))
        sha = await asyncio.to_thread(upload.commit)
    finally:
        await asyncio.to_thread(upload.abort)
    return ArtifactOut(sha256=sha, size=upload.size)


def allowed_methods(app: FastAPI, scope: Scope) -> list[str]:
    """Every method some route serves at this path, for a 405's ``Allow``."""
    methods: set[str] = set()
    for route in app.router.routes:
        match, _ = route.matches(scope)
        route_methods = getattr(route, "methods", None)
        if match != Match.NONE and route_methods:
            methods |= set(route_methods)
    return sorted(methods)


def _openapi_document(app: FastAPI) -> dict[str, Any]:
    """FastAPI's document, told what :class:`RequestGuard` and the error handlers do:
    the bearer scheme and 401 on every route but the public ones, 413 on every route with
    a body, and errors as :class:`ErrorOut` with 400, never FastAPI's default 422."""
    if app.openapi_schema:
        return app.openapi_schema
    doc = get_openapi(title=app.title, version=app.version, routes=app.routes)
    components = doc.setdefault("components", {})
    schemas = components.setdefault("schemas", {})
    for unused in ("HTTPValidationError", "ValidationError"):
        schemas.pop(unused, None)
    components["securitySchemes"] = {"apiKey": {
        "type": "http", "scheme": "bearer",
        "description": "an API key (phk_...), from credentials.json or `phloem keys`"}}
    error_ref = {"content": {"application/json": {
        "schema": {"$ref": "#/components/schemas/ErrorOut"}}}}
    for path, operations in doc["paths"].items():
        for method, op in operations.items():
            responses = op.setdefault("responses", {})
            responses.pop("422", None)
            for status, response in responses.items():
                if method == "head" and int(status) < 400:
                    response.pop("content", None)  # a HEAD answer has no body
                # FastAPI gives them the route's media type (text/plain for logs).
                if int(status) >= 400 and "content" in response:
                    response["content"] = error_ref["content"]
            if path not in PUBLIC_PATHS:
                op["security"] = [{"apiKey": []}]
                responses["401"] = {"description": ERROR_MEANINGS[401], **error_ref}
                responses["403"] = {"description": ERROR_MEANINGS[403], **error_ref}
            if "requestBody" in op:
                responses["413"] = {"description": ERROR_MEANINGS[413], **error_ref}
                op["requestBody"].setdefault(
                    "description", f"JSON, at most {MAX_JSON_BODY_BYTES} bytes (413 beyond)")
    document_scopes(doc)
    app.openapi_schema = doc
    return doc
