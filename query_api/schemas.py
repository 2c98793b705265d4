"""Response shapes of the query side, for its OpenAPI document."""

from __future__ import annotations

from typing import Any, Generic, TypeVar

from pydantic import BaseModel

from shared.schemas import Meta, TaskOut

T = TypeVar("T")


class ReadMeta(Meta):
    next_cursor: str | None = None


class ReadEnvelope(BaseModel, Generic[T]):
    data: T
    meta: ReadMeta


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


__all__ = ["ReadEnvelope", "ReadMeta", "HistoryEntryOut", "StatsOut", "TaskOut"]
