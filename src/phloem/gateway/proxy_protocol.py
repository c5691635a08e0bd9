"""The PROXY protocol (HAProxy's, v1 text and v2 binary): how a TCP load balancer tells
the gateway which client a connection carries.

A balancer that passes TCP through (so TLS ends at the gateway) cannot add
``X-Forwarded-For``; it writes one PROXY header before the client's first byte instead.
The gateway reads it off the accepted socket before anything else (before the TLS
handshake too), consuming exactly the header's bytes, so the connection then starts as
the client sent it. Opt-in (``--proxy-protocol``), and then only from the trusted
proxies: anyone else could claim any address, so their connections are refused.

    header = await asyncio.wait_for(read_header(sock), timeout=10.0)
    header.source      # "203.0.113.7", or None for a LOCAL / UNKNOWN header
                       # (the balancer's own health check: keep the socket's address)

Specification: https://www.haproxy.org/download/2.9/doc/proxy-protocol.txt
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import struct
from dataclasses import dataclass

__all__ = ["V2_SIGNATURE", "ProxyHeader", "ProxyProtocolError", "header_length",
           "parse_header", "read_header"]

V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
_V1_PREFIX = b"PROXY "
#: A v1 line is at most 107 bytes (CRLF included).
V1_MAX = 107
#: v2 headers carry TLVs after the addresses; more than this is refused.
V2_MAX = 16 + 2048


class ProxyProtocolError(ValueError):
    """Not a valid PROXY header (the connection is closed)."""


@dataclass(frozen=True, slots=True)
class ProxyHeader:
    #: The client's address, or None (``LOCAL``, ``UNKNOWN``, a non-IP family).
    source: str | None
    port: int | None = None
    version: int = 1


def header_length(data: bytes) -> int | None:
    """The length of the PROXY header ``data`` starts with, once ``data`` shows it;
    None while more bytes are needed. Raises :class:`ProxyProtocolError` when ``data``
    cannot be the start of one."""
    if data.startswith(V2_SIGNATURE):
        if len(data) < 16:
            return None
        length = 16 + int(struct.unpack_from("!H", data, 14)[0])
        if length > V2_MAX:
            raise ProxyProtocolError(f"PROXY v2 header of {length} bytes (at most {V2_MAX})")
        return length
    if data.startswith(_V1_PREFIX):
        end = data.find(b"\r\n", 0, V1_MAX)
        if end >= 0:
            return end + 2
        if len(data) >= V1_MAX:
            raise ProxyProtocolError(f"PROXY v1 line longer than {V1_MAX} bytes")
        return None
    if V2_SIGNATURE.startswith(data) or _V1_PREFIX.startswith(data):
        return None  # a start of either
    raise ProxyProtocolError("the connection does not start with a PROXY header")


def parse_header(data: bytes) -> ProxyHeader:
    """Parse one complete header (exactly :func:`header_length` bytes)."""
    if data.startswith(V2_SIGNATURE):
        return _parse_v2(data)
    return _parse_v1(data)


def _ip(text: str, version: int, where: str) -> str:
    try:
        addr = ipaddress.ip_address(text)
    except ValueError:
        raise ProxyProtocolError(f"PROXY header: {where} {text!r} is not an address") from None
    if addr.version != version:
        raise ProxyProtocolError(f"PROXY header: {where} {text!r} is not IPv{version}")
    return str(addr)


def _port(text: str) -> int:
    if not text.isdigit() or len(text) > 5 or (len(text) > 1 and text[0] == "0") \
            or int(text) > 65535:
        raise ProxyProtocolError(f"PROXY header: port {text!r} is not 0-65535")
    return int(text)


def _parse_v1(data: bytes) -> ProxyHeader:
    try:
        line = data[:-2].decode("ascii")
    except UnicodeDecodeError:
        raise ProxyProtocolError("PROXY v1 line is not ASCII") from None
    parts = line.split(" ")
    if len(parts) >= 2 and parts[1] == "UNKNOWN":
        return ProxyHeader(None)
    if len(parts) != 6 or parts[1] not in ("TCP4", "TCP6"):
        raise ProxyProtocolError(f"PROXY v1 line {line!r} is not "
                                 "'PROXY TCP4|TCP6|UNKNOWN src dst sport dport'")
    version = 4 if parts[1] == "TCP4" else 6
    source = _ip(parts[2], version, "source")
    _ip(parts[3], version, "destination")
    port = _port(parts[4])
    _port(parts[5])
    return ProxyHeader(source, port, 1)


def _parse_v2(data: bytes) -> ProxyHeader:
    ver_cmd, family = data[12], data[13]
    if ver_cmd >> 4 != 2:
        raise ProxyProtocolError(f"PROXY v2 header of version {ver_cmd >> 4}")
    command = ver_cmd & 0x0F
    if command == 0:  # LOCAL: the balancer's own connection
        return ProxyHeader(None, None, 2)
    if command != 1:
        raise ProxyProtocolError(f"PROXY v2 command {command} (0 LOCAL or 1 PROXY)")
    body = data[16:]
    af = family >> 4
    if af == 1:  # AF_INET: src, dst (4 bytes each), sport, dport
        if len(body) < 12:
            raise ProxyProtocolError("PROXY v2 IPv4 addresses are cut short")
        return ProxyHeader(socket.inet_ntop(socket.AF_INET, body[:4]),
                           struct.unpack_from("!H", body, 8)[0], 2)
    if af == 2:  # AF_INET6
        if len(body) < 36:
            raise ProxyProtocolError("PROXY v2 IPv6 addresses are cut short")
        return ProxyHeader(socket.inet_ntop(socket.AF_INET6, body[:16]),
                           struct.unpack_from("!H", body, 32)[0], 2)
    return ProxyHeader(None, None, 2)  # AF_UNSPEC or AF_UNIX: nothing to say


async def read_header(sock: socket.socket) -> ProxyHeader:
    """Read exactly one PROXY header off the (non-blocking) ``sock`` and parse it; what
    follows stays unread. Bound it with a timeout: a peer may send nothing."""
    loop = asyncio.get_running_loop()
    fd = sock.fileno()
    buf = b""
    while True:
        ready: asyncio.Future[None] = loop.create_future()

        def wake(fut: asyncio.Future[None] = ready) -> None:
            if not fut.done():
                fut.set_result(None)

        loop.add_reader(fd, wake)
        try:
            await ready
        finally:
            loop.remove_reader(fd)
        try:
            # Peek, so that not a byte beyond the header is taken from the client's data.
            seen = sock.recv(V2_MAX - len(buf), socket.MSG_PEEK)
        except (BlockingIOError, InterruptedError):
            continue
        if not seen:
            raise ProxyProtocolError("the connection closed before its PROXY header")
        need = header_length(buf + seen)
        if need is not None and need <= len(buf) + len(seen):
            buf += sock.recv(need - len(buf))
            return parse_header(buf)
        buf += sock.recv(len(seen))  # all of it is header: wait for the rest
