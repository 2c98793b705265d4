"""The command executor: load, decide, save, for every command.

A command runs against the task as this process last saved it (a cache), else as the
event store has it. A concurrent write to the same task makes the save fail on the
(task id, version) key (VersionConflict); the executor then loads afresh and decides
again, up to `retries` times, after a short random pause, and gives up with
TooManyConflicts. Within one process, commands on one task take turns (an asyncio lock
per task), so they do not race each other into conflicts.

If-Match: the versions the caller expects (`shared.etag.IfMatch`). A cached copy may be
behind another process's write, so a refusal is checked once more on fresh state; the
decision runs first, so a missing or foreign task is refused as such, not as a stale
version.

Idempotency-Key: the record is written with the events, in one transaction, so a retry
either finds it or writes everything. A retry with the same fingerprint gets the first
outcome (the task as it was then); another request under the same key is refused.
"""

from __future__ import annotations

import asyncio
import random
from collections import OrderedDict
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime
from enum import Enum
from typing import NamedTuple
from uuid import UUID
from weakref import WeakValueDictionary

from command_api.commands import Command, Create, Delete, Stamp
from command_api.decisions import NotYourTask, decide
from command_api.ports import EventStore, IdempotencyRecord, KeyTaken, VersionConflict
from shared.etag import IfMatch
from shared.events import Task
from shared.observability import COMMAND_CONFLICTS, EVENTS_APPENDED, IDEMPOTENT_REPLAYS
from shared.position import Position


class Kind(Enum):
    """What a command did. The idempotency table stores it as the HTTP status of the
    first answer (`value`), the format the table has always had."""

    CREATED = 201
    CHANGED = 200
    DELETED = 204


class Saved(NamedTuple):
    """A task as a command left it (the aggregate itself stays the executor's, and
    changes with the next command)."""

    id: UUID
    owner: str
    title: str
    description: str | None
    completed: bool
    created_on: datetime
    modified_on: datetime
    version: int
    priority: str
    tags: tuple[str, ...]
    due_date: datetime | None

    @classmethod
    def of(cls, task: Task) -> Saved:
        return cls(task.id, task.owner, task.title, task.description, task.completed,
                   task.created_on, task.modified_on, task.version,
                   task.priority, task.tags, task.due_date)


@dataclass(frozen=True)
class Outcome:
    """A command's result: the task as saved (None once deleted) and where its last
    event sits in the global order."""

    kind: Kind
    task: Saved | None
    position: Position | None


@dataclass(frozen=True)
class IdempotencyKey:
    """A request's Idempotency-Key and the fingerprint of the request it came with."""

    key: str
    fingerprint: str


class VersionMismatch(Exception):
    """If-Match names none of the task's current version."""

    def __init__(self, current_version: int) -> None:
        super().__init__(current_version)
        self.current_version = current_version


class TooManyConflicts(Exception):
    """Other writers kept winning the race for the task's next version."""


class KeyReused(Exception):
    """The Idempotency-Key was used before with a different request."""


def kind_of(command: Command) -> Kind:
    if isinstance(command, Create):
        return Kind.CREATED
    return Kind.DELETED if isinstance(command, Delete) else Kind.CHANGED


class Executor:
    def __init__(self, store: EventStore, *, retries: int = 20, cache_size: int = 10_000) -> None:
        self.store = store
        self.retries = retries
        self.cache_size = cache_size
        self._cache: OrderedDict[UUID, Task] = OrderedDict()
        self._task_locks: WeakValueDictionary[UUID, asyncio.Lock] = WeakValueDictionary()

    async def run(
        self,
        command: Command,
        stamp: Stamp,
        *,
        expected: IfMatch | None = None,
        key: IdempotencyKey | None = None,
    ) -> Outcome:
        if key is not None:
            earlier = await self._replay(stamp.user_id, key)
            if earlier is not None:
                return earlier
        task_id = getattr(command, "task_id", None)
        async with self._serialised(task_id):
            return await self._attempt(command, task_id, stamp, expected, key)

    async def _attempt(
        self,
        command: Command,
        task_id: UUID | None,
        stamp: Stamp,
        expected: IfMatch | None,
        key: IdempotencyKey | None,
    ) -> Outcome:
        kind = kind_of(command)
        for attempt in range(self.retries):
            current = None
            if task_id is not None:
                current = await self._load(task_id, cached=attempt == 0)
                if expected is not None and current is not None and not expected.accepts(
                    current.version
                ):
                    current = await self._load(task_id, cached=False)
            version = None if current is None else current.version
            try:
                task = decide(current, command, stamp)
            except NotYourTask:
                assert current is not None
                self._keep(current)  # refused before any event: still as stored
                raise
            if expected is not None and version is not None and not expected.accepts(version):
                raise VersionMismatch(version)
            record = None
            if key is not None:
                record = IdempotencyRecord(
                    stamp.user_id, key.key, key.fingerprint, kind.value, task.id, task.version
                )
            try:
                appended, position = await self.store.save(task, record)
            except KeyTaken:
                assert key is not None
                earlier = await self._replay(stamp.user_id, key)
                if earlier is not None:
                    return earlier
                continue
            except VersionConflict:
                COMMAND_CONFLICTS.inc()
                await asyncio.sleep(random.uniform(0, 0.002 * (attempt + 1)))
                continue
            self._keep(task)
            EVENTS_APPENDED.inc(appended)
            if not appended:
                position = await self.store.position_of(task.id, task.version)
            return Outcome(kind, None if kind is Kind.DELETED else Saved.of(task), position)
        raise TooManyConflicts

    @asynccontextmanager
    async def _serialised(self, task_id: UUID | None) -> AsyncIterator[None]:
        if task_id is None:
            yield
            return
        lock = self._task_locks.get(task_id)
        if lock is None:
            lock = self._task_locks[task_id] = asyncio.Lock()
        async with lock:
            yield

    async def _load(self, task_id: UUID, *, cached: bool) -> Task | None:
        """The task as this process last saved it, else from the event store. A cached
        copy behind another process's write fails its save on the (task id, version)
        key and the retry loads afresh, so the cache never makes a stale decision stick.
        The copy is taken out of the cache while a command decides on it."""
        task = self._cache.pop(task_id, None)
        if task is None or not cached:
            task = await self.store.get(task_id)
        return task

    def _keep(self, task: Task) -> None:
        """Remember a task whose state matches the event store after our save."""
        if task.deleted or self.cache_size <= 0:
            return
        self._cache[task.id] = task
        self._cache.move_to_end(task.id)
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)

    async def _replay(self, user_id: str, key: IdempotencyKey) -> Outcome | None:
        """The outcome of the first request with this key, or None if there was none."""
        record = await self.store.key_record(user_id, key.key)
        if record is None:
            return None
        if record.fingerprint != key.fingerprint:
            raise KeyReused
        IDEMPOTENT_REPLAYS.inc()
        kind = Kind(record.status)
        task_id, version = record.task_id, record.version
        if task_id is None or version is None:
            return Outcome(kind, None, None)
        position = await self.store.position_of(task_id, version)
        if kind is Kind.DELETED:
            return Outcome(kind, None, position)
        task = await self.store.get(task_id, version)
        assert task is not None
        return Outcome(kind, Saved.of(task), position)
