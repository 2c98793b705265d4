"""Decode stored task events into plain records, fast, without building aggregates.

The event store keeps each event as its topic (one of `shared.tasks.EVENT_TOPICS`) and
the eventsourcing `JSONTranscoder`'s JSON, where UUIDs, datetimes and decimals are
wrapped as ``{"_type_": ..., "_data_": ...}``. The projector and the audit CLI read
events through `decode_event`, which costs one `json.loads` per event.
"""

from __future__ import annotations

import json
from datetime import datetime
from decimal import Decimal
from typing import Any, NamedTuple
from uuid import UUID

from shared.tasks import EVENT_TOPICS

CREATED = "TaskCreated"
TITLE_CHANGED = "TaskTitleChanged"
DESCRIPTION_CHANGED = "TaskDescriptionChanged"
COMPLETED = "TaskCompleted"
REOPENED = "TaskReopened"
DELETED = "TaskDeleted"

assert set(EVENT_TOPICS) == {
    CREATED, TITLE_CHANGED, DESCRIPTION_CHANGED, COMPLETED, REOPENED, DELETED
}, "shared.tasks gained or renamed an event: teach shared.eventcodec about it"

_DECODERS: dict[str, Any] = {
    "datetime_iso": datetime.fromisoformat,
    "uuid_hex": UUID,
    "decimal_str": Decimal,
}


class UndecodableEvent(ValueError):
    """A stored event whose topic or state this service does not know."""


def _unwrap(d: dict[str, Any]) -> Any:
    kind = d.get("_type_")
    if kind is None or "_data_" not in d:
        return d
    try:
        return _DECODERS[kind](d["_data_"])
    except KeyError:
        raise UndecodableEvent(f"unknown transcoding {kind!r}") from None


_JSON = json.JSONDecoder(object_hook=_unwrap)  # built once: json.loads(..., hook) builds one per call
# The decoder's C scanner, called directly: `decode` adds two regex matches per call to
# allow whitespace around the document, which the event store never writes (`_loads`
# hands such a document, or anything the scanner stops short of, to `decode`).
_SCAN = _JSON.scan_once


def _loads(text: str) -> Any:
    try:
        value, end = _SCAN(text, 0)
    except StopIteration:
        end = -1
    return value if end == len(text) else _JSON.decode(text)


class TaskEvent(NamedTuple):
    """One stored task event: where it is, what happened, who did it, and its fields.
    (A named tuple: immutable, and the cheapest record to build, once per event.)"""

    position: int
    task_id: UUID
    version: int
    topic: str
    timestamp: datetime
    actor: str
    request_id: str
    data: dict[str, Any]

    def describe(self) -> str:
        return (
            f"position={self.position} task_id={self.task_id} "
            f"version={self.version} topic={self.topic}"
        )


def decode_event(
    position: int, task_id: UUID, version: int, topic: str, state: bytes | str
) -> TaskEvent:
    """A stored event row (notification_id, originator_id, originator_version, topic, state)."""
    if topic not in EVENT_TOPICS:
        raise UndecodableEvent(f"unknown topic {topic!r}")
    try:
        data = _loads(state.decode() if isinstance(state, bytes) else state)
        timestamp = data.pop("timestamp")
        actor = data.pop("actor")
        request_id = data.pop("request_id")
    except (ValueError, KeyError, TypeError) as e:
        raise UndecodableEvent(f"cannot decode {topic} state: {e}") from None
    data.pop("originator_topic", None)
    return TaskEvent(position, task_id, version, topic, timestamp, actor, request_id, data)
