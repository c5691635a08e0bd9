"""``/users/me``, ``/users/me/organizations`` and ``/auth``: who the API key belongs to.

phloem's API keys belong to the platform, not to a person, so the caller is one fixed
user ``phloem`` in one organization, :data:`ORG_ID`, which owns the project (``neon
link`` picks the only organization, then the only project in it). ``neon me`` prints the
user; the CLI's start-up asks ``/auth`` for analytics.

    neon me --output json
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from pydantic import BaseModel

from phloem.control.neon_v2.errors import NeonError, NeonRoute
from phloem.control.scopes import needs

router = APIRouter(route_class=NeonRoute)

USER_ID = "phloem"
ORG_ID = "org-phloem"


class CurrentUser(BaseModel):
    id: str = USER_ID
    email: str = ""
    login: str = "phloem"
    name: str = "phloem"
    last_name: str = ""
    image: str = ""
    active_seconds_limit: int = 0
    projects_limit: int = 1
    branches_limit: int = 0
    max_autoscaling_limit: int = 0
    plan: str = "phloem"
    auth_accounts: list[dict[str, Any]] = []


class Organization(BaseModel):
    id: str = ORG_ID
    name: str = "phloem"
    handle: str = "phloem"
    plan: str = "phloem"
    managed_by: str = "phloem"
    created_at: str = "1970-01-01T00:00:00Z"
    updated_at: str = "1970-01-01T00:00:00Z"


class Organizations(BaseModel):
    organizations: list[Organization] = [Organization()]


class AuthDetails(BaseModel):
    account_id: str = USER_ID
    auth_method: str = "api_key_user"


@router.get("/api/v2/users/me", openapi_extra=needs("read", any_branch=True))
async def current_user() -> CurrentUser:
    return CurrentUser()


@router.get("/api/v2/users/me/organizations", openapi_extra=needs("read", any_branch=True))
async def current_user_organizations() -> Organizations:
    return Organizations()


@router.get("/api/v2/organizations/{org_id}", openapi_extra=needs("read", any_branch=True))
async def get_organization(org_id: str) -> Organization:
    if org_id != ORG_ID:
        raise NeonError(404, "NOT_FOUND", f"organization {org_id!r} not found: phloem's "
                        f"one organization is {ORG_ID!r}")
    return Organization()


@router.get("/api/v2/auth", openapi_extra=needs("read", any_branch=True))
async def auth_details() -> AuthDetails:
    return AuthDetails()
