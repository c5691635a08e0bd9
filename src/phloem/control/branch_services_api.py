"""``/api/v1/branches/{ref}/services``: the branch services a branch has on.

``PUT`` makes the branch's set exactly the declared one (the project deploy sends what its
neon.ts declares: ``auth``, ``ai``, ``storage``), provisioning new ones and removing
dropped ones; when anything changed, the branch's functions restart so they see the new
variables. ``GET`` lists them and the services this platform provides.

    app.include_router(make_router(errors))      # in create_api
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, ConfigDict, Field

from phloem.control.errors import ApiError
from phloem.control.scopes import DEPLOY, READ
from phloem.control.services import ApiServices
from phloem.metadata.store import BranchRow
from phloem.services.base import SERVICES
from phloem.services.registry import ServiceError


class BranchServicesOut(BaseModel):
    branch_id: str
    services: dict[str, dict[str, Any]] = Field(
        description="service (auth, ai, storage) -> its config, for those the branch has on")
    urls: dict[str, str] = Field(description="service -> where functions reach it")
    available: list[str] = Field(description="the services this platform provides")
    changed: bool = Field(False, description="PUT: whether anything was provisioned or "
                          "removed (the branch's functions then restarted)")


class BranchServicesIn(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")
    services: dict[str, dict[str, Any]] = Field(
        description=f"service ({', '.join(SERVICES)}) -> config; the branch's whole set")


class BranchServicesEnvOut(BaseModel):
    env: dict[str, str] = Field(description="the variables the branch's functions get from "
                                "its services (credentials included)")
    hosts: list[str] = Field(description="the services' host names; they resolve inside "
                             "isolates only: a local process needs them in /etc/hosts, or "
                             "the local forwarders of phloem dev / env run "
                             "--forward-services")


def _services(request: Request) -> ApiServices:
    services: ApiServices = request.app.state.services
    return services


async def _branch(ref: str, request: Request) -> BranchRow:
    return await _services(request).branches.get(ref.replace("%2F", "/"))


Branch = Annotated[BranchRow, Depends(_branch)]
Services = Annotated[ApiServices, Depends(_services)]
Errors = Callable[..., dict[int | str, dict[str, Any]]]


def _out(services: ApiServices, branch: BranchRow, changed: bool = False) -> BranchServicesOut:
    registry = services.branch_services
    on = registry.enabled(branch.id)
    return BranchServicesOut(
        branch_id=branch.id, services=on,
        urls={name: registry.ctx.base_url(branch.id, name) for name in on},
        available=sorted(registry.services), changed=changed)


def _with_503(responses: dict[int | str, dict[str, Any]]) -> dict[int | str, dict[str, Any]]:
    """``responses`` and the 503 of a service that could not be provisioned (its error
    model is the API's, as the others')."""
    return {**responses, 503: {**responses[400], "description": (
        "a service could not be provisioned (`service_unavailable`: the message names it "
        "and why); the branch's services are as they were")}}


def make_router(errors: Errors) -> APIRouter:
    """The routes; ``errors`` is the API's ``responses=`` helper (its error model)."""
    router = APIRouter(prefix="/api/v1/branches/{ref}/services", tags=["services"])

    @router.get("", responses=errors(400, 404), openapi_extra=READ)
    async def list_branch_services(branch: Branch, services: Services) -> BranchServicesOut:
        return _out(services, branch)

    @router.get("/env", responses=errors(400, 404), openapi_extra=DEPLOY)
    async def branch_services_env(branch: Branch, services: Services) -> BranchServicesEnvOut:
        """For ``phloem env pull`` and ``env run``: local processes get what the branch's
        functions get."""
        registry = services.branch_services
        return BranchServicesEnvOut(env=registry.env(branch), hosts=registry.hosts(branch.id))

    @router.put("", responses=_with_503(errors(400, 404, 409)), openapi_extra=DEPLOY)
    async def declare_branch_services(branch: Branch, services: Services,
                                      body: BranchServicesIn) -> BranchServicesOut:
        if branch.state != "ready":
            raise ApiError(409, "branch_busy", f"branch {branch.name!r} is {branch.state}")
        try:
            changed = await services.branch_services.declare(branch, body.services)
        except ServiceError as exc:
            raise ApiError(exc.status, exc.code, exc.message, exc.field) from None
        if changed:
            await services.deployer.refresh_branch(branch)
        return _out(services, branch, changed)

    return router
