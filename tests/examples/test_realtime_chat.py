"""examples/realtime-chat on a real platform: Hono fetch + ws upgrade, JWT on ?token=,
messages in Postgres fanned out across isolates with LISTEN/NOTIFY, ping heartbeat and the
SIGINT handler."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import pytest
import websockets
from websockets.asyncio.client import ClientConnection

from phloem.testing import PlatformProcess, wait_for

from .chromium import chromium
from .support import HeldRequest, RawWebSocket, deploy_example, jwt_hs256, no_second_isolate

SECRET = "chat-test-secret-0123456789abcdef"
PING_S = 0.3


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
    pid_a = (await receive(alice, "hello", timeout=30))["pid"]
    # Keep one request in flight on alice's isolate: with target_inflight=1 the next
    # connection makes the supervisor start a second isolate, and once it is ready new
    # connections go to it (the least loaded). Connect until bob lands there.
    held = await asyncio.to_thread(HeldRequest, platform.gateway_port, chat, "/token",
                                   b'{"name": "held"}')
    bob: ClientConnection | None = None
    deadline = time.monotonic() + 30
    while bob is None:
        if time.monotonic() > deadline:
            raise no_second_isolate(platform, "chat")
        candidate = await connect(platform, chat, "bob")
        if (await receive(candidate, "hello", timeout=30))["pid"] != pid_a:
            bob = candidate
        else:
            await candidate.close()
            await asyncio.sleep(0.1)
    status, body = await asyncio.to_thread(held.finish)
    assert status == 200 and b"token" in body

    # Each message is inserted by the sender's isolate and reaches both through NOTIFY.
    await bob.send("hi alice, from the other isolate")
    got_a = await receive(alice, "message", body="hi alice, from the other isolate")
    got_b = await receive(bob, "message", body="hi alice, from the other isolate")
    assert got_a == got_b and got_a["user"] == "bob" and got_a["pid"] != pid_a
    await alice.send("hi bob")
    got_b = await receive(bob, "message", body="hi bob")
    assert got_b["user"] == "alice" and got_b["pid"] == pid_a

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
    pid = (await receive(ws, "hello", timeout=30))["pid"]
    assert Path(f"/proc/{pid}").exists()
    await ws.close()
    await asyncio.to_thread(wait_for, lambda: not Path(f"/proc/{pid}").exists(), 30,
                            f"isolate {pid} to be evicted")
    with platform.gateway(host) as gw:  # a new isolate answers
        rows = gw.get("/shutdowns").json()
    assert {"pid": pid, "signal": "SIGINT", "sockets": 0} in [
        {k: r[k] for k in ("pid", "signal", "sockets")} for r in rows]
    logs = platform.cli("functions", "logs", "chatidle").stdout
    assert f"chat: SIGINT: closed 0 sockets with 1001, pid {pid}" in logs

    # Deleting the function stops its isolates at once, open sockets or not: the handler
    # closes them with 1001 (going away).
    ws = await connect(platform, host, "erin")
    pid = (await receive(ws, "hello", timeout=30))["pid"]
    await asyncio.to_thread(platform.cli, "functions", "delete", "chatidle")
    await asyncio.wait_for(ws.wait_closed(), 15)
    assert ws.close_code == 1001 and ws.close_reason == "server going away"
    host = deploy_example(platform, "chatidle", "realtime-chat",
                          env={"CHAT_JWT_SECRET": SECRET})
    with platform.gateway(host) as gw:
        rows = gw.get("/shutdowns").json()
    assert {"pid": pid, "signal": "SIGINT", "sockets": 1} in [
        {k: r[k] for k in ("pid", "signal", "sockets")} for r in rows]


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
            await bob.send("hello browser")
            await receive(bob, "message", body="hello browser")
        browser.wait_for("window.chat.messages.some(m => m.body === 'hello browser' "
                         "&& m.user === 'bob')", 10, "the message in the page")

        await asyncio.to_thread(platform.cli, "functions", "delete", "chatweb")
        browser.wait_for("window.chat.lastClose === 1001 && window.chat.status !== 'open'",
                         15, "the page to see 1001")
        deploy_example(platform, "chatweb", "realtime-chat", env={"CHAT_JWT_SECRET": SECRET})
        state = browser.wait_for("window.chat.status === 'open' && window.chat.connects === 2"
                                 " && JSON.stringify(window.chat)", 30, "the page to reconnect")
        chat_state = json.loads(state)
        assert chat_state["pids"][0] != chat_state["pids"][-1]
        assert chat_state["attempts"] == 0  # reset by the successful open
        async with await connect(platform, host, "bob") as bob:
            await bob.send("welcome back")
            await receive(bob, "message", body="welcome back")
        browser.wait_for("window.chat.messages.some(m => m.body === 'welcome back')", 10,
                         "a message after the reconnect")
        shown = browser.evaluate("document.getElementById('log').textContent")
        assert "bob: hello browser" in shown and "bob: welcome back" in shown
