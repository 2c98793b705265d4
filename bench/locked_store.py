"""The command API on the library's table-locking writer, for the benchmark's
before/after comparison: `python -m bench.locked_store --port N`.

`TableLockingStore` writes as eventsourcing's recorder does: each insert in a
transaction that first takes the events table in EXCLUSIVE mode and sends NOTIFY inside
it, and no group commit. Everything else (routes, executor, reads) is the command API's
own, so the comparison isolates the writer.
"""

from __future__ import annotations

from typing import Any

import asyncpg
from fastapi import FastAPI

from bench.procs import serve_variant
from command_api import store
from command_api.app import create_app as create_command_app
from command_api.store import PostgresEventStore
from shared.catalog import EVENTS_TABLE
from shared.settings import Settings

_LOCK = f"LOCK TABLE {EVENTS_TABLE} IN EXCLUSIVE MODE"
_NOTIFY = f'NOTIFY "{EVENTS_TABLE}"'


class TableLockingStore(PostgresEventStore):
    async def insert(self, statement: str, args: list[Any]) -> list[Any]:
        async def locked(conn: asyncpg.Connection) -> list[Any]:
            async with conn.transaction():
                if statement != store._INSERT_IDEMPOTENCY_ONLY:  # it appends events
                    await conn.execute(_LOCK)
                    await conn.execute(_NOTIFY)
                return await conn.fetch(statement, *args)

        return await self.use(locked)

    async def append_one(self, event: tuple[Any, ...]) -> tuple[int, str] | None:
        try:
            rows = await self.insert(store._INSERT_ONE, list(event))
        except asyncpg.UniqueViolationError as e:
            if e.constraint_name == store.EVENTS_KEY:
                return None
            raise
        return (rows[0][0], rows[0][1]) if rows else None  # no rows: no predecessor

    def _notify_soon(self) -> None:
        pass  # sent inside each transaction


def create_app() -> FastAPI:
    """The uvicorn factory: the command API on `TableLockingStore`, settings from the
    environment."""
    settings = Settings.from_env()
    return create_command_app(settings, store=TableLockingStore.open)


def main() -> None:
    serve_variant("python -m bench.locked_store", "bench.locked_store:create_app")


if __name__ == "__main__":
    main()
