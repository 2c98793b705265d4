"""Commands: what a user asks to change, as plain values. The actor is never part of a
command; it travels beside it as a `Stamp` (from the token and the request)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from uuid import UUID

from shared.events import DEFAULT_PRIORITY


@dataclass(frozen=True)
class Stamp:
    """Who acts, and in which request: carried by every event the command emits."""

    user_id: str
    request_id: str


@dataclass(frozen=True)
class Create:
    title: str
    description: str | None = None
    priority: str = DEFAULT_PRIORITY
    tags: tuple[str, ...] = ()
    due_date: datetime | None = None


@dataclass(frozen=True)
class Change:
    """Each field optional: None leaves it as it is. `description` and `due_date` are
    set (to a value or to None) only when `set_description` / `set_due_date`, since
    None is also a description and a due date."""

    task_id: UUID
    title: str | None = None
    description: str | None = None
    set_description: bool = False
    completed: bool | None = None
    priority: str | None = None
    tags: tuple[str, ...] | None = None
    due_date: datetime | None = None
    set_due_date: bool = False


@dataclass(frozen=True)
class SetCompleted:
    """Mark the task done or not done; `completed=None` toggles it."""

    task_id: UUID
    completed: bool | None = None


@dataclass(frozen=True)
class Delete:
    task_id: UUID


Command = Create | Change | SetCompleted | Delete
