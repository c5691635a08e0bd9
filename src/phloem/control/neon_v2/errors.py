"""Neon's error shape for ``/api/v2``: ``{"code": ..., "message": ...}`` with the status.

The v1 handlers of the app answer ``{"error": {...}}``; every ``/api/v2`` route is a
:class:`NeonRoute`, which turns the platform's exceptions into Neon's shape before they
reach them, so the Neon CLI prints the message itself (it reads ``message``).

    raise NeonError(404, "NOT_FOUND", "branch 'x' not found")
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException as StarletteHTTPException

from phloem.branches.manager import BranchError
from phloem.control.deployer import NotFound
from phloem.system.validation import InvalidInput

#: Said by every route phloem does not serve, so a user knows it is not a typo of theirs.
UNSUPPORTED = "not supported by phloem"


class NeonError(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


def unsupported(what: str, why: str = "") -> NeonError:
    """400 ``NOT_SUPPORTED`` for something the Neon API has and phloem has not: ``<what>:
    not supported by phloem (<why>)``. Not 501: Neon's clients take any 5xx for a passing
    outage (``neon functions deploy`` polls on through it, the config runtime calls it
    transient), and not 404, which they read as "no such object"."""
    reason = f" ({why})" if why else ""
    return NeonError(400, "NOT_SUPPORTED", f"{what}: {UNSUPPORTED}{reason}")


def neon_body(code: str, message: str) -> dict[str, Any]:
    return {"code": code, "message": message}


def neon_response(status: int, code: str, message: str) -> JSONResponse:
    return JSONResponse(neon_body(code, message), status)


def _translate(exc: Exception) -> JSONResponse | None:
    if isinstance(exc, NeonError):
        return neon_response(exc.status, exc.code, exc.message)
    if isinstance(exc, BranchError):
        return neon_response(exc.status, exc.code, exc.message)
    if isinstance(exc, NotFound):
        return neon_response(404, f"{exc.what}_not_found", str(exc))
    if isinstance(exc, InvalidInput):
        return neon_response(400, "invalid_input", str(exc))
    if isinstance(exc, RequestValidationError):
        first: dict[str, Any] = dict(exc.errors()[0]) if exc.errors() else {}
        loc = ".".join(str(p) for p in first.get("loc", ()) if p not in ("body", "path",
                                                                          "query"))
        return neon_response(400, "invalid_input",
                             f"{loc or 'request'}: {first.get('msg', 'invalid request')}")
    if isinstance(exc, StarletteHTTPException):
        return neon_response(exc.status_code, "http_error", str(exc.detail))
    return None


class NeonRoute(APIRoute):
    """A route whose errors are Neon's shape (validation errors included: FastAPI raises
    them inside the handler this wraps), and whose bodies leave out fields that are None,
    as Neon's do (its clients' schemas take an absent optional field, not null)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs["response_model_exclude_none"] = True
        super().__init__(*args, **kwargs)

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def neon_handler(request: Request) -> Response:
            try:
                return await handler(request)
            except Exception as exc:
                response = _translate(exc)
                if response is None:
                    raise
                return response

        return neon_handler
