"""Read-your-own-writes by default: a query reflects its user's acknowledged commands with
no header. The command side keeps each user's latest position in the statement that
appends their events (`user_write_positions`); the query compares it with the checkpoint
in the statement that reads the rows, and waits only if it is ahead."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import psycopg
import pytest
from fastapi.testclient import TestClient

from command_api.store import PostgresEventStore
from query_api.app import create_app
from shared.catalog import OWN_POSITIONS_TABLE
from shared.events import Task
from shared.position import Position
from shared.settings import Settings
from taskctl.dbinit import init_database
from tests.support import TEST_SECRET, PostgresServer, bearer, new_user
from tests.support.projection import catch_up
from tests.support.query import assert_error, create, write

WAIT = 0.4


@pytest.fixture(scope="module")
def quick_settings(settings: Settings) -> Settings:
    return settings.model_copy(update={"read_wait_timeout": WAIT})


@pytest.fixture
def query_client(quick_settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(quick_settings), raise_server_exceptions=False) as client:
        yield client


def own_position(url: str, user: str) -> Position | None:
    with psycopg.connect(url) as conn:
        row = conn.execute(
            f"SELECT tx_id::text, notification_id FROM {OWN_POSITIONS_TABLE} WHERE user_id = %s",
            (user,),
        ).fetchone()
    return None if row is None else Position(int(row[0]), row[1])


async def test_every_query_route_reflects_the_users_own_writes_without_a_header(
    command_client: TestClient, settings: Settings, projector: asyncio.Task[None]
):
    user = new_user()
    with TestClient(create_app(settings), raise_server_exceptions=False) as queries:

        def read(path: str, **params: object) -> dict:
            response = queries.get(path, params=params, headers=bearer(user))
            assert response.status_code == 200, response.text
            assert response.json()["meta"]["stale"] is False
            return response.json()["data"]

        def step(method: str, path: str, body: object = None) -> dict | None:
            return write(command_client, method, path, user, body)[0]

        async def off_loop(fn, *args, **kwargs):  # the projector runs in this loop
            return await asyncio.to_thread(fn, *args, **kwargs)

        ids = []
        for i in range(100):
            task = await off_loop(step, "POST", "/api/tasks", {"title": f"mine {i}"})
            ids.append(task["id"])
            assert await off_loop(read, f"/api/tasks/{task['id']}") == task
            listed = await off_loop(read, "/api/tasks")
            assert [t["id"] for t in listed] == ids[::-1]
        changed = await off_loop(step, "PATCH", f"/api/tasks/{ids[0]}", {"completed": True})
        assert await off_loop(read, f"/api/{user}/tasks/{ids[0]}") == changed
        assert await off_loop(read, "/api/stats") == {"total": 100, "completed": 1, "pending": 99}
        history = await off_loop(read, f"/api/tasks/{ids[0]}/history")
        assert [h["type"] for h in history] == ["TaskCreated", "TaskCompleted"]
        await off_loop(step, "DELETE", f"/api/tasks/{ids[1]}")
        assert (await off_loop(read, "/api/history", limit=1))[0]["type"] == "TaskDeleted"
        gone = await off_loop(queries.get, f"/api/tasks/{ids[1]}", headers=bearer(user))
        assert_error(gone, 404, "NOT_FOUND")
        assert gone.json()["meta"]["stale"] is False
    assert not projector.done()


async def test_with_the_projector_stopped_a_read_answers_stale_within_the_timeout(
    command_client: TestClient, query_client: TestClient, database_url: str
):
    writer, bystander = new_user(), new_user()
    create(command_client, bystander, "projected")
    await catch_up(database_url)
    task, _ = create(command_client, writer, "not projected yet")

    started = time.monotonic()
    missing = query_client.get(f"/api/tasks/{task['id']}", headers=bearer(writer))
    waited = time.monotonic() - started
    assert_error(missing, 404, "NOT_FOUND")
    assert missing.json()["meta"]["stale"] is True  # so a client knows to retry
    assert WAIT <= waited < WAIT + 5
    listed = query_client.get("/api/tasks", headers=bearer(writer))
    assert listed.status_code == 200
    assert listed.json()["data"] == [] and listed.json()["meta"]["stale"] is True

    # A user with nothing unprojected waits for nothing: the position watch that every
    # wait goes through is not even started by their reads.
    fresh = query_client.get("/api/tasks", headers=bearer(bystander))
    assert fresh.status_code == 200 and fresh.json()["meta"]["stale"] is False
    assert [t["title"] for t in fresh.json()["data"]] == ["projected"]
    await catch_up(database_url)
    found = query_client.get(f"/api/tasks/{task['id']}", headers=bearer(writer))
    assert found.status_code == 200 and found.json()["data"] == task
    assert found.json()["meta"]["stale"] is False


def test_a_user_without_pending_writes_never_starts_the_watch(
    command_client: TestClient, quick_settings: Settings, database_url: str
):
    user = new_user()
    asyncio.run(catch_up(database_url))
    with TestClient(create_app(quick_settings), raise_server_exceptions=False) as queries:
        for path in ("/api/tasks", "/api/stats", "/api/history"):
            response = queries.get(path, headers=bearer(user))
            assert response.status_code == 200 and response.json()["meta"]["stale"] is False
        assert queries.app.state.read_side.watch._task is None


def new_task(owner: str, title: str = "t") -> Task:
    return Task.create(owner=owner, title=title, description=None, actor=owner, request_id="r")


async def test_each_users_latest_position_is_kept_with_their_events_in_every_write_path(
    settings: Settings, database_url: str
):
    """Group-committed batches of many users, several events at once, keyed commands:
    each user's row is their latest event's position, and concurrent batches locking
    the same users' rows never deadlock."""
    wide = settings.model_copy(update={"db_pool_size": 5, "db_max_overflow": 20})
    stores = [await PostgresEventStore.open(wide) for _ in range(2)]
    try:
        users = [new_user() for _ in range(6)]
        tasks = [new_task(users[i % 6], f"t{i}") for i in range(240)]
        outcomes = await asyncio.gather(
            *(stores[i % 2].save(t) for i, t in enumerate(tasks))
        )
        latest = {}
        for task, (_, position) in zip(tasks, outcomes, strict=True):
            latest[task.owner] = max(latest.get(task.owner, position), position)
        for user in users:
            assert own_position(database_url, user) == latest[user]

        # Several events in one command (the single-command path).
        task = tasks[0]
        again = await stores[0].get(task.id)
        again.change(actor=task.owner, request_id="r2", title="x", completed=True)
        appended, position = await stores[0].save(again)
        assert appended == 2 and own_position(database_url, task.owner) == position
    finally:
        for store in stores:
            await store.close()


def test_on_a_replica_the_users_position_comes_from_the_primary(
    command_client: TestClient, settings: Settings, pg_server: PostgresServer
):
    """The query API reads a replica (`READ_DATABASE_URL`), whose copy of the user's
    position lags like its rows do: the position is read on the primary. Stand-in for a
    replica that has not replayed the write yet: a second database without it."""
    replica = pg_server.create_database("taskservice_replica")
    try:
        init_database(Settings(environment="test", database_url=replica,
                               better_auth_secret=TEST_SECRET))
        user = new_user()
        create(command_client, user, "on the primary only")
        on_replica = settings.model_copy(
            update={"read_database_url": replica, "read_wait_timeout": WAIT}
        )
        with TestClient(create_app(on_replica), raise_server_exceptions=False) as queries:
            listed = queries.get("/api/tasks", headers=bearer(user))
            assert listed.status_code == 200
            assert listed.json()["data"] == [] and listed.json()["meta"]["stale"] is True
            other = queries.get("/api/tasks", headers=bearer(new_user()))
            assert other.json()["meta"]["stale"] is False
    finally:
        pg_server.drop_database(replica)
