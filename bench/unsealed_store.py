"""The command API with nothing sealed, for the benchmark's with/without comparison of
crypto-shredding (shared/datakeys.py): `python -m bench.unsealed_store --port N`.

The same command API (routes, executor, store, group commit) with its store's `sealing`
off: events are stored with their fields open, no data key is read or made, and the
appends check none. Everything else is the same, so the comparison
isolates what sealing costs a command.
"""

from __future__ import annotations

from fastapi import FastAPI

from bench.procs import serve_variant
from command_api.app import create_app as create_command_app
from command_api.store import PostgresEventStore
from shared.settings import Settings


async def open_unsealed(settings: Settings) -> PostgresEventStore:
    store = await PostgresEventStore.open(settings)
    store.sealing = False
    return store


def create_app() -> FastAPI:
    """The uvicorn factory: the command API on an unsealed store, settings from the
    environment."""
    return create_command_app(Settings.from_env(), store=open_unsealed)


def main() -> None:
    serve_variant("python -m bench.unsealed_store", "bench.unsealed_store:create_app")


if __name__ == "__main__":
    main()
