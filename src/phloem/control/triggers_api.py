"""``/api/v1/branches/{ref}/triggers``: a branch's schedule triggers and their history.

``PUT`` replaces the branch's set with the declared one (the project deploy sends it);
``GET`` lists them; ``POST .../{name}/enable``, ``/disable`` switch one; ``POST
.../{name}/run`` fires it now (a ``manual`` run, delivered as a scheduled one is);
``GET .../{name}/history`` lists its runs, newest first.

    app.include_router(make_router(errors))      # in create_api
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Path, Query, Request
from pydantic import BaseModel, ConfigDict, Field

from phloem.control.deployer import NotFound
from phloem.control.scopes import DEPLOY, READ
from phloem.control.services import ApiServices
from phloem.control.triggers import check_triggers
from phloem.metadata.store import BranchRow
from phloem.metadata.triggers import RUN_STATES, RunRow, TriggerRow
from phloem.system.validation import OWNER_RE


class TriggerOut(BaseModel):
    id: str
    name: str
    branch_id: str
    function: str
    type: str = Field(description="schedule or storage_object_created")
    cron: str = Field(description="five fields, UTC (a schedule trigger; else empty)")
    bucket: str | None = Field(description="a storage trigger's bucket")
    prefix: str = Field(description="a storage trigger's key prefix")
    functionPath: str
    enabled: bool
    owner: str | None
    created_at: datetime
    updated_at: datetime


class TriggerRunOut(BaseModel):
    id: str = Field(description="the invocation id (X-Neon-Invocation-Id)")
    trigger: str
    scheduled_for: datetime
    reason: str = Field(description="schedule, manual or object_created")
    status: str = Field(description=" or ".join(RUN_STATES))
    attempts: int
    http_status: int | None
    error: str | None
    started_at: datetime
    finished_at: datetime | None


class TriggerIn(BaseModel):
    """One trigger, as neon.ts declares it: a schedule (``cron``) or, with ``type:
    "storage_object_created"``, an object created in ``bucket`` under ``prefix``."""

    model_config = ConfigDict(strict=True, extra="forbid")
    type: Literal["schedule", "storage_object_created"] = "schedule"
    function: str = Field(pattern=r"^[a-z0-9]{1,20}$", description="the function's slug")
    cron: str | None = Field(None, max_length=200, description="five fields (minute hour "
                             "day-of-month month day-of-week), UTC; checked by the server "
                             "(400 naming the field)")
    bucket: str | None = Field(None, max_length=63, description="storage_object_created: "
                               "the branch's bucket")
    prefix: str | None = Field(None, max_length=1024, description="storage_object_created: "
                               "only keys starting with it")
    functionPath: str = Field(
        "/", pattern=r"^/[!-~]*$", max_length=2048, description="the path POSTed to")
    enabled: bool = True


class TriggersIn(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")
    triggers: dict[str, TriggerIn] = Field(description="name (1-63 letters, digits, '-' "
                                           "or '_') -> trigger; the owner's whole set")
    owner: str | None = Field(None, pattern=OWNER_RE.pattern,
                              description="the project deploying them")


def _out(t: TriggerRow) -> TriggerOut:
    return TriggerOut(id=t.id, name=t.name, branch_id=t.branch_id, function=t.function_slug,
                      type=t.kind, cron=t.cron, bucket=t.bucket, prefix=t.key_prefix,
                      functionPath=t.function_path, enabled=t.enabled,
                      owner=t.owner, created_at=t.created_at, updated_at=t.updated_at)


def _run_out(r: RunRow, name: str) -> TriggerRunOut:
    return TriggerRunOut(id=r.id, trigger=name, scheduled_for=r.scheduled_for,
                         reason=r.reason, status=r.status, attempts=r.attempts,
                         http_status=r.http_status, error=r.error, started_at=r.started_at,
                         finished_at=r.finished_at)


def _services(request: Request) -> ApiServices:
    services: ApiServices = request.app.state.services
    return services


async def _branch(ref: str, request: Request) -> BranchRow:
    return await _services(request).branches.get(ref.replace("%2F", "/"))


Branch = Annotated[BranchRow, Depends(_branch)]
Services = Annotated[ApiServices, Depends(_services)]
Name = Annotated[str, Path(description="the trigger's name")]


async def _trigger(services: ApiServices, branch: BranchRow, name: str) -> TriggerRow:
    row = await services.triggers.store.get(branch.id, name)
    if row is None:
        raise NotFound("trigger", f"{name} (branch {branch.name})")
    return row


Errors = Callable[..., dict[int | str, dict[str, Any]]]


def make_router(errors: Errors) -> APIRouter:
    """The routes; ``errors`` is the API's ``responses=`` helper (its error model)."""
    router = APIRouter(prefix="/api/v1/branches/{ref}/triggers", tags=["triggers"])

    @router.get("", responses=errors(400, 404), openapi_extra=READ)
    async def list_triggers(branch: Branch, services: Services) -> list[TriggerOut]:
        return [_out(t) for t in await services.triggers.store.list_triggers(branch.id)]


    @router.put("", responses=errors(400, 404), openapi_extra=DEPLOY)
    async def replace_triggers(branch: Branch, services: Services,
                               body: TriggersIn) -> list[TriggerOut]:
        specs = check_triggers({name: t.model_dump(exclude_none=True)
                                for name, t in body.triggers.items()})
        rows = await services.triggers.store.replace(branch.id, specs, body.owner)
        return [_out(t) for t in rows]


    @router.post("/{name}/enable", responses=errors(400, 404), openapi_extra=DEPLOY)
    async def enable_trigger(branch: Branch, services: Services, name: Name) -> TriggerOut:
        row = await _trigger(services, branch, name)
        await services.triggers.store.set_enabled(row.id, True)
        return _out(await _trigger(services, branch, name))


    @router.post("/{name}/disable", responses=errors(400, 404), openapi_extra=DEPLOY)
    async def disable_trigger(branch: Branch, services: Services, name: Name) -> TriggerOut:
        row = await _trigger(services, branch, name)
        await services.triggers.store.set_enabled(row.id, False)
        return _out(await _trigger(services, branch, name))


    @router.post("/{name}/run", status_code=202,
                 responses=errors(400, 404), openapi_extra=DEPLOY)
    async def run_trigger(branch: Branch, services: Services, name: Name) -> TriggerRunOut:
        """Fire it now, enabled or not (its history shows the run as ``manual``)."""
        row = await _trigger(services, branch, name)
        run_id = await services.triggers.fire(row, "manual")
        run = await services.triggers.store.get_run(run_id)
        assert run is not None  # just written
        return _run_out(run, row.name)


    @router.get("/{name}/history", responses=errors(400, 404), openapi_extra=READ)
    async def trigger_history(branch: Branch, services: Services, name: Name,
                              limit: Annotated[int, Query(ge=1, le=1000)] = 50,
                              ) -> list[TriggerRunOut]:
        row = await _trigger(services, branch, name)
        return [_run_out(r, row.name) for r in await services.triggers.store.history(row.id,
                                                                                     limit)]

    return router
