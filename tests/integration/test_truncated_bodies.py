"""A request whose body ends in a disconnect is never executed: nothing is appended and
nothing is remembered under its Idempotency-Key (there is nobody to answer). Sent at the
ASGI level to the command app, and over a real socket to uvicorn on 127.0.0.1."""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
import uvicorn
from fastapi.testclient import TestClient

from shared.catalog import EVENTS_TABLE, IDEMPOTENCY_TABLE
from shared.events import actor_sql, state_sql
from shared.settings import Settings
from tests.support import bearer, new_user

DROPPED = "request dropped: client disconnected before the body ended"


def events_by(url: str, user: str) -> int:
    """Every stored event the user made (any task, any type)."""
    with psycopg.connect(url) as conn:
        row = conn.execute(
            f"SELECT count(*) FROM {EVENTS_TABLE} e WHERE {actor_sql(state_sql('e'))} = %s",
            (user,),
        ).fetchone()
    assert row is not None
    return int(row[0])


def events_of(url: str, task_id: str) -> int:
    with psycopg.connect(url) as conn:
        row = conn.execute(
            f"SELECT count(*) FROM {EVENTS_TABLE} WHERE originator_id = %s", (task_id,)
        ).fetchone()
    assert row is not None
    return int(row[0])


def remembered_keys(url: str, user: str) -> int:
    with psycopg.connect(url) as conn:
        row = conn.execute(
            f"SELECT count(*) FROM {IDEMPOTENCY_TABLE} WHERE user_id = %s", (user,)
        ).fetchone()
    assert row is not None
    return int(row[0])


def asgi_request(
    client: TestClient, method: str, path: str, user: str, chunks: list[bytes], announced: bytes,
    *, complete: bool,
) -> list[dict[str, Any]]:
    """Send `chunks` as the body of a request announcing `announced` (its Content-Length);
    `complete=False` ends it with `http.disconnect` instead of a last chunk. The messages
    the app sent back."""
    headers = {
        **bearer(user),
        "content-type": "application/json",
        "content-length": str(len(announced)),
        "idempotency-key": f"k-{uuid.uuid4().hex}",
    }
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()],
        "client": ("127.0.0.1", 50000),
        "server": ("testserver", 80),
    }
    messages: list[dict[str, Any]] = [
        {"type": "http.request", "body": c, "more_body": True} for c in chunks
    ]
    if complete:
        messages[-1]["more_body"] = False
    else:
        messages.append({"type": "http.disconnect"})
    sent: list[dict[str, Any]] = []

    async def run() -> None:
        pending = list(messages)

        async def receive() -> dict[str, Any]:
            if pending:
                return pending.pop(0)
            return {"type": "http.disconnect"}

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)

        await client.app(scope, receive, send)

    assert client.portal is not None  # the app's pool lives on the client's loop
    client.portal.call(run)
    return sent


def status_of(sent: list[dict[str, Any]]) -> int | None:
    starts = [m for m in sent if m["type"] == "http.response.start"]
    return starts[0]["status"] if starts else None


def test_a_create_whose_body_ends_in_a_disconnect_appends_nothing(
    command_client: TestClient, database_url: str
) -> None:
    user = new_user()
    whole = json.dumps({"title": "never arrives", "description": "the rest"}).encode()
    # Truncated where the part received is valid JSON on its own: the worst case.
    part = json.dumps({"title": "never arrives"}).encode()
    announced = whole
    sent = asgi_request(command_client, "POST", "/api/tasks", user, [part], announced,
                        complete=False)
    assert sent == []  # nobody to answer
    sent = asgi_request(command_client, "POST", f"/api/{user}/tasks", user, [b"", part],
                        announced, complete=False)
    assert sent == []
    assert events_by(database_url, user) == 0
    assert remembered_keys(database_url, user) == 0

    # The same request, complete, is executed: the harness would see a lost body run.
    sent = asgi_request(command_client, "POST", "/api/tasks", user, [part], part, complete=True)
    assert status_of(sent) == 201
    assert events_by(database_url, user) == 1


def test_a_completion_whose_body_is_lost_does_not_toggle(
    command_client: TestClient, database_url: str
) -> None:
    user = new_user()
    created = command_client.post("/api/tasks", json={"title": "stays open"}, headers=bearer(user))
    assert created.status_code == 201, created.text
    task_id = created.json()["data"]["id"]
    path = f"/api/{user}/tasks/{task_id}/complete"
    announced = json.dumps({"completed": False}).encode()

    for chunks in ([b""], [b'{"compl'], [announced[:-1]]):
        sent = asgi_request(command_client, "PATCH", path, user, chunks, announced,
                            complete=False)
        assert sent == [], chunks
    assert events_of(database_url, task_id) == 1  # only its creation
    assert remembered_keys(database_url, user) == 0

    # An empty body, complete, is a toggle: exactly what a lost body must not become.
    sent = asgi_request(command_client, "PATCH", path, user, [b""], b"", complete=True)
    assert status_of(sent) == 200
    assert events_of(database_url, task_id) == 2


# -- over a real socket ----------------------------------------------------------------


@pytest.fixture(scope="module")
def live_server(settings: Settings) -> Iterator[tuple[str, int]]:
    """The command app under uvicorn on 127.0.0.1 (a free port), in a thread."""
    from command_api.app import create_app

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    host, port = sock.getsockname()
    config = uvicorn.Config(create_app(settings), log_level="warning", lifespan="on")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    try:
        yield host, port
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


def raw_request(address: tuple[str, int], method: str, path: str, user: str, body: bytes,
                announced: int) -> bytes:
    """Send a request announcing `announced` bytes of body but carrying `body`, then close
    the writing side when it is short (read the answer when it is whole)."""
    head = (
        f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f"Authorization: {bearer(user)['Authorization']}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {announced}\r\n"
        f"Idempotency-Key: k-{uuid.uuid4().hex}\r\nConnection: close\r\n\r\n"
    ).encode()
    with socket.create_connection(address, timeout=5) as s:
        s.sendall(head + body)
        if len(body) < announced:
            s.shutdown(socket.SHUT_WR)
        answer = b""
        while chunk := s.recv(65536):
            answer += chunk
    return answer


def test_over_a_socket_a_short_body_then_close_is_dropped(
    live_server: tuple[str, int], database_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    user = new_user()
    part = json.dumps({"title": "cut off"}).encode()
    caplog.set_level(logging.INFO, logger="taskservice.http")
    answer = raw_request(live_server, "POST", "/api/tasks", user, part, len(part) + 40)
    assert answer == b""  # nothing acknowledged
    deadline = time.monotonic() + 5
    while not any(DROPPED in r.getMessage() for r in caplog.records):
        assert time.monotonic() < deadline, "the server never saw the disconnect"
        time.sleep(0.02)
    assert events_by(database_url, user) == 0
    assert remembered_keys(database_url, user) == 0

    answer = raw_request(live_server, "POST", "/api/tasks", user, part, len(part))
    assert answer.startswith(b"HTTP/1.1 201"), answer[:200]
    assert events_by(database_url, user) == 1
