"""The Task document: a task as the API shows it, rendered here and nowhere else.

The command side answers with it; the projector stores it, as JSON text, in each
`read_tasks` row, and the query side serves that text as it is. `TaskOut` in
`shared.openapi` documents the same fields; the SQL twin that re-renders a stored
document from its row's columns (`projections.task_list.DOC_SQL`) is tested against
`task_json`."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any
from uuid import UUID

import orjson

from shared.events import DEFAULT_PRIORITY


def task_document(
    task_id: UUID,
    user_id: str,
    title: str,
    description: str | None,
    completed: bool,
    created_at: datetime,
    updated_at: datetime,
    version: int,
    priority: str = DEFAULT_PRIORITY,
    tags: Sequence[str] = (),
    due_date: datetime | None = None,
) -> dict[str, Any]:
    """The fields in the order the API shows them; times in UTC, as ISO 8601."""
    return {
        "id": str(task_id),
        "user_id": user_id,
        "title": title,
        "description": description,
        "completed": completed,
        "priority": priority,
        "tags": list(tags),
        "due_date": None if due_date is None else due_date.astimezone(UTC).isoformat(),
        "created_at": created_at.astimezone(UTC).isoformat(),
        "updated_at": updated_at.astimezone(UTC).isoformat(),
        "version": version,
    }


def task_json(*fields: Any) -> str:
    """`task_document(*fields)` as compact JSON (what the API sends, byte for byte)."""
    return orjson.dumps(task_document(*fields)).decode()
