"""`taskctl db init`: every table the service needs, created once, explicitly.

Processes never create tables at start-up (concurrent creation fails intermittently)."""

from __future__ import annotations

from shared.eventstore import create_schema
from shared.settings import Settings


def init_database(settings: Settings) -> None:
    create_schema(settings)
    _create_read_tables(settings)


def _create_read_tables(settings: Settings) -> None:
    """The projector's read tables and checkpoints (DDL owned by `projections.schema`)."""
    import psycopg  # noqa: PLC0415

    from projections.schema import ddl  # noqa: PLC0415 - shared must not import it at load

    with psycopg.connect(settings.require_database_url()) as conn, conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(hashtextextended('taskservice.ddl', 0))")
        for statement in ddl():
            conn.execute(statement)
