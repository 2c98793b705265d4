"""The task vocabulary: the `Task` aggregate, the events it emits, and how a stored event
reads, in Python and in SQL.

This is the one definition of what can happen to a task. The command side uses the
aggregate to decide; the projector, the audit and the replay's check read stored events
through `decode_event` and the SQL helpers below. Topics are explicit and stable
(``TaskCreated``...): moving or renaming these classes never invalidates stored events;
changing a topic string is a data migration.

Every event carries the acting user (``actor``) and the ``request_id`` of the command
that produced it, besides the library's ``timestamp`` (UTC) and version. The stored
state is the eventsourcing `JSONTranscoder`'s JSON, where UUIDs, datetimes and decimals
are wrapped as ``{"_type_": ..., "_data_": ...}``; `TaskCreated` also holds ``owner``.
"""

from __future__ import annotations

import json
from datetime import datetime
from decimal import Decimal
from typing import Any, NamedTuple
from uuid import UUID, uuid4

from eventsourcing.domain import Aggregate

TITLE_MAX = 255
DESCRIPTION_MAX = 2000


class TaskDeleted(Exception):
    """Raised when a command addresses a task that has been deleted."""


class Task(Aggregate):
    TOPIC = "Task"

    class Event(Aggregate.Event):
        actor: str
        request_id: str

    class Created(Event, Aggregate.Created):
        TOPIC = "TaskCreated"
        owner: str
        title: str
        description: str | None

    class TitleChanged(Event):
        TOPIC = "TaskTitleChanged"
        title: str

        def apply(self, task: Task) -> None:
            task.title = self.title

    class DescriptionChanged(Event):
        TOPIC = "TaskDescriptionChanged"
        description: str | None

        def apply(self, task: Task) -> None:
            task.description = self.description

    class Completed(Event):
        TOPIC = "TaskCompleted"

        def apply(self, task: Task) -> None:
            task.completed = True

    class Reopened(Event):
        TOPIC = "TaskReopened"

        def apply(self, task: Task) -> None:
            task.completed = False

    class Deleted(Event):
        TOPIC = "TaskDeleted"

        def apply(self, task: Task) -> None:
            task.deleted = True

    def __init__(
        self, owner: str, title: str, description: str | None, actor: str, request_id: str
    ) -> None:
        self.owner = owner
        self.title = title
        self.description = description
        self.completed = False
        self.deleted = False

    @classmethod
    def create(
        cls,
        *,
        owner: str,
        title: str,
        description: str | None,
        actor: str,
        request_id: str,
        task_id: UUID | None = None,
    ) -> Task:
        if not actor:
            raise ValueError("an event needs an actor")
        return cls._create(
            cls.Created,
            id=task_id or uuid4(),
            owner=owner,
            title=title,
            description=description,
            actor=actor,
            request_id=request_id,
        )

    # Decisions: each emits an event only when something changes, so a retried or
    # repeated command is harmless and the history holds only real changes.

    def change(
        self,
        *,
        actor: str,
        request_id: str,
        title: str | None = None,
        description: str | None = None,
        set_description: bool = False,
        completed: bool | None = None,
    ) -> None:
        self._check_live(actor)
        stamp = {"actor": actor, "request_id": request_id}
        if title is not None and title != self.title:
            self.trigger_event(self.TitleChanged, title=title, **stamp)
        if set_description and description != self.description:
            self.trigger_event(self.DescriptionChanged, description=description, **stamp)
        if completed is True and not self.completed:
            self.trigger_event(self.Completed, **stamp)
        elif completed is False and self.completed:
            self.trigger_event(self.Reopened, **stamp)

    def delete(self, *, actor: str, request_id: str) -> None:
        self._check_live(actor)
        self.trigger_event(self.Deleted, actor=actor, request_id=request_id)

    def _check_live(self, actor: str) -> None:
        if not actor:
            raise ValueError("an event needs an actor")
        if self.deleted:
            raise TaskDeleted(str(self.id))


# -- the topics, as stored -------------------------------------------------------------

CREATED = Task.Created.TOPIC
TITLE_CHANGED = Task.TitleChanged.TOPIC
DESCRIPTION_CHANGED = Task.DescriptionChanged.TOPIC
COMPLETED = Task.Completed.TOPIC
REOPENED = Task.Reopened.TOPIC
DELETED = Task.Deleted.TOPIC

EVENT_TOPICS: dict[str, type[Task.Event]] = {
    cls.TOPIC: cls
    for cls in (
        Task.Created,
        Task.TitleChanged,
        Task.DescriptionChanged,
        Task.Completed,
        Task.Reopened,
        Task.Deleted,
    )
}


# -- reading stored events in Python -----------------------------------------------------

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


def read_state(state: bytes | str) -> dict[str, Any]:
    """A stored event's state, with the library's transcodings unwrapped."""
    value = _loads(state.decode() if isinstance(state, bytes) else state)
    if not isinstance(value, dict):
        raise UndecodableEvent("an event's state is a JSON object")
    return value


def event_time(state: bytes | str) -> datetime:
    """When the event happened (its library timestamp, UTC)."""
    return read_state(state)["timestamp"]  # type: ignore[no-any-return]


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


def decode_event(
    position: int, task_id: UUID, version: int, topic: str, state: bytes | str
) -> TaskEvent:
    """A stored event row (notification_id, originator_id, originator_version, topic, state)."""
    if topic not in EVENT_TOPICS:
        raise UndecodableEvent(f"unknown topic {topic!r}")
    try:
        data = read_state(state)
        timestamp = data.pop("timestamp")
        actor = data.pop("actor")
        request_id = data.pop("request_id")
    except (ValueError, KeyError, TypeError) as e:
        raise UndecodableEvent(f"cannot decode {topic} state: {e}") from None
    data.pop("originator_topic", None)
    return TaskEvent(position, task_id, version, topic, timestamp, actor, request_id, data)


# -- reading stored events in SQL --------------------------------------------------------


def state_sql(alias: str) -> str:
    """The state of the event row `alias` as jsonb."""
    return f"convert_from({alias}.state, 'UTF8')::jsonb"


def occurred_at_sql(state_json: str) -> str:
    """An event's timestamp, as timestamptz, from its state as jsonb (`state_sql`)."""
    return f"(({state_json}) -> 'timestamp' ->> '_data_')::timestamptz"


def actor_sql(state_json: str) -> str:
    return f"(({state_json}) ->> 'actor')"


def owner_sql(events_table: str, alias: str) -> str:
    """The owner of the task of event row `alias`: from the task's creation (version 1),
    found by primary key."""
    return (
        f"(SELECT {state_sql('c')} ->> 'owner' FROM {events_table} c"
        f" WHERE c.originator_id = {alias}.originator_id AND c.originator_version = 1)"
    )
