"""The decisions: a task and a command in, the task with its pending events out, or a
domain error before any event."""

from __future__ import annotations

import uuid

import pytest

from command_api.commands import Change, Create, Delete, SetCompleted, Stamp
from command_api.decisions import NotYourTask, TaskDeleted, TaskNotFound, decide
from shared.events import Task

OWNER = Stamp("owner", "req-1")


def created(**fields: object) -> Task:
    task = decide(None, Create("Buy milk", "2 litres"), OWNER)
    task.collect_events()
    for name, value in fields.items():
        setattr(task, name, value)
    return task


def topics(task: Task) -> list[str]:
    return [type(e).TOPIC for e in task.collect_events()]


def test_create_stamps_the_event_with_the_actor_and_request() -> None:
    task = decide(None, Create("Buy milk"), Stamp("u1", "r9"))
    (event,) = task.collect_events()
    assert type(event).TOPIC == "TaskCreated"
    assert (event.owner, event.actor, event.request_id) == ("u1", "u1", "r9")
    assert (task.title, task.description, task.completed, task.version) == (
        "Buy milk", None, False, 1)


def test_change_emits_only_what_changes() -> None:
    task = created()
    decide(task, Change(task.id, title="Buy milk", completed=False), OWNER)
    assert topics(task) == []
    decide(task, Change(task.id, title="Buy oat milk", completed=True), OWNER)
    assert topics(task) == ["TaskTitleChanged", "TaskCompleted"]


def test_a_description_is_changed_only_when_given_even_to_none() -> None:
    task = created()
    decide(task, Change(task.id, description=None), OWNER)
    assert topics(task) == [] and task.description == "2 litres"
    decide(task, Change(task.id, description=None, set_description=True), OWNER)
    assert topics(task) == ["TaskDescriptionChanged"] and task.description is None


def test_set_completed_sets_or_toggles() -> None:
    task = created()
    decide(task, SetCompleted(task.id), OWNER)
    assert task.completed is True and topics(task) == ["TaskCompleted"]
    decide(task, SetCompleted(task.id), OWNER)
    assert task.completed is False and topics(task) == ["TaskReopened"]
    decide(task, SetCompleted(task.id, completed=False), OWNER)
    assert topics(task) == []


def test_delete_emits_deleted() -> None:
    task = created()
    decide(task, Delete(task.id), OWNER)
    assert task.deleted and topics(task) == ["TaskDeleted"]


@pytest.mark.parametrize(
    "command",
    [lambda i: Change(i, title="x"), lambda i: SetCompleted(i), lambda i: Delete(i)],
)
def test_refusals_come_before_any_event(command) -> None:
    missing = uuid.uuid4()
    with pytest.raises(TaskNotFound):
        decide(None, command(missing), OWNER)
    task = created()
    with pytest.raises(NotYourTask):
        decide(task, command(task.id), Stamp("intruder", "r"))
    assert topics(task) == [] and task.version == 1
    gone = created(deleted=True)
    for stamp in (OWNER, Stamp("intruder", "r")):  # deleted counts before whose it is
        with pytest.raises(TaskDeleted):
            decide(gone, command(gone.id), stamp)
    assert topics(gone) == []
