"""Serve a service's ASGI app on a Unix socket, and lease connections to it.

The gateway proxies a service's requests as it does a function's (streaming both ways,
WebSocket upgrades, its timeouts), so a service only needs an HTTP/1.1 server on a
socket and a :class:`UnixLease` per exchange:

    server = await serve_asgi(app, ctx.branch_dir(branch_id, "storage") / "http.sock")
    pool = SocketPool(server.path)
    lease = await pool.acquire()          # in BranchService.acquire
    ...
    await server.close()
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import uvicorn
from starlette.types import ASGIApp

from phloem.gateway.idle import IdleConnections
from phloem.gateway.routing import Limits, RouteError

#: Idle connections kept per socket.
MAX_IDLE = 16


@dataclass(eq=False)
class UnixLease:
    """One connection to a service's socket for one exchange (gateway.routing.Upstream)."""

    pool: SocketPool
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    limits: Limits | None = None
    #: A service is platform code: a request that got no answer at all on a pooled
    #: connection (closed while idle) is safe to send again.
    replay_safe: bool = True
    _released: bool = field(default=False, repr=False)

    def mark_stream(self) -> None:
        """Services hold no per-stream accounting."""

    def release(self, *, reusable: bool) -> None:
        if self._released:
            return
        self._released = True
        self.pool.give_back(self.reader, self.writer, reusable)


class SocketPool:
    """Keep-alive connections to one Unix socket."""

    def __init__(self, path: Path, limits: Limits | None = None) -> None:
        self.path = path
        self.limits = limits
        self._idle = IdleConnections()

    async def acquire(self) -> UnixLease:
        pooled = self._idle.take()
        if pooled is not None:
            return UnixLease(self, pooled[0], pooled[1], self.limits)
        try:
            reader, writer = await asyncio.open_unix_connection(str(self.path))
        except OSError as exc:
            raise RouteError(502, "service_unavailable",
                             f"the service at {self.path.name} is not answering: {exc}") from exc
        return UnixLease(self, reader, writer, self.limits)

    def give_back(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                  reusable: bool) -> None:
        self._idle.give_back(reader, writer, keep=(
            reusable and len(self._idle) < MAX_IDLE and not reader.at_eof()
            and reader.exception() is None))

    def close(self) -> None:
        self._idle.close_all()


class _QuietServer(uvicorn.Server):
    # The platform owns signals; uvicorn must not install its own handlers.
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


@dataclass(eq=False)
class AsgiServer:
    """A uvicorn server on a Unix socket inside the platform's event loop."""

    path: Path
    server: uvicorn.Server
    task: asyncio.Task[None]

    async def close(self, timeout: float = 5.0) -> None:
        self.server.should_exit = True
        try:
            await asyncio.wait_for(asyncio.shield(self.task), timeout)
        except TimeoutError:
            self.server.force_exit = True
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)


async def serve_asgi(app: ASGIApp, path: Path, *, mode: int = 0o600) -> AsgiServer:
    """Serve ``app`` on the Unix socket ``path`` (replacing a stale one) until closed;
    returns once it accepts connections. HTTP/1.1 via h11 or httptools, no WebSockets
    (a service needing them says so and serves its own)."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    config = uvicorn.Config(app, uds=str(path), log_level="warning", access_log=False,
                            lifespan="on", ws="none", timeout_keep_alive=75)
    server = _QuietServer(config)
    task = asyncio.create_task(server.serve())
    while not server.started:
        if task.done():
            task.result()
            raise RouteError(502, "service_unavailable", f"could not serve on {path}")
        await asyncio.sleep(0.01)
    os.chmod(path, mode)
    return AsgiServer(path, server, task)
