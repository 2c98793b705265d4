"""Decisions: the current task (None when there is none) and a command in, the task with
its new pending events out, or a domain error. Pure: no I/O, no HTTP; the executor
loads and saves around them, the routes map their errors to responses.

A decision emits an event only when something changes, so a retried or repeated
command is harmless and the history holds only real changes."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from command_api.commands import Change, Command, Create, Delete, SetCompleted, Stamp
from shared.events import Task, TaskDeleted

__all__ = ["NotYourTask", "TaskDeleted", "TaskNotFound", "decide"]


class TaskNotFound(Exception):
    """No task has this id."""


class NotYourTask(Exception):
    """The task belongs to another user."""


def _live(task: Task | None, stamp: Stamp) -> Task:
    """The task a command on an existing task may act on. A deleted task counts as
    deleted before it counts as someone else's."""
    if task is None:
        raise TaskNotFound
    if task.deleted:
        raise TaskDeleted(str(task.id))
    if task.owner != stamp.user_id:
        raise NotYourTask
    return task


def create(_: Task | None, command: Create, stamp: Stamp) -> Task:
    return Task.create(
        owner=stamp.user_id,
        title=command.title,
        description=command.description,
        priority=command.priority,
        tags=command.tags,
        due_date=command.due_date,
        actor=stamp.user_id,
        request_id=stamp.request_id,
    )


def change(task: Task | None, command: Change, stamp: Stamp) -> Task:
    task = _live(task, stamp)
    task.change(
        actor=stamp.user_id,
        request_id=stamp.request_id,
        title=command.title,
        description=command.description,
        set_description=command.set_description,
        completed=command.completed,
        priority=command.priority,
        tags=command.tags,
        due_date=command.due_date,
        set_due_date=command.set_due_date,
    )
    return task


def set_completed(task: Task | None, command: SetCompleted, stamp: Stamp) -> Task:
    task = _live(task, stamp)
    target = (not task.completed) if command.completed is None else command.completed
    task.change(actor=stamp.user_id, request_id=stamp.request_id, completed=target)
    return task


def delete(task: Task | None, command: Delete, stamp: Stamp) -> Task:
    task = _live(task, stamp)
    task.delete(actor=stamp.user_id, request_id=stamp.request_id)
    return task


_DECISIONS: dict[type[Any], Callable[[Task | None, Any, Stamp], Task]] = {
    Create: create,
    Change: change,
    SetCompleted: set_completed,
    Delete: delete,
}


def decide(task: Task | None, command: Command, stamp: Stamp) -> Task:
    """The decision for `command`'s type. Raises before emitting any event when the
    command is refused, so a refused command leaves `task` as it was."""
    return _DECISIONS[type(command)](task, command, stamp)
