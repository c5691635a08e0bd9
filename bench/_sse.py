"""A lightweight SSE load client: raw asyncio protocols (one per stream, no HTTP library),
each sending one GET and timing the ``: ping`` heartbeats that arrive.

    async with StreamFleet(port, host, "/events") as fleet:
        await fleet.grow_to(1000)       # opens streams in batches, waits for their 200s
        fleet.record(True)              # start collecting gaps between heartbeats
        await asyncio.sleep(5)
        gaps = fleet.take_gaps()        # seconds between consecutive heartbeats, per stream
"""

from __future__ import annotations

import asyncio
import time
from types import TracebackType

PING = b": ping"


class StreamClient(asyncio.Protocol):
    __slots__ = ("fleet", "head", "last", "opened", "tail", "transport")

    def __init__(self, fleet: StreamFleet) -> None:
        self.fleet = fleet
        self.transport: asyncio.Transport | None = None
        self.head = b""
        self.opened: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.last = 0.0
        self.tail = b""
        fleet.everyone.append(self)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        transport.write(self.fleet.request)  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        if not self.opened.done():
            self.head += data
            end = self.head.find(b"\r\n\r\n")
            if end < 0:
                return
            status = self.head[:end].split(b" ", 2)
            if len(status) < 2 or status[1] != b"200":
                self.opened.set_exception(ConnectionError(
                    f"stream refused: {self.head[:200]!r}"))
                return
            data = self.head[end + 4:]
            self.head = b""
            self.opened.set_result(None)
        buf = self.tail + data
        beats = buf.count(PING)
        self.tail = buf[-(len(PING) - 1):]
        if not beats:
            return
        fleet = self.fleet
        now = time.monotonic()  # uvloop's loop.time() has 1 ms resolution
        if fleet.recording and self.last:
            fleet.gaps.append(now - self.last)
            # More than one heartbeat in one read: they were held up and arrived together.
            fleet.gaps.extend([0.0] * (beats - 1))
        fleet.beats += beats
        self.last = now

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.opened.done():
            self.opened.set_exception(exc or ConnectionError("closed before the response"))
        elif not self.fleet.closing:
            self.fleet.lost += 1


class StreamFleet:
    """Many concurrent SSE streams to ``127.0.0.1:port`` with the given Host."""

    def __init__(self, port: int, host: str, path: str, batch: int = 250) -> None:
        self.port = port
        self.request = (f"GET {path} HTTP/1.1\r\nHost: {host}\r\n"
                        "Accept: text/event-stream\r\n\r\n").encode()
        self.batch = batch
        self.loop = asyncio.get_running_loop()
        self.clients: list[StreamClient] = []  # open and answered 200
        self.everyone: list[StreamClient] = []  # every client made, for close()
        self.recording = False
        self.gaps: list[float] = []
        self.beats = 0
        self.lost = 0  # streams that ended while they should have stayed open
        self.closing = False

    async def _open_one(self) -> StreamClient:
        _, client = await self.loop.create_connection(lambda: StreamClient(self),
                                                      "127.0.0.1", self.port)
        await asyncio.wait_for(client.opened, 60)
        return client

    async def grow_to(self, count: int) -> None:
        """Open streams, ``batch`` at a time, until ``count`` are open and answered."""
        while len(self.clients) < count:
            n = min(self.batch, count - len(self.clients))
            results = await asyncio.gather(*(self._open_one() for _ in range(n)),
                                           return_exceptions=True)
            failures = [r for r in results if isinstance(r, BaseException)]
            self.clients += [r for r in results if isinstance(r, StreamClient)]
            if failures:
                raise RuntimeError(f"{len(failures)} of {n} streams failed to open at "
                                   f"{len(self.clients)} open: {failures[0]!r}")

    def record(self, on: bool) -> None:
        self.recording = on

    def take_gaps(self) -> list[float]:
        gaps, self.gaps = self.gaps, []
        return gaps

    def silent_since(self, since: float) -> int:
        """Streams that got no heartbeat after ``since`` (time.monotonic())."""
        return sum(1 for c in self.clients if c.last < since)

    async def close(self) -> None:
        self.closing = True
        for client in self.everyone:
            if client.transport is not None:
                client.transport.abort()
        self.clients.clear()
        self.everyone.clear()
        await asyncio.sleep(0)

    async def __aenter__(self) -> StreamFleet:
        return self

    async def __aexit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()
