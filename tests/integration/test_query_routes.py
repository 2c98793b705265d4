"""The hot reads' dispatcher (`query_api.routes.ReadDispatcher`) answers exactly as the
router's own routes do: the same scenario runs against the query API with and without
it, and every answer (status, body, headers) must match once clocks and request ids
are masked; the requests it is for never reach the router; metrics name the route
template either way. And a pooled connection carries no session state from one read
to the next (the pool sends no reset query: `query_api.app.ReadSide._open_pool`)."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient
from prometheus_client import REGISTRY

from query_api import queries, routes
from query_api.app import ReadSide, create_app
from shared.row_security import USER_SETTING, USERS_SETTING
from shared.settings import Settings
from tests.support import bearer, new_user
from tests.support.projection import catch_up
from tests.support.query import create

MASKED_KEYS = {"timestamp", "request_id"}
COMPARED_HEADERS = ("content-type", "etag", "allow", "www-authenticate", "retry-after")


def without_dispatcher(app: FastAPI) -> FastAPI:
    """The app with every read served through its router."""
    app.user_middleware = [m for m in app.user_middleware if m.cls is not routes.ReadDispatcher]
    return app


@dataclass
class Tasks:
    me: str
    other: str
    mine: str
    second: str
    theirs: str
    position: str


@pytest.fixture(scope="module")
async def tasks(command_client: TestClient, database_url: str) -> Tasks:
    me, other = new_user(), new_user()
    mine, _ = create(command_client, me, "Mine", "with a description")
    second, _ = create(command_client, me, "Second")
    theirs, position = create(command_client, other, "Theirs")
    await catch_up(database_url)
    return Tasks(me, other, mine["id"], second["id"], theirs["id"], position)


def _mask(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: "*" if k in MASKED_KEYS else _mask(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_mask(v) for v in value]
    return value


def scenario(t: Tasks, send: Callable[..., Any]) -> list[dict[str, Any]]:
    """Reads of every shape, valid and not, fast and not; the masked answers."""
    unknown = str(uuid.uuid4())
    requests: list[tuple[str, str, str, dict[str, str]]] = [
        ("list", "GET", "/api/tasks", bearer(t.me)),
        ("list, path contract", "GET", f"/api/{t.me}/tasks", bearer(t.me)),
        ("list, another user's path", "GET", f"/api/{t.other}/tasks", bearer(t.me)),
        ("list, trailing slash", "GET", "/api/tasks/", bearer(t.me)),
        ("list, a filter", "GET", "/api/tasks?limit=1&sort=title", bearer(t.me)),
        ("list, a misspelt filter", "GET", "/api/tasks?serach=x", bearer(t.me)),
        ("list, no token", "GET", "/api/tasks", {}),
        ("get", "GET", f"/api/tasks/{t.mine}", bearer(t.me)),
        ("get, upper case id", "GET", f"/api/tasks/{t.mine.upper()}", bearer(t.me)),
        ("get, id without hyphens", "GET", f"/api/tasks/{t.mine.replace('-', '')}", bearer(t.me)),
        ("get, another user's task", "GET", f"/api/tasks/{t.theirs}", bearer(t.me)),
        ("get, unknown task", "GET", f"/api/tasks/{unknown}", bearer(t.me)),
        ("get, not an id", "GET", "/api/tasks/nope", bearer(t.me)),
        ("get, the id 'tasks'", "GET", "/api/tasks/tasks", bearer(t.me)),
        ("get, no token", "GET", f"/api/tasks/{t.mine}", {}),
        ("get, no token, not an id", "GET", "/api/tasks/nope", {}),
        ("get, a bad token", "GET", f"/api/tasks/{t.mine}", {"Authorization": "Bearer x.y.z"}),
        ("get, not bearer", "GET", f"/api/tasks/{t.mine}", {"Authorization": "Basic eA=="}),
        ("get, X-Min-Position", "GET", f"/api/tasks/{t.second}",
         {**bearer(t.me), "X-Min-Position": t.position}),
        ("get, a bad X-Min-Position", "GET", f"/api/tasks/{t.mine}",
         {**bearer(t.me), "X-Min-Position": "forged"}),
        ("get, min_position", "GET", f"/api/tasks/{t.mine}?min_position={t.position}",
         bearer(t.me)),
        ("get, trailing slash", "GET", f"/api/tasks/{t.mine}/", bearer(t.me)),
        ("head", "HEAD", f"/api/tasks/{t.mine}", bearer(t.me)),
        ("get, path contract", "GET", f"/api/{t.me}/tasks/{t.mine}", bearer(t.me)),
        ("get, another user's path", "GET", f"/api/{t.other}/tasks/{t.mine}", bearer(t.me)),
        ("get, path contract, their task", "GET", f"/api/{t.me}/tasks/{t.theirs}", bearer(t.me)),
        ("get, the user 'tasks'", "GET", f"/api/tasks/tasks/{t.mine}", bearer(t.me)),
        ("history", "GET", f"/api/tasks/{t.mine}/history", bearer(t.me)),
        ("history, another user's task", "GET", f"/api/tasks/{t.theirs}/history", bearer(t.me)),
        ("history, unknown task", "GET", f"/api/tasks/{unknown}/history", bearer(t.me)),
        ("history, no token", "GET", f"/api/tasks/{t.mine}/history", {}),
        ("a method no read has", "POST", f"/api/tasks/{t.mine}", bearer(t.me)),
        ("stats", "GET", "/api/stats", bearer(t.me)),
    ]
    answers = []
    for label, method, path, headers in requests:
        r = send(label, method, path, headers=headers)
        body = r.json() if r.content else None
        answers.append({
            "label": label, "status": r.status_code, "body": _mask(body),
            "headers": {h: r.headers.get(h) for h in COMPARED_HEADERS},
        })
    return answers


def test_the_dispatcher_answers_as_the_router_does(settings: Settings, tasks: Tasks) -> None:
    results = []
    for app in (create_app(settings), without_dispatcher(create_app(settings))):
        with TestClient(app, raise_server_exceptions=False) as client:
            results.append(scenario(tasks, lambda _, *args, **kw: client.request(*args, **kw)))
    dispatched, routed = results
    for a, b in zip(dispatched, routed, strict=True):
        assert a == b, a["label"]
    statuses = {a["status"] for a in dispatched}
    assert statuses >= {200, 401, 403, 404, 405, 422}, statuses


FAST = {"list", "list, path contract", "list, another user's path", "list, trailing slash",
        "list, no token", "get", "get, upper case id", "get, another user's task",
        "get, unknown task", "get, no token", "get, a bad token", "get, not bearer",
        "get, trailing slash", "head", "get, path contract", "get, another user's path",
        "get, path contract, their task", "history", "history, another user's task",
        "history, unknown task", "history, no token"}


def test_the_dispatcher_serves_the_hot_reads_and_only_them(
    settings: Settings, tasks: Tasks, monkeypatch: pytest.MonkeyPatch
) -> None:
    routed: list[str] = []
    handle = APIRoute.handle
    label = [""]

    async def counting(self: APIRoute, *args: Any) -> None:
        routed.append(label[0])
        await handle(self, *args)

    monkeypatch.setattr(APIRoute, "handle", counting)
    reached = []
    for app in (without_dispatcher(create_app(settings)), create_app(settings)):
        routed.clear()
        with TestClient(app, raise_server_exceptions=False) as client:

            def send(name: str, *args: Any, client: TestClient = client, **kw: Any) -> Any:
                label[0] = name
                return client.request(*args, **kw)

            scenario(tasks, send)
        reached.append(set(routed))
    everything = {a["label"] for a in scenario(tasks, lambda *_, **__: _Empty())}
    assert reached[0] == everything  # the spy sees the router serve them
    assert reached[1] == everything - FAST


class _Empty:
    status_code = 0
    content = b""
    headers: dict[str, str] = {}


@pytest.mark.parametrize("path", [
    "/api/tasks/stream", "/api/me/tasks/stream", "/api/tasks/stream/tickets",
    "/api/tasks/tasks", "/api//tasks", "/api/tasks//history", "/api/history", "/api/stats",
    "/api/health", "/api/ready", "/metrics", "/api", "/api/tasks/x/history",
    f"/api/tasks/{uuid.uuid4()}/history/x", f"/api/tasks/tasks/{uuid.uuid4()}",
])
def test_the_dispatcher_leaves_every_other_path_to_the_router(path: str) -> None:
    assert routes.ReadDispatcher.match(path) is None


def test_metrics_label_dispatched_reads_by_route_template(
    settings: Settings, tasks: Tasks
) -> None:
    def count(route: str, status: str) -> float:
        value = REGISTRY.get_sample_value(
            "http_requests_total",
            {"service": "query-api", "method": "GET", "route": route, "status": status},
        )
        return value or 0.0

    before = count("/api/tasks/{task_id}", "200"), count("/api/{path_user_id}/tasks", "403")
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        assert client.get(f"/api/tasks/{tasks.mine}", headers=bearer(tasks.me)).status_code == 200
        assert client.get(f"/api/{tasks.other}/tasks", headers=bearer(tasks.me)).status_code == 403
    after = count("/api/tasks/{task_id}", "200"), count("/api/{path_user_id}/tasks", "403")
    assert (after[0] - before[0], after[1] - before[1]) == (1, 1)


SESSION_STATE = (
    f"SELECT current_setting('{USER_SETTING}', true) AS user_setting,"
    f" current_setting('{USERS_SETTING}', true) AS users_setting,"
    " current_user = session_user AS own_role,"
    " (SELECT count(*) FROM pg_listening_channels()) AS listening,"
    " (SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'"
    "  AND pid = pg_backend_pid()) AS advisory_locks,"
    " (SELECT count(*) FROM pg_cursors WHERE name <> '') AS cursors,"  # not this one's
    " (SELECT count(*) FROM pg_settings WHERE source = 'session') AS session_settings"
)
CLEAN = {"user_setting": "", "users_setting": "", "own_role": True, "listening": 0,
         "advisory_locks": 0, "cursors": 0, "session_settings": 0}


async def test_a_pooled_connection_carries_no_session_state_from_one_read_to_the_next(
    settings: Settings, tasks: Tasks
) -> None:
    # One connection, so every read below runs on the one checked after them.
    side = ReadSide(settings.model_copy(update={"db_pool_size": 1, "db_max_overflow": 0}))
    await side.start()
    try:
        reader = await side.open()
        mine = reader.for_user(tasks.me)
        task = uuid.UUID(tasks.mine)
        await mine.read_row(None, queries.get_task(tasks.me, task))
        await mine.read_row(None, queries.list_tasks(tasks.me))
        await mine.read_rows(None, queries.task_history(tasks.me, task))
        await mine.read_rows(None, queries.activity_feed(tasks.me))
        await mine.read_row(None, queries.user_stats(tasks.me))
        await mine.run(lambda conn: queries.why_missing(conn, tasks.other, task))
        async with reader.for_streams([tasks.me, tasks.other]) as conn:
            await conn.fetch(f"SELECT {SESSION_STATE.removeprefix('SELECT ')}")
        async with reader.connection() as conn:
            assert not conn.is_in_transaction()
            state = dict(await conn.fetchrow(SESSION_STATE))
        # Unset, a custom setting reads NULL; set once and reverted, ''.
        state = {k: "" if v is None else v for k, v in state.items()}
        assert state == CLEAN
    finally:
        await side.close()
