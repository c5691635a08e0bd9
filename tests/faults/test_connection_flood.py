"""Idle and unfinished connections must not lock normal clients out (issue 11, abuse):
the head timeout, the per-peer cap, the listener caps with eviction, and a 20,000
connection flood against a real ``phloem up``."""

from __future__ import annotations

import os
import re
import selectors
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from phloem.testing import (
    EXAMPLE,
    PlatformProcess,
    host_of,
    platform_process,
    refused_start,
    wait_for,
)
from tests.conftest import Reliability

FLOOD = Path(__file__).with_name("flood.py")
HEAD_TIMEOUT = 2.0
PER_PEER = 4
PROXY = "127.0.0.2"


@pytest.fixture(scope="module")
def limited() -> Iterator[PlatformProcess]:
    """A platform with small limits: heads within 2 s, 4 connections per address."""
    with platform_process(["--head-timeout", str(HEAD_TIMEOUT), "--max-connections-per-peer",
                           str(PER_PEER), "--trusted-proxy", f"{PROXY}/32"]) as p:
        yield p


def metric(p: PlatformProcess, name: str, **labels: str) -> float:
    """One sample of /metrics (0 when absent)."""
    text = p.metrics().text
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        m = re.fullmatch(rf"{name}\{{(.*)\}} (\S+)", line)
        if m and ",".join(sorted(m.group(1).split(","))) == want:
            return float(m.group(2))
    return 0.0


def connect(port: int, source: str = "127.0.0.1") -> socket.socket:
    s = socket.socket()
    s.bind((source, 0))
    s.connect(("127.0.0.1", port))
    return s


def read_to_eof(s: socket.socket, timeout: float) -> bytes:
    """Everything the server sends until it closes (fails after ``timeout``)."""
    s.settimeout(timeout)
    data = b""
    while chunk := s.recv(65536):
        data += chunk
    return data


def request(port: int, host: str) -> bytes:
    path = "/api/v1/health" if host == "api" else "/"
    return f"GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode()


def response_head(s: socket.socket, timeout: float = 10.0) -> bytes:
    s.settimeout(timeout)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = s.recv(65536)
        assert chunk, f"closed before a response head: {data!r}"
        data += chunk
    return data.split(b"\r\n\r\n", 1)[0]


def listeners(p: PlatformProcess) -> list[tuple[str, int, str]]:
    # (listener, port, Host): the gateway answers an unknown host 404, which is service.
    return [("gateway", p.gateway_port, "nothing.fn.localhost"), ("api", p.api_port, "api")]


def test_head_timeout(limited: PlatformProcess, reliability: Reliability) -> None:
    p = limited
    closed_at: list[float] = []
    for listener, port, host in listeners(p):
        before = metric(p, "phloem_connections_refused_total", listener=listener,
                        reason="head_timeout")
        silent = connect(port)
        start = time.monotonic()
        # A slowloris: one byte of a head every 0.2 s; the deadline is for the whole head.
        slow = connect(port)
        slow.setblocking(False)
        head = request(port, host)[:-2]  # never complete
        got = b""
        i = 0
        while time.monotonic() - start < HEAD_TIMEOUT + 5:
            try:
                chunk = slow.recv(65536)
            except BlockingIOError:
                chunk = None
            except ConnectionResetError:
                break
            if chunk == b"":
                break
            if chunk:
                got += chunk
                continue
            if i < len(head):
                try:
                    slow.send(head[i : i + 1])
                except (BrokenPipeError, ConnectionResetError):
                    break
                i += 1
            time.sleep(0.2)  # the slowloris's pace, not a wait for the server
        closed_after = time.monotonic() - start
        closed_at.append(closed_after)
        assert got.startswith(b"HTTP/1.1 408"), (listener, got)
        assert b"request_timeout" in got
        assert HEAD_TIMEOUT - 0.2 < closed_after < HEAD_TIMEOUT + 3, (listener, closed_after)
        # Nothing sent at all: closed without a word, at the same deadline.
        assert read_to_eof(silent, 5) == b""
        assert time.monotonic() - start < HEAD_TIMEOUT + 3
        def counted(listener: str = listener, before: float = before) -> bool:
            return metric(p, "phloem_connections_refused_total", listener=listener,
                          reason="head_timeout") >= before + 2
        wait_for(counted, 10, f"{listener} head_timeout counted")
        assert f"{listener}: connection limit head_timeout" in "\n".join(p.output)
        silent.close()
        slow.close()

    # A served gateway connection then idle longer than the head timeout is a keep-alive
    # wait (60 s), not a head wait: still usable.
    with connect(p.gateway_port) as s:
        s.sendall(request(p.gateway_port, "nothing.fn.localhost"))
        assert response_head(s).startswith(b"HTTP/1.1 404")
        s.settimeout(HEAD_TIMEOUT + 1)
        read = b"x"
        try:
            read = s.recv(1)
        except TimeoutError:
            read = b"still open"
        assert read == b"still open"
        s.sendall(request(p.gateway_port, "nothing.fn.localhost"))
        assert response_head(s).startswith(b"HTTP/1.1 404")
    reliability.record(rounds=2, passed=2, figure=(
        f"a byte every 0.2 s: 408 after {max(closed_at):.2f} s at most (head_timeout "
        f"{HEAD_TIMEOUT:g} s), gateway and API"))


def test_per_peer_cap(limited: PlatformProcess, reliability: Reliability) -> None:
    p = limited
    for listener, port, host in listeners(p):
        before = metric(p, "phloem_connections_refused_total", listener=listener,
                        reason="per_peer")
        held = [connect(port, "127.0.0.7") for _ in range(PER_PEER)]
        extra = connect(port, "127.0.0.7")
        refused = read_to_eof(extra, 5)
        assert refused.startswith(b"HTTP/1.1 503"), (listener, refused)
        assert b"too_many_connections" in refused and b"per peer" in refused
        # The peer's own connections still work, and so does everyone else.
        held[0].sendall(request(port, host))
        status = response_head(held[0]).split(b" ")[1]
        assert status in (b"200", b"404"), (listener, status)
        with connect(port, "127.0.0.8") as other:
            other.sendall(request(port, host))
            assert response_head(other).split(b" ")[1] in (b"200", b"404")
        assert metric(p, "phloem_connections_refused_total", listener=listener,
                      reason="per_peer") == before + 1
        assert f"{listener}: connection limit per_peer" in "\n".join(p.output)
        for s in [*held, extra]:
            s.close()
        # Closed connections are counted out: the peer may connect again.
        def again(port: int = port, host: str = host) -> bool:
            with connect(port, "127.0.0.7") as s:
                s.sendall(request(port, host))
                return response_head(s).split(b" ")[1] != b"503"
        wait_for(again, 10, f"{listener}: 127.0.0.7 admitted again")

    # Behind a trusted proxy the peer is the proxy, carrying many clients: no cap.
    proxied = [connect(p.gateway_port, PROXY) for _ in range(PER_PEER + 2)]
    for s in proxied:
        s.sendall(request(p.gateway_port, "nothing.fn.localhost"))
        assert response_head(s).startswith(b"HTTP/1.1 404")
        s.close()
    reliability.record(rounds=2, passed=2, figure=(
        f"connection {PER_PEER + 1} from one address: 503, others served (gateway and API); "
        f"a trusted proxy's {PER_PEER + 2} all served"))


# -- the flood ---------------------------------------------------------------------------

FLOOD_PROCESSES = 4  # 5,000 sockets each (a process may have at most 20,000)
PER_PROCESS = 5000
SOURCES = [f"127.0.0.{i}" for i in range(10, 50)]  # 40 addresses: the per-peer cap is not hit
ROUNDS = 10
DEADLINE_S = 5.0


def _read_line(proc: subprocess.Popen[str], timeout: float) -> str:
    assert proc.stdout is not None
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        if not sel.select(timeout):
            raise AssertionError(f"flood client {proc.pid} silent for {timeout} s")
    return proc.stdout.readline().strip()


def test_connection_flood(reliability: Reliability) -> None:
    """20,000 connections that never finish a head (half send nothing), from 40 addresses
    and 4 processes, 15,000 at the gateway and 5,000 at the API, held; a normal client on
    127.0.0.1 is served by both, with a new connection each time, within 5 s, and a new
    deployment is built and cold-started."""
    started = time.monotonic()
    # A long head timeout: the flood stays, so the caps alone must keep clients served.
    with platform_process(["--head-timeout", "300"]) as p:
        fn = p.deploy("hello", EXAMPLE)
        host = host_of(fn["invocation_url"])
        gw_url = f"http://127.0.0.1:{p.gateway_port}/"
        api = p.credentials["api_url"] + "/api/v1"
        key = {"Authorization": f"Bearer {p.credentials['api_key']}"}
        assert httpx.get(gw_url, headers={"Host": host}, timeout=120).status_code == 200

        targets = [p.gateway_port] * (FLOOD_PROCESSES - 1) + [p.api_port]
        floods = [subprocess.Popen([sys.executable, str(FLOOD), str(port), str(PER_PROCESS),
                                    *SOURCES], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                   text=True) for port in targets]
        try:
            reports = [_read_line(f, 90).split() for f in floods]
            # Every connection reached the server (its head bytes were acknowledged).
            assert sum(int(r[1]) for r in reports) == FLOOD_PROCESSES * PER_PROCESS, reports
            assert sum(int(r[3]) for r in reports) == 0, reports
            assert p.proc is not None
            fd_dir = f"/proc/{p.proc.pid}/fd"
            fds = len(os.listdir(fd_dir))

            passed, worst = 0, 0.0
            for _ in range(ROUNDS):
                t0 = time.monotonic()
                try:
                    # httpx.get: a new connection each time, so every round is accepted
                    # while the listeners are full.
                    ok = (httpx.get(gw_url, headers={"Host": host},
                                    timeout=DEADLINE_S).status_code == 200
                          and httpx.get(f"{api}/health", timeout=DEADLINE_S).status_code == 200
                          and httpx.get(f"{api}/branches", headers=key,
                                        timeout=DEADLINE_S).status_code == 200)
                except httpx.HTTPError:
                    ok = False
                took = time.monotonic() - t0
                worst = max(worst, took)
                passed += ok and took < DEADLINE_S
            fds = max(fds, len(os.listdir(fd_dir)))
            # Builds, spawns and the new isolate's upstream connections get descriptors:
            # a deploy through the API and a cold start, with the flood still held.
            t0 = time.monotonic()
            second = host_of(p.deploy("second", EXAMPLE)["invocation_url"])
            cold = httpx.get(gw_url, headers={"Host": second}, timeout=60).status_code
            deploy_s = time.monotonic() - t0
            fds = max(fds, len(os.listdir(fd_dir)))
            gw_limit = metric(p, "phloem_connection_limit", listener="gateway")
            gw_open = metric(p, "phloem_open_connections", listener="gateway")
            api_open = metric(p, "phloem_open_connections", listener="api")
            evicted_gw = metric(p, "phloem_connections_refused_total", listener="gateway",
                                reason="evicted")
            evicted_api = metric(p, "phloem_connections_refused_total", listener="api",
                                 reason="evicted")
        finally:
            for f in floods:
                if f.stdin is not None:
                    f.stdin.close()
                f.wait(30)
        figure = (f"20,000 unfinished heads held: {passed}/{ROUNDS} rounds served by "
                  f"gateway and API, {worst * 1000:.0f} ms max; {fds} of 20,000 fds used; "
                  f"{int(evicted_gw + evicted_api)} evicted; deploy + cold start "
                  f"{deploy_s:.1f} s")
        reliability.record(rounds=ROUNDS, passed=passed, figure=figure)
        assert passed == ROUNDS, figure
        assert cold == 200, figure
        assert 0 < gw_open <= gw_limit
        assert api_open <= metric(p, "phloem_connection_limit", listener="api")
        assert evicted_gw > 0 and evicted_api > 0
        # Descriptors to spare for isolates' connections, spawns and databases.
        assert fds < 20000 - 1000, figure
        output = "\n".join(p.output)
        assert "gateway: connection limit evicted" in output
        assert "api: connection limit evicted" in output
    print(f"flood test: {time.monotonic() - started:.1f} s; {figure}")


@pytest.mark.parametrize(("env", "message"), [
    ({"PHLOEM_HEAD_TIMEOUT": "0"}, "head_timeout: must be a positive number of seconds"),
    ({"PHLOEM_HEAD_TIMEOUT": "inf"}, "head_timeout: must be a positive number of seconds"),
    ({"PHLOEM_MAX_CONNECTIONS_PER_PEER": "-1"}, "'--max-connections-per-peer'"),
    ({"PHLOEM_API_MAX_CONNECTIONS": "0"}, "'--api-max-connections'"),
])
def test_bad_limits_are_refused_by_name(env: dict[str, str], message: str) -> None:
    assert message in refused_start(env)
