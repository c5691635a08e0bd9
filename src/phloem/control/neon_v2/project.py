"""``/projects``: a phloem platform is one Neon project.

Its id and default branch live in the ``neon_project`` table (migration 7), so the id the
Neon CLI writes into a ``.neon`` context file stays valid across restarts. Every route
with a ``{project_id}`` goes through :func:`project_of`, which refuses other ids with
Neon's 404.

    neon projects list --api-host http://127.0.0.1:8788/api/v2
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, Request
from psycopg.rows import dict_row
from pydantic import BaseModel

from phloem.control.neon_v2.errors import NeonError, NeonRoute, unsupported
from phloem.control.neon_v2.users import ORG_ID
from phloem.control.scopes import needs

if TYPE_CHECKING:
    from phloem.control.services import ApiServices
    from phloem.metadata.store import BranchRow

router = APIRouter(route_class=NeonRoute)

#: Neon's fields that mean nothing here get these fixed values.
REGION = "phloem"
PG_VERSION = 18


def iso(value: datetime | None) -> str | None:
    """Neon's timestamps: ISO 8601 in UTC with a Z."""
    if value is None:
        return None
    return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def platform_of(request: Request) -> ApiServices:
    """The platform's services, as the v1 routes reach them."""
    platform: ApiServices = request.app.state.services
    return platform


@dataclass(frozen=True)
class ProjectRow:
    id: str
    name: str
    default_branch_id: str | None
    created_at: datetime


async def load_project(platform: ApiServices) -> ProjectRow:
    async with platform.store.pool.connection() as conn:
        cur = conn.cursor(row_factory=dict_row)
        await cur.execute("SELECT id, name, default_branch_id, created_at FROM neon_project")
        row = await cur.fetchone()
    if row is None:  # migration 7 inserts it; only a hand-edited database lacks it
        raise NeonError(500, "INTERNAL", "the neon_project row is missing")
    return ProjectRow(**row)


async def set_default_branch(platform: ApiServices, branch_id: str) -> None:
    async with platform.store.pool.connection() as conn:
        await conn.execute("UPDATE neon_project SET default_branch_id = %s", (branch_id,))


async def project_of(request: Request, project_id: str) -> tuple[ApiServices, ProjectRow]:
    """The platform and its project, or Neon's 404 when ``project_id`` is not ours."""
    platform = platform_of(request)
    project = await load_project(platform)
    if project_id != project.id:
        raise NeonError(404, "NOT_FOUND", f"project {project_id!r} not found: this phloem "
                        f"platform is the one project {project.id!r}")
    return platform, project


def is_default(project: ProjectRow, branch: BranchRow) -> bool:
    """The branch set with set-default, else the root branch (``main``)."""
    if project.default_branch_id is not None:
        return branch.id == project.default_branch_id
    return branch.parent_id is None


class Project(BaseModel):
    id: str
    platform_id: str = "phloem"
    region_id: str = REGION
    name: str
    provisioner: str = "phloem"
    pg_version: int = PG_VERSION
    proxy_host: str
    branch_logical_size_limit: int = 0
    branch_logical_size_limit_bytes: int = 0
    store_passwords: bool = True
    active_time: int = 0
    cpu_used_sec: int = 0
    creation_source: str = "phloem"
    history_retention_seconds: int = 0
    created_at: str
    updated_at: str
    owner_id: str = "phloem"
    org_id: str = ORG_ID
    settings: dict[str, Any] = {}


class ProjectsOut(BaseModel):
    projects: list[Project]
    pagination: dict[str, str] | None = None
    applications: dict[str, Any] = {}
    integrations: dict[str, Any] = {}


class ProjectOut(BaseModel):
    project: Project


def project_model(platform: ApiServices, project: ProjectRow) -> Project:
    created = iso(project.created_at) or ""
    return Project(id=project.id, name=project.name, proxy_host=platform.settings.domain,
                   created_at=created, updated_at=created)


@router.get("/api/v2/projects", openapi_extra=needs("read", any_branch=True))
async def list_projects(request: Request, cursor: str | None = None,
                        recoverable: bool = False) -> ProjectsOut:
    """The one project; a second page (``cursor`` set) and deleted projects are empty."""
    platform = platform_of(request)
    project = await load_project(platform)
    if cursor or recoverable:
        return ProjectsOut(projects=[])
    return ProjectsOut(projects=[project_model(platform, project)],
                       pagination={"cursor": project.id})


@router.get("/api/v2/projects/shared", openapi_extra=needs("read", any_branch=True))
async def list_shared_projects() -> ProjectsOut:
    return ProjectsOut(projects=[])


@router.get("/api/v2/projects/{project_id}", openapi_extra=needs("read", any_branch=True))
async def get_project(request: Request, project_id: str) -> ProjectOut:
    platform, project = await project_of(request, project_id)
    return ProjectOut(project=project_model(platform, project))


@router.post("/api/v2/projects", openapi_extra=needs("admin"))
async def create_project() -> None:
    raise unsupported("creating a project", "a phloem platform is one project; start "
                      "another `phloem up` with its own data dir for another")


@router.delete("/api/v2/projects/{project_id}", openapi_extra=needs("admin"))
async def delete_project() -> None:
    raise unsupported("deleting a project", "stop the platform and remove its data dir")
