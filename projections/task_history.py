"""Read model: task history, one row per event, kept after the task is deleted.

`changes` holds {field: {"from": old, "to": new}}; a created task's fields come from
null: its title, description and completed, and its priority, tags and due date when
they are not the defaults (medium, none, none), so a task created without them, or
before they existed, has the row it always had. A due date shows as ISO 8601 in UTC,
as in the task document. A deleted task's row has no changes (its `event_type` says what
happened).
Rows are keyed by event-store position, so inserting one twice changes nothing.
The read-model shape: see `projections.manifest`.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import asyncpg
import orjson

from projections.task_list import TaskState
from shared.catalog import Tables
from shared.events import (
    COMPLETED,
    CREATED,
    DEFAULT_PRIORITY,
    DELETED,
    DESCRIPTION_CHANGED,
    DUE_DATE_CHANGED,
    PRIORITY_CHANGED,
    REOPENED,
    TAGS_CHANGED,
    TITLE_CHANGED,
    TaskEvent,
)

Changes = dict[str, dict[str, Any]]
_ENCODER = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False)


def _to_json(changes: Changes) -> str:
    """The changes as JSON text for the jsonb column: by orjson (the faster); what it
    refuses (a lone surrogate, a non-string key) by the standard library."""
    try:
        return orjson.dumps(changes).decode()
    except TypeError:
        return _ENCODER.encode(changes)


TABLE = "history"  # the `Tables` field that names this model's table
QUERIES = "query_api.queries: task_history, activity_feed"

_COLUMNS = (
    " user_id text NOT NULL, position bigint NOT NULL, task_id uuid NOT NULL,"
    " version bigint NOT NULL, event_type text NOT NULL, actor text NOT NULL,"
    " request_id text NOT NULL, occurred_at timestamptz NOT NULL, changes jsonb NOT NULL"
)


def tables(t: Tables, *, load: bool = False) -> list[str]:
    """The table; `load`: without its primary key (the bulk load only COPYs into it)."""
    if load:
        return [f"CREATE TABLE {t.history} ({_COLUMNS})"]
    return [f"CREATE TABLE IF NOT EXISTS {t.history} ({_COLUMNS}, PRIMARY KEY (user_id, position))"]


def keys(t: Tables) -> list[str]:
    return [f"ALTER TABLE {t.history} ADD CONSTRAINT {t.history}_pkey"
            " PRIMARY KEY (user_id, position)"]


def indexes(t: Tables) -> list[str]:
    return [
        f"CREATE INDEX IF NOT EXISTS {t.history}_user_task_idx"
        f" ON {t.history} (user_id, task_id, version)",
        f"CREATE INDEX IF NOT EXISTS {t.history}_user_time_idx"
        f" ON {t.history} (user_id, occurred_at DESC, position DESC)",
    ]


COLUMNS = ("user_id", "position", "task_id", "version", "event_type", "actor", "request_id",
           "occurred_at", "changes")
INSERT_ROWS = (
    "INSERT INTO {history} (user_id, position, task_id, version, event_type, actor,"
    " request_id, occurred_at, changes)"
    " SELECT u, p, i, v, e, a, r, o, c::jsonb FROM unnest($1::text[], $2::bigint[],"
    " $3::uuid[], $4::bigint[], $5::text[], $6::text[], $7::text[], $8::timestamptz[],"
    " $9::text[]) AS x(u, p, i, v, e, a, r, o, c)"
    " ON CONFLICT (user_id, position) DO NOTHING"
)

# Only for re-applied events of a task deleted since: which positions are in already.
SELECT_POSITIONS = "SELECT position FROM {history} WHERE position = ANY($1::bigint[])"


def _change(old: Any, new: Any) -> dict[str, Any]:
    return {"from": old, "to": new}


def _iso(value: datetime | None) -> str | None:
    return None if value is None else value.astimezone(UTC).isoformat()


def _created(e: TaskEvent, _: TaskState | None) -> Changes:
    d = e.data
    changes = {
        "title": _change(None, d["title"]),
        "description": _change(None, d["description"]),
        "completed": _change(None, False),
    }
    if d.get("priority", DEFAULT_PRIORITY) != DEFAULT_PRIORITY:
        changes["priority"] = _change(None, d["priority"])
    if d.get("tags"):
        changes["tags"] = _change(None, d["tags"])
    if d.get("due_date") is not None:
        changes["due_date"] = _change(None, _iso(d["due_date"]))
    return changes


def _title_changed(e: TaskEvent, s: TaskState) -> Changes:
    return {"title": _change(s.title, e.data["title"])}


def _description_changed(e: TaskEvent, s: TaskState) -> Changes:
    return {"description": _change(s.description, e.data["description"])}


def _priority_changed(e: TaskEvent, s: TaskState) -> Changes:
    return {"priority": _change(s.priority, e.data["priority"])}


def _tags_changed(e: TaskEvent, s: TaskState) -> Changes:
    return {"tags": _change(list(s.tags), e.data["tags"])}


def _due_date_changed(e: TaskEvent, s: TaskState) -> Changes:
    return {"due_date": _change(_iso(s.due_date), _iso(e.data["due_date"]))}


def _completed(_: TaskEvent, s: TaskState) -> Changes:
    return {"completed": _change(s.completed, True)}


def _reopened(_: TaskEvent, s: TaskState) -> Changes:
    return {"completed": _change(s.completed, False)}


def _deleted(_: TaskEvent, __: TaskState) -> Changes:
    return {}


CHANGES: dict[str, Callable[[TaskEvent, Any], Changes]] = {
    CREATED: _created,
    TITLE_CHANGED: _title_changed,
    DESCRIPTION_CHANGED: _description_changed,
    PRIORITY_CHANGED: _priority_changed,
    TAGS_CHANGED: _tags_changed,
    DUE_DATE_CHANGED: _due_date_changed,
    COMPLETED: _completed,
    REOPENED: _reopened,
    DELETED: _deleted,
}


async def applied_positions(
    conn: asyncpg.Connection, t: Tables, positions: list[int]
) -> set[int]:
    rows = await conn.fetch(SELECT_POSITIONS.format(history=t.history), positions)
    return {row["position"] for row in rows}


class Rows:
    """A batch's history rows: inserted (live) or COPYed (bulk)."""

    def __init__(self) -> None:
        self.rows: list[tuple[Any, ...]] = []

    def apply(self, event: TaskEvent, before: TaskState | None, after: TaskState | None) -> None:
        changes = CHANGES[event.topic](event, before)
        owner = (after or before).user_id  # type: ignore[union-attr]
        self.rows.append(
            (
                owner,
                event.position,
                event.task_id,
                event.version,
                event.topic,
                event.actor,
                event.request_id,
                event.timestamp,
                _to_json(changes),
            )
        )

    async def write(self, conn: asyncpg.Connection, t: Tables) -> None:
        if self.rows:
            await conn.execute(INSERT_ROWS.format(history=t.history), *map(list, zip(*self.rows)))

    async def copy(self, conn: asyncpg.Connection, t: Tables) -> None:
        """COPY the rows into a table holding none of these positions (bulk sink)."""
        if self.rows:
            await conn.copy_records_to_table(t.history, records=self.rows, columns=COLUMNS)
