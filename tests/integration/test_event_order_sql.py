"""The head of the event store is found in xid8 order, not text order.

`SELECT tx_id::text ... ORDER BY tx_id` sorts by the *output* column (text), so '998'
came after '2120': seen when a fresh server's transaction ids crossed from three to
four digits (tests/e2e/test_database_restart.py). A temporary table shadows
`tasks_events` for this connection only, with ids on both sides of such a boundary."""

from __future__ import annotations

import asyncpg

from projections.checkpoints import head
from shared.position import Position


async def test_head_is_the_highest_transaction_id_numerically(database_url: str) -> None:
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute(
            "CREATE TEMP TABLE tasks_events (tx_id xid8 NOT NULL, notification_id bigint NOT NULL)"
        )
        await conn.execute(
            "INSERT INTO pg_temp.tasks_events VALUES ('998', 146), ('2120', 777), ('1343', 339),"
            " ('2120', 12)"
        )
        assert await head(conn) == Position(2120, 777)
    finally:
        await conn.close()
