"""Read-your-own-writes by default: a query reflects its user's acknowledged commands with
no header. The command side keeps each user's latest position in the statement that
appends their events (`user_write_positions`); the query compares it with the checkpoint
in the statement that reads the rows, and waits only if it is ahead."""

from __future__ import annotations

import asyncio
import time
import uuid
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


# -- another user's task ---------------------------------------------------------------
# A read waits for its own user's writes only; a task another user just created is not in
# the read tables yet. Missing is then answered from the event store: the task's latest
# event, which the read waits for before it calls the task missing, so another user's
# fresh task is a 403 at once (as the command side's is), never a 404 first.


async def test_another_users_task_is_403_the_moment_its_create_is_acknowledged(
    command_client: TestClient, settings: Settings, projector: asyncio.Task[None]
):
    owner, other = new_user(), new_user()
    with TestClient(create_app(settings), raise_server_exceptions=False) as queries:

        def probe(path: str) -> None:
            response = queries.get(path, headers=bearer(other))
            assert_error(response, 403, "FORBIDDEN")
            assert response.json()["meta"]["stale"] is False

        def round_trip(i: int) -> None:
            task = write(command_client, "POST", "/api/tasks", owner, {"title": f"o {i}"})[0]
            probe(f"/api/tasks/{task['id']}")
            probe(f"/api/{other}/tasks/{task['id']}")
            probe(f"/api/tasks/{task['id']}/history")

        for i in range(50):
            await asyncio.to_thread(round_trip, i)
    assert not projector.done()


async def test_a_missing_task_waits_only_for_events_the_store_has(
    command_client: TestClient, query_client: TestClient, database_url: str
):
    owner, other = new_user(), new_user()
    await catch_up(database_url)
    gone, _ = create(command_client, owner, "deleted, projected")
    write(command_client, "DELETE", f"/api/tasks/{gone['id']}", owner)
    await catch_up(database_url)
    fresh, _ = create(command_client, owner, "not projected yet")

    def timed(path: str, user: str) -> tuple[float, object]:
        started = time.monotonic()
        response = query_client.get(path, headers=bearer(user))
        return time.monotonic() - started, response

    # Never written, or deleted and projected: 404 with no wait, although the projector
    # is stopped and behind.
    for task_id in (str(uuid.uuid4()), gone["id"]):
        for path in (f"/api/tasks/{task_id}", f"/api/tasks/{task_id}/history"):
            waited, response = timed(path, other)
            assert_error(response, 404, "NOT_FOUND")
            assert response.json()["meta"]["stale"] is False
            assert waited < WAIT
    # The owner's deleted task keeps its history.
    assert query_client.get(f"/api/tasks/{gone['id']}/history",
                            headers=bearer(owner)).status_code == 200

    # Written but not projected: the read waits for it, within READ_WAIT_TIMEOUT in all,
    # then says it could not tell (stale), as a read of one's own writes does.
    waited, response = timed(f"/api/tasks/{fresh['id']}", other)
    assert_error(response, 404, "NOT_FOUND")
    assert response.json()["meta"]["stale"] is True
    assert WAIT <= waited < WAIT + 5

    await catch_up(database_url)
    waited, response = timed(f"/api/tasks/{fresh['id']}", other)
    assert_error(response, 403, "FORBIDDEN")
    assert response.json()["meta"]["stale"] is False and waited < WAIT
