from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator

import pytest
from fastapi.testclient import TestClient

from shared.settings import Settings
from taskctl.dbinit import init_database
from tests.support import TEST_SECRET, PostgresServer
from tests.support.query import use_database


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PostgresServer]:
    server = PostgresServer()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def database_url(pg_server: PostgresServer) -> Iterator[str]:
    """One database for this test run, initialised like production (`taskctl db init`).
    Tests share it and stay apart by using their own users and task ids."""
    url = pg_server.create_database()
    init_database(Settings(environment="test", database_url=url, better_auth_secret=TEST_SECRET))
    use_database(url)
    yield url
    pg_server.drop_database(url)


@pytest.fixture(scope="session")
def settings(database_url: str) -> Settings:
    return Settings(environment="test", database_url=database_url, better_auth_secret=TEST_SECRET)


@pytest.fixture(scope="session")
def command_client(settings: Settings) -> Iterator[TestClient]:
    from command_api.app import create_app

    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        yield client


@pytest.fixture
async def projector(database_url: str) -> AsyncIterator[asyncio.Task[None]]:
    """The real projector following this run's database (or the module's own
    `database_url`, directly, never through a pooler) in the test's event loop: NOTIFY
    wakes it, it polls every 30 s; stopped after the test."""
    from projections.projector import run

    stop = asyncio.Event()
    task = asyncio.create_task(run(database_url, stop=stop, poll_interval=30))
    yield task
    stop.set()
    await asyncio.wait_for(task, 10)


@pytest.fixture
def own_db(pg_server: PostgresServer) -> Iterator[str]:
    """A database of the test's own, initialised like production
    (`tests.support.projection.fresh_database`), dropped after it. A module whose
    database needs more (module scope, events written first, its own name) defines an
    `own_db` of its own, which takes precedence there."""
    from tests.support.projection import fresh_database

    url = fresh_database(pg_server)
    yield url
    pg_server.drop_database(url)
