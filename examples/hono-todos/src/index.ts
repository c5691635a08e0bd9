import { parseEnv } from "@neon/env";
import { attachDatabasePool, waitUntil } from "@neon/functions";
import { eq } from "drizzle-orm";
import { drizzle } from "drizzle-orm/node-postgres";
import { Hono } from "hono";
import { Pool } from "pg";
import config from "../neon";
import { todoEvents, todos } from "./db/schema";

// DATABASE_URL (pooled, PgBouncer) and friends are injected by the platform.
const env = parseEnv(config);

// One small pool per isolate, created once and reused by every request it serves.
const pool = new Pool({ connectionString: env.postgres.databaseUrl, max: 5 });
attachDatabasePool(pool); // closed cleanly when the isolate is evicted
const db = drizzle(pool);

const app = new Hono();

app.use(async (c, next) => {
  await next();
  const banner = process.env.TODOS_BANNER;
  if (banner) c.header("X-Todos-Banner", banner);
});

app.get("/", (c) => c.text(`todos on ${env.branch?.name ?? "?"}`));

app.get("/todos", async (c) => c.json(await db.select().from(todos).orderBy(todos.id)));

app.post("/todos", async (c) => {
  const body = await c.req.json<{ text?: unknown }>().catch(() => ({ text: undefined }));
  if (typeof body.text !== "string" || body.text.trim() === "") {
    return c.json({ error: "text: must be a non-empty string" }, 400);
  }
  const [row] = await db.insert(todos).values({ text: body.text }).returning();
  // Recorded after the response is sent; the isolate stays up until it is written.
  waitUntil(db.insert(todoEvents).values({ todoId: row.id, kind: "created" }));
  return c.json(row, 201);
});

app.patch("/todos/:id", async (c) => {
  const id = Number(c.req.param("id"));
  const body = await c.req.json<{ done?: unknown }>().catch(() => ({ done: undefined }));
  if (!Number.isInteger(id) || typeof body.done !== "boolean") {
    return c.json({ error: "done: must be a boolean" }, 400);
  }
  const [row] = await db.update(todos).set({ done: body.done }).where(eq(todos.id, id)).returning();
  return row ? c.json(row) : c.json({ error: "not found" }, 404);
});

app.get("/events", async (c) => c.json(await db.select().from(todoEvents).orderBy(todoEvents.id)));

export default app;
