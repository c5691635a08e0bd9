"""Token usage read from upstream answers, as they pass: whole JSON bodies and
server-sent event streams (OpenAI Chat Completions and Responses, Anthropic Messages).

    meter = Meter()
    meter.feed_json(json.loads(body))               # a whole answer
    for event in SseSplitter().feed(chunk): ...     # a stream, event by event
    meter.input_tokens, meter.output_tokens

Where the counts are: Chat Completions ``usage.prompt_tokens``/``completion_tokens`` (in
a stream, the last chunk, with ``stream_options.include_usage``); Responses
``usage.input_tokens``/``output_tokens`` (in a stream, the ``response.completed`` event's
``response.usage``); Anthropic ``message.usage`` in ``message_start``, then cumulative
``usage`` in ``message_delta``. Later counts replace earlier ones (they are cumulative).
"""

from __future__ import annotations

import json
from typing import Any


class Meter:
    def __init__(self) -> None:
        self.input_tokens = 0
        self.output_tokens = 0

    def feed_json(self, obj: Any) -> None:
        if not isinstance(obj, dict):
            return
        for holder in (obj, obj.get("response"), obj.get("message")):
            if isinstance(holder, dict) and isinstance(holder.get("usage"), dict):
                self._take(holder["usage"])

    def feed_event(self, event: bytes) -> None:
        """One SSE event (its ``data:`` lines); anything not JSON is skipped."""
        data = b"\n".join(line[5:].lstrip(b" ") for line in event.splitlines()
                          if line.startswith(b"data:"))
        if not data or data == b"[DONE]":
            return
        try:
            self.feed_json(json.loads(data))
        except ValueError:
            return

    def _take(self, usage: dict[str, Any]) -> None:
        for names, attr in ((("prompt_tokens", "input_tokens"), "input_tokens"),
                            (("completion_tokens", "output_tokens"), "output_tokens")):
            for name in names:
                value = usage.get(name)
                if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
                    setattr(self, attr, value)
                    break


def is_usage_only(event: bytes) -> bool:
    """A Chat Completions chunk with no choices and a usage: the one the gateway asked
    for with ``include_usage`` when the client did not (dropped before the client)."""
    data = b"\n".join(line[5:].lstrip(b" ") for line in event.splitlines()
                      if line.startswith(b"data:"))
    try:
        obj = json.loads(data)
    except ValueError:
        return False
    return isinstance(obj, dict) and obj.get("choices") == [] and "usage" in obj


class SseSplitter:
    """Cuts a byte stream into whole events (each with its blank-line terminator), so
    each can be forwarded the moment it is complete."""

    def __init__(self) -> None:
        self._buf = b""

    def feed(self, chunk: bytes) -> list[bytes]:
        self._buf += chunk
        events: list[bytes] = []
        while True:
            cut = _boundary(self._buf)
            if cut < 0:
                return events
            events.append(self._buf[:cut])
            self._buf = self._buf[cut:]

    def rest(self) -> bytes:
        """What came after the last complete event (a stream cut short)."""
        rest, self._buf = self._buf, b""
        return rest


def _boundary(buf: bytes) -> int:
    """The end of the first event in ``buf`` (after its blank line), or -1."""
    best = -1
    for sep in (b"\n\n", b"\r\n\r\n", b"\r\r"):
        i = buf.find(sep)
        if i >= 0 and (best < 0 or i + len(sep) < best):
            best = i + len(sep)
    return best
