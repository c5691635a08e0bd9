"""What each API route needs of a key, declared where the route is, and what a key may do.

Every route of the control API says which scope it needs, in its decorator:

    @app.get("/api/v1/branches", openapi_extra=READ)
    @app.post("/api/v1/branches", openapi_extra=BRANCHES)

(``x-phloem-scope`` in the OpenAPI document; :func:`check_declared` refuses to build an
app with a route that says nothing). :class:`~phloem.control.guard.RequestGuard` finds the
route a request goes to (:func:`requirement`) before a byte of its body is read, and
answers 403 ``forbidden_scope`` naming the scope needed, or ``forbidden_branch`` for a key
limited to other branches. ``admin`` includes every scope; ``deploy`` and ``branches``
include ``read`` (what a key may change it may see).

A branch-restricted key reaches a route with a branch in its path (``{ref}``,
``{branch_id}``) only for its own branches; any other route is platform-wide and refused
to it, unless the route is declared ``any_branch`` (it limits what it shows to the key's
branches itself, or touches no branch: artifact uploads, env digests).
"""

from __future__ import annotations

import hmac
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import psycopg
from fastapi import Request
from fastapi.routing import APIRoute
from starlette.routing import BaseRoute, Match
from starlette.types import Scope

from phloem.metadata.keys import SCOPES, ApiKeys
from phloem.metadata.store import Store

SCOPE_FIELD = "x-phloem-scope"
ANY_BRANCH_FIELD = "x-phloem-any-branch"
#: Pseudo-scopes a route may declare besides :data:`SCOPES`: no key at all, or any key.
PUBLIC, ANY_KEY = "public", "key"
#: Path parameters that name a branch (the v1 API's and Neon's v2).
BRANCH_PARAMS = ("ref", "branch_id")
#: ``last_used_at`` is written at most this often per key (not once per request).
TOUCH_EVERY_S = 60.0
#: Key of the request's :class:`Grant` in the ASGI scope.
GRANT_KEY = "phloem.grant"

logger = logging.getLogger("phloem.api")


def needs(scope: str, *, any_branch: bool = False) -> dict[str, Any]:
    """``openapi_extra`` of a route that needs ``scope``."""
    if scope not in (*SCOPES, PUBLIC, ANY_KEY):
        raise ValueError(f"scope: must be one of {', '.join(SCOPES)} (got {scope!r})")
    return {SCOPE_FIELD: scope, **({ANY_BRANCH_FIELD: True} if any_branch else {})}


READ, DEPLOY, BRANCHES = needs("read"), needs("deploy"), needs("branches")
ADMIN, METRICS, PUBLIC_ROUTE = needs("admin"), needs("metrics"), needs(PUBLIC)


@dataclass(frozen=True)
class Grant:
    """What the request's key may do."""

    #: The key's id; None for the platform's own key (credentials.json's) and the
    #: metrics token.
    key_id: str | None
    scopes: frozenset[str]
    #: The branch ids it is limited to; None: every branch.
    branch_ids: frozenset[str] | None = None

    def allows(self, scope: str) -> bool:
        if scope in (PUBLIC, ANY_KEY) or "admin" in self.scopes or scope in self.scopes:
            return True
        return scope == "read" and bool(self.scopes & {"deploy", "branches"})

    def sees(self, branch_id: str) -> bool:
        return self.branch_ids is None or branch_id in self.branch_ids


ADMIN_GRANT = Grant(None, frozenset({"admin"}))
METRICS_GRANT = Grant(None, frozenset({"metrics"}))


def grant_of(request: Request) -> Grant:
    """The grant the guard attached to ``request`` (admin when none: a test app)."""
    grant: Grant = request.scope.get(GRANT_KEY, ADMIN_GRANT)
    return grant


@dataclass(frozen=True)
class Requirement:
    scope: str
    any_branch: bool
    #: The value of the route's branch path parameter, if it has one.
    branch_ref: str | None


def route_table(routes: Sequence[BaseRoute]) -> list[BaseRoute]:
    """The app's routes in the order it matches them, with included routers' routes in
    their place (FastAPI keeps an included router as one route that dispatches itself).
    Our routers are included without a prefix, so each route's own path is the one it
    serves; one included with a prefix is refused rather than matched wrongly."""
    table: list[BaseRoute] = []
    for route in routes:
        contexts = getattr(route, "effective_route_contexts", None)
        if contexts is None:
            table.append(route)
            continue
        if route.include_context.prefix:  # type: ignore[attr-defined]
            raise RuntimeError("include_router(prefix=...): put the prefix on the "
                               "APIRouter itself (the scope table matches route paths)")
        table.extend(c.original_route for c in contexts())
    return table


def requirement(routes: Sequence[BaseRoute], scope: Scope) -> Requirement | None:
    """What the route ``scope`` goes to needs; None when no route takes it (a 404/405
    follows) or it is not one of the API's own (the docs)."""
    for route in routes:
        match, child = route.matches(scope)
        if match != Match.FULL:
            continue
        if not isinstance(route, APIRoute):
            return None
        extra = route.openapi_extra or {}
        params: dict[str, Any] = child.get("path_params", {})
        ref = next((str(params[p]) for p in BRANCH_PARAMS if p in params), None)
        return Requirement(extra.get(SCOPE_FIELD, "admin"), bool(extra.get(ANY_BRANCH_FIELD)),
                           ref.replace("%2F", "/") if ref is not None else None)
    return None


def undeclared(routes: Sequence[BaseRoute]) -> list[str]:
    """``METHOD path`` of every API route that declares no scope."""
    return [f"{','.join(sorted(r.methods or ()))} {r.path}" for r in routes
            if isinstance(r, APIRoute) and SCOPE_FIELD not in (r.openapi_extra or {})]


def check_declared(routes: Sequence[BaseRoute]) -> None:
    """Refuse an app with a route that does not say which scope it needs (``routes``:
    a :func:`route_table`)."""
    missing = undeclared(routes)
    if missing:
        raise RuntimeError(f"routes without a scope (openapi_extra=needs(...)): {missing}")


def document_scopes(doc: dict[str, Any]) -> None:
    """The bearer scheme's description lists the scopes; each operation's security
    requirement names the one it needs (OpenAPI 3.1 allows roles for any scheme)."""
    doc["components"]["securitySchemes"]["apiKey"]["description"] = (
        "an API key (phk_...), from credentials.json or `phloem keys create`. Scopes: "
        "read (GET routes), deploy (functions, deployments, env, artifacts, triggers), "
        "branches (create, reset, delete branches), admin (keys, backups, status; includes "
        "every scope), metrics (/metrics). deploy and branches include read. A key limited "
        "to some branches sees and changes only those; platform-wide routes refuse it. The "
        "scope an operation needs is its x-phloem-scope (403 forbidden_scope without it).")
    for operations in doc["paths"].values():
        for op in operations.values():
            scope = op.get(SCOPE_FIELD)
            if scope in SCOPES and "security" in op:
                op["security"] = [{"apiKey": [scope]}]


class KeyAuthority:
    """Checks keys for the guard: the platform's own key in memory, others in the
    ``api_keys`` table, each use noted at most every :data:`TOUCH_EVERY_S`."""

    def __init__(self, own_key: str, keys: ApiKeys, store: Store) -> None:
        self.own_key = own_key
        self.keys = keys
        self.store = store
        self._touched: dict[str, float] = {}

    async def authenticate(self, secret: str) -> Grant | str:
        """The key's grant, or why it is refused (never naming the secret)."""
        if hmac.compare_digest(secret.encode(), self.own_key.encode()):
            return ADMIN_GRANT
        row = await self.keys.find(secret)
        if row is None:
            return "invalid api key"
        now = datetime.now(UTC)
        state = row.state(now)
        if state == "revoked":
            return f"api key {row.id} ({row.name}) was revoked at {_utc(row.revoked_at)}"
        if state == "expired":
            return f"api key {row.id} ({row.name}) expired at {_utc(row.expires_at)}"
        await self._touch(row.id, row.last_used_at, now)
        branches = frozenset(row.branch_ids) if row.branch_ids is not None else None
        return Grant(row.id, frozenset(row.scopes), branches)

    async def _touch(self, key_id: str, last: datetime | None, now: datetime) -> None:
        mono = time.monotonic()
        previous = self._touched.get(key_id)
        if previous is not None and mono - previous < TOUCH_EVERY_S:
            return
        self._touched[key_id] = mono
        if previous is None and last is not None and (now - last).total_seconds() < TOUCH_EVERY_S:
            return  # written a moment ago (by this platform's previous run)
        try:
            await self.keys.touch(key_id, now)
        except psycopg.Error as exc:  # a missed note is no reason to refuse the request
            logger.warning("api key %s: could not record its use: %s", key_id, exc)

    async def branch_id(self, ref: str) -> str | None:
        """The id of the branch ``ref`` (id or name) names, None if none does."""
        row = await self.store.get_branch(ref)
        return row.id if row is not None else None


def _utc(when: datetime | None) -> str:
    return f"{when.astimezone(UTC):%Y-%m-%dT%H:%M:%SZ}" if when is not None else "?"
