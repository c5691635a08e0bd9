"""Which failed requests the gateway sends again, with leases that forbid replaying merely
idempotent requests (``replay_safe = False``, as the platform's): only a request the
kernel proves the upstream never read (its end refused our write, or reset the connection
with our bytes unread), and only while all of it is in hand. Upstreams here are raw Unix
sockets, so that what they read and leave unread is exact.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from phloem.gateway.server import REPLAY_MAX
from tests.gateway.test_gateway import Env, Lease, running_env

Conn = Callable[[socket.socket, int], Awaitable[None]]


@pytest.fixture(params=["callbacks", "task"])
async def env(
    tmp_path: Path, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[Env]:
    monkeypatch.setattr(Lease, "replay_safe", False, raising=False)
    async with running_env(tmp_path, nowait=request.param == "callbacks") as env:
        yield env


async def read_request(conn: socket.socket) -> bytes:
    """One whole request (head and Content-Length body); returns its body."""
    loop = asyncio.get_running_loop()
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = await loop.sock_recv(conn, 65536)
        assert chunk, "closed mid-request"
        data += chunk
    head, body = data.split(b"\r\n\r\n", 1)
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    while len(body) < length:
        chunk = await loop.sock_recv(conn, 65536)
        assert chunk, "closed mid-body"
        body += chunk
    return body


async def answer(conn: socket.socket, body: bytes) -> None:
    head = f"HTTP/1.1 200 OK\r\nContent-Length: {len(body)}\r\n\r\n".encode()
    await asyncio.get_running_loop().sock_sendall(conn, head + body)


async def readable(conn: socket.socket) -> None:
    """Wait until bytes arrive, without reading them."""
    loop = asyncio.get_running_loop()
    ready = loop.create_future()
    loop.add_reader(conn.fileno(), lambda: ready.done() or ready.set_result(None))
    try:
        await ready
    finally:
        loop.remove_reader(conn.fileno())


async def serve_on(conn: socket.socket) -> None:
    """Echo request bodies until the gateway closes the connection."""
    with contextlib.suppress(AssertionError, ConnectionError):
        while True:
            await answer(conn, b"echo:" + await read_request(conn))


@contextlib.asynccontextmanager
async def raw_upstream(env: Env, name: str, first: Conn) -> AsyncIterator[list[int]]:
    """An upstream routed as ``name``: ``first`` runs the first connection, later ones
    echo. Yields the number of connections so far (in a list)."""
    loop = asyncio.get_running_loop()
    path = str(env.tmp / f"{name}.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen()
    listener.setblocking(False)
    env.router.routes[name] = path
    accepted = [0]
    tasks: set[asyncio.Task[None]] = set()

    async def handle(conn: socket.socket, n: int) -> None:
        try:
            await (first(conn, n) if n == 1 else serve_on(conn))
        finally:
            conn.close()

    async def accept() -> None:
        while True:
            conn, _ = await loop.sock_accept(listener)
            conn.setblocking(False)
            accepted[0] += 1
            tasks.add(loop.create_task(handle(conn, accepted[0])))

    acceptor = loop.create_task(accept())
    try:
        yield accepted
    finally:
        acceptor.cancel()
        for task in tasks:
            task.cancel()
        await asyncio.gather(acceptor, *tasks, return_exceptions=True)
        listener.close()


async def test_request_left_unread_by_a_dying_upstream_is_replayed(env: Env) -> None:
    """The upstream answers once, then goes away with the next request unread (ECONNRESET):
    a POST, which is not idempotent, is sent again, body and all."""

    async def answer_once_then_die(conn: socket.socket, _: int) -> None:
        await answer(conn, await read_request(conn))
        await readable(conn)  # the next request is there: close without reading it

    async with raw_upstream(env, "reset.test", answer_once_then_die) as accepted:
        host = {"Host": "reset.test"}
        assert (await env.client.post("/", content=b"one", headers=host)).content == b"one"
        r = await env.client.post("/", content=b"two", headers=host)
        assert (r.status_code, r.content) == (200, b"echo:two")
        assert accepted[0] == 2


async def test_request_refused_by_a_closed_end_is_replayed(env: Env) -> None:
    """The upstream's end of a pooled connection no longer reads (EPIPE on our write), as
    a process that has died but whose end of stream we have not seen yet."""

    async def answer_once_then_stop_reading(conn: socket.socket, _: int) -> None:
        await answer(conn, await read_request(conn))
        conn.shutdown(socket.SHUT_RD)
        await asyncio.Event().wait()  # until the gateway closes it

    async with raw_upstream(env, "pipe.test", answer_once_then_stop_reading) as accepted:
        host = {"Host": "pipe.test"}
        assert (await env.client.get("/", headers=host)).status_code == 200
        r = await env.client.put("/", content=b"again", headers=host)
        assert (r.status_code, r.content) == (200, b"echo:again")
        assert accepted[0] == 2


async def test_request_read_by_an_upstream_that_then_died_is_not_replayed(env: Env) -> None:
    """It read the whole request, then closed without answering: maybe the request killed
    it. Even a GET is not sent again (the lease forbids replaying idempotent requests)."""

    async def answer_once_then_read_and_die(conn: socket.socket, _: int) -> None:
        await answer(conn, await read_request(conn))
        await read_request(conn)

    async with raw_upstream(env, "eof.test", answer_once_then_read_and_die) as accepted:
        host = {"Host": "eof.test"}
        assert (await env.client.get("/", headers=host)).status_code == 200
        r = await env.client.get("/", headers=host)
        assert r.status_code == 502
        assert r.json()["error"]["code"] == "upstream_failed"
        assert accepted[0] == 1


async def test_request_larger_than_replay_max_is_not_replayed(env: Env) -> None:
    """Unread, but too large to be sure nothing of it was read: a 502."""

    async def answer_once_then_die(conn: socket.socket, _: int) -> None:
        await answer(conn, await read_request(conn))
        await readable(conn)

    async with raw_upstream(env, "large.test", answer_once_then_die) as accepted:
        host = {"Host": "large.test"}
        assert (await env.client.get("/", headers=host)).status_code == 200
        r = await env.client.post("/", content=b"x" * REPLAY_MAX, headers=host)
        assert r.status_code == 502
        assert accepted[0] == 1
