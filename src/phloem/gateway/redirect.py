"""The plain-HTTP listener of a gateway that serves HTTPS: one request per connection,
answered with a 308 to the same URL on https (GET and HEAD) or a 400 (anything else: a
body sent in clear must not be replayed to https by the client), then closed.

    listener = await Listener.open("127.0.0.1", 8787,
                                   lambda: RedirectProtocol(admission, 8443), admission)

``challenge`` is where ACME HTTP-01 plugs in: given the token of a request for
``/.well-known/acme-challenge/<token>``, it returns the key authorization to answer with
(200, text/plain), or None (then the request is redirected like any other).
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable
from typing import cast

from phloem.gateway.admission import Admission

__all__ = ["ACME_PREFIX", "RedirectProtocol"]

#: Requests heads larger than this are refused (a redirect needs only the first line and
#: the Host header).
MAX_HEAD = 8192
ACME_PREFIX = "/.well-known/acme-challenge/"
# A Host header value: a DNS name or IPv4 address, or a bracketed IPv6 one, and a port.
_HOST = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+)(:\d{1,5})?$")
_TARGET = re.compile(r"^/[\x21-\x7e]*$")


def _reply(status: bytes, headers: list[tuple[str, str]], body: bytes) -> bytes:
    lines = [b"HTTP/1.1 " + status]
    lines += [f"{k}: {v}".encode("latin-1") for k, v in headers]
    lines += [b"Connection: close", b"Content-Length: %d" % len(body), b"", b""]
    return b"\r\n".join(lines) + body


def _bad(reason: str) -> bytes:
    body = (b'{"error": {"code": "bad_request", "message": "%s"}}'
            % reason.encode("latin-1"))
    return _reply(b"400 Bad Request", [("Content-Type", "application/json")], body)


def answer(head: bytes, https_port: int,
           challenge: Callable[[str], str | None] | None = None) -> bytes:
    """The response to a request ``head`` (request line and headers, no body).

        answer(b"GET /a?b HTTP/1.1\\r\\nHost: x.fn.example.com\\r\\n\\r\\n", 443)
        # 308 with Location: https://x.fn.example.com/a?b
    """
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        return _bad("not an HTTP/1.x request line")
    method, target, _ = parts
    host = ""
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if sep and name.strip().lower() == "host":
            if host:
                return _bad("more than one Host header")
            host = value.strip()
    match = _HOST.match(host)
    if match is None:
        return _bad("this port redirects to https: a Host header is required")
    if not _TARGET.match(target):
        return _bad("this port redirects to https: the request target must be a path")
    if challenge is not None and target.startswith(ACME_PREFIX) and method == "GET":
        key_authz = challenge(target[len(ACME_PREFIX):])
        if key_authz is not None:
            return _reply(b"200 OK", [("Content-Type", "text/plain")], key_authz.encode())
    if method not in ("GET", "HEAD"):
        return _bad(f"this port only redirects to https (GET and HEAD); send {method} "
                    f"to https port {https_port}")
    name = match.group(1)
    port = "" if https_port == 443 else f":{https_port}"
    location = f"https://{name}{port}{target}"
    body = b"" if method == "HEAD" else b"Moved to https\n"
    return _reply(b"308 Permanent Redirect", [("Location", location),
                                               ("Content-Type", "text/plain")], body)


class RedirectProtocol(asyncio.Protocol):
    """One connection of the plain listener (see the module's doc)."""

    def __init__(self, admission: Admission, https_port: int,
                 challenge: Callable[[str], str | None] | None = None) -> None:
        self._admission = admission
        self._https_port = https_port
        self._challenge = challenge
        self._buf = b""
        self._transport: asyncio.Transport | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._done = False

    @property
    def evictable(self) -> bool:
        return not self._done

    def evict(self) -> None:
        if self._transport is not None:
            self._transport.abort()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)
        self._admission.waiting(self)
        loop = asyncio.get_running_loop()
        # From accept: a PROXY header took its share.
        self._timer = loop.call_later(self._admission.first_head_timeout(self), self._timeout)

    def _timeout(self) -> None:
        self._admission.limit_hit("head_timeout", "", "no request head in time")
        self._finish(b"HTTP/1.1 408 Request Timeout\r\nConnection: close\r\n"
                     b"Content-Length: 0\r\n\r\n" if self._buf else b"")

    def data_received(self, data: bytes) -> None:
        if self._done:
            return
        self._buf += data
        end = self._buf.find(b"\r\n\r\n")
        if end < 0:
            if len(self._buf) > MAX_HEAD:
                self._finish(_bad("request head too large"))
            return
        self._finish(answer(self._buf[:end], self._https_port, self._challenge))

    def _finish(self, response: bytes) -> None:
        self._done = True
        if self._timer is not None:
            self._timer.cancel()
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        if response:
            transport.write(response)
        transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self._done = True
        if self._timer is not None:
            self._timer.cancel()
        self._admission.closed(self)
