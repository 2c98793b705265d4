"""Helpers for the query side's tests: write through the real command side, project,
then read."""

from __future__ import annotations

from typing import Any

from fastapi.testclient import TestClient

from shared.position import decode
from tests.support import bearer


def write(
    client: TestClient, method: str, path: str, user: str, body: Any = None, **headers: str
) -> tuple[dict[str, Any] | None, str]:
    """Run one command over HTTP; the task it answered (None for 204) and its position."""
    response = client.request(method, path, json=body, headers={**bearer(user), **headers})
    assert response.status_code in (200, 201, 204), response.text
    position = response.headers["X-Position"]
    if response.status_code == 204:
        return None, position
    return response.json()["data"], position


def create(client: TestClient, user: str, title: str, description: str | None = None,
           **headers: str) -> tuple[dict[str, Any], str]:
    task, position = write(
        client, "POST", "/api/tasks", user, {"title": title, "description": description}, **headers
    )
    assert task is not None
    return task, position


def position_of(token: str) -> int:
    return decode(token)


def assert_error(response: Any, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body = response.json()
    assert body["error"]["code"] == code, body
    assert set(body["meta"]) >= {"timestamp", "request_id"}
    assert "data" not in body
    assert body["detail"] == body["error"]["message"], body
    return body["error"]
