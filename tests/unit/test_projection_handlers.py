"""The event decoder and the read models' pure handlers, without a database."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

import orjson
import pytest

from projections import task_history, task_list, user_stats
from shared.events import EVENT_TOPICS, UndecodableEvent, decode_event

WHEN = '{"_type_":"datetime_iso","_data_":"2025-03-04T05:06:07+00:00"}'


def event(topic: str, version: int, extra: str = "") -> object:
    state = f'{{"timestamp":{WHEN},"actor":"u1","request_id":"r1"{extra}}}'.encode()
    return decode_event(10 + version, TASK, version, topic, state)


TASK = uuid.uuid4()


def test_decodes_the_transcoders_wrapped_values_and_the_stamp() -> None:
    e = event("TaskCreated", 1, ',"originator_topic":"Task","owner":"u1","title":"T",'
              '"description":null')
    assert e.timestamp == datetime(2025, 3, 4, 5, 6, 7, tzinfo=UTC)
    assert (e.actor, e.request_id, e.position, e.version) == ("u1", "r1", 11, 1)
    assert e.data == {"owner": "u1", "title": "T", "description": None}


def test_refuses_an_unknown_topic_or_a_state_without_its_stamp() -> None:
    with pytest.raises(UndecodableEvent, match="unknown topic"):
        decode_event(1, TASK, 1, "TaskExploded", b"{}")
    with pytest.raises(UndecodableEvent):
        decode_event(1, TASK, 1, "TaskCompleted", b'{"actor":"u"}')


@pytest.mark.parametrize("model", [task_list.EVOLVE, task_history.CHANGES])
def test_every_event_topic_has_a_handler(model: dict) -> None:
    assert set(model) == set(EVENT_TOPICS)


def test_fold_history_and_counts_agree_over_a_tasks_life() -> None:
    created = event("TaskCreated", 1, ',"owner":"u1","title":"A","description":"d"')
    renamed = event("TaskTitleChanged", 2, ',"title":"B"')
    done = event("TaskCompleted", 3)
    gone = event("TaskDeleted", 4)
    state = None
    changes, counts = [], [0, 0, 0]
    for e in (created, renamed, done, gone):
        changes.append(task_history.CHANGES[e.topic](e, state))
        delta = user_stats.DELTAS.get(e.topic, lambda _: (0, 0, 0))(state)
        counts = [c + d for c, d in zip(counts, delta)]
        if e.topic == "TaskCompleted":
            assert counts == [1, 1, 0]
        state = task_list.evolve(e, state)
    assert changes[1] == {"title": {"from": "A", "to": "B"}}
    assert changes[2] == {"completed": {"from": False, "to": True}}
    assert state is None and counts == [0, 0, 0]


def test_the_folds_spelled_out_hashes_equal_the_generic_row_hash() -> None:
    """`Fold` writes each history row's canonical text directly (it is the replay's hot
    loop): it must hash exactly as `row_hash` of the projector's row would."""
    from projections.verify import MASK, Fold, row_hash, task_row_hash

    owner, task = "u\u00e9\"1", uuid.uuid4()
    lives = [
        ("TaskCreated", ',"owner":"u\\u00e9\\"1","title":"A \\"q\\" \\u00fc\\n","description":null'),
        ("TaskTitleChanged", ',"title":"B\\t\\\\ \\u2603"'),
        ("TaskDescriptionChanged", ',"description":"d \\u0001"'),
        ("TaskCompleted", ""),
        ("TaskReopened", ""),
        ("TaskDescriptionChanged", ',"description":null'),
        ("TaskCompleted", ""),
        ("TaskDeleted", ""),
    ]
    fold, state, expected = Fold(), None, 0
    for version, (topic, extra) in enumerate(lives, start=1):
        raw = (f'{{"timestamp":{WHEN},"actor":"a\\u00e9","request_id":"r \\"1\\""{extra}}}'
               .encode())
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
            ) == row_hash(owner, task, after.title, after.description, after.completed,
                          after.created_at, after.updated_at, after.version, after.position,
                          after.priority, orjson.dumps(list(after.tags)).decode(),
                          after.due_date)
        state = after
    assert fold.history[owner] == [len(lives), expected]
    assert fold.problems == []


def test_every_read_model_in_the_manifest_has_the_one_shape() -> None:
    """db init, the runner, the replay and the verification iterate `READ_MODELS`: each
    module must offer what they call, name a table of `Tables`, and be summarised."""
    from dataclasses import fields

    from projections.manifest import READ_MODELS, STATE_MODEL, ddl, table_names
    from projections.verify import TABLE_SUMMARIES
    from shared.catalog import LIVE, Tables

    assert STATE_MODEL in READ_MODELS
    names = {f.name for f in fields(Tables)} - {"checkpoints"}
    assert sorted(m.TABLE for m in READ_MODELS) == sorted(names)
    assert table_names(LIVE) == list(LIVE.read_tables)
    for model in READ_MODELS:
        assert model.TABLE in TABLE_SUMMARIES, model.__name__
        assert model.QUERIES.startswith("query_api.queries: "), model.__name__
        for make in (model.tables, model.keys, model.indexes):
            assert all(isinstance(s, str) for s in make(LIVE)), (model.__name__, make)
        assert model.tables(LIVE, load=True)
        rows = model.Rows()
        assert callable(rows.apply) and callable(rows.write), model.__name__
        assert model is STATE_MODEL or callable(rows.copy), model.__name__
        assert all(s in ddl() for s in model.tables(LIVE) + model.indexes(LIVE))
