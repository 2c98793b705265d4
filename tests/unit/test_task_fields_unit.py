"""Priority, tags and due date without a database: their rules, the events that change
them, how old events (without the fields) still fold, the bodies' 422s, and the
read models' and the verification fold's handlers."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime, timedelta, timezone

import orjson
import pytest
from eventsourcing.persistence import StoredEvent
from pydantic import ValidationError

from command_api.bodies import ChangeTask, CreateTask, ReplaceTask
from projections import task_history, task_list, user_stats
from projections.audit import _plain
from projections.verify import MASK, Fold, row_hash, task_row_hash
from shared.documents import task_document
from shared.events import (
    DEFAULT_PRIORITY,
    EVENT_TOPICS,
    PRIORITIES,
    TAG_PATTERN,
    Task,
    decode_event,
    normal_tag,
    normal_tags,
    parse_due_date,
)
from shared.eventstore import mapper

STAMP = {"actor": "u1", "request_id": "r1"}
MAY_DAY = datetime(2026, 5, 1, 17, 0, tzinfo=UTC)


def new_task(**fields: object) -> Task:
    return Task.create(  # type: ignore[arg-type]
        owner="u1", title="t", description=None, **STAMP, **fields)


def topics(task: Task) -> list[str]:
    return [type(e).TOPIC for e in task.collect_events()]


# -- the rules -----------------------------------------------------------------------


@pytest.mark.parametrize(("text", "expected"), [
    ("2026-05-01T17:00:00Z", MAY_DAY),
    ("2026-05-01t17:00:00z", MAY_DAY),
    ("2026-05-01T19:00:00+02:00", MAY_DAY),
    ("2026-05-01T12:30-0430", MAY_DAY),  # basic-format offset, no seconds
    ("2026-05-01T17:00", MAY_DAY),  # no offset: UTC (an HTML datetime-local value)
    ("2026-05-01 17:00:00.000Z", MAY_DAY),
    ("2026-05-01", datetime(2026, 5, 1, tzinfo=UTC)),  # a date alone: midnight UTC
    ("2026-05-01T17:00:00.1234567891Z", MAY_DAY.replace(microsecond=123456)),  # cut, not rounded
    ("0001-01-01T00:00:00Z", datetime(1, 1, 1, tzinfo=UTC)),
    ("9999-12-31T23:59:59.999999Z", datetime(9999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC)),
])
def test_a_due_date_is_read_as_iso_8601_and_kept_in_utc(text: str, expected: datetime) -> None:
    value = parse_due_date(text)
    assert value == expected and value.utcoffset() == timedelta(0)
    assert value.tzinfo is UTC


@pytest.mark.parametrize(("text", "says"), [
    ("1700000000", "ISO 8601"),  # no Unix times (pydantic's lax datetime takes them)
    ("2026-05-01T17", "ISO 8601"),
    ("May 1, 2026", "ISO 8601"),
    ("\u0662\u0660\u0662\u0666-05-01", "ISO 8601"),  # digits of another script
    ("2026-05-01T17:00:00+24:00", "offset"),
    ("2026-02-30", "valid date"),
    ("2026-05-01T24:00:00Z", "valid date"),
    ("2026-05-01T23:59:60Z", "valid date"),
    ("0000-12-31", "valid date"),
    ("0001-01-01T00:00:00+05:00", "years 1 to 9999"),  # year 0 once in UTC
    ("9999-12-31T23:00:00-05:00", "years 1 to 9999"),  # year 10000 once in UTC
    ("2026-05-01T17:00:00" + "0" * 80 + "Z", "ISO 8601"),
])
def test_a_due_date_that_is_not_one_is_refused_saying_why(text: str, says: str) -> None:
    with pytest.raises(ValueError, match=says):
        parse_due_date(text)


def test_tags_are_trimmed_lowercased_and_deduplicated_in_the_order_given() -> None:
    assert normal_tags([" Work", "home ", "WORK", "Home", "a b"]) == ["work", "home", "a b"]
    assert normal_tags([]) == []
    assert normal_tag("x" * 32) == "x" * 32
    assert normal_tags(["t"] * 10) == ["t"]  # ten as sent, one once deduplicated


@pytest.mark.parametrize(("tags", "says"), [
    (["t"] * 11, "at most 10 tags"),
    (["x" * 33], "at most 32 characters"),
    (["  "], "blank"),
    ([""], "blank"),
    (["a\tb"], "control characters"),
    (["\x1fwork"], "control characters"),  # not stripped away as whitespace
    (["work\x85"], "control characters"),
    (["\ud800"], "lone surrogates"),
])
def test_tags_break_no_limit(tags: list[str], says: str) -> None:
    with pytest.raises(ValueError, match=says):
        normal_tags(tags)


def test_the_documented_tag_pattern_refuses_what_the_rule_refuses() -> None:
    import re

    pattern = re.compile(TAG_PATTERN)
    for ok in ("work", " a b ", "été", "x" * 32):
        assert pattern.search(ok) and normal_tag(ok)
    for bad in ("", "   ", "a\x00b", "\x1fwork", "a\nb", "x\x7f", "\u00a0"):
        assert not pattern.search(bad)
        with pytest.raises(ValueError):
            normal_tag(bad)


def test_priorities_are_in_their_order_with_medium_the_default() -> None:
    assert PRIORITIES == ("low", "medium", "high") and DEFAULT_PRIORITY == "medium"


# -- the events ------------------------------------------------------------------------


def test_each_field_is_changed_by_an_event_of_its_own_and_only_when_it_changes() -> None:
    task = new_task()
    task.collect_events()
    task.change(**STAMP, priority="medium", tags=[], due_date=None, set_due_date=True)
    assert topics(task) == []  # as created: nothing changes
    task.change(**STAMP, title="new", priority="high", tags=["a", "b"], due_date=MAY_DAY,
                set_due_date=True)
    assert topics(task) == ["TaskTitleChanged", "TaskPriorityChanged", "TaskTagsChanged",
                            "TaskDueDateChanged"]
    assert (task.priority, task.tags, task.due_date) == ("high", ("a", "b"), MAY_DAY)
    task.change(**STAMP, tags=["b", "a"])  # another order is another list
    task.change(**STAMP, due_date=None)  # without set_due_date: left as it is
    assert topics(task) == ["TaskTagsChanged"]
    task.change(**STAMP, due_date=None, set_due_date=True)
    assert topics(task) == ["TaskDueDateChanged"] and task.due_date is None
    assert {"TaskPriorityChanged", "TaskTagsChanged", "TaskDueDateChanged"} <= set(EVENT_TOPICS)


def test_a_task_created_with_the_fields_carries_them_in_task_created() -> None:
    task = new_task(priority="low", tags=["x"], due_date=MAY_DAY)
    (event,) = task.collect_events()
    assert (event.priority, event.tags, event.due_date) == ("low", ["x"], MAY_DAY)
    assert (task.priority, task.tags, task.due_date) == ("low", ("x",), MAY_DAY)


def test_events_stored_before_the_fields_still_fold_to_a_task_with_the_defaults() -> None:
    """A TaskCreated as stored before priority, tags and due_date existed (its exact
    form), then a change: the aggregate folds them, with the defaults."""
    task_id = uuid.uuid4()
    old_created = (
        b'{"timestamp":{"_type_":"datetime_iso","_data_":"2025-01-02T03:04:05.000006+00:00"},'
        b'"originator_topic":"Task","actor":"u1","request_id":"r1","owner":"u1",'
        b'"title":"Old","description":null}'
    )
    old_titled = (
        b'{"timestamp":{"_type_":"datetime_iso","_data_":"2025-01-03T03:04:05+00:00"},'
        b'"actor":"u1","request_id":"r2","title":"Older"}'
    )
    m = mapper()
    task = None
    for version, (topic, state) in enumerate(
        [("TaskCreated", old_created), ("TaskTitleChanged", old_titled)], start=1
    ):
        task = m.to_domain_event(StoredEvent(task_id, version, topic, state)).mutate(task)
    assert isinstance(task, Task)
    assert (task.title, task.priority, task.tags, task.due_date) == ("Older", "medium", (), None)
    task.change(**STAMP, priority="high")
    assert topics(task) == ["TaskPriorityChanged"] and task.version == 3

    # The read models fold the same stored events alike.
    state = None
    for version, (topic, raw) in enumerate(
        [("TaskCreated", old_created), ("TaskTitleChanged", old_titled)], start=1
    ):
        e = decode_event(version, task_id, version, topic, raw)
        if version == 1:
            assert set(task_history.CHANGES[topic](e, state)) == {"title", "description",
                                                                  "completed"}
        state = task_list.evolve(e, state)
    assert state is not None
    assert (state.priority, state.tags, state.due_date) == ("medium", (), None)
    assert orjson.loads(task_list.document(state))["tags"] == []


def test_the_event_states_round_trip_through_the_stores_mapper() -> None:
    task = new_task(priority="high", tags=["a"], due_date=MAY_DAY)
    task.change(**STAMP, priority="low", tags=[], due_date=None, set_due_date=True)
    m = mapper()
    stored = [m.to_stored_event(e) for e in task.collect_events()]
    assert json.loads(stored[0].state)["due_date"] == {
        "_type_": "datetime_iso", "_data_": "2026-05-01T17:00:00+00:00"}
    again = None
    for s in stored:
        again = m.to_domain_event(s).mutate(again)
    assert isinstance(again, Task)
    assert (again.priority, again.tags, again.due_date) == ("low", (), None)
    decoded = [decode_event(n, s.originator_id, s.originator_version, s.topic, s.state)
               for n, s in enumerate(stored, start=1)]
    assert decoded[0].data["due_date"] == MAY_DAY
    assert [d.topic for d in decoded] == ["TaskCreated", "TaskPriorityChanged",
                                          "TaskTagsChanged", "TaskDueDateChanged"]


# -- the bodies ------------------------------------------------------------------------


def test_create_takes_the_fields_normalised_and_defaults_them() -> None:
    body = CreateTask.model_validate({"title": "t", "priority": "high", "tags": [" A", "a"],
                                      "due_date": "2026-05-01T19:00+02:00"})
    assert (body.priority, body.tags, body.due_date) == ("high", ("a",), MAY_DAY)
    plain = CreateTask.model_validate({"title": "t"})
    assert (plain.priority, plain.tags, plain.due_date) == ("medium", (), None)
    assert CreateTask.model_validate({"title": "t", "due_date": None}).due_date is None


@pytest.mark.parametrize(("body", "field", "says"), [
    ({"priority": "urgent"}, "priority", "'low', 'medium' or 'high'"),
    ({"priority": "High"}, "priority", "'low', 'medium' or 'high'"),
    ({"priority": 3}, "priority", ""),
    ({"tags": "work"}, "tags", "list of strings"),
    ({"tags": [1]}, "tags", "list of strings"),
    ({"tags": ["x"] * 11}, "tags", "at most 10 tags"),
    ({"tags": ["x" * 33]}, "tags", "32 characters"),
    ({"tags": [" "]}, "tags", "blank"),
    ({"due_date": 1700000000}, "due_date", "must be a string"),
    ({"due_date": "tomorrow"}, "due_date", "ISO 8601"),
    ({"due_date": "0001-01-01T00:00:00+01:00"}, "due_date", "years 1 to 9999"),
])
def test_each_field_refuses_what_breaks_its_limits(body: dict, field: str, says: str) -> None:
    for model, base in ((CreateTask, {"title": "t"}), (ReplaceTask, {"title": "t"}),
                        (ChangeTask, {})):
        with pytest.raises(ValidationError) as failed:
            model.model_validate({**base, **body})
        (error,) = failed.value.errors()
        assert error["loc"] == (field,) and says in error["msg"], (model, error)


def test_patch_refuses_null_priority_and_tags_and_takes_a_null_due_date() -> None:
    for field in ("priority", "tags"):
        with pytest.raises(ValidationError, match="must not be null"):
            ChangeTask.model_validate({field: None})
    body = ChangeTask.model_validate({"due_date": None})
    assert body.due_date is None and body.model_fields_set == {"due_date"}


# -- the read models and the verification fold ----------------------------------------


WHEN = '{"_type_":"datetime_iso","_data_":"2026-11-27T06:03:02.120000+00:00"}'


def _raw(extra: str) -> bytes:
    return f'{{"timestamp":{WHEN},"actor":"a","request_id":"r"{extra}}}'.encode()


def test_history_shows_each_change_and_a_creation_only_its_non_default_fields() -> None:
    task_id = uuid.uuid4()
    due = '{"_type_":"datetime_iso","_data_":"2026-05-01T17:00:00+00:00"}'
    plain = decode_event(1, task_id, 1, "TaskCreated", _raw(
        ',"owner":"o","title":"t","description":null,'
        '"priority":"medium","tags":[],"due_date":null'))
    assert task_history.CHANGES["TaskCreated"](plain, None) == {
        "title": {"from": None, "to": "t"}, "description": {"from": None, "to": None},
        "completed": {"from": None, "to": False}}
    full = decode_event(1, task_id, 1, "TaskCreated", _raw(
        ',"owner":"o","title":"t","description":null,'
        f'"priority":"high","tags":["a"],"due_date":{due}'))
    changes = task_history.CHANGES["TaskCreated"](full, None)
    assert changes["priority"] == {"from": None, "to": "high"}
    assert changes["tags"] == {"from": None, "to": ["a"]}
    assert changes["due_date"] == {"from": None, "to": "2026-05-01T17:00:00+00:00"}
    state = task_list.evolve(full, None)
    assert state is not None
    cleared = decode_event(2, task_id, 2, "TaskDueDateChanged", _raw(',"due_date":null'))
    assert task_history.CHANGES["TaskDueDateChanged"](cleared, state) == {
        "due_date": {"from": "2026-05-01T17:00:00+00:00", "to": None}}
    retagged = decode_event(3, task_id, 3, "TaskTagsChanged", _raw(',"tags":["b","a"]'))
    assert task_history.CHANGES["TaskTagsChanged"](retagged, state) == {
        "tags": {"from": ["a"], "to": ["b", "a"]}}
    lowered = decode_event(4, task_id, 4, "TaskPriorityChanged", _raw(',"priority":"low"'))
    assert task_history.CHANGES["TaskPriorityChanged"](lowered, state) == {
        "priority": {"from": "high", "to": "low"}}
    for e in (cleared, retagged, lowered):  # no count changes
        assert e.topic not in user_stats.DELTAS
        after = task_list.evolve(e, state)
        assert after is not None and after.updated_at == e.timestamp and after.version == e.version


def test_the_folds_hashes_equal_the_generic_row_hash_with_the_new_events() -> None:
    """As tests/unit/test_projection_handlers.py checks for the first events: the
    verification fold's spelled-out texts hash as the projector's rows would."""
    owner, task = "u\u00e9\"1", uuid.uuid4()
    due = '{"_type_":"datetime_iso","_data_":"2026-05-01T19:00:00.5+02:00"}'
    lives = [
        ("TaskCreated", ',"owner":"u\\u00e9\\"1","title":"A","description":null,'
                        '"priority":"high","tags":["\\u00e9t\\u00e9","a \\"b\\""],'
                        f'"due_date":{due}'),
        ("TaskTagsChanged", ',"tags":[]'),
        ("TaskTagsChanged", ',"tags":["x\\\\y","z"]'),
        ("TaskPriorityChanged", ',"priority":"low"'),
        ("TaskDueDateChanged", ',"due_date":null'),
        ("TaskDueDateChanged", f',"due_date":{due}'),
        ("TaskCompleted", ""),
        ("TaskDeleted", ""),
    ]
    fold, state, expected = Fold(), None, 0
    for version, (topic, extra) in enumerate(lives, start=1):
        raw = _raw(extra)
        e = decode_event(100 + version, task, version, topic, raw)
        fold.fold(100 + version, task, version, topic, raw)
        after = task_list.evolve(e, state)
        expected = (expected + row_hash(owner, e.position, task, version, topic, e.actor,
                                        e.request_id, e.timestamp,
                                        task_history.CHANGES[topic](e, state))) & MASK
        if after is not None:
            assert fold.expected([owner])[owner].tasks_sum == task_row_hash(
                owner, task, after.title, after.description, after.completed,
                after.created_at, after.updated_at, after.version, after.position,
                after.priority, after.tags, after.due_date,
            ) == row_hash(owner, task, after.title, after.description, after.completed,
                          after.created_at, after.updated_at, after.version, after.position,
                          after.priority, orjson.dumps(list(after.tags)).decode(),
                          after.due_date)
        state = after
    assert fold.history[owner] == [len(lives), expected]
    assert fold.problems == []


def test_the_document_shows_the_fields_in_utc() -> None:
    at = datetime(2026, 1, 2, tzinfo=UTC)
    doc = task_document(uuid.uuid4(), "u", "t", None, False, at, at, 1, "low", ("a",),
                        datetime(2026, 5, 1, 19, tzinfo=timezone(timedelta(hours=2))))
    assert (doc["priority"], doc["tags"], doc["due_date"]) == (
        "low", ["a"], "2026-05-01T17:00:00+00:00")
    assert list(doc) == ["id", "user_id", "title", "description", "completed", "priority",
                         "tags", "due_date", "created_at", "updated_at", "version"]
    assert _plain(MAY_DAY) == "2026-05-01T17:00:00+00:00" and _plain(["a"]) == ["a"]
