"""The --scale mode's seeding and result files (bench/scale.py) on the real PostgreSQL,
in a database of its own (the seeded owners are the same in every run)."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from bench import scale, scale_report
from shared.catalog import EVENTS_TABLE
from shared.events import decode_event
from shared.settings import Settings
from taskctl.dbinit import init_database
from tests.support import TEST_SECRET, PostgresServer


@pytest.fixture
def scale_settings(pg_server: PostgresServer) -> Iterator[Settings]:
    url = pg_server.create_database("bench_scale_test")
    settings = Settings(environment="test", database_url=url, better_auth_secret=TEST_SECRET)
    init_database(settings)
    yield settings
    pg_server.drop_database(url)


def test_seeding_makes_users_times_tasks_with_their_histories(scale_settings: Settings):
    events, _ = scale.seed(scale_settings, users=3, tasks_per_user=5)

    assert events == 3 * 5 * scale.EVENTS_PER_TASK
    with psycopg.connect(scale_settings.require_database_url()) as conn:
        rows = conn.execute(
            f"SELECT notification_id, originator_id, originator_version, topic, state"
            f" FROM {EVENTS_TABLE} ORDER BY notification_id").fetchall()
    decoded = [decode_event(*row) for row in rows]
    created = [e for e in decoded if e.version == 1]
    assert Counter(e.data["owner"] for e in created) == {u: 5 for u in scale.owners(3)}
    owner_of = {e.task_id: e.data["owner"] for e in created}
    deleted = Counter(owner_of[e.task_id] for e in decoded if e.topic == "TaskDeleted")
    assert set(deleted) == set(scale.owners(3))  # every user keeps some tasks, loses some
    assert all(0 < n < 5 for n in deleted.values())
    versions = Counter(row[1] for row in rows)
    assert len(versions) == 15 and set(versions.values()) == {scale.EVENTS_PER_TASK}
    sizes = scale.relation_sizes(scale_settings.require_database_url())
    assert sizes[EVENTS_TABLE] > 0 and sizes["database"] >= sizes[EVENTS_TABLE]


def test_results_are_written_as_json_and_markdown_never_over_a_kept_one(tmp_path: Path):
    step = ({key: 1.0 for key, _ in scale_report.COLUMNS}
            | {"tasks": 10, "users": 1, "events": 40})
    r = {"run": {"date": "2026-12-03T11:00:00+00:00", "command": "c", "seconds": 1.0,
                 "tasks_per_user": 10, "rate": 200.0, "steady_seconds": 30},
         "machine": {"host": "h", "cores": 2, "cpu_model": "c", "memory_gb": 1.0,
                     "postgres": "15", "python": "3.11", "load_average_at_start": [0.1]},
         "steps": [step, step | {"tasks": 100, "users": 10, "events": 400}]}

    first = scale_report.write_results(r, tmp_path)
    second = scale_report.write_results(r, tmp_path)

    assert [p.name for p in first] == ["2026-12-03-scale.json", "2026-12-03-scale.md"]
    assert [p.name for p in second] == ["2026-12-03-scale-2.json", "2026-12-03-scale-2.md"]
    written = json.loads(first[0].read_text())
    assert set(written["slopes"]) == set(scale_report.SLOPE_METRICS)
    for s in written["steps"]:
        assert {key for key, _ in scale_report.COLUMNS} <= s.keys()
    assert all(h in first[1].read_text() for _, h in scale_report.COLUMNS)
