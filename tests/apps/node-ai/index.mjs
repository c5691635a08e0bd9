// Calls the branch's AI Gateway from inside the sandbox with what phloem injected:
// plain fetch, as the `openai` package would (base URL + /v1, bearer token).
export default {
  async fetch(request) {
    const base = process.env.NEON_AI_GATEWAY_BASE_URL;
    const token = process.env.NEON_AI_GATEWAY_TOKEN;
    if (!base || !token) {
      return Response.json({ error: "no AI Gateway env", base: base ?? null }, { status: 500 });
    }
    const url = new URL(request.url);
    const r = await fetch(`${base}/v1/chat/completions`, {
      method: "POST",
      headers: { authorization: `Bearer ${token}`, "content-type": "application/json" },
      body: JSON.stringify({
        model: url.searchParams.get("model") ?? "gpt-test",
        messages: [{ role: "user", content: "hi from a function" }],
      }),
    });
    const body = await r.json();
    return Response.json({ status: r.status, base, body });
  },
};
