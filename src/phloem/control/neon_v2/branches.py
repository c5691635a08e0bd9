"""``/projects/{id}/branches``: phloem's branches, the same rows ``phloem branches`` shows.

Create, reset, delete go through the platform's :class:`BranchManager` (with the same
deployer hooks as ``/api/v1``); rename and set-default change the name column and the
project's default. A ``{branch_id}`` in a path may be an id or a name. What phloem's
branches cannot be (point-in-time parents, schema-only, expiring or protected branches,
read-only computes) is refused with Neon's error shape, naming it.

    neon branches create --name preview --output json
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, Request
from psycopg import errors as pg_errors
from pydantic import BaseModel, ConfigDict

from phloem.branches.manager import BRANCH_NAME_RE
from phloem.control.neon_v2.databases import Database, database_model
from phloem.control.neon_v2.endpoints import Endpoint, endpoint_model, remove_socket_dirs
from phloem.control.neon_v2.errors import NeonError, NeonRoute, unsupported
from phloem.control.neon_v2.project import (
    ProjectRow,
    is_default,
    iso,
    load_project,
    project_of,
    set_default_branch,
)
from phloem.control.neon_v2.roles import Role, role_model
from phloem.control.scopes import grant_of, needs
from phloem.metadata.store import BranchRow

if TYPE_CHECKING:
    from phloem.control.services import ApiServices

router = APIRouter(route_class=NeonRoute)

BRANCHES = "/api/v2/projects/{project_id}/branches"
BRANCH = BRANCHES + "/{branch_id}"
#: Request bodies: Neon's clients send fields phloem has no use for; unknown ones are
#: ignored, the ones that would change the result are refused by name below.
LENIENT = ConfigDict(extra="ignore")


class Branch(BaseModel):
    id: str
    project_id: str
    parent_id: str | None = None
    name: str
    current_state: str
    state_changed_at: str
    creation_source: str = "phloem"
    primary: bool
    default: bool
    protected: bool = False
    cpu_used_sec: int = 0
    compute_time_seconds: int = 0
    active_time_seconds: int = 0
    written_data_bytes: int = 0
    data_transfer_bytes: int = 0
    created_at: str
    updated_at: str


class ConnectionParameters(BaseModel):
    database: str
    password: str
    role: str
    host: str
    pooler_host: str


class ConnectionDetails(BaseModel):
    connection_uri: str
    connection_parameters: ConnectionParameters


class BranchOut(BaseModel):
    branch: Branch
    operations: list[dict[str, Any]] = []


class BranchesOut(BaseModel):
    branches: list[Branch]
    annotations: dict[str, Any] = {}
    pagination: dict[str, str] = {}


class BranchCreatedOut(BaseModel):
    branch: Branch
    endpoints: list[Endpoint]
    operations: list[dict[str, Any]] = []
    roles: list[Role]
    databases: list[Database]
    connection_uris: list[ConnectionDetails]


class BranchSpec(BaseModel):
    model_config = LENIENT

    name: str | None = None
    parent_id: str | None = None
    parent_lsn: str | None = None
    parent_timestamp: str | None = None
    init_source: str | None = None
    expires_at: str | None = None
    protected: bool | None = None
    archived: bool | None = None


class EndpointSpec(BaseModel):
    model_config = LENIENT

    type: str = "read_write"


class BranchCreateIn(BaseModel):
    model_config = LENIENT

    branch: BranchSpec | None = None
    endpoints: list[EndpointSpec] | None = None


class BranchUpdateIn(BaseModel):
    model_config = LENIENT

    branch: BranchSpec


class BranchRestoreIn(BaseModel):
    model_config = LENIENT

    source_branch_id: str
    source_lsn: str | None = None
    source_timestamp: str | None = None
    preserve_under_name: str | None = None


def branch_model(project: ProjectRow, b: BranchRow) -> Branch:
    created = iso(b.created_at) or ""
    updated = iso(b.updated_at) or created
    return Branch(id=b.id, project_id=project.id, parent_id=b.parent_id, name=b.name,
                  current_state="ready" if b.state == "ready" else "init",
                  state_changed_at=updated, primary=is_default(project, b),
                  default=is_default(project, b), created_at=created, updated_at=updated)


def connection_details(platform: ApiServices, b: BranchRow) -> list[ConnectionDetails]:
    urls = platform.branches.connection_strings(b)
    host = urls.unpooled.rsplit("@", 1)[1].split("/", 1)[0]
    pooler_host = urls.pooled.rsplit("@", 1)[1].split("/", 1)[0]
    return [ConnectionDetails(connection_uri=urls.unpooled, connection_parameters=(
        ConnectionParameters(database=b.database, password=b.role_password, role=b.role,
                             host=host, pooler_host=pooler_host)))]


async def branch_of(platform: ApiServices, ref: str) -> BranchRow:
    return await platform.branches.get(ref.replace("%2F", "/"))


@router.get(BRANCHES, openapi_extra=needs("read", any_branch=True))
async def list_branches(request: Request, project_id: str) -> BranchesOut:
    """Every branch (a branch-limited key's only) in one page (no ``pagination.next``)."""
    platform, project = await project_of(request, project_id)
    rows = await platform.store.list_branches()
    grant = grant_of(request)
    return BranchesOut(branches=[branch_model(project, b) for b in rows if grant.sees(b.id)])


@router.get(BRANCH, openapi_extra=needs("read"))
async def get_branch(request: Request, project_id: str, branch_id: str) -> BranchOut:
    platform, project = await project_of(request, project_id)
    return BranchOut(branch=branch_model(project, await branch_of(platform, branch_id)))


@router.post(BRANCHES, status_code=201, openapi_extra=needs("branches"))
async def create_branch(request: Request, project_id: str,
                        body: BranchCreateIn | None = None) -> BranchCreatedOut:
    platform, project = await project_of(request, project_id)
    spec = body.branch if body and body.branch else BranchSpec()
    for field, why in (("parent_lsn", "branches are made from the parent's current state"),
                       ("parent_timestamp", "branches are made from the parent's current "
                                            "state"),
                       ("expires_at", "branches do not expire")):
        if getattr(spec, field) is not None:
            raise unsupported(f"branch.{field}", why)
    if spec.init_source not in (None, "parent-data"):
        raise unsupported(f"branch.init_source={spec.init_source!r}",
                          "a branch is a copy of its parent's data")
    if spec.protected:
        raise unsupported("branch.protected", "phloem has no protected branches")
    if body is not None and any(e.type != "read_write" for e in body.endpoints or []):
        raise unsupported("read_only endpoints", "each branch has one read-write "
                          "PostgreSQL")
    parent = spec.parent_id
    if parent is None and project.default_branch_id is not None:
        parent = project.default_branch_id
    row = await platform.branches.create(spec.name, parent)
    if row.parent_id is not None:  # as /api/v1: its parent's triggers, disabled
        await platform.triggers.store.copy_disabled(row.parent_id, row.id)
    return BranchCreatedOut(
        branch=branch_model(project, row),
        endpoints=[endpoint_model(platform, project.id, row)],
        roles=[role_model(row)], databases=[database_model(row)],
        connection_uris=connection_details(platform, row))


@router.delete(BRANCH, openapi_extra=needs("branches"))
async def delete_branch(request: Request, project_id: str, branch_id: str) -> BranchOut:
    platform, project = await project_of(request, project_id)
    row = await branch_of(platform, branch_id)
    if is_default(project, row):
        raise NeonError(409, "CONFLICT", f"branch {row.name!r} is the project's default "
                        "branch and cannot be deleted")
    await platform.branches.delete(row.id, False, platform.deployer.drop_branch)
    remove_socket_dirs(platform, row.id)
    return BranchOut(branch=branch_model(project, row))


@router.patch(BRANCH, openapi_extra=needs("branches"))
async def update_branch(request: Request, project_id: str, branch_id: str,
                        body: BranchUpdateIn) -> BranchOut:
    """Rename (the only change phloem's branches take)."""
    platform, project = await project_of(request, project_id)
    row = await branch_of(platform, branch_id)
    spec = body.branch
    if spec.protected or spec.expires_at is not None:
        raise unsupported("branch.protected and branch.expires_at",
                          "phloem has no protected or expiring branches")
    if spec.name is None or spec.name == row.name:
        return BranchOut(branch=branch_model(project, row))
    if not BRANCH_NAME_RE.match(spec.name):
        raise NeonError(400, "invalid_input", "branch.name: must match "
                        f"[A-Za-z0-9._/-]{{1,64}} (got {spec.name!r})")
    if row.parent_id is None:
        raise NeonError(409, "CONFLICT", f"branch {row.name!r} is phloem's root branch; "
                        "its name stays 'main' (phloem's CLI and start-up find it by it)")
    try:
        async with platform.store.pool.connection() as conn:
            await conn.execute("UPDATE branches SET name = %s, updated_at = now() "
                               "WHERE id = %s", (spec.name, row.id))
    except pg_errors.UniqueViolation:
        raise NeonError(409, "CONFLICT", f"branch.name: a branch named {spec.name!r} "
                        "exists") from None
    return BranchOut(branch=branch_model(project, await branch_of(platform, row.id)))


@router.post(BRANCH + "/restore", openapi_extra=needs("branches"))
async def restore_branch(request: Request, project_id: str, branch_id: str,
                         body: BranchRestoreIn) -> BranchOut:
    """``neon branches reset --parent``: a reset from the parent, the only restore
    phloem has (same id, name, URLs and credentials)."""
    platform, project = await project_of(request, project_id)
    row = await branch_of(platform, branch_id)
    if (body.source_lsn or body.source_timestamp or body.preserve_under_name
            or body.source_branch_id != row.parent_id):
        raise unsupported("restoring a branch to anything but its parent's current "
                          "state", "phloem keeps no history; `neon branches reset "
                          "--parent` works")
    reset = await platform.branches.reset(row.id, platform.deployer.restart_branch)
    return BranchOut(branch=branch_model(project, reset))


@router.post(BRANCH + "/set_as_default", openapi_extra=needs("branches"))
async def set_default(request: Request, project_id: str, branch_id: str) -> BranchOut:
    platform, _ = await project_of(request, project_id)
    row = await branch_of(platform, branch_id)
    await set_default_branch(platform, row.id)
    return BranchOut(branch=branch_model(await load_project(platform), row))
