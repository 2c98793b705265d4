"""DDL of every read table and the checkpoint table (run by `taskctl db init`)."""

from __future__ import annotations

import asyncpg

from projections import task_history, task_list, user_stats
from projections.tables import DEFAULT, Tables

READ_MODELS = (task_list, task_history, user_stats)


def ddl(t: Tables = DEFAULT) -> list[str]:
    statements = [
        f"CREATE TABLE IF NOT EXISTS {t.checkpoints} ("
        " projection text PRIMARY KEY, position bigint NOT NULL,"
        " updated_at timestamptz NOT NULL DEFAULT now())"
    ]
    for model in READ_MODELS:
        statements.extend(model.ddl(t))
    return statements


async def create_read_tables(conn: asyncpg.Connection, tables: Tables = DEFAULT) -> None:
    """Create the read tables and indexes if missing; safe to run again."""
    async with conn.transaction():
        # Serialise concurrent `db init`s: CREATE ... IF NOT EXISTS can race.
        await conn.execute("SELECT pg_advisory_xact_lock(hashtextextended('taskservice.ddl', 0))")
        for statement in ddl(tables):
            await conn.execute(statement)


async def create_read_tables_at(dsn: str, tables: Tables = DEFAULT) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        await create_read_tables(conn, tables)
    finally:
        await conn.close()
