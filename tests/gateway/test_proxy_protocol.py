"""The PROXY protocol on the gateway (``phloem up --proxy-protocol``): one real platform
serving HTTPS that trusts 127.0.0.2 as its balancer. A header from the balancer (v1 or
v2, read before the TLS handshake) gives the function the client's address in
X-Forwarded-For; any other peer, or a balancer's connection without a header, is closed."""

from __future__ import annotations

import json
import socket
import ssl
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest

from phloem.gateway.proxy_protocol import (
    V2_SIGNATURE,
    ProxyHeader,
    ProxyProtocolError,
    header_length,
    parse_header,
)
from phloem.testing import (
    PlatformProcess,
    free_port,
    host_of,
    platform_process,
    refused_start,
)

APP = Path(__file__).parent.parent / "apps" / "tlsecho"
BALANCER = "127.0.0.2"


class ProxiedPlatform:
    def __init__(self, p: PlatformProcess, https_port: int, host: str) -> None:
        self.p, self.https_port, self.host = p, https_port, host
        self.ctx = ssl.create_default_context(cafile=str(p.data_dir / "tls" / "ca.pem"))

    def connect(self, source: str, port: int | None = None) -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.settimeout(30)
        sock.bind((source, 0))
        sock.connect(("127.0.0.1", port or self.https_port))
        return sock

    def request(self, sock: socket.socket, tls: bool = True) -> bytes:
        """GET / through ``sock`` (TLS unless ``tls`` is false); the whole response."""
        conn: socket.socket = self.ctx.wrap_socket(sock, server_hostname=self.host) \
            if tls else sock
        with conn:
            conn.sendall(f"GET / HTTP/1.1\r\nHost: {self.host}\r\nConnection: close\r\n\r\n"
                         .encode())
            chunks = []
            while chunk := conn.recv(65536):
                chunks.append(chunk)
        return b"".join(chunks)


def v1(source: str, port: int = 40000) -> bytes:
    family = "TCP6" if ":" in source else "TCP4"
    dest = "::1" if ":" in source else "127.0.0.1"
    return f"PROXY {family} {source} {dest} {port} 443\r\n".encode()


def v2(source: str | None, port: int = 40000) -> bytes:
    if source is None:  # LOCAL: the balancer's own health check
        return V2_SIGNATURE + bytes([0x20, 0x00]) + struct.pack("!H", 0)
    if ":" in source:
        addrs = socket.inet_pton(socket.AF_INET6, source) + socket.inet_pton(
            socket.AF_INET6, "::1")
        family = 0x21
    else:
        addrs = socket.inet_aton(source) + socket.inet_aton("127.0.0.1")
        family = 0x11
    body = addrs + struct.pack("!HH", port, 443) + b"\x04\x00\x01x"  # and one TLV
    return V2_SIGNATURE + bytes([0x21, family]) + struct.pack("!H", len(body)) + body


def forwarded_for(response: bytes) -> str:
    head, _, body = response.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), response[:300]
    if b"transfer-encoding: chunked" in head.lower():
        data = b""
        while True:
            size, _, rest = body.partition(b"\r\n")
            n = int(size, 16)
            if n == 0:
                break
            data, body = data + rest[:n], rest[n + 2:]
        body = data
    value: str = json.loads(body)["headers"]["x-forwarded-for"]
    return value


@pytest.fixture(scope="module")
def pp() -> Iterator[ProxiedPlatform]:
    https_port = free_port()
    with platform_process(["--tls", "self-signed", "--https-port", str(https_port),
                           "--proxy-protocol", "--trusted-proxy", BALANCER]) as p:
        fn = p.deploy("echo", APP)
        assert fn["status"] == "ready", fn
        yield ProxiedPlatform(p, https_port, host_of(fn["invocation_url"]).split(":")[0])


def test_v1_and_v2_from_the_balancer_set_x_forwarded_for(pp: ProxiedPlatform) -> None:
    """~1 s: the header goes before the TLS handshake; the function sees the client."""
    sock = pp.connect(BALANCER)
    sock.sendall(v1("203.0.113.7"))
    assert forwarded_for(pp.request(sock)) == "203.0.113.7"
    sock = pp.connect(BALANCER)
    sock.sendall(v2("2001:db8::7"))
    assert forwarded_for(pp.request(sock)) == "2001:db8::7"
    # A LOCAL header (a health check) keeps the balancer's own address.
    sock = pp.connect(BALANCER)
    sock.sendall(v2(None))
    assert forwarded_for(pp.request(sock)) == BALANCER
    # The plain listener takes the header too, then redirects to https.
    sock = pp.connect(BALANCER, pp.p.gateway_port)
    sock.sendall(v1("198.51.100.9"))
    assert pp.request(sock, tls=False).startswith(b"HTTP/1.1 308")


def test_others_and_headerless_connections_are_refused(pp: ProxiedPlatform) -> None:
    """~1 s: a peer that is not a trusted proxy is closed at once, PROXY header or not;
    the balancer's connection without a valid header is closed too."""
    for sock, header in ((pp.connect("127.0.0.1"), v1("203.0.113.7")),
                         (pp.connect("127.0.0.1"), b""),
                         (pp.connect(BALANCER), b"PROXY TCP4 not-an-ip 127.0.0.1 1 2\r\n")):
        if header:
            sock.sendall(header)
        with pytest.raises((ssl.SSLError, OSError)):
            pp.request(sock)
    # Straight into TLS, no header: the ClientHello is no PROXY header.
    with pytest.raises((ssl.SSLError, OSError)):
        pp.request(pp.connect(BALANCER))


def test_proxy_protocol_without_trusted_proxies_is_refused_at_start() -> None:
    """~2 s: nobody could send the headers, so up refuses before making anything."""
    assert "proxy_protocol: needs --trusted-proxy" in refused_start(
        {"PHLOEM_PROXY_PROTOCOL": "1"})


@pytest.mark.parametrize(("data", "rule"), [
    (b"GET / HTTP/1.1\r\n", "does not start with a PROXY header"),
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 99999 1\r\n", "port '99999'"),
    (b"PROXY TCP6 1.2.3.4 ::1 1 2\r\n", "is not IPv6"),
    (b"PROXY SCTP 1.2.3.4 5.6.7.8 1 2\r\n", "is not 'PROXY TCP4|TCP6|UNKNOWN"),
    (b"PROXY " + b"x" * 120, "longer than 107 bytes"),
    (V2_SIGNATURE + bytes([0x11, 0x11, 0, 0]), "PROXY v2 header of version 1"),
    (V2_SIGNATURE + bytes([0x21, 0x11, 0, 4]) + b"\0" * 4, "IPv4 addresses are cut short"),
])
def test_malformed_headers_are_named(data: bytes, rule: str) -> None:
    with pytest.raises(ProxyProtocolError, match=rule.replace("|", r"\|")):
        length = header_length(data)
        assert length is not None
        parse_header(data[:length])


def test_partial_headers_wait_for_more() -> None:
    assert header_length(b"PROX") is None
    assert header_length(V2_SIGNATURE[:7]) is None
    assert header_length(v2("10.0.0.1")[:15]) is None
    assert header_length(b"PROXY UNKNOWN\r\nGET") == 15
    assert parse_header(b"PROXY UNKNOWN\r\n") == ProxyHeader(None)
