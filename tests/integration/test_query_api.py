"""The query API over HTTP: tasks written through the real command side, projected by
the real projector, read back per user."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from fastapi.testclient import TestClient

from query_api.app import create_app
from shared.settings import Settings
from tests.support import bearer, new_user
from tests.support.projection import catch_up
from tests.support.query import assert_error, create, position_of, write


@pytest.fixture(scope="module")
def query_client(settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        yield client


@dataclass
class World:
    """Three users' tasks, written as commands and projected."""

    alice: str
    bob: str
    carol: str
    tasks: dict[str, dict[str, Any]] = field(default_factory=dict)  # latest view by name
    request_ids: dict[str, str] = field(default_factory=dict)
    last_position: str = ""

    def ids(self, *names: str) -> list[str]:
        return [self.tasks[n]["id"] for n in names]


@pytest.fixture(scope="module")
async def world(command_client: TestClient, database_url: str) -> World:
    w = World(new_user(), new_user(), new_user())
    c = command_client

    def made(name: str, user: str, title: str, description: str | None = None) -> None:
        rid = f"req-{name}-{uuid.uuid4().hex[:8]}"
        w.tasks[name], w.last_position = create(c, user, title, description, **{"X-Request-ID": rid})
        w.request_ids[name] = rid

    made("a1", w.alice, "Buy milk", "2% fat")
    made("a2", w.alice, "Write REPORT", "quarterly_numbers")
    made("a3", w.alice, "call mom")
    made("a4", w.alice, "Temp")
    made("b1", w.bob, "Buy milk")
    made("b2", w.bob, "Bob's 100% task", "for bob")
    made("c1", w.carol, "Buy milk")
    a1 = w.tasks["a1"]["id"]
    w.tasks["a1"], _ = write(
        c, "PATCH", f"/api/tasks/{a1}", w.alice, {"title": "Buy oat milk", "completed": True},
        **{"X-Request-ID": "req-a1-patch"},
    )
    c1 = w.tasks["c1"]["id"]
    w.tasks["c1"], _ = write(c, "PATCH", f"/api/{w.carol}/tasks/{c1}/complete", w.carol)
    _, w.last_position = write(
        c, "DELETE", f"/api/tasks/{w.tasks['a4']['id']}", w.alice,
        **{"X-Request-ID": "req-a4-delete"},
    )
    await catch_up(database_url)
    return w


def get(client: TestClient, path: str, user: str, **params: Any) -> Any:
    return client.get(path, params=params, headers=bearer(user))


def data(response: Any) -> Any:
    assert response.status_code == 200, response.text
    return response.json()["data"]


# -- the task list -----------------------------------------------------------------------


def test_lists_the_users_live_tasks_newest_first_as_the_command_side_shows_them(
    query_client: TestClient, world: World
):
    response = get(query_client, "/api/tasks", world.alice)
    body = response.json()
    assert body["data"] == [world.tasks["a3"], world.tasks["a2"], world.tasks["a1"]]
    assert body["meta"]["total"] == 3
    assert set(body["meta"]) >= {"timestamp", "request_id", "position"}
    assert position_of(body["meta"]["position"]) >= position_of(world.last_position)
    assert body["meta"]["stale"] is False


@pytest.mark.parametrize(
    ("sort", "expected"),
    [
        ("-created_at", ["a3", "a2", "a1"]),
        ("created_at", ["a1", "a2", "a3"]),
        ("-updated_at", ["a1", "a3", "a2"]),
        ("updated_at", ["a2", "a3", "a1"]),
        ("title", ["a1", "a3", "a2"]),
        ("-title", ["a2", "a3", "a1"]),
    ],
)
def test_sorts_the_list_by_each_field_both_ways(
    query_client: TestClient, world: World, sort: str, expected: list[str]
):
    tasks = data(get(query_client, "/api/tasks", world.alice, sort=sort))
    assert [t["id"] for t in tasks] == world.ids(*expected)


@pytest.mark.parametrize(
    ("status", "expected"),
    [("all", ["a3", "a2", "a1"]), ("pending", ["a3", "a2"]), ("completed", ["a1"])],
)
def test_filters_the_list_by_status(
    query_client: TestClient, world: World, status: str, expected: list[str]
):
    response = get(query_client, "/api/tasks", world.alice, status=status)
    assert [t["id"] for t in data(response)] == world.ids(*expected)
    assert response.json()["meta"]["total"] == len(expected)


@pytest.mark.parametrize(
    ("q", "expected"),
    [
        ("MILK", ["a1"]),  # case-insensitive, title
        ("report", ["a2"]),
        ("QUARTERLY", ["a2"]),  # description
        ("%", ["a1"]),  # a literal percent sign, not "anything"
        ("_", ["a2"]),  # a literal underscore, not "any character"
        ("\\", []),
        ("nothing like this", []),
        ("", ["a3", "a2", "a1"]),
    ],
)
def test_searches_titles_and_descriptions_with_wildcards_taken_literally(
    query_client: TestClient, world: World, q: str, expected: list[str]
):
    response = get(query_client, "/api/tasks", world.alice, q=q)
    assert [t["id"] for t in data(response)] == world.ids(*expected)
    assert response.json()["meta"]["total"] == len(expected)


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        ({"limit": 2}, ["a3", "a2"]),
        ({"limit": 2, "offset": 2}, ["a1"]),
        ({"offset": 1}, ["a2", "a1"]),
        ({"offset": 5}, []),
        ({"limit": 1000}, ["a3", "a2", "a1"]),
        ({"status": "pending", "sort": "title", "limit": 1}, ["a3"]),
    ],
)
def test_pages_the_list_while_the_total_counts_every_match(
    query_client: TestClient, world: World, params: dict[str, Any], expected: list[str]
):
    response = get(query_client, "/api/tasks", world.alice, **params)
    assert [t["id"] for t in data(response)] == world.ids(*expected)
    total = 2 if params.get("status") == "pending" else 3
    assert response.json()["meta"]["total"] == total


@pytest.mark.parametrize(
    ("params", "field_name"),
    [
        ({"status": "done"}, "status"),
        ({"sort": "importance"}, "sort"),
        ({"sort": "--title"}, "sort"),
        ({"limit": 0}, "limit"),
        ({"limit": 1001}, "limit"),
        ({"limit": "ten"}, "limit"),
        ({"offset": -1}, "offset"),
        ({"offset": 10**30}, "offset"),
        ({"q": "x" * 501}, "q"),
        ({"q": "nul\u0000"}, "q"),
        ({"min_position": "12"}, "min_position"),
    ],
)
def test_rejects_bad_list_parameters_with_a_validation_error(
    query_client: TestClient, world: World, params: dict[str, Any], field_name: str
):
    error = assert_error(
        get(query_client, "/api/tasks", world.alice, **params), 422, "VALIDATION_ERROR"
    )
    assert field_name in error["details"]


# -- one task ----------------------------------------------------------------------------


def test_reads_one_task_with_its_etag(query_client: TestClient, world: World):
    task = world.tasks["a1"]
    response = get(query_client, f"/api/tasks/{task['id']}", world.alice)
    assert data(response) == task
    assert response.headers["ETag"] == f'"v{task["version"]}"' == '"v3"'
    assert response.json()["meta"]["position"]


def test_forbids_reading_another_users_task_without_revealing_it(
    query_client: TestClient, world: World
):
    bobs = world.tasks["b2"]
    response = get(query_client, f"/api/tasks/{bobs['id']}", world.alice)
    assert_error(response, 403, "FORBIDDEN")
    assert world.bob not in response.text and "100%" not in response.text
    assert "ETag" not in response.headers


def test_answers_404_for_unknown_and_deleted_tasks(query_client: TestClient, world: World):
    assert_error(get(query_client, f"/api/tasks/{uuid.uuid4()}", world.alice), 404, "NOT_FOUND")
    deleted = world.tasks["a4"]["id"]
    assert_error(get(query_client, f"/api/tasks/{deleted}", world.alice), 404, "NOT_FOUND")
    assert_error(get(query_client, f"/api/tasks/{deleted}", world.bob), 404, "NOT_FOUND")


@pytest.mark.parametrize("path", ["/api/tasks/not-a-uuid", "/api/tasks/1234/history"])
def test_rejects_a_task_id_that_is_not_a_uuid(query_client: TestClient, world: World, path: str):
    error = assert_error(get(query_client, path, world.alice), 422, "VALIDATION_ERROR")
    assert "task_id" in error["details"]


# -- a task's history --------------------------------------------------------------------


def test_a_tasks_history_is_its_audit_trail_oldest_first(query_client: TestClient, world: World):
    history = data(get(query_client, f"/api/tasks/{world.tasks['a1']['id']}/history", world.alice))
    assert [(h["type"], h["version"]) for h in history] == [
        ("TaskCreated", 1),
        ("TaskTitleChanged", 2),
        ("TaskCompleted", 3),
    ]
    created, retitled, completed = history
    assert created["changes"]["title"] == {"from": None, "to": "Buy milk"}
    assert created["request_id"] == world.request_ids["a1"]
    assert retitled["changes"] == {"title": {"from": "Buy milk", "to": "Buy oat milk"}}
    assert completed["changes"] == {"completed": {"from": False, "to": True}}
    assert {h["actor"] for h in history} == {world.alice}
    assert {h["task_id"] for h in history} == {world.tasks["a1"]["id"]}
    assert retitled["request_id"] == completed["request_id"] == "req-a1-patch"
    assert completed["occurred_at"] == world.tasks["a1"]["updated_at"]


def test_history_stays_readable_by_its_owner_after_deletion(
    query_client: TestClient, world: World
):
    history = data(get(query_client, f"/api/tasks/{world.tasks['a4']['id']}/history", world.alice))
    assert [h["type"] for h in history] == ["TaskCreated", "TaskDeleted"]
    assert history[1]["request_id"] == "req-a4-delete"


def test_history_of_another_users_task_is_refused(query_client: TestClient, world: World):
    live = get(query_client, f"/api/tasks/{world.tasks['b1']['id']}/history", world.alice)
    assert_error(live, 403, "FORBIDDEN")
    assert world.bob not in live.text
    deleted = get(query_client, f"/api/tasks/{world.tasks['a4']['id']}/history", world.carol)
    assert_error(deleted, 404, "NOT_FOUND")
    assert "Temp" not in deleted.text
    unknown = get(query_client, f"/api/tasks/{uuid.uuid4()}/history", world.alice)
    assert_error(unknown, 404, "NOT_FOUND")


# -- the activity feed -------------------------------------------------------------------


def _alice_feed(world: World) -> list[tuple[str, str]]:
    a1, a2, a3, a4 = world.ids("a1", "a2", "a3", "a4")
    return [
        ("TaskDeleted", a4),
        ("TaskCompleted", a1),
        ("TaskTitleChanged", a1),
        ("TaskCreated", a4),
        ("TaskCreated", a3),
        ("TaskCreated", a2),
        ("TaskCreated", a1),
    ]


def _pairs(entries: list[dict[str, Any]]) -> list[tuple[str, str]]:
    return [(e["type"], e["task_id"]) for e in entries]


def test_the_feed_lists_the_users_events_across_tasks_newest_first(
    query_client: TestClient, world: World
):
    response = get(query_client, "/api/history", world.alice)
    assert _pairs(data(response)) == _alice_feed(world)
    assert response.json()["meta"]["next_cursor"] is None
    assert response.json()["meta"]["position"]


def test_the_feed_pages_with_an_opaque_cursor(query_client: TestClient, world: World):
    seen: list[dict[str, Any]] = []
    cursor = None
    pages = 0
    while True:
        params: dict[str, Any] = {"limit": 3}
        if cursor:
            params["cursor"] = cursor
        body = get(query_client, "/api/history", world.alice, **params).json()
        assert len(body["data"]) <= 3
        seen.extend(body["data"])
        pages += 1
        cursor = body["meta"]["next_cursor"]
        if cursor is None:
            break
        assert world.alice not in cursor
    assert pages == 3
    assert _pairs(seen) == _alice_feed(world)


@pytest.mark.parametrize(
    ("params", "picked"),
    [
        ({"type": "TaskCreated"}, [3, 4, 5, 6]),
        ({"type": "TaskDeleted"}, [0]),
        ({"type": "TaskReopened"}, []),
        ({"limit": 2}, [0, 1]),
    ],
)
def test_the_feed_filters_by_type_and_limit(
    query_client: TestClient, world: World, params: dict[str, Any], picked: list[int]
):
    expected = _alice_feed(world)
    assert _pairs(data(get(query_client, "/api/history", world.alice, **params))) == [
        expected[i] for i in picked
    ]


def test_the_feed_filters_by_task(query_client: TestClient, world: World):
    a1 = world.tasks["a1"]["id"]
    entries = data(get(query_client, "/api/history", world.alice, task_id=a1))
    assert _pairs(entries) == [p for p in _alice_feed(world) if p[1] == a1]
    bobs = world.tasks["b1"]["id"]
    assert data(get(query_client, "/api/history", world.alice, task_id=bobs)) == []


def test_the_feed_filters_by_time_since_inclusive_until_exclusive(
    query_client: TestClient, world: World
):
    full = data(get(query_client, "/api/history", world.alice))
    pivot = full[3]["occurred_at"]  # a4 created
    since = data(get(query_client, "/api/history", world.alice, since=pivot))
    until = data(get(query_client, "/api/history", world.alice, until=pivot))
    assert since == full[:4]
    assert until == full[4:]
    window = data(
        get(query_client, "/api/history", world.alice, since=full[6]["occurred_at"], until=pivot)
    )
    assert window == full[4:]


@pytest.mark.parametrize(
    ("params", "field_name"),
    [
        ({"cursor": "garbage"}, "cursor"),
        ({"cursor": "YzEuMTIz"}, "cursor"),  # base64 of something else
        ({"since": "yesterday"}, "since"),
        ({"until": "2024-13-45T00:00:00Z"}, "until"),
        ({"type": "TaskExploded"}, "type"),
        ({"task_id": "nope"}, "task_id"),
        ({"limit": 0}, "limit"),
        ({"limit": 1001}, "limit"),
    ],
)
def test_rejects_bad_feed_parameters_with_a_validation_error(
    query_client: TestClient, world: World, params: dict[str, Any], field_name: str
):
    error = assert_error(
        get(query_client, "/api/history", world.alice, **params), 422, "VALIDATION_ERROR"
    )
    assert field_name in error["details"]


# -- stats -------------------------------------------------------------------------------


def test_stats_count_the_users_live_tasks(query_client: TestClient, world: World):
    assert data(get(query_client, "/api/stats", world.alice)) == {
        "total": 3, "completed": 1, "pending": 2,
    }
    assert data(get(query_client, "/api/stats", world.bob)) == {
        "total": 2, "completed": 0, "pending": 2,
    }
    assert data(get(query_client, "/api/stats", world.carol)) == {
        "total": 1, "completed": 1, "pending": 0,
    }


def test_a_user_without_tasks_has_zero_stats_and_empty_lists(query_client: TestClient, world: World):
    nobody = new_user()
    assert data(get(query_client, "/api/stats", nobody)) == {"total": 0, "completed": 0, "pending": 0}
    listed = get(query_client, "/api/tasks", nobody)
    assert data(listed) == [] and listed.json()["meta"]["total"] == 0
    assert data(get(query_client, "/api/history", nobody)) == []


# -- /api/{user_id}/tasks ----------------------------------------------------------------


def test_the_user_path_lists_and_reads_the_users_own_tasks(query_client: TestClient, world: World):
    listed = get(query_client, f"/api/{world.bob}/tasks", world.bob, sort="title")
    assert data(listed) == [world.tasks["b2"], world.tasks["b1"]]
    assert listed.json()["meta"]["total"] == 2
    one = get(query_client, f"/api/{world.bob}/tasks/{world.tasks['b1']['id']}", world.bob)
    assert data(one) == world.tasks["b1"]
    assert one.headers["ETag"] == '"v1"'
    error = assert_error(
        get(query_client, f"/api/{world.bob}/tasks", world.bob, status="open"),
        422, "VALIDATION_ERROR",
    )
    assert "status" in error["details"]


def test_the_user_path_refuses_another_users_id(query_client: TestClient, world: World):
    for path in (
        f"/api/{world.bob}/tasks",
        f"/api/{world.bob}/tasks/{world.tasks['b1']['id']}",
        f"/api/{world.bob}/tasks/{uuid.uuid4()}",
    ):
        response = get(query_client, path, world.alice)
        assert_error(response, 403, "FORBIDDEN")
        assert "Buy milk" not in response.text
    own_path_others_task = get(
        query_client, f"/api/{world.alice}/tasks/{world.tasks['b1']['id']}", world.alice
    )
    assert_error(own_path_others_task, 403, "FORBIDDEN")


# -- isolation ---------------------------------------------------------------------------


@pytest.mark.parametrize("who", ["alice", "bob", "carol"])
def test_every_endpoint_answers_with_the_users_own_data_only(
    query_client: TestClient, world: World, who: str
):
    user = getattr(world, who)
    own = {n: t for n, t in world.tasks.items() if t["user_id"] == user and n != "a4"}
    others = {t["id"] for t in world.tasks.values() if t["user_id"] != user}

    listed = data(get(query_client, "/api/tasks", user, limit=1000))
    assert {t["id"] for t in listed} == {t["id"] for t in own.values()}
    searched = data(get(query_client, "/api/tasks", user, q="milk"))
    assert [t["user_id"] for t in searched] == [user]
    via_path = data(get(query_client, f"/api/{user}/tasks", user))
    assert via_path == listed

    feed = data(get(query_client, "/api/history", user, limit=1000))
    assert feed and {e["actor"] for e in feed} == {user}
    assert not {e["task_id"] for e in feed} & others

    stats = data(get(query_client, "/api/stats", user))
    assert stats["total"] == len(own)

    for other in others:
        if other == world.tasks["a4"]["id"]:
            continue
        for path in (f"/api/tasks/{other}", f"/api/tasks/{other}/history",
                     f"/api/{user}/tasks/{other}"):
            response = get(query_client, path, user)
            assert_error(response, 403, "FORBIDDEN")
        assert data(get(query_client, "/api/history", user, task_id=other)) == []


# -- auth, slashes, request ids ----------------------------------------------------------

ENDPOINTS = [
    "/api/tasks",
    "/api/tasks/{a1}",
    "/api/tasks/{a1}/history",
    "/api/history",
    "/api/stats",
    "/api/{alice}/tasks",
    "/api/{alice}/tasks/{a1}",
]


def _path(template: str, world: World) -> str:
    return template.format(a1=world.tasks["a1"]["id"], alice=world.alice)


@pytest.mark.parametrize("template", ENDPOINTS)
def test_every_endpoint_needs_a_token(query_client: TestClient, world: World, template: str):
    response = query_client.get(_path(template, world))
    error = assert_error(response, 401, "UNAUTHORIZED")
    assert error["message"] == "Authorization header required"
    assert response.headers["WWW-Authenticate"] == "Bearer"
    bad = query_client.get(_path(template, world), headers={"Authorization": "Bearer x.y.z"})
    assert_error(bad, 401, "UNAUTHORIZED")


@pytest.mark.parametrize("template", ENDPOINTS)
def test_every_endpoint_answers_with_a_trailing_slash_without_redirect(
    query_client: TestClient, world: World, template: str
):
    path = _path(template, world)
    plain = query_client.get(path, headers=bearer(world.alice), follow_redirects=False)
    slashed = query_client.get(path + "/", headers=bearer(world.alice), follow_redirects=False)
    assert plain.status_code == slashed.status_code == 200
    assert slashed.json()["data"] == plain.json()["data"]


def test_reuses_a_sane_request_id_and_replaces_a_bad_one(query_client: TestClient, world: World):
    sane = query_client.get(
        "/api/stats", headers={**bearer(world.alice), "X-Request-ID": "trace-42"}
    )
    assert sane.headers["X-Request-ID"] == "trace-42" == sane.json()["meta"]["request_id"]
    bad = query_client.get(
        "/api/stats", headers={**bearer(world.alice), "X-Request-ID": "no spaces allowed"}
    )
    assert bad.headers["X-Request-ID"] != "no spaces allowed"
    assert bad.headers["X-Request-ID"] == bad.json()["meta"]["request_id"]


def test_unknown_routes_and_writes_are_enveloped(query_client: TestClient, world: World):
    assert_error(get(query_client, "/api/nothing/here/at/all", world.alice), 404, "NOT_FOUND")
    written = query_client.post("/api/tasks", json={"title": "x"}, headers=bearer(world.alice))
    assert_error(written, 405, "METHOD_NOT_ALLOWED")


def test_health_and_ready_report_the_projection_position(query_client: TestClient, world: World):
    health = query_client.get("/api/health")
    assert health.status_code == 200 and health.json()["data"]["service"] == "query-api"
    ready = data(query_client.get("/api/ready/"))
    assert ready["database"] == "ok"
    assert position_of(ready["position"]) >= position_of(world.last_position)
