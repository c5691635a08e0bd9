"""A todo API on phloem: Starlette + a psycopg pool made once per isolate.

DATABASE_URL is injected by phloem. It will go through PgBouncer in transaction mode,
which (as Debian's PgBouncer 1.18) cannot keep prepared statements, hence
prepare_threshold=None.
"""

import contextlib
import os

from psycopg_pool import AsyncConnectionPool
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse
from starlette.routing import Route

GREETING = "hello from phloem"
# Which isolate this is: phloem injects its id (e.g. "iso-1a2b3c4d", as shown by
# `phloem status` and in the logs). The pid cannot tell isolates apart, since each runs as
# pid 1 in a sandbox of its own; elsewhere (`phloem dev`) the pid stands in.
ISOLATE = os.environ.get("PHLOEM_ISOLATE") or f"pid-{os.getpid()}"

# Module scope: one pool per isolate, shared by all its concurrent requests.
pool = AsyncConnectionPool(
    os.environ["DATABASE_URL"],
    min_size=1,
    max_size=5,
    open=False,
    kwargs={"prepare_threshold": None, "autocommit": True},
)


@contextlib.asynccontextmanager
async def lifespan(app: Starlette):
    await pool.open()
    async with pool.connection() as conn:
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS todos ("
            " id bigserial PRIMARY KEY, title text NOT NULL,"
            " done boolean NOT NULL DEFAULT false,"
            " created_at timestamptz NOT NULL DEFAULT now())"
        )
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS lifecycle_events ("
            " id bigserial PRIMARY KEY, event text NOT NULL, isolate text NOT NULL,"
            " at timestamptz NOT NULL DEFAULT now())"
        )
        await conn.execute(
            "INSERT INTO lifecycle_events (event, isolate) VALUES ('startup', %s)", (ISOLATE,)
        )
    yield
    # Runs on SIGINT (eviction, redeploy, platform shutdown): close the pool cleanly.
    async with pool.connection() as conn:
        await conn.execute(
            "INSERT INTO lifecycle_events (event, isolate) VALUES ('shutdown', %s)", (ISOLATE,)
        )
    await pool.close()


async def index(request: Request) -> PlainTextResponse:
    return PlainTextResponse(f"{GREETING} (branch {os.environ.get('PHLOEM_BRANCH')})\n")


async def list_todos(request: Request) -> JSONResponse:
    async with pool.connection() as conn:
        cur = await conn.execute("SELECT id, title, done FROM todos ORDER BY id")
        rows = await cur.fetchall()
    return JSONResponse([{"id": r[0], "title": r[1], "done": r[2]} for r in rows])


async def create_todo(request: Request) -> JSONResponse:
    body = await request.json()
    title = body.get("title") if isinstance(body, dict) else None
    if not isinstance(title, str) or not title.strip():
        return JSONResponse({"error": "title: required, a non-empty string"}, 400)
    async with pool.connection() as conn:
        cur = await conn.execute(
            "INSERT INTO todos (title) VALUES (%s) RETURNING id, title, done", (title,)
        )
        row = await cur.fetchone()
    assert row is not None
    return JSONResponse({"id": row[0], "title": row[1], "done": row[2]}, 201)


app = Starlette(
    routes=[
        Route("/", index),
        Route("/todos", list_todos, methods=["GET"]),
        Route("/todos", create_todo, methods=["POST"]),
    ],
    lifespan=lifespan,
)
