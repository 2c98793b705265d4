"""The command routes, declared once in `command_api.routes.ROUTES`: the dispatcher in
front of the router answers exactly as the router's own routes do (the same scenario
runs against the app with and without it; every answer, status, envelope and headers,
must match once ids and clocks are masked), the routes are the OpenAPI document's
write operations, and metrics name the route template."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from prometheus_client import REGISTRY

from command_api import routes
from command_api.app import create_app
from shared.settings import Settings
from tests.support import bearer, new_user

MASKED_KEYS = {"id", "created_at", "updated_at", "timestamp", "position"}
COMPARED_HEADERS = ("content-type", "etag", "x-request-id", "www-authenticate", "retry-after")


def without_dispatcher(app: FastAPI) -> FastAPI:
    """The app with every command request served through its router."""
    app.user_middleware = [m for m in app.user_middleware
                           if m.cls is not routes.CommandDispatcher]
    return app


def _mask(value: Any, names: dict[str, str]) -> Any:
    if isinstance(value, dict):
        return {k: "*" if k in MASKED_KEYS else _mask(v, names) for k, v in value.items()}
    if isinstance(value, list):
        return [_mask(v, names) for v in value]
    if isinstance(value, str):
        for real, alias in names.items():
            value = value.replace(real, alias)
    return value


def _answer(response: Any, names: dict[str, str]) -> dict[str, Any]:
    body = response.json() if response.content else None
    headers = {h: response.headers.get(h) for h in COMPARED_HEADERS}
    headers["x-position"] = "x-position" in response.headers
    return {"status": response.status_code, "body": _mask(body, names), "headers": headers}


def scenario(send: Callable[..., Any]) -> list[dict[str, Any]]:
    """Every kind of command request, valid and not; the masked answers."""
    me, other = new_user(), new_user()
    names = {me: "ME", other: "OTHER"}
    answers: list[dict[str, Any]] = []
    served_fast: list[str] = []
    seq = iter(range(1000))

    def go(label: str, method: str, path: str, *, user: str | None = me, fast: bool = False,
           **kwargs: Any) -> Any:
        headers = {"X-Request-ID": f"req-{next(seq)}", **kwargs.pop("headers", {})}
        if user is not None:
            headers.update(bearer(user))
        response = send(label, method, path, headers=headers, **kwargs)
        answers.append({"label": label, **_answer(response, names)})
        if fast:
            served_fast.append(label)
        return response

    created = go("create", "POST", "/api/tasks", json={"title": " a ", "description": "d"},
                 fast=True).json()["data"]
    tid = created["id"]
    go("create, charset", "POST", "/api/tasks", content=b'{"title":"b"}',
       headers={"Content-Type": "application/json; charset=utf-8"}, fast=True)
    go("create, no content type", "POST", "/api/tasks", content=b'{"title":"c"}')
    go("create, trailing slash", "POST", "/api/tasks/", json={"title": "s"}, fast=True)
    go("create on the user route", "POST", f"/api/{me}/tasks", json={"title": "u"}, fast=True)
    go("patch title", "PATCH", f"/api/tasks/{tid}", json={"title": "a2"}, fast=True)
    go("patch description null", "PATCH", f"/api/tasks/{tid}", json={"description": None},
       fast=True)
    go("patch, If-Match ok", "PATCH", f"/api/tasks/{tid}", json={"completed": True},
       headers={"If-Match": '"v3"'}, fast=True)
    go("patch, If-Match stale", "PATCH", f"/api/tasks/{tid}", json={"completed": False},
       headers={"If-Match": '"v1"'}, fast=True)
    go("patch, uppercase id", "PATCH", f"/api/tasks/{tid.upper()}", json={"title": "U"},
       fast=True)
    go("put", "PUT", f"/api/{me}/tasks/{tid}", json={"title": "p", "completed": False},
       fast=True)
    go("put on /api/tasks", "PUT", f"/api/tasks/{tid}", json={"title": "p0"}, fast=True)
    go("patch on the user route", "PATCH", f"/api/{me}/tasks/{tid}", json={"title": "p1"},
       fast=True)
    go("toggle on /api/tasks", "PATCH", f"/api/tasks/{tid}/complete", fast=True)
    go("set on /api/tasks", "PATCH", f"/api/tasks/{tid}/complete", json={"completed": False},
       fast=True)
    go("toggle, no body", "PATCH", f"/api/{me}/tasks/{tid}/complete", fast=True)
    go("toggle, body", "PATCH", f"/api/{me}/tasks/{tid}/complete", json={"completed": True},
       fast=True)
    go("keyed create", "POST", "/api/tasks", json={"title": "k"},
       headers={"Idempotency-Key": "key-1"}, fast=True)
    go("keyed create, replayed", "POST", "/api/tasks", json={"title": "k"},
       headers={"Idempotency-Key": "key-1"}, fast=True)
    go("keyed create, other body", "POST", "/api/tasks", json={"title": "k2"},
       headers={"Idempotency-Key": "key-1"}, fast=True)
    go("other user's task", "PATCH", f"/api/tasks/{tid}", json={"title": "x"}, user=other,
       fast=True)
    go("path names another user", "POST", f"/api/{other}/tasks", json={"title": "x"},
       fast=True)
    go("unknown task", "DELETE", f"/api/tasks/{uuid.uuid4()}", fast=True)
    go("no token", "POST", "/api/tasks", json={"title": "x"}, user=None, fast=True)
    go("bad token", "POST", "/api/tasks", json={"title": "x"}, user=None,
       headers={"Authorization": "Bearer nope"}, fast=True)
    go("no token, bad JSON", "POST", "/api/tasks", content=b"{", user=None, fast=True)
    go("bad JSON", "POST", "/api/tasks", content=b'{"title":', )
    go("JSON not an object", "POST", "/api/tasks", json=["a"])
    go("invalid title", "POST", "/api/tasks", json={"title": ""})
    go("unknown field", "PATCH", f"/api/tasks/{tid}", json={"owner": "x"})
    go("form body", "POST", "/api/tasks", content=b"title=x",
       headers={"Content-Type": "application/x-www-form-urlencoded"})
    go("hex id", "PATCH", f"/api/tasks/{tid.replace('-', '')}", json={"title": "h"})
    go("not an id", "DELETE", "/api/tasks/nope")
    go("bad Idempotency-Key", "POST", "/api/tasks", json={"title": "x"},
       headers={"Idempotency-Key": "has space"})
    go("NaN", "POST", "/api/tasks", content=b'{"title":"x","description":NaN}')
    go("lone surrogate", "POST", "/api/tasks", content=b'{"title":"\\ud800"}')
    go("toggle, null body", "PATCH", f"/api/{me}/tasks/{tid}/complete", content=b"null",
       headers={"Content-Type": "application/json"})
    go("delete", "DELETE", f"/api/{me}/tasks/{tid}", fast=True)
    go("delete again", "DELETE", f"/api/tasks/{tid}", fast=True)
    return answers


def test_the_dispatcher_answers_as_the_router_does(settings: Settings) -> None:
    results = []
    for app in (create_app(settings), without_dispatcher(create_app(settings))):
        with TestClient(app, raise_server_exceptions=False) as client:
            results.append(scenario(lambda _, *args, **kw: client.request(*args, **kw)))
    dispatched, routed = results
    assert len(dispatched) == len(routed)
    for a, b in zip(dispatched, routed, strict=True):
        assert a == b, a["label"]
    statuses = {a["status"] for a in dispatched}
    assert statuses >= {201, 200, 204, 401, 403, 404, 412, 422}, statuses


def test_the_dispatcher_serves_every_command_request(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    reached_router: list[str] = []
    handle = routes.CommandAPIRoute.handle

    async def counting(self: routes.CommandAPIRoute, *args: Any) -> None:
        reached_router.append(self.name)
        await handle(self, *args)

    monkeypatch.setattr(routes.CommandAPIRoute, "handle", counting)
    reached = []
    for app in (without_dispatcher(create_app(settings)), create_app(settings)):
        reached_router.clear()
        with TestClient(app, raise_server_exceptions=False) as client:
            scenario(lambda _, *args, **kw: client.request(*args, **kw))
        reached.append(set(reached_router))
    assert reached[0] == {r.name for r in routes.ROUTES}  # the spy sees the router serve
    assert reached[1] == set()  # with the dispatcher, no command reaches the router


def test_metrics_label_commands_by_route_template(command_client: TestClient) -> None:
    def count(route: str, status: str) -> float:
        value = REGISTRY.get_sample_value(
            "http_requests_total",
            {"service": "command-api", "method": "PATCH", "route": route, "status": status},
        )
        return value or 0.0

    user = new_user()
    tid = command_client.post("/api/tasks", json={"title": "m"}, headers=bearer(user)).json()[
        "data"]["id"]
    before = count("/api/tasks/{task_id}", "200")
    response = command_client.patch(f"/api/tasks/{tid}", json={"title": "n"},
                                    headers=bearer(user))
    assert response.status_code == 200
    assert count("/api/tasks/{task_id}", "200") == before + 1


def test_the_routes_are_the_documents_write_operations() -> None:
    schema = create_app(Settings(environment="test", database_url="postgresql://x/y",
                                 better_auth_secret="t" * 40)).openapi()
    writes = {(method.upper(), path, op["operationId"].split("_api_")[0])
              for path, ops in schema["paths"].items()
              for method, op in ops.items() if method in ("post", "put", "patch", "delete")}
    assert writes == {(r.method, f"/api{r.path}", r.name) for r in routes.ROUTES}
