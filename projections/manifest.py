"""DDL of every read table and the checkpoint table (run by `taskctl db init`)."""

from __future__ import annotations

import asyncpg

from projections import task_history, task_list, user_stats
from shared.catalog import EVENTS_TABLE, LIVE, Tables

READ_MODELS = (task_list, task_history, user_stats)


def ddl(t: Tables = LIVE) -> list[str]:
    statements = [
        # (tx_id, position) is the last event applied, in the event store's global
        # order (see shared/position.py); position is its notification id.
        f"CREATE TABLE IF NOT EXISTS {t.checkpoints} ("
        " projection text PRIMARY KEY, tx_id xid8 NOT NULL DEFAULT '0',"
        " position bigint NOT NULL, updated_at timestamptz NOT NULL DEFAULT now())",
        # Stores made before the global order: give old checkpoints the transaction id
        # of the event they name (old events share the migrating transaction's id).
        f"ALTER TABLE {t.checkpoints} ADD COLUMN IF NOT EXISTS tx_id xid8 NOT NULL DEFAULT '0'",
        f"DO $$ BEGIN IF to_regclass('{EVENTS_TABLE}') IS NOT NULL THEN"
        f" UPDATE {t.checkpoints} c SET tx_id = e.tx_id FROM {EVENTS_TABLE} e"
        " WHERE c.tx_id = '0' AND c.position > 0 AND e.notification_id = c.position;"
        " END IF; END $$",
    ]
    for model in READ_MODELS:
        statements.extend(model.ddl(t))
    return statements


async def create_read_tables(conn: asyncpg.Connection, tables: Tables = LIVE) -> None:
    """Create the read tables and indexes if missing; safe to run again."""
    async with conn.transaction():
        # Serialise concurrent `db init`s: CREATE ... IF NOT EXISTS can race.
        await conn.execute("SELECT pg_advisory_xact_lock(hashtextextended('taskservice.ddl', 0))")
        for statement in ddl(tables):
            await conn.execute(statement)


async def create_read_tables_at(dsn: str, tables: Tables = LIVE) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        await create_read_tables(conn, tables)
    finally:
        await conn.close()
