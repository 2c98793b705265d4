"""Response shapes of both APIs, for their OpenAPI documents (the bodies themselves are
built by `shared.http`'s envelopes and `shared.documents`)."""

from __future__ import annotations

from typing import Any, Generic, TypeVar

from pydantic import BaseModel, Field

from shared.events import Priority

T = TypeVar("T")


class TaskOut(BaseModel):
    id: str
    user_id: str
    title: str
    description: str | None
    completed: bool
    priority: Priority
    tags: list[str]
    due_date: str | None = Field(description="ISO 8601, in UTC; null: no due date")
    created_at: str
    updated_at: str
    version: int


class HistoryEntryOut(BaseModel):
    task_id: str
    version: int
    type: str
    actor: str
    request_id: str
    occurred_at: str
    changes: dict[str, Any]


class StatsOut(BaseModel):
    total: int
    completed: int
    pending: int


class Meta(BaseModel):
    timestamp: str
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
