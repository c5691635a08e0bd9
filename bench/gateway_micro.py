"""The Python cost of one request on the gateway's callback path, in process: a real
``Gateway`` connection driven with stand-in transports (no sockets, no kernel), so what is
measured is the gateway's own per-request work: request parsing, routing glue, the upstream
head, response framing, the end of the exchange and its record. CPU time of this process
(``time.process_time``), best of 7, so a busy shared machine disturbs it little; compare
builds by running it from each, alternating:

    .venv/bin/python bench/gateway_micro.py [REQUESTS]
    /work/wt-base/.venv/bin/python bench/gateway_micro.py

The router hands out one stand-in lease at once (``acquire_nowait``); the platform's router
and request observer are not included (see bench/gateway_ab.py for the whole process).
"""

from __future__ import annotations

import asyncio
import sys
import time
from typing import Any

import uvloop

from phloem.gateway import native
from phloem.gateway.connection import _Connection
from phloem.gateway.server import Gateway, GatewayConfig, RequestRecord

REQUEST = b"GET / HTTP/1.1\r\nHost: br-quiet-moon-3f9a2c-todos.fn.localhost:8787\r\n\r\n"
RESPONSE = (b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: 12\r\n\r\n"
            b"hello world\n")


class _Transport:
    """Both sides' transport: counts writes, never pushes back."""

    def __init__(self) -> None:
        self.writes = 0
        self.protocol: Any = asyncio.Protocol()

    def write(self, data: bytes) -> None:
        self.writes += 1

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 40000) if name == "peername" else default

    def is_closing(self) -> bool:
        return False

    def get_protocol(self) -> Any:
        return self.protocol

    def set_protocol(self, protocol: Any) -> None:
        self.protocol = protocol

    def get_write_buffer_size(self) -> int:
        return 0

    def pause_reading(self) -> None: ...

    def resume_reading(self) -> None: ...

    def close(self) -> None: ...

    def abort(self) -> None: ...


class _Lease:
    def __init__(self, transport: _Transport) -> None:
        self.writer = self
        self.reader = self
        self.transport = transport
        self.limits = None
        self.replay_safe = False

    def at_eof(self) -> bool:
        return False

    def release(self, *, reusable: bool) -> None: ...

    def mark_stream(self) -> None: ...


class _Router:
    def __init__(self) -> None:
        self.upstream = _Transport()
        self.lease = _Lease(self.upstream)

    def acquire_nowait(self, host: str) -> Any:
        return self.lease

    async def acquire(self, host: str) -> Any:
        raise NotImplementedError


async def measure(requests: int) -> float:
    router = _Router()
    records: list[RequestRecord] = []
    conn = _Connection(Gateway(router, GatewayConfig(), on_request=records.append))  # type: ignore[arg-type]
    client = _Transport()
    conn.connection_made(client)  # type: ignore[arg-type]
    for _ in range(5):  # its task starts waiting for a request
        await asyncio.sleep(0)
    conn.data_received(REQUEST)
    relay = router.upstream.protocol
    relay.data_received(RESPONSE)
    best = float("inf")
    for _ in range(7):
        records.clear()
        start = time.process_time()
        for _ in range(requests):
            conn.data_received(REQUEST)
            relay.data_received(RESPONSE)
        best = min(best, (time.process_time() - start) / requests)
        if len(records) != requests or client.writes != router.upstream.writes:
            raise RuntimeError("the stand-in exchange did not run on the callback path")
    conn.connection_lost(None)
    await asyncio.sleep(0)
    return best


def main() -> int:
    requests = int(sys.argv[1]) if len(sys.argv) > 1 else 10_000
    print(f"{uvloop.run(measure(requests)) * 1e6:.2f} us/request "
          f"(callback path, in process, best of 7 x {requests}, "
          f"{'compiled' if native else 'Python'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
