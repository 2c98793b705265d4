"""`python -m bench.replay_stages` against a real PostgreSQL: it reads the store's
events, times every stage of the load over all of them, and writes nothing."""

from __future__ import annotations

import asyncio

import psycopg
import pytest

from bench import replay_stages
from shared.catalog import EVENTS_TABLE
from tests.support.projection import (
    Writer,
    catch_up,
    every_event_type,
    snapshot,
)


def test_every_stage_is_timed_over_every_event_and_nothing_is_written(
    own_db: str, capsys: pytest.CaptureFixture[str],
) -> None:
    writer = Writer(own_db)
    try:
        every_event_type(writer)
    finally:
        writer.close()
    asyncio.run(catch_up(own_db))
    before = snapshot(own_db)
    with psycopg.connect(own_db) as conn:
        row = conn.execute(f"SELECT count(*) FROM {EVENTS_TABLE}").fetchone()
    assert row is not None and row[0] > 50

    result = asyncio.run(replay_stages.measure(own_db, 100_000, 2))

    assert result["events"] == row[0]
    assert set(result["seconds_per_million"]) == set(replay_stages.STAGES)
    assert all(len(runs) == 2 and all(s > 0 for s in runs) for runs in result["runs"].values())
    assert snapshot(own_db) == before
    replay_stages.main([own_db, "--events", "20", "--repeats", "1"])
    assert "20 events, median of 1" in capsys.readouterr().out
