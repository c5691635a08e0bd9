"""``/api/v2``: the part of the Neon API v2 that Neon's own CLI (``neon``) calls.

A second face of the same control plane: a branch or function made here is the one
``phloem branches list`` shows, and the other way round. One module per resource, each
with pydantic models in Neon's shapes; errors are Neon's ``{"code", "message"}``
(:mod:`.errors`), and every route phloem does not serve answers 400 ``NOT_SUPPORTED``
saying so
(:mod:`.unsupported`). Auth is the v1 API's: ``Authorization: Bearer <phloem API key>``.

    app.include_router(neon_v2.router, include_in_schema=False)   # in create_api

    NEON_API_HOST=http://127.0.0.1:8788/api/v2 NEON_API_KEY=phk_... neon branches list
"""

from __future__ import annotations

from fastapi import APIRouter

from phloem.control.neon_v2 import (
    branches,
    databases,
    endpoints,
    functions,
    project,
    roles,
    services,
    unsupported,
    users,
)
from phloem.control.neon_v2.errors import neon_body

PREFIX = "/api/v2"


def serves(path: str) -> bool:
    """Whether ``path`` is this face's, so the API's guard answers its 401/413 in Neon's
    error shape."""
    return path == PREFIX or path.startswith(PREFIX + "/")


router = APIRouter()
for _module in (users, project, branches, endpoints, databases, roles, functions,
                services):
    router.include_router(_module.router)
router.include_router(unsupported.router)  # last: only what nothing else serves

__all__ = ["neon_body", "router", "serves"]
