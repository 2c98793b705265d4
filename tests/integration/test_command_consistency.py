"""Versions, idempotency and concurrency on the command side: nothing lost, nothing doubled."""

from __future__ import annotations

import threading
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import pytest
from fastapi.testclient import TestClient

from command_api.commands import Change, Create, Stamp
from command_api.executor import IdempotencyKey, VersionMismatch
from shared.etag import IfMatch
from shared.events import Task
from shared.eventstore import TaskStore
from shared.settings import Settings
from tests.support import bearer, library_store, new_user
from tests.support.commands import LoopThread
from tests.support.query import assert_error
from tests.support.sealing import opened


@pytest.fixture(scope="module")
def store(settings: Settings):
    """The library's own application on the event store: reads what the handlers wrote."""
    store = library_store(settings.model_copy(update={"db_pool_size": 10, "db_max_overflow": 50}))
    yield store
    store.close()


@pytest.fixture(scope="module")
def loop(settings: Settings):
    """The API's executor, called from threads (each call blocks until saved)."""
    with LoopThread(settings.model_copy(update={"db_pool_size": 10, "db_max_overflow": 50})) as loop:
        yield loop


def stored_events(store: TaskStore, task_id: str) -> list:
    return list(store.events.get(uuid.UUID(task_id)))


def create(client: TestClient, user: str, **headers: str) -> dict:
    response = client.post("/api/tasks", json={"title": "t"}, headers={**bearer(user), **headers})
    assert response.status_code == 201, response.text
    return response.json()["data"]


# -- events are always stamped -------------------------------------------------------------


def test_every_event_carries_actor_request_id_timestamp_and_owner(
    command_client: TestClient, store: TaskStore
):
    user = new_user()
    task = create(command_client, user, **{"X-Request-ID": "stamp-1"})
    path = f"/api/tasks/{task['id']}"
    command_client.patch(path, json={"title": "u", "description": "d"}, headers={**bearer(user), "X-Request-ID": "stamp-2"})
    command_client.patch(path, json={"completed": True}, headers={**bearer(user), "X-Request-ID": "stamp-3"})
    command_client.patch(path, json={"completed": False}, headers={**bearer(user), "X-Request-ID": "stamp-4"})
    command_client.delete(path, headers={**bearer(user), "X-Request-ID": "stamp-5"})

    events = stored_events(store, task["id"])
    assert [type(e).TOPIC for e in events] == [
        "TaskCreated",
        "TaskTitleChanged",
        "TaskDescriptionChanged",
        "TaskCompleted",
        "TaskReopened",
        "TaskDeleted",
    ]
    assert [e.originator_version for e in events] == [1, 2, 3, 4, 5, 6]
    assert all(e.actor == user for e in events)
    assert [e.request_id for e in events] == ["stamp-1", "stamp-2", "stamp-2", "stamp-3", "stamp-4", "stamp-5"]
    assert all(e.timestamp.utcoffset().total_seconds() == 0 for e in events)
    assert events[0].owner == user


def test_an_event_without_an_actor_cannot_be_made():
    with pytest.raises(ValueError, match="actor"):
        Task.create(owner="u", title="t", description=None, actor="", request_id="r")
    task = Task.create(owner="u", title="t", description=None, actor="u", request_id="r")
    with pytest.raises(ValueError, match="actor"):
        task.change(actor="", request_id="r", title="x")
    with pytest.raises(ValueError, match="actor"):
        task.delete(actor="", request_id="r")


# -- ETag / If-Match ----------------------------------------------------------------------


def test_a_stale_if_match_is_412_and_changes_nothing(command_client: TestClient, store: TaskStore):
    user = new_user()
    task = create(command_client, user)
    path = f"/api/tasks/{task['id']}"
    fresh = command_client.patch(path, json={"title": "v2"}, headers={**bearer(user), "If-Match": '"v1"'})
    assert fresh.status_code == 200 and fresh.headers["ETag"] == '"v2"'

    stale = command_client.patch(path, json={"title": "lost"}, headers={**bearer(user), "If-Match": '"v1"'})
    assert stale.status_code == 412
    assert stale.json()["error"]["code"] == "PRECONDITION_FAILED"
    stale_delete = command_client.delete(path, headers={**bearer(user), "If-Match": '"v1"'})
    assert stale_delete.status_code == 412
    garbage = command_client.patch(path, json={"title": "x"}, headers={**bearer(user), "If-Match": "nonsense"})
    assert garbage.status_code == 412
    # An If-Match naming nothing (an unset ETag variable): malformed, not a conflict.
    for empty in ("", "  ", ", ,"):
        for method, body in (("PATCH", {"title": "x"}), ("DELETE", None), ("PUT", {"title": "x"})):
            refused = command_client.request(method, path, json=body,
                                             headers={**bearer(user), "If-Match": empty})
            error = assert_error(refused, 422, "VALIDATION_ERROR")
            assert error["message"] == "Empty If-Match" and "If-Match" in error["details"]
    assert [e.originator_version for e in stored_events(store, task["id"])] == [1, 2]

    weak = command_client.patch(path, json={"title": "v3"}, headers={**bearer(user), "If-Match": 'W/"v2"'})
    assert weak.status_code == 200
    star = command_client.delete(path, headers={**bearer(user), "If-Match": "*"})
    assert star.status_code == 204


def test_concurrent_updates_with_the_same_etag_let_exactly_one_through(
    store: TaskStore, loop: LoopThread
):
    commands = loop.executor()
    user = new_user()
    created = commands.run(Create("race"), Stamp(user, "r"))
    task_id = created.task.id
    barrier = threading.Barrier(10)

    def attempt(i: int) -> str:
        barrier.wait()
        try:
            commands.run(
                Change(task_id, title=f"winner {i}"), Stamp(user, f"r{i}"),
                expected=IfMatch.parse('"v1"'),
            )
            return "ok"
        except VersionMismatch:
            return "412"

    with ThreadPoolExecutor(10) as pool:
        results = Counter(pool.map(attempt, range(10)))
    assert results == {"ok": 1, "412": 9}
    assert [e.originator_version for e in store.events.get(task_id)] == [1, 2]


# -- concurrency without If-Match -----------------------------------------------------------


def test_fifty_concurrent_updates_of_one_task_lose_no_event(
    store: TaskStore, loop: LoopThread, settings: Settings
):
    # Five handler instances stand for five API processes: within one, commands on a task
    # take turns; between them, the (task id, version) key and the retry keep every event.
    handlers = [loop.executor(retries=200) for _ in range(5)]
    user = new_user()
    created = handlers[0].run(Create("start"), Stamp(user, "r"))
    task_id = created.task.id
    barrier = threading.Barrier(50)

    def update(i: int) -> int:
        barrier.wait()
        return handlers[i % 5].run(Change(task_id, title=f"title {i}"), Stamp(user, f"req-{i}")).task.version

    with ThreadPoolExecutor(50) as pool:
        versions = list(pool.map(update, range(50)))

    events = list(store.events.get(task_id))
    assert [e.originator_version for e in events] == list(range(1, 52))  # contiguous
    url = settings.require_database_url()
    titles = [opened(url, "title", e.title) for e in events[1:]]  # sealed, as stored
    assert sorted(titles) == sorted(f"title {i}" for i in range(50))  # every update kept
    assert sorted(versions) == list(range(2, 52))  # each response names its own version
    final = store.repository.get(task_id)
    assert final.title == events[-1].title  # the final state is the last event's


# -- idempotency -----------------------------------------------------------------------------


def test_a_retried_create_returns_the_first_response_and_appends_nothing(command_client: TestClient, store: TaskStore):
    user = new_user()
    headers = {**bearer(user), "Idempotency-Key": "create-once"}
    first = command_client.post("/api/tasks", json={"title": "once"}, headers=headers)
    second = command_client.post("/api/tasks", json={"title": "once"}, headers=headers)
    assert first.status_code == second.status_code == 201
    assert first.json()["data"] == second.json()["data"]
    assert first.json()["meta"]["position"] == second.json()["meta"]["position"]
    assert second.headers["ETag"] == '"v1"'
    assert len(stored_events(store, first.json()["data"]["id"])) == 1

    other = command_client.post("/api/tasks", json={"title": "different"}, headers=headers)
    assert other.status_code == 422
    assert other.json()["error"]["code"] == "VALIDATION_ERROR"


def test_idempotency_keys_are_per_user(command_client: TestClient):
    a, b = new_user(), new_user()
    first = command_client.post("/api/tasks", json={"title": "same"}, headers={**bearer(a), "Idempotency-Key": "k"})
    second = command_client.post("/api/tasks", json={"title": "same"}, headers={**bearer(b), "Idempotency-Key": "k"})
    assert first.status_code == second.status_code == 201
    assert first.json()["data"]["id"] != second.json()["data"]["id"]
    assert second.json()["data"]["user_id"] == b


def test_retried_updates_toggles_and_deletes_are_applied_once(command_client: TestClient, store: TaskStore):
    user = new_user()
    task = create(command_client, user)
    toggle = f"/api/{user}/tasks/{task['id']}/complete"
    headers = {**bearer(user), "Idempotency-Key": "toggle-1"}
    first = command_client.patch(toggle, headers=headers)
    second = command_client.patch(toggle, headers=headers)
    assert first.json()["data"]["completed"] is True
    assert second.json()["data"] == first.json()["data"]  # not toggled back

    patch_headers = {**bearer(user), "Idempotency-Key": "patch-1"}
    p1 = command_client.patch(f"/api/tasks/{task['id']}", json={"title": "n"}, headers=patch_headers)
    command_client.patch(f"/api/tasks/{task['id']}", json={"title": "later"}, headers=bearer(user))
    p2 = command_client.patch(f"/api/tasks/{task['id']}", json={"title": "n"}, headers=patch_headers)
    assert p2.json()["data"] == p1.json()["data"]  # the first response, not the current state

    delete_headers = {**bearer(user), "Idempotency-Key": "delete-1"}
    d1 = command_client.delete(f"/api/tasks/{task['id']}", headers=delete_headers)
    d2 = command_client.delete(f"/api/tasks/{task['id']}", headers=delete_headers)
    assert d1.status_code == d2.status_code == 204
    assert d1.headers["X-Position"] == d2.headers["X-Position"]
    topics = [type(e).TOPIC for e in stored_events(store, task["id"])]
    assert topics.count("TaskCompleted") == 1 and topics.count("TaskDeleted") == 1


def test_an_invalid_idempotency_key_is_422(command_client: TestClient):
    response = command_client.post(
        "/api/tasks", json={"title": "x"}, headers={**bearer(new_user()), "Idempotency-Key": "x" * 300}
    )
    assert response.status_code == 422
    assert "Idempotency-Key" in response.json()["error"]["details"]


def test_concurrent_retries_with_one_key_create_one_task(store: TaskStore, loop: LoopThread):
    commands = loop.executor()
    user = new_user()
    barrier = threading.Barrier(12)

    def retry(i: int) -> uuid.UUID:
        barrier.wait()
        keyed = IdempotencyKey("concurrent-key", "same-request")
        return commands.run(Create("only one"), Stamp(user, f"r{i}"), key=keyed).task.id

    with ThreadPoolExecutor(12) as pool:
        ids = set(pool.map(retry, range(12)))
    assert len(ids) == 1
    created = _count_created(store, user)
    assert created == 1


def _count_created(store: TaskStore, user: str) -> int:
    with store.recorder.datastore.get_connection() as conn:
        row = conn.execute(
            "SELECT count(*) AS n FROM tasks_events WHERE topic = 'TaskCreated'"
            " AND convert_from(state, 'UTF8')::jsonb ->> 'owner' = %s",
            (user,),
        ).fetchone()
    return row["n"]


# -- the database going away ------------------------------------------------------------------


def test_ready_and_commands_answer_503_when_the_database_is_unreachable():
    from command_api.app import create_app

    settings = Settings(
        environment="test",
        database_url="postgresql://postgres@127.0.0.1:1/nowhere",
        better_auth_secret="x" * 40,
        db_connect_timeout=1,
    )
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        ready = client.get("/api/ready")
        assert ready.status_code == 503
        assert ready.json()["error"]["code"] == "SERVICE_UNAVAILABLE"
        command = client.post("/api/tasks", json={"title": "x"}, headers=bearer(new_user(), ttl_seconds=60))
        assert command.status_code in (401, 503)
        assert client.get("/api/health").status_code == 200


def test_a_process_whose_cached_task_is_behind_another_process_decides_on_fresh_state(
    store: TaskStore, loop: LoopThread
):
    # Two handler instances stand for two API processes; each keeps the tasks it saved.
    first, second = loop.executor(), loop.executor()
    user = new_user()
    created = first.run(Create("v1"), Stamp(user, "r1"))
    task_id = created.task.id
    first.run(Change(task_id, title="v2 by first"), Stamp(user, "r2"))  # cached at v2
    second.run(Change(task_id, completed=True), Stamp(user, "r3"))  # v3 elsewhere

    # An ETag from the other process is current, not a 412.
    fresh = first.run(
        Change(task_id, title="v4 by first"), Stamp(user, "r4"), expected=IfMatch.parse('"v3"')
    )
    assert fresh.task.version == 4 and fresh.task.completed is True
    # The other process is now behind: its write lands after ours, losing nothing.
    later = second.run(Change(task_id, description="d", set_description=True), Stamp(user, "r5"))
    assert later.task.version == 5 and later.task.title == "v4 by first"
    # And a stale ETag is still refused, whoever cached what.
    with pytest.raises(VersionMismatch):
        first.run(Change(task_id, title="x"), Stamp(user, "r6"), expected=IfMatch.parse('"v4"'))
    events = list(store.events.get(task_id))
    assert [e.originator_version for e in events] == [1, 2, 3, 4, 5]
    assert [type(e).TOPIC for e in events][1:] == [
        "TaskTitleChanged", "TaskCompleted", "TaskTitleChanged", "TaskDescriptionChanged",
    ]


def test_the_async_store_and_the_library_read_each_other(
    store: TaskStore, loop: LoopThread, settings: Settings
):
    # The command API writes through asyncpg but encodes with the library's Mapper: each
    # side must read what the other wrote, at any version.
    user = new_user()
    task = Task.create(owner=user, title="by the library", description="d", actor=user,
                       request_id="lib-1")
    task.change(actor=user, request_id="lib-2", completed=True)
    store.save(task)
    read = loop.get(task.id)
    assert read is not None
    assert (read.owner, read.title, read.description, read.completed, read.version) == (
        user, "by the library", "d", True, 2)
    assert read.created_on == task.created_on and read.modified_on == task.modified_on

    changed = loop.executor().run(Change(task.id, title="by the API"), Stamp(user, "api-1"))
    assert changed.task is not None and changed.task.version == 3
    by_library = store.repository.get(task.id)
    # The library reads the API's event; its title is sealed (`shared.datakeys`).
    title = opened(settings.require_database_url(), "title", by_library.title)
    assert by_library.title != title
    assert (title, by_library.completed, by_library.version) == ("by the API", True, 3)
    assert [type(e).TOPIC for e in store.events.get(task.id)][-1] == "TaskTitleChanged"
    earlier = loop.get(task.id, version=2)
    assert earlier is not None and earlier.title == "by the library"
    assert loop.get(uuid.uuid4()) is None


def test_version_conflicts_and_idempotent_replays_are_counted_in_metrics(
    command_client: TestClient, loop: LoopThread
):
    from prometheus_client import REGISTRY

    def value(name: str) -> float:
        return REGISTRY.get_sample_value(name) or 0.0

    conflicts = value("command_version_conflicts_total")
    replays = value("command_idempotent_replays_total")
    user = new_user()
    first, second = loop.executor(), loop.executor()
    created = first.run(Create("counted"), Stamp(user, "m1"))
    task_id = created.task.id
    second.run(Change(task_id, title="elsewhere"), Stamp(user, "m2"))
    first.run(Change(task_id, title="from a stale cache"), Stamp(user, "m3"))
    assert value("command_version_conflicts_total") == conflicts + 1

    headers = {**bearer(user), "Idempotency-Key": "counted-key"}
    for _ in range(2):
        response = command_client.post("/api/tasks", json={"title": "once"}, headers=headers)
        assert response.status_code == 201
    assert value("command_idempotent_replays_total") == replays + 1
    metrics = command_client.get("/metrics").text
    assert "command_version_conflicts_total" in metrics
