"""``/users/me``, ``/users/me/organizations`` and ``/auth``: who the API key belongs to.

phloem's API keys belong to the platform, not to a person, so the caller is one fixed
user ``phloem`` with no organizations (the CLI then lists projects without an
``org_id``). ``neon me`` prints it; the CLI's start-up asks ``/auth`` for analytics.

    neon me --output json
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from pydantic import BaseModel

from phloem.control.neon_v2.errors import NeonRoute

router = APIRouter(route_class=NeonRoute)

USER_ID = "phloem"


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


class Organizations(BaseModel):
    organizations: list[dict[str, Any]] = []


class AuthDetails(BaseModel):
    account_id: str = USER_ID
    auth_method: str = "api_key_user"


@router.get("/api/v2/users/me")
async def current_user() -> CurrentUser:
    return CurrentUser()


@router.get("/api/v2/users/me/organizations")
async def current_user_organizations() -> Organizations:
    return Organizations()


@router.get("/api/v2/auth")
async def auth_details() -> AuthDetails:
    return AuthDetails()
