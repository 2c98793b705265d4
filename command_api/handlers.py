"""Command handlers: load, decide, save. No HTTP here.

Each runs in a worker thread (the event store client is synchronous). A concurrent
write to the same task makes the save fail on the (task id, version) key; the handler
then reloads and decides again, up to `retries` times, and reports CONFLICT after that.
A command with an `Idempotency-Key` writes its idempotency record in the same
transaction as its events, so a retry either finds the record or writes everything.
"""

from __future__ import annotations

import random
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any
from uuid import UUID
from weakref import WeakValueDictionary

from eventsourcing.application import AggregateNotFoundError
from eventsourcing.persistence import IntegrityError
from psycopg.sql import SQL, Identifier

from command_api.commands import ChangeTask, CreateTask
from shared.errors import Conflict, Forbidden, NotFound, PreconditionFailed, ValidationFailed
from shared.etag import IfMatch
from shared.eventstore import (
    EVENTS_TABLE,
    IDEMPOTENCY_TABLE,
    IdempotencyRecord,
    Receipt,
    TaskStore,
)
from shared.observability import EVENTS_APPENDED
from shared.position import Position
from shared.tasks import Task


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
    def __init__(self, store: TaskStore, *, retries: int = 20, cache_size: int = 10_000) -> None:
        self.store = store
        self.retries = retries
        self.cache_size = cache_size
        self._cache: OrderedDict[UUID, Task] = OrderedDict()
        self._task_locks: WeakValueDictionary[UUID, threading.Lock] = WeakValueDictionary()
        self._locks_guard = threading.Lock()
        schema = store.recorder.datastore.schema
        self._select_key = SQL(
            "SELECT fingerprint, status, task_id, version FROM {t}"
            " WHERE user_id = %s AND key = %s"
        ).format(t=Identifier(schema, IDEMPOTENCY_TABLE))
        self._select_position = SQL(
            "SELECT tx_id::text AS tx_id, notification_id FROM {t}"
            " WHERE originator_id = %s AND originator_version = %s"
        ).format(t=Identifier(schema, EVENTS_TABLE))

    # -- the commands ----------------------------------------------------------------

    def create(self, actor: Actor, command: CreateTask) -> Outcome:
        def decide(_: Task | None) -> Task:
            return Task.create(
                owner=actor.user_id,
                title=command.title,
                description=command.description,
                actor=actor.user_id,
                request_id=actor.request_id,
            )

        return self._run(actor, None, None, decide, status=201)

    def change(
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

        return self._run(actor, task_id, expected, decide, status=200)

    def toggle(
        self, actor: Actor, task_id: UUID, completed: bool | None, expected: IfMatch | None
    ) -> Outcome:
        def decide(task: Task | None) -> Task:
            assert task is not None
            target = (not task.completed) if completed is None else completed
            task.change(actor=actor.user_id, request_id=actor.request_id, completed=target)
            return task

        return self._run(actor, task_id, expected, decide, status=200)

    def delete(self, actor: Actor, task_id: UUID, expected: IfMatch | None) -> Outcome:
        def decide(task: Task | None) -> Task:
            assert task is not None
            task.delete(actor=actor.user_id, request_id=actor.request_id)
            return task

        return self._run(actor, task_id, expected, decide, status=204)

    # -- load, decide, save ------------------------------------------------------------

    def _run(
        self,
        actor: Actor,
        task_id: UUID | None,
        expected: IfMatch | None,
        decide: Callable[[Task | None], Task],
        *,
        status: int,
    ) -> Outcome:
        if actor.idempotency_key:
            earlier = self._replay(actor)
            if earlier is not None:
                return earlier
        with self._serialised(task_id):
            return self._attempt(actor, task_id, expected, decide, status)

    def _attempt(
        self,
        actor: Actor,
        task_id: UUID | None,
        expected: IfMatch | None,
        decide: Callable[[Task | None], Task],
        status: int,
    ) -> Outcome:
        for attempt in range(self.retries):
            current = self._load(actor.user_id, task_id, cached=attempt == 0) if task_id else None
            if expected is not None and current and not expected.accepts(current.version):
                # The cached copy may be behind another process's write: check afresh.
                current = self._load(actor.user_id, task_id, cached=False)
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
            receipt = Receipt()
            try:
                recordings = self.store.save(task, idempotency=record, receipt=receipt)
            except IntegrityError as e:
                if record is not None and _violates(e, f"{IDEMPOTENCY_TABLE}_pkey"):
                    earlier = self._replay(actor)
                    if earlier is not None:
                        return earlier
                time.sleep(random.uniform(0, 0.002 * (attempt + 1)))  # noqa: S311
                continue
            self._keep(task)
            EVENTS_APPENDED.inc(len(recordings))
            if recordings:
                position = Position(receipt.tx_id, receipt.notification_id)
            else:
                position = self._position_of(task.id, task.version)
            return Outcome(status, None if status == 204 else task_view(task), position)
        raise Conflict("The task is being changed by others; try again")

    @contextmanager
    def _serialised(self, task_id: UUID | None) -> Iterator[None]:
        """Commands on one task from this process take turns, so they do not race each
        other into version conflicts; other processes are still caught by the key."""
        if task_id is None:
            yield
            return
        with self._locks_guard:
            lock = self._task_locks.get(task_id)
            if lock is None:
                lock = self._task_locks[task_id] = threading.Lock()
        with lock:
            yield

    def _load(self, user_id: str, task_id: UUID, *, cached: bool = True) -> Task:
        """The task as this process last saved it, else from the event store. A cached
        copy that is behind another process's write fails its save on the
        (task id, version) key, and the retry loads afresh; so the cache saves the
        read of a command without ever deciding on stale state."""
        task: Task | None = None
        with self._locks_guard:
            task = self._cache.pop(task_id, None)
        if task is None or not cached:
            try:
                task = self.store.repository.get(task_id)
            except AggregateNotFoundError:
                raise NotFound("Task not found") from None
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
        with self._locks_guard:
            self._cache[task.id] = task
            self._cache.move_to_end(task.id)
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)

    def _replay(self, actor: Actor) -> Outcome | None:
        """The outcome of the first request with this key, or None if there was none."""
        with self.store.recorder.datastore.get_connection() as conn:
            row = conn.execute(self._select_key, (actor.user_id, actor.idempotency_key)).fetchone()
        if row is None:
            return None
        if row["fingerprint"] != actor.fingerprint:
            raise ValidationFailed(
                "Idempotency-Key was already used with a different request",
                details={"Idempotency-Key": "reused with a different request"},
            )
        task_id, version = row["task_id"], row["version"]
        position = self._position_of(task_id, version) if task_id else None
        if row["status"] == 204 or task_id is None:
            return Outcome(row["status"], None, position)
        task: Task = self.store.repository.get(task_id, version=version)
        return Outcome(row["status"], task_view(task), position)

    def _position_of(self, task_id: UUID, version: int) -> Position | None:
        with self.store.recorder.datastore.get_connection() as conn:
            row = conn.execute(self._select_position, (task_id, version)).fetchone()
        return Position(int(row["tx_id"]), row["notification_id"]) if row else None


def _violates(error: Exception, constraint: str) -> bool:
    cause = error.__cause__
    diag = getattr(cause, "diag", None)
    return getattr(diag, "constraint_name", None) == constraint
