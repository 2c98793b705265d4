"""`taskctl db init`: every table the service needs, created once, explicitly.

Processes never create tables at start-up (concurrent creation fails intermittently)."""

from __future__ import annotations

from shared.eventstore import EVENTS_TABLE, create_schema
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


def init_database(settings: Settings) -> None:
    create_schema(settings)
    _make_events_append_only(settings)
    _create_read_tables(settings)


def _create_read_tables(settings: Settings) -> None:
    """The projector's read tables and checkpoints (DDL owned by `projections.schema`)."""
    import psycopg  # noqa: PLC0415

    from projections.schema import ddl  # noqa: PLC0415 - shared must not import it at load

    with psycopg.connect(settings.require_database_url()) as conn, conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(hashtextextended('taskservice.ddl', 0))")
        for statement in ddl():
            conn.execute(statement)


def _make_events_append_only(settings: Settings) -> None:
    """Triggers that make UPDATE, DELETE and TRUNCATE of stored events fail (idempotent)."""
    import psycopg  # noqa: PLC0415

    with psycopg.connect(settings.require_database_url()) as conn, conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(hashtextextended('taskservice.ddl', 0))")
        for statement in APPEND_ONLY_DDL:
            conn.execute(statement)
