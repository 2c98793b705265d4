"""Response shapes of both APIs, for their OpenAPI documents (the bodies themselves are
built by `shared.http`'s envelopes and `shared.documents`)."""

from __future__ import annotations

from typing import Any, Generic, TypeVar

from pydantic import BaseModel

T = TypeVar("T")


class TaskOut(BaseModel):
    id: str
    user_id: str
    title: str
    description: str | None
    completed: bool
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
