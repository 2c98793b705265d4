"""The read-model queries. Each read is a `Query` (SQL and arguments) that
`query_api.reader.Reader` runs in one statement with the read tables' checkpoint; small
functions here turn its rows into typed values. `read_position`, `lag_seconds` and
`why_missing` run on a connection of their own.

Every query that returns user data filters by the token's user first
(`WHERE user_id = $1 ...`); the only query that looks past the user is `why_missing`,
which answers whether the task is another user's (yes or no, so a route can tell 403
from 404) and where its latest event is in the log, and returns nothing else of it.
Beneath the filters, row-level security shows the query API's role only the rows of the
statement's user (`shared.row_security`, set by `query_api.reader`). The rows are written by the read
models listed in `projections/manifest.py` (one module each).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal
from uuid import UUID

import asyncpg

from shared import catalog
from shared.events import PRIORITIES, Priority, event_time
from shared.position import ZERO, Position
from shared.row_security import OWNED_ELSEWHERE_FUNCTION

Status = Literal["all", "pending", "completed"]
Sort = Literal[
    "created_at", "-created_at", "updated_at", "-updated_at", "title", "-title",
    "due_date", "-due_date", "priority", "-priority",
]

# low < medium < high (not their alphabetical order).
PRIORITY_RANK = (
    "(CASE priority "
    + " ".join(f"WHEN '{p}' THEN {n}" for n, p in enumerate(PRIORITIES))
    + " END)"
)
# Every order ends with the task id, unique among a user's tasks: pages never overlap.
# Tasks without a due date come last, in both directions.
_ORDER_BY: dict[str, str] = {
    "created_at": "created_at ASC, task_id ASC",
    "-created_at": "created_at DESC, task_id DESC",
    "updated_at": "updated_at ASC, task_id ASC",
    "-updated_at": "updated_at DESC, task_id DESC",
    "title": "lower(title) ASC, created_at DESC, task_id DESC",
    "-title": "lower(title) DESC, created_at DESC, task_id DESC",
    "due_date": "due_date ASC NULLS LAST, created_at DESC, task_id DESC",
    "-due_date": "due_date DESC NULLS LAST, created_at DESC, task_id DESC",
    "priority": f"{PRIORITY_RANK} ASC, created_at DESC, task_id DESC",
    "-priority": f"{PRIORITY_RANK} DESC, created_at DESC, task_id DESC",
}


@dataclass(frozen=True)
class TaskPage:
    json: str  # a JSON array of the page's tasks, in order
    total: int


@dataclass(frozen=True)
class HistoryRow:
    position: int
    task_id: UUID
    version: int
    event_type: str
    actor: str
    request_id: str
    occurred_at: datetime
    changes: dict[str, Any]

    def view(self) -> dict[str, Any]:
        return {
            "task_id": str(self.task_id),
            "version": self.version,
            "type": self.event_type,
            "actor": self.actor,
            "request_id": self.request_id,
            "occurred_at": self.occurred_at.isoformat(),
            "changes": self.changes,
        }


@dataclass(frozen=True)
class FeedCursor:
    """Where a feed page ended: the (occurred_at, position) of its last row."""

    occurred_at: datetime
    position: int


@dataclass(frozen=True)
class StatsRow:
    total: int
    completed: int
    pending: int

    def view(self) -> dict[str, int]:
        return {"total": self.total, "completed": self.completed, "pending": self.pending}


_HISTORY_COLUMNS = (
    "position, task_id, version, event_type, actor, request_id, occurred_at, changes"
)


def _history(values: Sequence[Any]) -> HistoryRow:
    """A history row from `_HISTORY_COLUMNS`' values, in that order."""
    *columns, changes = values
    return HistoryRow(*columns, json.loads(changes) if isinstance(changes, str) else changes)


def like_pattern(text: str) -> str:
    """A LIKE pattern matching `text` anywhere, its wildcards taken literally."""
    escaped = text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return f"%{escaped}%"


def position_sql() -> str:
    """One row: how many of the projections the read tables come from have a
    checkpoint (`cp_n`), and the lowest checkpoint (`cp_tx_id` as text, `cp_position`)."""
    where = ""
    if catalog.PROJECTIONS:
        names = ", ".join("'" + name.replace("'", "''") + "'" for name in catalog.PROJECTIONS)
        where = f" WHERE projection IN ({names})"
    return (
        "SELECT count(*) AS cp_n,"
        " (array_agg(tx_id::text ORDER BY tx_id, position))[1] AS cp_tx_id,"
        " (array_agg(position ORDER BY tx_id, position))[1] AS cp_position"
        f" FROM {catalog.CHECKPOINTS_TABLE}{where}"
    )


def position_from(n: int, tx_id: str | None, position: int | None) -> Position:
    """The read tables' position from `position_sql`'s row: ZERO before the
    projector's first batch, or while a projection they need has no checkpoint yet."""
    if n == 0 or n < len(catalog.PROJECTIONS) or tx_id is None or position is None:
        return ZERO
    return Position(int(tx_id), position)


async def read_position(conn: asyncpg.Connection) -> Position:
    """How far the read tables have caught up: the lowest checkpoint of the
    projections they come from."""
    n, tx_id, position = await conn.fetchrow(position_sql())
    return position_from(n, tx_id, position)


OLDEST_UNPROJECTED = (
    f"SELECT state FROM {catalog.EVENTS_TABLE}"
    " WHERE (tx_id, notification_id) > ($1::text::xid8, $2::bigint)"
    " ORDER BY tx_id, notification_id LIMIT 1"
)


async def lag_seconds(conn: asyncpg.Connection, position: Position) -> float:
    """Age of the oldest event after `position` (the read tables' position), in seconds;
    0 when they are caught up. Read where the read tables are read, so on a replica it
    is the replica's own lag."""
    state = await conn.fetchval(OLDEST_UNPROJECTED, str(position.tx_id), position.notification_id)
    if state is None:
        return 0.0
    return max(0.0, (datetime.now(UTC) - event_time(state)).total_seconds())


@dataclass(frozen=True)
class Query:
    """A SELECT and its arguments, which `Reader` runs beside the checkpoint in the same
    statement: `read_row` for one returning at most one row, `read_rows` for one
    returning rows whose first column is never NULL, in `order` (its column names)."""

    sql: str
    args: tuple[Any, ...]
    order: str = ""


def list_tasks(
    user_id: str,
    *,
    status: Status = "all",
    q: str | None = None,
    priority: Priority | None = None,
    tags: Sequence[str] = (),
    due_before: datetime | None = None,
    due_after: datetime | None = None,
    sort: Sort = "-created_at",
    limit: int | None = None,
    offset: int = 0,
) -> Query:
    """Columns `total` (every match) and `docs` (the page's stored documents joined
    with commas, in order; NULL for an empty page). `tags`: a task has all of them;
    `due_after` is inclusive, `due_before` not; a task without a due date matches
    neither."""
    where = ["user_id = $1"]
    args: list[Any] = [user_id]
    if status != "all":
        args.append(status == "completed")
        where.append(f"completed = ${len(args)}")
    if q:
        args.append(like_pattern(q))
        n = len(args)
        where.append(
            f"(title ILIKE ${n} ESCAPE '\\' OR coalesce(description, '') ILIKE ${n} ESCAPE '\\')"
        )
    if priority is not None:
        args.append(priority)
        where.append(f"priority = ${len(args)}")
    if tags:
        args.append(list(tags))
        where.append(f"tags @> ${len(args)}::text[]")
    if due_after is not None:
        args.append(due_after)
        where.append(f"due_date >= ${len(args)}")
    if due_before is not None:
        args.append(due_before)
        where.append(f"due_date < ${len(args)}")
    condition = " AND ".join(where)
    page = f" OFFSET ${len(args) + 1}"
    args.append(offset)
    if limit is not None:
        args.append(limit)
        page += f" LIMIT ${len(args)}"
    order = _ORDER_BY[sort]
    # The aggregate sorts again: a subquery's order is not guaranteed to survive it.
    return Query(
        f"SELECT (SELECT count(*) FROM {catalog.LIVE.tasks} WHERE {condition}) AS total,"
        f" (SELECT string_agg(doc, ',' ORDER BY {order}) FROM"
        f" (SELECT doc, task_id, title, created_at, updated_at, priority, due_date"
        f" FROM {catalog.LIVE.tasks}"
        f" WHERE {condition} ORDER BY {order}{page}) p) AS docs",
        tuple(args),
    )


def task_page(total: int, docs: str | None) -> TaskPage:
    return TaskPage(f"[{docs or ''}]", int(total))


def get_task(user_id: str, task_id: UUID) -> Query:
    """Columns `doc` and `version` of the user's live task (NULL when there is none)."""
    return Query(
        f"SELECT doc, version FROM {catalog.LIVE.tasks} WHERE user_id = $1 AND task_id = $2",
        (user_id, task_id),
    )


@dataclass(frozen=True)
class Missing:
    """Why a read found no task of the user's with an id."""

    elsewhere: bool  # a live task with this id belongs to another user (403, not 404)
    # The position of the task's latest event in the event store (None: no event has
    # that id): the read tables may not hold it yet when another user wrote it.
    latest: Position | None


# The task's latest event ($n: its id), by the event store's primary key.
_TASK_LATEST = (
    f"SELECT tx_id::text, notification_id FROM {catalog.EVENTS_TABLE}"
    " WHERE originator_id = ${n} ORDER BY originator_version DESC LIMIT 1"
)
TASK_LATEST = _TASK_LATEST.format(n=1)
WHY_MISSING = (
    f"SELECT {OWNED_ELSEWHERE_FUNCTION}($1, $2), e.tx_id, e.notification_id"
    f" FROM (SELECT) one LEFT JOIN LATERAL ({_TASK_LATEST.format(n=2)}) e ON true"
)


async def why_missing(conn: asyncpg.Connection, user_id: str, task_id: UUID) -> Missing:
    """`Missing` for the task: whether it is another user's, asked of a function of the
    tables' owner (`taskctl db init`), since the query role's row-level security shows
    it no other user's row (`shared.row_security`); and its latest event's position
    (one primary-key lookup), in the same snapshot."""
    elsewhere, tx_id, notification_id = await conn.fetchrow(WHY_MISSING, user_id, task_id)
    latest = None if tx_id is None else Position(int(tx_id), notification_id)
    return Missing(bool(elsewhere), latest)


def task_history(user_id: str, task_id: UUID) -> Query:
    """A task's audit trail, oldest first; kept after the task is deleted."""
    return Query(
        f"SELECT {_HISTORY_COLUMNS} FROM {catalog.LIVE.history} WHERE user_id = $1 AND task_id = $2",
        (user_id, task_id),
        order="version, position",
    )


def history_rows(rows: list[Sequence[Any]]) -> list[HistoryRow]:
    return [_history(r) for r in rows]


def activity_feed(
    user_id: str,
    *,
    since: datetime | None = None,
    until: datetime | None = None,
    event_type: str | None = None,
    task_id: UUID | None = None,
    after: FeedCursor | None = None,
    limit: int = 50,
) -> Query:
    """The user's events across tasks, newest first, `limit` at a time (one more is
    read, to tell whether there is a next page: see `feed_page`). `since` is
    inclusive, `until` not."""
    where = ["user_id = $1"]
    args: list[Any] = [user_id]

    def add(sql: str, value: Any) -> None:
        args.append(value)
        where.append(sql.format(n=f"${len(args)}"))

    if since is not None:
        add("occurred_at >= {n}", since)
    if until is not None:
        add("occurred_at < {n}", until)
    if event_type is not None:
        add("event_type = {n}", event_type)
    if task_id is not None:
        add("task_id = {n}", task_id)
    if after is not None:
        args.extend((after.occurred_at, after.position))
        where.append(f"(occurred_at, position) < (${len(args) - 1}, ${len(args)})")
    args.append(limit + 1)
    order = "occurred_at DESC, position DESC"
    return Query(
        f"SELECT {_HISTORY_COLUMNS} FROM {catalog.LIVE.history} WHERE {' AND '.join(where)}"
        f" ORDER BY {order} LIMIT ${len(args)}",
        tuple(args),
        order=order,
    )


def feed_page(
    values: list[Sequence[Any]], limit: int
) -> tuple[list[HistoryRow], FeedCursor | None]:
    """The page's rows, and the cursor of the next page (None on the last one)."""
    rows = [_history(r) for r in values[:limit]]
    more = len(values) > limit
    cursor = FeedCursor(rows[-1].occurred_at, rows[-1].position) if more and rows else None
    return rows, cursor


def user_stats(user_id: str) -> Query:
    """Columns `total`, `completed`, `pending` (NULL for a user without tasks)."""
    return Query(
        f"SELECT total, completed, pending FROM {catalog.LIVE.stats} WHERE user_id = $1", (user_id,)
    )


def stats_row(total: int | None, completed: int | None, pending: int | None) -> StatsRow:
    if total is None:
        return StatsRow(0, 0, 0)
    return StatsRow(int(total), int(completed or 0), int(pending or 0))
