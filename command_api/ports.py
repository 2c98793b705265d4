"""The event-store port the executor depends on: what it needs from a store, and the
errors a store raises. `command_api.store` implements it on PostgreSQL; the tests' fake
(`tests/support/memory_store.py`) in memory, and one contract suite runs against both."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol
from uuid import UUID

from shared.events import Task
from shared.position import Position


class VersionConflict(Exception):
    """Another writer appended this task's next version first."""


class KeyTaken(Exception):
    """Another request with this Idempotency-Key committed first."""


@dataclass(frozen=True)
class IdempotencyRecord:
    """A row of the idempotency table: what the first command with this user's
    Idempotency-Key produced, so a retry answers alike. `status` holds the HTTP status
    of the first answer (201, 200 or 204: the stored format; `command_api.executor`
    derives it from the outcome); `task_id`/`version` name the task as it was then."""

    user_id: str
    key: str
    fingerprint: str
    status: int
    task_id: UUID | None
    version: int | None


class EventStore(Protocol):
    async def get(self, task_id: UUID, version: int | None = None) -> Task | None:
        """The task as of `version` (default: the latest); None if it has no events."""

    async def save(
        self, task: Task, idempotency: IdempotencyRecord | None = None
    ) -> tuple[int, Position | None]:
        """Append the task's pending events and the idempotency record, all or nothing:
        how many events, and the position of the last (None when there were none).
        Raises VersionConflict or KeyTaken, leaving nothing written."""

    async def key_record(self, user_id: str, key: str) -> IdempotencyRecord | None:
        """The idempotency record of this user's key, if any."""

    async def position_of(self, task_id: UUID, version: int) -> Position | None:
        """Where the event of this task version sits in the global order."""
