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

`priority`, `tags` and `due_date` came later: a `TaskCreated` stored before them has
none of the three, and reads as a task with the defaults (`DEFAULT_PRIORITY`, no tags,
no due date); one stored since carries all three. Each is then changed by an event of
its own (`TaskPriorityChanged`, `TaskTagsChanged`, `TaskDueDateChanged`). Their rules
(`PRIORITIES`, `normal_tag`, `parse_due_date`) are here so that the command side's
bodies and the query side's filters read them alike.
"""

from __future__ import annotations

import json
import re
import unicodedata
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from typing import Any, Literal, NamedTuple, get_args
from uuid import UUID, uuid4

from eventsourcing.domain import Aggregate

TITLE_MAX = 255
DESCRIPTION_MAX = 2000
Priority = Literal["low", "medium", "high"]
PRIORITIES: tuple[str, ...] = get_args(Priority)  # in order: sorting by priority follows it
DEFAULT_PRIORITY: Priority = "medium"
TAGS_MAX = 10  # tags on one task
TAG_MAX = 32  # characters in one tag, as sent


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
        priority: str
        tags: list[str]
        due_date: datetime | None

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

    class PriorityChanged(Event):
        TOPIC = "TaskPriorityChanged"
        priority: str

        def apply(self, task: Task) -> None:
            task.priority = self.priority

    class TagsChanged(Event):
        TOPIC = "TaskTagsChanged"
        tags: list[str]

        def apply(self, task: Task) -> None:
            task.tags = tuple(self.tags)

    class DueDateChanged(Event):
        TOPIC = "TaskDueDateChanged"
        due_date: datetime | None

        def apply(self, task: Task) -> None:
            task.due_date = self.due_date

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
        self,
        owner: str,
        title: str,
        description: str | None,
        actor: str,
        request_id: str,
        # The defaults are what a `TaskCreated` stored before these fields reads as.
        priority: str = DEFAULT_PRIORITY,
        tags: Sequence[str] = (),
        due_date: datetime | None = None,
    ) -> None:
        self.owner = owner
        self.title = title
        self.description = description
        self.priority = priority
        self.tags: tuple[str, ...] = tuple(tags)
        self.due_date = due_date
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
        priority: str = DEFAULT_PRIORITY,
        tags: Sequence[str] = (),
        due_date: datetime | None = None,
    ) -> Task:
        if not actor:
            raise ValueError("an event needs an actor")
        return cls._create(
            cls.Created,
            id=task_id or uuid4(),
            owner=owner,
            title=title,
            description=description,
            priority=priority,
            tags=list(tags),
            due_date=due_date,
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
        priority: str | None = None,
        tags: Sequence[str] | None = None,
        due_date: datetime | None = None,
        set_due_date: bool = False,
    ) -> None:
        """None leaves a field as it is; `description` and `due_date` are set (to a
        value or to None) only with `set_description` / `set_due_date`."""
        self._check_live(actor)
        stamp = {"actor": actor, "request_id": request_id}
        if title is not None and title != self.title:
            self.trigger_event(self.TitleChanged, title=title, **stamp)
        if set_description and description != self.description:
            self.trigger_event(self.DescriptionChanged, description=description, **stamp)
        if priority is not None and priority != self.priority:
            self.trigger_event(self.PriorityChanged, priority=priority, **stamp)
        if tags is not None and tuple(tags) != self.tags:
            self.trigger_event(self.TagsChanged, tags=list(tags), **stamp)
        if set_due_date and due_date != self.due_date:
            self.trigger_event(self.DueDateChanged, due_date=due_date, **stamp)
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
PRIORITY_CHANGED = Task.PriorityChanged.TOPIC
TAGS_CHANGED = Task.TagsChanged.TOPIC
DUE_DATE_CHANGED = Task.DueDateChanged.TOPIC
COMPLETED = Task.Completed.TOPIC
REOPENED = Task.Reopened.TOPIC
DELETED = Task.Deleted.TOPIC

EVENT_TOPICS: dict[str, type[Task.Event]] = {
    cls.TOPIC: cls
    for cls in (
        Task.Created,
        Task.TitleChanged,
        Task.DescriptionChanged,
        Task.PriorityChanged,
        Task.TagsChanged,
        Task.DueDateChanged,
        Task.Completed,
        Task.Reopened,
        Task.Deleted,
    )
}


# -- the fields' rules, for the command bodies and the query filters --------------------


# `normal_tag`'s rules as a JSON Schema pattern (no control character, not blank), for
# the documents of the bodies and the filter.
_TAG_CHAR = "[^\\u0000-\\u001f\\u007f-\\u009f]"
TAG_PATTERN = f"^{_TAG_CHAR}*[^\\s\\u0000-\\u001f\\u007f-\\u009f]{_TAG_CHAR}*$"


def normal_tag(text: str) -> str:
    """A tag as stored: at most `TAG_MAX` characters as sent, no control characters,
    not blank; trimmed and lowercased ("Work " and "work" are one tag)."""
    if len(text) > TAG_MAX:
        raise ValueError(f"each tag must be at most {TAG_MAX} characters")
    if any(unicodedata.category(c) in ("Cc", "Cs") for c in text):
        raise ValueError("a tag must not contain control characters or lone surrogates")
    tag = text.strip()
    if not tag:
        raise ValueError("a tag must not be blank")
    return tag.lower()


def normal_tags(texts: Sequence[str]) -> list[str]:
    """A task's tags as stored: at most `TAGS_MAX`, each `normal_tag`, duplicates (after
    normalising) dropped, the first of each kept in the order given."""
    if len(texts) > TAGS_MAX:
        raise ValueError(f"at most {TAGS_MAX} tags")
    return list(dict.fromkeys(normal_tag(t) for t in texts))


# RFC 3339 (ISO 8601) date-times, seconds and offset optional, or a date alone; ASCII
# digits only (`\d` would take any script's).
_DATE_TIME = re.compile(
    r"([0-9]{4})-([0-9]{2})-([0-9]{2})"
    r"(?:[Tt ]([0-9]{2}):([0-9]{2})(?::([0-9]{2})(?:\.([0-9]+))?)?"
    r"(?:([Zz])|([+-])([0-9]{2}):?([0-9]{2}))?)?"
)
DATE_TIME_FORMS = (
    "an ISO 8601 date-time such as 2026-05-01T17:00:00Z or 2026-05-01T19:00+02:00,"
    " or a date such as 2026-05-01"
)


def parse_due_date(text: str) -> datetime:
    """A due date (or a filter's bound) in UTC. Seconds and a fraction are optional (the
    fraction is cut to microseconds); without an offset the time is UTC; a date alone
    is its midnight, UTC. It must fall within years 1 to 9999 once in UTC."""
    match = _DATE_TIME.fullmatch(text) if len(text) <= 64 else None
    if match is None:
        raise ValueError(f"must be {DATE_TIME_FORMS}")
    year, month, day, hour, minute, second, fraction, _utc, sign, oh, om = match.groups()
    zone = UTC
    if sign is not None:
        if int(oh) > 23 or int(om) > 59:
            raise ValueError("the offset must be within -23:59 and +23:59")
        offset = timedelta(hours=int(oh), minutes=int(om))
        zone = timezone(-offset if sign == "-" else offset)
    try:
        value = datetime(
            int(year), int(month), int(day), int(hour or 0), int(minute or 0),
            int(second or 0), int((fraction or "0")[:6].ljust(6, "0")), tzinfo=zone,
        )
    except ValueError:
        raise ValueError("must be a valid date and time, e.g. 2026-05-01T17:00:00Z") from None
    try:
        return value.astimezone(UTC)
    except OverflowError:
        raise ValueError("must fall within years 1 to 9999 once converted to UTC") from None


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
    # Its user was forgotten: its sealed fields' key is gone (`shared.datakeys`), so
    # they read as None, and no read model applies it.
    erased: bool = False


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
