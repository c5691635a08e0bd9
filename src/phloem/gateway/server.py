"""The phloem gateway: an asyncio HTTP/1.1 reverse proxy that routes by Host header.

    gateway = Gateway(router, GatewayConfig(port=8787), on_request=print)
    await gateway.start()
    ...
    await gateway.stop_accepting()     # no new connections
    await gateway.drain(timeout=30.0)  # let in-flight requests finish, then close everything

The package, one concept a module:

* ``server`` (this module): :class:`Gateway` and :class:`GatewayConfig`, the public surface;
* ``connection``: one client connection (ordering, keep-alive, flow control, error replies);
* ``reader``: its request parser (httptools callbacks, head limits, the request queue);
* ``fastpath``: complete requests proxied from protocol callbacks, without a task switch;
* ``upstream``: the task path (routing, cold starts, request bodies, replays, tunnels);
* ``framing``: the I/O-free response framer both paths drive, and the gateway's own errors;
* ``watchdog``: each connection's one timer (keep-alive, head, time to first byte, silence);
* ``request``, ``record``, ``http``, ``proxies``, ``routing``: the data they share.

Limits: once the request head is forwarded, the upstream has ``ttfb_timeout`` seconds to send
its final response head (else 504 and the upstream connection is aborted, so the app sees the
client go); from then on the exchange is closed after ``silence_timeout`` seconds without a
byte in either direction. Both come from :class:`GatewayConfig`, overridable per lease by
:class:`~phloem.gateway.routing.Limits`. A request head has ``head_timeout`` seconds (408);
connections are accepted through :class:`phloem.gateway.admission.Listener` (per-peer and
per-listener caps, descriptors).

HTTPS: with ``GatewayConfig.tls`` (an ``ssl.SSLContext``, see :mod:`phloem.gateway.tls`)
the listener on ``port`` speaks TLS, with the same limits (the handshake counts against
``head_timeout``), and ``http_port``, when set, gets a plain listener that redirects
to https (:mod:`phloem.gateway.redirect`, where ACME HTTP-01 challenges will be answered).
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
from collections.abc import Callable
from dataclasses import dataclass, field

from phloem.gateway.admission import Admission, AdmissionConfig, Listener
from phloem.gateway.connection import _Connection
from phloem.gateway.framing import REPLAY_MAX
from phloem.gateway.proxies import TrustedProxies
from phloem.gateway.proxy_protocol import ProxyProtocolError, read_header
from phloem.gateway.record import RequestRecord
from phloem.gateway.redirect import RedirectProtocol
from phloem.gateway.routing import Router

__all__ = ["REPLAY_MAX", "Gateway", "GatewayConfig", "RequestRecord"]

logger = logging.getLogger("phloem.gateway")


@dataclass(frozen=True)
class GatewayConfig:
    host: str = "127.0.0.1"
    port: int = 8787
    # A larger Content-Length, or a chunked body growing larger, gets a 413. Checked before
    # routing, so a lease's Limits.max_body_bytes can only lower it.
    max_body_bytes: int = 100 * 1024 * 1024
    # Sent upstream as X-Forwarded-Proto.
    proto: str = "http"
    # Peers (CIDR networks) whose X-Forwarded-* headers are passed on; every other
    # client's are replaced (see http.upstream_request_head). Parsed once into ``trusted``.
    trusted_proxies: tuple[str, ...] = ()
    #: Every connection starts with a PROXY protocol header (v1 or v2) naming the client,
    #: read before TLS; only trusted proxies may connect at all (the others are closed).
    proxy_protocol: bool = False
    # An idle client connection must send a complete request head within this many seconds.
    keep_alive_timeout: float = 60.0
    # A new connection must send its first request head, complete, within this many seconds
    # of being accepted, and a later head must be complete this long after its first byte:
    # else 408 (or a silent close if nothing came) and the connection is closed.
    head_timeout: float = 10.0
    # Client connections open at once (see phloem.gateway.admission.plan_connections), and from one
    # peer address (0: no cap; trusted proxies are exempt).
    max_connections: int = 10_000
    max_connections_per_peer: int = 1024
    # Seconds from forwarding the request head to the upstream's final response head: 504.
    ttfb_timeout: float = 900.0
    # Seconds without a byte either way once the response head arrived: both sides closed.
    silence_timeout: float = 900.0
    #: Serve TLS on ``port`` with this context (None: plain HTTP).
    tls: ssl.SSLContext | None = field(default=None, compare=False)
    #: With ``tls``: a plain listener here answers 308 to https (None: no plain listener).
    http_port: int | None = None
    #: The https port its redirects name (the public one, 443 behind a port mapping).
    redirect_port: int = 443
    #: ACME HTTP-01: token -> key authorization, answered on the plain listener.
    acme_challenge: Callable[[str], str | None] | None = field(default=None, compare=False)
    trusted: TrustedProxies = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        for name, value in (("keep_alive_timeout", self.keep_alive_timeout),
                            ("head_timeout", self.head_timeout),
                            ("ttfb_timeout", self.ttfb_timeout),
                            ("silence_timeout", self.silence_timeout)):
            if not value > 0:
                raise ValueError(f"GatewayConfig.{name} must be positive")
        object.__setattr__(self, "trusted_proxies", tuple(self.trusted_proxies))
        object.__setattr__(self, "trusted", TrustedProxies(self.trusted_proxies))
        if self.proxy_protocol and not self.trusted:
            raise ValueError("GatewayConfig.proxy_protocol: needs trusted_proxies (the "
                             "balancers' addresses): only they may send PROXY headers")


class Gateway:
    """The HTTP/1.1 front door: accepts client connections and proxies each request to the
    upstream the :class:`Router` picks for its Host header."""

    def __init__(
        self,
        router: Router,
        config: GatewayConfig,
        *,
        on_request: Callable[[RequestRecord], None] | None = None,
    ) -> None:
        self.router = router
        self.config = config
        self._on_request = on_request
        trusted = config.trusted
        #: Connection limits (see phloem.gateway.admission); trusted proxies have no per-peer cap.
        self.admission = Admission(
            "gateway",
            AdmissionConfig(max_connections=config.max_connections,
                            max_per_peer=config.max_connections_per_peer,
                            head_timeout_s=config.head_timeout),
            exempt=trusted.__contains__ if trusted else None)
        self._server: Listener | None = None
        self._port: int | None = None
        #: The plain listener's limits in TLS mode (a small share: it only redirects).
        self.redirect_admission = Admission(
            "redirect", AdmissionConfig(max_connections=max(16, config.max_connections // 8),
                                        max_per_peer=config.max_connections_per_peer,
                                        head_timeout_s=config.head_timeout),
            exempt=trusted.__contains__ if trusted else None)
        self._redirect: Listener | None = None
        self._http_port: int | None = None
        self._connections: set[_Connection] = set()
        self._draining = False

    async def start(self) -> None:
        try:
            # Our own accept loop: it applies the connection limits and never drops a
            # connection unanswered when out of descriptors (see phloem.gateway.admission).
            self._server = await Listener.open(
                self.config.host,
                self.config.port,
                lambda: _Connection(self),
                self.admission,
                backlog=1024,
                tls=self.config.tls,
                preamble=self._proxy_header if self.config.proxy_protocol else None,
            )
        except OSError as exc:
            raise OSError(
                exc.errno,
                f"gateway cannot listen on {self.config.host}:{self.config.port}: "
                f"{exc.strerror or exc}",
            ) from exc
        self._port = int(self._server.sockets[0].getsockname()[1])
        if self.config.tls is not None and self.config.http_port is not None:
            await self._open_redirect(self.config.http_port)

    async def _open_redirect(self, port: int) -> None:
        config = self.config
        try:
            self._redirect = await Listener.open(
                config.host, port,
                lambda: RedirectProtocol(self.redirect_admission, config.redirect_port,
                                         config.acme_challenge),
                self.redirect_admission, backlog=1024,
                preamble=self._proxy_header if config.proxy_protocol else None)
        except OSError as exc:
            await self.stop_accepting()
            raise OSError(exc.errno, f"gateway cannot listen on {config.host}:{port} "
                          f"(http_port): {exc.strerror or exc}") from exc
        self._http_port = int(self._redirect.sockets[0].getsockname()[1])

    async def _proxy_header(self, sock: socket.socket, protocol: asyncio.Protocol) -> bool:
        """With ``proxy_protocol``: a trusted proxy's connection starts with a PROXY
        header, whose client address the connection takes as its peer; any other peer's
        connection, or one without a valid header in time, is closed."""
        peer = sock.getpeername()
        ip = str(peer[0]) if isinstance(peer, tuple) and peer else ""
        if ip not in self.config.trusted:
            logger.info("refused a connection from %s: not a trusted proxy "
                        "(--proxy-protocol accepts only --trusted-proxy peers)", ip)
            return False
        try:
            header = await asyncio.wait_for(read_header(sock), self.config.head_timeout)
        except (ProxyProtocolError, TimeoutError, OSError) as exc:
            logger.info("closed a connection from %s: %s", ip,
                        exc if not isinstance(exc, TimeoutError)
                        else f"no PROXY header within {self.config.head_timeout:g} s")
            return False
        if header.source is not None and isinstance(protocol, _Connection):
            protocol.proxied_ip = header.source
        return True

    @property
    def port(self) -> int:
        """The bound port (useful when ``config.port`` is 0)."""
        if self._port is None:
            raise RuntimeError("the gateway has not been started")
        return self._port

    @property
    def http_port(self) -> int | None:
        """The plain (redirecting) listener's bound port in TLS mode, else None."""
        return self._http_port

    @property
    def draining(self) -> bool:
        return self._draining

    @property
    def serving(self) -> bool:
        """Its listening socket accepts connections (for ``phloem status``)."""
        return self._server is not None and self._server.is_serving()

    @property
    def inflight(self) -> int:
        """Requests being handled that are not streams: routing (cold starts included),
        waiting for the response, or receiving a non-stream response."""
        # Counted when asked (rarely: status) rather than on every request; a connection
        # has at most one exchange at a time.
        return sum(1 for c in self._connections if c.exchanging and not c.stream)

    @property
    def open_streams(self) -> int:
        """Exchanges that became streams: SSE responses and WebSocket tunnels."""
        return sum(1 for c in self._connections if c.exchanging and c.stream)

    async def stop_accepting(self) -> None:
        # Not wait_closed(): on Python 3.12+ it also waits for every open connection.
        if self._server is not None:
            self._server.close()
            self._server = None
        if self._redirect is not None:
            self._redirect.close()
            self._redirect = None

    async def drain(self, timeout: float) -> None:
        """Wait (up to ``timeout`` seconds) until no request is in flight, closing idle
        connections at once; then close whatever remains."""
        self._draining = True
        for conn in list(self._connections):
            conn.close_if_idle()
        tasks = {c.task for c in self._connections if c.task is not None}
        if not tasks:
            return
        _, pending = await asyncio.wait(tasks, timeout=timeout)
        if not pending:
            return
        for conn in list(self._connections):
            conn.abort()  # also aborts their upstream connections
        _, pending = await asyncio.wait(pending, timeout=1.0)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)

    # -- what client connections report (phloem.gateway.connection.ConnectionOwner) ---------

    def connection_opened(self, conn: _Connection) -> None:
        self._connections.add(conn)

    def connection_closed(self, conn: _Connection) -> None:
        self._connections.discard(conn)

    def record(self, record: RequestRecord) -> None:
        """Report a finished exchange to ``on_request`` (its failures are logged)."""
        if self._on_request is not None:
            try:
                self._on_request(record)
            except Exception:
                logger.exception("on_request callback failed")
