"""examples/agent-cors on a real platform: CORS preflight, Bearer JWT checked before any
work, a long streamed body (5 minutes by default, seconds here), and a real headless
Chromium calling it cross-origin from a page served by another origin."""

from __future__ import annotations

import functools
import itertools
import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlencode

import pytest

from phloem.testing import PlatformProcess

from .chromium import chromium
from .support import EXAMPLES, deploy_example, jwt_hs256

SECRET = "agent-test-secret-0123456789abcdef"
TICK_MS = 250


class QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


@dataclass
class Agent:
    host: str
    url: str
    origin: str


@pytest.fixture(scope="module")
def page_origin() -> Iterator[str]:
    """examples/agent-cors/web served from its own origin, as any static host would."""
    handler = functools.partial(QuietHandler, directory=str(EXAMPLES / "agent-cors" / "web"))
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="module")
def agent(platform: PlatformProcess, page_origin: str) -> Agent:
    host = deploy_example(platform, "agent", "agent-cors", env={
        "AGENT_JWT_SECRET": SECRET, "AGENT_ALLOWED_ORIGINS": page_origin,
        "AGENT_TICK_MS": str(TICK_MS)})
    return Agent(host, f"http://{host}", page_origin)


def test_preflight_allows_only_the_configured_origin(platform: PlatformProcess,
                                                     agent: Agent) -> None:
    ask = {"Access-Control-Request-Method": "GET",
           "Access-Control-Request-Headers": "authorization"}
    with platform.gateway(agent.host) as gw:
        ok = gw.options("/run", headers={"Origin": agent.origin, **ask})
        assert ok.status_code == 204
        assert ok.headers["access-control-allow-origin"] == agent.origin
        assert "authorization" in ok.headers["access-control-allow-headers"].lower()
        assert "GET" in ok.headers["access-control-allow-methods"]
        assert ok.headers["vary"] == "Origin"
        other = gw.options("/run", headers={"Origin": "http://evil.example", **ask})
        assert other.status_code == 403
        assert "access-control-allow-origin" not in other.headers


@pytest.mark.parametrize("authorization", [
    None, "Bearer", "Bearer not-a-jwt", "Basic dXNlcjpwYXNz",
    "Bearer " + jwt_hs256("another-secret-0123456789abcdef", {"sub": "eve"}),
    "Bearer " + jwt_hs256(SECRET, {"sub": "eve"}, ttl_s=-60),
    "Bearer " + jwt_hs256(SECRET, {"name": "no subject"}),
])
def test_requests_without_a_valid_bearer_token_get_401(platform: PlatformProcess,
                                                       agent: Agent,
                                                       authorization: str | None) -> None:
    headers = {"Origin": agent.origin}
    if authorization is not None:
        headers["Authorization"] = authorization
    with platform.gateway(agent.host) as gw:
        res = gw.get("/run", headers=headers)
    assert res.status_code == 401, res.text
    assert res.headers["www-authenticate"].startswith("Bearer")
    # The page can read the 401 (CORS headers on errors too).
    assert res.headers["access-control-allow-origin"] == agent.origin


def test_body_streams_incrementally(platform: PlatformProcess, agent: Agent) -> None:
    token = jwt_hs256(SECRET, {"sub": "tester"})
    auth = {"Authorization": f"Bearer {token}", "Origin": agent.origin}
    with platform.gateway(agent.host) as gw:
        # By default a run lasts 5 minutes: read its start and hang up.
        with gw.stream("GET", "/run", headers=auth) as res:
            assert res.status_code == 200
            first = json.loads(next(res.iter_lines()))
        assert first == {"type": "start", "task": "", "steps": 300_000 // TICK_MS,
                         "tickMs": TICK_MS}
        # ?duration= shortens one run; lines arrive one tick apart, not all at the end.
        arrivals: list[tuple[float, dict[str, Any]]] = []
        with gw.stream("POST", "/run?duration=1.5", headers=auth,
                       json={"task": "count"}) as res:
            assert res.status_code == 200
            assert res.headers["content-type"].startswith("application/x-ndjson")
            for line in res.iter_lines():
                arrivals.append((time.monotonic(), json.loads(line)))
    kinds = [event["type"] for _, event in arrivals]
    assert kinds == ["start"] + ["step"] * 5 + ["done"]
    assert arrivals[0][1]["task"] == "count"
    gaps = [b[0] - a[0] for a, b in itertools.pairwise(arrivals)]
    assert all(gap > TICK_MS / 1000 / 3 for gap in gaps), gaps


def test_browser_page_on_another_origin_reads_the_stream(platform: PlatformProcess,
                                                         agent: Agent) -> None:
    """Headless Chromium loads the page from its origin; the page's fetch() sends the
    Bearer token to the function's *.localhost URL (which Chromium resolves to loopback),
    so Chromium makes a CORS preflight first, then reads the body chunk by chunk."""
    token = jwt_hs256(SECRET, {"sub": "browser"})
    query = urlencode({"fn": agent.url, "token": token, "duration": "2", "autorun": "1",
                       "task": "from the browser"})
    preflight = f"agent: preflight from {agent.origin} for GET: allowed"
    before = platform.cli("functions", "logs", "agent").stdout.count(preflight)
    with chromium() as browser:
        browser.send("Network.enable")
        browser.send("Page.navigate", {"url": f"{agent.origin}/index.html?{query}"})
        state = browser.wait_for(
            "window.agent && ['done', 'failed'].includes(window.agent.state) "
            "&& JSON.stringify(window.agent)", 30, "the run to finish in the page")
        events = browser.events
    result = json.loads(state)
    assert result["state"] == "done", result
    assert result["status"] == 200
    kinds = [line["type"] for line in result["lines"]]
    assert kinds == ["start"] + ["step"] * 7 + ["done"]
    assert result["lines"][0]["task"] == "from the browser"
    # Chunks reached the page's reader as they were produced, over ~2 s, not at once.
    times = [chunk["at"] for chunk in result["chunks"]]
    assert len(times) >= 6
    assert times[-1] - times[0] >= 1500
    # The browser preflighted the request (an OPTIONS without the token, which the function
    # logged) and sent the GET with the token.
    sent = [e["params"]["request"] for e in events
            if e["method"] == "Network.requestWillBeSent"
            and e["params"]["request"]["url"].startswith(agent.url)]
    # DevTools may announce the fetch before its preflight (the preflight is started on the
    # fetch's behalf), so the order of these events says nothing; the function's own log
    # below shows the preflight reached it.
    by_method = {r["method"]: r for r in sent}
    assert sorted(r["method"] for r in sent) == ["GET", "OPTIONS"], sent
    ask = {k.lower(): v for k, v in by_method["OPTIONS"]["headers"].items()}
    assert ask["access-control-request-method"] == "GET"
    assert ask["access-control-request-headers"] == "authorization"
    assert "authorization" not in ask
    assert by_method["GET"]["headers"]["Authorization"] == f"Bearer {token}"
    after = platform.cli("functions", "logs", "agent").stdout.count(preflight)
    assert after == before + 1
