"""Helpers for the projector tests: dedicated databases, bulk events, table snapshots,
`catch_up` (the runner until caught up, on a connection of its own) and the replay's
`before_verify` seam."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import Any
from uuid import UUID

import asyncpg
import psycopg
import pytest

from command_api.commands import Change, Create, Delete, Stamp
from projections import replay as replay_module
from projections.manifest import READ_MODELS
from projections.projector import BATCH_SIZE, apply_until_caught_up, ensure_checkpoint
from shared.catalog import EVENTS_TABLE, LIVE, Tables
from shared.events import Task
from shared.eventstore import TaskStore
from shared.position import ZERO, Position
from shared.settings import Settings
from taskctl.dbinit import init_database
from tests.support import TEST_SECRET, PostgresServer, library_store, new_user
from tests.support.commands import LoopThread

# A second set of read tables (every model of the manifest): rebuild_tasks, ...
REBUILD = replace(
    LIVE, checkpoints="rebuild_checkpoints",
    **{m.TABLE: f"rebuild_{getattr(LIVE, m.TABLE).removeprefix('read_')}" for m in READ_MODELS},
)


async def catch_up(dsn: str, *, tables: Tables = LIVE, batch_size: int = BATCH_SIZE) -> Position:
    """Apply every event committed so far into `tables`; the new checkpoint."""
    conn = await asyncpg.connect(dsn)
    try:
        await ensure_checkpoint(conn, tables)
        return await apply_until_caught_up(conn, tables, batch_size=batch_size)
    finally:
        await conn.close()


def before_verify(
    monkeypatch: pytest.MonkeyPatch, hook: Callable[[asyncpg.Connection, Tables], Awaitable[None]]
) -> None:
    """Have the next replay call `hook(conn, rebuilt tables)` right before its first
    check of the rebuilt tables (to corrupt them, or kill the fold, on purpose)."""
    check = replay_module.check_rebuild
    called = []

    async def hooked(conn: asyncpg.Connection, t: Tables, *args: Any, **kwargs: Any) -> Any:
        if not called:
            called.append(True)
            await hook(conn, t)
        return await check(conn, t, *args, **kwargs)

    monkeypatch.setattr(replay_module, "check_rebuild", hooked)


def settings_for(url: str) -> Settings:
    return Settings(environment="test", database_url=url, better_auth_secret=TEST_SECRET)


def fresh_database(server: PostgresServer) -> str:
    """A database of its own, initialised like production, for tests that stop the
    projector on purpose or compare whole tables."""
    url = server.create_database(prefix="taskservice_proj")
    init_database(settings_for(url))
    return url


class Writer:
    """Writes events the way the command API does (through its `Executor`); `store` is
    the library's own application on the same tables, for raw saves and reads."""

    def __init__(self, url: str) -> None:
        self.store: TaskStore = library_store(settings_for(url))
        self.loop = LoopThread(settings_for(url))
        self.commands = self.loop.executor()

    def close(self) -> None:
        self.loop.close()
        self.store.close()

    def create(self, user: str, title: str, description: str | None = None) -> UUID:
        outcome = self.commands.run(
            Create(title, description), Stamp(user, f"req-{uuid.uuid4().hex[:8]}")
        )
        assert outcome.task is not None
        return outcome.task.id

    def change(self, user: str, task_id: UUID, **fields: Any) -> Position | None:
        if "description" in fields:
            fields["set_description"] = True
        return self.commands.run(
            Change(task_id, **fields), Stamp(user, f"req-{uuid.uuid4().hex[:8]}")
        ).position

    def delete(self, user: str, task_id: UUID) -> Position | None:
        return self.commands.run(Delete(task_id), Stamp(user, "req-del")).position

    def bulk(self, users: int, tasks_per_user: int) -> int:
        """Many tasks with a mix of every event type, saved in one transaction; the count."""
        tasks = []
        for _ in range(users):
            user = new_user()
            for n in range(tasks_per_user):
                stamp = {"actor": user, "request_id": f"bulk-{n}"}
                task = Task.create(owner=user, title=f"task {n}", description=None, **stamp)
                task.change(title=f"task {n}, renamed", completed=n % 2 == 0, **stamp)
                task.change(description=f"about {n}", set_description=True, **stamp)
                if n % 4 == 0:
                    task.change(completed=False, **stamp)
                if n % 5 == 0:
                    task.delete(**stamp)
                tasks.append(task)
        recordings = self.store.save(*tasks)
        return len(recordings)


def insert_raw_event(
    url: str, task_id: UUID, version: int, topic: str, state: bytes
) -> Position:
    """An event row written without the recorder (so without NOTIFY); its position."""
    with psycopg.connect(url) as conn:
        row = conn.execute(
            f"INSERT INTO {EVENTS_TABLE} (originator_id, originator_version, topic, state)"
            " VALUES (%s, %s, %s, %s) RETURNING tx_id::text, notification_id",
            (task_id, version, topic, state),
        ).fetchone()
    assert row is not None
    return Position(int(row[0]), int(row[1]))


def snapshot(url: str, t: Tables = LIVE) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of every read table, by the model's `TABLE` ("tasks", ...), sorted."""
    with psycopg.connect(url) as conn:
        return {
            m.TABLE: conn.execute(
                f"SELECT * FROM {getattr(t, m.TABLE)} r ORDER BY r"
            ).fetchall()
            for m in READ_MODELS
        }


def checkpoint(url: str, t: Tables = LIVE) -> Position | None:
    with psycopg.connect(url) as conn:
        row = conn.execute(
            f"SELECT tx_id::text, position FROM {t.checkpoints} WHERE projection = 'task_views'"
        ).fetchone()
    return None if row is None else Position(int(row[0]), int(row[1]))


def max_position(url: str) -> Position:
    """The last event in the global order (ZERO for an empty store)."""
    with psycopg.connect(url) as conn:
        row = conn.execute(
            f"SELECT e.tx_id::text, e.notification_id FROM {EVENTS_TABLE} e"
            " ORDER BY e.tx_id DESC, e.notification_id DESC LIMIT 1"  # xid8 order, not text
        ).fetchone()
    return ZERO if row is None else Position(int(row[0]), int(row[1]))


async def eventually(check: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not true within {timeout}s: {check}")
        await asyncio.sleep(0.05)


def wait_until(check: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not true within {timeout}s: {check}")
        time.sleep(0.1)


def every_event_type(writer: Writer, *, users: int = 3, tasks_per_user: int = 12) -> list[str]:
    """`users` x `tasks_per_user` bulk tasks, then three more users with every event
    type, deletions included; those three users."""
    writer.bulk(users=users, tasks_per_user=tasks_per_user)
    made = [new_user() for _ in range(3)]
    for n, user in enumerate(made):
        a = writer.create(user, f"alpha {n}", "first")
        b = writer.create(user, f"beta {n}")
        writer.change(user, a, title=f"alpha {n}, renamed", description=None)
        writer.change(user, a, completed=True)
        writer.change(user, b, completed=True)
        writer.change(user, b, completed=False)
        writer.change(user, b, description="later")
        writer.delete(user, b)
    return made
