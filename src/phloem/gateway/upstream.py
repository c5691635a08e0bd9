"""The gateway's task path: route a request, relay it upstream and the response back, from
the client connection's task.

For each request :func:`exchange` answers what needs no upstream (bad requests, 413),
leases an upstream connection from the :class:`~phloem.gateway.routing.Router` (a cold
start waits here), and :func:`proxy` writes the rewritten request head, then runs two pumps
at once: the request body (client -> upstream, re-framed if chunked) and the response
(upstream -> client, framed by a :class:`~phloem.gateway.framing.ResponseFramer`). Response
bytes are forwarded as received, so streams are never buffered; both directions apply
backpressure. A request the upstream failed to answer is sent again when
:func:`~phloem.gateway.framing.may_replay` says so.

    keep = await exchange(conn, req, info, rid)   # from _Connection._handle
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from phloem.gateway import http
from phloem.gateway.framing import (
    DONE,
    FAILED,
    HEAD,
    IDEMPOTENT,
    MORE,
    REPLAY_MAX,
    TUNNEL,
    UPSTREAM_FAILED,
    ResponseFramer,
    may_replay,
    request_bytes,
    upstream_timeout,
)
from phloem.gateway.request import BODY_HIGH_WATER, BodySent, Request
from phloem.gateway.routing import Limits, RouteError, Upstream

if TYPE_CHECKING:
    from phloem.gateway.connection import _Connection

__all__ = ["DISCARD_LIMIT", "DISCARD_TIMEOUT", "READ_SIZE", "UpstreamFailed", "discard_body",
           "exchange", "proxy", "reply_error"]

logger = logging.getLogger("phloem.gateway")

READ_SIZE = 64 * 1024
# After an early error response, at most this much request body is read and thrown away to
# keep the connection alive; beyond that (or after DISCARD_TIMEOUT) the connection is closed.
DISCARD_LIMIT = 1024 * 1024
DISCARD_TIMEOUT = 5.0


class UpstreamFailed(Exception):
    """The upstream failed before any byte of a final response reached the client.

    ``retryable``: nothing at all came back. A router's leases may allow replaying such a
    request when it is idempotent and bodiless (``replay_safe``), once; the platform's do
    not, since the request may be what killed the isolate.

    ``undelivered``: the kernel proves the upstream never read the request: the write was
    refused (EPIPE: its end was closed before we wrote, e.g. a pooled connection of a
    process that has just died) or the connection was reset with our bytes unread in its
    receive queue (ECONNRESET: a process that died, or closed an idle connection, before
    reading them), as opposed to an end of stream after it read them. Such a request is
    replayed whatever its method and whatever the lease says, if it is still whole
    (``whole``: see REPLAY_MAX), up to MAX_ATTEMPTS sends. (An app reads at least 64 KiB
    at a time, so a request of at most REPLAY_MAX bytes is read all at once or not at all.)
    """

    def __init__(self, reason: str, *, retryable: bool = False,
                 undelivered: bool = False) -> None:
        super().__init__(reason)
        self.retryable = retryable
        self.undelivered = undelivered
        self.whole = False


async def exchange(conn: _Connection, req: Request, info: http.RequestInfo,
                   rid: bytes) -> bool:
    """Answer ``req``; return whether the client connection may stay open."""
    limit = conn.config.max_body_bytes
    error = _refusal(req, info, limit)
    if error is not None:
        status, code, message, close = error
        return await reply_error(conn, req, info, rid, status, code, message, close=close)
    assert info.host is not None  # else refused
    host = info.host.decode("latin-1")
    # A client that sends requests but does not read the responses would otherwise
    # have each one's first read pile up in its transport.
    await conn.drain_client()
    if conn.disconnected:
        return False
    # A request without a body can be replayed if a pooled connection was already dead.
    idempotent = req.method in IDEMPOTENT and not info.has_body and not req.upgrade
    # A request handed over by the callback path has had its first attempt.
    attempt = req.attempts
    while True:
        attempt += 1
        try:
            lease = await conn.gateway.router.acquire(host)
        except RouteError as refused:
            status = refused.status if 400 <= refused.status <= 599 else 502
            return await reply_error(conn, req, info, rid, status, refused.code,
                                     refused.message)
        except Exception as unreachable:
            logger.warning("cannot reach upstream for %s: %r", host, unreachable)
            return await reply_error(conn, req, info, rid, 502, "upstream_failed",
                                     "the function could not be reached")
        if conn.disconnected:
            lease.release(reusable=True)  # untouched: still good
            return False
        limits = lease.limits
        if limits is not None and limits.max_body_bytes is not None:
            if limits.max_body_bytes < limit:
                limit = req.max_body = limits.max_body_bytes
            over = req.received > limit
            if over or (info.content_length is not None and info.content_length > limit):
                if over:
                    req.fail("too_large")  # stop buffering what is still coming
                lease.release(reusable=True)  # untouched: still good
                return await reply_error(conn, req, info, rid, 413, "body_too_large",
                                         f"request body exceeds {limit} bytes")
        try:
            keep = await proxy(conn, req, info, rid, lease, limits)
        except UpstreamFailed as failed:
            failure = failed
        else:
            if keep and not req.complete:
                # The app answered before the body was all read: drop the rest, with
                # the lease already back in the pool.
                keep = await discard_body(conn, req, info)
            return keep
        if conn.disconnected:
            return False
        if conn.timed_out == "upstream_timeout":
            return await reply_error(conn, req, info, rid, *upstream_timeout(conn.watch.ttfb_s))
        if req.error == "too_large":
            return await reply_error(conn, req, info, rid, 413, "body_too_large",
                                     f"request body exceeds {limit} bytes")
        if req.error == "malformed":
            return await reply_error(conn, req, info, rid, 400, "malformed_request",
                                     "malformed request body", close=True)
        if not may_replay(undelivered=failure.undelivered, whole=failure.whole,
                          retryable=failure.retryable, idempotent=idempotent,
                          replay_safe=lease.replay_safe, attempt=attempt):
            break
    logger.warning("upstream for %s failed: %s", host, failure)
    return await reply_error(conn, req, info, rid, *UPSTREAM_FAILED)


def _refusal(req: Request, info: http.RequestInfo,
             limit: int) -> tuple[int, str, str, bool] | None:
    """What answers a request without routing it (status, code, message, close), if any."""
    if req.error == "malformed":  # a pipelined request whose body failed to parse
        return 400, "malformed_request", "malformed request body", True
    if req.version not in ("1.1", "1.0"):  # llhttp also accepts 0.9 and 2.0 request lines
        return 505, "http_version_not_supported", "use HTTP/1.1", True
    if req.method == b"CONNECT":
        return 405, "method_not_allowed", "CONNECT is not supported", True
    if info.host_count > 1:
        return 400, "bad_request", "more than one Host header", True
    if not info.host:
        return 400, "missing_host", "the request has no Host header", False
    if req.error == "too_large" or (
        info.content_length is not None and info.content_length > limit
    ):
        return 413, "body_too_large", f"request body exceeds {limit} bytes", False
    return None


async def reply_error(
    conn: _Connection,
    req: Request,
    info: http.RequestInfo,
    rid: bytes,
    status: int,
    code: str,
    message: str,
    *,
    close: bool = False,
) -> bool:
    """Answer ``req`` with a gateway-made error (unless a response began already);
    return whether the connection stays open (after dropping the rest of the body)."""
    if conn.disconnected:
        return False
    if conn.final_sent:
        return False  # too late for a clean error: just close
    can_keep = conn.error_now(
        req, rid, status, code, message,
        close=close or (not req.complete and not _can_discard(req, info)),
    )
    if not can_keep:
        return False
    return req.complete or await discard_body(conn, req, info)


def _can_discard(req: Request, info: http.RequestInfo) -> bool:
    # A client waiting for 100 Continue may never send the body: do not wait for it.
    if req.error is not None or info.expect_continue:
        return False
    return info.content_length is None or info.content_length - req.received <= DISCARD_LIMIT


async def discard_body(conn: _Connection, req: Request, info: http.RequestInfo) -> bool:
    """Read and drop the rest of the request body so the connection can be reused."""
    if not _can_discard(req, info):
        return False
    req.discard = True
    req.body.clear()
    req.buffered = 0
    conn.update_reading()
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


async def proxy(
    conn: _Connection,
    req: Request,
    info: http.RequestInfo,
    rid: bytes,
    lease: Upstream,
    limits: Limits | None,
) -> bool:
    """Forward ``req`` over ``lease`` (released here, exactly once) and stream the
    response back. Raises :class:`UpstreamFailed` if nothing final reached the client."""
    writer = lease.writer
    reusable = False
    pump: asyncio.Task[None] | None = None
    sent = BodySent()
    whole: bytes | None = None  # the body, while the request can still be sent again
    ttfb, silence = conn.timeouts(limits)
    conn.upstream = writer.transport
    conn.lease = lease
    try:
        head = conn.upstream_head(req, info, rid)
        if req.upgrade:
            writer.write(head)
            pump = conn.loop.create_task(_pump_raw(conn, req, writer))
        elif not info.has_body:
            writer.write(head)
            sent.done = True
            whole = b"" if len(head) <= REPLAY_MAX else None
        elif req.complete:
            # Common case: the whole body came with the head; one write, no task.
            body = req.take() if req.body else b""
            data = request_bytes(head, body, chunked=info.chunked)
            writer.write(data)
            sent.done = True
            whole = body if len(data) <= REPLAY_MAX else None
        else:
            writer.write(head)
            pump = conn.loop.create_task(_pump_body(conn, req, writer, info.chunked, sent))
        conn.watch.ttfb(ttfb, silence)
        try:
            upstream_ok, keep = await _pump_response(
                conn, req, lease.reader, limits.response_headers if limits is not None else b"")
        except UpstreamFailed as exc:
            if exc.undelivered and whole is not None:
                exc.whole = True
                req.put_back(whole)  # for the next attempt
            raise
        if req.upgrade:
            return False  # tunnel over, or upgrade refused: the connection is spent
        # If the app answered before the body was all forwarded, the connection is out of
        # step (the pump is cancelled below).
        reusable = upstream_ok and sent.done
        return keep and req.keep_alive
    finally:
        conn.watch.unwatch()
        conn.resume_upstream(writer.transport)
        conn.upstream = None
        conn.lease = None
        conn.framer = None  # (and its parser) not kept by an idle connection
        if pump is not None and not pump.done():
            pump.cancel()
        lease.release(reusable=reusable)


async def _pump_body(
    conn: _Connection, req: Request, writer: asyncio.StreamWriter, chunked: bool,
    sent: BodySent,
) -> None:
    """Client -> upstream request body, as it arrives; at most BODY_HIGH_WATER bytes per
    write, each after the upstream took the previous one (drain), so that a function that
    does not read costs the gateway about twice that (plus the last read from the client),
    not a whole client read more."""
    try:
        while True:
            if req.body:
                data = req.take(BODY_HIGH_WATER)
                conn.update_reading()
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


async def _pump_raw(conn: _Connection, req: Request, writer: asyncio.StreamWriter) -> None:
    """Client -> upstream bytes after an Upgrade request head, until the client closes
    (in slices, as _pump_body)."""
    try:
        while req.error is None:
            if req.body:
                writer.write(req.take(BODY_HIGH_WATER))
                conn.update_reading()
                await writer.drain()
            else:
                await req.wait()
    except (ConnectionError, OSError):
        return


async def _pump_response(
    conn: _Connection, req: Request, reader: asyncio.StreamReader, extra: bytes = b""
) -> tuple[bool, bool]:
    """Upstream -> client. Returns (upstream connection reusable, client keep-alive)."""
    framer = conn.framer = ResponseFramer(
        head_request=req.method == b"HEAD", upgrade=req.upgrade, extra=extra,
        # An upgrade refused ends the connection too (see proxy).
        close=not req.keep_alive or req.upgrade or conn.gateway.draining,
        http10=req.keep_alive and req.version == "1.0")
    while True:
        try:
            data = await reader.read(READ_SIZE)
            error: BaseException | None = None
        except (ConnectionError, OSError) as exc:
            data, error = b"", exc
        if not framer.status and conn.timed_out is not None:
            # The head came in just as the TTFB limit fired: the upstream is gone already.
            raise UpstreamFailed("response head after the time-to-first-byte limit")
        event = framer.feed(data) if data else framer.closed(error)
        if framer.out:
            conn.write(framer.out)
        if event == HEAD:
            conn.head_sent(framer)
            conn.watch_silence()
        elif event == DONE:
            if not conn.final_sent:
                conn.head_sent(framer)
            if framer.complete:
                conn.response_complete = True
            elif not conn.disconnected and conn.timed_out is None:  # else we closed it
                logger.warning("upstream for %s: %s", conn.host, framer.reason)
            return framer.reusable, framer.keep
        elif event == FAILED:
            raise UpstreamFailed(framer.reason, retryable=framer.retryable,
                                 undelivered=framer.undelivered)
        elif event == TUNNEL:
            conn.head_sent(framer)
            conn.watch_silence()
            await _tunnel(conn, reader)
            conn.response_complete = True
            return False, False
        if event != MORE or framer.status:
            # Backpressure: not reading the upstream while the client is behind.
            await conn.drain_client()
            if conn.disconnected:
                return False, False


async def _tunnel(conn: _Connection, reader: asyncio.StreamReader) -> None:
    """Upstream -> client bytes after a 101, until either side closes."""
    while not conn.disconnected:
        await conn.drain_client()
        try:
            data = await reader.read(READ_SIZE)
        except (ConnectionError, OSError):
            return
        if not data:
            return
        conn.write(data)
