"""The event-store port's contract, run against both implementations: the PostgreSQL
store the API runs on and the in-memory one the executor's unit tests use. Whatever
these tests say of one holds of the other."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import pytest

from command_api.ports import EventStore, IdempotencyRecord, KeyTaken, VersionConflict
from command_api.store import PostgresEventStore
from shared.events import Task
from shared.settings import Settings
from tests.support import new_user
from tests.support.memory_store import MemoryEventStore


@pytest.fixture(params=["memory", "postgres"])
async def store(request: pytest.FixtureRequest, settings: Settings) -> AsyncIterator[EventStore]:
    if request.param == "memory":
        yield MemoryEventStore()
        return
    pg = await PostgresEventStore.open(settings)
    yield pg
    await pg.close()


def new_task(owner: str, title: str = "t") -> Task:
    return Task.create(owner=owner, title=title, description="d", actor=owner, request_id="r1")


def record(user: str, key: str, task: Task, status: int = 201) -> IdempotencyRecord:
    return IdempotencyRecord(user, key, f"fp-{key}", status, task.id, task.version)


async def test_a_saved_task_reads_back_whole(store: EventStore) -> None:
    owner = new_user()
    task = new_task(owner, "Buy milk")
    appended, position = await store.save(task)
    assert appended == 1 and position is not None
    read = await store.get(task.id)
    assert read is not None and read is not task
    assert (read.id, read.owner, read.title, read.description, read.completed, read.version) == (
        task.id, owner, "Buy milk", "d", False, 1)
    assert read.created_on == task.created_on and read.modified_on == task.modified_on
    assert await store.get(uuid.uuid4()) is None
    assert await store.position_of(task.id, 1) == position


async def test_several_events_in_one_save_and_reads_at_a_version(store: EventStore) -> None:
    owner = new_user()
    task = new_task(owner)
    await store.save(task)
    task.change(actor=owner, request_id="r2", title="u", completed=True)
    appended, position = await store.save(task)
    assert appended == 2
    assert await store.position_of(task.id, 3) == position
    second = await store.position_of(task.id, 2)
    assert second is not None and position is not None and second < position
    assert second.tx_id == position.tx_id  # one transaction
    at_1, at_2, latest = [await store.get(task.id, v) for v in (1, 2, None)]
    assert (at_1.title, at_1.completed, at_1.version) == ("t", False, 1)
    assert (at_2.title, at_2.completed, at_2.version) == ("u", False, 2)
    assert (latest.title, latest.completed, latest.version) == ("u", True, 3)


async def test_positions_grow_with_each_save(store: EventStore) -> None:
    owner = new_user()
    positions = []
    for i in range(5):
        _, position = await store.save(new_task(owner, f"t{i}"))
        positions.append(position)
    assert positions == sorted(positions) and len(set(positions)) == 5


async def test_a_version_taken_first_is_a_conflict_and_writes_nothing(store: EventStore) -> None:
    owner = new_user()
    task = new_task(owner)
    await store.save(task)
    mine, theirs = await store.get(task.id), await store.get(task.id)
    theirs.change(actor=owner, request_id="theirs", title="theirs")
    await store.save(theirs)
    mine.change(actor=owner, request_id="mine", title="mine", completed=True)
    with pytest.raises(VersionConflict):
        await store.save(mine)
    latest = await store.get(task.id)
    assert (latest.title, latest.completed, latest.version) == ("theirs", False, 2)
    assert await store.position_of(task.id, 3) is None


async def test_concurrent_saves_of_one_version_let_exactly_one_through(store: EventStore) -> None:
    owner = new_user()
    task = new_task(owner)
    await store.save(task)
    copies = [await store.get(task.id) for _ in range(5)]
    for i, copy in enumerate(copies):
        copy.change(actor=owner, request_id=f"r{i}", title=f"c{i}")
    outcomes = await asyncio.gather(*(store.save(c) for c in copies), return_exceptions=True)
    assert sum(isinstance(o, VersionConflict) for o in outcomes) == 4
    assert (await store.get(task.id)).version == 2


async def test_the_idempotency_record_is_saved_with_the_events(store: EventStore) -> None:
    user = new_user()
    task = new_task(user)
    first = record(user, "k1", task)
    appended, position = await store.save(task, first)
    assert appended == 1 and position is not None
    assert await store.key_record(user, "k1") == first
    assert await store.key_record(user, "k2") is None
    assert await store.key_record(new_user(), "k1") is None  # keys are per user


async def test_a_taken_key_is_refused_and_its_events_are_not_written(store: EventStore) -> None:
    user = new_user()
    task = new_task(user)
    await store.save(task, record(user, "once", task))
    again = new_task(user, "second")
    with pytest.raises(KeyTaken):
        await store.save(again, record(user, "once", again))
    assert await store.get(again.id) is None
    assert (await store.key_record(user, "once")).task_id == task.id
    other = new_task(new_user())
    assert (await store.save(other, record(other.owner, "once", other)))[0] == 1


async def test_a_record_without_events_is_saved_alone(store: EventStore) -> None:
    user = new_user()
    task = new_task(user)
    await store.save(task)
    unchanged = await store.get(task.id)
    unchanged.change(actor=user, request_id="r", title="t")  # the same title: no event
    kept = record(user, "no-op", unchanged, status=200)
    assert await store.save(unchanged, kept) == (0, None)
    assert await store.key_record(user, "no-op") == kept
    assert await store.save(unchanged) == (0, None)  # nothing at all to save
    assert (await store.get(task.id)).version == 1


@pytest.mark.parametrize("keyed", [False, True])
@pytest.mark.parametrize("events", [1, 2])
async def test_a_task_ahead_of_the_store_is_a_conflict_and_writes_nothing(
    store: EventStore, keyed: bool, events: int
):
    """A copy that believes in events the store does not hold (a cache after an
    asynchronous failover lost them): its next save would write a version with none
    before it, which no fold can read. It is a VersionConflict, and nothing is written:
    no event, no idempotency record."""
    owner = new_user()
    task = new_task(owner)
    task.collect_events()  # version 1 "saved" only in this copy's belief
    task.change(actor=owner, request_id="r", title="second")
    if events == 2:
        task.change(actor=owner, request_id="r", completed=True)
    record = IdempotencyRecord(owner, "ahead", "f", 200, task.id, task.version) if keyed else None
    with pytest.raises(VersionConflict):
        await store.save(task, record)
    assert await store.get(task.id) is None
    assert await store.key_record(owner, "ahead") is None
