import { Hono } from "hono";

type Todo = { id: number; title: string };
const todos: Todo[] = [];
const app = new Hono();

app.get("/", (c) => c.text(`hono on ${process.env.PHLOEM_BRANCH}`));
app.get("/todos", (c) => c.json(todos));
app.post("/todos", async (c) => {
  const body = await c.req.json<{ title: string }>();
  const todo: Todo = { id: todos.length + 1, title: body.title };
  todos.push(todo);
  return c.json(todo, 201);
});

export default app;
