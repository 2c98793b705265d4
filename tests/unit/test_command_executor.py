"""The executor's rules against the in-memory event store (proven equal to PostgreSQL's
by tests/integration/test_event_store_contract.py): retries, If-Match, idempotency
replay, the stale cache, refusals."""

from __future__ import annotations

import uuid
from typing import Any

import pytest

from command_api.commands import Change, Create, Delete, SetCompleted, Stamp
from command_api.decisions import NotYourTask, TaskDeleted, TaskNotFound
from command_api.executor import (
    Executor,
    IdempotencyKey,
    KeyReused,
    Kind,
    Saved,
    TooManyConflicts,
    VersionMismatch,
    kind_of,
)
from command_api.ports import IdempotencyRecord, VersionConflict
from command_api.routes import ROUTES
from shared.etag import IfMatch
from shared.events import Task
from tests.support.memory_store import MemoryEventStore

ME = Stamp("me", "req")


class Conflicting(MemoryEventStore):
    """Loses the race for the next version `times` times, then saves as usual."""

    def __init__(self, times: int) -> None:
        super().__init__()
        self.times = times

    async def save(self, task: Task, idempotency: IdempotencyRecord | None = None) -> Any:
        if self.times > 0 and task.version > 1:
            self.times -= 1
            self.saves += 1
            task.collect_events()
            raise VersionConflict
        return await super().save(task, idempotency)


class RacedKey(MemoryEventStore):
    """Answers the first key lookup as if no request had the key yet (another request
    is about to commit it), so the save finds the key taken."""

    def __init__(self) -> None:
        super().__init__()
        self.raced = False

    async def key_record(self, user_id: str, key: str) -> IdempotencyRecord | None:
        if not self.raced:
            self.raced = True
            return None
        return await super().key_record(user_id, key)


async def create(executor: Executor, stamp: Stamp = ME, title: str = "t") -> Saved:
    outcome = await executor.run(Create(title), stamp)
    assert outcome.kind is Kind.CREATED and outcome.task is not None
    return outcome.task


async def test_a_lost_race_is_retried_on_fresh_state_until_it_wins() -> None:
    store = Conflicting(times=3)
    executor = Executor(store, retries=5)
    task = await create(executor)
    before = store.saves
    outcome = await executor.run(Change(task.id, title="won"), ME)
    assert outcome.task is not None and outcome.task.version == 2
    assert store.saves - before == 4
    assert (await store.get(task.id)).title == "won"


async def test_losing_every_retry_is_too_many_conflicts() -> None:
    store = Conflicting(times=10)
    executor = Executor(store, retries=3)
    task = await create(executor)
    with pytest.raises(TooManyConflicts):
        await executor.run(Change(task.id, title="lost"), ME)
    assert (await store.get(task.id)).version == 1


async def test_if_match_accepts_the_current_version_and_refuses_others() -> None:
    store = MemoryEventStore()
    executor = Executor(store)
    task = await create(executor)
    ok = await executor.run(Change(task.id, title="v2"), ME, expected=IfMatch.parse('"v1"'))
    assert ok.task.version == 2
    with pytest.raises(VersionMismatch) as refused:
        await executor.run(Change(task.id, title="lost"), ME, expected=IfMatch.parse('"v1"'))
    assert refused.value.current_version == 2
    with pytest.raises(VersionMismatch):
        await executor.run(Delete(task.id), ME, expected=IfMatch.parse("nonsense"))
    assert (await store.get(task.id)).title == "v2"
    done = await executor.run(Delete(task.id), ME, expected=IfMatch.parse("*"))
    assert done.kind is Kind.DELETED and done.task is None and done.position is not None


async def test_if_match_is_checked_again_on_fresh_state_when_the_cache_is_behind() -> None:
    store = MemoryEventStore()
    first, second = Executor(store), Executor(store)  # two processes
    task = await create(first)
    await first.run(Change(task.id, title="v2"), ME)  # first's cache: v2
    await second.run(Change(task.id, completed=True), ME)  # v3, elsewhere
    fresh = await first.run(Change(task.id, title="v4"), ME, expected=IfMatch.parse('"v3"'))
    assert fresh.task.version == 4 and fresh.task.completed is True
    with pytest.raises(VersionMismatch) as refused:
        await second.run(Change(task.id, title="x"), ME, expected=IfMatch.parse('"v3"'))
    assert refused.value.current_version == 4


async def test_a_stale_cached_task_is_decided_again_on_fresh_state() -> None:
    store = MemoryEventStore()
    first, second = Executor(store), Executor(store)
    task = await create(first)  # cached by first at v1
    await second.run(Change(task.id, title="by second"), ME)
    outcome = await first.run(Change(task.id, completed=True), ME)
    assert outcome.task.version == 3
    assert (outcome.task.title, outcome.task.completed) == ("by second", True)
    toggled = await first.run(SetCompleted(task.id), ME)  # the toggle sees the saved state
    assert toggled.task.completed is False


async def test_a_retried_request_gets_the_first_outcome() -> None:
    store = MemoryEventStore()
    executor = Executor(store)
    keyed = IdempotencyKey("k1", "fingerprint-a")
    first = await executor.run(Create("once"), ME, key=keyed)
    await executor.run(Change(first.task.id, title="later"), ME)
    again = await Executor(store).run(Create("once"), ME, key=keyed)
    assert again.kind is Kind.CREATED
    assert (again.task.id, again.task.title, again.task.version) == (first.task.id, "once", 1)
    assert again.position == first.position
    assert len(store.events[first.task.id]) == 2  # the retry appended nothing
    assert store.keys["me", "k1"].status == 201
    with pytest.raises(KeyReused):
        await executor.run(Create("other"), ME, key=IdempotencyKey("k1", "fingerprint-b"))
    other_user = await executor.run(Create("once"), Stamp("you", "r"), key=keyed)
    assert other_user.task.id != first.task.id  # keys are per user


async def test_a_retried_delete_and_no_op_change_answer_alike() -> None:
    store = MemoryEventStore()
    executor = Executor(store)
    task = await create(executor)
    noop = await executor.run(Change(task.id, title="t"), ME, key=IdempotencyKey("n", "f"))
    assert noop.task.version == 1 and noop.position == await store.position_of(task.id, 1)
    assert await executor.run(Change(task.id, title="t"), ME, key=IdempotencyKey("n", "f")) == noop
    deleted = await executor.run(Delete(task.id), ME, key=IdempotencyKey("d", "f"))
    replayed = await executor.run(Delete(task.id), ME, key=IdempotencyKey("d", "f"))
    assert replayed == deleted and replayed.kind is Kind.DELETED and replayed.task is None
    assert [store.keys["me", k].status for k in ("n", "d")] == [200, 204]


async def test_a_key_taken_meanwhile_answers_with_the_winners_outcome() -> None:
    store = RacedKey()
    winner = await Executor(store).run(Create("once"), ME, key=IdempotencyKey("k", "f"))
    store.raced = False  # the next request looks the key up before the winner's commit
    loser = await Executor(store).run(Create("once"), ME, key=IdempotencyKey("k", "f"))
    assert loser.task.id == winner.task.id
    assert len(store.events) == 1


async def test_refusals() -> None:
    store = MemoryEventStore()
    executor = Executor(store)
    with pytest.raises(TaskNotFound):
        await executor.run(Change(uuid.uuid4(), title="x"), ME, expected=IfMatch.parse('"v1"'))
    task = await create(executor)
    intruder = Stamp("intruder", "r")
    with pytest.raises(NotYourTask):  # not a 412: whose task it is comes first
        await executor.run(Change(task.id, title="x"), intruder, expected=IfMatch.parse('"v9"'))
    await executor.run(Delete(task.id), ME)
    for stamp in (ME, intruder):
        with pytest.raises(TaskDeleted):
            await executor.run(SetCompleted(task.id), stamp, expected=IfMatch.parse('"v1"'))
    assert len(store.events[task.id]) == 2


def test_each_route_succeeds_with_its_commands_stored_status() -> None:
    task_id = uuid.uuid4()
    for route in ROUTES:
        body = None if route.body is None else route.body.model_construct(
            title="t", description=None, completed=None)
        command = route.to_command(task_id, body)
        assert route.status == kind_of(command).value, route.name


async def test_an_outcome_keeps_the_task_as_that_command_left_it() -> None:
    executor = Executor(MemoryEventStore())
    task = await create(executor)
    first = await executor.run(Change(task.id, title="first"), ME)
    await executor.run(Change(task.id, title="second"), ME)  # the cached aggregate moves on
    assert (first.task.title, first.task.version) == ("first", 2)
