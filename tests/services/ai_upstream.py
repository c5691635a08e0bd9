"""A local OpenAI-compatible server for the AI Gateway's tests (the only fake: the real
providers are out of reach). It records every request it receives and answers Chat
Completions (whole or streamed), Responses, Models and Anthropic Messages with fixed usage counts.

A streamed answer whose request has ``"user": "gated"`` sends its first content chunk,
then waits for :attr:`Upstream.release` before the rest: a test that reads that first
chunk through the gateway before releasing proves the gateway does not buffer.

    with Upstream() as up:
        up.url            # "http://127.0.0.1:PORT/v1"
        up.received       # [Received(method, path, headers, body), ...]

    with Upstream() as up, ai_platform(up) as p:   # phloem up --ai-provider openai=up.url
        ...
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from phloem.testing import PlatformProcess, free_port, platform_process

#: The operator's key for the upstream: it must reach the upstream, never a function.
OPERATOR_KEY = "sk-operator-" + "k" * 24
#: The variable ``phloem up --ai-provider ...,key-env=`` reads the key from.
KEY_ENV = "PHLOEM_TEST_AI_UPSTREAM_KEY"

CHAT_USAGE = {"prompt_tokens": 7, "completion_tokens": 2, "total_tokens": 9}
RESPONSES_USAGE = {"input_tokens": 11, "output_tokens": 4, "total_tokens": 15,
                   "input_tokens_details": {"cached_tokens": 0},
                   "output_tokens_details": {"reasoning_tokens": 0}}
ANTHROPIC_USAGE = {"input_tokens": 13, "output_tokens": 6}
#: Seconds a gated stream waits for its release before giving up (a failing test).
GATE_TIMEOUT_S = 30


@dataclass
class Received:
    method: str
    path: str
    headers: dict[str, str]
    body: Any


class Upstream:
    def __init__(self) -> None:
        self.port = free_port()
        self.received: list[Received] = []
        self.release = threading.Event()
        #: Set once a gated stream sent its last chunk.
        self.sent_last = threading.Event()
        owner = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *_: Any) -> None:
                pass

            def do_GET(self) -> None:
                owner.received.append(Received("GET", self.path, dict(self.headers), None))
                self._json(200, {"object": "list", "data": [
                    {"id": "gpt-test", "object": "model", "owned_by": "test"}]})

            def do_POST(self) -> None:
                length = int(self.headers.get("content-length", "0"))
                body = json.loads(self.rfile.read(length) or b"null")
                owner.received.append(Received("POST", self.path, dict(self.headers), body))
                if self.path.endswith("/messages"):  # Anthropic's Messages API
                    self._json(200, {"id": "msg_1", "type": "message", "role": "assistant",
                                     "content": [{"type": "text", "text": "Hello"}],
                                     "model": body.get("model"), "stop_reason": "end_turn",
                                     "usage": ANTHROPIC_USAGE})
                elif self.path.endswith("/responses"):
                    self._json(200, {
                        "id": "resp_1", "object": "response", "created_at": 1767225600,
                        "status": "completed", "model": body.get("model"),
                        "incomplete_details": None, "usage": RESPONSES_USAGE,
                        "output": [{"type": "message", "id": "msg_1", "status": "completed",
                                    "role": "assistant", "content": [{
                                        "type": "output_text", "text": "Hello",
                                        "annotations": []}]}]})
                elif body.get("stream"):
                    self._stream(body)
                else:
                    self._json(200, {"id": "chatcmpl-1", "object": "chat.completion",
                                     "choices": [{"index": 0, "message": {
                                         "role": "assistant", "content": "Hello"},
                                         "finish_reason": "stop"}],
                                     "usage": CHAT_USAGE})

            def _json(self, status: int, obj: Any) -> None:
                data = json.dumps(obj).encode()
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _chunk(self, data: bytes) -> None:
                self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
                self.wfile.flush()

            def _event(self, obj: Any) -> None:
                self._chunk(b"data: " + json.dumps(obj).encode() + b"\n\n")

            def _stream(self, body: dict[str, Any]) -> None:
                self.send_response(200)
                self.send_header("content-type", "text/event-stream")
                self.send_header("transfer-encoding", "chunked")
                self.end_headers()

                def delta(text: str) -> dict[str, Any]:
                    return {"id": "c1", "object": "chat.completion.chunk", "choices": [
                        {"index": 0, "delta": {"content": text}, "finish_reason": None}]}

                self._event(delta("Hel"))
                if body.get("user") == "gated":
                    owner.release.wait(GATE_TIMEOUT_S)
                self._event(delta("lo"))
                if (body.get("stream_options") or {}).get("include_usage"):
                    self._event({"id": "c1", "object": "chat.completion.chunk",
                                 "choices": [], "usage": CHAT_USAGE})
                self._chunk(b"data: [DONE]\n\n")
                self._chunk(b"")
                if body.get("user") == "gated":
                    owner.sent_last.set()

        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.server.daemon_threads = True

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    @property
    def anthropic_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/anthropic/v1"

    def __enter__(self) -> Upstream:
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *_: object) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


@contextmanager
def ai_platform(upstream: Upstream) -> Iterator[PlatformProcess]:
    """A platform whose AI Gateway forwards to ``upstream`` with :data:`OPERATOR_KEY`."""
    os.environ[KEY_ENV] = OPERATOR_KEY  # phloem up reads the key from its own env
    try:
        with platform_process(
                ["--ai-provider", f"openai={upstream.url},key-env={KEY_ENV}"]) as p:
            yield p
    finally:
        os.environ.pop(KEY_ENV, None)
