"""``/api/v1/keys``: create, list and revoke API keys (``admin``), and ``/keys/me``.

A key's secret is in the answer to its creation only (``secret``); it is stored as its
sha256 and never logged. Scopes: ``read``, ``deploy``, ``branches``, ``admin``,
``metrics`` (:mod:`phloem.control.scopes`); ``branches`` limits the key to those branches
(resolved to ids when the key is made); ``expires_in_s`` makes it stop working then
(401).

    app.include_router(make_router(errors))      # in create_api
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any

from fastapi import APIRouter, Path, Request
from pydantic import BaseModel, ConfigDict, Field

from phloem.control.errors import ApiError
from phloem.control.scopes import ADMIN, KeyAuthority, grant_of, needs
from phloem.metadata.keys import SCOPES, KeyRow
from phloem.metadata.store import BranchRow

#: Branch names (as ``POST /branches`` takes them) and ids.
BRANCH_REF = r"^[A-Za-z0-9._/-]{1,64}$"


class KeyIn(BaseModel):
    # An admin key manages the whole platform: it cannot be limited to branches (400).
    model_config = ConfigDict(strict=True, extra="forbid", json_schema_extra={"not": {
        "required": ["scopes", "branches"], "properties": {
            "scopes": {"contains": {"const": "admin"}}, "branches": {"type": "array"}}}})

    name: str = Field(pattern=r"^[A-Za-z0-9 ._:@/-]{1,64}$", description="what it is for")
    scopes: list[str] = Field(min_length=1, max_length=len(SCOPES), description=" / ".join(
        SCOPES), json_schema_extra={"items": {"enum": list(SCOPES)}})
    branches: list[Annotated[str, Field(pattern=BRANCH_REF)]] | None = Field(
        None, min_length=1, max_length=100, description="branch names or ids the key is "
        "limited to (not with admin); null: every branch")
    expires_in_s: float | None = Field(None, ge=1, le=10 * 366 * 86400, description=(
        "it stops working this many seconds from now; null: never"))


class KeyOut(BaseModel):
    id: str
    name: str
    scopes: list[str]
    branches: list[str] | None = Field(description="ids of the branches it is limited "
                                       "to; null: every branch")
    created_at: datetime
    expires_at: datetime | None
    revoked_at: datetime | None
    last_used_at: datetime | None = Field(description="noted at most once a minute")
    state: str = Field(description="active, expired or revoked")


class KeyCreatedOut(KeyOut):
    secret: str = Field(description="the key (phk_...): shown this once, never again")


def _out(row: KeyRow) -> KeyOut:
    return KeyOut(id=row.id, name=row.name, scopes=row.scopes, branches=row.branch_ids,
                  created_at=row.created_at, expires_at=row.expires_at,
                  revoked_at=row.revoked_at, last_used_at=row.last_used_at,
                  state=row.state(datetime.now(UTC)))


def _authority(request: Request) -> KeyAuthority:
    authority: KeyAuthority = request.app.state.keys
    return authority


KeyId = Annotated[str, Path(max_length=100, description="the key's id (key-...)")]
Errors = Callable[..., dict[int | str, dict[str, Any]]]


def make_router(errors: Errors) -> APIRouter:
    """The routes; ``errors`` is the API's ``responses=`` helper (its error model)."""
    router = APIRouter(prefix="/api/v1/keys", tags=["keys"])
    router.post("", status_code=201, responses=errors(400, 404),
                openapi_extra=ADMIN)(create_key)
    router.get("", openapi_extra=ADMIN)(list_keys)
    router.get("/me", responses=errors(404),
               openapi_extra=needs("key", any_branch=True))(my_key)
    router.delete("/{key_id}", responses=errors(400, 404, 409),
                  openapi_extra=ADMIN)(revoke_key)
    return router


async def create_key(body: KeyIn, request: Request) -> KeyCreatedOut:
    """Make a key; its ``secret`` is in this answer and nowhere else."""
    unknown = sorted(set(body.scopes) - set(SCOPES))
    if unknown:
        raise ApiError(400, "invalid_input", f"scopes: must each be one of "
                       f"{', '.join(SCOPES)} (got {', '.join(unknown)})", "scopes")
    branch_ids: list[str] | None = None
    if body.branches is not None:
        if "admin" in body.scopes:
            raise ApiError(400, "invalid_input", "branches: an admin key cannot be limited "
                           "to branches (admin manages keys and the whole platform)",
                           "branches")
        branches = request.app.state.services.branches
        rows: list[BranchRow] = [await branches.get(ref) for ref in body.branches]
        branch_ids = sorted({r.id for r in rows})
    expires = (datetime.now(UTC) + timedelta(seconds=body.expires_in_s)
               if body.expires_in_s is not None else None)
    made = await _authority(request).keys.create(body.name, body.scopes, branch_ids, expires)
    return KeyCreatedOut(**_out(made.row).model_dump(), secret=made.secret)


async def list_keys(request: Request) -> list[KeyOut]:
    """Every key, revoked and expired ones included, oldest first; never a secret."""
    return [_out(r) for r in await _authority(request).keys.list()]


async def my_key(request: Request) -> KeyOut:
    """The key this request was made with (any valid key may ask)."""
    authority = _authority(request)
    key_id = grant_of(request).key_id
    row = (await authority.keys.get(key_id) if key_id is not None
           else await authority.keys.find(authority.own_key))
    if row is None:  # the metrics token
        raise ApiError(404, "key_not_found", "this request was made with no api key")
    return _out(row)


async def revoke_key(key_id: KeyId, request: Request) -> KeyOut:
    """Revoke it: every request with it gets 401 from now on."""
    authority = _authority(request)
    row = await authority.keys.get(key_id)
    if row is None:
        raise ApiError(404, "key_not_found", f"key_id: no key {key_id}", "key_id")
    own = await authority.keys.find(authority.own_key)
    if own is not None and own.id == row.id:
        raise ApiError(409, "platform_key", f"key_id: {key_id} is the platform's own key "
                       "(credentials.json), which the local CLI uses", "key_id")
    revoked = await authority.keys.revoke(key_id)
    assert revoked is not None
    return _out(revoked)
