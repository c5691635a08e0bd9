"""``/api/v1/domains``: custom domains, and ``/api/v1/branches/{ref}/domains``, a
project's declared set on one branch.

``POST /domains`` adds one (400 ``invalid_hostname`` / ``hostname_reserved``, 404 for the
branch or function, 409 ``domain_exists``); ``GET /domains`` lists them (``?branch=``,
``?status=true`` adds the checks); ``GET /domains/{hostname}`` shows one with its status
(DNS, certificate); ``DELETE /domains/{hostname}`` removes one. ``PUT
/branches/{ref}/domains`` replaces a project's domains on the branch (``phloem deploy``);
names another branch holds are skipped and listed.

    app.include_router(make_router(errors))      # in create_api
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Path, Query, Request
from pydantic import BaseModel, ConfigDict, Field

from phloem.control.scopes import DEPLOY, READ
from phloem.control.services import ApiServices
from phloem.metadata.domains import DomainRow
from phloem.metadata.store import BranchRow
from phloem.system.validation import OWNER_RE

STRICT = ConfigDict(strict=True, extra="forbid")
SLUG = r"^[a-z0-9]{1,20}$"


class DnsOut(BaseModel):
    ok: bool = Field(description="the name resolves to an address of this host")
    addresses: list[str]
    reason: str | None = Field(None, description="why not, when not ok")


class CertificateOut(BaseModel):
    issued: bool
    reason: str | None = Field(description="why it is not issued (or why its renewal "
                               "fails); null when all is well")
    not_after: datetime | None = Field(description="when the certificate served for the "
                                       "name expires; null when there is none")


class DomainStatusOut(BaseModel):
    dns: DnsOut
    certificate: CertificateOut


class DomainOut(BaseModel):
    hostname: str
    branch_id: str
    branch: str = Field(description="the branch's name")
    function: str = Field(description="the function's slug")
    hsts: bool = Field(description="Strict-Transport-Security is sent (over TLS only)")
    owner: str | None = Field(description="the project that declared it; null: added "
                              "with phloem domains add")
    url: str
    created_at: datetime
    status: DomainStatusOut | None = Field(None, description="DNS and certificate checks "
                                           "(on get, add, or list with ?status=true)")


class DomainIn(BaseModel):
    model_config = STRICT
    hostname: str = Field(max_length=300, description="a DNS name outside the platform's "
                          "function domain, unique platform-wide")
    function: str = Field(pattern=SLUG, description="the function's slug")
    branch: str | None = Field(None, max_length=200, description="name or id; default main")
    hsts: bool = Field(False, description="send Strict-Transport-Security (over TLS)")


class DeclaredDomainIn(BaseModel):
    model_config = STRICT
    function: str = Field(pattern=SLUG)
    hsts: bool = False


class DomainsIn(BaseModel):
    model_config = STRICT
    domains: dict[str, DeclaredDomainIn] = Field(
        description="hostname -> its function; the owner's whole set on the branch")
    owner: str | None = Field(None, pattern=OWNER_RE.pattern,
                              description="the project declaring them")


class SkippedOut(BaseModel):
    hostname: str
    branch_id: str
    branch: str
    reason: str


class DomainsAppliedOut(BaseModel):
    domains: list[DomainOut] = Field(description="the branch's domains now")
    skipped: list[SkippedOut] = Field(description="declared names another branch holds")


def _services(request: Request) -> ApiServices:
    services: ApiServices = request.app.state.services
    return services


async def _branch(ref: str, request: Request) -> BranchRow:
    return await _services(request).branches.get(ref.replace("%2F", "/"))


Services = Annotated[ApiServices, Depends(_services)]
Hostname = Annotated[str, Path(max_length=300, description="the custom domain")]
Errors = Callable[..., dict[int | str, dict[str, Any]]]


async def _names(services: ApiServices) -> dict[str, str]:
    return {b.id: b.name for b in await services.store.list_branches()}


async def _out(services: ApiServices, row: DomainRow, names: dict[str, str],
               status: bool) -> DomainOut:
    checks = DomainStatusOut(**await services.domains.status(row)) if status else None
    return DomainOut(hostname=row.hostname, branch_id=row.branch_id,
                     branch=names.get(row.branch_id, row.branch_id),
                     function=row.function_slug, hsts=row.hsts, owner=row.owner,
                     url=services.domains.url(row), created_at=row.created_at, status=checks)


async def _outs(services: ApiServices, rows: list[DomainRow], status: bool) -> list[DomainOut]:
    names = await _names(services)
    return list(await asyncio.gather(*(_out(services, r, names, status) for r in rows)))


def make_router(errors: Errors) -> APIRouter:
    """The routes; ``errors`` is the API's ``responses=`` helper (its error model)."""
    router = APIRouter(prefix="/api/v1", tags=["domains"])

    @router.get("/domains", responses=errors(400, 404), openapi_extra=READ)
    async def list_domains(services: Services,
                           branch: Annotated[str | None, Query(max_length=200)] = None,
                           status: bool = False) -> list[DomainOut]:
        """Every custom domain, or a branch's (``?branch=``)."""
        branch_id = (await services.branches.get(branch)).id if branch else None
        return await _outs(services, await services.domains.list_domains(branch_id), status)

    @router.post("/domains", status_code=201, responses=errors(400, 404, 409),
                 openapi_extra=DEPLOY)
    async def add_domain(services: Services, body: DomainIn) -> DomainOut:
        branch = await services.branches.get(body.branch or "main")
        row = await services.domains.add(body.hostname, branch, body.function,
                                         hsts=body.hsts)
        return await _out(services, row, {branch.id: branch.name}, True)

    @router.get("/domains/{hostname}", responses=errors(400, 404), openapi_extra=READ)
    async def get_domain(services: Services, hostname: Hostname) -> DomainOut:
        row = await services.domains.get(hostname)
        return await _out(services, row, await _names(services), True)

    @router.delete("/domains/{hostname}", responses=errors(400, 404),
                   openapi_extra=DEPLOY)
    async def remove_domain(services: Services, hostname: Hostname) -> DomainOut:
        """Stop serving it; answers what was removed."""
        row = await services.domains.remove(hostname)
        return await _out(services, row, await _names(services), False)

    @router.put("/branches/{ref}/domains", responses=errors(400, 404),
                openapi_extra=DEPLOY)
    async def replace_domains(services: Services,
                              branch: Annotated[BranchRow, Depends(_branch)],
                              body: DomainsIn) -> DomainsAppliedOut:
        """A project's domains on the branch become exactly these (``phloem deploy``)."""
        declared = {h: (d.function, d.hsts) for h, d in body.domains.items()}
        rows, skipped = await services.domains.replace(branch, declared, body.owner)
        names = await _names(services)
        return DomainsAppliedOut(
            domains=[await _out(services, r, names, False) for r in rows],
            skipped=[SkippedOut(hostname=r.hostname, branch_id=r.branch_id,
                                branch=names.get(r.branch_id, r.branch_id),
                                reason=f"belongs to branch {names.get(r.branch_id)}: a "
                                       "domain serves one branch and is not inherited")
                     for r in skipped])

    return router
