"""The ceiling: a bare FastAPI + asyncpg app on the same stack as the service, served
by uvicorn exactly as `taskctl command-api` / `query-api` serve theirs (one worker,
the default loop and HTTP parser, same log level), with no auth, no envelope, no
event store: what one request costs on this stack before any of our code runs.

    GET  /const                          a constant, answered below FastAPI (the load
                                         generator's own ceiling)
    POST /insert        {user_id, title} INSERT one row, return it
    GET  /select/{user_id}?limit=N       SELECT N rows of a user, newest first

The tables (`ceiling_tasks` read, `ceiling_writes` written) have the shape and
indexes of the query side's `read_tasks`; the harness creates and fills them.

Run: `python -m bench.ceiling_app --port 8100` with `BENCH_CEILING_DSN` set.
"""

from __future__ import annotations

import argparse
import json
import os
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Any

import asyncpg
from fastapi import FastAPI, Request
from fastapi.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

READ_TABLE = "ceiling_tasks"
WRITE_TABLE = "ceiling_writes"
COLUMNS = "user_id, task_id, title, description, completed, created_at, updated_at, version"


def ddl() -> list[str]:
    statements = []
    for table in (READ_TABLE, WRITE_TABLE):
        statements += [
            f"CREATE TABLE IF NOT EXISTS {table} ("
            " user_id text NOT NULL, task_id uuid NOT NULL,"
            " title text NOT NULL, description text, completed boolean NOT NULL,"
            " created_at timestamptz NOT NULL, updated_at timestamptz NOT NULL,"
            " version bigint NOT NULL, position bigint NOT NULL DEFAULT 0,"
            " PRIMARY KEY (user_id, task_id))",
            f"CREATE INDEX IF NOT EXISTS {table}_user_created_idx"
            f" ON {table} (user_id, created_at DESC)",
        ]
    return statements


def fill_sql() -> str:
    """$1: user ids, $2: rows per user."""
    return (
        f"INSERT INTO {READ_TABLE} ({COLUMNS})"
        " SELECT u, gen_random_uuid(), 'task ' || i, 'a task to do', mod(i, 3) = 0,"
        " now() - i * interval '1 second', now(), 1"
        " FROM unnest($1::text[]) AS u, generate_series(1, $2) AS i"
    )


_CONST = b'{"ok":true}'


class Const:
    """`/const` answered in raw ASGI, so it measures uvicorn and the client, not FastAPI."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] == "/const":
            await send({
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(_CONST)).encode())],
            })
            await send({"type": "http.response.body", "body": _CONST})
            return
        await self.app(scope, receive, send)


def _json(content: Any, status: int = 200) -> Response:
    return Response(json.dumps(content, default=str, separators=(",", ":")), status,
                    media_type="application/json")


def create_app() -> ASGIApp:
    dsn = os.environ["BENCH_CEILING_DSN"]
    pool_size = int(os.environ.get("BENCH_CEILING_POOL", "15"))
    state: dict[str, asyncpg.Pool] = {}

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        state["pool"] = await asyncpg.create_pool(dsn, min_size=1, max_size=pool_size)
        yield
        await state["pool"].close()

    app = FastAPI(lifespan=lifespan)
    insert = (
        f"INSERT INTO {WRITE_TABLE} ({COLUMNS}) VALUES ($1, $2, $3, $4, false, $5, $5, 1)"
        f" RETURNING {COLUMNS}"
    )
    select = (
        f"SELECT {COLUMNS} FROM {READ_TABLE} WHERE user_id = $1"
        " ORDER BY created_at DESC LIMIT $2"
    )

    @app.get("/api/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.post("/insert")
    async def insert_one(request: Request) -> Response:
        body = await request.json()
        async with state["pool"].acquire() as conn:
            row = await conn.fetchrow(insert, body["user_id"], uuid.uuid4(), body["title"],
                                      body.get("description"), datetime.now(UTC))
        return _json(dict(row), 201)

    @app.get("/select/{user_id}")
    async def select_rows(user_id: str, limit: int = 50) -> Response:
        async with state["pool"].acquire() as conn:
            rows = await conn.fetch(select, user_id, limit)
        return _json([dict(r) for r in rows])

    return Const(app)


def main() -> None:
    import uvicorn

    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--log-level", default=os.environ.get("LOG_LEVEL", "warning"))
    args = parser.parse_args()
    # The same call as taskctl.cli._serve, so both sides run the same server.
    uvicorn.run(
        "bench.ceiling_app:create_app",
        factory=True,
        host="127.0.0.1",
        port=args.port,
        log_level=args.log_level.lower(),
        proxy_headers=True,
        timeout_graceful_shutdown=10,
    )


if __name__ == "__main__":
    main()
