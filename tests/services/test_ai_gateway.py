"""The AI Gateway (issue 15, item 2) against a local OpenAI-compatible upstream started
here (the only fake; it records what it received).

The app's tests serve :class:`GatewayApp` with uvicorn on a real socket: the operator's
key goes upstream and the branch token does not, streamed chunks arrive one by one,
usage is counted per function, another branch's token gets 401.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import uvicorn

from phloem.services.ai_gateway.app import GatewayApp, ProviderConn, UsageEvent
from phloem.services.ai_gateway.tokens import make_token, new_secret
from phloem.services.ai_gateway.usage import Meter, SseSplitter
from phloem.system.ai_providers import parse_ai_providers
from phloem.system.validation import InvalidInput
from phloem.testing import PlatformProcess, free_port, host_of, wait_for
from tests.services.ai_upstream import (
    ANTHROPIC_USAGE,
    CHAT_USAGE,
    OPERATOR_KEY,
    RESPONSES_USAGE,
    Upstream,
    ai_platform,
)

BRANCH, OTHER = "br-quiet-moon-3f9a2c", "br-loud-sun-1b2c3d"


class Served:
    def __init__(self, upstream: Upstream) -> None:
        self.upstream = upstream
        self.secrets = {BRANCH: new_secret(), OTHER: new_secret()}
        self.usage: list[UsageEvent] = []

        async def record(event: UsageEvent) -> None:
            self.usage.append(event)

        app = GatewayApp({"openai": ProviderConn("openai", upstream.url, OPERATOR_KEY),
                          "anthropic": ProviderConn("anthropic", upstream.anthropic_url,
                                                    OPERATOR_KEY)},
                         self.secrets, record, "fn.localhost")
        self.port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port,
                                                    lifespan="off", log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def client(self, branch: str = BRANCH, token: str | None = None) -> httpx.Client:
        headers = {"Host": f"{branch}--ai.fn.localhost:8787"}
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        return httpx.Client(base_url=f"http://127.0.0.1:{self.port}", headers=headers,
                            timeout=30)


@pytest.fixture(scope="module")
def served() -> Iterator[Served]:
    with Upstream() as upstream:
        s = Served(upstream)
        s.thread.start()
        wait_for(lambda: s.server.started, 30, "the gateway app's uvicorn to listen")
        try:
            yield s
        finally:
            s.server.should_exit = True
            s.thread.join(30)


def test_forwards_with_the_operators_key_and_counts_usage(served: Served) -> None:
    token = make_token(served.secrets[BRANCH], "chat")
    before, recorded = len(served.upstream.received), len(served.usage)
    with served.client(token=token) as c:
        r = c.post("/v1/chat/completions", json={"model": "gpt-test", "messages": [
            {"role": "user", "content": "hi"}]})
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["message"]["content"] == "Hello"
        r = c.post("/ai-gateway/openai/v1/responses", json={"model": "gpt-test", "input": "hi"})
        assert r.status_code == 200, r.text
        assert c.get("/openai/v1/models").json()["data"][0]["id"] == "gpt-test"
    got = served.upstream.received[before:]
    assert [(g.method, g.path) for g in got] == [
        ("POST", "/v1/chat/completions"), ("POST", "/v1/responses"), ("GET", "/v1/models")]
    for g in got:
        headers = {k.lower(): v for k, v in g.headers.items()}
        assert headers["authorization"] == f"Bearer {OPERATOR_KEY}"
        assert token not in json.dumps(g.headers)
    wait_for(lambda: len(served.usage) >= recorded + 3, 10, "three usage records")
    chat, responses, models = served.usage[recorded:recorded + 3]
    assert (chat.function_slug, chat.model, chat.input_tokens, chat.output_tokens) == (
        "chat", "gpt-test", CHAT_USAGE["prompt_tokens"], CHAT_USAGE["completion_tokens"])
    assert (responses.input_tokens, responses.output_tokens) == (
        RESPONSES_USAGE["input_tokens"], RESPONSES_USAGE["output_tokens"])
    assert not chat.error and not responses.error and models.input_tokens == 0


def test_streams_chunk_by_chunk_and_reads_the_final_usage(served: Served) -> None:
    token = make_token(served.secrets[BRANCH], "chat")
    served.upstream.release.clear()
    served.upstream.sent_last.clear()
    recorded = len(served.usage)
    events: list[str] = []
    with served.client(token=token) as c, c.stream("POST", "/v1/chat/completions", json={
            "model": "gpt-test", "stream": True, "user": "gated",
            "messages": [{"role": "user", "content": "hi"}]}) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = r.iter_lines()
        first = next(line for line in lines if line)
        # The upstream holds its last chunk until released: the first one got here alone.
        assert not served.upstream.sent_last.is_set()
        assert json.loads(first[6:])["choices"][0]["delta"]["content"] == "Hel"
        served.upstream.release.set()
        events = [line for line in lines if line]
    # (set by the upstream just after its last byte: the client may have read it first)
    wait_for(served.upstream.sent_last.is_set, 10, "the upstream to finish its stream")
    # The client did not ask for usage: the chunk the gateway asked for is not passed on.
    assert events[-1] == "data: [DONE]"
    assert all(json.loads(e[6:])["choices"] for e in events[:-1])
    sent = served.upstream.received[-1].body
    assert sent["stream_options"] == {"include_usage": True}
    wait_for(lambda: len(served.usage) > recorded, 10, "the stream's usage recorded")
    event = served.usage[-1]
    assert (event.input_tokens, event.output_tokens) == (
        CHAT_USAGE["prompt_tokens"], CHAT_USAGE["completion_tokens"])


def test_refuses_tokens_of_another_branch(served: Served) -> None:
    before = len(served.upstream.received)
    other = make_token(served.secrets[OTHER], "chat")
    for token in (other, None, "nai.chat." + "0" * 64):
        with served.client(token=token) as c:
            r = c.post("/v1/chat/completions", json={"model": "m", "messages": []})
        assert r.status_code == 401, r.text
        assert r.json()["error"]["code"] == "invalid_token"
    with served.client(OTHER, token=other) as c:
        assert c.get("/v1/models").status_code == 200  # on its own branch it works
        assert c.get("/v1/embeddings").json()["error"]["code"] == "not_found"
        assert c.get("/v1/chat/completions").status_code == 405
    assert len(served.upstream.received) == before + 1


def test_anthropic_messages_carry_the_operators_key_as_x_api_key(served: Served) -> None:
    token = make_token(served.secrets[OTHER], "claude")
    with served.client(OTHER) as c:  # the Anthropic SDK sends its key as x-api-key
        r = c.post("/anthropic/v1/messages", headers={"x-api-key": token}, json={
            "model": "claude-test", "max_tokens": 16, "messages": [
                {"role": "user", "content": "hi"}]})
    assert r.status_code == 200, r.text
    sent = served.upstream.received[-1]
    headers = {k.lower(): v for k, v in sent.headers.items()}
    assert (sent.path, headers["x-api-key"]) == ("/anthropic/v1/messages", OPERATOR_KEY)
    assert headers["anthropic-version"] == "2023-06-01" and "authorization" not in headers
    wait_for(lambda: served.usage and served.usage[-1].function_slug == "claude", 10,
             "the Messages call's usage")
    event = served.usage[-1]
    assert (event.provider, event.input_tokens, event.output_tokens) == (
        "anthropic", ANTHROPIC_USAGE["input_tokens"], ANTHROPIC_USAGE["output_tokens"])


# -- on a platform: the service behind the gateway, called from a sandboxed function ----

NODE_APP = Path(__file__).parent.parent / "apps" / "node-ai"
NODE_SDK_APP = Path(__file__).parent.parent / "apps" / "node-ai-sdk"


@dataclass
class OnPlatform:
    p: PlatformProcess
    upstream: Upstream
    main_id: str
    fn_host: str


@pytest.fixture(scope="module")
def on_platform() -> Iterator[OnPlatform]:
    with Upstream() as upstream, ai_platform(upstream) as p:
        with p.api() as api:
            r = api.put("/branches/main/services", json={"services": {"ai": {}}})
            assert r.status_code == 200, r.text
            main_id = r.json()["branch_id"]
        fn = p.deploy("aicall", NODE_APP)
        yield OnPlatform(p, upstream, main_id, host_of(fn["invocation_url"]))


def test_a_sandboxed_function_calls_the_gateway_and_usage_is_counted(
        on_platform: OnPlatform) -> None:
    o = on_platform
    with o.p.gateway(o.fn_host) as c:
        r = c.get("/")
    assert r.status_code == 200, r.text
    got = r.json()
    assert got["status"] == 200, got
    assert got["body"]["choices"][0]["message"]["content"] == "Hello"
    assert got["base"] == f"http://{o.main_id}--ai.fn.localhost:{o.p.gateway_port}"
    sent = o.upstream.received[-1]
    headers = {k.lower(): v for k, v in sent.headers.items()}
    assert headers["authorization"] == f"Bearer {OPERATOR_KEY}"
    assert "nai." not in json.dumps(sent.headers)
    rows = wait_for(lambda: [u for u in o.p.cli_json("ai", "usage", "--branch", "main")
                             if u["requests"] >= 1] or None, 30, "usage shown by the CLI")
    assert [(u["function"], u["provider"], u["model"]) for u in rows] == [
        ("aicall", "openai", "gpt-test")]
    assert rows[0]["input_tokens"] >= CHAT_USAGE["prompt_tokens"]
    assert rows[0]["output_tokens"] >= CHAT_USAGE["completion_tokens"]
    text = o.p.cli("ai", "usage").stdout
    assert "aicall" in text and "gpt-test" in text


def test_a_stream_passes_the_platform_chunk_by_chunk(on_platform: OnPlatform) -> None:
    o = on_platform
    o.upstream.release.clear()
    o.upstream.sent_last.clear()
    with o.p.gateway(o.fn_host) as c, c.stream("GET", "/stream") as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        first = next(line for line in lines if line)
        assert not o.upstream.sent_last.is_set()
        assert json.loads(first[6:])["choices"][0]["delta"]["content"] == "Hel"
        o.upstream.release.set()
        rest = [line for line in lines if line]
    assert rest[-1] == "data: [DONE]"


def test_a_token_works_only_on_its_own_branch(on_platform: OnPlatform) -> None:
    o = on_platform
    with o.p.gateway(o.fn_host) as c:
        token = c.get("/token").json()["token"]
    child = o.p.cli_json("branches", "create", "--name", "aichild")["id"]
    query = "SELECT secret_sealed FROM ai_gateway_branches WHERE branch_id = %s"
    with o.p.system_db() as db:
        # The child has the service (copied) with a secret of its own, sealed.
        sealed = db.execute(query, (child,)).fetchall()
        assert len(sealed) == 1 and sealed[0][0].startswith("v1:")
        for branch_id, status in ((o.main_id, 200), (child, 401)):
            with o.p.gateway(f"{branch_id}--ai.fn.localhost") as c:
                r = c.get("/v1/models", headers={"Authorization": f"Bearer {token}"})
            assert r.status_code == status, r.text
        assert o.p.cli_json("ai", "usage", "--branch", "aichild") == []
        with o.p.gateway(f"{o.main_id}--ai.fn.localhost") as c:
            r = c.post("/anthropic/v1/messages", headers={"x-api-key": token}, json={})
        assert r.status_code == 404  # no anthropic upstream on this platform
        assert r.json()["error"]["code"] == "provider_not_configured"
        o.p.cli("branches", "delete", "aichild")
        assert db.execute(query, (child,)).fetchall() == []


def test_deploy_writes_the_services_variables_to_the_env_file(on_platform: OnPlatform,
                                                              tmp_path: Path) -> None:
    """As `neon deploy` (Neon's READMEs run `npm run db:push` next, which reads them).
    ~10 s."""
    o = on_platform
    root = tmp_path / "proj"
    (root / "src").mkdir(parents=True)
    (root / "neon.ts").write_text(
        'import { defineConfig } from "@phloem/config";\nexport default defineConfig({ '
        'preview: { aiGateway: true, functions: { aipull: { name: "aipull", source: '
        '"src/index.ts" } } } });\n')
    (root / "src/index.ts").write_text(
        "export default { fetch: () => new Response('ok') };\n")
    branch_id = o.p.cli_json("branches", "create", "--name", "aipull")["id"]
    o.p.cli("link", "--branch", "aipull", "--no-env-pull", cwd=root)
    out = o.p.cli("deploy", "--yes", cwd=root).stdout
    # No .env: the default target is .env.local, as for `env pull`.
    assert f"wrote {root / '.env.local'}" in out, out
    env = dict(line.split("=", 1) for line in (root / ".env.local").read_text()
               .splitlines() if "=" in line)
    assert env["NEON_AI_GATEWAY_BASE_URL"] == \
        f"http://{branch_id}--ai.fn.localhost:{o.p.gateway_port}"
    assert env["NEON_AI_GATEWAY_TOKEN"].startswith("nai.")


@pytest.mark.parametrize(("text", "rule"), [
    ("openai", "expected KIND=URL"),
    ("gemini=https://x/v1", "KIND one of openai, anthropic"),
    ("openai=ftp://x/v1", "http(s)://host"),
    ("openai=https://user:pw@x/v1", "without credentials"),
    ("openai=https://x/v1,key=SECRET", "unknown option"),
    ("openai=https://x/v1,key-env=1BAD", "key-env must be a variable name"),
    ("openai=https://x/v1,key-env=PHLOEM_TEST_UNSET_KEY_VAR", "is not set"),
])
def test_the_provider_option_names_the_rule_it_breaks(text: str, rule: str) -> None:
    with pytest.raises(InvalidInput, match="ai_provider") as info:
        parse_ai_providers([text])
    assert rule in str(info.value)


def test_the_provider_option_parses_and_refuses_two_of_a_kind() -> None:
    (p,) = parse_ai_providers(["anthropic=https://api.anthropic.com/v1/"])
    assert (p.kind, p.url, p.key_env, p.key()) == (
        "anthropic", "https://api.anthropic.com/v1", None, None)
    with pytest.raises(InvalidInput, match="given 2 times"):
        parse_ai_providers(["openai=http://a/v1", "openai=http://b/v1"])


def test_the_ai_sdk_provider_reaches_the_gateway(on_platform: OnPlatform) -> None:
    """with-ai-sdk's ``neon(modelId)`` and ``neon.tools.imageGeneration``, from phloem's
    ``@neon/ai-sdk-provider`` (npm installs ``ai`` and ``@ai-sdk/openai``)."""
    o = on_platform
    fn = o.p.deploy("aisdk", NODE_SDK_APP)
    with o.p.gateway(host_of(fn["invocation_url"])) as c:
        r = c.get("/")
    assert r.status_code == 200, o.p.cli("functions", "logs", "aisdk").stdout[-3000:]
    got = r.json()
    assert got["text"] == "Hello"
    assert got["usage"]["inputTokens"] == RESPONSES_USAGE["input_tokens"]
    assert "image_generation" in (got["tool"] or "")
    sent = o.upstream.received[-1]
    assert (sent.method, sent.path, sent.body["model"]) == ("POST", "/v1/responses", "gpt-test")


def test_usage_is_read_from_every_stream_shape() -> None:
    def sse(*events: dict[str, object]) -> bytes:
        return b"".join(b"event: x\r\ndata: " + json.dumps(e).encode() + b"\r\n\r\n"
                        for e in events)

    anthropic = sse({"type": "message_start", "message": {"usage": {
                        "input_tokens": 21, "output_tokens": 1}}},
                    {"type": "content_block_delta", "delta": {"text": "Hi"}},
                    {"type": "message_delta", "usage": {"output_tokens": 9}})
    responses = sse({"type": "response.output_text.delta", "delta": "Hi"},
                    {"type": "response.completed", "response": {"usage": {
                        "input_tokens": 5, "output_tokens": 3}}})
    for stream, expected in ((anthropic, (21, 9)), (responses, (5, 3))):
        meter, splitter, events = Meter(), SseSplitter(), []
        for i in range(0, len(stream), 7):  # cut anywhere: events come out whole
            events += splitter.feed(stream[i:i + 7])
        for event in events:
            meter.feed_event(event)
        assert b"".join(events) == stream and splitter.rest() == b""
        assert (meter.input_tokens, meter.output_tokens) == expected
