"""An independent fold of the event store, to check read tables against.

Deliberately not the projector's code: it parses the stored JSON itself and derives
each read model's rows from the README's rules, so a bug in a handler shows up as a
difference instead of being repeated. Rows are compared per user as counts plus an
order-independent checksum (the sum of a 64-bit hash of each row's canonical text),
so neither side has to hold a table in memory or sort it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from uuid import UUID

import asyncpg

from projections.checkpoints import EVENTS_UP_TO, args
from projections.tables import Tables
from shared.position import ZERO, Position

MASK = (1 << 64) - 1
PAGE = 10_000


def row_hash(*parts: Any) -> int:
    text = "\x1f".join(_canonical(p) for p in parts)
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little")


def _canonical(value: Any) -> str:
    if value is None:
        return "\x00"
    if isinstance(value, datetime):
        return value.astimezone(UTC).isoformat()
    if isinstance(value, dict):
        return json.dumps(value, sort_keys=True, ensure_ascii=False)
    return str(value)


@dataclass
class Summary:
    """One user's rows in the read tables, reduced to what is compared."""

    tasks: int = 0
    tasks_sum: int = 0
    history: int = 0
    history_sum: int = 0
    stats: tuple[int, int, int] = (0, 0, 0)

    def differences(self, other: Summary) -> list[str]:
        out = []
        if (self.tasks, self.tasks_sum) != (other.tasks, other.tasks_sum):
            out.append(f"tasks rows {self.tasks} vs {other.tasks} (or their contents)")
        if (self.history, self.history_sum) != (other.history, other.history_sum):
            out.append(f"history rows {self.history} vs {other.history} (or their contents)")
        if self.stats != other.stats:
            out.append(f"stats {self.stats} vs {other.stats}")
        return out


@dataclass(slots=True)
class _Task:
    owner: str
    title: str
    description: str | None
    completed: bool
    created_at: datetime
    updated_at: datetime
    version: int
    position: int
    deleted: bool = False


def _time(value: dict[str, str]) -> datetime:
    return datetime.fromisoformat(value["_data_"])


@dataclass
class Fold:
    """The read models' expected state, folded from events in `(position, upto]` pages."""

    position: Position = ZERO
    tasks: dict[UUID, _Task] = field(default_factory=dict)
    history: dict[str, list[int]] = field(default_factory=dict)  # user: [rows, checksum]
    task_history: dict[UUID, list[int]] = field(default_factory=dict)
    owned: dict[str, set[UUID]] = field(default_factory=dict)
    touched: set[str] = field(default_factory=set)
    problems: list[str] = field(default_factory=list)

    async def advance(self, conn: asyncpg.Connection, upto: Position) -> int:
        """Fold every event after the last position up to `upto`; how many."""
        count = 0
        async with conn.transaction(readonly=True):
            cursor = conn.cursor(
                EVENTS_UP_TO, *args(self.position), *args(upto), prefetch=PAGE
            )
            async for row in cursor:
                self.fold(*row)
                count += 1
        self.position = upto
        return count

    def fold(self, position: int, task_id: UUID, version: int, topic: str, state: bytes) -> None:
        data = json.loads(state)
        at = _time(data["timestamp"])
        task = self.tasks.get(task_id)
        changes: dict[str, Any]
        if topic == "TaskCreated":
            task = _Task(data["owner"], data["title"], data["description"], False, at, at,
                         version, position)
            self.tasks[task_id] = task
            self.owned.setdefault(task.owner, set()).add(task_id)
            changes = {
                "title": {"from": None, "to": task.title},
                "description": {"from": None, "to": task.description},
                "completed": {"from": None, "to": False},
            }
        elif task is None or task.deleted:
            self.problems.append(f"event {position} of task {task_id}: no live task")
            return
        else:
            if topic == "TaskTitleChanged":
                changes = {"title": {"from": task.title, "to": data["title"]}}
                task.title = data["title"]
            elif topic == "TaskDescriptionChanged":
                changes = {"description": {"from": task.description, "to": data["description"]}}
                task.description = data["description"]
            elif topic == "TaskCompleted":
                changes = {"completed": {"from": task.completed, "to": True}}
                task.completed = True
            elif topic == "TaskReopened":
                changes = {"completed": {"from": task.completed, "to": False}}
                task.completed = False
            elif topic == "TaskDeleted":
                changes = {}
                task.deleted = True
            else:
                self.problems.append(f"event {position}: unknown topic {topic}")
                return
            task.updated_at, task.version, task.position = at, version, position
        h = row_hash(task.owner, position, task_id, version, topic, data["actor"],
                     data["request_id"], at, changes)
        for sums in (self.history.setdefault(task.owner, [0, 0]),
                     self.task_history.setdefault(task_id, [0, 0])):
            sums[0] += 1
            sums[1] = (sums[1] + h) & MASK
        self.touched.add(task.owner)

    def expected(self, users: Iterable[str] | None = None) -> dict[str, Summary]:
        out: dict[str, Summary] = {}
        for user in self.history if users is None else users:
            s = Summary()
            completed = 0
            for task_id in self.owned.get(user, ()):
                task = self.tasks[task_id]
                if task.deleted:
                    continue
                s.tasks += 1
                completed += task.completed
                s.tasks_sum = (s.tasks_sum + task_row_hash(
                    user, task_id, task.title, task.description, task.completed,
                    task.created_at, task.updated_at, task.version, task.position)) & MASK
            s.history, s.history_sum = self.history.get(user, [0, 0])
            s.stats = (s.tasks, completed, s.tasks - completed)
            out[user] = s
        return out


def task_row_hash(*row: Any) -> int:
    return row_hash(*row)


async def summarise(
    conn: asyncpg.Connection, t: Tables, users: list[str] | None = None
) -> dict[str, Summary]:
    """Per-user summaries of the read tables `t` (every user, or only `users`)."""
    where, args = ("", []) if users is None else (" WHERE user_id = ANY($1::text[])", [users])
    out: dict[str, Summary] = {}
    async with conn.transaction(readonly=True):
        async for r in conn.cursor(
            "SELECT user_id, task_id, title, description, completed, created_at, updated_at,"
            f" version, position FROM {t.tasks}{where}", *args, prefetch=PAGE
        ):
            s = out.setdefault(r[0], Summary())
            s.tasks += 1
            s.tasks_sum = (s.tasks_sum + task_row_hash(*r)) & MASK
        async for r in conn.cursor(
            "SELECT user_id, position, task_id, version, event_type, actor, request_id,"
            f" occurred_at, changes FROM {t.history}{where}", *args, prefetch=PAGE
        ):
            s = out.setdefault(r[0], Summary())
            s.history += 1
            s.history_sum = (s.history_sum + row_hash(*r[:8], json.loads(r[8]))) & MASK
        for r in await conn.fetch(
            f"SELECT user_id, total, completed, pending FROM {t.stats}{where}", *args
        ):
            out.setdefault(r[0], Summary()).stats = (r[1], r[2], r[3])
    return out


def compare(expected: dict[str, Summary], actual: dict[str, Summary]) -> dict[str, list[str]]:
    """{user: what differs}, for every user whose rows differ from the fold's."""
    differing: dict[str, list[str]] = {}
    for user in sorted(set(expected) | set(actual)):
        diff = expected.get(user, Summary()).differences(actual.get(user, Summary()))
        if diff:
            differing[user] = [f"expected vs rebuilt: {d}" for d in diff]
    return differing
