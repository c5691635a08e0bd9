"""The floor of a Python HTTP proxy: uvloop + httptools, nothing else. Each client
connection gets its own upstream connection (a Unix socket), opened at accept; every
request head is re-sent upstream with the headers nginx, HAProxy and phloem add in the
benchmarks (X-Request-Id, X-Forwarded-For/-Proto/-Host), and upstream bytes go back to the
client as they come. No routing, pooling, limits, timeouts, logs or metrics: what is left
is what any Python proxy pays per request, so bench/runtime.py prints phloem's ratio to it
beside its ratio to nginx.

    python forwarder.py --port 8090 --uds /tmp/fixed.sock
    python forwarder.py --port 8443 --uds /tmp/fixed.sock --tls-cert c.pem --tls-key k.pem

With ``--pool`` upstream connections are shared instead: a request takes an idle one (or
opens one), and a response parser (httptools) tells when the response is over and the
connection free again. That is the least a proxy in front of a function needs (an isolate
cannot hold a connection per client), so it is the floor of a *pooling* Python proxy.

    python forwarder.py --port 8091 --uds /tmp/fixed.sock --pool

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
        if not self.client.transport.is_closing():
            self.client.transport.write(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.client.transport.close()


class Pooled(asyncio.Protocol):
    """A shared upstream connection (``--pool``): its bytes go to the client it serves
    now; once its response parser sees the end of the response it is idle again."""

    def __init__(self, idle: list[Pooled]) -> None:
        self.idle = idle
        self.client: Client | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.keep_alive = True
        self.done = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.Transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        client = self.client
        self.parser.feed_data(data)
        if client is None:
            return
        # A client that left mid-response (wrk closes at the end of a run) still lets the
        # response be parsed to its end, so the connection goes back idle (uvloop refuses
        # writes to a closed transport, as the gateway's own write checks first too).
        if not client.transport.is_closing():
            client.transport.write(data)
        if self.done:
            self.done = False
            self.client = None
            if self.keep_alive:
                self.idle.append(self)
            else:
                self.transport.close()
            if not client.keep_alive:
                client.transport.close()

    def on_headers_complete(self) -> None:
        self.keep_alive = self.parser.should_keep_alive()

    def on_message_complete(self) -> None:
        self.done = True

    def connection_lost(self, exc: Exception | None) -> None:
        if self in self.idle:
            self.idle.remove(self)
        if self.client is not None:
            self.client.transport.close()


class Client(asyncio.Protocol):
    """One client connection and its httptools request parser."""

    def __init__(self, uds: str, idle: list[Pooled] | None = None) -> None:
        self.uds = uds
        self.idle = idle  # --pool: the shared idle upstream connections
        self.keep_alive = True
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
        if self.idle is None:
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

    def on_headers_complete(self) -> None:
        self.keep_alive = self.parser.should_keep_alive()

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
        if self.idle is not None:
            self._pooled(head)
        elif self.upstream is None:
            self.waiting.append(head)
        else:
            self.upstream.write(head)

    def _pooled(self, head: bytes) -> None:
        assert self.idle is not None
        if self.idle:
            pooled = self.idle.pop()
            pooled.client = self
            pooled.transport.write(head)
        else:
            asyncio.get_running_loop().create_task(self._connect_pooled(head))

    async def _connect_pooled(self, head: bytes) -> None:
        assert self.idle is not None
        idle = self.idle
        loop = asyncio.get_running_loop()
        _, pooled = await loop.create_unix_connection(lambda: Pooled(idle), self.uds)
        pooled.client = self
        pooled.transport.write(head)


async def serve(port: int, uds: str, tls: ssl.SSLContext | None, pool: bool) -> None:
    loop = asyncio.get_running_loop()
    idle: list[Pooled] | None = [] if pool else None
    server = await loop.create_server(lambda: Client(uds, idle), "127.0.0.1", port,
                                      backlog=1024, ssl=tls)
    async with server:
        await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--port", type=int, required=True, help="TCP port on 127.0.0.1")
    parser.add_argument("--uds", required=True, help="the upstream's Unix socket")
    parser.add_argument("--tls-cert", help="terminate TLS with this certificate chain (PEM)")
    parser.add_argument("--tls-key", help="and this key (PEM)")
    parser.add_argument("--pool", action="store_true",
                        help="share upstream connections (parse responses to free them)")
    args = parser.parse_args()
    tls = None
    if args.tls_cert:
        tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        tls.minimum_version = ssl.TLSVersion.TLSv1_2
        tls.load_cert_chain(args.tls_cert, args.tls_key)
        tls.set_alpn_protocols(["http/1.1"])
    uvloop.run(serve(args.port, args.uds, tls, args.pool))


if __name__ == "__main__":
    main()
