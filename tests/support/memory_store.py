"""The event-store port (`command_api.ports.EventStore`) in memory, for the executor's
unit tests. `tests/integration/test_event_store_contract.py` proves it behaves as
`PostgresEventStore` does. Events are kept as the library stores them (through the
same mapper), so a read builds new aggregates, never hands out a saved one."""

from __future__ import annotations

from uuid import UUID

from eventsourcing.persistence import StoredEvent

from command_api.ports import IdempotencyRecord, KeyTaken, VersionConflict
from shared.events import Task
from shared.eventstore import mapper
from shared.position import Position


class MemoryEventStore:
    def __init__(self) -> None:
        self.mapper = mapper()
        self.events: dict[UUID, list[StoredEvent]] = {}
        self.positions: dict[tuple[UUID, int], Position] = {}
        self.keys: dict[tuple[str, str], IdempotencyRecord] = {}
        self._tx = 0
        self._notification = 0
        self.saves = 0  # how many saves were attempted (for tests)

    async def get(self, task_id: UUID, version: int | None = None) -> Task | None:
        task = None
        for stored in self.events.get(task_id, []):
            if version is not None and stored.originator_version > version:
                break
            task = self.mapper.to_domain_event(stored).mutate(task)
        assert task is None or isinstance(task, Task)
        return task

    async def save(
        self, task: Task, idempotency: IdempotencyRecord | None = None
    ) -> tuple[int, Position | None]:
        self.saves += 1
        pending = task.collect_events()
        stored = [self.mapper.to_stored_event(e) for e in pending]
        if idempotency is not None and (idempotency.user_id, idempotency.key) in self.keys:
            raise KeyTaken
        for event in stored:
            history = self.events.get(event.originator_id, [])
            taken = {e.originator_version for e in history}
            if event.originator_version in taken:
                raise VersionConflict
        # Only after its predecessor (the PostgreSQL store's rule): version 1, or n - 1.
        if stored and stored[0].originator_version > 1 and (
            stored[0].originator_version - 1
            not in {e.originator_version for e in self.events.get(stored[0].originator_id, [])}
        ):
            raise VersionConflict
        if idempotency is not None:
            self.keys[idempotency.user_id, idempotency.key] = idempotency
        if not stored:
            return 0, None
        self._tx += 1
        position = None
        for event in stored:
            self._notification += 1
            position = Position(self._tx, self._notification)
            self.events.setdefault(event.originator_id, []).append(event)
            self.positions[event.originator_id, event.originator_version] = position
        return len(stored), position

    async def key_record(self, user_id: str, key: str) -> IdempotencyRecord | None:
        return self.keys.get((user_id, key))

    async def position_of(self, task_id: UUID, version: int) -> Position | None:
        return self.positions.get((task_id, version))
