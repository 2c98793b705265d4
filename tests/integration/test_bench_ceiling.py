"""The benchmark's read ceilings (`bench/ceiling_app.py`): the same rows as the
service's reads, their JSON built by PostgreSQL, with the fields our answers have."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import UTC, datetime

import pytest
from fastapi.testclient import TestClient

from bench import ceiling_app, data
from shared.documents import task_document
from tests.support import PostgresServer

TASK_FIELDS = list(task_document(uuid.uuid4(), "u", "t", None, False, datetime.now(UTC),
                                 datetime.now(UTC), 1))
HISTORY_FIELDS = ["task_id", "version", "type", "actor", "request_id", "occurred_at", "changes"]


@pytest.fixture(scope="module")
def filled(pg_server: PostgresServer) -> Iterator[tuple[TestClient, dict[str, list[uuid.UUID]]]]:
    url = pg_server.create_database()
    ids = {f"user-{uuid.uuid4().hex[:8]}": [uuid.uuid4() for _ in range(5)] for _ in range(2)}
    data.fill_ceiling(url, ids)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("BENCH_CEILING_DSN", url)
        with TestClient(ceiling_app.create_app()) as client:
            yield client, ids
    pg_server.drop_database(url)


def test_get_answers_the_one_row_as_json_with_the_task_fields(filled):
    client, ids = filled
    user, tasks = next(iter(ids.items()))
    r = client.get(f"/get/{user}/{tasks[2]}")
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    doc = r.json()
    assert list(doc) == TASK_FIELDS
    assert (doc["id"], doc["user_id"], doc["title"]) == (str(tasks[2]), user, "Benchmark task 3")


def test_get_of_another_users_task_or_an_unknown_one_is_a_404(filled):
    client, ids = filled
    (alice, alices), (bob, _) = ids.items()
    assert client.get(f"/get/{bob}/{alices[0]}").status_code == 404
    assert client.get(f"/get/{alice}/{uuid.uuid4()}").status_code == 404


def test_list_answers_every_task_of_the_user_newest_first(filled):
    client, ids = filled
    user, tasks = next(iter(ids.items()))
    r = client.get(f"/list/{user}")
    assert r.status_code == 200
    docs = r.json()
    # Seeded one second apart, the first id newest (as `data.seed_tasks` orders them).
    assert [d["id"] for d in docs] == [str(t) for t in tasks]
    assert all(list(d) == TASK_FIELDS for d in docs)
    assert [d["created_at"] for d in docs] == sorted((d["created_at"] for d in docs), reverse=True)
    assert client.get(f"/list/nobody-{uuid.uuid4().hex}").json() == []


def test_history_answers_the_tasks_creation_like_ours(filled):
    client, ids = filled
    user, tasks = next(iter(ids.items()))
    r = client.get(f"/history/{user}/{tasks[0]}")
    assert r.status_code == 200
    [entry] = r.json()
    assert list(entry) == HISTORY_FIELDS
    assert entry["task_id"] == str(tasks[0]) and entry["type"] == "TaskCreated"
    assert entry["changes"]["title"] == {"from": None, "to": "Benchmark task 1"}
    assert client.get(f"/history/{user}/{uuid.uuid4()}").status_code == 404
