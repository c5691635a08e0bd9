"""``.../branches/{id}/databases``: the branch's one database.

    neon databases list --branch main
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from pydantic import BaseModel

from phloem.control.neon_v2.errors import NeonRoute, unsupported
from phloem.control.neon_v2.project import iso, project_of
from phloem.control.scopes import needs
from phloem.metadata.store import BranchRow

router = APIRouter(route_class=NeonRoute)

BRANCH_DATABASES = "/api/v2/projects/{project_id}/branches/{branch_id}/databases"


class Database(BaseModel):
    id: int = 1
    branch_id: str
    name: str
    owner_name: str
    created_at: str
    updated_at: str


class DatabasesOut(BaseModel):
    databases: list[Database]


def database_model(branch: BranchRow) -> Database:
    created = iso(branch.created_at) or ""
    return Database(branch_id=branch.id, name=branch.database, owner_name=branch.role,
                    created_at=created, updated_at=iso(branch.updated_at) or created)


@router.get(BRANCH_DATABASES, openapi_extra=needs("read"))
async def list_databases(request: Request, project_id: str,
                         branch_id: str) -> DatabasesOut:
    platform, _ = await project_of(request, project_id)
    branch = await platform.branches.get(branch_id.replace("%2F", "/"))
    return DatabasesOut(databases=[database_model(branch)])


@router.post(BRANCH_DATABASES, openapi_extra=needs("branches"))
async def create_database() -> None:
    raise unsupported("creating databases", "a phloem branch has one database, the one "
                      "its functions' DATABASE_URL names; create more with SQL")
