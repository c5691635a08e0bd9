"""Every other ``/api/v2`` route: Neon's error shape saying phloem does not serve it.

Included last, so it only answers paths (and methods) no resource module serves: 400
with code ``NOT_SUPPORTED`` (:func:`~.errors.unsupported` says why not 501 or 404). The
CLI prints the message and exits 1.

    $ neon ip-allow list
    ERROR: GET /projects/phloem-.../...: not supported by phloem (...)
"""

from __future__ import annotations

from fastapi import APIRouter, Request

from phloem.control.neon_v2.errors import NeonRoute, unsupported
from phloem.control.scopes import needs

router = APIRouter(route_class=NeonRoute)

METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"]


@router.api_route("/api/v2", methods=METHODS, include_in_schema=False, openapi_extra=needs("read"))
@router.api_route("/api/v2/{rest:path}", methods=METHODS, include_in_schema=False,
                  openapi_extra=needs("read"))
async def not_supported(request: Request, rest: str = "") -> None:
    raise unsupported(f"{request.method} /{rest}", "phloem serves the part of the Neon "
                      "API that Neon's CLI uses for projects, branches, connection "
                      "strings and functions; see docs/neon-cli.md")
