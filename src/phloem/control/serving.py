"""The control API's HTTP server: uvicorn, with phloem's connection limits.

    admission = Admission("api", AdmissionConfig(max_connections=256, head_timeout_s=10.0))
    server = ApiServer(uvicorn.Config(app, host="127.0.0.1", port=8788, lifespan="off",
                                      ws="none"), admission)
    task = asyncio.create_task(server.serve())   # server.should_exit = True stops it

uvicorn's own server would accept through the loop (libuv's accept, which silently
closes every pending connection when out of descriptors) and has no limit on how long a
request head may take: a new connection that sends nothing stays open for ever. So
:class:`ApiServer` accepts through :class:`phloem.gateway.admission.Listener` (per-peer cap,
listener cap with eviction of the longest-waiting connection, a spare descriptor of its
own) and serves with :class:`AdmittedHttpToolsProtocol`, uvicorn's httptools protocol
plus the head deadline (``head_timeout_s``; 408 if part of a head came, then close).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import ssl
from collections.abc import Iterator
from typing import Any

import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.server import ServerState

from phloem.gateway.admission import Admission, Listener

__all__ = ["AdmittedHttpToolsProtocol", "ApiServer"]

logger = logging.getLogger("phloem.api")


class AdmittedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol that reports to an :class:`Admission` and closes a
    connection whose request head is not complete in time (see the module docstring)."""

    def __init__(self, config: uvicorn.Config, server_state: ServerState,
                 app_state: dict[str, Any], admission: Admission) -> None:
        super().__init__(config, server_state, app_state)
        self._admission = admission
        self._head_timer: asyncio.TimerHandle | None = None
        self._in_head = False
        self._waiting = True  # for a request head: evictable

    # -- phloem.gateway.admission.Tracked -------------------------------------------------

    @property
    def evictable(self) -> bool:
        return self._waiting

    def evict(self) -> None:
        self.transport.abort()

    # -- uvicorn's protocol ----------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        # The first head counts from accept (a TLS handshake took its share).
        self._arm_head(self._admission.first_head_timeout(self))
        self._admission.waiting(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_head()
        self._admission.closed(self)
        super().connection_lost(exc)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._in_head = True
        if self._head_timer is None:
            # A later head counts from its first byte.
            self._arm_head(self._admission.config.head_timeout_s)

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._waiting = False
        self._disarm_head()
        super().on_headers_complete()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        # uvicorn arms its keep-alive timer only when no pipelined request is next.
        if self.timeout_keep_alive_task is not None:
            self._waiting = True
            self._admission.waiting(self)

    # -- the head deadline -----------------------------------------------------------------

    def _arm_head(self, timeout: float) -> None:
        self._head_timer = self.loop.call_later(timeout, self._head_timed_out)

    def _disarm_head(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self.transport.is_closing():
            return
        timeout = self._admission.config.head_timeout_s
        peer = self.client[0] if self.client else ""
        self._admission.limit_hit("head_timeout", peer, f"no complete request head within "
                                  f"{timeout:g} s (head_timeout)")
        if self._in_head:
            body = json.dumps({"error": {
                "code": "request_timeout",
                "message": f"the request head was not complete within {timeout:g} s"}}).encode()
            self.transport.write(
                b"HTTP/1.1 408 Request Timeout\r\nContent-Type: application/json\r\n"
                b"Connection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        self.transport.close()


class ApiServer(uvicorn.Server):
    """uvicorn's server accepting through a :class:`Listener` (module docstring)."""

    def __init__(self, config: uvicorn.Config, admission: Admission,
                 tls: ssl.SSLContext | None = None) -> None:
        super().__init__(config)
        self.admission = admission
        #: Serve HTTPS with this context (``--api-listen`` with ``--tls``).
        self.tls = tls

    # The platform owns signals; uvicorn must not install its own handlers.
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await self.lifespan.startup()
        if self.lifespan.should_exit:
            self.should_exit = True
            return
        config = self.config
        state = self.lifespan.state

        def create_protocol() -> asyncio.Protocol:
            return AdmittedHttpToolsProtocol(config, self.server_state, state, self.admission)

        try:
            listener = await Listener.open(config.host or "127.0.0.1", config.port,
                                           create_protocol, self.admission,
                                           backlog=config.backlog, tls=self.tls)
        except OSError as exc:
            await self.lifespan.shutdown()
            raise OSError(exc.errno, f"the API cannot listen on {config.host}:{config.port}: "
                          f"{exc.strerror or exc}") from exc
        # uvicorn's shutdown closes and awaits these (close, wait_closed).
        self.servers = [listener]  # type: ignore[list-item]
        self.started = True
