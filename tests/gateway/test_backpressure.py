"""Backpressure through the real platform: clients that stop reading large responses, and
uploads to a function that never reads them, cost ``phloem up`` (the gateway's process)
about the socket buffers plus a small high-water mark per connection, not the response.
The gateway's memory is its RSS from ``/proc/<pid>/status``, of a platform of this module's
own, whose allocator gives every block of 64 KiB or more back when it is freed
(``MALLOC_MMAP_THRESHOLD_``): the buffers in question are that large, and so neither what
an earlier test freed nor what a buffer left behind hides or fakes what is held now.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from phloem.testing import PlatformProcess, host_of, platform_process
from tests.conftest import Reliability

APP = Path(__file__).parent.parent / "apps" / "upstream"
CLIENTS = 20
BLOCKS = 160  # of 64 KiB: 10 MiB
BLOCK = 64 * 1024
BUDGET_KIB = 512  # per stalled connection; main held ~2,600 KiB for a response
UPLOAD = 20 * 2**20
PIPELINED = 320


@pytest.fixture(scope="module")
def platform() -> Iterator[PlatformProcess]:
    with pytest.MonkeyPatch.context() as env:
        env.setenv("MALLOC_MMAP_THRESHOLD_", str(64 * 1024))
        with platform_process() as p:
            env.delenv("MALLOC_MMAP_THRESHOLD_")  # not for the CLI and the tests' clients
            yield p


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for {pid}")


def expected_digest() -> str:
    """The app's /big body (tests/apps/upstream: block i repeats sha256(i))."""
    digest = hashlib.sha256()
    for i in range(BLOCKS):
        seed = hashlib.sha256(i.to_bytes(8, "big")).digest()
        digest.update((seed * (BLOCK // len(seed) + 1))[:BLOCK])
    return digest.hexdigest()


async def settled(sample: Callable[[], Any], timeout: float, what: str) -> Any:
    """Wait until ``sample()`` stays the same for a second (within ``timeout``)."""
    deadline = time.monotonic() + timeout
    last, since = sample(), time.monotonic()
    while time.monotonic() - since < 1.0:
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} still changing after {timeout} s")
        await asyncio.sleep(0.05)
        now = sample()
        if now != last:
            last, since = now, time.monotonic()
    return last


async def read_head(reader: asyncio.StreamReader) -> dict[str, str]:
    head = (await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)).decode("latin-1")
    lines = head.split("\r\n")
    assert lines[0].split()[1] == "200", head
    return {k.strip().lower(): v.strip() for k, v in
            (line.split(":", 1) for line in lines[1:] if line)}


async def read_body(reader: asyncio.StreamReader, headers: dict[str, str]) -> str:
    """The body's sha256, read in 64 KiB pieces (Content-Length or chunked)."""
    digest = hashlib.sha256()
    if "content-length" in headers:
        left = int(headers["content-length"])
        while left:
            data = await asyncio.wait_for(reader.read(min(left, 65536)), 30)
            assert data, "connection closed mid-body"
            digest.update(data)
            left -= len(data)
        return digest.hexdigest()
    assert headers.get("transfer-encoding") == "chunked", headers
    while size := int((await asyncio.wait_for(reader.readuntil(b"\r\n"), 30)).strip(), 16):
        digest.update(await asyncio.wait_for(reader.readexactly(size), 30))
        await reader.readexactly(2)
    await reader.readuntil(b"\r\n")  # after the last chunk
    return digest.hexdigest()


async def read_response(reader: asyncio.StreamReader) -> str:
    return await read_body(reader, await read_head(reader))


def deploy(platform: PlatformProcess, slug: str, *limits: str) -> str:
    fn = platform.deploy(slug, APP, *(a for lim in limits for a in ("--limit", lim)))
    assert fn["status"] == "ready", fn
    return host_of(fn["invocation_url"])


@pytest.mark.parametrize("pooled", [True, False], ids=["pooled", "fresh"])
async def test_stalled_readers_cost_little(platform: PlatformProcess,
                                           reliability: Reliability, pooled: bool) -> None:
    """CLIENTS clients ask for 10 MiB and stop reading: the gateway holds little for each;
    when they read again, every byte arrives intact. ``pooled``: the isolate's pool has an
    idle connection for each (the callback path); ``fresh``: most open a new one (the
    connection's task)."""
    host = deploy(platform, "stall" + ("pooled" if pooled else "fresh"))
    port = platform.gateway_port
    pid = platform.proc.pid if platform.proc else 0
    want = expected_digest()

    async def ask(query: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(f"GET /big?{query} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
        await writer.drain()
        return reader, writer

    # Warm up (the allocator too): one whole response, checked.
    reader, writer = await ask(f"blocks={BLOCKS}&length=1")
    assert await read_body(reader, await read_head(reader)) == want
    writer.close()
    if pooled:
        async def hold() -> None:
            # At the same time, so that each has an upstream connection of its own.
            r, w = await asyncio.open_connection("127.0.0.1", port)
            w.write(f"GET /hang?s=0.5 HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
            await read_head(r)
            w.close()
        await asyncio.gather(*(hold() for _ in range(CLIENTS)))
    before = await settled(lambda: rss_kib(pid), 30, "the gateway's RSS")

    # Half with Content-Length, half chunked; nobody reads.
    queries = [f"blocks={BLOCKS}" + ("&length=1" if i % 2 else "") for i in range(CLIENTS)]
    conns = [await ask(q) for q in queries]
    try:
        stalled = await settled(lambda: rss_kib(pid), 60, "the gateway's RSS")
        grown = stalled - before
        digests = await asyncio.gather(*(read_response(r) for r, _ in conns))
    finally:
        for _, w in conns:
            w.close()
    intact = sum(1 for d in digests if d == want)
    per_conn = grown / CLIENTS
    reliability.record(
        rounds=CLIENTS, passed=intact if per_conn < BUDGET_KIB else 0,
        figure=f"{per_conn:.0f} KiB per client stalled on a 10 MiB response "
               f"({grown} KiB for {CLIENTS}; main: ~2,600 KiB each)")
    assert intact == CLIENTS, "a response came back damaged"
    assert per_conn < BUDGET_KIB, f"the gateway grew by {grown} KiB for {CLIENTS} clients"


async def test_unread_upload_costs_little(platform: PlatformProcess,
                                          reliability: Reliability) -> None:
    """CLIENTS clients upload 20 MiB each to a function that never reads its body: once
    they are held back, the gateway holds little for each, and still serves others."""
    host = deploy(platform, "stallupload", "max_isolates=1")
    port = platform.gateway_port
    pid = platform.proc.pid if platform.proc else 0
    sent = [0] * CLIENTS

    async def upload(i: int) -> None:
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(f"POST /ignore-body?s=60 HTTP/1.1\r\nHost: {host}\r\n"
                         f"Content-Length: {UPLOAD}\r\n\r\n".encode())
            piece = b"u" * 65536
            for _ in range(UPLOAD // len(piece)):
                writer.write(piece)
                await writer.drain()
                sent[i] += len(piece)
        finally:
            writer.transport.abort()  # close() would wait to send what cannot be sent

    async def info() -> int:
        r, w = await asyncio.open_connection("127.0.0.1", port)
        w.write(f"GET /info HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
        await read_head(r)
        w.close()
        return 200

    assert await info() == 200
    before = await settled(lambda: rss_kib(pid), 30, "the gateway's RSS")
    uploads = [asyncio.create_task(upload(i)) for i in range(CLIENTS)]
    try:
        # Held back: nobody can send more.
        await settled(lambda: sum(sent), 60, "the uploads")
        grown = rss_kib(pid) - before
        assert all(not u.done() for u in uploads), "an upload ended early"
        assert await asyncio.wait_for(info(), 10) == 200
    finally:
        for u in uploads:
            u.cancel()
        await asyncio.gather(*uploads, return_exceptions=True)
        # Answered, the exchanges end (the gateway does not read the gone clients while
        # their uploads are held back, so it sees them go only when it writes).
        r, w = await asyncio.open_connection("127.0.0.1", port)
        w.write(f"GET /release HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
        await read_head(r)
        w.close()
    per_conn = grown / CLIENTS
    held = sum(sent) / CLIENTS / 2**20
    reliability.record(
        rounds=CLIENTS, passed=CLIENTS if per_conn < BUDGET_KIB else 0,
        figure=f"{per_conn:.0f} KiB per client held back on an unread 20 MiB upload "
               f"({held:.1f} MiB each sent into socket buffers)")
    assert sum(sent) < CLIENTS * UPLOAD, "the uploads were never held back"
    assert per_conn < BUDGET_KIB, f"the gateway grew by {grown} KiB for {CLIENTS} uploads"


async def read_frames(reader: asyncio.StreamReader) -> tuple[str, int]:
    """(sha256 of the binary messages' payloads, their count) until the close frame."""
    digest = hashlib.sha256()
    count = 0
    while True:
        first, second = await asyncio.wait_for(reader.readexactly(2), 30)
        size = second & 0x7F
        if size == 126:
            size = int.from_bytes(await reader.readexactly(2), "big")
        elif size == 127:
            size = int.from_bytes(await reader.readexactly(8), "big")
        payload = await asyncio.wait_for(reader.readexactly(size), 30)  # server: unmasked
        opcode = first & 0x0F
        if opcode == 0x8:
            return digest.hexdigest(), count
        assert opcode == 0x2 and first & 0x80, f"unexpected frame {first:#x}"
        digest.update(payload)
        count += 1


async def test_stalled_websocket_reader_costs_little(platform: PlatformProcess,
                                                     reliability: Reliability) -> None:
    """CLIENTS WebSocket clients are sent 10 MiB in 64 KiB messages and stop reading: the
    tunnels hold little in the gateway; read again, every message arrives intact."""
    host = deploy(platform, "stallws")
    port = platform.gateway_port
    pid = platform.proc.pid if platform.proc else 0
    want = expected_digest()

    async def connect() -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(f"GET /flood?blocks={BLOCKS} HTTP/1.1\r\nHost: {host}\r\n"
                     "Upgrade: websocket\r\nConnection: Upgrade\r\n"
                     "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                     "Sec-WebSocket-Version: 13\r\n\r\n".encode())
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)
        assert head.startswith(b"HTTP/1.1 101"), head
        return reader, writer

    reader, writer = await connect()  # warm up, checked
    assert await read_frames(reader) == (want, BLOCKS)
    writer.close()
    before = await settled(lambda: rss_kib(pid), 30, "the gateway's RSS")
    conns = [await connect() for _ in range(CLIENTS)]
    try:
        stalled = await settled(lambda: rss_kib(pid), 60, "the gateway's RSS")
        grown = stalled - before
        received = await asyncio.gather(*(read_frames(r) for r, _ in conns))
    finally:
        for _, w in conns:
            w.close()
    intact = sum(1 for r in received if r == (want, BLOCKS))
    per_conn = grown / CLIENTS
    reliability.record(
        rounds=CLIENTS, passed=intact if per_conn < BUDGET_KIB else 0,
        figure=f"{per_conn:.0f} KiB per WebSocket client stalled on 10 MiB of messages "
               f"({grown} KiB for {CLIENTS})")
    assert intact == CLIENTS, "messages came back damaged"
    assert per_conn < BUDGET_KIB, f"the gateway grew by {grown} KiB for {CLIENTS} clients"


async def test_pipelining_client_that_does_not_read_costs_little(
        platform: PlatformProcess, reliability: Reliability) -> None:
    """One client sends PIPELINED requests for 62.5 KiB responses at once and reads
    nothing: a response can come in one read from the isolate, so unless the gateway
    waits for the client before each exchange, they pile up in its transport once the
    socket buffers are full (20 MB in all, more than those hold). The budget is twice
    the others': the parsed requests waiting their turn are held too."""
    host = deploy(platform, "stallpipe")
    port = platform.gateway_port
    pid = platform.proc.pid if platform.proc else 0
    size = 64000
    one = hashlib.sha256(
        (hashlib.sha256((0).to_bytes(8, "big")).digest() * 2000)[:size]).hexdigest()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    request = f"GET /sized?n={size} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode()
    writer.write(request)
    assert await read_response(reader) == one  # warm up, checked
    before = await settled(lambda: rss_kib(pid), 30, "the gateway's RSS")
    writer.write(request * PIPELINED)
    try:
        grown = await settled(lambda: rss_kib(pid), 60, "the gateway's RSS") - before
        bodies = [await read_response(reader) for _ in range(PIPELINED)]
    finally:
        writer.close()
    intact = sum(1 for b in bodies if b == one)
    reliability.record(
        rounds=PIPELINED, passed=intact if grown < 2 * BUDGET_KIB else 0,
        figure=f"{grown} KiB for {PIPELINED} unread pipelined 62.5 KiB responses")
    assert intact == PIPELINED
    assert grown < 2 * BUDGET_KIB, f"the gateway grew by {grown} KiB"
