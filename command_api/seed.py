"""`taskctl seed`: the demo users and tasks, written as commands."""

from __future__ import annotations

import uuid
from uuid import UUID

from command_api.commands import Change, Create, Delete, Stamp
from command_api.executor import Executor
from command_api.store import PostgresEventStore
from shared.catalog import EVENTS_TABLE
from shared.events import CREATED, DELETED, state_sql
from shared.settings import Settings

DEMO_USERS = ("11111111-1111-1111-1111-111111111111", "22222222-2222-2222-2222-222222222222")
DEMO_TASKS = (
    (DEMO_USERS[0], "User A Task 1", False),
    (DEMO_USERS[0], "User A Task 2", True),
    (DEMO_USERS[0], "User A Task 3", False),
    (DEMO_USERS[1], "User B Task 1", False),
    (DEMO_USERS[1], "User B Task 2", True),
)

_OWNER = f"{state_sql('c')} ->> 'owner'"
_LIVE_TASKS = (
    f"SELECT c.originator_id, {_OWNER} FROM {EVENTS_TABLE} c"
    f" WHERE c.topic = '{CREATED}' AND {_OWNER} = ANY($1::text[])"
    f" AND NOT EXISTS (SELECT 1 FROM {EVENTS_TABLE} d WHERE d.originator_id = c.originator_id"
    f" AND d.topic = '{DELETED}')"
)


async def seed(settings: Settings, *, reset: bool = False) -> int:
    """Write the demo tasks unless the demo users have live tasks (`reset`: delete
    those first); how many were written."""
    store = await PostgresEventStore.open(settings)
    try:
        executor = Executor(store)
        live = await store.pool.fetch(_LIVE_TASKS, list(DEMO_USERS))
        if live and not reset:
            return 0
        request_id = f"seed-{uuid.uuid4().hex[:12]}"
        for task_id, owner in live:
            await executor.run(Delete(task_id), Stamp(owner, request_id))
        for owner, title, completed in DEMO_TASKS:
            stamp = Stamp(owner, request_id)
            created = await executor.run(Create(title), stamp)
            if completed and created.task is not None:
                task_id: UUID = created.task.id
                await executor.run(Change(task_id, completed=True), stamp)
        return len(DEMO_TASKS)
    finally:
        await store.close()
