"""Read model: per-user counts of live tasks (total, completed, pending).

Each handler turns an event into a change of the owner's counts, from the task's
state before it; a batch adds up the changes per user and applies them with one
statement. The projector feeds each event once (it skips events the task list has
already applied), which keeps these sums exact. The read-model shape: see
`projections.manifest`.
"""

from __future__ import annotations

from collections.abc import Callable

import asyncpg

from projections.task_list import TaskState
from shared.catalog import Tables
from shared.events import COMPLETED, CREATED, DELETED, REOPENED, TaskEvent

Delta = tuple[int, int, int]  # total, completed, pending


TABLE = "stats"  # the `Tables` field that names this model's table
QUERIES = "query_api.queries: user_stats"


def tables(t: Tables, *, load: bool = False) -> list[str]:
    """The table; the same for the bulk load, whose batches add to it by ON CONFLICT."""
    return [
        f"CREATE TABLE IF NOT EXISTS {t.stats} ("
        " user_id text PRIMARY KEY, total bigint NOT NULL, completed bigint NOT NULL,"
        " pending bigint NOT NULL)",
    ]


def keys(t: Tables) -> list[str]:
    return []


def indexes(t: Tables) -> list[str]:
    return []


ADD_COUNTS = (
    "INSERT INTO {stats} AS s (user_id, total, completed, pending)"
    " SELECT * FROM unnest($1::text[], $2::bigint[], $3::bigint[], $4::bigint[])"
    " ON CONFLICT (user_id) DO UPDATE SET total = s.total + EXCLUDED.total,"
    " completed = s.completed + EXCLUDED.completed, pending = s.pending + EXCLUDED.pending"
)


def _created(_: TaskState | None) -> Delta:
    return (1, 0, 1)


def _completed(before: TaskState) -> Delta:
    return (0, 0, 0) if before.completed else (0, 1, -1)


def _reopened(before: TaskState) -> Delta:
    return (0, -1, 1) if before.completed else (0, 0, 0)


def _deleted(before: TaskState) -> Delta:
    return (-1, -1, 0) if before.completed else (-1, 0, -1)


# Changes of title, description, priority, tags or due date leave the counts as they are.
DELTAS: dict[str, Callable[[TaskState], Delta]] = {
    CREATED: _created,
    COMPLETED: _completed,
    REOPENED: _reopened,
    DELETED: _deleted,
}


class Rows:
    """A batch's count changes, summed per user."""

    def __init__(self) -> None:
        self.sums: dict[str, list[int]] = {}

    def apply(self, event: TaskEvent, before: TaskState | None, after: TaskState | None) -> None:
        handler = DELTAS.get(event.topic)
        if handler is None:
            return
        owner = (after or before).user_id  # type: ignore[union-attr]
        total, completed, pending = handler(before)  # type: ignore[arg-type]
        sums = self.sums.setdefault(owner, [0, 0, 0])
        sums[0] += total
        sums[1] += completed
        sums[2] += pending

    async def write(self, conn: asyncpg.Connection, t: Tables) -> None:
        if self.sums:
            # In the users' order: two loads of a replay may add to the same users at once,
            # and rows locked in one order never deadlock.
            users = sorted(self.sums)
            await conn.execute(
                ADD_COUNTS.format(stats=t.stats),
                users,
                [self.sums[u][0] for u in users],
                [self.sums[u][1] for u in users],
                [self.sums[u][2] for u in users],
            )

    copy = write  # the bulk load adds the same way
