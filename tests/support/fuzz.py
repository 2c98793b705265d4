"""Helpers for the Schemathesis fuzz tests of both APIs: the envelope check, and steering
generated cases towards the fuzz user's own data so success paths are reached too."""

from __future__ import annotations

import json
import uuid
from typing import Any

from fastapi.testclient import TestClient

from tests.support import bearer


class DeferredApp:
    """The ASGI app behind the schema. Schemathesis loads the schema when this module is
    imported (its fixture-based loader does not work with pytest 9), before any fixture
    has a database: the OpenAPI document comes from an app built with placeholder settings
    (building connects to nothing); the cases are sent to the real app through a module
    fixture's client (`send`)."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":  # the fixture runs the real app's lifespan, once
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        await self.app(scope, receive, send)


def send(case: Any, client: TestClient, headers: dict[str, str]) -> Any:
    """The case, sent through the fixture's client: the app's asyncpg pool lives on that
    client's event loop, so the request must run there (not in schemathesis's own)."""
    kwargs = case.as_transport_kwargs(base_url="http://testserver", headers=headers)
    if not kwargs.get("cookies"):
        kwargs.pop("cookies", None)
    return client.request(**kwargs)


def envelope_conformance(ctx: Any, response: Any, case: Any) -> bool | None:
    """Every answer is `{data, meta}` (2xx) or `{error, meta}` (error), or empty (204),
    and `meta.request_id` is the `X-Request-ID` header."""
    status = response.status_code
    request_ids = response.headers.get("x-request-id") or []
    assert request_ids and request_ids[0], f"{status}: no X-Request-ID header"
    if status == 204:
        assert response.content == b"", f"204 with a body: {response.content[:200]!r}"
        return None
    try:
        body = json.loads(response.content)
    except ValueError:
        raise AssertionError(f"{status}: body is not JSON: {response.content[:200]!r}") from None
    assert isinstance(body, dict), f"{status}: body is not an object: {body!r}"
    expected = {"error", "detail", "meta"} if status >= 400 else {"data", "meta"}
    assert set(body) == expected, f"{status}: keys {sorted(body)}, expected {sorted(expected)}"
    meta = body["meta"]
    assert isinstance(meta, dict) and isinstance(meta.get("timestamp"), str), meta
    assert meta.get("request_id") == request_ids[0], (meta, request_ids)
    if status >= 400:
        error = body["error"]
        assert isinstance(error.get("code"), str) and error["code"].isupper(), error
        assert isinstance(error.get("message"), str) and error["message"], error
        assert body["detail"] == error["message"], body
    return None


def _positive(case: Any) -> bool:
    meta = getattr(case, "meta", None)
    return meta is None or meta.generation.mode.is_positive


def own_user_and_task(
    case: Any, user: str, client: TestClient | None = None, task_ids: list[str] | None = None
) -> None:
    """In positive cases, most generated `path_user_id`s become the token's user and most
    `task_id`s a task of that user (one of `task_ids`, or created through the API with
    `client`), so the
    fuzzer reaches 200/201/204 as well as 403/404. Negative cases are left as generated."""
    if not _positive(case) or not case.path_parameters:
        return
    params = case.path_parameters
    for name in ("path_user_id", "user_id"):
        value = params.get(name)
        if name in params and (not isinstance(value, str) or len(value) % 4 != 3):
            params[name] = user
    generated = params.get("task_id")
    if generated is None:
        return
    try:
        keep = uuid.UUID(str(generated)).int % 4 == 1
    except ValueError:
        return
    if not keep and task_ids:
        params["task_id"] = task_ids[uuid.UUID(str(generated)).int % len(task_ids)]
    elif not keep and client is not None:
        created = client.post("/api/tasks", json={"title": "fuzz target"}, headers=bearer(user))
        assert created.status_code == 201, created.text
        params["task_id"] = created.json()["data"]["id"]


def unique_idempotency_key(case: Any) -> None:
    """A positive case's generated Idempotency-Key gets a unique suffix: the fuzzer reuses
    keys across different requests, which is rightly a 422 (tested on its own elsewhere)."""
    headers = case.headers or {}
    key = headers.get("Idempotency-Key")
    if _positive(case) and isinstance(key, str):
        headers["Idempotency-Key"] = f"{key[:200]}.{uuid.uuid4().hex}"
