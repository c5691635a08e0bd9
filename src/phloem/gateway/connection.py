"""One client connection of the gateway: parses requests and proxies them one at a time, in
order.

Each connection is an :class:`asyncio.Protocol` whose ``data_received`` feeds an
``httptools.HttpRequestParser``; parsed requests are queued and served strictly in order.
A complete request that the router can lease an idle upstream connection for at once is
proxied from the protocol callbacks (:mod:`phloem.gateway.fastpath`); everything else goes
to the connection's task (:mod:`phloem.gateway.upstream`). Both drive one
:class:`~phloem.gateway.framing.ResponseFramer` per exchange. One
:class:`~phloem.gateway.watchdog.Watchdog` times the keep-alive wait, request heads, time to
first byte and stream silence.

    conn = _Connection(gateway)   # made by the gateway's listener for each client
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Final, Protocol, cast

from phloem.gateway import fastpath, http, upstream
from phloem.gateway.framing import ResponseFramer, error_reply
from phloem.gateway.reader import RequestReader
from phloem.gateway.record import RequestRecord
from phloem.gateway.request import BODY_HIGH_WATER, Request, request_id
from phloem.gateway.routing import Limits, Upstream
from phloem.gateway.watchdog import KEEP_ALIVE, Watchdog

if TYPE_CHECKING:
    from phloem.gateway.admission import Admission
    from phloem.gateway.routing import Router
    from phloem.gateway.server import GatewayConfig

__all__ = ["LINGER_IDLE", "LINGER_TOTAL", "ConnectionOwner", "_Connection"]

logger = logging.getLogger("phloem.gateway")

# Closing a socket with unread input makes the kernel send RST, which can destroy the
# response we just wrote. So a client that may still be sending (an oversized upload, say)
# gets a half-close, and its input is dropped until it closes, goes quiet for
# LINGER_IDLE seconds, or LINGER_TOTAL seconds pass (nginx's lingering close).
LINGER_IDLE: Final = 5.0
LINGER_TOTAL: Final = 30.0


class ConnectionOwner(Protocol):
    """What a client connection needs from its gateway (:class:`~phloem.gateway.server.Gateway`
    is one): its settings, router and admission, and where it reports. (The gateway counts
    exchanges and streams from its connections' ``exchanging`` and ``stream`` when asked.)"""

    @property
    def config(self) -> GatewayConfig: ...

    @property
    def router(self) -> Router: ...

    @property
    def admission(self) -> Admission: ...

    @property
    def draining(self) -> bool:
        """Shutting down: no keep-alive after the current exchange."""
        ...

    def connection_opened(self, conn: _Connection) -> None: ...

    def connection_closed(self, conn: _Connection) -> None: ...

    def record(self, record: RequestRecord) -> None:
        """A finished exchange, for ``on_request``."""


class _Connection(asyncio.Protocol):
    """One client connection (see the module docstring). The members without a leading
    underscore are shared with the two request paths."""

    transport: asyncio.Transport

    def __init__(self, gateway: ConnectionOwner) -> None:
        self.gateway = gateway
        self.config = gateway.config
        self._admission = gateway.admission
        self.loop = loop = asyncio.get_running_loop()
        self.peer_ip = ""
        #: The client's address from a PROXY header (see phloem.gateway.proxy_protocol),
        #: set before the connection is made; it stands for the socket's peer.
        self.proxied_ip: str | None = None
        self.trusted = False  # the peer is a trusted proxy
        # What a plain request head gets (see http.plain_request_head).
        self.forwarded_for = b""
        self.proto = self.config.proto.encode("ascii")
        self.task: asyncio.Task[None] | None = None

        # Parser side.
        self.reader = reader = RequestReader(self.config.max_body_bytes, self)
        self.pending = reader.pending  # parsed requests not yet handled
        self._lingering = False
        self._last_input = 0.0

        # Handler side.
        self.active: Request | None = None
        self.last: Request | None = None  # the latest request handed to the handler
        self.upstream: asyncio.WriteTransport | None = None  # aborted if the client goes
        self._waiter: asyncio.Future[None] | None = None
        # The task has not run yet: as idle as when it waits (a new connection's first
        # request, often read in the same loop iteration as the accept or the TLS
        # handshake, would otherwise always take the task path).
        self._task_fresh = True
        self._idle_expired = False
        self.disconnected = False
        self._reading_paused = False
        self.write_paused = False
        self.drain_waiter: asyncio.Future[None] | None = None
        # The current exchange: status sent, final head sent, response complete.
        self.status = 0
        self.final_sent = False
        self.response_complete = False
        self.lease: Upstream | None = None
        self.host = ""  # the current exchange's Host, for logs
        self.stream = False  # the current exchange is an SSE response or a WebSocket tunnel
        # An exchange is under way (Gateway.inflight and open_streams count these).
        self.exchanging = False
        self.close_after = False  # the callback path ended the connection's last exchange
        self.timed_out: str | None = None  # "upstream_timeout" or "stream_silence"
        # The task path's framer during an exchange (the callback path's: fast.framer),
        # told when the gateway starts draining, so a head still to come says close.
        self.framer: ResponseFramer | None = None

        # The callback path (see phloem.gateway.fastpath).
        self.acquire_nowait: Callable[[str], Upstream | None] = gateway.router.acquire_nowait
        self.fast: fastpath.FastExchange | None = None
        self.up_paused = False  # we paused the upstream while the client is slow
        self.limits_seen: Limits | None = None
        self.limits_timeouts = self.timeouts(None)

        self.watch = Watchdog(loop, self)
        self.last_io = 0.0  # loop time of the last byte either way

    # -- asyncio.Protocol ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # cast, not isinstance: uvloop's transports do not subclass asyncio.Transport.
        self.transport = cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername")
        if isinstance(peer, tuple) and peer:
            self.peer_ip = str(peer[0]) if self.proxied_ip is None else self.proxied_ip
            trusted = self.config.trusted
            if trusted:  # once per connection, and only when proxies are configured
                self.trusted = self.peer_ip in trusted
            if self.peer_ip:
                self.forwarded_for = b"X-Forwarded-For: %s\r\n" % self.peer_ip.encode("ascii")
        self.gateway.connection_opened(self)
        self.task = self.loop.create_task(self._run())

    def data_received(self, data: bytes) -> None:
        self.last_io = self.loop.time()  # client activity keeps a stream alive
        if self._lingering:
            self._last_input = self.last_io
            return
        reader = self.reader
        reader.feed(data)
        if reader.pending:
            self._dispatch()
        self.update_reading()

    def eof_received(self) -> bool | None:
        return None  # a client half-close counts as a disconnect: close the transport

    def connection_lost(self, exc: Exception | None) -> None:
        self.disconnected = True
        self._admission.closed(self)
        for req in (self.reader.parsing, self.reader.upgraded, self.active):
            if req is not None:
                req.fail("disconnected")
        if self.fast is not None:
            self.fast.abandon()
        # Let the isolate see the disconnect too.
        if self.upstream is not None:
            self.upstream.abort()
        self.wake_handler()
        if self.drain_waiter is not None and not self.drain_waiter.done():
            self.drain_waiter.set_result(None)

    # Backpressure, upstream -> client: while the client's transport holds more than its
    # high-water mark, the upstream connection is not read at all (on both paths, and in
    # tunnels), so a client that stops reading costs the socket buffers, the transport's
    # high-water mark and the last read. (The task path also waits in drain_client before
    # each read, and its StreamReader stops reading above 2 * UPSTREAM_BUFFER.)

    def pause_writing(self) -> None:
        self.write_paused = True
        if self.upstream is not None and not self.up_paused:
            self.up_paused = True
            cast(asyncio.ReadTransport, self.upstream).pause_reading()

    def resume_writing(self) -> None:
        self.write_paused = False
        if self.up_paused:
            self.up_paused = False
            transport = self.upstream
            if transport is not None and not transport.is_closing():
                cast(asyncio.ReadTransport, transport).resume_reading()
        if self.drain_waiter is not None and not self.drain_waiter.done():
            self.drain_waiter.set_result(None)

    def resume_upstream(self, transport: asyncio.WriteTransport) -> None:
        """An exchange ends: its upstream connection must not go back paused."""
        if self.up_paused:
            self.up_paused = False
            if not transport.is_closing():
                cast(asyncio.ReadTransport, transport).resume_reading()

    # -- flow control ------------------------------------------------------------------------

    def update_reading(self) -> None:
        """Stop reading the client while it is ahead of us (body not yet forwarded,
        pipelined requests queued, or nothing more will be parsed)."""
        reader = self.reader
        if (
            not self._reading_paused
            and not self.pending
            and reader.parsing is None
            and reader.upgraded is None
            and not reader.dead
        ):
            return  # reading, and nothing that could pause it (the common case)
        req = reader.parsing or reader.upgraded
        pause = not self._lingering and (
            reader.dead
            or (req is not None and req.buffered > BODY_HIGH_WATER)
            or (self.active is not None and bool(self.pending))
        )
        if pause == self._reading_paused or self.transport.is_closing():
            return
        self._reading_paused = pause
        if pause:
            self.transport.pause_reading()
        else:
            self.transport.resume_reading()

    def wake_handler(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def close_if_idle(self) -> None:
        """Used by :meth:`Gateway.drain`: wake the handler so an idle connection closes;
        a response head still to come says that the connection closes after it."""
        if self.active is None and not self.pending and not self.reader.in_head:
            self.wake_handler()
            return
        framer = self.fast.framer if self.fast is not None else self.framer
        if framer is not None:
            framer.close = True  # no keep-alive after this exchange

    def abort(self) -> None:
        self.transport.abort()

    # -- admission (phloem.gateway.admission.Tracked) ------------------------------------

    @property
    def evictable(self) -> bool:
        """Waiting for a request head (none is being handled or queued), or only
        draining the input of a connection that is closing."""
        return self._lingering or (
            self.watch.phase == KEEP_ALIVE and self.active is None and not self.pending)

    def evict(self) -> None:
        """Closed to make room for a new connection (the listener is full)."""
        self.transport.abort()

    def write(self, data: bytes) -> None:
        if not self.disconnected:
            self.last_io = self.loop.time()  # upstream activity keeps a stream alive
            self.transport.write(data)

    async def drain_client(self) -> None:
        if self.write_paused and not self.disconnected:
            self.drain_waiter = self.loop.create_future()
            try:
                await self.drain_waiter
            finally:
                self.drain_waiter = None

    # -- limits (phloem.gateway.watchdog) ----------------------------------------------------

    def watch_keep_alive(self) -> None:
        """Waiting for the next request head: it must be complete in time (head_timeout
        for a new connection's first one and for one that has begun, else the keep-alive
        timeout)."""
        config = self.config
        timeout = config.keep_alive_timeout
        reader = self.reader
        if self.last is None or reader.in_head:
            reader.head_timed = reader.in_head
            # The first head's from accept (a PROXY header and a TLS handshake took their
            # share; asked again, the admission says the whole head_timeout).
            timeout = min(timeout, self._admission.first_head_timeout(self)
                          if self.last is None else config.head_timeout)
        self.watch.keep_alive(timeout)
        self._admission.waiting(self)

    def head_begun(self) -> None:
        """A request head has begun and is not complete: it must be within head_timeout."""
        self.reader.head_timed = True
        if self.watch.phase == KEEP_ALIVE:  # else a pipelined head: timed when its turn comes
            self.watch.head(self.config.head_timeout)

    def watch_silence(self) -> None:
        """The final response head arrived: from now on only silence is limited."""
        self.last_io = now = self.loop.time()
        self.watch.silence(now)

    def keep_alive_expired(self) -> None:
        self._idle_expired = True
        if self.reader.in_head or self.last is None:
            self._head_timed_out()
        self.wake_handler()

    def _head_timed_out(self) -> None:
        """No complete request head in time: a 408 if part of one came, then close."""
        timeout = self.config.head_timeout
        self._admission.limit_hit(
            "head_timeout", self.peer_ip,
            f"no complete request head within {timeout:g} s (head_timeout)")
        if not self.reader.in_head:
            return  # nothing came: nobody to answer
        self._reply_unrouted(
            408, "request_timeout", f"the request head was not complete within {timeout:g} s")

    def ttfb_expired(self, timeout: float) -> None:
        # The task path's exchange fails once its read sees the abort; it then answers 504
        # instead of 502. The app sees its client disconnect.
        self.timed_out = "upstream_timeout"
        logger.info("%s: no response head within %g s", self.host, timeout)
        if self.fast is not None:
            self.fast.timed_out(timeout)
        elif self.upstream is not None:
            self.upstream.abort()

    def silence_expired(self, timeout: float) -> None:
        self.timed_out = "stream_silence"
        logger.info("%s: closed after %g s of silence", self.host, timeout)
        if self.fast is not None:
            self.fast.end(reusable=False, keep=False, abort=True)
        elif self.upstream is not None:
            self.upstream.abort()
        # A peer that stopped reading would keep a graceful close pending forever.
        if self.transport.get_write_buffer_size():
            self.transport.abort()
        else:
            self.transport.close()

    def timeouts(self, limits: Limits | None) -> tuple[float, float]:
        """(time to first byte, silence) for a lease with these limits."""
        config = self.config
        ttfb = config.ttfb_timeout
        silence = config.silence_timeout
        if limits is not None:
            if limits.ttfb_timeout is not None:
                ttfb = limits.ttfb_timeout
            if limits.silence_timeout is not None:
                silence = limits.silence_timeout
        return ttfb, silence

    # -- the exchange ------------------------------------------------------------------------

    def head_sent(self, framer: ResponseFramer) -> None:
        """The final response head went to the client."""
        self.status = framer.status
        self.final_sent = True
        if framer.stream:
            self.become_stream()

    def become_stream(self) -> None:
        """The exchange is long-lived (SSE, WebSocket): count it apart and tell the lease."""
        if self.stream:
            return
        self.stream = True
        if self.lease is not None:
            try:
                self.lease.mark_stream()
            except Exception:
                logger.exception("lease.mark_stream failed")

    def upstream_head(self, req: Request, info: http.RequestInfo, rid: bytes) -> bytes:
        return http.upstream_request_head(
            req.method, req.target, req.version, req.headers, info, request_id=rid,
            peer_ip=self.peer_ip, proto=self.config.proto, upgrade=req.upgrade,
            trusted=self.trusted)

    def begin_exchange(self, host: str) -> None:
        self.status = 0
        self.final_sent = False
        self.response_complete = False
        self.stream = False
        self.timed_out = None
        self.host = host
        self.exchanging = True

    def end_exchange(self, req: Request, started: float, rid: bytes, host: str) -> None:
        self.active = None
        # A stream we closed for silence is not the client's doing.
        if (
            self.disconnected
            and not self.response_complete
            and self.timed_out != "stream_silence"
        ):
            self.status = 499
        self.update_reading()
        self.exchanging = False
        gateway = self.gateway
        # Positional: keywords make building the record three times as slow.
        gateway.record(RequestRecord(
            host,  # host
            req.method.decode("latin-1"),  # method
            req.target.split(b"?", 1)[0].decode("latin-1"),  # path
            self.status,  # status
            self.loop.time() - started,  # duration_s
            rid.decode("ascii"),  # request_id
            self.stream,  # stream
            self.timed_out,  # error
        ))

    def _dispatch(self) -> None:
        """Requests are pending after parsing: serve the first on the callback path when
        the task is idle and it qualifies, else leave it to the task."""
        if self.active is not None:
            return  # the current exchange's end picks it up
        waiter = self._waiter
        idle = self._task_fresh or (waiter is not None and not waiter.done())
        if not idle or not fastpath.try_fast(self, self.pending[0]):
            self.wake_handler()

    def fast_ended(self, req: Request, keep: bool) -> None:
        """A callback-path exchange ended (recorded): wait for the next request or close."""
        if self.disconnected:
            return  # connection_lost woke the task already
        if not (keep and req.keep_alive and not self.gateway.draining):
            self.close_after = True
            self.wake_handler()
        elif self.pending or self.reader.bad_request is not None:
            self.wake_handler()
        else:
            self.watch_keep_alive()

    # -- the task ----------------------------------------------------------------------------

    async def _run(self) -> None:
        self._task_fresh = False
        try:
            while (req := await self._next_request()) is not None:
                if not await self._handle(req):
                    break
            last = self.last
            may_be_sending = (
                self.reader.dead
                or bool(self.pending)
                or (last is not None and not last.complete and not last.upgrade)
            )
            if may_be_sending and not self.disconnected and not self.transport.is_closing():
                await self._linger()
        except Exception:
            logger.exception("gateway connection handler failed")
        finally:
            if self.fast is not None:
                self.fast.abandon()
            self.active = None
            self.watch.stop()
            if not self.transport.is_closing():
                self.transport.close()
            self.gateway.connection_closed(self)
            self._let_go()

    def _let_go(self) -> None:
        """The connection is over: cut the references that make its objects a cycle (it
        and its reader, the reader and its parser, its watchdog, its task), so they are
        freed when the transport lets go of it rather than by the cyclic GC, which with a
        connection per request took a tenth of the gateway's CPU."""
        self.reader.let_go()
        self.task = None
        self.last = None

    async def _next_request(self) -> Request | None:
        while True:
            if self.disconnected:
                return None
            # While the callback path runs an exchange, everything else waits for its end.
            if self.fast is None:
                if self.close_after:
                    return None
                if self.pending:
                    req = self.pending.popleft()
                    self.watch.unwatch()  # no keep-alive limit while it is handled
                    self.active = self.last = req
                    self.update_reading()
                    return req
                if self.reader.bad_request is not None:
                    self._reply_unrouted(*self.reader.bad_request)
                    return None
                if self._idle_expired:
                    return None
                if self.gateway.draining and not self.reader.in_head:
                    return None
                if self.watch.phase != KEEP_ALIVE:
                    self.watch_keep_alive()
            self._waiter = self.loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None

    async def _linger(self) -> None:
        """Half-close, then drop the client's input until it closes (see LINGER_IDLE)."""
        self._lingering = True
        self._admission.waiting(self)  # its response is out: may be closed to make room
        self.update_reading()
        if self.transport.can_write_eof():
            self.transport.write_eof()  # FIN goes out after the queued response
        now = self._last_input = self.loop.time()
        give_up = now + LINGER_TOTAL
        while not self.disconnected and not self.gateway.draining:
            timeout = min(self._last_input + LINGER_IDLE, give_up) - self.loop.time()
            if timeout <= 0:
                return
            self._waiter = self.loop.create_future()
            timer = self.loop.call_later(timeout, self.wake_handler)
            try:
                await self._waiter
            finally:
                self._waiter = None
                timer.cancel()

    async def _handle(self, req: Request) -> bool:
        """Proxy one request; return whether the client connection stays open."""
        started = self.loop.time()
        info = http.scan_request_headers(req.headers)
        rid = req.rid or request_id(info)
        host = (info.host or b"").decode("latin-1")
        self.begin_exchange(host)
        try:
            keep = await upstream.exchange(self, req, info, rid)
            return keep and not self.gateway.draining
        finally:
            self.end_exchange(req, started, rid, host)

    # -- gateway-made responses --------------------------------------------------------------

    def error_now(
        self, req: Request, rid: bytes, status: int, code: str, message: str, *, close: bool
    ) -> bool:
        """Write a gateway-made error response; return whether the connection may stay."""
        keep = not close and req.keep_alive and not req.upgrade and not self.gateway.draining
        self.write(error_reply(status, code, message, rid, keep=keep,
                               head_only=req.method == b"HEAD", http10=req.version == "1.0"))
        self.status = status
        self.final_sent = True
        self.response_complete = True
        return keep

    def _reply_unrouted(self, status: int, code: str, message: str) -> None:
        """An error for input that is no request (unparseable, or a head not complete in
        time); the connection closes after it."""
        rid = http.new_request_id()
        self.write(error_reply(status, code, message, rid, keep=False, head_only=False,
                               http10=False))
        self.gateway.record(RequestRecord("", "", "", status, 0.0, rid.decode("ascii")))
