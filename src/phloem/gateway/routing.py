"""What the gateway needs from the rest of the platform: a way to turn a Host header
into an upstream it can send HTTP/1.1 bytes to.

The gateway knows nothing about branches, deployments or isolates; the platform gives it
a :class:`Router`. A lookup either fails with a :class:`RouteError` (rendered as a JSON
error response) or yields an :class:`Upstream` lease that the gateway must release
exactly once.

    router = MyRouter()
    lease = await router.acquire("br-quiet-moon-3f9a2c-todos.fn.localhost:8787")
    reader, writer = lease.reader, lease.writer
    ...
    lease.release(reusable=True)   # connection goes back to the isolate's idle pool

Every member the gateway uses is declared on the protocols below, so mypy checks each
implementation (the platform's is :class:`phloem.server.dispatch.PlatformRouter`):

* ``Upstream.limits`` — per-route overrides of the gateway's limits, or ``None``;
* ``Upstream.replay_safe`` — whether an idempotent, bodiless request that got no answer at
  all may be sent again on a fresh connection (see :func:`phloem.gateway.framing.may_replay`);
* ``Upstream.mark_stream()`` — called once when the exchange becomes a stream (an SSE
  response or a WebSocket tunnel), so the platform can neither scale out on long-lived
  streams nor evict an isolate that still serves one. The stream ends when the lease is
  released.
* ``Router.acquire_nowait(host)`` — a lease available at once (a live upstream with an idle
  pooled connection), else ``None``: never an error, and never a new connection or a cold
  start; :meth:`Router.acquire` then does all of that. The gateway uses it to proxy complete
  requests from its protocol callbacks, without a task switch; during such an exchange it
  swaps the connection's protocol out (``transport.set_protocol``) and back, so the lease's
  ``reader`` must be the ``StreamReader`` of an :func:`asyncio.open_unix_connection`-style
  stream (as it is anyway). A router without such a pool returns ``None``.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Protocol


class RouteError(Exception):
    """A request that cannot be routed; the gateway answers it with ``status`` and a JSON
    body ``{"error": {"code": code, "message": message}}``."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


@dataclass(frozen=True, slots=True)
class Limits:
    """Per-route limits carried by a lease as ``lease.limits``; ``None`` means the gateway's
    default (:class:`~phloem.gateway.server.GatewayConfig`).

    ``ttfb_timeout``: seconds from forwarding the request head until the upstream's final
    response head arrives (else 504). ``silence_timeout``: seconds without a byte in either
    direction once the response head arrived (else both connections are closed).
    ``max_body_bytes``: request body limit (413); it can only lower the gateway's own
    ``max_body_bytes``, which is checked before routing and so acts as a ceiling.
    ``response_headers``: header lines (each ending in CRLF) added to every final response
    head of the route, e.g. a custom domain's ``Strict-Transport-Security``.
    """

    ttfb_timeout: float | None = None
    silence_timeout: float | None = None
    max_body_bytes: int | None = None
    response_headers: bytes = b""

    def __post_init__(self) -> None:
        for name, value in (("ttfb_timeout", self.ttfb_timeout),
                            ("silence_timeout", self.silence_timeout)):
            if value is not None and not value > 0:
                raise ValueError(f"Limits.{name} must be positive, got {value!r}")
        if self.max_body_bytes is not None and self.max_body_bytes < 0:
            raise ValueError(f"Limits.max_body_bytes must be >= 0, got {self.max_body_bytes!r}")
        if self.response_headers and not self.response_headers.endswith(b"\r\n"):
            raise ValueError("Limits.response_headers must be header lines ending in CRLF")


class Upstream(Protocol):
    """One HTTP/1.1 connection to an isolate, leased for one request/response exchange."""

    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter

    @property
    def limits(self) -> Limits | None:
        """Per-route limits; ``None``: the gateway's own."""
        ...

    @property
    def replay_safe(self) -> bool:
        """May an idempotent, bodiless request that got no answer be sent again?"""
        ...

    def mark_stream(self) -> None:
        """The exchange became a long-lived stream (SSE, WebSocket tunnel)."""

    def release(self, *, reusable: bool) -> None:
        """Give the connection back. ``reusable=False`` closes it (broken framing,
        ``Connection: close``, upgraded to a WebSocket, error)."""


class Router(Protocol):
    async def acquire(self, host: str) -> Upstream:
        """Resolve ``host`` (the raw Host header value, port included) and lease a
        connection to a live isolate, starting one first when none is running (the
        caller's request is held meanwhile). Raises :class:`RouteError`."""
        ...

    def acquire_nowait(self, host: str) -> Upstream | None:
        """A lease on an idle pooled connection of a live isolate, else ``None`` (then
        :meth:`acquire`); never raises :class:`RouteError`, never waits."""
        ...
