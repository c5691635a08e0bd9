"""Helpers shared by the example tests: deploying an example, HS256 tokens, a request
held in flight (to make the supervisor start a second isolate), a Server-Sent Events
reader and a raw WebSocket that shows ping frames."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from websockets.client import ClientProtocol
from websockets.frames import Frame, Opcode
from websockets.http11 import Response
from websockets.uri import parse_uri

from phloem.testing import PlatformProcess, host_of

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def deploy_example(platform: PlatformProcess, slug: str, example: str,
                   env: dict[str, str] | None = None,
                   limits: dict[str, str | float | int] | None = None) -> str:
    """Deploy ``examples/<example>`` as ``slug`` on main; returns the function's host."""
    extra: list[str] = []
    for key, value in (env or {}).items():
        extra += ["--env", f"{key}={value}"]
    for key, limit in (limits or {}).items():
        extra += ["--limit", f"{key}={limit}"]
    fn = platform.deploy(slug, EXAMPLES / example, *extra)
    assert fn["status"] == "ready", fn
    return host_of(fn["invocation_url"])


def jwt_hs256(secret: str, claims: dict[str, Any], ttl_s: float = 600) -> str:
    """An HS256 JWT, as an identity provider sharing ``secret`` would issue it."""
    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    now = int(time.time())
    body = {"iat": now, "exp": int(now + ttl_s), **claims}
    signing_input = (b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode()) + "."
                     + b64(json.dumps(body).encode()))
    signature = hmac.new(secret.encode(), signing_input.encode(), hashlib.sha256).digest()
    return signing_input + "." + b64(signature)


def no_second_isolate(platform: PlatformProcess, slug: str) -> AssertionError:
    """The failure when scaling out to a second isolate did not happen: with the
    function's log, which says why."""
    logs = platform.cli("functions", "logs", slug, "--lines", "60").stdout
    return AssertionError(f"no second isolate within 30 s; logs:\n{logs}")


class HeldRequest:
    """A POST whose body is sent but for its last byte, so the request stays in flight
    on the isolate serving it until :meth:`finish`. With ``target_inflight=1`` the next
    request then makes the supervisor start another isolate."""

    def __init__(self, port: int, host: str, path: str, body: bytes) -> None:
        assert len(body) >= 2
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        head = (f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n")
        self.sock.sendall(head.encode() + body[:-1])
        self._last = body[-1:]

    def finish(self) -> tuple[int, bytes]:
        """Send the last byte; return the response's status and body."""
        self.sock.sendall(self._last)
        data = b""
        while chunk := self.sock.recv(65536):
            data += chunk
        self.sock.close()
        head, _, body = data.partition(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        if b"transfer-encoding: chunked" in head.lower():
            body = _unchunk(body)
        return status, body


def _unchunk(data: bytes) -> bytes:
    out = b""
    while data:
        size_line, _, data = data.partition(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            break
        out += data[:size]
        data = data[size + 2:]
    return out


@dataclass
class SseEvent:
    event: str = "message"
    data: str = ""
    id: str | None = None

    def json(self) -> Any:
        return json.loads(self.data)


@dataclass
class SseReader:
    """Reads a text/event-stream response line by line: events and ``:`` comments."""

    lines: Iterator[str]
    comments: list[str] = field(default_factory=list)

    def next_event(self) -> SseEvent:
        event = SseEvent()
        seen = False
        for line in self.lines:
            if line == "":
                if seen:
                    return event
                continue
            if line.startswith(":"):
                self.comments.append(line[1:].strip())
                continue
            name, _, value = line.partition(":")
            value = value.removeprefix(" ")
            seen = True
            if name == "event":
                event.event = value
            elif name == "data":
                event.data = value if not event.data else event.data + "\n" + value
            elif name == "id":
                event.id = value
        raise AssertionError("the event stream ended")

    def next_of(self, kind: str) -> SseEvent:
        while True:
            event = self.next_event()
            if event.event == kind:
                return event

    def wait_comment(self, text: str) -> None:
        """Read until a ``: text`` comment arrives (events read meanwhile are dropped)."""
        start = len(self.comments)
        for line in self.lines:
            if line.startswith(":"):
                self.comments.append(line[1:].strip())
                if text in self.comments[start:]:
                    return
        raise AssertionError(f"the event stream ended before ': {text}'")


def sse_stream(client: httpx.Client, path: str, **kwargs: Any) -> Any:
    """``client.stream("GET", path)`` with a read timeout that fails a stuck wait."""
    return client.stream("GET", path, timeout=httpx.Timeout(30, read=15), **kwargs)


class RawWebSocket:
    """A WebSocket client over a plain socket with websockets' sans-I/O protocol, so the
    test sees every frame, pings included, and decides whether pongs go out."""

    def __init__(self, port: int, host: str, path: str, *, answer_pings: bool) -> None:
        self.protocol = ClientProtocol(parse_uri(f"ws://{host}{path}"))
        self.answer_pings = answer_pings
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=15)
        self.protocol.send_request(self.protocol.connect())
        self._flush(always=True)
        self.response: Response | None = None
        self.frames: list[Frame] = []
        self.eof = False
        while self.response is None:
            self._pump()
        assert self.response.status_code == 101, self.response.status_code

    def _flush(self, *, always: bool = False) -> None:
        data = b"".join(self.protocol.data_to_send())
        if data and (always or self.answer_pings):
            self.sock.sendall(data)

    def _pump(self) -> None:
        """Read once from the socket (blocking up to its timeout) and handle events."""
        try:
            data = self.sock.recv(65536)
        except TimeoutError:
            return
        if data:
            self.protocol.receive_data(data)
        else:
            self.protocol.receive_eof()
            self.eof = True
        for event in self.protocol.events_received():
            if isinstance(event, Response):
                self.response = event
            elif isinstance(event, Frame):
                self.frames.append(event)
        # Pongs (and close frames) the protocol queued go out only if we answer.
        self._flush()
        if self.eof and self.response is None:
            raise AssertionError("connection closed before the handshake completed")

    def poll(self, timeout: float = 0.02) -> None:
        """Handle whatever arrives within ``timeout`` (nothing if closed)."""
        if not self.eof:
            self.sock.settimeout(timeout)
            self._pump()

    def pings(self) -> int:
        return sum(1 for f in self.frames if f.opcode is Opcode.PING)

    def wait_closed(self, timeout: float) -> float:
        """Pump until the server closes the connection; returns when (monotonic)."""
        deadline = time.monotonic() + timeout
        self.sock.settimeout(0.1)
        while not self.eof:
            if time.monotonic() > deadline:
                raise AssertionError(f"the server did not close the socket in {timeout} s")
            self._pump()
        return time.monotonic()

    def close(self) -> None:
        self.sock.close()
