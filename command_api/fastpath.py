"""The command routes' fast path: a pure ASGI middleware, innermost of ours, that serves
a well-formed command without FastAPI's routing and dependency solving.

Why: at saturation the command API is CPU-bound on its one core, and FastAPI's route
lookup, dependency solving and request handler cost more than the command itself
(measured with `python -m bench.profile --kinds create,update`: about 40% of a create's
CPU). The routes in `command_api.routes` stay the contract: they are what the OpenAPI
document describes, and they answer every request this path does not take.

What it takes: a request that matches one of those routes (by the same compiled path
pattern, in the same order), whose token is valid, whose task id is a canonical UUID,
whose headers appear once each and are well-formed, and whose body is absent or JSON
(Content-Type application/json) that orjson parses and the route's own pydantic model
accepts. Anything else, before anything has run, goes on unchanged (the body
replayed) to the FastAPI route, which renders the error (401, 422...) as it always has.
The command then runs through the same functions the route calls (`actor`, `own`,
`respond`); an error it raises (403, 404, 409, 412, 503) is rendered by the app's own
exception handlers. `tests/integration/test_command_fast_path.py` runs the same requests
with the path on and off and compares the answers.

COMMAND_FAST_PATH=false turns it off (every request through FastAPI).
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any
from uuid import UUID

import orjson
from fastapi import FastAPI
from fastapi.routing import APIRoute
from pydantic import BaseModel, ValidationError
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from command_api import routes
from command_api.commands import ChangeTask, CreateTask, ReplaceTask, SetCompletion
from command_api.handlers import TaskCommands
from shared.auth import Authenticator
from shared.errors import ApiError, ValidationFailed
from shared.etag import IfMatch
from shared.http import REQUEST_ID, replay_body

_UUID = re.compile(r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")
_HEADERS = {
    b"authorization": "authorization",
    b"content-type": "content_type",
    b"if-match": "if_match",
    b"idempotency-key": "key",
}


class Decline(Exception):
    """Not a request for the fast path: FastAPI's route answers it."""


@dataclass
class Call:
    """One request on the fast path, as parsed so far."""

    scope: Scope
    params: dict[str, str]
    body: bytes
    authorization: str | None = None
    content_type: str | None = None
    if_match: str | None = None
    key: str | None = None
    user_id: str = ""

    def task_id(self) -> UUID:
        raw = self.params["task_id"]
        if not _UUID.match(raw):
            raise Decline
        return UUID(raw)

    def json(self, model: type[BaseModel], *, optional: bool = False) -> Any:
        """The body validated by `model` (None for no body, when `optional`)."""
        if not self.body:
            if optional:
                return None
            raise Decline
        if (self.content_type or "").partition(";")[0].strip().lower() != "application/json":
            raise Decline  # FastAPI reads no JSON without the header
        try:
            value = orjson.loads(self.body)
        except orjson.JSONDecodeError:
            raise Decline from None
        if not isinstance(value, dict):
            raise Decline
        try:
            return model.model_validate(value)
        except ValidationError:
            raise Decline from None

    def actor(self, body: Any = None) -> routes.Actor:
        # The fingerprint hashes the path as FastAPI's `request.url.path` spells it.
        path = Request(self.scope).url.path if self.key is not None else ""
        try:
            return routes.actor(self.scope["method"], path, REQUEST_ID.get(), self.user_id,
                                self.key, body)
        except ValidationFailed:  # a malformed Idempotency-Key: the route says so
            raise Decline from None

    def if_match_header(self) -> IfMatch | None:
        return IfMatch.parse(self.if_match)


# Each handler parses (raising Decline) and returns the command to run; the command
# runs only after every check has passed.
Run = Callable[[], Awaitable[Response]]
Handler = Callable[[Call, TaskCommands], Run]


def _create_task(call: Call, cmds: TaskCommands) -> Run:
    body = call.json(CreateTask)
    actor = call.actor(body.model_dump())
    return lambda: routes.respond(cmds.create, actor, body)


def _change_task(call: Call, cmds: TaskCommands) -> Run:
    task_id = call.task_id()
    body = call.json(ChangeTask)
    actor = call.actor(body.model_dump(exclude_unset=True))
    expected = call.if_match_header()
    return lambda: routes.respond(cmds.change, actor, task_id, body, expected)


def _delete_task(call: Call, cmds: TaskCommands) -> Run:
    task_id = call.task_id()
    actor = call.actor()
    expected = call.if_match_header()
    return lambda: routes.respond(cmds.delete, actor, task_id, expected)


def _owned(handler: Handler) -> Handler:
    """`handler` for a route under `/api/{path_user_id}/`: the caller must be that user
    (403), checked after the body as the FastAPI endpoints check it."""

    def owned(call: Call, cmds: TaskCommands) -> Run:
        run = handler(call, cmds)
        path_user_id = call.params["path_user_id"]

        async def checked() -> Response:
            routes.own(path_user_id, call.user_id)
            return await run()

        return checked

    return owned


def _replace_user_task(call: Call, cmds: TaskCommands) -> Run:
    task_id = call.task_id()
    body = call.json(ReplaceTask)
    change = routes.as_change(body)
    actor = call.actor(body.model_dump(exclude_unset=True))
    expected = call.if_match_header()
    return lambda: routes.respond(cmds.change, actor, task_id, change, expected)


def _toggle_user_task(call: Call, cmds: TaskCommands) -> Run:
    task_id = call.task_id()
    body = call.json(SetCompletion, optional=True)
    completed = body.completed if body is not None else None
    actor = call.actor({"completed": completed})
    expected = call.if_match_header()
    return lambda: routes.respond(cmds.toggle, actor, task_id, completed, expected)


def _handlers() -> dict[Callable[..., Any], Handler]:
    """Route endpoint -> its fast handler."""
    return {
        routes.create_task: _create_task,
        routes.change_task: _change_task,
        routes.delete_task: _delete_task,
        routes.create_user_task: _owned(_create_task),
        routes.replace_user_task: _owned(_replace_user_task),
        routes.delete_user_task: _owned(_delete_task),
        routes.toggle_user_task: _owned(_toggle_user_task),
    }


class CommandFastPath:
    """Pure ASGI middleware in front of the router (see the module docstring)."""

    def __init__(self, app: ASGIApp, *, fastapi: FastAPI) -> None:
        self.app = app
        self.fastapi = fastapi
        handlers = _handlers()
        self.routes: list[tuple[APIRoute, Handler]] = []
        for route in routes.router.routes:
            assert isinstance(route, APIRoute), route
            handler = handlers.get(route.endpoint)
            assert handler is not None, f"no fast handler for {route.path}"
            self.routes.append((route, handler))
        assert len(self.routes) == len(handlers), "a fast handler without a route"

    def _match(self, scope: Scope) -> tuple[APIRoute, Handler, dict[str, str]] | None:
        method, path = scope["method"], scope["path"]
        for route, handler in self.routes:
            if method in route.methods:  # type: ignore[operator]
                found = route.path_regex.match(path)
                if found:
                    return route, handler, found.groupdict()
        return None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH", "DELETE"):
            await self.app(scope, receive, send)
            return
        matched = self._match(scope)
        if matched is None:
            await self.app(scope, receive, send)
            return
        route, handler, params = matched
        scope["route"] = route
        body = await _read(receive)
        call = Call(scope, params, body)
        try:
            run = await self._prepare(call, handler)
        except Decline:
            await self.app(scope, replay_body(body, receive), send)
            return
        except ApiError as exc:  # the token: 401 comes first on every command route
            response = await self._render(scope, receive, exc)
        else:
            scope.setdefault("state", {})["user_id"] = call.user_id
            try:
                response = await run()
            except Exception as exc:  # noqa: BLE001 - rendered as the app's handlers do
                response = await self._render(scope, receive, exc)
        await response(scope, receive, send)

    async def _prepare(self, call: Call, handler: Handler) -> Run:
        for name, value in call.scope["headers"]:
            attr = _HEADERS.get(name)
            if attr is not None:
                if getattr(call, attr) is not None:
                    raise Decline  # repeated: let FastAPI pick as it does
                setattr(call, attr, value.decode("latin-1"))
        state = self.fastapi.state
        authenticator: Authenticator = state.authenticator
        # Raises Unauthorized: FastAPI resolves the token before any parameter or body
        # check of these routes, so its 401 is the answer whatever else is wrong.
        call.user_id = await authenticator.user_id(call.authorization)
        try:
            cmds: TaskCommands = await state.open_commands()
        except ApiError:
            raise Decline from None  # 503 from the route, as before
        return handler(call, cmds)

    async def _render(self, scope: Scope, receive: Receive, exc: Exception) -> Response:
        """`exc` as the app's exception handlers render it (the same lookup by class as
        Starlette's); re-raised when only the catch-all would take it (RequestContext
        then logs it and answers 500)."""
        handlers = self.fastapi.exception_handlers
        for cls in type(exc).__mro__:
            if cls is Exception:
                break
            handler = handlers.get(cls)
            if handler is not None:
                response = await handler(Request(scope, receive), exc)
                assert isinstance(response, Response)
                return response
        raise exc


async def _read(receive: Receive) -> bytes:
    """The whole body (RequestContext has already read it and capped its size)."""
    chunks = []
    while True:
        message: Message = await receive()
        if message["type"] != "http.request":
            break
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            break
    return b"".join(chunks)
