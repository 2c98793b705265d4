"""`taskctl seed`: the plan's demo users and tasks, written as commands."""

from __future__ import annotations

import uuid

from command_api.blocking import LoopThread
from command_api.commands import ChangeTask, CreateTask
from command_api.handlers import Actor
from shared.catalog import EVENTS_TABLE
from shared.settings import Settings

DEMO_USERS = ("11111111-1111-1111-1111-111111111111", "22222222-2222-2222-2222-222222222222")
DEMO_TASKS = (
    (DEMO_USERS[0], "User A Task 1", False),
    (DEMO_USERS[0], "User A Task 2", True),
    (DEMO_USERS[0], "User A Task 3", False),
    (DEMO_USERS[1], "User B Task 1", False),
    (DEMO_USERS[1], "User B Task 2", True),
)

_LIVE_TASKS = (
    f"SELECT c.originator_id, convert_from(c.state, 'UTF8')::jsonb ->> 'owner'"
    f" FROM {EVENTS_TABLE} c"
    " WHERE c.topic = 'TaskCreated'"
    " AND convert_from(c.state, 'UTF8')::jsonb ->> 'owner' = ANY($1::text[])"
    f" AND NOT EXISTS (SELECT 1 FROM {EVENTS_TABLE} d WHERE d.originator_id = c.originator_id"
    " AND d.topic = 'TaskDeleted')"
)


def seed(settings: Settings, *, reset: bool = False) -> int:
    with LoopThread(settings) as loop:
        commands = loop.handlers()
        live = loop.run(loop.store.pool.fetch(_LIVE_TASKS, list(DEMO_USERS)))
        if live and not reset:
            return 0
        request_id = f"seed-{uuid.uuid4().hex[:12]}"
        for task_id, owner in live:
            commands.delete(Actor(owner, request_id), task_id, None)
        for owner, title, completed in DEMO_TASKS:
            actor = Actor(owner, request_id)
            created = commands.create(actor, CreateTask(title=title))
            if completed and created.task:
                commands.change(
                    actor, uuid.UUID(created.task["id"]), ChangeTask(completed=True), None
                )
        return len(DEMO_TASKS)
