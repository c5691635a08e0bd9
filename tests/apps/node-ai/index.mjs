// Calls the branch's AI Gateway from inside the sandbox with what phloem injected, as
// the `openai` package would (base URL + /v1, bearer token), with plain fetch.
//   GET /        a chat completion, answered as JSON with the gateway's status
//   GET /stream  a streamed one, its event stream passed through as it comes
//   GET /token   what was injected (a test probe: a real function would not show it)
export default {
  async fetch(request) {
    const base = process.env.NEON_AI_GATEWAY_BASE_URL;
    const token = process.env.NEON_AI_GATEWAY_TOKEN;
    const url = new URL(request.url);
    if (!base || !token) {
      return Response.json({ error: "no AI Gateway env" }, { status: 500 });
    }
    if (url.pathname === "/token") {
      return Response.json({ base, token });
    }
    const stream = url.pathname === "/stream";
    const r = await fetch(`${base}/v1/chat/completions`, {
      method: "POST",
      headers: { authorization: `Bearer ${token}`, "content-type": "application/json" },
      body: JSON.stringify({
        model: "gpt-test",
        stream,
        user: stream ? "gated" : undefined,
        messages: [{ role: "user", content: "hi from a function" }],
      }),
    });
    if (stream) {
      return new Response(r.body, {
        status: r.status,
        headers: { "content-type": r.headers.get("content-type") ?? "text/plain" },
      });
    }
    return Response.json({ status: r.status, base, body: await r.json() });
  },
};
