// Realtime chat on a long-running function.
//
//   GET  /            the browser client (client.ts)
//   POST /token       {"name": "ada"} -> {"token": "<jwt>"}   DEMO ONLY, see README
//   GET  /messages    the last 50 messages
//   GET  /shutdowns   what the SIGINT handler recorded when isolates were evicted
//   WS   /ws?token=   the chat itself: send text, receive {"type": "message", ...}
//
// Every isolate LISTENs on one Postgres channel over the direct (unpooled) connection; a
// message is inserted and NOTIFYed in one statement, so it reaches the sockets of every
// isolate, whichever one the sender is connected to.

import type { IncomingMessage } from "node:http";
import type { Duplex } from "node:stream";
import { parseEnv } from "@neon/env";
import { Hono } from "hono";
import { SignJWT, jwtVerify } from "jose";
import pg from "pg";
import { type WebSocket, WebSocketServer } from "ws";
import config from "../neon";
import { CLIENT_HTML } from "./client";

// DATABASE_URL, DATABASE_URL_UNPOOLED and NEON_BRANCH, injected by the platform. @neon/env
// 0.15 is typed against @neon/config 0.14, whose policy type predates the GA top-level
// `functions` key; at run time it reads the same injected variables either way.
const env = parseEnv(config as unknown as Parameters<typeof parseEnv>[0]);

const secretText = process.env.CHAT_JWT_SECRET ?? "";
if (secretText.length < 16) {
  throw new Error("CHAT_JWT_SECRET must be set to at least 16 characters");
}
const secret = new TextEncoder().encode(secretText);
const pingIntervalMs = seconds("CHAT_PING_INTERVAL_S", 25) * 1000;
const CHANNEL = "chat_messages";
const MAX_BODY = 2000;
// Which isolate this is: phloem injects its id (e.g. "iso-1a2b3c4d", as shown by
// `phloem status` and in the logs). The pid cannot tell isolates apart, since each runs as
// pid 1 in a sandbox of its own; elsewhere (`phloem dev`) the pid stands in.
const ISOLATE = process.env.PHLOEM_ISOLATE ?? `pid-${process.pid}`;

function seconds(name: string, fallback: number): number {
  const value = Number.parseFloat(process.env[name] ?? "");
  return Number.isFinite(value) && value > 0 ? value : fallback;
}

// ------------------------------------------------------------------------------ Postgres

// Queries go through the pooled URL; LISTEN needs a session of its own, so it gets a
// direct connection (a transaction-mode pooler would hand the session to someone else).
const pool = new pg.Pool({ connectionString: env.postgres.databaseUrl, max: 5 });
pool.on("error", (err) => console.error("chat: idle pool client failed:", err.message));

const SCHEMA = `
  CREATE TABLE IF NOT EXISTS chat_messages (
    id         bigserial PRIMARY KEY,
    user_name  text NOT NULL,
    body       text NOT NULL,
    isolate    text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
  );
  CREATE TABLE IF NOT EXISTS chat_shutdowns (
    id         bigserial PRIMARY KEY,
    isolate    text NOT NULL,
    signal     text NOT NULL,
    sockets    integer NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
  );`;

let listener: pg.Client | null = null;
let stopping = false;

async function listen(): Promise<void> {
  const client = new pg.Client({ connectionString: env.postgres.databaseUrlUnpooled });
  client.on("notification", (msg) => {
    if (msg.channel === CHANNEL && msg.payload) broadcast(msg.payload);
  });
  client.on("error", (err) => {
    // The connection broke (e.g. the branch restarted): messages sent meanwhile are in
    // the table, clients reload them with GET /messages when they reconnect.
    console.error("chat: LISTEN connection lost:", err.message);
    if (listener === client) listener = null;
    client.end().catch(() => {});
    if (!stopping) setTimeout(() => listen().catch(retryListen), 1000);
  });
  await client.connect();
  await client.query(`LISTEN ${CHANNEL}`);
  listener = client;
}

function retryListen(err: Error): void {
  console.error("chat: cannot LISTEN, retrying:", err.message);
  if (!stopping) setTimeout(() => listen().catch(retryListen), 1000);
}

async function migrate(): Promise<void> {
  // Two isolates starting at once would race on CREATE TABLE IF NOT EXISTS: serialise.
  const client = new pg.Client({ connectionString: env.postgres.databaseUrlUnpooled });
  await client.connect();
  try {
    await client.query("BEGIN");
    await client.query("SELECT pg_advisory_xact_lock(hashtext('phloem-example-chat'))");
    await client.query(SCHEMA);
    await client.query("COMMIT");
  } finally {
    await client.end();
  }
}

await migrate();
await listen();

// ------------------------------------------------------------------------------ sockets

type Identity = { name: string };
type Message = { id: number; user: string; body: string; isolate: string; at: string };

const wss = new WebSocketServer({ noServer: true, maxPayload: 16 * 1024 });
const alive = new WeakMap<WebSocket, boolean>();

function broadcast(payload: string): void {
  for (const ws of wss.clients) {
    if (ws.readyState === ws.OPEN) ws.send(payload);
  }
}

async function post(identity: Identity, text: string): Promise<void> {
  const body = text.trim().slice(0, MAX_BODY);
  if (!body) return;
  // Insert and notify in one statement: the NOTIFY is delivered when it commits.
  await pool.query(
    `WITH m AS (
       INSERT INTO chat_messages (user_name, body, isolate) VALUES ($1, $2, $3)
       RETURNING id, user_name, body, isolate, created_at)
     SELECT pg_notify($4, json_build_object(
       'type', 'message', 'id', id, 'user', user_name, 'body', body, 'isolate', isolate,
       'at', created_at)::text) FROM m`,
    [identity.name, body, ISOLATE, CHANNEL],
  );
}

async function recent(limit = 50): Promise<Message[]> {
  const { rows } = await pool.query(
    `SELECT id, user_name AS user, body, isolate, created_at AS at
       FROM (SELECT * FROM chat_messages ORDER BY id DESC LIMIT $1) last
      ORDER BY id`,
    [limit],
  );
  // pg returns a bigint as a string, the NOTIFY payload has a number: clients match ids
  // (to drop a message they got both ways), so give them one type.
  return rows.map((row) => ({ ...row, id: Number(row.id) })) as Message[];
}

function accept(ws: WebSocket, identity: Identity): void {
  alive.set(ws, true);
  ws.on("pong", () => alive.set(ws, true));
  ws.on("message", (data, isBinary) => {
    if (isBinary) return;
    post(identity, data.toString()).catch((err) => {
      console.error("chat: storing a message failed:", err.message);
      if (ws.readyState === ws.OPEN) {
        ws.send(JSON.stringify({ type: "error", error: "message not stored" }));
      }
    });
  });
  // Which isolate the socket landed on (and, per message, which one stored it) makes the
  // fan-out visible.
  ws.send(JSON.stringify({ type: "hello", user: identity.name, isolate: ISOLATE }));
}

// Heartbeat: ping every interval; a socket that did not answer the previous ping is gone
// (a NAT or proxy dropped it silently) and is terminated.
const heartbeat = setInterval(() => {
  for (const ws of wss.clients) {
    if (!alive.get(ws)) {
      ws.terminate();
      continue;
    }
    alive.set(ws, false);
    ws.ping();
  }
}, pingIntervalMs);
heartbeat.unref();

// ------------------------------------------------------------------------------ tokens

async function mint(name: string): Promise<string> {
  return new SignJWT({ name })
    .setProtectedHeader({ alg: "HS256" })
    .setSubject(name)
    .setIssuedAt()
    .setExpirationTime("10m")
    .sign(secret);
}

async function verify(token: string | null): Promise<Identity | null> {
  if (!token) return null;
  try {
    const { payload } = await jwtVerify(token, secret, { algorithms: ["HS256"] });
    return typeof payload.name === "string" ? { name: payload.name } : null;
  } catch {
    return null;
  }
}

function refuse(socket: Duplex, status: string): void {
  const body = `${status}\n`;
  socket.end(
    `HTTP/1.1 ${status}\r\nContent-Type: text/plain\r\n` +
      `Content-Length: ${Buffer.byteLength(body)}\r\nConnection: close\r\n\r\n${body}`,
  );
}

// ------------------------------------------------------------------------------ HTTP

const app = new Hono();

app.get("/", (c) => c.html(CLIENT_HTML));

// DEMO ONLY: anyone can get a token for any name. A real app takes tokens from its
// identity provider (and verifies them against its JWKS) instead.
app.post("/token", async (c) => {
  const body = await c.req.json<{ name?: unknown }>().catch(() => ({ name: undefined }));
  const name = typeof body.name === "string" ? body.name.trim().slice(0, 40) : "";
  if (!name) return c.json({ error: "name: a non-empty string is required" }, 400);
  return c.json({ token: await mint(name) });
});

app.get("/messages", async (c) => c.json(await recent()));

app.get("/shutdowns", async (c) => {
  const { rows } = await pool.query(
    "SELECT isolate, signal, sockets, created_at AS at FROM chat_shutdowns ORDER BY id",
  );
  return c.json(rows);
});

app.get("/healthz", (c) => c.json({ ok: true, isolate: ISOLATE, clients: wss.clients.size }));

export default {
  fetch: app.fetch,

  async upgrade(req: IncomingMessage, socket: Duplex, head: Buffer): Promise<void> {
    const url = new URL(req.url ?? "/", "http://localhost");
    if (url.pathname !== "/ws") return refuse(socket, "404 Not Found");
    const identity = await verify(url.searchParams.get("token"));
    if (!identity || stopping) {
      return refuse(socket, identity ? "503 Service Unavailable" : "401 Unauthorized");
    }
    wss.handleUpgrade(req, socket, head, (ws) => accept(ws, identity));
  },
};

// ------------------------------------------------------------------------------ SIGINT

// phloem sends SIGINT before evicting an idle isolate or retiring an old deployment, and
// waits for the promise returned here: say goodbye (1001 "going away", so clients
// reconnect elsewhere), record it, and close the database connections.
process.on("SIGINT", async () => {
  stopping = true;
  clearInterval(heartbeat);
  const sockets = wss.clients.size;
  for (const ws of wss.clients) ws.close(1001, "server going away");
  const stragglers = setTimeout(() => {
    for (const ws of wss.clients) ws.terminate();
  }, 2000);
  try {
    await pool.query(
      "INSERT INTO chat_shutdowns (isolate, signal, sockets) VALUES ($1, $2, $3)",
      [ISOLATE, "SIGINT", sockets],
    );
    console.log(`chat: SIGINT: closed ${sockets} sockets with 1001, isolate ${ISOLATE}`);
  } catch (err) {
    console.error("chat: recording the shutdown failed:", (err as Error).message);
  }
  await Promise.allSettled([listener?.end(), pool.end()]);
  await new Promise<void>((resolve) => {
    if (wss.clients.size === 0) return resolve();
    const check = setInterval(() => {
      if (wss.clients.size === 0) {
        clearInterval(check);
        resolve();
      }
    }, 50);
  });
  clearTimeout(stragglers);
});
