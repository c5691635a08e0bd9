// Server-sent events on a long-running function.
//
//   GET  /         a small page that shows the stream (EventSource)
//   GET  /events   text/event-stream: "hello" (which isolate), then every published event;
//                  ": ping" comments keep idle connections open. Last-Event-ID (sent by
//                  EventSource when it reconnects) replays what was missed.
//   POST /events   {"type"?: string, "data": any} -> 201 {"id": n, "isolate": "iso-..."}
//
// Events are stored in Postgres and NOTIFYed in the same statement; every isolate LISTENs
// over the direct (unpooled) connection and writes each event to its own open streams, so
// a subscriber sees every event whichever isolate took the POST.

import { parseEnv } from "@neon/env";
import { Hono } from "hono";
import pg from "pg";
import config from "../neon";

// DATABASE_URL, DATABASE_URL_UNPOOLED and NEON_BRANCH, injected by the platform. @neon/env
// 0.15 is typed against @neon/config 0.14, whose policy type predates the GA top-level
// `functions` key; at run time it reads the same injected variables either way.
const env = parseEnv(config as unknown as Parameters<typeof parseEnv>[0]);

const pingMs = seconds("SSE_PING_INTERVAL_S", 25) * 1000;
const CHANNEL = "sse_events";
const MAX_PAYLOAD = 7000; // NOTIFY payloads must stay under 8000 bytes
const encoder = new TextEncoder();
// Which isolate this is: phloem injects its id (e.g. "iso-1a2b3c4d", as shown by
// `phloem status` and in the logs). The pid cannot tell isolates apart, since each runs as
// pid 1 in a sandbox of its own; elsewhere (`phloem dev`) the pid stands in.
const ISOLATE = process.env.PHLOEM_ISOLATE ?? `pid-${process.pid}`;

function seconds(name: string, fallback: number): number {
  const value = Number.parseFloat(process.env[name] ?? "");
  return Number.isFinite(value) && value > 0 ? value : fallback;
}

// ------------------------------------------------------------------------------ Postgres

const pool = new pg.Pool({ connectionString: env.postgres.databaseUrl, max: 5 });
pool.on("error", (err) => console.error("sse: idle pool client failed:", err.message));

async function migrate(): Promise<void> {
  const client = new pg.Client({ connectionString: env.postgres.databaseUrlUnpooled });
  await client.connect();
  try {
    // Isolates starting together would race on CREATE TABLE IF NOT EXISTS: serialise.
    await client.query("BEGIN");
    await client.query("SELECT pg_advisory_xact_lock(hashtext('phloem-example-sse'))");
    await client.query(`CREATE TABLE IF NOT EXISTS sse_events (
      id         bigserial PRIMARY KEY,
      type       text NOT NULL,
      data       jsonb NOT NULL,
      created_at timestamptz NOT NULL DEFAULT now())`);
    await client.query("COMMIT");
  } finally {
    await client.end();
  }
}

let listener: pg.Client | null = null;
let stopping = false;

async function listen(): Promise<void> {
  const client = new pg.Client({ connectionString: env.postgres.databaseUrlUnpooled });
  client.on("notification", (msg) => {
    if (msg.channel === CHANNEL && msg.payload) deliver(JSON.parse(msg.payload) as Event);
  });
  client.on("error", (err) => {
    console.error("sse: LISTEN connection lost:", err.message);
    if (listener === client) listener = null;
    client.end().catch(() => {});
    if (!stopping) setTimeout(() => listen().catch(retry), 1000);
  });
  await client.connect();
  await client.query(`LISTEN ${CHANNEL}`);
  listener = client;
}

function retry(err: Error): void {
  console.error("sse: cannot LISTEN, retrying:", err.message);
  if (!stopping) setTimeout(() => listen().catch(retry), 1000);
}

await migrate();
await listen();

// ------------------------------------------------------------------------------ streams

type Event = { id: number; type: string; data: unknown; at: string };

class Subscriber {
  lastId: number;
  private replaying: Event[] | null = [];
  private ping: ReturnType<typeof setInterval>;

  constructor(
    private controller: ReadableStreamDefaultController<Uint8Array>,
    after: number,
  ) {
    this.lastId = after;
    this.ping = setInterval(() => this.write(": ping\n\n"), pingMs);
  }

  /** Live events wait while the missed ones are replayed, so the order holds. */
  push(event: Event): void {
    if (this.replaying) this.replaying.push(event);
    else this.send(event);
  }

  endReplay(missed: Event[]): void {
    const queued = this.replaying ?? [];
    this.replaying = null;
    for (const event of [...missed, ...queued]) this.send(event);
  }

  send(event: Event): void {
    if (event.id <= this.lastId) return;
    this.lastId = event.id;
    this.write(`id: ${event.id}\nevent: ${event.type}\ndata: ${JSON.stringify(event.data)}\n\n`);
  }

  write(text: string): void {
    try {
      this.controller.enqueue(encoder.encode(text));
    } catch {
      this.close(); // the client went away
    }
  }

  close(): void {
    clearInterval(this.ping);
    subscribers.delete(this);
    try {
      this.controller.close();
    } catch {
      // already closed or cancelled
    }
  }
}

const subscribers = new Set<Subscriber>();

function deliver(event: Event): void {
  for (const sub of subscribers) sub.push(event);
}

function openStream(after: number, signal: AbortSignal): ReadableStream<Uint8Array> {
  let sub: Subscriber | null = null;
  return new ReadableStream<Uint8Array>({
    start(controller) {
      sub = new Subscriber(controller, after);
      subscribers.add(sub);
      const hello = { isolate: ISOLATE, branch: env.branch?.name ?? null };
      sub.write(`retry: 2000\nevent: hello\ndata: ${JSON.stringify(hello)}\n\n`);
      signal.addEventListener("abort", () => sub?.close());
      const current = sub;
      if (after <= 0) {
        current.endReplay([]);
        return;
      }
      pool
        .query(
          `SELECT id::int, type, data, created_at AS at FROM sse_events
            WHERE id > $1 ORDER BY id LIMIT 1000`,
          [after],
        )
        .then(({ rows }) => current.endReplay(rows as Event[]))
        .catch((err) => {
          console.error("sse: replay failed:", err.message);
          current.endReplay([]);
        });
    },
    cancel() {
      sub?.close();
    },
  });
}

// ------------------------------------------------------------------------------ HTTP

const app = new Hono();

app.get("/", (c) => c.html(PAGE));

app.get("/events", (c) => {
  const after = Number.parseInt(c.req.header("Last-Event-ID") ?? c.req.query("after") ?? "", 10);
  const stream = openStream(Number.isFinite(after) ? after : 0, c.req.raw.signal);
  return new Response(stream, {
    headers: {
      "Content-Type": "text/event-stream; charset=utf-8",
      "Cache-Control": "no-cache, no-transform",
      "X-Accel-Buffering": "no",
    },
  });
});

app.post("/events", async (c) => {
  const body = await c.req.json<{ type?: unknown; data?: unknown }>().catch(() => null);
  if (body === null || typeof body !== "object" || !("data" in body)) {
    return c.json({ error: 'body: a JSON object with "data" is required' }, 400);
  }
  const type = typeof body.type === "string" && /^[\w.-]{1,64}$/.test(body.type)
    ? body.type
    : "message";
  const data = JSON.stringify(body.data);
  if (data.length > MAX_PAYLOAD) {
    return c.json({ error: `data: at most ${MAX_PAYLOAD} bytes of JSON` }, 413);
  }
  // Store and notify in one statement; the NOTIFY is delivered when it commits.
  const { rows } = await pool.query(
    `WITH e AS (
       INSERT INTO sse_events (type, data) VALUES ($1, $2::jsonb)
       RETURNING id, type, data, created_at)
     SELECT id::int, pg_notify($3, json_build_object(
       'id', id, 'type', type, 'data', data, 'at', created_at)::text) FROM e`,
    [type, data, CHANNEL],
  );
  return c.json({ id: rows[0].id, isolate: ISOLATE }, 201);
});

export default app;

// ------------------------------------------------------------------------------ SIGINT

// Before an isolate is evicted or retired phloem sends SIGINT and waits for this promise:
// end the streams (EventSource reconnects, with Last-Event-ID, to another isolate) and
// close the database connections.
process.on("SIGINT", async () => {
  stopping = true;
  for (const sub of subscribers) sub.close();
  await Promise.allSettled([listener?.end(), pool.end()]);
});

const PAGE = `<!doctype html>
<html lang="en">
<head><meta charset="utf-8"><title>phloem realtime events</title>
<style>body { font: 15px/1.4 system-ui, sans-serif; max-width: 40rem; margin: 2rem auto; }</style>
</head>
<body>
<h1>Events</h1>
<p id="isolate">connecting</p>
<form id="pub"><input name="text" placeholder="Publish something" required> <button>Publish</button></form>
<ol id="log"></ol>
<script type="module">
const log = document.getElementById("log");
const source = new EventSource("events");  // reconnects by itself, sending Last-Event-ID
source.addEventListener("hello", (e) => {
  document.getElementById("isolate").textContent = "streaming from isolate " + JSON.parse(e.data).isolate;
});
source.addEventListener("message", (e) => {
  const li = document.createElement("li");
  li.textContent = "#" + e.lastEventId + " " + JSON.parse(e.data);
  log.append(li);
});
document.getElementById("pub").addEventListener("submit", async (e) => {
  e.preventDefault();
  const input = e.target.elements.text;
  await fetch("events", { method: "POST", headers: { "Content-Type": "application/json" },
                          body: JSON.stringify({ data: input.value }) });
  input.value = "";
});
</script>
</body>
</html>
`;
