"""`taskctl db init`: every table the service needs, created once, explicitly.

Processes never create tables at start-up (concurrent creation fails intermittently)."""

from __future__ import annotations

from shared.eventstore import create_schema
from shared.settings import Settings


def init_database(settings: Settings) -> None:
    create_schema(settings)
