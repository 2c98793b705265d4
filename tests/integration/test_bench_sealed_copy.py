"""bench/sealed_copy.py: the replay benchmark's sealed twin holds the same events with
every personal field sealed, and projects to exactly the same read tables."""

from __future__ import annotations

import os
import secrets

import psycopg

from bench.data import seed_replay_events
from bench.sealed_copy import sealed_twin
from shared.catalog import EVENTS_TABLE
from shared.datakeys import _RINGS, SEALED_PREFIX
from tests.support import PostgresServer
from tests.support.projection import catch_up, fresh_database, settings_for, snapshot


async def test_the_sealed_twin_projects_to_the_same_read_tables(pg_server: PostgresServer):
    plain, sealed = fresh_database(pg_server), fresh_database(pg_server)
    master = secrets.token_urlsafe(32)
    try:
        events, _ = seed_replay_events(settings_for(plain), 400, users=7)
        copied, _ = sealed_twin(plain, sealed, master)
        assert copied == events == 400
        with psycopg.connect(sealed) as conn:
            titles = [r[0] for r in conn.execute(
                f"SELECT convert_from(state, 'UTF8')::jsonb ->> 'title' FROM {EVENTS_TABLE}"
                " WHERE topic IN ('TaskCreated', 'TaskTitleChanged')").fetchall()]
            keys = conn.execute("SELECT count(DISTINCT user_id) FROM user_data_keys").fetchone()
        assert titles and all(t.startswith(SEALED_PREFIX) for t in titles)
        assert keys == (7,)
        await catch_up(plain)
        os.environ["DATA_MASTER_KEY"] = master  # the runner's ring for the twin
        _RINGS.clear()
        try:
            await catch_up(sealed)
        finally:
            del os.environ["DATA_MASTER_KEY"]
            _RINGS.clear()
        assert snapshot(sealed) == snapshot(plain)
    finally:
        pg_server.drop_database(plain)
        pg_server.drop_database(sealed)
