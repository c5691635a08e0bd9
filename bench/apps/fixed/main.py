"""An upstream that answers at once: every request head gets the same fixed 12-byte
response, written straight from the protocol's ``data_received`` (no ASGI, no parser, no
task), so a proxy in front of it is what a benchmark measures.

It is served by uvicorn's own server (the accept loop, lifespan and SIGINT shutdown phloem's
Python isolates use) with its HTTP protocol class swapped for ``FixedProtocol``: importing
this module as a phloem function's entry (``main:app``) swaps it in the isolate, because
phloem's host imports the entry before uvicorn resolves ``http="httptools"``. Outside
phloem (bench/runtime.py's direct, nginx and HAProxy rows) the same class serves:

    python main.py --uds /tmp/fixed.sock       # or --port 8080

Only bodiless requests (GET, HEAD) are understood: each ``\\r\\n\\r\\n`` ends one request;
``Connection: close`` closes the connection after the answers.
"""

from __future__ import annotations

import argparse
import asyncio
from typing import Any

from uvicorn import config as _uvicorn_config

RESPONSE = (b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: 12\r\n\r\n"
            b"hello world\n")


class FixedProtocol(asyncio.Protocol):
    """One client connection; constructed by uvicorn's server as its HTTP protocols are."""

    def __init__(self, config: Any, server_state: Any, app_state: Any,
                 _loop: asyncio.AbstractEventLoop | None = None) -> None:
        self.connections: set[Any] = server_state.connections
        self.transport: asyncio.Transport | None = None
        self.tail = b""  # an incomplete request head

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.connections.discard(self)

    def data_received(self, data: bytes) -> None:
        if self.tail:
            data, self.tail = self.tail + data, b""
        count = data.count(b"\r\n\r\n")
        if not data.endswith(b"\r\n\r\n"):
            self.tail = data[data.rfind(b"\r\n\r\n") + 4:] if count else data
        if count and self.transport is not None:
            self.transport.write(RESPONSE * count)
            # A readiness probe's "Connection: close" (proxies keep their connections).
            if b"lose" in data and b"connection: close" in data.lower():
                self.transport.close()

    def shutdown(self) -> None:
        """uvicorn's graceful shutdown: idle keep-alive connections just close."""
        if self.transport is not None:
            self.transport.close()


# phloem's host serves with http="httptools"; from here on that name means this class.
_uvicorn_config.HTTP_PROTOCOLS["httptools"] = FixedProtocol  # type: ignore[assignment]


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """Never called for HTTP (FixedProtocol answers); here for lifespan and for phloem's
    entry check, which wants an ASGI app."""
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return


def main() -> None:
    import uvicorn

    parser = argparse.ArgumentParser(description="a fixed-response HTTP/1.1 server")
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--uds")
    where.add_argument("--port", type=int)
    args = parser.parse_args()
    place: dict[str, Any] = ({"uds": args.uds} if args.uds
                             else {"host": "127.0.0.1", "port": args.port})
    uvicorn.Server(uvicorn.Config(app, **place, http=FixedProtocol, loop="uvloop",
                                  lifespan="on", log_level="warning",
                                  access_log=False)).run()


if __name__ == "__main__":
    main()
