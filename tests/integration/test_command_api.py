"""The command API over HTTP, against a real PostgreSQL event store."""

from __future__ import annotations

import uuid

import pytest
from fastapi.testclient import TestClient

from tests.support import bearer, new_user
from tests.support.query import position_of as decode


def create(client: TestClient, user: str, title: str = "Buy milk", **body: object) -> dict:
    response = client.post("/api/tasks", json={"title": title, **body}, headers=bearer(user))
    assert response.status_code == 201, response.text
    return response.json()["data"]


def assert_error(response, status: int, code: str) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert body["error"]["code"] == code
    assert set(body["meta"]) >= {"timestamp", "request_id"}
    assert "data" not in body
    return body["error"]


# -- creating ----------------------------------------------------------------------------


def test_creates_a_task_in_the_envelope_with_etag_and_position(command_client: TestClient):
    user = new_user()
    response = command_client.post(
        "/api/tasks",
        json={"title": "  Buy milk  ", "description": "2 litres"},
        headers={**bearer(user), "X-Request-ID": "req-create-1"},
    )
    assert response.status_code == 201
    body = response.json()
    task = body["data"]
    assert task["title"] == "Buy milk"
    assert task["description"] == "2 litres"
    assert task["completed"] is False
    assert task["user_id"] == user
    assert task["version"] == 1
    uuid.UUID(task["id"])
    assert task["created_at"].endswith("+00:00") and task["updated_at"] == task["created_at"]
    assert body["meta"]["request_id"] == "req-create-1"
    assert response.headers["X-Request-ID"] == "req-create-1"
    assert response.headers["ETag"] == '"v1"'
    assert body["meta"]["position"] and response.headers["X-Position"] == body["meta"]["position"]


def test_positions_grow_with_each_command(command_client: TestClient):
    user = new_user()
    first = command_client.post("/api/tasks", json={"title": "a"}, headers=bearer(user))
    second = command_client.post("/api/tasks", json={"title": "b"}, headers=bearer(user))
    p1, p2 = first.json()["meta"]["position"], second.json()["meta"]["position"]
    assert decode(p2) > decode(p1)


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"title": ""}, "title"),
        ({"title": "   "}, "title"),
        ({"title": "x" * 256}, "title"),
        ({"title": None}, "title"),
        ({}, "title"),
        ({"title": 5}, "title"),
        ({"title": "ok", "description": "d" * 2001}, "description"),
        ({"title": "ok", "description": 7}, "description"),
        ({"title": "ok", "owner": "someone"}, "owner"),
        ({"title": "nul\u0000byte"}, "title"),
        ({"title": "ok", "description": "nul\u0000"}, "description"),
    ],
)
def test_rejects_invalid_create_bodies_per_field(command_client: TestClient, body, field):
    response = command_client.post("/api/tasks", json=body, headers=bearer(new_user()))
    error = assert_error(response, 422, "VALIDATION_ERROR")
    assert field in error["details"]


@pytest.mark.parametrize(
    ("raw", "field"),
    [
        (b'{"title": "lone \\ud800 surrogate"}', "title"),
        (b'{"title": "ok", "description": "\\udfff"}', "description"),
    ],
)
def test_lone_surrogates_are_422_not_500(command_client: TestClient, raw: bytes, field: str):
    # Valid JSON (an escape), but no UTF-8 encoding exists for it: it could never be stored.
    response = command_client.post(
        "/api/tasks", content=raw, headers={**bearer(new_user()), "Content-Type": "application/json"}
    )
    error = assert_error(response, 422, "VALIDATION_ERROR")
    assert field in error["details"]


@pytest.mark.parametrize(("body", "field", "message"), [
    ({"title": "   "}, "title", "must not be empty"),
    ({"title": "t" * 256}, "title", "must be at most 255 characters"),
    ({"title": "ok", "due_date": 1700000000}, "due_date",
     "must be a string (an ISO 8601 date-time or a date) or null"),
])
def test_a_fields_message_is_the_rule_it_broke_without_pydantics_prefix(
    command_client: TestClient, body: dict, field: str, message: str
):
    """A form shows `details[field]` to its user: "must not be empty", not pydantic's
    "Value error, must not be empty"."""
    response = command_client.post("/api/tasks", json=body, headers=bearer(new_user()))
    assert assert_error(response, 422, "VALIDATION_ERROR")["details"][field] == message


def test_accepts_the_longest_title_and_description(command_client: TestClient):
    task = create(command_client, new_user(), "t" * 255, description="d" * 2000)
    assert len(task["title"]) == 255 and len(task["description"]) == 2000


@pytest.mark.parametrize(
    "raw",
    [b"{not json", b"\xff\xfe\xfa", b'{"title": "\xc3\x28"}', b"[1, 2]", b'"just a string"', b""],
)
def test_malformed_bodies_are_422_not_500(command_client: TestClient, raw: bytes):
    response = command_client.post(
        "/api/tasks",
        content=raw,
        headers={**bearer(new_user()), "Content-Type": "application/json"},
    )
    assert_error(response, 422, "VALIDATION_ERROR")


def test_huge_bodies_are_413(command_client: TestClient):
    response = command_client.post(
        "/api/tasks", json={"title": "x", "description": "y" * 200_000}, headers=bearer(new_user())
    )
    assert_error(response, 413, "PAYLOAD_TOO_LARGE")


def test_chunked_huge_bodies_are_413(command_client: TestClient):
    def chunks():
        yield b'{"title": "x", "description": "'
        for _ in range(100):
            yield b"y" * 1000
        yield b'"}'

    response = command_client.post(
        "/api/tasks",
        content=chunks(),
        headers={**bearer(new_user()), "Content-Type": "application/json"},
    )
    assert_error(response, 413, "PAYLOAD_TOO_LARGE")


def test_an_insane_request_id_is_replaced(command_client: TestClient):
    response = command_client.post(
        "/api/tasks",
        json={"title": "x"},
        headers={**bearer(new_user()), "X-Request-ID": "bad id with spaces"},
    )
    assert response.status_code == 201
    assert response.headers["X-Request-ID"] != "bad id with spaces"
    assert response.json()["meta"]["request_id"] == response.headers["X-Request-ID"]


# -- changing -----------------------------------------------------------------------------


def test_patch_changes_only_the_given_fields(command_client: TestClient):
    user = new_user()
    task = create(command_client, user, "Old", description="keep me")
    response = command_client.patch(
        f"/api/tasks/{task['id']}", json={"title": " New "}, headers=bearer(user)
    )
    assert response.status_code == 200
    changed = response.json()["data"]
    assert changed["title"] == "New"
    assert changed["description"] == "keep me"
    assert changed["version"] == 2
    assert response.headers["ETag"] == '"v2"'

    response = command_client.patch(
        f"/api/tasks/{task['id']}",
        json={"description": None, "completed": True},
        headers=bearer(user),
    )
    changed = response.json()["data"]
    assert changed["description"] is None and changed["completed"] is True
    assert changed["version"] == 4

    reopened = command_client.patch(
        f"/api/tasks/{task['id']}", json={"completed": False}, headers=bearer(user)
    ).json()["data"]
    assert reopened["completed"] is False and reopened["version"] == 5


def test_an_empty_patch_changes_nothing(command_client: TestClient):
    user = new_user()
    task = create(command_client, user)
    response = command_client.patch(f"/api/tasks/{task['id']}", json={}, headers=bearer(user))
    assert response.status_code == 200
    assert response.json()["data"]["version"] == 1
    assert response.json()["data"]["updated_at"] == task["updated_at"]
    assert response.json()["meta"]["position"]


def test_setting_a_field_to_its_current_value_appends_no_event(command_client: TestClient):
    user = new_user()
    task = create(command_client, user, "Same")
    response = command_client.patch(
        f"/api/tasks/{task['id']}", json={"title": "Same", "completed": False}, headers=bearer(user)
    )
    assert response.json()["data"]["version"] == 1


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"completed": "yes"}, "completed"),
        ({"completed": 1}, "completed"),
        ({"completed": None}, "completed"),
        ({"title": None}, "title"),
        ({"title": ""}, "title"),
        ({"title": "x" * 256}, "title"),
        ({"description": "d" * 2001}, "description"),
        ({"colour": "red"}, "colour"),
    ],
)
def test_rejects_invalid_patch_bodies(command_client: TestClient, body, field):
    user = new_user()
    task = create(command_client, user)
    response = command_client.patch(f"/api/tasks/{task['id']}", json=body, headers=bearer(user))
    error = assert_error(response, 422, "VALIDATION_ERROR")
    assert field in error["details"]


def test_a_path_id_that_is_not_a_uuid_is_422(command_client: TestClient):
    user = new_user()
    for method, path in [
        ("PATCH", "/api/tasks/not-a-uuid"),
        ("DELETE", "/api/tasks/123"),
        ("PUT", f"/api/{user}/tasks/nope"),
        ("DELETE", f"/api/{user}/tasks/nope"),
        ("PATCH", f"/api/{user}/tasks/nope/complete"),
    ]:
        body = {"title": "x"} if method in ("PATCH", "PUT") else None
        response = command_client.request(method, path, json=body, headers=bearer(user))
        error = assert_error(response, 422, "VALIDATION_ERROR")
        assert "task_id" in error["details"], (method, path)


def test_unknown_task_is_404(command_client: TestClient):
    user = new_user()
    missing = uuid.uuid4()
    assert_error(
        command_client.patch(f"/api/tasks/{missing}", json={"title": "x"}, headers=bearer(user)),
        404,
        "NOT_FOUND",
    )
    assert_error(command_client.delete(f"/api/tasks/{missing}", headers=bearer(user)), 404, "NOT_FOUND")


# -- deleting -----------------------------------------------------------------------------


def test_delete_is_204_and_the_task_is_gone_for_later_commands(command_client: TestClient):
    user = new_user()
    task = create(command_client, user)
    response = command_client.delete(f"/api/tasks/{task['id']}", headers=bearer(user))
    assert response.status_code == 204
    assert response.content == b""
    assert decode(response.headers["X-Position"])
    for response in (
        command_client.delete(f"/api/tasks/{task['id']}", headers=bearer(user)),
        command_client.patch(f"/api/tasks/{task['id']}", json={"title": "x"}, headers=bearer(user)),
    ):
        assert_error(response, 404, "NOT_FOUND")


# -- isolation ---------------------------------------------------------------------------


def test_another_users_task_is_forbidden_on_every_command(command_client: TestClient):
    owner, intruder = new_user(), new_user()
    task = create(command_client, owner, "private title")
    attempts = [
        command_client.patch(f"/api/tasks/{task['id']}", json={"title": "x"}, headers=bearer(intruder)),
        command_client.patch(f"/api/tasks/{task['id']}", json={}, headers=bearer(intruder)),
        command_client.delete(f"/api/tasks/{task['id']}", headers=bearer(intruder)),
        command_client.put(
            f"/api/{intruder}/tasks/{task['id']}", json={"title": "x"}, headers=bearer(intruder)
        ),
        command_client.delete(f"/api/{intruder}/tasks/{task['id']}", headers=bearer(intruder)),
        command_client.patch(f"/api/{intruder}/tasks/{task['id']}/complete", headers=bearer(intruder)),
    ]
    for response in attempts:
        assert_error(response, 403, "FORBIDDEN")
        assert "private title" not in response.text
        assert owner not in response.text
    # and nothing changed
    check = command_client.patch(f"/api/tasks/{task['id']}", json={}, headers=bearer(owner))
    assert check.json()["data"]["version"] == 1


def test_a_path_user_other_than_the_token_user_is_forbidden(command_client: TestClient):
    me, other = new_user(), new_user()
    mine = create(command_client, me)
    attempts = [
        command_client.post(f"/api/{other}/tasks", json={"title": "x"}, headers=bearer(me)),
        command_client.put(f"/api/{other}/tasks/{mine['id']}", json={"title": "x"}, headers=bearer(me)),
        command_client.delete(f"/api/{other}/tasks/{mine['id']}", headers=bearer(me)),
        command_client.patch(f"/api/{other}/tasks/{mine['id']}/complete", headers=bearer(me)),
    ]
    for response in attempts:
        assert_error(response, 403, "FORBIDDEN")


def test_commands_without_a_token_are_401(command_client: TestClient):
    task_id = uuid.uuid4()
    for response in (
        command_client.post("/api/tasks", json={"title": "x"}),
        command_client.patch(f"/api/tasks/{task_id}", json={}),
        command_client.delete(f"/api/tasks/{task_id}"),
    ):
        error = assert_error(response, 401, "UNAUTHORIZED")
        assert error["message"] == "Authorization header required"
        assert response.headers["WWW-Authenticate"] == "Bearer"


# -- the /api/{user_id}/tasks contract ---------------------------------------------------


def test_user_scoped_contract_creates_replaces_toggles_and_deletes(command_client: TestClient):
    user = new_user()
    created = command_client.post(
        f"/api/{user}/tasks", json={"title": "Plan", "description": "d"}, headers=bearer(user)
    )
    assert created.status_code == 201
    task = created.json()["data"]

    replaced = command_client.put(
        f"/api/{user}/tasks/{task['id']}", json={"title": "Plan B"}, headers=bearer(user)
    )
    assert replaced.status_code == 200
    assert replaced.json()["data"]["title"] == "Plan B"
    assert replaced.json()["data"]["description"] is None  # PUT replaces

    toggled = command_client.patch(f"/api/{user}/tasks/{task['id']}/complete", headers=bearer(user))
    assert toggled.status_code == 200 and toggled.json()["data"]["completed"] is True
    toggled = command_client.patch(f"/api/{user}/tasks/{task['id']}/complete", headers=bearer(user))
    assert toggled.json()["data"]["completed"] is False
    explicit = command_client.patch(
        f"/api/{user}/tasks/{task['id']}/complete", json={"completed": True}, headers=bearer(user)
    )
    assert explicit.json()["data"]["completed"] is True
    again = command_client.patch(
        f"/api/{user}/tasks/{task['id']}/complete", json={"completed": True}, headers=bearer(user)
    )
    assert again.json()["data"]["completed"] is True
    assert again.json()["data"]["version"] == explicit.json()["data"]["version"]
    bad = command_client.patch(
        f"/api/{user}/tasks/{task['id']}/complete", json={"completed": "yes"}, headers=bearer(user)
    )
    assert_error(bad, 422, "VALIDATION_ERROR")

    deleted = command_client.delete(f"/api/{user}/tasks/{task['id']}", headers=bearer(user))
    assert deleted.status_code == 204


def test_put_requires_a_title(command_client: TestClient):
    user = new_user()
    task = create(command_client, user)
    response = command_client.put(
        f"/api/{user}/tasks/{task['id']}", json={"description": "x"}, headers=bearer(user)
    )
    assert "title" in assert_error(response, 422, "VALIDATION_ERROR")["details"]


# -- routing -----------------------------------------------------------------------------


def test_every_route_answers_with_a_trailing_slash_without_redirect(command_client: TestClient):
    user = new_user()
    created = command_client.post(
        "/api/tasks/", json={"title": "x"}, headers=bearer(user), follow_redirects=False
    )
    assert created.status_code == 201
    task_id = created.json()["data"]["id"]
    for method, path, body in [
        ("PATCH", f"/api/tasks/{task_id}/", {"title": "y"}),
        ("PUT", f"/api/{user}/tasks/{task_id}/", {"title": "z"}),
        ("PATCH", f"/api/{user}/tasks/{task_id}/complete/", None),
        ("POST", f"/api/{user}/tasks/", {"title": "w"}),
        ("GET", "/api/health/", None),
        ("GET", "/api/ready/", None),
        ("DELETE", f"/api/{user}/tasks/{task_id}/", None),
    ]:
        response = command_client.request(
            method, path, json=body, headers=bearer(user), follow_redirects=False
        )
        assert response.status_code in (200, 201, 204), (method, path, response.text)


def test_unknown_routes_and_methods_are_enveloped(command_client: TestClient):
    assert_error(command_client.get("/api/nothing-here"), 404, "NOT_FOUND")
    assert_error(command_client.get("/"), 404, "NOT_FOUND")
    response = command_client.put("/api/tasks", json={}, headers=bearer(new_user()))
    assert_error(response, 405, "METHOD_NOT_ALLOWED")


def test_health_needs_no_token_and_ready_checks_the_database(command_client: TestClient):
    health = command_client.get("/api/health")
    assert health.status_code == 200 and health.json()["data"]["status"] == "healthy"
    ready = command_client.get("/api/ready")
    assert ready.status_code == 200 and ready.json()["data"]["database"] == "ok"
