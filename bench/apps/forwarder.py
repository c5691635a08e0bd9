"""The floor of a Python HTTP proxy: uvloop + httptools, nothing else. Each client
connection gets its own upstream connection (a Unix socket), opened at accept; every
request head is re-sent upstream with the headers nginx, HAProxy and phloem add in the
benchmarks (X-Request-Id, X-Forwarded-For/-Proto/-Host), and upstream bytes go back to the
client as they come. No routing, pooling, limits, timeouts, logs or metrics: what is left
is what any Python proxy pays per request, so bench/runtime.py prints phloem's ratio to it
beside its ratio to nginx.

    python forwarder.py --port 8090 --uds /tmp/fixed.sock
    python forwarder.py --port 8443 --uds /tmp/fixed.sock --tls-cert c.pem --tls-key k.pem

With a certificate it terminates TLS with Python's ``ssl`` as uvloop drives it (TLS 1.2 and
1.3, ALPN http/1.1, OpenSSL's defaults otherwise: tickets on), as phloem's gateway does.

Only bodiless requests (GET, HEAD) are forwarded, as wrk sends them; anything else closes
the connection. Requests are not pipelined by wrk, so none are queued.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import ssl

import httptools
import uvloop

_IDS = itertools.count()
_PREFIX = os.urandom(6).hex().encode()


class Upstream(asyncio.Protocol):
    """The client's upstream connection: whatever it sends goes to the client."""

    def __init__(self, client: Client) -> None:
        self.client = client

    def data_received(self, data: bytes) -> None:
        self.client.transport.write(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.client.transport.close()


class Client(asyncio.Protocol):
    """One client connection and its httptools request parser."""

    def __init__(self, uds: str) -> None:
        self.uds = uds
        self.parser = httptools.HttpRequestParser(self)
        self.url = b""
        self.fields: list[bytes] = []
        self.host = b""
        self.upstream: asyncio.Transport | None = None
        self.waiting: list[bytes] = []  # heads parsed before the upstream connected

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.Transport = transport  # type: ignore[assignment]
        peer = transport.get_extra_info("peername")
        self.peer = peer[0].encode() if isinstance(peer, tuple) else b"unknown"
        asyncio.get_running_loop().create_task(self._connect())

    async def _connect(self) -> None:
        loop = asyncio.get_running_loop()
        upstream, _ = await loop.create_unix_connection(lambda: Upstream(self), self.uds)
        if self.transport.is_closing():
            upstream.close()
            return
        self.upstream = upstream
        for head in self.waiting:
            upstream.write(head)
        self.waiting.clear()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.upstream is not None:
            self.upstream.close()

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self.transport.close()

    # httptools callbacks

    def on_message_begin(self) -> None:
        self.url = b""
        self.fields = []
        self.host = b""

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        if name.lower() == b"host":
            self.host = value
        self.fields.append(b"%s: %s\r\n" % (name, value))

    def on_message_complete(self) -> None:
        method = self.parser.get_method()
        if method not in (b"GET", b"HEAD"):
            self.transport.close()
            return
        head = b"%s %s HTTP/1.1\r\n%sX-Request-Id: %s-%d\r\nX-Forwarded-For: %s\r\n" \
               b"X-Forwarded-Proto: http\r\nX-Forwarded-Host: %s\r\n\r\n" % (
                   method, self.url, b"".join(self.fields), _PREFIX, next(_IDS),
                   self.peer, self.host)
        if self.upstream is None:
            self.waiting.append(head)
        else:
            self.upstream.write(head)


async def serve(port: int, uds: str, tls: ssl.SSLContext | None) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: Client(uds), "127.0.0.1", port, backlog=1024,
                                      ssl=tls)
    async with server:
        await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--port", type=int, required=True, help="TCP port on 127.0.0.1")
    parser.add_argument("--uds", required=True, help="the upstream's Unix socket")
    parser.add_argument("--tls-cert", help="terminate TLS with this certificate chain (PEM)")
    parser.add_argument("--tls-key", help="and this key (PEM)")
    args = parser.parse_args()
    tls = None
    if args.tls_cert:
        tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        tls.minimum_version = ssl.TLSVersion.TLSv1_2
        tls.load_cert_chain(args.tls_cert, args.tls_key)
        tls.set_alpn_protocols(["http/1.1"])
    uvloop.run(serve(args.port, args.uds, tls))


if __name__ == "__main__":
    main()
