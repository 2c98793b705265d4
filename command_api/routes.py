"""The command routes, declared once (`ROUTES`), and the one handler that serves them.

Each `CommandRoute` names its method and path, its body model, how a request becomes a
command, its success status and whether the path's user must be the caller. The
FastAPI routes are generated from the table, so the OpenAPI document shows each body
schema, path parameter and header; but FastAPI's parameter solving never runs for them:
`CommandDispatcher` (in front of the router) and `CommandAPIRoute` (the router's own
route) hand every request to `handle`, which answers in this order:

1. the token (401, whatever else is wrong with the request);
2. a body that is not JSON (422 "Malformed JSON" / "Malformed request body");
3. the event store (503 while it is unavailable);
4. the path's task id and the body, validated together (422, per field);
5. the path's user (403 unless it is the caller);
6. the Idempotency-Key's form, and an If-Match that names nothing (empty: 422, where
   one naming only ETags not ours is the 412 of a changed task);
7. the command, run by the executor; its refusals map to errors in `ERRORS`.

An Idempotency-Key's fingerprint is the sha256 of [method, path without a trailing
slash, body] in canonical JSON, the body as `CommandRoute.signed` says; it is part of
the stored format (the keys already stored must keep matching): the fields added since
(`bodies.ADDED_FIELDS`) are in it only when given (PATCH, PUT) or, for "all", when not
at their defaults, so a body without them signs as it always did.

A body field no model knows is a 422 whose details name the field and list the
route's accepted fields.
"""

from __future__ import annotations

import email.message
import hashlib
import inspect
import json
import re
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Annotated, Any, Literal
from uuid import UUID

import orjson
from fastapi import APIRouter, Body, FastAPI, Header, Request
from fastapi.responses import Response
from fastapi.routing import APIRoute
from pydantic import BaseModel, TypeAdapter, ValidationError, WithJsonSchema
from starlette.types import ASGIApp, Receive, Scope, Send

from command_api import commands
from command_api.bodies import ADDED_FIELDS, ChangeTask, CreateTask, ReplaceTask, SetCompletion
from command_api.commands import Command, Stamp
from command_api.decisions import NotYourTask, TaskDeleted, TaskNotFound
from command_api.executor import (
    Executor,
    IdempotencyKey,
    KeyReused,
    Outcome,
    Saved,
    TooManyConflicts,
    VersionMismatch,
)
from shared.documents import task_document
from shared.errors import (
    ApiError,
    Conflict,
    Forbidden,
    NotFound,
    PreconditionFailed,
    ValidationFailed,
)
from shared.etag import IfMatch, etag
from shared.events import Task
from shared.http import Envelope, render_with_handlers, request_id, validation_details
from shared.openapi import DataEnvelope, TaskOut, error_responses
from shared.position import PositionCodec

POSITION_HEADER = "X-Position"
_IDEMPOTENCY_KEY = re.compile(r"^[\x21-\x7e]{1,255}$")
_CANONICAL_UUID = re.compile(
    r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$"
)
_UUID = TypeAdapter(UUID)

# The executor's and the decisions' refusals, as HTTP errors: the one table.
ERRORS: dict[type[Exception], Callable[[Any], ApiError]] = {
    TaskNotFound: lambda _: NotFound("Task not found"),
    TaskDeleted: lambda _: NotFound("Task not found"),
    NotYourTask: lambda _: Forbidden("You do not have access to this task"),
    VersionMismatch: lambda e: PreconditionFailed(
        "The task has changed since the given ETag", details={"current_version": e.current_version}
    ),
    TooManyConflicts: lambda _: Conflict("The task is being changed by others; try again"),
    KeyReused: lambda _: ValidationFailed(
        "Idempotency-Key was already used with a different request",
        details={"Idempotency-Key": "reused with a different request"},
    ),
}
_REFUSALS = tuple(ERRORS)


# -- how a request becomes a command ---------------------------------------------------


def _create(_: UUID | None, body: Any) -> Command:
    return commands.Create(body.title, body.description, body.priority, body.tags, body.due_date)


def _change(task_id: UUID | None, body: Any) -> Command:
    """PATCH: only the fields given."""
    assert task_id is not None
    given = body.model_fields_set
    return commands.Change(
        task_id,
        title=body.title if "title" in given else None,
        description=body.description,
        set_description="description" in given,
        completed=body.completed if "completed" in given else None,
        priority=body.priority if "priority" in given else None,
        tags=body.tags if "tags" in given else None,
        due_date=body.due_date,
        set_due_date="due_date" in given,
    )


def _replace(task_id: UUID | None, body: Any) -> Command:
    """PUT: every field replaced (a field left out by its default) but completed, which
    changes only when given."""
    assert task_id is not None
    return commands.Change(
        task_id,
        title=body.title,
        description=body.description,
        set_description=True,
        completed=body.completed,
        priority=body.priority,
        tags=body.tags,
        due_date=body.due_date,
        set_due_date=True,
    )


def _set_completed(task_id: UUID | None, body: Any) -> Command:
    assert task_id is not None
    return commands.SetCompleted(task_id, None if body is None else body.completed)


def _delete(task_id: UUID | None, _: Any) -> Command:
    assert task_id is not None
    return commands.Delete(task_id)


@dataclass(frozen=True)
class CommandRoute:
    """One command route. `name` is the endpoint's name (the OpenAPI operationId and
    summary derive from it). `signed`: which body fields the Idempotency-Key's
    fingerprint covers: "all" of the model's (None for one not given), or those "given".
    """

    name: str
    method: str
    path: str
    body: type[BaseModel] | None
    to_command: Callable[[UUID | None, Any], Command]
    status: int
    owner_check: bool
    signed: Literal["all", "given"] = "given"
    body_required: bool = True

    @property
    def takes_task(self) -> bool:
        return "{task_id}" in self.path


ROUTES: tuple[CommandRoute, ...] = (
    # The /api/tasks contract (both contracts offer the same operations)
    CommandRoute("create_task", "POST", "/tasks", CreateTask, _create, 201, False, "all"),
    CommandRoute("change_task", "PATCH", "/tasks/{task_id}", ChangeTask, _change, 200, False),
    CommandRoute("replace_task", "PUT", "/tasks/{task_id}", ReplaceTask, _replace, 200, False),
    CommandRoute("delete_task", "DELETE", "/tasks/{task_id}", None, _delete, 204, False),
    CommandRoute("toggle_task", "PATCH", "/tasks/{task_id}/complete", SetCompletion,
                 _set_completed, 200, False, "all", body_required=False),
    # The /api/{user_id}/tasks contract
    CommandRoute("create_user_task", "POST", "/{path_user_id}/tasks", CreateTask, _create, 201,
                 True, "all"),
    CommandRoute("change_user_task", "PATCH", "/{path_user_id}/tasks/{task_id}", ChangeTask,
                 _change, 200, True),
    CommandRoute("replace_user_task", "PUT", "/{path_user_id}/tasks/{task_id}", ReplaceTask,
                 _replace, 200, True),
    CommandRoute("delete_user_task", "DELETE", "/{path_user_id}/tasks/{task_id}", None, _delete,
                 204, True),
    CommandRoute("toggle_user_task", "PATCH", "/{path_user_id}/tasks/{task_id}/complete",
                 SetCompletion, _set_completed, 200, True, "all", body_required=False),
)


# -- the generic handler -----------------------------------------------------------------


class _Headers:
    """The headers a command route reads: the first of each, as FastAPI picks."""

    __slots__ = ("authorization", "content_type", "idempotency_key", "if_match")

    def __init__(self, raw: list[tuple[bytes, bytes]]) -> None:
        self.authorization = self.content_type = self.if_match = self.idempotency_key = None
        for name, value in raw:
            attr = _HEADERS.get(name)
            if attr is not None and getattr(self, attr) is None:
                setattr(self, attr, value.decode("latin-1"))


_HEADERS = {
    b"authorization": "authorization",
    b"content-type": "content_type",
    b"if-match": "if_match",
    b"idempotency-key": "idempotency_key",
}
_EMPTY: Any = object()  # a request without a body


def _json(body: bytes, content_type: str | None) -> Any:
    """The body as FastAPI reads it: parsed JSON when the content type is JSON, the raw
    bytes otherwise (which no body model accepts), `_EMPTY` when there is none."""
    if not body:
        return _EMPTY
    if content_type != "application/json":
        if content_type is None:
            return body
        message = email.message.Message()
        message["content-type"] = content_type
        subtype = message.get_content_subtype()
        if message.get_content_maintype() != "application" or not (
            subtype == "json" or subtype.endswith("+json")
        ):
            return body
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        pass  # what orjson refuses, the standard library may read (NaN, big integers...)
    try:
        return json.loads(body)
    except json.JSONDecodeError:
        raise ValidationFailed(details={"body": "Malformed JSON"}) from None
    except Exception:  # not text at all (invalid UTF-8...)
        raise ValidationFailed(
            "Malformed request body", details={"body": "Malformed body"}
        ) from None


def _errors(
    e: ValidationError, *prefix: str, model: type[BaseModel] | None = None
) -> list[dict[str, Any]]:
    errors = [{**err, "loc": (*prefix, *err["loc"])} for err in e.errors(include_url=False)]
    if model is not None:
        accepted = ", ".join(model.model_fields)
        for err in errors:
            if err["type"] == "extra_forbidden":
                err["type"] = "unknown_field"
                err["msg"] = f"Unknown field; accepted: {accepted}"
    return errors


def _task_id(raw: str, errors: list[dict[str, Any]]) -> UUID | None:
    if _CANONICAL_UUID.match(raw):
        return UUID(raw)
    try:
        return _UUID.validate_python(raw)
    except ValidationError as e:
        errors += _errors(e, "path", "task_id")
        return None


def _body(route: CommandRoute, value: Any, errors: list[dict[str, Any]]) -> Any:
    assert route.body is not None
    if value is _EMPTY or (value is None and not route.body_required):
        if route.body_required:
            errors.append({"type": "missing", "loc": ("body",), "msg": "Field required"})
        return None
    try:
        if type(value) is dict:
            return route.body.model_validate(value)
        return _ADAPTERS[route.body].validate_python(value, from_attributes=True)
    except ValidationError as e:
        errors += _errors(e, "body", model=route.body)
        return None


def _idempotency_key(
    request: Request, route: CommandRoute, key: str, body: Any
) -> IdempotencyKey:
    if not _IDEMPOTENCY_KEY.match(key):
        raise ValidationFailed(
            "Invalid Idempotency-Key",
            details={"Idempotency-Key": "1-255 printable ASCII characters"},
        )
    signed: Any = None
    if route.body is not None:
        if body is None:
            signed = dict.fromkeys(route.body.model_fields)
        else:
            signed = body.model_dump(mode="json", exclude_unset=route.signed == "given")
            if route.signed == "all":  # the added fields only when not at their defaults
                fields = route.body.model_fields
                for name in ADDED_FIELDS:
                    if name in fields and getattr(body, name) == fields[name].default:
                        del signed[name]
    canonical = json.dumps(
        [route.method, request.url.path.rstrip("/"), signed], sort_keys=True, separators=(",", ":")
    )
    return IdempotencyKey(key, hashlib.sha256(canonical.encode()).hexdigest())


def task_view(task: Task | Saved) -> dict[str, Any]:
    """The task as a command answers with it: the Task document."""
    return task_document(
        task.id, task.owner, task.title, task.description, task.completed,
        task.created_on, task.modified_on, task.version,
        task.priority, task.tags, task.due_date,
    )


def render(route: CommandRoute, outcome: Outcome, codec: PositionCodec) -> Response:
    headers = {}
    position = codec.encode(outcome.position)
    if position:
        headers[POSITION_HEADER] = position
    task = outcome.task
    if task is None:
        return Response(status_code=route.status, headers=headers)
    headers["ETag"] = etag(task.version)
    return Envelope(task_view(task), status_code=route.status, headers=headers, position=position)


async def handle(route: CommandRoute, request: Request) -> Response:
    """Serve one request of `route` (the order of checks: the module docstring)."""
    scope = request.scope
    state = request.app.state
    headers = _Headers(scope["headers"])
    user_id = await state.authenticator.user_id(headers.authorization)
    scope.setdefault("state", {})["user_id"] = user_id
    value = _EMPTY
    if route.body is not None:
        value = _json(await request.body(), headers.content_type)
    executor: Executor = await state.open_executor()
    errors: list[dict[str, Any]] = []
    params = scope["path_params"]
    task_id = _task_id(params["task_id"], errors) if route.takes_task else None
    body = _body(route, value, errors) if route.body is not None else None
    if errors:
        raise ValidationFailed(details=validation_details(errors))
    if route.owner_check and params["path_user_id"] != user_id:
        raise Forbidden("You do not have access to this user's tasks")
    command = route.to_command(task_id, body)
    key = headers.idempotency_key
    keyed = None if key is None else _idempotency_key(request, route, key, body)
    expected = IfMatch.parse(headers.if_match)
    if expected is not None and expected.empty:
        raise ValidationFailed("Empty If-Match", details={
            "If-Match": 'empty: send the task\'s ETag (such as "v3"), or leave the header out'})
    stamp = Stamp(user_id, request_id(request))
    try:
        outcome = await executor.run(command, stamp, expected=expected, key=keyed)
    except _REFUSALS as e:
        raise ERRORS[type(e)](e) from None
    return render(route, outcome, state.command_side.codec)


# -- the FastAPI routes, for routing and the OpenAPI document ----------------------------

_ADAPTERS: dict[type[BaseModel], TypeAdapter[Any]] = {}

IfMatchHeader = Annotated[
    str | None,
    Header(alias="If-Match", description='an ETag such as "v3", a list of them, or *'
                                         " (not empty: 422)"),
    WithJsonSchema({"type": "string", "pattern": "[^\\s,]"}),  # names something
]
IdempotencyKeyHeader = Annotated[
    str | None,
    Header(alias="Idempotency-Key", description="1-255 printable ASCII characters"),
    WithJsonSchema({"type": "string", "pattern": "^[\\x21-\\x7e]{1,255}$"}),
]
TaskResponses: dict[int | str, dict[str, Any]] = error_responses(
    401, 403, 404, 409, 412, 413, 422, 503
)


def _signature(route: CommandRoute) -> inspect.Signature:
    """What the route takes, as FastAPI reads an endpoint's parameters (documented only:
    `handle` parses the request)."""
    keyword = inspect.Parameter.KEYWORD_ONLY
    params = []
    if route.owner_check:
        params.append(inspect.Parameter("path_user_id", keyword, annotation=str))
    if route.takes_task:
        params.append(inspect.Parameter("task_id", keyword, annotation=UUID))
    if route.body is not None:
        if route.body_required:
            params.append(inspect.Parameter("body", keyword, annotation=route.body))
        else:
            params.append(inspect.Parameter(
                "body", keyword, annotation=Annotated[route.body | None, Body()], default=None
            ))
    if route.takes_task:
        params.append(inspect.Parameter("if_match", keyword, annotation=IfMatchHeader,
                                        default=None))
    params.append(inspect.Parameter("key", keyword, annotation=IdempotencyKeyHeader,
                                    default=None))
    return inspect.Signature(params, return_annotation=Response)


def _endpoint(route: CommandRoute) -> Callable[..., Any]:
    async def endpoint(**_: Any) -> Response:
        raise AssertionError("served by command_api.routes.handle")

    endpoint.__name__ = endpoint.__qualname__ = route.name
    endpoint.__signature__ = _signature(route)  # type: ignore[attr-defined]
    endpoint.command_route = route  # type: ignore[attr-defined]
    return endpoint


class CommandAPIRoute(APIRoute):
    """A FastAPI route whose requests go to `handle` with the endpoint's `CommandRoute`."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        route: CommandRoute = self.endpoint.command_route  # type: ignore[attr-defined]

        async def handler(request: Request) -> Response:
            return await handle(route, request)

        return handler


router = APIRouter(prefix="/api", tags=["commands"], route_class=CommandAPIRoute)
for _route in ROUTES:
    assert _route.owner_check == ("{path_user_id}" in _route.path), _route.name
    if _route.body is not None:
        _ADAPTERS[_route.body] = TypeAdapter(
            _route.body if _route.body_required else _route.body | None
        )
    router.add_api_route(
        _route.path,
        _endpoint(_route),
        methods=[_route.method],
        status_code=_route.status,
        response_model=DataEnvelope[TaskOut] if _route.status != 204 else None,
        responses=TaskResponses,
    )


class CommandDispatcher:
    """Pure ASGI middleware, innermost of the app's: a request that matches a route of
    `ROUTES` (method and path, in table order, as the router would pick it) goes
    straight to `handle`, without Starlette's routing and FastAPI's per-request
    machinery; an error it raises is rendered by the app's exception handlers. Anything
    else goes on to the app. The answers are the same either way; this way costs less
    CPU per command."""

    def __init__(self, app: ASGIApp, *, fastapi: FastAPI) -> None:
        self.app = app
        self.fastapi = fastapi
        self.routes = [
            (r, r.endpoint.command_route)  # type: ignore[attr-defined]
            for r in router.routes
            if isinstance(r, CommandAPIRoute)
        ]
        assert len(self.routes) == len(ROUTES)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] in _WRITES:
            method, path = scope["method"], scope["path"]
            for api_route, route in self.routes:
                if route.method == method:
                    found = api_route.path_regex.match(path)
                    if found:
                        scope["route"] = api_route
                        scope["path_params"] = found.groupdict()
                        await self._serve(route, scope, receive, send)
                        return
        await self.app(scope, receive, send)

    async def _serve(self, route: CommandRoute, scope: Scope, receive: Receive, send: Send) -> None:
        request = Request(scope, receive)
        try:
            response = await handle(route, request)
        except Exception as exc:
            response = await render_with_handlers(self.fastapi, request, exc)
        await response(scope, receive, send)


_WRITES = frozenset(route.method for route in ROUTES)
