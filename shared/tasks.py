"""The task vocabulary: the `Task` aggregate and the events it emits.

This is the one definition of what can happen to a task. The command side uses the
aggregate to decide; the projector and the audit CLI read the stored events by their
topics. Topics are explicit and stable (``TaskCreated``...), so moving or renaming
these classes never invalidates stored events; changing a topic string is a data
migration.

Every event carries the acting user (``actor``) and the ``request_id`` of the command
that produced it, besides the library's ``timestamp`` (UTC) and version.
"""

from __future__ import annotations

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


EVENT_TOPICS = {
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
