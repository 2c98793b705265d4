"""The command fast path (command_api/fastpath.py) answers exactly as the FastAPI routes
do: the same scenario runs against an app with the fast path and one without it, and
every answer (status, envelope, headers) must match once ids and clocks are masked.
A spy on the routes' `commands` dependency shows which requests FastAPI served."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from fastapi import Request
from fastapi.testclient import TestClient
from prometheus_client import REGISTRY

from command_api import routes
from command_api.app import create_app
from shared.settings import Settings
from tests.support import bearer, new_user

MASKED_KEYS = {"id", "created_at", "updated_at", "timestamp", "position"}
COMPARED_HEADERS = ("content-type", "etag", "x-request-id", "www-authenticate", "retry-after")


class Spied:
    """A client whose app counts the requests FastAPI's command routes resolved."""

    def __init__(self, client: TestClient) -> None:
        self.client = client
        self.fastapi_served = 0

    def send(self, method: str, path: str, **kwargs: Any) -> Any:
        return self.client.request(method, path, **kwargs)


@pytest.fixture(params=[True, False], ids=["fast", "fastapi"])
def spied(request: pytest.FixtureRequest, settings: Settings) -> Iterator[Spied]:
    app = create_app(settings.model_copy(update={"command_fast_path": request.param}))
    with TestClient(app, raise_server_exceptions=False) as client:
        spied = Spied(client)

        async def counting(req: Request) -> Any:
            spied.fastapi_served += 1
            return await routes.commands(req)

        app.dependency_overrides[routes.commands] = counting
        yield spied


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


def scenario(send: Callable[..., Any]) -> tuple[list[dict[str, Any]], list[str]]:
    """Every kind of command request, valid and not; returns the masked answers and
    the labels of the requests that were well-formed (the fast path's to serve)."""
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
    # Declined: FastAPI answers.
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
    return answers, served_fast


def test_fast_path_answers_as_fastapi_does(settings: Settings) -> None:
    results = {}
    for fast in (True, False):
        app = create_app(settings.model_copy(update={"command_fast_path": fast}))
        with TestClient(app, raise_server_exceptions=False) as client:
            results[fast] = scenario(lambda _, *args, **kw: client.request(*args, **kw))
    fast_answers, _ = results[True]
    slow_answers, _ = results[False]
    assert len(fast_answers) == len(slow_answers)
    for fast, slow in zip(fast_answers, slow_answers, strict=True):
        assert fast == slow, fast["label"]
    statuses = {a["status"] for a in fast_answers}
    assert statuses >= {201, 200, 204, 401, 403, 404, 412, 422}, statuses


def test_well_formed_commands_skip_fastapi_and_the_rest_reach_it(spied: Spied) -> None:
    fast_path = spied.client.app.state.settings.command_fast_path  # type: ignore[attr-defined]
    reached: list[str] = []

    def send(label: str, method: str, path: str, **kwargs: Any) -> Any:
        before = spied.fastapi_served
        response = spied.send(method, path, **kwargs)
        if spied.fastapi_served > before:
            reached.append(label)
        return response

    answers, fast_labels = scenario(send)
    declined = {"invalid title", "unknown field", "form body", "hex id", "bad Idempotency-Key"}
    if fast_path:
        assert not set(reached) & set(fast_labels)
        assert set(reached) >= declined
    else:  # the spy sees what FastAPI serves
        authenticated = {a["label"] for a in answers if a["status"] != 401}
        assert set(fast_labels) & authenticated <= set(reached)
        assert set(reached) >= declined


def test_metrics_label_fast_requests_by_route_template(
    command_client: TestClient,
) -> None:
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


def test_the_fast_path_covers_every_command_route() -> None:
    from command_api.fastpath import _handlers  # noqa: PLC0415

    command_routes = routes.router.routes
    assert {r.endpoint for r in command_routes} == set(_handlers())  # type: ignore[attr-defined]
    # Nothing else in the command API takes these methods: the fast path looks only at
    # the command router's routes.
    schema = create_app(Settings(environment="test", database_url="postgresql://x/y",
                                 better_auth_secret="t" * 40)).openapi()
    writes = {(method.upper(), path) for path, ops in schema["paths"].items()
              for method in ops if method in ("post", "put", "patch", "delete")}
    assert writes == {(m, r.path) for r in command_routes for m in r.methods}  # type: ignore[attr-defined]
