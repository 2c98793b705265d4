"""Commands: what a user asks to change, as plain values. The actor is never part of a
command; it travels beside it as a `Stamp` (from the token and the request)."""

from __future__ import annotations

from dataclasses import dataclass
from uuid import UUID


@dataclass(frozen=True)
class Stamp:
    """Who acts, and in which request: carried by every event the command emits."""

    user_id: str
    request_id: str


@dataclass(frozen=True)
class Create:
    title: str
    description: str | None = None


@dataclass(frozen=True)
class Change:
    """Each field optional: None leaves it as it is. `description` is set (to a text or
    to None) only when `set_description`, since None is also a description."""

    task_id: UUID
    title: str | None = None
    description: str | None = None
    set_description: bool = False
    completed: bool | None = None


@dataclass(frozen=True)
class SetCompleted:
    """Mark the task done or not done; `completed=None` toggles it."""

    task_id: UUID
    completed: bool | None = None


@dataclass(frozen=True)
class Delete:
    task_id: UUID


Command = Create | Change | SetCompleted | Delete
