"""Operability of the APIs against the real database: readiness with the projection
lag bound, /metrics on the query API, reading from READ_DATABASE_URL, and `taskctl db
init` refusing a store restored into a cluster whose transaction counter is behind."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from urllib.parse import urlsplit

import psycopg
import pytest
from fastapi.testclient import TestClient

from query_api.app import create_app as create_query_app
from shared.catalog import EVENTS_TABLE
from shared.settings import Settings
from taskctl.dbinit import TransactionCounterBehind, init_database
from tests.support import TEST_SECRET, bearer, new_user
from tests.support.projection import Writer, catch_up
from tests.support.query import codec_for

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def query_settings(url: str, **overrides: object) -> Settings:
    return Settings(environment="test", database_url=url, better_auth_secret=TEST_SECRET,
                    **overrides)


async def test_query_ready_is_503_while_the_projection_lags_beyond_the_bound(own_db: str):
    writer = Writer(own_db)
    try:
        writer.create(new_user(), "not projected yet")
    finally:
        writer.close()
    time.sleep(0.6)
    with TestClient(create_query_app(query_settings(own_db, ready_max_lag_seconds=0.5)),
                    raise_server_exceptions=False) as client:
        behind = client.get("/api/ready")
        assert behind.status_code == 503, behind.text
        assert behind.json()["error"]["code"] == "SERVICE_UNAVAILABLE"
        assert behind.json()["error"]["details"]["lag_seconds"] >= 0.5
        assert behind.headers["Retry-After"] == "1"
        await catch_up(own_db)
        ready = client.get("/api/ready")
        assert ready.status_code == 200, ready.text
        assert ready.json()["data"]["lag_seconds"] == 0
        assert ready.json()["data"]["max_lag_seconds"] == 0.5


def test_query_api_serves_prometheus_metrics(settings: Settings):
    with TestClient(create_query_app(settings), raise_server_exceptions=False) as client:
        client.get("/api/tasks", headers=bearer(new_user()))
        metrics = client.get("/metrics")
    assert metrics.status_code == 200
    assert metrics.headers["content-type"].startswith("text/plain")
    assert 'http_requests_total{method="GET",route="/api/tasks",service="query-api",' \
           'status="200"}' in metrics.text


async def test_query_api_reads_from_read_database_url(own_db: str):
    """No replica here: the same database through another URL form (keyword host/port),
    while DATABASE_URL points at a server that does not exist."""
    parts = urlsplit(own_db)
    read_url = (f"postgresql:///{parts.path.lstrip('/')}?host={parts.hostname}"
                f"&port={parts.port or 5432}&user={parts.username or 'postgres'}")
    if parts.password:
        read_url += f"&password={parts.password}"
    user = new_user()
    writer = Writer(own_db)
    try:
        task_id = writer.create(user, "read from the read URL")
        position = writer.change(user, task_id, completed=True)
    finally:
        writer.close()
    settings = query_settings("postgresql://nobody@127.0.0.1:1/nowhere",
                              read_database_url=read_url, read_wait_timeout=5)
    with TestClient(create_query_app(settings), raise_server_exceptions=False) as client:
        await catch_up(own_db)
        read = client.get(f"/api/tasks/{task_id}",
                          headers={**bearer(user), "X-Min-Position": codec_for(own_db).encode(position)})
        assert read.status_code == 200, read.text
        assert read.json()["data"]["completed"] is True
        assert read.json()["meta"]["stale"] is False
        assert client.get("/api/ready").status_code == 200


def plant_far_future_event(url: str, tx_id: int) -> None:
    """An event row with an explicit tx_id (inserts are allowed by the append-only
    triggers), as a restore from a cluster with a higher transaction counter leaves."""
    with psycopg.connect(url) as conn:
        conn.execute(
            f"INSERT INTO {EVENTS_TABLE} (originator_id, originator_version, topic, state, tx_id)"
            " VALUES (%s, 1, 'TaskCreated', %s, %s::text::xid8)",
            (uuid.uuid4(), b"{}", str(tx_id)),
        )


def test_db_init_refuses_events_ahead_of_the_transaction_counter(own_db: str):
    with psycopg.connect(own_db) as conn:
        current = int(conn.execute("SELECT pg_current_xact_id()::text").fetchone()[0])
    far = current + (5 << 32)  # five epochs ahead, as after restoring a busy cluster
    plant_far_future_event(own_db, far)
    settings = query_settings(own_db)
    with pytest.raises(TransactionCounterBehind) as refused:
        init_database(settings)
    assert str(far) in str(refused.value)
    assert f"pg_resetwal -e {(far >> 32) + 1}" in str(refused.value)

    cli = subprocess.run(
        [sys.executable, "-m", "taskctl.cli", "db", "init"], cwd=ROOT, timeout=60,
        env={**os.environ, "DATABASE_URL": own_db, "ENVIRONMENT": "test"},
        capture_output=True, text=True,
    )
    assert cli.returncode == 1
    assert "refusing" in cli.stderr and "pg_resetwal" in cli.stderr


def test_db_init_accepts_its_own_store_again(own_db: str):
    init_database(query_settings(own_db))  # idempotent, no refusal


def test_an_exhausted_pool_is_a_prompt_503_on_both_apis(settings: Settings):
    from command_api.app import create_app as create_command_app

    tight = settings.model_copy(
        update={"db_pool_size": 1, "db_max_overflow": 0, "db_pool_timeout": 0.3}
    )
    user = new_user()
    with TestClient(create_command_app(tight), raise_server_exceptions=False) as client:
        assert client.post("/api/tasks", json={"title": "t"}, headers=bearer(user)).status_code == 201
        pool = client.portal.call(client.app.state.open_executor).store.pool
        held = client.portal.call(pool.acquire)  # the only connection, held elsewhere
        try:
            started = time.monotonic()
            stuck = client.post("/api/tasks", json={"title": "t"}, headers=bearer(user))
            waited = time.monotonic() - started
        finally:
            client.portal.call(pool.release, held)
        assert stuck.status_code == 503, stuck.text
        assert stuck.json()["error"]["code"] == "SERVICE_UNAVAILABLE"
        assert 0.25 < waited < 3
        assert client.post("/api/tasks", json={"title": "t"}, headers=bearer(user)).status_code == 201

    with TestClient(create_query_app(tight), raise_server_exceptions=False) as client:
        assert client.get("/api/tasks", headers=bearer(user)).status_code == 200
        pool = client.portal.call(client.app.state.open_reader).pool
        held = client.portal.call(pool.acquire)
        try:
            stuck = client.get("/api/tasks", headers=bearer(user))
        finally:
            client.portal.call(pool.release, held)
        assert stuck.status_code == 503, stuck.text
        assert client.get("/api/tasks", headers=bearer(user)).status_code == 200
