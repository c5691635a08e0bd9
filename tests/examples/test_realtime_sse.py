"""examples/realtime-sse on a real platform: a text/event-stream ReadableStream, events
delivered one by one, ": ping" comments, fan-out across isolates with LISTEN/NOTIFY and
Last-Event-ID replay."""

from __future__ import annotations

import json
import time
from contextlib import ExitStack

import httpx
import pytest

from phloem.testing import PlatformProcess

from .support import HeldRequest, SseReader, deploy_example, no_second_isolate, sse_stream


@pytest.fixture(scope="module")
def sse(platform: PlatformProcess) -> str:
    return deploy_example(platform, "sse", "realtime-sse",
                          env={"SSE_PING_INTERVAL_S": "0.3"},
                          limits={"target_inflight": 1, "max_isolates": 2})


def publish(gw: httpx.Client, data: object) -> int:
    res = gw.post("/events", json={"data": data})
    assert res.status_code == 201, res.text
    event_id: int = res.json()["id"]
    return event_id


def open_reader(stack: ExitStack, gw: httpx.Client, **kwargs: object) -> SseReader:
    res = stack.enter_context(sse_stream(gw, "/events", **kwargs))
    assert res.status_code == 200
    assert res.headers["content-type"].startswith("text/event-stream")
    return SseReader(res.iter_lines())


def test_events_arrive_one_by_one_with_pings(platform: PlatformProcess, sse: str) -> None:
    with ExitStack() as stack:
        gw = stack.enter_context(platform.gateway(sse))
        reader = open_reader(stack, gw)
        assert reader.next_of("hello").json()["branch"] == "main"
        # Each event is read before the next one is even published: nothing is held back
        # until the response ends or a buffer fills.
        for n in range(3):
            sent = publish(gw, {"n": n})
            event = reader.next_of("message")
            assert event.json() == {"n": n} and event.id == str(sent)
        # An idle stream gets ": ping" comments (every 0.3 s here, 25 s by default).
        started = time.monotonic()
        reader.wait_comment("ping")
        reader.wait_comment("ping")
        assert time.monotonic() - started < 5


def test_fan_out_across_two_isolates_and_replay(platform: PlatformProcess, sse: str) -> None:
    with ExitStack() as stack:
        gw = stack.enter_context(platform.gateway(sse))
        first = open_reader(stack, gw)
        on_a = first.next_of("hello").json()["isolate"]
        # A request held in flight on the first isolate makes the supervisor start a second
        # one (target_inflight=1); streams opened once it is ready land there.
        held = HeldRequest(platform.gateway_port, sse, "/events", b'{"data": "held"}')
        second: SseReader | None = None
        deadline = time.monotonic() + 30
        while second is None:
            if time.monotonic() > deadline:
                raise no_second_isolate(platform, "sse")
            attempt = ExitStack()
            reader = open_reader(attempt, attempt.enter_context(platform.gateway(sse)))
            on_b = reader.next_of("hello").json()["isolate"]
            if on_b != on_a:
                second = reader
                stack.enter_context(attempt)
            else:
                attempt.close()
                time.sleep(0.1)

        # The ids the isolates report are the platform's own.
        assert {on_a, on_b} == {i["id"] for i in platform.cli_json("status")["isolates"]
                                if i["function"] == "sse"}

        # Published by the first isolate, delivered by both.
        status, body = held.finish()
        assert status == 201
        held_event = json.loads(body)
        assert held_event["isolate"] == on_a
        for reader in (first, second):
            event = reader.next_of("message")
            assert event.json() == "held" and event.id == str(held_event["id"])
        later = publish(gw, "later")
        for reader in (first, second):
            assert reader.next_of("message").json() == "later"

        # A reconnecting EventSource sends Last-Event-ID and gets what it missed first.
        replay = open_reader(stack, stack.enter_context(platform.gateway(sse)),
                             headers={"Last-Event-ID": str(held_event["id"])})
        replay.next_of("hello")
        event = replay.next_of("message")
        assert event.json() == "later" and event.id == str(later)
