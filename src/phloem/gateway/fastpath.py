"""The gateway's callback path: a common exchange without a task switch.

A complete request (no body, or all of it already here) that the router can lease an idle
upstream connection for at once (``Router.acquire_nowait``) is proxied from callbacks alone:
the head goes upstream from the client connection's ``data_received``, and the upstream
connection's :class:`_Relay` hands response bytes to the exchange in the upstream
transport's own ``data_received``, where a
:class:`~phloem.gateway.framing.ResponseFramer` turns them into client bytes. No task
switch, no StreamReader, no futures. Everything else (bodies still arriving, upgrades, cold
starts, routing errors) goes to the connection's task (:mod:`phloem.gateway.upstream`);
while a callback-path exchange runs, the task waits, so requests are still answered
strictly in order.

    if fastpath.try_fast(conn, conn.pending[0]):
        ...   # the exchange runs; conn.fast is its FastExchange until it ends
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Final

from phloem.gateway import http
from phloem.gateway.framing import (
    DONE,
    FAILED,
    HEAD,
    IDEMPOTENT,
    REPLAY_MAX,
    UPSTREAM_FAILED,
    ResponseFramer,
    may_replay,
    request_bytes,
    upstream_timeout,
)
from phloem.gateway.request import Request, request_id
from phloem.gateway.routing import Upstream

if TYPE_CHECKING:
    from phloem.gateway.connection import _Connection

__all__ = ["HOLD_MAX", "FastExchange", "_Relay", "try_fast"]

logger = logging.getLogger("phloem.gateway")

# A response head with at most this much Content-Length body still to come is held until
# the body is here, so that the client gets one write.
HOLD_MAX: Final = 64 * 1024


def try_fast(conn: _Connection, req: Request) -> bool:
    """Start ``req`` (the first pending request) on the callback path if it qualifies and
    an upstream connection is available at once; else leave it to the task."""
    host_b = req.host  # a plain head's: HTTP/1.1, no body, no upgrade, nothing else to read
    info: http.RequestInfo | None = None
    if host_b is not None:
        if not req.complete or req.attempts or conn.write_paused:
            return False
    else:
        if (
            not req.complete
            or req.upgrade
            or req.error is not None
            or req.attempts
            or req.version not in ("1.1", "1.0")
            or req.method == b"CONNECT"
            or req.received > conn.config.max_body_bytes
            or conn.write_paused  # the client is behind: the task waits for it first
        ):
            return False
        info = http.scan_request_headers(req.headers)
        host_b = info.host
        if info.host_count != 1 or not host_b:
            return False  # the task path answers these
    host = host_b.decode("latin-1")
    try:
        lease = conn.acquire_nowait(host)
    except Exception:
        logger.exception("router.acquire_nowait failed")
        return False
    if lease is None:
        return False
    limits = lease.limits
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

    conn.pending.popleft()  # data_received updates reading after this
    conn.active = conn.last = req
    started = conn.last_io  # loop time, stamped by data_received in this same callback
    # request_id() only when the client sent one (a call less for most requests).
    rid = request_id(info) if info is not None and info.request_id is not None \
        else http.new_request_id()
    conn.begin_exchange(host)
    # The relay's parser is in step with the connection; until the exchange ends cleanly
    # it is the framer's alone.
    framer = ResponseFramer(req.method == b"HEAD", False, relay.resp,
                            limits.response_headers if limits is not None else b"",
                            not req.keep_alive or conn.gateway.draining,
                            info is not None and req.keep_alive and req.version == "1.0")
    relay.resp = None
    fx = conn.fast = FastExchange(conn, req, rid, host, started, lease, transport, relay,
                                  framer)
    conn.upstream = transport
    conn.lease = lease
    body = b""
    if info is None:  # plain: no body, and forwarded as it came when it came alone
        fx.replayable = req.method in IDEMPOTENT
        head = (http.plain_request_head(req.raw, conn.forwarded_for, rid, conn.proto, host_b)
                if req.raw else conn.upstream_head(req, http.scan_request_headers(req.headers),
                                                   rid))
    else:
        head = conn.upstream_head(req, info, rid)  # never an upgrade here
        if info.chunked or info.content_length:
            if req.body:
                body = req.take()
            head = request_bytes(head, body, chunked=info.chunked)
        else:
            # Replayed on a fresh connection if a pooled one turns out dead (see may_replay).
            fx.replayable = req.method in IDEMPOTENT
    if len(head) <= REPLAY_MAX:
        fx.body = body  # the request is whole in hand: it can be sent again
    relay.sink = fx
    transport.write(head)
    if limits is not conn.limits_seen:  # the same object for every lease of a route
        conn.limits_seen = limits
        conn.limits_timeouts = conn.timeouts(limits)
    ttfb, silence = conn.limits_timeouts
    conn.watch.ttfb(ttfb, silence, started)  # started: this callback's loop time
    return True


class FastExchange:
    """One exchange on the callback path (see :func:`try_fast`)."""

    __slots__ = (
        "body",
        "conn",
        "framer",
        "held",
        "host",
        "lease",
        "relay",
        "replayable",
        "req",
        "rid",
        "started",
        "transport",
    )

    def __init__(
        self,
        conn: _Connection,
        req: Request,
        rid: bytes,
        host: str,
        started: float,
        lease: Upstream,
        transport: asyncio.WriteTransport,
        relay: _Relay,
        framer: ResponseFramer,
    ) -> None:
        self.conn = conn
        self.req = req
        self.rid = rid
        self.host = host
        self.started = started
        self.lease = lease
        self.transport = transport
        self.relay = relay
        self.framer = framer
        # An idempotent bodiless request, which a lease may allow to send again.
        self.replayable = False
        # The request body while all of the request can be sent again (see REPLAY_MAX).
        self.body: bytes | None = None
        # Response bytes held back until the rest of a small response is here (see data).
        self.held = b""

    def data(self, data: bytes) -> None:
        """Response bytes from the upstream (via its _Relay)."""
        framer = self.framer
        event = framer.feed(data)
        out = framer.out
        held = self.held
        if held:
            out = held + out
            self.held = b""
        if event < DONE and framer.small_body_due(HOLD_MAX - len(out)):
            # A small response whose body comes in another read (an ASGI server writes
            # the head on http.response.start): one write to the client for all of it.
            self.held = out
            conn = self.conn
            conn.last_io = conn.loop.time()  # upstream activity, as a write would stamp
            if event == HEAD:
                self._event(event)
            return
        if out:
            self.conn.write(out)
        if event:
            self._event(event)

    def closed(self, exc: BaseException | None) -> None:
        """The upstream closed (``exc`` None: end of stream) or reset its connection, or
        refused our write (its _Relay let go of us already)."""
        self._flush()
        event = self.framer.closed(exc)
        if event:
            self._event(event)

    def _flush(self) -> None:
        """Send what is held (see data) before the exchange ends otherwise."""
        held = self.held
        if held:
            self.held = b""
            self.conn.write(held)

    def _event(self, event: int) -> None:
        framer = self.framer
        conn = self.conn
        if event == DONE:
            if not conn.final_sent:
                conn.head_sent(framer)
            if framer.complete:
                conn.response_complete = True
            else:
                logger.warning("upstream for %s: %s", self.host, framer.reason)
            self.end(reusable=framer.reusable, keep=framer.keep)
        elif event == HEAD:
            conn.head_sent(framer)
            conn.watch_silence()
        elif event == FAILED:
            self._failed()

    def _failed(self) -> None:
        """No final response head reached the client: replay on the task path, or 502."""
        framer = self.framer
        conn = self.conn
        req = self.req
        if may_replay(undelivered=framer.undelivered, whole=self.body is not None,
                      retryable=framer.retryable, idempotent=self.replayable,
                      replay_safe=self.lease.replay_safe, attempt=1):
            # Hand the request back to the task for its next attempt, under the same
            # request id; the exchange is counted and recorded once, there.
            self._release(reusable=False, abort=False)
            conn.active = None
            conn.exchanging = False
            req.rid = self.rid
            req.attempts = 1
            if self.body:
                req.put_back(self.body)
            conn.pending.appendleft(req)
            conn.update_reading()
            conn.wake_handler()
            return
        logger.warning("upstream for %s failed: %s", self.host, framer.reason)
        keep = conn.error_now(req, self.rid, *UPSTREAM_FAILED, close=False)
        self.end(reusable=False, keep=keep)

    def timed_out(self, ttfb_s: float) -> None:
        """No response head within the time-to-first-byte limit: 504, and the upstream
        connection is aborted so the app sees its client go."""
        keep = self.conn.error_now(self.req, self.rid, *upstream_timeout(ttfb_s), close=False)
        self.end(reusable=False, keep=keep, abort=True)

    def abandon(self) -> None:
        """The client went away: the upstream connection is aborted so the app sees it."""
        self.end(reusable=False, keep=False, abort=True)

    def _release(self, *, reusable: bool, abort: bool) -> None:
        conn = self.conn
        conn.fast = None
        conn.watch.unwatch()
        relay = self.relay
        relay.sink = None
        if reusable and not abort:
            relay.resp = self.framer.next_parser()  # serves the connection's next response
        transport = self.transport
        if not abort and conn.up_paused:
            conn.resume_upstream(transport)
        conn.up_paused = False
        conn.upstream = None
        conn.lease = None
        if abort:
            transport.abort()
        self.lease.release(reusable=reusable and not abort)

    def end(self, *, reusable: bool, keep: bool, abort: bool = False) -> None:
        """End the exchange: give the upstream connection back, record the exchange, then
        wait for the next request or close."""
        conn = self.conn
        if conn.fast is not self:
            return
        self._flush()  # (not written if the client went away)
        self._release(reusable=reusable, abort=abort)
        conn.end_exchange(self.req, self.started, self.rid, self.host)
        conn.fast_ended(self.req, keep)


class _Relay(asyncio.Protocol):
    """Installed once on an upstream connection (``transport.set_protocol``) in front of its
    own protocol (the lease's StreamReaderProtocol), to which it passes everything on,
    except while a callback-path exchange is its ``sink``: then response bytes go to that
    exchange directly, in the upstream transport's callback. The end of the connection
    reaches both, so the lease's reader and writer stay consistent either way."""

    __slots__ = ("orig", "resp", "sink")

    def __init__(self, orig: asyncio.Protocol) -> None:
        self.orig = orig
        self.sink: FastExchange | None = None
        # A response parser in step with the connection, kept for its next response.
        self.resp: http.ResponseHead | None = None

    def data_received(self, data: bytes) -> None:
        sink = self.sink
        if sink is None:
            self.resp = None  # bytes it does not see: no longer in step
            self.orig.data_received(data)
        else:
            sink.data(data)

    def eof_received(self) -> bool | None:
        keep_open = self.orig.eof_received()
        sink = self.sink
        if sink is not None:
            self.sink = None
            sink.closed(None)
        return keep_open

    def connection_lost(self, exc: Exception | None) -> None:
        self.orig.connection_lost(exc)
        sink = self.sink
        if sink is not None:
            self.sink = None
            sink.closed(exc)

    def pause_writing(self) -> None:
        self.orig.pause_writing()

    def resume_writing(self) -> None:
        self.orig.resume_writing()
