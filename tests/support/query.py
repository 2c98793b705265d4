"""Helpers for the query side's tests: write through the real command side, project,
then read."""

from __future__ import annotations

import functools
from typing import Any

import psycopg
from fastapi.testclient import TestClient

from shared.position import KEY_SQL, Position, PositionCodec
from tests.support import bearer

_SESSION_DATABASE: list[str] = []


def use_database(url: str) -> None:
    """The database `position_of` opens tokens for by default (the session's)."""
    _SESSION_DATABASE[:] = [url]


@functools.cache
def codec_for(url: str) -> PositionCodec:
    """The position seal of the database at `url` (its key, made by db init)."""
    with psycopg.connect(url) as conn:
        row = conn.execute(KEY_SQL).fetchone()
    assert row is not None, "no sealing key: db init has not run"
    return PositionCodec(bytes(row[0]))


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


def position_of(token: str, url: str | None = None) -> Position:
    """The position a sealed token holds (tokens of the session database by default)."""
    return codec_for(url or _SESSION_DATABASE[0]).decode(token)


def assert_error(response: Any, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body = response.json()
    assert body["error"]["code"] == code, body
    assert set(body["meta"]) >= {"timestamp", "request_id"}
    assert "data" not in body
    assert body["detail"] == body["error"]["message"], body
    return body["error"]
