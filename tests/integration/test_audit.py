"""`taskctl audit` and `taskctl export` read the event store itself: filters, JSON lines,
and `--verify` catching a version gap, a missing actor and a history row that differs."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import psycopg
import pytest

from projections.audit import verify
from shared.events import Task
from tests.support import PostgresServer, new_user
from tests.support.projection import Writer, catch_up, fresh_database, insert_raw_event


def taskctl(url: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "taskctl.cli", *args], env={"DATABASE_URL": url, "PATH": ""},
        capture_output=True, text=True, timeout=60, check=False,
    )


def lines(out: subprocess.CompletedProcess[str]) -> list[dict]:
    assert out.returncode == 0, out.stderr
    return [json.loads(line) for line in out.stdout.splitlines()]


@pytest.fixture(scope="module")
def history(database_url: str) -> Iterator[dict]:
    """Two users' tasks, and one event on alice's task performed by an admin actor."""
    writer = Writer(database_url)
    alice, bob, admin = new_user(), new_user(), new_user()
    kept = writer.create(alice, "Buy milk")
    writer.change(alice, kept, completed=True)
    gone = writer.create(alice, "Walk dog")
    writer.delete(alice, gone)
    other = writer.create(bob, "Bob's task")
    task = writer.store.repository.get(kept)
    task.change(title="Renamed by admin", actor=admin, request_id="admin-1")
    writer.store.save(task)
    writer.close()
    yield {"alice": alice, "bob": bob, "admin": admin, "kept": kept, "gone": gone,
           "other": other}


def test_user_filter_matches_owner_or_actor_in_store_order(database_url: str, history: dict) -> None:
    alice = lines(taskctl(database_url, "audit", "--user", history["alice"], "--json"))
    admin = lines(taskctl(database_url, "audit", "--user", history["admin"], "--json"))

    assert [e["type"] for e in alice] == ["TaskCreated", "TaskCompleted", "TaskCreated",
                                          "TaskDeleted", "TaskTitleChanged"]
    assert {e["owner"] for e in alice} == {history["alice"]}
    positions = [tuple(map(int, e["position"].split("."))) for e in alice]
    assert positions == sorted(positions)
    assert [(e["type"], e["actor"], e["owner"], e["data"]) for e in admin] == [
        ("TaskTitleChanged", history["admin"], history["alice"], {"title": "Renamed by admin"})
    ]


def test_task_type_and_time_filters(database_url: str, history: dict) -> None:
    by_task = lines(taskctl(database_url, "audit", "--task", str(history["gone"]), "--json"))
    assert [(e["version"], e["type"]) for e in by_task] == [(1, "TaskCreated"), (2, "TaskDeleted")]

    typed = lines(taskctl(database_url, "audit", "--user", history["alice"],
                          "--type", "TaskDeleted", "--type", "TaskCompleted", "--json"))
    assert [e["type"] for e in typed] == ["TaskCompleted", "TaskDeleted"]

    created = datetime.fromisoformat(by_task[1]["occurred_at"])
    since = lines(taskctl(database_url, "audit", "--task", str(history["gone"]),
                          "--since", by_task[1]["occurred_at"], "--json"))
    until = lines(taskctl(database_url, "audit", "--task", str(history["gone"]),
                          "--until", by_task[1]["occurred_at"], "--json"))
    assert [e["type"] for e in since] == ["TaskDeleted"]  # inclusive
    assert [e["type"] for e in until] == ["TaskCreated"]  # exclusive
    future = (created + timedelta(days=1)).astimezone(UTC).replace(tzinfo=None).isoformat()
    assert lines(taskctl(database_url, "audit", "--user", history["alice"], "--since", future,
                         "--json")) == []


def test_readable_table_by_default(database_url: str, history: dict) -> None:
    out = taskctl(database_url, "audit", "--task", str(history["kept"]))
    assert out.returncode == 0, out.stderr
    rows = out.stdout.splitlines()
    assert rows[0].split()[:4] == ["position", "occurred_at", "type", "task_id"]
    assert "TaskTitleChanged" in rows[3] and history["admin"] in rows[3]
    assert rows[-1] == "(3 events)"


def test_export_holds_exactly_one_users_events(database_url: str, history: dict) -> None:
    events = lines(taskctl(database_url, "export", "--user", history["alice"]))
    assert len(events) == 5
    assert {e["owner"] for e in events} == {history["alice"]}
    assert {e["task_id"] for e in events} == {str(history["kept"]), str(history["gone"])}
    bob = lines(taskctl(database_url, "export", "--user", history["bob"]))
    assert [(e["task_id"], e["type"]) for e in bob] == [(str(history["other"]), "TaskCreated")]


# -- --verify, in databases of their own (planting bad data breaks them) ---------------


@pytest.fixture
def own_db(pg_server: PostgresServer) -> Iterator[str]:
    url = fresh_database(pg_server)
    writer = Writer(url)
    writer.bulk(users=2, tasks_per_user=5)
    user = new_user()
    task = writer.create(user, "planted")
    writer.change(user, task, completed=True)
    writer.close()
    asyncio.run(catch_up(url))
    yield url
    pg_server.drop_database(url)


def test_verify_passes_on_a_sound_store(own_db: str) -> None:
    out = taskctl(own_db, "audit", "--verify")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().endswith("OK")


def test_verify_names_a_version_gap(own_db: str) -> None:
    user = new_user()
    task = Task.create(owner=user, title="gap", description=None, actor=user, request_id="r")
    task_id = task.id
    writer = Writer(own_db)
    writer.store.save(task)
    state = next(iter(writer.store.repository.get(task_id).collect_events()), None)
    writer.close()
    assert state is None
    stored = json.dumps({"timestamp": {"_type_": "datetime_iso",
                                       "_data_": datetime.now(UTC).isoformat()},
                         "actor": user, "request_id": "r2", "originator_topic": "x"}).encode()
    insert_raw_event(own_db, task_id, 3, "TaskCompleted", stored)  # version 2 is missing

    out = taskctl(own_db, "audit", "--verify")

    assert out.returncode == 1
    assert f"task {task_id}: version 3 where 2 was expected" in out.stderr


def test_verify_names_an_event_without_an_actor(own_db: str) -> None:
    with psycopg.connect(own_db) as conn:
        victim, version = conn.execute(
            "SELECT originator_id, originator_version FROM tasks_events"
            " WHERE topic = 'TaskCompleted' ORDER BY notification_id DESC LIMIT 1").fetchone()
        conn.execute("SET session_replication_role = replica")  # past the append-only trigger
        conn.execute(
            "UPDATE tasks_events SET state = convert_to((convert_from(state, 'UTF8')::jsonb"
            " - 'actor')::text, 'UTF8') WHERE originator_id = %s AND originator_version = %s",
            (victim, version),
        )

    out = taskctl(own_db, "audit", "--verify")

    assert out.returncode == 1
    assert "events without an actor: 1" in out.stderr
    assert f"of task {victim} version {version} (TaskCompleted)" in out.stderr


def test_verify_names_a_task_whose_history_row_differs(own_db: str) -> None:
    with psycopg.connect(own_db) as conn:
        task_id, = conn.execute(
            "SELECT task_id FROM read_task_history ORDER BY position LIMIT 1").fetchone()
        conn.execute("UPDATE read_task_history SET actor = 'someone else' WHERE task_id = %s"
                     " AND version = 1", (task_id,))
    report = asyncio.run(verify(own_db))
    assert not report.ok
    assert report.history == [f"task {task_id}: rows differ in content"]

    with psycopg.connect(own_db) as conn:
        conn.execute("DELETE FROM read_task_history WHERE task_id = %s AND version = 1",
                     (task_id,))
    out = taskctl(own_db, "audit", "--verify")
    assert out.returncode == 1
    assert f"task {task_id}:" in out.stderr and "history rows" in out.stderr
    assert str(uuid.UUID(str(task_id))) in out.stderr
