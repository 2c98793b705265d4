"""Read model: the task list, the current state of each user's live tasks.

A deleted task leaves the table. Rows carry the task's aggregate `version` and the
event-store `position` of the last event applied; a row is only ever overwritten by a
higher version, so applying an event twice changes nothing.

`evolve` (one handler per event type) is the task's state fold; the projector also
hands its result to the other read models as the task's state before and after each
event.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from datetime import datetime
from typing import NamedTuple
from uuid import UUID

import asyncpg

from projections.tables import Tables
from shared.eventcodec import (
    COMPLETED,
    CREATED,
    DELETED,
    DESCRIPTION_CHANGED,
    REOPENED,
    TITLE_CHANGED,
    TaskEvent,
)


class TaskState(NamedTuple):
    """A task's row (the columns in `COLUMNS` order). A named tuple: immutable, and the
    cheapest record to build, which every event does once."""

    user_id: str
    task_id: UUID
    title: str
    description: str | None
    completed: bool
    created_at: datetime
    updated_at: datetime
    version: int
    position: int


def ddl(t: Tables) -> list[str]:
    return [
        f"CREATE TABLE IF NOT EXISTS {t.tasks} ("
        " user_id text NOT NULL, task_id uuid NOT NULL,"
        " title text NOT NULL, description text, completed boolean NOT NULL,"
        " created_at timestamptz NOT NULL, updated_at timestamptz NOT NULL,"
        " version bigint NOT NULL, position bigint NOT NULL,"
        " PRIMARY KEY (user_id, task_id))",
        f"CREATE INDEX IF NOT EXISTS {t.tasks}_user_created_idx"
        f" ON {t.tasks} (user_id, created_at DESC)",
        f"CREATE INDEX IF NOT EXISTS {t.tasks}_user_updated_idx"
        f" ON {t.tasks} (user_id, updated_at DESC)",
        f"CREATE INDEX IF NOT EXISTS {t.tasks}_user_title_idx ON {t.tasks} (user_id, lower(title))",
        f"CREATE INDEX IF NOT EXISTS {t.tasks}_task_idx ON {t.tasks} (task_id)",
    ]


SELECT_STATES = (
    "SELECT user_id, task_id, title, description, completed, created_at, updated_at,"
    " version, position FROM {tasks} WHERE task_id = ANY($1::uuid[])"
)

UPSERT_ROWS = (
    "INSERT INTO {tasks} AS t (user_id, task_id, title, description, completed,"
    " created_at, updated_at, version, position)"
    " SELECT * FROM unnest($1::text[], $2::uuid[], $3::text[], $4::text[], $5::boolean[],"
    " $6::timestamptz[], $7::timestamptz[], $8::bigint[], $9::bigint[])"
    " ON CONFLICT (user_id, task_id) DO UPDATE SET"
    " title = EXCLUDED.title, description = EXCLUDED.description,"
    " completed = EXCLUDED.completed, updated_at = EXCLUDED.updated_at,"
    " version = EXCLUDED.version, position = EXCLUDED.position"
    " WHERE t.version < EXCLUDED.version"
)

DELETE_ROWS = (
    "DELETE FROM {tasks} t USING unnest($1::text[], $2::uuid[]) AS d(user_id, task_id)"
    " WHERE t.user_id = d.user_id AND t.task_id = d.task_id"
)


# -- the fold: one handler per event type -------------------------------------------


def _created(e: TaskEvent, _: TaskState | None) -> TaskState:
    d = e.data
    # user_id, task_id, title, description, completed, created_at, updated_at, version, position
    return TaskState(d["owner"], e.task_id, d["title"], d["description"], False,
                     e.timestamp, e.timestamp, e.version, e.position)


def _title_changed(e: TaskEvent, s: TaskState) -> TaskState:
    return TaskState(s.user_id, s.task_id, e.data["title"], s.description, s.completed,
                     s.created_at, e.timestamp, e.version, e.position)


def _description_changed(e: TaskEvent, s: TaskState) -> TaskState:
    return TaskState(s.user_id, s.task_id, s.title, e.data["description"], s.completed,
                     s.created_at, e.timestamp, e.version, e.position)


def _completed(e: TaskEvent, s: TaskState) -> TaskState:
    return TaskState(s.user_id, s.task_id, s.title, s.description, True,
                     s.created_at, e.timestamp, e.version, e.position)


def _reopened(e: TaskEvent, s: TaskState) -> TaskState:
    return TaskState(s.user_id, s.task_id, s.title, s.description, False,
                     s.created_at, e.timestamp, e.version, e.position)


def _deleted(_: TaskEvent, __: TaskState) -> None:
    return None


EVOLVE: dict[str, Callable[[TaskEvent, TaskState], TaskState | None]] = {
    CREATED: _created,
    TITLE_CHANGED: _title_changed,
    DESCRIPTION_CHANGED: _description_changed,
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
    return {row["task_id"]: TaskState(*row) for row in rows}


COLUMNS = TaskState._fields


async def copy_states(
    conn: asyncpg.Connection, t: Tables, states: Iterable[TaskState]
) -> None:
    """Replay only, into a table holding none of these tasks: COPY their rows."""
    await conn.copy_records_to_table(t.tasks, records=states, columns=COLUMNS)


class Batch:
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
            )
        if gone:
            await conn.execute(
                DELETE_ROWS.format(tasks=t.tasks), [u for u, _ in gone], [i for _, i in gone]
            )
