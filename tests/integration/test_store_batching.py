"""The command side's store coalesces concurrent reads and single-event appends into
shared round trips (command_api/batching.py): each command still gets exactly its own
outcome, and a lost race fails only the command that lost it. Round trips are counted
by the batch-size metric (one observation per batch)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from prometheus_client import REGISTRY

from command_api.ports import VersionConflict
from command_api.store import PostgresEventStore
from shared.events import Task
from shared.settings import Settings
from tests.support import new_user


@pytest.fixture
async def stores(settings: Settings) -> AsyncIterator[tuple[PostgresEventStore, PostgresEventStore]]:
    """Two stores: two command API processes on one event store."""
    wide = settings.model_copy(update={"db_pool_size": 5, "db_max_overflow": 20})
    first, second = await PostgresEventStore.open(wide), await PostgresEventStore.open(wide)
    yield first, second
    await first.close()
    await second.close()


def batches(kind: str) -> float:
    """How many batches of `kind` ("read", "append") the stores of this process ran."""
    return REGISTRY.get_sample_value("command_db_batch_items_count", {"kind": kind}) or 0.0


def new_task(owner: str, title: str = "t") -> Task:
    return Task.create(owner=owner, title=title, description=None, actor=owner, request_id="r")


async def test_concurrent_appends_share_statements_and_all_land(stores) -> None:
    store, _ = stores
    owner = new_user()
    tasks = [new_task(owner, f"t{i}") for i in range(60)]
    before = batches("append")
    outcomes = await asyncio.gather(*(store.save(t) for t in tasks))
    assert all(appended == 1 for appended, _ in outcomes)
    positions = [position for _, position in outcomes]
    assert len(set(positions)) == 60
    assert batches("append") - before < 60  # shared round trips
    loaded = await asyncio.gather(*(store.get(t.id) for t in tasks))
    assert [t.title for t in loaded] == [f"t{i}" for i in range(60)]


async def test_two_saves_of_one_version_in_one_batch_let_exactly_one_through(stores) -> None:
    store, _ = stores
    owner = new_user()
    task = new_task(owner)
    await store.save(task)
    first, second = await store.get(task.id), await store.get(task.id)
    first.change(actor=owner, request_id="a", title="first")
    second.change(actor=owner, request_id="b", title="second")
    bystanders = [new_task(owner, f"b{i}") for i in range(10)]
    outcomes = await asyncio.gather(
        store.save(first), store.save(second), *(store.save(t) for t in bystanders),
        return_exceptions=True,
    )
    conflicts = [o for o in outcomes[:2] if isinstance(o, VersionConflict)]
    assert len(conflicts) == 1, outcomes[:2]
    assert all(o[0] == 1 for o in outcomes[2:]), outcomes[2:]
    winner = "first" if not isinstance(outcomes[0], Exception) else "second"
    assert (await store.get(task.id)).title == winner


async def test_a_version_taken_by_another_process_fails_only_that_command(stores) -> None:
    store, other = stores
    owner = new_user()
    tasks = [new_task(owner, f"t{i}") for i in range(20)]
    await asyncio.gather(*(store.save(t) for t in tasks))
    mine = [await store.get(t.id) for t in tasks]
    theirs = [await other.get(t.id) for t in tasks[::2]]  # every other task, raced
    for t in mine:
        t.change(actor=owner, request_id="mine", title="mine")
    for t in theirs:
        t.change(actor=owner, request_id="theirs", title="theirs")
    outcomes = await asyncio.gather(
        *(store.save(t) for t in mine), *(other.save(t) for t in theirs),
        return_exceptions=True,
    )
    for i, task in enumerate(tasks):
        final = await store.get(task.id)
        assert final.version == 2
        lost = [o for o in (outcomes[i], outcomes[20 + i // 2] if i % 2 == 0 else None)
                if isinstance(o, VersionConflict)]
        if i % 2:
            assert final.title == "mine" and not lost
        else:
            assert len(lost) == 1  # one of the two writers of version 2 lost
            assert final.title == ("theirs" if isinstance(outcomes[i], VersionConflict) else "mine")


async def test_concurrent_reads_share_round_trips_and_get_their_own_task(stores) -> None:
    store, _ = stores
    owner = new_user()
    tasks = [new_task(owner, f"r{i}") for i in range(30)]
    await asyncio.gather(*(store.save(t) for t in tasks))
    tasks[3].change(actor=owner, request_id="c", completed=True)
    await store.save(tasks[3])
    missing = Task.create(owner=owner, title="never saved", description=None, actor=owner,
                          request_id="r").id
    before = batches("read")
    loaded = await asyncio.gather(*(store.get(t.id) for t in tasks), store.get(missing))
    assert loaded[-1] is None
    # The same task twice in one batch: each caller gets it whole, once.
    twice = await asyncio.gather(store.get(tasks[3].id), store.get(tasks[3].id))
    assert [t.version for t in twice] == [2, 2] and twice[0] is not twice[1]
    assert [t.title for t in loaded[:-1]] == [f"r{i}" for i in range(30)]
    assert loaded[3].completed and loaded[3].version == 2
    assert all(t.version == 1 for i, t in enumerate(loaded[:-1]) if i != 3)
    assert batches("read") - before < 31


async def test_batch_sizes_are_exported_as_a_metric(stores) -> None:
    def appended_commands() -> float:
        return REGISTRY.get_sample_value("command_db_batch_items_sum", {"kind": "append"}) or 0.0

    store, _ = stores
    before = appended_commands()
    await asyncio.gather(*(store.save(new_task(new_user())) for _ in range(12)))
    assert appended_commands() == before + 12
