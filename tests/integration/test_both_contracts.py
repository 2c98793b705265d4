"""Both contracts, `/api/tasks/{id}` and `/api/{user_id}/tasks/{id}`, offer the same
operations: PUT (replace), PATCH (change) and PATCH `.../complete` (toggle, or set with
a body), and every read (list, task, its history, the feed, stats). And a 405's `Allow` names every method the path has across BOTH APIs, whether
one process serves both (taskctl dev) or each serves its own (split behind a gateway)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient

from command_api.app import create_app as create_command_app
from query_api.app import create_app as create_query_app
from shared.settings import Settings
from taskctl.dev import create_dev_app
from tests.support import bearer, new_user
from tests.support.query import assert_error

TASK_METHODS = "DELETE, GET, HEAD, PATCH, PUT"


@pytest.fixture(scope="module")
def clients(settings: Settings) -> Iterator[dict[str, TestClient]]:
    apps = {"dev": create_dev_app(settings), "command": create_command_app(settings),
            "query": create_query_app(settings)}
    opened = {name: TestClient(app, raise_server_exceptions=False) for name, app in apps.items()}
    for client in opened.values():
        client.__enter__()
    try:
        yield opened
    finally:
        for client in opened.values():
            client.__exit__(None, None, None)


def _steps(client: TestClient, base: str, user: str) -> list[tuple[int, Any]]:
    """Every write operation on one task through `base`; (status, task fields) each."""
    auth = bearer(user)
    out: list[tuple[int, Any]] = []

    def step(method: str, path: str, **kwargs: Any) -> dict[str, Any] | None:
        headers = {**auth, **kwargs.pop("headers", {})}
        response = client.request(method, f"{base}{path}", headers=headers, **kwargs)
        assert response.status_code < 300, (method, path, response.text)
        body = response.json()["data"] if response.content else None
        fields = None if body is None else {
            k: body[k] for k in ("title", "description", "completed", "version")}
        out.append((response.status_code, fields))
        return body

    created = step("POST", "", json={"title": "first", "description": "d"})
    assert created is not None
    task = f"/{created['id']}"
    step("PUT", task, json={"title": "replaced"})  # description left out: null
    kept = step("PATCH", task, json={"description": "kept"})  # title stays
    assert kept is not None
    step("PUT", task, json={"title": "again", "description": "x", "completed": True},
         headers={"If-Match": f'"v{kept["version"]}"'})
    step("PATCH", f"{task}/complete")  # toggles: open again
    step("PATCH", f"{task}/complete", json={"completed": True})
    step("PATCH", f"{task}/complete", json={"completed": True})  # already: no change
    step("PATCH", task, json={"completed": False, "title": "last"},
         headers={"Idempotency-Key": f"k-{base}"})
    step("DELETE", task)
    return out


def test_both_contracts_offer_the_same_operations(clients: dict[str, TestClient]):
    client = clients["dev"]
    user = new_user()
    short = _steps(client, "/api/tasks", user)
    long = _steps(client, f"/api/{user}/tasks", user)
    assert short == long
    assert [s for s, _ in short] == [201, 200, 200, 200, 200, 200, 200, 200, 204]
    assert [f and f["title"] for _, f in short][:4] == ["first", "replaced", "replaced", "again"]
    assert short[1][1]["description"] is None and short[2][1]["description"] == "kept"
    assert [f and f["completed"] for _, f in short][3:8] == [True, False, True, True, False]


def test_both_contracts_offer_the_same_reads(clients: dict[str, TestClient]):
    """Every query route of /api/... has its /api/{user_id}/... twin answering the same
    data, and 403 for a path user who is not the caller (the README's "both contracts
    offer the same operations")."""
    client = clients["dev"]
    me, other = new_user(), new_user()
    task = client.post("/api/tasks", json={"title": "read twice"}, headers=bearer(me)).json()
    tid = task["data"]["id"]
    client.patch(f"/api/tasks/{tid}/complete", headers=bearer(me))
    document = client.get("/openapi.json").json()
    reads = sorted(p.removeprefix("/api") for p, ops in document["paths"].items()
                   if "get" in ops and p.startswith("/api/") and "{path_user_id}" not in p
                   and p not in ("/api/health", "/api/ready") and not p.endswith("/stream"))
    assert reads == ["/history", "/stats", "/tasks", "/tasks/{task_id}",
                     "/tasks/{task_id}/history"]
    for route in reads:
        path = route.replace("{task_id}", tid)
        short = client.get(f"/api{path}", headers=bearer(me))
        long = client.get(f"/api/{me}{path}", headers=bearer(me))
        assert short.status_code == long.status_code == 200, (route, long.text)
        assert short.json()["data"] == long.json()["data"], route
        assert f"/api/{{path_user_id}}{route}" in document["paths"], route
        assert_error(client.get(f"/api/{other}{path}", headers=bearer(me)), 403, "FORBIDDEN")


def test_the_user_route_checks_the_path_user_on_every_operation(
    clients: dict[str, TestClient],
):
    client = clients["dev"]
    me, other = new_user(), new_user()
    tid = client.post("/api/tasks", json={"title": "t"}, headers=bearer(me)).json()["data"]["id"]
    for method, suffix, body in (("PATCH", "", {"title": "x"}), ("PUT", "", {"title": "x"}),
                                 ("PATCH", "/complete", None)):
        response = client.request(method, f"/api/{other}/tasks/{tid}{suffix}", json=body,
                                  headers=bearer(me))
        assert_error(response, 403, "FORBIDDEN")
        theirs = client.request(method, f"/api/tasks/{tid}{suffix}", json=body,
                                headers=bearer(other))
        assert_error(theirs, 403, "FORBIDDEN")


# (method, path, the Allow a 405 must give): the methods of both APIs on that path.
def _refused(user: str, tid: str) -> list[tuple[str, str, str]]:
    return [
        ("PUT", "/api/tasks", "GET, HEAD, POST"),
        ("DELETE", f"/api/{user}/tasks/", "GET, HEAD, POST"),
        ("POST", f"/api/tasks/{tid}", TASK_METHODS),
        ("POST", f"/api/{user}/tasks/{tid}/", TASK_METHODS),
        ("GET", f"/api/tasks/{tid}/complete", "PATCH"),
        ("PUT", f"/api/{user}/tasks/{tid}/complete", "PATCH"),
        ("HEAD", f"/api/tasks/{tid}/complete", "PATCH"),
        ("DELETE", "/api/stats", "GET, HEAD"),
        ("PATCH", f"/api/tasks/{tid}/history", "GET, HEAD"),
        ("POST", "/api/health", "GET, HEAD"),
    ]


@pytest.mark.parametrize("app", ["dev", "command", "query"])
def test_a_405_names_the_methods_of_both_apis(clients: dict[str, TestClient], app: str):
    client = clients[app]
    user, tid = new_user(), "0b6f1c2e-5d4a-4e3b-9c8d-7a6b5c4d3e2f"
    for method, path, allow in _refused(user, tid):
        if app == "command" and method in ("GET", "HEAD"):
            continue  # reads never reach the command API (the gateway routes by method)
        if app == "query" and method not in ("GET", "HEAD"):
            continue  # and writes never reach the query API
        response = client.request(method, path, headers=bearer(user))
        assert response.status_code == 405, (app, method, path, response.text)
        assert response.headers["Allow"] == allow, (app, method, path)
        if method != "HEAD":
            assert_error(response, 405, "METHOD_NOT_ALLOWED")


@pytest.mark.parametrize(("app", "method", "path", "served_by"), [
    ("command", "GET", "/api/tasks", "query API"),
    ("command", "GET", "/api/stats", "query API"),
    ("query", "POST", "/api/tasks", "command API"),
    ("query", "DELETE", "/api/tasks/0b6f1c2e-5d4a-4e3b-9c8d-7a6b5c4d3e2f", "command API"),
])
def test_a_method_of_the_other_api_sent_to_one_apis_port_says_where_it_goes(
    clients: dict[str, TestClient], app: str, method: str, path: str, served_by: str
):
    """A request that bypassed the gateway: this process's own answer (405 with the
    methods it serves, or 404 for a path it has none of), with a message naming the API
    that serves the method."""
    response = clients[app].request(method, path, headers=bearer(new_user()))
    if "Allow" in response.headers:
        error = assert_error(response, 405, "METHOD_NOT_ALLOWED")
        assert method not in response.headers["Allow"].split(", ")
    else:
        error = assert_error(response, 404, "NOT_FOUND")
    assert f"{method} {path} is served by the {served_by}" in error["message"]
    assert response.status_code == (404 if path == "/api/stats" else 405)


@pytest.mark.parametrize("app", ["dev", "command", "query"])
def test_a_path_no_api_has_is_404(clients: dict[str, TestClient], app: str):
    for method in ("GET", "POST", "PATCH"):
        response = clients[app].request(method, "/api/tasks/a/b/c", headers=bearer(new_user()))
        assert_error(response, 404, "NOT_FOUND")
        assert "Allow" not in response.headers
