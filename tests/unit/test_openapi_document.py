"""The one OpenAPI document (`shared/openapi.json`, served by both APIs) is what the
routes give: current, the union of both apps' routes, every authenticated operation
under the bearer JWT scheme, every error status with the envelope and an example. And
`allowed_methods`, which a 405's `Allow` comes from, agrees with the routes."""

from __future__ import annotations

import json
import re

from command_api.routes import ROUTES
from shared import apidoc
from taskctl.openapi import own_documents, service_document

PUBLIC = {("GET", "/api/health"), ("GET", "/api/ready")}
# Writes that are not commands: the query API's stream tickets change no task (no 409 or
# 412), though the body limit applies to them too (413).
NOT_COMMANDS = {("POST", "/api/tasks/stream/tickets"),
                ("POST", "/api/{path_user_id}/tasks/stream/tickets")}


def _routes() -> set[tuple[str, str]]:
    """(method, path) of every documented route of either app, from each app's own
    document, and every route of the command table."""
    command, query = own_documents()
    found = {(m.upper(), p) for doc in (command, query) for p, ops in doc["paths"].items()
             for m in ops}
    assert {(r.method, f"/api{r.path}") for r in ROUTES} <= found
    return found


def test_the_committed_document_is_current():
    generated = apidoc.render(service_document())
    assert apidoc.DOCUMENT.read_text() == generated, (
        "shared/openapi.json is out of date: run `taskctl openapi --write`")


def test_the_document_is_the_union_of_both_apps_routes():
    document = json.loads(apidoc.DOCUMENT.read_text())
    operations = {(m.upper(), p) for p, ops in document["paths"].items() for m in ops}
    assert operations == _routes()
    assert {("POST", "/api/tasks"), ("GET", "/api/tasks"), ("PUT", "/api/tasks/{task_id}"),
            ("PATCH", "/api/{path_user_id}/tasks/{task_id}"),
            ("PATCH", "/api/tasks/{task_id}/complete")} <= operations
    ids = [op["operationId"] for ops in document["paths"].values() for op in ops.values()]
    assert len(ids) == len(set(ids))


def test_every_operation_but_health_needs_the_bearer_jwt():
    document = json.loads(apidoc.DOCUMENT.read_text())
    assert document["components"]["securitySchemes"] == {apidoc.SECURITY_SCHEME: {
        "type": "http", "scheme": "bearer", "bearerFormat": "JWT",
        "description": document["components"]["securitySchemes"][apidoc.SECURITY_SCHEME][
            "description"]}}
    for path, ops in document["paths"].items():
        for method, op in ops.items():
            if (method.upper(), path) in PUBLIC:
                assert "security" not in op and "401" not in op["responses"]
            else:
                assert op["security"] == [{apidoc.SECURITY_SCHEME: []}], (method, path)


def test_every_error_status_has_the_envelope_and_an_example():
    document = json.loads(apidoc.DOCUMENT.read_text())
    envelope = document["components"]["schemas"]["ErrorEnvelope"]
    assert set(envelope["required"]) == {"error", "detail", "meta"}
    writes = set()
    for path, ops in document["paths"].items():
        for method, op in ops.items():
            statuses = {s for s in op["responses"] if int(s) >= 400}
            if (method.upper(), path) not in PUBLIC:
                assert {"401", "422", "503"} <= statuses, (method, path)
            if method != "get":
                writes.add(method)
                commands = (method.upper(), path) not in NOT_COMMANDS
                assert ({"413", "409", "412"} if commands else {"413"}) <= statuses, (
                    method, path)
            for status in statuses:
                content = op["responses"][status]["content"]["application/json"]
                assert content["schema"] == {"$ref": "#/components/schemas/ErrorEnvelope"}
                example = content["example"]
                assert example["detail"] == example["error"]["message"]
                assert example["error"]["code"].isupper()
    assert writes == {"post", "put", "patch", "delete"}


def test_allowed_methods_agrees_with_the_routes():
    routes = _routes()
    for method, path in routes:
        concrete = re.sub(r"\{[^}]+\}", "x", path)
        assert method in apidoc.allowed_methods(concrete), (method, path)
    # every method a path has, and only those (GET brings HEAD)
    assert apidoc.allowed_methods("/api/tasks/x") == ("DELETE", "GET", "HEAD", "PATCH", "PUT")
    assert apidoc.allowed_methods("/api/u/tasks/x/complete") == ("PATCH",)
    assert apidoc.allowed_methods("/api/nothing") == ()
