"""The AI Gateway's HTTP server: one ASGI app for every branch, which it tells apart by
Host (``<branch_id>--ai.<domain>``), checking the caller's token, forwarding to the
operator's upstream with the operator's key, and counting the usage the answer reports.

    app = GatewayApp(providers={"openai": ProviderConn("openai", url, key)},
                     secrets={"br-x": secret}, record=store_usage, domain="fn.localhost")
    # served by uvicorn (on a Unix socket behind the platform's gateway)

Routes (anything else is a JSON 404): ``POST /v1/chat/completions``, ``POST
/v1/responses``, ``GET /v1/models[/ID]``, the same under ``/openai/v1``, and ``POST
/anthropic/v1/messages`` when an ``anthropic`` upstream is configured. Errors are
``{"error": {"code", "message", "type"}}`` (the shape OpenAI clients read).

Answers stream through as they come: each chunk of a body is sent on the moment it
arrives, and each event of an event stream the moment it is complete. A streamed Chat
Completion is asked for its usage (``stream_options.include_usage``); when the client had
not asked, that extra last chunk is dropped before it, so it sees what it asked for.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import httpx
from starlette.types import Message, Receive, Scope, Send

from phloem.services.ai_gateway.tokens import check_token
from phloem.services.ai_gateway.usage import Meter, SseSplitter, is_usage_only
from phloem.services.base import parse_service_host

logger = logging.getLogger("phloem.ai_gateway")

#: Request bodies (prompts with inline images) above this get a 413.
MAX_BODY_BYTES = 32 * 1024 * 1024
#: Of a whole (not streamed) answer, this much is kept to read its usage.
MAX_METERED_BYTES = 8 * 1024 * 1024
#: Upstream timeouts: a model may think a long while before its first byte.
UPSTREAM_TIMEOUT = httpx.Timeout(connect=10.0, read=600.0, write=60.0, pool=10.0)
#: Streams hold their upstream connection for minutes: room for many at once.
UPSTREAM_LIMITS = httpx.Limits(max_connections=1000, max_keepalive_connections=100)
# Never sent upstream: hop-by-hop, the caller's credentials and addresses, framing the
# client chose (httpx frames the body itself), compression (usage must be readable), and
# phloem's own headers (a local forwarder's X-Phloem-Signed-Host, see dev/forward.py).
_REQUEST_DROP = frozenset({
    "host", "connection", "keep-alive", "proxy-connection", "te", "trailer", "upgrade",
    "transfer-encoding", "content-length", "authorization", "x-api-key", "cookie",
    "accept-encoding", "forwarded", "x-real-ip", "x-request-id"})
_REQUEST_DROP_PREFIXES = ("x-forwarded-", "x-neon-", "x-phloem-")
_RESPONSE_DROP = frozenset({
    "connection", "keep-alive", "proxy-connection", "te", "trailer", "upgrade",
    "transfer-encoding", "content-length", "set-cookie"})
_OPENAI_ROUTES = {"chat/completions": "POST", "responses": "POST", "models": "GET"}


@dataclass(frozen=True)
class ProviderConn:
    """An upstream with its key (read from phloem's env, held only here)."""

    kind: str
    url: str
    key: str | None = field(repr=False)

    def auth_headers(self) -> list[tuple[str, str]]:
        if self.key is None:
            return []
        if self.kind == "anthropic":
            return [("x-api-key", self.key)]
        return [("authorization", f"Bearer {self.key}")]


@dataclass(frozen=True)
class UsageEvent:
    branch_id: str
    function_slug: str
    provider: str
    model: str
    input_tokens: int
    output_tokens: int
    error: bool


class GatewayError(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


def branch_of_host(host: str, domain: str) -> str | None:
    """``br-quiet-moon-3f9a2c--ai.fn.localhost:8787`` -> ``br-quiet-moon-3f9a2c``."""
    parsed = parse_service_host(host, domain)
    return parsed.branch_id if parsed is not None and parsed.service == "ai" else None


def route(method: str, path: str) -> tuple[str, str]:
    """(provider kind, path below the upstream's base) of a request, or GatewayError.
    Neon's own paths (``/ai-gateway/{mlflow,openai,anthropic}/v1/...``) are the same."""
    if path.startswith("/ai-gateway/"):
        path = path[len("/ai-gateway"):]
        if path.startswith("/mlflow/v1/"):
            path = path[len("/mlflow"):]
    for prefix in ("/openai/v1/", "/v1/"):
        if path.startswith(prefix):
            rest = path[len(prefix):]
            allowed = "GET" if rest.startswith("models/") else _OPENAI_ROUTES.get(rest)
            break
    else:
        rest = "messages" if path == "/anthropic/v1/messages" else ""
        allowed = "POST" if rest else None
        if rest:
            return _method("anthropic", rest, method, allowed)
    if allowed is None:
        raise GatewayError(404, "not_found", f"no route {path}: the AI Gateway serves "
                           "/v1/chat/completions, /v1/responses, /v1/models (also under "
                           "/openai/v1) and /anthropic/v1/messages")
    return _method("openai", rest, method, allowed)


def _method(kind: str, rest: str, method: str, allowed: str | None) -> tuple[str, str]:
    if method != allowed:
        raise GatewayError(405, "method_not_allowed", f"{method} is not allowed here "
                           f"(use {allowed})")
    return kind, rest


def _token(headers: dict[str, str]) -> str:
    auth = headers.get("authorization", "")
    scheme, _, value = auth.partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    return headers.get("x-api-key", "").strip()


class GatewayApp:
    def __init__(self, providers: dict[str, ProviderConn], secrets: dict[str, bytes],
                 record: Callable[[UsageEvent], Awaitable[None]], domain: str,
                 client: httpx.AsyncClient | None = None) -> None:
        self.providers = providers
        self.domain = domain
        #: branch id -> its secret; the service keeps it current (provision, delete).
        self.secrets = secrets
        self.record = record
        self.client = client or httpx.AsyncClient(timeout=UPSTREAM_TIMEOUT,
                                                 limits=UPSTREAM_LIMITS)
        self._pending: set[asyncio.Task[None]] = set()

    async def aclose(self) -> None:
        if self._pending:
            await asyncio.wait(self._pending, timeout=5)
        await self.client.aclose()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await _lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1")
                   for k, v in scope["headers"]}
        try:
            branch = branch_of_host(headers.get("host", ""), self.domain)
            if branch is None:
                raise GatewayError(404, "unknown_host", "the AI Gateway answers at "
                                   "<branch_id>--ai.<domain>")
            kind, rest = route(scope["method"], scope["path"])
            function = check_token(self.secrets, branch, _token(headers))
            if function is None:
                raise GatewayError(401, "invalid_token", "no valid AI Gateway token of "
                                   "this branch (NEON_AI_GATEWAY_TOKEN) in Authorization: "
                                   "Bearer or x-api-key")
            provider = self.providers.get(kind)
            if provider is None:
                raise GatewayError(404, "provider_not_configured", f"no {kind} upstream "
                                   f"is configured (phloem up --ai-provider {kind}=URL,"
                                   "key-env=VAR)")
            body = await _read_body(receive) if scope["method"] == "POST" else b""
        except GatewayError as exc:
            await _error(send, exc)
            return
        exchange = _Exchange(self, provider, branch, function, rest, scope, headers, body)
        await _until_disconnect(exchange.run(send), receive)
        task = asyncio.get_running_loop().create_task(self._record(exchange.usage()))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def _record(self, event: UsageEvent) -> None:
        try:
            await self.record(event)
        except Exception:
            logger.exception("ai gateway: recording usage of branch %s failed",
                             event.branch_id)


class _Exchange:
    """One request forwarded upstream and its answer streamed back."""

    def __init__(self, app: GatewayApp, provider: ProviderConn, branch: str, function: str,
                 rest: str, scope: Scope, headers: dict[str, str], body: bytes) -> None:
        self.app, self.provider, self.branch, self.function = app, provider, branch, function
        self.meter = Meter()
        self.model = ""
        self.error = True
        self.drop_usage_chunk = False
        self.rest, self.scope, self.headers = rest, scope, headers
        self.body = self._prepare(body) if body else body

    def _prepare(self, body: bytes) -> bytes:
        try:
            payload = json.loads(body)
        except ValueError:
            return body  # the upstream answers it (400)
        if not isinstance(payload, dict):
            return body
        model = payload.get("model")
        self.model = model[:200] if isinstance(model, str) else ""
        if self.rest == "chat/completions" and payload.get("stream") is True:
            options = payload.get("stream_options")
            if not (isinstance(options, dict) and options.get("include_usage") is True):
                payload["stream_options"] = {**(options if isinstance(options, dict)
                                                else {}), "include_usage": True}
                self.drop_usage_chunk = True
                return json.dumps(payload).encode()
        return body

    def usage(self) -> UsageEvent:
        return UsageEvent(self.branch, self.function, self.provider.kind, self.model,
                          self.meter.input_tokens, self.meter.output_tokens, self.error)

    def _request(self) -> httpx.Request:
        headers = [(k, v) for k, v in self.headers.items()
                   if k not in _REQUEST_DROP and not k.startswith(_REQUEST_DROP_PREFIXES)]
        headers += [("accept-encoding", "identity"), *self.provider.auth_headers()]
        if self.provider.kind == "anthropic" and "anthropic-version" not in self.headers:
            headers.append(("anthropic-version", "2023-06-01"))
        query = self.scope.get("query_string", b"").decode("latin-1")
        url = f"{self.provider.url}/{self.rest}" + (f"?{query}" if query else "")
        return self.app.client.build_request(self.scope["method"], url, headers=headers,
                                             content=self.body or None)

    async def run(self, send: Send) -> None:
        try:
            response = await self.app.client.send(self._request(), stream=True)
        except httpx.HTTPError as exc:
            logger.warning("ai gateway: %s upstream %s: %s", self.provider.kind,
                           self.provider.url, type(exc).__name__)
            await _error(send, GatewayError(502, "upstream_unreachable", f"the "
                         f"{self.provider.kind} upstream did not answer "
                         f"({type(exc).__name__})"))
            return
        try:
            await self._relay(response, send)
        finally:
            await response.aclose()

    async def _relay(self, response: httpx.Response, send: Send) -> None:
        self.error = response.status_code >= 400
        ctype = response.headers.get("content-type", "")
        headers = [(k.encode("latin-1"), v.encode("latin-1"))
                   for k, v in response.headers.multi_items() if k not in _RESPONSE_DROP]
        await send({"type": "http.response.start", "status": response.status_code,
                    "headers": headers})
        try:
            if ctype.startswith("text/event-stream"):
                await self._relay_events(response, send)
            else:
                await self._relay_body(response, send, ctype)
        except httpx.HTTPError as exc:
            self.error = True
            logger.warning("ai gateway: %s upstream %s cut its answer short: %s",
                           self.provider.kind, self.provider.url, type(exc).__name__)
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def _relay_events(self, response: httpx.Response, send: Send) -> None:
        splitter = SseSplitter()
        async for chunk in response.aiter_raw():
            for event in splitter.feed(chunk):
                self.meter.feed_event(event)
                if self.drop_usage_chunk and is_usage_only(event):
                    continue
                await send({"type": "http.response.body", "body": event, "more_body": True})
        rest = splitter.rest()
        if rest:
            await send({"type": "http.response.body", "body": rest, "more_body": True})

    async def _relay_body(self, response: httpx.Response, send: Send, ctype: str) -> None:
        kept: list[bytes] = []
        size = 0
        async for chunk in response.aiter_raw():
            if size + len(chunk) <= MAX_METERED_BYTES:
                kept.append(chunk)
            size += len(chunk)
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        if "json" in ctype and size <= MAX_METERED_BYTES:
            with contextlib.suppress(ValueError):
                self.meter.feed_json(json.loads(b"".join(kept)))


async def _lifespan(receive: Receive, send: Send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


async def _read_body(receive: Receive) -> bytes:
    parts: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise GatewayError(499, "client_closed", "the client left")
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise GatewayError(413, "payload_too_large", f"the request body is over "
                               f"{MAX_BODY_BYTES} bytes")
        parts.append(chunk)
        if not message.get("more_body", False):
            return b"".join(parts)


async def _until_disconnect(work: Awaitable[None], receive: Receive) -> None:
    """Run ``work``; a client that leaves cancels it (and with it the upstream call)."""
    task = asyncio.ensure_future(work)

    async def watch() -> None:
        while True:
            message: Message = await receive()
            if message["type"] == "http.disconnect":
                return

    watcher = asyncio.ensure_future(watch())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for t in (task, watcher):
            t.cancel()
        await asyncio.gather(task, watcher, return_exceptions=True)
    error = task.exception() if task.done() and not task.cancelled() else None
    if error is not None:
        raise error


async def _error(send: Send, exc: GatewayError) -> None:
    body = json.dumps({"error": {"code": exc.code, "message": exc.message,
                                 "type": "phloem_ai_gateway"}}).encode()
    await send({"type": "http.response.start", "status": exc.status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})

