"""The live projector loop (`projections.projector.run`) in this process, against a real
PostgreSQL: woken by NOTIFY, polling when a notification is lost, reconnecting when
its connections are cut, and one active projector at a time."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator, Iterator

import psycopg
import pytest

from projections import projector
from shared.events import Task
from shared.position import ZERO
from tests.support import new_user
from tests.support.projection import (
    Writer,
    checkpoint,
    eventually,
    insert_raw_event,
    max_position,
)


@pytest.fixture
def writer(own_db: str) -> Iterator[Writer]:
    w = Writer(own_db)
    yield w
    w.close()


class Running:
    def __init__(self, url: str, **options: float) -> None:
        self.stop = asyncio.Event()
        self.task = asyncio.create_task(projector.run(url, stop=self.stop, **options))

    async def close(self) -> None:
        self.stop.set()
        await asyncio.wait_for(self.task, 10)


@pytest.fixture
async def started(own_db: str) -> AsyncIterator[list[Running]]:
    running: list[Running] = []
    yield running
    for r in running:
        await r.close()


def caught_up(url: str) -> bool:
    return checkpoint(url) == max_position(url)


def terminate(url: str, application_name: str) -> int:
    with psycopg.connect(url, autocommit=True) as conn:
        return len(
            conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE datname = current_database() AND application_name = %s",
                (application_name,),
            ).fetchall()
        )


async def test_a_new_event_is_applied_when_the_store_notifies(
    own_db: str, writer: Writer, started: list[Running]
) -> None:
    started.append(Running(own_db, poll_interval=60))  # only NOTIFY can wake it in time
    await eventually(lambda: checkpoint(own_db) is not None)

    user = new_user()
    task = writer.create(user, "Notified")

    await eventually(lambda: caught_up(own_db), timeout=5)
    with psycopg.connect(own_db) as conn:
        assert conn.execute(
            "SELECT title FROM read_tasks WHERE user_id = %s AND task_id = %s", (user, task)
        ).fetchall() == [("Notified",)]


async def test_a_lost_notification_is_picked_up_by_polling(
    own_db: str, writer: Writer, started: list[Running]
) -> None:
    started.append(Running(own_db, poll_interval=0.2))
    user = new_user()
    writer.create(user, "Seen")
    await eventually(lambda: caught_up(own_db))

    task = Task.create(owner=user, title="Silent", description=None, actor=user, request_id="r")
    stored = writer.store.mapper.to_stored_event(task.collect_events()[0])
    insert_raw_event(own_db, stored.originator_id, 1, stored.topic, stored.state)  # no NOTIFY

    await eventually(lambda: caught_up(own_db), timeout=5)
    with psycopg.connect(own_db) as conn:
        assert conn.execute(
            "SELECT title FROM read_tasks WHERE task_id = %s", (stored.originator_id,)
        ).fetchall() == [("Silent",)]


@pytest.mark.parametrize(
    "cut",
    [(projector.APPLICATION_NAME,), (projector.APPLICATION_NAME, projector.LOCK_APPLICATION_NAME)],
    ids=["listen", "listen-and-lock"],
)
async def test_a_dropped_listen_connection_does_not_stall_it(
    own_db: str, writer: Writer, started: list[Running], cut: tuple[str, ...]
) -> None:
    started.append(Running(own_db, poll_interval=60, max_backoff=0.5))
    user = new_user()
    writer.create(user, "Before the drop")
    await eventually(lambda: caught_up(own_db))

    for application_name in cut:
        assert terminate(own_db, application_name) == 1
    await asyncio.sleep(0.2)
    writer.create(user, "After the drop")

    await eventually(lambda: caught_up(own_db), timeout=10)
    assert not started[0].task.done()
    with psycopg.connect(own_db) as conn:
        assert conn.execute(
            "SELECT total FROM read_user_stats WHERE user_id = %s", (user,)
        ).fetchone() == (2,)


async def test_only_one_of_two_projectors_is_active_and_the_other_takes_over(
    own_db: str, writer: Writer, started: list[Running]
) -> None:
    first = Running(own_db, poll_interval=0.2)
    started.append(first)
    user = new_user()
    writer.create(user, "One")
    await eventually(lambda: caught_up(own_db))
    second = Running(own_db, poll_interval=0.2)
    started.append(second)
    await asyncio.sleep(0.3)

    with psycopg.connect(own_db) as conn:
        holders = conn.execute(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted"
            " AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"
        ).fetchone()
        waiters = conn.execute(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"
            " AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"
        ).fetchone()
    assert (holders, waiters) == ((1,), (1,))

    await first.close()
    started.remove(first)
    for n in range(5):
        writer.create(user, f"Later {n}")
    await eventually(lambda: caught_up(own_db))
    with psycopg.connect(own_db) as conn:
        assert conn.execute(
            "SELECT total, pending FROM read_user_stats WHERE user_id = %s", (user,)
        ).fetchone() == (6, 6)
        assert conn.execute("SELECT count(*) FROM read_task_history").fetchone() == (6,)


async def test_run_raises_naming_the_event_it_cannot_apply(
    own_db: str, started: list[Running]
) -> None:
    task_id = uuid.uuid4()
    state = json.dumps({"timestamp": {"_type_": "datetime_iso", "_data_": "2025-01-01T00:00:00"},
                        "actor": "a", "request_id": "r"}).encode()
    bad = insert_raw_event(own_db, task_id, 3, Task.Completed.TOPIC, state)

    with pytest.raises(projector.HandlerFailed, match=f"position={bad.notification_id} task_id={task_id}"):
        await asyncio.wait_for(projector.run(own_db, poll_interval=0.2), 10)
    assert checkpoint(own_db) == ZERO
