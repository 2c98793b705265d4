"""The projector against a real PostgreSQL: what each event does to the read tables,
idempotence, the checkpoint's transaction, and stopping on a bad event."""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from collections.abc import Iterator

import asyncpg
import psycopg
import pytest

from projections.projector import HandlerFailed
from shared.catalog import EVENTS_TABLE
from shared.events import Task
from shared.position import ZERO
from tests.support import new_user
from tests.support.projection import (
    REBUILD,
    Writer,
    catch_up,
    checkpoint,
    insert_raw_event,
    max_position,
    snapshot,
)


@pytest.fixture(scope="module")
def writer(database_url: str) -> Iterator[Writer]:
    w = Writer(database_url)
    yield w
    w.close()


def rows(url: str, sql: str, *args: object) -> list[tuple]:
    with psycopg.connect(url) as conn:
        return conn.execute(sql, args).fetchall()


# -- what each event does ------------------------------------------------------------


async def test_projects_every_event_type_into_list_history_and_counts(
    database_url: str, writer: Writer
) -> None:
    user = new_user()
    kept = writer.create(user, "Buy milk", "2 litres")
    gone = writer.create(user, "Walk dog")
    writer.change(user, kept, title="Buy oat milk")
    writer.change(user, kept, description=None)
    writer.change(user, kept, completed=True)
    writer.change(user, gone, completed=True)
    writer.change(user, gone, completed=False)
    last = writer.delete(user, gone)

    position = await catch_up(database_url)

    assert last is not None and position >= last
    tasks = rows(
        database_url,
        "SELECT task_id, title, description, completed, version, position, created_at < updated_at"
        " FROM read_tasks WHERE user_id = %s",
        user,
    )
    kept_position = rows(
        database_url,
        f"SELECT max(notification_id) FROM {EVENTS_TABLE} WHERE originator_id = %s",
        kept,
    )[0][0]
    assert tasks == [(kept, "Buy oat milk", None, True, 4, kept_position, True)]

    history = rows(
        database_url,
        "SELECT task_id, version, event_type, actor, changes FROM read_task_history"
        " WHERE user_id = %s ORDER BY position",
        user,
    )
    assert history == [
        (kept, 1, "TaskCreated", user, {
            "title": {"from": None, "to": "Buy milk"},
            "description": {"from": None, "to": "2 litres"},
            "completed": {"from": None, "to": False},
        }),
        (gone, 1, "TaskCreated", user, {
            "title": {"from": None, "to": "Walk dog"},
            "description": {"from": None, "to": None},
            "completed": {"from": None, "to": False},
        }),
        (kept, 2, "TaskTitleChanged", user, {"title": {"from": "Buy milk", "to": "Buy oat milk"}}),
        (kept, 3, "TaskDescriptionChanged", user,
         {"description": {"from": "2 litres", "to": None}}),
        (kept, 4, "TaskCompleted", user, {"completed": {"from": False, "to": True}}),
        (gone, 2, "TaskCompleted", user, {"completed": {"from": False, "to": True}}),
        (gone, 3, "TaskReopened", user, {"completed": {"from": True, "to": False}}),
        (gone, 4, "TaskDeleted", user, {}),
    ]
    assert rows(
        database_url,
        "SELECT total, completed, pending FROM read_user_stats WHERE user_id = %s",
        user,
    ) == [(1, 1, 0)]


async def test_history_positions_and_times_are_those_of_the_event_store(
    database_url: str, writer: Writer
) -> None:
    user = new_user()
    task = writer.create(user, "Stamp me")
    writer.change(user, task, completed=True)
    await catch_up(database_url)

    stored = rows(
        database_url,
        f"SELECT notification_id, originator_version, topic FROM {EVENTS_TABLE}"
        " WHERE originator_id = %s ORDER BY notification_id",
        task,
    )
    history = rows(
        database_url,
        "SELECT position, version, event_type FROM read_task_history"
        " WHERE user_id = %s AND task_id = %s ORDER BY position",
        user,
        task,
    )
    assert history == stored


async def test_an_event_the_counts_ignore_still_advances_the_checkpoint(
    database_url: str, writer: Writer
) -> None:
    user = new_user()
    task = writer.create(user, "Old name")
    await catch_up(database_url)
    before = rows(database_url, "SELECT * FROM read_user_stats WHERE user_id = %s", user)

    position = writer.change(user, task, title="New name")
    reached = await catch_up(database_url)

    assert position is not None and reached >= position
    assert checkpoint(database_url) == reached
    assert rows(database_url, "SELECT * FROM read_user_stats WHERE user_id = %s", user) == before


async def test_users_see_only_their_own_rows(database_url: str, writer: Writer) -> None:
    alice, bob = new_user(), new_user()
    writer.create(alice, "Alice's")
    writer.create(bob, "Bob's")
    await catch_up(database_url)

    assert rows(database_url, "SELECT title FROM read_tasks WHERE user_id = %s", alice) == [
        ("Alice's",)
    ]
    assert rows(database_url, "SELECT user_id FROM read_task_history WHERE user_id = %s", bob) == [
        (bob,)
    ]


# -- exactly once ----------------------------------------------------------------------


async def test_reapplying_events_from_an_earlier_checkpoint_changes_nothing(own_db: str) -> None:
    writer = Writer(own_db)
    try:
        writer.bulk(users=3, tasks_per_user=20)
    finally:
        writer.close()
    end = await catch_up(own_db, batch_size=37)
    applied = snapshot(own_db)

    order = rows(
        own_db, f"SELECT e.tx_id::text, e.notification_id FROM {EVENTS_TABLE} e"
        " ORDER BY e.tx_id, e.notification_id"
    )
    for restart_at in (("0", 0), order[len(order) // 3], order[-2]):
        with psycopg.connect(own_db) as conn:
            conn.execute(
                "UPDATE projection_checkpoints SET tx_id = %s::xid8, position = %s", restart_at
            )
        assert await catch_up(own_db, batch_size=29) == end
        assert snapshot(own_db) == applied


async def test_read_tables_equal_a_rebuild_into_fresh_tables(own_db: str) -> None:
    writer = Writer(own_db)
    try:
        count = writer.bulk(users=4, tasks_per_user=15)
    finally:
        writer.close()
    await catch_up(own_db, batch_size=50)
    await _create_rebuild_tables(own_db)

    await catch_up(own_db, tables=REBUILD, batch_size=500)

    live = snapshot(own_db)
    assert len(live["history"]) == count
    assert snapshot(own_db, REBUILD) == live


async def _create_rebuild_tables(url: str) -> None:
    from taskctl.dbinit import create_read_tables

    create_read_tables(url, REBUILD)


async def test_rows_and_checkpoint_commit_together(own_db: str) -> None:
    writer = Writer(own_db)
    user = new_user()
    try:
        writer.create(user, "First")
        first = await catch_up(own_db)
        writer.create(user, "Second")
    finally:
        writer.close()
    with psycopg.connect(own_db) as conn:
        conn.execute(
            "CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql AS"
            " $$BEGIN RAISE EXCEPTION 'checkpoint refused'; END$$;"
            " CREATE TRIGGER refuse BEFORE UPDATE ON projection_checkpoints"
            " FOR EACH ROW EXECUTE FUNCTION refuse()"
        )

    with pytest.raises(Exception, match="checkpoint refused"):
        await catch_up(own_db)

    assert checkpoint(own_db) == first
    assert rows(own_db, "SELECT title FROM read_tasks WHERE user_id = %s", user) == [("First",)]
    assert len(rows(own_db, "SELECT 1 FROM read_task_history WHERE user_id = %s", user)) == 1
    with psycopg.connect(own_db) as conn:
        conn.execute("DROP TRIGGER refuse ON projection_checkpoints")
    await catch_up(own_db)
    assert rows(own_db, "SELECT total FROM read_user_stats WHERE user_id = %s", user) == [(2,)]


async def test_concurrent_catch_ups_apply_every_event_once(own_db: str) -> None:
    writer = Writer(own_db)
    try:
        count = writer.bulk(users=5, tasks_per_user=20)
    finally:
        writer.close()

    ends = await asyncio.gather(*(catch_up(own_db, batch_size=17) for _ in range(3)))

    assert max(ends) == max_position(own_db)
    assert len(snapshot(own_db)["history"]) == count
    await _create_rebuild_tables(own_db)
    await catch_up(own_db, tables=REBUILD)
    assert snapshot(own_db) == snapshot(own_db, REBUILD)


# -- a bad event stops the projector -----------------------------------------------------


async def test_a_handler_error_stops_before_the_event_without_advancing(own_db: str) -> None:
    writer = Writer(own_db)
    user = new_user()
    try:
        writer.create(user, "Fine")
        good = await catch_up(own_db)
        earlier = writer.create(user, "Same batch, before the bad one")
        stranger = uuid.uuid4()
        state = json.dumps({
            "timestamp": {"_type_": "datetime_iso", "_data_": "2025-01-01T00:00:00+00:00"},
            "actor": user, "request_id": "r", "title": "orphan",
        }).encode()
        bad = insert_raw_event(own_db, stranger, 2, Task.TitleChanged.TOPIC, state)
        writer.create(user, "After the bad one")
    finally:
        writer.close()

    with pytest.raises(HandlerFailed) as failure:
        await catch_up(own_db)

    message = str(failure.value)
    for part in (f"position={bad.notification_id}", f"task_id={stranger}", "version=2", "topic=TaskTitleChanged"):
        assert part in message
    assert checkpoint(own_db) == good
    assert rows(own_db, "SELECT 1 FROM read_tasks WHERE task_id = %s", earlier) == []
    with pytest.raises(HandlerFailed):
        await catch_up(own_db)  # and again: it never skips the event
    assert checkpoint(own_db) == good


async def test_an_undecodable_event_stops_the_projector(own_db: str) -> None:
    task_id = uuid.uuid4()
    bad = insert_raw_event(own_db, task_id, 1, "TaskRenamedByMistake", b"{}")

    with pytest.raises(
        HandlerFailed, match=f"position={bad.notification_id} .*topic=TaskRenamedByMistake"
    ):
        await catch_up(own_db)
    assert checkpoint(own_db) == ZERO


# -- no event is passed over -----------------------------------------------------------


async def test_an_event_committed_late_under_an_open_writer_is_not_skipped(own_db: str) -> None:
    """A writer holds its transaction open while others commit after it (writers take no
    table lock); the projector runs meanwhile, takes nothing behind the open transaction,
    and still ends with every event exactly once."""
    writer = Writer(own_db)
    user = new_user()
    try:
        writer.create(user, "Before")
        held = psycopg.connect(own_db)
        held_task = Task.create(owner=user, title="Held", description=None, actor=user,
                                request_id="held")
        stored = writer.store.mapper.to_stored_event(held_task.collect_events()[0])
        held.execute(
            f"INSERT INTO {EVENTS_TABLE} (originator_id, originator_version, topic, state)"
            " VALUES (%s, %s, %s, %s)",
            (stored.originator_id, stored.originator_version, stored.topic, stored.state),
        )
        for n in range(3):  # these commit while the held one is still open
            writer.create(user, f"Later {n}")
        committed = rows(
            own_db, f"SELECT count(*) FROM {EVENTS_TABLE} WHERE convert_from(state, 'UTF8')"
            " LIKE %s", f'%"owner":"{user}"%'
        )
        assert committed == [(4,)]
        during = await catch_up(own_db)
        assert rows(own_db, "SELECT title FROM read_tasks WHERE user_id = %s", user) == [
            ("Before",)
        ]

        held.commit()
        held.close()
        end = await catch_up(own_db)
    finally:
        writer.close()

    assert end > during
    titles = rows(own_db, "SELECT title FROM read_tasks WHERE user_id = %s ORDER BY title", user)
    assert titles == [("Before",), ("Held",), ("Later 0",), ("Later 1",), ("Later 2",)]
    history = [p for (p,) in rows(own_db, "SELECT position FROM read_task_history")]
    events = [p for (p,) in rows(own_db, f"SELECT notification_id FROM {EVENTS_TABLE}")]
    assert sorted(history) == sorted(events)  # every event, exactly once
    assert rows(own_db, "SELECT total, pending FROM read_user_stats WHERE user_id = %s", user) == [
        (5, 5)
    ]


async def test_many_writers_with_random_delays_never_make_the_projector_skip(own_db: str) -> None:
    """Writers hold their transactions open for random times and commit in random order
    while a projector keeps stepping; at the end the read tables hold
    every event once and equal a rebuild from scratch."""
    import random

    store_writer = Writer(own_db)
    rng = random.Random(8)
    users = [new_user() for _ in range(3)]
    task_ids = [store_writer.create(u, "seed") for u in users]
    def write(n: int) -> None:
        local = random.Random(n)
        with psycopg.connect(own_db) as conn:
            for i in range(8):
                task = Task.create(owner=local.choice(users), title=f"w{n}-{i}", description=None,
                                   actor="w", request_id=f"w{n}-{i}")
                stored = store_writer.store.mapper.to_stored_event(task.collect_events()[0])
                with conn.transaction():
                    conn.execute(
                        f"INSERT INTO {EVENTS_TABLE}"
                        " (originator_id, originator_version, topic, state) VALUES (%s, %s, %s, %s)",
                        (stored.originator_id, 1, stored.topic, stored.state),
                    )
                    time.sleep(local.uniform(0, 0.05))

    def update(n: int) -> None:
        for i in range(6):
            task_id = rng.choice(task_ids)
            owner = users[task_ids.index(task_id)]
            store_writer.change(owner, task_id, title=f"u{n}-{i}")

    threads = [threading.Thread(target=write, args=(n,)) for n in range(6)]
    threads += [threading.Thread(target=update, args=(n,)) for n in range(3)]
    for thread in threads:
        thread.start()
    try:
        # Large batches keep the projector at the frontier, where uncommitted rows are.
        while any(thread.is_alive() for thread in threads):
            await catch_up(own_db, batch_size=1000)
            await asyncio.sleep(0.002)
        await catch_up(own_db, batch_size=1000)
    finally:
        for thread in threads:
            thread.join(timeout=30)
        store_writer.close()

    history = [p for (p,) in rows(own_db, "SELECT position FROM read_task_history")]
    events = [p for (p,) in rows(own_db, f"SELECT notification_id FROM {EVENTS_TABLE}")]
    assert len(events) == 3 + 6 * 8 + 3 * 6
    assert sorted(history) == sorted(events)
    await _create_rebuild_tables(own_db)
    await catch_up(own_db, tables=REBUILD)
    assert snapshot(own_db) == snapshot(own_db, REBUILD)


async def test_group_committed_commands_around_held_writers_are_projected_exactly_once(
    own_db: str,
) -> None:
    """The command side's group commit (many commands' events in one multi-row insert)
    racing raw writers that hold their transactions open for random times, with the
    projector stepping throughout: every event once, and a rebuild equals the tables."""
    import random

    from prometheus_client import REGISTRY

    from command_api.commands import Change, Create, Stamp
    from command_api.executor import Executor
    from command_api.store import PostgresEventStore
    from tests.support.projection import settings_for

    rng = random.Random(11)
    store = await PostgresEventStore.open(
        settings_for(own_db).model_copy(update={"db_pool_size": 5, "db_max_overflow": 10})
    )
    commands = Executor(store)
    users = [new_user() for _ in range(4)]
    mapper = store.mapper

    async def held_writer(n: int) -> None:
        conn = await asyncpg.connect(own_db)
        try:
            for i in range(4):
                task = Task.create(owner=users[n % 4], title=f"held{n}-{i}", description=None,
                                   actor="w", request_id=f"held{n}-{i}")
                e = mapper.to_stored_event(task.collect_events()[0])
                async with conn.transaction():
                    await conn.execute(
                        f"INSERT INTO {EVENTS_TABLE}"
                        " (originator_id, originator_version, topic, state) VALUES ($1, 1, $2, $3)",
                        e.originator_id, e.topic, e.state,
                    )
                    await asyncio.sleep(rng.uniform(0, 0.05))
        finally:
            await conn.close()

    async def user_session(user: str) -> None:
        mine = []
        for i in range(25):
            if mine and rng.random() < 0.5:
                await commands.run(Change(rng.choice(mine), title=f"{user[:4]}-{i}"),
                                   Stamp(user, f"c{i}"))
            else:
                outcome = await commands.run(Create(f"n{i}"), Stamp(user, f"n{i}"))
                mine.append(outcome.task.id)
            await asyncio.sleep(rng.uniform(0, 0.003))

    def appends() -> tuple[float, float]:
        """Append batches and the commands in them, so far (the batch-size metric)."""
        labels = {"kind": "append"}
        return (REGISTRY.get_sample_value("command_db_batch_items_count", labels) or 0.0,
                REGISTRY.get_sample_value("command_db_batch_items_sum", labels) or 0.0)

    before = appends()
    sessions = [user_session(u) for u in users for _ in range(3)]  # 12 concurrent sessions
    writers = asyncio.gather(*sessions, *(held_writer(n) for n in range(6)))
    try:
        while not writers.done():
            await catch_up(own_db, batch_size=1000)
            await asyncio.sleep(0.002)
        await writers
        await catch_up(own_db, batch_size=1000)
        after = appends()
        batches, appended = after[0] - before[0], after[1] - before[1]
    finally:
        await store.close()

    assert appended == 12 * 25 and batches < appended  # the commands shared statements
    history = [p for (p,) in rows(own_db, "SELECT position FROM read_task_history")]
    events = [p for (p,) in rows(own_db, f"SELECT notification_id FROM {EVENTS_TABLE}")]
    assert len(events) == 12 * 25 + 6 * 4
    assert sorted(history) == sorted(events)  # every event, exactly once
    await _create_rebuild_tables(own_db)
    await catch_up(own_db, tables=REBUILD)
    assert snapshot(own_db) == snapshot(own_db, REBUILD)


@pytest.mark.parametrize(
    ("reference", "xid32", "widened"),
    [
        (120_690, 120_693, 120_693),  # just assigned, above the snapshot's xmax
        (120_690, 120_680, 120_680),
        (2**32 + 5, 2**32 - 6, 2**32 - 6),  # running since before the epoch turned
        (2**32 - 6, 3, 2**32 + 3),  # assigned just after the epoch turned
        (5 * 2**32 + 7, 7, 5 * 2**32 + 7),
    ],
)
async def test_running_xids_are_widened_against_the_reference(
    own_db: str, reference: int, xid32: int, widened: int
) -> None:
    from projections.projector import WIDEN_XID

    conn = await asyncpg.connect(own_db)
    try:
        value = await conn.fetchval(
            f"SELECT {WIDEN_XID.format(x='$2::bigint::text::xid')}", reference, xid32
        )
    finally:
        await conn.close()
    assert value == widened
