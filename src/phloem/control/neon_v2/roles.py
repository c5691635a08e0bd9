"""``.../branches/{id}/roles``: the branch's owner role and its password.

A phloem branch has one login role for applications (the database's owner); its
superuser is the platform's own and is never shown. ``neon connection-string`` reads the
role list and reveals its password to build the URI.

    neon roles list --branch main
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from pydantic import BaseModel

from phloem.control.neon_v2.errors import NeonError, NeonRoute, unsupported
from phloem.control.neon_v2.project import iso, project_of
from phloem.control.scopes import needs
from phloem.metadata.store import BranchRow

router = APIRouter(route_class=NeonRoute)

BRANCH_ROLES = "/api/v2/projects/{project_id}/branches/{branch_id}/roles"


class Role(BaseModel):
    branch_id: str
    name: str
    protected: bool = False
    authentication_method: str = "password"
    created_at: str
    updated_at: str


class RolesOut(BaseModel):
    roles: list[Role]


class RoleOut(BaseModel):
    role: Role


class PasswordOut(BaseModel):
    password: str


def role_model(branch: BranchRow) -> Role:
    created = iso(branch.created_at) or ""
    return Role(branch_id=branch.id, name=branch.role, created_at=created,
                updated_at=iso(branch.updated_at) or created)


async def _branch_role(request: Request, project_id: str, branch_id: str,
                       role_name: str) -> BranchRow:
    platform, _ = await project_of(request, project_id)
    branch = await platform.branches.get(branch_id.replace("%2F", "/"))
    if role_name != branch.role:
        raise NeonError(404, "NOT_FOUND", f"role {role_name!r} not found on branch "
                        f"{branch.id!r} (its role is {branch.role!r})")
    return branch


@router.get(BRANCH_ROLES, openapi_extra=needs("read"))
async def list_roles(request: Request, project_id: str, branch_id: str) -> RolesOut:
    platform, _ = await project_of(request, project_id)
    branch = await platform.branches.get(branch_id.replace("%2F", "/"))
    return RolesOut(roles=[role_model(branch)])


@router.get(BRANCH_ROLES + "/{role_name}", openapi_extra=needs("read"))
async def get_role(request: Request, project_id: str, branch_id: str,
                   role_name: str) -> RoleOut:
    return RoleOut(role=role_model(await _branch_role(request, project_id, branch_id,
                                                      role_name)))


@router.get(BRANCH_ROLES + "/{role_name}/reveal_password", openapi_extra=needs("deploy"))
async def reveal_password(request: Request, project_id: str, branch_id: str,
                          role_name: str) -> PasswordOut:
    branch = await _branch_role(request, project_id, branch_id, role_name)
    return PasswordOut(password=branch.role_password)


@router.post(BRANCH_ROLES, openapi_extra=needs("branches"))
async def create_role() -> None:
    raise unsupported("creating roles", "a phloem branch has one application role; "
                      "create more with SQL (CREATE ROLE) through its connection string")
