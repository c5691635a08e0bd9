"""Neon's other branch services (object storage, triggers, custom domains, branch
credentials, Neon Auth, the Data API, the AI Gateway), which phloem does not have.

``neon config status|plan|apply``, ``neon deploy`` and ``neon env pull`` read them all to
compare a ``neon.ts`` with the branch, so reading answers what Neon answers for a branch
that has none: an empty list, or 404 for a service that is off. Changing one (a
``neon.ts`` that declares it) falls through to :mod:`.unsupported`.

    GET .../branches/{id}/buckets   -> {"buckets": []}
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from phloem.control.neon_v2.errors import NeonError, NeonRoute
from phloem.control.neon_v2.project import project_of
from phloem.control.scopes import needs

router = APIRouter(route_class=NeonRoute)

BRANCH = "/api/v2/projects/{project_id}/branches/{branch_id}"
#: Listing routes and the empty body of each.
EMPTY_LISTS: dict[str, dict[str, list[object]]] = {
    "buckets": {"buckets": []}, "triggers": {"triggers": []},
    "custom-domains": {"custom_domains": []}, "credentials": {"credentials": []}}
#: Single services whose absence Neon reports as 404, by path and name.
OFF = {"auth": "Neon Auth", "storage": "object storage", "ai_gateway": "the AI Gateway"}


async def _check(request: Request, project_id: str, branch_id: str) -> None:
    platform, _ = await project_of(request, project_id)
    await platform.branches.get(branch_id.replace("%2F", "/"))


def _add_list(resource: str) -> None:
    body = EMPTY_LISTS[resource]

    async def empty(request: Request, project_id: str, branch_id: str) -> JSONResponse:
        await _check(request, project_id, branch_id)
        return JSONResponse(body)

    router.add_api_route(f"{BRANCH}/{resource}", empty, methods=["GET"],
                         name=f"list_{resource}", openapi_extra=needs("read"))


def _add_off(resource: str) -> None:
    what = OFF[resource]

    async def off(request: Request, project_id: str, branch_id: str) -> None:
        await _check(request, project_id, branch_id)
        raise NeonError(404, "NOT_FOUND", f"{what} is not enabled on this branch: phloem "
                        "does not have it")

    router.add_api_route(f"{BRANCH}/{resource}", off, methods=["GET"], name=f"get_{resource}",
                         openapi_extra=needs("read"))


for _resource in EMPTY_LISTS:
    _add_list(_resource)
for _resource in OFF:
    _add_off(_resource)


@router.get(BRANCH + "/data-api/{database_name}", openapi_extra=needs("read"))
async def get_data_api(request: Request, project_id: str, branch_id: str,
                       database_name: str) -> None:
    await _check(request, project_id, branch_id)
    raise NeonError(404, "NOT_FOUND", "the Data API is not enabled on this branch: phloem "
                    "does not have it")
