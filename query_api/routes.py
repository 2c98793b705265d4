"""Routes of the query side: read the token's user's rows, wrap them with the
position they reflect. Every query is scoped to the token's user.

The hot reads (a task, the list, a task's history) without a query string are served
by `ReadDispatcher`, in front of the router, with the same functions."""

from __future__ import annotations

import functools
import re
from collections import Counter
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from types import UnionType
from typing import Annotated, Any, TypeVar, Union, get_args, get_origin
from uuid import UUID

import orjson
from fastapi import APIRouter, Depends, FastAPI, Header, Query, Request
from fastapi.responses import Response
from fastapi.routing import APIRoute
from pydantic import BaseModel, BeforeValidator, Field, WithJsonSchema, field_validator
from starlette.types import ASGIApp, Receive, Scope, Send

from query_api import queries
from query_api.cursor import BadCursor, CursorCodec
from query_api.queries import Sort, Status
from query_api.reader import Read, Reader
from shared.auth import CurrentUser
from shared.errors import ApiError, Forbidden, NotFound, ValidationFailed
from shared.etag import etag
from shared.events import (
    EVENT_TOPICS,
    TAG_MAX,
    TAG_PATTERN,
    TAGS_MAX,
    Priority,
    normal_tags,
    parse_due_date,
)
from shared.http import Envelope, render_with_handlers
from shared.openapi import HistoryEntryOut, ReadEnvelope, StatsOut, TaskOut, error_responses
from shared.position import BadPosition, Position, PositionCodec

T = TypeVar("T")

router = APIRouter(prefix="/api", tags=["queries"])

ReadResponses: dict[int | str, dict[str, Any]] = error_responses(401, 403, 404, 422, 503)


_QUERY_NAMES: dict[int, tuple[frozenset[str], frozenset[str]]] = {}


def _a_list(annotation: Any) -> bool:
    """Whether a parameter of this type takes repeated values (`tag=a&tag=b`)."""
    origin = get_origin(annotation)
    if origin in (list, tuple, set, frozenset):
        return True
    return origin in (Union, UnionType) and any(_a_list(a) for a in get_args(annotation))


def _query_names(route: Any) -> tuple[frozenset[str], frozenset[str]]:
    """The query parameter names `route` declares (a query model's fields included), and
    those of them that may be repeated."""
    names = _QUERY_NAMES.get(id(route))
    if names is None:
        found: set[str] = set()
        lists: set[str] = set()
        pending = [route.dependant]
        while pending:  # the route's own parameters and its dependencies'
            dependant = pending.pop()
            pending.extend(dependant.dependencies)
            for param in dependant.query_params:
                annotation = param.field_info.annotation
                if isinstance(annotation, type) and issubclass(annotation, BaseModel):
                    for n, f in annotation.model_fields.items():
                        found.add(f.alias or n)
                        if _a_list(f.annotation):
                            lists.add(f.alias or n)
                else:
                    found.add(param.alias)
                    if _a_list(annotation):
                        lists.add(param.alias)
        names = _QUERY_NAMES[id(route)] = (frozenset(found), frozenset(lists))
    return names


async def reader(request: Request, user_id: CurrentUser) -> Reader:
    """The request's reader, reflecting the token's user's own writes, once the query
    names are known ones: a misspelt filter (`serach=`, `skip=`) is a 422 naming the
    accepted parameters, on every query route, rather than an answer that silently
    ignores it."""
    route = request.scope.get("route")
    if route is not None and request.query_params:
        accepted, lists = _query_names(route)
        given = Counter(name for name, _ in request.query_params.multi_items())
        unknown = sorted(set(given) - accepted)
        if unknown:
            listed = ", ".join(sorted(accepted)) or "none"
            raise ValidationFailed(
                "Unknown query parameter", details={
                    name[:64]: f"unknown query parameter; accepted: {listed}"
                    for name in unknown[:10]})
        # `limit=1&limit=2`: which one was meant? Said, not guessed (the last one won).
        repeated = sorted(name for name, n in given.items() if n > 1 and name not in lists)
        if repeated:
            raise ValidationFailed("Repeated query parameter", details={
                name: "given more than once; it takes one value" for name in repeated})
    return (await request.app.state.open_reader()).for_user(user_id)


Reads = Annotated[Reader, Depends(reader)]


async def wanted_position(
    reads: Reads,
    min_position: Annotated[str | None, Query(max_length=64)] = None,
    x_min_position: Annotated[str | None, Header(alias="X-Min-Position", max_length=64)] = None,
) -> Position | None:
    """The position a read must reflect, from `X-Min-Position` or `min_position`."""
    tokens = [t for t in (x_min_position, min_position) if t is not None]
    if not tokens:
        return None
    try:
        return max(reads.codec.decode(t) for t in tokens)
    except BadPosition:
        raise ValidationFailed(
            "Invalid position",
            details={"min_position": "not a position this service issued"},
        ) from None


Wanted = Annotated[Position | None, Depends(wanted_position)]


@functools.lru_cache(maxsize=8)
def _cursors(codec: PositionCodec) -> CursorCodec:
    return CursorCodec(codec)


def _no_nul(value: str | None) -> str | None:
    """PostgreSQL text holds neither NUL nor a lone surrogate (no UTF-8 form)."""
    if value is not None and "\x00" in value:
        raise ValueError("must not contain NUL characters")
    if value is not None and not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError("must be valid Unicode (no lone surrogates)") from None
    return value


def _due_bound(value: object) -> datetime | None:
    """A due_before / due_after bound: the due date's own forms (`parse_due_date`)."""
    if value is None or isinstance(value, datetime):
        return value
    if not isinstance(value, str):
        raise ValueError("must be an ISO 8601 date-time or a date")
    return parse_due_date(value)


_DUE_BOUND_SCHEMA = {
    "anyOf": [{"type": "string", "format": "date-time"}, {"type": "string", "format": "date"}],
}
DueBound = Annotated[
    datetime | None, BeforeValidator(_due_bound), WithJsonSchema(_DUE_BOUND_SCHEMA)
]


class TaskFilter(BaseModel):
    status: Status = "all"
    q: str | None = Field(
        default=None, max_length=500, json_schema_extra={"pattern": "^[^\\u0000]*$"}
    )
    priority: Priority | None = None
    tag: list[str] = Field(
        default_factory=list,
        max_length=TAGS_MAX,
        json_schema_extra={
            "items": {"type": "string", "minLength": 1, "maxLength": TAG_MAX,
                      "pattern": TAG_PATTERN},
            "description": "repeatable: tasks with every tag given (compared as stored:"
                           " trimmed, lowercased)",
        },
    )
    due_before: DueBound = Field(default=None, description="due_date before it (exclusive)")
    due_after: DueBound = Field(default=None, description="due_date at or after it")
    sort: Sort = "-created_at"
    limit: int | None = Field(default=None, ge=1, le=1000)
    offset: int = Field(default=0, ge=0, le=1_000_000_000)

    _check_q = field_validator("q")(_no_nul)

    @field_validator("tag")
    @classmethod
    def _tags(cls, value: list[str]) -> list[str]:
        return normal_tags(value)


class FeedFilter(BaseModel):
    since: datetime | None = None
    until: datetime | None = None
    type: str | None = Field(default=None, json_schema_extra={"enum": list(EVENT_TOPICS)})
    task_id: UUID | None = None
    limit: int = Field(default=50, ge=1, le=1000)
    cursor: str | None = Field(default=None, max_length=200)

    @field_validator("since", "until")
    @classmethod
    def _utc(cls, value: datetime | None) -> datetime | None:
        """In UTC (no offset: UTC). Python's dates end at years 1 and 9999 (PostgreSQL's
        go further), so one that is beyond them once in UTC is refused here, by name."""
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        try:
            return value.astimezone(UTC)
        except OverflowError:
            raise ValueError("must fall within years 1 to 9999 once converted to UTC") from None

    @field_validator("type")
    @classmethod
    def _known_type(cls, value: str | None) -> str | None:
        if value is not None and value not in EVENT_TOPICS:
            raise ValueError(f"must be one of {', '.join(EVENT_TOPICS)}")
        return value


Tasks = Annotated[TaskFilter, Query()]
Feed = Annotated[FeedFilter, Query()]


def _own(path_user_id: str, user_id: str) -> None:
    if path_user_id != user_id:
        raise Forbidden("You do not have access to this user's tasks")


async def _settled(
    reads: Reader, read: Read[T], wanted: Position | None, task_id: UUID,
    again: Callable[[Position], Awaitable[Read[T]]], missing: Callable[[Read[T]], bool],
) -> Read[T]:
    """`read` found no task `task_id` of the user's: the same read (`again`, waiting for
    a position) once the read tables hold the task's latest event, if they did not yet
    (another user's write, which a read does not wait for: their task is then a 403 at
    once, not a 404 until the projector passes it). Raises the 403 or the 404 if the
    task is still missing; the read's time bound covers both reads."""
    why = await reads.why_missing(task_id)
    if why.latest is not None and read.position < why.latest:
        read = await again(why.latest if wanted is None else max(wanted, why.latest))
        if not missing(read):
            return read
        why = await reads.why_missing(task_id)
    error: ApiError = (Forbidden("You do not have access to this task") if why.elsewhere
                       else NotFound("Task not found"))
    raise error.with_meta(**read.meta())


async def _task_list(reads: Reader, wanted: Position | None, user_id: str, f: TaskFilter
                     ) -> Response:
    read = await reads.read_row(
        wanted,
        queries.list_tasks(
            user_id, status=f.status, q=f.q, priority=f.priority, tags=f.tag,
            due_before=f.due_before, due_after=f.due_after, sort=f.sort, limit=f.limit,
            offset=f.offset,
        ),
    )
    page = queries.task_page(read.result["total"], read.result["docs"])
    return Envelope(orjson.Fragment(page.json), total=page.total, **read.meta())


async def _one_task(reads: Reader, wanted: Position | None, user_id: str, task_id: UUID
                    ) -> Response:
    query, deadline = queries.get_task(user_id, task_id), reads.deadline()
    read = await reads.read_row(wanted, query, deadline=deadline)
    if read.result["doc"] is None:
        read = await _settled(reads, read, wanted, task_id,
                              lambda at: reads.read_row(at, query, deadline=deadline),
                              lambda r: r.result["doc"] is None)
    return Envelope(
        orjson.Fragment(read.result["doc"]), headers={"ETag": etag(read.result["version"])},
        **read.meta(),
    )


# -- the /api/tasks contract ---------------------------------------------------------


@router.get("/tasks", response_model=ReadEnvelope[list[TaskOut]], responses=ReadResponses)
async def list_tasks(user_id: CurrentUser, reads: Reads, wanted: Wanted, f: Tasks) -> Response:
    return await _task_list(reads, wanted, user_id, f)


@router.get("/tasks/{task_id}", response_model=ReadEnvelope[TaskOut], responses=ReadResponses)
async def get_task(task_id: UUID, user_id: CurrentUser, reads: Reads, wanted: Wanted) -> Response:
    return await _one_task(reads, wanted, user_id, task_id)


@router.get(
    "/tasks/{task_id}/history",
    response_model=ReadEnvelope[list[HistoryEntryOut]],
    responses=ReadResponses,
)
async def get_task_history(
    task_id: UUID, user_id: CurrentUser, reads: Reads, wanted: Wanted
) -> Response:
    query, deadline = queries.task_history(user_id, task_id), reads.deadline()
    read = await reads.read_rows(wanted, query, deadline=deadline)
    if not read.result:
        read = await _settled(reads, read, wanted, task_id,
                              lambda at: reads.read_rows(at, query, deadline=deadline),
                              lambda r: not r.result)
    return Envelope([r.view() for r in queries.history_rows(read.result)], **read.meta())


@router.get(
    "/history", response_model=ReadEnvelope[list[HistoryEntryOut]], responses=ReadResponses
)
async def get_activity_feed(
    user_id: CurrentUser, reads: Reads, wanted: Wanted, f: Feed
) -> Response:
    after = None
    if f.cursor is not None:
        try:
            after = _cursors(reads.codec).decode(f.cursor)
        except BadCursor:
            raise ValidationFailed(
                "Invalid cursor", details={"cursor": "not a cursor this service issued"}
            ) from None
    read = await reads.read_rows(
        wanted,
        queries.activity_feed(
            user_id,
            since=f.since,
            until=f.until,
            event_type=f.type,
            task_id=f.task_id,
            after=after,
            limit=f.limit,
        ),
    )
    rows, next_page = queries.feed_page(read.result, f.limit)
    next_cursor = _cursors(reads.codec).encode(next_page) if next_page is not None else None
    return Envelope([r.view() for r in rows], next_cursor=next_cursor, **read.meta())


@router.get("/stats", response_model=ReadEnvelope[StatsOut], responses=ReadResponses)
async def get_stats(user_id: CurrentUser, reads: Reads, wanted: Wanted) -> Response:
    read = await reads.read_row(wanted, queries.user_stats(user_id))
    row = read.result
    stats = queries.stats_row(row["total"], row["completed"], row["pending"])
    return Envelope(stats.view(), **read.meta())


# -- the /api/{user_id}/tasks contract -------------------------------------------------


@router.get(
    "/{path_user_id}/tasks",
    response_model=ReadEnvelope[list[TaskOut]],
    responses=ReadResponses,
)
async def list_user_tasks(
    path_user_id: str, user_id: CurrentUser, reads: Reads, wanted: Wanted, f: Tasks
) -> Response:
    _own(path_user_id, user_id)
    return await _task_list(reads, wanted, user_id, f)


@router.get(
    "/{path_user_id}/tasks/{task_id}",
    response_model=ReadEnvelope[TaskOut],
    responses=ReadResponses,
)
async def get_user_task(
    path_user_id: str, task_id: UUID, user_id: CurrentUser, reads: Reads, wanted: Wanted
) -> Response:
    _own(path_user_id, user_id)
    return await _one_task(reads, wanted, user_id, task_id)


@router.get(
    "/{path_user_id}/tasks/{task_id}/history",
    response_model=ReadEnvelope[list[HistoryEntryOut]],
    responses=ReadResponses,
)
async def get_user_task_history(
    path_user_id: str, task_id: UUID, user_id: CurrentUser, reads: Reads, wanted: Wanted
) -> Response:
    _own(path_user_id, user_id)
    return await get_task_history(task_id, user_id, reads, wanted)


@router.get(
    "/{path_user_id}/history",
    response_model=ReadEnvelope[list[HistoryEntryOut]],
    responses=ReadResponses,
)
async def get_user_activity_feed(
    path_user_id: str, user_id: CurrentUser, reads: Reads, wanted: Wanted, f: Feed
) -> Response:
    _own(path_user_id, user_id)
    return await get_activity_feed(user_id, reads, wanted, f)


@router.get("/{path_user_id}/stats", response_model=ReadEnvelope[StatsOut],
            responses=ReadResponses)
async def get_user_stats(
    path_user_id: str, user_id: CurrentUser, reads: Reads, wanted: Wanted
) -> Response:
    _own(path_user_id, user_id)
    return await get_stats(user_id, reads, wanted)


# -- the hot reads, served without FastAPI's routing and dependency solving -------------

_NO_FILTER = TaskFilter()  # a query without a query string: the defaults (read only)
_CANONICAL_UUID = re.compile(
    r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$"
)


async def _user_and_reads(request: Request) -> tuple[str, Reader]:
    """`current_user` then `reader`, as they run for a request without a query string:
    the first Authorization header (as Starlette's `Headers.get` picks it) to the
    authenticator, the user into the request's state, the user's reader; without
    building a header mapping, a `State` or the (empty) query parameters."""
    authorization = None
    for name, value in request.scope["headers"]:
        if name == b"authorization":
            authorization = value.decode("latin-1")
            break
    state = request.app.state
    user_id = await state.authenticator.user_id(authorization)
    request.scope.setdefault("state", {})["user_id"] = user_id
    return user_id, (await state.open_reader()).for_user(user_id)


async def _get(request: Request, user: str | None, task: str) -> Response:
    user_id, reads = await _user_and_reads(request)
    if user is None:
        return await get_task(UUID(task), user_id, reads, None)
    return await get_user_task(user, UUID(task), user_id, reads, None)


async def _list(request: Request, user: str | None, _: str) -> Response:
    user_id, reads = await _user_and_reads(request)
    if user is None:
        return await list_tasks(user_id, reads, None, _NO_FILTER)
    return await list_user_tasks(user, user_id, reads, None, _NO_FILTER)


async def _history(request: Request, _: str | None, task: str) -> Response:
    user_id, reads = await _user_and_reads(request)
    return await get_task_history(UUID(task), user_id, reads, None)


def _route(endpoint: Callable[..., Any]) -> APIRoute:
    [found] = [r for r in router.routes if isinstance(r, APIRoute) and r.endpoint is endpoint]
    return found


class ReadDispatcher:
    """Pure ASGI middleware, innermost of the query API's: the hot reads (a task, the
    task list, a task's history, on either contract) go straight to their route's
    function, without Starlette's routing and FastAPI's dependency solving, which cost
    about half of a get's CPU (`python -m bench.profile --kinds get`). The same
    functions run in the order FastAPI runs them (the token, the reader, the route) and
    an error is rendered by the app's exception handlers, so the answers are the same.

    Only requests whose answer cannot depend on what is left out: a GET (a HEAD is one
    by now, `HeadAsGet`) without a query string or an X-Min-Position header (which the
    dependencies validate), a task id in canonical form, and a path no other route of
    the app matches first (`/api/tasks/tasks` is a get of the task id "tasks": a 422).
    Anything else goes on to the app."""

    def __init__(self, app: ASGIApp, *, fastapi: FastAPI) -> None:
        self.app = app
        self.fastapi = fastapi
        # name -> (the route FastAPI would pick, its function here)
        self.routes = {
            "list": (_route(list_tasks), _list), "user_list": (_route(list_user_tasks), _list),
            "get": (_route(get_task), _get), "user_get": (_route(get_user_task), _get),
            "history": (_route(get_task_history), _history),
        }

    @staticmethod
    def match(path: str) -> tuple[str, str | None, str] | None:
        """(route name, the path's user id, the path's task id) or None."""
        parts = path.split("/")
        n = len(parts)
        if n < 3 or n > 6 or parts[0] or parts[1] != "api" or not all(parts[2:]):
            return None
        first = parts[2]
        if first == "tasks":
            if n == 3:
                return "list", None, ""
            if not _CANONICAL_UUID.match(parts[3]):
                return None
            if n == 4:
                return "get", None, parts[3]
            if n == 5 and parts[4] == "history":
                return "history", None, parts[3]
            return None
        if n < 4 or parts[3] != "tasks":
            return None
        if n == 4:
            return "user_list", first, ""
        if n == 5 and _CANONICAL_UUID.match(parts[4]):
            return "user_get", first, parts[4]
        return None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (scope["type"] == "http" and scope["method"] == "GET" and not scope["query_string"]
                and not scope.get("root_path")):
            found = self.match(scope["path"])
            if found is not None and not any(k == b"x-min-position" for k, _ in scope["headers"]):
                name, user, task = found
                route, serve = self.routes[name]
                scope["route"] = route
                scope["endpoint"] = route.endpoint
                scope["path_params"] = (
                    {"path_user_id": user} if user is not None else {}
                ) | ({"task_id": task} if task else {})
                request = Request(scope, receive)
                try:
                    response = await serve(request, user, task)
                except Exception as exc:
                    response = await render_with_handlers(self.fastapi, request, exc)
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)

