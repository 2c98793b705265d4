"""An event store written by the library's own recorder (no tx_id, table-lock order)
migrates with `taskctl db init`: no event lost, reordered or applied twice."""

from __future__ import annotations

from collections.abc import Iterator

import psycopg
import pytest
from eventsourcing.application import Application

from shared.catalog import EVENTS_TABLE
from shared.events import Task
from shared.eventstore import store_env
from shared.settings import Settings
from taskctl.dbinit import init_database
from tests.support import TEST_SECRET, PostgresServer, library_store, new_user
from tests.support.projection import catch_up


class LibraryStore(Application):
    """The stock eventsourcing application, as a store made before our recorder."""

    name = "Tasks"


@pytest.fixture
def old_store_url(pg_server: PostgresServer) -> Iterator[str]:
    url = pg_server.create_database("taskservice_migrate")
    yield url
    pg_server.drop_database(url)


def test_db_init_migrates_an_old_store_and_its_checkpoint_without_loss(old_store_url: str):
    settings = Settings(environment="test", database_url=old_store_url,
                        better_auth_secret=TEST_SECRET)
    env = store_env(settings, create_tables=True)
    env.pop("APPLICATION_RECORDER_TOPIC")  # the library's own recorder and table
    old = LibraryStore(env=env)
    user = new_user()
    tasks = []
    for n in range(6):
        task = Task.create(owner=user, title=f"old {n}", description=None, actor=user,
                           request_id=f"r{n}")
        task.change(actor=user, request_id=f"r{n}", completed=True)
        tasks.append(task)
        old.save(task)
    old.close()
    with psycopg.connect(old_store_url) as conn:
        columns = {r[0] for r in conn.execute(
            "SELECT column_name FROM information_schema.columns WHERE table_name = %s",
            (EVENTS_TABLE,))}
        assert "tx_id" not in columns  # really the old shape
        # An old projector's checkpoint: position-only, at the 4th event.
        conn.execute(
            "CREATE TABLE projection_checkpoints (projection text PRIMARY KEY,"
            " position bigint NOT NULL, updated_at timestamptz NOT NULL DEFAULT now())"
        )
        conn.execute("INSERT INTO projection_checkpoints VALUES ('task_views', 4, now())")

    init_database(settings)
    init_database(settings)  # and again: idempotent

    with psycopg.connect(old_store_url) as conn:
        tx_ids = {r[0] for r in conn.execute(f"SELECT tx_id::text FROM {EVENTS_TABLE}")}
        assert len(tx_ids) == 1  # every old event shares the migrating transaction's id
        (checkpoint_tx,) = conn.execute(
            "SELECT tx_id::text FROM projection_checkpoints").fetchone()
        assert checkpoint_tx in tx_ids  # the checkpoint names its event in the new order

    # New writes go through our recorder and come after every old event.
    store = library_store(settings)
    try:
        later = Task.create(owner=user, title="new", description=None, actor=user,
                            request_id="new")
        store.save(later)
    finally:
        store.close()

    import asyncio

    asyncio.run(catch_up(old_store_url))
    with psycopg.connect(old_store_url) as conn:
        projected = sorted(r[0] for r in conn.execute("SELECT position FROM read_task_history"))
        events = sorted(r[0] for r in conn.execute(
            f"SELECT notification_id FROM {EVENTS_TABLE} ORDER BY tx_id, notification_id"))
    # Exactly the events after the old checkpoint (the old projector had applied 1-4).
    assert projected == [n for n in events if n > 4]
    assert len(events) == 13
