"""The ceiling: a bare FastAPI + asyncpg app on the same stack as the service, served
by uvicorn exactly as `taskctl command-api` / `query-api` serve theirs (one worker,
the default loop and HTTP parser, same log level), with no auth, no envelope, no
event store: what one request costs on this stack before any of our code runs.

    GET  /const                          a constant, answered below FastAPI (the load
                                         generator's own ceiling)
    POST /insert        {user_id, title} INSERT one row, return it
    GET  /get/{user_id}/{task_id}        the ceiling of a get: SELECT one row by primary
                                         key, its JSON built by PostgreSQL (row_to_json),
                                         sent as the body's bytes; 404 when none
    GET  /list/{user_id}                 the ceiling of a full list: every task of the
                                         user as one JSON array PostgreSQL builds
                                         (json_agg, in the API's default order:
                                         created_at DESC, id DESC)
    GET  /history/{user_id}/{task_id}    the ceiling of a history: the task's rows of a
                                         table shaped like `read_task_history`, as one
                                         JSON array PostgreSQL builds (version, position)

Bare on purpose: no token check, no envelope (`data`/`meta`), no ETag, no position or
read-your-own-writes join, no request id; ours does all of that in the same request, so
a ratio to these is what all of it costs, on top of the same SELECT and the same JSON.

The tables (`ceiling_tasks` read, `ceiling_writes` written, `ceiling_history` read)
have the shape and indexes of the query side's `read_tasks` (without the stored `doc`:
the ceiling builds its JSON per request) and `read_task_history`; the harness creates
and fills them with the same users and task ids as the service's (`bench.data`).

Run: `python -m bench.ceiling_app --port 8100` with `BENCH_CEILING_DSN` set;
`BENCH_CEILING_NO_RESET=1` gives its pool the query API's setting (no reset query on
release) for a like-for-like comparison.
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
HISTORY_TABLE = "ceiling_history"
COLUMNS = "user_id, task_id, title, description, completed, created_at, updated_at, version"
# The read table's later columns, as `read_tasks` has them.
ADDED_COLUMNS = (
    " priority text NOT NULL DEFAULT 'medium', tags text[] NOT NULL DEFAULT '{}',"
    " due_date timestamptz"
)


def ddl() -> list[str]:
    statements = []
    for table in (READ_TABLE, WRITE_TABLE):
        added = "," + ADDED_COLUMNS if table == READ_TABLE else ""
        statements += [
            f"CREATE TABLE IF NOT EXISTS {table} ("
            " user_id text NOT NULL, task_id uuid NOT NULL,"
            " title text NOT NULL, description text, completed boolean NOT NULL,"
            " created_at timestamptz NOT NULL, updated_at timestamptz NOT NULL,"
            f" version bigint NOT NULL, position bigint NOT NULL DEFAULT 0{added},"
            " PRIMARY KEY (user_id, task_id))",
            f"CREATE INDEX IF NOT EXISTS {table}_user_created_idx"
            f" ON {table} (user_id, created_at DESC)",
        ]
    # `read_task_history`'s columns, key and index for a task's trail.
    statements += [
        f"CREATE TABLE IF NOT EXISTS {HISTORY_TABLE} ("
        " user_id text NOT NULL, position bigint NOT NULL, task_id uuid NOT NULL,"
        " version bigint NOT NULL, event_type text NOT NULL, actor text NOT NULL,"
        " request_id text NOT NULL, occurred_at timestamptz NOT NULL, changes jsonb NOT NULL,"
        " PRIMARY KEY (user_id, position))",
        f"CREATE INDEX IF NOT EXISTS {HISTORY_TABLE}_user_task_idx"
        f" ON {HISTORY_TABLE} (user_id, task_id, version)",
    ]
    return statements


def fill_with_ids_sql() -> str:
    """$1: user ids, $2: task ids (one of each per task): the service's own ids, so a
    request builder picks the same (user, task) for ours and for the ceiling."""
    return (
        f"INSERT INTO {READ_TABLE} ({COLUMNS})"
        " SELECT u, t, 'Benchmark task ' || i, CASE WHEN mod(i, 2) = 1"
        " THEN 'Seeded by the benchmark harness' END, false,"
        " now() - i * interval '1 second', now() - i * interval '1 second', 1"
        " FROM unnest($1::text[], $2::uuid[]) WITH ORDINALITY AS x(u, t, i)"
    )


def fill_history_sql() -> str:
    """One history row per ceiling task, as the projector writes a task's creation."""
    return (
        f"INSERT INTO {HISTORY_TABLE} (user_id, position, task_id, version, event_type,"
        " actor, request_id, occurred_at, changes)"
        " SELECT user_id, row_number() OVER (ORDER BY created_at, task_id), task_id, version,"
        " 'TaskCreated', user_id, 'bench-seed', created_at,"
        " jsonb_build_object('title', jsonb_build_object('from', null, 'to', title),"
        " 'description', jsonb_build_object('from', null, 'to', description),"
        " 'completed', jsonb_build_object('from', null, 'to', false))"
        f" FROM {READ_TABLE}"
    )


# The task's fields in the order the API shows them (shared.documents.task_document).
_TASK_FIELDS = (
    "task_id AS id, user_id, title, description, completed, priority, tags, due_date,"
    " created_at, updated_at, version"
)
GET_SQL = (
    f"SELECT row_to_json(t)::text FROM (SELECT {_TASK_FIELDS} FROM {READ_TABLE}"
    " WHERE user_id = $1 AND task_id = $2) t"
)
LIST_SQL = (
    "SELECT coalesce(json_agg(t ORDER BY t.created_at DESC, t.id DESC), '[]')::text"
    f" FROM (SELECT {_TASK_FIELDS} FROM {READ_TABLE} WHERE user_id = $1) t"
)
HISTORY_SQL = (
    "SELECT json_agg(json_build_object('task_id', task_id, 'version', version,"
    " 'type', event_type, 'actor', actor, 'request_id', request_id,"
    " 'occurred_at', occurred_at, 'changes', changes) ORDER BY version, position)::text"
    f" FROM {HISTORY_TABLE} WHERE user_id = $1 AND task_id = $2"
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


async def _nothing_to_reset(_: asyncpg.Connection) -> None:
    pass


def create_app() -> ASGIApp:
    dsn = os.environ["BENCH_CEILING_DSN"]
    pool_size = int(os.environ.get("BENCH_CEILING_POOL", "15"))
    state: dict[str, asyncpg.Pool] = {}

    # asyncpg's default pool sends a reset query on every release; the query API sends
    # none. BENCH_CEILING_NO_RESET=1: the ceiling's pool as the query API's (like for
    # like), for a comparison of everything but that round trip.
    options: dict[str, Any] = {}
    if os.environ.get("BENCH_CEILING_NO_RESET") == "1":
        options["reset"] = _nothing_to_reset

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        state["pool"] = await asyncpg.create_pool(dsn, min_size=1, max_size=pool_size,
                                                  **options)
        yield
        await state["pool"].close()

    app = FastAPI(lifespan=lifespan)
    insert = (
        f"INSERT INTO {WRITE_TABLE} ({COLUMNS}) VALUES ($1, $2, $3, $4, false, $5, $5, 1)"
        f" RETURNING {COLUMNS}"
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

    def _body(text: str | None) -> Response:
        if text is None:
            return Response(b'{"detail":"Not Found"}', 404, media_type="application/json")
        return Response(text.encode(), media_type="application/json")

    @app.get("/get/{user_id}/{task_id}")
    async def get_one(user_id: str, task_id: uuid.UUID) -> Response:
        async with state["pool"].acquire() as conn:
            return _body(await conn.fetchval(GET_SQL, user_id, task_id))

    @app.get("/list/{user_id}")
    async def list_all(user_id: str) -> Response:
        async with state["pool"].acquire() as conn:
            return _body(await conn.fetchval(LIST_SQL, user_id))

    @app.get("/history/{user_id}/{task_id}")
    async def history(user_id: str, task_id: uuid.UUID) -> Response:
        async with state["pool"].acquire() as conn:
            return _body(await conn.fetchval(HISTORY_SQL, user_id, task_id))

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
