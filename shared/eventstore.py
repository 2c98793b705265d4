"""The event store: eventsourcing's PostgreSQL persistence, configured for this service.

`TaskStore` is an eventsourcing `Application`; its recorder defines the tables (events
with their transaction id, and the commands' idempotency records), which are created
only by `create_schema()` (`taskctl db init`), never at process start. The command API
writes them through `command_api.store` (asyncpg) with this application's `mapper()`,
so the library reads what we write and we read what it writes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any
from uuid import UUID

from eventsourcing.application import Application
from eventsourcing.persistence import InterfaceError, Mapper, OperationalError, StoredEvent
from eventsourcing.postgres import PostgresApplicationRecorder
from eventsourcing.utils import get_topic, retry
from psycopg.sql import SQL, Identifier

from shared.catalog import EVENTS_TABLE, IDEMPOTENCY_TABLE, OWN_POSITIONS_TABLE
from shared.settings import Settings, postgres_params

APPLICATION_NAME = "Tasks"


# The library inserts a save's events in one statement, sent in psycopg's pipeline mode.
# psycopg (3.3.9) flushes a pipelined statement once, then waits for its results: a
# statement larger than the socket takes at once (a Unix socket's send buffer, about
# 200 KB on Linux) is never sent in full, and the save waits for ever (the server in
# ClientRead, the client in `Pipeline.sync`). Saves of more event state than this go
# without the pipeline (a round trip more per statement, nothing else changes).
PIPELINE_BYTES = 64 * 1024


class TaskRecorder(PostgresApplicationRecorder):
    """The stock recorder's tables, plus the transaction-id order, the idempotency
    table and each user's latest position."""

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
        # A row per user: the position of their latest event (`command_api.store`).
        # Updated by nearly every command, so room on each page for HOT updates.
        self.sql_create_statements.append(
            SQL(
                "CREATE TABLE IF NOT EXISTS {table} ("
                " user_id text PRIMARY KEY,"
                " tx_id xid8 NOT NULL,"
                " notification_id bigint NOT NULL)"
                " WITH (fillfactor = 50)"
            ).format(table=Identifier(self.datastore.schema, OWN_POSITIONS_TABLE))
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

    def insert_events(
        self, stored_events: Sequence[StoredEvent], **kwargs: Any
    ) -> Sequence[int] | None:
        """The library's insert, except past `PIPELINE_BYTES` of event state: then the
        same statements one after the other, outside psycopg's pipeline mode, in one
        transaction (`_insert_unpipelined`)."""
        if sum(len(e.state) for e in stored_events) <= PIPELINE_BYTES:
            return super().insert_events(stored_events, **kwargs)
        return self._insert_unpipelined(stored_events, **kwargs)

    @retry((InterfaceError, OperationalError), max_attempts=10, wait=0.2)  # as the library's
    def _insert_unpipelined(self, stored_events: Sequence[StoredEvent], **kwargs: Any
                            ) -> Sequence[int] | None:
        with self.datastore.get_connection() as conn, conn.transaction(), conn.cursor() as curs:
            self._insert_stored_events(curs, stored_events, **kwargs)
            return self._fetch_ids_after_insert_events(curs, stored_events, **kwargs)


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


def create_schema(settings: Settings) -> None:
    """Create the event store's tables, types and indexes; safe to run again."""
    store = TaskStore(env=store_env(settings, create_tables=True))
    store.close()


def mapper() -> Mapper[UUID]:
    """The application's own mapper (transcodings included), without its database:
    built on the library's in-memory persistence."""
    return TaskStore(env={"PERSISTENCE_MODULE": "eventsourcing.popo"}).mapper
