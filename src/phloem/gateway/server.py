"""The phloem gateway: an asyncio HTTP/1.1 reverse proxy that routes by Host header.

    gateway = Gateway(router, GatewayConfig(port=8787), on_request=print)
    await gateway.start()
    ...
    await gateway.stop_accepting()     # no new connections
    await gateway.drain(timeout=30.0)  # let in-flight requests finish, then close everything

How it works: each client connection is an :class:`asyncio.Protocol` whose ``data_received``
feeds an ``httptools.HttpRequestParser``; parsed requests are queued and handled strictly in
order by one task per connection. For each request the handler leases an upstream connection
from the :class:`~phloem.gateway.routing.Router`, writes a rewritten request head, and then
runs two pumps at once: the request body (client -> upstream, re-framed if chunked) and the
response (upstream -> client). Response bytes are forwarded exactly as received; an
``httptools.HttpResponseParser`` only tells where each response ends, so streams (SSE, long
chunked bodies) are never buffered. Both directions apply backpressure.

Limits: once the request head is forwarded, the upstream has ``ttfb_timeout`` seconds to send
its final response head (else 504 and the upstream connection is aborted, so the app sees the
client go); from then on the exchange is closed after ``silence_timeout`` seconds without a
byte in either direction. Both come from :class:`GatewayConfig`, overridable per lease by
:class:`~phloem.gateway.routing.Limits`. One timer per connection watches both, and
the keep-alive wait between requests (see ``_Connection._on_watch``); bytes only stamp a time.
The same timer gives a request head ``head_timeout`` seconds (408); connections are accepted
through :class:`phloem.admission.Listener` (per-peer and per-listener caps, descriptors).
"""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import cast

import httptools

from phloem.gateway import http
from phloem.gateway.admission import Admission, AdmissionConfig, Listener
from phloem.gateway.proxies import TrustedProxies
from phloem.gateway.routing import Limits, RouteError, Router, Upstream

__all__ = ["Gateway", "GatewayConfig", "RequestRecord"]

logger = logging.getLogger("phloem.gateway")

READ_SIZE = 64 * 1024
# Buffered, not yet forwarded request body (or tunnel) bytes above which we stop reading
# the client: with the upstream transport's own high-water mark (its writes are drained),
# what a client sending faster than the function reads costs the gateway.
BODY_HIGH_WATER = 64 * 1024
# Request and response heads larger than this are refused.
MAX_HEAD_BYTES = 64 * 1024
# After an early error response, at most this much request body is read and thrown away to
# keep the connection alive; beyond that (or after DISCARD_TIMEOUT) the connection is closed.
DISCARD_LIMIT = 1024 * 1024
DISCARD_TIMEOUT = 5.0
# Closing a socket with unread input makes the kernel send RST, which can destroy the
# response we just wrote. So a client that may still be sending (an oversized upload, say)
# gets a half-close, and its input is dropped until it closes, goes quiet for
# LINGER_IDLE seconds, or LINGER_TOTAL seconds pass (nginx's lingering close).
LINGER_IDLE = 5.0
LINGER_TOTAL = 30.0
# Safe to retry on a fresh upstream connection when a pooled one died before answering.
IDEMPOTENT = frozenset({b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"})
# Replays (see _UpstreamFailed): a request is sent again only when all of it is still in
# hand, i.e. it went upstream in one write of at most REPLAY_MAX bytes (head plus a body
# that had fully arrived), and the upstream never read it. At most MAX_ATTEMPTS sends.
REPLAY_MAX = 64 * 1024
MAX_ATTEMPTS = 3
NO_BODY_STATUS = frozenset({204, 304})
# What the per-connection watchdog timer is watching: nothing (routing, cold start), the
# keep-alive wait for the next request head, time to first byte, or stream silence.
_NONE, _KEEP_ALIVE, _TTFB, _SILENCE = 0, 1, 2, 3


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
    # An idle client connection must send a complete request head within this many seconds.
    keep_alive_timeout: float = 60.0
    # A new connection must send its first request head, complete, within this many seconds
    # of being accepted, and a later head must be complete this long after its first byte:
    # else 408 (or a silent close if nothing came) and the connection is closed.
    head_timeout: float = 10.0
    # Client connections open at once (see phloem.admission.plan_connections), and from one
    # peer address (0: no cap; trusted proxies are exempt).
    max_connections: int = 10_000
    max_connections_per_peer: int = 1024
    # Seconds from forwarding the request head to the upstream's final response head: 504.
    ttfb_timeout: float = 900.0
    # Seconds without a byte either way once the response head arrived: both sides closed.
    silence_timeout: float = 900.0
    trusted: TrustedProxies = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        for name in ("keep_alive_timeout", "head_timeout", "ttfb_timeout", "silence_timeout"):
            if not getattr(self, name) > 0:
                raise ValueError(f"GatewayConfig.{name} must be positive")
        object.__setattr__(self, "trusted_proxies", tuple(self.trusted_proxies))
        object.__setattr__(self, "trusted", TrustedProxies(self.trusted_proxies))


@dataclass(slots=True)
class RequestRecord:
    """One finished exchange, for logs and metrics (read-only by convention: not frozen,
    which would make building one, once per request, three times as slow).

    ``status`` is the status sent to the client (the upstream's, or the gateway's own for
    errors), 499 when the client went away before the response was complete, and 0 when
    nothing could be sent. ``path`` excludes the query string. ``stream`` is true for an
    SSE response or a WebSocket tunnel (``duration_s`` is then the stream's lifetime).
    ``error`` names a limit that ended the exchange: ``"upstream_timeout"`` (time to first
    byte; status 504) or ``"stream_silence"`` (closed mid-response; status as sent).
    """

    host: str
    method: str
    path: str
    status: int
    duration_s: float
    request_id: str
    stream: bool = False
    error: str | None = None


class _HeadTooLarge(Exception):
    pass


class _UpstreamFailed(Exception):
    """The upstream failed before any byte of a final response reached the client.

    ``retryable``: nothing at all came back. A router's leases may allow replaying such a
    request when it is idempotent and bodyless (``replay_safe``, true when absent), once;
    the platform's do not, since the request may be what killed the isolate.

    ``undelivered``: the kernel proves the upstream never read the request: the write was
    refused (EPIPE: its end was closed before we wrote, e.g. a pooled connection of a
    process that has just died) or the connection was reset with our bytes unread in its
    receive queue (ECONNRESET: a process that died, or closed an idle connection, before
    reading them), as opposed to an end of stream after it read them. Such a request is
    replayed whatever its method and whatever the lease says, if it is still whole (see
    REPLAY_MAX), up to MAX_ATTEMPTS sends. (An app reads at least 64 KiB at a time, so a
    request of at most REPLAY_MAX bytes is read all at once or not at all.)
    """

    def __init__(self, reason: str, *, retryable: bool = False,
                 undelivered: bool = False) -> None:
        super().__init__(reason)
        self.retryable = retryable
        self.undelivered = undelivered


class _Request:
    """A parsed request head plus its body as it arrives (filled by the protocol callbacks,
    drained by the body pump)."""

    __slots__ = (
        "attempts",
        "body",
        "buffered",
        "complete",
        "discard",
        "error",
        "headers",
        "keep_alive",
        "max_body",
        "method",
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


class _BodySent:
    """Set once the whole request body (terminator included) was written upstream."""

    __slots__ = ("done",)

    def __init__(self) -> None:
        self.done = False


class _Connection(asyncio.Protocol):
    """One client connection: parses requests and proxies them one at a time, in order."""

    _transport: asyncio.Transport

    def __init__(self, gateway: Gateway) -> None:
        self._gateway = gateway
        self._config = gateway.config
        self._admission = gateway.admission
        self._loop = asyncio.get_running_loop()
        self._parser = httptools.HttpRequestParser(self)
        self._peer_ip = ""
        self._trusted = False  # the peer is a trusted proxy
        self.task: asyncio.Task[None] | None = None

        # Parser side.
        self._url = b""
        self._headers: http.Headers = []
        self._in_head = False
        self._head_began_now = False
        self._head_bytes = 0
        self._head_trickle = 0
        self._head_timed = False  # the head deadline covers the head being parsed
        self._parsing: _Request | None = None  # request whose body is being parsed
        self._upgraded: _Request | None = None  # receives raw bytes after an Upgrade head
        self._pending: collections.deque[_Request] = collections.deque()
        self._bad_request: tuple[int, str, str] | None = None  # unparseable input, in order
        self._parse_dead = False
        self._lingering = False
        self._last_input = 0.0

        # Handler side.
        self._active: _Request | None = None
        self._last: _Request | None = None  # the latest request handed to the handler
        self._upstream: asyncio.WriteTransport | None = None  # aborted if the client goes
        self._waiter: asyncio.Future[None] | None = None
        self._idle_expired = False
        self._disconnected = False
        self._reading_paused = False
        self._write_paused = False
        self._drain_waiter: asyncio.Future[None] | None = None
        self._status = 0
        self._final_sent = False
        self._response_complete = False
        self._lease: Upstream | None = None
        self._host = ""  # the current exchange's Host, for the per-host counters
        self._stream = False  # the current exchange is an SSE response or a WebSocket tunnel
        self._close_after = False  # the callback path ended the connection's last exchange

        # The callback path (see _try_fast): no task switch for a common exchange.
        self._acquire_nowait: Callable[[str], Upstream | None] | None = getattr(
            gateway.router, "acquire_nowait", None
        )
        self._fast: _Fast | None = None
        self._up_paused = False  # we paused the upstream while the client is slow
        self._limits_seen: Limits | None = None
        self._limits_timeouts = self._timeouts(None)

        # Keep-alive and the limits of the current exchange: one timer per connection,
        # re-armed lazily (see _on_watch).
        self._phase = _NONE
        self._watch: asyncio.TimerHandle | None = None
        self._watch_when = 0.0
        self._deadline = 0.0  # of the keep-alive wait or the time to first byte
        self._ttfb_s = 0.0
        self._silence_s = 0.0
        self._last_io = 0.0  # loop time of the last byte either way
        self._timed_out: str | None = None  # "upstream_timeout" or "stream_silence"

    # -- asyncio.Protocol ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # cast, not isinstance: uvloop's transports do not subclass asyncio.Transport.
        self._transport = cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername")
        if isinstance(peer, tuple) and peer:
            self._peer_ip = str(peer[0])
            trusted = self._config.trusted
            if trusted:  # once per connection, and only when proxies are configured
                self._trusted = self._peer_ip in trusted
        self._gateway._connections.add(self)
        self.task = self._loop.create_task(self._run())

    def data_received(self, data: bytes) -> None:
        self._last_io = self._loop.time()  # client activity keeps a stream alive
        if self._lingering:
            self._last_input = self._last_io
            return
        if self._upgraded is not None:
            self._upgraded.feed(data)
        elif not self._parse_dead:
            self._head_began_now = False
            try:
                self._parser.feed_data(data)
            except httptools.HttpParserUpgrade as exc:
                tail = data[exc.args[0] :]
                if tail and self._upgraded is not None:
                    self._upgraded.feed(tail)
            except httptools.HttpParserError as exc:
                if isinstance(exc.__context__, _HeadTooLarge):
                    self._parse_failed(431, "headers_too_large", "request head too large")
                else:
                    self._parse_failed(400, "malformed_request", f"malformed request: {exc}")
            else:
                if self._in_head:
                    # httptools buffers a partial header line internally: bound what a
                    # slowly trickling head can make it hold.
                    if not self._head_began_now:
                        self._head_trickle += len(data)
                        if self._head_trickle > MAX_HEAD_BYTES:
                            self._parse_failed(431, "headers_too_large",
                                               "request head too large")
                    # An unfinished head: from now on it has head_timeout to complete.
                    # (A head that arrives whole, the common case, never gets here.)
                    if not self._head_timed:
                        self._watch_head()
            if self._pending:
                self._dispatch()
        self._update_reading()

    def eof_received(self) -> bool | None:
        return None  # a client half-close counts as a disconnect: close the transport

    def connection_lost(self, exc: Exception | None) -> None:
        self._disconnected = True
        self._admission.closed(self)
        for req in (self._parsing, self._upgraded, self._active):
            if req is not None:
                req.fail("disconnected")
        if self._fast is not None:
            self._fast_abandon()
        # Let the isolate see the disconnect too.
        if self._upstream is not None:
            self._upstream.abort()
        self._wake_handler()
        if self._drain_waiter is not None and not self._drain_waiter.done():
            self._drain_waiter.set_result(None)

    # Backpressure, upstream -> client: while the client's transport holds more than its
    # high-water mark, the upstream connection is not read at all (on both paths, and in
    # tunnels), so a client that stops reading costs the socket buffers, the transport's
    # high-water mark and the last read. (The task path also waits in _drain_client before
    # each read, and its StreamReader stops reading above 2 * UPSTREAM_BUFFER.)

    def pause_writing(self) -> None:
        self._write_paused = True
        if self._upstream is not None and not self._up_paused:
            self._up_paused = True
            cast(asyncio.ReadTransport, self._upstream).pause_reading()

    def resume_writing(self) -> None:
        self._write_paused = False
        if self._up_paused:
            self._up_paused = False
            upstream = self._upstream
            if upstream is not None and not upstream.is_closing():
                cast(asyncio.ReadTransport, upstream).resume_reading()
        if self._drain_waiter is not None and not self._drain_waiter.done():
            self._drain_waiter.set_result(None)

    def _resume_upstream(self, transport: asyncio.WriteTransport) -> None:
        """An exchange ends: its upstream connection must not go back paused."""
        if self._up_paused:
            self._up_paused = False
            if not transport.is_closing():
                cast(asyncio.ReadTransport, transport).resume_reading()

    # -- httptools callbacks -----------------------------------------------------------------

    def on_message_begin(self) -> None:
        self._url = b""
        self._headers = []
        self._in_head = True
        self._head_began_now = True
        self._head_bytes = 0
        self._head_trickle = 0
        self._head_timed = False

    # The head's size is counted as it is parsed; _HeadTooLarge surfaces as an
    # HttpParserError from feed_data.

    def on_url(self, url: bytes) -> None:
        self._url += url
        self._head_bytes += len(url)
        if self._head_bytes > MAX_HEAD_BYTES:
            raise _HeadTooLarge

    def on_header(self, name: bytes, value: bytes) -> None:
        # After the head these are chunked-body trailers, which are not forwarded.
        if self._in_head:
            self._headers.append((name, value))
            self._head_bytes += len(name) + len(value) + 4
            if self._head_bytes > MAX_HEAD_BYTES:
                raise _HeadTooLarge

    def on_headers_complete(self) -> None:
        self._in_head = False
        p = self._parser
        req = _Request(
            p.get_method(),
            self._url,
            p.get_http_version(),
            self._headers,
            p.should_keep_alive(),
            p.should_upgrade(),
            self._config.max_body_bytes,
        )
        self._parsing = req
        self._pending.append(req)  # data_received then dispatches it (see _dispatch)

    def on_body(self, body: bytes) -> None:
        req = self._parsing
        if req is None or not body:
            return
        req.feed(body)
        # A body being discarded is bounded by DISCARD_LIMIT instead.
        if req.received > req.max_body and not req.discard:
            req.fail("too_large")

    def on_message_complete(self) -> None:
        req = self._parsing
        self._parsing = None
        if req is None:
            return
        if req.upgrade:
            self._upgraded = req  # complete only when the client closes
        else:
            req.complete = True
            req.wake()

    # -- flow control ------------------------------------------------------------------------

    def _parse_failed(self, status: int, code: str, message: str) -> None:
        self._parse_dead = True
        req = self._parsing
        if req is not None and not req.complete:
            req.fail("malformed")  # its body is broken; the exchange answers 400 and closes
        else:
            self._bad_request = (status, code, message)
        self._wake_handler()

    def _update_reading(self) -> None:
        """Stop reading the client while it is ahead of us (body not yet forwarded,
        pipelined requests queued, or nothing more will be parsed)."""
        if (
            not self._reading_paused
            and not self._pending
            and self._parsing is None
            and self._upgraded is None
            and not self._parse_dead
        ):
            return  # reading, and nothing that could pause it (the common case)
        req = self._parsing or self._upgraded
        pause = not self._lingering and (
            self._parse_dead
            or (req is not None and req.buffered > BODY_HIGH_WATER)
            or (self._active is not None and bool(self._pending))
        )
        if pause == self._reading_paused or self._transport.is_closing():
            return
        self._reading_paused = pause
        if pause:
            self._transport.pause_reading()
        else:
            self._transport.resume_reading()

    def _wake_handler(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def close_if_idle(self) -> None:
        """Used by :meth:`Gateway.drain`: wake the handler so an idle connection closes."""
        if self._active is None and not self._pending and not self._in_head:
            self._wake_handler()

    def abort(self) -> None:
        self._transport.abort()

    # -- admission (phloem.admission.Tracked) ------------------------------------------------

    @property
    def evictable(self) -> bool:
        """Waiting for a request head (none is being handled or queued), or only
        draining the input of a connection that is closing."""
        return self._lingering or (
            self._phase == _KEEP_ALIVE and self._active is None and not self._pending)

    def evict(self) -> None:
        """Closed to make room for a new connection (the listener is full)."""
        self._transport.abort()

    def _write(self, data: bytes) -> None:
        if not self._disconnected:
            self._last_io = self._loop.time()  # upstream activity keeps a stream alive
            self._transport.write(data)

    async def _drain_client(self) -> None:
        if self._write_paused and not self._disconnected:
            self._drain_waiter = self._loop.create_future()
            try:
                await self._drain_waiter
            finally:
                self._drain_waiter = None

    # -- limits: time to first byte, stream silence ------------------------------------------

    # Every phase sets a deadline; the timer is moved only when it would fire too late. One
    # that fires early (the deadline moved on since it was armed) re-arms itself, so with the
    # defaults a busy keep-alive connection arms about one timer per keep-alive period
    # instead of one or two per request.

    def _watch_keep_alive(self) -> None:
        """Waiting for the next request head: it must be complete in time (head_timeout
        for a new connection's first one and for one that has begun, else the keep-alive
        timeout)."""
        self._phase = _KEEP_ALIVE
        config = self._config
        timeout = config.keep_alive_timeout
        if self._last is None or self._in_head:
            self._head_timed = self._in_head
            timeout = min(timeout, config.head_timeout)
        self._deadline = deadline = self._loop.time() + timeout
        if self._watch is None or self._watch_when > deadline:
            self._arm(deadline)
        self._admission.waiting(self)

    def _watch_head(self) -> None:
        """A request head has begun and is not complete: it must be within head_timeout."""
        self._head_timed = True
        if self._phase != _KEEP_ALIVE:
            return  # a pipelined head: _watch_keep_alive times it when its turn comes
        deadline = self._loop.time() + self._config.head_timeout
        if deadline < self._deadline:
            self._deadline = deadline
            if self._watch is None or self._watch_when > deadline:
                self._arm(deadline)

    def _head_timed_out(self) -> None:
        """No complete request head in time: a 408 if part of one came, then close."""
        timeout = self._config.head_timeout
        self._admission.limit_hit(
            "head_timeout", self._peer_ip,
            f"no complete request head within {timeout:g} s (head_timeout)")
        if not self._in_head:
            return  # nothing came: nobody to answer
        rid = http.new_request_id()
        self._write(http.error_response(
            408, "request_timeout", f"the request head was not complete within {timeout:g} s",
            rid, close=True))
        self._gateway._record(RequestRecord("", "", "", 408, 0.0, rid.decode("ascii")))

    def _watch_ttfb(self, timeout: float, silence: float) -> None:
        """The request head went upstream: its final response head must start in time."""
        self._phase = _TTFB
        self._ttfb_s = timeout
        self._silence_s = silence
        self._deadline = deadline = self._loop.time() + timeout
        if self._watch is None or self._watch_when > deadline:
            self._arm(deadline)

    def _watch_silence(self) -> None:
        """The final response head arrived: from now on only silence is limited."""
        self._phase = _SILENCE
        self._last_io = now = self._loop.time()
        deadline = now + self._silence_s
        if self._watch is None or self._watch_when > deadline:
            self._arm(deadline)

    def _arm(self, when: float) -> None:
        if self._watch is not None:
            self._watch.cancel()
        self._watch_when = when
        self._watch = self._loop.call_at(when, self._on_watch)

    def _unwatch(self) -> None:
        """Nothing to watch (the timer stays armed: it is cheaper to let it fire early)."""
        self._phase = _NONE

    def _stop_watch(self) -> None:
        self._phase = _NONE
        if self._watch is not None:
            self._watch.cancel()
            self._watch = None

    def _on_watch(self) -> None:
        self._watch = None
        phase = self._phase
        if phase == _NONE:
            return
        if phase != _SILENCE and self._deadline - self._loop.time() > 0.001:
            self._arm(self._deadline)  # armed for an earlier deadline
            return
        if phase == _KEEP_ALIVE:
            self._phase = _NONE
            self._idle_expired = True
            if self._in_head or self._last is None:
                self._head_timed_out()
            self._wake_handler()
        elif phase == _TTFB:
            # The exchange fails with _UpstreamFailed once the read sees the abort; _exchange
            # then answers 504 instead of 502. The app sees its client disconnect.
            self._timed_out = "upstream_timeout"
            logger.info("%s: no response head within %g s", self._host, self._ttfb_s)
            fx = self._fast
            if fx is not None:
                keep = self._error_now(
                    fx.req,
                    fx.rid,
                    504,
                    "upstream_timeout",
                    f"the function did not start responding within {self._ttfb_s:g} s",
                    close=False,
                )
                self._fast_end(reusable=False, keep=keep, abort=True)
            elif self._upstream is not None:
                self._upstream.abort()
        elif phase == _SILENCE:
            deadline = self._last_io + self._silence_s
            if deadline - self._loop.time() > 0.001:
                self._arm(deadline)  # bytes flowed meanwhile
                return
            self._timed_out = "stream_silence"
            logger.info("%s: closed after %g s of silence", self._host, self._silence_s)
            if self._fast is not None:
                self._fast_end(reusable=False, keep=False, abort=True)
            elif self._upstream is not None:
                self._upstream.abort()
            # A peer that stopped reading would keep a graceful close pending forever.
            if self._transport.get_write_buffer_size():
                self._transport.abort()
            else:
                self._transport.close()

    def _become_stream(self) -> None:
        """The exchange is long-lived (SSE, WebSocket): count it apart and tell the lease."""
        if self._stream:
            return
        self._stream = True
        self._gateway._stream_opened(self._host)
        mark = getattr(self._lease, "mark_stream", None)
        if mark is not None:
            try:
                mark()
            except Exception:
                logger.exception("lease.mark_stream failed")

    # -- the callback path -------------------------------------------------------------------
    #
    # A complete request (no body, or all of it already here) that the router can lease an
    # idle upstream connection for at once (``acquire_nowait``) is proxied from callbacks
    # alone: the head goes upstream from data_received, and the upstream connection's
    # _Relay hands response bytes to this connection in the upstream transport's own
    # data_received. No task switch, no StreamReader, no futures. Everything else (bodies
    # still arriving, upgrades, cold starts, routing errors) goes to the connection's task as
    # before; while a callback-path exchange runs, the task waits, so requests are still
    # answered strictly in order.

    def _dispatch(self) -> None:
        """Requests are pending after parsing: serve the first on the callback path when
        the task is idle and it qualifies, else leave it to the task."""
        if self._active is not None:
            return  # the current exchange's end picks it up
        waiter = self._waiter
        if waiter is None or waiter.done() or not self._try_fast(self._pending[0]):
            self._wake_handler()

    def _upstream_head(self, req: _Request, info: http.RequestInfo, rid: bytes) -> bytes:
        return http.upstream_request_head(
            req.method, req.target, req.version, req.headers, info, request_id=rid,
            peer_ip=self._peer_ip, proto=self._config.proto, upgrade=req.upgrade,
            trusted=self._trusted)

    def _timeouts(self, limits: Limits | None) -> tuple[float, float]:
        config = self._config
        ttfb = config.ttfb_timeout
        silence = config.silence_timeout
        if limits is not None:
            if limits.ttfb_timeout is not None:
                ttfb = limits.ttfb_timeout
            if limits.silence_timeout is not None:
                silence = limits.silence_timeout
        return ttfb, silence

    def _try_fast(self, req: _Request) -> bool:
        acquire = self._acquire_nowait
        if (
            acquire is None
            or not req.complete
            or req.upgrade
            or req.error is not None
            or req.attempts
            or req.version not in ("1.1", "1.0")
            or req.method == b"CONNECT"
            or req.received > self._config.max_body_bytes
            or self._write_paused  # the client is behind: the task waits for it first
        ):
            return False
        info = http.scan_request_headers(req.headers)
        if info.host_count != 1 or not info.host:
            return False  # the task path answers these
        host = info.host.decode("latin-1")
        try:
            lease = acquire(host)
        except Exception:
            logger.exception("router.acquire_nowait failed")
            return False
        if lease is None:
            return False
        limits = _limits_of(lease)
        body_limit = limits.max_body_bytes if limits is not None else None
        if body_limit is not None and req.received > body_limit:
            lease.release(reusable=True)  # untouched; the task path answers 413
            return False
        transport = lease.writer.transport
        if transport.is_closing() or lease.reader.at_eof():
            lease.release(reusable=False)
            return False
        relay = transport.get_protocol()
        if not isinstance(relay, _Relay):
            if not isinstance(relay, asyncio.Protocol):
                lease.release(reusable=True)  # untouched
                return False
            # Once per upstream connection (uvloop re-registers the socket on a swap).
            relay = _Relay(relay)
            transport.set_protocol(relay)

        self._pending.popleft()  # data_received updates reading after this
        self._active = self._last = req
        started = self._loop.time()
        rid = _request_id(info)
        self._begin_exchange(host)
        fx = self._fast = _Fast(req, rid, host, started, lease, transport, relay)
        # Replayed on a fresh connection if a pooled one turns out dead (see _exchange).
        has_body = info.chunked or bool(info.content_length)
        fx.replayable = not has_body and req.method in IDEMPOTENT
        self._upstream = transport
        self._lease = lease
        head = self._upstream_head(req, info, rid)  # never an upgrade here (_try_fast)
        body = b""
        if has_body:
            parts = [head]
            if req.body:
                body = req.take()
                parts += http.chunk(body) if info.chunked else [body]
            if info.chunked:
                parts.append(http.LAST_CHUNK)
            head = b"".join(parts)
        if len(head) <= REPLAY_MAX:
            fx.body = body  # the request is whole in hand: it can be sent again
        relay.sink = self
        transport.write(head)
        if limits is not self._limits_seen:  # the same object for every lease of a route
            self._limits_seen = limits
            self._limits_timeouts = self._timeouts(limits)
        self._watch_ttfb(*self._limits_timeouts)
        return True

    def _up_data(self, data: bytes) -> None:
        """Response bytes from the upstream (via its _Relay)."""
        fx = self._fast
        if fx is None:
            return
        state = fx.state
        if state == _F_LENGTH:
            remaining = fx.remaining - len(data)
            resp = fx.resp
            assert resp is not None  # set with the head
            parser = resp.parser
            if remaining > 0:
                fx.remaining = remaining
                parser.feed_data(data)
                self._write(data)
                return
            # Never pass on bytes beyond Content-Length; they make the connection unusable.
            if remaining:
                data = data[: fx.remaining]
            parser.feed_data(data)
            self._write(data)
            self._response_complete = True
            self._fast_end(reusable=fx.keep and not remaining, keep=fx.keep)
        elif state == _F_HEAD:
            self._up_head(fx, data)
        elif state == _F_CHUNKED:
            self._up_chunked(fx, data, b"")
        else:  # delimited by the upstream closing
            self._write(data)

    def _up_head(self, fx: _Fast, data: bytes) -> None:
        fx.received = True
        buf = fx.buf + data if fx.buf else data
        req = fx.req
        # One response head; 1xx interim responses are passed on and followed by more.
        while True:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                if len(buf) > MAX_HEAD_BYTES:
                    self._fast_failed("response head too large", retryable=False)
                else:
                    fx.buf = buf
                return
            head_len = end + 4
            # The connection's parser, while it is in step with the connection's bytes.
            resp = fx.resp = fx.relay.resp or http.ResponseHead()
            fx.relay.resp = None  # until the exchange ends cleanly
            try:
                resp.feed_head(buf[:head_len])
            except http.UpstreamProtocolError as exc:
                self._fast_failed(f"invalid response head: {exc}", retryable=False)
                return
            status = resp.status
            if status == 101:
                self._fast_failed("101 response to a request that did not ask for it")
                return
            if status >= 200:
                break
            self._write(buf[:head_len])
            buf = buf[head_len:]
        fx.buf = b""
        self._status = status
        self._final_sent = True
        keep = fx.keep = resp.keep_alive
        rest_len = len(buf) - head_len
        length = resp.content_length
        if (
            length is not None
            and rest_len >= length
            and not resp.transfer_encoding
            and req.method != b"HEAD"
            and status not in NO_BODY_STATUS
            and not resp.event_stream
        ):
            # The common case: the whole response at once. Not passing on bytes beyond it.
            extra = rest_len > length
            if length:
                resp.parser.feed_data(buf[head_len : head_len + length])  # keep in step
            self._write(buf[: head_len + length] if extra else buf)
            self._response_complete = True
            self._fast_end(reusable=keep and not extra, keep=keep)
            return
        self._watch_silence()
        if req.method == b"HEAD" or status in NO_BODY_STATUS:
            # No body whatever the headers say; anything after the head is junk.
            self._write(buf[:head_len])
            self._response_complete = True
            self._fast_end(reusable=keep and rest_len == 0, keep=keep)
            return
        if resp.event_stream:
            self._become_stream()
        if resp.transfer_encoding or resp.content_length is None:
            if not resp.chunked:
                fx.state = _F_UNTIL_EOF  # body delimited by close
                self._write(buf)
                return
            fx.state = _F_CHUNKED
            self._up_chunked(fx, buf[head_len:], buf[:head_len])
            return
        remaining = resp.content_length
        if rest_len >= remaining:
            extra = rest_len > remaining
            if remaining:
                resp.parser.feed_data(buf[head_len : head_len + remaining])  # keep in step
            self._write(buf[: head_len + remaining] if extra else buf)
            self._response_complete = True
            self._fast_end(reusable=keep and not extra, keep=keep)
            return
        if rest_len:
            resp.parser.feed_data(buf[head_len:])
        self._write(buf)
        fx.state = _F_LENGTH
        fx.remaining = remaining - rest_len

    def _up_chunked(self, fx: _Fast, data: bytes, pending_head: bytes) -> None:
        resp = fx.resp
        assert resp is not None
        if not data:
            if pending_head:
                self._write(pending_head)
            return
        try:
            resp.feed(data)
        except http.UpstreamProtocolError as exc:
            logger.warning("upstream sent a broken chunked body: %s", exc)
            if pending_head:
                self._write(pending_head)
            self._fast_end(reusable=False, keep=False)
            return
        self._write(pending_head + data if pending_head else data)
        if resp.complete:
            self._response_complete = True
            # Bytes after the last chunk cannot be cut off exactly; they went to the client
            # with it, so close both connections.
            ok = resp.keep_alive and not resp.extra_data
            self._fast_end(reusable=ok, keep=ok)

    def _up_closed(self, exc: BaseException | None) -> None:
        """The upstream closed (``exc`` None: end of stream) or reset its connection, or
        refused our write (its _Relay let go of us already)."""
        fx = self._fast
        if fx is None:
            return
        if fx.state == _F_HEAD:
            # Nothing at all came back: maybe a pooled connection the app had closed.
            self._fast_failed(
                "closed before responding" if exc is None else f"connection failed: {exc!r}",
                retryable=not fx.received,
                undelivered=not fx.received and _undelivered(exc),
            )
        elif fx.state == _F_UNTIL_EOF:
            self._response_complete = True
            self._fast_end(reusable=False, keep=False)
        else:
            logger.warning("upstream closed mid-body")
            self._fast_end(reusable=False, keep=False)

    def _fast_failed(
        self, reason: str, *, retryable: bool = False, undelivered: bool = False
    ) -> None:
        """No final response head reached the client: replay on the task path, or 502."""
        fx = self._fast
        assert fx is not None
        req = fx.req
        replay = (undelivered and fx.body is not None) or (
            retryable and fx.replayable and bool(getattr(fx.lease, "replay_safe", True))
        )
        if replay:
            # Hand the request back to the task for its next attempt, under the same
            # request id; the exchange is counted and recorded once, there.
            self._fast_release(fx, reusable=False, abort=False)
            self._active = None
            self._gateway._exchange_ended(fx.host, False)
            req.rid = fx.rid
            req.attempts = 1
            if fx.body:
                req.body = [fx.body]
                req.buffered = len(fx.body)
            self._pending.appendleft(req)
            self._update_reading()
            self._wake_handler()
            return
        logger.warning("upstream for %s failed: %s", fx.host, reason)
        keep = self._error_now(
            req, fx.rid, 502, "upstream_failed", "the function failed to respond", close=False
        )
        self._fast_end(reusable=False, keep=keep)

    def _fast_abandon(self) -> None:
        """The client went away: the upstream connection is aborted so the app sees it."""
        self._fast_end(reusable=False, keep=False, abort=True)

    def _fast_release(self, fx: _Fast, *, reusable: bool, abort: bool) -> None:
        self._fast = None
        self._unwatch()
        relay = fx.relay
        relay.sink = None
        resp = fx.resp
        # Its parser serves the connection's next response if it read exactly this one (not
        # after a HEAD request: the parser would expect the body the head announced).
        if (
            reusable
            and not abort
            and resp is not None
            and resp.complete
            and not resp.extra_data
            and fx.req.method != b"HEAD"
        ):
            relay.resp = resp
        transport = fx.transport
        if not abort:
            self._resume_upstream(transport)
        self._up_paused = False
        self._upstream = None
        self._lease = None
        if abort:
            transport.abort()
        fx.lease.release(reusable=reusable and not abort)

    def _fast_end(self, *, reusable: bool, keep: bool, abort: bool = False) -> None:
        """End the callback-path exchange: give the upstream connection back, record the
        exchange, then wait for the next request or close."""
        fx = self._fast
        if fx is None:
            return
        self._fast_release(fx, reusable=reusable, abort=abort)
        self._end_exchange(fx.req, fx.started, fx.rid, fx.host)
        if self._disconnected:
            return  # connection_lost woke the task already
        if not (keep and fx.req.keep_alive and not self._gateway.draining):
            self._close_after = True
            self._wake_handler()
        elif self._pending or self._bad_request is not None:
            self._wake_handler()
        else:
            self._watch_keep_alive()

    # -- request handling --------------------------------------------------------------------

    async def _run(self) -> None:
        try:
            while (req := await self._next_request()) is not None:
                if not await self._handle(req):
                    break
            last = self._last
            may_be_sending = (
                self._parse_dead
                or bool(self._pending)
                or (last is not None and not last.complete and not last.upgrade)
            )
            if may_be_sending and not self._disconnected and not self._transport.is_closing():
                await self._linger()
        except Exception:
            logger.exception("gateway connection handler failed")
        finally:
            if self._fast is not None:
                self._fast_abandon()
            self._active = None
            self._stop_watch()
            if not self._transport.is_closing():
                self._transport.close()
            self._gateway._connections.discard(self)

    async def _next_request(self) -> _Request | None:
        while True:
            if self._disconnected:
                return None
            # While the callback path runs an exchange, everything else waits for its end.
            if self._fast is None:
                if self._close_after:
                    return None
                if self._pending:
                    req = self._pending.popleft()
                    self._phase = _NONE  # no keep-alive limit while it is handled
                    self._active = self._last = req
                    self._update_reading()
                    return req
                if self._bad_request is not None:
                    await self._reply_bad_request(*self._bad_request)
                    return None
                if self._idle_expired:
                    return None
                if self._gateway.draining and not self._in_head:
                    return None
                if self._phase != _KEEP_ALIVE:
                    self._watch_keep_alive()
            self._waiter = self._loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None

    async def _linger(self) -> None:
        """Half-close, then drop the client's input until it closes (see LINGER_IDLE)."""
        self._lingering = True
        self._admission.waiting(self)  # its response is out: may be closed to make room
        self._update_reading()
        if self._transport.can_write_eof():
            self._transport.write_eof()  # FIN goes out after the queued response
        now = self._last_input = self._loop.time()
        give_up = now + LINGER_TOTAL
        while not self._disconnected and not self._gateway.draining:
            timeout = min(self._last_input + LINGER_IDLE, give_up) - self._loop.time()
            if timeout <= 0:
                return
            self._waiter = self._loop.create_future()
            timer = self._loop.call_later(timeout, self._wake_handler)
            try:
                await self._waiter
            finally:
                self._waiter = None
                timer.cancel()

    async def _handle(self, req: _Request) -> bool:
        """Proxy one request; return whether the client connection stays open."""
        started = self._loop.time()
        info = http.scan_request_headers(req.headers)
        request_id = req.rid or _request_id(info)
        host = (info.host or b"").decode("latin-1")
        self._begin_exchange(host)
        try:
            keep = await self._exchange(req, info, request_id)
            return keep and not self._gateway.draining
        finally:
            self._end_exchange(req, started, request_id, host)

    def _begin_exchange(self, host: str) -> None:
        self._status = 0
        self._final_sent = False
        self._response_complete = False
        self._stream = False
        self._timed_out = None
        self._host = host
        self._gateway._exchange_started(host)

    def _end_exchange(self, req: _Request, started: float, rid: bytes, host: str) -> None:
        self._active = None
        # A stream we closed for silence is not the client's doing.
        if (
            self._disconnected
            and not self._response_complete
            and self._timed_out != "stream_silence"
        ):
            self._status = 499
        self._update_reading()
        gateway = self._gateway
        gateway._exchange_ended(host, self._stream)
        gateway._record(
            RequestRecord(
                host=host,
                method=req.method.decode("latin-1"),
                path=req.target.split(b"?", 1)[0].decode("latin-1"),
                status=self._status,
                duration_s=self._loop.time() - started,
                request_id=rid.decode("ascii"),
                stream=self._stream,
                error=self._timed_out,
            )
        )

    async def _exchange(self, req: _Request, info: http.RequestInfo, rid: bytes) -> bool:
        limit = self._config.max_body_bytes
        if req.error == "malformed":  # a pipelined request whose body failed to parse
            return await self._reply_error(
                req, info, rid, 400, "malformed_request", "malformed request body", close=True
            )
        if req.version not in ("1.1", "1.0"):  # llhttp also accepts 0.9 and 2.0 request lines
            return await self._reply_error(
                req, info, rid, 505, "http_version_not_supported", "use HTTP/1.1", close=True
            )
        if req.method == b"CONNECT":
            return await self._reply_error(
                req, info, rid, 405, "method_not_allowed", "CONNECT is not supported", close=True
            )
        if info.host_count > 1:
            return await self._reply_error(
                req, info, rid, 400, "bad_request", "more than one Host header", close=True
            )
        if not info.host:
            return await self._reply_error(
                req, info, rid, 400, "missing_host", "the request has no Host header"
            )
        if req.error == "too_large" or (
            info.content_length is not None and info.content_length > limit
        ):
            return await self._reply_error(
                req, info, rid, 413, "body_too_large", f"request body exceeds {limit} bytes"
            )
        host = info.host.decode("latin-1")
        # A client that sends requests but does not read the responses would otherwise
        # have each one's first read pile up in its transport.
        await self._drain_client()
        if self._disconnected:
            return False
        # A request without a body can be replayed if a pooled connection was already dead.
        replayable = req.method in IDEMPOTENT and not info.has_body and not req.upgrade
        # A request handed over by the callback path has had its first attempt.
        attempt = req.attempts
        while True:
            attempt += 1
            try:
                lease = await self._gateway.router.acquire(host)
            except RouteError as exc:
                status = exc.status if 400 <= exc.status <= 599 else 502
                return await self._reply_error(req, info, rid, status, exc.code, exc.message)
            except Exception as exc:
                logger.warning("cannot reach upstream for %s: %r", host, exc)
                return await self._reply_error(
                    req, info, rid, 502, "upstream_failed", "the function could not be reached"
                )
            if self._disconnected:
                lease.release(reusable=True)  # untouched: still good
                return False
            limits = _limits_of(lease)
            if limits is not None and limits.max_body_bytes is not None:
                if limits.max_body_bytes < limit:
                    limit = req.max_body = limits.max_body_bytes
                over = req.received > limit
                if over or (info.content_length is not None and info.content_length > limit):
                    if over:
                        req.fail("too_large")  # stop buffering what is still coming
                    lease.release(reusable=True)  # untouched: still good
                    return await self._reply_error(
                        req, info, rid, 413, "body_too_large", f"request body exceeds {limit} bytes"
                    )
            try:
                keep = await self._proxy(req, info, rid, lease, limits)
            except _UpstreamFailed as exc:
                failure = exc
            else:
                if keep and not req.complete:
                    # The app answered before the body was all read: drop the rest, with
                    # the lease already back in the pool.
                    keep = await self._discard_body(req, info)
                return keep
            if self._disconnected:
                return False
            if self._timed_out == "upstream_timeout":
                return await self._reply_error(
                    req,
                    info,
                    rid,
                    504,
                    "upstream_timeout",
                    f"the function did not start responding within {self._ttfb_s:g} s",
                )
            if req.error == "too_large":
                return await self._reply_error(
                    req, info, rid, 413, "body_too_large", f"request body exceeds {limit} bytes"
                )
            if req.error == "malformed":
                return await self._reply_error(
                    req, info, rid, 400, "malformed_request", "malformed request body", close=True
                )
            # A router may forbid replays (``lease.replay_safe = False``): when a failed
            # connection means the upstream process failed, replaying the request (maybe
            # the one that crashed it) would do the work twice.
            allowed = bool(getattr(lease, "replay_safe", True))
            # A request the upstream never read is sent again regardless (see
            # _UpstreamFailed); _proxy put its body back.
            if not (
                (failure.undelivered and attempt < MAX_ATTEMPTS)
                or (failure.retryable and replayable and allowed and attempt == 1)
            ):
                break
        logger.warning("upstream for %s failed: %s", host, failure)
        return await self._reply_error(
            req, info, rid, 502, "upstream_failed", "the function failed to respond"
        )

    async def _proxy(
        self,
        req: _Request,
        info: http.RequestInfo,
        rid: bytes,
        lease: Upstream,
        limits: Limits | None,
    ) -> bool:
        """Forward ``req`` over ``lease`` (released here, exactly once) and stream the
        response back. Raises :class:`_UpstreamFailed` if nothing final reached the client."""
        writer = lease.writer
        reusable = False
        pump: asyncio.Task[None] | None = None
        sent = _BodySent()
        whole: bytes | None = None  # the body, while the request can still be sent again
        ttfb, silence = self._timeouts(limits)
        self._upstream = writer.transport
        self._lease = lease
        try:
            head = self._upstream_head(req, info, rid)
            if req.upgrade:
                writer.write(head)
                pump = self._loop.create_task(self._pump_raw(req, writer))
            elif not info.has_body:
                writer.write(head)
                sent.done = True
                whole = b"" if len(head) <= REPLAY_MAX else None
            elif req.complete:
                # Common case: the whole body came with the head; one write, no task.
                parts = [head]
                body = b""
                if req.body:
                    body = req.take()
                    parts += http.chunk(body) if info.chunked else [body]
                if info.chunked:
                    parts.append(http.LAST_CHUNK)
                data = b"".join(parts)
                writer.write(data)
                sent.done = True
                whole = body if len(data) <= REPLAY_MAX else None
            else:
                writer.write(head)
                pump = self._loop.create_task(self._pump_body(req, writer, info.chunked, sent))
            self._watch_ttfb(ttfb, silence)
            try:
                upstream_ok, keep = await self._pump_response(req, lease.reader)
            except _UpstreamFailed as exc:
                if exc.undelivered:
                    if whole is None:
                        exc.undelivered = False  # not all of it is in hand any more
                    elif whole:
                        req.body = [whole]  # for the next attempt
                        req.buffered = len(whole)
                raise
            if req.upgrade:
                return False  # tunnel over, or upgrade refused: the connection is spent
            # If the app answered before the body was all forwarded, the connection is out of
            # step (the pump is cancelled below).
            reusable = upstream_ok and sent.done
            return keep and req.keep_alive
        finally:
            self._unwatch()
            self._resume_upstream(writer.transport)
            self._upstream = None
            self._lease = None
            if pump is not None and not pump.done():
                pump.cancel()
            lease.release(reusable=reusable)

    async def _pump_body(
        self, req: _Request, writer: asyncio.StreamWriter, chunked: bool, sent: _BodySent
    ) -> None:
        """Client -> upstream request body, as it arrives; at most BODY_HIGH_WATER bytes
        per write, each after the upstream took the previous one (drain), so that a
        function that does not read costs the gateway about twice that (plus the last read
        from the client), not a whole client read more."""
        try:
            while True:
                if req.body:
                    data = req.take(BODY_HIGH_WATER)
                    self._update_reading()
                    writer.writelines(http.chunk(data) if chunked else [data])
                    if req.body:
                        await writer.drain()
                        continue
                if req.error is not None:
                    # Abort so the app sees the broken request; the response pump reports it.
                    writer.transport.abort()
                    return
                if req.complete:
                    if chunked:
                        writer.write(http.LAST_CHUNK)
                    sent.done = True
                    return
                await writer.drain()
                if not req.body and not req.complete and req.error is None:
                    await req.wait()
        except (ConnectionError, OSError):
            return  # the upstream went away; the response pump sees it too

    async def _pump_raw(self, req: _Request, writer: asyncio.StreamWriter) -> None:
        """Client -> upstream bytes after an Upgrade request head, until the client closes
        (in slices, as _pump_body)."""
        try:
            while req.error is None:
                if req.body:
                    writer.write(req.take(BODY_HIGH_WATER))
                    self._update_reading()
                    await writer.drain()
                else:
                    await req.wait()
        except (ConnectionError, OSError):
            return

    async def _pump_response(
        self, req: _Request, reader: asyncio.StreamReader
    ) -> tuple[bool, bool]:
        """Upstream -> client, raw. Returns (upstream connection reusable, client keep-alive)."""
        buf = b""
        received = False
        while True:
            # One response head; 1xx interim responses are passed on and followed by more.
            end = buf.find(b"\r\n\r\n")
            while end < 0:
                if len(buf) > MAX_HEAD_BYTES:
                    raise _UpstreamFailed("response head too large")
                data, error = await _read_or_error(reader)
                if not data:
                    # Nothing at all came back: maybe a pooled connection the app had closed.
                    raise _UpstreamFailed(
                        "closed before responding" if error is None
                        else f"connection failed: {error!r}",
                        retryable=not received,
                        undelivered=not received and _undelivered(error),
                    )
                received = True
                buf += data
                end = buf.find(b"\r\n\r\n", max(0, len(buf) - len(data) - 3))
            head_len = end + 4
            try:
                resp = http.parse_response_head(buf[:head_len])
            except http.UpstreamProtocolError as exc:
                raise _UpstreamFailed(f"invalid response head: {exc}") from exc
            status = resp.status
            if self._timed_out is not None:
                # The head came in just as the TTFB limit fired: the upstream is gone already.
                raise _UpstreamFailed("response head after the time-to-first-byte limit")
            if status == 101:
                if not req.upgrade:
                    raise _UpstreamFailed("101 response to a request that did not ask for it")
                self._status = status
                self._final_sent = True
                self._watch_silence()
                self._become_stream()
                self._write(buf)  # the head and any early tunnel bytes
                await self._tunnel(reader)
                self._response_complete = True
                return False, False
            if status >= 200:
                break
            self._write(buf[:head_len])
            buf = buf[head_len:]

        self._status = status
        self._final_sent = True
        self._watch_silence()
        keep = resp.keep_alive
        rest_len = len(buf) - head_len

        if req.method == b"HEAD" or status in NO_BODY_STATUS:
            # No body whatever the headers say; anything after the head is junk.
            self._write(buf[:head_len])
            self._response_complete = True
            return keep and rest_len == 0, keep

        if resp.event_stream:
            self._become_stream()

        if resp.transfer_encoding or resp.content_length is None:
            if not resp.chunked:
                await self._forward_until_eof(buf, reader)  # body delimited by close
                self._response_complete = not self._disconnected
                return False, False
            return await self._forward_chunked(resp, buf, head_len, reader)

        # Content-Length: count ourselves, and never pass on bytes beyond it.
        remaining = resp.content_length
        first = min(rest_len, remaining)
        extra = rest_len > first
        self._write(buf[: head_len + first] if extra else buf)
        remaining -= first
        while remaining > 0:
            await self._drain_client()
            if self._disconnected:
                return False, False
            data = await _read(reader)
            if not data:
                if not self._disconnected and self._timed_out is None:  # else we closed it
                    logger.warning("upstream closed mid-body (%d bytes missing)", remaining)
                return False, False
            if len(data) > remaining:
                extra = True
                data = data[:remaining]
            remaining -= len(data)
            self._write(data)
        self._response_complete = True
        return keep and not extra, keep

    async def _forward_chunked(
        self, resp: http.ResponseHead, buf: bytes, head_len: int, reader: asyncio.StreamReader
    ) -> tuple[bool, bool]:
        data = buf[head_len:]
        pending_head = buf[:head_len]
        while True:
            if data:
                try:
                    resp.feed(data)
                except http.UpstreamProtocolError as exc:
                    logger.warning("upstream sent a broken chunked body: %s", exc)
                    self._write(pending_head)
                    return False, False
                self._write(pending_head + data if pending_head else data)
                pending_head = b""
                if resp.complete:
                    self._response_complete = True
                    # Bytes after the last chunk cannot be cut off exactly; they went to the
                    # client with it, so close both connections.
                    ok = resp.keep_alive and not resp.extra_data
                    return ok, ok
            elif pending_head:
                self._write(pending_head)
                pending_head = b""
            await self._drain_client()
            if self._disconnected:
                return False, False
            data = await _read(reader)
            if not data:
                if not self._disconnected and self._timed_out is None:  # else we closed it
                    logger.warning("upstream closed mid-body (chunked)")
                return False, False

    async def _forward_until_eof(self, data: bytes, reader: asyncio.StreamReader) -> None:
        while data:
            self._write(data)
            await self._drain_client()
            if self._disconnected:
                return
            data = await _read(reader)

    async def _tunnel(self, reader: asyncio.StreamReader) -> None:
        """Upstream -> client bytes after a 101, until either side closes."""
        while not self._disconnected:
            await self._drain_client()
            data = await _read(reader)
            if not data:
                return
            self._write(data)

    # -- gateway-made responses --------------------------------------------------------------

    async def _reply_error(
        self,
        req: _Request,
        info: http.RequestInfo,
        rid: bytes,
        status: int,
        code: str,
        message: str,
        *,
        close: bool = False,
    ) -> bool:
        if self._disconnected:
            return False
        if self._final_sent:
            return False  # too late for a clean error: just close
        can_keep = self._error_now(
            req,
            rid,
            status,
            code,
            message,
            close=close or (not req.complete and not self._can_discard(req, info)),
        )
        if not can_keep:
            return False
        return req.complete or await self._discard_body(req, info)

    def _error_now(
        self, req: _Request, rid: bytes, status: int, code: str, message: str, *, close: bool
    ) -> bool:
        """Write a gateway-made error response; return whether the connection may stay."""
        can_keep = not close and req.keep_alive and not req.upgrade and not self._gateway.draining
        self._write(
            http.error_response(
                status,
                code,
                message,
                rid,
                close=not can_keep,
                head_only=req.method == b"HEAD",
                http10_keep_alive=req.version == "1.0",
            )
        )
        self._status = status
        self._final_sent = True
        self._response_complete = True
        return can_keep

    def _can_discard(self, req: _Request, info: http.RequestInfo) -> bool:
        # A client waiting for 100 Continue may never send the body: do not wait for it.
        if req.error is not None or info.expect_continue:
            return False
        return info.content_length is None or info.content_length - req.received <= DISCARD_LIMIT

    async def _discard_body(self, req: _Request, info: http.RequestInfo) -> bool:
        """Read and drop the rest of the request body so the connection can be reused."""
        if not self._can_discard(req, info):
            return False
        req.discard = True
        req.body.clear()
        req.buffered = 0
        self._update_reading()
        start = req.received
        # asyncio.timeout rather than wait_for: no extra task between the check and the wait,
        # so a wake-up cannot be lost.
        try:
            async with asyncio.timeout(DISCARD_TIMEOUT):
                while not req.complete:
                    if req.error is not None or req.received - start > DISCARD_LIMIT:
                        return False
                    await req.wait()
        except TimeoutError:
            return False
        return True

    async def _reply_bad_request(self, status: int, code: str, message: str) -> None:
        rid = http.new_request_id()
        self._write(http.error_response(status, code, message, rid, close=True))
        self._gateway._record(RequestRecord("", "", "", status, 0.0, rid.decode("ascii")))


def _request_id(info: http.RequestInfo) -> bytes:
    """The client's X-Request-Id when it is sane, else a new one."""
    rid = info.request_id
    if rid is not None and http.sane_request_id(rid):
        return rid
    return http.new_request_id()


# Where a callback-path exchange is in the response.
_F_HEAD, _F_LENGTH, _F_CHUNKED, _F_UNTIL_EOF = 0, 1, 2, 3


class _Fast:
    """One exchange on the callback path (see ``_Connection._try_fast``)."""

    __slots__ = (
        "body",
        "buf",
        "host",
        "keep",
        "lease",
        "received",
        "relay",
        "remaining",
        "replayable",
        "req",
        "resp",
        "rid",
        "started",
        "state",
        "transport",
    )

    def __init__(
        self,
        req: _Request,
        rid: bytes,
        host: str,
        started: float,
        lease: Upstream,
        transport: asyncio.WriteTransport,
        relay: _Relay,
    ) -> None:
        self.req = req
        self.relay = relay
        self.rid = rid
        self.host = host
        self.started = started
        self.lease = lease
        self.transport = transport
        self.replayable = False
        # The request body while all of the request can be sent again (see REPLAY_MAX).
        self.body: bytes | None = None
        self.state = _F_HEAD
        self.buf = b""
        self.received = False  # any response byte at all
        self.keep = False  # the upstream's response allows reuse
        self.remaining = 0  # of a Content-Length body
        self.resp: http.ResponseHead | None = None  # of a chunked body


class _Relay(asyncio.Protocol):
    """Installed once on an upstream connection (``transport.set_protocol``) in front of its
    own protocol (the lease's StreamReaderProtocol), to which it passes everything on,
    except while a client connection is its ``sink``: then response bytes go to that
    connection directly, in the upstream transport's callback. The end of the connection
    reaches both, so the lease's reader and writer stay consistent either way."""

    __slots__ = ("orig", "resp", "sink")

    def __init__(self, orig: asyncio.Protocol) -> None:
        self.orig = orig
        self.sink: _Connection | None = None
        # A response parser in step with the connection, kept for its next response.
        self.resp: http.ResponseHead | None = None

    def data_received(self, data: bytes) -> None:
        sink = self.sink
        if sink is None:
            self.resp = None  # bytes it does not see: no longer in step
            self.orig.data_received(data)
        else:
            sink._up_data(data)

    def eof_received(self) -> bool | None:
        keep_open = self.orig.eof_received()
        sink = self.sink
        if sink is not None:
            self.sink = None
            sink._up_closed(None)
        return keep_open

    def connection_lost(self, exc: Exception | None) -> None:
        self.orig.connection_lost(exc)
        sink = self.sink
        if sink is not None:
            self.sink = None
            sink._up_closed(exc)

    def pause_writing(self) -> None:
        self.orig.pause_writing()

    def resume_writing(self) -> None:
        self.orig.resume_writing()


async def _read(reader: asyncio.StreamReader) -> bytes:
    """Read from the upstream; a reset reads as end of stream."""
    try:
        return await reader.read(READ_SIZE)
    except (ConnectionError, OSError):
        return b""


async def _read_or_error(reader: asyncio.StreamReader) -> tuple[bytes, BaseException | None]:
    """Read from the upstream: (data, None), (b"", None) at the end, (b"", error)."""
    try:
        return await reader.read(READ_SIZE), None
    except (ConnectionError, OSError) as exc:
        return b"", exc


def _undelivered(exc: BaseException | None) -> bool:
    """Does this connection failure prove the upstream never read what we sent? EPIPE on
    our write (its end was already closed) or ECONNRESET (it went away with our bytes
    unread: a Unix socket resets its peer only then, and so does a TCP close, dying or
    not; a TCP app that read a request and then aborted on purpose would look the same,
    which is why this is for upstreams that do not: the platform's are Unix sockets)."""
    return isinstance(exc, (BrokenPipeError, ConnectionResetError))


def _limits_of(lease: Upstream) -> Limits | None:
    # Optional on a lease (see gateway.routing): a lease without it gets the defaults.
    limits = getattr(lease, "limits", None)
    return limits if isinstance(limits, Limits) else None


def _decrement(counts: dict[str, int], key: str) -> None:
    n = counts.get(key, 0) - 1
    if n > 0:
        counts[key] = n
    else:
        counts.pop(key, None)  # unbounded Host values must not pile up


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
        #: Connection limits (see phloem.admission); trusted proxies have no per-peer cap.
        self.admission = Admission(
            "gateway",
            AdmissionConfig(max_connections=config.max_connections,
                            max_per_peer=config.max_connections_per_peer,
                            head_timeout_s=config.head_timeout),
            exempt=trusted.__contains__ if trusted else None)
        self._server: Listener | None = None
        self._port: int | None = None
        self._connections: set[_Connection] = set()
        self._draining = False
        self._inflight = 0
        self._open_streams = 0
        self._inflight_by_host: dict[str, int] = {}
        self._streams_by_host: dict[str, int] = {}

    async def start(self) -> None:
        try:
            # Our own accept loop: it applies the connection limits and never drops a
            # connection unanswered when out of descriptors (see phloem.admission).
            self._server = await Listener.open(
                self.config.host,
                self.config.port,
                lambda: _Connection(self),
                self.admission,
                backlog=1024,
            )
        except OSError as exc:
            raise OSError(
                exc.errno,
                f"gateway cannot listen on {self.config.host}:{self.config.port}: "
                f"{exc.strerror or exc}",
            ) from exc
        self._port = int(self._server.sockets[0].getsockname()[1])

    @property
    def port(self) -> int:
        """The bound port (useful when ``config.port`` is 0)."""
        if self._port is None:
            raise RuntimeError("the gateway has not been started")
        return self._port

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
        return self._inflight

    @property
    def open_streams(self) -> int:
        """Exchanges that became streams: SSE responses and WebSocket tunnels."""
        return self._open_streams

    @property
    def inflight_by_host(self) -> dict[str, int]:
        """:attr:`inflight` per raw Host header value (a copy; hosts at zero are absent)."""
        return dict(self._inflight_by_host)

    @property
    def open_streams_by_host(self) -> dict[str, int]:
        """:attr:`open_streams` per raw Host header value (a copy; hosts at zero are absent)."""
        return dict(self._streams_by_host)

    async def stop_accepting(self) -> None:
        # Not wait_closed(): on Python 3.12+ it also waits for every open connection.
        if self._server is not None:
            self._server.close()
            self._server = None

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

    def _exchange_started(self, host: str) -> None:
        self._inflight += 1
        self._inflight_by_host[host] = self._inflight_by_host.get(host, 0) + 1

    def _stream_opened(self, host: str) -> None:
        self._inflight -= 1
        _decrement(self._inflight_by_host, host)
        self._open_streams += 1
        self._streams_by_host[host] = self._streams_by_host.get(host, 0) + 1

    def _exchange_ended(self, host: str, stream: bool) -> None:
        if stream:
            self._open_streams -= 1
            _decrement(self._streams_by_host, host)
        else:
            self._inflight -= 1
            _decrement(self._inflight_by_host, host)

    def _record(self, record: RequestRecord) -> None:
        if self._on_request is not None:
            try:
                self._on_request(record)
            except Exception:
                logger.exception("on_request callback failed")
