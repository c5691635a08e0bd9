"""A client request as the gateway holds it: the parsed head, and its body as it arrives
(filled by the connection's parser callbacks, drained by whichever path forwards it).

    req = Request(b"POST", b"/echo", "1.1", headers, keep_alive=True, upgrade=False,
                  max_body=1024)
    req.feed(b"hello")      # from the parser
    req.take()              # b"hello", to send upstream
"""

from __future__ import annotations

import asyncio
from typing import Final

from phloem.gateway import http

__all__ = ["BODY_HIGH_WATER", "BodySent", "Request", "request_id"]

# Buffered, not yet forwarded request body (or tunnel) bytes above which the connection
# stops reading the client, and the most sent upstream in one write: with the upstream
# transport's own high-water mark (its writes are drained), what a client sending faster
# than the function reads costs the gateway.
BODY_HIGH_WATER: Final = 64 * 1024


class Request:
    """A parsed request head plus its body as it arrives."""

    __slots__ = (
        "attempts",
        "body",
        "buffered",
        "complete",
        "discard",
        "error",
        "headers",
        "host",
        "keep_alive",
        "max_body",
        "method",
        "raw",
        "received",
        "rid",
        "target",
        "upgrade",
        "version",
        "waiter",
    )

    def __init__(
        self,
        method: bytes,
        target: bytes,
        version: str,
        headers: http.Headers,
        keep_alive: bool,
        upgrade: bool,
        max_body: int,
    ) -> None:
        self.method = method
        self.target = target
        self.version = version
        self.headers = headers
        self.keep_alive = keep_alive
        # After an Upgrade request every further client byte is raw tunnel data.
        self.upgrade = upgrade
        self.body: list[bytes] = []
        self.buffered = 0
        self.received = 0
        self.complete = False
        self.discard = False
        # Lowered by the route's Limits once the request is routed.
        self.max_body = max_body
        # "too_large", "malformed" or "disconnected": the body will never complete.
        self.error: str | None = None
        self.waiter: asyncio.Future[None] | None = None
        # Set when the callback path hands the request over after a failed first attempt.
        self.rid: bytes | None = None
        self.attempts = 0
        # Set by the reader for a plain HTTP/1.1 head (no header the gateway reads or
        # rewrites but one Host: see http.REWRITTEN): ``host``, its Host value, and ``raw``,
        # the head as received when it came alone in one read (else b""), to forward as is.
        self.host: bytes | None = None
        self.raw = b""

    def feed(self, data: bytes) -> None:
        self.received += len(data)
        if not self.discard and self.error is None:
            self.body.append(data)
            self.buffered += len(data)
        self.wake()

    def take(self, limit: int | None = None) -> bytes:
        """The buffered body, or its first ``limit`` bytes (the rest stays buffered)."""
        data = self.body[0] if len(self.body) == 1 else b"".join(self.body)
        if limit is not None and len(data) > limit:
            rest = data[limit:]
            self.body = [rest]
            self.buffered = len(rest)
            return data[:limit]
        self.body.clear()
        self.buffered = 0
        return data

    def put_back(self, body: bytes) -> None:
        """The whole body again, for another attempt (it was taken in one piece)."""
        if body:
            self.body = [body]
            self.buffered = len(body)

    def fail(self, error: str) -> None:
        if self.error is None and not self.complete:
            self.error = error
            self.body.clear()
            self.buffered = 0
        self.wake()

    def wake(self) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    async def wait(self) -> None:
        self.waiter = waiter = asyncio.get_running_loop().create_future()
        try:
            await waiter
        finally:
            # A cancelled pump may unwind after the next waiter was installed.
            if self.waiter is waiter:
                self.waiter = None


class BodySent:
    """Set once the whole request body (terminator included) was written upstream."""

    __slots__ = ("done",)

    def __init__(self) -> None:
        self.done = False


def request_id(info: http.RequestInfo) -> bytes:
    """The client's X-Request-Id when it is sane, else a new one."""
    rid = info.request_id
    if rid is not None and http.sane_request_id(rid):
        return rid
    return http.new_request_id()
