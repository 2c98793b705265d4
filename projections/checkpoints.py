"""How replay, status and audit read positions: every query that knows what a checkpoint
or the event store's order looks like, in this one place.

The runner (`projections.projector`) owns the checkpoint table's columns and the event
order it follows (explained there). A checkpoint is the pair (tx_id, position); if it or
the order changes, the constants below change and nothing else in replay/status/audit
does. Copying a checkpoint between
tables reads the column list from the catalog, so it needs no change at all.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import asyncpg

from projections.lease import EPOCH_COLUMN
from shared.catalog import EVENTS_TABLE, PROJECTION, Tables
from shared.events import event_time
from shared.position import ZERO, Position

# The order of the event store, as the projector and the audit follow it.
EVENT_ORDER = "tx_id, notification_id"
# An event's place in that order, and a checkpoint's, as SQL row values.
EVENT_KEY = "(tx_id, notification_id)"
CHECKPOINT_COLUMNS = "tx_id::text, position"

# Ordered by the table's columns (e.): a bare `tx_id` in ORDER BY would name the
# output column `tx_id::text` and sort as text ('998' after '2120').
HEAD = (
    f"SELECT e.tx_id::text, e.notification_id FROM {EVENTS_TABLE} e"
    " ORDER BY e.tx_id DESC, e.notification_id DESC LIMIT 1"
)
# The last event of the transactions below a bound ($1, an xid8 as text), if any.
HEAD_BELOW = (
    f"SELECT e.tx_id::text, e.notification_id FROM {EVENTS_TABLE} e"
    " WHERE e.tx_id < $1::text::xid8 ORDER BY e.tx_id DESC, e.notification_id DESC LIMIT 1"
)
AFTER = f"{EVENT_KEY} > ($1::text::xid8, $2::bigint)"
COUNT_AFTER = f"SELECT count(*) FROM {EVENTS_TABLE} WHERE {AFTER}"
OLDEST_AFTER = f"SELECT state FROM {EVENTS_TABLE} WHERE {AFTER} ORDER BY {EVENT_ORDER} LIMIT 1"
# The events a checkpoint ($3, $4) covers, after the checkpoint ($1, $2), in order.
EVENTS_UP_TO = (
    "SELECT notification_id, originator_id, originator_version, topic, state"
    f" FROM {EVENTS_TABLE} WHERE {AFTER} AND {EVENT_KEY} <= ($3::text::xid8, $4::bigint)"
    f" ORDER BY {EVENT_ORDER}"
)


def _position(row: Any) -> Position | None:
    return None if row is None else Position(int(row[0]), int(row[1]))


def args(position: Position) -> tuple[str, int]:
    """A position as the parameters of the SQL above."""
    return str(position.tx_id), position.notification_id


async def read_checkpoint(
    conn: asyncpg.Connection, t: Tables, projection: str = PROJECTION
) -> Position | None:
    """The projection's checkpoint in `t.checkpoints`, None without a row."""
    return _position(await conn.fetchrow(
        f"SELECT {CHECKPOINT_COLUMNS} FROM {t.checkpoints} WHERE projection = $1", projection
    ))


async def lock_checkpoint(
    conn: asyncpg.Connection, t: Tables, projection: str = PROJECTION
) -> Position | None:
    """Lock the checkpoint row until the transaction ends: the projector's `step` waits."""
    return _position(await conn.fetchrow(
        f"SELECT {CHECKPOINT_COLUMNS} FROM {t.checkpoints} WHERE projection = $1 FOR UPDATE",
        projection,
    ))


async def head(conn: asyncpg.Connection) -> Position:
    """The event store's last event, in the global order."""
    return _position(await conn.fetchrow(HEAD)) or ZERO


async def head_below(conn: asyncpg.Connection, bound: int) -> Position:
    """The last event of the transactions older than `bound` (`projector.safe_bound`)."""
    return _position(await conn.fetchrow(HEAD_BELOW, str(bound))) or ZERO


async def count_after(conn: asyncpg.Connection, position: Position) -> int:
    return int(await conn.fetchval(COUNT_AFTER, *args(position)))


async def lag(conn: asyncpg.Connection, checkpoint: Position) -> tuple[int, float]:
    """(events committed after `checkpoint`, age in seconds of the oldest of them)."""
    events = await count_after(conn, checkpoint)
    if not events:
        return 0, 0.0
    state = await conn.fetchval(OLDEST_AFTER, *args(checkpoint))
    return events, max(0.0, (datetime.now(UTC) - event_time(state)).total_seconds())


# Never copied: the row's key, its time, and the lease's fence (`projections.lease`): a
# replay's switch moves the position, while the active projector's epoch stays.
NOT_COPIED = ("projection", "updated_at", EPOCH_COLUMN)


async def checkpoint_columns(conn: asyncpg.Connection, table: str) -> list[str]:
    rows = await conn.fetch(
        "SELECT column_name FROM information_schema.columns"
        " WHERE table_schema = current_schema() AND table_name = $1"
        " AND column_name <> ALL($2::text[]) ORDER BY ordinal_position",
        table, list(NOT_COPIED),
    )
    return [r["column_name"] for r in rows]


async def copy_checkpoint(
    conn: asyncpg.Connection, source: Tables, target: Tables, projection: str = PROJECTION
) -> None:
    """Set the target's checkpoint row to the source's, whatever its columns are (but
    `NOT_COPIED`: the target keeps its epoch). An UPDATE (not delete + insert): a
    projector waiting on the row lock then reads it."""
    columns = await checkpoint_columns(conn, target.checkpoints)
    assignments = ", ".join(f"{c} = s.{c}" for c in columns)
    status = await conn.execute(
        f"UPDATE {target.checkpoints} t SET {assignments}, updated_at = now()"
        f" FROM {source.checkpoints} s WHERE t.projection = $1 AND s.projection = $1",
        projection,
    )
    if status != "UPDATE 1":
        raise RuntimeError(f"cannot copy checkpoint {projection!r}: {status}")

