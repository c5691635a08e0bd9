"""Client bytes -> requests: the ``httptools.HttpRequestParser`` callbacks of one client
connection, the request head size limit, and the queue of parsed requests.

    reader = RequestReader(max_body=100 * 2**20, owner=conn)
    reader.feed(b"GET / HTTP/1.1\r\nHost: app.test\r\n\r\n")
    req = reader.pending.popleft()      # a Request, complete (no body)

A parsed head is queued at once; its body keeps arriving into the :class:`Request`
(``reader.parsing``), and after an Upgrade head every further byte is tunnel data for
``reader.upgraded``. Input that cannot be parsed ends parsing (``dead``): a broken body
fails its request, else ``bad_request`` holds the error to answer once the requests before
it are served.
"""

from __future__ import annotations

import collections
from typing import Final, Protocol

import httptools

from phloem.gateway import http
from phloem.gateway.framing import MAX_HEAD_BYTES
from phloem.gateway.request import Request

__all__ = ["ReaderOwner", "RequestReader"]


_REWRITTEN: Final = http.REWRITTEN
_PREFIXES: Final = http.REWRITTEN_PREFIXES


class _HeadTooLarge(Exception):
    pass


class ReaderOwner(Protocol):
    """What a :class:`RequestReader` tells its connection."""

    def head_begun(self) -> None:
        """A request head is arriving in pieces: time it (head_timeout)."""

    def wake_handler(self) -> None:
        """Parsing failed: the connection's task answers it."""


class _Nobody:
    """The owner and parser callbacks of a reader that was let go: ignores everything."""

    def head_begun(self) -> None:
        pass

    def wake_handler(self) -> None:
        pass


_NOBODY = _Nobody()
# One parser for every reader that was let go; never fed (a dead reader parses nothing).
_LET_GO = httptools.HttpRequestParser(_NOBODY)


class RequestReader:
    __slots__ = (
        "_begun",
        "_head_began_now",
        "_head_bytes",
        "_head_trickle",
        "_headers",
        "_host",
        "_max_body",
        "_owner",
        "_parser",
        "_plain",
        "_url",
        "_v11",
        "bad_request",
        "dead",
        "head_timed",
        "in_head",
        "parsing",
        "pending",
        "upgraded",
    )

    def __init__(self, max_body: int, owner: ReaderOwner) -> None:
        self._max_body = max_body
        self._owner = owner
        self._parser = httptools.HttpRequestParser(self)
        self._url = b""
        self._headers: http.Headers = []
        self._head_began_now = False
        self._head_bytes = 0
        self._head_trickle = 0
        self._begun = 0  # messages begun in the current feed
        self._plain = True  # no header but one Host needs the gateway's attention so far
        self._host: bytes | None = None
        # The current feed starts with a whole "... HTTP/1.1" request line (see feed).
        self._v11 = False
        self.in_head = False  # a request head has begun and is not complete
        self.head_timed = False  # the head deadline covers the head being parsed
        self.parsing: Request | None = None  # request whose body is being parsed
        self.upgraded: Request | None = None  # receives raw bytes after an Upgrade head
        self.pending: collections.deque[Request] = collections.deque()
        self.bad_request: tuple[int, str, str] | None = None  # unparseable input, in order
        self.dead = False  # nothing more will be parsed

    def let_go(self) -> None:
        """The connection is over: nothing more is parsed, and the reader lets go of its
        parser and owner (see ``_Connection._let_go``)."""
        self.dead = True
        self.parsing = self.upgraded = None
        self.pending.clear()
        self._parser = _LET_GO
        self._owner = _NOBODY

    def feed(self, data: bytes) -> None:
        if self.upgraded is not None:
            self.upgraded.feed(data)
            return
        if self.dead:
            return
        self._head_began_now = False
        at_boundary = self.parsing is None and not self.in_head
        self._begun = 0
        # The first request of these bytes says its version at the end of its first line:
        # reading it there spares httptools' get_http_version, which formats a new string
        # per request. (llhttp checks that line as it parses it.)
        if at_boundary:
            eol = data.find(b"\r\n")
            self._v11 = eol > 9 and data.startswith(b" HTTP/1.1", eol - 9)
        else:
            self._v11 = False
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade as upgrade:
            tail = data[upgrade.args[0] :]
            if tail and self.upgraded is not None:
                self.upgraded.feed(tail)
        except httptools.HttpParserError as exc:
            if isinstance(exc.__context__, _HeadTooLarge):
                self._failed(431, "headers_too_large", "request head too large")
            else:
                self._failed(400, "malformed_request", f"malformed request: {exc}")
        else:
            if at_boundary and self._begun == 1 and self.parsing is None and not self.in_head:
                self._whole(data)
            elif self.in_head:
                # httptools buffers a partial header line internally: bound what a
                # slowly trickling head can make it hold.
                if not self._head_began_now:
                    self._head_trickle += len(data)
                    if self._head_trickle > MAX_HEAD_BYTES:
                        self._failed(431, "headers_too_large", "request head too large")
                # An unfinished head: from now on it has head_timeout to complete.
                # (A head that arrives whole, the common case, never gets here.)
                if not self.head_timed:
                    self._owner.head_begun()

    def _whole(self, data: bytes) -> None:
        """``data`` held exactly one whole request: keep its head to forward as received
        if it is plain (then it has no body). llhttp has checked every line (no bare CR or
        LF, no folded line); ``data`` must only not start or end with blank lines, which
        llhttp skips between requests."""
        req = self.pending[-1]
        if (
            req.host is not None
            and data.startswith(req.method)
            and data.find(b"\r\n\r\n") == len(data) - 4
        ):
            req.raw = data

    def _failed(self, status: int, code: str, message: str) -> None:
        self.dead = True
        req = self.parsing
        if req is not None and not req.complete:
            req.fail("malformed")  # its body is broken; the exchange answers 400 and closes
        else:
            self.bad_request = (status, code, message)
        self._owner.wake_handler()

    # -- httptools callbacks -----------------------------------------------------------------

    def on_message_begin(self) -> None:
        self._url = b""
        self._headers = []
        self.in_head = True
        self._head_began_now = True
        self._head_bytes = 0
        self._head_trickle = 0
        self.head_timed = False
        self._begun += 1
        self._plain = True
        self._host = None

    # The head's size is counted as it is parsed; _HeadTooLarge surfaces as an
    # HttpParserError from feed_data.

    def on_url(self, url: bytes) -> None:
        self._url += url
        self._head_bytes += len(url)
        if self._head_bytes > MAX_HEAD_BYTES:
            raise _HeadTooLarge

    def on_header(self, name: bytes, value: bytes) -> None:
        # After the head these are chunked-body trailers, which are not forwarded.
        if self.in_head:
            self._headers.append((name, value))
            self._head_bytes += len(name) + len(value) + 4
            if self._head_bytes > MAX_HEAD_BYTES:
                raise _HeadTooLarge
            if self._plain:
                # One pass for what the gateway needs to know of most heads (the others
                # are scanned again by http.scan_request_headers).
                n = name.lower()
                if n == b"host":
                    if self._host is None:
                        self._host = value
                    else:
                        self._plain = False
                elif n in _REWRITTEN or (n[0] == 0x78 and n.startswith(_PREFIXES)):
                    self._plain = False

    def on_headers_complete(self) -> None:
        self.in_head = False
        p = self._parser
        req = Request(
            p.get_method(),
            self._url,
            "1.1" if self._v11 and self._begun == 1 else p.get_http_version(),
            self._headers,
            p.should_keep_alive(),
            p.should_upgrade(),
            self._max_body,
        )
        if self._plain and self._host is not None and req.version == "1.1" and not req.upgrade:
            host = self._host.strip()
            if host and req.method != b"CONNECT":
                req.host = host
        self.parsing = req
        self.pending.append(req)  # the connection then dispatches it

    def on_body(self, body: bytes) -> None:
        req = self.parsing
        if req is None or not body:
            return
        req.feed(body)
        # A body being discarded is bounded by DISCARD_LIMIT instead.
        if req.received > req.max_body and not req.discard:
            req.fail("too_large")

    def on_message_complete(self) -> None:
        req = self.parsing
        self.parsing = None
        if req is None:
            return
        if req.upgrade:
            self.upgraded = req  # complete only when the client closes
        else:
            req.complete = True
            if req.waiter is not None:  # only the task path waits for a body
                req.wake()
