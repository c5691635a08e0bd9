"""HTTP/1.1 response framing for the gateway, without I/O: upstream events in, client bytes
and decisions out.

Both request paths (the callback path in :mod:`phloem.gateway.fastpath`, the task path in
:mod:`phloem.gateway.upstream`) drive one :class:`ResponseFramer` per exchange, so every
framing rule exists once, here: 1xx interim heads, the response head size limit, a 101 that
was not asked for, bodiless responses (HEAD, 204, 304), event streams, Content-Length,
chunked and close-delimited bodies, bytes beyond the response, and whether the upstream
connection may be reused and the client connection kept. The gateway's own error responses
(:func:`error_reply`, :data:`UPSTREAM_FAILED`, :func:`upstream_timeout`) and the request
bytes sent upstream (:func:`request_bytes`) are here too.

    framer = ResponseFramer(head_request=False, upgrade=False)
    event = framer.feed(b"HTTP/1.1 200 OK\\r\\nContent-Length: 2\\r\\n\\r\\nhi")
    assert event == DONE and framer.out.endswith(b"hi")   # write framer.out to the client
    assert (framer.status, framer.reusable, framer.keep) == (200, True, True)

Response bytes are passed on as received, never re-serialised; an
``httptools.HttpResponseParser`` (:class:`~phloem.gateway.http.ResponseHead`) only tells
where each response ends.
"""

from __future__ import annotations

from typing import Final

from phloem.gateway import http

__all__ = [
    "DONE",
    "FAILED",
    "HEAD",
    "IDEMPOTENT",
    "MAX_ATTEMPTS",
    "MAX_HEAD_BYTES",
    "MORE",
    "NO_BODY_STATUS",
    "REPLAY_MAX",
    "TUNNEL",
    "UPSTREAM_FAILED",
    "ResponseFramer",
    "error_reply",
    "may_replay",
    "request_bytes",
    "undelivered",
    "upstream_timeout",
]

# Request and response heads larger than this are refused.
MAX_HEAD_BYTES: Final = 64 * 1024
NO_BODY_STATUS: Final = frozenset({204, 304})
# Safe to retry on a fresh upstream connection when a pooled one died before answering.
IDEMPOTENT: Final = frozenset({b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"})
# Replays (see may_replay): a request is sent again only when
# all of it is still in hand, i.e. it went upstream in one write of at most REPLAY_MAX
# bytes (head plus a body that had fully arrived), and the upstream never read it. At most
# MAX_ATTEMPTS sends.
REPLAY_MAX: Final = 64 * 1024
MAX_ATTEMPTS: Final = 3

# What ResponseFramer.feed and .closed return (after each call, write ``out`` first).
#: Nothing decided yet.
MORE: Final = 0
#: No final response head reached the client (``reason``, ``retryable``, ``undelivered``):
#: answer 502 or send the request again. ``out`` may hold 1xx interim heads.
FAILED: Final = 1
#: The final response head is in ``out``; a body follows.
HEAD: Final = 2
#: A 101 to an Upgrade request: ``out`` holds its head and the first tunnel bytes; from now
#: on bytes pass through unframed until either side closes.
TUNNEL: Final = 3
#: The response ended: ``reusable`` (the upstream connection), ``keep`` (the client's, as
#: far as the response allows), ``complete`` (false: cut off or broken, see ``reason``).
DONE: Final = 4

# Framer states.
_HEAD: Final = 0
_LENGTH: Final = 1
_CHUNKED: Final = 2
_UNTIL_EOF: Final = 3
_TUNNEL: Final = 4
_OVER: Final = 5

#: The gateway's answer when the upstream failed before a final response head.
UPSTREAM_FAILED = (502, "upstream_failed", "the function failed to respond")


def upstream_timeout(ttfb_s: float) -> tuple[int, str, str]:
    """The gateway's answer when no response head came within ``ttfb_s`` seconds."""
    return (504, "upstream_timeout",
            f"the function did not start responding within {ttfb_s:g} s")


class ResponseFramer:
    """One response, from upstream bytes to client bytes.

    ``head_request``: the request was HEAD (no body follows the response head, whatever it
    says). ``upgrade``: the request asked for an Upgrade (a 101 starts a tunnel, else it is
    an error). ``resp``: a parser in step with the upstream connection (its previous
    response ended cleanly), to reuse instead of creating one. ``extra``: header lines
    (CRLF-terminated) added at the end of the final response head (not of a 101).
    ``close``: the client connection closes after this response (``Connection: close`` is
    added; also when the response itself ends the connection). ``http10``: an HTTP/1.0
    client asked for keep-alive (``Connection: keep-alive`` is added unless closing).
    The upstream's hop-by-hop fields (Connection, Keep-Alive, Proxy-Connection, those
    named in Connection) are dropped from the final head; a 101's head goes as received.

    Call :meth:`feed` with every upstream read and :meth:`closed` when the upstream ends;
    each returns an event (:data:`MORE`, :data:`FAILED`, :data:`HEAD`, :data:`TUNNEL`,
    :data:`DONE`) after setting ``out``, the bytes to write to the client now.
    """

    __slots__ = (
        "buf",
        "close",
        "complete",
        "extra",
        "head_request",
        "http10",
        "keep",
        "out",
        "reason",
        "received",
        "remaining",
        "resp",
        "retryable",
        "reusable",
        "state",
        "status",
        "stream",
        "undelivered",
        "upgrade",
    )

    def __init__(
        self, head_request: bool, upgrade: bool, resp: http.ResponseHead | None = None,
        extra: bytes = b"", close: bool = False, http10: bool = False,
    ) -> None:
        self.head_request = head_request
        self.extra = extra
        # The client connection closes after this response whatever it says (the client
        # asked, or the gateway drains: may be set until the head arrives); an HTTP/1.0
        # client that asked for keep-alive is told it is kept.
        self.close = close
        self.http10 = http10
        self.upgrade = upgrade
        self.resp = resp
        self.state = _HEAD
        self.buf = b""  # an incomplete response head
        self.received = False  # any byte at all
        self.status = 0  # of the final response head, once it arrived
        self.stream = False  # an event stream or a tunnel: a long-lived exchange
        # Set before they are read (one exchange per request: the fewer stores the better):
        # ``out`` by every feed and closed; ``keep``, ``reusable``, ``complete`` with DONE;
        # ``reason`` with FAILED or an incomplete DONE, ``retryable`` and ``undelivered``
        # with FAILED; ``remaining`` with the Content-Length state.
        self.out: bytes
        self.keep: bool
        self.reusable: bool
        self.complete: bool
        self.reason: str
        self.retryable: bool
        self.undelivered: bool
        self.remaining: int

    def feed(self, data: bytes) -> int:
        """Upstream bytes (not empty)."""
        state = self.state
        if state == _LENGTH:
            remaining = self.remaining - len(data)
            resp = self.resp
            assert resp is not None  # set with the head
            parser = resp.parser
            if remaining > 0:
                self.remaining = remaining
                parser.feed_data(data)  # keeps the parser in step for the next response
                self.out = data
                return MORE
            # Never pass on bytes beyond Content-Length; they make the connection unusable.
            if remaining:
                data = data[: self.remaining]
            parser.feed_data(data)
            self.out = data
            return self._done(self.keep and not remaining, self.keep)
        if state == _HEAD:
            return self._head(data)
        if state == _CHUNKED:
            return self._chunked(data, b"")
        self.out = data if state != _OVER else b""  # close-delimited body, or a tunnel
        return MORE

    def closed(self, exc: BaseException | None) -> int:
        """The upstream closed (``exc`` None) or its connection failed."""
        state = self.state
        self.out = b""
        if state == _HEAD:
            # Nothing at all came back: maybe a pooled connection the app had closed.
            got = self.received
            return self._fail(
                "closed before responding" if exc is None else f"connection failed: {exc!r}",
                retryable=not got,
                undelivered=not got and undelivered(exc),
            )
        if state in (_UNTIL_EOF, _TUNNEL):
            return self._done(False, False)
        if state == _OVER:
            return MORE  # the exchange ended already
        self.reason = "closed mid-body"
        return self._done(False, False, complete=False)

    def small_body_due(self, limit: int) -> bool:
        """The head is framed and a Content-Length body of at most ``limit`` more bytes is
        due (not an event stream): a caller may hold what ``out`` gave so far and send it
        with the rest in one write."""
        return self.state == _LENGTH and self.remaining <= limit and not self.stream

    def next_parser(self) -> http.ResponseHead | None:
        """The parser, if it can serve the connection's next response: it read exactly
        this one (not after a HEAD request: it would expect the body the head announced)."""
        resp = self.resp
        if (
            self.reusable
            and resp is not None
            and resp.complete
            and not resp.extra_data
            and not self.head_request
        ):
            return resp
        return None

    # -- internals ---------------------------------------------------------------------------

    def _done(self, reusable: bool, keep: bool, *, complete: bool = True) -> int:
        self.state = _OVER
        self.reusable = reusable
        self.keep = keep
        self.complete = complete
        return DONE

    def _fail(
        self, reason: str, *, out: bytes = b"", retryable: bool = False,
        undelivered: bool = False,
    ) -> int:
        self.state = _OVER
        self.out = out
        self.reason = reason
        self.retryable = retryable
        self.undelivered = undelivered
        return FAILED

    def _head(self, data: bytes) -> int:
        self.received = True
        old = self.buf
        if old:
            buf = old + data
            end = buf.find(b"\r\n\r\n", max(0, len(old) - 3))
        else:
            buf = data
            end = buf.find(b"\r\n\r\n")
        start = 0  # interim (1xx) heads before this offset go out as they are
        while True:
            if end < 0:
                if len(buf) - start > MAX_HEAD_BYTES:
                    return self._fail("response head too large", out=buf[:start])
                self.buf = buf[start:] if start else buf
                self.out = buf[:start] if start else b""
                return MORE
            head_len = end + 4
            resp = self.resp
            if resp is None:
                resp = self.resp = http.ResponseHead()
            try:
                resp.feed_head(buf[start:head_len] if start else buf[:head_len])
            except http.UpstreamProtocolError as exc:
                return self._fail(f"invalid response head: {exc}", out=buf[:start])
            status = resp.status
            if status == 101:
                if not self.upgrade:
                    return self._fail("101 response to a request that did not ask for it",
                                      out=buf[:start])
                self.status = 101
                self.stream = True
                self.state = _TUNNEL
                self.buf = b""
                self.out = buf  # the head and any early tunnel bytes
                return TUNNEL
            if status >= 200:
                break
            start = head_len
            end = buf.find(b"\r\n\r\n", start)
        keep = self.keep = resp.keep_alive
        length = resp.content_length
        # The client's connection is the gateway's: it says Connection: close when it
        # will close after this response (RFC 9112 9.6), and the upstream's hop-by-hop
        # fields never reach the client. (A close-delimited body ends the connection.)
        close = self.close or not keep or (
            (length is None or resp.transfer_encoding) and not resp.chunked
            and not self.head_request and status not in NO_BODY_STATUS)
        if close or resp.hop or self.extra or self.http10:
            # After the head's last line, before its blank line; the common keep-alive
            # head without hop-by-hop fields only gets the route's extra lines, if any.
            head = buf[start : end + 2]
            if resp.hop:
                head = http.strip_hop_by_hop(head, resp.connection, resp.hop_line)
            add = self.extra
            if close:
                add += b"Connection: close\r\n"
            elif self.http10:
                add += b"Connection: keep-alive\r\n"
            buf = b"".join((buf[:start], head, add, buf[end + 2 :]))
            head_len = start + len(head) + len(add) + 2
        self.buf = b""
        self.status = status
        rest_len = len(buf) - head_len
        if (
            length is not None
            and rest_len >= length
            and not resp.transfer_encoding
            and not self.head_request
            and status not in NO_BODY_STATUS
            and not resp.event_stream
        ):
            # The common case: the whole response at once. Not passing on bytes beyond it.
            extra = rest_len > length
            if length:
                resp.parser.feed_data(buf[head_len : head_len + length])  # keep in step
            self.out = buf[: head_len + length] if extra else buf
            return self._done(keep and not extra, keep)
        if self.head_request or status in NO_BODY_STATUS:
            # No body whatever the headers say; anything after the head is junk.
            self.out = buf[:head_len]
            return self._done(keep and rest_len == 0, keep)
        if resp.event_stream:
            self.stream = True
        if resp.transfer_encoding or length is None:
            if not resp.chunked:
                self.state = _UNTIL_EOF  # body delimited by close
                self.out = buf
                return HEAD
            self.state = _CHUNKED
            event = self._chunked(buf[head_len:], buf[:head_len])
            return HEAD if event == MORE else event
        if rest_len >= length:  # an event stream with all of its Content-Length body
            extra = rest_len > length
            if length:
                resp.parser.feed_data(buf[head_len : head_len + length])
            self.out = buf[: head_len + length] if extra else buf
            return self._done(keep and not extra, keep)
        if rest_len:
            resp.parser.feed_data(buf[head_len:])
        self.out = buf
        self.state = _LENGTH
        self.remaining = length - rest_len
        return HEAD

    def _chunked(self, data: bytes, pending_head: bytes) -> int:
        if not data:
            self.out = pending_head
            return MORE
        resp = self.resp
        assert resp is not None  # set with the head
        try:
            resp.feed(data)
        except http.UpstreamProtocolError as exc:
            self.out = pending_head
            self.reason = f"broken chunked body: {exc}"
            return self._done(False, False, complete=False)
        self.out = pending_head + data if pending_head else data
        if resp.complete:
            # Bytes after the last chunk cannot be cut off exactly; they went to the client
            # with it, so close both connections.
            ok = resp.keep_alive and not resp.extra_data
            return self._done(ok, ok)
        return MORE


def undelivered(exc: BaseException | None) -> bool:
    """Does this connection failure prove the upstream never read what we sent? EPIPE on
    our write (its end was already closed) or ECONNRESET (it went away with our bytes
    unread: a Unix socket resets its peer only then, and so does a TCP close, dying or
    not; a TCP app that read a request and then aborted on purpose would look the same,
    which is why this is for upstreams that do not: the platform's are Unix sockets)."""
    return isinstance(exc, (BrokenPipeError, ConnectionResetError))


def may_replay(
    *, undelivered: bool, whole: bool, retryable: bool, idempotent: bool,
    replay_safe: bool, attempt: int,
) -> bool:
    """Send a failed request again (``attempt`` sends so far)? Always when the upstream
    never read it and all of it is still in hand (``whole``), up to MAX_ATTEMPTS sends;
    once more when nothing came back, the request is idempotent and bodiless, and the lease
    allows it (``replay_safe``: a failed connection may mean the request crashed the
    upstream process, and replaying it would do the work twice)."""
    return (undelivered and whole and attempt < MAX_ATTEMPTS) or (
        retryable and idempotent and replay_safe and attempt == 1
    )


def request_bytes(head: bytes, body: bytes, *, chunked: bool) -> bytes:
    """A request head and its whole body, framed as the client framed it (one write)."""
    if chunked:
        if body:
            return b"".join((head, *http.chunk(body), http.LAST_CHUNK))
        return head + http.LAST_CHUNK
    return head + body if body else head


def error_reply(
    status: int, code: str, message: str, request_id: bytes, *, keep: bool,
    head_only: bool, http10: bool,
) -> bytes:
    """A gateway-made JSON error response; ``keep`` false adds ``Connection: close``."""
    return http.error_response(status, code, message, request_id, close=not keep,
                               head_only=head_only, http10_keep_alive=http10)
