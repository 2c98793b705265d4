"""The one-origin dev app in process: writes to the command side, reads from the query
side at the same paths, the projector running in the app's lifespan."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from shared import apidoc
from shared.settings import Settings
from taskctl.dev import create_dev_app
from tests.support import bearer, new_user
from tests.support.keyserver import KeyServer
from tests.support.process import free_port
from tests.support.query import assert_error, position_of
from tests.support.signing import claims, new_key


@pytest.fixture(scope="module")
def dev_client(settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_dev_app(settings), raise_server_exceptions=False) as client:
        yield client


def test_reads_its_own_writes_through_one_origin(dev_client: TestClient):
    user = new_user()
    auth = bearer(user)
    created = dev_client.post("/api/tasks", json={"title": "One origin"}, headers=auth)
    assert created.status_code == 201, created.text
    task, position = created.json()["data"], created.headers["X-Position"]

    read = dev_client.get(f"/api/tasks/{task['id']}", headers={**auth, "X-Min-Position": position})
    assert read.status_code == 200, read.text
    assert read.json()["data"] == task
    assert read.json()["meta"]["stale"] is False
    assert read.headers["ETag"] == created.headers["ETag"]

    changed = dev_client.patch(f"/api/tasks/{task['id']}/", json={"completed": True}, headers=auth)
    assert changed.status_code == 200
    stats = dev_client.get(
        "/api/stats", params={"min_position": changed.headers["X-Position"]}, headers=auth
    )
    assert stats.json()["data"] == {"total": 1, "completed": 1, "pending": 0}

    deleted = dev_client.delete(f"/api/{user}/tasks/{task['id']}", headers=auth)
    assert deleted.status_code == 204
    after = {**auth, "X-Min-Position": deleted.headers["X-Position"]}
    gone = dev_client.get(f"/api/{user}/tasks", headers=after)
    assert gone.json()["data"] == [] and gone.json()["meta"]["stale"] is False
    assert position_of(gone.json()["meta"]["position"]) >= position_of(deleted.headers["X-Position"])
    history = dev_client.get(f"/api/tasks/{task['id']}/history", headers=after).json()["data"]
    assert [h["type"] for h in history] == ["TaskCreated", "TaskCompleted", "TaskDeleted"]


def test_dispatches_by_method(dev_client: TestClient):
    auth = bearer(new_user())
    head = dev_client.head("/api/tasks", headers=auth)
    assert head.status_code == 200 and head.content == b""
    assert dev_client.get("/api/health").json()["data"]["service"] == "query-api"
    refused = dev_client.put("/api/tasks", json={}, headers=auth)
    assert_error(refused, 405, "METHOD_NOT_ALLOWED")
    assert refused.headers["Allow"] == "GET, HEAD, POST"  # both apps' methods
    assert_error(dev_client.post("/api/tasks", json={}, headers=auth), 422, "VALIDATION_ERROR")
    assert_error(dev_client.get("/api/tasks"), 401, "UNAUTHORIZED")


def test_serves_the_one_document_of_both_apis(dev_client: TestClient):
    document = dev_client.get("/openapi.json")
    assert document.status_code == 200
    assert document.json() == json.loads(apidoc.DOCUMENT.read_text())
    operations = {(m, p) for p, ops in document.json()["paths"].items() for m in ops}
    assert {("get", "/api/tasks"), ("post", "/api/tasks"), ("put", "/api/tasks/{task_id}"),
            ("patch", "/api/tasks/{task_id}/complete")} <= operations
    assert "bearerAuth" in document.json()["components"]["securitySchemes"]
    docs = dev_client.get("/docs")
    assert docs.status_code == 200 and "SwaggerUIBundle" in docs.text
    assert dev_client.head("/openapi.json").status_code == 200


def test_reads_and_writes_share_one_authenticator(
    settings: Settings, tmp_path: Path, caplog: pytest.LogCaptureFixture
):
    """One process, one key set: a token gets one verdict whichever API it reaches (with
    two authenticators a removed key went on verifying for writes after reads refused
    it), and the start-up advice is said once, not once per API."""
    key = new_key()
    server = KeyServer(tmp_path, free_port())
    server.set(keys=[key.jwk])
    server.start()
    try:
        jwks = settings.model_copy(update={"better_auth_secret": None,
                                           "better_auth_url": server.base_url})
        caplog.set_level(logging.WARNING, logger="taskservice.auth")
        app = create_dev_app(jwks)
        assert app.reads.state.authenticator is app.writes.state.authenticator
        with TestClient(app, raise_server_exceptions=False) as client:
            user = new_user()
            token = {"Authorization": f"Bearer {key.token(claims(user))}"}
            created = client.post("/api/tasks", json={"title": "one verdict"}, headers=token)
            assert created.status_code == 201, created.text
            assert client.get("/api/tasks", headers=token).status_code == 200
        advice = [r for r in caplog.records if "JWT_ISSUER and JWT_AUDIENCE not set" in
                  r.getMessage()]
        assert len(advice) == 1, [r.getMessage() for r in caplog.records]
    finally:
        server.stop()
