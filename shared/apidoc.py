"""The service's one OpenAPI document, and what both APIs derive from it.

In a split deployment the command API and the query API each know only their own
routes, and neither may import the other. Yet one origin (`taskctl dev`, the gateway)
must show ONE document with every route, and a 405's `Allow` must name every method a
path has in either API. So the two apps' own documents are merged (`merge`) into
`shared/openapi.json`, a file generated from the route declarations by `taskctl openapi
--write` and checked current by tests/unit/test_openapi_document.py. Both APIs serve it
at `/openapi.json` with Swagger UI at `/docs` (`install_docs`), whichever of them a
gateway sends those paths to, and `allowed_methods` reads the paths' methods from it.
"""

from __future__ import annotations

import copy
import functools
import json
import re
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, Response

DOCUMENT = Path(__file__).with_name("openapi.json")
SECURITY_SCHEME = "bearerAuth"
_METHODS = ("get", "put", "post", "patch", "delete")
# Routes both apps serve (each its own); the document shows the query API's, the one a
# gateway's GET reaches.
_BOTH = frozenset({"/api/health", "/api/ready"})

# One example envelope per error status a route documents (the messages are real ones).
_ERROR_EXAMPLES: dict[str, tuple[str, str, Any]] = {
    "401": ("UNAUTHORIZED", "Token expired", None),
    "403": ("FORBIDDEN", "You do not have access to this task", None),
    "404": ("NOT_FOUND", "Task not found", None),
    "409": ("CONFLICT", "The task is being changed by others; try again", None),
    "412": ("PRECONDITION_FAILED", "The task has changed since the given ETag",
            {"current_version": 3}),
    "413": ("PAYLOAD_TOO_LARGE", "Request body exceeds 65536 bytes", None),
    "422": ("VALIDATION_ERROR", "Validation failed", {"title": "must not be empty"}),
    "503": ("SERVICE_UNAVAILABLE", "Database unavailable, try again shortly", None),
}
_META_EXAMPLE = {"timestamp": "2026-01-02T03:04:05.678901+00:00",
                 "request_id": "5f0c6a4f2b7e4c1d9a3e8b6d7c5a4f3e"}
_TASK_EXAMPLE = {
    "id": "0b6f1c2e-5d4a-4e3b-9c8d-7a6b5c4d3e2f",
    "user_id": "11111111-1111-1111-1111-111111111111",
    "title": "Buy milk",
    "description": "Two litres",
    "completed": False,
    "priority": "high",
    "tags": ["shopping"],
    "due_date": "2026-01-03T18:00:00+00:00",
    "created_at": "2026-01-02T03:04:05.678901+00:00",
    "updated_at": "2026-01-02T03:04:05.678901+00:00",
    "version": 1,
}


# Response headers (README): every answer's request id; a task's version on an answer
# that carries one; the position of a command's last event on every command success.
_REQUEST_ID_HEADER = {
    "description": "The request's id (the client's sane X-Request-ID, else one made);"
                   " equal to meta.request_id",
    "schema": {"type": "string"}}
_ETAG_HEADER = {
    "description": 'The task\'s version, "v<version>": send it back as If-Match',
    "schema": {"type": "string", "pattern": '^"v[0-9]+"$'}}
_POSITION_HEADER = {
    "description": "The event-store position of the command's last event (sealed, opaque;"
                   " also meta.position, and on 204): another user's read waits for it as"
                   " X-Min-Position",
    "schema": {"type": "string"}}
_RETRY_AFTER_HEADER = {
    "description": "Seconds to wait before sending the request again",
    "schema": {"type": "integer", "minimum": 0}}
# Keywords FastAPI puts beside `anyOf: [{type: string}, {type: null}]` (an optional
# parameter's), where generators that read one branch at a time lose them (orval's zod
# output calls `.enum()` on a union and does not compile): moved into the string branch.
_BRANCH_KEYWORDS = ("enum", "pattern", "minLength", "maxLength", "format")


class DocumentError(ValueError):
    """The two documents cannot be merged: they disagree on a route or a schema."""


def merge(command: dict[str, Any], query: dict[str, Any], *, version: str) -> dict[str, Any]:
    """One document with both APIs' routes and schemas, the bearer JWT scheme on every
    operation that can answer 401, and examples. Pure (the inputs are not changed)."""
    paths: dict[str, dict[str, Any]] = {}
    for path in sorted({*command["paths"], *query["paths"]}):
        ops: dict[str, Any] = {}
        for doc in (query, command):
            for method, op in doc["paths"].get(path, {}).items():
                if method in ops:
                    if path in _BOTH:
                        continue
                    raise DocumentError(f"{method.upper()} {path} is in both APIs")
                ops[method] = copy.deepcopy(op)
        paths[path] = {m: ops[m] for m in sorted(ops, key=_METHODS.index)}
    schemas: dict[str, Any] = {}
    for doc in (command, query):
        for name, schema in doc.get("components", {}).get("schemas", {}).items():
            if name in schemas and schemas[name] != schema:
                raise DocumentError(f"the schema {name} differs between the APIs")
            schemas[name] = copy.deepcopy(schema)
    commands = {(p, m) for p, ops in command["paths"].items() for m in ops}
    for path, ops in paths.items():
        for method, op in ops.items():
            _document(op, command=(path, method) in commands and path not in _BOTH)
    if "TaskOut" in schemas:
        schemas["TaskOut"]["examples"] = [_TASK_EXAMPLE]
    for name in ("CreateTask", "ReplaceTask"):
        if name in schemas:
            schemas[name]["examples"] = [{
                "title": "Buy milk", "description": "Two litres", "priority": "high",
                "tags": ["shopping"], "due_date": "2026-01-03T18:00:00Z"}]
    return {
        "openapi": query["openapi"],
        "info": {
            "title": "Task service",
            "version": version,
            "description": (
                "Every route of the command API (writes) and the query API (reads), as one"
                " origin serves them. Send `Authorization: Bearer <JWT>` (Authorize)."
                " Success: `{data, meta}`; error: `{error: {code, message, details?},"
                " detail, meta}`, `detail` equal to `error.message`."
            ),
        },
        "paths": paths,
        "components": {
            "schemas": dict(sorted(schemas.items())),
            "securitySchemes": {
                SECURITY_SCHEME: {
                    "type": "http",
                    "scheme": "bearer",
                    "bearerFormat": "JWT",
                    "description": "A Better Auth JWT (its jwt() plugin) or, in development,"
                                   " one from `taskctl token --user ID`.",
                }
            },
        },
    }


# Status phrases that differ between Pythons: (older names..., RFC 9110's, which we use).
_OLD_PHRASES: dict[str, tuple[str, ...]] = {
    "413": ("Request Entity Too Large", "Content Too Large"),
    "422": ("Unprocessable Entity", "Unprocessable Content"),
}


def _document(op: dict[str, Any], *, command: bool) -> None:
    responses = op.get("responses", {})
    # No 401, no token needed (health, ready): said, not left to a global default.
    op["security"] = [{SECURITY_SCHEME: []}] if "401" in responses else []
    for parameter in op.get("parameters", []):
        _into_the_branch(parameter.get("schema", {}))
    body = op.get("requestBody")
    if body is not None:
        content = body.get("content", {}).get("application/json", {})
        branches = content.get("schema", {}).get("anyOf", [])
        if len(branches) == 2 and {"type": "null"} in branches:
            # An optional body (`/complete`: none toggles): the model, `required: false`,
            # rather than "the model or JSON null", which some generators cannot send.
            content["schema"] = next(b for b in branches if b != {"type": "null"})
            body["required"] = False
    for status, response in responses.items():
        headers = response.setdefault("headers", {})
        headers["X-Request-ID"] = _REQUEST_ID_HEADER
        if status == "503":
            headers["Retry-After"] = _RETRY_AFTER_HEADER
        if status.startswith("2"):
            schema = response.get("content", {}).get("application/json", {}).get("schema", {})
            if schema.get("$ref", "").endswith("Envelope_TaskOut_"):
                headers["ETag"] = _ETAG_HEADER
            if command:
                headers["X-Position"] = _POSITION_HEADER
        if status.isdigit() and response.get("description") in _OLD_PHRASES.get(status, ()):
            # FastAPI takes the phrase from the running Python's http.HTTPStatus, which
            # renamed 413 and 422 in 3.13 (RFC 9110): one document on every Python.
            response["description"] = _OLD_PHRASES[status][-1]
        example = _ERROR_EXAMPLES.get(status)
        content = response.get("content", {}).get("application/json")
        if example is None or content is None:
            continue
        code, message, details = example
        error: dict[str, Any] = {"code": code, "message": message}
        if details is not None:
            error["details"] = details
        content["example"] = {"error": error, "detail": message, "meta": _META_EXAMPLE}


def _into_the_branch(schema: dict[str, Any]) -> None:
    branches = [b for b in schema.get("anyOf", []) if b != {"type": "null"}]
    if len(branches) == 1 and branches[0].get("type") == "string":
        for keyword in _BRANCH_KEYWORDS:
            if keyword in schema:
                branches[0][keyword] = schema.pop(keyword)


def render(document: dict[str, Any]) -> str:
    """The document as `shared/openapi.json` holds it."""
    return json.dumps(document, indent=2, ensure_ascii=False) + "\n"


@functools.cache
def document() -> dict[str, Any]:
    try:
        return json.loads(DOCUMENT.read_text())
    except FileNotFoundError:
        raise RuntimeError(f"{DOCUMENT} is missing: run `taskctl openapi --write`") from None


@functools.cache
def _document_bytes() -> bytes:
    return json.dumps(document(), ensure_ascii=False, separators=(",", ":")).encode()


@functools.cache
def _path_methods() -> tuple[tuple[re.Pattern[str], frozenset[str]], ...]:
    table = []
    for path, ops in document()["paths"].items():
        pattern = re.sub(r"\\\{[^/]+?\\\}", "[^/]+", re.escape(path))
        methods = {m.upper() for m in ops}
        if "GET" in methods:
            methods.add("HEAD")  # the query API answers HEAD like GET
        table.append((re.compile(f"^{pattern}$"), frozenset(methods)))
    return tuple(table)


def allowed_methods(path: str) -> tuple[str, ...]:
    """The methods `path` (no trailing slash) has across both APIs, sorted; () when no
    route of the service has that path."""
    found: set[str] = set()
    for pattern, methods in _path_methods():
        if pattern.match(path):
            found |= methods
    return tuple(sorted(found))


def install_docs(app: FastAPI) -> None:
    """Serve the one document at `/openapi.json` and Swagger UI at `/docs` (the app is
    built with FastAPI's own `openapi_url=None`; `app.openapi()` is still its own part)."""

    @app.get("/openapi.json", include_in_schema=False)
    async def openapi_json() -> Response:
        return Response(_document_bytes(), media_type="application/json")

    @app.get("/docs", include_in_schema=False)
    async def docs() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url="/openapi.json",
            title="Task service - Swagger UI",
            swagger_ui_parameters={"persistAuthorization": True, "displayRequestDuration": True},
        )
