"""examples/realtime-chat on a real platform: Hono fetch + ws upgrade, JWT on ?token=,
messages in Postgres fanned out across isolates with LISTEN/NOTIFY, ping heartbeat and the
SIGINT handler."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import pytest
import websockets
from websockets.asyncio.client import ClientConnection

from phloem.testing import PlatformProcess, wait_for

from .chromium import chromium
from .support import HeldRequest, RawWebSocket, deploy_example, jwt_hs256, no_second_isolate

SECRET = "chat-test-secret-0123456789abcdef"
#: The chat drops a client that misses two pings: at 0.3 s a loaded machine (a CI run on
#: three workers) stalled the test's own client past that and lost its WebSocket.
PING_S = 1.0


@pytest.fixture(scope="module")
def chat(platform: PlatformProcess) -> str:
    """The chat, allowed two isolates, a second one started once one has a request in
    flight."""
    return deploy_example(platform, "chat", "realtime-chat",
                          env={"CHAT_JWT_SECRET": SECRET, "CHAT_PING_INTERVAL_S": str(PING_S)},
                          limits={"target_inflight": 1, "max_isolates": 2})


def token_for(platform: PlatformProcess, host: str, name: str) -> str:
    with platform.gateway(host) as gw:
        res = gw.post("/token", json={"name": name})
        assert res.status_code == 200, res.text
        token: str = res.json()["token"]
        return token


async def connect(platform: PlatformProcess, host: str, name: str) -> ClientConnection:
    token = await asyncio.to_thread(token_for, platform, host, name)
    return await websockets.connect(f"ws://{host}/ws?token={token}", host="127.0.0.1",
                                    port=platform.gateway_port, open_timeout=30)


def isolate_ids(platform: PlatformProcess, slug: str) -> set[str]:
    """The ids of the function's isolates, which each gets as ``PHLOEM_ISOLATE``."""
    return {i["id"] for i in platform.cli_json("status")["isolates"] if i["function"] == slug}


async def receive(ws: ClientConnection, kind: str, timeout: float = 10,
                  **match: Any) -> dict[str, Any]:
    """The next message of type ``kind`` whose fields equal ``match``."""
    async def find() -> dict[str, Any]:
        while True:
            message: dict[str, Any] = json.loads(await ws.recv())
            if message["type"] == kind and all(message.get(k) == v for k, v in match.items()):
                return message
    return await asyncio.wait_for(find(), timeout)


async def test_message_reaches_a_client_on_another_isolate(platform: PlatformProcess,
                                                           chat: str) -> None:
    alice = await connect(platform, chat, "alice")
    on_a = (await receive(alice, "hello", timeout=30))["isolate"]
    # Keep one request in flight on alice's isolate: with target_inflight=1 the next
    # connection makes the supervisor start a second isolate, and once it is ready new
    # connections go to it (the least loaded). Connect until bob lands there.
    held = await asyncio.to_thread(HeldRequest, platform.gateway_port, chat, "/token",
                                   b'{"name": "held"}')
    bob: ClientConnection | None = None
    on_b = ""
    deadline = time.monotonic() + 30
    while bob is None:
        if time.monotonic() > deadline:
            raise no_second_isolate(platform, "chat")
        candidate = await connect(platform, chat, "bob")
        on_b = (await receive(candidate, "hello", timeout=30))["isolate"]
        if on_b != on_a:
            bob = candidate
        else:
            await candidate.close()
            await asyncio.sleep(0.1)
    status, body = await asyncio.to_thread(held.finish)
    assert status == 200 and b"token" in body
    # The ids the isolates report are the platform's own.
    assert {on_a, on_b} == await asyncio.to_thread(isolate_ids, platform, "chat")

    # Each message is inserted by the sender's isolate and reaches both through NOTIFY.
    await bob.send("hi alice, from the other isolate")
    got_a = await receive(alice, "message", body="hi alice, from the other isolate")
    got_b = await receive(bob, "message", body="hi alice, from the other isolate")
    assert got_a == got_b and got_a["user"] == "bob" and got_a["isolate"] == on_b
    await alice.send("hi bob")
    got_b = await receive(bob, "message", body="hi bob")
    assert got_b["user"] == "alice" and got_b["isolate"] == on_a

    # Stored, in order, for clients that reconnect.
    with platform.gateway(chat) as gw:
        bodies = [m["body"] for m in gw.get("/messages").json()]
    assert bodies[-2:] == ["hi alice, from the other isolate", "hi bob"]
    await alice.close()
    await bob.close()


@pytest.mark.parametrize("token", ["", "not-a-jwt", "wrong-secret", "expired"])
async def test_bad_token_gets_401(platform: PlatformProcess, chat: str, token: str) -> None:
    forged = {"wrong-secret": jwt_hs256("another-secret-0123456789abcdef", {"name": "eve"}),
              "expired": jwt_hs256(SECRET, {"name": "eve"}, ttl_s=-60)}.get(token, token)
    query = f"?token={forged}" if forged else ""
    with pytest.raises(websockets.InvalidStatus) as refused:
        await websockets.connect(f"ws://{chat}/ws{query}", host="127.0.0.1",
                                 port=platform.gateway_port, open_timeout=30)
    assert refused.value.response.status_code == 401
    # The same token scheme with the right secret is accepted.
    good = jwt_hs256(SECRET, {"name": "carol"})
    async with websockets.connect(f"ws://{chat}/ws?token={good}", host="127.0.0.1",
                                  port=platform.gateway_port, open_timeout=30) as ws:
        assert (await receive(ws, "hello"))["user"] == "carol"


def test_heartbeat_pings_and_drops_silent_clients(platform: PlatformProcess,
                                                  chat: str) -> None:
    token = token_for(platform, chat, "pinged")
    answering = RawWebSocket(platform.gateway_port, chat, f"/ws?token={token}",
                             answer_pings=True)
    silent = RawWebSocket(platform.gateway_port, chat, f"/ws?token={token}",
                          answer_pings=False)
    try:
        opened = time.monotonic()
        deadline = opened + 10 * PING_S + 5
        # Both sockets are read at once: the answering one must reply to each ping in time.
        while not silent.eof:
            assert time.monotonic() < deadline, "the silent client was never dropped"
            silent.poll()
            answering.poll()
        closed_at = time.monotonic()
        # One ping went unanswered; the next round terminated the socket.
        assert 1 <= silent.pings() <= 3 and closed_at - opened >= PING_S
        # The client that answers keeps getting pings and stays connected.
        pings = answering.pings()
        while answering.pings() < pings + 3:
            assert time.monotonic() < deadline + 5 * PING_S, "pings stopped"
            answering.poll()
            assert not answering.eof, "the answering client was dropped"
    finally:
        answering.close()
        silent.close()


async def test_sigint_handler_runs_on_eviction_and_delete(platform: PlatformProcess) -> None:
    host = deploy_example(platform, "chatidle", "realtime-chat",
                          env={"CHAT_JWT_SECRET": SECRET}, limits={"idle_timeout_s": 1})
    # Idle eviction: the isolate is left alone for a second, gets SIGINT, and its handler
    # records the shutdown in Postgres before closing its connections.
    ws = await connect(platform, host, "dora")
    isolate = (await receive(ws, "hello", timeout=30))["isolate"]
    assert isolate in await asyncio.to_thread(isolate_ids, platform, "chatidle")
    await ws.close()
    await asyncio.to_thread(wait_for, lambda: isolate not in isolate_ids(platform, "chatidle"), 30,
                            f"isolate {isolate} to be evicted")
    with platform.gateway(host) as gw:  # a new isolate answers
        rows = gw.get("/shutdowns").json()
    assert {"isolate": isolate, "signal": "SIGINT", "sockets": 0} in [
        {k: r[k] for k in ("isolate", "signal", "sockets")} for r in rows]
    logs = platform.cli("functions", "logs", "chatidle").stdout
    assert f"chat: SIGINT: closed 0 sockets with 1001, isolate {isolate}" in logs

    # Deleting the function stops its isolates at once, open sockets or not: the handler
    # closes them with 1001 (going away).
    ws = await connect(platform, host, "erin")
    isolate = (await receive(ws, "hello", timeout=30))["isolate"]
    await asyncio.to_thread(platform.cli, "functions", "delete", "chatidle")
    await asyncio.wait_for(ws.wait_closed(), 15)
    assert ws.close_code == 1001 and ws.close_reason == "server going away"
    host = deploy_example(platform, "chatidle", "realtime-chat",
                          env={"CHAT_JWT_SECRET": SECRET})
    with platform.gateway(host) as gw:
        rows = gw.get("/shutdowns").json()
    assert {"isolate": isolate, "signal": "SIGINT", "sockets": 1} in [
        {k: r[k] for k in ("isolate", "signal", "sockets")} for r in rows]


def test_client_page_is_served(platform: PlatformProcess, chat: str) -> None:
    with platform.gateway(chat) as gw:
        res = gw.get("/")
    assert res.status_code == 200
    assert res.headers["content-type"].startswith("text/html")
    assert "new WebSocket(" in res.text and "CAP_MS" in res.text


async def test_browser_client_receives_and_reconnects(platform: PlatformProcess) -> None:
    """The page served at GET / in headless Chromium: it connects, shows a message sent by
    another client, and when its isolate goes away (the function deleted, its isolates
    sent SIGINT) it backs off, mints a new token and reconnects to the redeployed one."""
    host = deploy_example(platform, "chatweb", "realtime-chat",
                          env={"CHAT_JWT_SECRET": SECRET})
    with chromium() as browser:
        browser.send("Page.navigate", {"url": f"http://{host}/?name=web"})
        browser.wait_for("window.chat && window.chat.status === 'open'", 30, "the page to connect")
        async with await connect(platform, host, "bob") as bob:
            bob_on = [(await receive(bob, "hello", timeout=30))["isolate"]]
            await bob.send("hello browser")
            await receive(bob, "message", body="hello browser")
        browser.wait_for("window.chat.messages.some(m => m.body === 'hello browser' "
                         "&& m.user === 'bob')", 10, "the message in the page")

        await asyncio.to_thread(platform.cli, "functions", "delete", "chatweb")
        browser.wait_for("window.chat.lastClose === 1001 && window.chat.status !== 'open'",
                         15, "the page to see 1001")
        deploy_example(platform, "chatweb", "realtime-chat", env={"CHAT_JWT_SECRET": SECRET})
        state = browser.wait_for("window.chat.status === 'open' && window.chat.connects === 2"
                                 " && window.chat.isolates.length === 2"
                                 " && JSON.stringify(window.chat)", 30, "the page to reconnect")
        chat_state = json.loads(state)
        on = chat_state["isolates"]
        assert on[0] != on[1]  # the redeployed function's new isolate, told by its hello
        assert browser.evaluate("document.getElementById('status').textContent") == \
            f"open, on isolate {on[1]}"
        assert chat_state["attempts"] == 0  # reset by the successful open
        async with await connect(platform, host, "bob") as bob:
            bob_on.append((await receive(bob, "hello", timeout=30))["isolate"])
            await bob.send("welcome back")
            await receive(bob, "message", body="welcome back")
        browser.wait_for("window.chat.messages.some(m => m.body === 'welcome back')", 10,
                         "a message after the reconnect")
        shown = browser.evaluate("document.getElementById('log').textContent")
        assert "bob: hello browser" in shown and "bob: welcome back" in shown
        # Each message names the isolate that stored it: the one bob was connected to.
        lines = browser.evaluate(
            "Array.from(document.querySelectorAll('#log li'), li => li.textContent)")
        for body, isolate in zip(("hello browser", "welcome back"), bob_on, strict=True):
            [line] = [line for line in lines if line.startswith(f"bob: {body} ")]
            assert line.endswith(f" via {isolate}"), line
