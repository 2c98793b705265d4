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
                assert op["security"] == [] and "401" not in op["responses"]
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


def _resolve(document: dict, schema: dict) -> dict:
    ref = schema.get("$ref")
    return document["components"]["schemas"][ref.rsplit("/", 1)[1]] if ref else schema


def test_the_response_headers_the_readme_promises_are_declared():
    """X-Request-ID on every answer, ETag on each that carries a task, X-Position on every
    command success (the 204 too), Retry-After on every 503: a generated client can then
    read them."""
    document = json.loads(apidoc.DOCUMENT.read_text())
    commands = tasks = 0
    for path, ops in document["paths"].items():
        for method, op in ops.items():
            for status, response in op["responses"].items():
                headers = response.get("headers", {})
                assert "X-Request-ID" in headers, (method, path, status)
                assert ("Retry-After" in headers) == (status == "503"), (method, path, status)
                schema = response.get("content", {}).get("application/json", {}).get("schema", {})
                carries_a_task = schema.get("$ref", "").endswith("Envelope_TaskOut_")
                if status.startswith("2") and carries_a_task:
                    assert headers["ETag"]["schema"]["pattern"] == '^"v[0-9]+"$'
                    tasks += 1
                else:
                    assert "ETag" not in headers, (method, path, status)
                is_command = method != "get" and not path.endswith("/tickets")
                if status.startswith("2") and is_command:
                    assert "X-Position" in headers, (method, path, status)
                    commands += 1
                elif status.startswith("2"):
                    assert "X-Position" not in headers, (method, path, status)
    # Each contract: create, PUT, PATCH, /complete and GET carry a task; five commands.
    assert (tasks, commands) == (10, 10)


def test_no_generator_has_to_read_keywords_beside_a_union():
    """Optional parameters: `enum`, `pattern` and lengths sit in the string branch of their
    `anyOf`, not beside it (orval's zod output did not compile); the optional /complete
    body is the model with `required: false`, not "the model or null"
    (openapi-python-client could not send "no body")."""
    document = json.loads(apidoc.DOCUMENT.read_text())

    def walk(node: object, where: str) -> None:
        if isinstance(node, dict):
            if "anyOf" in node:
                beside = set(node) & {"enum", "pattern", "minLength", "maxLength", "format"}
                assert not beside, (where, beside)
            for key, value in node.items():
                walk(value, f"{where}/{key}")
        elif isinstance(node, list):
            for i, value in enumerate(node):
                walk(value, f"{where}[{i}]")

    walk(document["paths"], "paths")
    history = document["paths"]["/api/history"]["get"]["parameters"]
    kind = next(p for p in history if p["name"] == "type")["schema"]["anyOf"]
    assert "TaskCreated" in kind[0]["enum"] and kind[1] == {"type": "null"}
    for path in ("/api/tasks/{task_id}/complete", "/api/{path_user_id}/tasks/{task_id}/complete"):
        body = document["paths"][path]["patch"]["requestBody"]
        assert body["required"] is False
        assert body["content"]["application/json"]["schema"] == {
            "$ref": "#/components/schemas/SetCompletion"}


def test_ids_and_instants_carry_their_format():
    document = json.loads(apidoc.DOCUMENT.read_text())
    schemas = document["components"]["schemas"]
    task = schemas["TaskOut"]["properties"]
    assert task["id"]["format"] == "uuid" and "format" not in task["user_id"]
    for name in ("created_at", "updated_at"):
        assert task[name]["format"] == "date-time"
    assert task["due_date"]["anyOf"][0]["format"] == "date-time"
    assert schemas["HistoryEntryOut"]["properties"]["occurred_at"]["format"] == "date-time"
    assert schemas["HistoryEntryOut"]["properties"]["task_id"]["format"] == "uuid"
    assert schemas["Meta"]["properties"]["timestamp"]["format"] == "date-time"
