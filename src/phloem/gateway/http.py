"""Byte-level HTTP/1.1 helpers for the gateway (no I/O here).

* :func:`scan_request_headers` / :func:`upstream_request_head` turn a parsed client request
  head into the head sent to the isolate (hop-by-hop headers dropped, ``X-Forwarded-*`` and
  ``X-Request-Id`` set by the gateway; a client's own forwarding headers are dropped unless
  its connection comes from a trusted proxy). A plain head (no header to rewrite: see
  :data:`REWRITTEN`) goes as received, the gateway's headers appended
  (:func:`plain_request_head`).
* :func:`parse_response_head` reads an upstream response head just far enough to know its
  status and how its body is framed; the bytes themselves are forwarded untouched.
* :func:`error_response` renders the gateway's own JSON error responses.

    info = scan_request_headers(headers)
    head = upstream_request_head(b"GET", b"/", "1.1", headers, info, request_id=b"abc",
                                 peer_ip="10.0.0.7", proto="http", upgrade=False,
                                 trusted=False)
"""

from __future__ import annotations

import itertools
import json
import re
import secrets
from collections.abc import Iterator
from http import HTTPStatus
from typing import Final

import httptools

__all__ = [
    "RequestInfo",
    "ResponseHead",
    "UpstreamProtocolError",
    "chunk",
    "error_response",
    "new_request_id",
    "parse_response_head",
    "plain_request_head",
    "sane_request_id",
    "scan_request_headers",
    "strip_hop_by_hop",
    "upstream_request_head",
]

Headers = list[tuple[bytes, bytes]]

# RFC 9110 §7.6.1 hop-by-hop fields, plus the legacy Proxy-Connection. Upgrade is re-added
# explicitly for upgrade requests.
HOP_BY_HOP: Final = frozenset(
    {b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer", b"upgrade"}
)
# Set by the gateway itself; a client's values are never passed through as-is (a trusted
# proxy's X-Forwarded-* are taken over: see upstream_request_head).
GATEWAY_HEADERS: Final = frozenset(
    {b"x-request-id", b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host"}
)
# Other headers by which a client could claim an address, scheme or host: passed on only
# from a trusted proxy, like every X-Forwarded-* (matched by prefix).
FORWARDING: Final = frozenset({b"forwarded", b"x-real-ip"})
_DROP: Final = HOP_BY_HOP | GATEWAY_HEADERS | FORWARDING
#: Request headers the gateway reads or rewrites besides Host (plus every ``X-Forwarded-*``
#: and ``X-Neon-*``): a head without them is "plain" and goes upstream as the client sent
#: it, with the gateway's headers appended (:func:`plain_request_head`).
REWRITTEN: Final = _DROP | {b"content-length", b"transfer-encoding", b"expect"}
#: Prefixes of more such names (see :data:`REWRITTEN`), all starting with "x-".
REWRITTEN_PREFIXES: Final = (b"x-forwarded-", b"x-neon-")
_DROP_TRUSTED: Final = HOP_BY_HOP | {b"x-request-id"}
_X_FORWARDED: Final = b"x-forwarded-"
# The platform's own headers to functions (a schedule trigger's X-Neon-Invocation-Id,
# ...): never from a client, trusted proxy or not, so a function can trust them.
_X_NEON: Final = b"x-neon-"
# A client may name extra hop-by-hop fields in Connection; these are never removed that way,
# since dropping a framing header would desynchronise the upstream connection.
_PROTECTED: Final = frozenset({b"host", b"content-length", b"transfer-encoding"})

_REQUEST_ID: Final = re.compile(rb"[A-Za-z0-9._-]{1,200}")


class UpstreamProtocolError(Exception):
    """The upstream sent something that is not a valid HTTP/1.1 response head."""


def sane_request_id(value: bytes | None) -> bool:
    return value is not None and _REQUEST_ID.fullmatch(value) is not None


# Request ids: a random per-process prefix (64 bits) and a counter, so ids are unique within
# and across gateway processes without drawing randomness per request (uuid4 costs several
# microseconds). An id names a request in logs; it is not a secret.
# Formatting an id costs more than joining two short strings, so ids come 256 at a time:
# one formatted head of 30 digits (prefix and counter), then each of 256 two-digit tails.
_TAILS: Final = tuple(b"%02x" % i for i in range(256))


def _request_ids() -> Iterator[bytes]:
    for block in itertools.count(secrets.randbits(64) << 56):
        head = b"%030x" % block
        for tail in _TAILS:
            yield head + tail


# The event loop's thread only (a generator must not be resumed by two threads at once).
_ids = _request_ids()


def new_request_id() -> bytes:
    """32 hex digits, as a uuid4's: the process's prefix, then the counter."""
    return next(_ids)


def _tokens(value: bytes) -> set[bytes]:
    return {t.strip().lower() for t in value.split(b",") if t.strip()}


class RequestInfo:
    """What the gateway needs to know about a request head, read in one pass.

    A plain class whose defaults live on the class: building one per request then costs
    an allocation, and only the fields a head sets are stored (most heads set the host
    alone). The collection fields are immutable, replaced rather than changed."""

    host: bytes | None = None
    host_count: int = 0
    request_id: bytes | None = None
    content_length: int | None = None
    chunked: bool = False
    expect_continue: bool = False
    upgrade: tuple[bytes, ...] = ()
    connection: frozenset[bytes] = frozenset()

    @property
    def has_body(self) -> bool:
        return self.chunked or bool(self.content_length)


def scan_request_headers(headers: Headers) -> RequestInfo:
    info = RequestInfo()
    for name, value in headers:
        n = name.lower()
        if n == b"host":
            info.host = value.strip()
            info.host_count += 1
        elif n == b"content-length":
            # llhttp has already rejected malformed and conflicting values.
            info.content_length = int(value)
        elif n == b"transfer-encoding":
            # llhttp rejects a request whose Transfer-Encoding does not end in chunked.
            info.chunked = True
        elif n == b"x-request-id":
            info.request_id = value.strip()
        elif n == b"expect":
            info.expect_continue = value.strip().lower() == b"100-continue"
        elif n == b"connection":
            info.connection = info.connection | _tokens(value)
        elif n == b"upgrade":
            info.upgrade = (*info.upgrade, value.strip())
    return info


def upstream_request_head(
    method: bytes,
    target: bytes,
    version: str,
    headers: Headers,
    info: RequestInfo,
    *,
    request_id: bytes,
    peer_ip: str,
    proto: str,
    upgrade: bool,
    trusted: bool = False,
) -> bytes:
    """The request head sent to the isolate; the client's HTTP version is kept.

    From an untrusted peer (``trusted`` false, the default) every forwarding header the
    client sent (``X-Forwarded-*``, ``Forwarded``, ``X-Real-IP``) is dropped and
    ``X-Forwarded-For`` is exactly ``peer_ip``, ``X-Forwarded-Proto`` is ``proto`` and
    ``X-Forwarded-Host`` the Host. From a trusted proxy they are passed on, with
    ``peer_ip`` appended to its ``X-Forwarded-For`` and its ``X-Forwarded-Proto`` /
    ``X-Forwarded-Host`` (the first of each) taking the place of ours.
    """
    parts = [b"%s %s HTTP/%s\r\n"
             % (method, target, _VERSIONS.get(version) or version.encode("ascii"))]
    forwarded_for: list[bytes] = []
    forwarded_proto = proto.encode("ascii")
    forwarded_host = info.host
    if trusted:
        drop = _DROP_TRUSTED | (info.connection - _PROTECTED) if info.connection \
            else _DROP_TRUSTED
        proto_seen = host_seen = False
        for name, value in headers:
            n = name.lower()
            if n in GATEWAY_HEADERS:
                if n == b"x-forwarded-for":
                    if value.strip():
                        forwarded_for.append(value.strip())
                elif n == b"x-forwarded-proto":
                    if not proto_seen and value.strip():
                        forwarded_proto, proto_seen = value.strip(), True
                elif n == b"x-forwarded-host" and not host_seen and value.strip():
                    forwarded_host, host_seen = value.strip(), True
            elif n not in drop and not n.startswith(_X_NEON):
                parts.append(b"%s: %s\r\n" % (name, value))
    else:
        drop = _DROP | (info.connection - _PROTECTED) if info.connection else _DROP
        for name, value in headers:
            n = name.lower()
            # n[0] first (llhttp never passes an empty name): a method call per header
            # would cost more than the rest of this loop.
            if n not in drop and not (n[0] == 0x78 and (n.startswith(_X_FORWARDED)
                                                         or n.startswith(_X_NEON))):
                parts.append(b"%s: %s\r\n" % (name, value))
    if upgrade:
        parts.append(b"Connection: Upgrade\r\nUpgrade: %s\r\n" % b", ".join(info.upgrade))
    elif version == "1.0":
        # The upstream hop is ours: keep it persistent even for HTTP/1.0 clients.
        parts.append(b"Connection: keep-alive\r\n")
    if peer_ip:
        forwarded_for.append(peer_ip.encode("ascii"))
    ours = b"X-Forwarded-For: %s\r\n" % b", ".join(forwarded_for) if forwarded_for else b""
    # The gateway's own headers and the blank line in one format (this runs per request).
    if forwarded_host is not None:
        parts.append(_OURS_HOST % (ours, request_id, forwarded_proto, forwarded_host))
    else:
        parts.append(_OURS % (ours, request_id, forwarded_proto))
    return b"".join(parts)


def plain_request_head(raw: bytes, forwarded_for: bytes, request_id: bytes, proto: bytes,
                       host: bytes) -> bytes:
    """A plain HTTP/1.1 request head (``raw``: request line to the blank line, as received;
    no header in :data:`REWRITTEN`; Host ``host``), sent upstream as it came with the
    gateway's headers added: what :func:`upstream_request_head` sends for it, but for the
    client's own spelling and whitespace. ``forwarded_for``: the X-Forwarded-For line
    (``b"X-Forwarded-For: 10.0.0.7\\r\\n"``) or ``b""``.

        plain_request_head(b"GET / HTTP/1.1\\r\\nHost: a\\r\\n\\r\\n", b"", b"abc", b"http", b"a")
    """
    return _PLAIN % (raw[:-2], forwarded_for, request_id, proto, host)


_PLAIN: Final = b"%s%sX-Request-Id: %s\r\nX-Forwarded-Proto: %s\r\nX-Forwarded-Host: %s\r\n\r\n"
_OURS: Final = b"%sX-Request-Id: %s\r\nX-Forwarded-Proto: %s\r\n\r\n"
_OURS_HOST: Final = b"%sX-Request-Id: %s\r\nX-Forwarded-Proto: %s\r\nX-Forwarded-Host: %s\r\n\r\n"
_VERSIONS: Final = {"1.1": b"1.1", "1.0": b"1.0"}


def chunk(data: bytes) -> list[bytes]:
    """One chunk of a chunked body (``data`` must not be empty: that is the last chunk)."""
    return [b"%x\r\n" % len(data), data, b"\r\n"]


LAST_CHUNK: Final = b"0\r\n\r\n"

_RESPONSE_FIELDS: Final = frozenset(
    {b"content-length", b"transfer-encoding", b"connection", b"content-type", b"keep-alive",
     b"proxy-connection"}
)
# How those names come (lowercase, or capitalised as Node and most servers send them), to
# the lowercase name: found without lowering them. A name of another length is none of
# them, known without hashing it (most response fields).
_RESPONSE_FIELD_NAMES: Final = {
    **{name: name for name in _RESPONSE_FIELDS},
    **{name.title(): name for name in _RESPONSE_FIELDS},
}
_RESPONSE_FIELD_LENGTHS: Final = frozenset(len(name) for name in _RESPONSE_FIELDS)
# Response fields about the upstream hop alone, never passed to a client (plus any field the
# response names in Connection, framing fields excepted: see strip_hop_by_hop).
_RESPONSE_HOP: Final = frozenset({b"connection", b"keep-alive", b"proxy-connection"})


def strip_hop_by_hop(head: bytes, named: set[bytes], line: bytes = b"") -> bytes:
    """A response head (status line to the last header line's CRLF, no blank line)
    without its hop-by-hop fields: Connection, Keep-Alive, Proxy-Connection and the
    fields ``named`` in Connection (never Content-Length or Transfer-Encoding, by which
    the body is framed as received). ``line``: the head's only hop-by-hop field, as
    CRLF + the line + CRLF (``ResponseHead.hop_line``), cut out without splitting the head.

        strip_hop_by_hop(b"HTTP/1.1 200 OK\r\nKeep-Alive: timeout=5\r\nA: b\r\n", set())
        # b"HTTP/1.1 200 OK\r\nA: b\r\n"
    """
    if line:
        # A field value holds no CR or LF (llhttp checked), so CRLF on both sides match
        # a whole line only.
        at = head.find(line)
        if at >= 0:
            return head[: at + 2] + head[at + len(line) :]
    drop = _RESPONSE_HOP | (named - _PROTECTED) if named else _RESPONSE_HOP
    lines = head.split(b"\r\n")
    kept = [lines[0]]
    kept.extend(line for line in lines[1:-1]
                if line.split(b":", 1)[0].strip().lower() not in drop)
    kept.append(b"")
    return b"\r\n".join(kept)


class _ResponseFields:
    """The callbacks of a :class:`ResponseHead`'s parser and what they learnt. Apart from
    the ResponseHead so that the parser, which holds its callbacks, holds nothing that
    holds it: no reference cycle, so a dropped head is freed at once, not by the cyclic
    GC (one per exchange on the task path)."""

    __slots__ = ("begins", "chunked", "complete", "connection", "content_length",
                 "event_stream", "hop", "hop_line", "transfer_encoding")

    def __init__(self) -> None:
        self.content_length: int | None = None
        self.transfer_encoding = False
        self.chunked = False
        self.connection: set[bytes] = set()
        # Content-Type text/event-stream: the exchange is a long-lived SSE stream.
        self.event_stream = False
        # A hop-by-hop field (Connection, Keep-Alive, Proxy-Connection) is in the head: it
        # must be rewritten before it goes to a client (see strip_hop_by_hop).
        self.hop = False
        # The head's only hop-by-hop field when it is a Connection field saying just
        # keep-alive or close (as Node sends on every response), as it appears in the head
        # (see strip_hop_by_hop); else b"".
        self.hop_line = b""
        self.complete = False
        # More than one message begin means bytes followed the response: broken framing.
        self.begins = 0

    def reset(self) -> None:
        self.content_length = None
        self.transfer_encoding = self.chunked = self.event_stream = self.complete = False
        if self.hop:
            self.hop = False
            self.connection = set()
            self.hop_line = b""
        self.begins = 0

    def on_message_begin(self) -> None:
        self.begins += 1

    def on_header(self, name: bytes, value: bytes) -> None:
        # Runs for every header of every response: most are none of _RESPONSE_FIELDS.
        if len(name) not in _RESPONSE_FIELD_LENGTHS:
            return
        n = _RESPONSE_FIELD_NAMES.get(name)
        if n is None:
            n = name.lower()
            if n not in _RESPONSE_FIELDS:
                return
        if n == b"content-length":
            self.content_length = int(value)
        elif n == b"transfer-encoding":
            self.transfer_encoding = True
            self.chunked = value.rsplit(b",", 1)[-1].strip().lower() == b"chunked"
        elif n == b"content-type":
            self.event_stream = value.split(b";", 1)[0].strip().lower() == b"text/event-stream"
        elif self.hop:
            self.hop_line = b""  # more than one hop-by-hop field: the general strip
            if n == b"connection":
                self.connection |= _tokens(value)
        else:
            self.hop = True
            if n == b"connection":
                v = value.lower()
                if v == b"keep-alive" or v == b"close":
                    self.connection = {v}
                    self.hop_line = b"\r\n" + name + b": " + value + b"\r\n"
                else:
                    self.connection = _tokens(value)

    def on_message_complete(self) -> None:
        self.complete = True


class ResponseHead:
    """An upstream connection's ``httptools.HttpResponseParser``, and what it learnt of
    the current response.

    Only message boundaries are taken from the parser; the response bytes are forwarded
    as received, so nothing here is ever re-serialised. One can serve successive responses
    on a keep-alive connection (:meth:`feed_head` for each head, :meth:`feed` for every
    body byte): creating a parser costs more than parsing a small head.
    """

    __slots__ = ("_fields", "keep_alive", "parser", "status")

    def __init__(self) -> None:
        self._fields = fields = _ResponseFields()
        self.parser = httptools.HttpResponseParser(fields)
        self.status = 0
        self.keep_alive = True

    @property
    def content_length(self) -> int | None:
        return self._fields.content_length

    @property
    def transfer_encoding(self) -> bool:
        return self._fields.transfer_encoding

    @property
    def chunked(self) -> bool:
        return self._fields.chunked

    @property
    def connection(self) -> set[bytes]:
        """The Connection field's tokens, lowercase."""
        return self._fields.connection

    @property
    def event_stream(self) -> bool:
        return self._fields.event_stream

    @property
    def hop(self) -> bool:
        return self._fields.hop

    @property
    def hop_line(self) -> bytes:
        """The only hop-by-hop field, when it is a plain Connection one (strip_hop_by_hop)."""
        return self._fields.hop_line

    @property
    def complete(self) -> bool:
        return self._fields.complete

    @property
    def extra_data(self) -> bool:
        return self._fields.begins > 1

    def feed_head(self, head: bytes) -> None:
        """Parse one complete head (status line to the blank line, inclusive): the next
        message on this parser's connection. Raises :class:`UpstreamProtocolError`."""
        self.status = 0
        fields = self._fields
        fields.reset()
        parser = self.parser
        try:
            parser.feed_data(head)
        except httptools.HttpParserUpgrade:
            pass  # a 101: what follows the head is another protocol
        except httptools.HttpParserError as exc:
            raise UpstreamProtocolError(str(exc)) from exc
        self.status = parser.get_status_code()
        # (get_http_version formats a string: the status line says it at once.)
        if head.startswith(b"HTTP/1.1 ") or parser.get_http_version() == "1.1":
            self.keep_alive = b"close" not in fields.connection
        else:
            self.keep_alive = b"keep-alive" in fields.connection

    def feed(self, data: bytes) -> None:
        """Feed body bytes; raises :class:`UpstreamProtocolError` on broken framing."""
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            fields = self._fields
            if fields.complete:
                fields.begins += 1  # the message ended; what follows it is junk
                return
            raise UpstreamProtocolError(str(exc)) from exc


def parse_response_head(head: bytes) -> ResponseHead:
    """Parse one complete response head (status line to the blank line, inclusive)."""
    resp = ResponseHead()
    resp.feed_head(head)
    return resp


def error_response(
    status: int,
    code: str,
    message: str,
    request_id: bytes,
    *,
    close: bool,
    head_only: bool = False,
    http10_keep_alive: bool = False,
) -> bytes:
    """A gateway-made JSON error response."""
    body = json.dumps({"error": {"code": code, "message": message}}).encode()
    try:
        reason = HTTPStatus(status).phrase
    except ValueError:
        reason = "Error"
    head = [
        b"HTTP/1.1 %d %s\r\n" % (status, reason.encode("ascii")),
        b"Content-Type: application/json\r\nContent-Length: %d\r\n" % len(body),
        b"X-Request-Id: " + request_id + b"\r\n",
    ]
    if close:
        head.append(b"Connection: close\r\n")
    elif http10_keep_alive:
        head.append(b"Connection: keep-alive\r\n")
    head.append(b"\r\n")
    if not head_only:
        head.append(body)
    return b"".join(head)
