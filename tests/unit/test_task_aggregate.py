"""The Task aggregate decides; these need no I/O."""

from __future__ import annotations

import os

import pytest

from shared.etag import IfMatch, etag
from shared.events import EVENT_TOPICS, Task, TaskDeleted
from shared.position import PREFIX, BadPosition, Position, PositionCodec


def new_task() -> Task:
    return Task.create(owner="u1", title="t", description=None, actor="u1", request_id="r1")


def topics(task: Task) -> list[str]:
    return [type(e).TOPIC for e in task.collect_events()]


def test_creating_emits_task_created_with_owner_and_stamp():
    task = new_task()
    (event,) = task.collect_events()
    assert type(event).TOPIC == "TaskCreated"
    assert (event.owner, event.actor, event.request_id, event.title) == ("u1", "u1", "r1", "t")
    assert event.timestamp.utcoffset().total_seconds() == 0


def test_changes_emit_one_event_per_changed_field_and_none_for_no_change():
    task = new_task()
    task.collect_events()
    task.change(actor="u1", request_id="r2", title="t", completed=False)
    assert topics(task) == []
    task.change(actor="u1", request_id="r2", title="new", description="d", set_description=True, completed=True)
    assert topics(task) == ["TaskTitleChanged", "TaskDescriptionChanged", "TaskCompleted"]
    task.change(actor="u1", request_id="r3", completed=False)
    assert topics(task) == ["TaskReopened"]
    assert (task.title, task.description, task.completed, task.version) == ("new", "d", False, 5)


def test_a_deleted_task_takes_no_more_commands():
    task = new_task()
    task.delete(actor="u1", request_id="r")
    assert task.deleted
    with pytest.raises(TaskDeleted):
        task.change(actor="u1", request_id="r", title="x")
    with pytest.raises(TaskDeleted):
        task.delete(actor="u1", request_id="r")


def test_every_event_topic_is_registered_once():
    assert set(EVENT_TOPICS) == {
        "TaskCreated", "TaskTitleChanged", "TaskDescriptionChanged",
        "TaskPriorityChanged", "TaskTagsChanged", "TaskDueDateChanged",
        "TaskCompleted", "TaskReopened", "TaskDeleted",
    }


def test_positions_round_trip_sealed_and_reject_foreign_tokens():
    codec = PositionCodec(os.urandom(32))
    position = Position(2**63 - 1, 42)
    token = codec.encode(position)
    assert codec.decode(token) == position
    assert Position(7, 42) < Position(8, 1) < Position(8, 2)  # transaction first
    # Sealed: no number in it; one position, one token (a retry answers alike).
    assert token.startswith(PREFIX) and str(position.tx_id) not in token
    assert codec.encode(Position(2**63 - 1, 42)) == token != codec.encode(Position(2**63 - 1, 43))
    assert len(token) <= 64 and token.isascii()
    # Forged: the old plain format, garbage, a flipped character, a truncated token,
    # one sealed under another key, a valid one with junk appended.
    flipped = token[:10] + ("A" if token[10] != "A" else "B") + token[11:]
    other = PositionCodec(os.urandom(32)).encode(position)
    for bad in ("42", "p2.1.5", "p2.7.42", "", "p3.", flipped, token[:-3], other, token + "AA"):
        with pytest.raises(BadPosition):
            codec.decode(bad)


def test_if_match_accepts_current_weak_and_star_and_rejects_garbage():
    assert IfMatch.parse(etag(3)).accepts(3)
    assert IfMatch.parse('W/"v3"').accepts(3)
    assert IfMatch.parse('"v1", "v3"').accepts(3)
    assert IfMatch.parse("*").accepts(99)
    assert not IfMatch.parse('"v2"').accepts(3)
    assert not IfMatch.parse("garbage").accepts(3)
    assert IfMatch.parse(None) is None
