"""``/api/v1/ai/usage``: what the AI Gateway counted, per branch, function, provider and
model (``phloem ai usage``).

    app.include_router(make_router(errors))      # in create_api
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from pydantic import BaseModel, Field

from phloem.control.scopes import READ
from phloem.control.services import ApiServices
from phloem.metadata.ai_gateway import AiGatewayStore


class UsageOut(BaseModel):
    branch_id: str
    function: str = Field(description="the calling function's slug; '' for the "
                          "branch-wide token")
    provider: str = Field(description="openai or anthropic")
    model: str = Field(description="as the request named it ('' if none)")
    requests: int
    errors: int = Field(description="requests answered with a status >= 400 or cut short")
    input_tokens: int
    output_tokens: int
    first_at: datetime
    last_at: datetime


Errors = Callable[..., dict[int | str, dict[str, Any]]]


def make_router(errors: Errors) -> APIRouter:
    """The route; ``errors`` is the API's ``responses=`` helper (its error model)."""
    router = APIRouter(prefix="/api/v1/ai", tags=["ai"])

    @router.get("/usage", responses=errors(400, 404), openapi_extra=READ)
    async def ai_usage(request: Request, branch: Annotated[str | None, Query(
            max_length=200, description="a branch's name or id; all branches if "
            "left out")] = None) -> list[UsageOut]:
        services: ApiServices = request.app.state.services
        branch_id = (await services.branches.get(branch)).id if branch else None
        rows = await AiGatewayStore(services.store.pool, services.store.box).usage(branch_id)
        return [UsageOut(branch_id=r.branch_id, function=r.function_slug,
                         provider=r.provider, model=r.model, requests=r.requests,
                         errors=r.errors, input_tokens=r.input_tokens,
                         output_tokens=r.output_tokens, first_at=r.first_at,
                         last_at=r.last_at) for r in rows]

    return router
