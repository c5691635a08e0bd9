// A long-running "agent" that a browser page on another origin calls directly.
//
//   OPTIONS *          CORS preflight: allowed origins get Access-Control-Allow-*
//   GET|POST /run      Authorization: Bearer <jwt> -> a streamed NDJSON body, one line per
//                      step, for AGENT_DURATION_S (default 5 minutes; ?duration=S for one
//                      run, at most AGENT_MAX_DURATION_S)
//
// The stream is plain chunked HTTP: the page reads it with fetch() and
// response.body.getReader(), no EventSource or WebSocket needed, and a long response is
// fine on phloem (time to first byte and silence limits, not total duration, apply).

import { type JWTPayload, errors, jwtVerify } from "jose";

const secretText = process.env.AGENT_JWT_SECRET ?? "";
if (secretText.length < 16) {
  throw new Error("AGENT_JWT_SECRET must be set to at least 16 characters");
}
const secret = new TextEncoder().encode(secretText);
const allowedOrigins = new Set(
  (process.env.AGENT_ALLOWED_ORIGINS ?? "")
    .split(",")
    .map((o) => o.trim())
    .filter(Boolean),
);
const defaultDurationS = number("AGENT_DURATION_S", 300);
const maxDurationS = number("AGENT_MAX_DURATION_S", 900);
const tickMs = number("AGENT_TICK_MS", 1000);
const encoder = new TextEncoder();

function number(name: string, fallback: number): number {
  const value = Number.parseFloat(process.env[name] ?? "");
  return Number.isFinite(value) && value > 0 ? value : fallback;
}

// ------------------------------------------------------------------------------ CORS

function corsHeaders(request: Request): Record<string, string> {
  const origin = request.headers.get("Origin");
  const headers: Record<string, string> = { Vary: "Origin" };
  if (origin && allowedOrigins.has(origin)) {
    headers["Access-Control-Allow-Origin"] = origin;
    headers["Access-Control-Expose-Headers"] = "X-Run-Id";
  }
  return headers;
}

function preflight(request: Request): Response {
  const cors = corsHeaders(request);
  const allowed = "Access-Control-Allow-Origin" in cors;
  console.log(
    `agent: preflight from ${request.headers.get("Origin") ?? "(no origin)"} ` +
      `for ${request.headers.get("Access-Control-Request-Method") ?? "?"}: ` +
      (allowed ? "allowed" : "refused"),
  );
  if (!allowed) return new Response(null, { status: 403, headers: cors });
  return new Response(null, {
    status: 204,
    headers: {
      ...cors,
      "Access-Control-Allow-Methods": "GET, POST, OPTIONS",
      "Access-Control-Allow-Headers": "Authorization, Content-Type",
      "Access-Control-Max-Age": "600",
    },
  });
}

// ------------------------------------------------------------------------------ auth

async function authenticate(request: Request): Promise<JWTPayload | string> {
  const header = request.headers.get("Authorization") ?? "";
  const match = /^Bearer\s+(\S+)$/i.exec(header);
  if (!match) return "missing Bearer token";
  try {
    const { payload } = await jwtVerify(match[1], secret, {
      algorithms: ["HS256"],
      requiredClaims: ["sub", "exp"],
    });
    return payload;
  } catch (err) {
    return err instanceof errors.JOSEError ? `invalid token (${err.code})` : "invalid token";
  }
}

// ------------------------------------------------------------------------------ the run

function run(task: string, durationS: number, signal: AbortSignal): ReadableStream<Uint8Array> {
  const steps = Math.max(1, Math.round((durationS * 1000) / tickMs));
  const started = Date.now();
  let step = 0;
  let timer: ReturnType<typeof setTimeout> | undefined;
  const line = (value: unknown) => encoder.encode(`${JSON.stringify(value)}\n`);
  return new ReadableStream<Uint8Array>({
    start(controller) {
      controller.enqueue(line({ type: "start", task, steps, tickMs }));
      const next = () => {
        if (signal.aborted) return;
        step++;
        const elapsedMs = Date.now() - started;
        if (step < steps) {
          controller.enqueue(line({ type: "step", step, of: steps, elapsedMs }));
          timer = setTimeout(next, tickMs);
        } else {
          controller.enqueue(line({ type: "done", step, of: steps, elapsedMs }));
          controller.close();
        }
      };
      timer = setTimeout(next, tickMs);
      signal.addEventListener("abort", () => clearTimeout(timer));
    },
    cancel() {
      clearTimeout(timer); // the page navigated away or aborted the fetch
    },
  });
}

function json(status: number, body: unknown, headers: Record<string, string>): Response {
  return new Response(JSON.stringify(body), {
    status,
    headers: { ...headers, "Content-Type": "application/json" },
  });
}

export default {
  async fetch(request: Request): Promise<Response> {
    // Preflights carry no credentials: answer them before anything else.
    if (request.method === "OPTIONS") return preflight(request);
    const cors = corsHeaders(request);

    // Then the Bearer token, before any work is done.
    const claims = await authenticate(request);
    if (typeof claims === "string") {
      return json(401, { error: claims }, { ...cors, "WWW-Authenticate": 'Bearer realm="agent"' });
    }

    const url = new URL(request.url);
    if (url.pathname !== "/run") return json(404, { error: "not found; try /run" }, cors);
    if (request.method !== "GET" && request.method !== "POST") {
      return json(405, { error: "use GET or POST" }, { ...cors, Allow: "GET, POST, OPTIONS" });
    }
    let task = url.searchParams.get("task") ?? "";
    if (request.method === "POST") {
      const body = await request.json().catch(() => ({}));
      if (body && typeof body.task === "string") task = body.task;
    }
    const asked = Number.parseFloat(url.searchParams.get("duration") ?? "");
    const durationS = Math.min(
      maxDurationS,
      Number.isFinite(asked) && asked > 0 ? asked : defaultDurationS,
    );
    const runId = crypto.randomUUID();
    console.log(`agent: run ${runId} for ${claims.sub}: ${durationS} s`);
    return new Response(run(task.slice(0, 500), durationS, request.signal), {
      headers: {
        ...cors,
        "Content-Type": "application/x-ndjson; charset=utf-8",
        "Cache-Control": "no-store",
        "X-Run-Id": runId,
      },
    });
  },
};
