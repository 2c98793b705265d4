"""`taskctl db init`: every table the service needs, created once, explicitly.

Processes never create tables at start-up (concurrent creation fails intermittently)."""

from __future__ import annotations

import psycopg

from projections.manifest import ddl
from shared.catalog import DDL_LOCK, EVENTS_TABLE, LIVE, Tables
from shared.eventstore import create_schema
from shared.settings import Settings

APPEND_ONLY_FUNCTION = "taskservice_events_append_only"
APPEND_ONLY_MESSAGE = "the event store is append-only"

# The event store is append-only, even for a superuser (triggers bind every role, unlike
# REVOKE): corrections are new events. An operator repairs data deliberately in a
# maintenance session that sets `session_replication_role = replica` (which skips these
# triggers) or disables them inside one audited transaction; see
# docs/operations-append-only.md. Row triggers cover UPDATE and DELETE, a statement
# trigger TRUNCATE (which fires no row triggers).
APPEND_ONLY_DDL = (
    f"CREATE OR REPLACE FUNCTION {APPEND_ONLY_FUNCTION}() RETURNS trigger"
    " LANGUAGE plpgsql AS $$ BEGIN"
    f" RAISE EXCEPTION '{APPEND_ONLY_MESSAGE}: % on % is not allowed', TG_OP, TG_TABLE_NAME"
    "  USING ERRCODE = 'insufficient_privilege',"
    "  HINT = 'Record a correction as a new event; for a deliberate repair see"
    " docs/operations-append-only.md';"
    " END $$",
    f"DROP TRIGGER IF EXISTS {EVENTS_TABLE}_no_update_delete ON {EVENTS_TABLE}",
    f"CREATE TRIGGER {EVENTS_TABLE}_no_update_delete BEFORE UPDATE OR DELETE ON {EVENTS_TABLE}"
    f" FOR EACH ROW EXECUTE FUNCTION {APPEND_ONLY_FUNCTION}()",
    f"DROP TRIGGER IF EXISTS {EVENTS_TABLE}_no_truncate ON {EVENTS_TABLE}",
    f"CREATE TRIGGER {EVENTS_TABLE}_no_truncate BEFORE TRUNCATE ON {EVENTS_TABLE}"
    f" FOR EACH STATEMENT EXECUTE FUNCTION {APPEND_ONLY_FUNCTION}()",
)


class TransactionCounterBehind(RuntimeError):
    """The cluster's transaction counter is behind the stored events' tx_id values
    (a restore into a new cluster): new events would sort before old ones."""


# Events are ordered by the id of the transaction that wrote them (`tx_id xid8`). A dump
# restored into a NEW cluster keeps the old tx_id values while the new cluster's counter
# starts low: every new event would then sort before the restored ones, and readers
# that have passed them would never see the new events.
MAX_TX_ID = f"SELECT max(tx_id)::text FROM {EVENTS_TABLE}"
CURRENT_TX_ID = "SELECT pg_current_xact_id()::text"


def check_transaction_counter(settings: Settings) -> None:
    """Refuse (TransactionCounterBehind) when max(tx_id) of the stored events is not
    below this cluster's current transaction id."""
    with psycopg.connect(settings.require_database_url()) as conn, conn.transaction():
        exists = conn.execute("SELECT to_regclass(%s) IS NOT NULL", (EVENTS_TABLE,)).fetchone()
        if not (exists and exists[0]):
            return
        if not conn.execute(
            "SELECT 1 FROM pg_attribute WHERE attrelid = %s::regclass AND attname = 'tx_id'"
            " AND NOT attisdropped", (EVENTS_TABLE,)
        ).fetchone():
            return  # a store from before tx_id: the column is added now, with current ids
        row = conn.execute(MAX_TX_ID).fetchone()
        highest = int(row[0]) if row and row[0] is not None else None
        current_row = conn.execute(CURRENT_TX_ID).fetchone()
        assert current_row is not None
        current = int(current_row[0])
    if highest is not None and highest >= current:
        epoch = (highest >> 32) + 1
        raise TransactionCounterBehind(
            f"{EVENTS_TABLE} holds events written by transaction {highest}, but this"
            f" PostgreSQL cluster's transaction id is only {current}: was it restored into"
            " a new cluster? New events would sort before the restored ones. Stop the"
            f" cluster, run `pg_resetwal -e {epoch} <data directory>` to advance its"
            " transaction id epoch, start it again and rerun `taskctl db init`"
            " (docs/operations.md, 'Back up and restore'). Nothing was changed."
        )


def init_database(settings: Settings) -> None:
    check_transaction_counter(settings)
    create_schema(settings)
    _make_events_append_only(settings)
    create_read_tables(settings.require_database_url())


def create_read_tables(url: str, tables: Tables = LIVE) -> None:
    """Every read model's tables and indexes and the checkpoints (`projections.manifest`),
    under `tables`' names; safe to run again."""
    with psycopg.connect(url) as conn, conn.transaction():
        # Serialise concurrent `db init`s: CREATE ... IF NOT EXISTS can race.
        conn.execute("SELECT pg_advisory_xact_lock(hashtextextended(%s, 0))", (DDL_LOCK,))
        for statement in ddl(tables):
            conn.execute(statement)


def _make_events_append_only(settings: Settings) -> None:
    """Triggers that make UPDATE, DELETE and TRUNCATE of stored events fail (idempotent)."""
    with psycopg.connect(settings.require_database_url()) as conn, conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(hashtextextended(%s, 0))", (DDL_LOCK,))
        for statement in APPEND_ONLY_DDL:
            conn.execute(statement)
