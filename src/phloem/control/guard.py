"""The control API's front door, as ASGI middleware: the key (or the metrics token) and
the scope the route needs (:mod:`phloem.control.scopes`) are checked before a byte of a
body is read, and bodies are capped (413), so anyone who can reach the port cannot make
the platform buffer what it sends.

    app = RequestGuard(fastapi_app, authority, lambda scope: requirement(routes, scope),
                       metrics_token=token)

401 ``unauthorized``: no key, an unknown one, an expired or revoked one (the message
says which, never the secret). 403 ``forbidden_scope``: the key lacks the scope the route
needs (named in the message); 403 ``forbidden_branch``: the key is limited to other
branches.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable
from typing import Protocol

from fastapi import HTTPException
from fastapi.responses import JSONResponse
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from phloem.control import neon_v2
from phloem.control.artifacts import MAX_ARTIFACT_BYTES
from phloem.control.errors import error_body
from phloem.control.neon_v2 import functions as neon_functions
from phloem.control.scopes import ANY_KEY, GRANT_KEY, METRICS_GRANT, Grant, Requirement

#: Cap of every JSON body (and of any body sent to a route that takes none). The largest
#: valid one is a deploy: env values up to 64 KiB in all (``MAX_ENV_BYTES``), which JSON
#: escaping can make 6x larger (``\u0000``-style), plus up to 1000 names and the limits:
#: under 1 MiB. Parsing 1 MiB of JSON costs a few MiB at most.
MAX_JSON_BODY_BYTES = 1024 * 1024
#: Paths anyone may request: the health probe and the API's own description.
PUBLIC_PATHS = frozenset({"/api/v1/health", "/api/v1/openapi.json", "/api/v1/docs",
                          "/api/v1/docs/oauth2-redirect"})
ARTIFACTS_PREFIX = "/api/v1/artifacts/"


def body_cap(method: str, path: str) -> int:
    """The most bytes of body ``method path`` accepts (413 beyond)."""
    if method == "PUT" and path.startswith(ARTIFACTS_PREFIX):
        return MAX_ARTIFACT_BYTES
    if neon_functions.is_bundle_upload(method, path):
        return neon_functions.MAX_BUNDLE_BYTES
    return MAX_JSON_BODY_BYTES


class BodyTooLarge(HTTPException):
    """Raised from ``receive`` when a body passes its cap while it streams in. An
    ``HTTPException`` so that FastAPI's body parsing lets it through unchanged."""

    def __init__(self, cap: int) -> None:
        super().__init__(413, f"request body: larger than this route's cap of {cap} bytes")


class Authority(Protocol):
    """Checks keys (``phloem.control.scopes.KeyAuthority`` is one)."""

    async def authenticate(self, secret: str) -> Grant | str: ...

    async def branch_id(self, ref: str) -> str | None: ...


class RequestGuard:
    """In front of the whole app: refuse a request without a valid key, or with a body
    over its cap, before any of the body is read; count a body without Content-Length
    (chunked) as it streams. A response sent while the body is still unread closes the
    connection (``Connection: close``), so the rest is never read either."""

    def __init__(self, app: ASGIApp, authority: Authority,
                 requirement: Callable[[Scope], Requirement | None],
                 metrics_token: str | None) -> None:
        self.app = app
        self.authority = authority
        self.requirement = requirement
        self.metrics_token = metrics_token

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        length = headers.get("content-length")
        # Without Content-Length or chunked framing a request has no body (RFC 9112 6.3).
        body_done = length in (None, "0") and "transfer-encoding" not in headers
        started = False

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                if not body_done:
                    kept = [(k, v) for k, v in message.get("headers", [])
                            if k.lower() != b"connection"]
                    message = {**message, "headers": [*kept, (b"connection", b"close")]}
            await send(message)

        path, method = scope["path"], scope["method"]
        if path not in PUBLIC_PATHS:
            grant = await self._grant(path, headers.get("authorization", ""))
            if isinstance(grant, str):
                await _error_response(guarded_send, 401, "unauthorized", grant,
                                      {"www-authenticate": "Bearer"}, path)
                return
            forbidden = await self._forbidden(grant, scope)
            if forbidden is not None:
                await _error_response(guarded_send, 403, *forbidden, path=path)
                return
            scope[GRANT_KEY] = grant
        cap = body_cap(method, path)
        if length is not None and length.isdigit() and int(length) > cap:
            await _error_response(guarded_send, 413, "payload_too_large",
                                  BodyTooLarge(cap).detail, path=path)
            return
        received = 0

        async def counted_receive() -> Message:
            nonlocal received, body_done
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > cap:
                    raise BodyTooLarge(cap)
                if not message.get("more_body", False):
                    body_done = True
            return message

        try:
            await self.app(scope, counted_receive, guarded_send)
        except BodyTooLarge as exc:
            if started:
                raise
            await _error_response(guarded_send, 413, "payload_too_large", exc.detail,
                                  path=path)

    async def _grant(self, path: str, header: str) -> Grant | str:
        """What the request's key may do, or why it is refused (401)."""
        what = "api key or metrics token" if path == "/metrics" else "api key"
        scheme, _, key = header.partition(" ")
        key = key.strip()
        if scheme.lower() != "bearer" or not key:
            return f"missing 'Authorization: Bearer <{what}>'"
        if path == "/metrics" and self.metrics_token and hmac.compare_digest(
                key.encode(), self.metrics_token.encode()):
            return METRICS_GRANT
        grant = await self.authority.authenticate(key)
        if grant == "invalid api key":
            return f"invalid {what}"
        return grant

    async def _forbidden(self, grant: Grant, scope: Scope) -> tuple[str, str] | None:
        """(code, message) of a 403, or None: the key may make this request."""
        need = self.requirement(scope)
        if need is None:
            return None  # no such route: its 404/405 follows
        route = f"{scope['method']} {scope['path']}"
        if not grant.allows(need.scope):
            have = ", ".join(sorted(grant.scopes))
            return ("forbidden_scope", f"{route} needs an api key with scope "
                    f"'{need.scope}' (this key has: {have})")
        if grant.branch_ids is None or need.scope == ANY_KEY:
            return None
        limited = f"this api key is limited to branches {', '.join(sorted(grant.branch_ids))}"
        if need.branch_ref is not None:
            branch_id = await self.authority.branch_id(need.branch_ref)
            if branch_id is None or grant.sees(branch_id):
                return None  # a branch that does not exist gets the route's 404
            return ("forbidden_branch", f"branch {need.branch_ref}: {limited}")
        if need.any_branch:
            return None
        return ("forbidden_branch", f"{route} is platform-wide: {limited}")


async def _error_response(send: Send, status: int, code: str, message: str,
                          headers: dict[str, str] | None = None, path: str = "") -> None:
    # What Response.__call__ sends, without a scope or receive it does not use.
    body = (neon_v2.neon_body(code, message) if neon_v2.serves(path)
            else error_body(code, message))
    response = JSONResponse(body, status, headers=headers)
    await send({"type": "http.response.start", "status": status,
                "headers": response.raw_headers})
    await send({"type": "http.response.body", "body": response.body})


# -- schemas -----------------------------------------------------------------
#: Request bodies: JSON types as declared (no "0" for false) and no unknown fields, so a
#: misspelled option is an error naming it instead of silently ignored.
