// The Node twin of bench/apps/minimal: a Hono app answering a 12-byte body.
import { Hono } from "hono";

const app = new Hono();
app.get("/", (c) => c.text("hello world!"));

export default app;
