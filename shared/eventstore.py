"""The event store: eventsourcing's PostgreSQL persistence, configured for this service.

`TaskStore` is an eventsourcing `Application` whose recorder also writes the
idempotency record of a command in the same transaction as its events. Tables are
created only by `create_schema()` (`taskctl db init`), never at process start.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from uuid import UUID

from eventsourcing.application import Application
from eventsourcing.persistence import StoredEvent
from eventsourcing.postgres import PostgresApplicationRecorder
from eventsourcing.utils import get_topic
from psycopg.sql import SQL, Identifier

from shared.settings import Settings, postgres_params
from shared.tasks import Task

APPLICATION_NAME = "Tasks"
EVENTS_TABLE = "tasks_events"
IDEMPOTENCY_TABLE = "command_idempotency"


@dataclass(frozen=True)
class IdempotencyRecord:
    """What a command with an `Idempotency-Key` produced, so a retry can answer alike."""

    user_id: str
    key: str
    fingerprint: str
    status: int
    task_id: UUID | None
    version: int | None


class TaskRecorder(PostgresApplicationRecorder):
    """The stock recorder, plus the idempotency table written in the events' transaction."""

    def __init__(self, datastore: Any, *, events_table_name: str = EVENTS_TABLE) -> None:
        super().__init__(datastore, events_table_name=events_table_name)
        table = Identifier(self.datastore.schema, IDEMPOTENCY_TABLE)
        self.sql_create_statements.append(
            SQL(
                "CREATE TABLE IF NOT EXISTS {table} ("
                " user_id text NOT NULL,"
                " key text NOT NULL,"
                " fingerprint text NOT NULL,"
                " status smallint NOT NULL,"
                " task_id uuid,"
                " version bigint,"
                " created_at timestamptz NOT NULL DEFAULT now(),"
                " PRIMARY KEY (user_id, key))"
            ).format(table=table)
        )
        self.sql_create_statements.append(
            SQL(
                "CREATE INDEX IF NOT EXISTS {index} ON {table} (created_at)"
            ).format(index=Identifier(f"{IDEMPOTENCY_TABLE}_created_at_idx"), table=table)
        )
        self._insert_idempotency = SQL(
            "INSERT INTO {table} (user_id, key, fingerprint, status, task_id, version)"
            " VALUES (%s, %s, %s, %s, %s, %s)"
        ).format(table=table)

    # The library retries these ten times on a lost connection; we fail fast instead
    # (503 to the client, whose Idempotency-Key retry settles an unknown outcome).
    def insert_events(self, stored_events: Sequence[StoredEvent], **kwargs: Any) -> Any:
        self.datastore.register_type_adapters()
        return PostgresApplicationRecorder.insert_events.__wrapped__(self, stored_events, **kwargs)

    def select_events(self, originator_id: Any, **kwargs: Any) -> Any:
        return PostgresApplicationRecorder.select_events.__wrapped__(self, originator_id, **kwargs)

    def _insert_events(
        self,
        curs: Any,
        stored_events: Sequence[StoredEvent],
        *,
        idempotency: IdempotencyRecord | None = None,
        **kwargs: Any,
    ) -> None:
        super()._insert_events(curs, stored_events, **kwargs)
        if idempotency is not None:
            r = idempotency
            # Synced on its own (a nested pipeline syncs on exit), so a second request with
            # the same key fails here with the key's unique violation, before any event.
            with curs.connection.pipeline():
                curs.execute(
                    self._insert_idempotency,
                    (r.user_id, r.key, r.fingerprint, r.status, r.task_id, r.version),
                    prepare=True,
                )


class TaskStore(Application[UUID]):
    name = APPLICATION_NAME


def store_env(settings: Settings, *, create_tables: bool = False) -> dict[str, str]:
    params = postgres_params(settings.require_database_url())
    return {
        "PERSISTENCE_MODULE": "eventsourcing.postgres",
        "APPLICATION_RECORDER_TOPIC": get_topic(TaskRecorder),
        "POSTGRES_HOST": params["host"],
        "POSTGRES_PORT": params["port"],
        "POSTGRES_DBNAME": params["dbname"],
        "POSTGRES_USER": params["user"],
        "POSTGRES_PASSWORD": params["password"],
        "POSTGRES_POOL_SIZE": str(settings.db_pool_size),
        "POSTGRES_MAX_OVERFLOW": str(settings.db_max_overflow),
        "POSTGRES_CONNECT_TIMEOUT": str(settings.db_connect_timeout),
        "POSTGRES_PRE_PING": "y",
        # Off on purpose: with db functions on, the library's readers were seen to
        # skip events under concurrent writers.
        "POSTGRES_ENABLE_DB_FUNCTIONS": "n",
        "CREATE_TABLE": "y" if create_tables else "n",
    }


def open_store(settings: Settings) -> TaskStore:
    """The event store of a running process: it expects `create_schema()` to have run."""
    return TaskStore(env=store_env(settings))


def create_schema(settings: Settings) -> None:
    """Create the event store's tables, types and indexes; safe to run again."""
    store = TaskStore(env=store_env(settings, create_tables=True))
    store.close()


__all__ = ["Task", "TaskStore", "TaskRecorder", "IdempotencyRecord", "open_store", "create_schema"]
