"""The control API's front door, as ASGI middleware: the key (or the metrics token) is
checked before a byte of a body is read, and bodies are capped (413), so anyone who can
reach the port cannot make the platform buffer what it sends.

    app = RequestGuard(fastapi_app, key_valid, metrics_token=token)
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable

from fastapi import HTTPException
from fastapi.responses import JSONResponse
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from phloem.control import neon_v2
from phloem.control.artifacts import MAX_ARTIFACT_BYTES
from phloem.control.errors import error_body
from phloem.control.neon_v2 import functions as neon_functions

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


class RequestGuard:
    """In front of the whole app: refuse a request without a valid key, or with a body
    over its cap, before any of the body is read; count a body without Content-Length
    (chunked) as it streams. A response sent while the body is still unread closes the
    connection (``Connection: close``), so the rest is never read either."""

    def __init__(self, app: ASGIApp, key_valid: Callable[[str], Awaitable[bool]],
                 metrics_token: str | None) -> None:
        self.app = app
        self.key_valid = key_valid
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
            refusal = await self._refusal(path, headers.get("authorization", ""))
            if refusal is not None:
                await _error_response(guarded_send, 401, "unauthorized", refusal,
                                      {"www-authenticate": "Bearer"}, path)
                return
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

    async def _refusal(self, path: str, header: str) -> str | None:
        """Why the request may not go on, or None."""
        what = "api key or metrics token" if path == "/metrics" else "api key"
        scheme, _, key = header.partition(" ")
        key = key.strip()
        if scheme.lower() != "bearer" or not key:
            return f"missing 'Authorization: Bearer <{what}>'"
        if path == "/metrics" and self.metrics_token and hmac.compare_digest(
                key.encode(), self.metrics_token.encode()):
            return None
        if not await self.key_valid(key):
            return f"invalid {what}"
        return None


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
