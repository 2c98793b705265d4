"""The event store: eventsourcing's PostgreSQL persistence, configured for this service.

`TaskStore` is an eventsourcing `Application`; its recorder defines the tables (events
with their transaction id, and the commands' idempotency records), which are created
only by `create_schema()` (`taskctl db init`), never at process start. The command API
writes these tables through `shared.taskstore` (asyncpg, the same `Mapper`); this
application serves db init, bulk seeding and library-side reads.
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
    """The stock recorder, plus the transaction-id order, the idempotency table, and an
    insert without the table lock."""

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
        events = Identifier(self.datastore.schema, self.events_table_name)
        # The global order: the id of the transaction that wrote the event, then its
        # notification id. Added by `taskctl db init` to stores made before it existed
        # (every old row gets the migrating transaction's id, so the old order holds).
        self.sql_create_statements.append(
            SQL(
                "ALTER TABLE {events} ADD COLUMN IF NOT EXISTS tx_id xid8 NOT NULL"
                " DEFAULT pg_current_xact_id()"
            ).format(events=events)
        )
        self.sql_create_statements.append(
            SQL("CREATE INDEX IF NOT EXISTS {index} ON {events} (tx_id, notification_id)").format(
                index=Identifier(f"{self.events_table_name}_tx_order_idx"), events=events
            )
        )
        self.insert_events_statement = SQL(
            "INSERT INTO {events} AS t (originator_id, originator_version, topic, state)"
            " SELECT originator_id, originator_version, topic, state"
            " FROM unnest(%s::{schema}.{stored_event_type}[])"
            " RETURNING notification_id, tx_id::text AS tx_id"
        ).format(
            events=events,
            schema=Identifier(self.datastore.schema),
            stored_event_type=Identifier(self.stored_event_type_name),
        )
        self._notify_statement = SQL("NOTIFY {0}").format(Identifier(self.channel_name))

    # -- writing -------------------------------------------------------------------------
    #
    # The command API writes through `shared.taskstore` (asyncpg); this recorder writes for
    # the library-side callers (bulk seeding, tests). Our own insert_events, not the
    # library's, with the same protocol as the API's writer: (1) it fails fast on a lost
    # connection instead of retrying ten times; (2) it takes no table lock, so writers of
    # different tasks commit in parallel (readers follow (tx_id, notification_id), see
    # `shared.position`); (3) it sends NOTIFY after the commit rather than inside the
    # transaction, because a NOTIFY inside serialises every notifying commit on one
    # lock, WAL flush included.

    def insert_events(self, stored_events: Sequence[StoredEvent], **kwargs: Any) -> Any:
        self.datastore.register_type_adapters()
        if not stored_events:
            return None
        # One statement is one transaction (the connection is in autocommit), in one
        # round trip, with the NOTIFY queued behind it.
        params = [[self._pg_stored_event(e) for e in stored_events]]
        with self.datastore.get_connection() as conn, conn.cursor() as curs:
            with conn.pipeline():
                # Never prepared: a statement prepared inside a pipeline that then fails
                # (a version conflict) is left half-known to psycopg ("prepared statement
                # does not exist" on its next use).
                curs.execute(self.insert_events_statement, params, prepare=False)
                conn.execute(self._notify_statement, prepare=False)
            return [row["notification_id"] for row in curs.fetchall()]

    def _pg_stored_event(self, e: StoredEvent) -> Any:
        return self.construct_pg_stored_event(
            e.originator_id, e.originator_version, e.topic, e.state
        )

    def select_events(self, originator_id: Any, **kwargs: Any) -> Any:
        return PostgresApplicationRecorder.select_events.__wrapped__(self, originator_id, **kwargs)


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


def purge_idempotency(settings: Settings, older_than_hours: float | None = None) -> int:
    """Forget Idempotency-Keys older than the retention (IDEMPOTENCY_TTL_HOURS, at least
    24 h); how many. A retry with a forgotten key is a new command."""
    import psycopg  # noqa: PLC0415

    hours = settings.idempotency_ttl_hours if older_than_hours is None else older_than_hours
    if hours < 24:
        raise ValueError("Idempotency-Keys are kept at least 24 hours")
    with psycopg.connect(settings.require_database_url(), autocommit=True) as conn:
        cursor = conn.execute(
            f"DELETE FROM {IDEMPOTENCY_TABLE} WHERE created_at < now() - make_interval(secs => %s)",
            (hours * 3600,),
        )
        return cursor.rowcount


def create_schema(settings: Settings) -> None:
    """Create the event store's tables, types and indexes; safe to run again."""
    store = TaskStore(env=store_env(settings, create_tables=True))
    store.close()


__all__ = ["Task", "TaskStore", "TaskRecorder", "IdempotencyRecord", "open_store", "create_schema"]
