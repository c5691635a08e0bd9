"""Local listeners for a branch's services, so processes outside a sandbox reach them.

A service answers at ``<branch_id>--<service>.<domain>`` on the platform's gateway, a name
that resolves only inside sandboxes (their ``/etc/hosts``). ``phloem dev`` (and ``phloem
env run --forward-services``) instead listens on ``127.0.0.1:<free port>`` per service and
forwards each connection to the gateway with the Host header set to the service's name,
then streams both ways untouched (SSE, chunked uploads, WebSocket tunnels), without root
and without touching ``/etc/hosts``:

    forwarders = ServiceForwarders({"storage": "http://br-…--storage.fn.localhost:8788"},
                                   connect_host="127.0.0.1")
    await forwarders.start()
    env = forwarders.localize(service_env)   # AWS_ENDPOINT_URL_S3=http://127.0.0.1:41873
    ...
    await forwarders.stop()

What the client signed stays valid: an S3 client signs the Host it sent (``127.0.0.1:<port>``),
and Host is rewritten here, so the original goes along as ``X-Phloem-Signed-Host``; the
storage service verifies the signature with it in place of Host, and only when it names a
loopback address (:func:`phloem.services.storage.app.signed_host`). Neon Auth issues
tokens minted through a forwarder for its loopback origin the same way (``server.mjs``),
so a local ``new URL(NEON_AUTH_BASE_URL).origin`` issuer check passes. Each request gets its
own upstream connection (``Connection: close``, to the client too): the head of a second
request on a kept-alive client connection would otherwise pass unrewritten.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import threading
from collections.abc import Awaitable, Callable, Iterator
from urllib.parse import urlsplit

#: The header carrying the Host the client sent (and signed) past the rewrite.
SIGNED_HOST = b"x-phloem-signed-host"
#: A request head larger than this is refused (the gateway's own limit is smaller).
MAX_HEAD = 64 * 1024
_CHUNK = 64 * 1024
_Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class ServiceForwarders:
    """One local listener per service; ``urls`` is service -> its base URL on the gateway
    (as ``GET /api/v1/branches/{ref}/services`` gives them), ``connect_host`` where the
    gateway is when a service's name does not resolve here (the platform's host: names
    under ``localhost`` resolve only inside sandboxes)."""

    def __init__(self, urls: dict[str, str], connect_host: str,
                 listen_host: str = "127.0.0.1") -> None:
        self.urls = dict(urls)
        self.connect_host = connect_host
        self.listen_host = listen_host
        #: service -> the local base URL, once started.
        self.local: dict[str, str] = {}
        self._servers: list[asyncio.Server] = []
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        for name, url in self.urls.items():
            u = urlsplit(url)
            if u.hostname is None:
                raise ValueError(f"services.{name}: URL {url!r} has no host")
            port = u.port or (443 if u.scheme == "https" else 80)
            tls = ssl.create_default_context() if u.scheme == "https" else None
            server = await asyncio.start_server(
                self._handler(u.netloc, u.hostname, await self._target(u.hostname), port,
                              tls), self.listen_host, 0)
            self._servers.append(server)
            bound = server.sockets[0].getsockname()[1]
            self.local[name] = f"http://{self.listen_host}:{bound}"

    async def _target(self, hostname: str) -> str:
        """Where to connect: the service's own name where it resolves (a platform on a
        real domain), else ``connect_host``. A ``.localhost`` name always goes to
        ``connect_host``: where a resolver answers one (nss-myhostname) it may give ``::1``
        while the gateway listens on 127.0.0.1, and the platform may be remote."""
        if hostname == "localhost" or hostname.endswith(".localhost"):
            return self.connect_host
        try:
            await asyncio.get_running_loop().getaddrinfo(hostname, None)
        except OSError:
            return self.connect_host
        return hostname

    async def stop(self) -> None:
        for server in self._servers:
            server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for server in self._servers:
            await server.wait_closed()
        self._servers.clear()

    def localize(self, env: dict[str, str]) -> dict[str, str]:
        """``env`` with each service's gateway URL replaced by its local one (the names
        the variables have stay; only where they point changes)."""
        out = {}
        for key, value in env.items():
            for name, url in self.urls.items():
                if name in self.local and value.startswith(url):
                    value = self.local[name] + value[len(url):]
            out[key] = value
        return out

    @contextlib.contextmanager
    def in_thread(self) -> Iterator[dict[str, str]]:
        """Serve from a thread of its own while the block runs (``env run``: the command
        is a blocking subprocess); yields :attr:`local`."""
        loop = asyncio.new_event_loop()
        started = threading.Event()
        stop = asyncio.Event()
        failure: list[BaseException] = []

        async def main() -> None:
            try:
                await self.start()
            except BaseException as exc:
                failure.append(exc)
                started.set()
                return
            started.set()
            await stop.wait()
            await self.stop()

        thread = threading.Thread(target=loop.run_until_complete, args=(main(),),
                                  daemon=True)
        thread.start()
        started.wait()
        if failure:
            thread.join()
            loop.close()
            raise failure[0]
        try:
            yield self.local
        finally:
            loop.call_soon_threadsafe(stop.set)
            thread.join(10)
            loop.close()

    def _handler(self, netloc: str, hostname: str, target: str, port: int,
                 tls: ssl.SSLContext | None) -> _Handler:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            task = asyncio.current_task()
            assert task is not None
            self._tasks.add(task)
            try:
                await self._forward(reader, writer, netloc, hostname, target, port, tls)
            except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
                pass
            except asyncio.CancelledError:
                pass  # stop(): end quietly (asyncio's stream callback reads the result)
            finally:
                self._tasks.discard(task)
                writer.close()

        return handle

    async def _forward(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                       netloc: str, hostname: str, target: str, port: int,
                       tls: ssl.SSLContext | None) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.LimitOverrunError:
            writer.write(b"HTTP/1.1 431 Request Header Fields Too Large\r\n"
                         b"Content-Length: 0\r\nConnection: close\r\n\r\n")
            return
        up_reader, up_writer = await asyncio.open_connection(
            target, port, ssl=tls, server_hostname=hostname if tls else None,
            limit=MAX_HEAD)
        try:
            up_writer.write(rewrite_head(head, netloc))
            request = asyncio.create_task(_pump(reader, up_writer))
            try:
                await _response_head(up_reader, writer)
                await _pump(up_reader, writer)
            finally:
                # The answer is over (the upstream closes after it): a client that keeps
                # its connection open would hold the request pump forever.
                request.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await request
        finally:
            up_writer.close()


def rewrite_head(head: bytes, host: str) -> bytes:
    """The request head with Host set to ``host`` (the client's goes as
    ``X-Phloem-Signed-Host``) and, unless it upgrades, ``Connection: close``.

        rewrite_head(b"GET / HTTP/1.1\\r\\nHost: 127.0.0.1:5\\r\\n\\r\\n", "a.b:8")
        # b'GET / HTTP/1.1\\r\\nHost: a.b:8\\r\\nX-Phloem-Signed-Host: 127.0.0.1:5\\r\\n'
        # b'Connection: close\\r\\n\\r\\n'
    """
    lines = head[:-4].split(b"\r\n")
    out = [lines[0], b"Host: " + host.encode("latin-1")]
    original = b""
    upgrade = False
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        n = name.strip().lower()
        if n == b"host":
            original = value.strip()
        elif n == SIGNED_HOST:
            continue  # only ours goes on
        elif n == b"upgrade":
            upgrade = True
            out.append(line)
        elif n in (b"connection", b"keep-alive"):
            if b"upgrade" in value.lower():
                out.append(line)
        else:
            out.append(line)
    if original:
        out.append(b"X-Phloem-Signed-Host: " + original)
    if not upgrade:
        out.append(b"Connection: close")
    return b"\r\n".join(out) + b"\r\n\r\n"


async def _response_head(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
    """Pass interim heads (``100 Continue``) as they are and the final one with
    ``Connection: close``: the client then opens a new connection for its next request
    rather than finding this one closed under it."""
    while True:
        head = await src.readuntil(b"\r\n\r\n")
        status = head[9:12]
        if status[:1] == b"1" and status != b"101":
            dst.write(head)
            continue
        if status != b"101":
            lines = [ln for ln in head[:-4].split(b"\r\n")
                     if ln.partition(b":")[0].strip().lower()
                     not in (b"connection", b"keep-alive")]
            head = b"\r\n".join([*lines, b"Connection: close"]) + b"\r\n\r\n"
        dst.write(head)
        return


async def _pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
    """Copy until EOF, then half-close ``dst`` (a request body may end before its answer)."""
    try:
        while data := await src.read(_CHUNK):
            dst.write(data)
            await dst.drain()
        if dst.can_write_eof():
            dst.write_eof()
    except (OSError, RuntimeError):
        dst.close()
