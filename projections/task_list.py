"""Read model: the task list, the current state of each user's live tasks.

A deleted task leaves the table. Rows carry the task's aggregate `version` and the
event-store `position` of the last event applied; a row is only ever overwritten by a
higher version, so applying an event twice changes nothing.

Each row also holds `doc`, the task's JSON exactly as the API shows it
(`shared.documents.task_json`), written with the row: the query side serves stored
texts instead of re-encoding every value. `DOC_SQL` renders the same text from the
columns in PostgreSQL, to fill `doc` in tables made before it existed and for the
replay's check that every `doc` matches its row.

`priority`, `tags` and `due_date` came after the first rows: `tables()` adds them to a
table made before them (defaults: medium, no tags, no due date) and renders those
rows' `doc` again, once. They are the last columns, after `doc`, in a new table too, so
a replay's rebuilt table and a migrated live one have the same shape.

`evolve` (one handler per event type) is the task's state fold: the runner
(`projections.projector`) hands its result to every read model as the task's state
before and after each event, and the replay's bulk sink keeps these states as the rows.

The read-model shape (see `projections.manifest`): TABLE, tables/keys/indexes, Rows,
QUERIES.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from datetime import datetime
from typing import NamedTuple
from uuid import UUID

import asyncpg
import orjson

from shared.catalog import Tables
from shared.documents import task_json
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


class TaskState(NamedTuple):
    """A task's row: the columns in `COLUMNS` order but `doc`, which `document` renders
    from these. A named tuple: immutable, and the cheapest record to build, which every
    event does once. The fields added later come last, with their defaults."""

    user_id: str
    task_id: UUID
    title: str
    description: str | None
    completed: bool
    created_at: datetime
    updated_at: datetime
    version: int
    position: int
    priority: str = DEFAULT_PRIORITY
    tags: Sequence[str] = ()
    due_date: datetime | None = None


def document(s: TaskState) -> str:
    """The row's `doc`: the task as the API shows it (`shared.documents.task_json`)."""
    return task_json(s.task_id, s.user_id, s.title, s.description, s.completed,
                     s.created_at, s.updated_at, s.version, s.priority, s.tags, s.due_date)


def _iso_sql(column: str) -> str:
    """`datetime.isoformat()` of a timestamptz in UTC: no fraction when it is zero."""
    utc = f"({column} AT TIME ZONE 'UTC')"
    return (
        f"to_char({utc}, 'YYYY-MM-DD\"T\"HH24:MI:SS')"
        f" || CASE to_char({utc}, 'US') WHEN '000000' THEN '' ELSE to_char({utc}, '.US') END"
        " || '+00:00'"
    )


# `document`'s text from a row's columns (to_json escapes a string as orjson does, and
# writes a text[] as orjson writes a list: no spaces).
DOC_SQL = (
    """'{"id":"' || task_id::text || '","user_id":' || to_json(user_id)::text"""
    """ || ',"title":' || to_json(title)::text"""
    """ || ',"description":' || coalesce(to_json(description)::text, 'null')"""
    """ || ',"completed":' || completed::text"""
    """ || ',"priority":' || to_json(priority)::text"""
    """ || ',"tags":' || to_json(tags)::text"""
    f""" || ',"due_date":' || coalesce('"' || {_iso_sql("due_date")} || '"', 'null')"""
    f""" || ',"created_at":"' || {_iso_sql("created_at")}"""
    f""" || '","updated_at":"' || {_iso_sql("updated_at")}"""
    """ || '","version":' || version::text || '}'"""
)


TABLE = "tasks"  # the `Tables` field that names this model's table
# The statements that read it (query_api cannot import this package).
QUERIES = "query_api.queries: list_tasks, get_task, why_missing"

# The fields added later (also what `tables()` adds to a table made before them).
_ADDED_COLUMNS = (
    f"priority text NOT NULL DEFAULT '{DEFAULT_PRIORITY}'",
    "tags text[] NOT NULL DEFAULT '{}'",
    "due_date timestamptz",
)
_COLUMNS = (
    " user_id text NOT NULL, task_id uuid NOT NULL,"
    " title text NOT NULL, description text, completed boolean NOT NULL,"
    " created_at timestamptz NOT NULL, updated_at timestamptz NOT NULL,"
    " version bigint NOT NULL, position bigint NOT NULL, doc text NOT NULL, "
    + ", ".join(_ADDED_COLUMNS)
)


def tables(t: Tables, *, load: bool = False) -> list[str]:
    """The table. `load`: the replay's fresh table for its bulk load, without the
    primary key (the load never reads it back) and with room for the in-page updates
    of the catch-ups that follow; `keys` puts both back."""
    if load:
        return [f"CREATE TABLE {t.tasks} ({_COLUMNS}) WITH (fillfactor = 70)"]
    return [
        f"CREATE TABLE IF NOT EXISTS {t.tasks} ({_COLUMNS}, PRIMARY KEY (user_id, task_id))",
        # Tables made before `doc`: add it, fill it from the columns, then require it.
        # Once it is NOT NULL this does nothing (no scan, no lock).
        f"ALTER TABLE {t.tasks} ADD COLUMN IF NOT EXISTS doc text",
        # Tables made before priority, tags and due_date: add them (every row gets the
        # defaults) and render each row's document again, with them. Once they are
        # there this does nothing.
        "DO $$ BEGIN IF NOT EXISTS (SELECT 1 FROM pg_attribute"
        f" WHERE attrelid = '{t.tasks}'::regclass AND attname = 'due_date' AND NOT attisdropped)"
        f" THEN ALTER TABLE {t.tasks} "
        + ", ".join(f"ADD COLUMN IF NOT EXISTS {c}" for c in _ADDED_COLUMNS)
        + f"; UPDATE {t.tasks} SET doc = {DOC_SQL}; END IF; END $$",
        "DO $$ BEGIN IF EXISTS (SELECT 1 FROM pg_attribute"
        f" WHERE attrelid = '{t.tasks}'::regclass AND attname = 'doc' AND NOT attnotnull)"
        f" THEN UPDATE {t.tasks} SET doc = {DOC_SQL} WHERE doc IS NULL;"
        f" ALTER TABLE {t.tasks} ALTER COLUMN doc SET NOT NULL; END IF; END $$",
    ]


def keys(t: Tables) -> list[str]:
    """What `tables(load=True)` leaves out (the key named as CREATE TABLE names it)."""
    return [
        f"ALTER TABLE {t.tasks} ADD CONSTRAINT {t.tasks}_pkey PRIMARY KEY (user_id, task_id)",
        f"ALTER TABLE {t.tasks} RESET (fillfactor)",
    ]


def indexes(t: Tables) -> list[str]:
    return [
        f"CREATE INDEX IF NOT EXISTS {t.tasks}_user_created_idx"
        f" ON {t.tasks} (user_id, created_at DESC)",
        f"CREATE INDEX IF NOT EXISTS {t.tasks}_user_updated_idx"
        f" ON {t.tasks} (user_id, updated_at DESC)",
        f"CREATE INDEX IF NOT EXISTS {t.tasks}_user_title_idx ON {t.tasks} (user_id, lower(title))",
        f"CREATE INDEX IF NOT EXISTS {t.tasks}_task_idx ON {t.tasks} (task_id)",
        # due_before / due_after and the due_date sorts. The priority= and tag= filters
        # and the priority sorts read the user's rows by the primary key: three values,
        # or a GIN index over every user's tags, would narrow a user's list little and
        # cost the projector an index entry per row change.
        f"CREATE INDEX IF NOT EXISTS {t.tasks}_user_due_idx ON {t.tasks} (user_id, due_date)",
    ]


SELECT_STATES = (
    "SELECT user_id, task_id, title, description, completed, created_at, updated_at,"
    " version, position, priority, tags, due_date FROM {tasks} WHERE task_id = ANY($1::uuid[])"
)

# Each row's tags go in as a JSON array (unnest cannot take an array of arrays of
# different lengths), read back as a text[] in their order.
UPSERT_ROWS = (
    "INSERT INTO {tasks} AS t (user_id, task_id, title, description, completed,"
    " created_at, updated_at, version, position, doc, priority, tags, due_date)"
    " SELECT u, i, ti, de, c, ca, ua, v, p, doc, pr,"
    " CASE tg WHEN '[]' THEN '{{}}'::text[] ELSE ARRAY(SELECT a.tag FROM"
    " jsonb_array_elements_text(tg::jsonb) WITH ORDINALITY a(tag, n) ORDER BY a.n) END, dd"
    " FROM unnest($1::text[], $2::uuid[], $3::text[], $4::text[], $5::boolean[],"
    " $6::timestamptz[], $7::timestamptz[], $8::bigint[], $9::bigint[], $10::text[],"
    " $11::text[], $12::text[], $13::timestamptz[])"
    " AS x(u, i, ti, de, c, ca, ua, v, p, doc, pr, tg, dd)"
    " ON CONFLICT (user_id, task_id) DO UPDATE SET"
    " title = EXCLUDED.title, description = EXCLUDED.description,"
    " completed = EXCLUDED.completed, updated_at = EXCLUDED.updated_at,"
    " version = EXCLUDED.version, position = EXCLUDED.position, doc = EXCLUDED.doc,"
    " priority = EXCLUDED.priority, tags = EXCLUDED.tags, due_date = EXCLUDED.due_date"
    " WHERE t.version < EXCLUDED.version"
)

DELETE_ROWS = (
    "DELETE FROM {tasks} t USING unnest($1::text[], $2::uuid[]) AS d(user_id, task_id)"
    " WHERE t.user_id = d.user_id AND t.task_id = d.task_id"
)


# -- the fold: one handler per event type -------------------------------------------


def _created(e: TaskEvent, _: TaskState | None) -> TaskState:
    d = e.data
    # A TaskCreated stored before priority, tags and due_date has none of them.
    # user_id, task_id, title, description, completed, created_at, updated_at, version,
    # position, priority, tags, due_date
    return TaskState(d["owner"], e.task_id, d["title"], d["description"], False,
                     e.timestamp, e.timestamp, e.version, e.position,
                     d.get("priority", DEFAULT_PRIORITY), tuple(d.get("tags", ())),
                     d.get("due_date"))


def _title_changed(e: TaskEvent, s: TaskState) -> TaskState:
    return TaskState(s.user_id, s.task_id, e.data["title"], s.description, s.completed,
                     s.created_at, e.timestamp, e.version, e.position,
                     s.priority, s.tags, s.due_date)


def _description_changed(e: TaskEvent, s: TaskState) -> TaskState:
    return TaskState(s.user_id, s.task_id, s.title, e.data["description"], s.completed,
                     s.created_at, e.timestamp, e.version, e.position,
                     s.priority, s.tags, s.due_date)


def _priority_changed(e: TaskEvent, s: TaskState) -> TaskState:
    return TaskState(s.user_id, s.task_id, s.title, s.description, s.completed,
                     s.created_at, e.timestamp, e.version, e.position,
                     e.data["priority"], s.tags, s.due_date)


def _tags_changed(e: TaskEvent, s: TaskState) -> TaskState:
    return TaskState(s.user_id, s.task_id, s.title, s.description, s.completed,
                     s.created_at, e.timestamp, e.version, e.position,
                     s.priority, tuple(e.data["tags"]), s.due_date)


def _due_date_changed(e: TaskEvent, s: TaskState) -> TaskState:
    return TaskState(s.user_id, s.task_id, s.title, s.description, s.completed,
                     s.created_at, e.timestamp, e.version, e.position,
                     s.priority, s.tags, e.data["due_date"])


def _completed(e: TaskEvent, s: TaskState) -> TaskState:
    return TaskState(s.user_id, s.task_id, s.title, s.description, True,
                     s.created_at, e.timestamp, e.version, e.position,
                     s.priority, s.tags, s.due_date)


def _reopened(e: TaskEvent, s: TaskState) -> TaskState:
    return TaskState(s.user_id, s.task_id, s.title, s.description, False,
                     s.created_at, e.timestamp, e.version, e.position,
                     s.priority, s.tags, s.due_date)


def _deleted(_: TaskEvent, __: TaskState) -> None:
    return None


EVOLVE: dict[str, Callable[[TaskEvent, TaskState], TaskState | None]] = {
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


def evolve(event: TaskEvent, before: TaskState | None) -> TaskState | None:
    """The task after `event`; None once it is deleted."""
    return EVOLVE[event.topic](event, before)  # type: ignore[arg-type]


async def load_states(
    conn: asyncpg.Connection, t: Tables, task_ids: list[UUID]
) -> dict[UUID, TaskState]:
    rows = await conn.fetch(SELECT_STATES.format(tasks=t.tasks), task_ids)
    return {row["task_id"]: _state(*row) for row in rows}


def _state(*row: object) -> TaskState:
    state = TaskState(*row)  # type: ignore[arg-type]
    return state._replace(tags=tuple(state.tags))  # text[] reads as a list


def _tags_json(tags: Sequence[str]) -> str:
    return orjson.dumps(list(tags)).decode()


COLUMNS = (*TaskState._fields, "doc")


async def copy_states(
    conn: asyncpg.Connection, t: Tables, states: Iterable[TaskState]
) -> None:
    """COPY the rows of tasks the table holds none of (the replay's bulk sink)."""
    await conn.copy_records_to_table(
        t.tasks, records=((*s, document(s)) for s in states), columns=COLUMNS
    )


class Rows:
    """The final row of every task a batch touched, written with two statements."""

    def __init__(self) -> None:
        self.rows: dict[UUID, TaskState | None] = {}
        self.owners: dict[UUID, str] = {}

    def apply(self, event: TaskEvent, before: TaskState | None, after: TaskState | None) -> None:
        owner = (after or before).user_id  # type: ignore[union-attr]
        self.owners[event.task_id] = owner
        self.rows[event.task_id] = after

    async def write(self, conn: asyncpg.Connection, t: Tables) -> None:
        live = [s for s in self.rows.values() if s is not None]
        gone = [(self.owners[i], i) for i, s in self.rows.items() if s is None]
        if live:
            await conn.execute(
                UPSERT_ROWS.format(tasks=t.tasks),
                [s.user_id for s in live],
                [s.task_id for s in live],
                [s.title for s in live],
                [s.description for s in live],
                [s.completed for s in live],
                [s.created_at for s in live],
                [s.updated_at for s in live],
                [s.version for s in live],
                [s.position for s in live],
                [document(s) for s in live],
                [s.priority for s in live],
                [_tags_json(s.tags) for s in live],
                [s.due_date for s in live],
            )
        if gone:
            await conn.execute(
                DELETE_ROWS.format(tasks=t.tasks), [u for u, _ in gone], [i for _, i in gone]
            )
