"""phloem.gateway.admission: the descriptor plan, config checks, and a Listener out of
descriptors (a real process with a real, small RLIMIT_NOFILE)."""

from __future__ import annotations

import json
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path

import pytest

from phloem.gateway.admission import Admission, AdmissionConfig, plan_connections
from phloem.gateway.tls import LocalCA
from phloem.testing import wait_for


def test_plan_leaves_descriptors_for_the_rest() -> None:
    plan = plan_connections(20000)
    assert (plan.gateway, plan.api) == (9360, 256)
    # Every gateway client in a request may hold an upstream connection too.
    assert plan.rest - plan.gateway >= 1024
    assert plan.warning is None
    small = plan_connections(1024)
    assert small.gateway + small.api < 1024 and small.gateway >= 16
    over = plan_connections(20000, gateway=15000)
    assert over.gateway == 15000 and over.warning and "max_connections 15000" in over.warning
    api = plan_connections(20000, api=8000)  # as given, but said to be too many
    assert api.api == 8000 and api.warning and "api_max_connections 8000" in api.warning


@pytest.mark.parametrize(("kwargs", "field"), [
    ({"max_connections": 0}, "max_connections"),
    ({"max_connections": 5, "max_per_peer": -1}, "max_connections_per_peer"),
    ({"max_connections": 5, "head_timeout_s": 0.0}, "head_timeout_s"),
    ({"max_connections": 5, "head_timeout_s": float("nan")}, "head_timeout_s"),
])
def test_config_errors_name_the_field(kwargs: dict[str, float], field: str) -> None:
    with pytest.raises(ValueError, match=f"^{field}: must"):
        AdmissionConfig(**kwargs)  # type: ignore[arg-type]


# A Listener serving a trivial HTTP protocol with at most LIMIT descriptors; every line on
# stdin is answered with the refusal counters and the open count.
SERVER = """
import asyncio, json, resource, sys, uvloop
from phloem.gateway.admission import Admission, AdmissionConfig, Listener

limit = int(sys.argv[1])
resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))

class Http(asyncio.Protocol):
    def __init__(self, admission):
        self.admission, self.evictable = admission, True
    def evict(self):
        self.transport.abort()
    def connection_made(self, transport):
        self.transport = transport
        self.admission.waiting(self)
    def data_received(self, data):
        if b"\\r\\n\\r\\n" in data:
            self.evictable = False
            self.transport.write(b"HTTP/1.1 200 OK\\r\\nContent-Length: 2\\r\\n"
                                 b"Connection: close\\r\\n\\r\\nok")
            self.transport.close()
    def connection_lost(self, exc):
        self.admission.closed(self)

async def main():
    loop = asyncio.get_running_loop()
    admission = Admission("test", AdmissionConfig(max_connections=100000, max_per_peer=0))
    listener = await Listener.open("127.0.0.1", 0, lambda: Http(admission), admission)
    print(listener.sockets[0].getsockname()[1], flush=True)
    while await loop.run_in_executor(None, sys.stdin.readline):
        print(json.dumps({"open": admission.open, **admission.refused}), flush=True)

uvloop.run(main())
"""
LIMIT = 64


def counters(proc: subprocess.Popen[str]) -> dict[str, int]:
    """The admission counters of a server started from SERVER or TLS_SERVER: it prints
    them as one JSON line for every line it reads."""
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.write("\n")
    proc.stdin.flush()
    data: dict[str, int] = json.loads(proc.stdout.readline())
    return data


def test_out_of_descriptors_still_serves() -> None:
    """With every descriptor taken by silent connections, a new client is still served:
    the spare descriptor accepts it and the longest-waiting connections make room."""
    proc = subprocess.Popen([sys.executable, "-c", SERVER, str(LIMIT)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdin is not None and proc.stderr is not None
    silent: list[socket.socket] = []
    try:
        port = int(proc.stdout.readline())

        silent = [socket.create_connection(("127.0.0.1", port)) for _ in range(2 * LIMIT)]
        wait_for(lambda: counters(proc)["descriptors"] > 0, 10, "accept out of descriptors")
        assert counters(proc)["open"] < LIMIT
        for _ in range(5):
            t0 = time.monotonic()
            with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
                s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
                data = b""
                while chunk := s.recv(4096):
                    data += chunk
            assert data.startswith(b"HTTP/1.1 200"), data
            assert time.monotonic() - t0 < 5
    finally:
        for s in silent:
            s.close()
        proc.stdin.close()
        proc.wait(10)
    log = proc.stderr.read()
    assert "test: connection limit descriptors" in log
    # Rate-limited: one line (plus at most a summary), not one per connection.
    assert log.count("connection limit descriptors") <= 2, log


class Conn:
    """A connection as admission sees it: evictable while waiting for a head."""

    def __init__(self, admission: Admission, ip: str) -> None:
        self.admission, self.evictable, self.evicted = admission, True, False
        admission.opened(self, ip)
        admission.waiting(self)

    def evict(self) -> None:
        self.evicted = True


def test_caps_and_eviction_order(caplog: pytest.LogCaptureFixture) -> None:
    a = Admission("gw", AdmissionConfig(max_connections=3, max_per_peer=2),
                  exempt=lambda ip: ip == "10.0.0.9")
    first, second = Conn(a, "10.0.0.1"), Conn(a, "10.0.0.2")
    assert a.check("10.0.0.1") is None
    busy = Conn(a, "10.0.0.1")
    busy.evictable = False  # in a request
    assert a.check("10.0.0.1") == "per_peer"
    # Full: the one waiting longest goes (first waits again, so second waited longer).
    a.waiting(first)
    assert a.check("10.0.0.9") is None
    assert second.evicted and not first.evicted and not busy.evicted
    assert a.open == 2
    a.closed(second)  # its connection_lost: already counted out
    assert a.open == 2
    proxy = [Conn(a, "10.0.0.9")]
    first.evictable = False  # now in a request: skipped
    assert a.check("10.0.0.4") is None
    assert proxy[0].evicted and not first.evicted
    Conn(a, "10.0.0.4").evictable = False
    assert a.check("10.0.0.5") == "capacity"  # all three in requests
    # The exempt peer (a trusted proxy) has no per-peer cap.
    b = Admission("gw2", AdmissionConfig(max_connections=10, max_per_peer=1),
                  exempt=lambda ip: ip == "10.0.0.9")
    Conn(b, "10.0.0.9")
    assert b.check("10.0.0.9") is None
    assert a.refused == {"per_peer": 1, "capacity": 1, "evicted": 2, "head_timeout": 0,
                         "descriptors": 0}
    # One line per reason and interval, not one per hit.
    lines = [r.getMessage() for r in caplog.records if "connection limit" in r.getMessage()]
    assert sorted(line.split(":")[1] for line in lines) == [
        " connection limit capacity", " connection limit evicted", " connection limit per_peer"]
    # An evicted connection no longer counts against its peer: with a cap of one per
    # peer, the peer whose connection was closed to make room may connect again.
    c = Admission("gw3", AdmissionConfig(max_connections=1, max_per_peer=1))
    gone = Conn(c, "10.0.0.2")
    assert c.check("10.0.0.3") is None and gone.evicted
    assert c.open == 0 and c.check("10.0.0.2") is None


# -- TLS: connections still in their handshake --------------------------------------------

# The same trivial protocol behind a TLS Listener: at most FLOOD_MAX connections, a head
# timeout of HEAD_S (which also bounds the handshake).
TLS_SERVER = SERVER.replace(
    'limit = int(sys.argv[1])\nresource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))\n',
    "import pathlib, ssl\nfrom phloem.gateway.tls import server_context\n"
    "tls = server_context(pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2]))\n",
).replace(
    "AdmissionConfig(max_connections=100000, max_per_peer=0)",
    "AdmissionConfig(max_connections=int(sys.argv[3]), max_per_peer=0, "
    "head_timeout_s=float(sys.argv[4]))",
).replace("lambda: Http(admission), admission)", "lambda: Http(admission), admission, tls=tls)")
FLOOD_MAX = 8
HEAD_S = 3.0


def half_client_hello(ctx: ssl.SSLContext) -> bytes:
    """The first half of a real ClientHello (the handshake can never complete)."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing, server_hostname="localhost")
    with pytest.raises(ssl.SSLWantReadError):
        obj.do_handshake()
    hello = outgoing.read()
    return hello[: len(hello) // 2]


def tls_get(port: int, ctx: ssl.SSLContext) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw, \
            ctx.wrap_socket(raw, server_hostname="localhost") as s:
        s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        data = b""
        while chunk := s.recv(4096):
            data += chunk
    return data


def closed_by_peer(s: socket.socket) -> bool:
    try:
        return s.recv(1) == b""
    except ConnectionResetError:
        return True


def test_handshake_flood_is_evicted(tmp_path: Path) -> None:
    """Connections that never finish their TLS handshake (silent, or half a ClientHello)
    fill the listener; they are evicted like any connection waiting for a head, so a real
    TLS client is served at once, and an unfinished handshake is closed after the head
    timeout."""
    ca = LocalCA.ensure(tmp_path / "ca")
    cert, key = ca.issue(tmp_path, ["localhost"])
    client = ssl.create_default_context(cafile=str(ca.cert_path))
    proc = subprocess.Popen([sys.executable, "-c", TLS_SERVER, str(cert), str(key),
                             str(FLOOD_MAX), str(HEAD_S)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdin is not None and proc.stderr is not None
    flood: list[socket.socket] = []
    try:
        port = int(proc.stdout.readline())

        # Bounded: alone, a connection that sends half a ClientHello is closed after the
        # head timeout (not evicted: there is room).
        t0 = time.monotonic()
        with socket.create_connection(("127.0.0.1", port), timeout=HEAD_S + 5) as lone:
            lone.sendall(half_client_hello(client))
            assert closed_by_peer(lone)
        assert HEAD_S - 0.5 <= time.monotonic() - t0 < HEAD_S + 3
        wait_for(lambda: counters(proc)["open"] == 0, 5, "the lone connection counted out")

        hello = half_client_hello(client)
        for i in range(3 * FLOOD_MAX):
            s = socket.create_connection(("127.0.0.1", port), timeout=HEAD_S + 5)
            if i % 2:
                s.sendall(hello)
            flood.append(s)
        wait_for(lambda: counters(proc)["evicted"] >= 2 * FLOOD_MAX, 10,
                 "the flood fills the listener and evicts")
        for _ in range(3):
            t0 = time.monotonic()
            data = tls_get(port, client)
            assert data.startswith(b"HTTP/1.1 200"), data
            assert time.monotonic() - t0 < 2
        seen = counters(proc)
        assert seen["capacity"] == 0 and seen["open"] <= FLOOD_MAX, seen
        # The evicted ones were closed, the oldest first.
        assert closed_by_peer(flood[0]) and closed_by_peer(flood[1])
    finally:
        for s in flood:
            s.close()
        proc.stdin.close()
        proc.wait(10)
