"""Response shapes of both APIs, for their OpenAPI documents (the bodies themselves are
built by `shared.http`'s envelopes and `shared.documents`)."""

from __future__ import annotations

from typing import Annotated, Any, Generic, TypeVar

from pydantic import BaseModel, Field, WithJsonSchema

from shared.events import Priority

T = TypeVar("T")
# Strings as they are sent, with the format a generated client may parse them by.
DateTime = Annotated[str, WithJsonSchema({"type": "string", "format": "date-time"})]
Uuid = Annotated[str, WithJsonSchema({"type": "string", "format": "uuid"})]


class TaskOut(BaseModel):
    id: Uuid
    user_id: str  # the token's `sub`, opaque (Better Auth's ids are not UUIDs)
    title: str
    description: str | None
    completed: bool
    priority: Priority
    tags: list[str]
    due_date: DateTime | None = Field(description="ISO 8601, in UTC; null: no due date")
    created_at: DateTime
    updated_at: DateTime
    version: int


class HistoryEntryOut(BaseModel):
    task_id: Uuid
    version: int
    type: str
    actor: str
    request_id: str
    occurred_at: DateTime
    changes: dict[str, Any]


class StatsOut(BaseModel):
    total: int
    completed: int
    pending: int


class Meta(BaseModel):
    timestamp: DateTime
    request_id: str
    position: str | None = None
    total: int | None = None
    stale: bool | None = None


class ReadMeta(Meta):
    position: str | None = Field(
        default=None, description="How far the read tables had caught up: the data is"
        " exactly the events up to this position.")
    stale: bool | None = Field(
        default=None, description="false: the answer reflects every acknowledged command of"
        " the token's user (and X-Min-Position, if sent); true: the read tables had not"
        " caught up within READ_WAIT_TIMEOUT and the answer is what they hold.")
    next_cursor: str | None = None


class DataEnvelope(BaseModel, Generic[T]):
    data: T
    meta: Meta


class ReadEnvelope(BaseModel, Generic[T]):
    data: T
    meta: ReadMeta


class ErrorBody(BaseModel):
    code: str
    message: str
    details: Any = None


class ErrorEnvelope(BaseModel):
    error: ErrorBody
    detail: str  # equal to error.message, for clients that read FastAPI's `detail`
    meta: Meta


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    return {status: {"model": ErrorEnvelope} for status in statuses}
