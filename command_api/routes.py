"""Routes of the command side: translate HTTP into a command, run it, wrap the result."""

from __future__ import annotations

import hashlib
import json
import re
from typing import Annotated, Any
from uuid import UUID

from fastapi import APIRouter, Body, Depends, Header, Request
from fastapi.responses import Response
from pydantic import WithJsonSchema

from command_api.commands import ChangeTask, CreateTask, ReplaceTask, SetCompletion
from command_api.handlers import Actor, Outcome, TaskCommands
from shared.auth import CurrentUser
from shared.errors import Forbidden, ValidationFailed
from shared.etag import IfMatch, etag
from shared.http import Envelope, request_id
from shared.openapi import DataEnvelope, TaskOut, error_responses
from shared.position import encode

router = APIRouter(prefix="/api", tags=["commands"])

_IDEMPOTENCY_KEY = re.compile(r"^[\x21-\x7e]{1,255}$")
POSITION_HEADER = "X-Position"


async def commands(request: Request) -> TaskCommands:
    return await request.app.state.open_commands()


Commands = Annotated[TaskCommands, Depends(commands)]
IfMatchHeader = Annotated[
    str | None,
    Header(alias="If-Match", description='an ETag such as "v3", a list of them, or *'),
    WithJsonSchema({"type": "string"}),
]
# Documented as the route checks it (in `_actor`, which answers 422 with its own message).
IdempotencyKey = Annotated[
    str | None,
    Header(alias="Idempotency-Key", description="1-255 printable ASCII characters"),
    WithJsonSchema({"type": "string", "pattern": "^[\\x21-\\x7e]{1,255}$"}),
]


def _actor(request: Request, user_id: str, key: str | None, body: Any = None) -> Actor:
    return actor(request.method, request.url.path, request_id(request), user_id, key, body)


def actor(
    method: str, path: str, request_id: str, user_id: str, key: str | None, body: Any = None
) -> Actor:
    """Who acts, and the request's fingerprint when it carries an Idempotency-Key."""
    if key is not None and not _IDEMPOTENCY_KEY.match(key):
        raise ValidationFailed(
            "Invalid Idempotency-Key",
            details={"Idempotency-Key": "1-255 printable ASCII characters"},
        )
    fingerprint = ""
    if key is not None:
        canonical = json.dumps(
            [method, path.rstrip("/"), body],
            sort_keys=True,
            separators=(",", ":"),
        )
        fingerprint = hashlib.sha256(canonical.encode()).hexdigest()
    return Actor(user_id, request_id, key, fingerprint)


def own(path_user_id: str, user_id: str) -> None:
    if path_user_id != user_id:
        raise Forbidden("You do not have access to this user's tasks")


async def respond(run: Any, *args: Any) -> Response:
    outcome: Outcome = await run(*args)
    headers = {}
    position = encode(outcome.position)
    if position:
        headers[POSITION_HEADER] = position
    if outcome.task is None:
        return Response(status_code=outcome.status, headers=headers)
    headers["ETag"] = etag(outcome.task["version"])
    return Envelope(outcome.task, status_code=outcome.status, headers=headers, position=position)


def as_change(body: ReplaceTask) -> ChangeTask:
    """PUT as a change: title and description replaced, completed only when given."""
    fields: dict[str, Any] = {"title": body.title, "description": body.description}
    if "completed" in body.model_fields_set and body.completed is not None:
        fields["completed"] = body.completed
    return ChangeTask.model_validate(fields)


TaskResponses: dict[int | str, dict[str, Any]] = error_responses(401, 403, 404, 409, 412, 413, 422, 503)


# -- the plan's contract: /api/tasks ---------------------------------------------------


@router.post(
    "/tasks", status_code=201, response_model=DataEnvelope[TaskOut], responses=TaskResponses
)
async def create_task(
    request: Request, body: CreateTask, user_id: CurrentUser, cmds: Commands, key: IdempotencyKey = None
) -> Response:
    actor = _actor(request, user_id, key, body.model_dump())
    return await respond(cmds.create, actor, body)


@router.patch("/tasks/{task_id}", response_model=DataEnvelope[TaskOut], responses=TaskResponses)
async def change_task(
    request: Request,
    task_id: UUID,
    body: ChangeTask,
    user_id: CurrentUser,
    cmds: Commands,
    if_match: IfMatchHeader = None,
    key: IdempotencyKey = None,
) -> Response:
    actor = _actor(request, user_id, key, body.model_dump(exclude_unset=True))
    return await respond(cmds.change, actor, task_id, body, IfMatch.parse(if_match))


@router.delete("/tasks/{task_id}", status_code=204, responses=TaskResponses)
async def delete_task(
    request: Request,
    task_id: UUID,
    user_id: CurrentUser,
    cmds: Commands,
    if_match: IfMatchHeader = None,
    key: IdempotencyKey = None,
) -> Response:
    actor = _actor(request, user_id, key)
    return await respond(cmds.delete, actor, task_id, IfMatch.parse(if_match))


# -- the /api/{user_id}/tasks contract -------------------------------------------------


@router.post(
    "/{path_user_id}/tasks",
    status_code=201,
    response_model=DataEnvelope[TaskOut],
    responses=TaskResponses,
)
async def create_user_task(
    request: Request,
    path_user_id: str,
    body: CreateTask,
    user_id: CurrentUser,
    cmds: Commands,
    key: IdempotencyKey = None,
) -> Response:
    own(path_user_id, user_id)
    actor = _actor(request, user_id, key, body.model_dump())
    return await respond(cmds.create, actor, body)


@router.put(
    "/{path_user_id}/tasks/{task_id}",
    response_model=DataEnvelope[TaskOut],
    responses=TaskResponses,
)
async def replace_user_task(
    request: Request,
    path_user_id: str,
    task_id: UUID,
    body: ReplaceTask,
    user_id: CurrentUser,
    cmds: Commands,
    if_match: IfMatchHeader = None,
    key: IdempotencyKey = None,
) -> Response:
    own(path_user_id, user_id)
    change = as_change(body)
    actor = _actor(request, user_id, key, body.model_dump(exclude_unset=True))
    return await respond(cmds.change, actor, task_id, change, IfMatch.parse(if_match))


@router.delete("/{path_user_id}/tasks/{task_id}", status_code=204, responses=TaskResponses)
async def delete_user_task(
    request: Request,
    path_user_id: str,
    task_id: UUID,
    user_id: CurrentUser,
    cmds: Commands,
    if_match: IfMatchHeader = None,
    key: IdempotencyKey = None,
) -> Response:
    own(path_user_id, user_id)
    actor = _actor(request, user_id, key)
    return await respond(cmds.delete, actor, task_id, IfMatch.parse(if_match))


@router.patch(
    "/{path_user_id}/tasks/{task_id}/complete",
    response_model=DataEnvelope[TaskOut],
    responses=TaskResponses,
)
async def toggle_user_task(
    request: Request,
    path_user_id: str,
    task_id: UUID,
    user_id: CurrentUser,
    cmds: Commands,
    body: Annotated[SetCompletion | None, Body()] = None,
    if_match: IfMatchHeader = None,
    key: IdempotencyKey = None,
) -> Response:
    own(path_user_id, user_id)
    completed = body.completed if body is not None else None
    actor = _actor(request, user_id, key, {"completed": completed})
    return await respond(cmds.toggle, actor, task_id, completed, IfMatch.parse(if_match))
