"""Command handlers: load, decide, save. No HTTP here.

They run on the API's event loop against `AsyncTaskStore`. A concurrent write to the
same task makes the save fail on the (task id, version) key; the handler then reloads
and decides again, up to `retries` times, and reports CONFLICT after that. Within one
process, commands on one task take turns (an asyncio lock per task), so they do not
race each other into conflicts. A command with an `Idempotency-Key` writes its
idempotency record in the same transaction as its events, so a retry either finds the
record or writes everything.
"""

from __future__ import annotations

import asyncio
import random
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any
from uuid import UUID
from weakref import WeakValueDictionary

from command_api.commands import ChangeTask, CreateTask
from command_api.store import AsyncTaskStore, IdempotencyRecord, KeyTaken, VersionConflict
from shared.errors import Conflict, Forbidden, NotFound, PreconditionFailed, ValidationFailed
from shared.etag import IfMatch
from shared.events import Task
from shared.observability import COMMAND_CONFLICTS, EVENTS_APPENDED, IDEMPOTENT_REPLAYS
from shared.position import Position


@dataclass(frozen=True)
class Actor:
    """Who is acting, and under which request and idempotency key."""

    user_id: str
    request_id: str
    idempotency_key: str | None = None
    fingerprint: str = ""


@dataclass(frozen=True)
class Outcome:
    status: int
    task: dict[str, Any] | None
    position: Position | None


def task_view(task: Task) -> dict[str, Any]:
    return {
        "id": str(task.id),
        "user_id": task.owner,
        "title": task.title,
        "description": task.description,
        "completed": task.completed,
        "created_at": task.created_on.isoformat(),
        "updated_at": task.modified_on.isoformat(),
        "version": task.version,
    }


class TaskCommands:
    def __init__(
        self, store: AsyncTaskStore, *, retries: int = 20, cache_size: int = 10_000
    ) -> None:
        self.store = store
        self.retries = retries
        self.cache_size = cache_size
        self._cache: OrderedDict[UUID, Task] = OrderedDict()
        self._task_locks: WeakValueDictionary[UUID, asyncio.Lock] = WeakValueDictionary()

    # -- the commands ----------------------------------------------------------------

    async def create(self, actor: Actor, command: CreateTask) -> Outcome:
        def decide(_: Task | None) -> Task:
            return Task.create(
                owner=actor.user_id,
                title=command.title,
                description=command.description,
                actor=actor.user_id,
                request_id=actor.request_id,
            )

        return await self._run(actor, None, None, decide, status=201)

    async def change(
        self, actor: Actor, task_id: UUID, command: ChangeTask, expected: IfMatch | None
    ) -> Outcome:
        fields = command.model_fields_set

        def decide(task: Task | None) -> Task:
            assert task is not None
            task.change(
                actor=actor.user_id,
                request_id=actor.request_id,
                title=command.title if "title" in fields else None,
                description=command.description,
                set_description="description" in fields,
                completed=command.completed if "completed" in fields else None,
            )
            return task

        return await self._run(actor, task_id, expected, decide, status=200)

    async def toggle(
        self, actor: Actor, task_id: UUID, completed: bool | None, expected: IfMatch | None
    ) -> Outcome:
        def decide(task: Task | None) -> Task:
            assert task is not None
            target = (not task.completed) if completed is None else completed
            task.change(actor=actor.user_id, request_id=actor.request_id, completed=target)
            return task

        return await self._run(actor, task_id, expected, decide, status=200)

    async def delete(self, actor: Actor, task_id: UUID, expected: IfMatch | None) -> Outcome:
        def decide(task: Task | None) -> Task:
            assert task is not None
            task.delete(actor=actor.user_id, request_id=actor.request_id)
            return task

        return await self._run(actor, task_id, expected, decide, status=204)

    # -- load, decide, save ------------------------------------------------------------

    async def _run(
        self,
        actor: Actor,
        task_id: UUID | None,
        expected: IfMatch | None,
        decide: Callable[[Task | None], Task],
        *,
        status: int,
    ) -> Outcome:
        if actor.idempotency_key:
            earlier = await self._replay(actor)
            if earlier is not None:
                return earlier
        async with self._serialised(task_id):
            return await self._attempt(actor, task_id, expected, decide, status)

    async def _attempt(
        self,
        actor: Actor,
        task_id: UUID | None,
        expected: IfMatch | None,
        decide: Callable[[Task | None], Task],
        status: int,
    ) -> Outcome:
        for attempt in range(self.retries):
            current = None
            if task_id is not None:
                current = await self._load(actor.user_id, task_id, cached=attempt == 0)
            if expected is not None and current and not expected.accepts(current.version):
                # The cached copy may be behind another process's write: check afresh.
                assert task_id is not None
                current = await self._load(actor.user_id, task_id, cached=False)
                if not expected.accepts(current.version):
                    self._keep(current)
                    raise PreconditionFailed(
                        "The task has changed since the given ETag",
                        details={"current_version": current.version},
                    )
            task = decide(current)
            record = None
            if actor.idempotency_key:
                record = IdempotencyRecord(
                    user_id=actor.user_id,
                    key=actor.idempotency_key,
                    fingerprint=actor.fingerprint,
                    status=status,
                    task_id=task.id,
                    version=task.version,
                )
            try:
                appended, position = await self.store.save(task, record)
            except KeyTaken:
                earlier = await self._replay(actor)
                if earlier is not None:
                    return earlier
                continue
            except VersionConflict:
                COMMAND_CONFLICTS.inc()
                await asyncio.sleep(random.uniform(0, 0.002 * (attempt + 1)))  # noqa: S311
                continue
            self._keep(task)
            EVENTS_APPENDED.inc(appended)
            if not appended:
                position = await self.store.position_of(task.id, task.version)
            return Outcome(status, None if status == 204 else task_view(task), position)
        raise Conflict("The task is being changed by others; try again")

    @asynccontextmanager
    async def _serialised(self, task_id: UUID | None) -> AsyncIterator[None]:
        """Commands on one task from this process take turns, so they do not race each
        other into version conflicts; other processes are still caught by the key."""
        if task_id is None:
            yield
            return
        lock = self._task_locks.get(task_id)
        if lock is None:
            lock = self._task_locks[task_id] = asyncio.Lock()
        async with lock:
            yield

    async def _load(self, user_id: str, task_id: UUID, *, cached: bool = True) -> Task:
        """The task as this process last saved it, else from the event store. A cached
        copy that is behind another process's write fails its save on the
        (task id, version) key, and the retry loads afresh; so the cache saves the
        read of a command without ever deciding on stale state."""
        task = self._cache.pop(task_id, None)
        if task is None or not cached:
            task = await self.store.get(task_id)
            if task is None:
                raise NotFound("Task not found")
        if task.deleted:
            raise NotFound("Task not found")
        if task.owner != user_id:
            self._keep(task)
            raise Forbidden("You do not have access to this task")
        return task

    def _keep(self, task: Task) -> None:
        """Remember a task whose state matches the event store after our save."""
        if task.deleted or self.cache_size <= 0:
            return
        self._cache[task.id] = task
        self._cache.move_to_end(task.id)
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)

    async def _replay(self, actor: Actor) -> Outcome | None:
        """The outcome of the first request with this key, or None if there was none."""
        assert actor.idempotency_key is not None
        record = await self.store.key_record(actor.user_id, actor.idempotency_key)
        if record is None:
            return None
        if record.fingerprint != actor.fingerprint:
            raise ValidationFailed(
                "Idempotency-Key was already used with a different request",
                details={"Idempotency-Key": "reused with a different request"},
            )
        IDEMPOTENT_REPLAYS.inc()
        task_id, version = record.task_id, record.version
        if task_id is None or version is None:
            return Outcome(record.status, None, None)
        position = await self.store.position_of(task_id, version)
        if record.status == 204:
            return Outcome(record.status, None, position)
        task = await self.store.get(task_id, version)
        assert task is not None
        return Outcome(record.status, task_view(task), position)
