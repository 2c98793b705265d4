"""The event store is append-only: stored events cannot be changed, deleted or truncated,
even by a superuser (as the services connect on our machines); new events still go in."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import psycopg
import pytest
from fastapi.testclient import TestClient

from shared.catalog import EVENTS_TABLE
from taskctl.dbinit import APPEND_ONLY_MESSAGE
from tests.support import TEST_SECRET, bearer, new_user

ROOT = Path(__file__).resolve().parents[2]


def create_and_change(client: TestClient, user: str) -> str:
    response = client.post("/api/tasks", json={"title": "keep me"}, headers=bearer(user))
    assert response.status_code == 201, response.text
    task_id = response.json()["data"]["id"]
    response = client.patch(f"/api/tasks/{task_id}", json={"completed": True}, headers=bearer(user))
    assert response.status_code == 200, response.text
    return task_id


def events_of(conn: psycopg.Connection, task_id: str) -> list[tuple]:
    return conn.execute(
        f"SELECT originator_version, topic, state FROM {EVENTS_TABLE}"
        " WHERE originator_id = %s ORDER BY originator_version",
        (uuid.UUID(task_id),),
    ).fetchall()


@pytest.fixture
def conn(database_url: str):
    with psycopg.connect(database_url, autocommit=True) as conn:
        yield conn


def test_the_test_connection_is_a_superuser_so_grants_alone_would_not_stop_it(conn):
    assert conn.execute("SELECT rolsuper FROM pg_roles WHERE rolname = current_user").fetchone()[0]


@pytest.mark.parametrize(
    "statement",
    [
        f"UPDATE {EVENTS_TABLE} SET topic = 'rewritten' WHERE originator_id = %s",
        f"UPDATE {EVENTS_TABLE} SET state = ''::bytea WHERE originator_id = %s",
        f"DELETE FROM {EVENTS_TABLE} WHERE originator_id = %s",
    ],
    ids=["update-topic", "update-state", "delete"],
)
def test_rejects_changing_or_deleting_stored_events(command_client, conn, statement):
    task_id = create_and_change(command_client, new_user())
    before = events_of(conn, task_id)
    assert len(before) == 2

    with pytest.raises(psycopg.errors.InsufficientPrivilege, match=APPEND_ONLY_MESSAGE) as e:
        conn.execute(statement, (uuid.UUID(task_id),))
    assert "docs/operations-append-only.md" in (e.value.diag.message_hint or "")

    assert events_of(conn, task_id) == before


def test_rejects_truncating_the_event_store(command_client, conn):
    task_id = create_and_change(command_client, new_user())
    count = conn.execute(f"SELECT count(*) FROM {EVENTS_TABLE}").fetchone()[0]

    with pytest.raises(psycopg.errors.InsufficientPrivilege, match="TRUNCATE"):
        conn.execute(f"TRUNCATE {EVENTS_TABLE}")

    assert conn.execute(f"SELECT count(*) FROM {EVENTS_TABLE}").fetchone()[0] >= count
    assert len(events_of(conn, task_id)) == 2


def test_commands_still_append_events(command_client, conn):
    user = new_user()
    task_id = create_and_change(command_client, user)
    response = command_client.delete(f"/api/tasks/{task_id}", headers=bearer(user))
    assert response.status_code == 204, response.text

    topics = [topic for _, topic, _ in events_of(conn, task_id)]
    assert topics == ["TaskCreated", "TaskCompleted", "TaskDeleted"]


def test_a_maintenance_session_can_repair_deliberately_in_one_transaction(command_client, conn):
    """The documented escape hatch works, and only inside the session that asks for it."""
    task_id = create_and_change(command_client, new_user())
    before = events_of(conn, task_id)

    with conn.transaction(force_rollback=True):
        conn.execute("SET LOCAL session_replication_role = replica")
        conn.execute(
            f"UPDATE {EVENTS_TABLE} SET topic = 'repaired' WHERE originator_id = %s",
            (uuid.UUID(task_id),),
        )
        assert {topic for _, topic, _ in events_of(conn, task_id)} == {"repaired"}

    assert events_of(conn, task_id) == before
    with pytest.raises(psycopg.errors.InsufficientPrivilege):
        conn.execute(f"DELETE FROM {EVENTS_TABLE} WHERE originator_id = %s", (uuid.UUID(task_id),))


def test_db_init_runs_twice_and_keeps_the_triggers_and_the_events(command_client, conn, database_url):
    task_id = create_and_change(command_client, new_user())
    before = events_of(conn, task_id)
    env = {
        **os.environ,
        "DATABASE_URL": database_url,
        "ENVIRONMENT": "test",
        "BETTER_AUTH_SECRET": TEST_SECRET,
    }
    taskctl = Path(sys.executable).with_name("taskctl")
    for _ in range(2):
        done = subprocess.run(
            [str(taskctl), "db", "init"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
        )
        assert done.returncode == 0, done.stderr
        assert "database initialised" in done.stdout

    triggers = conn.execute(
        "SELECT tgname FROM pg_trigger WHERE tgrelid = %s::regclass AND NOT tgisinternal"
        " ORDER BY tgname",
        (EVENTS_TABLE,),
    ).fetchall()
    assert triggers == [(f"{EVENTS_TABLE}_no_truncate",), (f"{EVENTS_TABLE}_no_update_delete",)]
    assert events_of(conn, task_id) == before
    with pytest.raises(psycopg.errors.InsufficientPrivilege):
        conn.execute(f"DELETE FROM {EVENTS_TABLE} WHERE originator_id = %s", (uuid.UUID(task_id),))
