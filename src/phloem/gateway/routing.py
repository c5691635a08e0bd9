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
"""

from __future__ import annotations

import asyncio
from typing import Protocol


class RouteError(Exception):
    """A request that cannot be routed; the gateway answers it with ``status`` and a JSON
    body ``{"error": {"code": code, "message": message}}``."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


class Upstream(Protocol):
    """One HTTP/1.1 connection to an isolate, leased for one request/response exchange."""

    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter

    def release(self, *, reusable: bool) -> None:
        """Give the connection back. ``reusable=False`` closes it (broken framing,
        ``Connection: close``, upgraded to a WebSocket, error)."""


class Router(Protocol):
    async def acquire(self, host: str) -> Upstream:
        """Resolve ``host`` (the raw Host header value, port included) and lease a
        connection to a live isolate, starting one first when none is running (the
        caller's request is held meanwhile). Raises :class:`RouteError`."""
        ...
